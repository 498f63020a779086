//! The canary judge: per-tick gates over one window of proxy metrics, and sequential
//! canary-vs-primary comparisons over everything seen since the rollout started.
//!
//! Two kinds of gate run at every analysis tick:
//! - Flagger's absolute thresholds, on the canary's numbers in the last window: the built-in
//!   gates defined in `mesh_core::gates` (`request-success-rate`, percent, `thresholdRange.min`,
//!   default 99; `request-duration`, p99 in ms, `thresholdRange.max`, default 500), whose
//!   [`Measure`]s are computed here; custom metrics against their range.
//! - Sequential comparisons of the canary with the primary, on totals accumulated in the status:
//!   the share of failed requests and the share of slow requests. Each is a one-sided mixture
//!   sequential probability ratio test (mSPRT, normal mixture over the difference of two
//!   proportions). Its p-value is *always valid*: checking it at every tick, for as long as the
//!   rollout runs, keeps the chance of failing a canary that is as good as the primary at or below
//!   `alpha`. A fixed-sample test checked every tick would not.
//!
//! Too little traffic on either side makes a gate *inconclusive*: not a pass, not a failure.

use mesh_core::gates::{self, Measure, Threshold};
use mesh_crds::canary::{AnalysisTotals, ArmTotals, CanaryMetric, GateResult, Verdict};
use statrs::distribution::{ContinuousCDF, Normal};

/// Name of the built-in success-rate gate (Flagger's), from its definition in `mesh_core::gates`.
pub const REQUEST_SUCCESS_RATE: &str = gates::REQUEST_SUCCESS_RATE.name;
/// Name of the built-in latency gate (Flagger's), from its definition in `mesh_core::gates`.
pub const REQUEST_DURATION: &str = gates::REQUEST_DURATION.name;
/// Name of the sequential failure-share comparison.
pub const COMPARE_ERRORS: &str = "canary-vs-primary-errors";
/// Name of the sequential slow-share comparison.
pub const COMPARE_LATENCY: &str = "canary-vs-primary-latency";

/// Tuning of the judge. The defaults suit request rates from a few per second upwards.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeConfig {
    /// Largest chance of failing a canary no worse than the primary, per sequential gate.
    pub alpha: f64,
    /// Requests each side needs, accumulated, before a sequential gate may conclude.
    pub min_samples: u64,
    /// Canary requests a window needs before an absolute gate may conclude.
    pub min_window_samples: u64,
    /// Regression, in failure share, the error comparison is tuned to find fastest (the
    /// mixture's standard deviation); any value keeps the test valid.
    pub error_effect: f64,
    /// The same for the slow-request share.
    pub latency_effect: f64,
    /// Quantile of the primary's latency that defines "slow" for the latency comparison.
    pub slow_quantile: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            min_samples: 100,
            min_window_samples: 20,
            error_effect: 0.02,
            latency_effect: 0.05,
            slow_quantile: 0.95,
        }
    }
}

/// A cumulative latency histogram in milliseconds: `(upper bound, count <= bound)`, ascending,
/// the last bound `f64::INFINITY`, as Prometheus histograms are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Buckets, ascending.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Total observations.
    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |&(_, c)| c)
    }

    /// The q-quantile, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without observations. A quantile in the `+Inf` bucket
    /// reports the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut prev = (0.0, 0u64);
        for &(bound, count) in &self.buckets {
            if count as f64 >= rank {
                if bound.is_infinite() {
                    return Some(prev.0);
                }
                let in_bucket = (count - prev.1) as f64;
                if in_bucket == 0.0 {
                    return Some(bound);
                }
                return Some(prev.0 + (bound - prev.0) * (rank - prev.1 as f64) / in_bucket);
            }
            prev = (bound, count);
        }
        Some(prev.0)
    }

    /// Observations above `bound_ms`, reading the smallest bucket bound at or above it.
    pub fn above(&self, bound_ms: f64) -> u64 {
        let at_or_below = self
            .buckets
            .iter()
            .find(|(b, _)| *b >= bound_ms)
            .map_or(self.count(), |&(_, c)| c);
        self.count().saturating_sub(at_or_below)
    }

    /// The smallest bucket bound at or above the q-quantile: a bound that counts stay exact at.
    pub fn bucket_at_quantile(&self, q: f64) -> Option<f64> {
        let v = self.quantile(q)?;
        self.buckets
            .iter()
            .map(|&(b, _)| b)
            .find(|b| b.is_finite() && *b >= v)
    }
}

