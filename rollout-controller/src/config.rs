//! The `mesh-rollout-controller` binary's configuration, read through [`mesh_core::config::Env`]
//! like every other binary's: each variable is a named constant, a bad value is a
//! [`ConfigError`] naming the variable and the value (the binary exits 64), and tests feed a map.
//! Command-line flags are the same variables under another name: the binary lays its flags over
//! the process environment ([`Flags`]) and parses the result once, here.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_core::config::{ConfigError, Env};

use crate::kubernetes::{ElectionConfig, Settings};

/// Only reconcile Canaries in this namespace (flag `--namespace`); all namespaces when unset.
pub const ENV_NAMESPACE: &str = "MESH_ROLLOUT_NAMESPACE";
/// Prometheus that scrapes the proxies (flag `--prometheus-url`); required.
pub const ENV_PROMETHEUS_URL: &str = "MESH_ROLLOUT_PROMETHEUS_URL";
/// Shortest PromQL range of a metrics window (flag `--metrics-interval`, default 30s).
pub const ENV_METRICS_INTERVAL: &str = "MESH_ROLLOUT_METRICS_INTERVAL";
/// How often every Canary is reconciled (flag `--reconcile-interval`, default 5s).
pub const ENV_RECONCILE_INTERVAL: &str = "MESH_ROLLOUT_RECONCILE_INTERVAL";
/// Elect a leader on a Lease (flag `--leader-elect`, default true).
pub const ENV_LEADER_ELECT: &str = "MESH_ROLLOUT_LEADER_ELECT";
/// Name of the Lease (flag `--lease-name`, default `mesh-rollout-controller`).
pub const ENV_LEASE_NAME: &str = "MESH_ROLLOUT_LEASE_NAME";
/// How long a leader that stopped renewing keeps the Lease (flag `--lease-duration`, 15s).
pub const ENV_LEASE_DURATION: &str = "MESH_ROLLOUT_LEASE_DURATION";
/// How often the leader renews the Lease (flag `--lease-renew-interval`, 2s).
pub const ENV_LEASE_RENEW_INTERVAL: &str = "MESH_ROLLOUT_LEASE_RENEW_INTERVAL";
/// This instance's name in Events and in the Lease (flag `--instance`; the downward API's pod
/// name in a cluster); host name and process id when unset.
pub const ENV_INSTANCE: &str = "POD_NAME";
/// Namespace of the Lease (flag `--lease-namespace`; the downward API's pod namespace in a
/// cluster); `--namespace`, else `default`, when unset.
pub const ENV_LEASE_NAMESPACE: &str = "POD_NAMESPACE";

/// The controller's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Only Canaries in this namespace; all when `None`.
    pub namespace: Option<String>,
    /// Prometheus' base URL.
    pub prometheus_url: String,
    /// Shortest PromQL range.
    pub metrics_interval: Duration,
    /// Reconcile interval.
    pub reconcile_interval: Duration,
    /// This instance's name, if given.
    pub instance: Option<String>,
    /// Whether to elect a leader.
    pub leader_elect: bool,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Lease renew interval.
    pub lease_renew_interval: Duration,
}

fn missing(name: &'static str, reason: &str) -> ConfigError {
    ConfigError {
        name,
        value: String::new(),
        reason: reason.to_string(),
    }
}

