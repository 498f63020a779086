//! Golden metrics of each attempt (`request_total`, `response_total`, `response_latency_ms`),
//! labelled with the route and the backend. It sits directly above the client, below the
//! backend and endpoint picks, so it counts exactly what was sent to a backend: a request the
//! proxy answered itself (no route, a fault, no endpoint) is not an attempt, and each retry is
//! one. An attempt that got no response is a mesh error (502); one the route timeout cut off is
//! recorded as a 504 against the backend it was waiting for.
//!
//! The series an attempt counts in are resolved once per route, backend and endpoint owner
//! and kept on the route ([`crate::tables::Route::series`]), so recording an attempt
//! is a few atomic adds rather than building and hashing its label set into three families.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use http::{Response, StatusCode};
use tower::{Layer, Service};

use crate::http::Body;
use crate::metrics::{Metrics, RequestLabels, RequestSeries};
use crate::outbound::balance::ToEndpoint;
use crate::outbound::error::Error;
use crate::outbound::timeout::Waiting;
use crate::tap::TapEvent;
use crate::trace::{Decision, Span, Tracing, attr};
use opentelemetry::trace::SpanKind;

/// Makes [`Record`] services.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics: Arc::new(metrics),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Record {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Records each attempt's golden metrics; see the [module](self).
#[derive(Clone, Debug)]
pub struct Record<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<ToEndpoint<B>> for Record<S>
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

    fn call(&mut self, mut req: ToEndpoint<B>) -> Self::Future {
        let series = req.route.series(
            &self.metrics,
            &req.backend,
            req.endpoint.identity.is_some(),
            &req.endpoint.deployment,
        );
        series.request(&self.metrics);
        let labels = series.labels();
        let waiting = req.request.extensions().get::<Waiting>().cloned();
        if let Some(w) = &waiting {
            w.start(&req.backend);
        }
        // Built only while someone taps; otherwise one atomic load.
        let tap = self.metrics.tap.active().then(|| {
            let r = &req.request;
            let mut event = TapEvent::of_request("outbound", r.method(), r.uri(), r.headers());
            event.authority = labels.authority.to_string();
            event.route = labels.route.to_string();
            event.backend = Some(format!("{}.{}", req.backend.name, req.backend.namespace));
            event.endpoint = Some(req.endpoint.addr);
            event.dst_identity = req.endpoint.identity.as_deref().map(String::from);
            Box::new(event)
        });
        // One branch while tracing is off.
        let span = if self.metrics.trace.is_on() {
            client_span(&self.metrics.trace, &mut req, labels)
        } else {
            None
        };
        let mut attempt = Attempt {
            metrics: self.metrics.clone(),
            series,
            started: Instant::now(),
            waiting,
            done: false,
            tap,
            span,
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await;
            attempt.finish(&answer);
            answer
        })
    }
}

/// One attempt being recorded.
struct Attempt {
    metrics: Arc<Metrics>,
    series: Arc<RequestSeries>,
    started: Instant,
    waiting: Option<Waiting>,
    done: bool,
    /// The tap event being built, when a tap was open as the attempt started.
    tap: Option<Box<TapEvent>>,
    /// The attempt's client span, when it is traced.
    span: Option<Box<Span>>,
}

