//! `mesh-loadgen`: parses flags and sends open-loop load, printing one report line per interval
//! on stdout and a final summary.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use mesh_demo::loadgen::{Loadgen, LoadgenArgs};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = LoadgenArgs::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let shutdown = mesh_demo::shutdown_signal().context("installing signal handlers")?;
    let loadgen = Loadgen::new(args).context("building the HTTP client")?;
    loadgen
        .run(&mut std::io::stdout(), shutdown)
        .await
        .context("writing reports to stdout")?;
    Ok(())
}
