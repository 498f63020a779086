//! The rule's filters, in order: Gateway API's RequestHeaderModifier, and fault injection (a
//! delay and/or an abort for a share of requests). They sit right below route selection and
//! above the timeout and retries: a filter applies once per request, not per attempt, and an
//! injected delay or abort stands for the app's own behaviour, so the route's timeout does not
//! count it and a retry never repeats it.

use std::collections::BTreeMap;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use mesh_core::proxy_api::RouteFilter;
use tower::{Layer, Service, ServiceExt};

use crate::http::Body;
use crate::outbound::error::Error;
use crate::outbound::route::Routed;

/// Makes [`Filters`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct FiltersLayer;

impl<S> Layer<S> for FiltersLayer {
    type Service = Filters<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Filters { inner }
    }
}

/// Applies the rule's filters to each request; see the [module](self).
#[derive(Clone, Debug)]
pub struct Filters<S> {
    inner: S,
}

impl<S, B> Service<Routed<B>> for Filters<S>
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
        let route = req.route.clone();
        let filters = &route.rule.filters;
        // Most rules have no faults: their requests never wait here.
        if !filters
            .iter()
            .any(|f| matches!(f, RouteFilter::Fault { .. }))
        {
            for filter in filters {
                if let RouteFilter::RequestHeaderModifier { set, add, remove } = filter {
                    modify_headers(req.request.headers_mut(), set, add, remove);
                }
            }
            return Either::Left(self.inner.call(req));
        }
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            for filter in &route.rule.filters {
                match filter {
                    RouteFilter::RequestHeaderModifier { set, add, remove } => {
                        modify_headers(req.request.headers_mut(), set, add, remove);
                    }
                    RouteFilter::Fault { abort, delay } => {
                        if let Some(d) = delay.as_ref().filter(|d| roll(d.percent)) {
                            tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
                        }
                        if let Some(a) = abort.as_ref().filter(|a| roll(a.percent)) {
                            let status = StatusCode::from_u16(a.status)
                                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                            return Err(Error::Fault(status));
                        }
                    }
                }
            }
            inner.oneshot(req).await
        }))
    }
}

/// Whether this request is in the `percent` share.
fn roll(percent: f64) -> bool {
    fastrand::f64() * 100.0 < percent
}

fn modify_headers(
    headers: &mut HeaderMap,
    set: &BTreeMap<String, String>,
    add: &BTreeMap<String, String>,
    remove: &[String],
) {
    let parse = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in set {
        if let Some((k, v)) = parse(k, v) {
            headers.insert(k, v);
        }
    }
    for (k, v) in add {
        if let Some((k, v)) = parse(k, v) {
            headers.append(k, v);
        }
    }
    for k in remove {
        headers.remove(k.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::route::mk;
    use std::sync::{Arc, Mutex};

    const BACKEND: &str = "backends: [{service: web-primary.default:80, weight: 1}]";

    /// Runs `req` through the filters of `rule`; returns the answer and the headers the inner
    /// service saw, if the request got there.
    async fn filter(rule: &str, headers: &[(&str, &str)]) -> (u16, Option<HeaderMap>) {
        let mut request = http::Request::get("http://web.default:80/");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let rule = format!("{{{rule}, {BACKEND}}}");
        let req = mk::routed_with(&rule, &mk::tables("{}"), request.body(()));
        let seen = Arc::new(Mutex::new(None));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |req: Routed<()>| {
                *seen.lock().unwrap() = Some(req.request.headers().clone());
                std::future::ready(Ok::<_, Error>(mk::response(200)))
            })
        };
        let status = match FiltersLayer.layer(inner).oneshot(req).await {
            Ok(rsp) => rsp.status().as_u16(),
            Err(e) => e.status().as_u16(),
        };
        let seen = seen.lock().unwrap().take();
        (status, seen)
    }

    #[tokio::test]
    async fn header_modifiers_set_add_and_remove() {
        let rule = "filters: [{type: requestHeaderModifier, set: {x-set: new}, \
                    add: {x-add: two}, remove: [x-gone]}]";
        let (status, headers) =
            filter(rule, &[("x-set", "old"), ("x-add", "one"), ("x-gone", "1")]).await;
        assert_eq!(status, 200);
        let headers = headers.unwrap();
        assert_eq!(headers["x-set"], "new");
        let added: Vec<_> = headers.get_all("x-add").iter().collect();
        assert_eq!(added, ["one", "two"]);
        assert!(!headers.contains_key("x-gone"));
    }

    #[tokio::test]
    async fn an_abort_answers_with_its_status_and_never_reaches_the_backend() {
        let rule = "filters: [{type: fault, abort: {status: 418, percent: 100}}]";
        assert_eq!(filter(rule, &[]).await, (418, None));
        let never = "filters: [{type: fault, abort: {status: 418, percent: 0}}]";
        let (status, seen) = filter(never, &[]).await;
        assert_eq!(status, 200);
        assert!(seen.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_before_it_goes_on() {
        let rule = "filters: [{type: fault, delay: {delayMs: 250, percent: 100}}, \
                    {type: requestHeaderModifier, set: {x-after: delay}}]";
        let start = tokio::time::Instant::now();
        let (status, headers) = filter(rule, &[]).await;
        assert_eq!(status, 200);
        assert!(start.elapsed() >= Duration::from_millis(250));
        assert_eq!(headers.unwrap()["x-after"], "delay");
    }
}
