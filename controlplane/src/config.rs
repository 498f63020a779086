//! The control plane's configuration, from `MESH_CONTROLPLANE_*` variables.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use mesh_core::config::{ConfigError, Env};

/// Directory holding the store, the CA and the bootstrap token.
pub const ENV_STATE_DIR: &str = "MESH_CONTROLPLANE_STATE_DIR";
/// Address of the resource API (kubectl-style, plain HTTP; keep it on loopback).
pub const ENV_API_ADDR: &str = "MESH_CONTROLPLANE_API_ADDR";
/// Address of the proxy API (discovery watches, identity, workload registration).
pub const ENV_PROXY_ADDR: &str = "MESH_CONTROLPLANE_PROXY_ADDR";
/// Lifetime of issued leaf certificates, e.g. `24h`.
pub const ENV_CERT_LIFETIME: &str = "MESH_CONTROLPLANE_CERT_LIFETIME";
/// The SPIFFE trust domain certificates are issued in.
pub const ENV_TRUST_DOMAIN: &str = "MESH_CONTROLPLANE_TRUST_DOMAIN";
/// How long a registered workload stays without a heartbeat, e.g. `30s`.
pub const ENV_WORKLOAD_TTL: &str = "MESH_CONTROLPLANE_WORKLOAD_TTL";
/// How many store events watches can resume from.
pub const ENV_WATCH_HISTORY: &str = "MESH_CONTROLPLANE_WATCH_HISTORY";
/// The inbound policy of ports no `Server` selects: `all-unauthenticated` (the default),
/// `all-authenticated` or `deny`.
pub const ENV_DEFAULT_INBOUND_POLICY: &str = "MESH_CONTROLPLANE_DEFAULT_INBOUND_POLICY";
/// A directory with the CA's `tls.crt` and `tls.key` (a mounted `kubernetes.io/tls` Secret)
/// to sign with, instead of a CA made in the state directory.
pub const ENV_ISSUER_DIR: &str = "MESH_CONTROLPLANE_ISSUER_DIR";

/// `true` (or `1`): run in a cluster, with the Kubernetes API as the store and discovery's
/// source (in-cluster config, or a kubeconfig); `false` (or `0`, the default): embedded.
pub const ENV_KUBERNETES: &str = "MESH_CONTROLPLANE_KUBERNETES";
/// Address of the proxy-injector webhook (HTTPS); unset, no injector runs.
pub const ENV_INJECTOR_ADDR: &str = "MESH_CONTROLPLANE_INJECTOR_ADDR";
/// Directory with the injector's `tls.crt` and `tls.key`; required with the injector.
pub const ENV_INJECTOR_TLS_DIR: &str = "MESH_CONTROLPLANE_INJECTOR_TLS_DIR";
/// Image of the proxy container the injector adds.
pub const ENV_PROXY_IMAGE: &str = "MESH_CONTROLPLANE_PROXY_IMAGE";
/// Image of the init container (iptables) the injector adds.
pub const ENV_INIT_IMAGE: &str = "MESH_CONTROLPLANE_INIT_IMAGE";
/// The OTLP collector injected proxies send spans to (`host:port` or an `http(s)://` URL);
/// unset, tracing stays off unless a pod names one (`config.mesh.dev/trace-collector`).
pub const ENV_TRACE_COLLECTOR: &str = "MESH_CONTROLPLANE_TRACE_COLLECTOR";
/// The share of new traces injected proxies sample, 0 to 1 (the proxy's default when unset).
pub const ENV_TRACE_SAMPLING: &str = "MESH_CONTROLPLANE_TRACE_SAMPLING";
/// Worker threads of the control plane's runtime (at least 1); `1` runs it on one thread,
/// where a weight change wakes every watch stream before any connection writes, so each
/// connection sends its streams' updates in one write. Unset: the cores the process may use.
pub const ENV_CORES: &str = "MESH_CONTROLPLANE_CORES";
/// How often the control plane scrapes every registered proxy into its metrics window (`mesh
/// stat`, the dashboard); default 5s, `0s` turns the scrape off.
pub const ENV_SCRAPE_INTERVAL: &str = "MESH_CONTROLPLANE_SCRAPE_INTERVAL";

/// The proxy-injector webhook's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectorConfig {
    /// See [`ENV_INJECTOR_ADDR`].
    pub addr: SocketAddr,
    /// See [`ENV_INJECTOR_TLS_DIR`].
    pub tls_dir: PathBuf,
    /// See [`ENV_PROXY_IMAGE`]; the injector's default when unset.
    pub proxy_image: Option<String>,
    /// See [`ENV_INIT_IMAGE`]; the injector's default when unset.
    pub init_image: Option<String>,
    /// See [`ENV_TRACE_COLLECTOR`]; checked as the proxy will read it.
    pub trace_collector: Option<String>,
    /// See [`ENV_TRACE_SAMPLING`]; checked likewise.
    pub trace_sampling: Option<String>,
}

