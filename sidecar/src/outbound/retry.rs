//! Retries under the rule's policy and the route's retry budget (see [`crate::retry`] for the
//! budget and the replayable body). It sits below the timeout, which bounds all attempts
//! together, and above the backend split, so each attempt picks its backend and endpoint again
//! and a retry can land on a healthy one; each retry also reads the newest tables, since a
//! weight change or a new endpoint may help it.
//!
//! An answer is retried when the rule's policy names its status, or when the attempt failed to
//! connect (nothing was sent); never once the body is longer than can be kept, past the
//! policy's retry limit, or when the budget is spent. The per-route retry counters are recorded
//! here, where the decisions are made.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use mesh_core::proxy_api::{RetryBudget, ServiceRef};
use tower::{Layer, Service, ServiceExt};

use crate::http::Body;
use crate::metrics::Metrics;
use crate::outbound::error::Error;
use crate::outbound::route::Routed;
use crate::retry::{BoxError, Budget, ReplayBody, Replayable};
use crate::tables::{Route, SharedTables};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A route: its service and its rule's metrics name.
type RouteKey = (ServiceRef, String);

/// The retry budget of each route, made on first use and remade when its settings change.
#[derive(Debug, Default)]
pub struct Budgets(Mutex<BTreeMap<RouteKey, Arc<Mutex<Budget>>>>);

impl Budgets {
    fn get(&self, route: &Route, config: &RetryBudget) -> Arc<Mutex<Budget>> {
        let mut budgets = lock(&self.0);
        let key = (route.service.clone(), route.labels.route.clone());
        if let Some(b) = budgets.get(&key)
            && lock(b).config() == config
        {
            return b.clone();
        }
        let b = Arc::new(Mutex::new(Budget::new(config.clone(), Instant::now())));
        budgets.insert(key, b.clone());
        b
    }

    /// Forgets the budgets of services not in `keep`.
    pub fn retain(&self, keep: &BTreeSet<&ServiceRef>) {
        lock(&self.0).retain(|(service, _), _| keep.contains(service));
    }
}

/// Makes [`Retry`] services.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    tables: SharedTables,
    budgets: Arc<Budgets>,
    metrics: Metrics,
}

