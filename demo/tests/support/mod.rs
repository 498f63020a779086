//! Starts this crate's binaries on port 0 and a tiny HTTP forward proxy standing in for the
//! sidecar's outbound listener.
//!
//! The proxy is a stand-in rather than the real `mesh-proxy` because this crate must not depend
//! on the sidecar; it does the one thing the apps rely on: it receives absolute-form requests
//! (`GET http://backend.default:9898/`) and routes them by authority. Authorities like
//! `backend.default` resolve nowhere else, so an answer proves the proxy was used.

#![allow(dead_code, reason = "each test file uses part of the support module")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a step that fails fails the test"
)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_core::Listening;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

/// How long a test waits for a process to start or stop: `MESH_TEST_PATIENCE` seconds (30).
pub fn patience() -> Duration {
    std::env::var("MESH_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
}

/// A binary of this crate about to be started, with a clean environment (no proxy variables
/// or `DEMO_*` settings leak in from the test runner).
pub struct Bin {
    cmd: Command,
}

/// `mesh-demo-app` on 127.0.0.1 port 0 reporting `version`.
pub fn app(version: &str) -> Bin {
    Bin::new(env!("CARGO_BIN_EXE_mesh-demo-app"))
        .env("PORT", "0")
        .env("DEMO_VERSION", version)
}

/// `mesh-loadgen` against `url`.
pub fn loadgen(url: &str) -> Bin {
    Bin::new(env!("CARGO_BIN_EXE_mesh-loadgen")).args(["--url", url])
}

impl Bin {
    pub fn new(path: &str) -> Self {
        let mut cmd = Command::new(path);
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for keep in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(keep) {
                cmd.env(keep, v);
            }
        }
        Self { cmd }
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, args: I) -> Self {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Sends requests through `proxy`, as a sidecar would be configured.
    pub fn via(self, proxy: SocketAddr) -> Self {
        self.env("HTTP_PROXY", &format!("http://{proxy}"))
    }

    /// Spawns the process; stderr is inherited so failures show its log.
    pub fn spawn(mut self) -> Running {
        self.cmd.stderr(Stdio::inherit());
        let mut child = self.cmd.spawn().expect("spawning the binary");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Running {
            child,
            stdout,
            addr: None,
        }
    }

    /// Spawns the process and waits for its `mesh: listening http <addr>` announcement.
    pub async fn start(self) -> Running {
        let mut running = self.spawn();
        let line = running
            .next_line()
            .await
            .expect("the process exited without announcing its address");
        let listening: Listening = line.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(listening.name, "http");
        running.addr = Some(listening.addr);
        running
    }

    /// Runs the process to completion, returning its exit status, stdout and stderr.
    pub async fn output(mut self) -> (ExitStatus, String, String) {
        let out = tokio::time::timeout(patience() + Duration::from_secs(10), self.cmd.output())
            .await
            .expect("the process did not exit in time")
            .expect("running the binary");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A running binary, killed when dropped.
pub struct Running {
    pub child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    addr: Option<SocketAddr>,
}

impl Running {
    /// The announced address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .expect("started without waiting for the announcement")
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// The next stdout line, or `None` at EOF.
    pub async fn next_line(&mut self) -> Option<String> {
        tokio::time::timeout(patience(), self.stdout.next_line())
            .await
            .expect("no output within the patience")
            .expect("reading stdout")
    }

    /// Sends SIGTERM.
    pub async fn terminate(&self) {
        let pid = self.child.id().expect("the process is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        tokio::time::timeout(patience(), self.child.wait())
            .await
            .expect("the process did not exit within the patience")
            .expect("waiting for the process")
    }
}

/// A client that talks to 127.0.0.1 directly, whatever proxy the test runner has set.
pub fn direct_client() -> reqwest::Client {
    mesh_demo::http_client_builder()
        .no_proxy()
        .timeout(patience())
        .build()
        .unwrap()
}

/// A forward proxy routing absolute-form requests by authority, recording what it saw.
pub struct ForwardProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl ForwardProxy {
    /// The request targets the proxy received, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The headers of the requests the proxy received, in order.
    #[allow(dead_code, reason = "each test binary uses part of the support module")]
    pub fn seen_headers(&self) -> Vec<http::HeaderMap> {
        self.headers.lock().unwrap().clone()
    }
}

/// Starts a forward proxy sending requests for each authority (`host:port`) to its address;
/// unknown authorities get a 502 from the proxy.
pub async fn forward_proxy(routes: &[(&str, SocketAddr)]) -> ForwardProxy {
    let routes: Arc<BTreeMap<String, SocketAddr>> = Arc::new(
        routes
            .iter()
            .map(|(authority, addr)| ((*authority).to_string(), *addr))
            .collect(),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (recorded, recorded_headers) = (seen.clone(), headers.clone());
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let routes = routes.clone();
            let seen = recorded.clone();
            let headers = recorded_headers.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    headers.lock().unwrap().push(req.headers().clone());
                    forward(routes.clone(), seen.clone(), req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    ForwardProxy {
        addr,
        seen,
        headers,
    }
}

async fn forward(
    routes: Arc<BTreeMap<String, SocketAddr>>,
    seen: Arc<Mutex<Vec<String>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let bad_gateway = |why: String| {
        let mut rsp = Response::new(Full::new(Bytes::from(why)));
        *rsp.status_mut() = StatusCode::BAD_GATEWAY;
        Ok(rsp)
    };
    seen.lock().unwrap().push(req.uri().to_string());
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| routes.get(a.as_str()))
        .copied()
    else {
        return bad_gateway(format!("no route for {}", req.uri()));
    };
    let stream = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => return bad_gateway(format!("connecting to {target}: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return bad_gateway(format!("handshake with {target}: {e}")),
    };
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .unwrap();
    let rsp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(rsp) => rsp,
        Err(e) => return bad_gateway(format!("forwarding to {target}: {e}")),
    };
    let (parts, body) = rsp.into_parts();
    match body.collect().await {
        Ok(body) => Ok(Response::from_parts(parts, Full::new(body.to_bytes()))),
        Err(e) => bad_gateway(format!("reading the answer of {target}: {e}")),
    }
}
