//! The identity CA: signs short-lived leaf certificates whose only SAN is the workload's SPIFFE
//! ID, for proxies that present the bootstrap token.
//!
//! The CA key, its certificate and the bootstrap token live in the state directory, created on
//! first start and reused afterwards, so certificates issued before a restart still chain to
//! the roots proxies hold. The embedded token is one shared secret for the whole mesh (the
//! machine's processes are one trust boundary); in Kubernetes the token is a projected
//! ServiceAccount token checked by TokenReview and binds the namespace and service account.
//! The proxy's key never leaves it: it sends a CSR, and only the CSR's public key is used; the
//! subject, SAN, lifetime and key usages are the CA's choice.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_core::{
    SpiffeId,
    proxy_api::{CertifyRequest, CertifyResponse},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// File holding the bootstrap token proxies present.
pub const TOKEN_FILE: &str = "bootstrap-token";
/// File holding the CA certificate (the trust root).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File holding the CA private key.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long the root is valid; see docs/identity.md for how it is rotated.
const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves start a minute in the past so a peer whose clock is slightly behind accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a certificate was not issued, or the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token is not the bootstrap token.
    #[error("the bootstrap token is not valid")]
    BadToken,
    /// The identity asked for is malformed.
    #[error("identity {identity:?}: {reason}")]
    BadIdentity {
        /// What was asked for.
        identity: String,
        /// Why it is refused.
        reason: String,
    },
    /// The CSR cannot be read or its signature does not verify.
    #[error("csrPem: {0}")]
    BadCsr(rcgen::Error),
    /// Signing failed.
    #[error("signing the certificate: {0}")]
    Sign(rcgen::Error),
    /// Reading or writing the CA's files failed.
    #[error("{path}: {message}")]
    Files {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    token: String,
    trust_domain: String,
    lifetime: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn files_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> IdentityError + '_ {
    move |e| IdentityError::Files {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| files_err(path)(&e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| files_err(path)(&e))
}

fn random_hex(bytes: usize) -> Result<String, IdentityError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| IdentityError::Files {
        path: PathBuf::from("(randomness)"),
        message: e.to_string(),
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn serial() -> Result<SerialNumber, IdentityError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| IdentityError::Files {
        path: PathBuf::from("(randomness)"),
        message: e.to_string(),
    })?;
    // A positive DER integer.
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

impl Ca {
    /// Loads the CA and token from `state_dir`, creating whatever is missing.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, IdentityError> {
        std::fs::create_dir_all(state_dir).map_err(|e| files_err(state_dir)(&e))?;
        let token_path = state_dir.join(TOKEN_FILE);
        if !token_path.exists() {
            write_private(&token_path, &format!("{}\n", random_hex(32)?))?;
        }
        let token = std::fs::read_to_string(&token_path)
            .map_err(|e| files_err(&token_path)(&e))?
            .trim()
            .to_string();

        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        if !cert_path.exists() || !key_path.exists() {
            let key = KeyPair::generate().map_err(IdentityError::Sign)?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("mesh root CA ({trust_domain})"));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = SystemTime::now();
            params.not_before = (now - CLOCK_SKEW).into();
            params.not_after = (now + ROOT_LIFETIME).into();
            params.serial_number = Some(serial()?);
            let cert = params.self_signed(&key).map_err(IdentityError::Sign)?;
            // Key first: a crash between the two writes leaves no certificate without its key.
            let _ = std::fs::remove_file(&key_path);
            write_private(&key_path, &key.serialize_pem())?;
            let _ = std::fs::remove_file(&cert_path);
            write_private(&cert_path, &cert.pem())?;
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| files_err(&key_path)(&e))?;
        let root_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| files_err(&cert_path)(&e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| files_err(&key_path)(&e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| files_err(&cert_path)(&e))?;
        Ok(Self {
            issuer,
            root_pem,
            token,
            trust_domain: trust_domain.to_string(),
            lifetime,
        })
    }

    /// The trust roots proxies verify peers against, PEM.
    pub fn trust_roots_pem(&self) -> &str {
        &self.root_pem
    }

    /// The bootstrap token (for the supervisor that starts proxies).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Issues a leaf for `request` at time `now`, when it carries the bootstrap token.
    pub fn certify(
        &self,
        request: &CertifyRequest,
        now: SystemTime,
    ) -> Result<CertifyResponse, IdentityError> {
        if !constant_time_eq(request.token.trim().as_bytes(), self.token.as_bytes()) {
            return Err(IdentityError::BadToken);
        }
        self.certify_authenticated(request, now)
    }

    /// Issues a leaf for `request` whose token the caller has already checked (in a cluster,
    /// with a TokenReview that named this identity's service account).
    pub fn certify_authenticated(
        &self,
        request: &CertifyRequest,
        now: SystemTime,
    ) -> Result<CertifyResponse, IdentityError> {
        let id: SpiffeId =
            request
                .identity
                .parse()
                .map_err(
                    |e: mesh_core::identity::SpiffeIdError| IdentityError::BadIdentity {
                        identity: request.identity.clone(),
                        reason: e.to_string(),
                    },
                )?;
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::BadIdentity {
                identity: request.identity.clone(),
                reason: format!("the trust domain is {:?}", self.trust_domain),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(&request.csr_pem)
            .map_err(IdentityError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(
            |e: rcgen::Error| IdentityError::BadIdentity {
                identity: request.identity.clone(),
                reason: e.to_string(),
            },
        )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW).into();
        let not_after = now + self.lifetime;
        params.not_after = not_after.into();
        params.serial_number = Some(serial()?);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(IdentityError::Sign)?;
        Ok(CertifyResponse {
            certificate_chain_pem: leaf.pem(),
            trust_roots_pem: self.root_pem.clone(),
            not_after: chrono::DateTime::<chrono::Utc>::from(not_after)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            lifetime_seconds: self.lifetime.as_secs(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn mk_request(token: &str, identity: &str) -> CertifyRequest {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        CertifyRequest {
            token: token.into(),
            csr_pem: csr.pem().unwrap(),
            identity: identity.into(),
        }
    }

    fn verify(chain_pem: &str, roots_pem: &str, at: SystemTime) -> Result<(), rustls::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
            .build()
            .unwrap();
        let leaf = CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap();
        let now = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        verifier.verify_client_cert(&leaf, &[], now).map(|_| ())
    }

    #[test]
    fn issues_leaves_that_chain_to_the_root_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        let resp = ca.certify(&mk_request(ca.token(), ID), now).unwrap();
        assert_eq!(resp.lifetime_seconds, 60);
        verify(&resp.certificate_chain_pem, &resp.trust_roots_pem, now).unwrap();
        // Past its lifetime the leaf no longer verifies.
        let later = now + Duration::from_secs(120);
        assert!(verify(&resp.certificate_chain_pem, &resp.trust_roots_pem, later).is_err());
        // The SAN is exactly the SPIFFE ID.
        let der = CertificateDer::from_pem_slice(resp.certificate_chain_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(names, [format!("URI({ID})")]);
    }

    #[test]
    fn refuses_bad_tokens_and_foreign_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            ca.certify(&mk_request("nope", ID), now),
            Err(IdentityError::BadToken)
        ));
        assert!(matches!(
            ca.certify(&mk_request(ca.token(), "spiffe://other.org/ns/a/sa/b"), now),
            Err(IdentityError::BadIdentity { .. })
        ));
        let mut bad_csr = mk_request(ca.token(), ID);
        bad_csr.csr_pem = "garbage".into();
        assert!(matches!(
            ca.certify(&bad_csr, now),
            Err(IdentityError::BadCsr(_))
        ));
    }

    #[test]
    fn the_ca_and_token_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let b = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        assert_eq!(a.token(), b.token());
        assert_eq!(a.trust_roots_pem(), b.trust_roots_pem());
        let resp = b
            .certify(&mk_request(a.token(), ID), SystemTime::now())
            .unwrap();
        verify(
            &resp.certificate_chain_pem,
            a.trust_roots_pem(),
            SystemTime::now(),
        )
        .unwrap();
    }
}
