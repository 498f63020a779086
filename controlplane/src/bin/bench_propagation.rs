//! `mesh-bench-propagation`: how long an HTTPRoute weight change takes to reach every watching
//! proxy. It starts the real `mesh-controlplane` (the binary next to this one) on loopback
//! ports, opens N route watch streams over HTTP/2 and mTLS (100 streams per connection, as
//! proxies on a node would share few connections; the client certificate is issued by the
//! control plane's CA from its state directory, as a proxy's would be), and for each round applies a new weight through the
//! resource API and times until the last watcher has read it. It prints a table, writes
//! `<out-dir>/propagation.json` and updates the "Control plane: propagation" section of the
//! benchmarks page.
//!
//! It measures each runtime shape of the control plane (`MESH_CONTROLPLANE_CORES` unset and `1`,
//! or only the one the caller set), each with a fresh control plane. After each row it reads the
//! control plane's resident memory (`VmRSS`) with every watcher of that row still connected, and
//! the CPU time both processes used per change.
//!
//! Usage: `mesh-bench-propagation <out-dir> <benchmarks.md> [rounds] [watcher counts]`, the
//! counts comma-separated (default `10,100,1000,10000`); see `scripts/bench-propagation`.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark binary reports to its user and gives up on setup failures"
)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

use anyhow::{Context, bail};
use mesh_controlplane::identity::Ca;
use mesh_core::{
    Listening,
    proxy_api::{CertifyRequest, Update, WATCH_ROUTES_PATH},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use serde_json::json;
use tokio::sync::Notify;

const WATCHER_COUNTS: [usize; 4] = [10, 100, 1_000, 10_000];
const STREAMS_PER_CONNECTION: usize = 100;
const SECTION: &str = "## Control plane: propagation";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the control plane with its state in `state_dir`, with `MESH_CONTROLPLANE_CORES` set to
/// `cores` (removed when `None`).
fn start_control_plane(
    state_dir: &Path,
    cores: Option<&str>,
) -> anyhow::Result<(KillOnDrop, SocketAddr, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("locating the binary directory")?
        .join("mesh-controlplane");
    let mut command = Command::new(&bin);
    match cores {
        Some(n) => command.env(mesh_controlplane::config::ENV_CORES, n),
        None => command.env_remove(mesh_controlplane::config::ENV_CORES),
    };
    let mut child = command
        .env("MESH_CONTROLPLANE_STATE_DIR", state_dir)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("capturing stdout")?;
    let guard = KillOnDrop(child);
    let (mut api, mut proxy) = (None, None);
    for line in BufReader::new(stdout).lines() {
        if let Ok(l) = line?.parse::<Listening>() {
            match l.name.as_str() {
                "api" => api = Some(l.addr),
                "proxy" => proxy = Some(l.addr),
                _ => {}
            }
        }
        if let (Some(a), Some(p)) = (api, proxy) {
            return Ok((guard, a, p));
        }
    }
    bail!("mesh-controlplane exited before announcing its listeners")
}

/// TLS for the watchers: the control plane's roots, and a client certificate for a watcher
/// identity signed by its CA (read from the state directory the control plane created).
fn watcher_tls(state_dir: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let ca = Ca::load_or_create(state_dir, "cluster.local", Duration::from_secs(3600))?;
    let key = rcgen::KeyPair::generate()?;
    let csr_pem = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let issued = ca.certify(
        &CertifyRequest {
            token: ca.token().to_string(),
            csr_pem,
            identity: "spiffe://cluster.local/ns/bench/sa/watcher".into(),
        },
        SystemTime::now(),
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(issued.trust_roots_pem.as_bytes()) {
        roots.add(root?)?;
    }
    let chain = CertificateDer::pem_slice_iter(issued.certificate_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The part of a [`mesh_core::proxy_api::RouteTable`] a watcher checks: its rules' backend
/// weights (other fields are skipped unread).
#[derive(serde::Deserialize)]
struct Weights {
    rules: Vec<RuleWeights>,
}

#[derive(serde::Deserialize)]
struct RuleWeights {
    backends: Vec<BackendWeight>,
}

#[derive(serde::Deserialize)]
struct BackendWeight {
    weight: u32,
}

fn route(canary_weight: u32) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "web", "kind": "Service", "group": "", "port": 80}],
            "rules": [{"backendRefs": [
                {"name": "web-primary", "port": 80, "weight": 100 - canary_weight},
                {"name": "web-canary", "port": 80, "weight": canary_weight}
            ]}]
        }
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = (p / 100.0 * sorted.len() as f64).ceil().max(1.0);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "rank is between 1 and len"
    )]
    let i = (rank as usize).min(sorted.len()) - 1;
    sorted[i]
}

