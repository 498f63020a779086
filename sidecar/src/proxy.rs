//! Assembling a whole proxy from its [`Config`]: the admin server, the outbound and inbound
//! listeners, the workload's identity, discovery and registration, wired together and started
//! on the current Tokio runtime.
//!
//! `mesh-proxy` is this plus signals and an exit code; tests start the same proxy in-process
//! with listeners on `127.0.0.1:0` and read back the addresses it bound. Start-up happens in
//! two steps so that a binary can tell bad configuration (exit 64) from a failure to run:
//! [`Proxy::new`] reads what the config points at (the static config file, the trust roots)
//! and fails only on bad configuration; [`Proxy::start`] binds the listeners and spawns the
//! tasks. [`RunningProxy::shutdown`] drains as on SIGTERM: out of readiness, deregistered, then
//! the listeners finish their requests in flight within [`DRAIN_TIMEOUT`].

use std::{
    borrow::Cow,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh_core::config::ConfigError;

use mesh_core::proxy_api::{StaticConfig, WorkloadRegistration};
use prometheus_client::registry::Registry;
use rustls::RootCertStore;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    admin::{Admin, Readiness},
    authz::Authz,
    config::Config,
    discovery::Discovery,
    drain::{self, DRAIN_TIMEOUT},
    identity::Certifier,
    inbound::Inbound,
    metrics::Metrics,
    outbound::{Outbound, Settings as OutboundSettings},
    registration::{DEREGISTER_TIMEOUT, Registrar, Registration, advertised_addr},
    tables::Tables,
    tls,
    trace::Tracing,
};

/// The configuration cannot be used: a binary exits 64 on it.
#[derive(Debug, thiserror::Error)]
pub enum BadConfig {
    /// A variable's value (the trust roots it names, for instance) cannot be used.
    #[error(transparent)]
    Env(#[from] ConfigError),
    /// The static config file cannot be read.
    #[error("reading config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The static config file is not a valid config; the error names the field.
    #[error("config file {path}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        #[source]
        source: serde_path_to_error::Error<serde_yaml::Error>,
    },
    /// The static config file is JSON but not a valid config; the error names the field.
    #[error("config file {path}")]
    ParseJsonFile {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        #[source]
        source: serde_path_to_error::Error<serde_json::Error>,
    },
    /// A route in the static config file does not compile.
    #[error("config file {path}")]
    Routes {
        /// The file.
        path: PathBuf,
        /// The route and what is wrong with it.
        #[source]
        source: mesh_core::routing::RouteRegexError,
    },
}

