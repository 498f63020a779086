//! The report: `docs/simulations.md`, its plot (`docs/simulations-decision-times.svg`), and
//! `target/sim/results.json`, all under the workspace root.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::run::{self, Summary};
use crate::scenario::{self, Expect, Scenario};
use crate::stats;
use crate::strategy::{self, Kind, MeshConfig, Strategy};

/// Seeds per strategy and scenario.
pub const SEEDS: u64 = 1_000;
/// File name of the plot; it sits next to `docs/simulations.md`, which links it by this name.
pub const PLOT: &str = "simulations-decision-times.svg";
/// The round-2 notes: what each change to the judge did, measured with `run` before and after
/// it, kept beside the generator and printed into the report.
const NOTES: &str = include_str!("../round2.md");
/// Name of the mesh strategy run with the settings shipped before the simulations'
/// recommendations were adopted ([`MeshConfig::previous`]).
pub const PREVIOUS: &str = "mesh-previous";
/// The issue's time budget for rolling back errors-5pct, at p95, in seconds.
pub const ROLLBACK_BUDGET_S: f64 = 15.0;
/// The issue's floor for flagger-tutorial's decision on errors-5pct, in seconds.
pub const TUTORIAL_FLOOR_S: f64 = 150.0;
/// Scenarios of the sensitivity table.
pub const SENSITIVITY: [&str; 8] = [
    "healthy",
    "errors-5pct",
    "errors-1pct",
    "errors-0.5pct",
    "latency-1.2x",
    "noisy-primary",
    "diurnal",
    "metric-gaps",
];

/// One row of the comparison of mesh settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// What ships: [`MeshConfig::default`], the `mesh` strategy.
    Defaults,
    /// What shipped before: [`MeshConfig::previous`], the `mesh-previous` strategy.
    Previous,
    /// The defaults with the previous `threshold`: what `threshold: 2` alone buys.
    PreviousThreshold,
    /// The defaults with the previous `min_samples`: what `min_samples` 100 alone buys.
    PreviousMinSamples,
    /// The defaults with the previous progress deadline: what the 600 s deadline alone buys.
    PreviousDeadline,
    /// Only the sequential comparisons judge, and one failure rolls back.
    SequentialOnly,
    /// The same with a ten times larger `alpha`.
    SequentialLooseAlpha,
    /// The absolute gates need 100 canary requests a window.
    MinWindowSamples,
    /// For about one request per second: a 5 minute interval and a one hour deadline.
    Slow,
    /// The same with the previous `min_samples`.
    SlowPreviousMinSamples,
}

impl Variant {
    /// The rows of the sensitivity table.
    pub const TABLE: [Self; 8] = [
        Self::Defaults,
        Self::Previous,
        Self::PreviousThreshold,
        Self::PreviousMinSamples,
        Self::PreviousDeadline,
        Self::SequentialOnly,
        Self::SequentialLooseAlpha,
        Self::MinWindowSamples,
    ];
    /// The settings run on `low-traffic-1rps` only.
    pub const SLOW: [Self; 2] = [Self::Slow, Self::SlowPreviousMinSamples];

    /// The settings of this row.
    pub fn config(self) -> MeshConfig {
        let d = MeshConfig::default();
        let p = MeshConfig::previous();
        let with = |f: &dyn Fn(&mut MeshConfig)| {
            let mut c = MeshConfig::default();
            f(&mut c);
            c
        };
        let slow = |min_samples: u64| {
            with(&|c| {
                c.interval_s = 300;
                c.deadline_s = 3_600;
                c.judge.min_samples = min_samples;
            })
        };
        match self {
            Self::Defaults => d,
            Self::Previous => p,
            Self::PreviousThreshold => with(&|c| c.threshold = p.threshold),
            Self::PreviousMinSamples => with(&|c| c.judge.min_samples = p.judge.min_samples),
            Self::PreviousDeadline => with(&|c| c.deadline_s = p.deadline_s),
            Self::SequentialOnly => with(&|c| {
                c.absolute_gates = false;
                c.threshold = 1;
            }),
            Self::SequentialLooseAlpha => with(&|c| {
                c.absolute_gates = false;
                c.threshold = 1;
                c.judge.alpha *= 10.0;
            }),
            Self::MinWindowSamples => with(&|c| c.judge.min_window_samples = 100),
            Self::Slow => slow(d.judge.min_samples),
            Self::SlowPreviousMinSamples => slow(p.judge.min_samples),
        }
    }

