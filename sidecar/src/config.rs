//! The proxy's configuration, read from `MESH_PROXY_*` variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::{ConfigError, Env};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::balance::{self, BalanceConfig, FailureAccrual};
use crate::limits::Limits;
use mesh_core::proxy_api::{PolicyTarget, ServiceRef, parse_labels};

/// Address of the admin server (`/live`, `/ready`, `/metrics`).
pub const ENV_ADMIN_ADDR: &str = "MESH_PROXY_ADMIN_ADDR";

/// Linkerd's admin port, so existing scrape configs and probes keep working; on loopback
/// unless asked otherwise, since `/config` shows the mesh's routing to whoever can reach it (in
/// a pod the injector sets the pod's address, for the kubelet's probes and Prometheus).
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4191);

/// Address of the outbound listener the local app sends its requests to.
pub const ENV_OUTBOUND_ADDR: &str = "MESH_PROXY_OUTBOUND_ADDR";

/// Linkerd's outbound port.
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4140);

/// Static route and endpoint tables (YAML), instead of the control plane's streams; the
/// `--config FILE` flag sets the same.
pub const ENV_CONFIG_FILE: &str = "MESH_PROXY_CONFIG";

/// The control plane's proxy API (`host:port` or `https://host:port`; it is served over mTLS);
/// when set, routes and endpoints come from its watch streams. It needs the trust roots
/// ([`ENV_TRUST_ROOTS`] or [`ENV_TRUST_ROOTS_FILE`]) and an identity ([`ENV_IDENTITY`] and
/// [`ENV_TOKEN_FILE`]), since watches and registration present the workload's certificate.
pub const ENV_CONTROL_PLANE_ADDR: &str = "MESH_PROXY_CONTROL_PLANE_ADDR";

/// The mesh's trust roots (PEM text) the control plane's certificate must chain to; in a
/// cluster the injector sets them, as Linkerd sets its trust anchors.
pub const ENV_TRUST_ROOTS: &str = "MESH_PROXY_TRUST_ROOTS";

/// A file holding the trust roots instead (in the embedded mesh, the control plane's
/// `trust-roots.pem` in its state directory).
pub const ENV_TRUST_ROOTS_FILE: &str = "MESH_PROXY_TRUST_ROOTS_FILE";

/// Authorities to watch from the start (comma-separated `name.namespace:port`); others are
/// watched on their first request.
pub const ENV_WATCH: &str = "MESH_PROXY_WATCH";

/// The local app the inbound listener hands requests to (`ip:port`); the inbound listener is
/// bound only when this is set.
pub const ENV_APP_ADDR: &str = "MESH_PROXY_APP_ADDR";

/// Address of the inbound listener, where peers' requests for the local app arrive.
pub const ENV_INBOUND_ADDR: &str = "MESH_PROXY_INBOUND_ADDR";
/// How long the inbound listener waits for a silent client's first byte before it forwards
/// the connection as opaque TCP (a server-first protocol), e.g. `10s`.
pub const ENV_INBOUND_DETECT_TIMEOUT: &str = "MESH_PROXY_INBOUND_DETECT_TIMEOUT";

/// How long the outbound listener waits for the first bytes of a redirected connection before
/// it forwards the connection as opaque TCP (a server-first protocol), e.g. `10s`.
pub const ENV_OUTBOUND_DETECT_TIMEOUT: &str = "MESH_PROXY_OUTBOUND_DETECT_TIMEOUT";

/// Ports (comma-separated, ranges as `a-b`) whose redirected outbound connections are opaque
/// TCP without detection; empty for none. Default [`crate::opaque::DEFAULT_OPAQUE_PORTS`].
pub const ENV_OUTBOUND_OPAQUE_PORTS: &str = "MESH_PROXY_OUTBOUND_OPAQUE_PORTS";

/// The same for redirected inbound connections, by the port they were sent to.
pub const ENV_INBOUND_OPAQUE_PORTS: &str = "MESH_PROXY_INBOUND_OPAQUE_PORTS";

/// Linkerd's inbound port; on every interface, since peers connect to it from elsewhere.
pub const DEFAULT_INBOUND_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 4143);

/// The service (`name.namespace:port`) whose endpoints the local workload joins; with the
/// control plane set, the proxy registers the workload there.
pub const ENV_WORKLOAD_SERVICE: &str = "MESH_PROXY_WORKLOAD_SERVICE";

/// Labels of the registered workload, `key=value` pairs separated by commas.
pub const ENV_WORKLOAD_LABELS: &str = "MESH_PROXY_WORKLOAD_LABELS";
/// The workload's namespace, which policy `Server`s select in; the namespace of
/// `MESH_PROXY_WORKLOAD_SERVICE` when unset, else `default`.
pub const ENV_WORKLOAD_NAMESPACE: &str = "MESH_PROXY_WORKLOAD_NAMESPACE";
/// The workload's owner, Linkerd's `deployment` label (in the embedded mesh, the arm:
/// `<target>` or `<target>-primary`). When set, the proxy writes `namespace`, `deployment` and
/// `pod` on every series itself; in a cluster it is unset and the scrape config's relabeling
/// adds them from the pod, as Linkerd's does.
pub const ENV_WORKLOAD_DEPLOYMENT: &str = "MESH_PROXY_WORKLOAD_DEPLOYMENT";
/// The workload's instance, Linkerd's `pod` label (written with [`ENV_WORKLOAD_DEPLOYMENT`]).
pub const ENV_WORKLOAD_POD: &str = "MESH_PROXY_WORKLOAD_POD";
/// Inbound policy until the control plane's first answer, and always without a control plane:
/// `all-unauthenticated` (the default), `all-authenticated` or `deny`.
pub const ENV_INBOUND_DEFAULT_POLICY: &str = "MESH_PROXY_INBOUND_DEFAULT_POLICY";

