//! Endpoint balance: each attempt picks one endpoint of its backend by power of two choices
//! over peak-EWMA latency, skipping endpoints failure accrual took out (the balancer itself is
//! [`crate::balance`]). It sits right below the backend split, which chose the service, and
//! above the metrics and client layers, so it sees every attempt's outcome: a response's
//! latency updates the endpoint's estimate, and 5xx answers and connection failures count
//! towards taking it out. An attempt cut off before it ends (the route timeout, or the client
//! going away) is neither a success nor a failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use mesh_core::Name;
use mesh_core::proxy_api::ServiceRef;
use tower::{Layer, Service};

use crate::balance::{Balancer, Outcome};
use crate::http::Body;
use crate::outbound::error::{Error, Unavailable};
use crate::outbound::split::ToBackend;
use crate::tables::Route;

/// The endpoint an attempt goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Its address.
    pub addr: SocketAddr,
    /// The SPIFFE ID it must present: a peer proxy, reached over mTLS. None: not meshed.
    pub identity: Option<Name>,
    /// Its owner, from discovery: the `dst_deployment` label; empty when unknown.
    pub deployment: Arc<str>,
}

/// An attempt with its backend and endpoint.
#[derive(Debug)]
pub struct ToEndpoint<B> {
    /// The request's route.
    pub route: Arc<Route>,
    /// The backend picked.
    pub backend: ServiceRef,
    /// The endpoint picked.
    pub endpoint: Endpoint,
    /// The request.
    pub request: Request<B>,
}

/// Makes [`Balance`] services.
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    balancer: Arc<Balancer>,
}

impl BalanceLayer {
    /// Picks endpoints with `balancer`, which keeps what it learns across requests.
    pub fn new(balancer: Arc<Balancer>) -> Self {
        Self { balancer }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            balancer: self.balancer.clone(),
        }
    }
}

/// Picks an endpoint per attempt and learns from how it ends; see the [module](self).
#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    balancer: Arc<Balancer>,
}