    /// The row's name in the table, from its settings.
    pub fn name(self) -> String {
        let c = self.config();
        let j = &c.judge;
        match self {
            Self::Defaults => format!(
                "defaults (`mesh`): threshold {}, min_samples {}, deadline {}",
                c.threshold, j.min_samples, c.deadline_s
            ),
            Self::Previous => format!(
                "previous (`{PREVIOUS}`): threshold {}, min_samples {}, deadline {}",
                c.threshold, j.min_samples, c.deadline_s
            ),
            Self::PreviousThreshold => format!("defaults, but threshold {}", c.threshold),
            Self::PreviousMinSamples => format!("defaults, but min_samples {}", j.min_samples),
            Self::PreviousDeadline => {
                format!("defaults, but progressDeadlineSeconds {}", c.deadline_s)
            }
            Self::SequentialOnly => {
                format!("sequential gates only, threshold {}", c.threshold)
            }
            Self::SequentialLooseAlpha => format!(
                "sequential only, threshold {}, alpha {}",
                c.threshold, j.alpha
            ),
            Self::MinWindowSamples => format!("min_window_samples {}", j.min_window_samples),
            Self::Slow | Self::SlowPreviousMinSamples => format!(
                "interval {}m, deadline {}h, min_samples {}",
                c.interval_s / 60,
                c.deadline_s / 3_600,
                j.min_samples
            ),
        }
    }
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// Header of the markdown results table.
pub fn table_header() -> String {
    "| strategy | P(rollback) | P(promote) | P(no verdict) | decision median (s) | decision p95 (s) | promotion median (s) | failed canary requests, median (mean) | promotions on < 200 canary requests |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|".into()
}

/// One row of the markdown results table.
pub fn table_row(s: &Summary) -> String {
    format!(
        "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.0} ({:.1}) | {} |",
        s.strategy,
        s.p_rollback(),
        s.p_promote(),
        s.p_inconclusive(),
        fmt_s(s.decision_s_median),
        fmt_s(s.decision_s_p95),
        fmt_s(s.promote_s_median),
        s.blast_failed_median,
        s.blast_failed_mean,
        s.promoted_on_few,
    )
}

/// The strategies of the report: the five the issue names, then the mesh with the settings it
/// shipped before, for comparison.
pub fn strategies() -> Vec<Strategy> {
    let mut s = strategy::standard();
    s.push(Strategy::mesh(PREVIOUS, MeshConfig::previous()));
    s
}

/// Runs everything and writes the report files under `root`; returns the paths written.
pub fn generate(root: &Path, seeds: u64, threads: usize) -> anyhow::Result<Vec<PathBuf>> {
    let started = Instant::now();
    let strategies = strategies();
    let scenarios = scenario::all();
    let cells = run::matrix(&strategies, &scenarios, seeds, threads);
    let summaries: Vec<Summary> = cells.iter().map(Summary::of).collect();

    let rows: Vec<run::Row> = summaries.iter().map(Summary::row).collect();
    let dir = root.join("target/sim");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)? + "\n")?;

    let plot = root.join("docs").join(PLOT);
    if let Some(parent) = plot.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&plot, svg(&summaries, &strategies, "errors-5pct"))?;

    let mesh = |rows: &[Variant]| -> Vec<Strategy> {
        rows.iter()
            .map(|v| Strategy::mesh(&v.name(), v.config()))
            .collect()
    };
    let sensitivity_scenarios: Vec<Scenario> = SENSITIVITY
        .iter()
        .filter_map(|n| scenario::by_name(n))
        .collect();
    let mut sensitivity: Vec<Summary> = run::matrix(
        &mesh(&Variant::TABLE),
        &sensitivity_scenarios,
        seeds,
        threads,
    )
    .iter()
    .map(Summary::of)
    .collect();
    if let Some(low) = scenario::by_name("low-traffic-1rps") {
        sensitivity.extend(
            run::matrix(&mesh(&Variant::SLOW), &[low], seeds, threads)
                .iter()
                .map(Summary::of),
        );
    }
    let elapsed = started.elapsed().as_secs_f64();

    let doc = root.join("docs/simulations.md");
    let report = Report {
        strategies: &strategies,
        scenarios: &scenarios,
        summaries: &summaries,
        sensitivity: &sensitivity,
        seeds,
        threads,
        elapsed,
    };
    std::fs::write(&doc, report.markdown())?;
    Ok(vec![json, plot, doc])
}

