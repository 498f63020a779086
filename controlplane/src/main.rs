//! `mesh-controlplane`: opens the state directory, binds the resource API and the proxy API,
//! announces both, and serves until stopped.

use std::process::ExitCode;

use anyhow::Context;
use mesh_controlplane::{ControlPlane, config::Config};
use mesh_core::{Listening, config::ProcessEnv};
use tokio::net::TcpListener;

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary talks to its supervisor"
)]
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-controlplane: {e}");
            return ExitCode::from(mesh_core::config::EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-controlplane: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-controlplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(
    clippy::print_stdout,
    reason = "announcements go to stdout by contract"
)]
async fn run(config: Config) -> anyhow::Result<()> {
    let control_plane = ControlPlane::open(&config)?;
    let api = TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("binding the resource API on {}", config.api_addr))?;
    let proxy = TcpListener::bind(config.proxy_addr)
        .await
        .with_context(|| format!("binding the proxy API on {}", config.proxy_addr))?;
    println!("{}", Listening::new("api", api.local_addr()?));
    println!("{}", Listening::new("proxy", proxy.local_addr()?));
    tracing::info!(
        state_dir = %config.state_dir.display(),
        resource_version = control_plane.store().resource_version(),
        "control plane started"
    );
    tokio::select! {
        () = control_plane.serve(api, proxy) => Ok(()),
        r = tokio::signal::ctrl_c() => r.context("waiting for a signal"),
        () = terminate() => Ok(()),
    }
}

async fn terminate() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await;
}
