//! The admin server: liveness, readiness, metrics, the current route and endpoint tables
//! (`/config`) and live requests for an authorized caller (`/tap`, see [`crate::tap`]) on their
//! own port, apart from app traffic, so probes and scrapes keep working when the proxying
//! listeners are saturated.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::SharedCredentials;
/// Re-exported where the admin server is assembled, which is where callers look for it.
pub use crate::readiness::Readiness;
use crate::tables::SharedTables;

/// OpenMetrics text, the format prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// State the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    registry: Registry,
    tables: SharedTables,
    readiness: watch::Receiver<Readiness>,
    credentials: Option<SharedCredentials>,
    authz: Option<crate::authz::Authz>,
    tap: Option<(crate::tap::Tap, crate::tap::Access)>,
}

/// The body of admin responses: whole, or a stream for `/tap`.
pub type AdminBody = BoxBody<Bytes, Infallible>;

/// Content type of `/tap`: one JSON object per line.
const NDJSON: &str = "application/x-ndjson";

impl Admin {
    /// An admin server exposing `registry` at `/metrics` and `tables` at `/config`, always ready.
    pub fn new(registry: Registry, tables: SharedTables) -> Self {
        // The sender is dropped: the receiver keeps answering its last value.
        let readiness = watch::channel(Readiness::Ready).1;
        Self {
            registry,
            tables,
            readiness,
            credentials: None,
            authz: None,
            tap: None,
        }
    }

    /// Serves `tap` at `/tap` to callers `access` admits (tap is refused to everyone when it
    /// names no token).
    pub fn with_tap(mut self, tap: crate::tap::Tap, access: crate::tap::Access) -> Self {
        self.tap = Some((tap, access));
        self
    }