struct Report<'a> {
    strategies: &'a [Strategy],
    scenarios: &'a [Scenario],
    summaries: &'a [Summary],
    sensitivity: &'a [Summary],
    seeds: u64,
    threads: usize,
    elapsed: f64,
}

fn mesh_config<'a>(strategies: &'a [Strategy], name: &str) -> Option<&'a MeshConfig> {
    strategies
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| match &s.kind {
            Kind::Mesh(c) => Some(&**c),
            _ => None,
        })
}

fn pct(p: f64) -> String {
    format!("{:.1} %", 100.0 * p)
}

impl Report<'_> {
    fn get(&self, strategy: &str, scenario: &str) -> Option<&Summary> {
        self.summaries
            .iter()
            .find(|s| s.strategy == strategy && s.scenario == scenario)
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        self.intro(&mut md);
        self.key_figures(&mut md);
        self.must_show(&mut md);
        self.defaults(&mut md);
        self.method(&mut md);
        self.all_results(&mut md);
        sources(&mut md);
        md
    }

    fn intro(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "# Rollout simulations\n\n\
             How fast does a canary judge catch a bad version, how often does it roll back a good \
             one, and how many failed requests does a bad version serve before it is stopped? \
             This page answers the three questions for the mesh's rollout controller and for \
             Flagger-, Argo Rollouts- and Kayenta-style analysis, by simulating {} rollouts of \
             each strategy in each of {} scenarios.\n\n\
             The `mesh` strategy is the rollout controller's own code: the simulator calls \
             `mesh_rollout_controller::machine::step` (which calls the judge) once a second, as \
             the controller's reconcile loop does, and feeds it windows of synthetic proxy \
             metrics. The other strategies are re-implemented from their documentation (see \
             [Sources](#sources)).\n\n\
             Generated by `cargo run -p mesh-simulations --release -- report`, which also writes \
             `target/sim/results.json`; `cargo run -p mesh-simulations --release -- run \
             --scenario errors-1pct --strategy mesh --min-samples 200 --threshold 3` runs one \
             scenario with other mesh settings. This run: {} seeds per strategy and scenario, {} \
             rollouts in all (with the comparisons of mesh settings below), {} threads, {:.0} s \
             of wall-clock time on a {}-core machine shared with other builds. Results are \
             deterministic: the same seeds give the same numbers on any number of threads.\n",
            self.seeds,
            self.scenarios.len(),
            self.seeds,
            self.seeds * (self.strategies.len() * self.scenarios.len()) as u64
                + self.seeds * self.sensitivity.len() as u64,
            self.threads,
            self.elapsed,
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        );
    }

    fn key_figures(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Key figures\n\n\
             Times are seconds from the canary's first request to the decision. \"Failed canary \
             requests\" (the blast radius) counts every failed request the canary served before \
             the decision. \"P(no verdict)\" is a rollout that ended without a pass or a fail: \
             the mesh's progress deadline passing with only inconclusive ticks, or Argo pausing \
             on an inconclusive analysis.\n"
        );
        for name in [
            "healthy",
            "errors-5pct",
            "errors-1pct",
            "latency-2x",
            "low-traffic-1rps",
        ] {
            self.scenario_table(md, name);
        }
        let _ = writeln!(
            md,
            "![Share of errors-5pct rollouts decided, against time since the canary's first \
             request]({PLOT})\n\n\
             *errors-5pct: the share of rollouts rolled back (or otherwise decided) by each time, \
             per strategy; `{PREVIOUS}` dashed. Log time axis.*\n"
        );
    }

    fn scenario_table(&self, md: &mut String, name: &str) {
        let Some(sc) = self.scenarios.iter().find(|s| s.name == name) else {
            return;
        };
        let _ = writeln!(
            md,
            "### {} — {}\n\n{}",
            sc.name,
            sc.description,
            table_header()
        );
        for s in self.strategies {
            if let Some(sum) = self.get(&s.name, name) {
                let _ = writeln!(md, "{}", table_row(sum));
            }
        }
        let _ = writeln!(md);
    }

    fn must_show(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## What the simulations must show\n\n\
             Each item is checked for `mesh`, the settings the product ships, and, for comparison, \
             for `{PREVIOUS}`, the settings it shipped before.\n"
        );
        let mut failed: Vec<&str> = Vec::new();
        for name in ["mesh", PREVIOUS] {
            let label = if name == "mesh" {
                "what ships"
            } else {
                "before the change"
            };
            let mut holds_all = |item: &'static str, holds: bool| {
                if name == "mesh" && !holds {
                    failed.push(item);
                }
            };
            let Some(config) = mesh_config(self.strategies, name) else {
                continue;
            };
            let alpha = config.judge.alpha;
            if let Some(h) = self.get(name, "healthy") {
                let (lo, hi) = stats::wilson(h.rollbacks, h.runs, 0.95);
                holds_all("healthy false rollbacks within alpha", hi <= alpha);
                let _ = writeln!(
                    md,
                    "- **healthy, `{name}` ({label}):** {} of {} healthy canaries rolled back: {} \
                     (95 % Wilson interval {} to {}), against the configured alpha of {}. {}",
                    h.rollbacks,
                    h.runs,
                    pct(h.p_rollback()),
                    pct(lo),
                    pct(hi),
                    alpha,
                    if hi <= alpha {
                        "Holds: the whole interval is below alpha."
                    } else if h.p_rollback() <= alpha {
                        "Holds on the point estimate only; the interval reaches above alpha."
                    } else {
                        "Does not hold."
                    }
                );
            }
            if let (Some(m), Some(f)) = (
                self.get(name, "errors-5pct"),
                self.get("flagger-tutorial", "errors-5pct"),
            ) {
                let p95 = m.decision_s_p95.unwrap_or(f64::INFINITY);
                let fast = p95 <= ROLLBACK_BUDGET_S && m.rollbacks == m.runs;
                let slow = f.decision_times.iter().all(|&t| t >= TUTORIAL_FLOOR_S);
                holds_all("errors-5pct rolled back within the budget at p95", fast);
                holds_all("flagger-tutorial no faster than its floor", slow);
                let within = m
                    .decision_times
                    .iter()
                    .filter(|&&t| t <= ROLLBACK_BUDGET_S)
                    .count();
                let _ = writeln!(
                    md,
                    "- **errors-5pct, `{name}` ({label}; 0.1 % -> 5 % errors at 100 RPS, canary \
                     at {} % for the first step):** rolled back in {} of runs; decision p95 {:.0} s \
                     (median {:.0} s) after the canary's first request, {} of runs decided within \
                     {:.0} s: {}. flagger-tutorial: median {:.0} s, p95 {:.0} s, fastest {:.0} s, \
                     so {} under {:.1} min ({}). Blast radius: flagger-tutorial's canary serves \
                     {:.1}x the failed requests of `{name}`'s at the median ({:.0} vs {:.0}), \
                     {:.1}x on average ({:.1} vs {:.1}).",
                    config.step_weight,
                    pct(m.p_rollback()),
                    p95,
                    m.decision_s_median.unwrap_or(f64::NAN),
                    pct(within as f64 / m.runs.max(1) as f64),
                    ROLLBACK_BUDGET_S,
                    if fast { "holds" } else { "does not hold" },
                    f.decision_s_median.unwrap_or(f64::NAN),
                    f.decision_s_p95.unwrap_or(f64::NAN),
                    f.decision_times
                        .iter()
                        .copied()
                        .reduce(f64::min)
                        .unwrap_or(f64::NAN),
                    if slow { "never" } else { "sometimes" },
                    TUTORIAL_FLOOR_S / 60.0,
                    if slow { "holds" } else { "does not hold" },
                    f.blast_failed_median / m.blast_failed_median.max(1.0),
                    f.blast_failed_median,
                    m.blast_failed_median,
                    f.blast_failed_mean / m.blast_failed_mean.max(1.0),
                    f.blast_failed_mean,
                    m.blast_failed_mean,
                );
            }
            if let Some(l) = self.get(name, "low-traffic-1rps") {
                let silent = l.promoted_on_few > 0 || l.undecided > 0;
                holds_all("low-traffic-1rps never promotes silently", !silent);
                let unpromoted = l.runs - l.promotions;
                let _ = writeln!(
                    md,
                    "- **low-traffic-1rps, `{name}` ({label}):** {} promotions, {} of them on \
                     fewer than {} canary requests{}; {} of {} rollouts ended at the progress \
                     deadline ({} s, decided at a median of {} s after the first canary request) \
                     and were rolled back with \"no conclusive analysis within \
                     progressDeadlineSeconds\", {} rolled back on a failed check, {} undecided. {}",
                    l.promotions,
                    l.promoted_on_few,
                    run::FEW_REQUESTS,
                    l.min_promote_requests
                        .map(|m| format!(" (fewest behind a promotion: {m})"))
                        .unwrap_or_default(),
                    l.inconclusive,
                    l.runs,
                    config.deadline_s,
                    fmt_s(l.decision_s_median),
                    l.rollbacks,
                    l.undecided,
                    if silent {
                        "Does not hold.".to_string()
                    } else if unpromoted == l.inconclusive + l.rollbacks {
                        format!(
                            "Holds: it never promotes without the {} requests a side its \
                             comparisons need, and every rollout it does not promote ends with a \
                             stated reason.",
                            config.judge.min_samples
                        )
                    } else {
                        "Holds: no promotion on too little evidence.".to_string()
                    }
                );
            }
        }
        let _ = writeln!(
            md,
            "\n{}\n",
            if failed.is_empty() {
                "**For `mesh`, every item holds.**".to_string()
            } else {
                format!("**For `mesh`, these do not hold: {}.**", failed.join("; "))
            }
        );
    }

    fn defaults(&self, md: &mut String) {
        let current = MeshConfig::default();
        let previous = MeshConfig::previous();
        let _ = writeln!(
            md,
            "## What the simulations taught us, and what changed\n\n\
             `mesh` runs what the product ships: the Canary of `examples/mesh.yaml` and of `mesh \
             demo` (interval {}s, threshold {}, stepWeight {}, maxWeight {}, \
             progressDeadlineSeconds {}, both absolute gates) with `JudgeConfig::default()` ({}). \
             An earlier run of this report recommended three changes to the defaults, and they \
             were made: {}. `{PREVIOUS}` runs the settings from before (threshold {}, \
             progressDeadlineSeconds {}, {}) on the same seeds, so \
             every table on this page shows before and after side by side.\n",
            current.interval_s,
            current.threshold,
            current.step_weight,
            current.max_weight,
            current.deadline_s,
            describe_judge(&current),
            changes(&previous, &current).join(", "),
            previous.threshold,
            previous.deadline_s,
            describe_judge(&previous),
        );
        for line in self.findings() {
            let _ = writeln!(md, "{line}");
        }
        let _ = writeln!(md);
    }

    fn method(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Method\n\n\
             **Traffic.** Time advances in one-second steps. In each second, the requests \
             reaching each arm are Poisson with mean rate x weight; failures are binomial with \
             the arm's failure probability at that second; latencies are spread over Linkerd's \
             histogram buckets (1 ms to 50 s, then +Inf) by a multinomial draw from a log-normal \
             with median 20 ms and p99 100 ms (times a factor for slower canaries). Counts are \
             what the callers' proxies export as `response_total` and \
             `response_latency_ms_bucket`; the simulator hands strategies the same \
             `judge::Window` (requests, failures, cumulative histogram per arm) that both metric \
             sources build. Bursts and metric outages start at exponential gaps and are drawn \
             from the scenario and seed only, so every strategy meets the same events for one \
             seed; request counts come from a per-strategy stream.\n\n\
             **Weights.** A weight change takes effect at once for the next second's traffic. \
             Time to decision runs from the first second with canary traffic to the decision \
             (promotion, rollback, deadline or pause); nothing after the decision is counted.\n\n\
             **`mesh`.** The simulator reconciles once a second like the controller: it builds \
             `machine::Observations` (revision, readiness, and, when an analysis tick is due, the \
             window since the previous successful read, as the direct-scrape source delivers it: \
             empty on the first read of a rollout, `None` when the source is down), calls \
             `machine::step` with the spec and a `JudgeConfig`, applies `SetWeights`, and stops \
             when the phase becomes Promoting (a promotion) or Failed (a rollback when \
             `failedChecks` reached the threshold, otherwise the progress deadline with no \
             conclusive verdict). `run --strategy mesh` takes `--alpha`, `--min-samples`, \
             `--min-window-samples`, `--error-effect`, `--latency-effect`, `--slow-quantile`, \
             `--interval`, `--threshold`, `--deadline` and `--no-absolute-gates` to try other \
             settings.\n\n\
             **`flagger-default`.** Every `interval` (60 s) with the canary taking traffic, the \
             success rate (over 1 m) must be >= 99 % and the p99 (over 1 m, interpolated in the \
             histogram as `histogram_quantile` does) <= 500 ms. A query with no data is a failed \
             check. Failed checks add up over the rollout and freeze the weight; the rollout is \
             rolled back when they reach `threshold` (5). A passing check steps the weight by 10 \
             up to 50; a passing check at 50 promotes. The first iteration only routes traffic \
             to the canary.\n\n\
             **`flagger-tutorial`.** The same with the Linkerd tutorial's settings: interval \
             30 s, threshold 5, stepWeight 10, maxWeight 50, success rate over 1 m, p99 over \
             30 s.\n\n\
             **`argo`.** Steps `setWeight` 10, 20, 30, 40, 50, each followed by a 1 m pause, then \
             full promotion. A background analysis measures the canary's success rate \
             (`successCondition: result[0] >= 0.99`, `failureCondition: result[0] < 0.99`) and \
             p99 (<= 500 ms) over the last minute, every minute after a 1 m `initialDelay`. A \
             measurement with no data satisfies neither condition and is Inconclusive; an \
             unreachable source is an Error. `failureLimit: 3` (the documented example's \
             value; the analysis fails at the 4th failed measurement of a metric and the \
             rollout aborts), `inconclusiveLimit: 0` and `consecutiveErrorLimit: 4` (their \
             defaults): the first inconclusive measurement makes the run Inconclusive and the \
             rollout pauses for a person, counted here as \"no verdict\"; a 5th consecutive \
             error aborts.\n\n\
             **`kayenta`.** Spinnaker-style canary analysis: the canary and a fresh baseline of \
             the old version each take 10 % of traffic for a 5 m lifetime, judged every minute \
             over all data since the start (growing lookback). Each metric (error rate, p99 \
             latency) is a series with one point per 10 s step and arm; a Mann-Whitney U test \
             (two-sided, 98 % confidence, normal approximation with tie correction) marks a \
             metric failed when the canary is significantly higher. The interval's score is the \
             percentage of metrics that pass among those with data (a metric with no data on \
             either side is left out; no data at all scores 0). A score below the marginal \
             threshold (75) fails the canary at once; at the end, a score of at least the pass \
             threshold (95) promotes it, anything less fails it. Each judgement is a fixed-sample \
             test repeated every interval.\n\n\
             **Statistics.** Medians and 95th percentiles interpolate between order statistics; \
             intervals for proportions are Wilson score intervals.\n\n\
             ### Scenarios\n\n\
             | scenario | what happens | right outcome |\n|---|---|---|"
        );
        for s in self.scenarios {
            let expect = match s.expect {
                Expect::Promote => "promote",
                Expect::Rollback => "roll back",
                Expect::NoSilentPromotion => "no promotion without evidence",
            };
            let _ = writeln!(md, "| {} | {} | {} |", s.name, s.description, expect);
        }
        let _ = writeln!(md);
    }

    fn all_results(&self, md: &mut String) {
        let _ = writeln!(md, "## All results\n");
        for s in self.scenarios {
            self.scenario_table(md, s.name);
        }
    }
}

