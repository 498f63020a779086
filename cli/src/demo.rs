//! `mesh demo`: a whole canary rollout on the embedded mesh, on this machine, in a minute or two.
//!
//! It starts the embedded mesh in a scratch state directory with three workloads: `loadgen`
//! sends steady traffic to `frontend`, which calls `backend`; each has its own sidecar. Once v1
//! serves, it changes `backend` to v2, which the Canary rolls out step by step, judged from the
//! sidecars' metrics, until it is promoted or rolled back. Then it prints what happened.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_crds::{Canary, CanaryPhase, validate::ResourceKind};
use mesh_rollout_controller::owned::Names;
use mesh_rollout_controller::scrape::{self, ArmCounters};
use mesh_store::{ObjectKey, ResourceStore};
use serde::Serialize;
use serde_json::Value;

use crate::embedded::{Mesh, Settings};
use crate::rollout;

/// Namespace the demo's resources live in.
pub const NAMESPACE: &str = "demo";
/// How long the demo waits for the rollout to decide.
const DECISION_TIMEOUT: Duration = Duration::from_secs(300);
/// How long traffic is watched after the decision.
const AFTER_WINDOW: Duration = Duration::from_secs(6);
/// Requests already in flight to the canary at the decision still finish there (a slow canary
/// takes over a second); the "after" window starts once they have.
const SETTLE: Duration = Duration::from_secs(3);

/// Which v2 to roll out.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A healthy v2: promoted.
    Good,
    /// v2 fails 10 % of its requests: rolled back.
    Errors,
    /// v2 answers in about 400 ms (p99 1.2 s): rolled back.
    Latency,
    /// v2 fails half its requests during 3 s of every 10 s.
    Flaky,
    /// For `scripts/rollout-trials`, the simulator's scenarios on real processes: v1 and v2
    /// both fail 0.1 % of requests (latency median 5 ms, p99 20 ms); should be promoted.
    #[value(name = "healthy")]
    TrialHealthy,
    /// v1 fails 0.1 %, v2 1 %: should be rolled back.
    #[value(name = "errors-1pct")]
    TrialErrors1,
    /// v1 fails 0.1 %, v2 5 %: should be rolled back.
    #[value(name = "errors-5pct")]
    TrialErrors5,
    /// v1 fails 0.1 %; v2 too, at twice the latency (median 10 ms, p99 40 ms).
    #[value(name = "latency-2x")]
    TrialLatency2x,
}

impl Scenario {
    /// The v1 command line: the trials' primary fails 0.1 % of requests, as the simulator's.
    fn v1_args(self) -> &'static str {
        match self {
            Self::TrialHealthy | Self::TrialErrors1 | Self::TrialErrors5 | Self::TrialLatency2x => {
                r#"[mesh-demo-app, --version, v1, --latency-ms, "5", --latency-p99-ms, "20", --error-rate, "0.001"]"#
            }
            _ => r#"[mesh-demo-app, --version, v1, --latency-ms, "5", --latency-p99-ms, "20"]"#,
        }
    }
}

/// How the result is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The rollout live, then a summary.
    Text,
    /// Only the summary, as one JSON object (progress goes to stderr).
    Json,
}

/// Flags of `mesh demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Which canary to roll out.
    #[arg(long, value_enum, default_value_t = Scenario::Good)]
    pub scenario: Scenario,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Requests per second the load generator sends to the frontend.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(10..=2000))]
    pub rate: u32,
    /// Keep the state (store, logs) here instead of a scratch directory that is removed.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// The v2 command line of each scenario.
fn v2_args(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Good => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20"]"#
        }
        Scenario::Errors => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20", "--error-rate", "0.1"]"#
        }
        Scenario::Latency => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "400", "--latency-p99-ms", "1200"]"#
        }
        Scenario::Flaky => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20", "--burst-every", "10s", "--burst-for", "3s", "--burst-error-rate", "0.5"]"#
        }
        Scenario::TrialHealthy => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20", "--error-rate", "0.001"]"#
        }
        Scenario::TrialErrors1 => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20", "--error-rate", "0.01"]"#
        }
        Scenario::TrialErrors5 => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "5", "--latency-p99-ms", "20", "--error-rate", "0.05"]"#
        }
        Scenario::TrialLatency2x => {
            r#"["mesh-demo-app", "--version", "v2", "--latency-ms", "10", "--latency-p99-ms", "40", "--error-rate", "0.001"]"#
        }
    }
}

