//! The embedded mesh's metrics window: the last few minutes of every proxy's golden metrics,
//! kept in memory and answered without Prometheus.
//!
//! Each scrape is reduced before it is kept: `response_total` and `response_latency_ms` are
//! summed over status codes into one point per (proxy, direction, authority, route, backend),
//! so the number of series is bounded by the routes and backends the control plane configured,
//! never by what clients send (the proxy's labels carry no path). Memory is bounded whatever
//! happens: at most [`WindowConfig::max_series`] series (a new series past the cap is counted in
//! [`Window::dropped_series`] and not kept), each a ring of at most [`WindowConfig::max_points`]
//! points, and points older than the span are dropped as new ones arrive.
//!
//! Pure: time comes in as an argument, so tests need neither sockets nor waiting.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::exposition::{Sample, bucket_bound};
use mesh_core::metrics::{self as contract, LATENCY_BUCKETS_MS, label};

use crate::{BackendRow, EdgeRow, Golden, Query, Resource, RouteRow, StatRow, quantile};

/// Bounds of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    /// How far back points are kept.
    pub span: Duration,
    /// Series kept at most; a new series past this is dropped.
    pub max_series: usize,
    /// Points kept per series at most (span / scrape interval, plus one).
    pub max_points: usize,
}

impl Default for WindowConfig {
    /// 15 minutes of 5-second scrapes, up to 2,000 series (one per proxy, route and backend):
    /// at most about 90 MB, whatever the proxies report.
    fn default() -> Self {
        Self {
            span: Duration::from_secs(15 * 60),
            max_series: 2_000,
            max_points: 181,
        }
    }
}

/// A proxy the control plane scrapes, as its workload registered it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// The admin server, `host:port`: the proxy's key.
    pub admin: String,
    /// The workload (its `workload` label, else its service).
    pub workload: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The service it serves (for a canary arm, `<svc>-canary`).
    pub service: String,
    /// Its SPIFFE ID.
    pub identity: Option<String>,
}

/// Latency buckets kept per point: Linkerd's bounds plus `+Inf`.
const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// Cumulative counts of one series at one scrape.
#[derive(Clone, Debug)]
struct Point {
    at: Instant,
    responses: f64,
    failures: f64,
    buckets: [f64; BUCKETS],
}

impl Point {
    fn new(at: Instant) -> Self {
        Self {
            at,
            responses: 0.0,
            failures: 0.0,
            buckets: [0.0; BUCKETS],
        }
    }
}

/// What a series is about. Strings are shared between the points of a series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    target: Arc<str>,
    outbound: bool,
    authority: Arc<str>,
    route: Arc<str>,
    dst_service: Arc<str>,
    dst_namespace: Arc<str>,
}

#[derive(Debug)]
struct Seen {
    target: Target,
    last_seen: Instant,
    /// Whether the last scrape answered.
    up: bool,
    /// Connections open on its inbound listener at the last scrape.
    inbound_connections: f64,
}

/// The window; see the [module](self).
#[derive(Debug)]
pub struct Window {
    config: WindowConfig,
    targets: BTreeMap<String, Seen>,
    series: BTreeMap<Key, VecDeque<Point>>,
    dropped_series: u64,
}

impl Window {
    /// An empty window with `config`'s bounds.
    pub fn new(config: WindowConfig) -> Self {
        Self {
            config,
            targets: BTreeMap::new(),
            series: BTreeMap::new(),
            dropped_series: 0,
        }
    }

    /// Series held now.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// New series refused because the window was full.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }

    /// Points held now, over all series.
    pub fn points(&self) -> usize {
        self.series.values().map(VecDeque::len).sum()
    }

    /// An upper estimate of the bytes the window holds (points, keys, targets).
    pub fn approx_bytes(&self) -> usize {
        let point = std::mem::size_of::<Point>();
        let keys: usize = self
            .series
            .keys()
            .map(|k| {
                std::mem::size_of::<Key>()
                    + std::mem::size_of::<VecDeque<Point>>()
                    + k.authority.len()
                    + k.route.len()
                    + k.dst_service.len()
                    + k.dst_namespace.len()
            })
            .sum();
        let targets = self.targets.len() * (std::mem::size_of::<Seen>() + 256);
        self.points() * point + keys + targets
    }

