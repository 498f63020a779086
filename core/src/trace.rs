//! Tracing's configuration: which OTLP collector the proxies send spans to, and how many new
//! traces they sample. The proxy reads it from its environment (`mesh-sidecar`'s `trace`
//! module records and exports the spans); `mesh up` checks its flags with the same code before
//! passing them to every sidecar.

use crate::config::{ConfigError, Env};

/// The OTLP collector spans are sent to: `host:port` or an `http(s)://` URL. Without a path,
/// OTLP/HTTP's `/v1/traces` is added. Tracing is off when neither this nor
/// [`ENV_OTEL_ENDPOINT`] is set.
pub const ENV_COLLECTOR: &str = "MESH_PROXY_TRACE_COLLECTOR";

/// OpenTelemetry's standard variable, honoured when [`ENV_COLLECTOR`] is unset: the base URL of
/// an OTLP/HTTP receiver (`/v1/traces` is always added, as the specification says).
pub const ENV_OTEL_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The share of new traces sampled, from `0` to `1` (default [`DEFAULT_SAMPLING`]); a request
/// that carries a sampling decision keeps it.
pub const ENV_SAMPLING: &str = "MESH_PROXY_TRACE_SAMPLING";

/// OpenTelemetry's variable naming a PEM file of the CA certificates that verify an `https://`
/// collector, in addition to the system's roots (a collector behind a private CA; an image
/// built `FROM scratch` has no system roots at all). [`ENV_OTEL_TRACES_CERTIFICATE`] wins.
pub const ENV_OTEL_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";

/// The traces-only form of [`ENV_OTEL_CERTIFICATE`].
pub const ENV_OTEL_TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";

/// The headers that carry a trace's context from hop to hop: W3C's and both forms of B3. An app
/// in a mesh copies them from the request it serves onto its own downstream calls, so that its
/// spans join one trace (docs/tracing.md).
pub const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Every new trace is sampled unless told otherwise: tracing is on only when asked for.
pub const DEFAULT_SAMPLING: f64 = 1.0;

/// Where spans go and how many are sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// The OTLP/HTTP traces URL (`.../v1/traces`).
    pub endpoint: String,
    /// The share of new traces sampled, `0..=1`.
    pub sampling: f64,
    /// PEM CA certificates (read from [`ENV_OTEL_TRACES_CERTIFICATE`] or
    /// [`ENV_OTEL_CERTIFICATE`]) trusted for the collector beside the system's roots.
    pub collector_roots_pem: Option<String>,
}

// `sampling` is never NaN (it is checked to lie in 0..=1), so equality is an equivalence.
impl Eq for TraceConfig {}

impl TraceConfig {
    /// Reads [`ENV_COLLECTOR`] (or [`ENV_OTEL_ENDPOINT`]) and [`ENV_SAMPLING`]; `None` when no
    /// collector is set. Errors name the variable and its bad value.
    pub fn from_env(env: &impl Env) -> Result<Option<Self>, ConfigError> {
        let sampling = match env.var(ENV_SAMPLING) {
            None => DEFAULT_SAMPLING,
            Some(value) => sampling(&value).map_err(|reason| ConfigError {
                name: ENV_SAMPLING,
                value,
                reason,
            })?,
        };
        let endpoint = match (env.var(ENV_COLLECTOR), env.var(ENV_OTEL_ENDPOINT)) {
            (Some(v), _) if !v.trim().is_empty() => {
                collector_url(&v).map_err(|reason| ConfigError {
                    name: ENV_COLLECTOR,
                    value: v.clone(),
                    reason,
                })?
            }
            (_, Some(v)) if !v.trim().is_empty() => {
                traces_url(&v, true).map_err(|reason| ConfigError {
                    name: ENV_OTEL_ENDPOINT,
                    value: v.clone(),
                    reason,
                })?
            }
            _ => return Ok(None),
        };
        let roots = [ENV_OTEL_TRACES_CERTIFICATE, ENV_OTEL_CERTIFICATE]
            .into_iter()
            .find_map(|name| Some((name, env.var(name).filter(|v| !v.trim().is_empty())?)));
        let collector_roots_pem = match roots {
            None => None,
            Some((name, path)) => Some(read_roots(path.trim()).map_err(|reason| ConfigError {
                name,
                value: path.clone(),
                reason,
            })?),
        };
        Ok(Some(Self {
            endpoint,
            sampling,
            collector_roots_pem,
        }))
    }
}

/// The PEM text of a CA file, which must hold at least one certificate.
fn read_roots(path: &str) -> Result<String, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("reading it: {e}"))?;
    if pem.contains("-----BEGIN CERTIFICATE-----") {
        Ok(pem)
    } else {
        Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into())
    }
}