/// The proxy could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("binding {listener} to {addr}")]
    Bind {
        /// Which listener (`admin server`, `outbound listener`, `inbound listener`).
        listener: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control plane's identity cannot be derived: no workload identity is configured.
    #[error("the control plane's identity follows from MESH_PROXY_IDENTITY, which is not set")]
    ControlPlaneIdentity,
    /// TLS to the control plane cannot be configured.
    #[error("configuring TLS to the control plane")]
    ControlPlaneTls(#[source] rustls::Error),
    /// The control plane client cannot be built.
    #[error("building the control plane client")]
    ControlPlaneClient(#[source] reqwest::Error),
    /// A listener failed, or stopped serving on its own.
    #[error("{listener} failed")]
    Serve {
        /// Which listener.
        listener: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The span exporter cannot be built.
    #[error("starting tracing: {0}")]
    Tracing(String),
    /// A listener's task panicked or was cancelled.
    #[error("{listener} failed: its task ended abnormally")]
    Task {
        /// Which listener.
        listener: &'static str,
        /// The panic or cancellation.
        #[source]
        source: tokio::task::JoinError,
    },
}

const ADMIN: &str = "admin server";
const OUTBOUND: &str = "outbound listener";
const INBOUND: &str = "inbound listener";

/// A proxy ready to start: its configuration, with the files it names already read.
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    tables: Tables,
    roots: Option<Arc<RootCertStore>>,
}

impl Proxy {
    /// Reads the static config file and the trust roots `config` names. Errors here are bad
    /// configuration: they name the variable, or the file and the field.
    pub fn new(config: Config) -> Result<Self, BadConfig> {
        let tables = load_tables(&config)?;
        // Read up front: a missing or unreadable roots file is bad config, not a runtime failure.
        let roots = config
            .control_plane
            .as_ref()
            .map(|cp| cp.trust_roots.load())
            .transpose()?;
        Ok(Self {
            config,
            tables,
            roots,
        })
    }

    /// Binds the listeners and starts serving on the current runtime. The proxy runs until
    /// [`RunningProxy::shutdown`], or until the handle is dropped, which stops it at once.
    pub async fn start(self) -> Result<RunningProxy, ProxyError> {
        let Self {
            config,
            tables,
            roots,
        } = self;
        let Listeners {
            admin: admin_listener,
            outbound: outbound_listener,
            inbound: inbound_listener,
            addrs,
        } = Listeners::bind(&config)?;

        mesh_core::crypto::install_provider();
        // Resource labels are the registry's constant labels: written at scrape time, never
        // hashed or cloned per request.
        let mut registry = Registry::with_labels(
            config
                .resource_labels()
                .into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v))),
        );
        let mut metrics = Metrics::register(&mut registry);
        // Spans go out from a task of their own, never from a request's path.
        let tracer = match &config.trace {
            Some(trace) => {
                let resource = config.trace_resource();
                let (tracing, task) =
                    Tracing::start(trace, &resource, metrics.trace_dropped.clone())
                        .map_err(ProxyError::Tracing)?;
                metrics.trace = tracing;
                Some(task)
            }
            None => None,
        };
        let tracing = metrics.trace.clone();
        // The proxy's certificate, once the certifier has one; TLS to the control plane and to
        // peers reads it on every handshake.
        let (credentials_tx, credentials_rx) = watch::channel(None);
        let clients = control_plane_clients(&config, roots, &credentials_rx)?;
        let client = clients.as_ref().map(|(_, client, _)| client.clone());
        // The sender lives as long as the proxy: discovery (if any) publishes through it.
        let (tables_tx, tables_rx) = watch::channel(Arc::new(tables));
        let discovery = clients.as_ref().map(|(url, client, _)| {
            Discovery::new(
                url,
                client.clone(),
                credentials_rx.clone(),
                tables_tx.clone(),
            )
        });
        if let Some(d) = &discovery {
            for authority in &config.watch {
                d.watch_authority(authority);
            }
        }

        let certifier = config.certification().zip(clients.as_ref()).map(
            |((identity, token), (url, _, certify_client))| {
                Certifier::new(url, certify_client.clone(), identity, token, credentials_tx)
            },
        );
        let credentials = certifier.as_ref().map(Certifier::credentials);
        let registration = registration_target(&config, addrs, client);
        // Readiness goes Certifying (with an identity) -> Registering (with registration) ->
        // Ready: the workload is announced to peers only once it can serve them over mTLS.
        let after_certificate = match registration {
            Some(_) => Readiness::Registering,
            None => Readiness::Ready,
        };
        let (readiness_tx, readiness_rx) = watch::channel(match certifier {
            Some(_) => Readiness::Certifying,
            None => after_certificate,
        });
        let certifier = certifier
            .map(|certifier| tokio::spawn(certifier.run(readiness_tx.clone(), after_certificate)));
        let registration = registration.map(|(addr, client, workload)| {
            Registrar::new(&addr, client, workload, readiness_tx.clone()).spawn()
        });

        // The inbound port's policy: the configured default until the control plane answers.
        let (policy_tx, policy_rx) =
            watch::channel(Arc::new(config.inbound_default_policy.policy()));
        if let (Some(d), Some(target)) = (&discovery, config.policy_target()) {
            d.watch_policy(&target, policy_tx);
        }
        let authz = Authz::new(policy_rx, metrics.clone());

        let (drain_signal, drain_watch) = drain::channel();
        let mut admin = Admin::new(registry, tables_rx.clone())
            .with_readiness(readiness_rx)
            .with_tap(
                metrics.tap.clone(),
                crate::tap::Access {
                    token_file: config.tap_token_file.clone(),
                    token_sha256: config.tap_token_sha256.clone(),
                },
            );
        if inbound_listener.is_some() {
            admin = admin.with_authz(authz.clone());
        }
        if let Some(c) = &credentials {
            admin = admin.with_identity(c.clone());
        }
        // The admin server keeps answering probes and scrapes while the listeners drain.
        let admin = tokio::spawn(Arc::new(admin).serve(admin_listener));
        let settings = OutboundSettings {
            connect_timeout: Some(config.connect_timeout),
            balance: config.balance,
        };
        let mut outbound = Outbound::with_settings(tables_rx, metrics.clone(), discovery, settings)
            .with_transparency(
                config.outbound_detect_timeout,
                config.outbound_opaque_ports.clone(),
            )
            .with_limits(config.limits);
        if let Some(c) = &credentials {
            outbound = outbound.with_identity(c.clone());
        }
        let outbound = Arc::new(outbound);
        let outbound_proxy = outbound.clone();
        let outbound = tokio::spawn(outbound.serve(outbound_listener, drain_watch.clone()));
        let inbound = match (inbound_listener, config.app_addr) {
            (Some(listener), Some(app)) => {
                let service = config.workload.service.as_ref();
                let mut inbound = Inbound::new(app, service, metrics)
                    .with_detect_timeout(config.detect_timeout)
                    .with_opaque_ports(config.inbound_opaque_ports.clone())
                    .with_limits(config.limits)
                    .with_authz(authz);
                if let Some(c) = credentials {
                    inbound = inbound.with_identity(c);
                }
                Some(tokio::spawn(
                    Arc::new(inbound).serve(listener, drain_watch.clone()),
                ))
            }
            _ => None,
        };

        Ok(RunningProxy {
            addrs,
            outbound: outbound_proxy,
            drain_watch,
            readiness: readiness_tx,
            registration,
            drain: drain_signal,
            tasks: Tasks {
                admin,
                outbound,
                inbound,
                certifier,
                tracer,
            },
            tracing,
        })
    }
}

