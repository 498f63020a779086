//! The authorization model of the mesh, shared by the control plane (which indexes `Server`,
//! `AuthorizationPolicy`, `MeshTLSAuthentication` and `NetworkAuthentication` resources into one
//! [`InboundPolicy`] per workload port) and the sidecar (which evaluates that policy on every
//! inbound connection, after mTLS has established the peer's identity and before any request
//! reaches the app).
//!
//! The model follows Linkerd's: a port no `Server` selects gets the *default policy*
//! ([`DefaultPolicy`], `all-unauthenticated` unless configured otherwise); a port a `Server`
//! selects admits only what an `AuthorizationPolicy` targeting that Server (or its namespace)
//! authorizes, so a Server with no policy denies everything. An authorization holds when *all*
//! of its requirements do; a connection is admitted when *any* authorization holds.
//!
//! This crate does no I/O; it is the pure half of policy, unit-tested on its own.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What a proxy enforces on one inbound port: the value of the policy watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundPolicy {
    /// What decided this policy: `Server/<name>`, or `default:<policy>` when no Server selects
    /// the port. Labels the proxy's authorization metrics.
    pub server: String,
    /// How the Server says the port's traffic is to be read.
    #[serde(default)]
    pub protocol: ProxyProtocol,
    /// The authorizations; a connection is admitted when any of them holds.
    #[serde(default)]
    pub authorizations: Vec<Authorization>,
}

/// One way in: an `AuthorizationPolicy` (or a default policy) resolved to its requirements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// `AuthorizationPolicy/<name>` or `default:<policy>`; labels metrics and denials.
    pub name: String,
    /// Every requirement must hold; none means anyone is admitted.
    #[serde(default)]
    pub require: Vec<Requirement>,
}

/// A condition on the client of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Requirement {
    /// The client authenticated with mTLS, and its SPIFFE ID matches one of these.
    Identities(Vec<IdentityMatch>),
    /// The client's address is in one of these networks.
    Networks(Vec<NetworkMatch>),
}

/// A pattern for a client's SPIFFE ID: `*` (any authenticated client), a prefix ending in `*`
/// (`spiffe://cluster.local/ns/prod/*`), or an exact ID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IdentityMatch {
    /// Any authenticated identity.
    Any,
    /// IDs starting with this.
    Prefix(String),
    /// Exactly this ID.
    Exact(String),
}

/// Why an identity pattern is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?}: an identity is `*`, a SPIFFE ID, or a SPIFFE ID prefix ending in `/*`")]
pub struct IdentityMatchError(String);

impl FromStr for IdentityMatch {
    type Err = IdentityMatchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if !s.starts_with("spiffe://") || s.len() <= "spiffe://".len() {
            return Err(IdentityMatchError(s.to_string()));
        }
        match s.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') && !prefix.contains('*') => {
                Ok(Self::Prefix(prefix.to_string()))
            }
            Some(_) => Err(IdentityMatchError(s.to_string())),
            None if s.contains('*') => Err(IdentityMatchError(s.to_string())),
            None => Ok(Self::Exact(s.to_string())),
        }
    }
}

impl TryFrom<String> for IdentityMatch {
    type Error = IdentityMatchError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IdentityMatch> for String {
    fn from(m: IdentityMatch) -> Self {
        m.to_string()
    }
}

impl fmt::Display for IdentityMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Exact(id) => f.write_str(id),
        }
    }
}

impl IdentityMatch {
    /// Whether `identity` matches.
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Prefix(p) => identity.starts_with(p.as_str()),
            Self::Exact(id) => identity == id,
        }
    }
}

/// A network: a CIDR, less the CIDRs in `except`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMatch {
    /// The network, such as `10.0.0.0/8` or `::1/128`; a bare address means just that address.
    #[serde(with = "net")]
    pub cidr: IpNet,
    /// Networks inside `cidr` that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "nets")]
    pub except: Vec<IpNet>,
}

impl NetworkMatch {
    /// Whether `ip` is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// An IPv4 address that reached a dual-stack socket as `::ffff:a.b.c.d` is matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Parses a CIDR, or a bare address as a single-address network.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (such as 10.0.0.0/8) or an IP address"))
}

mod net {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(net: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_cidr(&s).map_err(serde::de::Error::custom)
    }
}

