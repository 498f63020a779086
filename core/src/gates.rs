//! The built-in canary gates, each defined once: its name (Flagger's), what it measures on an
//! arm's traffic, which way its threshold bounds it and the default bound. Everything else reads
//! these definitions: the Canary CRD's CEL rule and the validation's check of metric names, the
//! judge (which computes each [`Measure`]), and both metric sources, which fill an arm's window
//! with the [`Input`]s defined here, by PromQL ([`Input::promql`]) or from a direct scrape of the
//! proxies ([`counters`]). Both are built from the metric contract in [`crate::metrics`].
//!
//! An arm is one backend service (`<svc>-canary` or `<svc>-primary`) as the callers' proxies see
//! it: their `direction="outbound"` series with that `dst_service`.

use std::collections::BTreeMap;

use crate::exposition::{self, Sample};
use crate::metrics::{self, Classification, Direction, label};

/// Which way a gate's threshold bounds its value, with the bound used when a Canary's
/// `thresholdRange` gives neither `min` nor `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// The value must be at least this (`thresholdRange.min`).
    Min(f64),
    /// The value must be at most this (`thresholdRange.max`).
    Max(f64),
}

/// What a built-in gate computes from one arm's window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Measure {
    /// Percent of the arm's responses not classified `failure` ([`Input::Responses`],
    /// [`Input::Failures`]).
    SuccessRate,
    /// The q-quantile of the arm's response latency in milliseconds, interpolated inside its
    /// bucket as Prometheus' `histogram_quantile` does ([`Input::LatencyBuckets`]).
    LatencyQuantile(f64),
}

impl Measure {
    /// The window quantities the measure is computed from.
    pub fn reads(self) -> &'static [Input] {
        match self {
            Measure::SuccessRate => &[Input::Responses, Input::Failures],
            Measure::LatencyQuantile(_) => &[Input::LatencyBuckets],
        }
    }
}

/// A gate a Canary may name in `analysis.metrics` without a MetricTemplate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuiltinGate {
    /// The name in `analysis.metrics[].name`.
    pub name: &'static str,
    /// What it measures on the canary (and, for comparison, the primary).
    pub measure: Measure,
    /// Its threshold's direction and default.
    pub default: Threshold,
}

/// Flagger's `request-success-rate`: percent of non-failed responses, at least 99 by default.
pub const REQUEST_SUCCESS_RATE: BuiltinGate = BuiltinGate {
    name: "request-success-rate",
    measure: Measure::SuccessRate,
    default: Threshold::Min(99.0),
};

/// Flagger's `request-duration`: p99 latency in milliseconds, at most 500 by default.
pub const REQUEST_DURATION: BuiltinGate = BuiltinGate {
    name: "request-duration",
    measure: Measure::LatencyQuantile(0.99),
    default: Threshold::Max(500.0),
};

/// Every built-in gate.
pub const BUILTIN: &[BuiltinGate] = &[REQUEST_SUCCESS_RATE, REQUEST_DURATION];

/// The built-in gate of that name.
pub fn builtin(name: &str) -> Option<&'static BuiltinGate> {
    BUILTIN.iter().find(|g| g.name == name)
}

/// The names of the built-in gates in prose, each between `quote`s: `a`, `a and b`,
/// `a, b and c`.
pub fn names_in_words(quote: &str) -> String {
    let names: Vec<String> = BUILTIN
        .iter()
        .map(|g| format!("{quote}{}{quote}", g.name))
        .collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The CEL rule on a Canary metric: a built-in gate, or a `templateRef`.
pub fn metric_rule() -> String {
    let names: Vec<String> = BUILTIN.iter().map(|g| format!("'{}'", g.name)).collect();
    format!(
        "self.name in [{}] || has(self.templateRef)",
        names.join(", ")
    )
}

/// The message of [`metric_rule`].
pub fn metric_rule_message() -> String {
    format!(
        "metrics other than {} need a templateRef",
        names_in_words("")
    )
}

/// One quantity of an arm's analysis window, read from the outbound series of the arm's
/// backend service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Responses ([`metrics::RESPONSE`]).
    Responses,
    /// Responses classified [`Classification::Failure`].
    Failures,
    /// The cumulative latency buckets ([`metrics::RESPONSE_LATENCY_MS`]), by upper bound.
    LatencyBuckets,
}

