//! `mesh-proxy`: parses `MESH_PROXY_*` configuration and runs the proxy until SIGTERM or
//! Ctrl-C, then deregisters the workload, drains its listeners and exits 0.

use std::process::ExitCode;

use anyhow::Context;
use mesh_core::{
    Listening,
    config::{EXIT_CONFIG, ProcessEnv},
};
use mesh_sidecar::{
    config::Config,
    proxy::{Proxy, RunningProxy},
    runtime,
};

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
    let proxy = match Proxy::new(config) {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!("{:#}", anyhow::Error::from(error));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cores = match runtime::cores(&ProcessEnv, runtime::available()) {
        Ok(cores) => cores,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let flavor = runtime::Flavor::for_cores(cores);
    tracing::debug!(%flavor, "runtime");
    let result = runtime::build(flavor)
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(proxy)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
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

async fn run(proxy: Proxy) -> anyhow::Result<()> {
    // Installed before any listener is announced, so a supervisor that stops the proxy right
    // after start-up still gets a drain rather than the default action of the signal.
    let mut stop = StopSignal::install().context("installing signal handlers")?;
    let mut proxy: RunningProxy = proxy.start().await?;
    let addrs = proxy.addrs();
    announce("admin", addrs.admin);
    announce("outbound", addrs.outbound);
    if let Some(inbound) = addrs.inbound {
        announce("inbound", inbound);
    }

    tokio::select! {
        res = proxy.stopped() => return res.map_err(Into::into),
        signal = stop.recv() => tracing::info!(signal, "shutting down"),
    }
    tokio::select! {
        res = proxy.shutdown() => res?,
        // A second signal skips the rest of the drain.
        signal = stop.recv() => tracing::warn!(signal, "stopping without finishing the drain"),
    }
    tracing::info!("stopped");
    Ok(())
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
