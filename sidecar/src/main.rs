//! `mesh-proxy`: parses `MESH_PROXY_*` configuration and runs the proxy until SIGTERM or
//! Ctrl-C, then deregisters the workload, drains its listeners and exits 0.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use anyhow::Context;
use mesh_core::proxy_api::{StaticConfig, WorkloadRegistration};
use mesh_core::{
    Listening,
    config::{EXIT_CONFIG, ProcessEnv},
};
use mesh_sidecar::{
    admin::{Admin, Readiness},
    config::Config,
    discovery::Discovery,
    drain::{self, DRAIN_TIMEOUT},
    identity::Certifier,
    inbound::Inbound,
    metrics::Metrics,
    outbound::{Outbound, Settings as OutboundSettings},
    registration::{DEREGISTER_TIMEOUT, Registrar, advertised_addr},
    tables::Tables,
    tls,
};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut config = match Config::from_env(&ProcessEnv) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(file)) => config.config_file = Some(file.into()),
            _ => {
                tracing::error!("usage: mesh-proxy [--config FILE]; got {arg:?}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let tables = match load_tables(&config) {
        Ok(tables) => tables,
        Err(error) => {
            tracing::error!("{error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Read up front: a missing or unreadable roots file is bad config, not a runtime failure.
    let roots = match config
        .control_plane
        .as_ref()
        .map(|cp| cp.trust_roots.load())
    {
        None => None,
        Some(Ok(roots)) => Some(roots),
        Some(Err(error)) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(config, tables, roots)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the static config file, if one is set; errors name the file and the field.
fn load_tables(config: &Config) -> anyhow::Result<Tables> {
    let Some(path) = &config.config_file else {
        return Ok(Tables::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    let parsed: StaticConfig = serde_path_to_error::deserialize(de)
        .with_context(|| format!("config file {}", path.display()))?;
    Tables::from_config(&parsed).with_context(|| format!("config file {}", path.display()))
}

fn announce(name: &str, addr: std::net::SocketAddr) {
    #[allow(
        clippy::print_stdout,
        reason = "the start-up announcement goes to stdout"
    )]
    {
        println!("{}", Listening::new(name, addr));
    }
}

async fn run(
    config: Config,
    tables: Tables,
    roots: Option<Arc<rustls::RootCertStore>>,
) -> anyhow::Result<()> {
    // Installed before any listener is announced, so a supervisor that stops the proxy right
    // after start-up still gets a drain rather than the default action of the signal.
    let mut stop = StopSignal::install().context("installing signal handlers")?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding admin server to {}", config.admin_addr))?;
    let outbound_listener = tokio::net::TcpListener::bind(config.outbound_addr)
        .await
        .with_context(|| format!("binding outbound listener to {}", config.outbound_addr))?;
    let inbound_listener = match config.app_addr {
        Some(_) => Some(
            tokio::net::TcpListener::bind(config.inbound_addr)
                .await
                .with_context(|| format!("binding inbound listener to {}", config.inbound_addr))?,
        ),
        None => None,
    };
    announce("admin", admin_listener.local_addr()?);
    announce("outbound", outbound_listener.local_addr()?);
    let inbound_bound = match &inbound_listener {
        Some(l) => {
            let addr = l.local_addr()?;
            announce("inbound", addr);
            Some(addr)
        }
        None => None,
    };

    // One crypto stack: anything using rustls without naming a provider gets ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    // The proxy's certificate, once the certifier has one; TLS to the control plane and to peers
    // reads it on every handshake.
    let (credentials_tx, credentials_rx) = tokio::sync::watch::channel(None);
    // Control-plane calls go over mTLS. A connection's client certificate is fixed at its
    // handshake, so certify (which runs before there is a certificate) has a client of its own;
    // discovery streams and registration share the other's HTTP/2 connection, opened only once
    // a certificate is held, and presenting it.
    let clients = match (&config.control_plane, roots) {
        (Some(cp), Some(roots)) => {
            let expected = config
                .control_plane_identity()
                .context("the control plane's identity follows from MESH_PROXY_IDENTITY")?;
            let tls = tls::control_plane_config(&credentials_rx, roots, &expected)
                .context("configuring TLS to the control plane")?;
            let client = || {
                reqwest::Client::builder()
                    .tls_backend_preconfigured(tls.clone())
                    .http2_prior_knowledge()
                    .build()
                    .context("building the control plane client")
            };
            Some((cp.url.clone(), client()?, client()?))
        }
        _ => None,
    };
    let client = clients.as_ref().map(|(_, client, _)| client.clone());
    // The sender lives as long as the process: discovery (if any) publishes through it.
    let (tables_tx, tables_rx) = tokio::sync::watch::channel(Arc::new(tables));
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
    let registration = registration_target(&config, inbound_bound, client);
    // Readiness goes Certifying (with an identity) -> Registering (with registration) -> Ready:
    // the workload is announced to peers only once it can serve them over mTLS.
    let after_certificate = match registration {
        Some(_) => Readiness::Registering,
        None => Readiness::Ready,
    };
    let (readiness_tx, readiness_rx) = tokio::sync::watch::channel(match certifier {
        Some(_) => Readiness::Certifying,
        None => after_certificate,
    });
    if let Some(certifier) = certifier {
        tokio::spawn(certifier.run(readiness_tx.clone(), after_certificate));
    }
    let registration = registration.map(|(addr, client, workload)| {
        Registrar::new(&addr, client, workload, readiness_tx.clone()).spawn()
    });

    // The inbound port's policy: the configured default until the control plane answers.
    let (policy_tx, policy_rx) =
        tokio::sync::watch::channel(Arc::new(config.inbound_default_policy.policy()));
    if let (Some(d), Some(target)) = (&discovery, config.policy_target()) {
        d.watch_policy(&target, policy_tx);
    }
    let authz = mesh_sidecar::authz::Authz::new(policy_rx, metrics.clone());

    let (drain_signal, drain_watch) = drain::channel();
    let mut admin = Admin::new(registry, tables_rx.clone()).with_readiness(readiness_rx);
    if inbound_bound.is_some() {
        admin = admin.with_authz(authz.clone());
    }
    if let Some(c) = &credentials {
        admin = admin.with_identity(c.clone());
    }
    let admin = Arc::new(admin);
    // The admin server keeps answering probes and scrapes while the listeners drain.
    let mut admin_task = tokio::spawn(admin.serve(admin_listener));
    let settings = OutboundSettings {
        connect_timeout: Some(config.connect_timeout),
        balance: config.balance,
    };
    let mut outbound = Outbound::with_settings(tables_rx, metrics.clone(), discovery, settings);
    if let Some(c) = &credentials {
        outbound = outbound.with_identity(c.clone());
    }
    let outbound = Arc::new(outbound);
    let mut outbound_task = tokio::spawn(outbound.serve(outbound_listener, drain_watch.clone()));
    let mut inbound_task = tokio::spawn(async move {
        match (inbound_listener, config.app_addr) {
            (Some(listener), Some(app)) => {
                let service = config.workload.service.as_ref();
                let mut inbound = Inbound::new(app, service, metrics)
                    .with_detect_timeout(config.detect_timeout)
                    .with_authz(authz);
                if let Some(c) = credentials {
                    inbound = inbound.with_identity(c);
                }
                Arc::new(inbound).serve(listener, drain_watch).await
            }
            _ => Ok(()),
        }
    });

    tokio::select! {
        res = &mut admin_task => return flatten(res).context("admin server failed"),
        res = &mut outbound_task => return flatten(res).context("outbound listener failed"),
        res = &mut inbound_task, if inbound_bound.is_some() => {
            return flatten(res).context("inbound listener failed");
        }
        signal = stop.recv() => tracing::info!(signal, "shutting down"),
    }

    // Out of the route first, so peers stop choosing this workload while it drains.
    readiness_tx.send_replace(Readiness::Draining);
    if let Some(registration) = registration {
        match tokio::time::timeout(DEREGISTER_TIMEOUT, registration.deregister()).await {
            Ok(Ok(Some(lease))) => tracing::info!(%lease, "workload deregistered"),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "deregistering failed; the lease will expire"),
            Err(_) => tracing::warn!("deregistering timed out; the lease will expire"),
        }
    }
    drain_signal.drain();
    let drained = async {
        let (outbound, inbound) = tokio::join!(outbound_task, inbound_task);
        flatten(outbound).context("outbound listener failed")?;
        flatten(inbound).context("inbound listener failed")
    };
    tokio::select! {
        res = tokio::time::timeout(DRAIN_TIMEOUT, drained) => match res {
            Ok(res) => res?,
            Err(_) => tracing::warn!(
                timeout = ?DRAIN_TIMEOUT,
                "requests still in flight after the drain timeout; exiting anyway"
            ),
        },
        // A second signal skips the rest of the drain.
        signal = stop.recv() => tracing::warn!(signal, "stopping without finishing the drain"),
    }
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}

/// What to register, where and with which client, when registration is configured.
fn registration_target(
    config: &Config,
    inbound: Option<SocketAddr>,
    client: Option<reqwest::Client>,
) -> Option<(String, reqwest::Client, WorkloadRegistration)> {
    let service = config.registration()?;
    // `Config` refuses registration without an app, so the inbound listener is bound here.
    let addr = config
        .workload
        .addr
        .or_else(|| inbound.map(advertised_addr))?;
    Some((
        config.control_plane.as_ref()?.url.clone(),
        client?,
        WorkloadRegistration {
            service: service.clone(),
            addr,
            identity: config.workload.identity.clone(),
            labels: config.workload.labels.clone(),
        },
    ))
}

/// A task's result with its panic or cancellation folded into the error.
fn flatten(res: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.context("task ended abnormally")?.map_err(Into::into)
}

/// SIGTERM (how supervisors and Kubernetes stop a process) and Ctrl-C.
struct StopSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// The next stop signal's name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
