//! `mesh stat`, `top`, `routes`, `edges`, `tap` and `dashboard`: what the mesh is doing, with
//! Linkerd's columns. They ask the embedded control plane's observe API (`/v1/observe/...`,
//! behind the resource API's token), which answers from its metrics window and relays taps from
//! the proxies; every command prints a table by default and JSON with `-o json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_observe::{EdgeRow, Golden, RouteRow, StatRow};

use crate::backend::Conn;
use crate::observe_api::Api;

/// How the answer is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// A table (or one line per request for tap).
    #[default]
    Table,
    /// JSON (one object per line for tap).
    Json,
}

/// Flags every observe command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    pub conn: Conn,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Flags of the commands that read the metrics window.
#[derive(clap::Args, Debug, Clone)]
pub struct Window {
    /// How far back to look (`30s`, `1m`, `5m`; the window keeps 15 minutes).
    #[arg(short = 't', long = "time-window", default_value = "1m")]
    pub window: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Print again every 2 seconds, until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Ask this Prometheus (PromQL over the proxies' series, as in a cluster) instead of the
    /// embedded control plane's window.
    #[arg(long, env = "MESH_PROMETHEUS_URL", value_name = "URL")]
    pub prometheus: Option<String>,
    /// In a cluster (the current kubeconfig context): the metrics come from --prometheus, and
    /// `stat workloads` lists the cluster's Deployments with their meshed and total pods from
    /// the Kubernetes API, as `linkerd viz stat` does.
    #[arg(long)]
    pub kube: bool,
    #[command(flatten)]
    pub k8s: crate::k8s::KubeArgs,
}

impl Window {
    /// Whether the flags select a cluster.
    fn is_cluster(&self) -> bool {
        self.kube || self.k8s.kubeconfig.is_some() || self.k8s.context.is_some()
    }

    /// In a cluster the metrics are Prometheus's: an error naming the flag when it is missing.
    fn require_prometheus_in_cluster(&self) -> anyhow::Result<()> {
        if self.is_cluster() && self.prometheus.is_none() {
            anyhow::bail!(
                "in a cluster the metrics come from Prometheus: give --prometheus URL (or set \
                 MESH_PROMETHEUS_URL), e.g. after `kubectl port-forward -n <ns> svc/prometheus \
                 9090`"
            );
        }
        Ok(())
    }

    /// The question for a [`mesh_observe::MetricsView`].
    fn query(&self, conn: &Conn, name: Option<String>) -> anyhow::Result<mesh_observe::Query> {
        let secs = mesh_core::duration::parse(&self.window)
            .map_err(|e| anyhow::anyhow!("--time-window {}: {e}", self.window))?
            .as_secs()
            .max(1);
        Ok(mesh_observe::Query {
            namespace: (!self.all_namespaces).then(|| conn.namespace.clone()),
            name,
            window_secs: secs,
        })
    }
}

/// The observe commands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Golden metrics of workloads, services or routes: meshed, success rate, RPS, latency
    /// percentiles, TCP connections.
    Stat {
        /// workloads (deploy), services (svc) or routes (rt).
        resource: String,
        /// One of them; all when left out.
        name: Option<String>,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        common: Common,
    },
    /// Each route of a service, with every weighted backend's share and success rate.
    Routes {
        /// The service (its name, or an authority `name.namespace:port`).
        service: String,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        common: Common,
    },
    /// Who calls whom, with the mTLS identity on each side.
    Edges {
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        common: Common,
    },
    /// Live requests through a workload's proxies: method, path, status, latency, identities,
    /// and the backend the split chose. Never bodies; header values only on an allowlist.
    Tap {
        /// The workload (a Workload's name, or its arm's deployment `<name>-primary`).
        workload: String,
        #[command(flatten)]
        filter: TapFilter,
        /// Stop after this many requests.
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        reach: crate::observe_reach::Reach,
        #[command(flatten)]
        common: Common,
    },
    /// The busiest paths through a workload's proxies, live (from tap).
    Top {
        /// The workload.
        workload: String,
        #[command(flatten)]
        filter: TapFilter,
        /// Stop after this long (`10s`); until Ctrl-C when left out.
        #[arg(long)]
        duration: Option<String>,
        /// Rows shown.
        #[arg(long, default_value_t = 20)]
        rows: usize,
        #[command(flatten)]
        reach: crate::observe_reach::Reach,
        #[command(flatten)]
        common: Common,
    },
    /// Serve the web dashboard for the control plane at --server, and print its address with
    /// a sign-in link; until Ctrl-C. (`mesh up` serves one too, on --dashboard-addr.) In a
    /// cluster (--kube with --prometheus), the metrics come from Prometheus, the Canaries and
    /// the buttons from the Kubernetes API, and taps from the control plane through a
    /// port-forward, as `mesh tap --kube`.
    Dashboard {
        /// Where the dashboard listens.
        #[arg(long, default_value = "127.0.0.1:4190")]
        addr: std::net::SocketAddr,
        /// How far back the pages' numbers look (`30s`, `1m`, `5m`).
        #[arg(short = 't', long = "time-window", default_value = "1m")]
        window: String,
        /// In a cluster: the Prometheus that scrapes the proxies.
        #[arg(long, env = "MESH_PROMETHEUS_URL", value_name = "URL")]
        prometheus: Option<String>,
        /// In a cluster: the namespace the mesh is installed in (taps go through a
        /// port-forward to its control plane, with the kubeconfig's token unless --token-file).
        #[arg(long, default_value = crate::k8s::install::NAMESPACE)]
        mesh_namespace: String,
        #[command(flatten)]
        at: crate::backend::Where,
    },
}

