//! The proxy's configuration, read from `MESH_PROXY_*` variables.

use std::net::SocketAddr;

use mesh_core::config::{ConfigError, Env};

/// Address of the admin server (`/live`, `/ready`, `/metrics`).
pub const ENV_ADMIN_ADDR: &str = "MESH_PROXY_ADMIN_ADDR";

/// Linkerd's admin port, so existing scrape configs and probes keep working.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 4191);

/// Address of the outbound listener the local app sends its requests to.
pub const ENV_OUTBOUND_ADDR: &str = "MESH_PROXY_OUTBOUND_ADDR";

/// Linkerd's outbound port.
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4140);

/// Static route and endpoint tables (YAML), instead of the control plane's streams; the
/// `--config FILE` flag sets the same.
pub const ENV_CONFIG_FILE: &str = "MESH_PROXY_CONFIG";

/// The control plane's proxy API (`host:port`); when set, routes and endpoints come from its
/// watch streams.
pub const ENV_CONTROL_PLANE_ADDR: &str = "MESH_PROXY_CONTROL_PLANE_ADDR";

/// Authorities to watch from the start (comma-separated `name.namespace:port`); others are
/// watched on their first request.
pub const ENV_WATCH: &str = "MESH_PROXY_WATCH";

/// Typed proxy configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the admin server listens; port 0 lets the kernel choose (announced on stdout).
    pub admin_addr: SocketAddr,
    /// Where the outbound listener listens.
    pub outbound_addr: SocketAddr,
    /// Static config file, if any.
    pub config_file: Option<std::path::PathBuf>,
    /// Control plane proxy API address, if any.
    pub control_plane: Option<String>,
    /// Authorities watched from the start.
    pub watch: Vec<mesh_core::proxy_api::ServiceRef>,
}

impl Config {
    /// Reads the configuration from `env`.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        Ok(Self {
            admin_addr: env.parse_or(ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR)?,
            outbound_addr: env.parse_or(ENV_OUTBOUND_ADDR, DEFAULT_OUTBOUND_ADDR)?,
            config_file: env.parse(ENV_CONFIG_FILE)?,
            control_plane: env.parse(ENV_CONTROL_PLANE_ADDR)?,
            watch: match env.var(ENV_WATCH) {
                None => Vec::new(),
                Some(list) => list
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        a.parse()
                            .map_err(|e: mesh_core::proxy_api::ServiceRefError| ConfigError {
                                name: ENV_WATCH,
                                value: list.clone(),
                                reason: e.to_string(),
                            })
                    })
                    .collect::<Result<_, _>>()?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn defaults_to_linkerd_admin_port() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        assert_eq!(cfg.admin_addr.port(), 4191);
    }

    #[test]
    fn rejects_a_bad_admin_addr() {
        let env = BTreeMap::from([(ENV_ADMIN_ADDR.to_string(), "localhost".to_string())]);
        let err = Config::from_env(&env).unwrap_err();
        assert_eq!(err.name, ENV_ADMIN_ADDR);
        assert_eq!(err.value, "localhost");
    }
}