/// One side's traffic in one analysis window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArmWindow {
    /// Requests answered in the window.
    pub requests: u64,
    /// Of those, failures (5xx or mesh errors).
    pub failures: u64,
    /// Their latency.
    pub latency: Histogram,
}

impl ArmWindow {
    fn success_rate(&self) -> Option<f64> {
        (self.requests > 0)
            .then(|| 100.0 * (self.requests - self.failures) as f64 / self.requests as f64)
    }

    /// A built-in gate's value on this arm; `None` without the traffic to compute it.
    pub fn measure(&self, measure: Measure) -> Option<f64> {
        match measure {
            Measure::SuccessRate => self.success_rate(),
            Measure::LatencyQuantile(q) => self.latency.quantile(q),
        }
    }
}

/// Canary and primary traffic over the same window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// The canary's traffic.
    pub canary: ArmWindow,
    /// The primary's traffic.
    pub primary: ArmWindow,
}

/// Adds a window to the totals, freezing the slow bound at the first window with primary traffic.
pub fn accumulate(totals: &mut AnalysisTotals, window: &Window, config: &JudgeConfig) {
    if totals.slow_ms.is_none() {
        totals.slow_ms = window
            .primary
            .latency
            .bucket_at_quantile(config.slow_quantile);
    }
    let add = |t: &mut ArmTotals, w: &ArmWindow, slow_ms: Option<f64>| {
        t.requests += w.requests;
        t.failures += w.failures;
        t.slow += slow_ms.map_or(0, |b| w.latency.above(b));
    };
    add(&mut totals.canary, &window.canary, totals.slow_ms);
    add(&mut totals.primary, &window.primary, totals.slow_ms);
}

/// Judges the built-in and custom metric gates on one window. `custom` holds the values of
/// metrics read through MetricTemplates, by metric name (`None` when the query returned nothing).
pub fn threshold_gates(
    metrics: &[CanaryMetric],
    window: &Window,
    custom: &std::collections::BTreeMap<String, Option<f64>>,
    config: &JudgeConfig,
) -> Vec<GateResult> {
    metrics
        .iter()
        .map(|m| {
            let range = m.threshold_range.clone().unwrap_or_default();
            let gate = gates::builtin(&m.name);
            let (canary, primary, default_min, default_max) = match gate {
                Some(g) => {
                    let (min, max) = match g.default {
                        Threshold::Min(min) => (Some(min), None),
                        Threshold::Max(max) => (None, Some(max)),
                    };
                    (
                        window.canary.measure(g.measure),
                        window.primary.measure(g.measure),
                        min,
                        max,
                    )
                }
                None => (custom.get(&m.name).copied().flatten(), None, None, None),
            };
            let builtin = gate.is_some();
            let (min, max) = if range.min.is_none() && range.max.is_none() {
                (default_min, default_max)
            } else {
                (range.min, range.max)
            };
            let test = match (min, max) {
                (Some(lo), Some(hi)) => format!("threshold {lo} <= value <= {hi}"),
                (Some(lo), None) => format!("threshold value >= {lo}"),
                (None, Some(hi)) => format!("threshold value <= {hi}"),
                (None, None) => "threshold none".to_string(),
            };
            let enough = !builtin || window.canary.requests >= config.min_window_samples;
            let (verdict, message) = match canary {
                Some(v) if enough => {
                    let low = min.is_some_and(|lo| v < lo);
                    let high = max.is_some_and(|hi| v > hi);
                    if low || high {
                        (
                            Verdict::Fail,
                            format!("{} is {v:.2}, outside {test}", m.name),
                        )
                    } else {
                        (
                            Verdict::Pass,
                            format!("{} is {v:.2}, within {test}", m.name),
                        )
                    }
                }
                _ if builtin => (
                    Verdict::Inconclusive,
                    format!(
                        "{} canary requests in the window, fewer than the {} needed",
                        window.canary.requests, config.min_window_samples
                    ),
                ),
                _ => (
                    Verdict::Inconclusive,
                    format!("{} returned no value", m.name),
                ),
            };
            GateResult {
                name: m.name.clone(),
                canary,
                primary,
                canary_samples: window.canary.requests,
                primary_samples: window.primary.requests,
                test,
                p_value: None,
                verdict,
                message,
            }
        })
        .collect()
}