/// Where a running proxy's listeners are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    /// The admin server.
    pub admin: SocketAddr,
    /// The outbound listener.
    pub outbound: SocketAddr,
    /// The inbound listener, when the proxy fronts an app.
    pub inbound: Option<SocketAddr>,
}

/// A started proxy. Dropping it stops the proxy at once, as a kill would (also when it is
/// dropped in the middle of [`RunningProxy::shutdown`]); `shutdown` stops it gracefully.
#[derive(Debug)]
pub struct RunningProxy {
    addrs: Addrs,
    outbound: Arc<Outbound>,
    drain_watch: drain::Watch,
    readiness: watch::Sender<Readiness>,
    registration: Option<Registration>,
    drain: drain::Signal,
    tasks: Tasks,
    /// Flushed once the listeners have drained, so the last requests' spans go out.
    tracing: Tracing,
}

#[derive(Debug)]
struct Tasks {
    admin: JoinHandle<std::io::Result<()>>,
    outbound: JoinHandle<std::io::Result<()>>,
    inbound: Option<JoinHandle<std::io::Result<()>>>,
    certifier: Option<JoinHandle<()>>,
    tracer: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// The bound addresses (the kernel's choice where the config said port 0).
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The outbound proxy, to hand it connections accepted elsewhere with their original
    /// destination ([`Outbound::serve_connection`]): how a redirected connection is served can
    /// be driven without iptables. The drain watch goes with it.
    pub fn outbound(&self) -> (Arc<Outbound>, drain::Watch) {
        (self.outbound.clone(), self.drain_watch.clone())
    }