    /// The most the window can hold, in bytes, whatever it is fed (keys of up to 256 bytes).
    pub fn max_bytes(&self) -> usize {
        let per_series = std::mem::size_of::<Key>()
            + std::mem::size_of::<VecDeque<Point>>()
            + 4 * 256
            + self.config.max_points * std::mem::size_of::<Point>();
        self.config.max_series * per_series
    }

    /// Records that `target` did not answer its scrape at `at`.
    pub fn record_down(&mut self, target: &Target, at: Instant) {
        let seen = self.seen(target, at);
        seen.up = false;
    }

    fn seen(&mut self, target: &Target, at: Instant) -> &mut Seen {
        let seen = self
            .targets
            .entry(target.admin.clone())
            .or_insert_with(|| Seen {
                target: target.clone(),
                last_seen: at,
                up: false,
                inbound_connections: 0.0,
            });
        seen.target.clone_from(target);
        seen.last_seen = at;
        seen
    }

    /// Adds one scrape of `target` taken at `at`.
    pub fn record(&mut self, target: &Target, at: Instant, samples: &[Sample]) {
        let mut reduced: BTreeMap<Key, Point> = BTreeMap::new();
        let mut connections = 0.0;
        let admin: Arc<str> = Arc::from(target.admin.as_str());
        let mut strings: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut intern = |s: &str| -> Arc<str> {
            if let Some(found) = strings.get(s) {
                return found.clone();
            }
            let new: Arc<str> = Arc::from(s);
            strings.insert(new.clone());
            new
        };
        for sample in samples {
            let response = contract::RESPONSE.is_series(&sample.name);
            let bucket = contract::RESPONSE_LATENCY_MS.is_bucket(&sample.name);
            if contract::LISTENER_OPEN_CONNECTIONS.is_series(&sample.name) {
                if sample.labels.get(label::LISTENER).map(String::as_str) == Some("inbound") {
                    connections += sample.value;
                }
                continue;
            }
            if !response && !bucket {
                continue;
            }
            let get = |name: &str| sample.labels.get(name).map_or("", String::as_str);
            let key = Key {
                target: admin.clone(),
                outbound: get(label::DIRECTION) == "outbound",
                authority: intern(get(label::AUTHORITY)),
                route: intern(get(label::ROUTE)),
                dst_service: intern(get(label::DST_SERVICE)),
                dst_namespace: intern(get(label::DST_NAMESPACE)),
            };
            let point = reduced.entry(key).or_insert_with(|| Point::new(at));
            if response {
                point.responses += sample.value;
                if get(label::CLASSIFICATION) == "failure" {
                    point.failures += sample.value;
                }
            } else {
                let bound = bucket_bound(sample.labels.get(label::LE).map(String::as_str));
                let i = LATENCY_BUCKETS_MS
                    .iter()
                    .position(|b| (b - bound).abs() < 1e-9)
                    .unwrap_or(BUCKETS - 1);
                point.buckets[i] += sample.value;
            }
        }
        // A series that first shows up on a proxy already scraped was zero at that scrape, so
        // its first requests count (a fresh proxy's first scrape is only a base).
        let previous = self
            .targets
            .get(&target.admin)
            .filter(|s| s.up && s.last_seen < at)
            .map(|s| s.last_seen);
        let seen = self.seen(target, at);
        seen.up = true;
        seen.inbound_connections = connections;
        let oldest = at.checked_sub(self.config.span);
        for (key, point) in reduced {
            let len = self.series.len();
            let ring = match self.series.get_mut(&key) {
                Some(ring) => ring,
                None if len < self.config.max_series => {
                    let ring = self.series.entry(key).or_default();
                    if let Some(previous) = previous {
                        ring.push_back(Point::new(previous));
                    }
                    ring
                }
                None => {
                    self.dropped_series += 1;
                    continue;
                }
            };
            ring.push_back(point);
            while ring.len() > self.config.max_points
                || ring
                    .front()
                    .zip(oldest)
                    .is_some_and(|(p, oldest)| p.at < oldest)
            {
                ring.pop_front();
            }
        }
    }

