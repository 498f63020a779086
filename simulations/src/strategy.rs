//! The strategies under comparison. `mesh` drives the rollout controller's real state machine
//! ([`machine::step`]) and judge; the others re-implement, from their documentation, how
//! Flagger, Argo Rollouts and a Kayenta-style judge decide. Every strategy runs against the same
//! kind of [`World`] and reports the same [`Outcome`].

use chrono::{DateTime, Utc};
use mesh_crds::{CanaryPhase, CanarySpec, CanaryStatus};
use mesh_rollout_controller::judge::{JudgeConfig, Window};
use mesh_rollout_controller::machine::{self, Action, Observations};
use mesh_rollout_controller::schedule::Schedule;

use crate::scenario::Scenario;
use crate::stats;
use crate::traffic::{HORIZON_S, World};

/// How a simulated rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The canary was promoted.
    Promote,
    /// The canary was rolled back because its analysis failed.
    Rollback,
    /// The rollout stopped without a verdict: the mesh's progress deadline passed with only
    /// inconclusive ticks, or Argo paused on an inconclusive analysis.
    Inconclusive,
    /// Nothing was decided within [`HORIZON_S`].
    Undecided,
}

/// The result of one simulated rollout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// What was decided.
    pub decision: Decision,
    /// Seconds from the canary's first traffic to the decision.
    pub decision_s: Option<f64>,
    /// Failed requests the canary served before the decision.
    pub blast_failed: u64,
    /// Requests the canary served before the decision.
    pub canary_requests: u64,
}

fn finish(world: &World, first_traffic: Option<u64>, decision: Decision) -> Outcome {
    let now = world.now();
    let (c, _) = world.sum(0, now);
    Outcome {
        decision,
        decision_s: match decision {
            Decision::Undecided => None,
            _ => Some(first_traffic.map_or(0.0, |f| now.saturating_sub(f) as f64)),
        },
        blast_failed: c.failures,
        canary_requests: c.requests,
    }
}

/// The mesh's own rollout: a Canary spec and a judge configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// `analysis.interval` in seconds.
    pub interval_s: u64,
    /// `analysis.threshold`.
    pub threshold: i32,
    /// `analysis.stepWeight`.
    pub step_weight: i32,
    /// `analysis.maxWeight`.
    pub max_weight: i32,
    /// `progressDeadlineSeconds`.
    pub deadline_s: i32,
    /// Whether the spec lists Flagger's absolute gates (success rate >= 99 %, p99 <= 500 ms);
    /// without them only the sequential comparisons judge.
    pub absolute_gates: bool,
    /// The judge's tuning.
    pub judge: JudgeConfig,
}

impl Default for MeshConfig {
    /// What the product ships: the Canary of `examples/mesh.yaml` and of `mesh demo` (interval
    /// 5 s, `threshold: 2`, stepWeight 10, maxWeight 50, `progressDeadlineSeconds: 600`, both
    /// absolute gates) with the judge's defaults.
    fn default() -> Self {
        Self {
            interval_s: 5,
            threshold: 2,
            step_weight: 10,
            max_weight: 50,
            deadline_s: 600,
            absolute_gates: true,
            judge: JudgeConfig::default(),
        }
    }
}

impl MeshConfig {
    /// The expected `(canary, primary)` requests of each analysis interval in the first
    /// `seconds` of a rollout at `rps`, when every tick steps the weight (the fastest this
    /// Canary's schedule allows): `stepWeight` % for the first interval, twice that for the
    /// second, up to `maxWeight`; the last stretch is cut at `seconds`.
    pub fn fastest_windows(&self, rps: f64, seconds: f64) -> Vec<(f64, f64)> {
        let interval = self.interval_s.max(1) as f64;
        let mut windows = Vec::new();
        let mut start = 0.0;
        let mut weight = 0;
        while start < seconds {
            weight = (weight + self.step_weight).min(self.max_weight);
            let share = f64::from(weight) / 100.0;
            let length = interval.min(seconds - start);
            windows.push((rps * length * share, rps * length * (1.0 - share)));
            start += interval;
        }
        windows
    }

