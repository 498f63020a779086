//! Route selection, the top of the stack: a [`Target`] and the tables it was resolved against
//! go in, the HTTPRoute rule the request takes comes out ([`Routed`]). It sits first because
//! every layer below reads the rule: its filters, its timeout, its retry policy, its backends.
//! A service with no route table gets one catch-all rule to itself, as Linkerd does for
//! unrouted services; a request no rule matches is answered 404 here and goes no further.
//!
//! The route is decided once per request and shared (`Arc<Route>`) by its attempts; only the
//! tables are re-read per attempt, by the retry layer. A rule's `Route` is built the first
//! time a request takes it and kept with the tables ([`crate::tables::ServiceRoutes`]), so
//! the requests that follow share it, and the metrics series it resolves, without copying
//! the rule or formatting its labels again.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use mesh_core::proxy_api::{RouteRule, ServiceRef, WeightedBackend};
use mesh_core::routing::RequestParts;
use tower::{Layer, Service};

use crate::http::Body;
use crate::metrics::RouteLabels;
use crate::outbound::error::Error;
use crate::outbound::target::Target;
use crate::tables::{Route, Tables};

/// A request on its way to route selection: where it is going, and the tables to route by.
#[derive(Debug)]
pub struct Targeted<B> {
    /// Where the app meant the request to go.
    pub target: Target,
    /// The tables, once discovery has answered for the target (or given up waiting).
    pub tables: Arc<Tables>,
    /// The request.
    pub request: Request<B>,
}

/// A request with its route.
#[derive(Debug)]
pub struct Routed<B> {
    /// The rule the request takes.
    pub route: Arc<Route>,
    /// The tables this attempt picks its backend and endpoint from.
    pub tables: Arc<Tables>,
    /// The request.
    pub request: Request<B>,
}

impl Route {
    /// The rule a request to `service` takes; when no rule matches or the service is unknown
    /// (a 404), the service is handed back. The route of a rule in the tables, and the
    /// catch-all route of a service without a table, are built once and shared by every
    /// request that takes them.
    pub fn select<B>(
        tables: &Tables,
        service: ServiceRef,
        req: &Request<B>,
    ) -> Result<Arc<Self>, ServiceRef> {
        let Some(routes) = tables.routes.get(&service) else {
            if !tables.available(&service) {
                return Err(service);
            }
            return Ok(tables.default_routes.get_or_build(&service, || {
                let rule = RouteRule {
                    name: "default".into(),
                    backends: vec![WeightedBackend {
                        service: service.clone(),
                        weight: 1,
                    }],
                    ..Default::default()
                };
                Self::named(service.clone(), rule, "default".to_string())
            }));
        };
        let headers = req.headers();
        let lookup = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
        };
        let parts = RequestParts {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: &lookup,
        };
        let Some((i, rule)) = routes.route(&parts) else {
            return Err(service);
        };
        Ok(routes.built(i, || {
            let name = if rule.name.is_empty() {
                format!("rule-{i}")
            } else {
                rule.name.to_string()
            };
            Self::named(service, rule.clone(), name)
        }))
    }

    /// The route of `service` taking `rule`, named `name` in the metrics.
    pub(crate) fn named(service: ServiceRef, rule: RouteRule, name: String) -> Self {
        let labels = RouteLabels {
            authority: service.authority(),
            route: name,
        };
        Self::new(service, rule, labels)
    }
}

/// Makes [`RouteService`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteService { inner }
    }
}

/// Selects the route of each request; see the [module](self).
#[derive(Clone, Debug)]
pub struct RouteService<S> {
    inner: S,
}

impl<S, B> Service<Targeted<B>> for RouteService<S>
where
    S: Service<Routed<B>, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Either<Ready<Result<Response<Body>, Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Targeted<B>) -> Self::Future {
        let Targeted {
            target,
            tables,
            request,
        } = req;
        // Every kind of target routes by a service: an original destination outside the mesh
        // never reaches the stack (it is passed through below it).
        let (Target::Authority(service) | Target::OrigDst { service, .. }) = target;
        match Route::select(&tables, service, &request) {
            Ok(route) => Either::Right(self.inner.call(Routed {
                route,
                tables,
                request,
            })),
            Err(service) => Either::Left(ready(Err(Error::NoRoute {
                service,
                method: request.method().clone(),
                path: request.uri().path().to_string(),
            }))),
        }
    }
}

/// Builders for the layers' tests.
#[cfg(test)]
pub(crate) mod mk {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// Tables from a static config in YAML.
    pub fn tables(yaml: &str) -> Arc<Tables> {
        let config = serde_yaml::from_str(yaml).unwrap();
        Arc::new(Tables::from_config(config).unwrap())
    }

    /// A routed request, on the route `rule` (YAML) of `web.default:80`.
    pub fn routed_with<B>(
        rule: &str,
        tables: &Arc<Tables>,
        request: http::Result<Request<B>>,
    ) -> Routed<B> {
        let rule: RouteRule = serde_yaml::from_str(rule).unwrap();
        let name = rule.name.to_string();
        Routed {
            route: Arc::new(Route::named(web(), rule, name)),
            tables: tables.clone(),
            request: request.unwrap(),
        }
    }

    /// The service the test routes are attached to.
    pub fn web() -> ServiceRef {
        ServiceRef::new("web", "default", 80)
    }

