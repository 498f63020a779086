//! The Canary state machine: given the spec, the stored status and what was just observed, it
//! returns the next status and the actions to carry out. It does no I/O and reads no clock, so
//! every transition is unit-tested, and a controller that crashes resumes from the stored status.
//!
//! The phases and their meaning are Flagger's:
//!
//! ```text
//! Initializing ─primary ready─► Initialized ─new revision─► Progressing ─┬─ max weight + pass ─► Promoting ─► Finalising ─► Succeeded
//!                                   ▲      (Waiting while confirm-rollout says no)          │ (WaitingPromotion while confirm-promotion says no)
//!                                   └──────────────── new revision ◄── Failed ◄── failedChecks >= threshold, deadline, rollback hook
//! ```
//!
//! A confirm-* hook without a URL is a gate the mesh holds itself: the machine records the wait
//! in `status.gate` (with an id naming that wait alone) and an event, and the gate opens when
//! [`Observations::gate_open`] names that id (`mesh rollout promote` writes it). Everything it
//! needs to resume lives in the status, so a restarted controller keeps waiting, or goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use mesh_crds::canary::{
    AnalysisTotals, DecisionExplanation, GateResult, GateStatus, Outcome, Verdict, WebhookType,
};
use mesh_crds::{CanaryPhase, CanarySpec, CanaryStatus};

use crate::duration;
use crate::judge::{self, JudgeConfig, Window};
use crate::schedule::{Schedule, elapsed, time};

/// The condition `kubectl wait --for=condition=Promoted` waits on.
pub const PROMOTED: &str = "Promoted";
/// Flagger's default progress deadline.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

/// What the controller saw just before this step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// The time of the observation.
    pub now: DateTime<Utc>,
    /// Checksum of the canary target's current template (the revision under test).
    pub revision: String,
    /// The primary has all its replicas ready.
    pub primary_ready: bool,
    /// The canary has all its replicas ready.
    pub canary_ready: bool,
    /// Traffic since the last analysis tick, when it is time for one.
    pub window: Option<Window>,
    /// Between analysis ticks, the traffic since the last tick so far, when the controller
    /// looked ([`JudgeConfig::look_between_ticks`]) and the metric source could read it
    /// without moving its baseline. Only the failure comparison reads it, to roll back sooner.
    pub look: Option<Window>,
    /// Values of MetricTemplate-backed metrics, by metric name.
    pub custom_metrics: BTreeMap<String, Option<f64>>,
    /// Outcomes of the gating webhooks named by [`due_webhooks`], by hook name: `true` when the
    /// hook answered 2xx in time.
    pub webhooks: BTreeMap<String, bool>,
    /// What a person asked for this revision (`mesh rollout promote|abort`).
    pub request: Option<UserRequest>,
    /// Who or what made [`Self::request`], when it was recorded (`--by`).
    pub request_by: Option<String>,
    /// A request to open a gate the mesh holds (`mesh rollout promote` while one waits).
    pub gate_open: Option<GateOpening>,
}

/// A request to open the wait at a gate the mesh holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateOpening {
    /// The [`GateStatus::id`] of the wait it opens; any other wait stays closed.
    pub id: String,
    /// Who or what opened it.
    pub by: String,
}

/// A person's request about the rollout of the current revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserRequest {
    /// Promote now, skipping the rest of the analysis and every confirm-promotion gate.
    Promote,
    /// Roll back now.
    Abort,
}

/// Something the driver must do. Actions are idempotent: repeating one after a crash is safe.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create (or keep) the primary running the current revision.
    InitializePrimary,
    /// Route traffic: weights in percent, summing to 100.
    SetWeights {
        /// The primary's share.
        primary: i32,
        /// The canary's share.
        canary: i32,
    },
    /// Run the canary (new revision detected).
    ScaleCanaryUp,
    /// Stop the canary (after promotion or rollback).
    ScaleCanaryDown,
    /// Make the primary run the canary's revision.
    Promote,
    /// Tell notification hooks of the given type (post-rollout, event) what happened.
    Notify(WebhookType),
    /// Record an event for people.
    Event {
        /// Machine-readable reason, e.g. `Promoted`.
        reason: &'static str,
        /// What happened.
        message: String,
        /// Whether it is a warning.
        warning: bool,
    },
}

