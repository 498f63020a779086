//! `mesh-demo-app`: a podinfo-like workload that answers with its version and fails, slows
//! down or calls a downstream service on demand.
//!
//! It is the workload behind `mesh demo` and `mesh up`: the supervisor starts it with `PORT`
//! and `HTTP_PROXY` pointing at its sidecar's outbound listener, so every call to
//! `--downstream` crosses the mesh. Injected faults apply to `/` only; `/healthz` and
//! `/version` always answer, so probes stay truthful while traffic is degraded.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use serde_json::json;
use tokio::{net::TcpListener, time::Instant};

use crate::{
    HEADER_DOWNSTREAM_VERSION, HEADER_VERSION,
    faults::{Burst, ErrorSchedule},
    latency::{Latency, LatencyError},
};

/// Port to listen on.
pub const ENV_PORT: &str = "PORT";
/// Address to listen on.
pub const ENV_LISTEN_HOST: &str = "DEMO_LISTEN_HOST";
/// Version the app reports.
pub const ENV_VERSION: &str = "DEMO_VERSION";
/// Fraction of requests to `/` answered 500.
pub const ENV_ERROR_RATE: &str = "DEMO_ERROR_RATE";
/// Median added latency in milliseconds.
pub const ENV_LATENCY_MS: &str = "DEMO_LATENCY_MS";
/// 99th percentile added latency in milliseconds.
pub const ENV_LATENCY_P99_MS: &str = "DEMO_LATENCY_P99_MS";
/// Period of error bursts.
pub const ENV_BURST_EVERY: &str = "DEMO_BURST_EVERY";
/// Length of each error burst.
pub const ENV_BURST_FOR: &str = "DEMO_BURST_FOR";
/// Error rate during bursts.
pub const ENV_BURST_ERROR_RATE: &str = "DEMO_BURST_ERROR_RATE";
/// URL called for every request to `/`.
pub const ENV_DOWNSTREAM: &str = "DEMO_DOWNSTREAM";
/// Timeout of downstream calls.
pub const ENV_DOWNSTREAM_TIMEOUT: &str = "DEMO_DOWNSTREAM_TIMEOUT";

/// How long in-flight requests get to finish after SIGTERM before the app exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Command-line flags of `mesh-demo-app`; each can also come from its environment variable.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-demo-app",
    about = "A demo workload that answers with its version and fails or slows down on demand"
)]
pub struct AppArgs {
    /// Port to listen on (0 lets the kernel pick; the bound address is announced on stdout).
    #[arg(long, env = ENV_PORT, default_value_t = 9898)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = ENV_LISTEN_HOST, default_value = "127.0.0.1")]
    pub listen_host: IpAddr,
    /// Version reported in responses and the `x-demo-version` header.
    #[arg(long, env = ENV_VERSION, default_value = "v1")]
    pub version: String,
    /// Fraction of requests to `/` answered 500, from 0.0 to 1.0.
    #[arg(long, env = ENV_ERROR_RATE, default_value_t = 0.0, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub error_rate: f64,
    /// Median latency added to requests to `/`, in milliseconds.
    #[arg(long, env = ENV_LATENCY_MS, default_value_t = 0.0, value_parser = parse_millis, allow_negative_numbers = true)]
    pub latency_ms: f64,
    /// 99th percentile of the added latency, in milliseconds [default: the median].
    #[arg(long, env = ENV_LATENCY_P99_MS, value_parser = parse_millis, allow_negative_numbers = true)]
    pub latency_p99_ms: Option<f64>,
    /// Period of error bursts, measured from start (e.g. `20s`).
    #[arg(long, env = ENV_BURST_EVERY, value_parser = parse_duration, requires = "burst_for")]
    pub burst_every: Option<Duration>,
    /// Length of each error burst, at the start of every period (e.g. `5s`).
    #[arg(long, env = ENV_BURST_FOR, value_parser = parse_duration, requires = "burst_every")]
    pub burst_for: Option<Duration>,
    /// Fraction of requests answered 500 during a burst.
    #[arg(long, env = ENV_BURST_ERROR_RATE, default_value_t = 1.0, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub burst_error_rate: f64,
    /// URL to call for every request to `/`, through `HTTP_PROXY` (e.g. `http://backend.default:9898/`).
    #[arg(long, env = ENV_DOWNSTREAM)]
    pub downstream: Option<reqwest::Url>,
    /// Timeout of each downstream call.
    #[arg(long, env = ENV_DOWNSTREAM_TIMEOUT, default_value = "5s", value_parser = parse_positive_duration)]
    pub downstream_timeout: Duration,
}

