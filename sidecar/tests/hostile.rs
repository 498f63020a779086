//! `mesh-proxy` (the real binary) under hostile clients on real sockets, on both listeners:
//! thousands of half-sent HTTP/1.1 requests (slowloris), an HTTP/2 CONTINUATION flood and
//! HTTP/2 rapid reset. Each test reads the proxy's RSS and open descriptors from /proc and
//! checks them against the bound its limits state, while a well-behaved client keeps getting
//! answers (its p99 is printed, never asserted: speed belongs in benchmarks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_sidecar::limits::{CONNECTION_OVERHEAD, Limits};
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{Sidecar, SpawnedProxy, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVICE: &str = "web.default:80";

fn routes(app: SocketAddr) -> String {
    format!(
        "routes:\n  - parent: {SERVICE}\n    rules:\n      - backends: [{{service: {SERVICE}, weight: 1}}]\nendpoints:\n  - service: {SERVICE}\n    endpoints: [{{addr: \"{app}\"}}]\n"
    )
}

/// A proxy fronting an app, with both listeners, and the limits set by `env`.
async fn proxy_with(env: &[(&str, &str)]) -> (SpawnedProxy, mesh_test_support::apps::App) {
    let v1 = app("v1").await.unwrap();
    let mut builder = proxy()
        .app(v1.addr())
        .service(SERVICE)
        .outbound(routes(v1.addr()));
    for (k, v) in env {
        builder = builder.env(k, *v);
    }
    let p = builder.spawn().unwrap();
    (p, v1)
}

/// The proxy's resident memory, in bytes, from /proc.
fn rss(p: &mut SpawnedProxy) -> usize {
    let pid = p.process().child().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The proxy's open file descriptors, from /proc.
fn fds(p: &mut SpawnedProxy) -> usize {
    let pid = p.process().child().pid();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Well-behaved requests through both listeners; returns the p99 of each, and panics on any
/// failure.
async fn well_behaved(p: &SpawnedProxy, n: usize) -> (Duration, Duration) {
    let inbound = p.addr("inbound");
    let _ = mesh_test_support::http_client();
    let direct = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let via = p.client_with_timeout(Duration::from_secs(30));
    let mut lat_in = Vec::new();
    let mut lat_out = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let rsp = direct
            .get(format!("http://{inbound}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        rsp.bytes().await.unwrap();
        lat_in.push(start.elapsed());
        let start = Instant::now();
        let rsp = via.get(format!("http://{SERVICE}/")).send().await.unwrap();
        assert_eq!(rsp.status(), 200);
        rsp.bytes().await.unwrap();
        lat_out.push(start.elapsed());
    }
    (p99(lat_in), p99(lat_out))
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[(v.len() * 99).div_ceil(100).saturating_sub(1)]
}

/// Connections that send a request line and then one header line a second, never finishing;
/// `closed` counts those the proxy has closed, and `early` those among them it closed (or
/// refused) sooner than `deadline` after the connect. The proxy's header-read deadline starts
/// at its accept, which comes after the client's connect, so a connection the proxy holds as it
/// should is never early, however slowly a loaded machine runs the test.
struct Slowloris {
    deadline: Duration,
    started: usize,
    closed: Arc<AtomicUsize>,
    early: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
}

impl Slowloris {
    fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            started: 0,
            closed: Arc::new(AtomicUsize::new(0)),
            early: Arc::new(AtomicUsize::new(0)),
            tasks: tokio::task::JoinSet::new(),
        }
    }

    fn start(&mut self, addr: SocketAddr, n: usize) {
        self.started += n;
        for _ in 0..n {
            let (closed, early) = (self.closed.clone(), self.early.clone());
            let deadline = self.deadline;
            self.tasks.spawn(async move {
                let Ok(mut tcp) = TcpStream::connect(addr).await else {
                    closed.fetch_add(1, Ordering::SeqCst);
                    early.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let connected = tokio::time::Instant::now();
                let head = format!("GET http://{SERVICE}/ HTTP/1.1\r\nHost: {SERVICE}\r\n");
                let mut ok = tcp.write_all(head.as_bytes()).await.is_ok();
                let mut buf = [0u8; 1024];
                let mut i = 0u64;
                while ok {
                    tokio::select! {
                        // Anything back (a 408, EOF, a reset) means the proxy gave up on us.
                        _ = tcp.read(&mut buf) => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            i += 1;
                            ok = tcp.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await.is_ok();
                        }
                    }
                }
                if connected.elapsed() < deadline {
                    early.fetch_add(1, Ordering::SeqCst);
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    fn early(&self) -> usize {
        self.early.load(Ordering::SeqCst)
    }
}

/// The bound the limits state for `conns` HTTP/1.1 connections.
fn http1_bound(limits: &Limits, conns: usize) -> usize {
    conns * limits.http1_connection_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_both_listeners_is_bounded_and_cut_off() {
    let cap = 2500;
    let slow = 2000;
    let limits = Limits {
        header_read_timeout: Duration::from_secs(8),
        max_connections: cap,
        http1_max_buffer: 8192,
        ..Limits::default()
    };
    let (mut p, _v1) = proxy_with(&[
        ("MESH_PROXY_HEADER_READ_TIMEOUT", "8s"),
        ("MESH_PROXY_MAX_CONNECTIONS", "2500"),
        ("MESH_PROXY_HTTP1_MAX_BUFFER", "8192"),
    ])
    .await;
    // Warm: the pools and metric series exist before the baseline.
    well_behaved(&p, 5).await;
    let (rss0, fds0) = (rss(&mut p), fds(&mut p));

    let admin = p.addr("admin");
    let open = |listener: &'static str| async move {
        mesh_test_support::metric_sum(
            admin,
            "listener_open_connections",
            &[&format!("listener=\"{listener}\"")],
        )
        .await
    };
    // The attack opens its connections in steps the listen backlog holds
    // (`proxy::LISTEN_BACKLOG`), each taken by the proxy before the next: a burst past the
    // backlog loses SYNs, and those clients arrive a retransmit or more later whatever the
    // proxy does. Each step waits until every connection made is open at the proxy or already
    // cut off (on a slow machine the first ones can reach their deadline before the last).
    const STEP: usize = mesh_sidecar::proxy::LISTEN_BACKLOG as usize / 2;
    let mut attack = Slowloris::new(limits.header_read_timeout);
    let attack_began = Instant::now();
    for listener in ["inbound", "outbound"] {
        let mut left = slow;
        while left > 0 {
            let step = left.min(STEP);
            attack.start(p.addr(listener), step);
            left -= step;
            assert_eventually!(
                open("inbound").await + open("outbound").await + attack.closed() as f64
                    >= attack.started as f64,
                "{} connections made; open at the proxy: inbound {}, outbound {}; {} cut off",
                attack.started,
                open("inbound").await,
                open("outbound").await,
                attack.closed()
            );
        }
    }

    let (p99_in, p99_out) = well_behaved(&p, 100).await;
    let (rss1, fds1) = (rss(&mut p), fds(&mut p));
    let bound = rss0 + 2 * http1_bound(&limits, slow);
    println!(
        "slowloris: {slow} per listener; RSS {} -> {} KiB ({} B per connection; bound {} KiB); \
         fds {fds0} -> {fds1}; well-behaved p99 inbound {p99_in:?}, outbound {p99_out:?}; \
         {:?} since the first connect",
        rss0 / 1024,
        rss1 / 1024,
        rss1.saturating_sub(rss0) / (2 * slow),
        bound / 1024,
        attack_began.elapsed(),
    );
    assert!(rss1 < bound, "RSS {rss1} over the stated bound {bound}");
    assert!(
        fds1 <= 2 * cap + fds0,
        "{fds1} descriptors for a cap of {cap}"
    );
    // The attack is held, not refused: nothing is cut off before its header-read deadline.
    // (On a slow machine the first connections may already have reached it; those count as
    // cut off in time, not early.)
    assert!(
        attack.early() < slow / 10,
        "{} of {} closed before the header-read deadline",
        attack.early(),
        attack.closed()
    );

    // More than the cap: each listener stops accepting and says so. Each gets what takes it
    // 500 past its cap, counting what it holds now.
    for listener in ["inbound", "outbound"] {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a gauge of open connections: a small whole number"
        )]
        let held = open(listener).await as usize;
        attack.start(p.addr(listener), (cap + 500).saturating_sub(held).max(500));
    }
    let reached = |listener: &'static str| async move {
        mesh_test_support::metric_sum(
            admin,
            "listener_connection_limit_reached_total",
            &[&format!("listener=\"{listener}\"")],
        )
        .await
    };
    assert_eventually!(reached("inbound").await >= 1.0);
    assert_eventually!(reached("outbound").await >= 1.0);
    let fds2 = fds(&mut p);
    assert!(
        fds2 <= 2 * cap + fds0,
        "{fds2} descriptors for a cap of {cap}"
    );
    assert!(
        p.log().contains("at its connection limit"),
        "no log line when the cap bit:\n{}",
        p.log_tail(20)
    );
    // The header-read deadline frees the slots: a well-behaved client is answered again, and
    // every half-sent request is eventually cut off.
    let (p99_in, p99_out) = well_behaved(&p, 20).await;
    println!("at the cap: well-behaved p99 inbound {p99_in:?}, outbound {p99_out:?}");
    // The connections past the cap wait in the listen backlog until the first ones are cut
    // off, then get their own header-read deadline: two deadlines back to back, for 6,000
    // sockets on two cores. That takes more than the usual patience on a loaded machine.
    let deadline = tokio::time::Instant::now() + 3 * mesh_test_support::eventually::patience();
    while attack.closed() != attack.started {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} cut off",
            attack.closed(),
            attack.started
        );
        tokio::time::sleep(mesh_test_support::eventually::POLL_INTERVAL).await;
    }
    assert_eventually!(
        open("inbound").await + open("outbound").await == 0.0,
        "still open: inbound {}, outbound {}",
        open("inbound").await,
        open("outbound").await
    );
    attack.tasks.shutdown().await;
}

/// Frames of HTTP/2, by hand.
mod h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// A GET of `/` for `authority`, HPACK-encoded without the dynamic table.
    pub fn request_block(authority: &str) -> Vec<u8> {
        // :method GET, :scheme http, :path / (static table), :authority literal.
        let mut b = vec![
            0x82,
            0x86,
            0x84,
            0x01,
            u8::try_from(authority.len()).unwrap(),
        ];
        b.extend(authority.as_bytes());
        b
    }

    /// `n` bytes or so of literal header fields.
    pub fn padding_block(n: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(n + 128);
        let mut i = 0u32;
        while b.len() < n {
            let name = format!("x-flood-{i}");
            b.push(0x00);
            b.push(u8::try_from(name.len()).unwrap());
            b.extend(name.as_bytes());
            b.push(100);
            b.extend([b'a'; 100]);
            i += 1;
        }
        b
    }
}

/// Opens an h2c connection (preface and empty SETTINGS) and drains what the proxy sends on a
/// task of its own; the returned flag is set once the proxy has closed the connection.
async fn h2c(addr: SocketAddr) -> (tokio::net::tcp::OwnedWriteHalf, Arc<AtomicUsize>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let closed = Arc::new(AtomicUsize::new(0));
    let flag = closed.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
        flag.store(1, Ordering::SeqCst);
    });
    write.write_all(h2::PREFACE).await.unwrap();
    write
        .write_all(&h2::frame(h2::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    (write, closed)
}

/// How much a client sent before the proxy closed its connection; `None` if it never did
/// within `most` bytes.
async fn continuation_flood(addr: SocketAddr, most: usize) -> Option<usize> {
    let (mut w, closed) = h2c(addr).await;
    let block = h2::request_block(SERVICE);
    let mut sent = 0;
    if w.write_all(&h2::frame(h2::HEADERS, 0, 1, &block))
        .await
        .is_err()
    {
        return Some(sent);
    }
    let fragment = h2::frame(h2::CONTINUATION, 0, 1, &h2::padding_block(16 * 1024 - 200));
    while sent < most {
        if closed.load(Ordering::SeqCst) == 1 || w.write_all(&fragment).await.is_err() {
            return Some(sent);
        }
        sent += fragment.len();
    }
    None
}

/// How many streams a client opened and reset before the proxy closed its connection; `None`
/// if it never did within `most` streams.
async fn rapid_reset(addr: SocketAddr, most: u32) -> Option<u32> {
    let (mut w, closed) = h2c(addr).await;
    let block = h2::request_block(SERVICE);
    for i in 0..most {
        let stream = 2 * i + 1;
        let mut pair = h2::frame(
            h2::HEADERS,
            h2::END_HEADERS | h2::END_STREAM,
            stream,
            &block,
        );
        // CANCEL.
        pair.extend(h2::frame(h2::RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        if closed.load(Ordering::SeqCst) == 1 || w.write_all(&pair).await.is_err() {
            return Some(i);
        }
    }
    // The proxy may still be reading what was sent; give it until the patience ends.
    let patience = mesh_test_support::eventually::patience();
    let start = Instant::now();
    while start.elapsed() < patience {
        if closed.load(Ordering::SeqCst) == 1 {
            return Some(most);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

const FLOODERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_is_cut_off_on_both_listeners() {
    let (mut p, _v1) = proxy_with(&[]).await;
    let limits = Limits::default();
    well_behaved(&p, 5).await;
    let (rss0, fds0) = (rss(&mut p), fds(&mut p));
    // Far more than a header list may hold.
    let most = 64 * 1024 * 1024;
    let mut flood = tokio::task::JoinSet::new();
    for listener in ["inbound", "outbound"] {
        for _ in 0..FLOODERS {
            flood.spawn(continuation_flood(p.addr(listener), most));
        }
    }
    let (p99_in, p99_out) = well_behaved(&p, 100).await;
    let (rss1, fds1) = (rss(&mut p), fds(&mut p));
    let mut largest = 0;
    while let Some(sent) = flood.join_next().await {
        let sent = sent
            .unwrap()
            .expect("the proxy kept reading a CONTINUATION flood");
        largest = largest.max(sent);
    }
    let rss2 = rss(&mut p);
    // Each flooding connection may hold one header list being assembled, and its bookkeeping.
    let per_connection = limits.h2_max_header_list_size as usize + 64 * 1024 + CONNECTION_OVERHEAD;
    let bound = rss0 + 2 * FLOODERS * per_connection;
    println!(
        "CONTINUATION flood: {FLOODERS} connections per listener, each cut off after at most \
         {largest} bytes written (socket buffers included); RSS {} -> {} -> {} KiB (bound {} KiB); fds {fds0} -> {fds1}; \
         well-behaved p99 inbound {p99_in:?}, outbound {p99_out:?}",
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024,
        bound / 1024
    );
    // What a client manages to write includes what the kernel's socket buffers took before
    // the proxy's GOAWAY arrived; a proxy assembling the header list without a bound would have
    // read all of `most` (the `expect` above), and its RSS would show it.
    assert!(rss1.max(rss2) < bound, "RSS over the stated bound {bound}");
    assert!(fds1 <= fds0 + 2 * FLOODERS + 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_is_cut_off_on_both_listeners() {
    let (mut p, v1) = proxy_with(&[]).await;
    let limits = Limits::default();
    well_behaved(&p, 5).await;
    let hits0 = v1.hits();
    let (rss0, fds0) = (rss(&mut p), fds(&mut p));
    let most = 100_000;
    let mut flood = tokio::task::JoinSet::new();
    for listener in ["inbound", "outbound"] {
        for _ in 0..FLOODERS {
            flood.spawn(rapid_reset(p.addr(listener), most));
        }
    }
    let (p99_in, p99_out) = well_behaved(&p, 100).await;
    let (rss1, fds1) = (rss(&mut p), fds(&mut p));
    let mut streams = Vec::new();
    while let Some(n) = flood.join_next().await {
        streams.push(n.unwrap().expect("the proxy kept serving a rapid reset"));
    }
    let rss2 = rss(&mut p);
    let sent: u64 = streams.iter().map(|&n| u64::from(n)).sum();
    let app_saw = v1.hits().saturating_sub(hits0 + 200);
    let bound = rss0 + 2 * FLOODERS * limits.h2_connection_bytes();
    println!(
        "rapid reset: {FLOODERS} connections per listener, {sent} streams reset in all, at most \
         {} on one connection before it was closed; the app saw {app_saw}; RSS {} -> {} -> {} \
         KiB; fds {fds0} -> {fds1}; well-behaved p99 inbound {p99_in:?}, outbound {p99_out:?}",
        streams.iter().max().unwrap(),
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024,
    );
    assert!(
        streams.iter().all(|&n| n < most),
        "a connection reset {most} streams and stayed open"
    );
    assert!(rss1.max(rss2) < bound, "RSS over the stated bound {bound}");
    assert!(fds1 <= fds0 + 2 * FLOODERS + 16);
}
