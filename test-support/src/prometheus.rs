//! A real Prometheus on loopback, scraping what a test tells it to.
//!
//! The rollout controller's Prometheus metric source is tested against this, never against a
//! fake HTTP API: PromQL semantics (rate windows, staleness, histogram_quantile) are the point.
//! The binary is Debian's `prometheus` package (`MESH_PROMETHEUS_BIN` overrides the path).
//! [`Exporter`] is a scrape target serving exposition text the test sets.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{HarnessError, Result, certs::write, ports::free_port, process::ChildGuard};

/// Path of the Prometheus binary; defaults to `prometheus` on `PATH`.
pub const ENV_PROMETHEUS_BIN: &str = "MESH_PROMETHEUS_BIN";

/// A scrape job.
#[derive(Clone, Debug)]
pub struct ScrapeJob {
    name: String,
    targets: Vec<SocketAddr>,
    metrics_path: String,
    interval: Duration,
}

impl ScrapeJob {
    /// A job `name` scraping `/metrics` on `targets` every second.
    pub fn new(name: &str, targets: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            name: name.to_string(),
            targets: targets.into_iter().collect(),
            metrics_path: "/metrics".to_string(),
            interval: Duration::from_secs(1),
        }
    }

    /// Scrapes `path` instead of `/metrics`.
    pub fn metrics_path(mut self, path: &str) -> Self {
        self.metrics_path = path.to_string();
        self
    }

    /// Scrapes every `interval` (whole milliseconds).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    fn render(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(|t| format!("\"{t}\"")).collect();
        format!(
            "  - job_name: \"{}\"\n    scrape_interval: {}ms\n    scrape_timeout: {}ms\n    metrics_path: \"{}\"\n    static_configs:\n      - targets: [{}]\n",
            self.name,
            self.interval.as_millis(),
            self.interval.as_millis(),
            self.metrics_path,
            targets.join(", ")
        )
    }
}

/// A builder for a Prometheus server.
#[derive(Clone, Debug, Default)]
pub struct PrometheusBuilder {
    jobs: Vec<ScrapeJob>,
    raw_jobs: Vec<String>,
}

impl PrometheusBuilder {
    /// Adds a scrape job.
    pub fn scrape(mut self, job: ScrapeJob) -> Self {
        self.jobs.push(job);
        self
    }

    /// Adds a scrape job written out in full: one `scrape_configs` list item (`- job_name: ...`),
    /// as the docs show it (for instance `mesh_core::prometheus::embedded_scrape_config`).
    pub fn scrape_config(mut self, yaml: &str) -> Self {
        self.raw_jobs.push(yaml.to_string());
        self
    }

    /// The configuration file Prometheus will be given.
    pub fn config_yaml(&self) -> String {
        let mut out = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for job in &self.jobs {
            out.push_str(&job.render());
        }
        for job in &self.raw_jobs {
            for line in job.lines() {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Starts Prometheus and waits until `/-/ready` answers.
    pub async fn start(self) -> Result<Prometheus> {
        let bin = std::env::var_os(ENV_PROMETHEUS_BIN)
            .map_or_else(|| PathBuf::from("prometheus"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("mesh-prometheus-")
            .tempdir()
            .map_err(HarnessError::io("creating Prometheus's directory"))?;
        let config = write(dir.path(), "prometheus.yml", &self.config_yaml())?;
        let port = free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ]);
        let child = ChildGuard::spawn("prometheus", cmd, &dir.path().join("prometheus.log"))
            .map_err(|e| match e {
                HarnessError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    HarnessError::Missing {
                        program: bin.display().to_string(),
                        hint: format!(
                            "install Debian's prometheus package (scripts/test does) or set {ENV_PROMETHEUS_BIN}"
                        ),
                    }
                }
                other => other,
            })?;
        let url = format!("http://127.0.0.1:{port}");
        let mut prometheus = Prometheus {
            child,
            url,
            _dir: dir,
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }
}

/// A running Prometheus server.
#[derive(Debug)]
pub struct Prometheus {
    child: ChildGuard,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// A builder; add scrape jobs, then `start()`.
    pub fn builder() -> PrometheusBuilder {
        PrometheusBuilder::default()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let http = crate::http_client();
        let ready = format!("{}/-/ready", self.url);
        self.child
            .wait_ready(async || match http.get(&ready).send().await {
                Ok(rsp) if rsp.status().is_success() => Ok(()),
                Ok(rsp) => Err(format!("/-/ready answered {}", rsp.status())),
                Err(e) => Err(e.to_string()),
            })
            .await
    }

    /// The base URL, e.g. `http://127.0.0.1:39111`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A PromQL client for this server.
    pub fn client(&self) -> prometheus_http_query::Client {
        prometheus_http_query::Client::from(crate::http_client(), &self.url)
            .unwrap_or_else(|e| unreachable!("{} is a valid URL: {e}", self.url))
    }

    /// The Prometheus process ID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// A scrape target serving exposition text the test sets, on every path, over HTTP/1.1 and
/// h2c: a stand-in for a proxy's admin server when a test needs to know the counts exactly.
///
/// ```no_run
/// # async fn f() -> mesh_test_support::Result<()> {
/// use mesh_test_support::prometheus::Exporter;
/// let exporter = Exporter::start("requests_total 0\n").await?;
/// exporter.set("requests_total 10\n");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Exporter {
    addr: SocketAddr,
    state: Arc<ExporterState>,
}

#[derive(Debug)]
struct ExporterState {
    text: Mutex<String>,
    scrapes: AtomicUsize,
}

impl Exporter {
    /// Starts serving `text` on 127.0.0.1:0, until the runtime stops.
    pub async fn start(text: impl Into<String>) -> Result<Self> {
        let state = Arc::new(ExporterState {
            text: Mutex::new(text.into()),
            scrapes: AtomicUsize::new(0),
        });
        let serving = Arc::clone(&state);
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let addr = crate::apps::serve_connections(loopback, "a metrics exporter", move |io| {
            let state = Arc::clone(&serving);
            async move {
                let svc = hyper::service::service_fn(move |_req| {
                    state.scrapes.fetch_add(1, Ordering::SeqCst);
                    let text = state
                        .text
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            }
        })
        .await?;
        Ok(Self { addr, state })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `text` from now on.
    pub fn set(&self, text: impl Into<String>) {
        *self
            .state
            .text
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = text.into();
    }

    /// Requests answered so far.
    pub fn scrapes(&self) -> usize {
        self.state.scrapes.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_scrape_jobs() {
        let cfg = Prometheus::builder()
            .scrape(
                ScrapeJob::new("proxies", ["127.0.0.1:4191".parse().unwrap()])
                    .interval(Duration::from_millis(500)),
            )
            .config_yaml();
        let doc: serde_yaml::Value = serde_yaml::from_str(&cfg).unwrap();
        let job = &doc["scrape_configs"][0];
        assert_eq!(job["job_name"], "proxies");
        assert_eq!(job["scrape_interval"], "500ms");
        assert_eq!(job["static_configs"][0]["targets"][0], "127.0.0.1:4191");
    }
}