impl Input {
    /// Every quantity of a window.
    pub const ALL: [Input; 3] = [Input::Responses, Input::Failures, Input::LatencyBuckets];

    /// The PromQL of the quantity's increase over `range` (a PromQL duration such as `30s`) for
    /// the arm `service` in `namespace`: one value for the counts, one per `le` for the buckets.
    pub fn promql(self, namespace: &str, service: &str, range: &str) -> String {
        let selector = format!(
            r#"{}="{}",{}="{namespace}",{}="{service}""#,
            label::DIRECTION,
            Direction::Outbound.as_str(),
            label::DST_NAMESPACE,
            label::DST_SERVICE,
        );
        match self {
            Input::Responses => format!(
                "sum(increase({}{{{selector}}}[{range}]))",
                metrics::RESPONSE.series()
            ),
            Input::Failures => format!(
                r#"sum(increase({}{{{selector},{}="{}"}}[{range}]))"#,
                metrics::RESPONSE.series(),
                label::CLASSIFICATION,
                Classification::Failure.as_str(),
            ),
            Input::LatencyBuckets => format!(
                "sum by ({}) (increase({}{{{selector}}}[{range}]))",
                label::LE,
                metrics::RESPONSE_LATENCY_MS.bucket()
            ),
        }
    }

    /// Whether a sample, already known to be of the arm's outbound series, adds to the quantity:
    /// the direct scrape's counterpart of [`Input::promql`].
    fn counts(self, sample: &Sample) -> bool {
        match self {
            Input::Responses => metrics::RESPONSE.is_series(&sample.name),
            Input::Failures => {
                metrics::RESPONSE.is_series(&sample.name)
                    && sample.labels.get(label::CLASSIFICATION).map(String::as_str)
                        == Some(Classification::Failure.as_str())
            }
            Input::LatencyBuckets => metrics::RESPONSE_LATENCY_MS.is_bucket(&sample.name),
        }
    }
}

/// Cumulative counters of one arm, summed over the samples of one or more scrapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArmCounters {
    /// Responses.
    pub requests: f64,
    /// Failed responses.
    pub failures: f64,
    /// Latency buckets: upper bound, in microseconds so bounds sort and compare exactly
    /// (`u64::MAX` for `+Inf`), -> cumulative count.
    pub buckets: BTreeMap<u64, f64>,
}

/// The key of a bucket bound (ms) in [`ArmCounters::buckets`].
pub fn bound_key(le: f64) -> u64 {
    if le.is_infinite() {
        u64::MAX
    } else {
        exposition::count(le * 1000.0)
    }
}

/// The bucket bound (ms) of a key of [`ArmCounters::buckets`].
#[allow(
    clippy::cast_precision_loss,
    reason = "keys are bucket bounds in microseconds, far below 2^52"
)]
pub fn bound_of_key(key: u64) -> f64 {
    if key == u64::MAX {
        f64::INFINITY
    } else {
        key as f64 / 1000.0
    }
}

/// Sums the outbound series of one arm from one scrape. `service` is the name the proxies put
/// in `dst_service` (for example `podinfo-canary`); series without a direction count as
/// outbound.
pub fn counters(samples: &[Sample], service: &str) -> ArmCounters {
    let mut c = ArmCounters::default();
    let ours = |s: &Sample| {
        s.labels.get(label::DST_SERVICE).map(String::as_str) == Some(service)
            && s.labels
                .get(label::DIRECTION)
                .is_none_or(|d| d == Direction::Outbound.as_str())
    };
    for s in samples.iter().filter(|s| ours(s)) {
        for input in Input::ALL.into_iter().filter(|i| i.counts(s)) {
            match input {
                Input::Responses => c.requests += s.value,
                Input::Failures => c.failures += s.value,
                Input::LatencyBuckets => {
                    let le = exposition::bucket_bound(s.labels.get(label::LE).map(String::as_str));
                    *c.buckets.entry(bound_key(le)).or_default() += s.value;
                }
            }
        }
    }
    c
}

