//! Test certificates: a throwaway CA and leaves signed by it, generated with rcgen.
//!
//! kube-apiserver needs a serving certificate, a client CA and a service-account signing key;
//! the harness's own client authenticates with a client certificate in `system:masters`. A
//! [`TestCa`] can also be loaded from an existing CA's files (the control plane's), and signs
//! CSRs for a SPIFFE ID as the control plane's CA does, for stand-ins of the proxy API
//! (see [`crate::proxy_api`]).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::{HarnessError, Result};

/// A certificate authority that lives for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, Default)]
pub struct Leaf {
    common_name: String,
    organizations: Vec<String>,
    sans: Vec<String>,
    server: bool,
    client: bool,
}

impl Leaf {
    /// A leaf with subject common name `cn`.
    pub fn new(cn: &str) -> Self {
        Self {
            common_name: cn.to_string(),
            ..Self::default()
        }
    }

    /// Adds a subject organization (Kubernetes maps it to a group).
    pub fn organization(mut self, o: &str) -> Self {
        self.organizations.push(o.to_string());
        self
    }

    /// Adds a subject alternative name: a DNS name, an IP address, or a URI such as a SPIFFE ID.
    pub fn san(mut self, san: &str) -> Self {
        self.sans.push(san.to_string());
        self
    }

    /// Allows TLS server use.
    pub fn server(mut self) -> Self {
        self.server = true;
        self
    }

    /// Allows TLS client use.
    pub fn client(mut self) -> Self {
        self.client = true;
        self
    }
}

impl TestCa {
    /// Generates a CA with an ECDSA P-256 key.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA, from its certificate and PKCS#8 key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// Signs the CSR `csr_pem` for `spiffe_id`, as the control plane's CA does: only its public
    /// key is taken, the one SAN is the SPIFFE ID, for client and server use, valid from a
    /// minute ago for `lifetime`. Returns the certificate, PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        lifetime: std::time::Duration,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(cert.pem())
    }

    /// The CA certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate.
    pub fn issue(&self, leaf: &Leaf) -> Result<CertifiedKey> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        for san in &leaf.sans {
            params.subject_alt_names.push(san_type(san)?);
        }
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name.as_str());
        for o in &leaf.organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, o.as_str());
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if leaf.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn san_type(san: &str) -> Result<rcgen::SanType> {
    Ok(if let Ok(ip) = san.parse() {
        rcgen::SanType::IpAddress(ip)
    } else if san.contains("://") {
        rcgen::SanType::URI(san.try_into()?)
    } else {
        rcgen::SanType::DnsName(san.try_into()?)
    })
}

/// Writes `contents` to `dir/name` and returns the path.
pub(crate) fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents)
        .map_err(HarnessError::io(format!("writing {}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaves_with_the_requested_sans() {
        let ca = TestCa::new("test ca").unwrap();
        let leaf = ca
            .issue(
                &Leaf::new("frontend")
                    .san("127.0.0.1")
                    .san("localhost")
                    .san("spiffe://cluster.local/ns/default/sa/frontend")
                    .server()
                    .client(),
            )
            .unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(ca.cert_pem(), leaf.cert_pem);
    }
}
