//! What the load generator counts, and the report lines it prints.
//!
//! [`Stats`] is a plain accumulator fed by request tasks; [`Stats::report`] turns it into a
//! [`Report`], one line of output in JSON or text. Latencies go into an HDR histogram of whole
//! microseconds (three significant digits: exact below 2 ms, within 0.1% above), whose memory
//! depends on the range of values rather than their number, so a generator left running for
//! days keeps constant memory while a benchmark run still gets exact tail percentiles.

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::Serialize;

/// Significant digits the histogram keeps.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Latencies in microseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Created on the first record, so that empty counts cost nothing and compare equal.
    hdr: Option<hdrhistogram::Histogram<u64>>,
}

impl Histogram {
    /// Records one latency, in whole microseconds (rounded down).
    pub fn record(&mut self, latency: Duration) {
        if self.hdr.is_none() {
            // Creation fails only for more than 5 significant digits. The histogram grows to
            // the largest value seen, so memory follows the range, not the count.
            self.hdr = hdrhistogram::Histogram::new(SIGNIFICANT_DIGITS).ok();
        }
        if let Some(hdr) = &mut self.hdr {
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            // Growing fails only past i64::MAX / 2 microseconds; such a value is clamped.
            if hdr.record(micros).is_err() {
                hdr.saturating_record(micros);
            }
        }
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.hdr.as_ref().map_or(0, hdrhistogram::Histogram::len)
    }

    /// The `q` quantile (0..=1) in microseconds, or `None` when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        self.hdr
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// The `q` quantile (0..=1) in milliseconds, or `None` when nothing was recorded.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.quantile_us(q).map(|us| us as f64 / 1000.0)
    }

    /// The largest latency in microseconds, or `None` when nothing was recorded.
    pub fn max_us(&self) -> Option<u64> {
        self.hdr
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(hdrhistogram::Histogram::max)
    }
}

/// Counts over one reporting interval or the whole run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Requests started.
    pub sent: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses by status code.
    pub status: BTreeMap<u16, u64>,
    /// Requests that got no response (connect errors, timeouts, resets).
    pub errors: u64,
    /// Ticks skipped because too many requests were in flight.
    pub dropped: u64,
    /// Responses by the value of the version header.
    pub versions: BTreeMap<String, u64>,
    /// Latency of responses (not of transport errors), from the time the schedule gave the
    /// request, so time the generator itself lost counts against the response.
    pub latency: Histogram,
    /// How late requests were started compared with the schedule: the generator's own delay,
    /// included in `latency`. Large values mean the numbers describe the generator's machine.
    pub lag: Histogram,
}

impl Stats {
    /// A request was started.
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    /// A tick was skipped.
    pub fn dropped(&mut self) {
        self.dropped += 1;
    }

    /// A request failed without a response.
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// A response arrived.
    pub fn response(&mut self, status: u16, version: Option<&str>, latency: Duration) {
        if (200..300).contains(&status) {
            self.ok += 1;
        }
        *self.status.entry(status).or_default() += 1;
        if let Some(v) = version {
            *self.versions.entry(v.to_string()).or_default() += 1;
        }
        self.latency.record(latency);
    }

    /// A request started `lag` after its scheduled time.
    pub fn started_late(&mut self, lag: Duration) {
        self.lag.record(lag);
    }

    /// The report line for these counts, `elapsed` after start.
    pub fn report(&self, elapsed: Duration, is_final: bool) -> Report {
        Report {
            t: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            sent: self.sent,
            ok: self.ok,
            status: self
                .status
                .iter()
                .map(|(code, n)| (code.to_string(), *n))
                .collect(),
            errors: self.errors,
            dropped: self.dropped,
            versions: self.versions.clone(),
            p50_ms: self.latency.quantile_ms(0.5).map(round_ms),
            p99_ms: self.latency.quantile_ms(0.99).map(round_ms),
            p50_us: self.latency.quantile_us(0.5),
            p99_us: self.latency.quantile_us(0.99),
            p999_us: self.latency.quantile_us(0.999),
            max_us: self.latency.max_us(),
            lag_p99_us: self.lag.quantile_us(0.99),
            is_final,
        }
    }
}

fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// One output line. In JSON:
/// `{"t":1.0,"sent":50,"ok":49,"status":{"200":49,"500":1},"errors":0,"dropped":0,`
/// `"versions":{"v1":50},"p50_ms":1.2,"p99_ms":3.4,"p50_us":1203,"p99_us":3391,`
/// `"p999_us":4012,"max_us":4090,"lag_p99_us":61}`, with `"final":true` on the summary.
/// The `_us` fields came later than the rest; lines without them still parse.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Report {
    /// Seconds since the generator started.
    pub t: f64,
    /// Requests started.
    pub sent: u64,
    /// 2xx responses.
    pub ok: u64,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Requests without a response.
    pub errors: u64,
    /// Skipped ticks.
    pub dropped: u64,
    /// Responses by version header.
    pub versions: BTreeMap<String, u64>,
    /// Median latency in milliseconds; `null` without responses.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds; `null` without responses.
    pub p99_ms: Option<f64>,
    /// Median latency in microseconds; `null` without responses.
    #[serde(default)]
    pub p50_us: Option<u64>,
    /// 99th percentile latency in microseconds; `null` without responses.
    #[serde(default)]
    pub p99_us: Option<u64>,
    /// 99.9th percentile latency in microseconds; `null` without responses.
    #[serde(default)]
    pub p999_us: Option<u64>,
    /// Largest latency in microseconds; `null` without responses.
    #[serde(default)]
    pub max_us: Option<u64>,
    /// 99th percentile of how late requests started against the schedule, in microseconds;
    /// `null` when none started.
    #[serde(default)]
    pub lag_p99_us: Option<u64>,
    /// Whether this is the whole-run summary.
    #[serde(rename = "final", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_final: bool,
}

