//! `mesh`: the command-line tool users drive the mesh with. Resource commands (`apply`, `get`,
//! `delete`) and `mesh rollout` work the way kubectl does, through one backend: the embedded
//! control plane's resource API, or a Kubernetes cluster with `--kube`, `--kubeconfig` or
//! `--context`.

mod backend;
mod dashboard;
mod demo;
mod embedded;
mod k8s;
mod observe;
mod observe_api;
mod observe_cluster;
mod observe_reach;
mod resources;
mod rollout;
mod runtime;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A progressive-delivery service mesh.
#[derive(Parser, Debug)]
#[command(name = "mesh", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a canary rollout on the embedded mesh, start to finish, on this machine.
    Demo(demo::Args),
    /// Follow and gate on rollouts.
    #[command(subcommand)]
    Rollout(rollout::Command),
    /// Run the embedded mesh: control plane, rollout controller and the workloads of mesh.yaml,
    /// each with its sidecar, until Ctrl-C.
    Up(up::Args),
    /// Create or update resources from YAML or JSON files (all documents at once, or none).
    Apply {
        /// A file, or a directory whose *.yaml, *.yml and *.json files are applied; repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        at: backend::Where,
    },
    /// Show resources: a table, or whole objects with -o yaml|json.
    Get {
        /// canary (canaries), metrictemplate (mt) or httproute.
        kind: String,
        /// One resource; all in the namespace when left out.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum)]
        output: Option<resources::Output>,
        #[command(flatten)]
        at: backend::Where,
    },
    /// Render everything a Kubernetes cluster needs, for `| kubectl apply -f -`.
    // `--version` is the mesh's image tag here, not this CLI's version.
    #[command(disable_version_flag = true)]
    Install(k8s::install::InstallArgs),
    /// Upgrade the mesh in the cluster to this CLI's rendering (images, --ha, flags), keeping
    /// its identity issuer.
    #[command(disable_version_flag = true)]
    Upgrade(k8s::UpgradeArgs),
    /// Remove everything `mesh install` added; injected workloads keep running.
    Uninstall(k8s::UninstallArgs),
    /// Check a cluster: ready for the mesh (--pre), or the mesh healthy on it.
    Check(k8s::CheckArgs),
    /// Add the proxy to the workloads in a YAML file, offline, as the injector webhook would.
    #[command(disable_version_flag = true)]
    Inject(k8s::InjectArgs),
    /// See what the mesh is doing: stat, top, routes, edges, tap, dashboard.
    #[command(flatten)]
    Observe(observe::Command),
    /// Delete a resource.
    Delete {
        /// canary (canaries), metrictemplate (mt) or httproute.
        kind: String,
        /// The resource.
        name: String,
        #[command(flatten)]
        at: backend::Where,
    },
}

fn main() -> ExitCode {
    // clap's own exit code for a usage error is 2, which `mesh rollout status` uses for "timed
    // out"; a pipeline must never read a typo as a rollout's verdict.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(rollout::EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    mesh_core::crypto::install_provider();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Rollout(c) => rollout::run(c),
        Command::Up(args) => up::run(args),
        Command::Install(args) => k8s::install(&args),
        Command::Check(args) => k8s::check(&args),
        Command::Upgrade(args) => k8s::upgrade(&args),
        Command::Uninstall(args) => k8s::uninstall(&args),
        Command::Inject(args) => k8s::inject(&args),
        Command::Apply { files, at } => resources::run(&at, resources::Action::Apply(files)),
        Command::Get {
            kind,
            name,
            output,
            at,
        } => resources::run(&at, resources::Action::Get { kind, name, output }),
        Command::Observe(c) => observe::run(c),
        Command::Delete { kind, name, at } => {
            resources::run(&at, resources::Action::Delete { kind, name })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn demo_defaults_to_the_good_scenario() {
        let cli = Cli::try_parse_from(["mesh", "demo"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Demo(demo::Args {
                scenario: demo::Scenario::Good,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["mesh", "demo", "--scenario", "nope"]).is_err());
    }

    #[test]
    fn resource_commands_parse_like_kubectl() {
        let cli =
            Cli::try_parse_from(["mesh", "get", "canaries", "-n", "shop", "-o", "yaml"]).unwrap();
        match cli.command {
            Command::Get {
                kind, output, at, ..
            } => {
                assert_eq!(kind, "canaries");
                assert_eq!(at.conn.namespace, "shop");
                assert!(matches!(output, Some(resources::Output::Yaml)));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(
            Cli::try_parse_from(["mesh", "apply"]).is_err(),
            "-f is required"
        );
        let cli = Cli::try_parse_from(["mesh", "apply", "-f", "a.yaml", "-f", "dir"]).unwrap();
        assert!(matches!(cli.command, Command::Apply { files, .. } if files.len() == 2));
    }

    #[test]
    fn resource_commands_select_a_cluster_like_rollout_does() {
        let at = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Apply { at, .. } | Command::Get { at, .. } | Command::Delete { at, .. } => at,
            other => panic!("parsed as {other:?}"),
        };
        assert!(!at(&["mesh", "get", "canaries"]).is_cluster());
        assert!(at(&["mesh", "get", "canaries", "--kube"]).is_cluster());
        assert!(at(&["mesh", "apply", "-f", "a.yaml", "--kubeconfig", "kc"]).is_cluster());
        assert!(at(&["mesh", "delete", "canary", "web", "--context", "prod"]).is_cluster());
        match Cli::try_parse_from(["mesh", "rollout", "status", "web", "--kube"])
            .unwrap()
            .command
        {
            Command::Rollout(rollout::Command::Status(args)) => assert!(args.at.is_cluster()),
            other => panic!("parsed as {other:?}"),
        }
    }
}
