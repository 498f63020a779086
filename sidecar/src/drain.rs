//! Graceful shutdown of the proxying listeners. When the process is told to stop, each listener
//! stops accepting, asks its open connections to finish (HTTP/1.1 closes after the response in
//! flight, HTTP/2 sends GOAWAY), and returns once they have; the binary bounds the whole drain
//! with [`DRAIN_TIMEOUT`]. Requests in flight therefore complete instead of being cut off when a
//! workload is replaced.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::http::Body;
use crate::limits::{Activity, ConnectionCap, Limits, Tracked};

/// Longest wait for requests in flight once shutdown begins; slower ones are cut off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The verified SPIFFE ID of the peer proxy that sent a request, in the request's extensions;
/// absent on plaintext connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity(pub String);

/// The address of the client whose connection carried a request, in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Where a redirected connection was going (`SO_ORIGINAL_DST`), in the extensions of the
/// requests it carries; absent on connections made to the listener itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst(pub std::net::SocketAddr);

/// Longest wait for a TLS handshake on an accepted connection.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 and h2c on `listener`, answering each request with `handle`, until `drain`
/// fires; then stops accepting and returns once the open connections have finished. `what`
/// names the listener in logs. `limits` bound what each connection may hold, and `cap` how many
/// are open at once (see [`crate::limits`]).
///
/// With `tls` set, connections that open with a TLS ClientHello are
/// terminated with it first (peeked, so plaintext HTTP/1.1 and h2c keep working on the same
/// port); requests on them carry the client's verified [`ClientIdentity`]. With `opaque` set,
/// connections that are neither TLS nor HTTP are forwarded to the app as opaque TCP (see
/// [`crate::opaque`]), as are redirected connections to its opaque ports (never sniffed), and
/// mTLS connections whose ALPN is [`crate::tls::ALPN_OPAQUE`] (a peer proxy carrying opaque TCP).
#[allow(clippy::too_many_arguments)]
pub async fn serve_detect<H, F>(
    listener: TcpListener,
    what: &'static str,
    mut drain: Watch,
    tls: Option<Arc<rustls::ServerConfig>>,
    opaque: Option<Arc<crate::opaque::Opaque>>,
    limits: Limits,
    cap: Arc<ConnectionCap>,
    handle: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut connections = JoinSet::new();
    // A slot is taken before accepting: at the cap, connections wait in the kernel's queue.
    let mut slot = None;
    loop {
        tokio::select! {
            admitted = cap.admit(), if slot.is_none() => match admitted {
                Some(admitted) => slot = Some(admitted),
                None => break,
            },
            accepted = listener.accept(), if slot.is_some() => {
                let (io, peer) = accepted?;
                let admitted = slot.take().map(crate::limits::Admitted::accepted);
                let _ = io.set_nodelay(true);
                let handle = handle.clone();
                let mut drain = drain.clone();
                let acceptor = acceptor.clone();
                let opaque = opaque.clone();
                connections.spawn(async move {
                    // Held for as long as the connection is open.
                    let _admitted = admitted;
                    use crate::opaque::{Protocol, detect, forward};
                    // A redirected connection to a port declared opaque is never sniffed: its
                    // protocol may be server-first. Peer proxies connect to the listener itself
                    // (not redirected), so their mTLS is always recognised.
                    let orig = crate::orig_dst::original_dst(&io);
                    let opaque_port = opaque.as_ref().is_some_and(|o| {
                        orig.is_some_and(|dst| o.opaque_ports.contains(dst.port()))
                    });
                    // Requests learn the port their connection was redirected from, so a
                    // listener in front of several app ports sends each to its own.
                    let handle = move |mut req: Request<Incoming>| {
                        if let Some(dst) = orig {
                            req.extensions_mut().insert(OriginalDst(dst));
                        }
                        handle(req)
                    };
                    // A client that connected but has sent nothing yet is simply dropped by a
                    // drain.
                    let protocol = if opaque_port {
                        Protocol::Opaque
                    } else if acceptor.is_some() || opaque.is_some() {
                        let timeout = opaque.as_ref().map(|o| o.detect_timeout);
                        tokio::select! {
                            p = detect(&io, timeout) => p,
                            () = drain.signaled() => return,
                        }
                    } else {
                        Protocol::Http
                    };
                    // A Server that declares the port opaque means plaintext is never HTTP.
                    let protocol = match &opaque {
                        Some(o) if protocol == Protocol::Http && o.declared_opaque() => {
                            Protocol::Opaque
                        }
                        _ => protocol,
                    };
                    if let (Protocol::Opaque, Some(opaque)) = (protocol, &opaque) {
                        if let Err(error) = forward(io, peer, None, opaque).await {
                            tracing::debug!(%peer, %error, "{what} opaque connection ended with an error");
                        }
                        return;
                    }
                    let tls = protocol == Protocol::Tls;
                    let result = match acceptor {
                        Some(acceptor) if tls => {
                            let accept = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io));
                            match accept.await {
                                Ok(Ok(stream)) => {
                                    let (_, conn) = stream.get_ref();
                                    let identity = crate::tls::client_identity(conn);
                                    let group = conn.negotiated_key_exchange_group().map(|g| g.name());
                                    tracing::debug!(%peer, ?group, ?identity, "{what} TLS handshake");
                                    let carries_opaque =
                                        conn.alpn_protocol() == Some(crate::tls::ALPN_OPAQUE);
                                    if carries_opaque {
                                        // A peer proxy carrying an opaque connection: byte for
                                        // byte to the app, authorized by the peer's identity.
                                        let Some(opaque) = &opaque else { return };
                                        let result =
                                            forward(stream, peer, identity.as_deref(), opaque).await;
                                        if let Err(error) = result {
                                            tracing::debug!(%peer, %error, "{what} opaque connection ended with an error");
                                        }
                                        return;
                                    }
                                    connection(stream, handle, peer, identity.map(ClientIdentity), drain, &limits).await
                                }
                                Ok(Err(error)) => {
                                    tracing::info!(%peer, %error, "{what} TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::info!(%peer, "{what} TLS handshake timed out");
                                    return;
                                }
                            }
                        }
                        _ => connection(io, handle, peer, None, drain, &limits).await,
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

/// Serves HTTP/1.1 or HTTP/2 on one connection until it ends or the drain asks it to finish.
/// A client that sends no request head within the header-read deadline is cut off; one that
/// sends no byte for the idle timeout is asked to finish (HTTP/1.1 closes after the response
/// in flight, HTTP/2 sends GOAWAY).
pub(crate) async fn connection<I, H, F>(
    io: I,
    handle: H,
    peer: std::net::SocketAddr,
    identity: Option<ClientIdentity>,
    drain: Watch,
    limits: &Limits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handle: Handler = Arc::new(move |req| Box::pin(handle(req)));
    serve(Box::new(io), handle, peer, identity, drain, limits).await
}

/// A connection's bytes, whatever carries them (TCP, or TLS over TCP). Every connection is
/// served as this one type, with a [`Handler`], so hyper's servers are compiled once for the
/// proxy rather than once per kind of connection and listener: their code is most of a proxy's
/// resident memory (see docs/benchmarks.md).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What answers a connection's requests.
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

async fn serve(
    io: Box<dyn Io>,
    handle: Handler,
    peer: std::net::SocketAddr,
    identity: Option<ClientIdentity>,
    mut drain: Watch,
    limits: &Limits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let activity = Activity::new();
    let io = Tracked::new(io, activity.clone());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    let counted = in_flight.clone();
    let saw = seen.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        // Set here, by the connection, so nothing a peer sends can claim an identity.
        match &identity {
            Some(id) => req.extensions_mut().insert(id.clone()),
            None => req.extensions_mut().remove::<ClientIdentity>(),
        };
        req.extensions_mut().insert(PeerAddr(peer));
        crate::tunnel::refuse_h2c_upgrade(&mut req);
        let head = req.method() == http::Method::HEAD;
        saw.store(true, Ordering::Relaxed);
        let in_flight = InFlight::new(&counted);
        let response = handle(req);
        async move {
            let _in_flight = in_flight;
            let mut response = response.await;
            // A response to HEAD has no content. HTTP/1.1 drops it on its own; HTTP/2 would send
            // it as DATA, which the client takes for a protocol error, so it goes here, for
            // answers from the far side and from the proxy alike.
            if head {
                *response.body_mut() = crate::http::empty();
            }
            Ok::<_, Infallible>(response)
        }
    });
    let builder = limits.builder();
    // Upgrades (WebSocket, CONNECT) hand the connection over once answered; see crate::tunnel.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // hyper's own deadline starts once it reads a request head; this one covers what comes
    // before (telling HTTP/1.1 from HTTP/2, the HTTP/2 preface and settings).
    let first_request = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(first_request);
    let mut answered = false;
    loop {
        let idle_at = activity.last() + limits.idle_timeout;
        tokio::select! {
            result = conn.as_mut() => return result,
            () = &mut first_request, if !answered => {
                if !seen.load(Ordering::Relaxed) {
                    return Err(Box::new(Timeout("no request within the header-read deadline")));
                }
                answered = true;
            }
            () = tokio::time::sleep_until(idle_at.into()) => {
                if activity.last().elapsed() >= limits.idle_timeout {
                    break;
                }
            }
            () = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                return conn.await;
            }
        }
    }
    tracing::debug!(%peer, "closing an idle connection");
    conn.as_mut().graceful_shutdown();
    // A request still waiting for its answer finishes (or the drain ends it); a connection with
    // nothing in flight that does not close on its own (a half-sent request) is cut off.
    if in_flight.load(Ordering::Relaxed) > 0 {
        tokio::select! {
            result = conn.as_mut() => result,
            () = drain.signaled() => {
                match tokio::time::timeout(DRAIN_TIMEOUT, conn).await {
                    Ok(result) => result,
                    Err(_) => Err(Box::new(Timeout("drain deadline"))),
                }
            }
        }
    } else {
        match tokio::time::timeout(limits.header_read_timeout, conn).await {
            Ok(result) => result,
            Err(_) => Err(Box::new(Timeout("idle connection did not close"))),
        }
    }
}

/// A connection the proxy cut off for taking too long.
#[derive(Debug, thiserror::Error)]
#[error("connection closed: {0}")]
struct Timeout(&'static str);

/// Counts a request from its head to its response head.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
