//! The proxy's workload identity: a key pair made here (the private key never leaves the
//! process), a short-lived leaf certificate for the workload's SPIFFE ID signed by the control
//! plane's CA, and the trust roots peers are verified against.
//!
//! [`Certifier`] asks the control plane for a certificate (`POST /v1/identity/certify` with a
//! CSR and the bootstrap token read from a file), publishes the [`Credentials`] through a
//! `watch` channel, and asks again at 70 % of the lifetime with a fresh key. A failed renewal
//! is retried with backoff while the current certificate keeps serving. The TLS configurations
//! (see [`crate::tls`]) read the newest credentials on every handshake, so a renewal swaps the
//! certificate for new connections without touching the ones open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::proxy_api::{CERTIFY_PATH, CertifyRequest, CertifyResponse};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::readiness::Readiness;

/// The share of a certificate's lifetime after which it is renewed.
pub const REFRESH_AT: f64 = 0.7;

/// The shortest wait before a renewal.
const MIN_REFRESH: Duration = Duration::from_millis(500);

/// How long one certify call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's current credentials; `None` until the first certificate is held.
pub type SharedCredentials = watch::Receiver<Option<Arc<Credentials>>>;

/// A certificate with its key, and the roots peers must chain to.
pub struct Credentials {
    /// The SPIFFE ID the certificate names.
    pub identity: String,
    /// The leaf (and any intermediates) with the signing key, as rustls presents them.
    pub key: Arc<CertifiedKey>,
    /// The trust roots.
    pub roots: Arc<RootCertStore>,
    /// Verifies peers' client certificates against `roots`.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// The leaf's expiry, RFC 3339, as the control plane reported it.
    pub not_after: String,
    /// The validity the control plane granted.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials from a PKCS#8 key, the certificate chain and the trust roots (PEM).
    pub fn new(
        identity: &str,
        key_pkcs8_der: Vec<u8>,
        chain_pem: &str,
        roots_pem: &str,
        not_after: String,
        lifetime: Duration,
    ) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("the certificate chain is empty")?;
        let named = mesh_policies::certificate_identity(leaf);
        if named.as_deref() != Some(identity) {
            return Err(format!(
                "the certificate names {named:?}, not the identity asked for ({identity})"
            ));
        }
        let serial = serial_hex(leaf)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| format!("private key: {e}"))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            let root = root.map_err(|e| format!("trust roots: {e}"))?;
            roots.add(root).map_err(|e| format!("trust roots: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no trust roots".into());
        }
        let roots = Arc::new(roots);
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            crate::crypto::provider(),
        )
        .build()
        .map_err(|e| format!("trust roots: {e}"))?;
        Ok(Self {
            identity: identity.to_string(),
            key: Arc::new(CertifiedKey::new(chain, signer)),
            roots,
            client_verifier,
            serial,
            not_after,
            lifetime,
        })
    }

    /// When to renew: [`REFRESH_AT`] of the lifetime after issue.
    pub fn refresh_after(&self) -> Duration {
        // A floor, so a control plane granting (almost) no lifetime is not asked in a busy loop.
        self.lifetime.mul_f64(REFRESH_AT).max(MIN_REFRESH)
    }
}

