//! The rule's filters, in order: Gateway API's RequestHeaderModifier, ResponseHeaderModifier,
//! RequestRedirect (answered here, nothing forwarded) and URLRewrite, and fault injection (a
//! delay and/or an abort for a share of requests). They sit right below route selection and
//! above the timeout and retries: a filter applies once per request, not per attempt, and an
//! injected delay or abort stands for the app's own behaviour, so the route's timeout does not
//! count it and a retry never repeats it.

use std::collections::BTreeMap;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use mesh_core::proxy_api::{PathModifier, Redirect, RouteFilter};
use mesh_core::routing::{RedirectFrom, modified_path, redirect_location};
use tower::{Layer, Service, ServiceExt};

use crate::http::Body;
use crate::outbound::error::Error;
use crate::outbound::route::Routed;
use crate::tables::Route;

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
        // Most rules have no faults and no response filters: their requests never wait here.
        if !filters.iter().any(|f| {
            matches!(
                f,
                RouteFilter::Fault { .. } | RouteFilter::ResponseHeaderModifier { .. }
            )
        }) {
            for filter in filters {
                if let Some(answer) = on_request(filter, &route, &mut req.request) {
                    return Either::Right(Box::pin(std::future::ready(Ok(answer))));
                }
            }
            return Either::Left(self.inner.call(req));
        }
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            for filter in &route.rule.filters {
                if let RouteFilter::Fault { abort, delay } = filter {
                    if let Some(d) = delay.as_ref().filter(|d| roll(d.percent)) {
                        tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
                    }
                    if let Some(a) = abort.as_ref().filter(|a| roll(a.percent)) {
                        let status = StatusCode::from_u16(a.status)
                            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        return Err(Error::Fault(status));
                    }
                } else if let Some(answer) = on_request(filter, &route, &mut req.request) {
                    return Ok(answer);
                }
            }
            let mut rsp = inner.oneshot(req).await?;
            for filter in &route.rule.filters {
                if let RouteFilter::ResponseHeaderModifier { set, add, remove } = filter {
                    modify_headers(rsp.headers_mut(), set, add, remove);
                }
            }
            Ok(rsp)
        }))
    }
}

/// Applies a request-side filter; a redirect answers the request instead of forwarding it.
fn on_request<B>(
    filter: &RouteFilter,
    route: &Route,
    req: &mut Request<B>,
) -> Option<Response<Body>> {
    match filter {
        RouteFilter::RequestHeaderModifier { set, add, remove } => {
            modify_headers(req.headers_mut(), set, add, remove);
            None
        }
        RouteFilter::RequestRedirect(redirect) => Some(redirect_response(redirect, route, req)),
        RouteFilter::UrlRewrite { hostname, path } => {
            rewrite(
                req,
                hostname.as_deref(),
                path.as_ref(),
                route.rule.matched_prefix(),
            );
            None
        }
        RouteFilter::ResponseHeaderModifier { .. }
        | RouteFilter::Fault { .. }
        | RouteFilter::RequestMirror { .. } => None,
    }
}

/// The host and port the request named: its `Host` header, else its URI's authority; the port
/// defaults to the service port the request was sent to.
fn request_host<B>(req: &Request<B>, service_port: u16) -> (String, u16) {
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .or_else(|| req.uri().authority().cloned());
    match authority {
        Some(a) => (a.host().to_string(), a.port_u16().unwrap_or(service_port)),
        None => (String::new(), service_port),
    }
}

/// A Gateway API redirect: the status and a `Location` built by the shared route code.
fn redirect_response<B>(redirect: &Redirect, route: &Route, req: &Request<B>) -> Response<Body> {
    let (host, port) = request_host(req, route.service.port);
    let host = if host.is_empty() {
        route.service.name.to_string()
    } else {
        host
    };
    let location = redirect_location(
        redirect,
        route.rule.matched_prefix(),
        &RedirectFrom {
            scheme: req.uri().scheme_str().unwrap_or("http"),
            host: &host,
            port,
            path: req.uri().path(),
            query: req.uri().query(),
        },
    );
    let mut rsp = Response::new(crate::http::empty());
    *rsp.status_mut() = StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        rsp.headers_mut().insert(http::header::LOCATION, v);
    }
    rsp
}

