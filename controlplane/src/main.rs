//! `mesh-controlplane`: opens the state directory, binds the resource API and the proxy API,
//! announces both, and serves until stopped.

use std::process::ExitCode;

use anyhow::Context;
use mesh_controlplane::{
    ControlPlane,
    config::{Config, ENV_INJECTOR_ADDR},
};
use mesh_core::{
    Listening,
    config::{Env, ProcessEnv},
};

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
    // The process's one TLS provider, chosen before any client is built: the HTTP clients that
    // scrape and tap the proxies take the process default.
    mesh_core::crypto::install_provider();
    let config = match Config::from_env(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-controlplane: {e}");
            return ExitCode::from(mesh_core::config::EXIT_CONFIG);
        }
    };
    let cores =
        match ProcessEnv.parse::<std::num::NonZeroUsize>(mesh_controlplane::config::ENV_CORES) {
            Ok(cores) => cores,
            Err(e) => {
                eprintln!("mesh-controlplane: {e}");
                return ExitCode::from(mesh_core::config::EXIT_CONFIG);
            }
        };
    let mut builder = match cores {
        Some(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.get());
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
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
    let api = mesh_controlplane::http::listen(config.api_addr)
        .with_context(|| format!("binding the resource API on {}", config.api_addr))?;
    let proxy = mesh_controlplane::http::listen(config.proxy_addr)
        .with_context(|| format!("binding the proxy API on {}", config.proxy_addr))?;
    let (api_addr, proxy_addr) = (api.local_addr()?, proxy.local_addr()?);
    tracing::info!(
        state_dir = %config.state_dir.display(),
        resource_version = control_plane.store().resource_version(),
        trust_roots = %control_plane.trust_roots_file().display(),
        "control plane started; the proxy API is served over mTLS, verify it with the trust roots"
    );
    let injector = injector(
        &config,
        control_plane.trust_roots_pem(),
        control_plane.tap_token(),
    )
    .await?;
    // In a cluster, the Kubernetes API is the store, and discovery comes from it (HTTPRoutes,
    // Services, EndpointSlices, Pods) instead of workload registrations.
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = if config
        .kubernetes
    {
        let client = kube::Client::try_default()
            .await
            .context("MESH_CONTROLPLANE_KUBERNETES: no in-cluster config or kubeconfig")?;
        tracing::info!("discovery from the Kubernetes API");
        Box::pin(control_plane.serve_kubernetes(client, config.trust_domain.clone(), api, proxy))
    } else {
        Box::pin(control_plane.serve(api, proxy))
    };
    // Announced once serving has left the pointer to the API token (both `serve` calls leave it
    // before they return): a `mesh` asked at once must not find an earlier control plane's
    // pointer for the same port.
    println!("{}", Listening::new("api", api_addr));
    println!("{}", Listening::new("proxy", proxy_addr));
    tokio::select! {
        () = serving => Ok(()),
        () = injector => Ok(()),
        r = tokio::signal::ctrl_c() => r.context("waiting for a signal"),
        () = terminate() => Ok(()),
    }
}

/// The proxy-injector webhook, when configured (`config.injector`; in a cluster, as
/// `mesh install` configures it): HTTPS with `tls.crt`/`tls.key` from its TLS directory,
/// injecting the configured proxy and init images with the CA's trust roots, reading namespaces
/// through the in-cluster API.
#[allow(
    clippy::print_stdout,
    reason = "announcements go to stdout by contract"
)]
async fn injector(
    config: &Config,
    trust_roots_pem: &str,
    tap_token: &str,
) -> anyhow::Result<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
    use mesh_controlplane::{inject::InjectConfig, injector};
    let Some(settings) = &config.injector else {
        return Ok(Box::pin(std::future::pending()));
    };
    let read = |f: &str| {
        let path = settings.tls_dir.join(f);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tls =
        injector::tls_config(&read("tls.crt")?, &read("tls.key")?).map_err(anyhow::Error::msg)?;
    let defaults = InjectConfig::default();
    let inject = InjectConfig {
        proxy_image: settings
            .proxy_image
            .clone()
            .unwrap_or(defaults.proxy_image.clone()),
        init_image: settings
            .init_image
            .clone()
            .unwrap_or(defaults.init_image.clone()),
        trust_domain: config.trust_domain.clone(),
        // Injected proxies verify the proxy API with the CA's roots, given up front.
        trust_roots_pem: trust_roots_pem.to_string(),
        // Injected proxies admit taps from this control plane only: they hold the token's
        // digest, never the token.
        tap_token_sha256: Some(mesh_core::tap::token_sha256(tap_token)),
        trace_collector: settings.trace_collector.clone(),
        trace_sampling: settings.trace_sampling.clone(),
        ..defaults
    };
    let listener = mesh_controlplane::http::listen(settings.addr)
        .with_context(|| format!("{ENV_INJECTOR_ADDR}: binding {}", settings.addr))?;
    let client = kube::Client::try_default()
        .await
        .context("the injector needs the Kubernetes API (in-cluster config or a kubeconfig)")?;
    // An API server that cannot say its version gets the layout every release accepts.
    let layout = match injector::proxy_layout(&client).await {
        Ok(layout) => layout,
        Err(error) => {
            tracing::warn!(%error, "reading the API server's version; injecting the proxy as a plain container");
            mesh_controlplane::inject::ProxyLayout::Container
        }
    };
    tracing::info!(?layout, "the injector's proxy layout");
    let inject = InjectConfig { layout, ..inject };
    println!("{}", Listening::new("injector", listener.local_addr()?));
    Ok(Box::pin(injector::serve(listener, tls, inject, client)))
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
