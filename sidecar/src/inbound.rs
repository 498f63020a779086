//! The inbound listener: every request peers send to the local workload. It accepts HTTP/1.1 and
//! HTTP/2 with prior knowledge and hands each request to the local app over HTTP/1.1 with a
//! pooled client, keeping the Host the caller used. Golden metrics are recorded with
//! `direction="inbound"` and the workload's own service as `dst_service`, so the same queries
//! that judge a canary from its callers' side can read it from the workload's side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use mesh_core::proxy_api::ServiceRef;
use tokio::net::TcpListener;

use crate::drain::{Body, Watch};
use crate::metrics::{Metrics, RequestLabels};
use crate::outbound::error;

/// The inbound proxy.
#[derive(Debug)]
pub struct Inbound {
    app: SocketAddr,
    metrics: Metrics,
    labels: RequestLabels,
    client: Client<HttpConnector, Incoming>,
}

impl Inbound {
    /// A proxy handing requests to the app at `app`. `service` is the workload's service, if
    /// known; it labels the metrics.
    pub fn new(app: SocketAddr, service: Option<&ServiceRef>, metrics: Metrics) -> Self {
        // Labels are fixed per proxy, never taken from the request, so a peer cannot grow the
        // number of series by sending odd Host headers.
        let labels = RequestLabels {
            direction: "inbound",
            authority: service.map(ServiceRef::authority).unwrap_or_default(),
            route: "default".to_string(),
            dst_service: service.map(|s| s.name.clone()).unwrap_or_default(),
            dst_namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
        };
        Self {
            app,
            metrics,
            labels,
            client: crate::outbound::client(crate::outbound::CONNECT_TIMEOUT),
        }
    }

    /// Serves the inbound listener until `drain` fires and its requests in flight finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        drain: Watch,
    ) -> std::io::Result<()> {
        crate::drain::serve(listener, "inbound", drain, move |req| {
            let this = self.clone();
            async move { this.handle(req).await }
        })
        .await
    }

    /// Hands one request to the app.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        // HTTP/2 callers send the authority in the URI, not in Host; the app speaks HTTP/1.1
        // and needs it in Host.
        if !req.headers().contains_key(HOST)
            && let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(HOST, v);
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = match Uri::builder()
            .scheme("http")
            .authority(self.app.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request target: {e}")),
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        self.metrics.requests.get_or_create(&self.labels).inc();

        match self.client.request(req).await {
            Ok(rsp) => {
                self.metrics.record(
                    &self.labels,
                    Some(rsp.status().as_u16()),
                    false,
                    start.elapsed(),
                );
                rsp.map(BodyExt::boxed)
            }
            Err(e) => {
                let status = StatusCode::BAD_GATEWAY;
                self.metrics
                    .record(&self.labels, Some(status.as_u16()), true, start.elapsed());
                error(status, &format!("app at {}: {e}", self.app))
            }
        }
    }
}