/// The demo's resources, as a user would write them in mesh.yaml.
pub fn manifests(scenario: Scenario, rate: u32, backend_version: &str) -> String {
    let v2 = v2_args(scenario);
    let v1 = scenario.v1_args();
    format!(
        r#"apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: {NAMESPACE}}}
spec:
  port: 8080
  version: v1
  versions:
    v1:
      command: [mesh-demo-app, --version, v1, --downstream, "http://backend.{NAMESPACE}:9898/"]
---
apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata: {{name: backend, namespace: {NAMESPACE}}}
spec:
  port: 9898
  version: {backend_version}
  versions:
    v1:
      command: {v1}
    v2:
      command: {v2}
---
apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata: {{name: loadgen, namespace: {NAMESPACE}}}
spec:
  version: v1
  versions:
    v1:
      command: [mesh-loadgen, --url, "http://frontend.{NAMESPACE}:8080/", --rate, "{rate}", --output, json]
---
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata: {{name: backend, namespace: {NAMESPACE}}}
spec:
  targetRef: {{apiVersion: workloads.mesh.dev/v1alpha1, kind: Workload, name: backend}}
  service: {{port: 9898}}
  progressDeadlineSeconds: 600
  analysis:
    interval: 5s
    threshold: 2
    stepWeight: 10
    maxWeight: 50
    metrics:
      - name: request-success-rate
        thresholdRange: {{min: 99}}
        interval: 5s
      - name: request-duration
        thresholdRange: {{max: 500}}
        interval: 5s
"#
    )
}

/// What `mesh demo --output json` prints.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The scenario.
    pub scenario: String,
    /// `Succeeded` or `Failed` (or the phase the rollout was in when the demo gave up).
    pub phase: String,
    /// Seconds from deploying v2 to the decision.
    pub decision_seconds: f64,
    /// Requests the canary answered during the rollout.
    pub canary_requests: u64,
    /// Of those, failed.
    pub canary_failed_requests: u64,
    /// Requests to the backend (both arms) that failed during the rollout.
    pub failed_requests: u64,
    /// Requests to the backend (both arms) during the rollout.
    pub total_requests: u64,
    /// The version the primary runs at the end.
    pub primary_version: String,
    /// Traffic in the seconds after the decision.
    pub after: After,
    /// Why it ended, in the controller's words.
    pub reason: String,
    /// How it ended, by the judge's account: `Promoted`, `RolledBack`, `Inconclusive` or
    /// `Other` (absent when the rollout did not end).
    pub outcome: Option<String>,
    /// Seconds from the canary's first weight step to the decision (promotion or rollback), by
    /// the Canary's history: what the simulator measures.
    pub analysis_seconds: Option<f64>,
}

/// Backend traffic after the decision.
#[derive(Debug, Serialize)]
pub struct After {
    /// Seconds watched.
    pub seconds: f64,
    /// Requests to the backend.
    pub requests: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Of those, sent to the canary arm.
    pub canary: u64,
}

