//! Reading a Prometheus or OpenMetrics text exposition (what `/metrics` serves) into samples.
//! Pure: the caller fetches the text. The rollout controller's direct scrape and the proxy's
//! tests read the proxies' metrics through it.

use std::collections::BTreeMap;

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

/// A counter's value as a whole count. Counter values are non-negative integers carried as
/// floats; clamping makes the conversion total (NaN and negatives become 0, huge values
/// saturate).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the value is clamped to the u64 range first"
)]
pub fn count(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else {
        x.round().min(u64::MAX as f64) as u64
    }
}

/// A bucket bound (`le`) as a number: `+Inf` is infinity, and so is a bound that does not parse
/// (it can only be the last bucket's).
pub fn bucket_bound(le: Option<&str>) -> f64 {
    le.and_then(|v| match v {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    })
    .unwrap_or(f64::INFINITY)
}

/// A small scrape in the proxy's format: outbound responses and latencies of `web-canary` and
/// `web-primary`, one inbound line, and a label with escapes. Examples and tests read it.
pub const SAMPLE: &str = r#"# HELP response_total Responses.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let s = parse(SAMPLE).unwrap();
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
    fn unlabelled_samples_newlines_and_bounds() {
        let s = parse("plain 3\nnl{v=\"x\\ny\",le=\"+Inf\"} 2\n").unwrap();
        assert!(s[0].labels.is_empty());
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels["v"], "x\ny");
        let le = s[1].labels.get("le").map(String::as_str);
        assert_eq!(bucket_bound(le), f64::INFINITY);
        assert_eq!(bucket_bound(Some("2.5")), 2.5);
        assert_eq!(bucket_bound(None), f64::INFINITY);
        assert!(parse("no_value").is_err());
    }

    #[test]
    fn counts_are_clamped_whole_numbers() {
        assert_eq!(count(2.6), 3);
        assert_eq!(count(-1.0), 0);
        assert_eq!(count(f64::NAN), 0);
        assert_eq!(count(f64::INFINITY), u64::MAX);
    }
}
