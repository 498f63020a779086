//! The control plane's own metrics, served with the rollout metrics on the resource API's
//! `/metrics`: how many proxies watch what, how long a published change takes to be written to
//! the watch streams, and how many certificates the CA issued. Plain atomics, written where the
//! events happen (the proxy API's streams and its certify call) and read at scrape time.
//!
//! | series | type | labels | value |
//! |---|---|---|---|
//! | `mesh_controlplane_watchers` | gauge | `kind` (`routes`, `endpoints`, `address`, `policy`) | watch streams open now |
//! | `mesh_controlplane_propagation_seconds` | histogram | | from a change's publication by the index to its line being written on a watch stream, per stream |
//! | `mesh_controlplane_certificates_issued_total` | counter | | certificates the CA signed for proxies |

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a watch stream follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// An authority's routes.
    Routes,
    /// A service's endpoints.
    Endpoints,
    /// What an address is in the mesh.
    Address,
    /// An inbound port's policy.
    Policy,
}

impl WatchKind {
    /// Every kind, in the exposition's order.
    pub const ALL: [WatchKind; 4] = [Self::Routes, Self::Endpoints, Self::Address, Self::Policy];

    /// The `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routes => "routes",
            Self::Endpoints => "endpoints",
            Self::Address => "address",
            Self::Policy => "policy",
        }
    }
}

/// Upper bounds of the propagation histogram, in seconds: a weight change must reach proxies
/// within milliseconds, so the buckets are fine below 10 ms.
pub const PROPAGATION_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The control plane's own counters.
#[derive(Debug, Default)]
pub struct Metrics {
    watchers: [AtomicU64; 4],
    certificates_issued: AtomicU64,
    propagation_buckets: [AtomicU64; PROPAGATION_BUCKETS.len()],
    propagation_count: AtomicU64,
    propagation_sum_ns: AtomicU64,
}

/// An open watch stream, counted until it is dropped.
#[derive(Debug)]
pub struct Watcher {
    metrics: Arc<Metrics>,
    kind: WatchKind,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.watchers[self.kind as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Watcher {
    /// Records that a change published `took` ago was just written on this stream.
    pub fn propagated(&self, took: Duration) {
        self.metrics.propagated(took);
    }
}

impl Metrics {
    /// Counts a watch stream of `kind` while the returned guard lives.
    pub fn watch(self: &Arc<Self>, kind: WatchKind) -> Watcher {
        self.watchers[kind as usize].fetch_add(1, Ordering::Relaxed);
        Watcher {
            metrics: Arc::clone(self),
            kind,
        }
    }

    /// Counts a certificate issued to a proxy.
    pub fn certificate_issued(&self) {
        self.certificates_issued.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one propagation time.
    pub fn propagated(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = PROPAGATION_BUCKETS.iter().position(|le| secs <= *le) {
            self.propagation_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.propagation_count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.propagation_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The exposition text of these series.
    pub fn exposition(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP mesh_controlplane_watchers Watch streams open now, by what they follow.\n\
             # TYPE mesh_controlplane_watchers gauge"
        );
        for kind in WatchKind::ALL {
            let n = self.watchers[kind as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "mesh_controlplane_watchers{{kind=\"{}\"}} {n}",
                kind.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP mesh_controlplane_propagation_seconds From a change's publication to its line written on a watch stream.\n\
             # TYPE mesh_controlplane_propagation_seconds histogram"
        );
        let mut cumulative = 0;
        for (le, n) in PROPAGATION_BUCKETS.iter().zip(&self.propagation_buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "mesh_controlplane_propagation_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.propagation_count.load(Ordering::Relaxed);
        #[allow(
            clippy::cast_precision_loss,
            reason = "a sum of nanoseconds shown in seconds"
        )]
        let sum = self.propagation_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "mesh_controlplane_propagation_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             mesh_controlplane_propagation_seconds_sum {sum}\n\
             mesh_controlplane_propagation_seconds_count {count}"
        );
        let issued = self.certificates_issued.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP mesh_controlplane_certificates_issued Certificates the CA signed for proxies.\n\
             # TYPE mesh_controlplane_certificates_issued counter\n\
             mesh_controlplane_certificates_issued_total {issued}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_are_counted_while_their_streams_live() {
        let m = Arc::new(Metrics::default());
        let a = m.watch(WatchKind::Routes);
        let b = m.watch(WatchKind::Routes);
        let c = m.watch(WatchKind::Policy);
        drop(b);
        let text = m.exposition();
        assert!(
            text.contains("mesh_controlplane_watchers{kind=\"routes\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_controlplane_watchers{kind=\"policy\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_controlplane_watchers{kind=\"endpoints\"} 0\n"),
            "{text}"
        );
        drop((a, c));
        assert!(
            m.exposition()
                .contains("mesh_controlplane_watchers{kind=\"routes\"} 0\n")
        );
    }

    #[test]
    fn propagation_times_fill_cumulative_buckets() {
        let m = Arc::new(Metrics::default());
        let w = m.watch(WatchKind::Endpoints);
        w.propagated(Duration::from_micros(300));
        w.propagated(Duration::from_millis(3));
        w.propagated(Duration::from_secs(2));
        m.certificate_issued();
        let text = m.exposition();
        for line in [
            "mesh_controlplane_propagation_seconds_bucket{le=\"0.0001\"} 0",
            "mesh_controlplane_propagation_seconds_bucket{le=\"0.0005\"} 1",
            "mesh_controlplane_propagation_seconds_bucket{le=\"0.005\"} 2",
            "mesh_controlplane_propagation_seconds_bucket{le=\"1\"} 2",
            "mesh_controlplane_propagation_seconds_bucket{le=\"+Inf\"} 3",
            "mesh_controlplane_propagation_seconds_count 3",
            "mesh_controlplane_propagation_seconds_sum 2.0033",
            "mesh_controlplane_certificates_issued_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
    }
}