mod nets {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(nets.len()))?;
        for net in nets {
            seq.serialize_element(&net.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::parse_cidr(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// How a port's traffic is read, as a `Server` declares it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum ProxyProtocol {
    /// Detect HTTP from the first bytes (the default).
    #[default]
    #[serde(rename = "unknown")]
    Unknown,
    /// HTTP/1.x.
    #[serde(rename = "HTTP/1")]
    Http1,
    /// HTTP/2.
    #[serde(rename = "HTTP/2")]
    Http2,
    /// gRPC (HTTP/2).
    #[serde(rename = "gRPC")]
    Grpc,
    /// Opaque TCP: never parsed as HTTP.
    #[serde(rename = "opaque")]
    Opaque,
}

/// The policy of ports no `Server` selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DefaultPolicy {
    /// Anyone, with or without mTLS.
    #[default]
    #[serde(rename = "all-unauthenticated")]
    AllUnauthenticated,
    /// Any client that authenticated with mTLS.
    #[serde(rename = "all-authenticated")]
    AllAuthenticated,
    /// Nobody.
    #[serde(rename = "deny")]
    Deny,
}

impl DefaultPolicy {
    /// Every value, for error messages.
    pub const ALL: [Self; 3] = [Self::AllUnauthenticated, Self::AllAuthenticated, Self::Deny];

    /// The name used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::Deny => "deny",
        }
    }

    /// The policy a port gets under this default.
    pub fn policy(self) -> InboundPolicy {
        let name = format!("default:{}", self.name());
        let authorizations = match self {
            Self::AllUnauthenticated => vec![Authorization {
                name: name.clone(),
                require: Vec::new(),
            }],
            Self::AllAuthenticated => vec![Authorization {
                name: name.clone(),
                require: vec![Requirement::Identities(vec![IdentityMatch::Any])],
            }],
            Self::Deny => Vec::new(),
        };
        InboundPolicy {
            server: name,
            protocol: ProxyProtocol::Unknown,
            authorizations,
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a default policy; use one of {}",
                    Self::ALL.map(Self::name).join(", ")
                )
            })
    }
}

/// The SPIFFE ID a certificate (DER) proves: its one `spiffe://` URI SAN. A certificate with
/// none or several names nobody. Both ends of the mesh's mTLS read identities this way: the
/// proxy of its peers, the control plane of the proxies calling its API.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some((*uri).to_string())
        }
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Who is on the other end of an inbound connection.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The peer's address.
    pub ip: IpAddr,
    /// The SPIFFE ID the peer proved with mTLS, if it did.
    pub identity: Option<&'a str>,
}

/// Why a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{server} does not authorize {client}")]
pub struct Denied {
    /// What decided the policy (`Server/<name>` or `default:<policy>`).
    pub server: String,
    /// The client, as `<identity> at <ip>` or `unauthenticated <ip>`.
    pub client: String,
}

impl Requirement {
    /// Whether `client` meets this requirement.
    pub fn holds(&self, client: &Client<'_>) -> bool {
        match self {
            Self::Identities(ids) => client
                .identity
                .is_some_and(|id| ids.iter().any(|m| m.matches(id))),
            Self::Networks(nets) => nets.iter().any(|n| n.contains(client.ip)),
        }
    }
}

