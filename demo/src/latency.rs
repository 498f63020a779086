//! Added latency drawn from a log-normal distribution.
//!
//! Service latencies are right-skewed: most requests are near the median and a few are much
//! slower. A log-normal captures that with two numbers users already think in, the median and
//! the p99, so `--latency-ms 20 --latency-p99-ms 200` means what it says.

use std::time::Duration;

/// The 99th percentile of the standard normal distribution.
pub const Z_99: f64 = 2.326_347_874_040_841;

/// No single delay exceeds this, so a heavy tail cannot park a request forever.
pub const MAX_DELAY: Duration = Duration::from_secs(600);

/// Why a latency model cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LatencyError {
    /// The p99 is below the median.
    #[error("the p99 ({p99_ms} ms) is below the median ({median_ms} ms)")]
    P99BelowMedian {
        /// The median asked for.
        median_ms: f64,
        /// The p99 asked for.
        p99_ms: f64,
    },
    /// A p99 without a median: a log-normal has no median of zero.
    #[error("a p99 of {p99_ms} ms needs a positive median")]
    NoMedian {
        /// The p99 asked for.
        p99_ms: f64,
    },
    /// A value is negative, infinite or not a number.
    #[error("{value} ms is not a non-negative number of milliseconds")]
    NotFinite {
        /// The offending value.
        value: f64,
    },
}

/// How long to hold each request before answering it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    /// Answer at once.
    None,
    /// `exp(mu + sigma * Z)` milliseconds with `Z` standard normal.
    LogNormal {
        /// Log of the median, in milliseconds.
        mu: f64,
        /// Spread; zero gives a constant delay.
        sigma: f64,
    },
}

impl Latency {
    /// The distribution with the given median and p99, in milliseconds. Both zero means none.
    pub fn new(median_ms: f64, p99_ms: f64) -> Result<Self, LatencyError> {
        for value in [median_ms, p99_ms] {
            if !value.is_finite() || value < 0.0 {
                return Err(LatencyError::NotFinite { value });
            }
        }
        if p99_ms < median_ms {
            return Err(LatencyError::P99BelowMedian { median_ms, p99_ms });
        }
        if median_ms == 0.0 {
            return if p99_ms == 0.0 {
                Ok(Self::None)
            } else {
                Err(LatencyError::NoMedian { p99_ms })
            };
        }
        let mu = median_ms.ln();
        Ok(Self::LogNormal {
            mu,
            sigma: (p99_ms.ln() - mu) / Z_99,
        })
    }

    /// Draws one delay.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Self::None => Duration::ZERO,
            Self::LogNormal { mu, sigma } => {
                let ms = (mu + sigma * standard_normal(rng)).exp();
                Duration::try_from_secs_f64(ms / 1000.0)
                    .unwrap_or(MAX_DELAY)
                    .min(MAX_DELAY)
            }
        }
    }
}

/// A standard normal draw by the Box-Muller transform; fastrand only gives uniforms.
fn standard_normal(rng: &mut fastrand::Rng) -> f64 {
    // 1 - [0, 1) is (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use statrs::distribution::{ContinuousCDF, Normal};

    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index from a fraction in 0..=1 of a length"
    )]
    fn quantile(sorted: &[Duration], q: f64) -> f64 {
        let i = ((sorted.len() as f64) * q) as usize;
        sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
    }

    fn samples(latency: Latency, n: usize) -> Vec<Duration> {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut v: Vec<_> = (0..n).map(|_| latency.sample(&mut rng)).collect();
        v.sort();
        v
    }

    #[test]
    fn z_99_is_the_normal_quantile() {
        let z = Normal::standard().inverse_cdf(0.99);
        assert!((z - Z_99).abs() < 1e-9, "{z}");
    }

    #[test]
    fn samples_have_the_asked_median_and_p99() {
        let v = samples(Latency::new(20.0, 200.0).unwrap(), 200_000);
        let (p50, p99) = (quantile(&v, 0.5), quantile(&v, 0.99));
        assert!((p50 - 20.0).abs() < 0.5, "p50 {p50}");
        assert!((p99 - 200.0).abs() < 10.0, "p99 {p99}");
    }

    #[test]
    fn equal_median_and_p99_is_a_constant_delay() {
        let v = samples(Latency::new(15.0, 15.0).unwrap(), 100);
        assert!(
            v.iter()
                .all(|d| (d.as_secs_f64() * 1000.0 - 15.0).abs() < 1e-6)
        );
    }

    #[test]
    fn zero_is_no_delay() {
        assert_eq!(Latency::new(0.0, 0.0), Ok(Latency::None));
        assert!(samples(Latency::None, 10).iter().all(Duration::is_zero));
    }

    #[test]
    fn rejects_impossible_shapes() {
        assert!(matches!(
            Latency::new(100.0, 50.0),
            Err(LatencyError::P99BelowMedian { .. })
        ));
        assert!(matches!(
            Latency::new(0.0, 50.0),
            Err(LatencyError::NoMedian { .. })
        ));
        assert!(matches!(
            Latency::new(f64::NAN, 50.0),
            Err(LatencyError::NotFinite { .. })
        ));
        assert!(matches!(
            Latency::new(-1.0, 50.0),
            Err(LatencyError::NotFinite { .. })
        ));
    }

    #[test]
    fn heavy_tails_are_capped() {
        let latency = Latency::LogNormal {
            mu: 1000.0,
            sigma: 0.0,
        };
        assert_eq!(latency.sample(&mut fastrand::Rng::with_seed(1)), MAX_DELAY);
    }
}
