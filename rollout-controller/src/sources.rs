//! Where the judge's numbers come from, behind one trait:
//! - [`DirectScrape`], the embedded default: GET every proxy's `/metrics` and difference the
//!   counters between ticks;
//! - [`PrometheusSource`]: PromQL over a Prometheus that scrapes the proxies, through
//!   prometheus-http-query, with built-in queries and user MetricTemplates.
//!
//! Both deliver the same [`Window`] of canary and primary traffic: the window quantities
//! (`mesh_core::gates::Input`) that the built-in gates and the sequential comparisons read,
//! selected and named by the metric contract in `mesh_core`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::exposition::{self, count};
use mesh_core::gates::{self, ArmCounters, Input};
use mesh_core::metrics::label;
use prometheus_http_query::Client as PromClient;

use crate::judge::{ArmWindow, Histogram, Window};
use crate::scrape;

/// Which traffic to measure.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// Namespace of the services.
    pub namespace: String,
    /// Backend service the canary serves as (`<svc>-canary`).
    pub canary: String,
    /// Backend service the primary serves as (`<svc>-primary`).
    pub primary: String,
}

/// Failures of a metric source, naming what was asked of whom.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A proxy's `/metrics` could not be read.
    #[error("scraping {addr}: {source}")]
    Scrape {
        /// The proxy admin address.
        addr: SocketAddr,
        /// What went wrong.
        source: reqwest::Error,
    },
    /// A proxy's `/metrics` did not parse.
    #[error("scraping {addr}: {source}")]
    Parse {
        /// The proxy admin address.
        addr: SocketAddr,
        /// The parse error.
        source: exposition::ParseError,
    },
    /// A PromQL query failed.
    #[error("prometheus query {query:?}: {source}")]
    Query {
        /// The query.
        query: String,
        /// What went wrong.
        source: prometheus_http_query::Error,
    },
    /// A MetricTemplate without a provider address, and a source that cannot run queries.
    #[error(
        "metric template query {query:?}: its provider has no address, and the metric source (a \
         direct scrape of the proxies) cannot run queries; set spec.provider.address"
    )]
    NoQueryEngine {
        /// The query.
        query: String,
    },
    /// A MetricTemplate's provider address is not a usable URL.
    #[error("metric template provider address {address:?}: {source}")]
    Address {
        /// The address.
        address: String,
        /// What is wrong with it.
        source: prometheus_http_query::Error,
    },
    /// A MetricTemplate query names a variable nobody set.
    #[error("metric template query {query:?}: unknown variable {{{{ {name} }}}}")]
    Variable {
        /// The query.
        query: String,
        /// The variable.
        name: String,
    },
}

/// A source of canary-vs-primary windows.
pub trait MetricSource {
    /// The traffic since the previous call for this target (or over `interval`, for sources that
    /// can look back). The first call of a stateful source returns an empty window.
    fn window(
        &mut self,
        target: &Target,
        interval: Duration,
    ) -> impl Future<Output = Result<Window, SourceError>> + Send;

    /// The traffic since the last [`Self::window`] for this target, without moving the
    /// baseline the next window is counted from: what the judge looks at between analysis
    /// ticks. `None` when the source cannot (the default; a source that reads fixed ranges,
    /// such as Prometheus, would look at overlapping ranges) or has no baseline yet.
    fn peek(
        &mut self,
        _target: &Target,
    ) -> impl Future<Output = Result<Option<Window>, SourceError>> + Send {
        async { Ok(None) }
    }

    /// Forgets what the source remembers of `target`, so the next window covers only traffic
    /// from now on (a new rollout must not be judged on the previous one's requests).
    fn reset(&mut self, _target: &Target) {}

    /// Runs a MetricTemplate query that names no provider address of its own. Only a source
    /// backed by a query engine can; the direct scrape says so.
    fn template(
        &mut self,
        query: &str,
        _vars: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Option<f64>, SourceError>> + Send {
        let query = query.to_string();
        async move { Err(SourceError::NoQueryEngine { query }) }
    }
}

/// Scrapes proxies directly; the embedded mesh's default.
#[derive(Debug)]
pub struct DirectScrape {
    client: reqwest::Client,
    proxies: Vec<SocketAddr>,
    last: BTreeMap<Target, (ArmCounters, ArmCounters)>,
}

impl DirectScrape {
    /// A source reading the admin servers at `proxies` (those whose outbound traffic reaches
    /// the canary and primary: the callers' proxies).
    pub fn new(client: reqwest::Client, proxies: Vec<SocketAddr>) -> Self {
        Self {
            client,
            proxies,
            last: BTreeMap::new(),
        }
    }

    /// Replaces the proxies to scrape (workloads come and go).
    pub fn set_proxies(&mut self, proxies: Vec<SocketAddr>) {
        self.proxies = proxies;
    }

    async fn counters(&self, target: &Target) -> Result<(ArmCounters, ArmCounters), SourceError> {
        let mut canary = ArmCounters::default();
        let mut primary = ArmCounters::default();
        for &addr in &self.proxies {
            let text = self
                .client
                .get(format!("http://{addr}/metrics"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|source| SourceError::Scrape { addr, source })?
                .text()
                .await
                .map_err(|source| SourceError::Scrape { addr, source })?;
            let samples =
                exposition::parse(&text).map_err(|source| SourceError::Parse { addr, source })?;
            gates::merge(&mut canary, &gates::counters(&samples, &target.canary));
            gates::merge(&mut primary, &gates::counters(&samples, &target.primary));
        }
        Ok((canary, primary))
    }
}

impl MetricSource for DirectScrape {
    fn reset(&mut self, target: &Target) {
        self.last.remove(target);
    }