/// A duration written like `30s`, `24h` or `500ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error)]
#[error("not a positive duration: write it like 30s, 5m, 24h or 500ms")]
pub struct DurationError;

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match mesh_crds::validate::parse_duration_ms(s) {
            Some(ms) if ms > 0 => Ok(Self(Duration::from_millis(ms))),
            _ => Err(DurationError),
        }
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

/// Parsed configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// See [`ENV_STATE_DIR`].
    pub state_dir: PathBuf,
    /// See [`ENV_API_ADDR`].
    pub api_addr: SocketAddr,
    /// See [`ENV_PROXY_ADDR`].
    pub proxy_addr: SocketAddr,
    /// See [`ENV_CERT_LIFETIME`].
    pub cert_lifetime: Duration,
    /// See [`ENV_TRUST_DOMAIN`].
    pub trust_domain: String,
    /// See [`ENV_WORKLOAD_TTL`].
    pub workload_ttl: Duration,
    /// See [`ENV_WATCH_HISTORY`].
    pub watch_history: usize,
    /// See [`ENV_DEFAULT_INBOUND_POLICY`].
    pub default_inbound_policy: mesh_policies::DefaultPolicy,
    /// See [`ENV_ISSUER_DIR`].
    pub issuer_dir: Option<PathBuf>,
    /// See [`ENV_KUBERNETES`].
    pub kubernetes: bool,
    /// The injector, when [`ENV_INJECTOR_ADDR`] is set.
    pub injector: Option<InjectorConfig>,
    /// See [`ENV_SCRAPE_INTERVAL`].
    pub scrape_interval: Duration,
}

impl Config {
    /// Reads the configuration from `env`.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let trust_domain: String = env.parse_or(ENV_TRUST_DOMAIN, "cluster.local".to_string())?;
        if mesh_core::SpiffeId::new(&trust_domain, "x", "x").is_err() {
            return Err(ConfigError {
                name: ENV_TRUST_DOMAIN,
                value: trust_domain,
                reason: "use lowercase letters, digits, '-' and '.'".into(),
            });
        }
        let watch_history: usize = env.parse_or(ENV_WATCH_HISTORY, 10_000)?;
        if watch_history == 0 {
            return Err(ConfigError {
                name: ENV_WATCH_HISTORY,
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            state_dir: env.parse_or(ENV_STATE_DIR, PathBuf::from(".mesh/controlplane"))?,
            api_addr: env.parse_or(ENV_API_ADDR, SocketAddr::from(([127, 0, 0, 1], 4180)))?,
            proxy_addr: env.parse_or(ENV_PROXY_ADDR, SocketAddr::from(([0, 0, 0, 0], 4181)))?,
            cert_lifetime: env
                .parse_or(
                    ENV_CERT_LIFETIME,
                    HumanDuration(Duration::from_secs(24 * 3600)),
                )?
                .0,
            trust_domain,
            workload_ttl: env
                .parse_or(ENV_WORKLOAD_TTL, HumanDuration(Duration::from_secs(30)))?
                .0,
            watch_history,
            default_inbound_policy: env.parse_or(
                ENV_DEFAULT_INBOUND_POLICY,
                mesh_policies::DefaultPolicy::AllUnauthenticated,
            )?,
            issuer_dir: env.parse(ENV_ISSUER_DIR)?,
            kubernetes: match env.var(ENV_KUBERNETES).as_deref().map(str::trim) {
                None | Some("" | "false" | "0") => false,
                Some("true" | "1") => true,
                Some(other) => {
                    return Err(ConfigError {
                        name: ENV_KUBERNETES,
                        value: other.to_string(),
                        reason: "use true or false".into(),
                    });
                }
            },
            injector: match env.parse::<SocketAddr>(ENV_INJECTOR_ADDR)? {
                None => None,
                Some(addr) => Some(InjectorConfig {
                    addr,
                    tls_dir: env
                        .parse(ENV_INJECTOR_TLS_DIR)?
                        .ok_or_else(|| ConfigError {
                            name: ENV_INJECTOR_TLS_DIR,
                            value: String::new(),
                            reason: format!(
                                "required with {ENV_INJECTOR_ADDR}: the directory with the \
                             webhook's tls.crt and tls.key"
                            ),
                        })?,
                    proxy_image: env.parse(ENV_PROXY_IMAGE)?,
                    init_image: env.parse(ENV_INIT_IMAGE)?,
                    trace_collector: checked(env, ENV_TRACE_COLLECTOR, |v| {
                        mesh_core::trace::collector_url(v).map(drop)
                    })?,
                    trace_sampling: checked(env, ENV_TRACE_SAMPLING, |v| {
                        mesh_core::trace::sampling(v).map(drop)
                    })?,
                }),
            },
            scrape_interval: env
                .parse_or(
                    ENV_SCRAPE_INTERVAL,
                    HumanDuration(mesh_observe::scrape::DEFAULT_INTERVAL),
                )?
                .0,
        })
    }
}

