//! Where a redirected connection was going. The injector's iptables rules `REDIRECT` a pod's
//! outbound TCP to the proxy's outbound listener (and inbound TCP to its inbound listener);
//! the kernel's connection tracking remembers the address the app dialled, which
//! `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6) read back.
//!
//! A connection that was not redirected (an app using `HTTP_PROXY`, a test on 127.0.0.1) has
//! no original destination of its own: the kernel answers with the listener's address, or an
//! error when connection tracking is not loaded. Both mean "not redirected" here.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address the client of `io` dialled, when it differs from where the connection was
/// accepted (it was redirected); `None` when it was not redirected.
pub fn original_dst(io: &TcpStream) -> Option<SocketAddr> {
    let local = io.local_addr().ok()?;
    let sock = socket2::SockRef::from(io);
    // An IPv4 client of a dual-stack listener is tracked as IPv4.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let orig = if v4 {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig.ok()?.as_socket()?;
    redirected(local, orig)
}

/// `orig` when it names another address than the listener's own `local`.
pub fn redirected(local: SocketAddr, orig: SocketAddr) -> Option<SocketAddr> {
    let same = orig.port() == local.port()
        && (orig.ip() == local.ip() || orig.ip().to_canonical() == local.ip().to_canonical());
    (!same).then_some(orig)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection accepted on 127.0.0.1 without any redirect: the kernel reports no other
    /// destination than the listener (or no conntrack entry at all), so it is not redirected.
    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                continue; // no IPv6 loopback here
            };
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            assert_eq!(original_dst(&server), None, "{bind}");
        }
    }

    #[test]
    fn only_another_address_is_a_redirect() {
        let local: SocketAddr = "127.0.0.1:4140".parse().unwrap();
        assert_eq!(redirected(local, local), None);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4140".parse().unwrap();
        assert_eq!(redirected(mapped, local), None);
        let db: SocketAddr = "10.96.0.12:5432".parse().unwrap();
        assert_eq!(redirected(local, db), Some(db));
        let other_port: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(redirected(local, other_port), Some(other_port));
    }
}