    async fn window(
        &mut self,
        target: &Target,
        _interval: Duration,
    ) -> Result<Window, SourceError> {
        let now = self.counters(target).await?;
        let window = match self.last.get(target) {
            Some(before) => scrape::window(before, &now),
            None => Window::default(),
        };
        self.last.insert(target.clone(), now);
        Ok(window)
    }

    async fn peek(&mut self, target: &Target) -> Result<Option<Window>, SourceError> {
        if !self.last.contains_key(target) {
            return Ok(None);
        }
        let now = self.counters(target).await?;
        Ok(self
            .last
            .get(target)
            .map(|before| scrape::window(before, &now)))
    }
}

/// Reads windows from Prometheus.
#[derive(Clone)]
pub struct PrometheusSource {
    client: PromClient,
}

impl std::fmt::Debug for PrometheusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusSource").finish_non_exhaustive()
    }
}

impl PrometheusSource {
    /// A source querying the Prometheus behind `client`.
    pub fn new(client: PromClient) -> Self {
        Self { client }
    }

    /// Runs an instant query; its vector result as (labels, value) pairs.
    async fn vector(
        &self,
        query: String,
    ) -> Result<Vec<(BTreeMap<String, String>, f64)>, SourceError> {
        let result = self.client.query(&query).get().await;
        let result = result.map_err(|source| SourceError::Query { query, source })?;
        Ok(result
            .data()
            .as_vector()
            .map(|v| v.iter())
            .into_iter()
            .flatten()
            .map(|s| {
                let labels = s.metric().iter().map(|(k, v)| (k.clone(), v.clone()));
                (labels.collect(), s.sample().value())
            })
            .collect())
    }

    async fn scalar(&self, query: String) -> Result<Option<f64>, SourceError> {
        Ok(self.vector(query).await?.first().map(|(_, v)| *v))
    }

    async fn arm(&self, ns: &str, service: &str, range: &str) -> Result<ArmWindow, SourceError> {
        let mut window = ArmWindow::default();
        for input in Input::ALL {
            let query = input.promql(ns, service, range);
            match input {
                Input::Responses => {
                    window.requests = count(self.scalar(query).await?.unwrap_or(0.0));
                }
                Input::Failures => {
                    window.failures = count(self.scalar(query).await?.unwrap_or(0.0));
                }
                Input::LatencyBuckets => {
                    let mut buckets: Vec<(f64, u64)> = self
                        .vector(query)
                        .await?
                        .into_iter()
                        .filter_map(|(labels, value)| {
                            let le = match labels.get(label::LE)?.as_str() {
                                "+Inf" => f64::INFINITY,
                                le => le.parse().ok()?,
                            };
                            Some((le, count(value)))
                        })
                        .collect();
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    window.latency = Histogram { buckets };
                }
            }
        }
        Ok(window)
    }

    /// Runs a MetricTemplate query with Flagger's variables (`namespace`, `target`, `service`,
    /// `interval`, and `variables.*` from the Canary's templateVariables).
    pub async fn template(
        &self,
        query: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<f64>, SourceError> {
        self.scalar(render(query, vars)?).await
    }
}

/// Fills `{{ name }}` placeholders; an unknown name is an error, never an empty string.
pub fn render(query: &str, vars: &BTreeMap<String, String>) -> Result<String, SourceError> {
    let mut out = String::new();
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| SourceError::Variable {
            query: query.into(),
            name: after.trim().into(),
        })?;
        let name = after[..end].trim();
        let value = vars.get(name).ok_or_else(|| SourceError::Variable {
            query: query.into(),
            name: name.into(),
        })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl MetricSource for PrometheusSource {
    async fn window(&mut self, target: &Target, interval: Duration) -> Result<Window, SourceError> {
        let range = format!("{}s", interval.as_secs().max(1));
        Ok(Window {
            canary: self.arm(&target.namespace, &target.canary, &range).await?,
            primary: self.arm(&target.namespace, &target.primary, &range).await?,
        })
    }

    async fn template(
        &mut self,
        query: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<f64>, SourceError> {
        PrometheusSource::template(self, query, vars).await
    }
}

/// Runs a MetricTemplate query at the Prometheus its provider names.
pub async fn template_at(
    address: &str,
    query: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Option<f64>, SourceError> {
    let client = address
        .parse::<PromClient>()
        .map_err(|source| SourceError::Address {
            address: address.to_string(),
            source,
        })?;
    PrometheusSource::new(client).template(query, vars).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_known_variables_and_name_unknown_ones() {
        let vars = BTreeMap::from([
            ("namespace".to_string(), "test".to_string()),
            ("interval".to_string(), "1m".to_string()),
        ]);
        assert_eq!(
            render("rate(x{ns=\"{{ namespace }}\"}[{{interval}}])", &vars).unwrap(),
            "rate(x{ns=\"test\"}[1m])"
        );
        let e = render("x{{ target }}", &vars).unwrap_err();
        assert!(e.to_string().contains("target"), "{e}");
    }
}