impl Report {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain maps and numbers cannot fail; an empty object beats a panic.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

impl fmt::Display for Report {
    /// The text form: `t=1.000s sent=50 ok=49 status=200:49,500:1 errors=0 dropped=0
    /// versions=v1:50 p50=1.2ms p99=3.4ms`, prefixed `final` on the summary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn counts(f: &mut fmt::Formatter<'_>, map: &BTreeMap<String, u64>) -> fmt::Result {
            if map.is_empty() {
                return write!(f, "-");
            }
            for (i, (k, n)) in map.iter().enumerate() {
                write!(f, "{}{k}:{n}", if i == 0 { "" } else { "," })?;
            }
            Ok(())
        }
        fn ms(f: &mut fmt::Formatter<'_>, v: Option<f64>) -> fmt::Result {
            match v {
                Some(v) => write!(f, "{v:.1}ms"),
                None => write!(f, "-"),
            }
        }
        if self.is_final {
            write!(f, "final ")?;
        }
        write!(
            f,
            "t={:.3}s sent={} ok={} status=",
            self.t, self.sent, self.ok
        )?;
        counts(f, &self.status)?;
        write!(
            f,
            " errors={} dropped={} versions=",
            self.errors, self.dropped
        )?;
        counts(f, &self.versions)?;
        write!(f, " p50=")?;
        ms(f, self.p50_ms)?;
        write!(f, " p99=")?;
        ms(f, self.p99_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn quantiles_are_within_bucket_width() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(ms(v));
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 / 500.0 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 / 990.0 - 1.0).abs() < 0.02, "p99 {p99}");
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn microsecond_quantiles_are_exact_below_two_milliseconds() {
        let mut h = Histogram::default();
        for v in (1..=1000).rev() {
            h.record(Duration::from_micros(v));
        }
        assert_eq!(h.quantile_us(0.5), Some(500));
        assert_eq!(h.quantile_us(0.99), Some(990));
        assert_eq!(h.quantile_us(0.999), Some(999));
        assert_eq!(h.max_us(), Some(1000));
        // Sub-microsecond parts are dropped, not rounded up.
        let mut h = Histogram::default();
        h.record(Duration::from_nanos(1999));
        assert_eq!(h.quantile_us(1.0), Some(1));
    }

    #[test]
    fn long_latencies_keep_three_digits() {
        let mut h = Histogram::default();
        h.record(Duration::from_secs(30));
        let us = h.quantile_us(0.5).unwrap();
        assert!(us.abs_diff(30_000_000) <= 30_000, "{us}");
        assert_eq!(h.count(), 1);
    }

    #[test]
    fn empty_and_tiny_latencies() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        h.record(Duration::ZERO);
        assert!(h.quantile_ms(0.5).unwrap() < 0.002);
    }

    fn mk_stats() -> Stats {
        let mut s = Stats::default();
        for _ in 0..4 {
            s.sent();
        }
        s.response(200, Some("v1"), ms(10));
        s.response(200, Some("v2"), ms(10));
        s.response(500, Some("v2"), ms(10));
        s.started_late(Duration::from_micros(250));
        s.error();
        s.dropped();
        s
    }

    #[test]
    fn json_lines_have_the_documented_shape() {
        let line = mk_stats()
            .report(Duration::from_millis(1500), false)
            .to_json();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["t"], 1.5);
        assert_eq!(v["sent"], 4);
        assert_eq!(v["ok"], 2);
        assert_eq!(v["status"], serde_json::json!({"200": 2, "500": 1}));
        assert_eq!(v["errors"], 1);
        assert_eq!(v["dropped"], 1);
        assert_eq!(v["versions"], serde_json::json!({"v1": 1, "v2": 2}));
        assert!((v["p50_ms"].as_f64().unwrap() - 10.0).abs() < 0.2);
        // Three significant digits: within 0.1% of 10 ms.
        for field in ["p50_us", "p99_us", "p999_us", "max_us"] {
            let us = v[field].as_u64().unwrap();
            assert!(us.abs_diff(10_000) <= 10, "{field}: {us}");
        }
        assert_eq!(v["lag_p99_us"], 250);
        assert!(v.get("final").is_none(), "{line}");

        let last = mk_stats().report(Duration::from_secs(2), true).to_json();
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["final"], true);
    }

    #[test]
    fn empty_reports_have_null_latency() {
        let v: serde_json::Value =
            serde_json::from_str(&Stats::default().report(Duration::ZERO, false).to_json())
                .unwrap();
        assert!(v["p50_ms"].is_null() && v["p99_ms"].is_null());
        for field in ["p50_us", "p99_us", "p999_us", "max_us", "lag_p99_us"] {
            assert!(v[field].is_null(), "{field}");
        }
    }

    #[test]
    fn lines_from_before_the_microsecond_fields_still_parse() {
        let old = r#"{"t":1.0,"sent":50,"ok":50,"status":{"200":50},"errors":0,"dropped":0,"versions":{"v1":50},"p50_ms":1.2,"p99_ms":3.4}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        assert_eq!(r.p99_ms, Some(3.4));
        assert_eq!(r.p999_us, None);
    }

    #[test]
    fn text_lines_read_as_one_line() {
        let text = mk_stats().report(Duration::from_secs(2), true).to_string();
        assert!(
            text.starts_with("final t=2.000s sent=4 ok=2 status=200:2,500:1 errors=1 dropped=1 versions=v1:1,v2:2 p50=10."),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let empty = Stats::default().report(Duration::ZERO, false).to_string();
        assert_eq!(
            empty,
            "t=0.000s sent=0 ok=0 status=- errors=0 dropped=0 versions=- p50=- p99=-"
        );
    }
}
