//! `mesh-rollout-controller`: the rollout controller for a Kubernetes cluster. It parses flags,
//! connects to the apiserver and Prometheus, and runs [`mesh_rollout_controller::kubernetes::run`].

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_core::config::{EXIT_CONFIG, ProcessEnv};
use mesh_rollout_controller::config::{
    Config, ENV_INSTANCE, ENV_LEADER_ELECT, ENV_LEASE_DURATION, ENV_LEASE_NAME,
    ENV_LEASE_NAMESPACE, ENV_LEASE_RENEW_INTERVAL, ENV_METRICS_INTERVAL, ENV_NAMESPACE,
    ENV_PROMETHEUS_URL, ENV_RECONCILE_INTERVAL, Flags,
};
use mesh_rollout_controller::kubernetes::{self, Ended, WindowFloor};
use mesh_rollout_controller::sources::PrometheusSource;

/// Rolls out new versions of Deployments named by Canaries, judged on proxy metrics from
/// Prometheus. Every flag sets the environment variable named in its help, which it overrides.
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
    /// [MESH_ROLLOUT_NAMESPACE]
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Prometheus that scrapes the proxies, e.g. http://prometheus.mesh:9090. Required: in a
    /// cluster the controller cannot know every caller's proxy to scrape it directly.
    /// [MESH_ROLLOUT_PROMETHEUS_URL]
    #[arg(long)]
    prometheus_url: Option<String>,
    /// Shortest PromQL range for a metrics window (at least twice Prometheus' scrape interval;
    /// default 30s). [MESH_ROLLOUT_METRICS_INTERVAL]
    #[arg(long)]
    metrics_interval: Option<String>,
    /// How often every Canary is reconciled (default 5s). [MESH_ROLLOUT_RECONCILE_INTERVAL]
    #[arg(long)]
    reconcile_interval: Option<String>,
    /// This instance's name in Events and in the Lease (default: host name and process id).
    /// [POD_NAME]
    #[arg(long)]
    instance: Option<String>,
    /// Elect a leader on a Lease, so only one of several replicas reconciles (default true).
    /// [MESH_ROLLOUT_LEADER_ELECT]
    #[arg(long)]
    leader_elect: Option<String>,
    /// Namespace of the Lease (default: --namespace, else `default`). [POD_NAMESPACE]
    #[arg(long)]
    lease_namespace: Option<String>,
    /// Name of the Lease (default mesh-rollout-controller). [MESH_ROLLOUT_LEASE_NAME]
    #[arg(long)]
    lease_name: Option<String>,
    /// How long a leader that stopped renewing keeps the Lease (default 15s).
    /// [MESH_ROLLOUT_LEASE_DURATION]
    #[arg(long)]
    lease_duration: Option<String>,
    /// How often the leader renews the Lease and candidates retry (default 2s).
    /// [MESH_ROLLOUT_LEASE_RENEW_INTERVAL]
    #[arg(long)]
    lease_renew_interval: Option<String>,
}

impl Args {
    /// The flags laid over the process environment.
    fn env(&self) -> Flags<ProcessEnv> {
        Flags::over(ProcessEnv)
            .flag(ENV_NAMESPACE, self.namespace.clone())
            .flag(ENV_PROMETHEUS_URL, self.prometheus_url.clone())
            .flag(ENV_METRICS_INTERVAL, self.metrics_interval.clone())
            .flag(ENV_RECONCILE_INTERVAL, self.reconcile_interval.clone())
            .flag(ENV_INSTANCE, self.instance.clone())
            .flag(ENV_LEADER_ELECT, self.leader_elect.clone())
            .flag(ENV_LEASE_NAMESPACE, self.lease_namespace.clone())
            .flag(ENV_LEASE_NAME, self.lease_name.clone())
            .flag(ENV_LEASE_DURATION, self.lease_duration.clone())
            .flag(ENV_LEASE_RENEW_INTERVAL, self.lease_renew_interval.clone())
    }
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
    mesh_core::crypto::install_provider();

    let config = match Config::from_env(&args.env()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::from(EXIT_CONFIG);
        }
    };
    let prometheus = match prometheus_http_query::Client::try_from(config.prometheus_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            // Config::from_env checked the URL already; this is the same check.
            tracing::error!("{ENV_PROMETHEUS_URL}: {e}");
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
    let identity = config.instance.clone().unwrap_or_else(default_identity);
    let settings = config.settings(&identity);
    let source = WindowFloor::new(PrometheusSource::new(prometheus), config.metrics_interval);
    tracing::info!(namespace = ?settings.namespace, %identity, "mesh: rollout controller started");
    // Kubernetes stops a pod with SIGTERM; Ctrl-C is for a terminal. Either releases the Lease,
    // so a standby takes over at once instead of after the lease duration.
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    if !config.leader_elect {
        kubernetes::run(client, settings, source, shutdown).await;
        return std::process::ExitCode::SUCCESS;
    }
    let election = config.election(&identity);
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