/// A Gateway API URL rewrite: the path (query kept) and the host, in the `Host` header and in
/// the URI's authority when it has one (HTTP/2's `:authority`).
fn rewrite<B>(
    req: &mut Request<B>,
    hostname: Option<&str>,
    path: Option<&PathModifier>,
    matched_prefix: Option<&str>,
) {
    let mut parts = req.uri().clone().into_parts();
    if let Some(modifier) = path {
        let new_path = modified_path(modifier, matched_prefix, req.uri().path());
        let with_query = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(pq) = with_query.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(host) = hostname {
        if parts.authority.is_some()
            && let Ok(a) = host.parse()
        {
            parts.authority = Some(a);
        }
        if (req.headers().contains_key(http::header::HOST) || parts.authority.is_none())
            && let Ok(v) = HeaderValue::from_str(host)
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Whether this request is in the `percent` share.
fn roll(percent: f64) -> bool {
    fastrand::f64() * 100.0 < percent
}

pub(crate) fn modify_headers(
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

    /// Runs a GET of `uri` (with a `Host` header) through `rule`; returns the response and the
    /// request the inner service saw, if it got there.
    async fn exchange(
        rule: &str,
        uri: &str,
        host: &str,
    ) -> (Response<Body>, Option<http::Request<()>>) {
        let request = http::Request::get(uri).header("host", host);
        let req = mk::routed_with(&format!("{{{rule}}}"), &mk::tables("{}"), request.body(()));
        let seen = Arc::new(Mutex::new(None));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |req: Routed<()>| {
                *seen.lock().unwrap() = Some(req.request);
                let mut rsp = mk::response(200);
                rsp.headers_mut()
                    .insert("x-backend", HeaderValue::from_static("1"));
                std::future::ready(Ok::<_, Error>(rsp))
            })
        };
        let rsp = FiltersLayer.layer(inner).oneshot(req).await.unwrap();
        let seen = seen.lock().unwrap().take();
        (rsp, seen)
    }

    #[tokio::test]
    async fn a_redirect_answers_with_its_status_and_location_and_forwards_nothing() {
        let rule = "matches: [{path: {type: PathPrefix, value: /old}}], \
                    filters: [{type: requestRedirect, hostname: example.org, port: 8083, \
                    statusCode: 301, path: {type: ReplacePrefixMatch, value: /new}}], backends: []";
        let (rsp, seen) = exchange(rule, "/old/page?x=1", "echo").await;
        assert!(seen.is_none(), "a redirect is never forwarded");
        assert_eq!(rsp.status(), 301);
        assert_eq!(
            rsp.headers()["location"],
            "http://example.org:8083/new/page?x=1"
        );
        let rule = "filters: [{type: requestRedirect, scheme: https}], backends: []";
        let (rsp, _) = exchange(rule, "/p", "echo:8080").await;
        assert_eq!(rsp.status(), 302, "302 is the default");
        assert_eq!(rsp.headers()["location"], "https://echo/p");
    }

    #[tokio::test]
    async fn a_rewrite_changes_the_path_and_host_the_backend_sees() {
        let rule = format!(
            "matches: [{{path: {{type: PathPrefix, value: /prefix/one}}}}], \
             filters: [{{type: urlRewrite, hostname: inner.example, \
             path: {{type: ReplacePrefixMatch, value: /one}}}}], {BACKEND}"
        );
        let (rsp, seen) = exchange(&rule, "/prefix/one/two?q=1", "echo").await;
        assert_eq!(rsp.status(), 200);
        let seen = seen.unwrap();
        assert_eq!(seen.uri().path(), "/one/two");
        assert_eq!(seen.uri().query(), Some("q=1"));
        assert_eq!(seen.headers()["host"], "inner.example");
        let rule = format!(
            "filters: [{{type: urlRewrite, path: {{type: ReplaceFullPath, value: /full}}}}], {BACKEND}"
        );
        let (_, seen) = exchange(&rule, "/a/b", "echo").await;
        let seen = seen.unwrap();
        assert_eq!(seen.uri().path(), "/full");
        assert_eq!(seen.headers()["host"], "echo", "the host is kept");
    }

    #[tokio::test]
    async fn response_header_modifiers_change_what_the_app_gets_back() {
        let rule = format!(
            "filters: [{{type: responseHeaderModifier, set: {{x-set: s}}, add: {{x-add: a}}, \
             remove: [x-backend]}}], {BACKEND}"
        );
        let (rsp, seen) = exchange(&rule, "/", "echo").await;
        assert!(seen.is_some());
        assert_eq!(rsp.headers()["x-set"], "s");
        assert_eq!(rsp.headers()["x-add"], "a");
        assert!(!rsp.headers().contains_key("x-backend"));
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