/// The attempt's client span, with its context written into the request for the far side:
/// under the request's trace decision (made before retries), or, for a request that came
/// without one (passed through outside the mesh), its own.
fn client_span<B>(
    tracing: &Tracing,
    req: &mut ToEndpoint<B>,
    labels: &RequestLabels,
) -> Option<Box<Span>> {
    let decision = match req.request.extensions().get::<Decision>() {
        Some(d) => d.clone(),
        None => tracing.decide(req.request.headers())?,
    };
    let r = &mut req.request;
    let name = format!("{} {}", r.method(), labels.route);
    let method = r.method().to_string();
    let path = r.uri().path().to_string();
    let mut span = tracing.span(&decision, SpanKind::Client, name, r.headers_mut())?;
    span.set("http.request.method", method);
    span.set("url.path", path);
    span.set("server.address", labels.authority.to_string());
    span.set(attr::DIRECTION, "outbound");
    span.set(attr::ROUTE, labels.route.to_string());
    span.set(attr::BACKEND, req.backend.authority());
    span.set(attr::ENDPOINT, req.endpoint.addr.to_string());
    if !labels.dst_deployment.is_empty() {
        span.set(attr::DST_DEPLOYMENT, labels.dst_deployment.to_string());
    }
    span.set(attr::TLS, req.endpoint.identity.is_some());
    if let Some(id) = &req.endpoint.identity {
        span.set(attr::PEER_IDENTITY, id.to_string());
    }
    Some(Box::new(span))
}

impl Attempt {
    fn finish(&mut self, answer: &Result<Response<Body>, Error>) {
        self.done = true;
        if let Some(w) = &self.waiting {
            w.finish();
        }
        let took = self.started.elapsed();
        match answer {
            Ok(rsp) => {
                let status = rsp.status().as_u16();
                self.series.record(&self.metrics, Some(status), false, took);
                let error = if status >= 500 { "upstream" } else { "" };
                self.tap(status, error);
                self.end_span(Some(status), error);
            }
            Err(Error::Endpoint { .. }) => {
                let status = StatusCode::BAD_GATEWAY.as_u16();
                self.series.record(&self.metrics, Some(status), true, took);
                self.tap(status, "mesh");
                self.end_span(None, "mesh");
            }
            // Nothing reached the endpoint.
            Err(_) => {}
        }
    }
}

impl Attempt {
    /// Publishes the attempt to the open taps, if one was open when it started.
    fn tap(&mut self, status: u16, error: &'static str) {
        if let Some(mut event) = self.tap.take() {
            event.finish(status, error, self.started.elapsed());
            self.metrics.tap.publish(*event);
        }
    }

    /// Ends the attempt's span, if it is traced.
    fn end_span(&mut self, status: Option<u16>, error: &'static str) {
        if let Some(span) = self.span.take() {
            self.metrics.trace.end(*span, status, error);
        }
    }
}

