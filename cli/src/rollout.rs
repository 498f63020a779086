//! `mesh rollout status NAME`: where a Canary's rollout stands, for people and for CI; and
//! `mesh rollout promote|abort|pause|resume|history NAME` to steer and review it.
//!
//! Exit codes, so a pipeline can gate on them:
//! - 0: succeeded (or no rollout has started: the primary serves);
//! - 1: failed, rolled back;
//! - 2: timed out: still in progress when `--timeout` ran out (at once without `--watch`);
//! - 3: waiting for promotion: at a gate the mesh holds (a confirm-* hook without a URL, which
//!   `mesh rollout promote` opens), or held by a confirm-promotion webhook;
//! - 4: the command could not run (a usage error, no such Canary, nothing reachable).
//!
//! `--output github` also writes workflow annotations to stdout and a markdown summary to
//! `$GITHUB_STEP_SUMMARY`.

use std::{
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh_crds::{
    Canary, CanaryPhase,
    canary::{
        ABORT_ANNOTATION, ABORT_BY_ANNOTATION, DecisionExplanation, GateResult, GateStatus,
        OPEN_GATE_ANNOTATION, OPEN_GATE_BY_ANNOTATION, Outcome, PROMOTE_ANNOTATION,
        PROMOTE_BY_ANNOTATION, Verdict,
    },
    validate::ResourceKind,
};
use serde_json::json;

use crate::backend::{Backend, Refused, Where};

/// Exit code: the rollout succeeded.
pub const EXIT_SUCCEEDED: u8 = 0;
/// Exit code: the rollout failed and was rolled back.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: still in progress when the timeout ran out.
pub const EXIT_TIMED_OUT: u8 = 2;
/// Exit code: waiting for promotion to be confirmed: at a gate the mesh holds (which
/// `mesh rollout promote` opens), or by a confirm-promotion webhook.
pub const EXIT_WAITING_PROMOTION: u8 = 3;
/// Exit code: the command could not run: a usage error (an unknown flag, a missing argument),
/// no such Canary, or the control plane or cluster could not be reached. Never 2, which a
/// pipeline reads as "timed out".
pub const EXIT_ERROR: u8 = 4;

/// The `result` an exit code means, as `-o json` reports it and the GitHub Action outputs it.
pub fn result_name(exit: u8) -> &'static str {
    match exit {
        EXIT_SUCCEEDED => "promoted",
        EXIT_FAILED => "rolled-back",
        EXIT_WAITING_PROMOTION => "waiting-promotion",
        _ => "timed-out",
    }
}

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON object.
    Json,
    /// Text, plus GitHub Actions annotations and a step summary.
    Github,
}

/// Flags of `mesh rollout status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The Canary.
    pub name: String,
    /// Follow the rollout until it ends (or `--timeout`), printing each change.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// With --watch, how long to wait for the end (30s, 10m); exit 2 when it runs out.
    #[arg(long, default_value = "15m")]
    pub timeout: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub at: Where,
}

/// A missing Canary said plainly, with the namespace it was looked for in.
fn name_missing(backend: &Backend, name: &str, e: anyhow::Error) -> anyhow::Error {
    if Refused::is_not_found(&e) {
        anyhow::anyhow!(
            "canary {name:?} not found in namespace {:?}",
            backend.namespace()
        )
    } else {
        e
    }
}

/// The Canary `name` as stored.
async fn fetch(backend: &Backend, name: &str) -> anyhow::Result<Canary> {
    let object = backend
        .get(ResourceKind::Canary, name)
        .await
        .map_err(|e| name_missing(backend, name, e))?;
    serde_json::from_value(object).context("reading the Canary")
}

/// Applies a JSON merge patch to the Canary's metadata/spec, never its status.
async fn patch(backend: &Backend, name: &str, patch: &serde_json::Value) -> anyhow::Result<Canary> {
    let object = backend
        .merge_patch(ResourceKind::Canary, name, patch)
        .await
        .map_err(|e| name_missing(backend, name, e))?;
    serde_json::from_value(object).context("reading the updated Canary")
}

/// Flags of the commands that act on one Canary.
#[derive(clap::Args, Debug, Clone)]
pub struct NameArgs {
    /// The Canary.
    pub name: String,
    #[command(flatten)]
    pub at: Where,
}

/// Flags of `mesh rollout promote`.
#[derive(clap::Args, Debug, Clone)]
pub struct PromoteArgs {
    /// The Canary.
    pub name: String,
    /// Who or what is asking, recorded in the rollout's history (a CI run's URL, a person).
    /// Default: the GitHub Actions run URL when run in one, else $USER@<hostname>.
    #[arg(long, value_name = "TEXT")]
    pub by: Option<String>,
    /// Promote now, skipping the rest of the analysis and every gate, even when the rollout
    /// waits at a gate the mesh holds.
    #[arg(long)]
    pub now: bool,
    #[command(flatten)]
    pub at: Where,
}