/// Which requests tap and top show.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TapFilter {
    /// Paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// This method.
    #[arg(long)]
    pub method: Option<String>,
    /// This authority, or authorities starting with it (`web` matches `web.default:80`).
    #[arg(long)]
    pub authority: Option<String>,
    /// `inbound` or `outbound` only.
    #[arg(long)]
    pub direction: Option<String>,
}

/// Runs one observe command.
pub fn run(command: Command) -> ExitCode {
    let long = matches!(
        command,
        Command::Tap { .. } | Command::Top { .. } | Command::Dashboard { .. }
    );
    crate::runtime::block_on(long, execute(command))
        .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

fn window_query(window: &Window, conn: &Conn) -> anyhow::Result<Vec<(&'static str, String)>> {
    mesh_core::duration::parse(&window.window)
        .map_err(|e| anyhow::anyhow!("--time-window {}: {e}", window.window))?;
    let mut q = vec![("window", window.window.clone())];
    if !window.all_namespaces {
        q.push(("namespace", conn.namespace.clone()));
    }
    Ok(q)
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Stat {
            resource,
            name,
            window,
            common,
        } => {
            let resource: mesh_observe::Resource =
                resource.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            window.require_prometheus_in_cluster()?;
            if let Some(url) = &window.prometheus {
                use mesh_observe::MetricsView as _;
                let view = mesh_observe::prometheus::PrometheusView::new(url);
                let q = window.query(&common.conn, name)?;
                let cluster =
                    match window.is_cluster() && resource == mesh_observe::Resource::Workloads {
                        true => Some(window.k8s.client().await?),
                        false => None,
                    };
                return repeat(window.watch, || async {
                    let mut rows = view.stat(resource, &q).await?;
                    if let Some(client) = &cluster {
                        crate::observe_cluster::with_pods(client, &q, &mut rows).await?;
                    }
                    render(common.output, &rows, |rows| stat_table(resource, rows))
                })
                .await;
            }
            let api = Api::new(&common.conn)?;
            let mut query = window_query(&window, &common.conn)?;
            if let Some(name) = name {
                query.push(("name", name));
            }
            let path = format!(
                "/v1/observe/stat/{}",
                serde_json::to_value(resource)?.as_str().unwrap_or_default()
            );
            repeat(window.watch, || async {
                let rows: Vec<StatRow> = api.get(&path, &query).await?;
                render(common.output, &rows, |rows| stat_table(resource, rows))
            })
            .await
        }
        Command::Routes {
            service,
            window,
            common,
        } => {
            window.require_prometheus_in_cluster()?;
            if let Some(url) = &window.prometheus {
                use mesh_observe::MetricsView as _;
                let view = mesh_observe::prometheus::PrometheusView::new(url);
                let q = window.query(&common.conn, Some(service))?;
                return repeat(window.watch, || async {
                    render(common.output, &view.routes(&q).await?, routes_table)
                })
                .await;
            }
            let api = Api::new(&common.conn)?;
            let mut query = window_query(&window, &common.conn)?;
            query.push(("service", service));
            repeat(window.watch, || async {
                let rows: Vec<RouteRow> = api.get("/v1/observe/routes", &query).await?;
                render(common.output, &rows, routes_table)
            })
            .await
        }
        Command::Edges { window, common } => {
            window.require_prometheus_in_cluster()?;
            if let Some(url) = &window.prometheus {
                use mesh_observe::MetricsView as _;
                let view = mesh_observe::prometheus::PrometheusView::new(url);
                let q = window.query(&common.conn, None)?;
                return repeat(window.watch, || async {
                    render(common.output, &view.edges(&q).await?, edges_table)
                })
                .await;
            }
            let api = Api::new(&common.conn)?;
            let query = window_query(&window, &common.conn)?;
            repeat(window.watch, || async {
                let rows: Vec<EdgeRow> = api.get("/v1/observe/edges", &query).await?;
                render(common.output, &rows, edges_table)
            })
            .await
        }
        Command::Tap {
            workload,
            filter,
            max,
            reach,
            common,
        } => {
            let (api, _forward) = crate::observe_reach::api(&common.conn, &reach).await?;
            tap(&api, &common, &workload, &filter, max).await
        }
        Command::Top {
            workload,
            filter,
            duration,
            rows,
            reach,
            common,
        } => {
            let (api, _forward) = crate::observe_reach::api(&common.conn, &reach).await?;
            let duration = duration
                .map(|d| {
                    mesh_core::duration::parse(&d)
                        .map_err(|e| anyhow::anyhow!("--duration {d}: {e}"))
                })
                .transpose()?;
            top(&api, &common, &workload, &filter, duration, rows).await
        }
        Command::Dashboard {
            addr,
            window,
            prometheus,
            mesh_namespace,
            at,
        } => {
            mesh_core::duration::parse(&window)
                .map_err(|e| anyhow::anyhow!("--time-window {window}: {e}"))?;
            let cluster = match (at.is_cluster(), prometheus) {
                (false, _) => None,
                (true, None) => anyhow::bail!(
                    "in a cluster the dashboard's metrics come from Prometheus: give --prometheus \
                     URL (or set MESH_PROMETHEUS_URL)"
                ),
                (true, Some(prometheus)) => Some(crate::dashboard::ClusterSource {
                    at: at.clone(),
                    mesh_namespace,
                    prometheus,
                    window: window.clone(),
                }),
            };
            crate::dashboard::standalone(addr, at.conn, window, cluster).await
        }
    }
}