    /// The Canary spec this configuration stands for.
    pub fn spec(&self) -> Result<CanarySpec, serde_json::Error> {
        let interval = format!("{}s", self.interval_s);
        let metrics = if self.absolute_gates {
            serde_json::json!([
                {"name": "request-success-rate", "thresholdRange": {"min": 99.0}, "interval": interval},
                {"name": "request-duration", "thresholdRange": {"max": 500.0}, "interval": interval},
            ])
        } else {
            serde_json::json!([])
        };
        serde_json::from_value(serde_json::json!({
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
            "service": {"port": 8080},
            "progressDeadlineSeconds": self.deadline_s,
            "analysis": {
                "interval": interval,
                "threshold": self.threshold,
                "stepWeight": self.step_weight,
                "maxWeight": self.max_weight,
                "metrics": metrics,
            },
        }))
    }
}

/// Flagger's analysis settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FlaggerConfig {
    /// `analysis.interval` in seconds.
    pub interval_s: u64,
    /// `analysis.threshold`: failed checks before rollback.
    pub threshold: u32,
    /// `analysis.stepWeight`.
    pub step_weight: i32,
    /// `analysis.maxWeight`.
    pub max_weight: i32,
    /// `request-success-rate` window (`metrics[].interval`) in seconds.
    pub success_window_s: u64,
    /// `request-duration` window in seconds.
    pub duration_window_s: u64,
    /// Lowest accepted success rate, percent.
    pub min_success: f64,
    /// Highest accepted p99, milliseconds.
    pub max_p99_ms: f64,
}

impl FlaggerConfig {
    /// Flagger's defaults and its documented example: a check every minute, five failed checks
    /// roll back, 10 % steps to 50 %, success rate >= 99 % and p99 <= 500 ms over one minute.
    pub fn default_settings() -> Self {
        Self {
            interval_s: 60,
            threshold: 5,
            step_weight: 10,
            max_weight: 50,
            success_window_s: 60,
            duration_window_s: 60,
            min_success: 99.0,
            max_p99_ms: 500.0,
        }
    }

    /// The Linkerd tutorial's settings: a check every 30 s, threshold 5, 10 % steps to 50 %,
    /// success rate over 1 m, p99 over 30 s.
    pub fn tutorial() -> Self {
        Self {
            interval_s: 30,
            duration_window_s: 30,
            ..Self::default_settings()
        }
    }
}

/// Argo Rollouts: canary steps with a background analysis.
#[derive(Clone, Debug, PartialEq)]
pub struct ArgoConfig {
    /// `setWeight` steps, each followed by a pause of `pause_s`.
    pub weights: Vec<i32>,
    /// Pause after each `setWeight`, in seconds.
    pub pause_s: u64,
    /// Measurement interval, seconds.
    pub interval_s: u64,
    /// `initialDelay` before the first measurement, seconds.
    pub initial_delay_s: u64,
    /// The query's range, seconds.
    pub window_s: u64,
    /// `failureLimit`: the analysis fails when failed measurements of a metric exceed it.
    pub failure_limit: u32,
    /// `inconclusiveLimit`: the analysis is inconclusive (the rollout pauses) when
    /// inconclusive measurements of a metric exceed it.
    pub inconclusive_limit: u32,
    /// `consecutiveErrorLimit`: the analysis errors (and the rollout aborts) when consecutive
    /// measurement errors exceed it.
    pub consecutive_error_limit: u32,
    /// `successCondition: result[0] >= min_success` (a ratio); `failureCondition` is its negation,
    /// so only a missing value (NaN) is inconclusive.
    pub min_success: f64,
    /// The same for the p99 latency metric, milliseconds.
    pub max_p99_ms: f64,
}

impl Default for ArgoConfig {
    fn default() -> Self {
        Self {
            weights: vec![10, 20, 30, 40, 50],
            pause_s: 60,
            interval_s: 60,
            initial_delay_s: 60,
            window_s: 60,
            failure_limit: 3,
            inconclusive_limit: 0,
            consecutive_error_limit: 4,
            min_success: 0.99,
            max_p99_ms: 500.0,
        }
    }
}

/// A Kayenta-style judge: a fixed-sample Mann-Whitney U test per metric at each interval,
/// turned into a score and compared with thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct KayentaConfig {
    /// Canary weight during the analysis; a baseline of the old version gets the same share.
    pub weight: i32,
    /// Seconds between judgements.
    pub interval_s: u64,
    /// Length of the whole analysis, seconds; promotion follows when the last score passes.
    pub lifetime_s: u64,
    /// Resolution of the metric series (one data point per step and arm), seconds.
    pub step_s: u64,
    /// A metric fails when the test's two-sided p-value is below this and the canary is worse
    /// (confidence 98 %).
    pub p_threshold: f64,
    /// An interval score below this stops the analysis and fails the canary.
    pub marginal: f64,
    /// The final score needed to pass.
    pub pass: f64,
}

