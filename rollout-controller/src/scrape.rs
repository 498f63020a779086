//! The embedded metric source's pure half: reading the proxies' `/metrics` text (Prometheus or
//! OpenMetrics exposition) and turning two scrapes into a canary-vs-primary [`Window`].
//!
//! The proxies label every outbound response with the backend service it went to (`dst_service`)
//! and classify it (`classification="success"|"failure"`), with latency in Linkerd's
//! `response_latency_ms` histogram. Summing those series for `<svc>-canary` and `<svc>-primary`
//! across all proxies gives each side's cumulative counters; the difference between two scrapes
//! is the analysis window. A counter that went down (a restarted proxy) contributes its new
//! value, as Prometheus' `increase()` does.

use std::collections::BTreeMap;

use crate::judge::{ArmWindow, Histogram, Window};

/// Metric of responses, labelled with classification and dst_service.
pub const RESPONSE_TOTAL: &str = "response_total";
/// Latency histogram, in milliseconds.
pub const RESPONSE_LATENCY: &str = "response_latency_ms_bucket";

/// One sample line of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with any `_total`/`_bucket` suffix).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Why an exposition line does not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("metrics line {line}: {reason}: {text:?}")]
pub struct ParseError {
    line: usize,
    reason: &'static str,
    text: String,
}

/// Parses the sample lines of a Prometheus or OpenMetrics text exposition; comments, `# EOF`
/// and blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| ParseError {
            line: i + 1,
            reason,
            text: raw.to_string(),
        };
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => return Err(err("no value")),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                // label name
                let start = match chars.peek() {
                    Some(&(_, '}')) => {
                        end = chars.next().map(|(at, _)| at);
                        break;
                    }
                    Some(&(at, _)) => at,
                    None => break,
                };
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| err("label without ="))?
                    + start;
                let key = body[start..eq].trim_start_matches(',').trim().to_string();
                while chars.peek().is_some_and(|&(at, _)| at <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        other => value.push(other),
                    }
                }
                if !closed {
                    return Err(err("unterminated label value"));
                }
                labels.insert(key, value);
                if chars.peek().is_some_and(|&(_, c)| c == ',') {
                    chars.next();
                }
            }
            let end = end.ok_or_else(|| err("unterminated labels"))?;
            &body[end + 1..]
        } else {
            rest
        };
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err("value is not a number"))?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// Cumulative counters of one side, summed over proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArmCounters {
    /// Responses.
    pub requests: f64,
    /// Failed responses.
    pub failures: f64,
    /// Latency buckets: upper bound (ms) -> cumulative count.
    pub buckets: BTreeMap<u64, f64>,
}

/// Bucket bounds are keyed in microseconds so they sort and compare exactly.
fn bound_key(le: f64) -> u64 {
    if le.is_infinite() {
        u64::MAX
    } else {
        to_u64(le * 1000.0)
    }
}

