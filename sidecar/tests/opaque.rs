//! Opaque TCP through `mesh-proxy`'s inbound listener, started in-process: a binary client-first
//! protocol and a server-first one (which sends a banner before the client says anything) reach
//! the app byte for byte, and the `tcp_*` counters count them. HTTP on the same port is covered
//! by `inbound.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_test_support::apps::tcp_echo;
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{InProcessProxy, Sidecar, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metric(p: &InProcessProxy, name: &str) -> u64 {
    // Counters are whole numbers.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = p.metric_sum(name, &["direction=\"inbound\""]).await as u64;
    n
}

#[tokio::test]
async fn binary_and_server_first_protocols_pass_through_and_are_counted() {
    // Client first, binary: every byte value, 4 KiB.
    let p = proxy()
        .app(tcp_echo().await.unwrap())
        .env("MESH_PROXY_INBOUND_DETECT_TIMEOUT", "300ms")
        .run()
        .unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let mut s = tokio::net::TcpStream::connect(p.addr("inbound"))
        .await
        .unwrap();
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    assert_eventually!(
        metric(&p, "tcp_read_bytes_total").await == 4096
            && metric(&p, "tcp_write_bytes_total").await == 4096,
        "tcp byte counters: read {} write {}",
        metric(&p, "tcp_read_bytes_total").await,
        metric(&p, "tcp_write_bytes_total").await
    );
    assert_eq!(metric(&p, "tcp_open_connections").await, 1);
    drop(s);
    assert_eventually!(
        metric(&p, "tcp_close_total").await == 1,
        "the close was not counted"
    );
    assert_eq!(metric(&p, "tcp_open_total").await, 1);
    assert_eq!(metric(&p, "tcp_open_connections").await, 0);

    // Server first: the client waits for the banner; after the detect timeout the proxy
    // connects it through.
    let smtp = tcp_echo()
        .banner(b"220 mail.example ESMTP\r\n")
        .await
        .unwrap();
    let p = proxy()
        .app(smtp)
        .env("MESH_PROXY_INBOUND_DETECT_TIMEOUT", "300ms")
        .run()
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(p.addr("inbound"))
        .await
        .unwrap();
    let mut banner = [0u8; 24];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"220 mail.example ESMTP\r\n");
    s.write_all(b"EHLO client\r\n").await.unwrap();
    let mut reply = [0u8; 13];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"EHLO client\r\n");
}