impl Default for KayentaConfig {
    fn default() -> Self {
        Self {
            weight: 10,
            interval_s: 60,
            lifetime_s: 300,
            step_s: 10,
            p_threshold: 0.02,
            marginal: 75.0,
            pass: 95.0,
        }
    }
}

/// What decides a simulated rollout.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// The mesh's state machine and judge.
    Mesh(Box<MeshConfig>),
    /// Flagger's analysis.
    Flagger(FlaggerConfig),
    /// Argo Rollouts' background analysis.
    Argo(ArgoConfig),
    /// A Kayenta-style judge.
    Kayenta(KayentaConfig),
}

/// A named strategy.
#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    /// Name used in tables and `results.json`.
    pub name: String,
    /// How it decides.
    pub kind: Kind,
}

impl Strategy {
    /// The mesh with `config`, under `name`.
    pub fn mesh(name: &str, config: MeshConfig) -> Self {
        Self {
            name: name.into(),
            kind: Kind::Mesh(Box::new(config)),
        }
    }

    /// Runs one rollout of `scenario` with `seed`.
    pub fn run(&self, scenario: &Scenario, seed: u64) -> Outcome {
        // Every strategy draws from the same streams for one seed (common random numbers), so
        // two strategies with the same settings give the same outcomes.
        let mut world = World::new(scenario, seed, 0);
        match &self.kind {
            Kind::Mesh(c) => run_mesh(c, &mut world),
            Kind::Flagger(c) => run_flagger(c, &mut world),
            Kind::Argo(c) => run_argo(c, &mut world),
            Kind::Kayenta(c) => run_kayenta(c, &mut world),
        }
    }
}

/// The five strategies the issue names, with their documented settings.
pub fn standard() -> Vec<Strategy> {
    vec![
        Strategy::mesh("mesh", MeshConfig::default()),
        Strategy {
            name: "flagger-default".into(),
            kind: Kind::Flagger(FlaggerConfig::default_settings()),
        },
        Strategy {
            name: "flagger-tutorial".into(),
            kind: Kind::Flagger(FlaggerConfig::tutorial()),
        },
        Strategy {
            name: "argo".into(),
            kind: Kind::Argo(ArgoConfig::default()),
        },
        Strategy {
            name: "kayenta".into(),
            kind: Kind::Kayenta(KayentaConfig::default()),
        },
    ]
}

fn share(weight: i32) -> f64 {
    f64::from(weight.clamp(0, 100)) / 100.0
}

/// An arbitrary fixed start time: the machine reads only differences of times.
fn at(t: u64) -> DateTime<Utc> {
    let start = DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default();
    start + chrono::Duration::seconds(i64::try_from(t).unwrap_or(i64::MAX))
}

