//! The rule's request timeout (Gateway API's `timeouts.request`). It sits above the retry
//! layer because the timeout bounds what the client waits for, retries included: a request that
//! timed out is answered 504 and never retried, and each attempt's own wait is whatever is left.
//!
//! The attempt in flight when the timeout fires is cut off. So that the answer names the
//! backend that was too slow, and the metrics layer can record the cut-off attempt against that
//! backend, the attempts below report to a [`Waiting`] this layer puts in the request's
//! extensions. Routes without a timeout pay nothing for it.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::Response;
use mesh_core::proxy_api::ServiceRef;
use tower::{Layer, Service, ServiceExt};

use crate::http::Body;
use crate::outbound::error::Error;
use crate::outbound::route::Routed;

/// What a request under a route timeout is waiting for, shared by the timeout and the attempts
/// below it.
#[derive(Clone, Debug, Default)]
pub struct Waiting(Arc<Mutex<WaitingFor>>);

#[derive(Debug, Default)]
struct WaitingFor {
    /// The backend of the attempt in flight.
    backend: Option<ServiceRef>,
    /// The timeout fired: the attempt in flight is being cut off.
    expired: bool,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaitingFor> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An attempt to `backend` starts.
    pub fn start(&self, backend: &ServiceRef) {
        self.lock().backend = Some(backend.clone());
    }

    /// The attempt got its answer.
    pub fn finish(&self) {
        self.lock().backend = None;
    }

    /// Whether the route timeout fired, so an attempt dropped unfinished was cut off by it.
    pub fn expired(&self) -> bool {
        self.lock().expired
    }

    /// The timeout fired; the backend of the attempt in flight, if any.
    fn expire(&self) -> Option<ServiceRef> {
        let mut w = self.lock();
        w.expired = true;
        w.backend.take()
    }
}

/// Makes [`Timeout`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner }
    }
}

/// Bounds each request by its rule's timeout; see the [module](self).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
}

impl<S, B> Service<Routed<B>> for Timeout<S>
where
    S: Service<Routed<B>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Routed<B>) -> Self::Future {
        let Some(timeout) = req.route.rule.timeout_ms.map(Duration::from_millis) else {
            return Either::Left(self.inner.call(req));
        };
        let waiting = Waiting::default();
        req.request.extensions_mut().insert(waiting.clone());
        let route = req.route.clone();
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            let attempts = inner.oneshot(req);
            tokio::pin!(attempts);
            tokio::select! {
                biased;
                answer = &mut attempts => answer,
                () = tokio::time::sleep(timeout) => {
                    // Marked before `attempts` is dropped (when this block returns), so the
                    // attempt in flight knows it was cut off by the timeout.
                    let to = match waiting.expire() {
                        Some(backend) => format!("{}.{}", backend.name, backend.namespace),
                        None => route.service.to_string(),
                    };
                    Err(Error::Timeout {
                        to,
                        timeout,
                        route: route.labels.route.clone(),
                    })
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::route::mk;
    use tower::util::BoxCloneService;

    type Inner = BoxCloneService<Routed<bytes::Bytes>, Response<Body>, Error>;

    const RULE: &str = "{name: main, timeoutMs: 300, \
                        backends: [{service: web-primary.default:80, weight: 1}]}";

    /// An inner service that reports an attempt to `web-primary` and answers after `delay`;
    /// returns it and the `Waiting` it saw.
    fn slow(delay: Duration) -> (Inner, Arc<Mutex<Option<Waiting>>>) {
        let seen = Arc::new(Mutex::new(None));
        let svc = {
            let seen = seen.clone();
            tower::service_fn(move |req: Routed<bytes::Bytes>| {
                let waiting = req.request.extensions().get::<Waiting>().cloned();
                *seen.lock().unwrap() = waiting.clone();
                async move {
                    if let Some(w) = &waiting {
                        w.start(&req.route.rule.backends[0].service);
                    }
                    tokio::time::sleep(delay).await;
                    if let Some(w) = &waiting {
                        w.finish();
                    }
                    Ok::<_, Error>(mk::response(200))
                }
            })
        };
        (BoxCloneService::new(svc), seen)
    }

    fn routed(rule: &str) -> Routed<bytes::Bytes> {
        mk::routed_with(
            rule,
            &mk::tables("{}"),
            http::Request::get("http://web.default:80/").body(bytes::Bytes::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_is_cut_off_at_the_timeout_naming_its_backend() {
        let (inner, seen) = slow(Duration::from_secs(600));
        let start = tokio::time::Instant::now();
        let err = TimeoutLayer
            .layer(inner)
            .oneshot(routed(RULE))
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(err.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            err.to_string(),
            "web-primary.default did not answer within 300ms (route main)"
        );
        let waiting = seen.lock().unwrap().take().unwrap();
        assert!(waiting.expired(), "the cut-off attempt can tell");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_goes_through() {
        let (inner, seen) = slow(Duration::from_millis(299));
        let rsp = TimeoutLayer
            .layer(inner)
            .oneshot(routed(RULE))
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert!(!seen.lock().unwrap().take().unwrap().expired());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rule_without_a_timeout_waits_as_long_as_it_takes() {
        let (inner, seen) = slow(Duration::from_secs(600));
        let rule = "{name: main, backends: [{service: web-primary.default:80, weight: 1}]}";
        let rsp = TimeoutLayer
            .layer(inner)
            .oneshot(routed(rule))
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert!(seen.lock().unwrap().is_none(), "nothing to report to");
    }
}
