//! mTLS between proxies (rustls with the aws-lc-rs provider; X25519MLKEM768 preferred).
//!
//! Both ends present the certificate [`crate::identity`] holds and verify the peer against the
//! trust roots that came with it. Certificates and roots are read through the credentials'
//! `watch` channel on every handshake, so a renewal takes effect for the next connection while
//! open connections carry on.
//!
//! SPIFFE certificates name the workload in a URI SAN and carry no DNS name, so the client side
//! does not check a server name: it checks the chain with the WebPKI verifier and then that the
//! URI SAN is exactly the identity discovery promised for the endpoint. The server side requires
//! a client certificate chaining to the roots and hands the caller's SPIFFE ID to the inbound
//! path. Only TLS 1.3 is offered; ALPN is `h2`, as proxies talk HTTP/2 to each other, or
//! [`ALPN_OPAQUE`] for an opaque TCP connection carried to the peer's app byte for byte.
//!
//! The control plane's proxy API is reached the same way ([`control_plane_config`]): its
//! certificate must chain to the trust roots and name the control plane's SPIFFE ID, and the
//! proxy presents its current workload certificate, once it holds one. Before the first
//! certificate there are no roots from the CA yet, so the roots configured up front
//! (`MESH_PROXY_TRUST_ROOTS`) verify the control plane; afterwards the roots that come with each
//! certificate do, so a rotation of the roots reaches the proxy through renewals.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpStream;

use crate::crypto::provider;
use crate::identity::{Credentials, SharedCredentials};

/// ALPN protocol of proxy-to-proxy connections.
pub const ALPN_H2: &[u8] = b"h2";

/// ALPN protocol of an opaque TCP connection between proxies: the peer's inbound listener
/// forwards what the connection carries to its app byte for byte, and authorizes it by the
/// client's identity like an HTTP request.
pub const ALPN_OPAQUE: &[u8] = b"opaque.mesh.dev/v1";

/// The SPIFFE ID a certificate names (see [`mesh_policies::certificate_identity`]).
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    mesh_policies::certificate_identity(cert)
}

fn current(credentials: &SharedCredentials) -> Result<Arc<Credentials>, rustls::Error> {
    credentials
        .borrow()
        .clone()
        .ok_or_else(|| rustls::Error::General("this proxy holds no certificate yet".into()))
}

/// Presents the newest certificate, on both sides of a handshake.
#[derive(Debug)]
struct CurrentCert(SharedCredentials);

