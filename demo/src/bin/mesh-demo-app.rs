//! `mesh-demo-app`: parses flags (or their `DEMO_*`/`PORT` variables) and runs the demo app.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, error::ErrorKind};
use mesh_core::Listening;
use mesh_demo::app::{AppArgs, AppConfig, DemoApp};

fn main() -> ExitCode {
    init_tracing();
    let config = match AppConfig::try_from(AppArgs::parse()) {
        Ok(config) => config,
        // The same message shape and exit code (2) as clap's own flag errors.
        Err(error) => AppArgs::command()
            .error(ErrorKind::ValueValidation, error)
            .exit(),
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

async fn run(config: AppConfig) -> anyhow::Result<()> {
    let shutdown = mesh_demo::shutdown_signal().context("installing signal handlers")?;
    let app = DemoApp::bind(config).await?;
    let addr = app.local_addr().context("reading the bound address")?;
    #[allow(
        clippy::print_stdout,
        reason = "the start-up announcement goes to stdout"
    )]
    {
        println!("{}", Listening::new("http", addr));
    }
    app.serve(shutdown).await;
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