impl Drop for Attempt {
    /// An attempt dropped unfinished was cut off: by the route timeout (a 504 for its backend),
    /// or because the client went away (nobody got an answer; not recorded).
    fn drop(&mut self) {
        if !self.done && self.waiting.as_ref().is_some_and(Waiting::expired) {
            let status = StatusCode::GATEWAY_TIMEOUT.as_u16();
            let took = self.started.elapsed();
            self.series.record(&self.metrics, Some(status), true, took);
            self.tap(status, "mesh");
            self.end_span(Some(status), "mesh");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::balance::Endpoint;
    use crate::outbound::error::AttemptError;
    use crate::outbound::route::{Routed, mk};
    use crate::outbound::timeout::TimeoutLayer;
    use mesh_core::proxy_api::ServiceRef;
    use prometheus_client::registry::Registry;
    use std::time::Duration;
    use tower::ServiceExt;

    fn attempt(rule: &str) -> ToEndpoint<()> {
        let Routed { route, request, .. } =
            mk::routed_with(rule, &mk::tables("{}"), http::Request::get("/").body(()));
        ToEndpoint {
            route,
            backend: ServiceRef::new("web-canary", "default", 80),
            endpoint: Endpoint {
                addr: "127.0.0.1:9000".parse().unwrap(),
                identity: None,
                deployment: "web-canary".into(),
            },
            request,
        }
    }

    const RULE: &str = "{name: main, backends: [{service: web-canary.default:80, weight: 1}]}";

    /// The `response_total` and `response_latency_ms` count of `status` (with `error`).
    fn responses(metrics: &Metrics, status: &str, error: &'static str) -> (u64, u64) {
        let labels = crate::metrics::ResponseLabels {
            request: request_labels(),
            status_code: status.parse().ok(),
            classification: if error.is_empty() {
                "success"
            } else {
                "failure"
            },
            error,
        };
        let total = metrics.responses.get_or_create(&labels).get();
        let observed = metrics.latency.get_or_create(&labels).count();
        (total, observed)
    }

    /// The labels of an attempt at `web-canary`'s endpoint, over plaintext.
    fn request_labels() -> RequestLabels {
        RequestLabels {
            direction: "outbound",
            authority: "web.default:80".into(),
            route: "main".into(),
            dst_service: "web-canary".into(),
            dst_namespace: "default".into(),
            dst_deployment: "web-canary".into(),
            tls: "",
        }
    }

    fn requests(metrics: &Metrics) -> u64 {
        metrics.requests.get_or_create(&request_labels()).get()
    }

    #[tokio::test]
    async fn each_attempt_is_counted_with_its_route_and_backend() {
        let metrics = Metrics::register(&mut Registry::default());
        let svc =
            MetricsLayer::new(metrics.clone()).layer(tower::service_fn(|_: ToEndpoint<()>| {
                std::future::ready(Ok::<_, Error>(mk::response(503)))
            }));
        svc.clone().oneshot(attempt(RULE)).await.unwrap();
        svc.oneshot(attempt(RULE)).await.unwrap();
        assert_eq!(requests(&metrics), 2);
        assert_eq!(responses(&metrics, "503", "upstream"), (2, 2));
    }

    #[tokio::test]
    async fn an_attempt_without_a_response_is_a_mesh_error() {
        let metrics = Metrics::register(&mut Registry::default());
        let svc =
            MetricsLayer::new(metrics.clone()).layer(tower::service_fn(|req: ToEndpoint<()>| {
                std::future::ready(Err::<Response<Body>, _>(Error::Endpoint {
                    backend: req.backend,
                    addr: req.endpoint.addr,
                    error: AttemptError::NoIdentity("no identity".into()),
                }))
            }));
        svc.oneshot(attempt(RULE)).await.unwrap_err();
        assert_eq!(responses(&metrics, "502", "mesh"), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_the_route_timeout_cuts_off_is_a_504_for_its_backend() {
        let metrics = Metrics::register(&mut Registry::default());
        let hang = tower::service_fn(|_: ToEndpoint<()>| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, Error>(mk::response(200))
        });
        let record = MetricsLayer::new(metrics.clone()).layer(hang);
        // The timeout layer above, with the layers between reduced to handing the attempt on.
        let between = tower::service_fn(move |req: Routed<()>| {
            let Routed { route, request, .. } = req;
            let backend = ServiceRef::new("web-canary", "default", 80);
            let endpoint = Endpoint {
                addr: "127.0.0.1:9000".parse().unwrap(),
                identity: None,
                deployment: "web-canary".into(),
            };
            record.clone().oneshot(ToEndpoint {
                route,
                backend,
                endpoint,
                request,
            })
        });
        let rule = "{name: main, timeoutMs: 100, \
                    backends: [{service: web-canary.default:80, weight: 1}]}";
        let Routed { route, tables, .. } =
            mk::routed_with(rule, &mk::tables("{}"), http::Request::get("/").body(()));
        let req = Routed {
            route,
            tables,
            request: http::Request::get("/").body(()).unwrap(),
        };
        let err = TimeoutLayer.layer(between).oneshot(req).await.unwrap_err();
        assert_eq!(err.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(responses(&metrics, "504", "mesh"), (1, 1));

        // Dropped without a timeout (the client went away): nothing to record.
        let metrics = Metrics::register(&mut Registry::default());
        let hang = tower::service_fn(|_: ToEndpoint<()>| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, Error>(mk::response(200))
        });
        let pending = MetricsLayer::new(metrics.clone())
            .layer(hang)
            .oneshot(attempt(RULE));
        let _ = tokio::time::timeout(Duration::from_millis(100), pending).await;
        assert_eq!(requests(&metrics), 1);
        assert_eq!(responses(&metrics, "504", "mesh"), (0, 0));
    }
}