/// One-sided mSPRT of "the canary's share is no higher than the primary's". Returns the
/// likelihood ratio against that hypothesis (large means the canary is worse) and the observed
/// difference of shares.
pub fn msprt(canary: (u64, u64), primary: (u64, u64), effect: f64) -> (f64, f64) {
    let (cx, cn) = canary;
    let (px, pn) = primary;
    if cn == 0 || pn == 0 {
        return (1.0, 0.0);
    }
    // Half a count of continuity keeps the variance positive when a side has no events.
    let share = |x: u64, n: u64| (x as f64).clamp(0.5, n as f64 - 0.5) / n as f64;
    let (pc, pp) = (share(cx, cn), share(px, pn));
    let diff = cx as f64 / cn as f64 - px as f64 / pn as f64;
    let v = pc * (1.0 - pc) / cn as f64 + pp * (1.0 - pp) / pn as f64;
    let tau2 = effect * effect;
    let ratio = (v / (v + tau2)).sqrt() * (diff * diff * tau2 / (2.0 * v * (v + tau2))).exp();
    (ratio, diff)
}

/// Runs one sequential comparison on accumulated counts, carrying the always-valid p-value
/// forward from the previous tick (it can only fall).
#[allow(clippy::too_many_arguments)]
fn compare(
    name: &str,
    what: &str,
    canary: (u64, u64),
    primary: (u64, u64),
    effect: f64,
    previous_p: Option<f64>,
    config: &JudgeConfig,
) -> GateResult {
    let share = |(x, n): (u64, u64)| (n > 0).then(|| 100.0 * x as f64 / n as f64);
    let test = format!("mSPRT one-sided, alpha {}", config.alpha);
    let mut result = GateResult {
        name: name.to_string(),
        canary: share(canary),
        primary: share(primary),
        canary_samples: canary.1,
        primary_samples: primary.1,
        test,
        p_value: previous_p,
        verdict: Verdict::Inconclusive,
        message: String::new(),
    };
    if canary.1 < config.min_samples || primary.1 < config.min_samples {
        result.message = format!(
            "{} canary and {} primary requests so far; {} each are needed to compare {what}",
            canary.1, primary.1, config.min_samples
        );
        return result;
    }
    let (ratio, diff) = msprt(canary, primary, effect);
    let mut p = previous_p.unwrap_or(1.0);
    if diff > 0.0 && ratio.is_finite() && ratio > 0.0 {
        p = p.min(1.0 / ratio);
    } else if !ratio.is_finite() && diff > 0.0 {
        p = 0.0;
    }
    result.p_value = Some(p);
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}%"));
    if p <= config.alpha {
        result.verdict = Verdict::Fail;
        result.message = format!(
            "canary {what} {} vs primary {}: worse with always-valid p = {p:.4} <= {}",
            pct(result.canary),
            pct(result.primary),
            config.alpha
        );
    } else {
        result.verdict = Verdict::Pass;
        result.message = format!(
            "canary {what} {} vs primary {}: no evidence it is worse (p = {p:.3})",
            pct(result.canary),
            pct(result.primary)
        );
    }
    result
}

/// The sequential canary-vs-primary gates on accumulated totals. `previous` is the last tick's
/// results, from which each gate's p-value carries on.
pub fn sequential_gates(
    totals: &AnalysisTotals,
    previous: &[GateResult],
    config: &JudgeConfig,
) -> Vec<GateResult> {
    let prev = |name: &str| {
        previous
            .iter()
            .find(|g| g.name == name)
            .and_then(|g| g.p_value)
    };
    let c = &totals.canary;
    let p = &totals.primary;
    let mut gates = vec![compare(
        COMPARE_ERRORS,
        "failure share",
        (c.failures, c.requests),
        (p.failures, p.requests),
        config.error_effect,
        prev(COMPARE_ERRORS),
        config,
    )];
    if let Some(slow_ms) = totals.slow_ms {
        let mut g = compare(
            COMPARE_LATENCY,
            &format!("share slower than {slow_ms} ms"),
            (c.slow, c.requests),
            (p.slow, p.requests),
            config.latency_effect,
            prev(COMPARE_LATENCY),
            config,
        );
        g.test = format!("{} on requests slower than {slow_ms} ms", g.test);
        gates.push(g);
    }
    gates
}

