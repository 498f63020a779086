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
//!
//! The CA also issues the control plane's own serving certificate for the proxy API
//! ([`Ca::issue_serving`]), naming `spiffe://<trust-domain>/ns/mesh-system/sa/mesh-controlplane`,
//! and writes the trust roots to [`TRUST_ROOTS_FILE`] in the state directory, where the
//! supervisor of an embedded mesh and local tools read them to verify that certificate.

use std::{
    net::IpAddr,
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
/// File the trust roots (PEM) are written to at every start, for proxies started beside the
/// control plane and for local tools (`curl --cacert`); unlike the key, it is not secret.
pub const TRUST_ROOTS_FILE: &str = "trust-roots.pem";

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

/// A certificate the control plane serves the proxy API with, and its key.
pub struct ServingCert {
    /// The leaf, PEM.
    pub chain_pem: String,
    /// Its private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// How long it is valid from its issue.
    pub lifetime: Duration,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// The certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    token: String,
    /// What proxies in a cluster admit a tap with ([`mesh_core::tap`]), derived from the CA's
    /// key so that every replica of the control plane holds the same one.
    tap_token: String,
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

/// The bootstrap token in `state_dir`, made on first use.
fn load_or_create_token(state_dir: &Path) -> Result<String, IdentityError> {
    load_or_create_secret(&state_dir.join(TOKEN_FILE))
}

/// A random secret in `path` (mode 0600), made on first use.
pub(crate) fn load_or_create_secret(path: &Path) -> Result<String, IdentityError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| files_err(dir)(&e))?;
    }
    if !path.exists() {
        write_private(path, &format!("{}\n", random_hex(32)?))?;
    }
    Ok(std::fs::read_to_string(path)
        .map_err(|e| files_err(path)(&e))?
        .trim()
        .to_string())
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, IdentityError> {
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
        let token = load_or_create_token(state_dir)?;
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
        Self::from_files(&cert_path, &key_path, token, trust_domain, lifetime)
    }

    /// Loads the CA from an issuer directory holding `tls.crt` and `tls.key` (a
    /// `kubernetes.io/tls` Secret, as `mesh install` renders it), which is never written to;
    /// the token still lives in `state_dir`. Roots that outlive the control plane's state keep
    /// the trust roots given to injected proxies valid across restarts.
    pub fn load_issuer(
        issuer_dir: &Path,
        state_dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, IdentityError> {
        let token = load_or_create_token(state_dir)?;
        Self::from_files(
            &issuer_dir.join("tls.crt"),
            &issuer_dir.join("tls.key"),
            token,
            trust_domain,
            lifetime,
        )
    }

    fn from_files(
        cert_path: &Path,
        key_path: &Path,
        token: String,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, IdentityError> {
        let key_pem = std::fs::read_to_string(key_path).map_err(|e| files_err(key_path)(&e))?;
        let root_pem = std::fs::read_to_string(cert_path).map_err(|e| files_err(cert_path)(&e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| files_err(key_path)(&e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| files_err(cert_path)(&e))?;
        Ok(Self {
            issuer,
            tap_token: mesh_core::tap::derive_token(&key_pem),
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

    /// How long issued leaves are valid.
    pub fn leaf_lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Writes the trust roots to [`TRUST_ROOTS_FILE`] in `dir` (replacing the file in one
    /// rename, so a reader never sees half of it) and returns its path.
    pub fn write_trust_roots(&self, dir: &Path) -> Result<PathBuf, IdentityError> {
        let path = dir.join(TRUST_ROOTS_FILE);
        let tmp = dir.join(format!(".{TRUST_ROOTS_FILE}.tmp"));
        std::fs::write(&tmp, &self.root_pem)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| files_err(&path)(&e))?;
        Ok(path)
    }

    /// Issues the proxy API's serving certificate at `now`, with a fresh key: its URI SAN is
    /// the control plane's SPIFFE ID (what proxies check), and `dns_names` and `ips` are added
    /// for clients that check a host name instead (curl, tests). It is valid for the leaf
    /// lifetime, like the proxies' own.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        now: SystemTime,
    ) -> Result<ServingCert, IdentityError> {
        let id = SpiffeId::control_plane(&self.trust_domain).map_err(|e| {
            IdentityError::BadIdentity {
                identity: format!("(the control plane in {})", self.trust_domain),
                reason: e.to_string(),
            }
        })?;
        let key = KeyPair::generate().map_err(IdentityError::Sign)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, id.service_account());
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().try_into().map_err(IdentityError::Sign)?,
        )];
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str().try_into().map_err(IdentityError::Sign)?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + self.lifetime).into();
        params.serial_number = Some(serial()?);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IdentityError::Sign)?;
        Ok(ServingCert {
            chain_pem: cert.pem(),
            key_pkcs8_der: key.serialize_der(),
            lifetime: self.lifetime,
        })
    }

    /// The bootstrap token (for the supervisor that starts proxies).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The tap token: the control plane presents it to proxies in a cluster, whose pods hold
    /// only its digest (see [`mesh_core::tap`]). Never given to users.
    pub fn tap_token(&self) -> &str {
        &self.tap_token
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
        mesh_core::crypto::install_provider();
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
    fn the_serving_certificate_names_the_control_plane_and_its_addresses() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "example.org", Duration::from_secs(60)).unwrap();
        let serving = ca
            .issue_serving(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(serving.lifetime, Duration::from_secs(60));
        let der = CertificateDer::from_pem_slice(serving.chain_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(
            names,
            [
                "URI(spiffe://example.org/ns/mesh-system/sa/mesh-controlplane)",
                "DNSName(localhost)",
                "IPAddress(7f:00:00:01)",
            ]
        );
        // It chains to the roots written for local tools.
        let roots = std::fs::read_to_string(ca.write_trust_roots(dir.path()).unwrap()).unwrap();
        assert_eq!(roots, ca.trust_roots_pem());
        let mut store = rustls::RootCertStore::empty();
        store
            .add(CertificateDer::from_pem_slice(roots.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn an_issuer_directory_supplies_the_ca() {
        let state = tempfile::tempdir().unwrap();
        let made =
            Ca::load_or_create(state.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let issuer = tempfile::tempdir().unwrap();
        std::fs::copy(
            state.path().join(CA_CERT_FILE),
            issuer.path().join("tls.crt"),
        )
        .unwrap();
        std::fs::copy(
            state.path().join(CA_KEY_FILE),
            issuer.path().join("tls.key"),
        )
        .unwrap();
        let other_state = tempfile::tempdir().unwrap();
        let loaded = Ca::load_issuer(
            issuer.path(),
            other_state.path(),
            "cluster.local",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(loaded.trust_roots_pem(), made.trust_roots_pem());
        assert!(!other_state.path().join(CA_KEY_FILE).exists());
        let resp = loaded
            .certify(&mk_request(loaded.token(), ID), SystemTime::now())
            .unwrap();
        verify(
            &resp.certificate_chain_pem,
            made.trust_roots_pem(),
            SystemTime::now(),
        )
        .unwrap();
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