/// A flag combination that no single flag's parser can reject.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    /// The latency flags do not describe a distribution.
    #[error(
        "invalid value for '--latency-ms'/'--latency-p99-ms' ({ENV_LATENCY_MS}/{ENV_LATENCY_P99_MS}): {0}"
    )]
    Latency(#[from] LatencyError),
    /// A burst period of zero.
    #[error("invalid value for '--burst-every' ({ENV_BURST_EVERY}): must be longer than zero")]
    ZeroBurstPeriod,
    /// A burst longer than its period.
    #[error(
        "invalid value for '--burst-for' ({ENV_BURST_FOR}): {length:?} is longer than --burst-every {every:?}"
    )]
    BurstLongerThanPeriod {
        /// The burst length.
        length: Duration,
        /// The period.
        every: Duration,
    },
}

/// The validated configuration of the app.
#[derive(Clone, Debug, PartialEq)]
pub struct AppConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The version reported.
    pub version: String,
    /// When requests fail.
    pub errors: ErrorSchedule,
    /// How long requests take.
    pub latency: Latency,
    /// The service called for each request to `/`.
    pub downstream: Option<reqwest::Url>,
    /// Timeout of downstream calls.
    pub downstream_timeout: Duration,
}

impl TryFrom<AppArgs> for AppConfig {
    type Error = ArgsError;

    fn try_from(args: AppArgs) -> Result<Self, ArgsError> {
        let latency = Latency::new(
            args.latency_ms,
            args.latency_p99_ms.unwrap_or(args.latency_ms),
        )?;
        let burst = match (args.burst_every, args.burst_for) {
            (Some(every), _) if every.is_zero() => return Err(ArgsError::ZeroBurstPeriod),
            (Some(every), Some(length)) if length > every => {
                return Err(ArgsError::BurstLongerThanPeriod { length, every });
            }
            (Some(every), Some(length)) => Some(Burst {
                every,
                length,
                error_rate: args.burst_error_rate,
            }),
            // clap's `requires` makes the flags come in pairs.
            _ => None,
        };
        Ok(Self {
            listen: SocketAddr::new(args.listen_host, args.port),
            version: args.version,
            errors: ErrorSchedule {
                error_rate: args.error_rate,
                burst,
            },
            latency,
            downstream: args.downstream,
            downstream_timeout: args.downstream_timeout,
        })
    }
}

/// Parses a fraction in `0.0..=1.0`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a fraction from 0.0 to 1.0".to_string()),
    }
}

/// Parses a non-negative number of milliseconds.
pub fn parse_millis(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("expected a non-negative number of milliseconds".to_string()),
    }
}

/// Parses a duration such as `500ms`, `20s` or `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, mesh_core::duration::DurationError> {
    mesh_core::duration::parse(s)
}

/// Parses a duration longer than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Why a downstream call did not produce a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    /// No response: connect error, timeout, reset (retryable).
    #[error("downstream {url} failed: {source}")]
    Transport {
        /// The URL called.
        url: reqwest::Url,
        /// The client error.
        source: reqwest::Error,
    },
    /// The downstream answered with a non-2xx status.
    #[error("downstream {url} answered {status}")]
    Status {
        /// The URL called.
        url: reqwest::Url,
        /// Its status.
        status: StatusCode,
        /// Its `x-demo-version`, if any.
        version: Option<HeaderValue>,
    },
}