/// The address registered for the workload (`ip:port`), when peers must use another address
/// than the inbound listener's own (NAT, a published port).
pub const ENV_WORKLOAD_ADDR: &str = "MESH_PROXY_WORKLOAD_ADDR";

/// A file holding the bearer token a caller must present to tap this proxy (`/tap` on the
/// admin port, see [`crate::tap`]); tap is off without one. The embedded mesh points it at the
/// control plane's resource API token.
pub const ENV_TAP_TOKEN_FILE: &str = "MESH_PROXY_TAP_TOKEN_FILE";

/// The SHA-256 (64 hex digits) of the bearer token a caller must present to tap this proxy,
/// instead of the token itself: in a cluster the injector sets it from the control plane's tap
/// token, so the pod spec says nothing of the token (see `mesh_core::tap`).
pub const ENV_TAP_TOKEN_SHA256: &str = "MESH_PROXY_TAP_TOKEN_SHA256";

/// The workload's SPIFFE ID, sent with its registration; with [`ENV_TOKEN_FILE`], the identity
/// the proxy asks the control plane to certify and uses for mTLS.
pub const ENV_IDENTITY: &str = "MESH_PROXY_IDENTITY";

/// File holding the bootstrap token presented to the control plane's CA (in the embedded mesh,
/// the control plane's `bootstrap-token` in its state directory).
pub const ENV_TOKEN_FILE: &str = "MESH_PROXY_TOKEN_FILE";

/// How long the outbound proxy waits for a connection to an endpoint (`500ms`, `1s`); a
/// connection that takes longer fails the attempt (502, retryable).
pub const ENV_OUTBOUND_CONNECT_TIMEOUT: &str = "MESH_PROXY_OUTBOUND_CONNECT_TIMEOUT";

/// Linkerd's outbound connect timeout.
pub const DEFAULT_OUTBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Latency assumed for an endpoint the balancer has not measured yet.
pub const ENV_BALANCER_DEFAULT_RTT: &str = "MESH_PROXY_BALANCER_DEFAULT_RTT";

/// Time constant of the balancer's peak-EWMA latency estimate.
pub const ENV_BALANCER_DECAY: &str = "MESH_PROXY_BALANCER_DECAY";

/// Consecutive failures that take an endpoint out of the pick; 0 turns failure accrual off.
pub const ENV_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES: &str =
    "MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES";

/// Wait before a failing endpoint is first probed.
pub const ENV_FAILURE_ACCRUAL_MIN_BACKOFF: &str = "MESH_PROXY_FAILURE_ACCRUAL_MIN_BACKOFF";

/// Longest wait between probes of a failing endpoint.
pub const ENV_FAILURE_ACCRUAL_MAX_BACKOFF: &str = "MESH_PROXY_FAILURE_ACCRUAL_MAX_BACKOFF";

/// Time a client has to send a whole request head (and that a kept-alive HTTP/1.1
/// connection may sit idle), on both listeners, e.g. `30s`.
pub const ENV_HEADER_READ_TIMEOUT: &str = "MESH_PROXY_HEADER_READ_TIMEOUT";

/// Time a connection may carry no byte before it is asked to close, on both listeners.
pub const ENV_IDLE_TIMEOUT: &str = "MESH_PROXY_IDLE_TIMEOUT";

/// Connections each listener keeps open at once; at the cap it stops accepting until one
/// closes.
pub const ENV_MAX_CONNECTIONS: &str = "MESH_PROXY_MAX_CONNECTIONS";

/// Bytes of an HTTP/1.1 connection's read and write buffers (each); a longer request head is
/// refused with 431. At least 8192.
pub const ENV_HTTP1_MAX_BUFFER: &str = "MESH_PROXY_HTTP1_MAX_BUFFER";

/// Header fields in an HTTP/1.1 request head; more is refused with 431.
pub const ENV_HTTP1_MAX_HEADERS: &str = "MESH_PROXY_HTTP1_MAX_HEADERS";

/// Concurrent streams per HTTP/2 connection.
pub const ENV_H2_MAX_CONCURRENT_STREAMS: &str = "MESH_PROXY_H2_MAX_CONCURRENT_STREAMS";

/// Bytes of a decoded HTTP/2 header list; it also bounds a run of CONTINUATION frames.
pub const ENV_H2_MAX_HEADER_LIST_SIZE: &str = "MESH_PROXY_H2_MAX_HEADER_LIST_SIZE";

/// HTTP/2 streams a client may open and reset before the proxy accepts them (rapid reset).
pub const ENV_H2_MAX_PENDING_RESETS: &str = "MESH_PROXY_H2_MAX_PENDING_RESETS";

/// HTTP/2 streams the proxy may reset for a client's errors before closing the connection.
pub const ENV_H2_MAX_LOCAL_RESETS: &str = "MESH_PROXY_H2_MAX_LOCAL_RESETS";