fn ratio(k: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { k as f64 / n as f64 }
}

/// The judge settings in words.
pub fn describe_judge(c: &MeshConfig) -> String {
    let j = &c.judge;
    format!(
        "alpha {}, min_samples {}, min_window_samples {}, window_alpha {}, promote_alpha {}, \
         error_ratio {}, error_floor {}, slow_ratio {}, slow_floor {}, slow_quantile {}",
        j.alpha,
        j.min_samples,
        j.min_window_samples,
        j.window_alpha,
        j.promote_alpha,
        j.error_ratio,
        j.error_floor,
        j.slow_ratio,
        j.slow_floor,
        j.slow_quantile
    )
}

/// Each setting `to` changes from `from`, as `name old -> new`.
pub fn changes(from: &MeshConfig, to: &MeshConfig) -> Vec<String> {
    let (a, b) = (&from.judge, &to.judge);
    let mut parts = Vec::new();
    let mut cmp = |name: &str, x: String, y: String| {
        if x != y {
            parts.push(format!("{name} {x} -> {y}"));
        }
    };
    cmp("alpha", a.alpha.to_string(), b.alpha.to_string());
    cmp(
        "min_samples",
        a.min_samples.to_string(),
        b.min_samples.to_string(),
    );
    cmp(
        "min_window_samples",
        a.min_window_samples.to_string(),
        b.min_window_samples.to_string(),
    );
    cmp(
        "window_alpha",
        a.window_alpha.to_string(),
        b.window_alpha.to_string(),
    );
    cmp(
        "promote_alpha",
        a.promote_alpha.to_string(),
        b.promote_alpha.to_string(),
    );
    cmp(
        "stepWeight",
        from.step_weight.to_string(),
        to.step_weight.to_string(),
    );
    cmp(
        "slow_quantile",
        a.slow_quantile.to_string(),
        b.slow_quantile.to_string(),
    );
    cmp(
        "interval",
        format!("{}s", from.interval_s),
        format!("{}s", to.interval_s),
    );
    cmp(
        "threshold",
        from.threshold.to_string(),
        to.threshold.to_string(),
    );
    cmp(
        "progressDeadlineSeconds",
        from.deadline_s.to_string(),
        to.deadline_s.to_string(),
    );
    cmp(
        "absolute gates",
        from.absolute_gates.to_string(),
        to.absolute_gates.to_string(),
    );
    parts
}

