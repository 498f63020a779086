//! `bench-handshake [N]`: the cost of one TLS 1.3 handshake with mutual authentication, as two
//! proxies make it (ECDSA P-256 certificates, the workspace's crypto provider), in memory so only
//! the crypto and the protocol are timed, for the hybrid post-quantum group the proxies prefer
//! and for classical X25519. Prints a table; N handshakes each (default 2000).

use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, NamedGroup, RootCertStore, ServerConnection};

#[allow(
    clippy::print_stdout,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark binary: set-up failures end it, the table goes to stdout"
)]
fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["web.default".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    let der: CertificateDer<'static> = cert.der().clone();
    let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let roots = Arc::new(roots);
    println!("| key exchange | handshakes | µs per handshake (client + server) |\n|---|---|---|");
    for group in [NamedGroup::X25519MLKEM768, NamedGroup::X25519] {
        let mut provider = mesh_sidecar::crypto::provider().as_ref().clone();
        provider.kx_groups.retain(|g| g.name() == group);
        let provider = Arc::new(provider);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![der.clone()], private())
                .unwrap(),
        );
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(vec![der.clone()], private())
                .unwrap(),
        );
        let start = Instant::now();
        for _ in 0..n {
            let name = ServerName::try_from("web.default").unwrap();
            let mut c = ClientConnection::new(client.clone(), name).unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            while c.is_handshaking() || s.is_handshaking() {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            assert_eq!(
                s.negotiated_key_exchange_group().map(|g| g.name()),
                Some(group)
            );
        }
        let micros = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        println!("| {group:?} | {n} | {micros:.0} |");
    }
}
