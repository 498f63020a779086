//! The backend split: each attempt picks one of the rule's backends in proportion to weight
//! (how a canary gets its share). A backend with no ready endpoints, or whose endpoints failure
//! accrual has all taken out, gets weight 0 for that pick, so traffic shifts to the backends
//! that can answer. It sits below the retry layer, so every attempt picks again, and above the
//! endpoint balancer, which picks among the chosen backend's endpoints. When no backend can
//! answer, the request is answered 503 here.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use mesh_core::proxy_api::{RouteFilter, ServiceRef};
use mesh_core::routing::pick_backend;
use tower::{Layer, Service};

use crate::balance::Balancer;
use crate::http::Body;
use crate::outbound::error::{Error, Unavailable};
use crate::outbound::route::Routed;
use crate::tables::{Route, Tables};

/// An attempt with its backend.
#[derive(Debug)]
pub struct ToBackend<B> {
    /// The request's route.
    pub route: Arc<Route>,
    /// The tables this attempt picks its endpoint from.
    pub tables: Arc<Tables>,
    /// The backend picked.
    pub backend: ServiceRef,
    /// The request.
    pub request: Request<B>,
}

/// Makes [`Split`] services.
#[derive(Clone, Debug)]
pub struct SplitLayer {
    balancer: Arc<Balancer>,
}

impl SplitLayer {
    /// Splits by weight among backends with endpoints `balancer` would pick.
    pub fn new(balancer: Arc<Balancer>) -> Self {
        Self { balancer }
    }
}

impl<S> Layer<S> for SplitLayer {
    type Service = Split<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Split {
            inner,
            balancer: self.balancer.clone(),
        }
    }
}

/// Picks a backend per attempt; see the [module](self).
#[derive(Clone, Debug)]
pub struct Split<S> {
    inner: S,
    balancer: Arc<Balancer>,
}

impl<S> Split<S> {
    /// The backend picked for an attempt on `route` with `roll` (uniform in [0, 1)).
    fn pick(&self, route: &Route, tables: &Tables, roll: f64) -> Option<usize> {
        let backends = &route.rule.backends;
        let now = Instant::now();
        let available = |i: usize| {
            let addrs = tables.addrs(&backends[i].service);
            !addrs.is_empty() && self.balancer.any_ready(&addrs, now)
        };
        pick_backend(backends, available, roll)
    }
}