    /// Answers `GET /tap`: the live requests that pass the query's filter, as they happen, one
    /// JSON line each, until the caller goes away (or `max` were sent).
    pub fn tap<B>(&self, req: &Request<B>) -> Response<AdminBody> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
                .map(BodyExt::boxed);
        }
        let Some((tap, access)) = &self.tap else {
            let why = crate::tap::Refusal::Disabled.to_string();
            return text(StatusCode::FORBIDDEN, &format!("{why}\n")).map(BodyExt::boxed);
        };
        if let Err(refusal) = access.admits(req.headers()) {
            let status = match refusal {
                crate::tap::Refusal::Disabled => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            return text(status, &format!("{refusal}\n")).map(BodyExt::boxed);
        }
        let (filter, max) = match crate::tap::Filter::from_query(req.uri().query()) {
            Ok(f) => f,
            Err(why) => {
                return text(StatusCode::BAD_REQUEST, &format!("{why}\n")).map(BodyExt::boxed);
            }
        };
        // The proxy's own identity fills the side of each event it stands for.
        let own = self
            .credentials
            .as_ref()
            .and_then(|c| c.borrow().as_ref().map(|c| c.identity.clone()));
        let watch = tap.watch();
        let left = max.unwrap_or(u64::MAX);
        let lines = futures_util::stream::unfold(
            (watch, filter, left, own),
            |(mut watch, filter, left, own)| async move {
                if left == 0 {
                    return None;
                }
                loop {
                    let line = match watch.next().await? {
                        Ok(event) if filter.admits(&event) => {
                            let mut event = (*event).clone();
                            match event.direction {
                                "outbound" => event.src_identity.clone_from(&own),
                                _ => event.dst_identity.clone_from(&own),
                            }
                            serde_json::to_vec(&event).unwrap_or_default()
                        }
                        Ok(_) => continue,
                        Err(lost) => serde_json::to_vec(&serde_json::json!({ "lost": lost }))
                            .unwrap_or_default(),
                    };
                    let mut line = line;
                    line.push(b'\n');
                    let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(line)));
                    return Some((frame, (watch, filter, left - 1, own)));
                }
            },
        );
        let mut rsp = Response::new(StreamBody::new(lines).boxed());
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(NDJSON),
        );
        rsp
    }

    /// Shows the certificate held in `credentials` under `identity` in `/config`.
    pub fn with_identity(mut self, credentials: SharedCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Shows the inbound policy in force under `inboundPolicy` in `/config`.
    pub fn with_authz(mut self, authz: crate::authz::Authz) -> Self {
        self.authz = Some(authz);
        self
    }

    /// Answers `/ready` from `readiness` (registration and shutdown move it).
    pub fn with_readiness(mut self, readiness: watch::Receiver<Readiness>) -> Self {
        self.readiness = readiness;
        self
    }

    /// Answers one admin request (`/tap` is [`Admin::tap`]).
    pub fn handle<B>(&self, req: &Request<B>) -> Response<AdminBody> {
        if req.method() == Method::GET && req.uri().path() == "/config" {
            return self.config();
        }
        self.whole(req).map(BodyExt::boxed)
    }

    /// `/config`: the tables, and beside them the certificate held (null until the first) so
    /// operators and tests can watch it being renewed, and the inbound policy in force. Written
    /// from the tables as they are (no copy) on a blocking thread, in chunks of
    /// [`CONFIG_CHUNK`] bytes as the client reads them: with 10,000 routes and endpoints the
    /// text is 5 MB, and built whole it left the proxy's RSS 3 MB higher after each of the
    /// first two requests (a large block freed raises glibc's thresholds for giving memory
    /// back).
    fn config(&self) -> Response<AdminBody> {
        let tables = self.tables.borrow().clone();
        let identity = self.credentials.as_ref().map(|credentials| {
            credentials.borrow().as_ref().map(|c| {
                serde_json::json!({
                    "identity": c.identity,
                    "serial": c.serial,
                    "notAfter": c.not_after,
                    "lifetimeSeconds": c.lifetime.as_secs(),
                })
            })
        });
        let inbound_policy = self
            .authz
            .as_ref()
            .map(|authz| serde_json::to_value(&*authz.policy()).unwrap_or_default());
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        tokio::task::spawn_blocking(move || {
            let config = ConfigView {
                tables: tables.config_view(),
                identity,
                inbound_policy,
            };
            let mut out = Chunks {
                buf: Vec::with_capacity(CONFIG_CHUNK),
                tx,
            };
            let written = serde_json::to_writer_pretty(&mut out, &config)
                .map_err(std::io::Error::from)
                .and_then(|()| std::io::Write::flush(&mut out));
            if let Err(error) = written {
                // The client went away, or the text could not be written: the body ends short.
                tracing::debug!(%error, "/config ended early");
            }
        });
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        let mut rsp = Response::new(StreamBody::new(chunks).boxed());
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        rsp
    }

    /// The admin responses written whole.
    fn whole<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            // Without registration to wait for, being up is being ready.
            (&Method::GET, "/ready") => match *self.readiness.borrow() {
                Readiness::Ready => text(StatusCode::OK, "ready\n"),
                Readiness::Certifying => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for a certificate from the control plane\n",
                ),
                Readiness::Registering => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "registering with the control plane\n",
                ),
                Readiness::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            },
            (&Method::GET, "/metrics") => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => Response::builder()
                        .header(header::CONTENT_TYPE, OPENMETRICS)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default(),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
                }
            }
            (_, "/live" | "/ready" | "/metrics" | "/config") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves admin requests on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (io, peer) = listener.accept().await?;
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let rsp = if req.uri().path() == "/tap" {
                        admin.tap(&req)
                    } else {
                        admin.handle(&req)
                    };
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(error) = builder.serve_connection(TokioIo::new(io), svc).await {
                    tracing::debug!(%peer, %error, "admin connection ended with an error");
                }
            });
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    rsp
}

/// Size of the pieces `/config` is sent in: under glibc's threshold for allocating apart from
/// the heap (128 KiB), so no piece moves it.
const CONFIG_CHUNK: usize = 64 * 1024;