    /// Resolves when a listener stops serving on its own, which ends the proxy's usefulness,
    /// with the error that stopped it; a healthy proxy never resolves it. Cancel-safe, so a
    /// binary can wait for it and for a stop signal at once, and drain with
    /// [`RunningProxy::shutdown`] after the signal. Once it has resolved, drop the proxy.
    pub async fn stopped(&mut self) -> Result<(), ProxyError> {
        let Tasks {
            admin,
            outbound,
            inbound,
            ..
        } = &mut self.tasks;
        let has_inbound = inbound.is_some();
        let inbound = async {
            match inbound.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = admin => served(ADMIN, res),
            res = outbound => served(OUTBOUND, res),
            res = inbound, if has_inbound => served(INBOUND, res),
        }
    }

    /// Stops gracefully: `/ready` turns 503, the workload is deregistered (so peers stop
    /// choosing it), the listeners stop accepting and finish their requests in flight within
    /// [`DRAIN_TIMEOUT`], and the admin server stops last.
    pub async fn shutdown(mut self) -> Result<(), ProxyError> {
        // Out of the route first, so peers stop choosing this workload while it drains.
        self.readiness.send_replace(Readiness::Draining);
        if let Some(registration) = self.registration.take() {
            match tokio::time::timeout(DEREGISTER_TIMEOUT, registration.deregister()).await {
                Ok(Ok(Some(lease))) => tracing::info!(%lease, "workload deregistered"),
                Ok(Ok(None)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "deregistering failed; the lease will expire");
                }
                Err(_) => tracing::warn!("deregistering timed out; the lease will expire"),
            }
        }
        self.drain.drain();
        let Tasks {
            outbound, inbound, ..
        } = &mut self.tasks;
        let drained = async {
            let inbound = async {
                match inbound.as_mut() {
                    Some(t) => t.await,
                    None => Ok(Ok(())),
                }
            };
            let (outbound, inbound) = tokio::join!(outbound, inbound);
            served(OUTBOUND, outbound)?;
            served(INBOUND, inbound)
        };
        let res = match tokio::time::timeout(DRAIN_TIMEOUT, drained).await {
            Ok(res) => res,
            Err(_) => {
                tracing::warn!(
                    timeout = ?DRAIN_TIMEOUT,
                    "requests still in flight after the drain timeout; exiting anyway"
                );
                Ok(())
            }
        };
        self.tracing.flush().await;
        res
        // Dropping `self` here stops the admin server and the certifier.
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let Tasks {
            admin,
            outbound,
            inbound,
            certifier,
            tracer,
        } = &self.tasks;
        admin.abort();
        outbound.abort();
        if let Some(t) = inbound {
            t.abort();
        }
        if let Some(t) = certifier {
            t.abort();
        }
        if let Some(t) = tracer {
            t.abort();
        }
    }
}

/// The bound listeners; the inbound one only when the proxy fronts an app.
struct Listeners {
    admin: TcpListener,
    outbound: TcpListener,
    inbound: Option<TcpListener>,
    addrs: Addrs,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Self, ProxyError> {
        let admin = bind(ADMIN, config.admin_addr)?;
        let outbound = bind(OUTBOUND, config.outbound_addr)?;
        let inbound = match config.app_addr {
            Some(_) => Some(bind(INBOUND, config.inbound_addr)?),
            None => None,
        };
        let addrs = Addrs {
            admin: local_addr(ADMIN, &admin)?,
            outbound: local_addr(OUTBOUND, &outbound)?,
            inbound: match &inbound {
                Some(l) => Some(local_addr(INBOUND, l)?),
                None => None,
            },
        };
        Ok(Self {
            admin,
            outbound,
            inbound,
            addrs,
        })
    }
}