impl RetryLayer {
    /// Retries under `budgets`, re-reading `tables` for each retry and counting retries in
    /// `metrics`.
    pub fn new(tables: SharedTables, budgets: Arc<Budgets>, metrics: Metrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                tables,
                budgets,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Sends each request again while its rule's policy and budget allow; see the [module](self).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Routed<B>> for Retry<S>
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
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Routed<B>) -> Self::Future {
        let Routed {
            route,
            mut tables,
            request,
        } = req;
        let (parts, body) = request.into_parts();
        let policy = route
            .rule
            .retry
            .as_deref()
            .filter(|p| p.max_retries > 0)
            .cloned();
        let length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        // Only a route that retries pays for keeping a copy of the body.
        let replayable = Replayable::new(body, policy.is_some(), length);
        // The first attempt always has the body.
        let Some(body) = replayable.attempt() else {
            return Either::Right(Box::pin(std::future::ready(Err(Error::BodySent))));
        };
        let Some(policy) = policy else {
            let request = Request::from_parts(parts, body);
            return Either::Left(self.inner.call(Routed {
                route,
                tables,
                request,
            }));
        };
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        Either::Right(Box::pin(async move {
            let budget = shared.budgets.get(&route, &policy.budget);
            lock(&budget).deposit(Instant::now());
            let mut body = Some(body);
            let mut retries = 0;
            loop {
                // Retries are only sent after `can_replay`, so there is a body for each attempt.
                let Some(body) = body.take().or_else(|| replayable.attempt()) else {
                    return Err(Error::BodySent);
                };
                let attempt = Routed {
                    route: route.clone(),
                    tables: tables.clone(),
                    request: Request::from_parts(parts.clone(), body),
                };
                let answer = inner.clone().oneshot(attempt).await;
                match &answer {
                    Ok(rsp) if !policy.retries_status(rsp.status().as_u16()) => {
                        if retries > 0 && !rsp.status().is_server_error() {
                            shared
                                .metrics
                                .retry_successes
                                .get_or_create(&route.labels)
                                .inc();
                        }
                        return answer;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_retryable() => {}
                    Err(_) => return answer,
                }

                // The answer is retryable; is a retry allowed?
                if !replayable.can_replay() {
                    // Longer than can be kept: it cannot be sent again.
                    return answer;
                }
                if retries >= policy.max_retries {
                    shared
                        .metrics
                        .retry_limit_exceeded
                        .get_or_create(&route.labels)
                        .inc();
                    return answer;
                }
                if !lock(&budget).withdraw(Instant::now()) {
                    shared
                        .metrics
                        .retry_overflow
                        .get_or_create(&route.labels)
                        .inc();
                    return answer;
                }
                retries += 1;
                shared
                    .metrics
                    .retry_requests
                    .get_or_create(&route.labels)
                    .inc();
                tables = shared.tables.borrow().clone();
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::error::AttemptError;
    use crate::outbound::route::mk;
    use crate::tables::Tables;
    use http_body_util::{BodyExt, Full};
    use prometheus_client::registry::Registry;
    use std::collections::VecDeque;
    use std::net::SocketAddr;

    type Attempt = Routed<ReplayBody<Full<Bytes>>>;

    /// What the stub backend answers, in order: a status, or a failure (connect or not).
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Status(u16),
        Failed { connect: bool },
    }

    /// An attempt's body, and the tables it was given.
    type Seen = (Bytes, Arc<Tables>);

    /// A stub below the retry layer: answers in order, and records each attempt's body and
    /// the tables it was given.
    #[derive(Clone)]
    struct Backend {
        answers: Arc<Mutex<VecDeque<Answer>>>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Backend {
        fn new(answers: &[Answer]) -> Self {
            Self {
                answers: Arc::new(Mutex::new(answers.iter().copied().collect())),
                seen: Arc::default(),
            }
        }

        fn attempts(&self) -> usize {
            self.seen.lock().unwrap().len()
        }
    }

    impl Service<Attempt> for Backend {
        type Response = Response<Body>;
        type Error = Error;
        type Future = BoxFuture<'static, Result<Response<Body>, Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Attempt) -> Self::Future {
            let answer = self.answers.lock().unwrap().pop_front().unwrap();
            let seen = self.seen.clone();
            Box::pin(async move {
                let tables = req.tables.clone();
                let body = req.request.into_body().collect().await;
                let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                seen.lock().unwrap().push((body, tables));
                match answer {
                    Answer::Status(s) => Ok(mk::response(s)),
                    Answer::Failed { connect } => Err(Error::Endpoint {
                        backend: mk::web(),
                        addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
                        error: AttemptError::Client {
                            connect,
                            error: "connection refused".into(),
                        },
                    }),
                }
            })
        }
    }

    struct Setup {
        layer: RetryLayer,
        metrics: Metrics,
        tables: tokio::sync::watch::Sender<Arc<Tables>>,
    }

    fn setup() -> Setup {
        let metrics = Metrics::register(&mut Registry::default());
        let (tables, rx) = tokio::sync::watch::channel(mk::tables("{}"));
        Setup {
            layer: RetryLayer::new(rx, Arc::default(), metrics.clone()),
            metrics,
            tables,
        }
    }

    const RETRY_503: &str = "{name: main, retry: {statuses: [503], maxRetries: 2}, \
                             backends: [{service: web-primary.default:80, weight: 1}]}";

    fn request(rule: &str, body: &'static str) -> Routed<Full<Bytes>> {
        mk::routed_with(
            rule,
            &mk::tables("{}"),
            http::Request::post("http://web.default:80/").body(Full::new(Bytes::from(body))),
        )
    }

    fn count(
        family: &prometheus_client::metrics::family::Family<
            crate::metrics::RouteLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> u64 {
        let labels = crate::metrics::RouteLabels {
            authority: "web.default:80".into(),
            route: "main".into(),
        };
        family.get_or_create(&labels).get()
    }

    async fn status(answer: Result<Response<Body>, Error>) -> u16 {
        match answer {
            Ok(rsp) => rsp.status().as_u16(),
            Err(e) => e.status().as_u16(),
        }
    }

    #[tokio::test]
    async fn a_retryable_status_is_retried_with_the_whole_body_and_the_newest_tables() {
        let s = setup();
        let backend = Backend::new(&[Answer::Status(503), Answer::Status(200)]);
        let newer = mk::tables("{endpoints: [{service: web-primary.default:80, endpoints: []}]}");
        s.tables.send_replace(newer.clone());
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(RETRY_503, "order #1"))
            .await;
        assert_eq!(status(answer).await, 200);
        let seen = backend.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "order #1");
        assert_eq!(seen[1].0, "order #1", "the retry replays the body");
        assert!(
            !Arc::ptr_eq(&seen[0].1, &newer),
            "the first attempt routes as it came"
        );
        assert!(
            Arc::ptr_eq(&seen[1].1, &newer),
            "the retry reads the newest tables"
        );
        assert_eq!(count(&s.metrics.retry_requests), 1);
        assert_eq!(count(&s.metrics.retry_successes), 1);
    }

    #[tokio::test]
    async fn connect_failures_are_retried_but_failures_after_sending_are_not() {
        let s = setup();
        let backend = Backend::new(&[Answer::Failed { connect: true }, Answer::Status(200)]);
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(RETRY_503, ""))
            .await;
        assert_eq!(status(answer).await, 200);
        assert_eq!(backend.attempts(), 2);

        let backend = Backend::new(&[Answer::Failed { connect: false }]);
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(RETRY_503, ""))
            .await;
        assert_eq!(status(answer).await, 502);
        assert_eq!(backend.attempts(), 1, "the app may have acted on it");
    }

    #[tokio::test]
    async fn retries_stop_at_the_policys_limit() {
        let s = setup();
        let backend = Backend::new(&[Answer::Status(503); 3]);
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(RETRY_503, ""))
            .await;
        assert_eq!(status(answer).await, 503);
        assert_eq!(backend.attempts(), 3, "one attempt and two retries");
        assert_eq!(count(&s.metrics.retry_requests), 2);
        assert_eq!(count(&s.metrics.retry_limit_exceeded), 1);
        assert_eq!(count(&s.metrics.retry_successes), 0);
    }

    #[tokio::test]
    async fn a_spent_budget_stops_retries() {
        let s = setup();
        // No retries per second and 10 % of requests: the first request earns 0.1 of a retry.
        let rule = "{name: main, retry: {statuses: [503], maxRetries: 2, \
                    budget: {ratio: 0.1, minPerSecond: 0, ttlMs: 10000}}, \
                    backends: [{service: web-primary.default:80, weight: 1}]}";
        let backend = Backend::new(&[Answer::Status(503)]);
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(rule, ""))
            .await;
        assert_eq!(status(answer).await, 503);
        assert_eq!(backend.attempts(), 1);
        assert_eq!(count(&s.metrics.retry_overflow), 1);
    }

    #[tokio::test]
    async fn a_rule_without_a_policy_is_attempted_once() {
        let s = setup();
        let rule = "{name: main, backends: [{service: web-primary.default:80, weight: 1}]}";
        let backend = Backend::new(&[Answer::Failed { connect: true }]);
        let answer = s
            .layer
            .layer(backend.clone())
            .oneshot(request(rule, "x"))
            .await;
        assert_eq!(status(answer).await, 502);
        assert_eq!(backend.attempts(), 1);
    }
}
