//! Opaque TCP through `mesh-proxy`'s inbound listener, as a real process: a binary client-first
//! protocol and a server-first one (which sends a banner before the client says anything) reach
//! the app byte for byte, and the `tcp_*` counters count them. HTTP on the same port is covered
//! by `inbound.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use mesh_test_support::assert_eventually;
use mesh_test_support::process::{MeshBinary, MeshProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An app that greets each connection with `banner` (if any), then echoes what it reads.
async fn echo(banner: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(banner).await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn proxy(app: SocketAddr) -> MeshProcess {
    MeshBinary::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESH_PROXY_APP_ADDR", app.to_string())
        .env("MESH_PROXY_INBOUND_DETECT_TIMEOUT", "300ms")
        .listener("admin")
        .listener("outbound")
        .listener("inbound")
        .run()
        .unwrap()
}

async fn metric(p: &MeshProcess, name: &str) -> u64 {
    // Counters are whole numbers.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = p.metric_sum(name, &["direction=\"inbound\""]).await as u64;
    n
}

#[tokio::test]
async fn binary_and_server_first_protocols_pass_through_and_are_counted() {
    // Client first, binary: every byte value, 4 KiB.
    let p = proxy(echo(b"").await);
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
    let p = proxy(echo(b"220 mail.example ESMTP\r\n").await);
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