/// The listeners' limits from `env`; see [`crate::limits`].
fn limits(env: &impl Env) -> Result<Limits, ConfigError> {
    use crate::limits as l;
    let limits = Limits {
        header_read_timeout: env
            .duration_or(ENV_HEADER_READ_TIMEOUT, l::DEFAULT_HEADER_READ_TIMEOUT)?,
        idle_timeout: env.duration_or(ENV_IDLE_TIMEOUT, l::DEFAULT_IDLE_TIMEOUT)?,
        max_connections: env.parse_or(ENV_MAX_CONNECTIONS, l::DEFAULT_MAX_CONNECTIONS)?,
        http1_max_buffer: env.parse_or(ENV_HTTP1_MAX_BUFFER, l::DEFAULT_HTTP1_MAX_BUFFER)?,
        http1_max_headers: env.parse_or(ENV_HTTP1_MAX_HEADERS, l::DEFAULT_HTTP1_MAX_HEADERS)?,
        h2_max_concurrent_streams: env.parse_or(
            ENV_H2_MAX_CONCURRENT_STREAMS,
            l::DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        )?,
        h2_max_header_list_size: env.parse_or(
            ENV_H2_MAX_HEADER_LIST_SIZE,
            l::DEFAULT_H2_MAX_HEADER_LIST_SIZE,
        )?,
        h2_max_pending_resets: env
            .parse_or(ENV_H2_MAX_PENDING_RESETS, l::DEFAULT_H2_MAX_PENDING_RESETS)?,
        h2_max_local_resets: env
            .parse_or(ENV_H2_MAX_LOCAL_RESETS, l::DEFAULT_H2_MAX_LOCAL_RESETS)?,
    };
    let bad = |name: &'static str, reason: &str| ConfigError {
        name,
        value: env.var(name).unwrap_or_default(),
        reason: reason.to_string(),
    };
    for (name, value) in [
        (ENV_HEADER_READ_TIMEOUT, limits.header_read_timeout),
        (ENV_IDLE_TIMEOUT, limits.idle_timeout),
    ] {
        if value.is_zero() {
            return Err(bad(name, "must be longer than zero"));
        }
    }
    for (name, value) in [
        (ENV_MAX_CONNECTIONS, limits.max_connections),
        (ENV_HTTP1_MAX_HEADERS, limits.http1_max_headers),
        (
            ENV_H2_MAX_CONCURRENT_STREAMS,
            limits.h2_max_concurrent_streams as usize,
        ),
        (
            ENV_H2_MAX_HEADER_LIST_SIZE,
            limits.h2_max_header_list_size as usize,
        ),
    ] {
        if value == 0 {
            return Err(bad(name, "must be at least 1"));
        }
    }
    if limits.http1_max_buffer < l::MIN_HTTP1_BUFFER {
        return Err(bad(
            ENV_HTTP1_MAX_BUFFER,
            &format!("must be at least {} bytes", l::MIN_HTTP1_BUFFER),
        ));
    }
    Ok(limits)
}

/// Typed proxy configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the admin server listens; port 0 lets the kernel choose (announced on stdout).
    pub admin_addr: SocketAddr,
    /// Where the outbound listener listens.
    pub outbound_addr: SocketAddr,
    /// Static config file, if any.
    pub config_file: Option<std::path::PathBuf>,
    /// The control plane's proxy API, if any.
    pub control_plane: Option<ControlPlane>,
    /// Authorities watched from the start.
    pub watch: Vec<ServiceRef>,
    /// The local app; the inbound listener exists only when this is set.
    pub app_addr: Option<SocketAddr>,
    /// Where the inbound listener listens.
    pub inbound_addr: SocketAddr,
    /// The local workload, as registered with the control plane.
    pub workload: Workload,
    /// Connect timeout to endpoints (outbound).
    pub connect_timeout: Duration,
    /// See [`ENV_INBOUND_DETECT_TIMEOUT`].
    pub detect_timeout: Duration,
    /// See [`ENV_OUTBOUND_DETECT_TIMEOUT`].
    pub outbound_detect_timeout: Duration,
    /// See [`ENV_OUTBOUND_OPAQUE_PORTS`].
    pub outbound_opaque_ports: crate::opaque::Ports,
    /// See [`ENV_INBOUND_OPAQUE_PORTS`].
    pub inbound_opaque_ports: crate::opaque::Ports,
    /// See [`ENV_INBOUND_DEFAULT_POLICY`].
    pub inbound_default_policy: mesh_policies::DefaultPolicy,
    /// Endpoint selection and failure accrual.
    pub balance: BalanceConfig,
    /// What a peer may make each listener hold ([`crate::limits`]).
    pub limits: Limits,
    /// See [`ENV_TAP_TOKEN_FILE`].
    pub tap_token_file: Option<std::path::PathBuf>,
    /// See [`ENV_TAP_TOKEN_SHA256`]; lower-case hex.
    pub tap_token_sha256: Option<String>,
    /// Where spans go and how many are sampled; tracing is off when `None`
    /// ([`crate::trace::ENV_COLLECTOR`], [`crate::trace::ENV_SAMPLING`]).
    pub trace: Option<crate::trace::TraceConfig>,
}

/// Where the control plane's proxy API is and what verifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// Its base URL, `https://host:port`.
    pub url: String,
    /// The roots its certificate must chain to.
    pub trust_roots: TrustRoots,
}

/// Where the trust roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustRoots {
    /// PEM text, from [`ENV_TRUST_ROOTS`] (already checked to hold certificates).
    Pem(String),
    /// A file, from [`ENV_TRUST_ROOTS_FILE`], read at start-up.
    File(std::path::PathBuf),
}

impl TrustRoots {
    /// The roots as rustls checks chains against them; errors name the variable they came from.
    pub fn load(&self) -> Result<Arc<RootCertStore>, ConfigError> {
        match self {
            Self::Pem(pem) => parse_roots(pem).map_err(|reason| ConfigError {
                name: ENV_TRUST_ROOTS,
                value: pem.clone(),
                reason,
            }),
            Self::File(path) => {
                let error = |reason: String| ConfigError {
                    name: ENV_TRUST_ROOTS_FILE,
                    value: path.display().to_string(),
                    reason,
                };
                let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
                parse_roots(&pem).map_err(|reason| error(format!("{}: {reason}", path.display())))
            }
        }
    }
}