struct Row {
    watchers: usize,
    rounds: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// The control plane's VmRSS with this row's watchers connected, in MiB.
    rss_mb: f64,
    /// CPU the control plane used per weight change, in ms.
    cp_cpu_ms: f64,
    /// CPU the benchmark (the watchers and the applying client) used per weight change, in ms.
    watchers_cpu_ms: f64,
    /// The control plane's runtime shape.
    runtime: String,
}

/// How a row names the control plane's runtime shape.
fn runtime_name(cores: Option<&str>) -> String {
    match cores {
        None => "one worker per core".to_string(),
        Some("1") => "one thread".to_string(),
        Some(n) => format!("{n} workers"),
    }
}

/// A process's resident set size in MiB, from `/proc/<pid>/status` (NaN where unreadable).
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The machine's load average (1, 5 and 15 minutes), as `/proc/loadavg` writes it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The `Authorization` header carrying `token`.
fn token_header(
    token: &mesh_controlplane::access::ApiToken,
) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, token.authorization()?);
    Ok(headers)
}

/// What the watchers have read this round: the weight they wait for, how many have yet to read
/// it, and when the last one did.
struct Arrivals {
    target: AtomicU32,
    remaining: AtomicUsize,
    last: std::sync::Mutex<Option<Instant>>,
    all_in: Notify,
}

impl Arrivals {
    /// Starts a round: `watchers` streams are to read `weight`.
    fn expect(&self, weight: u32, watchers: usize) {
        *self.last.lock().unwrap() = None;
        self.remaining.store(watchers, Ordering::SeqCst);
        self.target.store(weight, Ordering::SeqCst);
    }

    /// A stream read `weight`; the round's last arrival notes the time.
    fn read(&self, weight: u32) {
        if weight != self.target.load(Ordering::SeqCst) {
            return;
        }
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.last.lock().unwrap() = Some(Instant::now());
            self.all_in.notify_one();
        }
    }

    /// Waits until every stream has read the round's weight; returns when the last one did.
    async fn wait(&self) -> anyhow::Result<Instant> {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(at) = *self.last.lock().unwrap() {
                    return at;
                }
                self.all_in.notified().await;
            }
        })
        .await
        .with_context(|| {
            format!(
                "{} watchers never read weight {}",
                self.remaining.load(Ordering::SeqCst),
                self.target.load(Ordering::SeqCst)
            )
        })
    }
}

/// The canary's weight in one route watch line (`u32::MAX` when the route has no second backend).
fn canary_weight(line: &[u8]) -> anyhow::Result<u32> {
    let update: Update<Weights> = serde_json::from_slice(line)?;
    Ok(update
        .value
        .and_then(|t| {
            t.rules
                .first()
                .and_then(|r| r.backends.get(1))
                .map(|b| b.weight)
        })
        .unwrap_or(u32::MAX))
}

/// One watch stream: reads its lines and reports each new weight to `arrivals`. Only the weights
/// are decoded: the watchers share the control plane's cores here, and a proxy's full decode
/// happens on its own.
async fn watch(body: Incoming, arrivals: Arc<Arrivals>) -> anyhow::Result<()> {
    let mut body = body;
    let mut buf = Vec::new();
    let mut last = u32::MAX;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let weight = canary_weight(&buf[..=pos])?;
            buf.drain(..=pos);
            if weight != last {
                last = weight;
                arrivals.read(weight);
            }
        }
    }
    Ok(())
}

