//! Gateway API RequestMirror: a copy of a sampled share of a rule's requests goes to another
//! service, through the same split, balancer, metrics and clients as any backend, in a task of
//! its own whose answer is read and dropped. The original never waits for the copy, and the
//! copy's failure or slowness never reaches it.
//!
//! The layer sits below the retries so that it sees the body the retry layer wraps, and copies
//! only a request's first attempt (a retry is not mirrored again). The copy carries the
//! request's headers and its body, frame by frame as the original reads it from the client
//! (see [`crate::tee`]): the original is never held back for its copies. A copy that falls more
//! than [`MIRROR_MAX_LAG`] behind its original is given up (its connection aborts it) and
//! counted in `outbound_http_route_mirror_skipped_total`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::proxy_api::{RouteFilter, RouteRule, WeightedBackend};
use mesh_core::routing::sampled;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::http::Body;
use crate::metrics::Metrics;
use crate::outbound::error::Error;
use crate::outbound::route::Routed;
use crate::retry::ReplayBody;
use crate::tables::Route;

/// How long a mirror's copy may take, answer included, before its task gives it up.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of body a copy may fall behind its original before it is given up: what one
/// sampled request can cost in memory for each of its mirrors.
pub const MIRROR_MAX_LAG: usize = 256 * 1024;

/// Makes [`Mirror`] services.
#[derive(Clone, Debug)]
pub struct MirrorLayer {
    metrics: Metrics,
}

impl MirrorLayer {
    /// Mirrors, counting copies sent and skipped in `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Mirror {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Sends the copies of a rule's RequestMirror filters; see the [module](self).
#[derive(Clone, Debug)]
pub struct Mirror<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B> Service<Routed<ReplayBody<B>>> for Mirror<S>
where
    S: Service<Routed<ReplayBody<B>>, Response = Response<Body>, Error = Error>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Routed<ReplayBody<B>>) -> Self::Future {
        if req.request.body().is_first_attempt()
            && req
                .route
                .rule
                .filters
                .iter()
                .any(|f| matches!(f, RouteFilter::RequestMirror { .. }))
        {
            self.mirror(&req);
        }
        self.inner.call(req)
    }
}

impl<S> Mirror<S> {
    /// Spawns the copies of `req` its rule's mirrors sample.
    fn mirror<B>(&self, req: &Routed<ReplayBody<B>>)
    where
        S: Service<Routed<ReplayBody<B>>, Response = Response<Body>, Error = Error>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        for filter in &req.route.rule.filters {
            let RouteFilter::RequestMirror { backend, percent } = filter else {
                continue;
            };
            if !sampled(*percent, fastrand::f64()) {
                continue;
            }
            let skipped = self
                .metrics
                .mirror_skipped
                .get_or_create(&req.route.labels)
                .clone();
            let Some(body) = req.request.body().tee(MIRROR_MAX_LAG, skipped.clone()) else {
                skipped.inc();
                continue;
            };
            self.metrics
                .mirror_requests
                .get_or_create(&req.route.labels)
                .inc();
            let route = Arc::new(Route::new(
                req.route.service.clone(),
                RouteRule {
                    name: req.route.rule.name.clone(),
                    matches: Vec::new(),
                    filters: Vec::new(),
                    backends: vec![WeightedBackend {
                        service: backend.clone(),
                        weight: 1,
                    }],
                    backend_filters: Vec::new(),
                    timeout_ms: None,
                    retry: None,
                },
                req.route.labels.clone(),
            ));
            let mut copy = Request::new(body);
            *copy.method_mut() = req.request.method().clone();
            *copy.uri_mut() = req.request.uri().clone();
            *copy.version_mut() = req.request.version();
            *copy.headers_mut() = req.request.headers().clone();
            let copy = Routed {
                route,
                tables: req.tables.clone(),
                request: copy,
            };
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let send = async move {
                    if let Ok(rsp) = inner.oneshot(copy).await {
                        // Read to the end so the connection can carry the next request.
                        let _ = rsp.into_body().collect().await;
                    }
                };
                let _ = tokio::time::timeout(MIRROR_TIMEOUT, send).await;
            });
        }
    }
}