/// The control plane's URL, the client for discovery and registration, and the client for
/// certify; `None` without a control plane.
///
/// Control-plane calls go over mTLS. A connection's client certificate is fixed at its
/// handshake, so certify (which runs before there is a certificate) has a client of its own;
/// discovery streams and registration share the other's HTTP/2 connection, opened only once a
/// certificate is held, and presenting it.
fn control_plane_clients(
    config: &Config,
    roots: Option<Arc<RootCertStore>>,
    credentials: &crate::identity::SharedCredentials,
) -> Result<Option<(String, reqwest::Client, reqwest::Client)>, ProxyError> {
    let (Some(cp), Some(roots)) = (&config.control_plane, roots) else {
        return Ok(None);
    };
    let expected = config
        .control_plane_identity()
        .ok_or(ProxyError::ControlPlaneIdentity)?;
    let tls = tls::control_plane_config(credentials, roots, &expected)
        .map_err(ProxyError::ControlPlaneTls)?;
    let client = || {
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .http2_prior_knowledge()
            .build()
            .map_err(ProxyError::ControlPlaneClient)
    };
    Ok(Some((cp.url.clone(), client()?, client()?)))
}

/// How many connections a listener's kernel queue holds, handshake done, before the proxy
/// accepts them (Linux caps it at `net.core.somaxconn`, 4,096 by default). tokio's own
/// `TcpListener::bind` asks for 128: the SYNs of a burst past that are dropped and each of
/// those clients waits a one-second retransmit: 4,000 slowloris connections, opened 500 at a
/// time, took 8-9 s to reach a debug build of the proxy with 128, and 0.4-0.6 s with 1,024
/// (`tests/hostile.rs`). nginx asks for 511, Go for `somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As tokio's own bind: a restarted proxy rebinds its port while old connections linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ProxyError::Bind {
        listener,
        addr,
        source,
    })
}

fn local_addr(listener: &'static str, l: &TcpListener) -> Result<SocketAddr, ProxyError> {
    l.local_addr()
        .map_err(|source| ProxyError::Serve { listener, source })
}

/// How a listener's task ended.
fn served(
    listener: &'static str,
    res: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), ProxyError> {
    match res {
        Ok(res) => res.map_err(|source| ProxyError::Serve { listener, source }),
        Err(source) => Err(ProxyError::Task { listener, source }),
    }
}