/// One HTTP/2 connection over mTLS carrying `streams` route watch streams, all driven by this
/// one task (as one proxy process serves all its watches), until they end.
async fn watch_connection(
    proxy: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    streams: usize,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let tls = tls
        .connect(ServerName::IpAddress(proxy.ip().into()), tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await?;
    tokio::spawn(conn);
    let uri = format!("https://{proxy}{WATCH_ROUTES_PATH}?authority=web.default:80");
    let mut watches = FuturesUnordered::new();
    for _ in 0..streams {
        send.ready().await?;
        let response = send.send_request(hyper::Request::get(&uri).body(Empty::new())?);
        let arrivals = Arc::clone(&arrivals);
        watches.push(async move {
            let response = response.await?;
            anyhow::ensure!(
                response.status().is_success(),
                "watch answered {}",
                response.status()
            );
            watch(response.into_body(), arrivals).await
        });
    }
    while let Some(done) = watches.next().await {
        done?;
    }
    Ok(())
}

/// CPU time (user plus system) a process has used, from `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Milliseconds of CPU per round from two tick readings (the kernel's clock ticks are 100 Hz).
fn cpu_ms_per_round(before: Option<u64>, after: Option<u64>, rounds: usize) -> f64 {
    match (before, after) {
        #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
        (Some(b), Some(a)) if rounds > 0 => (a.saturating_sub(b) as f64) * 10.0 / rounds as f64,
        _ => f64::NAN,
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument named there"
)]
async fn measure(
    cp_pid: u32,
    state_dir: &Path,
    api: SocketAddr,
    proxy: SocketAddr,
    tls: &rustls::ClientConfig,
    watchers: usize,
    rounds: usize,
    first_weight: u32,
) -> anyhow::Result<Row> {
    // The resource API admits the holder of its token, which the control plane wrote to its
    // state directory (the parent of the CA's files the watchers read).
    let token = mesh_controlplane::access::ApiToken::load_or_create(state_dir)?;
    let apply_client = reqwest::Client::builder()
        .default_headers(token_header(&token)?)
        .build()?;
    let apply_url = format!("http://{api}/apply?namespace=default");
    let arrivals = Arc::new(Arrivals {
        target: AtomicU32::new(u32::MAX),
        remaining: AtomicUsize::new(usize::MAX),
        last: std::sync::Mutex::new(None),
        all_in: Notify::new(),
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()));
    let mut connections = Vec::new();
    let mut left = watchers;
    while left > 0 {
        let streams = left.min(STREAMS_PER_CONNECTION);
        left -= streams;
        connections.push(tokio::spawn(watch_connection(
            proxy,
            connector.clone(),
            streams,
            Arc::clone(&arrivals),
        )));
    }

    // Settle: every watcher connected and holding the starting weight.
    arrivals.expect(first_weight, watchers);
    apply_client
        .post(&apply_url)
        .json(&route(first_weight))
        .send()
        .await?
        .error_for_status()?;
    let settled = tokio::select! {
        at = arrivals.wait() => at.map(|_| ()),
        // A connection that ends before the round is a failed watcher, not a slow one.
        (ended, ..) = futures_util::future::select_all(connections.iter_mut()) => match ended {
            Ok(Err(e)) => Err(e.context("a watch connection failed")),
            _ => Err(anyhow::anyhow!("a watch connection ended")),
        },
    };
    settled?;

    let cp = cp_pid.to_string();
    let mut samples = Vec::with_capacity(rounds);
    let mut weight = first_weight;
    let mut cpu_before = (None, None);
    for round in 0..rounds + 2 {
        // The first two rounds warm connections and allocations up.
        if round == 2 {
            cpu_before = (cpu_ticks(&cp), cpu_ticks("self"));
        }
        weight = if weight >= 99 { 1 } else { weight + 1 };
        arrivals.expect(weight, watchers);
        let start = Instant::now();
        apply_client
            .post(&apply_url)
            .json(&route(weight))
            .send()
            .await?
            .error_for_status()?;
        let last = arrivals.wait().await?;
        if round >= 2 {
            samples.push(last.duration_since(start).as_secs_f64() * 1000.0);
        }
    }
    let cp_cpu_ms = cpu_ms_per_round(cpu_before.0, cpu_ticks(&cp), rounds);
    let watchers_cpu_ms = cpu_ms_per_round(cpu_before.1, cpu_ticks("self"), rounds);
    let rss_mb = rss_mb(cp_pid);
    for c in connections {
        c.abort();
    }
    samples.sort_by(f64::total_cmp);
    Ok(Row {
        watchers,
        rounds,
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        max: samples.last().copied().unwrap_or(f64::NAN),
        rss_mb,
        cp_cpu_ms,
        watchers_cpu_ms,
        runtime: String::new(),
    })
}

fn update_section(doc: &Path, body: &str) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(doc).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{SECTION}\n\n{body}");
    let updated = match existing.find(SECTION) {
        Some(start) => {
            let after = start + SECTION.len();
            let end = existing[after..]
                .find("\n## ")
                .map_or(existing.len(), |i| after + i + 1);
            // A blank line before the next section, as Markdown is written here.
            let gap = if end < existing.len() { "\n" } else { "" };
            format!("{}{section}{gap}{}", &existing[..start], &existing[end..])
        }
        None => format!(
            "{}\n{section}",
            existing.trim_end_matches('\n').to_string() + "\n"
        ),
    };
    std::fs::write(doc, updated).with_context(|| format!("writing {}", doc.display()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    mesh_core::crypto::install_provider();
    let mut args = std::env::args().skip(1);
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "target/bench".into()));
    let doc = PathBuf::from(args.next().unwrap_or_else(|| "docs/benchmarks.md".into()));
    let rounds: usize = args
        .next()
        .map_or(Ok(50), |r| r.parse())
        .context("rounds")?;
    let counts: Vec<usize> = match args.next() {
        None => WATCHER_COUNTS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
            .collect::<Option<_>>()
            .with_context(|| {
                format!(
                    "watcher counts: expected positive numbers separated by commas, got {list:?}"
                )
            })?,
    };
    // The runtime shapes to measure: the one the caller chose, or the default (one worker per
    // core) and one thread.
    let shapes: Vec<Option<String>> = match std::env::var(mesh_controlplane::config::ENV_CORES) {
        Ok(cores) if !cores.trim().is_empty() => vec![Some(cores.trim().to_string())],
        _ => vec![None, Some("1".to_string())],
    };
    std::fs::create_dir_all(&out_dir)?;
    let state_path = out_dir.join(format!("propagation-state-{}", std::process::id()));
    let load_before = load_average();
    let started = Instant::now();

    let mut rows = Vec::new();
    for shape in &shapes {
        // The store lives on the same disk as the output, not a tmpfs, so commits pay a real
        // fsync.
        let state = state_path.clone();
        let _ = std::fs::remove_dir_all(&state);
        let (cp, api, proxy) = start_control_plane(&state, shape.as_deref())?;
        let cp_pid = cp.0.id();
        let tls = watcher_tls(&state)?;
        for (i, watchers) in counts.iter().copied().enumerate() {
            let first = u32::try_from(10 + i * 20).unwrap_or(10);
            let mut row =
                measure(cp_pid, &state, api, proxy, &tls, watchers, rounds, first).await?;
            row.runtime = runtime_name(shape.as_deref());
            eprintln!(
                "{:>6} watchers, {}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, control plane RSS {:.1} MiB, \
                 CPU per change: control plane {:.1} ms, watchers {:.1} ms",
                row.watchers,
                row.runtime,
                row.p50,
                row.p99,
                row.max,
                row.rss_mb,
                row.cp_cpu_ms,
                row.watchers_cpu_ms
            );
            rows.push(row);
        }
        drop(cp);
        let _ = std::fs::remove_dir_all(&state);
    }
    let load_after = load_average();
    let elapsed = started.elapsed().as_secs();

    let mut table = String::from(
        "| control plane runtime | watchers | rounds | p50 (ms) | p99 (ms) | max (ms) | control plane RSS (MiB) | control plane CPU per change (ms) | watchers' CPU per change (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
            r.runtime,
            r.watchers,
            r.rounds,
            r.p50,
            r.p99,
            r.max,
            r.rss_mb,
            r.cp_cpu_ms,
            r.watchers_cpu_ms
        ));
    }
    println!("{table}");

    // Written by hand to keep the documented key order.
    let entries: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "  {{\"runtime\": \"{}\", \"watchers\": {}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}, \"controlplane_rss_mb\": {:.1}, \"controlplane_cpu_ms_per_change\": {:.1}, \"watchers_cpu_ms_per_change\": {:.1}}}",
                r.runtime, r.watchers, r.p50, r.p99, r.max, r.rss_mb, r.cp_cpu_ms, r.watchers_cpu_ms
            )
        })
        .collect();
    let json = format!("[\n{}\n]\n", entries.join(",\n"));
    let json_path = out_dir.join("propagation.json");
    serde_json::from_str::<serde_json::Value>(&json).context("encoding the results")?;
    std::fs::write(&json_path, json)?;

    let profile = if cfg!(debug_assertions) {
        "dev profile (dependencies at opt-level 1)"
    } else {
        "release profile"
    };
    let body = format!(
        "Time from an HTTPRoute weight change applied through the resource API (`POST /apply`, \
         acknowledged after a durable commit) until every watching proxy stream has read the new \
         route table. Watchers are real HTTP/2 route watch streams over mTLS (each connection \
         presents a client certificate from the mesh CA), {STREAMS_PER_CONNECTION} per connection, each connection's streams driven by one task as a proxy \
         drives its own, in one single-threaded benchmark process on the same machine as the control plane; each \
         round changes the weight once and waits for all of them. Each runtime shape runs a fresh \
         control plane: `MESH_CONTROLPLANE_CORES` unset (one worker per core the process may use, \
         here 2) and `1` (one thread). The control plane's RSS is read with \
         the row's watchers connected; CPU per change is each process's user and system time over the \
         measured rounds, divided by them (the benchmark's includes its applying client). \
         Target: p99 <= 50 ms at 10,000 watchers.\n\n{table}\n\
         Measured on a 2-core machine shared by the benchmark and the control plane, with the \
         {profile}, {rounds} rounds per row; load average {load_before} before, {load_after} \
         after; {elapsed} s. Reproduce with `MESH_BENCH_PROFILE=release scripts/bench-propagation` \
         (writes `target/bench/propagation.json`; set `MESH_CONTROLPLANE_CORES` to measure one \
         shape).\n"
    );
    update_section(&doc, &body)?;
    eprintln!(
        "wrote {} and updated {}",
        json_path.display(),
        doc.display()
    );
    Ok(())
}