impl Config {
    /// Reads and checks every variable.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let text = |name: &'static str| env.var(name).filter(|v| !v.trim().is_empty());
        let prometheus_url = text(ENV_PROMETHEUS_URL).ok_or_else(|| {
            missing(
                ENV_PROMETHEUS_URL,
                "required: in a cluster the controller reads the proxies' metrics from Prometheus",
            )
        })?;
        match reqwest::Url::parse(&prometheus_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => {
                return Err(ConfigError {
                    reason: format!(
                        "scheme {:?}: Prometheus is reached over http or https",
                        u.scheme()
                    ),
                    name: ENV_PROMETHEUS_URL,
                    value: prometheus_url,
                });
            }
            Err(e) => {
                return Err(ConfigError {
                    name: ENV_PROMETHEUS_URL,
                    value: prometheus_url,
                    reason: format!("not a URL: {e}"),
                });
            }
        }
        let namespace = text(ENV_NAMESPACE);
        let lease_duration = env.duration_or(ENV_LEASE_DURATION, Duration::from_secs(15))?;
        let lease_renew_interval =
            env.duration_or(ENV_LEASE_RENEW_INTERVAL, Duration::from_secs(2))?;
        if lease_renew_interval >= lease_duration {
            return Err(ConfigError {
                name: ENV_LEASE_RENEW_INTERVAL,
                value: env.var(ENV_LEASE_RENEW_INTERVAL).unwrap_or_default(),
                reason: format!(
                    "must be shorter than {ENV_LEASE_DURATION} ({lease_duration:?}), or the \
                     Lease expires between renewals"
                ),
            });
        }
        Ok(Self {
            lease_namespace: text(ENV_LEASE_NAMESPACE)
                .or_else(|| namespace.clone())
                .unwrap_or_else(|| "default".into()),
            namespace,
            prometheus_url,
            metrics_interval: env.duration_or(ENV_METRICS_INTERVAL, Duration::from_secs(30))?,
            reconcile_interval: env.duration_or(ENV_RECONCILE_INTERVAL, Duration::from_secs(5))?,
            instance: text(ENV_INSTANCE),
            leader_elect: env.parse_or(ENV_LEADER_ELECT, true)?,
            lease_name: text(ENV_LEASE_NAME).unwrap_or_else(|| "mesh-rollout-controller".into()),
            lease_duration,
            lease_renew_interval,
        })
    }

    /// The controller's settings, for this instance.
    pub fn settings(&self, instance: &str) -> Settings {
        Settings {
            namespace: self.namespace.clone(),
            tick: self.reconcile_interval,
            instance: Some(instance.to_string()),
            ..Settings::default()
        }
    }

    /// The leader election, for this instance.
    pub fn election(&self, instance: &str) -> ElectionConfig {
        ElectionConfig {
            namespace: self.lease_namespace.clone(),
            name: self.lease_name.clone(),
            identity: instance.to_string(),
            lease_duration: self.lease_duration,
            renew_interval: self.lease_renew_interval,
        }
    }
}

/// Flags laid over another [`Env`]: a flag given on the command line wins over its variable.
#[derive(Clone, Debug, Default)]
pub struct Flags<E> {
    flags: BTreeMap<&'static str, String>,
    env: E,
}

impl<E: Env> Flags<E> {
    /// No flags over `env`.
    pub fn over(env: E) -> Self {
        Self {
            flags: BTreeMap::new(),
            env,
        }
    }

    /// Sets variable `name` from a flag, when the flag was given.
    #[must_use]
    pub fn flag(mut self, name: &'static str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.flags.insert(name, v);
        }
        self
    }
}

impl<E: Env> Env for Flags<E> {
    fn var(&self, name: &str) -> Option<String> {
        self.flags.get(name).cloned().or_else(|| self.env.var(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_only_prometheus() {
        let c = Config::from_env(&env(&[(ENV_PROMETHEUS_URL, "http://prom:9090")])).unwrap();
        assert_eq!(c.prometheus_url, "http://prom:9090");
        assert_eq!(c.reconcile_interval, Duration::from_secs(5));
        assert_eq!(c.metrics_interval, Duration::from_secs(30));
        assert!(c.leader_elect);
        assert_eq!(
            (c.lease_namespace.as_str(), c.lease_name.as_str()),
            ("default", "mesh-rollout-controller")
        );
        let e = Config::from_env(&env(&[])).unwrap_err();
        assert_eq!(e.name, ENV_PROMETHEUS_URL);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let base = [(ENV_PROMETHEUS_URL, "http://prom:9090")];
        let with = |k: &str, v: &str| {
            let mut e = env(&base);
            e.insert(k.to_string(), v.to_string());
            Config::from_env(&e).unwrap_err()
        };
        assert_eq!(
            with(ENV_RECONCILE_INTERVAL, "often").name,
            ENV_RECONCILE_INTERVAL
        );
        assert_eq!(with(ENV_LEADER_ELECT, "maybe").name, ENV_LEADER_ELECT);
        assert_eq!(
            with(ENV_PROMETHEUS_URL, "not a url").name,
            ENV_PROMETHEUS_URL
        );
        let e = with(ENV_LEASE_RENEW_INTERVAL, "20s");
        assert_eq!(e.name, ENV_LEASE_RENEW_INTERVAL);
        assert!(e.to_string().contains("shorter than"), "{e}");
    }

    #[test]
    fn flags_win_over_the_environment() {
        let e = env(&[(ENV_PROMETHEUS_URL, "http://a:9090"), (ENV_NAMESPACE, "x")]);
        let layered = Flags::over(e)
            .flag(ENV_PROMETHEUS_URL, Some("http://b:9090".into()))
            .flag(ENV_NAMESPACE, None);
        let c = Config::from_env(&layered).unwrap();
        assert_eq!(c.prometheus_url, "http://b:9090");
        assert_eq!(c.namespace.as_deref(), Some("x"));
        assert_eq!(c.lease_namespace, "x", "the Lease follows --namespace");
    }
}