/// Runs `mesh demo`.
pub fn run(args: Args) -> ExitCode {
    crate::runtime::init_logging("error");
    crate::runtime::block_on(true, demo(args)).map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

struct Say(Output);

impl Say {
    #[allow(clippy::print_stdout, reason = "the demo narrates")]
    fn line(&self, text: &str) {
        match self.0 {
            Output::Text => println!("{text}"),
            Output::Json => crate::runtime::tell(text),
        }
    }
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let say = Say(args.output);
    let scratch = args.state_dir.is_none();
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id())));
    let mesh = Mesh::start(&Settings {
        state_dir: state_dir.clone(),
        api_addr: "127.0.0.1:0".parse()?,
        proxy_addr: "127.0.0.1:0".parse()?,
        default_inbound_policy: mesh_policies::DefaultPolicy::AllUnauthenticated,
        proxy_env: Vec::new(),
    })
    .await?;
    let result = drive(&mesh, &args, &say).await;
    say.line("stopping the workloads...");
    mesh.shutdown().await;
    if scratch {
        let _ = std::fs::remove_dir_all(&state_dir);
    } else {
        say.line(&format!("state and logs kept in {}", state_dir.display()));
    }
    let summary = result?;
    match args.output {
        Output::Json => {
            #[allow(clippy::print_stdout, reason = "the summary is the output")]
            {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
        }
        Output::Text => say.line(&render_summary(&summary)),
    }
    if summary.phase == "Succeeded" || summary.phase == "Failed" {
        Ok(())
    } else {
        bail!("no decision within {}s", DECISION_TIMEOUT.as_secs())
    }
}

fn docs(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).context("demo manifests")?;
        out.push(v);
    }
    Ok(out)
}

async fn canary(mesh: &Mesh) -> anyhow::Result<Option<Canary>> {
    let key = ObjectKey::new(ResourceKind::Canary, NAMESPACE, "backend");
    Ok(mesh
        .store
        .get(&key)?
        .and_then(|v| serde_json::from_value((*v).clone()).ok()))
}

/// The backend's two arms as the sidecars count them, summed over every sidecar.
async fn backend_counters(mesh: &Mesh, client: &reqwest::Client) -> (ArmCounters, ArmCounters) {
    let mut canary = ArmCounters::default();
    let mut primary = ArmCounters::default();
    for addr in mesh.supervisor.admin_addrs().await {
        let Ok(rsp) = client
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            continue;
        };
        let Ok(text) = rsp.text().await else { continue };
        let Ok(samples) = scrape::parse(&text) else {
            continue;
        };
        let names = Names::new(NAMESPACE, "backend", "backend");
        scrape::merge(
            &mut canary,
            &scrape::counters(&samples, &names.service_canary),
        );
        scrape::merge(
            &mut primary,
            &scrape::counters(&samples, &names.service_primary),
        );
    }
    (canary, primary)
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a non-negative, finite, rounded count below 1e15"
)]
fn diff(after: f64, before: f64) -> u64 {
    // Counters only grow; a sidecar that went away makes the sum shrink, which is not traffic.
    let d = (after - before).max(0.0).round();
    if d.is_finite() && d < 1e15 {
        d as u64
    } else {
        0
    }
}

