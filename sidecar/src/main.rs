//! `mesh-proxy`: parses `MESH_PROXY_*` configuration and runs the proxy.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use mesh_core::proxy_api::StaticConfig;
use mesh_core::{
    Listening,
    config::{EXIT_CONFIG, ProcessEnv},
};
use mesh_sidecar::{
    admin::Admin, config::Config, discovery::Discovery, metrics::Metrics, outbound::Outbound,
    tables::Tables,
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
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(config, tables)));
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

async fn run(config: Config, tables: Tables) -> anyhow::Result<()> {
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding admin server to {}", config.admin_addr))?;
    let outbound_listener = tokio::net::TcpListener::bind(config.outbound_addr)
        .await
        .with_context(|| format!("binding outbound listener to {}", config.outbound_addr))?;
    announce("admin", admin_listener.local_addr()?);
    announce("outbound", outbound_listener.local_addr()?);

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    // The sender lives as long as the process: discovery (if any) publishes through it.
    let (tables_tx, tables_rx) = tokio::sync::watch::channel(Arc::new(tables));
    let discovery = config.control_plane.as_ref().map(|addr| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap_or_default();
        Discovery::new(addr, client, tables_tx.clone())
    });
    if let Some(d) = &discovery {
        for authority in &config.watch {
            d.watch_authority(authority);
        }
    }
    let admin = Arc::new(Admin::new(registry, tables_rx.clone()));
    let outbound = Arc::new(Outbound::new(tables_rx, metrics, discovery));
    tokio::select! {
        res = admin.serve(admin_listener) => res.context("admin server failed"),
        res = outbound.serve(outbound_listener) => res.context("outbound listener failed"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}