/// The combined verdict of a tick: any failure fails; else any inconclusive gate makes the tick
/// inconclusive; else it passes.
pub fn overall(gates: &[GateResult]) -> Verdict {
    if gates.iter().any(|g| g.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if gates.iter().any(|g| g.verdict == Verdict::Inconclusive) {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

/// The one-sided z-score of a fixed-sample comparison, for readers who know that test; shown
/// beside the sequential p-value, never used for decisions (it is not valid under peeking).
pub fn fixed_sample_p(canary: (u64, u64), primary: (u64, u64)) -> Option<f64> {
    let (cx, cn) = canary;
    let (px, pn) = primary;
    if cn == 0 || pn == 0 {
        return None;
    }
    let pooled = (cx + px) as f64 / (cn + pn) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / cn as f64 + 1.0 / pn as f64)).sqrt();
    if se == 0.0 {
        return None;
    }
    let z = (cx as f64 / cn as f64 - px as f64 / pn as f64) / se;
    let normal = Normal::standard();
    Some(1.0 - normal.cdf(z))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_crds::canary::ThresholdRange;
    use std::collections::BTreeMap;

    fn mk_hist(samples: &[(f64, u64)]) -> Histogram {
        // samples: (bucket bound, observations in that bucket) -> cumulative
        let mut total = 0;
        let mut buckets: Vec<(f64, u64)> = samples
            .iter()
            .map(|&(b, n)| {
                total += n;
                (b, total)
            })
            .collect();
        buckets.push((f64::INFINITY, total));
        Histogram { buckets }
    }

    fn mk_arm(requests: u64, failures: u64, latency: Histogram) -> ArmWindow {
        ArmWindow {
            requests,
            failures,
            latency,
        }
    }

    fn mk_metric(name: &str, min: Option<f64>, max: Option<f64>) -> CanaryMetric {
        CanaryMetric {
            name: name.into(),
            interval: None,
            threshold_range: Some(ThresholdRange { min, max }),
            template_ref: None,
            template_variables: None,
        }
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let h = mk_hist(&[(10.0, 50), (20.0, 40), (50.0, 10)]);
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile(0.5), Some(10.0));
        // rank 95 lies halfway into the (20, 50] bucket's 10 observations.
        assert_eq!(h.quantile(0.95), Some(35.0));
        assert_eq!(h.bucket_at_quantile(0.95), Some(50.0));
        assert_eq!(h.above(20.0), 10);
        assert_eq!(Histogram::default().quantile(0.99), None);
    }

    #[test]
    fn absolute_gates_use_flagger_thresholds() {
        let fast = mk_hist(&[(10.0, 100)]);
        let slow = mk_hist(&[(1000.0, 100)]);
        let w = Window {
            canary: mk_arm(100, 2, slow),
            primary: mk_arm(100, 0, fast),
        };
        let metrics = [
            mk_metric(REQUEST_SUCCESS_RATE, Some(99.0), None),
            mk_metric(REQUEST_DURATION, None, Some(500.0)),
        ];
        let gates = threshold_gates(&metrics, &w, &BTreeMap::new(), &JudgeConfig::default());
        assert_eq!(gates[0].verdict, Verdict::Fail);
        assert_eq!(gates[0].canary, Some(98.0));
        assert_eq!(gates[0].primary, Some(100.0));
        assert_eq!(gates[1].verdict, Verdict::Fail);
        assert!(gates[1].message.contains("outside"), "{}", gates[1].message);
    }

    #[test]
    fn too_little_traffic_is_inconclusive_not_failed() {
        let w = Window {
            canary: mk_arm(3, 3, mk_hist(&[(10.0, 3)])),
            primary: mk_arm(300, 0, mk_hist(&[(10.0, 300)])),
        };
        let gates = threshold_gates(
            &[mk_metric(REQUEST_SUCCESS_RATE, Some(99.0), None)],
            &w,
            &BTreeMap::new(),
            &JudgeConfig::default(),
        );
        assert_eq!(gates[0].verdict, Verdict::Inconclusive);
        let mut totals = AnalysisTotals::default();
        accumulate(&mut totals, &w, &JudgeConfig::default());
        let seq = sequential_gates(&totals, &[], &JudgeConfig::default());
        assert!(seq.iter().all(|g| g.verdict == Verdict::Inconclusive));
        assert_eq!(overall(&seq), Verdict::Inconclusive);
    }

    #[test]
    fn custom_metrics_are_checked_against_their_range() {
        let custom = BTreeMap::from([("queue-depth".to_string(), Some(12.0))]);
        let gates = threshold_gates(
            &[mk_metric("queue-depth", None, Some(10.0))],
            &Window::default(),
            &custom,
            &JudgeConfig::default(),
        );
        assert_eq!(gates[0].verdict, Verdict::Fail);
        let none = BTreeMap::from([("queue-depth".to_string(), None)]);
        let gates = threshold_gates(
            &[mk_metric("queue-depth", None, Some(10.0))],
            &Window::default(),
            &none,
            &JudgeConfig::default(),
        );
        assert_eq!(gates[0].verdict, Verdict::Inconclusive);
    }

    #[test]
    fn a_clearly_worse_canary_fails_the_sequential_test() {
        let config = JudgeConfig::default();
        let totals = AnalysisTotals {
            canary: ArmTotals {
                requests: 2_000,
                failures: 100,
                slow: 0,
            },
            primary: ArmTotals {
                requests: 18_000,
                failures: 18,
                slow: 0,
            },
            slow_ms: None,
        };
        let gates = sequential_gates(&totals, &[], &config);
        assert_eq!(gates[0].verdict, Verdict::Fail, "{}", gates[0].message);
        assert!(gates[0].p_value.unwrap() < 1e-6);
    }

    #[test]
    fn an_equal_canary_passes_and_a_p_value_never_rises() {
        let config = JudgeConfig::default();
        let mut totals = AnalysisTotals {
            canary: ArmTotals {
                requests: 1_000,
                failures: 1,
                slow: 0,
            },
            primary: ArmTotals {
                requests: 9_000,
                failures: 9,
                slow: 0,
            },
            slow_ms: None,
        };
        let first = sequential_gates(&totals, &[], &config);
        assert_eq!(first[0].verdict, Verdict::Pass, "{}", first[0].message);
        // A previous tick had seen stronger evidence: the carried p-value stays the minimum.
        let mut prev = first;
        prev[0].p_value = Some(0.2);
        totals.canary.requests += 1_000;
        let second = sequential_gates(&totals, &prev, &config);
        assert_eq!(second[0].p_value, Some(0.2));
    }

    /// The property the sequential test exists for: peeking at every tick keeps false failures
    /// of an identical canary at or below alpha. Deterministic pseudo-random traffic.
    #[test]
    fn peeking_every_tick_keeps_false_failures_under_alpha() {
        let config = JudgeConfig::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let runs = 400;
        let mut false_failures = 0;
        for _ in 0..runs {
            let mut totals = AnalysisTotals::default();
            let mut prev = Vec::new();
            for _tick in 0..30 {
                for _ in 0..50 {
                    totals.canary.requests += 1;
                    totals.canary.failures += u64::from(rand() < 0.01);
                }
                for _ in 0..200 {
                    totals.primary.requests += 1;
                    totals.primary.failures += u64::from(rand() < 0.01);
                }
                prev = sequential_gates(&totals, &prev, &config);
                if prev[0].verdict == Verdict::Fail {
                    false_failures += 1;
                    break;
                }
            }
        }
        let rate = false_failures as f64 / runs as f64;
        assert!(rate <= config.alpha, "false failure rate {rate}");
    }

    #[test]
    fn fixed_sample_p_is_small_for_a_big_difference() {
        let p = fixed_sample_p((50, 1000), (10, 1000)).unwrap();
        assert!(p < 0.001, "{p}");
        assert_eq!(fixed_sample_p((0, 0), (1, 10)), None);
    }
}