/// A successful downstream answer.
#[derive(Debug)]
struct DownstreamAnswer {
    version: Option<HeaderValue>,
    json: serde_json::Value,
}

/// The request handler's shared state.
#[derive(Debug)]
struct State {
    config: AppConfig,
    version: HeaderValue,
    start: Instant,
    client: reqwest::Client,
}

/// The app with its listener bound, ready to serve.
#[derive(Debug)]
pub struct DemoApp {
    listener: TcpListener,
    state: Arc<State>,
}

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The version cannot be sent as a header value.
    #[error("version {0:?} is not a valid header value")]
    Version(String),
    /// The HTTP client for downstream calls could not be built.
    #[error("building the downstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl DemoApp {
    /// Binds the listen address and builds the downstream client.
    pub async fn bind(config: AppConfig) -> Result<Self, StartError> {
        let version = HeaderValue::from_str(&config.version)
            .map_err(|_| StartError::Version(config.version.clone()))?;
        // The client keeps reqwest's default proxy handling, which reads HTTP_PROXY: that is how
        // downstream calls reach the sidecar. Never call `no_proxy()` here.
        let client = crate::http_client_builder()
            .timeout(config.downstream_timeout)
            .build()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        if let Some(url) = &config.downstream {
            let proxy = std::env::var("HTTP_PROXY").or_else(|_| std::env::var("http_proxy"));
            tracing::info!(%url, proxy = proxy.as_deref().unwrap_or("none"), "calling downstream");
        }
        Ok(Self {
            listener,
            state: Arc::new(State {
                config,
                version,
                start: Instant::now(),
                client,
            }),
        })
    }

    /// The address actually bound (the port is known here when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish for up to
    /// [`SHUTDOWN_GRACE`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let io = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((io, _)) => io,
                    Err(error) => {
                        // Usually file-descriptor exhaustion; back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let state = self.state.clone();
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tracing::info!("shutting down");
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(SHUTDOWN_GRACE) => {
                tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}");
            }
        }
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let version = &state.config.version;
    let rsp = match req.uri().path() {
        "/healthz" => respond(&state, StatusCode::OK, &json!({"status": "ok"})),
        "/version" => respond(&state, StatusCode::OK, &json!({"version": version})),
        "/" => root(&state, req.headers()).await,
        _ => respond(
            &state,
            StatusCode::NOT_FOUND,
            &json!({"version": version, "error": "not found"}),
        ),
    };
    Ok(rsp)
}

/// Trace context headers a downstream call carries on from the request being served, as an
/// app in a mesh must for its requests to join one trace (docs/tracing.md).
const TRACE_HEADERS: [&str; 8] = mesh_core::trace::CONTEXT_HEADERS;

/// `/`: delay, maybe fail, maybe call downstream (carrying the request's trace context on).
async fn root(state: &State, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    let version = &state.config.version;
    let mut rng = fastrand::Rng::new();
    let delay = state.config.latency.sample(&mut rng);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if state.config.errors.fails(state.start.elapsed(), &mut rng) {
        return respond(
            state,
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"version": version, "error": "injected failure", "origin": "app"}),
        );
    }
    let Some(url) = &state.config.downstream else {
        return respond(
            state,
            StatusCode::OK,
            &json!({"version": version, "downstream": null}),
        );
    };
    let trace: Vec<(&str, &http::HeaderValue)> = TRACE_HEADERS
        .iter()
        .filter_map(|name| headers.get(*name).map(|v| (*name, v)))
        .collect();
    match call_downstream(&state.client, url, &trace).await {
        Ok(answer) => {
            let body = json!({
                "version": version,
                "downstream": {
                    "url": url.as_str(),
                    "version": answer.version.as_ref().and_then(|v| v.to_str().ok()),
                    "body": answer.json,
                },
            });
            with_downstream_version(respond(state, StatusCode::OK, &body), answer.version)
        }
        Err(error) => {
            let downstream_version = match &error {
                DownstreamError::Status { version, .. } => version.clone(),
                DownstreamError::Transport { .. } => None,
            };
            tracing::debug!(%error, "downstream call failed");
            let body = json!({
                "version": version,
                "error": error.to_string(),
                "origin": "downstream",
            });
            with_downstream_version(
                respond(state, StatusCode::BAD_GATEWAY, &body),
                downstream_version,
            )
        }
    }
}

