//! Field checks every kind's validation shares: names, ranges, durations, URLs, and the
//! Rust twin of a CEL rule.

use super::error::FieldError;
use crate::cel::CelRule;

pub(super) fn check_dns_name(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ok_ends = value
        .bytes()
        .next()
        .zip(value.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if !value.is_empty() && value.len() <= max && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid name: use at most {max} lowercase letters, digits, \
                 '-' and '.', starting and ending with a letter or digit"
            ),
        ))
    }
}

pub(super) fn check_range(
    field: &str,
    value: Option<i32>,
    min: i32,
    max: i32,
) -> Result<(), FieldError> {
    match value {
        Some(v) if v < min || v > max => Err(FieldError::new(
            field,
            format!("{v} is out of range: must be between {min} and {max}"),
        )),
        _ => Ok(()),
    }
}

/// A duration as Flagger and Kubernetes users write them (`30s`, `1m30s`, `500ms`), in
/// milliseconds. `None` when the text is not such a duration.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let d = mesh_core::duration::parse(text).ok()?;
    u64::try_from(d.as_millis()).ok()
}

pub(super) fn check_duration(field: &str, value: Option<&str>) -> Result<(), FieldError> {
    match value {
        Some(v) if parse_duration_ms(v).is_none() => Err(FieldError::new(
            field,
            format!("{v:?} is not a duration: write it like 30s, 1m or 500ms"),
        )),
        _ => Ok(()),
    }
}

pub(super) fn check_url(field: &str, value: &str) -> Result<(), FieldError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} must be an http:// or https:// URL"),
        ))
    }
}

pub(super) fn non_empty(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// Runs `rule`'s Rust twin on `value`, which sits at field `at`; a failure reports the rule's
/// CEL message, with the values that broke it.
pub(crate) fn cel<T: ?Sized>(rule: &CelRule<T>, at: &str, value: &T) -> Result<(), FieldError> {
    (rule.check)(value).map_err(|broken| {
        let message = if broken.values.is_empty() {
            rule.text.message.to_string()
        } else {
            format!("{} ({})", rule.text.message, broken.values)
        };
        FieldError::new(format!("{at}{}", broken.field), message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1.5s"), Some(1_500));
        assert_eq!(parse_duration_ms("24h"), Some(86_400_000));
        for bad in ["", "10", "s", "1d", "-1s"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }
}