/// Flags of `mesh rollout abort`.
#[derive(clap::Args, Debug, Clone)]
pub struct AbortArgs {
    /// The Canary.
    pub name: String,
    /// Who or what is asking, recorded in the rollout's history. Default as for `promote`.
    #[arg(long, value_name = "TEXT")]
    pub by: Option<String>,
    #[command(flatten)]
    pub at: Where,
}

/// Flags of `mesh rollout history`.
#[derive(clap::Args, Debug, Clone)]
pub struct HistoryArgs {
    /// The Canary.
    pub name: String,
    /// Output format (`github` prints the same table as `text`).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub at: Where,
}

/// `mesh rollout` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Show a rollout: phase, step, weights, each gate's numbers and verdict, history.
    Status(StatusArgs),
    /// Open the gate the rollout waits at, or else promote the canary now.
    ///
    /// When the rollout waits at a gate the mesh holds (a confirm-promotion,
    /// confirm-traffic-increase or confirm-rollout webhook without a url), this opens that gate
    /// once and the rollout goes on its normal path: confirm-promotion promotes (stepping
    /// traffic back by stepWeightPromotion if set), confirm-traffic-increase lets the canary
    /// take its next weight step (the step after waits again), confirm-rollout lets the
    /// rollout start. Otherwise, or with --now, it promotes now, skipping the rest of the
    /// analysis and any confirm-promotion gate. Either way --by is recorded in the history.
    Promote(PromoteArgs),
    /// Roll the canary back now.
    Abort(AbortArgs),
    /// Freeze the rollout where it is (sets `spec.suspend`).
    Pause(NameArgs),
    /// Let a paused rollout go on (clears `spec.suspend`).
    Resume(NameArgs),
    /// List the rollout's recorded events, oldest first.
    History(HistoryArgs),
}

/// The gate the mesh holds that the rollout waits at, if any.
pub fn waiting_gate(c: &Canary) -> Option<&GateStatus> {
    let s = c.status.as_ref()?;
    let gate = s.gate.as_ref().filter(|g| g.waiting())?;
    matches!(
        s.phase,
        CanaryPhase::Waiting | CanaryPhase::Progressing | CanaryPhase::WaitingPromotion
    )
    .then_some(gate)
}

