//! The web dashboard: services and workloads with their golden metrics and small charts, the
//! call graph, each Canary (weight over time, every gate's canary and primary values tick by
//! tick with its verdict, the decision and its reason, and promote/abort/pause/resume), and
//! live tap. `mesh up` serves it beside the control plane, `mesh dashboard` for any control
//! plane. It is a client of the control plane's API like the CLI: metrics and taps come from
//! `/v1/observe/...`, Canaries from the resource API, and the buttons run the very code of
//! `mesh rollout promote|abort|pause|resume`, so they are checked and recorded in the rollout's
//! history the same way. Pages update live from server-sent events; the page, its script and
//! its styles are compiled into the binary (no CDN).
//!
//! In a cluster (`mesh dashboard --kube --prometheus URL`) the same pages come from elsewhere:
//! the metrics from Prometheus through [`mesh_observe::MetricsView`], with each Deployment's
//! meshed and total pods from the Kubernetes API (as `mesh stat --kube`); the Canaries from the
//! Kubernetes API and the buttons through the CLI's cluster backend (as `mesh rollout --kube`);
//! and tap through a port-forward to the control plane (as `mesh tap --kube`), which authorizes
//! the caller's Kubernetes token.
//!
//! Only a holder of the resource API's token may use it. The link `mesh dashboard` and `mesh
//! up` print carries a one-time sign-in code, never the token (which is never printed or
//! logged); a script that holds the token may sign in with `/login?token=...` instead. Signing
//! in sets an HTTP-only cookie naming a session of this dashboard (a random id, not the token),
//! and every other path refuses a request without one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Value, json};

use mesh_controlplane::access::same;

use crate::backend::{Backend, Conn, Where};
use crate::observe_api::Api;

/// The page, its script and styles: one file, compiled in.
const INDEX: &str = include_str!("index.html");

/// The cookie holding the token.
const COOKIE: &str = "mesh-dashboard";

/// How often the pages get fresh numbers.
const TICK: Duration = Duration::from_secs(2);

/// A dashboard for one control plane.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    at: Where,
    metrics: Metrics,
    /// The control plane's observe API: the metrics in the embedded mesh, and taps.
    api: Api,
    /// In a cluster, taps go through a port-forward to the control plane instead (as `mesh tap
    /// --kube`), opened at the first tap and kept; dropped after a failure so the next tap
    /// opens a fresh one.
    reach: Option<crate::observe_reach::Reach>,
    /// In a cluster, the Kubernetes API the Canaries are read from, connected once; the
    /// embedded mesh's resource API is connected at each tick.
    backend: Option<Backend>,
    forward: tokio::sync::Mutex<Option<(Api, crate::observe_reach::Forward)>>,
    /// How far back the numbers look (`1m`).
    window: String,
    /// The resource API's token, for `/login?token=`; none in a cluster, where only the
    /// printed one-time link signs in.
    secret: Option<String>,
    /// Sign-in codes printed and not used yet; each works once.
    codes: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The sessions signed in (cookie values).
    sessions: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Where the pages' metrics come from.
enum Metrics {
    /// The embedded control plane's window, through its observe API.
    Embedded,
    /// A Prometheus scraping the proxies, and the cluster's Deployments and pods.
    Cluster {
        view: mesh_observe::prometheus::PrometheusView,
        client: kube::Client,
        window_secs: u64,
    },
}

/// What a dashboard of a cluster reads: `at` selects the cluster (and names the control plane
/// taps go through, with the caller's token), `prometheus` the metrics.
pub struct ClusterSource {
    pub at: Where,
    /// The namespace the mesh is installed in (where taps find the control plane).
    pub mesh_namespace: String,
    pub prometheus: String,
    pub window: String,
}