/// A writer sending what is written to a channel in pieces of [`CONFIG_CHUNK`] bytes, waiting
/// while the channel is full (it runs on a blocking thread). Fails once the receiver is gone.
struct Chunks {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl Chunks {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CONFIG_CHUNK));
        self.tx
            .blocking_send(Bytes::from(full))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for Chunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CONFIG_CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CONFIG_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// What `/config` shows: the tables, and beside them the certificate held (when the proxy has
/// an identity) and the inbound policy (when it has an inbound listener).
#[derive(serde::Serialize)]
struct ConfigView<'a> {
    #[serde(flatten)]
    tables: crate::tables::ConfigView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<Option<serde_json::Value>>,
    #[serde(rename = "inboundPolicy", skip_serializing_if = "Option::is_none")]
    inbound_policy: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn tables() -> SharedTables {
        tokio::sync::watch::channel(std::sync::Arc::default()).1
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(rsp: Response<AdminBody>) -> String {
        String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn probes_answer_ok() {
        let admin = Admin::new(Registry::default(), tables());
        assert_eq!(admin.handle(&get("/live")).status(), StatusCode::OK);
        assert_eq!(admin.handle(&get("/ready")).status(), StatusCode::OK);
        assert_eq!(admin.handle(&get("/nope")).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/live").body(()).unwrap();
        assert_eq!(admin.handle(&post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn ready_follows_readiness() {
        let (tx, rx) = watch::channel(Readiness::Registering);
        let admin = Admin::new(Registry::default(), tables()).with_readiness(rx);
        let rsp = admin.handle(&get("/ready"));
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(rsp).await, "registering with the control plane\n");
        tx.send_replace(Readiness::Ready);
        assert_eq!(admin.handle(&get("/ready")).status(), StatusCode::OK);
        tx.send_replace(Readiness::Draining);
        let rsp = admin.handle(&get("/ready"));
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(rsp).await, "draining\n");
        // Liveness is not readiness: a draining proxy is still alive.
        assert_eq!(admin.handle(&get("/live")).status(), StatusCode::OK);
    }

    /// `/config` of a large table arrives in pieces, never as one block, and reads back as
    /// the config the tables were built from.
    #[tokio::test]
    async fn config_is_sent_in_pieces_and_reads_back_whole() {
        use mesh_core::proxy_api::StaticConfig;
        let routes: Vec<String> = (0..2_000)
            .map(|i| {
                format!(
                    r#"{{"parent": "svc-{i}.scale:80", "rules": [{{"name": "all",
                        "backends": [{{"service": "svc-{i}-v1.scale:80", "weight": 100}}]}}]}}"#
                )
            })
            .collect();
        let config: StaticConfig =
            serde_json::from_str(&format!(r#"{{"routes": [{}]}}"#, routes.join(","))).unwrap();
        let tables = crate::tables::Tables::from_config(config.clone()).unwrap();
        let shared = watch::channel(std::sync::Arc::new(tables)).1;
        let rsp = Admin::new(Registry::default(), shared).handle(&get("/config"));
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/json");
        let mut body = rsp.into_body();
        let (mut text, mut pieces) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            pieces.push(data.len());
            text.extend_from_slice(&data);
        }
        assert!(pieces.len() > 1, "{pieces:?}");
        assert!(pieces.iter().all(|&n| n <= CONFIG_CHUNK), "{pieces:?}");
        let shown: StaticConfig = serde_json::from_slice(&text).unwrap();
        // The tables list routes by authority.
        let mut expected = config;
        expected.routes.sort_by(|a, b| a.parent.cmp(&b.parent));
        assert_eq!(shown.routes.len(), 2_000);
        assert!(
            shown == expected,
            "/config differs from the config the tables hold"
        );
    }

    #[tokio::test]
    async fn metrics_render_the_registry() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        c.inc_by(3);
        registry.register("probe", "A test counter", c);
        let rsp = Admin::new(registry, tables()).handle(&get("/metrics"));
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], OPENMETRICS);
        let text = body(rsp).await;
        assert!(text.contains("probe_total 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
