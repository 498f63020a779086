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
//! | `mesh_controlplane_store_seconds` | histogram | `op` (`get`, `list`, `apply`, `delete`, `watch`) | each store call of the resource API and the metrics, through [`Timed`] |

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_store::{Applied, Listed, ObjectKey, ResourceStore, Selector, StoreError};
use serde_json::Value;

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

/// Upper bounds of the store histogram, in seconds: reads are in memory, writes commit to disk
/// (or, in a cluster, go to the API server).
pub const STORE_BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The store calls timed, in the exposition's order.
pub const STORE_OPS: [&str; 5] = ["get", "list", "apply", "delete", "watch"];

/// A histogram with fixed buckets, in plain atomics.
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [f64; N]) -> Self {
        Self {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of series `name` with `labels` (`k="v",` each).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (le, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        #[allow(
            clippy::cast_precision_loss,
            reason = "a sum of nanoseconds shown in seconds"
        )]
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |l: &str| {
            let l = l.trim_end_matches(',');
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}le=\"+Inf\"}} {count}\n{name}_sum{} {sum}\n{name}_count{} {count}",
            braces(labels),
            braces(labels)
        );
    }
}

/// The control plane's own counters.
#[derive(Debug)]
pub struct Metrics {
    watchers: [AtomicU64; 4],
    certificates_issued: AtomicU64,
    propagation: Histogram<{ PROPAGATION_BUCKETS.len() }>,
    store: [Histogram<{ STORE_BUCKETS.len() }>; STORE_OPS.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            watchers: Default::default(),
            certificates_issued: AtomicU64::new(0),
            propagation: Histogram::new(&PROPAGATION_BUCKETS),
            store: std::array::from_fn(|_| Histogram::new(&STORE_BUCKETS)),
        }
    }
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
        self.propagation.observe(took);
    }

    /// Records a store call `op` (one of [`STORE_OPS`]) that took `took`.
    fn stored(&self, op: usize, took: Duration) {
        self.store[op].observe(took);
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
        self.propagation
            .write(&mut out, "mesh_controlplane_propagation_seconds", "");
        let issued = self.certificates_issued.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP mesh_controlplane_certificates_issued Certificates the CA signed for proxies.\n\
             # TYPE mesh_controlplane_certificates_issued counter\n\
             mesh_controlplane_certificates_issued_total {issued}"
        );
        let _ = writeln!(
            out,
            "# HELP mesh_controlplane_store_seconds Time of each store call, by operation.\n\
             # TYPE mesh_controlplane_store_seconds histogram"
        );
        for (op, h) in STORE_OPS.iter().zip(&self.store) {
            h.write(
                &mut out,
                "mesh_controlplane_store_seconds",
                &format!("op=\"{op}\","),
            );
        }
        out
    }
}

/// A store whose calls are timed into [`Metrics`] (`mesh_controlplane_store_seconds`).
#[derive(Debug)]
pub struct Timed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Timed<S> {
    /// Times `inner`'s calls into `metrics`.
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

const GET: usize = 0;
const LIST: usize = 1;
const APPLY: usize = 2;
const DELETE: usize = 3;
const WATCH: usize = 4;

impl<S: ResourceStore> ResourceStore for Timed<S> {
    type Watcher = S::Watcher;

    fn apply(
        &self,
        objects: Vec<Value>,
    ) -> impl Future<Output = Result<Vec<Applied>, StoreError>> + Send {
        let start = Instant::now();
        let applied = self.inner.apply(objects);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let result = applied.await;
            metrics.stored(APPLY, start.elapsed());
            result
        }
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Arc<Value>>, StoreError> {
        let start = Instant::now();
        let result = self.inner.get(key);
        self.metrics.stored(GET, start.elapsed());
        result
    }

    fn list(&self, selector: &Selector) -> Result<Listed, StoreError> {
        let start = Instant::now();
        let result = self.inner.list(selector);
        self.metrics.stored(LIST, start.elapsed());
        result
    }

    fn delete(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<Arc<Value>, StoreError>> + Send {
        let start = Instant::now();
        let deleted = self.inner.delete(key);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let result = deleted.await;
            metrics.stored(DELETE, start.elapsed());
            result
        }
    }

    fn watch(&self, selector: Selector, from: Option<u64>) -> Result<Self::Watcher, StoreError> {
        let start = Instant::now();
        let result = self.inner.watch(selector, from);
        self.metrics.stored(WATCH, start.elapsed());
        result
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
        m.stored(APPLY, Duration::from_millis(3));
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
            "mesh_controlplane_store_seconds_bucket{op=\"apply\",le=\"0.0025\"} 0",
            "mesh_controlplane_store_seconds_bucket{op=\"apply\",le=\"0.005\"} 1",
            "mesh_controlplane_store_seconds_count{op=\"apply\"} 1",
            "mesh_controlplane_store_seconds_count{op=\"get\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
    }
}
