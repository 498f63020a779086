//! `mesh up -f mesh.yaml`: runs the embedded mesh in the foreground, with the workloads and
//! resources the file declares, until Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use mesh_core::Listening;
use mesh_store::ResourceStore;

use crate::embedded::{self, Mesh, Settings};

/// Flags of `mesh up`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// mesh.yaml: Workloads, and any Canary, HTTPRoute or MetricTemplate; a file or a
    /// directory, repeatable. Applied at every start, like `mesh apply -f`.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Where the store, the CA and the process logs live; `.mesh/` beside the first file by
    /// default. A restart with the same directory resumes where the mesh stopped.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The resource API, which `mesh apply`, `mesh get` and `mesh rollout status` talk to.
    #[arg(long, default_value = "127.0.0.1:4180")]
    pub api_addr: SocketAddr,
    /// The proxy API, which the sidecars watch and register with.
    #[arg(long, default_value = "127.0.0.1:4181")]
    pub proxy_addr: SocketAddr,
    /// The inbound policy of workload ports no Server selects: all-unauthenticated (anyone),
    /// all-authenticated (only meshed, mTLS callers) or deny.
    #[arg(long, default_value = "all-unauthenticated")]
    pub default_inbound_policy: mesh_policies::DefaultPolicy,
    /// Where the web dashboard listens (`mesh up` prints its sign-in link); `off` serves none.
    #[arg(long, default_value = "127.0.0.1:4190")]
    pub dashboard_addr: String,
    /// Namespace for documents that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The OTLP/HTTP collector every sidecar sends its spans to (`host:port` or a URL, e.g.
    /// Jaeger's `127.0.0.1:4318`); tracing is off without it (or `MESH_PROXY_TRACE_COLLECTOR`
    /// in mesh up's environment, which the sidecars inherit).
    #[arg(long, value_name = "URL")]
    pub trace_collector: Option<String>,
    /// The share of new traces the sidecars sample, 0 to 1 (default 1); a request that brings
    /// its own sampling decision keeps it.
    #[arg(long, value_name = "SHARE", requires = "trace_collector")]
    pub trace_sampling: Option<String>,
}

impl Args {
    /// The sidecars' tracing variables from the flags, checked as the proxy will read them.
    fn proxy_env(&self) -> anyhow::Result<Vec<(String, String)>> {
        use mesh_core::trace::{ENV_COLLECTOR, ENV_SAMPLING, collector_url, sampling};
        let mut env = Vec::new();
        if let Some(c) = &self.trace_collector {
            collector_url(c).map_err(|e| anyhow::anyhow!("--trace-collector {c:?}: {e}"))?;
            env.push((ENV_COLLECTOR.to_string(), c.clone()));
        }
        if let Some(s) = &self.trace_sampling {
            sampling(s).map_err(|e| anyhow::anyhow!("--trace-sampling {s:?}: {e}"))?;
            env.push((ENV_SAMPLING.to_string(), s.clone()));
        }
        Ok(env)
    }
}

/// Runs `mesh up`.
pub fn run(args: Args) -> ExitCode {
    crate::runtime::init_logging("info");
    crate::runtime::block_on(true, up(args)).map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "announcements go to stdout, messages to the user on stderr"
)]
async fn up(args: Args) -> anyhow::Result<()> {
    // Read every file before starting anything: a typo is reported with its file and line.
    let docs = embedded::read_manifests(&args.files, &args.namespace)?;
    let proxy_env = args.proxy_env()?;
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        embedded::default_state_dir(args.files.first().map_or(&PathBuf::new(), |f| f))
    });
    let mesh = Mesh::start(&Settings {
        state_dir: state_dir.clone(),
        api_addr: args.api_addr,
        proxy_addr: args.proxy_addr,
        default_inbound_policy: args.default_inbound_policy,
        proxy_env,
    })
    .await?;
    if let Err(e) = mesh.store.apply(docs).await {
        mesh.shutdown().await;
        return Err(anyhow::anyhow!(
            "{}: {e}; nothing was applied",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!("{}", Listening::new("api", mesh.api_addr));
    println!("{}", Listening::new("proxy", mesh.proxy_addr));
    let dashboard = match start_dashboard(&args.dashboard_addr, &mesh).await {
        Ok(d) => d,
        Err(e) => {
            mesh.shutdown().await;
            return Err(e);
        }
    };
    crate::runtime::tell(&format!(
        "mesh is up: resource API http://{} (token in {}, which `mesh` finds on its own), \
         proxy API https://{} (mTLS; trust roots in {}), state in {}. Ctrl-C stops everything.",
        mesh.api_addr,
        mesh.api_token_file.display(),
        mesh.proxy_addr,
        mesh.trust_roots_file.display(),
        state_dir.display()
    ));
    wait_for_signal().await;
    if let Some(d) = dashboard {
        d.abort();
    }
    crate::runtime::tell("stopping the workloads...");
    mesh.shutdown().await;
    crate::runtime::tell(&format!(
        "stopped; `mesh up` again resumes from {}",
        state_dir.display()
    ));
    Ok(())
}

/// Serves the dashboard on `addr` (unless `off`), announcing it and printing its sign-in link.
#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "announcements go to stdout, messages to the user on stderr"
)]
async fn start_dashboard(
    addr: &str,
    mesh: &Mesh,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if addr == "off" {
        return Ok(None);
    }
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--dashboard-addr {addr}: {e} (host:port or off)"))?;
    // The mesh is still useful without its dashboard (another mesh may hold the port).
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            crate::runtime::tell(&format!(
                "no dashboard: binding {addr}: {e} (choose another with --dashboard-addr)"
            ));
            return Ok(None);
        }
    };
    let bound = listener.local_addr()?;
    let dashboard = crate::dashboard::Dashboard::new(crate::backend::Conn {
        server: format!("http://{}", mesh.api_addr),
        token_file: Some(mesh.api_token_file.clone()),
        namespace: "default".into(),
    })?;
    println!("{}", Listening::new("dashboard", bound));
    crate::runtime::tell(&format!(
        "dashboard: {} (a link that signs in once; `mesh dashboard` serves another and prints its own)",
        dashboard.sign_in_url(bound)?
    ));
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = dashboard.serve(listener).await {
            tracing::error!(error = %e, "the dashboard stopped");
        }
    })))
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: Args,
    }

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = ["mesh-up", "-f", "mesh.yaml"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.up)
    }

    #[test]
    fn tracing_flags_become_the_sidecars_variables() {
        assert!(args(&[]).unwrap().proxy_env().unwrap().is_empty());
        let env = args(&[
            "--trace-collector",
            "127.0.0.1:4318",
            "--trace-sampling",
            "0.1",
        ])
        .unwrap()
        .proxy_env()
        .unwrap();
        assert_eq!(
            env,
            [
                ("MESH_PROXY_TRACE_COLLECTOR".into(), "127.0.0.1:4318".into()),
                ("MESH_PROXY_TRACE_SAMPLING".into(), "0.1".into()),
            ]
        );
    }

    #[test]
    fn a_bad_tracing_flag_is_named() {
        let e = args(&["--trace-collector", "ftp://collector"])
            .unwrap()
            .proxy_env()
            .unwrap_err();
        assert!(e.to_string().starts_with("--trace-collector"), "{e}");
        let e = args(&["--trace-collector", "c:4318", "--trace-sampling", "2"])
            .unwrap()
            .proxy_env()
            .unwrap_err();
        assert!(e.to_string().starts_with("--trace-sampling"), "{e}");
        // Sampling alone would do nothing: clap refuses it.
        assert!(args(&["--trace-sampling", "0.5"]).is_err());
    }
}