impl<S, B> Service<ToBackend<B>> for Balance<S>
where
    S: Service<ToEndpoint<B>, Response = Response<Body>, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Response<Body>, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ToBackend<B>) -> Self::Future {
        let ToBackend {
            route,
            tables,
            backend,
            request,
        } = req;
        let addrs = tables.addrs(&backend);
        let picked = self
            .balancer
            .pick(&addrs, Instant::now(), |n| fastrand::usize(..n));
        let Some(in_flight) = picked else {
            // Another request took the last probe since the split looked.
            let why = Unavailable::of(&route.service, &route.rule.backends, &tables);
            return Box::pin(std::future::ready(Err(why.into())));
        };
        let addr = in_flight.addr();
        let found = tables
            .endpoints
            .get(&backend)
            .and_then(|eps| eps.iter().find(|e| e.addr == addr));
        let identity = found.and_then(|e| e.identity.clone());
        let deployment = found
            .and_then(|e| e.deployment.as_deref())
            .unwrap_or_default()
            .into();
        let attempt = self.inner.call(ToEndpoint {
            route,
            backend,
            endpoint: Endpoint {
                addr,
                identity,
                deployment,
            },
            request,
        });
        Box::pin(async move {
            let answer = attempt.await;
            let outcome = match &answer {
                Ok(rsp) if rsp.status().is_server_error() => Outcome::Failure,
                Ok(_) => Outcome::Success,
                // Nothing was sent: a failure, saying nothing of the endpoint's latency.
                Err(Error::Endpoint { error, .. }) if error.is_connect() => Outcome::ConnectFailure,
                Err(Error::Endpoint { .. }) => Outcome::Failure,
                // Not the endpoint's doing: dropping the pick counts neither way.
                Err(_) => return answer,
            };
            in_flight.finish(outcome, Instant::now());
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BalanceConfig, FailureAccrual};
    use crate::outbound::error::AttemptError;
    use crate::outbound::route::{Routed, mk};
    use std::sync::Mutex;
    use tower::ServiceExt;

    type Stub = tower::util::BoxCloneService<ToEndpoint<()>, Response<Body>, Error>;

    const RULE: &str = "{name: main, backends: [{service: web-primary.default:80, weight: 1}]}";
    const TABLES: &str = r#"
endpoints:
  - service: web-primary.default:80
    endpoints:
      - {addr: "127.0.0.1:9001", identity: "spiffe://cluster.local/ns/default/sa/web"}
      - {addr: "127.0.0.1:9002"}
  - service: web-canary.default:80
    endpoints:
      - {addr: "127.0.0.1:9003"}
      - {addr: "127.0.0.1:9004", identity: "spiffe://cluster.local/ns/default/sa/web"}
  - service: web-single.default:80
    endpoints: [{addr: "127.0.0.1:9005"}]
"#;

    fn balancer(consecutive_failures: u32) -> Arc<Balancer> {
        Arc::new(Balancer::new(BalanceConfig {
            accrual: FailureAccrual {
                consecutive_failures,
                ..FailureAccrual::default()
            },
            ..BalanceConfig::default()
        }))
    }

    fn to_backend() -> ToBackend<()> {
        to("web-primary")
    }

    fn to(backend: &str) -> ToBackend<()> {
        let Routed {
            route,
            tables,
            request,
        } = mk::routed_with(RULE, &mk::tables(TABLES), Request::get("/").body(()));
        ToBackend {
            route,
            tables,
            backend: ServiceRef::new(backend, "default", 80),
            request,
        }
    }

    /// A stub endpoint layer: records the endpoints picked, answers with `answer`.
    fn endpoints(
        answer: impl Fn(&Endpoint) -> Result<Response<Body>, Error> + Clone + Send + 'static,
    ) -> (Stub, Arc<Mutex<Vec<Endpoint>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = {
            let seen = seen.clone();
            tower::service_fn(move |req: ToEndpoint<()>| {
                seen.lock().unwrap().push(req.endpoint.clone());
                std::future::ready(answer(&req.endpoint))
            })
        };
        (tower::util::BoxCloneService::new(svc), seen)
    }

    #[tokio::test]
    async fn the_endpoint_is_one_of_the_backends_with_the_identity_discovery_gave_it() {
        let (inner, seen) = endpoints(|_| Ok(mk::response(200)));
        let svc = BalanceLayer::new(balancer(7)).layer(inner);
        for _ in 0..20 {
            svc.clone().oneshot(to("web-primary")).await.unwrap();
            svc.clone().oneshot(to("web-canary")).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        let meshed = ["127.0.0.1:9001", "127.0.0.1:9004"];
        for (i, e) in seen.iter().enumerate() {
            let ports = if i % 2 == 0 { 9001..=9002 } else { 9003..=9004 };
            assert!(ports.contains(&e.addr.port()), "{i}: {e:?}");
            let is_meshed = meshed.contains(&e.addr.to_string().as_str());
            assert_eq!(e.identity.is_some(), is_meshed, "{e:?}");
        }
    }

    #[tokio::test]
    async fn connect_failures_take_an_endpoint_out_of_the_pick() {
        let (inner, seen) = endpoints(|e| {
            Err(Error::Endpoint {
                backend: ServiceRef::new("web-single", "default", 80),
                addr: e.addr,
                error: AttemptError::Client {
                    connect: true,
                    error: "connection refused".into(),
                },
            })
        });
        let svc = BalanceLayer::new(balancer(2)).layer(inner);
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let err = svc.clone().oneshot(to("web-single")).await.unwrap_err();
            statuses.push(err.status().as_u16());
        }
        assert_eq!(
            statuses,
            [502, 502, 503, 503],
            "two failures in a row take it out"
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn server_errors_count_as_failures_too() {
        let (inner, seen) = endpoints(|_| Ok(mk::response(503)));
        let svc = BalanceLayer::new(balancer(1)).layer(inner);
        let mut unavailable = 0;
        for _ in 0..10 {
            if let Err(e) = svc.clone().oneshot(to_backend()).await {
                assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
                unavailable += 1;
            }
        }
        assert_eq!(seen.lock().unwrap().len(), 2, "one 503 each takes both out");
        assert_eq!(unavailable, 8);
    }
}