impl<S, B> Service<Routed<B>> for Split<S>
where
    S: Service<ToBackend<B>, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Either<Ready<Result<Response<Body>, Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Routed<B>) -> Self::Future {
        let Routed {
            route,
            tables,
            mut request,
        } = req;
        match self.pick(&route, &tables, fastrand::f64()) {
            Some(i) => {
                // The picked backend's own filters (backendRef filters) change this attempt only.
                for filter in route.rule.backend_filters.get(i).into_iter().flatten() {
                    if let RouteFilter::RequestHeaderModifier { set, add, remove } = filter {
                        crate::outbound::filters::modify_headers(
                            request.headers_mut(),
                            set,
                            add,
                            remove,
                        );
                    }
                }
                let backend = route.rule.backends[i].service.clone();
                Either::Right(self.inner.call(ToBackend {
                    route,
                    tables,
                    backend,
                    request,
                }))
            }
            None => {
                let why = Unavailable::of(&route.service, &route.rule.backends, &tables);
                Either::Left(ready(Err(why.into())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BalanceConfig, FailureAccrual, Outcome};
    use crate::outbound::route::mk;
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    const RULE: &str = "{name: main, backends: [{service: web-primary.default:80, weight: 90}, \
                        {service: web-canary.default:80, weight: 10}]}";

    fn tables(primary: &[&str], canary: &[&str]) -> Arc<Tables> {
        let list = |addrs: &[&str]| {
            let addrs: Vec<String> = addrs.iter().map(|a| format!("{{addr: \"{a}\"}}")).collect();
            addrs.join(", ")
        };
        mk::tables(&format!(
            "endpoints:\n\
             - {{service: web-primary.default:80, endpoints: [{}]}}\n\
             - {{service: web-canary.default:80, endpoints: [{}]}}\n",
            list(primary),
            list(canary)
        ))
    }

    /// Sends `n` requests through a split over `tables`; counts the backends picked and the
    /// 503s.
    async fn split(
        balancer: &Arc<Balancer>,
        tables: &Arc<Tables>,
        n: usize,
    ) -> BTreeMap<String, usize> {
        let inner = tower::service_fn(|req: ToBackend<()>| {
            let mut rsp = mk::response(200);
            rsp.headers_mut()
                .insert("x-backend", req.backend.name.parse().unwrap());
            std::future::ready(Ok::<_, Error>(rsp))
        });
        let svc = SplitLayer::new(balancer.clone()).layer(inner);
        let mut picked = BTreeMap::new();
        for _ in 0..n {
            let req = mk::routed_with(RULE, tables, http::Request::get("/").body(()));
            let key = match svc.clone().oneshot(req).await {
                Ok(rsp) => rsp.headers()["x-backend"].to_str().unwrap().to_string(),
                Err(e) => e.to_string(),
            };
            *picked.entry(key).or_insert(0) += 1;
        }
        picked
    }

    #[tokio::test]
    async fn backends_are_picked_by_weight() {
        let balancer = Arc::new(Balancer::default());
        let t = tables(&["127.0.0.1:9001"], &["127.0.0.1:9002"]);
        let picked = split(&balancer, &t, 2000).await;
        let canary = picked["web-canary"];
        // Binomial(2000, 0.1): sd 13.4; 60 is beyond 4 sd.
        assert!((140..=260).contains(&canary), "{picked:?}");
        assert_eq!(picked["web-primary"] + canary, 2000);
    }

    #[tokio::test]
    async fn the_picked_backends_own_filters_change_its_attempts_only() {
        let balancer = Arc::new(Balancer::default());
        let t = tables(&["127.0.0.1:9001"], &["127.0.0.1:9002"]);
        let rule = "{name: main, backends: [{service: web-primary.default:80, weight: 1}, \
                    {service: web-canary.default:80, weight: 1}], \
                    backendFilters: [[{type: requestHeaderModifier, set: {x-to: primary}}], []]}";
        let inner = tower::service_fn(|req: ToBackend<()>| {
            let mut rsp = mk::response(200);
            let seen = req.request.headers().get("x-to").cloned();
            rsp.headers_mut()
                .insert("x-backend", req.backend.name.parse().unwrap());
            if let Some(v) = seen {
                rsp.headers_mut().insert("x-to", v);
            }
            std::future::ready(Ok::<_, Error>(rsp))
        });
        let svc = SplitLayer::new(balancer.clone()).layer(inner);
        let mut seen = BTreeMap::new();
        for _ in 0..200 {
            let req = mk::routed_with(rule, &t, http::Request::get("/").body(()));
            let rsp = svc.clone().oneshot(req).await.unwrap();
            let backend = rsp.headers()["x-backend"].to_str().unwrap().to_string();
            let header = rsp
                .headers()
                .get("x-to")
                .map(|v| v.to_str().unwrap().to_string());
            seen.insert(backend, header);
        }
        assert_eq!(seen["web-primary"].as_deref(), Some("primary"));
        assert_eq!(seen["web-canary"], None);
    }

    #[tokio::test]
    async fn a_backend_without_endpoints_gets_weight_zero() {
        let balancer = Arc::new(Balancer::default());
        let t = tables(&[], &["127.0.0.1:9002"]);
        let picked = split(&balancer, &t, 100).await;
        assert_eq!(picked.get("web-canary"), Some(&100), "{picked:?}");
    }

    #[tokio::test]
    async fn a_backend_whose_endpoints_all_fail_gets_weight_zero_and_none_left_is_a_503() {
        let balancer = Arc::new(Balancer::new(BalanceConfig {
            accrual: FailureAccrual {
                consecutive_failures: 1,
                ..FailureAccrual::default()
            },
            ..BalanceConfig::default()
        }));
        let canary: std::net::SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let now = Instant::now();
        balancer
            .pick(&[canary], now, |_| 0)
            .unwrap()
            .finish(Outcome::Failure, now);
        let t = tables(&["127.0.0.1:9001"], &["127.0.0.1:9002"]);
        let picked = split(&balancer, &t, 100).await;
        assert_eq!(picked.get("web-primary"), Some(&100), "{picked:?}");

        let only_canary = tables(&[], &["127.0.0.1:9002"]);
        let picked = split(&balancer, &only_canary, 1).await;
        let why = "every endpoint of the backends of web.default:80 is failing; \
                   they are probed with backoff";
        assert_eq!(picked.get(why), Some(&1), "{picked:?}");
        let none = tables(&[], &[]);
        let picked = split(&balancer, &none, 1).await;
        assert_eq!(
            picked.get("no backend of web.default:80 has ready endpoints"),
            Some(&1),
            "{picked:?}"
        );
    }
}
