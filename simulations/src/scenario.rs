//! The scenarios: what the canary and the primary do, how much traffic there is, and what goes
//! wrong with the metrics. Each is a pure description; [`crate::traffic`] turns one into counts.

/// What a careful operator would want the rollout to end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The canary is as good as the primary: it should be promoted.
    Promote,
    /// The canary is worse: it should be rolled back.
    Rollback,
    /// Too little traffic to tell: promoting without evidence is the mistake to avoid.
    NoSilentPromotion,
}

/// Short bursts of failures, starting at random (exponential gaps) times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bursts {
    /// Mean time between the starts of two bursts, in seconds.
    pub mean_gap_s: f64,
    /// Length of one burst, in seconds.
    pub length_s: u64,
    /// Failure probability of a request during a burst.
    pub fail: f64,
}

/// Periods when the metrics source cannot be read (a Prometheus restart, a proxy that does not
/// answer its scrape).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gaps {
    /// Mean time between the starts of two outages, in seconds.
    pub mean_gap_s: f64,
    /// Shortest outage, in seconds.
    pub min_s: u64,
    /// Longest outage, in seconds.
    pub max_s: u64,
}

/// One failure of something both arms depend on, at a fixed time into the rollout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outage {
    /// Seconds after the rollout starts.
    pub start_s: u64,
    /// How long it lasts, in seconds.
    pub length_s: u64,
    /// Failure probability of a request meanwhile, on both arms.
    pub fail: f64,
}

/// A slow tail: a share of the canary's requests takes longer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tail {
    /// Share of the canary's requests in the tail.
    pub share: f64,
    /// Their latency, as a multiple of the primary's.
    pub factor: f64,
}

/// Periods when the node is loaded (CPU contention, a noisy neighbour, a GC pause upstream):
/// every request on both arms waits an extra delay on top of its own latency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delays {
    /// Mean time between the starts of two loaded periods, in seconds.
    pub mean_gap_s: f64,
    /// Shortest loaded period, in seconds.
    pub min_s: u64,
    /// Longest loaded period, in seconds.
    pub max_s: u64,
    /// Median of the added delay, in milliseconds (log-normal).
    pub median_ms: f64,
    /// p99 of the added delay, in milliseconds.
    pub p99_ms: f64,
}

/// One simulated situation.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name used in tables and `results.json`.
    pub name: &'static str,
    /// One line for the docs.
    pub description: &'static str,
    /// Requests per second reaching the service (primary and canary together).
    pub rps: f64,
    /// Diurnal traffic: the rate swings by this fraction around `rps` over 24 hours, and each
    /// rollout starts at a random time of day.
    pub diurnal_amplitude: Option<f64>,
    /// Median latency of the primary, in milliseconds.
    pub median_ms: f64,
    /// p99 latency of the primary, in milliseconds.
    pub p99_ms: f64,
    /// Failure probability of a primary request.
    pub primary_fail: f64,
    /// Failure probability of a canary request.
    pub canary_fail: f64,
    /// Canary latencies are the primary's times this factor (1.2 makes the p99 20 % higher).
    pub canary_latency_factor: f64,
    /// Failure bursts of the canary alone.
    pub canary_bursts: Option<Bursts>,
    /// Failure bursts hitting both arms at once (a flaky dependency).
    pub shared_bursts: Option<Bursts>,
    /// Outages of the metrics source.
    pub gaps: Option<Gaps>,
    /// A failure of a shared dependency: both arms fail alike for a while.
    pub shared_outage: Option<Outage>,
    /// Load delays both arms share, in bursts.
    pub shared_delays: Option<Delays>,
    /// A slow tail on the canary alone.
    pub canary_tail: Option<Tail>,
    /// A slow tail on the canary for its first seconds of traffic only (a cold start: new
    /// processes, new connections and handshakes through the proxies), in seconds.
    pub canary_warmup: Option<(u64, Tail)>,
    /// The right outcome.
    pub expect: Expect,
}

/// Failure share of the primary in every scenario but the noisy one: 0.1 %.
pub const BASE_FAIL: f64 = 0.001;
/// Median latency of the primary, in milliseconds.
pub const MEDIAN_MS: f64 = 20.0;
/// p99 latency of the primary, in milliseconds.
pub const P99_MS: f64 = 100.0;