impl Dashboard {
    /// A dashboard of a cluster: metrics from Prometheus, Canaries and the buttons through the
    /// Kubernetes API, taps through a port-forward to the control plane.
    pub async fn cluster(source: ClusterSource) -> anyhow::Result<Self> {
        let window_secs = mesh_core::duration::parse(&source.window)
            .map_err(|e| anyhow::anyhow!("--time-window {}: {e}", source.window))?
            .as_secs()
            .max(1);
        let client = source.at.k8s.client().await?;
        let api = Api::new(&source.at.conn)?;
        let at = Where {
            kube: true,
            ..source.at
        };
        let backend = Backend::connect(&at).await?;
        let reach = crate::observe_reach::Reach {
            kube: true,
            k8s: at.k8s.clone(),
            mesh_namespace: source.mesh_namespace,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                metrics: Metrics::Cluster {
                    view: mesh_observe::prometheus::PrometheusView::new(&source.prometheus),
                    client,
                    window_secs,
                },
                at,
                api,
                reach: Some(reach),
                backend: Some(backend),
                forward: tokio::sync::Mutex::default(),
                window: source.window,
                secret: None,
                codes: std::sync::Mutex::default(),
                sessions: std::sync::Mutex::default(),
            }),
        })
    }

    /// A dashboard of the control plane `conn` names, with its token.
    pub fn new(conn: Conn) -> anyhow::Result<Self> {
        Self::embedded(conn, "1m".into())
    }

    /// As [`Dashboard::new`], its numbers looking `window` back.
    pub fn embedded(conn: Conn, window: String) -> anyhow::Result<Self> {
        let path = match &conn.token_file {
            Some(path) => path.clone(),
            None => mesh_controlplane::access::token_file_for(&conn.server).with_context(|| {
                format!(
                    "no token for {}: pass --token-file (the control plane's api-token)",
                    conn.server
                )
            })?,
        };
        let secret = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the token file {}", path.display()))?
            .trim()
            .to_string();
        let conn = Conn {
            token_file: Some(path),
            ..conn
        };
        let api = Api::new(&conn)?;
        let at = Where {
            conn,
            kube: false,
            k8s: crate::k8s::KubeArgs {
                kubeconfig: None,
                context: None,
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                at,
                metrics: Metrics::Embedded,
                api,
                reach: None,
                backend: None,
                forward: tokio::sync::Mutex::default(),
                window,
                secret: Some(secret),
                codes: std::sync::Mutex::default(),
                sessions: std::sync::Mutex::default(),
            }),
        })
    }

    /// A link that signs one browser in, for a dashboard listening on `addr`: it carries a
    /// fresh one-time code, so the printed link is spent once used and never holds the token.
    pub fn sign_in_url(&self, addr: SocketAddr) -> anyhow::Result<String> {
        let code = mesh_controlplane::access::fresh_secret().context("a sign-in code")?;
        self.inner
            .codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(code.clone());
        Ok(format!("http://{addr}/login?code={code}"))
    }

    /// Starts a session; its id is the cookie's value.
    fn open_session(&self) -> anyhow::Result<String> {
        let id = mesh_controlplane::access::fresh_secret().context("a session id")?;
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone());
        Ok(id)
    }

    /// Serves the dashboard on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let app = Router::new()
            .route("/login", get(login))
            .route("/", get(index))
            .route("/api/events", get(events))
            .route("/api/tap", get(tap))
            .route("/api/canaries/{name}/{action}", post(act))
            .with_state(self);
        axum::serve(listener, app)
            .await
            .context("serving the dashboard")
    }

    /// Opens a tap stream: at the control plane's API, or in a cluster through the forward.
    async fn open_tap(&self, q: &[(&str, String)]) -> anyhow::Result<reqwest::Response> {
        let Some(reach) = &self.inner.reach else {
            return self.inner.api.send("/v1/observe/tap", q).await;
        };
        let mut forward = self.inner.forward.lock().await;
        if forward.is_none() {
            let (api, opened) = crate::observe_reach::api(&self.inner.at.conn, reach).await?;
            *forward = opened.map(|f| (api, f));
        }
        let Some((api, _)) = forward.as_ref() else {
            anyhow::bail!("no port-forward to the control plane");
        };
        let rsp = api.send("/v1/observe/tap", q).await;
        if rsp.is_err() {
            *forward = None;
        }
        rsp
    }

    fn signed_in(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(k, v)| {
                k == COOKIE
                    && self
                        .inner
                        .sessions
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .any(|s| same(v.as_bytes(), s.as_bytes()))
            })
    }
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(
            "<h1>Sign in</h1><p>Open a sign-in link: <code>mesh dashboard</code> (or <code>mesh up</code>) \
             prints one, and each works once.</p>",
        ),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Login {
    /// A one-time code from a printed link.
    code: Option<String>,
    /// The resource API's token itself, for a caller that holds it.
    token: Option<String>,
}

async fn login(State(d): State<Dashboard>, Query(q): Query<Login>) -> Response {
    let by_code = q.code.is_some_and(|code| {
        d.inner
            .codes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(code.trim())
    });
    let by_token = q
        .token
        .zip(d.inner.secret.as_ref())
        .is_some_and(|(t, secret)| same(t.trim().as_bytes(), secret.as_bytes()));
    if !by_code && !by_token {
        return refused();
    }
    let Ok(session) = d.open_session() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for a session",
        )
            .into_response();
    };
    let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
    let mut rsp = Redirect::to("/").into_response();
    if let Ok(v) = cookie.parse() {
        rsp.headers_mut().insert(header::SET_COOKIE, v);
    }
    rsp
}

async fn index(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if !d.signed_in(&headers) {
        return refused();
    }
    Html(INDEX).into_response()
}