/// [`ENV_TAP_TOKEN_SHA256`], when set: 64 hex digits, kept in lower case.
fn tap_token_sha256(env: &impl Env) -> Result<Option<String>, ConfigError> {
    let Some(value) = env.var(ENV_TAP_TOKEN_SHA256) else {
        return Ok(None);
    };
    let digest = value.trim().to_ascii_lowercase();
    if !mesh_core::tap::is_sha256_hex(&digest) {
        return Err(ConfigError {
            name: ENV_TAP_TOKEN_SHA256,
            value,
            reason: "not a SHA-256 digest (64 hex digits)".into(),
        });
    }
    Ok(Some(digest))
}

/// An opaque-port list from `name`, or the default list when unset.
fn opaque_ports(env: &impl Env, name: &'static str) -> Result<crate::opaque::Ports, ConfigError> {
    let value = env
        .var(name)
        .unwrap_or_else(|| crate::opaque::DEFAULT_OPAQUE_PORTS.to_string());
    value.parse().map_err(|reason| ConfigError {
        name,
        value: value.clone(),
        reason,
    })
}

/// Certificates from PEM text, at least one.
fn parse_roots(pem: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable root certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(Arc::new(roots))
}

/// The base URL of the proxy API at `addr`: `host:port`, or the same with `https://`.
fn control_plane_url(addr: &str) -> Result<String, String> {
    let addr = addr.trim();
    if addr.starts_with("http://") {
        return Err(
            "the proxy API is served over TLS; write host:port or https://host:port".into(),
        );
    }
    let host_port = addr.strip_prefix("https://").unwrap_or(addr);
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    match host_port.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host_port.contains('/') && port.parse::<u16>().is_ok() =>
        {
            Ok(format!("https://{host_port}"))
        }
        _ => Err("expected host:port (or https://host:port)".into()),
    }
}

/// What the proxy knows of the workload beside it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The service it serves; labels inbound metrics, and with a control plane, registers it.
    pub service: Option<ServiceRef>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its namespace, when set apart from the service's.
    pub namespace: Option<String>,
    /// Its owner (see [`ENV_WORKLOAD_DEPLOYMENT`]).
    pub deployment: Option<String>,
    /// Its instance (see [`ENV_WORKLOAD_POD`]).
    pub pod: Option<String>,
    /// The address registered instead of the inbound listener's.
    pub addr: Option<SocketAddr>,
    /// Its SPIFFE ID.
    pub identity: Option<String>,
    /// The bootstrap token file; with an identity and a control plane, the proxy gets a
    /// certificate and speaks mTLS to peers.
    pub token_file: Option<std::path::PathBuf>,
}

