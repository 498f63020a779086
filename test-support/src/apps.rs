//! Tiny upstream apps for tests: real HTTP servers on 127.0.0.1 port 0 that answer with their
//! version, so a test can tell which backend served a request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{HarnessError, Result};

/// Response header with the Host the app received.
pub const SEEN_HOST: &str = "x-seen-host";
/// Response header echoing the request's `x-added` header (to check header filters).
pub const SEEN_ADDED: &str = "x-seen-added";
/// A request to this path is answered after [`SLOW_DELAY`].
pub const SLOW_PATH: &str = "/slow";
/// How long [`SLOW_PATH`] takes.
pub const SLOW_DELAY: Duration = Duration::from_secs(3);

/// Starts an app whose body is `version`, over HTTP/1.1 and h2c, until the runtime stops.
pub async fn app(version: &'static str) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(HarnessError::io("binding a test app"))?;
    let addr = listener
        .local_addr()
        .map_err(HarnessError::io("reading a test app's address"))?;
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path() == SLOW_PATH {
                        tokio::time::sleep(SLOW_DELAY).await;
                    }
                    let mut rsp = Response::new(Full::new(Bytes::from(version)));
                    for (from, to) in [("host", SEEN_HOST), ("x-added", SEEN_ADDED)] {
                        if let Some(v) = req.headers().get(from) {
                            rsp.headers_mut().insert(to, v.clone());
                        }
                    }
                    Ok::<_, Infallible>(rsp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