/// Reads the static config file, if one is set; errors name the file and the field.
fn load_tables(config: &Config) -> Result<Tables, BadConfig> {
    let Some(path) = &config.config_file else {
        return Ok(Tables::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| BadConfig::ReadFile {
        path: path.clone(),
        source,
    })?;
    let parsed = parse_static_config(&text, path)?;
    drop(text);
    let tables = Tables::from_config(parsed).map_err(|source| BadConfig::Routes {
        path: path.clone(),
        source,
    })?;
    // The config's names are decoded and shared; what discovery decodes later need not be
    // shared with them, and the set that found them is freed.
    mesh_core::Name::release_interned();
    Ok(tables)
}

/// Parses a static config, YAML or JSON. JSON (what generators write; YAML takes it too) is
/// read by serde_json: the YAML reader first turns the whole document into a list of events,
/// which for 10,000 routes and endpoints peaked at 50 MB and left the heap fragmented, the
/// proxy's RSS three times its live data. Text that starts like JSON but is not JSON (YAML's
/// flow style) is read as YAML.
fn parse_static_config(text: &str, path: &Path) -> Result<StaticConfig, BadConfig> {
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        match serde_path_to_error::deserialize(&mut de) {
            // Anything after the object is not JSON; the YAML reader says what is wrong.
            Ok(parsed) if de.end().is_ok() => return Ok(parsed),
            Err(e) if e.inner().classify() == serde_json::error::Category::Data => {
                return Err(BadConfig::ParseJsonFile {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|source| BadConfig::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

/// What to register, where and with which client, when registration is configured.
fn registration_target(
    config: &Config,
    addrs: Addrs,
    client: Option<reqwest::Client>,
) -> Option<(String, reqwest::Client, WorkloadRegistration)> {
    let service = config.registration()?;
    // `Config` refuses registration without an app, so the inbound listener is bound here.
    let addr = config
        .workload
        .addr
        .or_else(|| addrs.inbound.map(advertised_addr))?;
    // Scrapers reach the admin server where peers reach the workload: a wildcard bind is
    // advertised on the registered address's host.
    let admin_addr = if addrs.admin.ip().is_unspecified() {
        SocketAddr::new(addr.ip(), addrs.admin.port())
    } else {
        addrs.admin
    };
    Some((
        config.control_plane.as_ref()?.url.clone(),
        client?,
        WorkloadRegistration {
            service: service.clone(),
            addr,
            identity: config.workload.identity.clone(),
            labels: config.workload.labels.clone(),
            admin_addr: Some(admin_addr),
            deployment: config.workload.deployment.clone(),
            pod: config.workload.pod.clone(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Config {
        let env: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        Config::from_env(&env).unwrap()
    }

    #[tokio::test]
    async fn a_proxy_on_port_0_reports_its_addresses_and_drains_on_shutdown() {
        let proxy = Proxy::new(config(&[
            ("MESH_PROXY_ADMIN_ADDR", "127.0.0.1:0"),
            ("MESH_PROXY_OUTBOUND_ADDR", "127.0.0.1:0"),
        ]))
        .unwrap()
        .start()
        .await
        .unwrap();
        let addrs = proxy.addrs();
        assert_ne!(addrs.admin.port(), 0);
        assert_ne!(addrs.outbound.port(), 0);
        assert_eq!(addrs.inbound, None, "no app, no inbound listener");
        tokio::net::TcpStream::connect(addrs.outbound)
            .await
            .unwrap();
        proxy.shutdown().await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(addrs.outbound)
                .await
                .is_err(),
            "the outbound listener is closed after the drain"
        );
    }

    /// A burst of connections the proxy has not accepted yet waits in the kernel's queue
    /// instead of losing its SYNs (with tokio's default backlog only 129 of 600 get in).
    #[tokio::test]
    async fn a_listener_holds_a_burst_of_600_handshakes_before_accepting_any() {
        let listener = bind(OUTBOUND, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(mesh_test_support::handshakes_held(addr, 600).await, 600);
    }

    #[test]
    fn a_missing_config_file_is_bad_config_naming_the_file() {
        let error =
            Proxy::new(config(&[("MESH_PROXY_CONFIG", "/no/such/routes.yaml")])).unwrap_err();
        assert!(matches!(error, BadConfig::ReadFile { .. }), "{error:?}");
        assert!(
            error.to_string().contains("/no/such/routes.yaml"),
            "{error}"
        );
    }

    #[test]
    fn a_static_config_is_read_as_json_or_as_yaml_and_a_bad_json_field_is_named() {
        let path = Path::new("routes.json");
        let json = r#"{"routes": [{"parent": "web.default:80", "rules": [{"name": "all",
            "backends": [{"service": "web-v1.default:80", "weight": 100}]}]}],
            "endpoints": [{"service": "web-v1.default:80",
            "endpoints": [{"addr": "10.0.0.1:8080"}]}]}"#;
        let parsed = parse_static_config(json, path).unwrap();
        assert_eq!(parsed.routes.len(), 1);
        assert_eq!(parsed.endpoints[0].endpoints[0].addr.port(), 8080);

        // YAML's flow style starts like JSON and is still YAML.
        let flow = "{routes: [], endpoints: [{service: web-v1.default:80, endpoints: []}]}";
        let parsed = parse_static_config(flow, path).unwrap();
        assert_eq!(parsed.endpoints.len(), 1);

        let bad = r#"{"routes": [], "endpoints": [{"service": "web-v1.default:80",
            "endpoints": [{"addr": "nowhere"}]}]}"#;
        let error = parse_static_config(bad, path).unwrap_err();
        assert!(
            matches!(error, BadConfig::ParseJsonFile { .. }),
            "{error:?}"
        );
        let why = format!("{:#}", anyhow::Error::from(error));
        assert!(why.contains("routes.json"), "{why}");
        assert!(why.contains("endpoints[0].endpoints[0].addr"), "{why}");
    }
}