/// A sampling share as [`ENV_SAMPLING`] takes it, checked: a number from 0 to 1. The error
/// says what is expected; callers name where the value came from (a flag, an annotation).
pub fn sampling(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(s) if (0.0..=1.0).contains(&s) => Ok(s),
        _ => Err("expected a number from 0 to 1 (the share of new traces sampled)".into()),
    }
}

/// The OTLP/HTTP traces URL of a collector as [`ENV_COLLECTOR`] takes it (`host:port` or an
/// `http(s)://` URL), checked; the error says what is wrong.
pub fn collector_url(value: &str) -> Result<String, String> {
    traces_url(value, false)
}

/// The OTLP/HTTP traces URL for a collector written as `host:port` or a URL; `/v1/traces` is
/// added when the URL has no path, or always for OpenTelemetry's base-URL variable.
fn traces_url(value: &str, base: bool) -> Result<String, String> {
    let value = value.trim();
    if value.contains(char::is_whitespace) {
        return Err("not host:port or an http(s) URL".into());
    }
    let (scheme, rest) = value.split_once("://").unwrap_or(("http", value));
    if !matches!(scheme, "http" | "https") {
        return Err("the collector speaks OTLP over http:// or https://".into());
    }
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let host = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((host, port)) if !port.contains(']') => {
            port.parse::<u16>()
                .map_err(|_| format!("{port:?} is not a port number"))?;
            host
        }
        _ => authority,
    };
    if host.is_empty() || authority.contains('@') {
        return Err("names no host (write host:port or http(s)://host:port)".into());
    }
    let url = format!("{scheme}://{rest}");
    if base || path.is_empty() || path == "/" {
        Ok(format!("{}/v1/traces", url.trim_end_matches('/')))
    } else {
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Option<TraceConfig>, ConfigError> {
        let env: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceConfig::from_env(&env)
    }

    #[test]
    fn the_collector_and_sampling_come_from_the_environment() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(config(&[(ENV_SAMPLING, "0.5")]).unwrap(), None);
        let c = config(&[(ENV_COLLECTOR, "jaeger:4318")]).unwrap().unwrap();
        assert_eq!(c.endpoint, "http://jaeger:4318/v1/traces");
        assert_eq!(c.sampling, DEFAULT_SAMPLING);
        let c = config(&[
            (ENV_COLLECTOR, "https://otel.example:443/custom/path"),
            (ENV_OTEL_ENDPOINT, "http://ignored:4318"),
            (ENV_SAMPLING, "0.25"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "https://otel.example:443/custom/path");
        assert_eq!(c.sampling, 0.25);
        // OpenTelemetry's variable is a base URL: the signal's path is always added.
        let c = config(&[(ENV_OTEL_ENDPOINT, "http://collector:4318/otlp/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/otlp/v1/traces");
    }

    #[test]
    fn a_collector_ca_file_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("mesh-trace-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let ca = ca.to_str().unwrap();
        let c = config(&[
            (ENV_COLLECTOR, "https://c:4318"),
            (ENV_OTEL_CERTIFICATE, ca),
        ])
        .unwrap()
        .unwrap();
        assert!(c.collector_roots_pem.unwrap().contains("MIIB"));
        // The traces-only variable wins over the general one.
        let e = config(&[
            (ENV_COLLECTOR, "https://c:4318"),
            (ENV_OTEL_CERTIFICATE, ca),
            (ENV_OTEL_TRACES_CERTIFICATE, junk.to_str().unwrap()),
        ])
        .unwrap_err();
        assert_eq!(e.name, ENV_OTEL_TRACES_CERTIFICATE, "{e}");
        let e = config(&[
            (ENV_COLLECTOR, "c:4318"),
            (ENV_OTEL_CERTIFICATE, "/nonexistent/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.name, ENV_OTEL_CERTIFICATE, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (name, value) in [
            (ENV_SAMPLING, "1.5"),
            (ENV_SAMPLING, "half"),
            (ENV_SAMPLING, "NaN"),
            (ENV_COLLECTOR, "grpc://collector:4317"),
            (ENV_COLLECTOR, "http://"),
            (ENV_COLLECTOR, "collector:43x8"),
            (ENV_OTEL_ENDPOINT, "not a url"),
        ] {
            let e = config(&[(ENV_COLLECTOR, "c:4318"), (name, value)])
                .err()
                .or_else(|| config(&[(name, value)]).err())
                .unwrap_or_else(|| panic!("{name}={value} was accepted"));
            assert_eq!(e.name, name, "{e}");
            assert_eq!(e.value, value);
        }
    }
}