/// The outcome of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The status to store.
    pub status: CanaryStatus,
    /// The actions to carry out, in order.
    pub actions: Vec<Action>,
}

/// A spec the machine cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// `analysis.interval` does not parse.
    #[error("spec.analysis.interval: {0}")]
    Interval(#[from] duration::DurationError),
    /// No way to step weights.
    #[error("spec.analysis: one of stepWeight, stepWeights or iterations is required")]
    NoSteps,
}

/// Which gating webhooks the driver should call before [`step`], given the phase the canary is
/// in and whether it is an analysis tick. The driver passes their outcomes in
/// [`Observations::webhooks`].
pub fn due_webhooks(
    spec: &CanarySpec,
    status: &CanaryStatus,
    schedule: &Schedule,
    revision: &str,
    now: DateTime<Utc>,
) -> Vec<(WebhookType, String)> {
    let kinds: &[WebhookType] = match status.phase {
        CanaryPhase::Initialized | CanaryPhase::Succeeded | CanaryPhase::Failed
            if status.last_applied_spec.as_deref() != Some(revision) =>
        {
            &[WebhookType::ConfirmRollout]
        }
        CanaryPhase::Waiting => &[WebhookType::ConfirmRollout],
        CanaryPhase::Progressing if schedule.due(status, now) => &[
            WebhookType::PreRollout,
            WebhookType::Rollout,
            WebhookType::Rollback,
            WebhookType::ConfirmTrafficIncrease,
            WebhookType::ConfirmPromotion,
        ],
        CanaryPhase::WaitingPromotion => &[WebhookType::ConfirmPromotion],
        _ => &[],
    };
    spec.analysis
        .webhooks
        .iter()
        // A hook without a URL is a gate the mesh holds: nothing to call.
        .filter(|h| h.url.is_some())
        .filter(|h| kinds.contains(&h.type_.unwrap_or(WebhookType::Rollout)))
        .filter(|h| {
            // Pre-rollout hooks run once, before the first weight step.
            h.type_ != Some(WebhookType::PreRollout) || status.iterations == 0
        })
        .map(|h| (h.type_.unwrap_or(WebhookType::Rollout), h.name.clone()))
        .collect()
}

/// Whether every hook of `kind` that has a URL answered yes.
fn url_hooks_pass(spec: &CanarySpec, obs: &Observations, kind: WebhookType) -> bool {
    spec.analysis
        .webhooks
        .iter()
        .filter(|h| h.url.is_some() && h.type_.unwrap_or(WebhookType::Rollout) == kind)
        .all(|h| obs.webhooks.get(&h.name).copied().unwrap_or(false))
}

/// The names of the hooks of `kind` that are gates the mesh holds (no URL).
pub fn builtin_gates(spec: &CanarySpec, kind: WebhookType) -> Vec<String> {
    spec.analysis
        .webhooks
        .iter()
        .filter(|h| h.is_builtin_gate() && h.type_ == Some(kind))
        .map(|h| h.name.clone())
        .collect()
}

/// The id of a wait: its gate, weight and revision, and the time it began, so that no other
/// wait (a later step, or the same gate in a later rollout of the same revision) shares it.
fn gate_id(kind: WebhookType, weight: i32, revision: &str, now: DateTime<Utc>) -> String {
    format!(
        "{}/{weight}/{revision}/{}",
        kind.name(),
        now.timestamp_millis()
    )
}

fn any_hook_fired(spec: &CanarySpec, obs: &Observations, kind: WebhookType) -> Option<String> {
    spec.analysis
        .webhooks
        .iter()
        .filter(|h| h.url.is_some() && h.type_ == Some(kind))
        .find(|h| obs.webhooks.get(&h.name).copied().unwrap_or(false))
        .map(|h| h.name.clone())
}

