//! TLS on the proxy listener: the control plane's serving certificate, issued by its own CA and
//! renewed before it expires, and client certificates checked against the CA's roots.
//!
//! Client certificates are optional at the handshake, because a proxy asks for its first one
//! over this listener (`certify` is authenticated by its token instead). A certificate that is
//! presented must chain to the mesh roots, or the handshake fails; its SPIFFE ID becomes the
//! connection's [`PeerIdentity`](crate::http::PeerIdentity), and [`crate::proxy`] decides per request what that identity
//! may do. Only TLS 1.3 is offered and sessions are never resumed, so every connection's client
//! certificate is verified in full, as between proxies.

use std::{net::IpAddr, sync::Arc, time::Duration};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use crate::identity::{Ca, IdentityError, ServingCert};

/// ALPN protocols the proxy listener offers.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The share of the serving certificate's lifetime after which it is replaced, as proxies do
/// with theirs.
const RENEW_AT: f64 = 0.7;

/// How long to wait before trying again when renewing fails.
const RETRY: Duration = Duration::from_secs(5);

/// Why the proxy listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The serving certificate could not be issued.
    #[error("issuing the proxy API's serving certificate")]
    Issue(#[from] IdentityError),
    /// rustls refused the certificate, the key or the roots.
    #[error("configuring TLS for the proxy API: {0}")]
    Config(String),
}

/// The names the serving certificate carries besides the control plane's SPIFFE ID: those
/// clients may connect by and check (the in-cluster Service, loopback, the listen address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS names.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// `localhost`, `127.0.0.1` and `::1`, the control plane's Service name in the cluster, and
    /// `listen` unless it is a wildcard.
    pub fn for_listener(listen: IpAddr) -> Self {
        use mesh_core::identity::{CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT};
        let service = format!("{CONTROL_PLANE_SERVICE_ACCOUNT}.{CONTROL_PLANE_NAMESPACE}");
        let mut ips = vec![
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ];
        if !listen.is_unspecified() && !ips.contains(&listen) {
            ips.push(listen);
        }
        Self {
            dns: vec![
                "localhost".into(),
                format!("{service}.svc"),
                format!("{service}.svc.cluster.local"),
            ],
            ips,
        }
    }
}

/// The serving certificate as rustls presents it.
fn certified_key(cert: &ServingCert) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Config(format!("serving certificate: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pkcs8_der.clone()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| TlsError::Config(format!("serving key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Presents the newest serving certificate on every handshake, so a renewal applies to the next
/// connection without touching open ones.
#[derive(Debug)]
struct CurrentCert(watch::Receiver<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().clone())
    }
}

/// The proxy listener's TLS: its configuration, and the serving certificate it keeps fresh.
#[derive(Debug)]
pub struct ProxyTls {
    config: Arc<ServerConfig>,
    current: watch::Sender<Arc<CertifiedKey>>,
    names: ServerNames,
}

impl ProxyTls {
    /// Issues the first serving certificate for `names` and builds the configuration: client
    /// certificates optional, verified against `ca`'s roots when presented.
    pub fn new(ca: &Ca, names: ServerNames) -> Result<Self, TlsError> {
        let first = certified_key(&ca.issue_serving(
            &names.dns,
            &names.ips,
            std::time::SystemTime::now(),
        )?)?;
        let (current, rx) = watch::channel(first);
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(ca.trust_roots_pem().as_bytes()) {
            let root = root.map_err(|e| TlsError::Config(format!("trust roots: {e}")))?;
            roots
                .add(root)
                .map_err(|e| TlsError::Config(format!("trust roots: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert(rx)));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // No resumption: a resumed session would carry an identity whose certificate is not
        // checked again.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
            current,
            names,
        })
    }

    /// The configuration to accept connections with.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// Replaces the serving certificate, issued by `ca`, at [`RENEW_AT`] of its lifetime,
    /// forever. A failed renewal is retried while the current certificate keeps serving.
    pub async fn renew(self: Arc<Self>, ca: Arc<Ca>) {
        let mut wait = ca.leaf_lifetime().mul_f64(RENEW_AT);
        loop {
            tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
            let issued = ca
                .issue_serving(
                    &self.names.dns,
                    &self.names.ips,
                    std::time::SystemTime::now(),
                )
                .map_err(TlsError::from)
                .and_then(|cert| {
                    certified_key(&cert).map(|key| (key, cert.lifetime.mul_f64(RENEW_AT)))
                });
            match issued {
                Ok((key, next)) => {
                    self.current.send_replace(key);
                    tracing::debug!(renew_in = ?next, "renewed the proxy API's serving certificate");
                    wait = next;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?RETRY, "renewing the proxy API's serving certificate failed; the current one keeps serving");
                    wait = RETRY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_loopback_the_service_and_a_specific_listen_address() {
        let wildcard = ServerNames::for_listener("0.0.0.0".parse().unwrap());
        assert_eq!(
            wildcard.dns,
            [
                "localhost",
                "mesh-controlplane.mesh-system.svc",
                "mesh-controlplane.mesh-system.svc.cluster.local"
            ]
        );
        assert_eq!(wildcard.ips.len(), 2);
        let specific = ServerNames::for_listener("10.1.2.3".parse().unwrap());
        assert_eq!(specific.ips.last(), Some(&"10.1.2.3".parse().unwrap()));
        let loopback = ServerNames::for_listener("127.0.0.1".parse().unwrap());
        assert_eq!(loopback.ips.len(), 2);
    }
}