/// Drives [`machine::step`] as the controller does: a reconcile every second, the metrics
/// window read only when an analysis tick is due, from a source that differences counters
/// between successful reads (the embedded direct scrape; its first read after a new rollout
/// returns an empty window, and an unreadable source makes the tick's window `None`), and on
/// the reconciles between ticks a look at the traffic since the last read, which leaves the
/// baseline where it was (`DirectScrape::peek`).
fn run_mesh(config: &MeshConfig, world: &mut World) -> Outcome {
    let Ok(spec) = config.spec() else {
        return finish(world, None, Decision::Undecided);
    };
    let Ok(schedule) = Schedule::of(&spec) else {
        return finish(world, None, Decision::Undecided);
    };
    let mut status = CanaryStatus {
        phase: CanaryPhase::Initialized,
        last_applied_spec: Some("v1".into()),
        last_promoted_spec: Some("v1".into()),
        ..CanaryStatus::default()
    };
    let mut weight = 0;
    let mut last_read: Option<u64> = None;
    let mut first_traffic = None;
    while world.now() < HORIZON_S {
        let t = world.now();
        let analysing = schedule.analysing(&status, true, at(t));
        let window: Option<Window> = if analysing {
            if world.source_up(t) {
                let w = last_read.map_or_else(Window::default, |from| world.window(from, t));
                last_read = Some(t);
                Some(w)
            } else {
                None
            }
        } else {
            None
        };
        // Between ticks, the controller looks at the traffic since the last read without
        // moving the baseline, when the source answers and has one.
        let look: Option<Window> = if !analysing
            && config.judge.look_between_ticks
            && schedule.looking(&status, true, at(t))
            && world.source_up(t)
        {
            last_read.map(|from| world.window(from, t))
        } else {
            None
        };
        let obs = Observations {
            now: at(t),
            revision: "v2".into(),
            primary_ready: true,
            canary_ready: true,
            window,
            look,
            ..Observations::default()
        };
        let Ok(step) = machine::step(&spec, &status, &obs, &config.judge) else {
            return finish(world, first_traffic, Decision::Undecided);
        };
        for action in &step.actions {
            match action {
                Action::SetWeights { canary, .. } => weight = *canary,
                Action::ScaleCanaryUp => last_read = None,
                _ => {}
            }
        }
        status = step.status;
        match status.phase {
            CanaryPhase::Promoting
            | CanaryPhase::WaitingPromotion
            | CanaryPhase::Finalising
            | CanaryPhase::Succeeded => return finish(world, first_traffic, Decision::Promote),
            CanaryPhase::Failed => {
                let decision = match status.decision.as_ref().map(|d| d.outcome) {
                    Some(mesh_crds::canary::Outcome::RolledBack) => Decision::Rollback,
                    _ => Decision::Inconclusive,
                };
                return finish(world, first_traffic, decision);
            }
            _ => {}
        }
        if weight > 0 && first_traffic.is_none() {
            first_traffic = Some(t);
        }
        world.advance(share(weight), 1.0 - share(weight));
    }
    finish(world, first_traffic, Decision::Undecided)
}

/// Flagger: at each interval, with the canary taking traffic, every metric is queried over its
/// own window; a missing value ("no values found") or one outside its range is a failed check.
/// Failed checks add up over the rollout and freeze the weight; reaching `threshold` rolls back.
/// A passing check steps the weight, and a passing check at `maxWeight` promotes.
fn run_flagger(c: &FlaggerConfig, world: &mut World) -> Outcome {
    let mut weight = 0;
    let mut failed = 0;
    let mut first_traffic = None;
    while world.now() < HORIZON_S {
        let t = world.now();
        if t.is_multiple_of(c.interval_s) {
            if weight == 0 {
                // The first iteration routes traffic to the canary; there is nothing to check.
                weight = c.step_weight.min(c.max_weight);
            } else {
                let ok = world.source_up(t) && {
                    let sw = world.window(t.saturating_sub(c.success_window_s), t);
                    let dw = world.window(t.saturating_sub(c.duration_window_s), t);
                    let success = (sw.canary.requests > 0).then(|| {
                        100.0 * (sw.canary.requests - sw.canary.failures) as f64
                            / sw.canary.requests as f64
                    });
                    let p99 = dw.canary.latency.quantile(0.99);
                    success.is_some_and(|s| s >= c.min_success)
                        && p99.is_some_and(|p| p <= c.max_p99_ms)
                };
                if !ok {
                    failed += 1;
                    if failed >= c.threshold {
                        return finish(world, first_traffic, Decision::Rollback);
                    }
                } else if weight >= c.max_weight {
                    return finish(world, first_traffic, Decision::Promote);
                } else {
                    weight = (weight + c.step_weight).min(c.max_weight);
                }
            }
        }
        if weight > 0 && first_traffic.is_none() {
            first_traffic = Some(t);
        }
        world.advance(share(weight), 1.0 - share(weight));
    }
    finish(world, first_traffic, Decision::Undecided)
}