impl Scenario {
    /// A lower bound on the canary's failure share averaged over time: its own rate, raised to
    /// a burst's for the share of time that kind of burst lasts (a burst lasts `length_s` and
    /// the next starts an exponential `mean_gap_s` after it ends, as `traffic` draws them), the
    /// larger of the two kinds when both are set (exact when one is, as in every scenario).
    pub fn mean_canary_fail(&self) -> f64 {
        [self.canary_bursts, self.shared_bursts]
            .into_iter()
            .flatten()
            .map(|b| {
                let length = b.length_s as f64;
                let share = length / (length + b.mean_gap_s);
                self.canary_fail * (1.0 - share) + b.fail.max(self.canary_fail) * share
            })
            .fold(self.canary_fail, f64::max)
    }

    fn base(name: &'static str, description: &'static str) -> Self {
        Self {
            name,
            description,
            rps: 100.0,
            diurnal_amplitude: None,
            median_ms: MEDIAN_MS,
            p99_ms: P99_MS,
            primary_fail: BASE_FAIL,
            canary_fail: BASE_FAIL,
            canary_latency_factor: 1.0,
            canary_bursts: None,
            shared_bursts: None,
            gaps: None,
            shared_outage: None,
            shared_delays: None,
            canary_tail: None,
            canary_warmup: None,
            expect: Expect::Promote,
        }
    }

    fn errors(name: &'static str, description: &'static str, fail: f64) -> Self {
        Self {
            canary_fail: fail,
            expect: Expect::Rollback,
            ..Self::base(name, description)
        }
    }

    fn latency(name: &'static str, description: &'static str, factor: f64) -> Self {
        Self {
            canary_latency_factor: factor,
            expect: Expect::Rollback,
            ..Self::base(name, description)
        }
    }

    fn low(name: &'static str, description: &'static str, rps: f64) -> Self {
        Self {
            rps,
            expect: Expect::NoSilentPromotion,
            ..Self::base(name, description)
        }
    }
}

/// Every scenario, in report order.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario::base(
            "healthy",
            "canary identical to the primary: 100 RPS, 0.1 % errors, p99 100 ms",
        ),
        Scenario::errors(
            "errors-0.5pct",
            "canary errors 0.1 % -> 0.5 % at 100 RPS",
            0.005,
        ),
        Scenario::errors("errors-1pct", "canary errors 0.1 % -> 1 % at 100 RPS", 0.01),
        Scenario::errors("errors-5pct", "canary errors 0.1 % -> 5 % at 100 RPS", 0.05),
        Scenario::latency(
            "latency-1.2x",
            "canary latency x1.2 (p99 100 ms -> 120 ms)",
            1.2,
        ),
        Scenario::latency(
            "latency-2x",
            "canary latency x2 (p99 100 ms -> 200 ms)",
            2.0,
        ),
        Scenario {
            canary_bursts: Some(Bursts {
                mean_gap_s: 90.0,
                length_s: 10,
                fail: 0.2,
            }),
            expect: Expect::Rollback,
            ..Scenario::base(
                "bursts",
                "canary fails 20 % of requests in 10 s bursts, one every 90 s on average; 0.1 % otherwise",
            )
        },
        Scenario::low("low-traffic-1rps", "healthy canary, 1 RPS in total", 1.0),
        Scenario::low(
            "low-traffic-0.1rps",
            "healthy canary, 0.1 RPS in total",
            0.1,
        ),
        Scenario {
            diurnal_amplitude: Some(0.9),
            ..Scenario::base(
                "diurnal",
                "healthy canary; traffic 10-190 RPS over the day, rollout at a random hour",
            )
        },
        Scenario {
            primary_fail: 0.005,
            canary_fail: 0.005,
            shared_bursts: Some(Bursts {
                mean_gap_s: 60.0,
                length_s: 10,
                fail: 0.1,
            }),
            ..Scenario::base(
                "noisy-primary",
                "healthy canary of a flaky service: 0.5 % errors and 10 % error bursts on both arms",
            )
        },
        Scenario {
            gaps: Some(Gaps {
                mean_gap_s: 120.0,
                min_s: 20,
                max_s: 90,
            }),
            ..Scenario::base(
                "metric-gaps",
                "healthy canary; the metrics source is down 20-90 s at a time, every 2 min on average",
            )
        },
    ]
    .into_iter()
    .chain(realistic())
    .chain(loaded())
    .collect()
}