async fn call_downstream(
    client: &reqwest::Client,
    url: &reqwest::Url,
    trace: &[(&str, &http::HeaderValue)],
) -> Result<DownstreamAnswer, DownstreamError> {
    let transport = |source| DownstreamError::Transport {
        url: url.clone(),
        source,
    };
    let mut request = client.get(url.clone());
    for (name, value) in trace {
        request = request.header(*name, (*value).clone());
    }
    let rsp = request.send().await.map_err(transport)?;
    let version = rsp.headers().get(HEADER_VERSION).cloned();
    let status = rsp.status();
    if !status.is_success() {
        return Err(DownstreamError::Status {
            url: url.clone(),
            status,
            version,
        });
    }
    let body = rsp.bytes().await.map_err(transport)?;
    // Relay JSON as JSON (so chains nest), anything else as a string.
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok(DownstreamAnswer { version, json })
}

fn respond(state: &State, status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(HEADER_VERSION, state.version.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

fn with_downstream_version(
    mut rsp: Response<Full<Bytes>>,
    version: Option<HeaderValue>,
) -> Response<Full<Bytes>> {
    if let Some(v) = version {
        rsp.headers_mut().insert(HEADER_DOWNSTREAM_VERSION, v);
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Result<AppArgs, clap::Error> {
        AppArgs::try_parse_from(std::iter::once("mesh-demo-app").chain(flags.iter().copied()))
    }

    fn config(flags: &[&str]) -> Result<AppConfig, ArgsError> {
        AppConfig::try_from(args(flags).unwrap())
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.version, "v1");
        assert_eq!(c.errors.error_rate, 0.0);
        assert_eq!(c.errors.burst, None);
        assert_eq!(c.latency, Latency::None);
        assert_eq!(c.downstream_timeout, Duration::from_secs(5));
    }

    #[test]
    fn p99_defaults_to_the_median() {
        let c = config(&["--latency-ms", "20"]).unwrap();
        assert!(matches!(c.latency, Latency::LogNormal { sigma, .. } if sigma == 0.0));
    }

    #[test]
    fn bursts() {
        let c = config(&["--burst-every", "20s", "--burst-for", "5s"]).unwrap();
        assert_eq!(
            c.errors.burst,
            Some(Burst {
                every: Duration::from_secs(20),
                length: Duration::from_secs(5),
                error_rate: 1.0
            })
        );
        assert_eq!(
            config(&["--burst-every", "5s", "--burst-for", "6s"]),
            Err(ArgsError::BurstLongerThanPeriod {
                length: Duration::from_secs(6),
                every: Duration::from_secs(5)
            })
        );
        assert_eq!(
            config(&["--burst-every", "0s", "--burst-for", "0s"]),
            Err(ArgsError::ZeroBurstPeriod)
        );
        assert!(
            args(&["--burst-every", "20s"]).is_err(),
            "needs --burst-for"
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flags, name) in [
            (&["--error-rate", "1.5"][..], "--error-rate"),
            (&["--burst-error-rate", "-1"][..], "--burst-error-rate"),
            (&["--latency-ms", "fast"][..], "--latency-ms"),
            (
                &["--burst-every", "soon", "--burst-for", "1s"][..],
                "--burst-every",
            ),
            (&["--downstream-timeout", "0s"][..], "--downstream-timeout"),
        ] {
            let e = args(flags).unwrap_err();
            assert!(e.to_string().contains(name), "{flags:?}: {e}");
        }
        let e = config(&["--latency-ms", "100", "--latency-p99-ms", "50"]).unwrap_err();
        assert!(e.to_string().contains("--latency-p99-ms"), "{e}");
    }
}