/// Argo Rollouts: `setWeight` / `pause` steps, with a background analysis run measuring the
/// canary's success rate and p99 every interval after an initial delay. Each measurement is
/// Successful, Failed, Inconclusive (no value: both conditions false on NaN) or Error (the
/// source did not answer). The run fails when a metric's failed measurements exceed
/// `failureLimit` (the rollout aborts), is inconclusive when they exceed `inconclusiveLimit`
/// (the rollout pauses for a person), and errors after more than `consecutiveErrorLimit`
/// consecutive errors (the rollout aborts). Finishing the steps promotes.
fn run_argo(c: &ArgoConfig, world: &mut World) -> Outcome {
    let end = c.pause_s * c.weights.len() as u64;
    let mut failed = [0u32; 2];
    let mut inconclusive = [0u32; 2];
    let mut errors = 0;
    let mut first_traffic = None;
    while world.now() < HORIZON_S {
        let t = world.now();
        if t >= c.initial_delay_s && (t - c.initial_delay_s).is_multiple_of(c.interval_s) {
            if world.source_up(t) {
                errors = 0;
                let w = world.window(t.saturating_sub(c.window_s), t);
                let success = (w.canary.requests > 0).then(|| {
                    (w.canary.requests - w.canary.failures) as f64 / w.canary.requests as f64
                });
                let p99 = w.canary.latency.quantile(0.99);
                let results = [
                    success.map(|s| s >= c.min_success),
                    p99.map(|p| p <= c.max_p99_ms),
                ];
                for (i, r) in results.iter().enumerate() {
                    match r {
                        Some(true) => {}
                        Some(false) => failed[i] += 1,
                        None => inconclusive[i] += 1,
                    }
                }
                if failed.iter().any(|&f| f > c.failure_limit) {
                    return finish(world, first_traffic, Decision::Rollback);
                }
                if inconclusive.iter().any(|&n| n > c.inconclusive_limit) {
                    return finish(world, first_traffic, Decision::Inconclusive);
                }
            } else {
                errors += 1;
                if errors > c.consecutive_error_limit {
                    return finish(world, first_traffic, Decision::Rollback);
                }
            }
        }
        if t >= end {
            return finish(world, first_traffic, Decision::Promote);
        }
        let step = usize::try_from(t / c.pause_s.max(1)).unwrap_or(usize::MAX);
        let weight = c.weights.get(step).copied().unwrap_or(0);
        if weight > 0 && first_traffic.is_none() {
            first_traffic = Some(t);
        }
        world.advance(share(weight), 1.0 - share(weight));
    }
    finish(world, first_traffic, Decision::Undecided)
}

/// Kayenta-style: the canary and a baseline of the old version each take `weight` of the
/// traffic. Every interval, each metric's series since the start (one point per step: the
/// error rate, and the p99 latency) is compared with a Mann-Whitney U test; a metric fails
/// when the canary is significantly worse. The interval's score is the share of metrics that
/// pass among those with data. A score below `marginal` fails the canary at once; at the end of
/// the lifetime, a score of at least `pass` promotes it.
fn run_kayenta(c: &KayentaConfig, world: &mut World) -> Outcome {
    let mut first_traffic = None;
    while world.now() < HORIZON_S {
        let t = world.now();
        if t > 0 && t.is_multiple_of(c.interval_s) {
            let score = kayenta_score(c, world, t);
            if score < c.marginal {
                return finish(world, first_traffic, Decision::Rollback);
            }
            if t >= c.lifetime_s {
                let decision = if score >= c.pass {
                    Decision::Promote
                } else {
                    Decision::Rollback
                };
                return finish(world, first_traffic, decision);
            }
        }
        if first_traffic.is_none() {
            first_traffic = Some(t);
        }
        // The primary arm stands for the baseline; the rest of the primary's traffic is not
        // compared and not simulated.
        world.advance(share(c.weight), share(c.weight));
    }
    finish(world, first_traffic, Decision::Undecided)
}

/// The score of one Kayenta-style judgement at time `t`, over every step since the start.
pub fn kayenta_score(c: &KayentaConfig, world: &World, t: u64) -> f64 {
    let mut series: [[Vec<f64>; 2]; 2] = Default::default();
    let mut from = 0;
    while from + c.step_s <= t {
        let to = from + c.step_s;
        // A step the source could not be read in has no data point.
        if world.source_up(to - 1) {
            let w = world.window(from, to);
            for (arm, a) in [&w.canary, &w.primary].into_iter().enumerate() {
                if a.requests > 0 {
                    series[0][arm].push(a.failures as f64 / a.requests as f64);
                }
                if let Some(p) = a.latency.quantile(0.99) {
                    series[1][arm].push(p);
                }
            }
        }
        from = to;
    }
    let mut with_data = 0;
    let mut pass = 0;
    for [canary, baseline] in &series {
        let Some((u, p)) = stats::mann_whitney(canary, baseline) else {
            continue;
        };
        with_data += 1;
        let canary_higher = u > canary.len() as f64 * baseline.len() as f64 / 2.0;
        if !(p < c.p_threshold && canary_higher) {
            pass += 1;
        }
    }
    if with_data == 0 {
        // No metric has data: nothing supports the canary.
        return 0.0;
    }
    100.0 * f64::from(pass) / f64::from(with_data)
}