impl CurrentCert {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// Outbound: the peer's certificate chains to the roots and names exactly `expected`.
#[derive(Debug)]
struct PeerIsExpected {
    expected: String,
    credentials: SharedCredentials,
    /// Roots to use while no credentials are held (the control plane, before the first
    /// certificate); peer proxies are never dialled without credentials.
    fallback_roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl PeerIsExpected {
    fn roots(&self) -> Result<Arc<RootCertStore>, rustls::Error> {
        if let Some(credentials) = self.credentials.borrow().as_ref() {
            return Ok(credentials.roots.clone());
        }
        self.fallback_roots
            .clone()
            .ok_or_else(|| rustls::Error::General("this proxy holds no certificate yet".into()))
    }
}

impl ServerCertVerifier for PeerIsExpected {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots()?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "peer presented identity {}, expected {}",
                other.as_deref().unwrap_or("(none)"),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Inbound: a client certificate is required, chains to the roots, and names a SPIFFE ID.
#[derive(Debug)]
struct PeerIsMeshed {
    credentials: SharedCredentials,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PeerIsMeshed {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let credentials = current(&self.credentials)?;
        credentials
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        if spiffe_id(end_entity).is_none() {
            return Err(rustls::Error::General(
                "the client certificate names no SPIFFE ID".into(),
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client side of connections to a peer that must be `expected`.
pub fn client_config(
    credentials: &SharedCredentials,
    expected: &str,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    peer_config(credentials, expected, ALPN_H2)
}

/// As [`client_config`], for opaque TCP connections ([`ALPN_OPAQUE`]).
pub fn opaque_client_config(
    credentials: &SharedCredentials,
    expected: &str,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    peer_config(credentials, expected, ALPN_OPAQUE)
}

fn peer_config(
    credentials: &SharedCredentials,
    expected: &str,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerIsExpected {
            expected: expected.to_string(),
            credentials: credentials.clone(),
            fallback_roots: None,
            provider,
        }))
        .with_client_cert_resolver(Arc::new(CurrentCert(credentials.clone())));
    config.alpn_protocols = vec![alpn.to_vec()];
    // Every connection is verified in full: a resumed session would skip the identity check
    // and could outlive the certificates it was made with. Pooling keeps handshakes rare.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The client side of connections to the control plane's proxy API, whose certificate must
/// chain to the roots and name `expected` (the control plane's SPIFFE ID). The proxy presents
/// its current certificate (none before the first, which is when it asks for one); `roots` are
/// used until it holds credentials, whose roots are used afterwards. ALPN is `h2`: discovery
/// streams, certify and registration share HTTP/2 connections.
pub fn control_plane_config(
    credentials: &SharedCredentials,
    roots: Arc<RootCertStore>,
    expected: &str,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerIsExpected {
            expected: expected.to_string(),
            credentials: credentials.clone(),
            fallback_roots: Some(roots),
            provider,
        }))
        .with_client_cert_resolver(Arc::new(CurrentCert(credentials.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // As between proxies: each connection presents, and is checked with, what is current.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The server side of the inbound listener's TLS connections.
pub fn server_config(
    credentials: &SharedCredentials,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PeerIsMeshed {
            credentials: credentials.clone(),
            provider,
        }))
        .with_cert_resolver(Arc::new(CurrentCert(credentials.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec(), ALPN_OPAQUE.to_vec()];
    // No resumption (see `client_config`): every client certificate is verified.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The verified SPIFFE ID of the client of a server-side TLS connection.
pub fn client_identity(conn: &rustls::ServerConnection) -> Option<String> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(spiffe_id)
}

/// Connects to a peer proxy's inbound listener over mTLS, for hyper-util's pooled client. The
/// TLS handshake is part of connecting: a peer that cannot prove its identity is a connect
/// failure (nothing was sent, so it is safe to retry elsewhere).
#[derive(Clone)]
pub struct MtlsConnector {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MtlsConnector")
    }
}

impl MtlsConnector {
    /// A connector with `config`, failing when TCP and TLS together take longer than `timeout`.
    pub fn new(config: Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        Self {
            tls: tokio_rustls::TlsConnector::from(config),
            timeout,
        }
    }
}

/// Why a connection to a peer proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or TLS handshake took too long.
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Tcp {
        /// The peer.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong identity, untrusted certificate, no certificate).
    #[error("mTLS handshake with {addr}: {source}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The peer did not agree to HTTP/2.
    #[error("peer {0} did not negotiate h2")]
    NoH2(SocketAddr),
    /// The peer did not agree to carry opaque TCP (a proxy that predates it).
    #[error("peer {0} did not negotiate opaque TCP")]
    NoOpaque(SocketAddr),
}

/// Opens TCP to the peer proxy at `addr` and makes the mTLS handshake with `tls`, both within
/// `timeout`. SPIFFE certificates carry no DNS name; the IP is never checked (and not sent as
/// SNI), the verifier checks the URI SAN instead. The caller checks the protocol agreed (ALPN).
pub(crate) async fn connect_mtls(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        tls.connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| ConnectError::Tls { addr, source })
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
}

/// Opens an opaque TCP connection to the peer proxy at `addr` over mTLS with `config` (from
/// [`opaque_client_config`]), failing when TCP and TLS together take longer than `timeout`.
pub async fn connect_opaque(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let stream = connect_mtls(&tokio_rustls::TlsConnector::from(config), addr, timeout).await?;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_OPAQUE) {
        return Err(ConnectError::NoOpaque(addr));
    }
    Ok(stream)
}

impl crate::pool::Connect for MtlsConnector {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<crate::pool::BoxIo, crate::pool::ConnectError>> + Send>>
    {
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let stream = connect_mtls(&tls, addr, timeout).await?;
            if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(ConnectError::NoH2(addr).into());
            }
            Ok(Box::new(TokioIo::new(stream)) as crate::pool::BoxIo)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(sans: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        for san in sans {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*san).try_into().unwrap()));
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_names_its_one_spiffe_id() {
        let id = "spiffe://cluster.local/ns/default/sa/web";
        assert_eq!(spiffe_id(&leaf(&[id])).as_deref(), Some(id));
        assert_eq!(spiffe_id(&leaf(&["https://example.com"])), None);
        assert_eq!(spiffe_id(&leaf(&[])), None);
        let two = leaf(&[id, "spiffe://cluster.local/ns/default/sa/other"]);
        assert_eq!(spiffe_id(&two), None);
    }
}