    /// A response with `status` and an empty body.
    pub fn response(status: u16) -> Response<Body> {
        let mut rsp = Response::new(Full::default().map_err(|never| match never {}).boxed());
        *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tower::ServiceExt;

    const TABLES: &str = r#"
routes:
  - parent: web.default:80
    rules:
      - name: api
        matches: [{path: {type: PathPrefix, value: /api}}]
        backends: [{service: web-canary.default:80, weight: 1}]
      - matches: [{method: POST}]
        backends: [{service: web-primary.default:80, weight: 1}]
endpoints:
  - service: db.default:5432
    endpoints: [{addr: "127.0.0.1:5432"}]
"#;

    /// Routes `request` for `authority` and returns the route the inner service saw.
    async fn route(authority: &str, request: Request<()>) -> Result<Arc<Route>, Error> {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |req: Routed<()>| {
                *seen.lock().unwrap() = Some(req.route);
                std::future::ready(Ok::<_, Error>(mk::response(200)))
            })
        };
        let target = Target::Authority(crate::tables::parse_authority(authority).unwrap());
        let req = Targeted {
            target,
            tables: mk::tables(TABLES),
            request,
        };
        RouteLayer.layer(inner).oneshot(req).await?;
        let route = seen.lock().unwrap().take().unwrap();
        Ok(route)
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn the_first_matching_rule_is_taken_and_named_for_metrics() {
        let api = route("web.default", get("/api/users")).await.unwrap();
        assert_eq!(api.labels.route, "api");
        assert_eq!(api.labels.authority, "web.default:80");
        assert_eq!(api.rule.backends[0].service.name, "web-canary");

        let post = Request::post("/other").body(()).unwrap();
        let unnamed = route("web.default", post).await.unwrap();
        assert_eq!(
            unnamed.labels.route, "rule-1",
            "unnamed rules are named by index"
        );
        assert_eq!(unnamed.service, mk::web());
    }

    #[test]
    fn requests_taking_a_rule_share_its_route_until_the_table_changes() {
        let tables = mk::tables(TABLES);
        let web = crate::tables::parse_authority("web.default").unwrap();
        let select =
            |tables: &Tables, path: &str| Route::select(tables, web.clone(), &get(path)).unwrap();
        let first = select(&tables, "/api/a");
        assert!(Arc::ptr_eq(&first, &select(&tables, "/api/b")));
        let post = Route::select(&tables, web.clone(), &Request::post("/x").body(()).unwrap());
        assert!(!Arc::ptr_eq(&first, &post.unwrap()), "another rule");
        // A service without a table: its catch-all route is shared too.
        let db = crate::tables::parse_authority("db:5432").unwrap();
        let catch_all = Route::select(&tables, db.clone(), &get("/")).unwrap();
        assert!(Arc::ptr_eq(
            &catch_all,
            &Route::select(&tables, db, &get("/other")).unwrap()
        ));
        // A new table for the service (as discovery sends) comes with its own routes.
        let mut changed = (*tables).clone();
        let table: mesh_core::proxy_api::RouteTable = serde_yaml::from_str(
            "{parent: web.default:80, rules: [{name: api, backends: [{service: web-primary.default:80, weight: 1}]}]}",
        )
        .unwrap();
        changed.routes.insert(crate::tables::ServiceRoutes::new(
            mesh_core::routing::CompiledRoutes::new(table).unwrap(),
        ));
        let after = select(&changed, "/api/a");
        assert!(!Arc::ptr_eq(&first, &after));
        assert_eq!(after.rule.backends[0].service.name, "web-primary");
        assert_eq!(first.rule.backends[0].service.name, "web-canary");
    }

    /// An attempt's metrics series is resolved once per backend, endpoint owner and TLS, and
    /// kept on the route.
    #[test]
    fn a_route_keeps_one_series_per_backend_owner_and_tls() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let route = route_of("web.default", "/api");
        let owner = |deployment: &str| -> Arc<str> { deployment.into() };
        let canary = ServiceRef::new("web-canary", "default", 80);
        let primary = ServiceRef::new("web-primary", "default", 80);
        let a = route.series(&metrics, &canary, false, &owner("v2"));
        assert!(Arc::ptr_eq(
            &a,
            &route.series(&metrics, &canary, false, &owner("v2"))
        ));
        for other in [
            route.series(&metrics, &primary, false, &owner("v2")),
            route.series(&metrics, &canary, false, &owner("v3")),
            route.series(&metrics, &canary, true, &owner("v2")),
        ] {
            assert!(!Arc::ptr_eq(&a, &other));
        }
        let labels = a.labels();
        assert_eq!(
            (
                &*labels.authority,
                &*labels.route,
                &*labels.dst_service,
                &*labels.dst_deployment,
                labels.tls
            ),
            ("web.default:80", "api", "web-canary", "v2", "")
        );
    }

    fn route_of(authority: &str, path: &str) -> Arc<Route> {
        let tables = mk::tables(TABLES);
        let service = crate::tables::parse_authority(authority).unwrap();
        Route::select(&tables, service, &get(path)).unwrap()
    }

    #[tokio::test]
    async fn a_request_no_rule_matches_is_answered_404() {
        let err = route("web.default", get("/other")).await.unwrap_err();
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(
            err.to_string(),
            "no route for web.default:80 matches GET /other"
        );
    }

    #[tokio::test]
    async fn a_service_without_routes_gets_a_catch_all_rule_to_itself() {
        let db = route("db:5432", get("/")).await.unwrap();
        assert_eq!(db.labels.route, "default");
        assert_eq!(db.rule.backends.len(), 1);
        assert_eq!(db.rule.backends[0].service, db.service);
        // Unknown to discovery: no endpoints, no routes.
        let err = route("cache:6379", get("/")).await.unwrap_err();
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
    }
}
