//! `mesh-proxy`: parses `MESH_PROXY_*` configuration and runs the proxy.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use mesh_core::{
    Listening,
    config::{EXIT_CONFIG, ProcessEnv},
};
use mesh_sidecar::{admin::Admin, config::Config};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_env(&ProcessEnv) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding admin server to {}", config.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    #[allow(
        clippy::print_stdout,
        reason = "the start-up announcement goes to stdout"
    )]
    {
        println!("{}", Listening::new("admin", admin_addr));
    }
    tracing::info!(%admin_addr, "admin server listening");

    let admin = Arc::new(Admin::new(Registry::default()));
    tokio::select! {
        res = admin.serve(listener) => res.context("admin server failed"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}