impl Config {
    /// Reads the configuration from `env`.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let config = Self {
            admin_addr: env.parse_or(ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR)?,
            outbound_addr: env.parse_or(ENV_OUTBOUND_ADDR, DEFAULT_OUTBOUND_ADDR)?,
            config_file: env.parse(ENV_CONFIG_FILE)?,
            control_plane: control_plane(env)?,
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
            app_addr: env.parse(ENV_APP_ADDR)?,
            inbound_addr: env.parse_or(ENV_INBOUND_ADDR, DEFAULT_INBOUND_ADDR)?,
            workload: Workload {
                service: env.parse(ENV_WORKLOAD_SERVICE)?,
                labels: match env.var(ENV_WORKLOAD_LABELS) {
                    None => BTreeMap::new(),
                    Some(list) => parse_labels(&list).map_err(|reason| ConfigError {
                        name: ENV_WORKLOAD_LABELS,
                        value: list.clone(),
                        reason,
                    })?,
                },
                namespace: env.parse(ENV_WORKLOAD_NAMESPACE)?,
                deployment: env.parse(ENV_WORKLOAD_DEPLOYMENT)?,
                pod: env.parse(ENV_WORKLOAD_POD)?,
                addr: env.parse(ENV_WORKLOAD_ADDR)?,
                identity: env.parse(ENV_IDENTITY)?,
                token_file: env.parse(ENV_TOKEN_FILE)?,
            },
            connect_timeout: env.duration_or(
                ENV_OUTBOUND_CONNECT_TIMEOUT,
                DEFAULT_OUTBOUND_CONNECT_TIMEOUT,
            )?,
            detect_timeout: env.duration_or(
                ENV_INBOUND_DETECT_TIMEOUT,
                crate::opaque::DEFAULT_DETECT_TIMEOUT,
            )?,
            outbound_detect_timeout: env.duration_or(
                ENV_OUTBOUND_DETECT_TIMEOUT,
                crate::opaque::DEFAULT_DETECT_TIMEOUT,
            )?,
            outbound_opaque_ports: opaque_ports(env, ENV_OUTBOUND_OPAQUE_PORTS)?,
            inbound_opaque_ports: opaque_ports(env, ENV_INBOUND_OPAQUE_PORTS)?,
            inbound_default_policy: env.parse_or(
                ENV_INBOUND_DEFAULT_POLICY,
                mesh_policies::DefaultPolicy::AllUnauthenticated,
            )?,
            balance: BalanceConfig {
                default_rtt: env.duration_or(ENV_BALANCER_DEFAULT_RTT, balance::DEFAULT_RTT)?,
                decay: env.duration_or(ENV_BALANCER_DECAY, balance::DEFAULT_DECAY)?,
                accrual: FailureAccrual {
                    consecutive_failures: env.parse_or(
                        ENV_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES,
                        balance::DEFAULT_CONSECUTIVE_FAILURES,
                    )?,
                    min_backoff: env.duration_or(
                        ENV_FAILURE_ACCRUAL_MIN_BACKOFF,
                        balance::DEFAULT_MIN_BACKOFF,
                    )?,
                    max_backoff: env.duration_or(
                        ENV_FAILURE_ACCRUAL_MAX_BACKOFF,
                        balance::DEFAULT_MAX_BACKOFF,
                    )?,
                },
            },
            limits: limits(env)?,
            tap_token_file: env.parse(ENV_TAP_TOKEN_FILE)?,
            tap_token_sha256: tap_token_sha256(env)?,
            trace: crate::trace::TraceConfig::from_env(env)?,
        };
        for (name, value) in [
            (ENV_OUTBOUND_CONNECT_TIMEOUT, config.connect_timeout),
            (ENV_INBOUND_DETECT_TIMEOUT, config.detect_timeout),
            (ENV_OUTBOUND_DETECT_TIMEOUT, config.outbound_detect_timeout),
            (ENV_BALANCER_DECAY, config.balance.decay),
            (
                ENV_FAILURE_ACCRUAL_MIN_BACKOFF,
                config.balance.accrual.min_backoff,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError {
                    name,
                    value: env.var(name).unwrap_or_default(),
                    reason: "must be longer than zero".into(),
                });
            }
        }
        if config.balance.accrual.max_backoff < config.balance.accrual.min_backoff {
            return Err(ConfigError {
                name: ENV_FAILURE_ACCRUAL_MAX_BACKOFF,
                value: env.var(ENV_FAILURE_ACCRUAL_MAX_BACKOFF).unwrap_or_default(),
                reason: format!("shorter than {ENV_FAILURE_ACCRUAL_MIN_BACKOFF}"),
            });
        }
        // Watches and registration present the workload's certificate to the control plane,
        // so a control plane is only usable with an identity to ask a certificate for.
        if let Some(cp) = &config.control_plane {
            let missing = match (&config.workload.identity, &config.workload.token_file) {
                (None, _) => Some(ENV_IDENTITY),
                (Some(_), None) => Some(ENV_TOKEN_FILE),
                (Some(_), Some(_)) => None,
            };
            if let Some(missing) = missing {
                return Err(ConfigError {
                    name: missing,
                    value: String::new(),
                    reason: format!(
                        "{ENV_CONTROL_PLANE_ADDR} is {}, whose watches and registration need the \
                         workload's certificate; set {ENV_IDENTITY} (a SPIFFE ID) and \
                         {ENV_TOKEN_FILE} so the proxy can get one",
                        cp.url
                    ),
                });
            }
        }
        // A token is only useful to ask for a certificate, which needs a well-formed identity
        // and a control plane to ask.
        if let Some(token) = &config.workload.token_file {
            let token = token.display().to_string();
            match &config.workload.identity {
                None => {
                    return Err(ConfigError {
                        name: ENV_TOKEN_FILE,
                        value: token,
                        reason: format!("a certificate needs an identity; set {ENV_IDENTITY}"),
                    });
                }
                Some(id) => {
                    if let Err(e) = id.parse::<mesh_core::SpiffeId>() {
                        return Err(ConfigError {
                            name: ENV_IDENTITY,
                            value: id.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            if config.control_plane.is_none() {
                return Err(ConfigError {
                    name: ENV_TOKEN_FILE,
                    value: token,
                    reason: format!(
                        "certificates come from the control plane; set {ENV_CONTROL_PLANE_ADDR}"
                    ),
                });
            }
        }
        // Registering announces the inbound listener to peers; without it they would be sent
        // to a port nobody listens on.
        if let Some(service) = config.registration()
            && config.app_addr.is_none()
        {
            return Err(ConfigError {
                name: ENV_WORKLOAD_SERVICE,
                value: service.to_string(),
                reason: format!(
                    "registering the workload with the control plane needs the inbound \
                     listener; set {ENV_APP_ADDR} to the local app's address"
                ),
            });
        }
        Ok(config)
    }

    /// The identity the control plane's certificate must name: its SPIFFE ID in the trust
    /// domain of the workload's own identity.
    pub fn control_plane_identity(&self) -> Option<String> {
        let id: mesh_core::SpiffeId = self.workload.identity.as_deref()?.parse().ok()?;
        mesh_core::SpiffeId::control_plane(id.trust_domain())
            .ok()
            .map(|id| id.to_string())
    }

    /// What to ask the control plane to certify, and with which token file, when identity is
    /// configured (an identity, a token file and a control plane).
    pub fn certification(&self) -> Option<(&str, &std::path::Path)> {
        self.control_plane.as_ref()?;
        Some((
            self.workload.identity.as_deref()?,
            self.workload.token_file.as_deref()?,
        ))
    }

    /// The workload's namespace: [`ENV_WORKLOAD_NAMESPACE`], else its service's, else `default`.
    pub fn namespace(&self) -> String {
        self.workload
            .namespace
            .clone()
            .or_else(|| {
                self.workload
                    .service
                    .as_ref()
                    .map(|s| s.namespace.to_string())
            })
            .unwrap_or_else(|| "default".into())
    }

    /// Labels the proxy writes on every series: Linkerd's resource labels `namespace`,
    /// `deployment` and `pod`, when [`ENV_WORKLOAD_DEPLOYMENT`] names the workload; none
    /// otherwise (a cluster's scrape config adds them).
    pub fn resource_labels(&self) -> Vec<(&'static str, String)> {
        use mesh_core::metrics::label;
        let Some(deployment) = &self.workload.deployment else {
            return Vec::new();
        };
        let mut labels = vec![
            (label::NAMESPACE, self.namespace()),
            (label::DEPLOYMENT, deployment.clone()),
        ];
        if let Some(pod) = &self.workload.pod {
            labels.push((label::POD, pod.clone()));
        }
        labels
    }

    /// What names this proxy in its spans: `service.name` is the workload's owner, else its
    /// service, else `mesh-proxy`; the namespace and pod when known.
    pub fn trace_resource(&self) -> opentelemetry_sdk::Resource {
        use opentelemetry::KeyValue;
        let name = self
            .workload
            .deployment
            .clone()
            .or_else(|| self.workload.service.as_ref().map(|s| s.name.to_string()))
            .unwrap_or_else(|| "mesh-proxy".to_string());
        let mut attributes = vec![KeyValue::new("service.namespace", self.namespace())];
        if let Some(pod) = &self.workload.pod {
            attributes.push(KeyValue::new("k8s.pod.name", pod.clone()));
        }
        if let Some(id) = &self.workload.identity {
            attributes.push(KeyValue::new("mesh.identity", id.clone()));
        }
        opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(name)
            .with_attributes(attributes)
            .build()
    }

    /// The inbound port whose policy the proxy enforces: the workload's namespace and labels,
    /// and the port it is called on (its service's port, else the app's). `None` without an
    /// inbound listener.
    pub fn policy_target(&self) -> Option<PolicyTarget> {
        let app = self.app_addr?;
        let service = self.workload.service.as_ref();
        Some(PolicyTarget {
            namespace: self.namespace(),
            port: service.map_or(app.port(), |s| s.port),
            labels: self.workload.labels.clone(),
        })
    }

    /// The service to register the workload in, when registration is configured: a workload
    /// service and a control plane.
    pub fn registration(&self) -> Option<&ServiceRef> {
        self.control_plane
            .as_ref()
            .and(self.workload.service.as_ref())
    }
}

/// The control plane's address and trust roots; the roots are required with the address, and
/// useless without it.
fn control_plane(env: &impl Env) -> Result<Option<ControlPlane>, ConfigError> {
    let set = |name| env.var(name).filter(|v| !v.trim().is_empty());
    let (addr, pem, file) = (
        set(ENV_CONTROL_PLANE_ADDR),
        set(ENV_TRUST_ROOTS),
        set(ENV_TRUST_ROOTS_FILE),
    );
    let Some(addr) = addr else {
        if let Some((name, value)) = pem
            .map(|v| (ENV_TRUST_ROOTS, v))
            .or(file.map(|v| (ENV_TRUST_ROOTS_FILE, v)))
        {
            return Err(ConfigError {
                name,
                value,
                reason: format!(
                    "the trust roots verify the control plane; set {ENV_CONTROL_PLANE_ADDR} too, or unset this"
                ),
            });
        }
        return Ok(None);
    };
    let url = control_plane_url(&addr).map_err(|reason| ConfigError {
        name: ENV_CONTROL_PLANE_ADDR,
        value: addr.clone(),
        reason,
    })?;
    let trust_roots = match (pem, file) {
        (Some(pem), None) => {
            let roots = TrustRoots::Pem(pem);
            roots.load()?;
            roots
        }
        (None, Some(file)) => TrustRoots::File(file.trim().into()),
        (Some(_), Some(file)) => {
            return Err(ConfigError {
                name: ENV_TRUST_ROOTS_FILE,
                value: file,
                reason: format!("set only one of {ENV_TRUST_ROOTS} and {ENV_TRUST_ROOTS_FILE}"),
            });
        }
        (None, None) => {
            return Err(ConfigError {
                name: ENV_TRUST_ROOTS,
                value: String::new(),
                reason: format!(
                    "{ENV_CONTROL_PLANE_ADDR} is set, and the proxy API is served over mTLS: set \
                     {ENV_TRUST_ROOTS} (PEM) or {ENV_TRUST_ROOTS_FILE} to the mesh's trust roots \
                     (the control plane writes them to trust-roots.pem in its state directory)"
                ),
            });
        }
    };
    Ok(Some(ControlPlane { url, trust_roots }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn defaults_to_linkerd_admin_port_on_loopback() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        assert_eq!(cfg.admin_addr.port(), 4191);
        assert!(cfg.admin_addr.ip().is_loopback());
    }

    #[test]
    fn limits_default_and_bad_values_name_the_variable() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        assert_eq!(cfg.limits, Limits::default());
        let cfg = Config::from_env(&env(&[
            (ENV_HEADER_READ_TIMEOUT, "5s"),
            (ENV_IDLE_TIMEOUT, "2m"),
            (ENV_MAX_CONNECTIONS, "100"),
            (ENV_HTTP1_MAX_BUFFER, "16384"),
            (ENV_H2_MAX_CONCURRENT_STREAMS, "10"),
            (ENV_H2_MAX_HEADER_LIST_SIZE, "8192"),
            (ENV_H2_MAX_PENDING_RESETS, "5"),
        ]))
        .unwrap();
        assert_eq!(cfg.limits.header_read_timeout, Duration::from_secs(5));
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(cfg.limits.max_connections, 100);
        assert_eq!(cfg.limits.http1_max_buffer, 16384);
        assert_eq!(cfg.limits.h2_max_concurrent_streams, 10);
        assert_eq!(cfg.limits.h2_max_header_list_size, 8192);
        assert_eq!(cfg.limits.h2_max_pending_resets, 5);
        for (name, value) in [
            (ENV_HTTP1_MAX_BUFFER, "4096"),
            (ENV_MAX_CONNECTIONS, "0"),
            (ENV_MAX_CONNECTIONS, "lots"),
            (ENV_IDLE_TIMEOUT, "0s"),
            (ENV_H2_MAX_CONCURRENT_STREAMS, "0"),
        ] {
            let err = Config::from_env(&env(&[(name, value)])).unwrap_err();
            assert_eq!((err.name, err.value.as_str()), (name, value));
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn a_tap_token_digest_is_64_hex_digits_or_the_variable_is_named() {
        let digest = "AB".repeat(32);
        let cfg = Config::from_env(&env(&[(ENV_TAP_TOKEN_SHA256, &digest)])).unwrap();
        assert_eq!(cfg.tap_token_sha256, Some("ab".repeat(32)));
        for bad in ["abc", "the-token-itself"] {
            let err = Config::from_env(&env(&[(ENV_TAP_TOKEN_SHA256, bad)])).unwrap_err();
            assert_eq!(err.name, ENV_TAP_TOKEN_SHA256);
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
    }

    #[test]
    fn opaque_ports_default_to_linkerds_and_bad_lists_name_the_variable() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        for port in [25, 587, 3306, 4444, 5432, 6379, 9300, 11211] {
            assert!(cfg.outbound_opaque_ports.contains(port), "{port}");
            assert!(cfg.inbound_opaque_ports.contains(port), "{port}");
        }
        assert!(!cfg.outbound_opaque_ports.contains(80));
        let cfg = Config::from_env(&env(&[
            (ENV_OUTBOUND_OPAQUE_PORTS, ""),
            (ENV_INBOUND_OPAQUE_PORTS, "8000-8010"),
            (ENV_OUTBOUND_DETECT_TIMEOUT, "250ms"),
        ]))
        .unwrap();
        assert!(!cfg.outbound_opaque_ports.contains(5432));
        assert!(cfg.inbound_opaque_ports.contains(8005));
        assert_eq!(cfg.outbound_detect_timeout, Duration::from_millis(250));
        let err = Config::from_env(&env(&[(ENV_OUTBOUND_OPAQUE_PORTS, "5432,redis")])).unwrap_err();
        assert_eq!(err.name, ENV_OUTBOUND_OPAQUE_PORTS);
        assert!(err.to_string().contains("redis"), "{err}");
        let err = Config::from_env(&env(&[(ENV_OUTBOUND_DETECT_TIMEOUT, "0s")])).unwrap_err();
        assert_eq!(err.name, ENV_OUTBOUND_DETECT_TIMEOUT);
    }

    #[test]
    fn inbound_is_off_until_an_app_is_named() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        assert_eq!(cfg.app_addr, None);
        assert_eq!(cfg.inbound_addr, DEFAULT_INBOUND_ADDR);
        assert_eq!(cfg.registration(), None);
        let cfg = Config::from_env(&env(&[
            (ENV_APP_ADDR, "127.0.0.1:8080"),
            (ENV_INBOUND_ADDR, "127.0.0.1:0"),
        ]))
        .unwrap();
        assert_eq!(cfg.app_addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(cfg.inbound_addr.port(), 0);
    }

    /// A self-signed certificate, as trust roots.
    fn roots_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// What every proxy with a control plane needs: its address, trust roots and an identity.
    fn with_control_plane(pairs: &[(&'static str, &str)]) -> BTreeMap<String, String> {
        let roots = roots_pem();
        let mut all = vec![
            (ENV_CONTROL_PLANE_ADDR, "127.0.0.1:8091"),
            (ENV_TRUST_ROOTS, roots.as_str()),
            (ENV_IDENTITY, ID),
            (ENV_TOKEN_FILE, "/state/bootstrap-token"),
        ];
        all.extend_from_slice(pairs);
        env(&all)
    }

    #[test]
    fn reads_the_workload() {
        let cfg = Config::from_env(&with_control_plane(&[
            (ENV_APP_ADDR, "127.0.0.1:8080"),
            (ENV_WORKLOAD_SERVICE, "web-canary.shop:80"),
            (ENV_WORKLOAD_LABELS, "version=v2, track = canary,"),
            (ENV_WORKLOAD_ADDR, "10.0.0.7:4143"),
        ]))
        .unwrap();
        assert_eq!(
            cfg.registration(),
            Some(&ServiceRef::new("web-canary", "shop", 80))
        );
        assert_eq!(
            cfg.workload.labels,
            BTreeMap::from([
                ("track".to_string(), "canary".to_string()),
                ("version".to_string(), "v2".to_string()),
            ])
        );
        assert_eq!(cfg.workload.addr, Some("10.0.0.7:4143".parse().unwrap()));
        assert_eq!(cfg.workload.identity.as_deref(), Some(ID));
    }

    #[test]
    fn the_control_plane_is_reached_over_https_and_verified_with_the_trust_roots() {
        let cfg = Config::from_env(&with_control_plane(&[])).unwrap();
        let cp = cfg.control_plane.as_ref().unwrap();
        assert_eq!(cp.url, "https://127.0.0.1:8091");
        assert!(matches!(&cp.trust_roots, TrustRoots::Pem(_)));
        assert_eq!(cp.trust_roots.load().unwrap().len(), 1);
        assert_eq!(
            cfg.control_plane_identity().as_deref(),
            Some("spiffe://cluster.local/ns/mesh-system/sa/mesh-controlplane")
        );
        for (addr, url) in [
            (
                "https://mesh-controlplane.mesh-system.svc:4181",
                "https://mesh-controlplane.mesh-system.svc:4181",
            ),
            ("[::1]:4181", "https://[::1]:4181"),
        ] {
            let cfg =
                Config::from_env(&with_control_plane(&[(ENV_CONTROL_PLANE_ADDR, addr)])).unwrap();
            assert_eq!(cfg.control_plane.unwrap().url, url);
        }
        for bad in ["http://127.0.0.1:8091", "127.0.0.1", "https://cp:4181/v1"] {
            let err = Config::from_env(&with_control_plane(&[(ENV_CONTROL_PLANE_ADDR, bad)]))
                .unwrap_err();
            assert_eq!(
                (err.name, err.value.as_str()),
                (ENV_CONTROL_PLANE_ADDR, bad)
            );
        }
        // A file is read when the proxy starts, and errors name it.
        let mut file = with_control_plane(&[(ENV_TRUST_ROOTS_FILE, "/no/such/roots.pem")]);
        file.remove(ENV_TRUST_ROOTS);
        let cfg = Config::from_env(&file).unwrap();
        let roots = cfg.control_plane.unwrap().trust_roots;
        assert_eq!(roots, TrustRoots::File("/no/such/roots.pem".into()));
        assert_eq!(roots.load().unwrap_err().name, ENV_TRUST_ROOTS_FILE);
    }

    #[test]
    fn a_control_plane_needs_trust_roots_and_an_identity() {
        let mut no_roots = with_control_plane(&[]);
        no_roots.remove(ENV_TRUST_ROOTS);
        let err = Config::from_env(&no_roots).unwrap_err();
        assert_eq!(err.name, ENV_TRUST_ROOTS);
        assert!(err.reason.contains(ENV_TRUST_ROOTS_FILE), "{err}");
        let err =
            Config::from_env(&with_control_plane(&[(ENV_TRUST_ROOTS, "not pem")])).unwrap_err();
        assert_eq!(err.name, ENV_TRUST_ROOTS);
        let both = with_control_plane(&[(ENV_TRUST_ROOTS_FILE, "/roots.pem")]);
        assert_eq!(
            Config::from_env(&both).unwrap_err().name,
            ENV_TRUST_ROOTS_FILE
        );
        // Roots without a control plane do nothing: refused rather than ignored.
        let err = Config::from_env(&env(&[(ENV_TRUST_ROOTS_FILE, "/roots.pem")])).unwrap_err();
        assert_eq!(err.name, ENV_TRUST_ROOTS_FILE);
        // Without an identity the proxy could not authenticate its watches.
        for missing in [ENV_IDENTITY, ENV_TOKEN_FILE] {
            let mut cfg = with_control_plane(&[]);
            cfg.remove(missing);
            let err = Config::from_env(&cfg).unwrap_err();
            assert_eq!(err.name, missing);
            assert!(err.reason.contains("certificate"), "{err}");
        }
    }

    #[test]
    fn identity_needs_a_token_file_an_id_and_a_control_plane() {
        let cfg = Config::from_env(&env(&[(ENV_IDENTITY, ID)])).unwrap();
        assert_eq!(cfg.certification(), None);
        let cfg = Config::from_env(&with_control_plane(&[])).unwrap();
        assert_eq!(
            cfg.certification(),
            Some((ID, std::path::Path::new("/state/bootstrap-token")))
        );
        for (pairs, bad) in [
            (vec![(ENV_TOKEN_FILE, "/t")], ENV_TOKEN_FILE),
            (
                vec![(ENV_TOKEN_FILE, "/t"), (ENV_IDENTITY, ID)],
                ENV_TOKEN_FILE,
            ),
        ] {
            assert_eq!(Config::from_env(&env(&pairs)).unwrap_err().name, bad);
        }
        let err = Config::from_env(&with_control_plane(&[(ENV_IDENTITY, "web")])).unwrap_err();
        assert_eq!(err.name, ENV_IDENTITY);
    }

    #[test]
    fn rejects_bad_workload_values() {
        for (name, value) in [
            (ENV_WORKLOAD_SERVICE, "web:80"),
            (ENV_WORKLOAD_LABELS, "version"),
            (ENV_WORKLOAD_LABELS, "=v1"),
            (ENV_WORKLOAD_ADDR, "web:80"),
            (ENV_APP_ADDR, "localhost:8080"),
            (ENV_INBOUND_ADDR, "4143"),
        ] {
            let err = Config::from_env(&env(&[(name, value)])).unwrap_err();
            assert_eq!((err.name, err.value.as_str()), (name, value));
        }
    }

    #[test]
    fn registration_needs_the_inbound_listener() {
        let err = Config::from_env(&with_control_plane(&[(
            ENV_WORKLOAD_SERVICE,
            "web.default:80",
        )]))
        .unwrap_err();
        assert_eq!(err.name, ENV_WORKLOAD_SERVICE);
        assert!(err.reason.contains(ENV_APP_ADDR), "{err}");
        // Without a control plane nothing is registered, so nothing is missing.
        let cfg = Config::from_env(&env(&[(ENV_WORKLOAD_SERVICE, "web.default:80")])).unwrap();
        assert_eq!(cfg.registration(), None);
    }

    #[test]
    fn reads_connect_timeout_and_balancer_tunables() {
        let cfg = Config::from_env(&BTreeMap::new()).unwrap();
        assert_eq!(cfg.connect_timeout, Duration::from_secs(1));
        assert_eq!(cfg.balance, BalanceConfig::default());
        let cfg = Config::from_env(&env(&[
            (ENV_OUTBOUND_CONNECT_TIMEOUT, "250ms"),
            (ENV_BALANCER_DEFAULT_RTT, "10ms"),
            (ENV_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES, "3"),
            (ENV_FAILURE_ACCRUAL_MIN_BACKOFF, "100ms"),
            (ENV_FAILURE_ACCRUAL_MAX_BACKOFF, "2s"),
        ]))
        .unwrap();
        assert_eq!(cfg.connect_timeout, Duration::from_millis(250));
        assert_eq!(cfg.balance.default_rtt, Duration::from_millis(10));
        assert_eq!(cfg.balance.accrual.consecutive_failures, 3);
        assert_eq!(cfg.balance.accrual.max_backoff, Duration::from_secs(2));
        for (name, value) in [
            (ENV_OUTBOUND_CONNECT_TIMEOUT, "1"),
            (ENV_OUTBOUND_CONNECT_TIMEOUT, "0s"),
            (ENV_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES, "-1"),
            (ENV_FAILURE_ACCRUAL_MAX_BACKOFF, "10ms"),
        ] {
            let err = Config::from_env(&env(&[(name, value)])).unwrap_err();
            assert_eq!((err.name, err.value.as_str()), (name, value));
        }
    }

    #[test]
    fn rejects_a_bad_admin_addr() {
        let env = BTreeMap::from([(ENV_ADMIN_ADDR.to_string(), "localhost".to_string())]);
        let err = Config::from_env(&env).unwrap_err();
        assert_eq!(err.name, ENV_ADMIN_ADDR);
        assert_eq!(err.value, "localhost");
    }
}