/// Sums the outbound series of one backend service from one scrape. `service` is the name the
/// proxies put in `dst_service` (for example `podinfo-canary`).
pub fn counters(samples: &[Sample], service: &str) -> ArmCounters {
    let mut c = ArmCounters::default();
    let ours = |s: &Sample| {
        s.labels.get("dst_service").map(String::as_str) == Some(service)
            && s.labels.get("direction").is_none_or(|d| d == "outbound")
    };
    for s in samples.iter().filter(|s| ours(s)) {
        match s.name.as_str() {
            RESPONSE_TOTAL => {
                c.requests += s.value;
                if s.labels.get("classification").map(String::as_str) == Some("failure") {
                    c.failures += s.value;
                }
            }
            RESPONSE_LATENCY => {
                let le = s
                    .labels
                    .get("le")
                    .and_then(|v| match v.as_str() {
                        "+Inf" => Some(f64::INFINITY),
                        v => v.parse().ok(),
                    })
                    .unwrap_or(f64::INFINITY);
                *c.buckets.entry(bound_key(le)).or_default() += s.value;
            }
            _ => {}
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

fn increase(before: f64, after: f64) -> u64 {
    let d = if after >= before {
        after - before
    } else {
        after
    };
    to_u64(d)
}

/// Counter values are non-negative integers carried as floats; clamping makes the conversion
/// total (NaN and negatives become 0, huge values saturate).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn to_u64(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else {
        x.round().min(u64::MAX as f64) as u64
    }
}

/// The traffic between two scrapes of one side.
pub fn arm_window(before: &ArmCounters, after: &ArmCounters) -> ArmWindow {
    let buckets = after
        .buckets
        .iter()
        .map(|(k, v)| {
            let bound = if *k == u64::MAX {
                f64::INFINITY
            } else {
                *k as f64 / 1000.0
            };
            (
                bound,
                increase(before.buckets.get(k).copied().unwrap_or(0.0), *v),
            )
        })
        .collect();
    ArmWindow {
        requests: increase(before.requests, after.requests),
        failures: increase(before.failures, after.failures),
        latency: Histogram { buckets },
    }
}

/// The analysis window between two scrapes, for canary and primary.
pub fn window(before: &(ArmCounters, ArmCounters), after: &(ArmCounters, ArmCounters)) -> Window {
    Window {
        canary: arm_window(&before.0, &after.0),
        primary: arm_window(&before.1, &after.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP response_total Responses.
# TYPE response_total counter
response_total{direction="outbound",dst_service="web-canary",classification="success",status_code="200"} 90
response_total{direction="outbound",dst_service="web-canary",classification="failure",status_code="503"} 10
response_total{direction="outbound",dst_service="web-primary",classification="success",status_code="200"} 400
response_total{direction="inbound",dst_service="web-canary",classification="success",status_code="200"} 7
response_latency_ms_bucket{direction="outbound",dst_service="web-canary",le="10.0"} 60
response_latency_ms_bucket{direction="outbound",dst_service="web-canary",le="100.0"} 95
response_latency_ms_bucket{direction="outbound",dst_service="web-canary",le="+Inf"} 100
label_escapes{path="a\"b\\c"} 1e3
# EOF
"#;

    #[test]
    fn parses_openmetrics_text() {
        let s = parse(SCRAPE).unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s[0].labels["classification"], "success");
        assert_eq!(s[0].value, 90.0);
        assert_eq!(s[7].labels["path"], "a\"b\\c");
        assert_eq!(s[7].value, 1000.0);
    }

    #[test]
    fn bad_lines_are_named() {
        let e = parse("ok 1\nbroken{a=\"x} 1\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse("nan_value abc").is_err());
    }

    #[test]
    fn counters_sum_outbound_series_of_one_service() {
        let s = parse(SCRAPE).unwrap();
        let c = counters(&s, "web-canary");
        assert_eq!(c.requests, 100.0);
        assert_eq!(c.failures, 10.0);
        assert_eq!(c.buckets.len(), 3);
        assert_eq!(counters(&s, "web-primary").requests, 400.0);
    }

    #[test]
    fn windows_are_differences_and_survive_counter_resets() {
        let s = parse(SCRAPE).unwrap();
        let after = (counters(&s, "web-canary"), counters(&s, "web-primary"));
        let mut before = after.clone();
        before.0.requests = 40.0;
        before.0.failures = 10.0;
        before.1.requests = 1_000.0; // the primary's proxy restarted since
        let w = window(&before, &after);
        assert_eq!(w.canary.requests, 60);
        assert_eq!(w.canary.failures, 0);
        assert_eq!(w.primary.requests, 400);
        let zero = (ArmCounters::default(), ArmCounters::default());
        let w = window(&zero, &after);
        assert_eq!(w.canary.latency.count(), 100);
        assert_eq!(
            w.canary.latency.quantile(0.5),
            Some(100.0 * 0.0 + 10.0 * 50.0 / 60.0)
        );
    }
}