/// What `to` changes from `from`, in words.
pub fn describe_change(from: &MeshConfig, to: &MeshConfig) -> String {
    let parts = changes(from, to);
    if parts.is_empty() {
        "the same settings".into()
    } else {
        format!("the same Canary and judge except {}", parts.join(", "))
    }
}

fn sources(md: &mut String) {
    let _ = writeln!(
        md,
        "## Sources\n\n\
         The baselines follow these pages; no code was copied from the projects.\n\n\
         - Flagger, metrics analysis (built-in `request-success-rate` and `request-duration`, \
         `thresholdRange`, metric `interval`): <https://docs.flagger.app/usage/metrics>\n\
         - Flagger, deployment strategies (canary analysis: `interval`, `threshold` as the number \
         of failed checks before rollback, `stepWeight`, `maxWeight`, the weight held while checks \
         fail; the analysis needs traffic, which is why Flagger's examples run a load tester): \
         <https://docs.flagger.app/usage/deployment-strategies>\n\
         - Flagger, Linkerd canary deployments tutorial (interval 30 s, threshold 5, \
         request-success-rate over 1 m, request-duration over 30 s): \
         <https://docs.flagger.app/tutorials/linkerd-progressive-delivery>\n\
         - Argo Rollouts, analysis and progressive delivery (background analysis, \
         `successCondition`/`failureCondition`, `failureLimit`, `inconclusiveLimit`, \
         `consecutiveErrorLimit`, `initialDelay`; Successful/Failed/Inconclusive runs continue, \
         abort or pause the rollout): <https://argoproj.github.io/argo-rollouts/features/analysis/>\n\
         - Argo Rollouts, Kayenta provider (Mann-Whitney analysis through Kayenta, score \
         thresholds `pass` and `marginal`): <https://argoproj.github.io/argo-rollouts/analysis/kayenta/>\n\
         - Spinnaker, adding a canary stage (real-time analysis, interval, lifetime, lookback, \
         marginal and pass score thresholds): <https://spinnaker.io/guides/user/canary/stage/>\n\
         - Spinnaker, how canary judgment works (the default NetflixACAJudge: data validation, a \
         Mann-Whitney U test per metric, classification, the score as the share of passing \
         metrics): <https://spinnaker.io/guides/user/canary/judge>\n\
         - Spinnaker, canary best practices (compare against a baseline deployed at the same time \
         with the same size and traffic): <https://spinnaker.io/guides/user/canary/best-practices>\n\
         - Mixture sequential probability ratio tests and always-valid p-values, as used by the \
         mesh judge: Johari, Pekelis, Walsh, \"Always Valid Inference: Bringing Sequential \
         Analysis to A/B Testing\" (2015), <https://arxiv.org/abs/1512.04922>"
    );
}