    /// Forgets proxies not in `live` (their workloads deregistered) and series with no point
    /// in the span before `now`.
    pub fn prune(&mut self, live: &BTreeSet<String>, now: Instant) {
        self.targets.retain(|admin, _| live.contains(admin));
        let targets = &self.targets;
        let oldest = now.checked_sub(self.config.span);
        self.series.retain(|key, ring| {
            if let Some(oldest) = oldest {
                ring.retain(|p| p.at >= oldest);
            }
            !ring.is_empty() && targets.contains_key(&*key.target)
        });
    }

    /// The proxies known, with whether their last scrape answered.
    pub fn targets(&self) -> impl Iterator<Item = (&Target, bool)> {
        self.targets.values().map(|s| (&s.target, s.up))
    }

    /// The change of one series over `lookback` before `now`: counts and seconds.
    fn delta(ring: &VecDeque<Point>, now: Instant, lookback: Duration) -> Option<(Point, f64)> {
        let last = ring.back()?;
        let from = now.checked_sub(lookback);
        if from.is_some_and(|from| last.at < from) {
            return None;
        }
        let base = match from {
            Some(from) => ring
                .iter()
                .rev()
                .find(|p| p.at <= from)
                .unwrap_or(ring.front()?),
            None => ring.front()?,
        };
        let secs = last.at.duration_since(base.at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let mut d = Point::new(last.at);
        // A counter that went down was reset (the proxy restarted): all it holds is new.
        let reset = last.responses < base.responses;
        let minus = |a: f64, b: f64| if reset { a } else { (a - b).max(0.0) };
        d.responses = minus(last.responses, base.responses);
        d.failures = minus(last.failures, base.failures);
        for i in 0..BUCKETS {
            d.buckets[i] = minus(last.buckets[i], base.buckets[i]);
        }
        Some((d, secs))
    }

    /// The golden metrics of the series `select` picks, grouped by `group`.
    fn golden_by<G: Ord>(
        &self,
        now: Instant,
        lookback: Duration,
        mut group: impl FnMut(&Key, &Target) -> Option<G>,
    ) -> BTreeMap<G, Sum> {
        let mut out: BTreeMap<G, Sum> = BTreeMap::new();
        for (key, ring) in &self.series {
            let Some(seen) = self.targets.get(&*key.target) else {
                continue;
            };
            let Some(g) = group(key, &seen.target) else {
                continue;
            };
            let sum = out.entry(g).or_default();
            if let Some((d, secs)) = Self::delta(ring, now, lookback) {
                sum.add(&d, secs);
            }
        }
        out
    }

    /// `mesh stat <resource>` over the window.
    pub fn stat(&self, resource: Resource, query: &Query, now: Instant) -> Vec<StatRow> {
        let lookback = Duration::from_secs(query.window_secs);
        let ns_ok = |ns: &str| query.namespace.as_deref().is_none_or(|q| q == ns);
        let name_ok = |n: &str| query.name.as_deref().is_none_or(|q| q == n);
        match resource {
            Resource::Workloads => {
                let sums = self.golden_by(now, lookback, |k, t| {
                    (!k.outbound && ns_ok(&t.namespace) && name_ok(&t.workload))
                        .then(|| (t.namespace.clone(), t.workload.clone()))
                });
                let mut rows: BTreeMap<(String, String), StatRow> = BTreeMap::new();
                for seen in self.targets.values() {
                    let t = &seen.target;
                    if !ns_ok(&t.namespace) || !name_ok(&t.workload) {
                        continue;
                    }
                    let row = rows
                        .entry((t.namespace.clone(), t.workload.clone()))
                        .or_insert_with(|| StatRow {
                            namespace: t.namespace.clone(),
                            name: t.workload.clone(),
                            tcp_connections: Some(0.0),
                            ..StatRow::default()
                        });
                    row.total += 1;
                    if seen.up {
                        row.meshed += 1;
                        *row.tcp_connections.get_or_insert(0.0) += seen.inbound_connections;
                    }
                }
                for (k, row) in &mut rows {
                    if let Some(sum) = sums.get(k) {
                        row.golden = sum.golden();
                    }
                }
                rows.into_values().collect()
            }
            Resource::Services => self
                .golden_by(now, lookback, |k, _| {
                    (k.outbound
                        && !k.dst_service.is_empty()
                        && ns_ok(&k.dst_namespace)
                        && name_ok(&k.dst_service))
                    .then(|| (k.dst_namespace.to_string(), k.dst_service.to_string()))
                })
                .into_iter()
                .map(|((namespace, name), sum)| StatRow {
                    namespace,
                    name,
                    golden: sum.golden(),
                    ..StatRow::default()
                })
                .collect(),
            Resource::Routes => self
                .golden_by(now, lookback, |k, t| {
                    let ns = authority_namespace(&k.authority).unwrap_or(&t.namespace);
                    (k.outbound && ns_ok(ns) && (name_ok(&k.route) || name_ok(&k.authority)))
                        .then(|| (ns.to_string(), k.authority.to_string(), k.route.to_string()))
                })
                .into_iter()
                .map(|((namespace, authority, route), sum)| StatRow {
                    namespace,
                    name: format!("{route} ({authority})"),
                    golden: sum.golden(),
                    ..StatRow::default()
                })
                .collect(),
        }
    }

    /// `mesh routes <service>`: each route of the authorities of `query.name` (all when
    /// `None`), with each backend's share and success rate.
    pub fn routes(&self, query: &Query, now: Instant) -> Vec<RouteRow> {
        let lookback = Duration::from_secs(query.window_secs);
        let wanted = |authority: &str| {
            let service = authority.split(['.', ':']).next().unwrap_or_default();
            query
                .name
                .as_deref()
                .is_none_or(|n| n == service || n == authority)
                && query
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| authority_namespace(authority) == Some(ns))
        };
        let sums = self.golden_by(now, lookback, |k, _| {
            (k.outbound && wanted(&k.authority)).then(|| {
                (
                    k.authority.to_string(),
                    k.route.to_string(),
                    k.dst_namespace.to_string(),
                    k.dst_service.to_string(),
                )
            })
        });
        let mut rows: BTreeMap<(String, String), (Sum, Vec<Backend>)> = BTreeMap::new();
        for ((authority, route, ns, service), sum) in sums {
            let row = rows.entry((authority, route)).or_default();
            row.0.merge(&sum);
            row.1.push((service, ns, sum));
        }
        rows.into_iter()
            .map(|((authority, route), (all, backends))| {
                let total = all.requests;
                RouteRow {
                    authority,
                    route,
                    golden: all.golden(),
                    backends: backends
                        .into_iter()
                        .map(|(service, namespace, sum)| BackendRow {
                            service,
                            namespace,
                            share: if total > 0.0 {
                                sum.requests / total
                            } else {
                                0.0
                            },
                            golden: sum.golden(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// `mesh edges`: each calling workload to each service it called in the window, with the
    /// identities on both ends.
    pub fn edges(&self, query: &Query, now: Instant) -> Vec<EdgeRow> {
        let lookback = Duration::from_secs(query.window_secs);
        let ns_ok = |ns: &str| query.namespace.as_deref().is_none_or(|q| q == ns);
        let sums = self.golden_by(now, lookback, |k, t| {
            (k.outbound
                && !k.dst_service.is_empty()
                && (ns_ok(&t.namespace) || ns_ok(&k.dst_namespace)))
            .then(|| {
                (
                    t.namespace.clone(),
                    t.workload.clone(),
                    k.dst_namespace.to_string(),
                    k.dst_service.to_string(),
                )
            })
        });
        // Each workload's identity, and the identities serving each service.
        let mut src_identity: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        let mut serving: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
        for seen in self.targets.values() {
            let t = &seen.target;
            if let Some(id) = &t.identity {
                src_identity.insert((&t.namespace, &t.workload), id);
                serving
                    .entry((&t.namespace, &t.service))
                    .or_default()
                    .insert(id);
            }
        }
        sums.into_iter()
            .filter(|(_, sum)| sum.requests > 0.0)
            .map(|((src_namespace, src, dst_namespace, dst), sum)| EdgeRow {
                src_identity: src_identity
                    .get(&(src_namespace.as_str(), src.as_str()))
                    .map(ToString::to_string),
                dst_identities: serving
                    .get(&(dst_namespace.as_str(), dst.as_str()))
                    .map(|ids| ids.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                src,
                src_namespace,
                dst,
                dst_namespace,
                golden: sum.golden(),
            })
            .collect()
    }
}

/// The namespace in an authority `name.namespace[.svc...]:port`.
fn authority_namespace(authority: &str) -> Option<&str> {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.split('.').nth(1)
}

/// A backend's service, namespace and traffic.
type Backend = (String, String, Sum);

/// Deltas summed over series.
#[derive(Clone, Debug, Default)]
struct Sum {
    requests: f64,
    failures: f64,
    rps: f64,
    buckets: Vec<f64>,
}

impl Sum {
    fn add(&mut self, d: &Point, secs: f64) {
        self.requests += d.responses;
        self.failures += d.failures;
        self.rps += d.responses / secs;
        self.buckets.resize(BUCKETS, 0.0);
        for (sum, b) in self.buckets.iter_mut().zip(d.buckets) {
            *sum += b;
        }
    }

    fn merge(&mut self, other: &Self) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.rps += other.rps;
        self.buckets.resize(BUCKETS, 0.0);
        for (sum, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *sum += b;
        }
    }

    fn golden(&self) -> Golden {
        let q = |q| quantile(q, &LATENCY_BUCKETS_MS, &self.buckets);
        Golden {
            requests: self.requests,
            failures: self.failures,
            rps: self.rps,
            success_rate: (self.requests > 0.0).then(|| 1.0 - self.failures / self.requests),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::exposition::parse;

    fn target(workload: &str, service: &str) -> Target {
        Target {
            admin: format!("127.0.0.1:{}", 9000 + workload.len()),
            workload: workload.into(),
            namespace: "default".into(),
            service: service.into(),
            identity: Some(format!("spiffe://mesh.local/ns/default/sa/{workload}")),
        }
    }

    /// A scrape of a caller of `web` that has sent `ok` successes and `bad` failures to the
    /// primary and `canary` successes to the canary, all under 10 ms.
    fn scrape(ok: u64, bad: u64, canary: u64) -> Vec<Sample> {
        let line = |svc: &str, class: &str, code: &str, n: u64| {
            format!(
                "response_total{{direction=\"outbound\",authority=\"web.default:80\",route=\"main\",\
                 dst_service=\"{svc}\",dst_namespace=\"default\",status_code=\"{code}\",\
                 classification=\"{class}\",error=\"\"}} {n}\n\
                 response_latency_ms_bucket{{direction=\"outbound\",authority=\"web.default:80\",\
                 route=\"main\",dst_service=\"{svc}\",dst_namespace=\"default\",status_code=\"{code}\",\
                 classification=\"{class}\",error=\"\",le=\"10.0\"}} {n}\n\
                 response_latency_ms_bucket{{direction=\"outbound\",authority=\"web.default:80\",\
                 route=\"main\",dst_service=\"{svc}\",dst_namespace=\"default\",status_code=\"{code}\",\
                 classification=\"{class}\",error=\"\",le=\"+Inf\"}} {n}\n"
            )
        };
        let text = [
            line("web-primary", "success", "200", ok),
            line("web-primary", "failure", "500", bad),
            line("web-canary", "success", "200", canary),
            "listener_open_connections{listener=\"inbound\"} 3\n".into(),
        ]
        .concat();
        parse(&text).unwrap()
    }

    #[test]
    fn rates_and_shares_come_from_the_change_over_the_window() {
        let mut w = Window::new(WindowConfig::default());
        let caller = target("loadgen", "loadgen");
        let t0 = Instant::now();
        w.record(&caller, t0, &scrape(100, 0, 0));
        w.record(&caller, t0 + Duration::from_secs(10), &scrape(1000, 10, 90));
        let now = t0 + Duration::from_secs(10);
        let q = Query::default();
        let services = w.stat(Resource::Services, &q, now);
        assert_eq!(services.len(), 2);
        let primary = &services
            .iter()
            .find(|r| r.name == "web-primary")
            .unwrap()
            .golden;
        assert_eq!(primary.requests, 910.0);
        assert!((primary.rps - 91.0).abs() < 1e-9);
        assert!((primary.success_rate.unwrap() - 900.0 / 910.0).abs() < 1e-9);
        assert!(primary.p99_ms.unwrap() <= 10.0);

        let routes = w.routes(
            &Query {
                name: Some("web".into()),
                ..q.clone()
            },
            now,
        );
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].golden.requests, 1000.0);
        let canary = routes[0]
            .backends
            .iter()
            .find(|b| b.service == "web-canary")
            .unwrap();
        assert!((canary.share - 0.09).abs() < 1e-9);
        assert_eq!(canary.golden.success_rate, Some(1.0));

        let edges = w.edges(&q, now);
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].src, "loadgen");
        assert_eq!(
            edges[0].src_identity.as_deref(),
            Some("spiffe://mesh.local/ns/default/sa/loadgen")
        );

        let workloads = w.stat(Resource::Workloads, &q, now);
        assert_eq!(workloads.len(), 1);
        assert_eq!((workloads[0].meshed, workloads[0].total), (1, 1));
        assert_eq!(workloads[0].tcp_connections, Some(3.0));
    }

    #[test]
    fn a_restarted_proxy_counts_from_zero_again() {
        let mut w = Window::new(WindowConfig::default());
        let caller = target("loadgen", "loadgen");
        let t0 = Instant::now();
        w.record(&caller, t0, &scrape(1000, 0, 0));
        w.record(&caller, t0 + Duration::from_secs(10), &scrape(50, 0, 0));
        let rows = w.stat(
            Resource::Services,
            &Query::default(),
            t0 + Duration::from_secs(10),
        );
        let primary = rows.iter().find(|r| r.name == "web-primary").unwrap();
        assert_eq!(primary.golden.requests, 50.0);
    }

    #[test]
    fn points_older_than_the_span_and_gone_proxies_are_forgotten() {
        let config = WindowConfig {
            span: Duration::from_secs(60),
            max_series: 100,
            max_points: 5,
        };
        let mut w = Window::new(config);
        let caller = target("loadgen", "loadgen");
        let t0 = Instant::now();
        for i in 0..20 {
            w.record(
                &caller,
                t0 + Duration::from_secs(i * 5),
                &scrape(i * 10, 0, 0),
            );
        }
        // One series per backend, whatever the status codes; five points each at most.
        assert_eq!(w.series_count(), 2);
        assert_eq!(w.points(), 10);
        w.prune(&BTreeSet::new(), t0 + Duration::from_secs(100));
        assert_eq!(w.series_count(), 0);
    }

    #[test]
    fn memory_stays_under_its_cap_whatever_the_series() {
        let config = WindowConfig {
            span: Duration::from_secs(60),
            max_series: 50,
            max_points: 4,
        };
        let mut w = Window::new(config);
        let caller = target("loadgen", "loadgen");
        let t0 = Instant::now();
        for tick in 0..10u64 {
            let text: String = (0..200)
                .map(|i| {
                    format!(
                        "response_total{{direction=\"outbound\",authority=\"a{i}.default:80\",\
                         route=\"r\",dst_service=\"s{i}\",dst_namespace=\"default\",\
                         classification=\"success\"}} {tick}\n"
                    )
                })
                .collect();
            w.record(
                &caller,
                t0 + Duration::from_secs(tick),
                &parse(&text).unwrap(),
            );
        }
        assert_eq!(w.series_count(), 50);
        assert_eq!(w.dropped_series(), 150 * 10);
        assert!(
            w.approx_bytes() <= w.max_bytes(),
            "{} > {}",
            w.approx_bytes(),
            w.max_bytes()
        );
    }
}
