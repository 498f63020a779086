//! The mesh's test harness: it starts real components on 127.0.0.1 so integration tests exercise
//! the product the way users run it. [`kube::KubeApiServer`] brings up etcd and kube-apiserver
//! with generated certificates and our CRDs installed; [`prometheus::Prometheus`] runs a real
//! Prometheus against a scrape config; [`process::MeshProcess`] starts one of our binaries on
//! port 0 and reads back the addresses it bound; [`proxies::proxy`] starts a proxy in-process
//! (or as the binary), [`apps::app`] an upstream app, and [`mesh::control_plane`] and
//! [`mesh::mesh_pair`] a control plane and proxies on it; [`netns::PodNetwork`] a pod and a
//! cluster in network namespaces, for the path the injector's iptables rules redirect; [`proxy_api`] has mTLS clients of the
//! control plane's proxy API and a stand-in for it; [`assert_eventually!`] waits for a condition
//! with a patience taken from `MESH_TEST_PATIENCE`. Everything started is killed when its handle
//! drops, so a failing test leaves no processes behind.

pub mod apps;
pub mod certs;
pub mod eventually;
pub mod fixtures;
pub mod jaeger;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod proxies;
pub mod proxy_api;

pub use eventually::patience;

#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

/// Why a component could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A program the harness needs is not installed or built.
    #[error("{program} not found: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// How to get it.
        hint: String,
    },
    /// The program started but did not become ready in time.
    #[error(
        "{what} did not become ready within {waited:?}: {detail}\n--- last lines of {log} ---\n{tail}"
    )]
    NotReady {
        /// The component.
        what: String,
        /// How long the harness waited.
        waited: std::time::Duration,
        /// The last error seen while waiting.
        detail: String,
        /// The component's log file.
        log: String,
        /// Its last lines.
        tail: String,
    },
    /// I/O around starting a component failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command the harness ran failed or ran out of time.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// How it failed, with its output.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("generating test certificates: {0}")]
    Certs(#[from] rcgen::Error),
    /// A TLS configuration or client could not be built.
    #[error("configuring TLS: {0}")]
    Tls(String),
    /// An in-process proxy could not start or stop.
    #[error("in-process proxy: {0}")]
    Proxy(String),
    /// A Kubernetes API call made by the harness failed.
    #[error("{context}: {source}")]
    Kube {
        /// What the harness was doing.
        context: String,
        /// The underlying error, boxed because kube's error is large and would bloat every
        /// harness `Result`.
        source: Box<::kube::Error>,
    },
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(::kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube {
            context,
            source: Box::new(source),
        }
    }
}

/// Result of harness operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// How many of `n` clients connecting to `addr` at once finish their TCP handshake before the
/// clients' first SYN retransmit (1 s): as many as the listener's kernel queue holds when the
/// listener accepts none meanwhile (129 for tokio's own bind, which asks for 128).
///
/// # Panics
/// When a client task panics.
#[allow(
    clippy::expect_used,
    reason = "a test helper fails its test by panicking"
)]
pub async fn handshakes_held(addr: std::net::SocketAddr, n: usize) -> usize {
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..n {
        clients.spawn(async move {
            // Well under the first SYN retransmit: a dropped SYN cannot finish in time.
            tokio::time::timeout(
                std::time::Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            )
            .await
        });
    }
    // The connections stay open until every client is done, so none frees a slot.
    let mut held = Vec::with_capacity(n);
    while let Some(done) = clients.join_next().await {
        if let Ok(Ok(tcp)) = done.expect("a client task") {
            held.push(tcp);
        }
    }
    held.len()
}

/// The sum of the samples of metric family `name` (a full series name such as
/// `request_total`) whose labels contain every one of `labels` (`key="value"` strings), scraped
/// from `http://<admin>/metrics`; 0 when none matches.
///
/// # Panics
/// When the scrape fails.
pub async fn metric_sum(admin: impl std::fmt::Display, name: &str, labels: &[&str]) -> f64 {
    metric_sum_in(&metrics_text(admin).await, name, labels)
}

/// [`metric_sum`] over an already scraped `/metrics` text.
pub fn metric_sum_in(text: &str, name: &str, labels: &[&str]) -> f64 {
    let series = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&series) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The text of `http://<admin>/metrics`.
///
/// # Panics
/// When the scrape fails.
#[allow(
    clippy::expect_used,
    reason = "a test helper fails its test by panicking"
)]
pub fn metrics_text(admin: impl std::fmt::Display) -> impl Future<Output = String> + Send {
    let scrape = http_client().get(format!("http://{admin}/metrics")).send();
    async move {
        scrape
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("scraping /metrics")
            .text()
            .await
            .expect("reading /metrics")
    }
}

/// An HTTP client for talking to components. The workspace builds rustls with the aws-lc-rs
/// provider only (one crypto stack), so the process-wide provider is installed before the
/// first client.
pub fn http_client() -> reqwest::Client {
    mesh_core::crypto::install_provider();
    reqwest::Client::builder().build().unwrap_or_else(|e| {
        unreachable!("a default reqwest client always builds with a provider: {e}")
    })
}
