//! The embedded metric source's pure half: turning two direct scrapes of the proxies' `/metrics`
//! into a canary-vs-primary [`Window`].
//!
//! Reading the exposition ([`parse`]) and summing one arm's outbound series ([`counters`]) are
//! the metric contract's, in `mesh_core::exposition` and `mesh_core::gates`, re-exported here.
//! Summing those series for `<svc>-canary` and `<svc>-primary` across all proxies gives each
//! side's cumulative counters; the difference between two scrapes is the analysis window. A
//! counter that went down (a restarted proxy) contributes its new value, as Prometheus'
//! `increase()` does.

use mesh_core::exposition::count;
pub use mesh_core::exposition::{ParseError, Sample, parse};
use mesh_core::gates::bound_of_key;
pub use mesh_core::gates::{ArmCounters, counters, merge};

use crate::judge::{ArmWindow, Histogram, Window};

fn increase(before: f64, after: f64) -> u64 {
    let d = if after >= before {
        after - before
    } else {
        after
    };
    count(d)
}

/// The traffic between two scrapes of one side.
pub fn arm_window(before: &ArmCounters, after: &ArmCounters) -> ArmWindow {
    let buckets = after
        .buckets
        .iter()
        .map(|(k, v)| {
            (
                bound_of_key(*k),
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

    #[test]
    fn windows_are_differences_and_survive_counter_resets() {
        let s = parse(mesh_core::exposition::SAMPLE).unwrap();
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
