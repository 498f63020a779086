//! A real OTLP receiver with a query API: Jaeger v2, built from its Go module
//! (`test-support/jaeger/go.mod`; `scripts/test` builds it once into the cache and passes its
//! path as [`ENV_JAEGER`]). The proxies' spans are checked as Jaeger stored them, never against
//! a receiver written for the test.
//!
//! Each instance gets its own ports (OTLP/HTTP and the query API on loopback, nothing else),
//! its own in-memory store, and a log in a temporary directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::certs::write;
use crate::ports::free_port;
use crate::process::ChildGuard;
use crate::{HarnessError, Result};

/// Path of the Jaeger binary (`scripts/test` sets it).
pub const ENV_JAEGER: &str = "MESH_JAEGER";

/// The Jaeger binary from [`ENV_JAEGER`]. When it is unset: under `CI=true` a failure naming
/// the variable, else `None` after saying why the test is skipped.
#[allow(
    clippy::print_stderr,
    reason = "a skipped test says why, where the test runner shows it"
)]
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(ENV_JAEGER).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{ENV_JAEGER}={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let why = format!(
        "Jaeger is missing: set {ENV_JAEGER} to the binary ./scripts/test builds from \
         test-support/jaeger (go build github.com/jaegertracing/jaeger/cmd/jaeger)"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    None
}

/// A running Jaeger: spans in over OTLP/HTTP, traces out over its query API.
#[derive(Debug)]
pub struct Jaeger {
    child: ChildGuard,
    otlp: SocketAddr,
    query: SocketAddr,
    _dir: tempfile::TempDir,
}

/// One span as Jaeger stored it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The span's name.
    pub name: String,
    /// The parent span's id (`CHILD_OF`), if any.
    pub parent: Option<String>,
    /// The `service.name` of the process that sent it.
    pub service: String,
    /// Attributes, with Jaeger's own `span.kind`, `otel.status_code` and so on.
    pub tags: BTreeMap<String, serde_json::Value>,
}

impl StoredSpan {
    /// An attribute as text (numbers and booleans as Jaeger prints them).
    pub fn tag(&self, key: &str) -> Option<String> {
        self.tags.get(key).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

impl Jaeger {
    /// Starts `bin` with an in-memory store on fresh loopback ports and waits until its query
    /// API answers.
    pub async fn start(bin: &Path) -> Result<Self> {
        Self::start_with(bin, None).await
    }

    /// As [`Jaeger::start`], with the OTLP/HTTP receiver serving HTTPS with `cert_pem` and
    /// `key_pem` (see [`Jaeger::otlp_https_url`]).
    pub async fn start_tls(bin: &Path, cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::start_with(bin, Some((cert_pem, key_pem))).await
    }

    async fn start_with(bin: &Path, tls: Option<(&str, &str)>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-jaeger-")
            .tempdir()
            .map_err(HarnessError::io("creating Jaeger's directory"))?;
        let otlp = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let query = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let query_grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let otlp_tls = match tls {
            None => String::new(),
            Some((cert, key)) => format!(
                "\n        tls:\n          cert_file: {}\n          key_file: {}",
                write(dir.path(), "otlp.crt", cert)?.display(),
                write(dir.path(), "otlp.key", key)?.display()
            ),
        };
        let config = format!(
            "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {query}
    grpc:
      endpoint: {query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: {otlp}{otlp_tls}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
        );
        let config = write(dir.path(), "jaeger.yaml", &config)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config={}", config.display()));
        let child = ChildGuard::spawn("jaeger", cmd, &dir.path().join("jaeger.log"))?;
        let mut jaeger = Self {
            child,
            otlp,
            query,
            _dir: dir,
        };
        jaeger.wait_ready().await?;
        Ok(jaeger)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let http = crate::http_client();
        let (query, otlp) = (self.query, self.otlp);
        self.child
            .wait_ready(async || {
                let rsp = http
                    .get(format!("http://{query}/api/services"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !rsp.status().is_success() {
                    return Err(format!("/api/services answered {}", rsp.status()));
                }
                tokio::net::TcpStream::connect(otlp)
                    .await
                    .map(drop)
                    .map_err(|_| format!("nothing listens on OTLP's {otlp}"))
            })
            .await
    }

    /// The OTLP/HTTP receiver's base URL (`/v1/traces` is its traces path).
    pub fn otlp_url(&self) -> String {
        format!("http://{}", self.otlp)
    }

    /// The OTLP/HTTP receiver's base URL when it serves HTTPS ([`Jaeger::start_tls`]).
    pub fn otlp_https_url(&self) -> String {
        format!("https://{}", self.otlp)
    }

    /// The OTLP/HTTP receiver's address.
    pub fn otlp_addr(&self) -> SocketAddr {
        self.otlp
    }

    /// The last lines of Jaeger's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.log_tail(n)
    }

    /// The spans of trace `trace_id` (32 hex digits) stored so far; empty when Jaeger has none.
    pub async fn trace(&self, trace_id: &str) -> Result<Vec<StoredSpan>> {
        let url = format!("http://{}/api/traces/{trace_id}", self.query);
        let rsp =
            crate::http_client()
                .get(&url)
                .send()
                .await
                .map_err(|e| HarnessError::Command {
                    command: format!("GET {url}"),
                    detail: e.to_string(),
                })?;
        if rsp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let status = rsp.status();
        let text = rsp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(HarnessError::Command {
                command: format!("GET {url}"),
                detail: format!("{status}: {text}"),
            });
        }
        let body: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| HarnessError::Command {
                command: format!("GET {url}"),
                detail: format!("not JSON ({e}): {text}"),
            })?;
        Ok(spans(&body))
    }

    /// Every trace id Jaeger holds for `service`.
    pub async fn trace_ids(&self, service: &str) -> Result<Vec<String>> {
        let url = format!(
            "http://{}/api/traces?service={service}&limit=1000&lookback=1h",
            self.query
        );
        let rsp =
            crate::http_client()
                .get(&url)
                .send()
                .await
                .map_err(|e| HarnessError::Command {
                    command: format!("GET {url}"),
                    detail: e.to_string(),
                })?;
        let body: serde_json::Value = rsp.json().await.unwrap_or_default();
        let mut ids: Vec<String> = spans(&body).into_iter().map(|s| s.trace_id).collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The spans of a query API answer (`{"data": [{"spans": [...], "processes": {...}}]}`).
fn spans(body: &serde_json::Value) -> Vec<StoredSpan> {
    let mut out = Vec::new();
    let traces = body["data"].as_array().cloned().unwrap_or_default();
    for trace in traces {
        let processes = &trace["processes"];
        for span in trace["spans"].as_array().cloned().unwrap_or_default() {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let parent = span["references"]
                .as_array()
                .and_then(|refs| refs.iter().find(|r| r["refType"] == "CHILD_OF"))
                .map(|r| text(&r["spanID"]));
            let tags = span["tags"]
                .as_array()
                .map(|tags| {
                    tags.iter()
                        .map(|t| (text(&t["key"]), t["value"].clone()))
                        .collect()
                })
                .unwrap_or_default();
            let process = span["processID"].as_str().unwrap_or_default();
            out.push(StoredSpan {
                trace_id: text(&span["traceID"]),
                span_id: text(&span["spanID"]),
                name: text(&span["operationName"]),
                parent,
                service: text(&processes[process]["serviceName"]),
                tags,
            });
        }
    }
    out
}