/// Runs `once`, and again every 2 seconds with `watch`, clearing the screen between.
async fn repeat<F, Fut>(watch: bool, once: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        if watch {
            out("\x1b[2J\x1b[H");
        }
        once().await?;
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[allow(clippy::print_stdout, reason = "the CLI talks to its user")]
fn out(text: &str) {
    print!("{text}");
}

fn render<T: serde::Serialize>(
    format: Format,
    rows: &[T],
    table: impl FnOnce(&[T]) -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Json => out(&format!("{}\n", serde_json::to_string_pretty(rows)?)),
        Format::Table => out(&table(rows)),
    }
    Ok(())
}

/// Lays out rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "{}", cells.join("   ").trim_end());
    };
    line(&mut s, &mut header.iter().copied());
    for row in rows {
        line(&mut s, &mut row.iter().map(String::as_str));
    }
    s
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}ms"))
}

fn golden_cells(g: &Golden) -> [String; 5] {
    let has = g.requests > 0.0;
    [
        pct(g.success_rate),
        if has {
            format!("{:.1}rps", g.rps)
        } else {
            "-".into()
        },
        ms(g.p50_ms),
        ms(g.p95_ms),
        ms(g.p99_ms),
    ]
}

fn stat_table(resource: mesh_observe::Resource, rows: &[StatRow]) -> String {
    if rows.is_empty() {
        return "No traffic found.\n".into();
    }
    let workloads = resource == mesh_observe::Resource::Workloads;
    let mut header = vec!["NAMESPACE", "NAME"];
    if workloads {
        header.push("MESHED");
    }
    header.extend([
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]);
    if workloads {
        header.push("TCP_CONN");
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.namespace.clone(), r.name.clone()];
            if workloads {
                cells.push(format!("{}/{}", r.meshed, r.total));
            }
            cells.extend(golden_cells(&r.golden));
            if workloads {
                cells.push(r.tcp_connections.map_or("-".into(), |c| format!("{c:.0}")));
            }
            cells
        })
        .collect();
    table(&header, &rows)
}

