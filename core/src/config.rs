//! Typed configuration from environment variables, behind a trait so tests feed a map.
//!
//! Every binary names its variables as constants and parses them through [`Env`]; a bad value
//! becomes a [`ConfigError`] that names the variable and the value, and the binary exits with
//! code [`EXIT_CONFIG`] (64, `EX_USAGE` in sysexits.h), so operators and supervisors can tell a
//! misconfiguration from a crash.

use std::{collections::BTreeMap, fmt::Display, str::FromStr};

/// Exit code for bad configuration (sysexits.h `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// A source of configuration variables.
pub trait Env {
    /// The raw value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;

    /// Parses `name` if it is set and not empty.
    fn parse<T>(&self, name: &'static str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.var(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(value) => value
                .trim()
                .parse()
                .map(Some)
                .map_err(|e: T::Err| ConfigError {
                    name,
                    value,
                    reason: e.to_string(),
                }),
        }
    }

    /// Parses `name`, falling back to `default` when it is unset or empty.
    fn parse_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.parse(name)?.unwrap_or(default))
    }

    /// Parses `name` as a duration written the Flagger way (`500ms`, `1s`, `1m30s`; see
    /// [`crate::duration`]), falling back to `default` when it is unset or empty.
    fn duration_or(
        &self,
        name: &'static str,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match self.var(name) {
            None => Ok(default),
            Some(v) if v.trim().is_empty() => Ok(default),
            Some(value) => crate::duration::parse(value.trim()).map_err(|e| ConfigError {
                name,
                reason: e.to_string(),
                value,
            }),
        }
    }
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A configuration variable holds a value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct ConfigError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn unset_and_empty_fall_back_to_default() {
        assert_eq!(env(&[]).parse_or("X_PORT", 7u16), Ok(7));
        assert_eq!(env(&[("X_PORT", " ")]).parse_or("X_PORT", 7u16), Ok(7));
        assert_eq!(
            env(&[("X_PORT", "8080")]).parse_or("X_PORT", 7u16),
            Ok(8080)
        );
    }

    #[test]
    fn durations_are_read_the_flagger_way() {
        use std::time::Duration;
        let d = Duration::from_secs(1);
        assert_eq!(env(&[]).duration_or("X_T", d), Ok(d));
        assert_eq!(env(&[("X_T", "")]).duration_or("X_T", d), Ok(d));
        assert_eq!(
            env(&[("X_T", "250ms")]).duration_or("X_T", d),
            Ok(Duration::from_millis(250))
        );
        let err = env(&[("X_T", "5")]).duration_or("X_T", d).unwrap_err();
        assert_eq!((err.name, err.value.as_str()), ("X_T", "5"));
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        let err = env(&[("X_PORT", "99999")])
            .parse::<u16>("X_PORT")
            .unwrap_err();
        assert_eq!(err.name, "X_PORT");
        assert_eq!(err.value, "99999");
        assert!(
            err.to_string().starts_with("invalid X_PORT=\"99999\": "),
            "{err}"
        );
    }
}
