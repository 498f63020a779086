//! The same questions as PromQL on a real Prometheus, for a cluster (or any mesh whose proxies
//! Prometheus scrapes): `increase()`/`rate()` over the window asked for, `histogram_quantile`
//! over Linkerd's buckets, grouped by the labels the proxy writes (`namespace` and `deployment`
//! for the workload, `dst_*`, `authority`, `route`). Prometheus knows no identities, so edges
//! carry none here.

use std::collections::BTreeMap;

use crate::{
    BackendRow, EdgeRow, Golden, MetricsView, Query, Resource, RouteRow, StatRow, ViewError,
};

/// A Prometheus HTTP API.
#[derive(Clone, Debug)]
pub struct PrometheusView {
    client: reqwest::Client,
    url: String,
}

/// One PromQL result: label values in the order grouped by, and the value.
type Vector = Vec<(Vec<String>, f64)>;

impl PrometheusView {
    /// The Prometheus at `url` (`http://host:9090`).
    pub fn new(url: &str) -> Self {
        Self {
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
            url: url.trim_end_matches('/').to_string(),
        }
    }

    fn error(&self, message: impl Into<String>) -> ViewError {
        ViewError::Source {
            source_name: self.url.clone(),
            message: message.into(),
        }
    }

    /// An instant query, its samples keyed by the values of `by`.
    async fn vector(&self, promql: &str, by: &[&str]) -> Result<Vector, ViewError> {
        let rsp = self
            .client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|e| self.error(e.to_string()))?;
        let body: serde_json::Value = rsp.json().await.map_err(|e| self.error(e.to_string()))?;
        if body["status"] != "success" {
            return Err(self.error(format!("{promql}: {}", body["error"])));
        }
        let mut out = Vec::new();
        for r in body["data"]["result"].as_array().into_iter().flatten() {
            let key = by
                .iter()
                .map(|l| r["metric"][*l].as_str().unwrap_or_default().to_string())
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            out.push((key, value));
        }
        Ok(out)
    }

    /// Golden metrics of `response_*{selector}` over `secs`, grouped by `by`.
    async fn golden(
        &self,
        selector: &str,
        by: &[&str],
        secs: u64,
    ) -> Result<BTreeMap<Vec<String>, Golden>, ViewError> {
        let group = by.join(",");
        let w = format!("{secs}s");
        let mut out: BTreeMap<Vec<String>, Golden> = BTreeMap::new();
        let requests = format!("sum by ({group}) (increase(response_total{{{selector}}}[{w}]))");
        for (k, v) in self.vector(&requests, by).await? {
            out.entry(k).or_default().requests = v;
        }
        let failures = format!(
            "sum by ({group}) (increase(response_total{{{selector},classification=\"failure\"}}[{w}]))"
        );
        for (k, v) in self.vector(&failures, by).await? {
            out.entry(k).or_default().failures = v;
        }
        let rps = format!("sum by ({group}) (rate(response_total{{{selector}}}[{w}]))");
        for (k, v) in self.vector(&rps, by).await? {
            out.entry(k).or_default().rps = v;
        }
        for q in [0.5, 0.95, 0.99] {
            let promql = format!(
                "histogram_quantile({q}, sum by ({group},le) (rate(response_latency_ms_bucket{{{selector}}}[{w}])))"
            );
            for (k, v) in self.vector(&promql, by).await? {
                let g = out.entry(k).or_default();
                let v = v.is_finite().then_some(v);
                match q {
                    0.5 => g.p50_ms = v,
                    0.95 => g.p95_ms = v,
                    _ => g.p99_ms = v,
                }
            }
        }
        for g in out.values_mut() {
            g.success_rate = (g.requests > 0.0).then(|| 1.0 - g.failures / g.requests);
        }
        Ok(out)
    }
}

/// A label matcher for `value`, or nothing.
fn matcher(label: &str, value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| {
        format!(
            ",{label}=\"{}\"",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        )
    })
}

