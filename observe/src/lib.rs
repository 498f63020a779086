//! The mesh's metrics view: the questions `mesh stat|routes|edges` and the dashboard ask
//! (golden metrics per workload, service, route, backend and edge over a recent window),
//! answered behind one trait, [`MetricsView`], by two sources. In the embedded mesh the control
//! plane scrapes every registered proxy's `/metrics` on an interval ([`scrape`]) into a bounded
//! in-memory [`window::Window`], whose series are bounded by routes and backends (the proxy's
//! labels never carry a path) and whose total memory is capped whatever the number of series;
//! in a cluster the same questions are PromQL on a real Prometheus ([`prometheus`]). It reads
//! the proxy's metric contract (`mesh_core::metrics`) and its text through
//! `mesh_core::exposition`, and sits beside the rollout controller's own scrape, which judges
//! canaries rather than showing traffic.

pub mod prometheus;
pub mod scrape;
pub mod window;

use std::future::Future;

use serde::{Deserialize, Serialize};

/// What `mesh stat` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// Workloads, from their proxies' inbound side.
    Workloads,
    /// Services, from their callers' outbound side.
    Services,
    /// HTTPRoute rules, from their callers' outbound side.
    Routes,
}

impl std::str::FromStr for Resource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "workload" | "workloads" | "wl" | "deploy" | "deployment" | "deployments" => {
                Ok(Self::Workloads)
            }
            "service" | "services" | "svc" => Ok(Self::Services),
            "route" | "routes" | "rt" => Ok(Self::Routes),
            _ => Err(format!(
                "unknown resource {s:?}: want workloads, services or routes"
            )),
        }
    }
}

/// Golden metrics of some traffic over the window asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Golden {
    /// Responses in the window.
    pub requests: f64,
    /// Responses classified as failures in the window.
    pub failures: f64,
    /// Responses per second.
    pub rps: f64,
    /// Share of successes, 0..=1; `None` without traffic.
    pub success_rate: Option<f64>,
    /// Latency quantiles in milliseconds (Linkerd's buckets, interpolated); `None` without traffic.
    pub p50_ms: Option<f64>,
    /// See [`Golden::p50_ms`].
    pub p95_ms: Option<f64>,
    /// See [`Golden::p50_ms`].
    pub p99_ms: Option<f64>,
}

/// One row of `mesh stat`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    /// Namespace.
    pub namespace: String,
    /// Workload, service, or `authority route` for routes.
    pub name: String,
    /// Proxies seen (workloads only; the meshed count).
    pub meshed: u32,
    /// Proxies registered for the workload.
    pub total: u32,
    /// The traffic.
    pub golden: Golden,
    /// Connections open to the workloads' inbound listeners (workloads only).
    pub tcp_connections: Option<f64>,
}

/// One route of `mesh routes <service>`, with its backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRow {
    /// The authority the route serves.
    pub authority: String,
    /// The HTTPRoute rule.
    pub route: String,
    /// All of the route's traffic.
    pub golden: Golden,
    /// Each backend's part.
    pub backends: Vec<BackendRow>,
}

/// One weighted backend of a route, as traffic saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    /// The backend service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Its share of the route's responses, 0..=1.
    pub share: f64,
    /// Its traffic.
    pub golden: Golden,
}

/// Who calls whom: one caller workload to one service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRow {
    /// The calling workload.
    pub src: String,
    /// Its namespace.
    pub src_namespace: String,
    /// The calling workload's mTLS identity.
    pub src_identity: Option<String>,
    /// The called service.
    pub dst: String,
    /// Its namespace.
    pub dst_namespace: String,
    /// The identities of the workloads serving it, as registered.
    pub dst_identities: Vec<String>,
    /// The traffic on the edge.
    pub golden: Golden,
}

/// A question to a [`MetricsView`]: where, and over how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Only this namespace; all when `None`.
    pub namespace: Option<String>,
    /// Only this name (workload, service, `authority` or route); all when `None`.
    pub name: Option<String>,
    /// How far back, in seconds.
    pub window_secs: u64,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            namespace: None,
            name: None,
            window_secs: DEFAULT_WINDOW_SECS,
        }
    }
}

/// The window `mesh stat` looks back over by default (Linkerd's is one minute).
pub const DEFAULT_WINDOW_SECS: u64 = 60;

/// Why a view could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The source could not be reached or answered with an error.
    #[error("asking {source_name}: {message}")]
    Source {
        /// Which source (the Prometheus URL, the control plane).
        source_name: String,
        /// What went wrong.
        message: String,
    },
}

/// The questions the CLI and the dashboard ask, whatever answers them.
pub trait MetricsView {
    /// `mesh stat <resource>`.
    fn stat(
        &self,
        resource: Resource,
        query: &Query,
    ) -> impl Future<Output = Result<Vec<StatRow>, ViewError>> + Send;

    /// `mesh routes <service>`: `query.name` is the service.
    fn routes(
        &self,
        query: &Query,
    ) -> impl Future<Output = Result<Vec<RouteRow>, ViewError>> + Send;

    /// `mesh edges`.
    fn edges(&self, query: &Query) -> impl Future<Output = Result<Vec<EdgeRow>, ViewError>> + Send;
}

/// Linear interpolation inside the bucket holding quantile `q`, as PromQL's
/// `histogram_quantile` does; `bounds` are the upper bounds, `counts` cumulative (one more than
/// `bounds`, the last for `+Inf`). `None` without observations.
pub fn quantile(q: f64, bounds: &[f64], counts: &[f64]) -> Option<f64> {
    let total = *counts.last()?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = 0.0;
    for (i, &count) in counts.iter().enumerate() {
        if count >= rank {
            let Some(&upper) = bounds.get(i) else {
                // In +Inf: the highest finite bound is as far as one can say.
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let in_bucket = count - below;
            if in_bucket <= 0.0 {
                return Some(upper);
            }
            return Some(lower + (upper - lower) * (rank - below) / in_bucket);
        }
        below = count;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let bounds = [10.0, 100.0];
        // 50 at or under 10 ms, 90 at or under 100 ms, 100 in all.
        let counts = [50.0, 90.0, 100.0];
        assert_eq!(quantile(0.5, &bounds, &counts), Some(10.0));
        assert_eq!(quantile(0.7, &bounds, &counts), Some(55.0));
        assert_eq!(quantile(0.99, &bounds, &counts), Some(100.0));
        assert_eq!(quantile(0.5, &bounds, &[0.0, 0.0, 0.0]), None);
    }

    #[test]
    fn resources_parse_like_linkerd() {
        assert_eq!("deploy".parse(), Ok(Resource::Workloads));
        assert_eq!("svc".parse(), Ok(Resource::Services));
        assert_eq!("routes".parse(), Ok(Resource::Routes));
        let err = "pods".parse::<Resource>().unwrap_err();
        assert!(err.contains("\"pods\""), "{err}");
    }
}
