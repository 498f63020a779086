//! `mesh`: the command-line tool users drive the mesh with. Resource commands (`apply`, `get`,
//! `delete`) talk to the control plane's resource API the way kubectl talks to an API server.

mod resources;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a command that exists in the CLI but whose machinery is not built yet
/// (sysexits.h `EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;

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
    Demo {
        /// Which canary to roll out.
        #[arg(long, value_enum, default_value_t = Scenario::Good)]
        scenario: Scenario,
    },
    /// Create or update resources from YAML or JSON files (all documents at once, or none).
    Apply {
        /// A file, or a directory whose *.yaml, *.yml and *.json files are applied; repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        conn: resources::Conn,
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
        conn: resources::Conn,
    },
    /// Delete a resource.
    Delete {
        /// canary (canaries), metrictemplate (mt) or httproute.
        kind: String,
        /// The resource.
        name: String,
        #[command(flatten)]
        conn: resources::Conn,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Scenario {
    /// A healthy v2: promoted.
    Good,
    /// v2 returns errors: rolled back.
    Errors,
    /// v2 is slow: rolled back.
    Latency,
    /// v2 fails intermittently.
    Flaky,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { scenario } => {
            #[allow(clippy::print_stderr, reason = "the CLI talks to its user")]
            {
                eprintln!(
                    "mesh demo --scenario {scenario:?}: not built yet. The embedded mesh (sidecar, \
                     control plane and rollout controller) is still being written; see README.md."
                );
            }
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Command::Apply { files, conn } => resources::run(&conn, resources::Action::Apply(files)),
        Command::Get {
            kind,
            name,
            output,
            conn,
        } => resources::run(&conn, resources::Action::Get { kind, name, output }),
        Command::Delete { kind, name, conn } => {
            resources::run(&conn, resources::Action::Delete { kind, name })
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
            Command::Demo {
                scenario: Scenario::Good
            }
        ));
        assert!(Cli::try_parse_from(["mesh", "demo", "--scenario", "nope"]).is_err());
    }

    #[test]
    fn resource_commands_parse_like_kubectl() {
        let cli =
            Cli::try_parse_from(["mesh", "get", "canaries", "-n", "shop", "-o", "yaml"]).unwrap();
        match cli.command {
            Command::Get {
                kind, output, conn, ..
            } => {
                assert_eq!(kind, "canaries");
                assert_eq!(conn.namespace, "shop");
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
}
