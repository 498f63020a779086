//! Workload identity names.
//!
//! A workload's identity is the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`, the
//! same shape Linkerd and Istio use, so authorization policies can name a Kubernetes service
//! account in both the embedded and the Kubernetes mode. The CA puts it in the leaf certificate's
//! URI SAN; peers compare it with what discovery promised.

use std::{fmt, str::FromStr};

/// The namespace the control plane runs in; with [`CONTROL_PLANE_SERVICE_ACCOUNT`] it names the
/// control plane's own identity, which proxies check on the proxy API's server certificate.
pub const CONTROL_PLANE_NAMESPACE: &str = "mesh-system";
/// The control plane's service account (and Deployment and Service) name.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "mesh-controlplane";

/// A parsed SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a mesh SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("{0:?} is not a mesh SPIFFE ID: the path must be /ns/<namespace>/sa/<service-account>")]
    Path(String),
    /// A segment is empty or holds characters a DNS label may not.
    #[error("invalid {what} {value:?} in SPIFFE ID: use lowercase letters, digits, '-' and '.'")]
    Segment {
        /// Which segment: trust domain, namespace or service account.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

impl SpiffeId {
    /// Builds an ID, checking each segment.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check("trust domain", trust_domain)?;
        check("namespace", namespace)?;
        check("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The control plane's identity in `trust_domain`:
    /// `spiffe://<trust-domain>/ns/mesh-system/sa/mesh-controlplane`. The control plane serves
    /// the proxy API with a certificate naming it, in the embedded mesh as in a cluster.
    pub fn control_plane(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::new(
            trust_domain,
            CONTROL_PLANE_NAMESPACE,
            CONTROL_PLANE_SERVICE_ACCOUNT,
        )
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The workload's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn check(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment {
            what,
            value: value.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/frontend"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend");
    }

    #[test]
    fn names_the_control_plane() {
        assert_eq!(
            SpiffeId::control_plane("example.org").unwrap().to_string(),
            "spiffe://example.org/ns/mesh-system/sa/mesh-controlplane"
        );
    }

    #[test]
    fn rejects_other_schemes_and_paths() {
        assert!(matches!(
            "https://x/ns/a/sa/b".parse::<SpiffeId>(),
            Err(SpiffeIdError::Scheme(_))
        ));
        assert!(matches!(
            "spiffe://x/ns/a".parse::<SpiffeId>(),
            Err(SpiffeIdError::Path(_))
        ));
        assert!(matches!(
            "spiffe://x/ns/a/sa/b/c".parse::<SpiffeId>(),
            Err(SpiffeIdError::Path(_))
        ));
    }

    #[test]
    fn rejects_bad_segments() {
        let err = SpiffeId::new("cluster.local", "Shop", "frontend").unwrap_err();
        assert_eq!(
            err,
            SpiffeIdError::Segment {
                what: "namespace",
                value: "Shop".into()
            }
        );
        assert!(SpiffeId::new("", "a", "b").is_err());
        assert!(SpiffeId::new("td", "a", "b c").is_err());
    }
}