/// The weights a rollout steps through, ending at the maximum.
pub fn weight_steps(spec: &CanarySpec) -> Result<Vec<i32>, SpecError> {
    let a = &spec.analysis;
    if let Some(steps) = a.step_weights.as_ref().filter(|s| !s.is_empty()) {
        return Ok(steps.clone());
    }
    if let Some(step) = a.step_weight.filter(|s| *s > 0) {
        let max = a.max_weight.unwrap_or(50);
        let mut w = Vec::new();
        let mut next = step;
        while next < max {
            w.push(next);
            next += step;
        }
        w.push(max);
        return Ok(w);
    }
    if a.iterations.is_some() {
        // Blue/green: the canary is analysed on test traffic, at weight 0, then promoted.
        return Ok(Vec::new());
    }
    Err(SpecError::NoSteps)
}

/// Advances the rollout by one step.
pub fn step(
    spec: &CanarySpec,
    status: &CanaryStatus,
    obs: &Observations,
    config: &JudgeConfig,
) -> Result<Step, SpecError> {
    let schedule = Schedule::of(spec)?;
    let steps = weight_steps(spec)?;
    let mut m = Machine {
        spec,
        obs,
        config,
        status: status.clone(),
        actions: Vec::new(),
        schedule,
        steps,
    };
    m.run();
    Ok(Step {
        status: m.status,
        actions: m.actions,
    })
}

struct Machine<'a> {
    spec: &'a CanarySpec,
    obs: &'a Observations,
    config: &'a JudgeConfig,
    status: CanaryStatus,
    actions: Vec<Action>,
    schedule: Schedule,
    steps: Vec<i32>,
}

