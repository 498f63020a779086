//! Which fraction of requests the demo app fails, and when.
//!
//! A steady error rate models a bad release; periodic bursts model a flaky dependency, the
//! case where a canary judge must not be fooled by one bad minute. The schedule is a pure
//! function of the time since start so it can be tested without clocks.

use std::time::Duration;

/// Flaky bursts: for the first `length` of every `every`, requests fail at `error_rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Burst {
    /// The period, measured from process start; never zero.
    pub every: Duration,
    /// How long each burst lasts, at most `every`.
    pub length: Duration,
    /// The error rate during a burst.
    pub error_rate: f64,
}

/// The error rate over time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorSchedule {
    /// The error rate outside bursts.
    pub error_rate: f64,
    /// Periodic bursts, if any.
    pub burst: Option<Burst>,
}

impl ErrorSchedule {
    /// The error rate at `since_start`.
    pub fn error_rate_at(&self, since_start: Duration) -> f64 {
        match self.burst {
            Some(b)
                if !b.every.is_zero()
                    && since_start.as_nanos() % b.every.as_nanos() < b.length.as_nanos() =>
            {
                b.error_rate
            }
            _ => self.error_rate,
        }
    }

    /// Whether a request arriving at `since_start` fails, drawing from `rng`.
    pub fn fails(&self, since_start: Duration, rng: &mut fastrand::Rng) -> bool {
        // `f64()` is in [0, 1): a rate of 0 never fails and a rate of 1 always does.
        rng.f64() < self.error_rate_at(since_start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn bursty() -> ErrorSchedule {
        ErrorSchedule {
            error_rate: 0.01,
            burst: Some(Burst {
                every: secs(20.0),
                length: secs(5.0),
                error_rate: 0.5,
            }),
        }
    }

    #[test]
    fn bursts_start_every_period_from_start() {
        let s = bursty();
        for (t, rate) in [
            (0.0, 0.5),
            (4.9, 0.5),
            (5.0, 0.01),
            (19.9, 0.01),
            (20.0, 0.5),
            (64.0, 0.5),
            (65.0, 0.01),
        ] {
            assert_eq!(s.error_rate_at(secs(t)), rate, "at {t}s");
        }
    }

    #[test]
    fn without_bursts_the_rate_is_steady() {
        let s = ErrorSchedule {
            error_rate: 0.2,
            burst: None,
        };
        assert_eq!(s.error_rate_at(secs(0.0)), 0.2);
        assert_eq!(s.error_rate_at(secs(1e6)), 0.2);
    }

    #[test]
    fn rates_of_zero_and_one_are_exact() {
        let mut rng = fastrand::Rng::with_seed(3);
        for (rate, expect) in [(0.0, false), (1.0, true)] {
            let s = ErrorSchedule {
                error_rate: rate,
                burst: None,
            };
            assert!((0..1000).all(|_| s.fails(Duration::ZERO, &mut rng) == expect));
        }
    }
}
