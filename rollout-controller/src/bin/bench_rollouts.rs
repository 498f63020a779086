//! `mesh-bench-rollouts`: what the embedded rollout controller costs with many Canaries
//! progressing at once. For each count it stores that many Workloads and Canaries in a real
//! embedded store (a redb file on disk, each write a durable commit), lets the controller
//! initialise them, deploys a new version of every Workload at once, and then runs the
//! controller's own turn ([`Controller::turn`], what `mesh up` runs every tick) once a second,
//! timing each turn and the process's CPU over them. With the default analysis interval of 1 s
//! every Canary analyses every turn, the worst case for the controller; the arms are always
//! ready and no proxy is scraped (the metrics window is empty, so the canaries hold at their
//! first step as inconclusive), so a turn is the controller's own work: listing, the state
//! machine, the judge and the store's writes.
//!
//! Usage: `mesh-bench-rollouts <out-dir> [counts] [turns] [analysis interval]` (default
//! `1,100,1000`, 30 measured turns per count, `1s`); see `scripts/bench-rollouts`. Prints a
//! table and writes `<out-dir>/rollouts.json`.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark binary reports to its user and gives up on setup failures"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_crds::validate::ResourceKind;
use mesh_crds::{Canary, CanaryPhase};
use mesh_rollout_controller::embedded::{Controller, Settings, WorkloadKey, Workloads};
use mesh_rollout_controller::owned::Arm;
use mesh_store::embedded::EmbeddedStore;
use mesh_store::{ResourceStore, Selector};
use serde_json::{Value, json};

const DEFAULT_COUNTS: [usize; 3] = [1, 100, 1_000];
const TICK: Duration = Duration::from_secs(1);

/// Arms that are ready as soon as they are asked for; no proxies to scrape.
struct AlwaysReady;

impl Workloads for AlwaysReady {
    async fn ready(&self, _: &WorkloadKey, _: Arm, _: &str) -> bool {
        true
    }

    async fn admin_addrs(&self) -> Vec<SocketAddr> {
        Vec::new()
    }
}

fn workload(i: usize, version: &str) -> Value {
    json!({
        "apiVersion": "workloads.mesh.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": format!("app-{i}"), "namespace": "bench"},
        "spec": {
            "port": 8080,
            "version": version,
            "versions": {
                "v1": {"command": ["mesh-demo-app", "--version", "v1"]},
                "v2": {"command": ["mesh-demo-app", "--version", "v2"]},
            },
        },
    })
}

fn canary(i: usize, interval: &str) -> Value {
    json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": format!("app-{i}"), "namespace": "bench"},
        "spec": {
            "targetRef": {"apiVersion": "workloads.mesh.dev/v1alpha1", "kind": "Workload", "name": format!("app-{i}")},
            "service": {"port": 8080},
            "analysis": {"interval": interval, "threshold": 5, "stepWeight": 10, "maxWeight": 50},
        },
    })
}

/// This process's user + system CPU time, from `/proc/self/stat`, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (in parentheses): utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // CLK_TCK is 100 on Linux.
    ticks / 100.0
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn phases(store: &EmbeddedStore) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for v in store
        .list(&Selector::kind(ResourceKind::Canary, None))
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let phase = serde_json::from_value::<Canary>((*v).clone())
            .ok()
            .and_then(|c| c.status)
            .map_or(CanaryPhase::Initializing, |s| s.phase);
        *count.entry(format!("{phase:?}")).or_default() += 1;
    }
    count
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "rank is between 1 and len"
    )]
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Row {
    canaries: usize,
    turns: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_cores: f64,
    rss_mb: f64,
    progressing: usize,
    failed_reconciles: usize,
    phases: BTreeMap<String, usize>,
}