/// The traffic the pages show: (workloads, services, routes, edges), each empty when its
/// source did not answer (the page keeps working while Prometheus restarts).
async fn traffic(d: &Dashboard) -> [Value; 4] {
    match &d.inner.metrics {
        Metrics::Embedded => {
            let api = &d.inner.api;
            let q = [("window", d.inner.window.clone())];
            let get = |path: &'static str| {
                let q = &q;
                async move { api.get::<Value>(path, q).await.unwrap_or_default() }
            };
            [
                get("/v1/observe/stat/workloads").await,
                get("/v1/observe/stat/services").await,
                get("/v1/observe/routes").await,
                get("/v1/observe/edges").await,
            ]
        }
        Metrics::Cluster {
            view,
            client,
            window_secs,
        } => {
            use mesh_observe::{MetricsView as _, Resource};
            let q = mesh_observe::Query {
                namespace: None,
                name: None,
                window_secs: *window_secs,
            };
            let mut workloads = view.stat(Resource::Workloads, &q).await;
            if let Ok(rows) = &mut workloads
                && let Err(e) = crate::observe_cluster::with_pods(client, &q, rows).await
            {
                tracing::warn!(error = %e, "the dashboard's Deployments");
            }
            [
                rows_json(workloads),
                rows_json(view.stat(Resource::Services, &q).await),
                rows_json(view.routes(&q).await),
                rows_json(view.edges(&q).await),
            ]
        }
    }
}

/// Rows as the page reads them; none (logged) when Prometheus did not answer.
fn rows_json<T: serde::Serialize>(rows: Result<Vec<T>, mesh_observe::ViewError>) -> Value {
    match rows {
        Ok(rows) => serde_json::to_value(rows).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "the dashboard's metrics");
            Value::default()
        }
    }
}

/// One snapshot of everything the pages show.
async fn snapshot(d: &Dashboard) -> Value {
    let [workloads, services, routes, edges] = traffic(d).await;
    let mut canaries = Vec::new();
    let connected;
    let backend = match &d.inner.backend {
        Some(backend) => Some(backend),
        None => {
            connected = Backend::connect(&d.inner.at).await.ok();
            connected.as_ref()
        }
    };
    if let Some(backend) = backend
        && let Ok(list) = backend
            .list(mesh_crds::validate::ResourceKind::Canary)
            .await
    {
        for item in list["items"].as_array().into_iter().flatten() {
            if let Ok(c) = serde_json::from_value::<mesh_crds::Canary>(item.clone()) {
                let mut report = crate::rollout::to_json(&c, 0);
                if let Some(o) = report.as_object_mut() {
                    o.remove("exitCode");
                    o.remove("result");
                    o.insert(
                        "lastAnalysisTime".into(),
                        json!(c.status.as_ref().and_then(|s| s.last_analysis_time.clone())),
                    );
                }
                canaries.push(report);
            }
        }
    }
    json!({
        "time": chrono::Utc::now().to_rfc3339(),
        "workloads": workloads,
        "services": services,
        "routes": routes,
        "edges": edges,
        "canaries": canaries,
    })
}

async fn events(
    State(d): State<Dashboard>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    if !d.signed_in(&headers) {
        return Err(refused());
    }
    let stream = futures_util::stream::unfold((d, true), |(d, first)| async move {
        if !first {
            tokio::time::sleep(TICK).await;
        }
        let data = snapshot(&d).await.to_string();
        Some((Ok(Event::default().event("tick").data(data)), (d, false)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(serde::Deserialize)]
struct TapParams {
    workload: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

async fn tap(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(p): Query<TapParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    if !d.signed_in(&headers) {
        return Err(refused());
    }
    let mut q = vec![
        ("workload", p.workload),
        (
            "namespace",
            p.namespace
                .unwrap_or_else(|| d.inner.at.conn.namespace.clone()),
        ),
    ];
    if let Some(path) = p.path.filter(|p| !p.is_empty()) {
        q.push(("path", path));
    }
    let rsp = d
        .open_tap(&q)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("{e:#}")).into_response())?;
    let stream = futures_util::stream::unfold((rsp, Vec::new()), |(mut rsp, mut buf)| async move {
        loop {
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let data = String::from_utf8_lossy(&line).trim().to_string();
                return Some((Ok(Event::default().event("request").data(data)), (rsp, buf)));
            }
            match rsp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn act(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    if !d.signed_in(&headers) {
        return refused();
    }
    match crate::rollout::act(&d.inner.at, &name, &action, "dashboard").await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"ok": true}))).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": format!("{e:#}")})),
        )
            .into_response(),
    }
}

/// `mesh dashboard`: serves a dashboard for the control plane `conn` names on `addr`, and
/// prints its sign-in link, until Ctrl-C.
#[allow(
    clippy::print_stdout,
    reason = "the announcement and the link are the output"
)]
pub async fn standalone(
    addr: SocketAddr,
    conn: Conn,
    window: String,
    cluster: Option<ClusterSource>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the dashboard to {addr}"))?;
    let bound = listener.local_addr()?;
    let dashboard = match cluster {
        Some(source) => Dashboard::cluster(source).await?,
        None => Dashboard::embedded(conn, window)?,
    };
    println!("{}", mesh_core::Listening::new("dashboard", bound));
    println!("mesh dashboard: {}", dashboard.sign_in_url(bound)?);
    tokio::select! {
        r = dashboard.serve(listener) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
