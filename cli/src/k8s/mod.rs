//! Commands for Kubernetes: `mesh install`, `mesh check`, `mesh inject`, `mesh upgrade` and
//! `mesh uninstall`.

pub mod check;
pub mod helm;
pub mod inject;
pub mod install;
pub mod lifecycle;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;

/// How to reach a cluster, as kubectl does.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

impl KubeArgs {
    /// A client for the selected cluster and context.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.config().await?)?)
    }

    /// The connection settings of the selected cluster and context.
    pub async fn config(&self) -> anyhow::Result<kube::Config> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &options).await?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
            None => kube::Config::infer()
                .await
                .context("finding a kubeconfig")?,
        };
        Ok(config)
    }
}

/// Flags of `mesh check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Check that the cluster is ready for `mesh install`, instead of checking the mesh.
    #[arg(long)]
    pub pre: bool,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Flags of `mesh inject`.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// YAML file with the workloads; `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// The mesh's trust roots (PEM), given to the proxies to verify the control plane with: the
    /// `tls.crt` of the `mesh-identity-issuer` Secret in `mesh-system`. The webhook adds them
    /// by itself; offline they must be given.
    #[arg(long, value_name = "FILE")]
    pub trust_roots: Option<PathBuf>,
    /// Where the proxy goes: `native`, an init container with restartPolicy: Always
    /// (Kubernetes 1.29 and later; the webhook picks it from the API server's version), or
    /// `container`, among the app's containers, for older clusters.
    #[arg(long, value_enum, default_value_t = ProxyLayoutArg::Native)]
    pub proxy_layout: ProxyLayoutArg,
    #[command(flatten)]
    pub proxy: install::ProxyArgs,
}

/// `--proxy-layout` of `mesh inject`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyLayoutArg {
    /// A native sidecar.
    Native,
    /// A plain container.
    Container,
}

impl From<ProxyLayoutArg> for mesh_controlplane::inject::ProxyLayout {
    fn from(arg: ProxyLayoutArg) -> Self {
        match arg {
            ProxyLayoutArg::Native => Self::NativeSidecar,
            ProxyLayoutArg::Container => Self::Container,
        }
    }
}

/// `mesh install`.
#[allow(clippy::print_stdout, reason = "the manifests are the output")]
pub fn install(args: &install::InstallArgs) -> ExitCode {
    if let Some(dir) = &args.helm_chart {
        return match crate::runtime::block_on(false, async { helm::write(dir) }) {
            Some(()) => ExitCode::SUCCESS,
            None => ExitCode::FAILURE,
        };
    }
    let rendered = install::render(args).and_then(|docs| install::to_yaml(&docs));
    match crate::runtime::block_on(false, async { rendered }) {
        Some(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `mesh inject`.
#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "YAML out, report to stderr"
)]
pub fn inject(args: &InjectArgs) -> ExitCode {
    let mut config = args.proxy.inject_config();
    config.layout = args.proxy_layout.into();
    match &args.trust_roots {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => config.trust_roots_pem = pem,
            Ok(_) => {
                eprintln!(
                    "error: --trust-roots {}: no PEM certificate in it",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: --trust-roots {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => eprintln!(
            "warning: without --trust-roots the injected proxies cannot verify the control plane \
             and will not start; pass the tls.crt of the mesh-identity-issuer Secret \
             (kubectl -n mesh-system get secret mesh-identity-issuer -o \
             jsonpath='{{.data.tls\\.crt}}' | base64 -d > roots.pem)"
        ),
    }
    let result = inject::inject_file(&args.file, &config);
    match crate::runtime::block_on(false, async { result }) {
        Some((yaml, report)) => {
            for line in report {
                eprintln!("{line}");
            }
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// Flags of `mesh upgrade`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub install: install::InstallArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Flags of `mesh uninstall`.
#[derive(clap::Args, Debug, Clone)]
pub struct UninstallArgs {
    /// Also delete the mesh's CRDs, and with them every Canary, MetricTemplate and policy
    /// resource in the cluster. The Gateway API HTTPRoute CRD is kept: other software may use it.
    #[arg(long)]
    pub crds: bool,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// `mesh upgrade`.
#[allow(clippy::print_stdout, reason = "the report is the output")]
pub fn upgrade(args: &UpgradeArgs) -> ExitCode {
    let done = crate::runtime::block_on(false, async {
        let client = args.kube.client().await?;
        lifecycle::upgrade(&client, &args.install).await
    });
    match done {
        Some(report) => {
            for line in report {
                println!("{line}");
            }
            println!("upgraded; `mesh check` says when the new pods are available");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `mesh uninstall`.
#[allow(clippy::print_stdout, reason = "the report is the output")]
pub fn uninstall(args: &UninstallArgs) -> ExitCode {
    let done = crate::runtime::block_on(false, async {
        let client = args.kube.client().await?;
        lifecycle::uninstall(&client, args.crds).await
    });
    match done {
        Some(report) => {
            for line in report {
                println!("{line}");
            }
            println!(
                "uninstalled; injected pods keep their proxies until they restart (remove the \
                 mesh.dev/inject annotations from namespaces and workloads, then restart them)"
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `mesh check`.
pub fn check(args: &CheckArgs) -> ExitCode {
    let ok = crate::runtime::block_on(false, async {
        let client = args.kube.client().await?;
        Ok(check::print(&check::run(&client, args.pre).await))
    });
    match ok {
        Some(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