/// Whether a promotion or a gate's opening was asked for that the controller has not carried
/// out yet: right after `mesh rollout promote`, the rollout is on its way, not waiting.
fn promotion_requested(c: &Canary) -> bool {
    let annotation = |key: &str| {
        c.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let applied = c
        .status
        .as_ref()
        .and_then(|s| s.last_applied_spec.as_deref());
    let opening =
        waiting_gate(c).is_some_and(|g| annotation(OPEN_GATE_ANNOTATION) == Some(g.id.as_str()));
    let promote_now = applied.is_some() && annotation(PROMOTE_ANNOTATION) == applied;
    opening || promote_now
}

/// The exit code a Canary's state means; `None` while it is in progress.
pub fn exit_code(c: &Canary) -> Option<u8> {
    let s = c.status.clone().unwrap_or_default();
    match s.phase {
        CanaryPhase::Succeeded | CanaryPhase::Initialized => Some(EXIT_SUCCEEDED),
        CanaryPhase::Failed => Some(EXIT_FAILED),
        _ if promotion_requested(c) => None,
        CanaryPhase::WaitingPromotion => Some(EXIT_WAITING_PROMOTION),
        _ if waiting_gate(c).is_some() => Some(EXIT_WAITING_PROMOTION),
        _ => None,
    }
}

/// The exit code for `c` when its target asks for revision `wanted` (`None`: unknown). A
/// status that has not caught up with the wanted revision says nothing final yet, except a
/// gate waiting for that very revision (confirm-rollout waits before the rollout takes it on).
pub fn exit_code_for(c: &Canary, wanted: Option<&str>) -> Option<u8> {
    let applied = c
        .status
        .as_ref()
        .and_then(|s| s.last_applied_spec.as_deref());
    if wanted.is_none() || wanted == applied {
        return exit_code(c);
    }
    waiting_gate(c)
        .filter(|g| Some(g.revision.as_str()) == wanted && !promotion_requested(c))
        .map(|_| EXIT_WAITING_PROMOTION)
}

/// The command that opens `c`'s waiting gate, as a person would type it.
pub fn open_command(c: &Canary) -> String {
    format!(
        "mesh rollout promote {} -n {}",
        c.metadata.name.as_deref().unwrap_or_default(),
        c.metadata.namespace.as_deref().unwrap_or("default")
    )
}

fn gate_line(c: &Canary) -> Option<String> {
    let g = c.status.as_ref()?.gate.as_ref()?;
    let kind = g.type_.name();
    let hooks = g.hooks.join(", ");
    Some(match (&g.opened_at, &g.opened_by) {
        (Some(at), by) => format!(
            "{kind} {hooks} opened at {} by {}",
            at.0.strftime("%H:%M:%S"),
            by.as_deref().unwrap_or("-")
        ),
        (None, _) => format!(
            "{kind} {hooks} waiting since {}; open it with `{}`",
            g.since.0.strftime("%H:%M:%S"),
            open_command(c)
        ),
    })
}

/// The `gate` object of the JSON report: the status's gate, whether it waits, and how to open
/// it; `null` when no gate the mesh holds was reached in this rollout.
pub fn gate_json(c: &Canary) -> serde_json::Value {
    let Some(g) = c.status.as_ref().and_then(|s| s.gate.as_ref()) else {
        return serde_json::Value::Null;
    };
    let mut v = serde_json::to_value(g).unwrap_or_default();
    v["waiting"] = json!(g.waiting());
    if waiting_gate(c).is_some() {
        v["openWith"] = json!(open_command(c));
    }
    v
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "FAIL",
        Verdict::Inconclusive => "inconclusive",
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn gate_brief(g: &GateResult) -> String {
    format!(
        "{} {}/{} {}",
        g.name,
        num(g.canary),
        num(g.primary),
        verdict(g.verdict)
    )
}

/// One line: phase, weight, failed checks, each gate's canary/primary values and verdict.
pub fn progress_line(c: &Canary) -> String {
    let s = c.status.clone().unwrap_or_default();
    let gates: Vec<String> = s.analysis.iter().map(gate_brief).collect();
    let mut line = format!(
        "{:<16} canary {:>3}%  failed checks {}/{}  {}",
        format!("{:?}", s.phase),
        s.canary_weight,
        s.failed_checks,
        c.spec.analysis.threshold,
        if gates.is_empty() {
            String::new()
        } else {
            format!("[{}]", gates.join(" | "))
        }
    );
    if let Some(g) = waiting_gate(c) {
        line.push_str(&format!(
            "  waiting at {} gate {}",
            g.type_.name(),
            g.hooks.join(", ")
        ));
    }
    line
}

fn steps(c: &Canary) -> Vec<i32> {
    mesh_rollout_controller::machine::weight_steps(&c.spec).unwrap_or_default()
}

/// The full text report.
pub fn render(c: &Canary) -> String {
    let s = c.status.clone().unwrap_or_default();
    let name = c.metadata.name.clone().unwrap_or_default();
    let ns = c.metadata.namespace.clone().unwrap_or_default();
    let steps = steps(c);
    let step = steps.iter().filter(|w| **w <= s.canary_weight).count();
    let mut out = format!(
        "Canary {name} (namespace {ns})\n  phase:     {:?}\n  weights:   primary {}% / canary {}%  \
         (step {step} of {})\n  checks:    {} failed of threshold {}; {} analysis ticks\n  \
         revision:  {} (last promoted: {})\n",
        s.phase,
        100 - s.canary_weight,
        s.canary_weight,
        steps.len(),
        s.failed_checks,
        c.spec.analysis.threshold,
        s.iterations,
        s.last_applied_spec.as_deref().unwrap_or("-"),
        s.last_promoted_spec.as_deref().unwrap_or("-"),
    );
    if let Some(line) = gate_line(c) {
        out.push_str(&format!("  gate:      {line}\n"));
    }
    if let Some(d) = &s.decision {
        out.push_str(&decision_lines(d));
    }
    if !s.analysis.is_empty() {
        out.push_str("  gates:\n");
        out.push_str(&format!(
            "    {:<28} {:>10} {:>10} {:>14}  {:<13} test\n",
            "NAME", "CANARY", "PRIMARY", "SAMPLES c/p", "VERDICT"
        ));
        for g in &s.analysis {
            out.push_str(&format!(
                "    {:<28} {:>10} {:>10} {:>14}  {:<13} {}{}\n",
                g.name,
                num(g.canary),
                num(g.primary),
                format!("{}/{}", g.canary_samples, g.primary_samples),
                verdict(g.verdict),
                g.test,
                g.p_value
                    .map(|p| format!(" (p={p:.4})"))
                    .unwrap_or_default()
            ));
        }
    }
    if !s.history.is_empty() {
        out.push_str("  history:\n");
        for h in &s.history {
            out.push_str(&format!(
                "    {}  {:<16} {}\n",
                h.time.0.strftime("%H:%M:%S"),
                h.reason,
                h.message
            ));
        }
    }
    out
}

/// Why the rollout ended as it did: the outcome, the test, its statistic against its threshold,
/// the counts on each side, and the sentence a person reads first.
pub fn decision_lines(d: &DecisionExplanation) -> String {
    let outcome = match d.outcome {
        Outcome::Promoted => "promoted",
        Outcome::RolledBack => "rolled back",
        Outcome::Inconclusive => "inconclusive (rolled back without a verdict)",
        Outcome::Other => "decided by a person or a hook",
    };
    let mut out = format!("  decision:  {outcome}\n    {}\n", d.summary);
    if !d.test.is_empty() {
        out.push_str(&format!("    decided by: {} ({})\n", d.decided_by, d.test));
    }
    if let Some(stat) = d.statistic {
        let threshold = d
            .threshold
            .map(|t| format!(" against a threshold of {}", short(t)))
            .unwrap_or_default();
        out.push_str(&format!("    statistic:  {}{threshold}\n", short(stat)));
    }
    if d.canary_requests + d.primary_requests > 0 {
        out.push_str(&format!(
            "    counts:     canary {} events in {} requests, primary {} in {}\n",
            d.canary_events, d.canary_requests, d.primary_events, d.primary_requests
        ));
    }
    out
}

/// A number in the fewest characters that keep it readable: 1200, 0.013, 2.3e-5.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() < 0.001 || v.abs() >= 1e6) {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The JSON report.
pub fn to_json(c: &Canary, exit: u8) -> serde_json::Value {
    let s = c.status.clone().unwrap_or_default();
    json!({
        "name": c.metadata.name,
        "namespace": c.metadata.namespace,
        "phase": format!("{:?}", s.phase),
        "canaryWeight": s.canary_weight,
        "primaryWeight": 100 - s.canary_weight,
        "steps": steps(c),
        "failedChecks": s.failed_checks,
        "threshold": c.spec.analysis.threshold,
        "iterations": s.iterations,
        "revision": s.last_applied_spec,
        "lastPromotedRevision": s.last_promoted_spec,
        "gates": s.analysis,
        "decision": s.decision,
        "history": s.history,
        "exitCode": exit,
        "result": result_name(exit),
        "gate": gate_json(c),
    })
}

/// The markdown step summary for GitHub Actions.
pub fn github_summary(c: &Canary) -> String {
    let s = c.status.clone().unwrap_or_default();
    let name = c.metadata.name.clone().unwrap_or_default();
    let mut md = format!(
        "### Canary `{name}`: {:?}\n\n| | |\n|---|---|\n| weights | primary {}% / canary {}% \
         |\n| failed checks | {} of {} |\n| revision | `{}` |\n",
        s.phase,
        100 - s.canary_weight,
        s.canary_weight,
        s.failed_checks,
        c.spec.analysis.threshold,
        s.last_applied_spec.as_deref().unwrap_or("-"),
    );
    if let Some(line) = gate_line(c) {
        md.push_str(&format!("| gate | {} |\n", line.replace('|', "\\|")));
    }
    if let Some(d) = &s.decision {
        md.push_str(&format!(
            "| decision | {} |\n",
            d.summary.replace('|', "\\|")
        ));
    }
    md.push('\n');
    if !s.analysis.is_empty() {
        md.push_str("| gate | canary | primary | samples c/p | verdict | test |\n|---|---:|---:|---:|---|---|\n");
        for g in &s.analysis {
            md.push_str(&format!(
                "| {} | {} | {} | {}/{} | {} | {} |\n",
                g.name,
                num(g.canary),
                num(g.primary),
                g.canary_samples,
                g.primary_samples,
                verdict(g.verdict),
                g.test
            ));
        }
    }
    md
}

/// GitHub workflow commands for the outcome.
pub fn github_annotations(c: &Canary, exit: u8) -> String {
    let s = c.status.clone().unwrap_or_default();
    let name = c.metadata.name.clone().unwrap_or_default();
    let last = s
        .history
        .last()
        .map(|h| h.message.clone())
        .unwrap_or_default()
        .replace('\n', " ");
    let level = match exit {
        EXIT_SUCCEEDED => "notice",
        EXIT_WAITING_PROMOTION => "warning",
        _ => "error",
    };
    if exit == EXIT_WAITING_PROMOTION
        && let Some(g) = waiting_gate(c)
    {
        return format!(
            "::{level} title=Canary {name} waiting at {} gate::{} gate {} waits at canary weight {}%; open it with `{} --by <who>`\n",
            g.type_.name(),
            g.type_.name(),
            g.hooks.join(", "),
            s.canary_weight,
            open_command(c)
        );
    }
    format!(
        "::{level} title=Canary {name} {:?}::weight {}%, failed checks {}/{}: {last}\n",
        s.phase, s.canary_weight, s.failed_checks, c.spec.analysis.threshold
    )
}

/// Runs a `mesh rollout` command.
pub fn run(command: Command) -> ExitCode {
    // 4 is none of the rollout's outcomes: a usage or connection problem.
    let code = match command {
        Command::Status(args) => crate::runtime::block_on(false, status(args)),
        Command::Promote(args) => crate::runtime::block_on(false, promote(args)),
        Command::Abort(args) => {
            crate::runtime::block_on(false, request(args.name, args.at, args.by, Request::Abort))
        }
        Command::Pause(args) => crate::runtime::block_on(false, suspend(args, true)),
        Command::Resume(args) => crate::runtime::block_on(false, suspend(args, false)),
        Command::History(args) => crate::runtime::block_on(false, history(args)),
    };
    code.map_or(ExitCode::from(EXIT_ERROR), ExitCode::from)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Promote,
    Abort,
}

/// Who asked, when `--by` is not given: the GitHub Actions run when in one, else the user at
/// this host.
pub fn default_by(env: impl Fn(&str) -> Option<String>) -> String {
    if let (Some(repo), Some(run)) = (env("GITHUB_REPOSITORY"), env("GITHUB_RUN_ID")) {
        let server = env("GITHUB_SERVER_URL").unwrap_or_else(|| "https://github.com".into());
        return format!("{server}/{repo}/actions/runs/{run}");
    }
    let user = env("USER")
        .or_else(|| env("USERNAME"))
        .unwrap_or_else(|| "unknown".into());
    let host = env("HOSTNAME")
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// `--by`, checked, or the default.
fn requester(by: Option<String>) -> anyhow::Result<String> {
    let Some(by) = by else {
        return Ok(default_by(|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        }));
    };
    let by = by.trim().to_string();
    if by.is_empty() {
        anyhow::bail!("--by: must not be empty; name who or what asks (a CI run's URL, a person)");
    }
    if by.chars().any(char::is_control) {
        anyhow::bail!("--by {by:?}: must be one line of text, without control characters");
    }
    if by.len() > 1024 {
        anyhow::bail!("--by: {} bytes is too long; at most 1024", by.len());
    }
    Ok(by)
}

/// `mesh rollout promote`: open the waiting gate, or else promote now.
#[allow(clippy::print_stdout, reason = "the confirmation is the output")]
async fn promote(args: PromoteArgs) -> anyhow::Result<u8> {
    if args.now {
        return request(args.name, args.at, args.by, Request::Promote).await;
    }
    let by = requester(args.by.clone())?;
    let backend = Backend::connect(&args.at).await?;
    let c = fetch(&backend, &args.name).await?;
    let Some(gate) = waiting_gate(&c) else {
        return request(args.name, args.at, Some(by), Request::Promote).await;
    };
    patch(
        &backend,
        &args.name,
        &json!({"metadata": {"annotations": {
            OPEN_GATE_ANNOTATION: gate.id,
            OPEN_GATE_BY_ANNOTATION: by,
        }}}),
    )
    .await?;
    let next = match (gate.type_, gate.next_weight) {
        (_, Some(w)) => format!("the canary steps to weight {w} at its next passing analysis"),
        (mesh_crds::canary::WebhookType::ConfirmRollout, _) => "the rollout starts".into(),
        _ => "promotion follows".into(),
    };
    println!(
        "canary {}: {} gate {} opened by {by}; {next}; follow it with `mesh rollout status {} --watch`",
        args.name,
        gate.type_.name(),
        gate.hooks.join(", "),
        args.name
    );
    Ok(EXIT_SUCCEEDED)
}

/// `mesh rollout promote --now|abort`: annotate the Canary with the revision to act on, and
/// who asked; the controller carries it out on its next tick.
#[allow(clippy::print_stdout, reason = "the confirmation is the output")]
async fn request(name: String, at: Where, by: Option<String>, what: Request) -> anyhow::Result<u8> {
    let by = requester(by)?;
    let args = NameArgs { name, at };
    let backend = Backend::connect(&args.at).await?;
    let c = fetch(&backend, &args.name).await?;
    let phase = c.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let revision = match backend.target_revision(&c).await {
        Some(r) => r,
        None => c
            .status
            .as_ref()
            .and_then(|s| s.last_applied_spec.clone())
            .ok_or_else(|| anyhow::anyhow!("canary {:?} has no revision yet", args.name))?,
    };
    let applied = c.status.as_ref().and_then(|s| s.last_applied_spec.clone());
    let (verb, key, by_key, allowed): (&str, &str, &str, &[CanaryPhase]) = match what {
        Request::Promote => (
            "promote",
            PROMOTE_ANNOTATION,
            PROMOTE_BY_ANNOTATION,
            &[CanaryPhase::Progressing, CanaryPhase::WaitingPromotion],
        ),
        Request::Abort => (
            "abort",
            ABORT_ANNOTATION,
            ABORT_BY_ANNOTATION,
            &[
                CanaryPhase::Waiting,
                CanaryPhase::Progressing,
                CanaryPhase::WaitingPromotion,
            ],
        ),
    };
    // Right after `mesh apply` the controller may not have started the new revision yet;
    // the request names it anyway, and waits in the annotation until it applies.
    let pending = applied.as_deref() != Some(revision.as_str());
    if !pending && !allowed.contains(&phase) {
        anyhow::bail!(
            "canary {:?} is {phase:?}; there is no rollout in progress to {verb}",
            args.name
        );
    }
    patch(
        &backend,
        &args.name,
        &json!({"metadata": {"annotations": {key: revision, by_key: by}}}),
    )
    .await?;
    println!(
        "canary {}: {verb} of revision {revision} requested by {by}; follow it with `mesh rollout status {} --watch`",
        args.name, args.name
    );
    Ok(EXIT_SUCCEEDED)
}

/// `mesh rollout pause|resume`.
#[allow(clippy::print_stdout, reason = "the confirmation is the output")]
async fn suspend(args: NameArgs, on: bool) -> anyhow::Result<u8> {
    let backend = Backend::connect(&args.at).await?;
    let c = patch(&backend, &args.name, &json!({"spec": {"suspend": on}})).await?;
    let phase = c.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if on {
        println!(
            "canary {} paused at {phase:?}; `mesh rollout resume {}` lets it go on",
            args.name, args.name
        );
    } else {
        println!("canary {} resumed ({phase:?})", args.name);
    }
    Ok(EXIT_SUCCEEDED)
}

/// `mesh rollout history`.
#[allow(clippy::print_stdout, reason = "the history is the output")]
async fn history(args: HistoryArgs) -> anyhow::Result<u8> {
    let c = fetch(&Backend::connect(&args.at).await?, &args.name).await?;
    let h = c.status.map(|s| s.history).unwrap_or_default();
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(EXIT_SUCCEEDED);
    }
    if h.is_empty() {
        println!("canary {} has no recorded events yet", args.name);
        return Ok(EXIT_SUCCEEDED);
    }
    println!("{:<20}  {:<7} {:<16} MESSAGE", "TIME", "TYPE", "REASON");
    for e in &h {
        println!(
            "{:<20}  {:<7} {:<16} {}",
            e.time.0.strftime("%Y-%m-%dT%H:%M:%SZ"),
            if e.warning { "Warning" } else { "Normal" },
            e.reason,
            e.message
        );
    }
    Ok(EXIT_SUCCEEDED)
}

#[allow(clippy::print_stdout, reason = "the report is the output")]
async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let timeout = mesh_core::duration::parse(&args.timeout)
        .map_err(|e| anyhow::anyhow!("--timeout {:?}: {e}", args.timeout))?;
    let backend = Backend::connect(&args.at).await?;
    let started = Instant::now();
    let mut last = String::new();
    let (canary, code) = loop {
        let c = fetch(&backend, &args.name).await?;
        let wanted = backend.target_revision(&c).await;
        let done = exit_code_for(&c, wanted.as_deref());
        if args.watch && args.output != Output::Json {
            let line = progress_line(&c);
            if line != last {
                println!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
                last = line;
            }
        }
        match done {
            Some(code) => break (c, code),
            None if !args.watch || started.elapsed() >= timeout => break (c, EXIT_TIMED_OUT),
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&to_json(&canary, code))?),
        Output::Text => print!("{}", render(&canary)),
        Output::Github => {
            print!("{}", render(&canary));
            print!("{}", github_annotations(&canary, code));
            if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening $GITHUB_STEP_SUMMARY {path:?}"))?;
                f.write_all(github_summary(&canary).as_bytes())?;
            }
        }
    }
    Ok(code)
}

