//! `mesh`: the command-line tool users drive the mesh with.

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
}