fn routes_table(rows: &[RouteRow]) -> String {
    if rows.is_empty() {
        return "No traffic found.\n".into();
    }
    let header = [
        "ROUTE",
        "AUTHORITY",
        "BACKEND",
        "SHARE",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ];
    let mut out = Vec::new();
    for r in rows {
        let mut cells = vec![
            r.route.clone(),
            r.authority.clone(),
            "*".into(),
            "100%".into(),
        ];
        cells.extend(golden_cells(&r.golden));
        out.push(cells);
        for b in &r.backends {
            let mut cells = vec![
                String::new(),
                String::new(),
                format!("{}.{}", b.service, b.namespace),
                format!("{:.1}%", b.share * 100.0),
            ];
            cells.extend(golden_cells(&b.golden));
            out.push(cells);
        }
    }
    table(&header, &out)
}

fn edges_table(rows: &[EdgeRow]) -> String {
    if rows.is_empty() {
        return "No edges found.\n".into();
    }
    let header = [
        "SRC",
        "DST",
        "SRC_NS",
        "DST_NS",
        "SECURED",
        "SUCCESS",
        "RPS",
        "CLIENT_ID",
        "SERVER_ID",
    ];
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|e| {
            let secured = e.src_identity.is_some() && !e.dst_identities.is_empty();
            vec![
                e.src.clone(),
                e.dst.clone(),
                e.src_namespace.clone(),
                e.dst_namespace.clone(),
                if secured { "√" } else { "-" }.into(),
                pct(e.golden.success_rate),
                format!("{:.1}rps", e.golden.rps),
                e.src_identity.clone().unwrap_or_else(|| "-".into()),
                if e.dst_identities.is_empty() {
                    "-".into()
                } else {
                    e.dst_identities.join(",")
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

fn tap_query(
    conn: &Conn,
    workload: &str,
    filter: &TapFilter,
    max: Option<u64>,
) -> Vec<(&'static str, String)> {
    let mut q = vec![
        ("workload", workload.to_string()),
        ("namespace", conn.namespace.clone()),
    ];
    let f = [
        ("path", &filter.path),
        ("method", &filter.method),
        ("authority", &filter.authority),
        ("direction", &filter.direction),
    ];
    for (name, value) in f {
        if let Some(v) = value {
            q.push((name, v.clone()));
        }
    }
    if let Some(max) = max {
        q.push(("max", max.to_string()));
    }
    q
}

/// Reads a tap stream line by line, handing each event to `each` until it returns false.
async fn read_tap(
    mut rsp: reqwest::Response,
    mut each: impl FnMut(serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let mut buffer = Vec::new();
    while let Some(chunk) = rsp.chunk().await.context("reading the tap stream")? {
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let event: serde_json::Value =
                serde_json::from_slice(&line).context("a tap line that is not JSON")?;
            if !each(event) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One request as a line, Linkerd-style.
fn tap_line(e: &serde_json::Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    if let Some(error) = e["error"].as_str() {
        return format!("error proxy={} {error}", s("proxy"));
    }
    if let Some(lost) = e["lost"].as_u64() {
        return format!(
            "lost {lost} requests (reading too slowly) proxy={}",
            s("proxy")
        );
    }
    let dir = if s("direction") == "outbound" {
        "out"
    } else {
        "in"
    };
    let mut line = format!(
        "{dir} pod={} :method={} :authority={} :path={} :status={} latency={:.1}ms",
        s("pod"),
        s("method"),
        s("authority"),
        s("path"),
        e["status"],
        e["latencyMs"].as_f64().unwrap_or_default()
    );
    if !s("route").is_empty() {
        let _ = write!(line, " route={}", s("route"));
    }
    if !s("backend").is_empty() {
        let _ = write!(line, " backend={}", s("backend"));
    }
    if !s("srcIdentity").is_empty() {
        let _ = write!(line, " src={}", s("srcIdentity"));
    }
    if !s("dstIdentity").is_empty() {
        let _ = write!(line, " dst={}", s("dstIdentity"));
    }
    line + "\n"
}

async fn tap(
    api: &Api,
    common: &Common,
    workload: &str,
    filter: &TapFilter,
    max: Option<u64>,
) -> anyhow::Result<()> {
    let rsp = api
        .send(
            "/v1/observe/tap",
            &tap_query(&common.conn, workload, filter, max),
        )
        .await?;
    let mut seen = 0;
    read_tap(rsp, |event| {
        match common.output {
            Format::Json => out(&format!("{event}\n")),
            Format::Table => out(&tap_line(&event)),
        }
        if event.get("method").is_some() {
            seen += 1;
        }
        max.is_none_or(|m| seen < m)
    })
    .await
}

/// Per path, what `mesh top` shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TopRow {
    source: String,
    destination: String,
    method: String,
    path: String,
    count: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
    successes: u64,
}

fn top_table(rows: &BTreeMap<(String, String, String, String), TopRow>, limit: usize) -> String {
    let mut sorted: Vec<&TopRow> = rows.values().collect();
    sorted.sort_by(|a, b| b.count.cmp(&a.count).then(a.path.cmp(&b.path)));
    let cells: Vec<Vec<String>> = sorted
        .iter()
        .take(limit)
        .map(|r| {
            vec![
                r.source.clone(),
                r.destination.clone(),
                r.method.clone(),
                r.path.clone(),
                r.count.to_string(),
                format!("{:.1}ms", r.best_ms),
                format!("{:.1}ms", r.worst_ms),
                format!("{:.1}ms", r.last_ms),
                format!("{:.2}%", 100.0 * r.successes as f64 / r.count.max(1) as f64),
            ]
        })
        .collect();
    table(
        &[
            "SOURCE",
            "DESTINATION",
            "METHOD",
            "PATH",
            "COUNT",
            "BEST",
            "WORST",
            "LAST",
            "SUCCESS_RATE",
        ],
        &cells,
    )
}

async fn top(
    api: &Api,
    common: &Common,
    workload: &str,
    filter: &TapFilter,
    duration: Option<Duration>,
    limit: usize,
) -> anyhow::Result<()> {
    let rsp = api
        .send(
            "/v1/observe/tap",
            &tap_query(&common.conn, workload, filter, None),
        )
        .await?;
    let started = Instant::now();
    let mut drawn = Instant::now();
    let mut rows: BTreeMap<(String, String, String, String), TopRow> = BTreeMap::new();
    let live = common.output == Format::Table;
    let reading = read_tap(rsp, |e| {
        if e.get("method").is_some() {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            let (source, destination) = if s("direction") == "outbound" {
                (
                    s("pod"),
                    e["backend"]
                        .as_str()
                        .map_or_else(|| s("authority"), str::to_string),
                )
            } else {
                (s("srcIdentity"), s("pod"))
            };
            let key = (source.clone(), destination.clone(), s("method"), s("path"));
            let latency = e["latencyMs"].as_f64().unwrap_or_default();
            let row = rows.entry(key).or_insert_with(|| TopRow {
                source,
                destination,
                method: s("method"),
                path: s("path"),
                best_ms: f64::INFINITY,
                ..TopRow::default()
            });
            row.count += 1;
            row.best_ms = row.best_ms.min(latency);
            row.worst_ms = row.worst_ms.max(latency);
            row.last_ms = latency;
            if e["status"].as_u64().is_some_and(|s| s < 500) {
                row.successes += 1;
            }
        }
        if live && drawn.elapsed() >= Duration::from_secs(1) {
            drawn = Instant::now();
            out(&format!("\x1b[2J\x1b[H{}", top_table(&rows, limit)));
        }
        duration.is_none_or(|d| started.elapsed() < d)
    });
    match duration {
        // The stream may be quiet: stop at the deadline whatever arrives.
        Some(d) => {
            let _ = tokio::time::timeout(d, reading).await;
        }
        None => reading.await?,
    }
    match common.output {
        Format::Table => out(&format!("\x1b[2J\x1b[H{}", top_table(&rows, limit))),
        Format::Json => {
            let mut sorted: Vec<&TopRow> = rows.values().collect();
            sorted.sort_by(|a, b| b.count.cmp(&a.count).then(a.path.cmp(&b.path)));
            sorted.truncate(limit);
            out(&format!("{}\n", serde_json::to_string_pretty(&sorted)?));
        }
    }
    Ok(())
}