impl InboundPolicy {
    /// The authorization that admits `client`, or why none does.
    pub fn authorize(&self, client: &Client<'_>) -> Result<&Authorization, Denied> {
        self.authorizations
            .iter()
            .find(|a| a.require.iter().all(|r| r.holds(client)))
            .ok_or_else(|| Denied {
                server: self.server.clone(),
                client: match client.identity {
                    Some(id) => format!("{id} at {}", client.ip),
                    None => format!("unauthenticated {}", client.ip),
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/jobs/sa/batch";

    fn client<'a>(ip: &str, identity: Option<&'a str>) -> Client<'a> {
        Client {
            ip: ip.parse().unwrap(),
            identity,
        }
    }

    fn policy(authorizations: Vec<Authorization>) -> InboundPolicy {
        InboundPolicy {
            server: "Server/backend-http".into(),
            protocol: ProxyProtocol::Unknown,
            authorizations,
        }
    }

    fn ids(patterns: &[&str]) -> Requirement {
        Requirement::Identities(patterns.iter().map(|p| p.parse().unwrap()).collect())
    }

    fn nets(cidr: &str, except: &[&str]) -> Requirement {
        Requirement::Networks(vec![NetworkMatch {
            cidr: parse_cidr(cidr).unwrap(),
            except: except.iter().map(|e| parse_cidr(e).unwrap()).collect(),
        }])
    }

    #[test]
    fn defaults_admit_what_their_names_say() {
        let plain = client("10.1.2.3", None);
        let meshed = client("10.1.2.3", Some(WEB));
        let all = DefaultPolicy::AllUnauthenticated.policy();
        assert!(all.authorize(&plain).is_ok());
        assert!(all.authorize(&meshed).is_ok());
        let authn = DefaultPolicy::AllAuthenticated.policy();
        assert_eq!(
            authn.authorize(&plain).unwrap_err().to_string(),
            "default:all-authenticated does not authorize unauthenticated 10.1.2.3"
        );
        assert_eq!(
            authn.authorize(&meshed).unwrap().name,
            "default:all-authenticated"
        );
        let deny = DefaultPolicy::Deny.policy();
        assert!(deny.authorize(&meshed).is_err());
        assert_eq!("deny".parse::<DefaultPolicy>(), Ok(DefaultPolicy::Deny));
        assert!(
            "open"
                .parse::<DefaultPolicy>()
                .unwrap_err()
                .contains("all-unauthenticated, all-authenticated, deny")
        );
    }

    #[test]
    fn a_server_without_authorizations_denies_everyone() {
        let p = policy(Vec::new());
        assert!(p.authorize(&client("127.0.0.1", Some(WEB))).is_err());
    }

    #[test]
    fn requirements_are_anded_and_authorizations_ored() {
        let p = policy(vec![
            Authorization {
                name: "AuthorizationPolicy/web-from-cluster".into(),
                require: vec![ids(&[WEB]), nets("10.0.0.0/8", &["10.9.0.0/16"])],
            },
            Authorization {
                name: "AuthorizationPolicy/jobs".into(),
                require: vec![ids(&["spiffe://cluster.local/ns/jobs/*"])],
            },
        ]);
        // Both requirements of the first authorization hold.
        assert_eq!(
            p.authorize(&client("10.1.0.1", Some(WEB))).unwrap().name,
            "AuthorizationPolicy/web-from-cluster"
        );
        // Right identity, excluded network; wrong network.
        assert!(p.authorize(&client("10.9.0.1", Some(WEB))).is_err());
        assert!(p.authorize(&client("192.168.0.1", Some(WEB))).is_err());
        // Right network, no identity: mTLS is required.
        assert!(p.authorize(&client("10.1.0.1", None)).is_err());
        // The prefix authorization admits the jobs namespace from anywhere.
        assert_eq!(
            p.authorize(&client("192.168.0.1", Some(BATCH)))
                .unwrap()
                .name,
            "AuthorizationPolicy/jobs"
        );
        assert!(
            p.authorize(&client(
                "192.168.0.1",
                Some("spiffe://cluster.local/ns/jobsx/sa/a")
            ))
            .is_err()
        );
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_networks() {
        let p = policy(vec![Authorization {
            name: "AuthorizationPolicy/local".into(),
            require: vec![nets("127.0.0.0/8", &[])],
        }]);
        assert!(p.authorize(&client("::ffff:127.0.0.1", None)).is_ok());
        assert!(p.authorize(&client("::1", None)).is_err());
    }

    #[test]
    fn identity_patterns_parse_strictly() {
        assert_eq!("*".parse(), Ok(IdentityMatch::Any));
        assert_eq!(
            "spiffe://td/ns/a/*".parse(),
            Ok(IdentityMatch::Prefix("spiffe://td/ns/a/".into()))
        );
        for bad in [
            "web",
            "spiffe://",
            "spiffe://td/ns/*/sa/x",
            "spiffe://td/ns/a*",
        ] {
            assert!(bad.parse::<IdentityMatch>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_wire_form_round_trips() {
        let p = policy(vec![Authorization {
            name: "AuthorizationPolicy/a".into(),
            require: vec![ids(&["*", WEB]), nets("10.0.0.0/8", &["10.9.0.0/16"])],
        }]);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "server": "Server/backend-http",
                "protocol": "unknown",
                "authorizations": [{"name": "AuthorizationPolicy/a", "require": [
                    {"identities": ["*", WEB]},
                    {"networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}]},
                ]}],
            })
        );
        assert_eq!(serde_json::from_value::<InboundPolicy>(json).unwrap(), p);
    }
}