async fn drive(mesh: &Mesh, args: &Args, say: &Say) -> anyhow::Result<Summary> {
    let client = reqwest::Client::new();
    say.line(&format!(
        "mesh demo: scenario {:?}. Starting the embedded mesh: frontend and backend at v1, \
         each with a sidecar; loadgen sends {} req/s to the frontend.",
        args.scenario, args.rate
    ));
    mesh.store
        .apply(docs(&manifests(args.scenario, args.rate, "v1"))?)
        .await
        .context("applying the demo's resources")?;

    // v1 serves, traffic flows.
    let start = Instant::now();
    loop {
        let initialized = canary(mesh)
            .await?
            .and_then(|c| c.status)
            .is_some_and(|s| s.phase == CanaryPhase::Initialized);
        let (_, p) = backend_counters(mesh, &client).await;
        if initialized && p.requests > f64::from(args.rate) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "v1 did not start serving within 60s; run with --state-dir DIR and read DIR/logs"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    say.line(&format!(
        "v1 is serving ({:.1}s). Deploying backend v2 as a canary...",
        start.elapsed().as_secs_f64()
    ));
    let before = backend_counters(mesh, &client).await;
    mesh.store
        .apply(docs(&manifests(args.scenario, args.rate, "v2"))?)
        .await
        .context("deploying v2")?;
    let t0 = Instant::now();

    let mut last_line = String::new();
    let final_canary = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(c) = canary(mesh).await? else {
            bail!("the Canary disappeared");
        };
        let status = c.status.clone().unwrap_or_default();
        let line = rollout::progress_line(&c);
        if line != last_line {
            say.line(&format!("[{:>5.1}s] {line}", t0.elapsed().as_secs_f64()));
            last_line = line;
        }
        let decided = matches!(status.phase, CanaryPhase::Succeeded | CanaryPhase::Failed)
            && status
                .last_applied_spec
                .as_deref()
                .is_some_and(|r| r.starts_with("v2-"));
        if decided || t0.elapsed() > DECISION_TIMEOUT {
            break c;
        }
    };
    let decision = t0.elapsed();
    let at_decision = backend_counters(mesh, &client).await;
    tokio::time::sleep(SETTLE).await;
    let settled = backend_counters(mesh, &client).await;
    tokio::time::sleep(AFTER_WINDOW).await;
    let later = backend_counters(mesh, &client).await;
    let status = final_canary.status.clone().unwrap_or_default();
    let workload = mesh.store.get(&ObjectKey::new(
        ResourceKind::Workload,
        NAMESPACE,
        "backend",
    ))?;
    let primary_version = workload
        .as_ref()
        .and_then(|w| w["status"]["primary"].as_str().map(str::to_string))
        .unwrap_or_default();
    let reason = status
        .history
        .iter()
        .rev()
        .find(|h| matches!(h.reason.as_str(), "Succeeded" | "RolledBack"))
        .map(|h| h.message.clone())
        .unwrap_or_default();
    let first_step = status
        .history
        .iter()
        .rev()
        .take_while(|h| h.reason != "Progressing")
        .filter(|h| h.reason == "WeightStepped")
        .map(|h| h.time.0)
        .min();
    let decided_at = status
        .history
        .iter()
        .rev()
        .find(|h| matches!(h.reason.as_str(), "Promoting" | "RolledBack"))
        .map(|h| h.time.0);
    let analysis_seconds = match (first_step, decided_at) {
        (Some(a), Some(b)) => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    let total = |c: &(ArmCounters, ArmCounters)| c.0.requests + c.1.requests;
    let failed = |c: &(ArmCounters, ArmCounters)| c.0.failures + c.1.failures;
    Ok(Summary {
        scenario: clap::ValueEnum::to_possible_value(&args.scenario).map_or_else(
            || format!("{:?}", args.scenario),
            |v| v.get_name().to_string(),
        ),
        phase: format!("{:?}", status.phase),
        decision_seconds: (decision.as_secs_f64() * 10.0).round() / 10.0,
        canary_requests: diff(at_decision.0.requests, before.0.requests),
        canary_failed_requests: diff(at_decision.0.failures, before.0.failures),
        failed_requests: diff(failed(&at_decision), failed(&before)),
        total_requests: diff(total(&at_decision), total(&before)),
        primary_version,
        after: After {
            seconds: AFTER_WINDOW.as_secs_f64(),
            requests: diff(total(&later), total(&settled)),
            failed: diff(failed(&later), failed(&settled)),
            canary: diff(later.0.requests, settled.0.requests),
        },
        reason,
        outcome: status.decision.as_ref().map(|d| format!("{:?}", d.outcome)),
        analysis_seconds,
    })
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn render_summary(s: &Summary) -> String {
    let verdict = match s.phase.as_str() {
        "Succeeded" => format!("PROMOTED: the primary now runs {}", s.primary_version),
        "Failed" => format!("ROLLED BACK: the primary still runs {}", s.primary_version),
        other => format!("NO DECISION (phase {other})"),
    };
    format!(
        "\n{verdict}\n  reason:            {}\n  time to decision:  {:.1}s\n  \
         canary requests:   {} ({} failed)\n  backend requests:  {} during the rollout, {} failed \
         ({:.2}%)\n  after the decision ({:.0}s): {} requests, {:.1}% to the canary, {} failed \
         ({:.2}%)",
        s.reason,
        s.decision_seconds,
        s.canary_requests,
        s.canary_failed_requests,
        s.total_requests,
        s.failed_requests,
        pct(s.failed_requests, s.total_requests),
        s.after.seconds,
        s.after.requests,
        pct(s.after.canary, s.after.requests),
        s.after.failed,
        pct(s.after.failed, s.after.requests),
    )
}