impl MetricsView for PrometheusView {
    async fn stat(&self, resource: Resource, query: &Query) -> Result<Vec<StatRow>, ViewError> {
        let ns = query.namespace.as_deref();
        let name = query.name.as_deref();
        let (selector, by) = match resource {
            Resource::Workloads => (
                format!(
                    "direction=\"inbound\"{}{}",
                    matcher("namespace", ns),
                    matcher("deployment", name)
                ),
                ["namespace", "deployment"],
            ),
            Resource::Services => (
                format!(
                    "direction=\"outbound\"{}{}",
                    matcher("dst_namespace", ns),
                    matcher("dst_service", name)
                ),
                ["dst_namespace", "dst_service"],
            ),
            Resource::Routes => (
                format!("direction=\"outbound\"{}", matcher("route", name)),
                ["authority", "route"],
            ),
        };
        let golden = self.golden(&selector, &by, query.window_secs).await?;
        let mut meshed: BTreeMap<Vec<String>, f64> = BTreeMap::new();
        let mut tcp: BTreeMap<Vec<String>, f64> = BTreeMap::new();
        if resource == Resource::Workloads {
            let pods = format!(
                "count by (namespace,deployment) (count by (namespace,deployment,pod) (listener_open_connections{{listener=\"inbound\"{}{}}}))",
                matcher("namespace", ns),
                matcher("deployment", name)
            );
            meshed.extend(self.vector(&pods, &by).await?);
            let conns = format!(
                "sum by (namespace,deployment) (listener_open_connections{{listener=\"inbound\"{}{}}})",
                matcher("namespace", ns),
                matcher("deployment", name)
            );
            tcp.extend(self.vector(&conns, &by).await?);
        }
        Ok(golden
            .into_iter()
            .map(|(k, golden)| {
                let (namespace, name) = match resource {
                    Resource::Routes => (
                        k[0].split(['.', ':'])
                            .nth(1)
                            .unwrap_or_default()
                            .to_string(),
                        format!("{} ({})", k[1], k[0]),
                    ),
                    _ => (k[0].clone(), k[1].clone()),
                };
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a count of pods"
                )]
                let pods = meshed.get(&k).copied().unwrap_or_default().max(0.0) as u32;
                StatRow {
                    namespace,
                    name,
                    meshed: pods,
                    total: pods,
                    golden,
                    tcp_connections: tcp.get(&k).copied(),
                }
            })
            .collect())
    }

    async fn routes(&self, query: &Query) -> Result<Vec<RouteRow>, ViewError> {
        let authority = query.name.as_deref().map(|n| {
            if n.contains('.') || n.contains(':') {
                n.to_string()
            } else {
                format!("{n}\\\\..*")
            }
        });
        let selector = format!(
            "direction=\"outbound\"{}",
            authority.map_or_else(String::new, |a| format!(",authority=~\"{a}\""))
        );
        let by = ["authority", "route", "dst_namespace", "dst_service"];
        let golden = self.golden(&selector, &by, query.window_secs).await?;
        let all = self
            .golden(&selector, &["authority", "route"], query.window_secs)
            .await?;
        Ok(all
            .into_iter()
            .map(|(k, route_golden)| {
                let total = route_golden.requests;
                RouteRow {
                    authority: k[0].clone(),
                    route: k[1].clone(),
                    backends: golden
                        .iter()
                        .filter(|(b, _)| b[0] == k[0] && b[1] == k[1])
                        .map(|(b, g)| BackendRow {
                            service: b[3].clone(),
                            namespace: b[2].clone(),
                            share: if total > 0.0 { g.requests / total } else { 0.0 },
                            golden: g.clone(),
                        })
                        .collect(),
                    golden: route_golden,
                }
            })
            .collect())
    }

    async fn edges(&self, query: &Query) -> Result<Vec<EdgeRow>, ViewError> {
        let selector = format!(
            "direction=\"outbound\",dst_service!=\"\"{}",
            matcher("namespace", query.namespace.as_deref())
        );
        let by = ["namespace", "deployment", "dst_namespace", "dst_service"];
        let golden = self.golden(&selector, &by, query.window_secs).await?;
        Ok(golden
            .into_iter()
            .filter(|(_, g)| g.requests > 0.0)
            .map(|(k, golden)| EdgeRow {
                src_namespace: k[0].clone(),
                src: k[1].clone(),
                src_identity: None,
                dst_namespace: k[2].clone(),
                dst: k[3].clone(),
                dst_identities: Vec::new(),
                golden,
            })
            .collect())
    }
}
