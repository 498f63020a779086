//! Graceful shutdown of the proxying listeners. When the process is told to stop, each listener
//! stops accepting, asks its open connections to finish (HTTP/1.1 closes after the response in
//! flight, HTTP/2 sends GOAWAY), and returns once they have; the binary bounds the whole drain
//! with [`DRAIN_TIMEOUT`]. Requests in flight therefore complete instead of being cut off when a
//! workload is replaced.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Longest wait for requests in flight once shutdown begins; slower ones are cut off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Body of responses on the proxying listeners.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Starts a drain; dropping it starts one too, so listeners never outlive their owner.
#[derive(Debug)]
pub struct Signal(watch::Sender<bool>);

/// Tells listeners that a drain has started.
#[derive(Clone, Debug)]
pub struct Watch(watch::Receiver<bool>);

/// A linked signal and watch.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal(tx), Watch(rx))
}

impl Signal {
    /// Starts the drain.
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

impl Watch {
    /// Resolves once the drain has started.
    pub async fn signaled(&mut self) {
        // An error means the signal was dropped, which is a drain as well.
        let _ = self.0.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

/// Serves HTTP/1.1 and h2c on `listener`, answering each request with `handle`, until `drain`
/// fires; then stops accepting and returns once the open connections have finished. `what`
/// names the listener in logs.
pub async fn serve<H, F>(
    listener: TcpListener,
    what: &'static str,
    mut drain: Watch,
    handle: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (io, peer) = accepted?;
                let _ = io.set_nodelay(true);
                let handle = handle.clone();
                let mut drain = drain.clone();
                connections.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let response = handle(req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        result = conn.as_mut() => result,
                        () = drain.signaled() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "{what} connection ended with an error");
                    }
                });
            }
            // Reaps finished connections so the set only holds open ones.
            Some(_) = connections.join_next() => {}
            () = drain.signaled() => break,
        }
    }
    // Closing the socket refuses new connections at once rather than leaving them queued.
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "{what} listener draining its connections"
    );
    while connections.join_next().await.is_some() {}
    Ok(())
}