impl Machine<'_> {
    fn run(&mut self) {
        if self.spec.suspend {
            return;
        }
        let new_revision = self.status.last_applied_spec.as_deref() != Some(&self.obs.revision);
        if self.user_request(new_revision) {
            return;
        }
        self.open_gate();
        match self.status.phase {
            CanaryPhase::Initializing => self.initializing(),
            CanaryPhase::Initialized | CanaryPhase::Succeeded | CanaryPhase::Failed
                if new_revision =>
            {
                self.start();
            }
            CanaryPhase::Waiting => self.start(),
            CanaryPhase::Progressing | CanaryPhase::WaitingPromotion if new_revision => {
                self.event(
                    "RevisionChanged",
                    format!(
                        "new revision {} detected during the rollout; restarting analysis",
                        self.obs.revision
                    ),
                    false,
                );
                self.start();
            }
            CanaryPhase::Progressing => self.progressing(),
            CanaryPhase::WaitingPromotion => {
                if self.confirmed(WebhookType::ConfirmPromotion, None) {
                    self.promote();
                }
            }
            CanaryPhase::Promoting => self.promoting(),
            CanaryPhase::Finalising => self.finalising(),
            CanaryPhase::Initialized | CanaryPhase::Succeeded | CanaryPhase::Failed => {}
        }
    }

    /// Carries out `mesh rollout promote|abort`; `true` when it did.
    fn user_request(&mut self, new_revision: bool) -> bool {
        use CanaryPhase::{Progressing, Waiting, WaitingPromotion};
        match (self.obs.request, self.status.phase) {
            (Some(UserRequest::Abort), Waiting | Progressing | WaitingPromotion)
                if self.status.phase == Waiting || !new_revision =>
            {
                self.status.last_applied_spec = Some(self.obs.revision.clone());
                self.rollback(format!(
                    "rollout of {} aborted by request{}",
                    self.obs.revision,
                    self.requested_by()
                ));
                true
            }
            (Some(UserRequest::Promote), Progressing | WaitingPromotion) if !new_revision => {
                self.event(
                    "ManualPromotion",
                    format!(
                        "promotion of {} requested at canary weight {}{}; skipping the rest of the analysis and any gate",
                        self.obs.revision,
                        self.status.canary_weight,
                        self.requested_by()
                    ),
                    false,
                );
                self.drop_waiting_gate();
                self.promote();
                true
            }
            _ => false,
        }
    }

    fn requested_by(&self) -> String {
        self.obs
            .request_by
            .as_ref()
            .map(|by| format!(" by {by}"))
            .unwrap_or_default()
    }

    /// Opens the waiting gate when a request names it.
    fn open_gate(&mut self) {
        let Some(open) = &self.obs.gate_open else {
            return;
        };
        let Some(gate) = self.status.gate.as_mut() else {
            return;
        };
        if !gate.waiting() || gate.id != open.id {
            return;
        }
        gate.opened_at = Some(time(self.obs.now));
        gate.opened_by = Some(open.by.clone());
        // Opening a gate is progress: the deadline counts from here, not from the wait.
        self.status.last_progress_time = Some(time(self.obs.now));
        let what = match gate.next_weight {
            Some(w) => format!("; the canary may step to weight {w} at the next passing analysis"),
            None => String::new(),
        };
        let message = format!(
            "{} gate {} opened by {}{what}",
            gate.type_.name(),
            gate.hooks.join(", "),
            open.by
        );
        self.event("GateOpened", message, false);
    }

    /// Whether the hooks of `kind` let the rollout on: those with a URL answered yes, and the
    /// gate the mesh holds for the url-less ones, if any, was opened for this wait. A wait
    /// that has not begun yet begins here (recorded in the status and the history).
    /// `next_weight` is the step a confirm-traffic-increase gate lets the canary take.
    fn confirmed(&mut self, kind: WebhookType, next_weight: Option<i32>) -> bool {
        let urls = url_hooks_pass(self.spec, self.obs, kind);
        let hooks = builtin_gates(self.spec, kind);
        if hooks.is_empty() {
            return urls;
        }
        let weight = self.status.canary_weight;
        let this_wait = |g: &GateStatus| {
            g.type_ == kind && g.revision == self.obs.revision && g.weight == weight
        };
        match &self.status.gate {
            Some(g) if this_wait(g) && !g.waiting() => return urls,
            Some(g) if this_wait(g) => return false,
            _ => {}
        }
        let gate = GateStatus {
            type_: kind,
            hooks,
            id: gate_id(kind, weight, &self.obs.revision, self.obs.now),
            revision: self.obs.revision.clone(),
            weight,
            next_weight,
            since: time(self.obs.now),
            opened_at: None,
            opened_by: None,
        };
        let at = match next_weight {
            Some(w) => format!("before the step from canary weight {weight} to {w}"),
            None if kind == WebhookType::ConfirmRollout => {
                format!("before the rollout of {} starts", self.obs.revision)
            }
            None => format!("at canary weight {weight}"),
        };
        let message = format!(
            "{} gate {} waits {at}: `mesh rollout promote` opens it",
            kind.name(),
            gate.hooks.join(", ")
        );
        self.status.gate = Some(gate);
        self.event("GateWaiting", message, false);
        false
    }

    /// Whether a gate the mesh holds waits for this revision.
    fn gate_waits(&self) -> bool {
        self.status
            .gate
            .as_ref()
            .is_some_and(|g| g.waiting() && g.revision == self.obs.revision)
    }

    /// Whether the next weight step is the one a gate the mesh holds waits (or waited) at.
    fn gate_holds_this_step(&self) -> bool {
        self.status.gate.as_ref().is_some_and(|g| {
            g.type_ == WebhookType::ConfirmTrafficIncrease
                && g.revision == self.obs.revision
                && g.weight == self.status.canary_weight
        })
    }

    /// Forgets a wait the rollout will not pass (promoted now, rolled back, restarted); the
    /// history keeps what happened.
    fn drop_waiting_gate(&mut self) {
        if self.status.gate.as_ref().is_some_and(GateStatus::waiting) {
            self.status.gate = None;
        }
    }

    fn initializing(&mut self) {
        self.actions.push(Action::InitializePrimary);
        self.actions.push(Action::SetWeights {
            primary: 100,
            canary: 0,
        });
        if self.status.last_progress_time.is_none() {
            self.status.last_progress_time = Some(time(self.obs.now));
        }
        if self.obs.primary_ready {
            self.actions.push(Action::ScaleCanaryDown);
            self.status.last_applied_spec = Some(self.obs.revision.clone());
            self.status.last_promoted_spec = Some(self.obs.revision.clone());
            self.status.canary_weight = 0;
            self.transition(CanaryPhase::Initialized);
            self.event(
                "Initialized",
                "primary is ready and serves all traffic".into(),
                false,
            );
        }
    }

    /// A new revision: start (or restart) a rollout.
    fn start(&mut self) {
        if self
            .status
            .gate
            .as_ref()
            .is_some_and(|g| g.revision != self.obs.revision)
        {
            // The last rollout's gate: this rollout starts with none.
            self.status.gate = None;
        }
        let urls = url_hooks_pass(self.spec, self.obs, WebhookType::ConfirmRollout);
        if !self.confirmed(WebhookType::ConfirmRollout, None) {
            if self.status.phase != CanaryPhase::Waiting {
                self.transition(CanaryPhase::Waiting);
                if !urls {
                    self.event(
                        "Waiting",
                        "waiting for confirm-rollout webhooks to approve".into(),
                        false,
                    );
                }
            }
            return;
        }
        self.status.last_applied_spec = Some(self.obs.revision.clone());
        self.status.canary_weight = 0;
        self.status.failed_checks = 0;
        self.status.iterations = 0;
        self.status.analysis.clear();
        self.status.decision = None;
        self.status.totals = Some(AnalysisTotals::default());
        self.status.last_analysis_time = None;
        self.status.last_progress_time = Some(time(self.obs.now));
        self.actions.push(Action::ScaleCanaryUp);
        self.actions.push(Action::SetWeights {
            primary: 100,
            canary: 0,
        });
        if self.spec.skip_analysis {
            self.event(
                "SkipAnalysis",
                format!("skipAnalysis is set: promoting {}", self.obs.revision),
                false,
            );
            self.promote();
            return;
        }
        self.transition(CanaryPhase::Progressing);
        self.event(
            "Progressing",
            format!(
                "new revision {} detected; starting the analysis",
                self.obs.revision
            ),
            false,
        );
    }

    fn deadline(&self) -> Duration {
        self.spec
            .progress_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_PROGRESS_DEADLINE, Duration::from_secs)
    }

    fn since_progress(&self) -> Duration {
        self.status
            .last_progress_time
            .as_ref()
            .map(|t| elapsed(t, self.obs.now))
            .unwrap_or_default()
    }

    fn progressing(&mut self) {
        if !self.obs.canary_ready {
            if self.since_progress() > self.deadline() {
                self.rollback(format!(
                    "canary not ready within progressDeadlineSeconds ({}s)",
                    self.deadline().as_secs()
                ));
            }
            return;
        }
        if !self.schedule.due(&self.status, self.obs.now) {
            if let Some(window) = &self.obs.look {
                self.look(window);
            }
            return;
        }
        self.status.last_analysis_time = Some(time(self.obs.now));
        if let Some(name) = any_hook_fired(self.spec, self.obs, WebhookType::Rollback) {
            self.rollback(format!("rollback webhook {name} asked for a rollback"));
            return;
        }

        let verdict = self.analyse();
        match verdict {
            Verdict::Fail => {
                let failing: Vec<GateResult> = self
                    .status
                    .analysis
                    .iter()
                    .filter(|g| g.verdict == Verdict::Fail)
                    .cloned()
                    .collect();
                let messages: Vec<&str> = failing.iter().map(|g| g.message.as_str()).collect();
                // A sequential comparison's failure is final: its error rate already holds under
                // checking at every tick, so `threshold` has nothing to forgive. Only the
                // absolute gates and webhooks, judged afresh on each window, count towards it.
                if let Some(g) = failing.iter().find(|g| judge::is_sequential(&g.name)) {
                    let totals = self.status.totals.clone().unwrap_or_default();
                    let msg = format!("sequential check failed: {}", messages.join("; "));
                    self.sequential_rollback(g, &totals, msg);
                    return;
                }
                self.status.failed_checks += 1;
                let msg = format!(
                    "check failed ({}/{}): {}",
                    self.status.failed_checks,
                    self.spec.analysis.threshold,
                    messages.join("; ")
                );
                self.event("CheckFailed", msg.clone(), true);
                if self.status.failed_checks >= self.spec.analysis.threshold {
                    let totals = self.status.totals.clone().unwrap_or_default();
                    let explanation = failing.first().map(|g| {
                        judge::explain_rollback(g, &totals, self.config, self.status.failed_checks)
                    });
                    self.rollback(msg);
                    self.status.decision = explanation;
                }
            }
            // At weight 0 the canary has no traffic to judge, so, as in Flagger, the first
            // step only needs the gates that can answer (webhooks) not to fail; the same holds
            // while a gate the mesh holds keeps it at weight 0.
            Verdict::Inconclusive
                if self.status.canary_weight == 0
                    && (self.status.iterations == 0 || self.gate_holds_this_step())
                    && !self.steps.is_empty() =>
            {
                self.advance();
            }
            Verdict::Inconclusive => self.hold(),
            // At the last step, promotion also needs the evidence the guarantee asks for.
            Verdict::Pass if self.at_last_step() && !self.guarantee_shown() => self.hold(),
            Verdict::Pass => self.advance(),
        }
    }

    /// A look between analysis ticks: rolls back when the failure comparison, on the evidence
    /// so far and the traffic since the last tick, already fails; otherwise changes nothing
    /// (the next tick reads the whole interval), so a look costs no status write.
    fn look(&mut self, window: &Window) {
        if self.status.canary_weight == 0 {
            return;
        }
        let Some(totals) = &self.status.totals else {
            return;
        };
        let (totals, gate) = judge::look(totals, window, &self.status.analysis, self.config);
        if gate.verdict != Verdict::Fail {
            return;
        }
        let msg = format!(
            "sequential check failed between analysis ticks: {}",
            gate.message
        );
        match self
            .status
            .analysis
            .iter_mut()
            .find(|g| g.name == judge::COMPARE_ERRORS)
        {
            Some(g) => *g = gate.clone(),
            None => self.status.analysis.push(gate.clone()),
        }
        self.status.totals = Some(totals.clone());
        self.sequential_rollback(&gate, &totals, msg);
    }

    /// Rolls back on the failed sequential comparison `gate`, whatever `threshold` says (its
    /// error rate already holds under repeated looks), with the decision that explains it.
    fn sequential_rollback(&mut self, gate: &GateResult, totals: &AnalysisTotals, msg: String) {
        let explanation =
            judge::explain_rollback(gate, totals, self.config, self.status.failed_checks);
        self.event("CheckFailed", msg.clone(), true);
        self.rollback(msg);
        self.status.decision = Some(explanation);
    }

    /// Keeps the weight while the analysis cannot conclude; past the deadline the rollout ends
    /// inconclusive: rolled back without a verdict on the canary, and said so.
    fn hold(&mut self) {
        // Waiting for a person is not a lack of progress.
        if !self.gate_waits() && self.since_progress() > self.deadline() {
            let why = format!(
                "no conclusive analysis within progressDeadlineSeconds ({}s)",
                self.deadline().as_secs()
            );
            let guarantee = self
                .status
                .analysis
                .iter()
                .find(|g| g.name == judge::PROMOTION_GUARANTEE)
                .cloned();
            let explanation =
                judge::explain_inconclusive(self.status.totals.as_ref(), guarantee.as_ref(), &why);
            self.rollback(why);
            self.status.decision = Some(explanation);
            self.set_condition_reason("Inconclusive");
        }
    }

    /// Whether the canary is at the weight after which a passing analysis promotes.
    fn at_last_step(&self) -> bool {
        !self.steps.is_empty() && !self.steps.iter().any(|w| *w > self.status.canary_weight)
    }

    /// Whether this tick's promotion guarantee gate passed.
    fn guarantee_shown(&self) -> bool {
        self.status
            .analysis
            .iter()
            .any(|g| g.name == judge::PROMOTION_GUARANTEE && g.verdict == Verdict::Pass)
    }

    fn set_condition_reason(&mut self, reason: &str) {
        for c in &mut self.status.conditions {
            if c.type_ == PROMOTED {
                c.reason = reason.to_string();
                c.message =
                    "no conclusive analysis: rolled back without a verdict on the canary".into();
            }
        }
    }

    /// Runs every gate on this tick's observations, storing the results in the status.
    fn analyse(&mut self) -> Verdict {
        let mut gates: Vec<GateResult> = Vec::new();
        let window = self.obs.window.clone().unwrap_or_default();
        let mut totals = self.status.totals.clone().unwrap_or_default();
        judge::accumulate(&mut totals, &window, self.config);
        gates.extend(judge::threshold_gates(
            &self.spec.analysis.metrics,
            &window,
            &self.obs.custom_metrics,
            self.config,
        ));
        gates.extend(judge::sequential_gates(
            &totals,
            &self.status.analysis,
            self.config,
        ));
        for (kind, label) in [
            (WebhookType::PreRollout, "pre-rollout"),
            (WebhookType::Rollout, "rollout"),
        ] {
            for hook in self
                .spec
                .analysis
                .webhooks
                .iter()
                .filter(|h| h.type_.unwrap_or(WebhookType::Rollout) == kind)
            {
                if kind == WebhookType::PreRollout && self.status.iterations > 0 {
                    continue;
                }
                let ok = self.obs.webhooks.get(&hook.name).copied().unwrap_or(false);
                gates.push(GateResult {
                    name: hook.name.clone(),
                    canary: None,
                    primary: None,
                    canary_samples: 0,
                    primary_samples: 0,
                    test: format!("{label} webhook answers 2xx"),
                    p_value: None,
                    verdict: if ok { Verdict::Pass } else { Verdict::Fail },
                    message: if ok {
                        format!("{label} webhook {} passed", hook.name)
                    } else {
                        format!("{label} webhook {} failed or timed out", hook.name)
                    },
                });
            }
        }
        self.status.totals = Some(totals);
        let verdict = judge::overall(&gates);
        self.status.analysis = gates;
        verdict
    }

    fn advance(&mut self) {
        self.status.iterations += 1;
        let current = self.status.canary_weight;
        let next = self.steps.iter().copied().find(|w| *w > current);
        match next {
            Some(w) => {
                let urls = url_hooks_pass(self.spec, self.obs, WebhookType::ConfirmTrafficIncrease);
                if !self.confirmed(WebhookType::ConfirmTrafficIncrease, Some(w)) {
                    if !urls {
                        self.event(
                            "Halted",
                            "confirm-traffic-increase webhooks have not approved the next step"
                                .into(),
                            false,
                        );
                    }
                    return;
                }
                self.status.canary_weight = w;
                self.status.last_progress_time = Some(time(self.obs.now));
                self.actions.push(Action::SetWeights {
                    primary: 100 - w,
                    canary: w,
                });
                self.event("WeightStepped", format!("canary weight {w}"), false);
            }
            None => {
                let needed = self.spec.analysis.iterations.unwrap_or(0);
                if self.steps.is_empty() && self.status.iterations < needed {
                    self.status.last_progress_time = Some(time(self.obs.now));
                    return;
                }
                let urls = url_hooks_pass(self.spec, self.obs, WebhookType::ConfirmPromotion);
                if self.confirmed(WebhookType::ConfirmPromotion, None) {
                    self.promote();
                } else if self.status.phase != CanaryPhase::WaitingPromotion {
                    self.transition(CanaryPhase::WaitingPromotion);
                    if !urls {
                        self.event(
                            "WaitingPromotion",
                            "analysis passed; waiting for confirm-promotion webhooks".into(),
                            false,
                        );
                    }
                }
            }
        }
    }

    fn promote(&mut self) {
        let guarantee = self
            .status
            .analysis
            .iter()
            .find(|g| g.name == judge::PROMOTION_GUARANTEE && g.verdict == Verdict::Pass);
        self.status.decision = Some(match (guarantee, &self.status.totals) {
            (Some(g), Some(totals)) if self.obs.request.is_none() => {
                judge::explain_promotion(g, totals)
            }
            _ => other_decision(
                &if self.obs.request == Some(UserRequest::Promote) {
                    format!("promotion requested{}", self.requested_by())
                } else if self.spec.skip_analysis {
                    "skipAnalysis is set".to_string()
                } else {
                    "promoted without the promotion guarantee (no weight steps to judge)"
                        .to_string()
                },
                Outcome::Other,
            ),
        });
        self.actions.push(Action::Promote);
        self.status.last_progress_time = Some(time(self.obs.now));
        self.transition(CanaryPhase::Promoting);
        self.event(
            "Promoting",
            format!("copying revision {} to the primary", self.obs.revision),
            false,
        );
    }

    fn promoting(&mut self) {
        // The primary must run the new revision before traffic leaves the canary.
        if !self.obs.primary_ready {
            if self.since_progress() > self.deadline() {
                self.rollback(format!(
                    "primary not ready with the promoted revision within progressDeadlineSeconds ({}s)",
                    self.deadline().as_secs()
                ));
            }
            return;
        }
        match self.spec.analysis.step_weight_promotion.filter(|s| *s > 0) {
            Some(step) if self.status.canary_weight > 0 => {
                let w = (self.status.canary_weight - step).max(0);
                self.status.canary_weight = w;
                self.actions.push(Action::SetWeights {
                    primary: 100 - w,
                    canary: w,
                });
                if w == 0 {
                    self.transition(CanaryPhase::Finalising);
                }
            }
            _ => {
                self.status.canary_weight = 0;
                self.actions.push(Action::SetWeights {
                    primary: 100,
                    canary: 0,
                });
                self.transition(CanaryPhase::Finalising);
            }
        }
    }

    fn finalising(&mut self) {
        self.actions.push(Action::SetWeights {
            primary: 100,
            canary: 0,
        });
        self.actions.push(Action::ScaleCanaryDown);
        self.status.canary_weight = 0;
        self.status.last_promoted_spec = Some(self.obs.revision.clone());
        self.transition(CanaryPhase::Succeeded);
        self.event(
            "Succeeded",
            format!("revision {} promoted", self.obs.revision),
            false,
        );
        self.actions.push(Action::Notify(WebhookType::PostRollout));
    }

    fn rollback(&mut self, why: impl std::fmt::Display) {
        // Callers whose decision a test made replace this with the test's explanation.
        self.status.decision = Some(other_decision(&why.to_string(), Outcome::Other));
        self.drop_waiting_gate();
        self.status.canary_weight = 0;
        self.actions.push(Action::SetWeights {
            primary: 100,
            canary: 0,
        });
        self.actions.push(Action::ScaleCanaryDown);
        self.transition(CanaryPhase::Failed);
        self.event("RolledBack", format!("rolled back: {why}"), true);
        self.actions.push(Action::Notify(WebhookType::PostRollout));
    }

    fn transition(&mut self, phase: CanaryPhase) {
        if self.status.phase == phase {
            return;
        }
        self.status.phase = phase;
        self.status.last_transition_time = Some(time(self.obs.now));
        let promoted = phase == CanaryPhase::Succeeded;
        let condition = Condition {
            type_: PROMOTED.into(),
            status: if promoted { "True" } else { "False" }.into(),
            reason: format!("{phase:?}"),
            message: match phase {
                CanaryPhase::Succeeded => "canary analysis completed successfully".into(),
                CanaryPhase::Failed => "canary analysis failed; rolled back".into(),
                _ => format!("rollout is {phase:?}"),
            },
            last_transition_time: time(self.obs.now),
            observed_generation: None,
        };
        self.status.conditions.retain(|c| c.type_ != PROMOTED);
        self.status.conditions.push(condition);
    }

    fn event(&mut self, reason: &'static str, message: String, warning: bool) {
        self.actions.push(Action::Event {
            reason,
            message,
            warning,
        });
        self.actions.push(Action::Notify(WebhookType::Event));
    }
}

/// The explanation of an ending no statistical test decided.
fn other_decision(why: &str, outcome: Outcome) -> DecisionExplanation {
    DecisionExplanation {
        outcome,
        decided_by: why.to_string(),
        test: String::new(),
        statistic: None,
        threshold: None,
        canary_requests: 0,
        canary_events: 0,
        primary_requests: 0,
        primary_events: 0,
        summary: {
            let mut chars = why.chars();
            let first: String = chars
                .next()
                .map(|c| c.to_uppercase().collect())
                .unwrap_or_default();
            format!("{first}{}.", chars.as_str())
        },
    }
}
