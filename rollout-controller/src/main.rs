//! `mesh-rollout-controller`: the rollout controller for a Kubernetes cluster. It parses flags,
//! connects to the apiserver and Prometheus, and runs [`mesh_rollout_controller::kubernetes::run`].

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_rollout_controller::kubernetes::{self, ElectionConfig, Ended, Settings, WindowFloor};
use mesh_rollout_controller::sources::PrometheusSource;

/// Exit code for bad configuration (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Rolls out new versions of Deployments named by Canaries, judged on proxy metrics from
/// Prometheus.
#[derive(Debug, Parser)]
#[command(name = "mesh-rollout-controller", version)]
struct Args {
    /// Kubeconfig file; without it, $KUBECONFIG (one or more files), ~/.kube/config, then the
    /// in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long)]
    context: Option<String>,
    /// Only reconcile Canaries in this namespace (default: all namespaces).
    #[arg(long, short = 'n', env = "MESH_ROLLOUT_NAMESPACE")]
    namespace: Option<String>,
    /// Prometheus that scrapes the proxies, e.g. http://prometheus.mesh:9090. Required: in a
    /// cluster the controller cannot know every caller's proxy to scrape it directly.
    #[arg(long, env = "MESH_PROMETHEUS_URL")]
    prometheus_url: String,
    /// Shortest PromQL range for a metrics window (at least twice Prometheus' scrape interval).
    #[arg(long, default_value = "30s", value_parser = duration)]
    metrics_interval: Duration,
    /// How often every Canary is reconciled.
    #[arg(long, default_value = "5s", value_parser = duration)]
    reconcile_interval: Duration,
    /// This instance's name in Events and in the Lease (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Elect a leader on a Lease, so only one of several replicas reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease (default: --namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "mesh-rollout-controller")]
    lease_name: String,
    /// How long a leader that stopped renewing keeps the Lease.
    #[arg(long, default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How often the leader renews the Lease and candidates retry.
    #[arg(long, default_value = "2s", value_parser = duration)]
    lease_renew_interval: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    mesh_rollout_controller::duration::parse(s).map_err(|e| e.to_string())
}

async fn client(args: &Args) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None if args.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("loading the kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig or in-cluster account")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version are not errors; a bad or missing flag is bad configuration.
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let prometheus = match prometheus_http_query::Client::try_from(args.prometheus_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "--prometheus-url (MESH_PROMETHEUS_URL): {:?} is not a URL: {e}",
                args.prometheus_url
            );
            return std::process::ExitCode::from(EXIT_CONFIG);
        }
    };
    let client = match client(&args).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            return std::process::ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.lease_renew_interval >= args.lease_duration {
        tracing::error!(
            "--lease-renew-interval ({:?}) must be shorter than --lease-duration ({:?})",
            args.lease_renew_interval,
            args.lease_duration
        );
        return std::process::ExitCode::from(EXIT_CONFIG);
    }
    let identity = args.instance.clone().unwrap_or_else(default_identity);
    let settings = Settings {
        namespace: args.namespace.clone(),
        tick: args.reconcile_interval,
        instance: Some(identity.clone()),
        ..Settings::default()
    };
    let source = WindowFloor::new(PrometheusSource::new(prometheus), args.metrics_interval);
    tracing::info!(namespace = ?settings.namespace, %identity, "mesh: rollout controller started");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if !args.leader_elect {
        kubernetes::run(client, settings, source, shutdown).await;
        return std::process::ExitCode::SUCCESS;
    }
    let election = ElectionConfig {
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| args.namespace.clone())
            .unwrap_or_else(|| "default".into()),
        name: args.lease_name.clone(),
        identity,
        lease_duration: args.lease_duration,
        renew_interval: args.lease_renew_interval,
    };
    match kubernetes::run_elected(client, settings, source, election, shutdown).await {
        Ended::Shutdown => std::process::ExitCode::SUCCESS,
        // Exit so the replica starts over as a candidate (the Deployment restarts it).
        Ended::LostLease => std::process::ExitCode::FAILURE,
    }
}

/// `<host>_<pid>`: unique among replicas, since each runs in its own pod.
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mesh-rollout-controller".into());
    format!("{host}_{}", std::process::id())
}
