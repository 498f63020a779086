//! Waiting for conditions without bare sleeps.
//!
//! Integration tests observe asynchronous systems; a fixed sleep is either too short on a loaded
//! CI machine or wastes time everywhere else. `assert_eventually!` polls instead, and gives up
//! after a patience that the environment sets: `MESH_TEST_PATIENCE` in seconds (default 30), so a
//! slow machine can be given more time without touching a test.

use std::time::Duration;

/// The variable holding the patience, in seconds (fractions allowed).
pub const ENV_PATIENCE: &str = "MESH_TEST_PATIENCE";

/// Patience when `MESH_TEST_PATIENCE` is unset.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

/// How often conditions are re-checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long `assert_eventually!` waits. Panics, naming the variable, when it is malformed:
/// a typo must not silently fall back to a default.
pub fn patience() -> Duration {
    parse_patience(std::env::var(ENV_PATIENCE).ok().as_deref())
}

fn parse_patience(value: Option<&str>) -> Duration {
    match value.map(str::trim) {
        None | Some("") => DEFAULT_PATIENCE,
        Some(v) => match v.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::from_secs_f64(secs),
            #[allow(clippy::panic, reason = "test-only configuration error")]
            _ => panic!("invalid {ENV_PATIENCE}={v:?}: expected a positive number of seconds"),
        },
    }
}

/// Polls an expression (which may `.await`) until it is true, or panics after [`patience()`]
/// with the given message. Must be used inside an async context.
///
/// ```no_run
/// # async fn f(count: impl Fn() -> usize) {
/// mesh_test_support::assert_eventually!(count() == 3, "count stayed at {}", count());
/// # }
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($arg:tt)+) => {{
        let patience = $crate::eventually::patience();
        let start = $crate::__private::tokio::time::Instant::now();
        loop {
            if $cond {
                break;
            }
            if start.elapsed() >= patience {
                panic!(
                    "assert_eventually failed after {:?} (set {} to wait longer): {}",
                    patience,
                    $crate::eventually::ENV_PATIENCE,
                    format_args!($($arg)+)
                );
            }
            $crate::__private::tokio::time::sleep($crate::eventually::POLL_INTERVAL).await;
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn patience_parses_seconds() {
        assert_eq!(parse_patience(None), DEFAULT_PATIENCE);
        assert_eq!(parse_patience(Some("")), DEFAULT_PATIENCE);
        assert_eq!(parse_patience(Some("2.5")), Duration::from_millis(2500));
    }

    #[test]
    #[should_panic(expected = "invalid MESH_TEST_PATIENCE=\"soon\"")]
    fn malformed_patience_names_the_variable() {
        parse_patience(Some("soon"));
    }

    #[test]
    #[should_panic(expected = "invalid MESH_TEST_PATIENCE=\"-1\"")]
    fn negative_patience_is_rejected() {
        parse_patience(Some("-1"));
    }

    #[tokio::test]
    async fn waits_until_the_condition_holds() {
        let polls = AtomicUsize::new(0);
        assert_eventually!(polls.fetch_add(1, Ordering::SeqCst) >= 3);
        assert_eq!(polls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "assert_eventually failed after")]
    async fn panics_with_the_message_when_patience_runs_out() {
        // The macro measures patience on tokio's clock, so with time paused the 30 s default
        // elapses virtually and this test takes no wall time.
        let never = false;
        assert_eventually!(never, "never became {}", true);
    }
}