/// Adds another proxy's counters.
pub fn merge(into: &mut ArmCounters, other: &ArmCounters) {
    into.requests += other.requests;
    into.failures += other.failures;
    for (k, v) in &other.buckets {
        *into.buckets.entry(*k).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_rule_and_messages_name_every_builtin_gate() {
        let (rule, message) = (metric_rule(), metric_rule_message());
        assert!(rule.starts_with("self.name in ['"), "{rule}");
        assert!(rule.ends_with("] || has(self.templateRef)"), "{rule}");
        for g in BUILTIN {
            assert!(rule.contains(&format!("'{}'", g.name)), "{rule}");
            assert!(message.contains(g.name), "{message}");
            assert!(names_in_words("`").contains(&format!("`{}`", g.name)));
            assert_eq!(builtin(g.name), Some(g));
        }
        assert_eq!(builtin("queue-depth"), None);
    }

    /// Flagger's two gates, as Flagger users know them.
    #[test]
    fn flagger_gates_keep_their_names_and_defaults() {
        assert_eq!(REQUEST_SUCCESS_RATE.name, "request-success-rate");
        assert_eq!(REQUEST_SUCCESS_RATE.default, Threshold::Min(99.0));
        assert_eq!(REQUEST_DURATION.name, "request-duration");
        assert_eq!(REQUEST_DURATION.measure, Measure::LatencyQuantile(0.99));
        assert_eq!(REQUEST_DURATION.default, Threshold::Max(500.0));
        assert_eq!(
            names_in_words(""),
            "request-success-rate and request-duration"
        );
    }

    #[test]
    fn every_measure_reads_window_quantities() {
        for g in BUILTIN {
            assert!(!g.measure.reads().is_empty(), "{}", g.name);
            assert!(g.measure.reads().iter().all(|i| Input::ALL.contains(i)));
        }
    }

    /// The queries Flagger-style dashboards and the PromQL source have always run.
    #[test]
    fn promql_is_built_from_the_contract() {
        let sel = r#"direction="outbound",dst_namespace="test",dst_service="web-canary""#;
        assert_eq!(
            Input::Responses.promql("test", "web-canary", "30s"),
            format!("sum(increase(response_total{{{sel}}}[30s]))")
        );
        assert_eq!(
            Input::Failures.promql("test", "web-canary", "30s"),
            format!(r#"sum(increase(response_total{{{sel},classification="failure"}}[30s]))"#)
        );
        assert_eq!(
            Input::LatencyBuckets.promql("test", "web-canary", "30s"),
            format!("sum by (le) (increase(response_latency_ms_bucket{{{sel}}}[30s]))")
        );
    }

    #[test]
    fn counters_sum_outbound_series_of_one_service() {
        let s = exposition::parse(exposition::SAMPLE).unwrap();
        let c = counters(&s, "web-canary");
        assert_eq!(c.requests, 100.0);
        assert_eq!(c.failures, 10.0);
        assert_eq!(c.buckets.len(), 3);
        assert_eq!(c.buckets[&10_000], 60.0);
        assert_eq!(c.buckets[&u64::MAX], 100.0);
        assert_eq!(counters(&s, "web-primary").requests, 400.0);
        let mut both = c.clone();
        merge(&mut both, &c);
        assert_eq!(both.requests, 200.0);
        assert_eq!(both.buckets[&100_000], 190.0);
        assert_eq!(bound_of_key(bound_key(2.5)), 2.5);
        assert_eq!(bound_of_key(bound_key(f64::INFINITY)), f64::INFINITY);
    }
}