/// What the dashboard's buttons do: exactly `mesh rollout promote|abort|pause|resume NAME
/// --by BY`, so each is checked and recorded in the rollout's history the same way.
pub async fn act(at: &Where, name: &str, action: &str, by: &str) -> anyhow::Result<()> {
    let name = name.to_string();
    let at = at.clone();
    let by = Some(by.to_string());
    match action {
        "promote" => promote(PromoteArgs {
            name,
            by,
            now: false,
            at,
        })
        .await
        .map(drop),
        "abort" => request(name, at, by, Request::Abort).await.map(drop),
        "pause" => suspend(NameArgs { name, at }, true).await.map(drop),
        "resume" => suspend(NameArgs { name, at }, false).await.map(drop),
        other => anyhow::bail!("unknown action {other:?}: want promote, abort, pause or resume"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary_in(phase: CanaryPhase) -> Canary {
        let mut c: Canary = serde_json::from_value(json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "service": {"port": 80},
                "analysis": {"interval": "10s", "threshold": 2, "stepWeight": 10},
            },
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        c.status = Some(mesh_crds::CanaryStatus {
            phase,
            ..Default::default()
        });
        c
    }

    #[test]
    fn exit_codes_follow_the_phase() {
        let code = |p| exit_code(&canary_in(p));
        assert_eq!(code(CanaryPhase::Succeeded), Some(EXIT_SUCCEEDED));
        assert_eq!(code(CanaryPhase::Initialized), Some(EXIT_SUCCEEDED));
        assert_eq!(code(CanaryPhase::Failed), Some(EXIT_FAILED));
        assert_eq!(
            code(CanaryPhase::WaitingPromotion),
            Some(EXIT_WAITING_PROMOTION)
        );
        for p in [
            CanaryPhase::Initializing,
            CanaryPhase::Waiting,
            CanaryPhase::Progressing,
            CanaryPhase::Promoting,
            CanaryPhase::Finalising,
        ] {
            assert_eq!(code(p), None, "{p:?} is in progress");
        }
        let waiting = canary_in(CanaryPhase::WaitingPromotion);
        assert!(
            github_annotations(&waiting, EXIT_WAITING_PROMOTION).starts_with("::warning "),
            "{}",
            github_annotations(&waiting, EXIT_WAITING_PROMOTION)
        );
    }

    fn gated(phase: CanaryPhase, kind: mesh_crds::canary::WebhookType, waiting: bool) -> Canary {
        let mut c = canary_in(phase);
        let since = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        if let Some(s) = c.status.as_mut() {
            s.last_applied_spec = Some("rev-2".into());
            s.gate = Some(GateStatus {
                type_: kind,
                hooks: vec!["approval".into()],
                id: "confirm-x/0/rev-2/1".into(),
                revision: "rev-2".into(),
                weight: 0,
                next_weight: None,
                since: since.clone(),
                opened_at: (!waiting).then(|| since.clone()),
                opened_by: (!waiting).then(|| "https://ci/run/1".into()),
            });
        }
        c
    }

    #[test]
    fn a_waiting_gate_exits_3_and_says_how_to_open_it() {
        use mesh_crds::canary::WebhookType::{
            ConfirmPromotion, ConfirmRollout, ConfirmTrafficIncrease,
        };
        let c = gated(CanaryPhase::Progressing, ConfirmTrafficIncrease, true);
        assert_eq!(exit_code(&c), Some(EXIT_WAITING_PROMOTION));
        assert_eq!(
            exit_code(&gated(
                CanaryPhase::Progressing,
                ConfirmTrafficIncrease,
                false
            )),
            None,
            "an opened gate no longer holds the rollout"
        );
        let j = to_json(&c, EXIT_WAITING_PROMOTION);
        assert_eq!(j["result"], "waiting-promotion");
        assert_eq!(j["gate"]["type"], "confirm-traffic-increase");
        assert_eq!(j["gate"]["waiting"], true);
        assert_eq!(j["gate"]["openWith"], "mesh rollout promote web -n default");
        assert!(render(&c).contains("open it with `mesh rollout promote web -n default`"));
        assert!(
            progress_line(&c).ends_with("waiting at confirm-traffic-increase gate approval"),
            "{}",
            progress_line(&c)
        );
        assert!(
            github_annotations(&c, EXIT_WAITING_PROMOTION).starts_with(
                "::warning title=Canary web waiting at confirm-traffic-increase gate::"
            )
        );

        // confirm-rollout waits before the status takes the new revision on.
        let mut waiting = gated(CanaryPhase::Waiting, ConfirmRollout, true);
        if let Some(s) = waiting.status.as_mut() {
            s.last_applied_spec = Some("rev-1".into());
        }
        assert_eq!(
            exit_code_for(&waiting, Some("rev-2")),
            Some(EXIT_WAITING_PROMOTION)
        );
        assert_eq!(
            exit_code_for(&waiting, Some("rev-3")),
            None,
            "another revision"
        );

        // Right after `mesh rollout promote` the rollout is on its way, no longer waiting.
        let mut asked = gated(CanaryPhase::WaitingPromotion, ConfirmPromotion, true);
        asked.metadata.annotations = Some(
            [(
                OPEN_GATE_ANNOTATION.to_string(),
                "confirm-x/0/rev-2/1".to_string(),
            )]
            .into(),
        );
        assert_eq!(exit_code(&asked), None);
        asked.metadata.annotations = Some(
            [(
                OPEN_GATE_ANNOTATION.to_string(),
                "an-older-wait".to_string(),
            )]
            .into(),
        );
        assert_eq!(exit_code(&asked), Some(EXIT_WAITING_PROMOTION));
        asked.metadata.annotations =
            Some([(PROMOTE_ANNOTATION.to_string(), "rev-2".to_string())].into());
        assert_eq!(exit_code(&asked), None, "promote now was asked");

        let opened = gated(CanaryPhase::Succeeded, ConfirmPromotion, false);
        let j = to_json(&opened, EXIT_SUCCEEDED);
        assert_eq!(j["result"], "promoted");
        assert_eq!(j["gate"]["openedBy"], "https://ci/run/1");
        assert!(
            github_summary(&opened).contains("| gate | confirm-promotion approval opened at"),
            "{}",
            github_summary(&opened)
        );
        assert_eq!(j["gate"]["waiting"], false);
        assert!(j["gate"].get("openWith").is_none());
        assert_eq!(
            to_json(&canary_in(CanaryPhase::Failed), 1)["gate"],
            json!(null)
        );
    }

    #[test]
    fn a_decision_is_rendered_with_its_test_statistic_and_counts() {
        let mut c = canary_in(CanaryPhase::Failed);
        let d = DecisionExplanation {
            outcome: Outcome::RolledBack,
            decided_by: "canary-vs-primary-errors".into(),
            test: "sequential likelihood ratio per window".into(),
            statistic: Some(2.8e26),
            threshold: Some(500.0),
            canary_requests: 2_500,
            canary_events: 40,
            primary_requests: 10_000,
            primary_events: 0,
            summary: "Rolled back by canary-vs-primary-errors: 40 of 2500 canary requests failed."
                .into(),
        };
        c.status.as_mut().unwrap().decision = Some(d);
        let text = render(&c);
        assert!(text.contains("decision:  rolled back"), "{text}");
        assert!(text.contains("40 of 2500 canary requests failed"), "{text}");
        assert!(
            text.contains("statistic:  2.8e26 against a threshold of 500"),
            "{text}"
        );
        assert!(
            text.contains("counts:     canary 40 events in 2500 requests, primary 0 in 10000"),
            "{text}"
        );
        assert_eq!(to_json(&c, 1)["decision"]["outcome"], "RolledBack");
        assert!(github_summary(&c).contains("| decision | Rolled back by"));
    }

    #[test]
    fn results_follow_exit_codes() {
        assert_eq!(result_name(EXIT_SUCCEEDED), "promoted");
        assert_eq!(result_name(EXIT_FAILED), "rolled-back");
        assert_eq!(result_name(EXIT_TIMED_OUT), "timed-out");
        assert_eq!(result_name(EXIT_WAITING_PROMOTION), "waiting-promotion");
    }

    #[test]
    fn the_requester_defaults_to_the_ci_run_or_the_user_at_this_host() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(
            default_by(env(&[
                ("GITHUB_REPOSITORY", "acme/web"),
                ("GITHUB_RUN_ID", "42"),
                ("USER", "runner")
            ])),
            "https://github.com/acme/web/actions/runs/42"
        );
        assert_eq!(
            default_by(env(&[
                ("GITHUB_SERVER_URL", "https://ghe.example"),
                ("GITHUB_REPOSITORY", "acme/web"),
                ("GITHUB_RUN_ID", "42")
            ])),
            "https://ghe.example/acme/web/actions/runs/42"
        );
        assert_eq!(
            default_by(env(&[("USER", "alice"), ("HOSTNAME", "laptop")])),
            "alice@laptop"
        );
        assert!(requester(Some("  ".into())).is_err());
        assert!(requester(Some("a\nb".into())).is_err());
        assert_eq!(
            requester(Some(" https://ci/run/1 ".into())).ok().as_deref(),
            Some("https://ci/run/1")
        );
    }
}