/// The round-2 scenarios: closer to what production does to a rollout.
fn realistic() -> Vec<Scenario> {
    vec![
        Scenario {
            shared_outage: Some(Outage {
                start_s: 20,
                length_s: 60,
                fail: 0.2,
            }),
            ..Scenario::base(
                "primary-degrades",
                "healthy canary; 20 s in, a shared dependency fails 20 % of both arms' requests for 60 s",
            )
        },
        Scenario::errors(
            "one-bad-pod",
            "one canary pod of three fails 3 % of its requests (1.07 % over the canary), 0.1 % on the others",
            (2.0 * BASE_FAIL + 0.03) / 3.0,
        ),
        Scenario {
            canary_tail: Some(Tail {
                share: 0.002,
                factor: 20.0,
            }),
            expect: Expect::Rollback,
            ..Scenario::base(
                "latency-p99.9",
                "canary's slowest 0.2 % take 20x longer (p99.9 about 1 s); p99 unchanged",
            )
        },
        Scenario::errors(
            "one-route",
            "canary fails 20 % on one route carrying 5 % of requests (1.1 % over the canary); the judge sees the service's totals",
            0.95 * BASE_FAIL + 0.05 * 0.2,
        ),
        Scenario {
            canary_warmup: Some((
                15,
                Tail {
                    share: 0.05,
                    factor: 5.0,
                },
            )),
            ..Scenario::base(
                "healthy-cold-start",
                "healthy canary whose first 15 s of traffic are slow for 5 % of its requests (5x): a cold start on a loaded node, sized to the real trials",
            )
        },
        Scenario {
            shared_bursts: Some(Bursts {
                mean_gap_s: 60.0,
                length_s: 5,
                fail: 0.5,
            }),
            ..Scenario::base(
                "client-5xx-bursts",
                "healthy canary; a client sends bursts of bad requests that fail on both arms (50 % for 5 s, every 60 s on average)",
            )
        },
    ]
}

/// The load the real trials met: the demo app's latency (median 5 ms, p99 20 ms) and, about a
/// tenth of the time, a loaded node that delays every request on both arms by a log-normal
/// median 30 ms, p99 150 ms, for 2 to 8 s, every 60 s on average. Sized to the real trials'
/// shares above each bucket (about 3 % of primary requests above 20 ms, 1 % above 100 ms), not
/// fitted to their outcomes.
pub const LOADED_NODE: Delays = Delays {
    mean_gap_s: 60.0,
    min_s: 2,
    max_s: 8,
    median_ms: 30.0,
    p99_ms: 150.0,
};

/// A node loaded far past its cores, as the real trials' machine was at its worst (a load
/// average of 34 on 2 cores): both arms delayed by a log-normal median 300 ms, p99 1.5 s, for 5
/// to 15 s, every 90 s on average, so that both arms' p99 passes the request-duration gate's
/// 500 ms while it lasts. A stress case sized to the one real rollback it stands for (a p99 of
/// 901 ms on both sides), not fitted to outcomes.
pub const OVERLOADED_NODE: Delays = Delays {
    mean_gap_s: 90.0,
    min_s: 5,
    max_s: 15,
    median_ms: 300.0,
    p99_ms: 1_500.0,
};

/// The scenarios of the real trials on a loaded node: what `mesh demo --scenario healthy` and
/// `--scenario latency-2x` run, with shared load delays.
fn loaded() -> Vec<Scenario> {
    let demo = |s: Scenario| Scenario {
        median_ms: 5.0,
        p99_ms: 20.0,
        shared_delays: Some(LOADED_NODE),
        ..s
    };
    vec![
        demo(Scenario::base(
            "healthy-loaded",
            "healthy canary of the demo app (median 5 ms, p99 20 ms) on a loaded node: both arms delayed 30 ms (median) for 2-8 s, every 60 s on average",
        )),
        demo(Scenario::latency(
            "latency-2x-loaded",
            "canary latency x2 (median 5 ms -> 10 ms) on the same loaded node: the shared delays dwarf the 2x while they last",
            2.0,
        )),
        Scenario {
            shared_delays: Some(OVERLOADED_NODE),
            ..demo(Scenario::base(
                "healthy-overloaded",
                "healthy canary of the demo app on a node loaded far past its cores: both arms delayed 300 ms (median, p99 1.5 s) for 5-15 s, every 90 s on average, so both arms' p99 passes 500 ms",
            ))
        },
    ]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::by_name;

    #[test]
    fn bursts_raise_the_mean_failure_share_by_the_time_they_last() {
        let healthy = by_name("healthy").unwrap();
        assert!((healthy.mean_canary_fail() - healthy.canary_fail).abs() < 1e-12);
        // 10 s bursts at 10 %, the next starting 60 s after one ends on average: 1/7 of the
        // time; 0.5 % otherwise.
        let noisy = by_name("noisy-primary").unwrap();
        let expected = 0.005 * 6.0 / 7.0 + 0.1 / 7.0;
        assert!((noisy.mean_canary_fail() - expected).abs() < 1e-12);
    }
}