/// An SVG plot: for each strategy, the share of `scenario` rollouts decided by time t.
pub fn svg(summaries: &[Summary], strategies: &[Strategy], scenario: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    const T_MIN: f64 = 1.0;
    const T_MAX: f64 = 1000.0;
    let colours = [
        "#1b7837", "#d6604d", "#b2182b", "#2166ac", "#8073ac", "#5aae61", "#e08214",
    ];
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |t: f64| {
        LEFT + pw * (t.clamp(T_MIN, T_MAX).log10() - T_MIN.log10())
            / (T_MAX.log10() - T_MIN.log10())
    };
    let y = |f: f64| TOP + ph * (1.0 - f);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{scenario}: share of rollouts decided by time since the canary's first request</text>"#
    );
    for t in [1.0, 10.0, 100.0, 1000.0] {
        let xt = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{TOP}" x2="{xt:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{t} s</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    for t in [2.0, 3.0, 5.0, 15.0, 30.0, 60.0, 150.0, 300.0] {
        let xt = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{TOP}" x2="{xt:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
            TOP + ph
        );
        if [15.0, 150.0].contains(&t) {
            let _ = writeln!(
                s,
                r##"<text x="{xt:.1}" y="{:.1}" text-anchor="middle" fill="#888">{t}</text>"##,
                TOP + ph + 32.0
            );
        }
    }
    for f in [0.0, 0.25, 0.5, 0.75, 0.95, 1.0] {
        let yf = y(f);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yf:.1}" x2="{:.1}" y2="{yf:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0} %</text>"##,
            LEFT + pw,
            if f == 0.95 { "#bbb" } else { "#ddd" },
            LEFT - 6.0,
            yf + 4.0,
            f * 100.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds (log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 6.0
    );
    for (i, st) in strategies.iter().enumerate() {
        let Some(sum) = summaries
            .iter()
            .find(|m| m.strategy == st.name && m.scenario == scenario)
        else {
            continue;
        };
        let colour = colours[i % colours.len()];
        let mut times = sum.decision_times.clone();
        times.sort_by(f64::total_cmp);
        let n = sum.runs.max(1) as f64;
        let mut points = format!("{:.1},{:.1}", x(T_MIN), y(0.0));
        let mut done = 0.0;
        for (k, t) in times.iter().enumerate() {
            // One step per distinct time: draw it at the last run decided at `t`.
            if times.get(k + 1) == Some(t) {
                continue;
            }
            let before = done;
            done = (k + 1) as f64 / n;
            let _ = write!(
                points,
                " {:.1},{:.1} {:.1},{:.1}",
                x(*t),
                y(before),
                x(*t),
                y(done)
            );
        }
        let _ = write!(points, " {:.1},{:.1}", x(T_MAX), y(done));
        let dash = if st.name == PREVIOUS {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            st.name
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

impl Report<'_> {
    fn variant(&self, v: Variant, scenario: &str) -> Option<&Summary> {
        let name = v.name();
        self.sensitivity
            .iter()
            .find(|s| s.strategy == name && s.scenario == scenario)
    }

    fn sensitivity_table(&self) -> Vec<String> {
        let mut out = vec![
            "| mesh settings | healthy: P(rollback) | healthy: promotion median (s) | errors-5pct: decision p95 (s) | errors-1pct: P(rollback) | errors-0.5pct: P(rollback) | latency-1.2x: P(rollback) | noisy-primary: P(rollback) | diurnal: P(no verdict) | metric-gaps: P(no verdict) |".to_string(),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_string(),
        ];
        for v in Variant::TABLE {
            let p = |sc: &str| {
                self.variant(v, sc)
                    .map_or("-".into(), |s| format!("{:.3}", s.p_rollback()))
            };
            let nv = |sc: &str| {
                self.variant(v, sc)
                    .map_or("-".into(), |s| format!("{:.3}", s.p_inconclusive()))
            };
            out.push(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                v.name(),
                p("healthy"),
                fmt_s(self.variant(v, "healthy").and_then(|s| s.promote_s_median)),
                fmt_s(
                    self.variant(v, "errors-5pct")
                        .and_then(|s| s.decision_s_p95)
                ),
                p("errors-1pct"),
                p("errors-0.5pct"),
                p("latency-1.2x"),
                p("noisy-primary"),
                nv("diurnal"),
                nv("metric-gaps"),
            ));
        }
        out
    }

    /// The settings table and the round-2 notes, as markdown lines.
    fn findings(&self) -> Vec<String> {
        let mut out = self.sensitivity_table();
        out.push(String::new());
        out.push(NOTES.trim_end().to_string());
        out
    }
}
