//! `mesh-simulations`: runs the rollout simulations.
//!
//! - `report [--seeds N] [--threads N]` runs every strategy on every scenario and writes
//!   `docs/simulations.md`, its plot and `target/sim/results.json` under the workspace root.
//! - `run --scenario NAME [--strategy NAME] [--seeds N]` prints the figures of one or all
//!   strategies on one scenario. With `--strategy mesh`, the judge and the Canary spec can be
//!   changed: `--alpha`, `--min-samples`, `--min-window-samples`, `--window-alpha`,
//!   `--hold-ratio`, `--promote-alpha`, `--error-floor`, `--step-weight`, `--slow-quantile`,
//!   `--slow-min-ms`, `--latency-warmup`, `--interval`, `--threshold`, `--deadline`, `--no-absolute-gates`,
//!   `--no-looks` (no looks between analysis ticks), `--duration-gate-alone` (the
//!   request-duration gate reads the canary alone, as Flagger's does).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use std::process::ExitCode;

/// A bad command line: the binary exits with code 64 and says what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

const USAGE: &str = "usage: mesh-simulations report [--seeds N] [--threads N] | run --scenario NAME \
                     [--strategy NAME] [--seeds N] [--threads N] [mesh options]";
use mesh_simulations::strategy::{Kind, MeshConfig, Strategy};
use mesh_simulations::{report, run, scenario};

struct Args(Vec<String>);

impl Args {
    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    fn value<T: std::str::FromStr>(&self, name: &str) -> anyhow::Result<Option<T>> {
        let Some(i) = self.0.iter().position(|a| a == name) else {
            return Ok(None);
        };
        let raw = self
            .0
            .get(i + 1)
            .ok_or_else(|| usage(format!("{name} needs a value")))?;
        raw.parse()
            .map(Some)
            .map_err(|_| usage(format!("{name}: cannot parse {raw:?}")))
    }
}

fn workspace_root() -> PathBuf {
    // simulations/ sits directly under the workspace root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

fn threads(args: &Args) -> anyhow::Result<usize> {
    Ok(args.value("--threads")?.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    }))
}

fn mesh_config(args: &Args) -> anyhow::Result<MeshConfig> {
    let mut c = MeshConfig::default();
    if let Some(v) = args.value("--alpha")? {
        c.judge.alpha = v;
    }
    if let Some(v) = args.value("--min-samples")? {
        c.judge.min_samples = v;
    }
    if let Some(v) = args.value("--min-window-samples")? {
        c.judge.min_window_samples = v;
    }
    if let Some(v) = args.value("--window-alpha")? {
        c.judge.window_alpha = v;
    }
    if let Some(v) = args.value("--hold-ratio")? {
        c.judge.hold_ratio = v;
    }
    if let Some(v) = args.value("--promote-alpha")? {
        c.judge.promote_alpha = v;
    }
    if let Some(v) = args.value("--error-floor")? {
        c.judge.error_floor = v;
    }
    if let Some(v) = args.value("--step-weight")? {
        c.step_weight = v;
    }
    if let Some(v) = args.value("--slow-quantile")? {
        c.judge.slow_quantile = v;
    }
    if let Some(v) = args.value("--slow-min-ms")? {
        c.judge.slow_min_ms = v;
    }
    if let Some(v) = args.value("--latency-warmup")? {
        c.judge.latency_warmup_requests = v;
    }
    if let Some(v) = args.value("--interval")? {
        c.interval_s = v;
    }
    if let Some(v) = args.value("--threshold")? {
        c.threshold = v;
    }
    if let Some(v) = args.value("--deadline")? {
        c.deadline_s = v;
    }
    if args.flag("--duration-gate-alone") {
        c.judge.duration_gate_against_primary = false;
    }
    if args.flag("--no-looks") {
        c.judge.look_between_ticks = false;
    }
    if args.flag("--no-absolute-gates") {
        c.absolute_gates = false;
    }
    Ok(c)
}

fn main() -> ExitCode {
    match cli() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.is::<Usage>() { 64 } else { 1 };
            let _ = writeln!(std::io::stderr(), "mesh-simulations: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn cli() -> anyhow::Result<()> {
    let args = Args(std::env::args().skip(1).collect());
    let seeds: u64 = args.value("--seeds")?.unwrap_or(report::SEEDS);
    let threads = threads(&args)?;
    let mut out = std::io::stdout().lock();
    match args.0.first().map(String::as_str) {
        Some("report") => {
            let started = Instant::now();
            let root = workspace_root();
            let written = report::generate(&root, seeds, threads)?;
            for path in written {
                writeln!(out, "wrote {}", path.display())?;
            }
            writeln!(
                out,
                "{seeds} seeds per cell on {threads} threads in {:.1} s",
                started.elapsed().as_secs_f64()
            )?;
        }
        Some("run") => {
            let name: String = args
                .value("--scenario")?
                .ok_or_else(|| usage("run needs --scenario NAME"))?;
            let scenario = scenario::by_name(&name).ok_or_else(|| {
                let names: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
                usage(format!(
                    "no scenario {name:?}; there are {}",
                    names.join(", ")
                ))
            })?;
            let wanted: Option<String> = args.value("--strategy")?;
            let mut strategies: Vec<Strategy> = report::strategies();
            if let Some(w) = &wanted {
                strategies.retain(|s| &s.name == w);
                if strategies.is_empty() {
                    let names: Vec<String> =
                        report::strategies().into_iter().map(|s| s.name).collect();
                    return Err(usage(format!(
                        "no strategy {w:?}; there are {}",
                        names.join(", ")
                    )));
                }
            }
            // The mesh options change `mesh`; the baselines keep their documented settings.
            for s in &mut strategies {
                if let (Kind::Mesh(c), "mesh") = (&mut s.kind, s.name.as_str()) {
                    **c = mesh_config(&args)?;
                }
            }
            let started = Instant::now();
            let cells = run::matrix(&strategies, &[scenario], seeds, threads);
            writeln!(out, "{}", report::table_header())?;
            for cell in &cells {
                writeln!(out, "{}", report::table_row(&run::Summary::of(cell)))?;
            }
            writeln!(out, "({:.1} s)", started.elapsed().as_secs_f64())?;
        }
        _ => return Err(usage(USAGE)),
    }
    Ok(())
}