/// `name`'s trimmed value when `check` accepts it; unset or empty is `None`.
fn checked(
    env: &impl Env,
    name: &'static str,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Option<String>, ConfigError> {
    match env.var(name) {
        Some(v) if !v.trim().is_empty() => match check(&v) {
            Ok(()) => Ok(Some(v.trim().to_string())),
            Err(reason) => Err(ConfigError {
                name,
                value: v,
                reason,
            }),
        },
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_env(&env(&[])).unwrap();
        assert_eq!(c.api_addr, "127.0.0.1:4180".parse().unwrap());
        assert_eq!(c.proxy_addr, "0.0.0.0:4181".parse().unwrap());
        assert_eq!(c.cert_lifetime, Duration::from_secs(86_400));
        let c = Config::from_env(&env(&[(ENV_CERT_LIFETIME, "90s")])).unwrap();
        assert_eq!(c.cert_lifetime, Duration::from_secs(90));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Config::from_env(&env(&[(ENV_CERT_LIFETIME, "forever")])).unwrap_err();
        assert_eq!(e.name, ENV_CERT_LIFETIME);
        let e = Config::from_env(&env(&[(ENV_API_ADDR, "nowhere")])).unwrap_err();
        assert_eq!(e.name, ENV_API_ADDR);
        let e = Config::from_env(&env(&[(ENV_TRUST_DOMAIN, "Bad Domain")])).unwrap_err();
        assert_eq!(e.name, ENV_TRUST_DOMAIN);
        let e = Config::from_env(&env(&[(ENV_DEFAULT_INBOUND_POLICY, "open")])).unwrap_err();
        assert_eq!(e.name, ENV_DEFAULT_INBOUND_POLICY);
        let e = Config::from_env(&env(&[(ENV_KUBERNETES, "yes")])).unwrap_err();
        assert_eq!(e.name, ENV_KUBERNETES);
        let e = Config::from_env(&env(&[(ENV_INJECTOR_ADDR, "0.0.0.0:8443")])).unwrap_err();
        assert_eq!(e.name, ENV_INJECTOR_TLS_DIR);
        let c = Config::from_env(&env(&[
            (ENV_KUBERNETES, "true"),
            (ENV_INJECTOR_ADDR, "0.0.0.0:8443"),
            (ENV_INJECTOR_TLS_DIR, "/var/run/mesh/injector"),
            (ENV_PROXY_IMAGE, "proxy:v1"),
        ]))
        .unwrap();
        assert!(c.kubernetes);
        let injector = c.injector.unwrap();
        assert_eq!(injector.addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(injector.proxy_image.as_deref(), Some("proxy:v1"));
        assert_eq!(injector.init_image, None);
        assert_eq!(injector.trace_collector, None);
        let injecting = [
            (ENV_INJECTOR_ADDR, "0.0.0.0:8443"),
            (ENV_INJECTOR_TLS_DIR, "/var/run/mesh/injector"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = injecting.to_vec();
            all.extend_from_slice(extra);
            Config::from_env(&env(&all))
        };
        let injector = with(&[
            (ENV_TRACE_COLLECTOR, " collector.tracing:4318 "),
            (ENV_TRACE_SAMPLING, "0.25"),
        ])
        .unwrap()
        .injector
        .unwrap();
        assert_eq!(
            injector.trace_collector.as_deref(),
            Some("collector.tracing:4318")
        );
        assert_eq!(injector.trace_sampling.as_deref(), Some("0.25"));
        let e = with(&[(ENV_TRACE_COLLECTOR, "ftp://collector")]).unwrap_err();
        assert_eq!(e.name, ENV_TRACE_COLLECTOR);
        let e = with(&[(ENV_TRACE_SAMPLING, "1.5")]).unwrap_err();
        assert_eq!(e.name, ENV_TRACE_SAMPLING);
        let c = Config::from_env(&env(&[(ENV_DEFAULT_INBOUND_POLICY, "deny")])).unwrap();
        assert_eq!(c.default_inbound_policy, mesh_policies::DefaultPolicy::Deny);
    }
}