async fn measure(dir: &Path, n: usize, turns: usize, interval: &str) -> anyhow::Result<Row> {
    let state = dir.join(format!("rollouts-{n}"));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    let store = EmbeddedStore::open(&state, 1000)?;
    let objects: Vec<Value> = (0..n)
        .flat_map(|i| [workload(i, "v1"), canary(i, interval)])
        .collect();
    store.apply(objects).await.context("storing the canaries")?;
    let mut controller = Controller::new(store.clone(), Arc::new(AlwaysReady), Settings::default());

    // Initialise: the primaries take v1 and all traffic.
    for _ in 0..20 {
        controller.turn().await;
        if phases(&store).get("Initialized") == Some(&n) {
            break;
        }
    }
    let initialized = phases(&store).get("Initialized").copied().unwrap_or(0);
    anyhow::ensure!(
        initialized == n,
        "only {initialized} of {n} canaries initialised: {:?}",
        phases(&store)
    );
    // Every Workload gets v2 at once: every Canary starts a rollout.
    store
        .apply((0..n).map(|i| workload(i, "v2")).collect())
        .await
        .context("deploying v2")?;

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut durations = Vec::with_capacity(turns);
    let mut failed = 0;
    // Two turns to start the rollouts (scale the canary arm up, first weight) before counting.
    for _ in 0..2 {
        tick.tick().await;
        controller.turn().await;
    }
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..turns {
        tick.tick().await;
        let start = Instant::now();
        let turn = controller.turn().await;
        durations.push(start.elapsed().as_secs_f64() * 1000.0);
        failed += turn.failed;
    }
    let cpu_cores = (cpu_seconds() - cpu0) / wall0.elapsed().as_secs_f64();
    let phases = phases(&store);
    durations.sort_by(f64::total_cmp);
    let row = Row {
        canaries: n,
        turns,
        p50_ms: percentile(&durations, 50.0),
        p99_ms: percentile(&durations, 99.0),
        max_ms: durations.last().copied().unwrap_or(f64::NAN),
        cpu_cores,
        rss_mb: rss_mb(),
        progressing: phases.get("Progressing").copied().unwrap_or(0),
        failed_reconciles: failed,
        phases,
    };
    drop(controller);
    drop(store);
    let _ = std::fs::remove_dir_all(&state);
    Ok(row)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "target/bench".into()));
    let counts: Vec<usize> = match args.next() {
        None => DEFAULT_COUNTS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
            .collect::<Option<_>>()
            .with_context(|| {
                format!("counts: expected positive numbers separated by commas, got {list:?}")
            })?,
    };
    let turns: usize = match args.next() {
        None => 30,
        Some(t) => t
            .parse()
            .ok()
            .filter(|t| *t > 0)
            .with_context(|| format!("turns: expected a positive number, got {t:?}"))?,
    };
    let interval = args.next().unwrap_or_else(|| "1s".into());
    let interval_ms = mesh_core::duration::parse(&interval)
        .map_err(|e| anyhow::anyhow!("analysis interval {interval:?}: {e}"))?
        .as_secs_f64()
        * 1000.0;
    std::fs::create_dir_all(&out_dir)?;
    let load_before = load_average();
    let started = Instant::now();
    let mut rows = Vec::new();
    for n in counts {
        eprintln!("bench-rollouts: {n} canaries, {turns} turns");
        let row = measure(&out_dir, n, turns, &interval).await?;
        eprintln!(
            "{:>6} canaries: turn p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {:.3} cores, phases {:?}",
            row.canaries, row.p50_ms, row.p99_ms, row.max_ms, row.cpu_cores, row.phases
        );
        rows.push(row);
    }
    let mut table = String::from(
        "| canaries progressing | analysis interval | turns | turn p50 (ms) | turn p99 (ms) | turn max (ms) | CPU (cores) | RSS (MiB) | failed reconciles | on schedule (turn p99 < analysis interval) |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} of {} | {interval} | {} | {:.1} | {:.1} | {:.1} | {:.3} | {:.1} | {} | {} |\n",
            r.progressing,
            r.canaries,
            r.turns,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_cores,
            r.rss_mb,
            r.failed_reconciles,
            if r.p99_ms < interval_ms { "yes" } else { "no" }
        ));
    }
    println!("{table}");
    println!(
        "load average {load_before} before, {} after; {} s",
        load_average(),
        started.elapsed().as_secs()
    );
    let json: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "canaries": r.canaries,
                "progressing": r.progressing,
                "turns": r.turns,
                "turn_p50_ms": r.p50_ms,
                "turn_p99_ms": r.p99_ms,
                "turn_max_ms": r.max_ms,
                "cpu_cores": r.cpu_cores,
                "rss_mb": r.rss_mb,
                "failed_reconciles": r.failed_reconciles,
                "phases": r.phases,
            })
        })
        .collect();
    let path = out_dir.join("rollouts.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &json!({"load_before": load_before, "analysis_interval": interval, "rows": json}),
        )? + "\n",
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
