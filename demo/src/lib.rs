//! Demo workloads for `mesh demo` and `mesh up`: the traffic the mesh carries when there is no
//! real application. `mesh-demo-app` is a podinfo-like service that answers with its version
//! and can be told to fail, slow down (log-normal latency), fail in periodic bursts, or call a
//! downstream service; `mesh-loadgen` offers open-loop load at a constant rate and reports
//! status, version and latency counts per interval. Both sit outside the mesh proper: the
//! embedded supervisor starts them with `PORT` and `HTTP_PROXY` pointing at their sidecar's
//! outbound listener, so every call between them crosses the data plane the way a real
//! workload's would. The pure parts (latency sampler, error schedule, statistics) are plain
//! functions; the async shells only feed them.

pub mod app;
pub mod faults;
pub mod latency;
pub mod loadgen;
pub mod stats;

/// The version of the app that answered.
pub const HEADER_VERSION: &str = "x-demo-version";
/// The version of the app's downstream, relayed on chained requests.
pub const HEADER_DOWNSTREAM_VERSION: &str = "x-demo-downstream-version";

/// A reqwest client builder with the process-wide TLS provider installed.
///
/// The workspace builds reqwest without a built-in crypto provider (one crypto stack: rustls
/// with aws-lc-rs), and reqwest refuses to build a client until one is installed. Proxy settings
/// are left at reqwest's default, which honours `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY`.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    mesh_core::crypto::install_provider();
    reqwest::Client::builder()
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled, so a
/// supervisor's SIGTERM that arrives right after the start-up announcement is never lost to the
/// default action (immediate termination). Must be called inside a Tokio runtime.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}