fn serial_hex(leaf: &CertificateDer<'_>) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("certificate: {e}"))?;
    Ok(cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token file cannot be read.
    #[error("reading the bootstrap token from {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key pair or the CSR could not be made.
    #[error("generating the key pair and CSR: {0}")]
    Key(rcgen::Error),
    /// The control plane did not answer.
    #[error(
        "control plane at {base} is unreachable: {}",
        mesh_core::error::chain(.source)
    )]
    Unreachable {
        /// The control plane's proxy API.
        base: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The control plane refused the token.
    #[error(
        "control plane at {base} refused the bootstrap token read from {path} (403 Forbidden); \
         check that the file is the control plane's current token"
    )]
    BadToken {
        /// The control plane's proxy API.
        base: String,
        /// The token file.
        path: PathBuf,
    },
    /// The control plane refused the request for another reason.
    #[error("control plane at {base} refused to certify {identity}: {status}: {message}")]
    Refused {
        /// The control plane's proxy API.
        base: String,
        /// The identity asked for.
        identity: String,
        /// Its answer.
        status: reqwest::StatusCode,
        /// Its message.
        message: String,
    },
    /// The answer is not a usable certificate.
    #[error("control plane at {base} answered with an unusable certificate: {reason}")]
    BadAnswer {
        /// The control plane's proxy API.
        base: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Keeps the proxy's certificate fresh.
#[derive(Debug)]
pub struct Certifier {
    base: String,
    client: reqwest::Client,
    identity: String,
    token_file: PathBuf,
    credentials: watch::Sender<Option<Arc<Credentials>>>,
}

impl Certifier {
    /// A certifier asking the control plane's proxy API at `base` (`https://host:port`) for
    /// `identity`, with the token in `token_file`, and publishing into `credentials`. (The
    /// channel is made by the caller because the TLS of `client` itself reads it.)
    pub fn new(
        base: &str,
        client: reqwest::Client,
        identity: &str,
        token_file: &Path,
        credentials: watch::Sender<Option<Arc<Credentials>>>,
    ) -> Self {
        Self {
            base: base.to_string(),
            client,
            identity: identity.to_string(),
            token_file: token_file.to_path_buf(),
            credentials,
        }
    }

    /// The credentials as they are renewed.
    pub fn credentials(&self) -> SharedCredentials {
        self.credentials.subscribe()
    }

    /// Obtains and renews the certificate forever. The first certificate moves `readiness` from
    /// [`Readiness::Certifying`] to `then`.
    pub async fn run(self, readiness: watch::Sender<Readiness>, then: Readiness) {
        let mut backoff = Backoff::default();
        loop {
            match self.certify().await {
                Ok(credentials) => {
                    backoff.reset();
                    let wait = credentials.refresh_after();
                    tracing::info!(
                        identity = %credentials.identity,
                        serial = %credentials.serial,
                        not_after = %credentials.not_after,
                        renew_in = ?wait,
                        "certificate issued"
                    );
                    self.credentials.send_replace(Some(Arc::new(credentials)));
                    readiness.send_if_modified(|r| {
                        let first = *r == Readiness::Certifying;
                        if first {
                            *r = then;
                        }
                        first
                    });
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    let wait = backoff.next_wait();
                    if self.credentials.borrow().is_some() {
                        tracing::warn!(%error, ?wait, "renewing the certificate failed; the current one keeps serving");
                    } else {
                        tracing::error!(%error, ?wait, "obtaining a certificate failed; not ready until one is issued");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Asks for one certificate, with a new key.
    pub async fn certify(&self) -> Result<Credentials, IdentityError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| IdentityError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let key = rcgen::KeyPair::generate().map_err(IdentityError::Key)?;
        let csr_pem = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|params| params.serialize_request(&key))
            .and_then(|csr| csr.pem())
            .map_err(IdentityError::Key)?;
        let request = CertifyRequest {
            token: token.trim().to_string(),
            csr_pem,
            identity: self.identity.clone(),
        };
        let rsp = self
            .client
            .post(format!("{}{CERTIFY_PATH}", self.base))
            .json(&request)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|source| IdentityError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = rsp.status();
        if status == reqwest::StatusCode::FORBIDDEN {
            return Err(IdentityError::BadToken {
                base: self.base.clone(),
                path: self.token_file.clone(),
            });
        }
        if !status.is_success() {
            let message = rsp.text().await.unwrap_or_default();
            return Err(IdentityError::Refused {
                base: self.base.clone(),
                identity: self.identity.clone(),
                status,
                message,
            });
        }
        let answer: CertifyResponse = rsp.json().await.map_err(|e| IdentityError::BadAnswer {
            base: self.base.clone(),
            reason: e.to_string(),
        })?;
        Credentials::new(
            &self.identity,
            key.serialize_der(),
            &answer.certificate_chain_pem,
            &answer.trust_roots_pem,
            answer.not_after,
            Duration::from_secs(answer.lifetime_seconds),
        )
        .map_err(|reason| IdentityError::BadAnswer {
            base: self.base.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    /// A root and a leaf for `san` signed by it: (root PEM, leaf PEM, leaf key PKCS#8).
    fn mk_chain(san: &str) -> (String, String, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
        let leaf = params.signed_by(&key, &issuer).unwrap();
        (root.pem(), leaf.pem(), key.serialize_der())
    }

    #[test]
    fn credentials_hold_the_identity_asked_for() {
        let (root, leaf, key) = mk_chain(ID);
        let c = Credentials::new(
            ID,
            key,
            &leaf,
            &root,
            "2030-01-01T00:00:00Z".into(),
            Duration::from_secs(100),
        )
        .unwrap();
        assert_eq!(c.identity, ID);
        assert_eq!(c.serial.len() % 2, 0);
        assert_eq!(c.refresh_after(), Duration::from_secs(70));
    }

    #[test]
    fn credentials_for_another_identity_are_refused() {
        let (root, leaf, key) = mk_chain("spiffe://cluster.local/ns/default/sa/other");
        let err =
            Credentials::new(ID, key, &leaf, &root, String::new(), Duration::ZERO).unwrap_err();
        assert!(err.contains("not the identity asked for"), "{err}");
        let (_, leaf, key) = mk_chain(ID);
        let err = Credentials::new(ID, key, &leaf, "", String::new(), Duration::ZERO).unwrap_err();
        assert!(err.contains("no trust roots"), "{err}");
    }
}
