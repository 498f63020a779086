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
        trust_roots = %control_plane.trust_roots_file().display(),
        "control plane started; the proxy API is served over mTLS, verify it with the trust roots"
    );
    let injector = injector(&config.trust_domain, control_plane.trust_roots_pem()).await?;
    // In a cluster, discovery comes from the Kubernetes API (HTTPRoutes, Services,
    // EndpointSlices, Pods) instead of the embedded store and workload registrations.
    let in_cluster = matches!(
        mesh_core::config::Env::var(&ProcessEnv, "MESH_CONTROLPLANE_KUBERNETES").as_deref(),
        Some("true" | "1")
    );
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = if in_cluster {
        let client = kube::Client::try_default()
            .await
            .context("MESH_CONTROLPLANE_KUBERNETES: no in-cluster config or kubeconfig")?;
        tracing::info!("discovery from the Kubernetes API");
        Box::pin(control_plane.serve_kubernetes(client, config.trust_domain.clone(), api, proxy))
    } else {
        Box::pin(control_plane.serve(api, proxy))
    };
    tokio::select! {
        () = serving => Ok(()),
        () = injector => Ok(()),
        r = tokio::signal::ctrl_c() => r.context("waiting for a signal"),
        () = terminate() => Ok(()),
    }
}

/// The proxy-injector webhook, when `MESH_CONTROLPLANE_INJECTOR_ADDR` is set (in a cluster,
/// as `mesh install` configures it): HTTPS with `tls.crt`/`tls.key` from
/// `MESH_CONTROLPLANE_INJECTOR_TLS_DIR`, injecting `MESH_CONTROLPLANE_PROXY_IMAGE` and
/// `MESH_CONTROLPLANE_INIT_IMAGE` with the CA's trust roots, reading namespaces through the
/// in-cluster API.
#[allow(
    clippy::print_stdout,
    reason = "announcements go to stdout by contract"
)]
async fn injector(
    trust_domain: &str,
    trust_roots_pem: &str,
) -> anyhow::Result<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
    use mesh_controlplane::{inject::InjectConfig, injector};
    use mesh_core::config::Env;
    let env = ProcessEnv;
    let Some(addr) = env.var("MESH_CONTROLPLANE_INJECTOR_ADDR") else {
        return Ok(Box::pin(std::future::pending()));
    };
    let dir = env.var("MESH_CONTROLPLANE_INJECTOR_TLS_DIR").context(
        "MESH_CONTROLPLANE_INJECTOR_TLS_DIR must be set with MESH_CONTROLPLANE_INJECTOR_ADDR",
    )?;
    let read = |f: &str| {
        let path = std::path::Path::new(&dir).join(f);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tls =
        injector::tls_config(&read("tls.crt")?, &read("tls.key")?).map_err(anyhow::Error::msg)?;
    let defaults = InjectConfig::default();
    let config = InjectConfig {
        proxy_image: env
            .var("MESH_CONTROLPLANE_PROXY_IMAGE")
            .unwrap_or(defaults.proxy_image.clone()),
        init_image: env
            .var("MESH_CONTROLPLANE_INIT_IMAGE")
            .unwrap_or(defaults.init_image.clone()),
        trust_domain: trust_domain.to_string(),
        // Injected proxies verify the proxy API with the CA's roots, given up front.
        trust_roots_pem: trust_roots_pem.to_string(),
        ..defaults
    };
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("MESH_CONTROLPLANE_INJECTOR_ADDR: binding {addr}"))?;
    println!("{}", Listening::new("injector", listener.local_addr()?));
    let client = kube::Client::try_default()
        .await
        .context("the injector needs the Kubernetes API (in-cluster config or a kubeconfig)")?;
    Ok(Box::pin(injector::serve(listener, tls, config, client)))
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
