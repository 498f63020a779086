//! Every phase transition of the Canary state machine, driven tick by tick with synthetic
//! observations. No I/O: the machine is pure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use mesh_crds::canary::{GateResult, Verdict, WebhookType};
use mesh_crds::{CanaryPhase, CanarySpec, CanaryStatus};
use mesh_rollout_controller::judge::{ArmWindow, Histogram, JudgeConfig, Window};
use mesh_rollout_controller::machine::{
    Action, GateOpening, Observations, PROMOTED, Step, UserRequest, due_webhooks, step,
};
use serde_json::json;

fn mk_spec(analysis: serde_json::Value) -> CanarySpec {
    let mut a = json!({
        "interval": "30s",
        "threshold": 3,
        "maxWeight": 50,
        "stepWeight": 10,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}},
            {"name": "request-duration", "thresholdRange": {"max": 500}}
        ]
    });
    for (k, v) in analysis.as_object().unwrap() {
        a[k] = v.clone();
    }
    serde_json::from_value(json!({
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
        "service": {"port": 9898},
        "analysis": a,
        "progressDeadlineSeconds": 120
    }))
    .unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn hist(fast: u64, slow: u64) -> Histogram {
    Histogram {
        buckets: vec![
            (10.0, fast),
            (1000.0, fast + slow),
            (f64::INFINITY, fast + slow),
        ],
    }
}

/// A window with `n` canary and `4n` primary requests.
fn mk_window(n: u64, canary_failures: u64, canary_slow: u64) -> Window {
    Window {
        canary: ArmWindow {
            requests: n,
            failures: canary_failures,
            latency: hist(n - canary_slow, canary_slow),
        },
        primary: ArmWindow {
            requests: 4 * n,
            failures: 0,
            latency: hist(4 * n, 0),
        },
    }
}

fn healthy() -> Window {
    mk_window(500, 0, 0)
}

/// Drives the machine: each `tick` advances the clock and steps once.
struct Rollout {
    spec: CanarySpec,
    status: CanaryStatus,
    now: DateTime<Utc>,
    revision: String,
    primary_ready: bool,
    canary_ready: bool,
    hooks: Vec<(String, bool)>,
    request: Option<UserRequest>,
    request_by: Option<String>,
    gate_open: Option<GateOpening>,
    last: Vec<Action>,
}

impl Rollout {
    /// The latest result of the gate or comparison called `name`.
    fn gate_result(&self, name: &str) -> &GateResult {
        self.status
            .analysis
            .iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no result for {name} in {:?}", self.status.analysis))
    }

    fn new(spec: CanarySpec) -> Self {
        Self {
            spec,
            status: CanaryStatus::default(),
            now: t0(),
            revision: "rev-1".into(),
            primary_ready: true,
            canary_ready: true,
            hooks: Vec::new(),
            request: None,
            request_by: None,
            gate_open: None,
            last: Vec::new(),
        }
    }

    /// Initialized on rev-1, then rev-2 deployed and the rollout started.
    fn started(spec: CanarySpec) -> Self {
        let mut r = Self::new(spec);
        r.tick(0, None);
        assert_eq!(r.status.phase, CanaryPhase::Initialized);
        r.revision = "rev-2".into();
        r.tick(1, None);
        assert_eq!(r.status.phase, CanaryPhase::Progressing);
        r
    }

    fn tick(&mut self, secs: i64, window: Option<Window>) {
        self.step(secs, window, None);
    }

    /// A reconcile between analysis ticks that looked at the traffic since the last tick.
    fn look(&mut self, secs: i64, look: Window) {
        self.step(secs, None, Some(look));
    }

    fn step(&mut self, secs: i64, window: Option<Window>, look: Option<Window>) {
        self.now += Duration::seconds(secs);
        let obs = Observations {
            now: self.now,
            revision: self.revision.clone(),
            primary_ready: self.primary_ready,
            canary_ready: self.canary_ready,
            window,
            look,
            custom_metrics: Default::default(),
            webhooks: self.hooks.iter().cloned().collect(),
            request: self.request,
            request_by: self.request_by.clone(),
            gate_open: self.gate_open.clone(),
        };
        let s: Step = step(&self.spec, &self.status, &obs, &JudgeConfig::default()).unwrap();
        // Round-trip through JSON every tick, as the store does: a restarted controller sees
        // exactly this.
        self.status = serde_json::from_value(serde_json::to_value(&s.status).unwrap()).unwrap();
        self.last = s.actions;
    }

    fn weights(&self) -> Option<(i32, i32)> {
        self.last.iter().rev().find_map(|a| match a {
            Action::SetWeights { primary, canary } => Some((*primary, *canary)),
            _ => None,
        })
    }

    fn has(&self, action: &Action) -> bool {
        self.last.contains(action)
    }

    fn promoted(&self) -> Option<String> {
        self.status
            .conditions
            .iter()
            .find(|c| c.type_ == PROMOTED)
            .map(|c| c.status.clone())
    }
}

#[test]
fn initializing_waits_for_the_primary_then_routes_all_traffic_to_it() {
    let mut r = Rollout::new(mk_spec(json!({})));
    r.primary_ready = false;
    r.tick(0, None);
    assert_eq!(r.status.phase, CanaryPhase::Initializing);
    assert!(r.has(&Action::InitializePrimary));
    assert_eq!(r.weights(), Some((100, 0)));
    r.primary_ready = true;
    r.tick(5, None);
    assert_eq!(r.status.phase, CanaryPhase::Initialized);
    assert!(r.has(&Action::ScaleCanaryDown));
    assert_eq!(r.status.last_applied_spec.as_deref(), Some("rev-1"));
    assert_eq!(r.promoted().as_deref(), Some("False"));
    // Nothing new: nothing happens.
    r.tick(60, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Initialized);
    assert!(r.last.is_empty());
}

#[test]
fn a_new_revision_starts_the_analysis() {
    let r = Rollout::started(mk_spec(json!({})));
    assert!(r.has(&Action::ScaleCanaryUp));
    assert_eq!(r.weights(), Some((100, 0)));
    assert_eq!(r.status.canary_weight, 0);
    assert_eq!(r.status.last_applied_spec.as_deref(), Some("rev-2"));
}

#[test]
fn a_healthy_canary_steps_to_max_weight_then_is_promoted() {
    let mut r = Rollout::started(mk_spec(json!({})));
    let mut seen = Vec::new();
    for _ in 0..5 {
        r.tick(30, Some(healthy()));
        seen.push(r.status.canary_weight);
        assert_eq!(
            r.weights(),
            Some((100 - r.status.canary_weight, r.status.canary_weight))
        );
    }
    assert_eq!(seen, [10, 20, 30, 40, 50]);
    assert!(r.status.analysis.iter().all(|g| g.verdict == Verdict::Pass));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert!(r.has(&Action::Promote));
    r.tick(5, None);
    assert_eq!(r.status.phase, CanaryPhase::Finalising);
    assert_eq!(r.weights(), Some((100, 0)));
    r.tick(5, None);
    assert_eq!(r.status.phase, CanaryPhase::Succeeded);
    assert!(r.has(&Action::ScaleCanaryDown));
    assert!(r.has(&Action::Notify(WebhookType::PostRollout)));
    assert_eq!(r.status.last_promoted_spec.as_deref(), Some("rev-2"));
    assert_eq!(r.promoted().as_deref(), Some("True"));
}

#[test]
fn ticks_before_the_interval_do_nothing() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
    r.tick(29, Some(healthy()));
    assert_eq!(
        r.status.canary_weight, 10,
        "stepped before the 30s interval"
    );
    assert!(r.last.is_empty());
    r.tick(1, Some(healthy()));
    assert_eq!(r.status.canary_weight, 20);
}

/// The canary's p99 (505 ms, 2 % of its requests in the 10-1000 ms bucket) breaks the absolute
/// request-duration gate while the primary's (340 ms, 1.5 %) meets it, and the canary is too
/// little slower for a sequential comparison to fail, so only the threshold counts.
fn slow_canary() -> Window {
    let mut w = mk_window(500, 0, 10);
    w.primary.latency = hist(1_970, 30);
    w
}

/// Both sides slow (every request in the 10-1000 ms bucket): the canary's p99 is above the
/// request-duration gate's 500 ms, and so is the primary's in the same window.
fn both_slow() -> Window {
    let mut w = mk_window(500, 0, 500);
    w.primary.latency = hist(0, 2_000);
    w
}

#[test]
fn failed_checks_freeze_the_weight_and_roll_back_at_threshold() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
    r.tick(30, Some(slow_canary()));
    assert_eq!(r.status.failed_checks, 1);
    assert_eq!(r.status.canary_weight, 10, "weight moved while failing");
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    let gate = r.gate_result("request-duration");
    assert_eq!(gate.verdict, Verdict::Fail, "{}", gate.message);
    r.tick(30, Some(slow_canary()));
    assert_eq!(r.status.failed_checks, 2);
    r.tick(30, Some(slow_canary()));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.status.canary_weight, 0);
    assert_eq!(r.weights(), Some((100, 0)));
    assert!(r.has(&Action::ScaleCanaryDown));
    assert_eq!(r.promoted().as_deref(), Some("False"));
    let d = r.status.decision.clone().unwrap();
    assert_eq!(d.outcome, mesh_crds::canary::Outcome::RolledBack);
    assert_eq!(d.decided_by, "request-duration");
    // Failed stays failed until another revision.
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    r.revision = "rev-3".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    assert_eq!(r.status.failed_checks, 0);
}

#[test]
fn the_sequential_comparison_catches_a_regression_within_thresholds() {
    // 0.8 % errors passes Flagger's 99 % gate, but the primary has none.
    let mut r = Rollout::started(mk_spec(json!({"threshold": 1})));
    r.tick(30, Some(mk_window(2_000, 16, 0)));
    let cmp = r.gate_result("canary-vs-primary-errors");
    assert_eq!(cmp.verdict, Verdict::Fail, "{}", cmp.message);
    assert!(cmp.p_value.unwrap() <= 0.05);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn slow_canaries_fail_the_latency_comparison() {
    let mut r = Rollout::started(mk_spec(json!({"threshold": 1, "metrics": []})));
    // 20 % of canary requests land in the slow bucket; none of the primary's do.
    r.tick(30, Some(mk_window(1_000, 0, 200)));
    let cmp = r.gate_result("canary-vs-primary-latency");
    assert_eq!(cmp.verdict, Verdict::Fail, "{}", cmp.message);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn too_little_traffic_is_inconclusive_and_counts_toward_the_deadline() {
    let mut r = Rollout::started(mk_spec(json!({})));
    // The first step (from weight 0) needs no canary traffic; see the test below.
    r.tick(30, Some(mk_window(2, 0, 0)));
    assert_eq!(r.status.canary_weight, 10);
    for _ in 0..4 {
        r.tick(30, Some(mk_window(2, 0, 0)));
        assert_eq!(r.status.phase, CanaryPhase::Progressing);
        assert_eq!(r.status.failed_checks, 0, "inconclusive counted as failure");
        assert_eq!(r.status.canary_weight, 10, "inconclusive counted as pass");
        assert!(
            r.status
                .analysis
                .iter()
                .any(|g| g.verdict == Verdict::Inconclusive)
        );
    }
    // 150 s since the last step; the deadline is 120 s.
    r.tick(30, Some(mk_window(2, 0, 0)));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn a_canary_that_never_gets_ready_fails_at_the_deadline() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.canary_ready = false;
    r.tick(60, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    assert!(r.last.is_empty());
    r.tick(61, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn explicit_step_weights_are_followed() {
    let mut r = Rollout::started(mk_spec(
        json!({"stepWeights": [1, 5, 25, 60], "maxWeight": 60}),
    ));
    let mut seen = Vec::new();
    for _ in 0..4 {
        r.tick(30, Some(healthy()));
        seen.push(r.status.canary_weight);
    }
    assert_eq!(seen, [1, 5, 25, 60]);
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn step_weight_promotion_moves_traffic_back_in_steps() {
    let mut r = Rollout::started(mk_spec(json!({"stepWeightPromotion": 20})));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert_eq!(r.status.canary_weight, 50);
    r.tick(30, None);
    assert_eq!(r.weights(), Some((70, 30)));
    r.tick(30, None);
    assert_eq!(r.weights(), Some((90, 10)));
    r.tick(30, None);
    assert_eq!(r.weights(), Some((100, 0)));
    assert_eq!(r.status.phase, CanaryPhase::Finalising);
}

fn hook(kind: &str, name: &str) -> serde_json::Value {
    json!({"type": kind, "name": name, "url": "http://127.0.0.1:1/"})
}

#[test]
fn confirm_promotion_holds_the_rollout_in_waiting_promotion() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [hook("confirm-promotion", "gate")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
    r.hooks = vec![("gate".into(), true)];
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn confirm_traffic_increase_halts_weight_steps() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [hook("confirm-traffic-increase", "step-gate")]
    })));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 0);
    r.hooks = vec![("step-gate".into(), true)];
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
}

#[test]
fn a_rollback_webhook_answering_ok_rolls_back() {
    let mut r = Rollout::started(mk_spec(json!({"webhooks": [hook("rollback", "manual")]})));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
    r.hooks = vec![("manual".into(), true)];
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn failing_rollout_and_pre_rollout_hooks_are_failed_checks() {
    let mut r = Rollout::started(mk_spec(json!({
        "threshold": 2,
        "webhooks": [hook("pre-rollout", "smoke"), hook("rollout", "load")]
    })));
    r.hooks = vec![("load".into(), true)];
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.failed_checks, 1, "failed pre-rollout not counted");
    r.hooks = vec![("smoke".into(), true)];
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

#[test]
fn a_new_revision_mid_rollout_restarts_the_analysis() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 20);
    r.revision = "rev-3".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    assert_eq!(r.status.canary_weight, 0);
    assert_eq!(r.status.iterations, 0);
    assert_eq!(r.weights(), Some((100, 0)));
    assert_eq!(r.status.last_applied_spec.as_deref(), Some("rev-3"));
}

#[test]
fn skip_analysis_promotes_at_once() {
    let mut spec = mk_spec(json!({}));
    spec.skip_analysis = true;
    let mut r = Rollout::new(spec);
    r.tick(0, None);
    r.revision = "rev-2".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert!(r.has(&Action::Promote));
}

#[test]
fn suspend_freezes_everything() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.spec.suspend = true;
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 0);
    assert!(r.last.is_empty());
}

#[test]
fn a_promote_request_skips_the_rest_of_the_analysis() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
    r.request = Some(UserRequest::Promote);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert!(r.has(&Action::Promote));
    r.tick(1, None);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Succeeded);
    assert_eq!(r.status.last_promoted_spec.as_deref(), Some("rev-2"));
    // The request names rev-2; once that is promoted it does nothing more.
    r.tick(30, None);
    assert_eq!(r.status.phase, CanaryPhase::Succeeded);
    assert!(!r.has(&Action::Promote));
}

#[test]
fn a_promote_request_passes_a_confirm_promotion_gate() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [hook("confirm-promotion", "gate")]
    })));
    for _ in 0..7 {
        r.tick(30, Some(healthy()));
    }
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
    r.request = Some(UserRequest::Promote);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn an_abort_request_rolls_back_and_a_new_revision_starts_again() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 20);
    r.request = Some(UserRequest::Abort);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.weights(), Some((100, 0)));
    assert!(r.has(&Action::ScaleCanaryDown));
    assert_eq!(r.status.last_promoted_spec.as_deref(), Some("rev-1"));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Failed, "an abort is final");
    // The next revision rolls out normally; the controller stops passing the old request.
    r.request = None;
    r.revision = "rev-3".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
}

#[test]
fn an_abort_request_ends_a_rollout_waiting_for_confirmation() {
    let mut r = Rollout::new(mk_spec(json!({
        "webhooks": [hook("confirm-rollout", "go")]
    })));
    r.tick(0, None);
    r.revision = "rev-2".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Waiting);
    r.request = Some(UserRequest::Abort);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.status.last_applied_spec.as_deref(), Some("rev-2"));
    r.tick(1, None);
    assert_eq!(
        r.status.phase,
        CanaryPhase::Failed,
        "no restart of the aborted revision"
    );
}

#[test]
fn requests_wait_while_suspended_and_do_nothing_once_final() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.spec.suspend = true;
    r.request = Some(UserRequest::Abort);
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    r.spec.suspend = false;
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Failed);

    let mut done = Rollout::new(mk_spec(json!({})));
    done.tick(0, None);
    done.request = Some(UserRequest::Promote);
    done.tick(1, None);
    assert_eq!(done.status.phase, CanaryPhase::Initialized);
    assert!(!done.has(&Action::Promote));
}

#[test]
fn confirm_rollout_keeps_a_new_revision_waiting() {
    let mut r = Rollout::new(mk_spec(
        json!({"webhooks": [hook("confirm-rollout", "go")]}),
    ));
    r.tick(0, None);
    r.revision = "rev-2".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Waiting);
    r.hooks = vec![("go".into(), true)];
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
}

#[test]
fn iterations_without_weights_is_blue_green() {
    let mut r = Rollout::started(mk_spec(json!({
        "stepWeight": null, "maxWeight": null, "iterations": 3
    })));
    for i in 1..=3 {
        r.tick(30, Some(healthy()));
        assert_eq!(r.status.canary_weight, 0);
        assert_eq!(r.status.iterations, i);
    }
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn evidence_survives_a_restart_through_the_status() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    let totals = r.status.totals.clone().unwrap();
    assert_eq!(totals.canary.requests, 500);
    assert_eq!(totals.primary.requests, 2_000);
    // The test's tick already round-trips the status through JSON; the next tick adds to it.
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.totals.unwrap().canary.requests, 1_000);
}

#[test]
fn the_first_step_needs_no_canary_traffic() {
    // At weight 0 the canary gets no requests, so waiting for evidence there would never end.
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(Window::default()));
    assert_eq!(r.status.canary_weight, 10, "stuck at weight 0");
    // From then on, no traffic is inconclusive again: the weight holds.
    r.tick(30, Some(Window::default()));
    assert_eq!(r.status.canary_weight, 10, "inconclusive counted as pass");
    assert_eq!(r.status.failed_checks, 0);
}

// Gates the mesh holds: confirm-* hooks without a URL, opened by `mesh rollout promote`.

fn gate(kind: &str, name: &str) -> serde_json::Value {
    json!({"type": kind, "name": name})
}

impl Rollout {
    /// The reasons and messages of the events of the last tick.
    fn events(&self) -> Vec<(&'static str, String)> {
        self.last
            .iter()
            .filter_map(|a| match a {
                Action::Event {
                    reason, message, ..
                } => Some((*reason, message.clone())),
                _ => None,
            })
            .collect()
    }

    fn waiting_gate(&self) -> Option<String> {
        self.status
            .gate
            .as_ref()
            .filter(|g| g.waiting())
            .map(|g| g.id.clone())
    }

    /// What `mesh rollout promote --by BY` writes while a gate waits.
    fn open(&mut self, by: &str) {
        let id = self.waiting_gate().expect("a gate waits");
        self.gate_open = Some(GateOpening { id, by: by.into() });
    }
}

#[test]
fn a_builtin_confirm_promotion_gate_waits_until_opened_and_records_who() {
    let mut r = Rollout::started(mk_spec(json!({
        "stepWeightPromotion": 25,
        "webhooks": [gate("confirm-promotion", "approval")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
    assert_eq!(r.status.canary_weight, 50);
    let g = r.status.gate.clone().expect("the wait is in the status");
    assert_eq!(g.type_, WebhookType::ConfirmPromotion);
    assert_eq!(g.hooks, ["approval"]);
    assert_eq!((g.revision.as_str(), g.weight), ("rev-2", 50));
    assert!(g.waiting());
    let events = r.events();
    assert!(
        events
            .iter()
            .any(|(reason, m)| *reason == "GateWaiting" && m.contains("mesh rollout promote")),
        "{events:?}"
    );
    assert!(!r.has(&Action::Promote));

    // It keeps waiting, quietly, whatever the analysis says.
    for _ in 0..3 {
        r.tick(30, Some(healthy()));
        assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
        assert!(r.events().is_empty(), "{:?}", r.events());
    }
    assert_eq!(r.waiting_gate(), Some(g.id.clone()), "the same wait");

    // An opening that names another wait opens nothing.
    r.gate_open = Some(GateOpening {
        id: format!("{}-old", g.id),
        by: "someone".into(),
    });
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);

    let run = "https://github.com/acme/web/actions/runs/42";
    r.open(run);
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert!(r.has(&Action::Promote));
    let opened = r.status.gate.clone().unwrap();
    assert_eq!(opened.opened_by.as_deref(), Some(run));
    assert!(opened.opened_at.is_some());
    assert!(
        r.events()
            .iter()
            .any(|(reason, m)| *reason == "GateOpened" && m.contains(run)),
        "{:?}",
        r.events()
    );
    // The normal path goes on: stepWeightPromotion moves traffic back in steps.
    r.tick(30, None);
    assert_eq!(r.status.canary_weight, 25);
    r.tick(30, None);
    assert_eq!(r.status.canary_weight, 0);
    r.tick(30, None);
    assert_eq!(r.status.phase, CanaryPhase::Succeeded);
    assert_eq!(r.promoted().as_deref(), Some("True"));
    assert_eq!(
        r.status.gate.and_then(|g| g.opened_by).as_deref(),
        Some(run),
        "who opened it stays in the status"
    );
}

#[test]
fn a_restarted_controller_keeps_waiting_at_the_gate_and_opens_it() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    let id = r.waiting_gate().unwrap();
    // A new controller has only the stored status (the tick round-trips it through JSON).
    let stored = serde_json::to_string(&r.status).unwrap();
    let mut again = Rollout::new(r.spec.clone());
    again.status = serde_json::from_str(&stored).unwrap();
    again.revision = "rev-2".into();
    again.now = r.now + Duration::minutes(30);
    again.tick(30, Some(healthy()));
    assert_eq!(again.status.phase, CanaryPhase::WaitingPromotion);
    assert_eq!(
        again.waiting_gate(),
        Some(id),
        "the same wait, not a new one"
    );
    assert!(again.events().is_empty(), "{:?}", again.events());
    again.open("ops@bastion");
    again.tick(1, None);
    assert_eq!(again.status.phase, CanaryPhase::Promoting);
}

#[test]
fn a_builtin_confirm_traffic_increase_gate_opens_one_step_at_a_time() {
    let mut r = Rollout::started(mk_spec(json!({
        "stepWeight": 25,
        "webhooks": [gate("confirm-traffic-increase", "step")]
    })));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 0);
    let g = r.status.gate.clone().unwrap();
    assert_eq!(
        (g.type_, g.weight, g.next_weight),
        (WebhookType::ConfirmTrafficIncrease, 0, Some(25))
    );
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 0, "held");
    assert_eq!(r.status.phase, CanaryPhase::Progressing);

    r.open("first");
    r.tick(1, None);
    assert_eq!(
        r.status.canary_weight, 0,
        "the step waits for the next tick"
    );
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 25);
    // The next step waits again; the opening of the last one (still annotated) does not open it.
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 25);
    let second = r.waiting_gate().expect("a new wait");
    assert_ne!(second, g.id);
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 25);
    r.open("second");
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 50);
    // Max weight reached: no confirm-promotion gate, so it promotes.
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn a_builtin_confirm_rollout_gate_holds_the_start() {
    let mut r = Rollout::new(mk_spec(json!({
        "webhooks": [gate("confirm-rollout", "start")]
    })));
    r.tick(0, None);
    assert_eq!(r.status.phase, CanaryPhase::Initialized);
    r.revision = "rev-2".into();
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Waiting);
    assert!(!r.has(&Action::ScaleCanaryUp));
    let g = r.status.gate.clone().unwrap();
    assert_eq!(
        (g.type_, g.revision.as_str()),
        (WebhookType::ConfirmRollout, "rev-2")
    );
    r.tick(30, None);
    assert_eq!(r.status.phase, CanaryPhase::Waiting);
    r.open("release-manager");
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
    assert!(r.has(&Action::ScaleCanaryUp));
}

#[test]
fn the_same_revision_rolled_out_again_waits_again() {
    // rev-2 promoted through the gate, rev-3 rolled out, then rev-2 again (a revert): the
    // leftover opening of the first rollout must not open the third.
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    r.open("first");
    for _ in 0..3 {
        r.tick(30, None);
    }
    assert_eq!(r.status.phase, CanaryPhase::Succeeded);
    let leftover = r.gate_open.clone();
    for rev in ["rev-3", "rev-2"] {
        r.revision = rev.into();
        r.tick(1, None);
        assert_eq!(r.status.phase, CanaryPhase::Progressing, "{rev}");
        for _ in 0..6 {
            r.tick(30, Some(healthy()));
        }
        assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion, "{rev}");
        r.gate_open = leftover.clone();
        r.tick(30, Some(healthy()));
        assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion, "{rev}");
        r.open(rev);
        for _ in 0..3 {
            r.tick(30, None);
        }
        assert_eq!(r.status.phase, CanaryPhase::Succeeded, "{rev}");
    }
}

#[test]
fn a_gate_and_a_webhook_of_the_same_type_both_must_say_yes() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval"), hook("confirm-promotion", "checks")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    assert_eq!(r.status.phase, CanaryPhase::WaitingPromotion);
    r.open("person");
    r.tick(1, None);
    assert_eq!(
        r.status.phase,
        CanaryPhase::WaitingPromotion,
        "the webhook still says no"
    );
    assert!(r.status.gate.as_ref().is_some_and(|g| !g.waiting()));
    r.hooks = vec![("checks".into(), true)];
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
}

#[test]
fn promote_now_and_abort_pass_a_waiting_gate_and_record_who_asked() {
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    r.request = Some(UserRequest::Promote);
    r.request_by = Some("alice@laptop".into());
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Promoting);
    assert_eq!(r.status.gate, None, "the skipped wait is gone");
    assert!(
        r.events()
            .iter()
            .any(|(reason, m)| *reason == "ManualPromotion" && m.contains("by alice@laptop")),
        "{:?}",
        r.events()
    );

    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval")]
    })));
    for _ in 0..6 {
        r.tick(30, Some(healthy()));
    }
    r.request = Some(UserRequest::Abort);
    r.request_by = Some("bob".into());
    r.tick(1, None);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.status.gate, None);
    assert!(
        r.events()
            .iter()
            .any(|(reason, m)| *reason == "RolledBack" && m.contains("by bob")),
        "{:?}",
        r.events()
    );
}

#[test]
fn waiting_at_a_gate_with_no_canary_traffic_is_not_a_lack_of_progress() {
    // confirm-traffic-increase holds the canary at weight 0, where it gets no requests: every
    // tick is inconclusive. Past progressDeadlineSeconds (120 s) it still waits, and opens.
    let mut r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-traffic-increase", "step")]
    })));
    for _ in 0..20 {
        r.tick(30, Some(Window::default()));
    }
    assert_eq!(r.status.phase, CanaryPhase::Progressing, "{:?}", r.events());
    assert_eq!(r.status.canary_weight, 0);
    r.open("ops");
    r.tick(30, Some(Window::default()));
    assert_eq!(r.status.canary_weight, 10);
    // The deadline counts from the opening: a healthy canary goes on.
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.phase, CanaryPhase::Progressing);
}

#[test]
fn a_gate_the_mesh_holds_is_never_called() {
    let r = Rollout::started(mk_spec(json!({
        "webhooks": [gate("confirm-promotion", "approval"), hook("confirm-promotion", "checks")]
    })));
    let schedule = mesh_rollout_controller::schedule::Schedule::of(&r.spec).unwrap();
    let due = due_webhooks(
        &r.spec,
        &r.status,
        &schedule,
        "rev-2",
        r.now + Duration::seconds(30),
    );
    assert_eq!(
        due,
        [(WebhookType::ConfirmPromotion, "checks".to_string())],
        "only the hook with a url is called"
    );
}

#[test]
fn a_sequential_failure_rolls_back_at_once_and_says_why() {
    // threshold 3, but the comparison's error rate already holds under checking every tick.
    let mut r = Rollout::started(mk_spec(json!({"metrics": []})));
    r.tick(30, Some(healthy()));
    r.tick(30, Some(mk_window(2_000, 40, 0)));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.status.failed_checks, 0);
    let d = r.status.decision.clone().unwrap();
    assert_eq!(d.outcome, mesh_crds::canary::Outcome::RolledBack);
    assert_eq!(d.decided_by, "canary-vs-primary-errors");
    assert_eq!((d.canary_events, d.primary_events), (40, 0));
    assert!(d.statistic.unwrap() >= d.threshold.unwrap());
    assert!(
        d.summary.contains("40 of 2500 canary requests failed"),
        "{}",
        d.summary
    );
}

#[test]
fn without_the_evidence_the_guarantee_needs_the_rollout_ends_inconclusive() {
    let mut r = Rollout::started(mk_spec(json!({"metrics": []})));
    // Enough for each comparison to pass, too little to rule out a canary 5x worse.
    let small = || mk_window(60, 0, 0);
    while r.status.canary_weight < 50 {
        r.tick(30, Some(small()));
        assert_eq!(r.status.phase, CanaryPhase::Progressing);
    }
    r.tick(30, Some(small()));
    assert_eq!(
        r.status.phase,
        CanaryPhase::Progressing,
        "promoted without evidence"
    );
    let g = r.gate_result("promotion-guarantee");
    assert_eq!(g.verdict, Verdict::Inconclusive, "{}", g.message);
    // progressDeadlineSeconds is 120.
    for _ in 0..5 {
        r.tick(30, Some(small()));
    }
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    let d = r.status.decision.clone().unwrap();
    assert_eq!(d.outcome, mesh_crds::canary::Outcome::Inconclusive);
    let c = r
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == PROMOTED)
        .unwrap();
    assert_eq!(c.reason, "Inconclusive");
}

/// The real trials' one disagreement: a healthy canary rolled back by the request-duration gate
/// at a load average of 34, its p99 above 500 ms while the primary's was as high. A p99 above
/// `thresholdRange.max` fails only when the primary, in the same window, meets it, or when the
/// canary has more requests above the primary's p99 than the 1 % a p99 allows.
#[test]
fn a_slowdown_both_sides_share_is_not_the_canarys_fault() {
    let mut r = Rollout::started(mk_spec(json!({"threshold": 1})));
    r.tick(30, Some(healthy()));
    for _ in 0..3 {
        r.tick(30, Some(both_slow()));
        assert_eq!(r.status.phase, CanaryPhase::Progressing);
    }
    assert_eq!(r.status.failed_checks, 0);
    let gate = r.gate_result("request-duration");
    assert_eq!(gate.verdict, Verdict::Pass, "{}", gate.message);
    assert!(gate.canary.unwrap() > 500.0);
    assert!(
        gate.message.contains("both sides share"),
        "{}",
        gate.message
    );
    // A canary slower than a slow primary still fails it: a fifth of its requests above the
    // primary's p99 bucket (1000 ms).
    let mut worse = both_slow();
    worse.canary.latency.buckets = vec![(10.0, 0), (1000.0, 400), (f64::INFINITY, 500)];
    r.tick(30, Some(worse));
    let gate = r.gate_result("request-duration");
    assert_eq!(gate.verdict, Verdict::Fail, "{}", gate.message);
    assert!(gate.message.contains("100 of 500"), "{}", gate.message);
    assert_eq!(r.status.phase, CanaryPhase::Failed);
}

/// Between analysis ticks the failure comparison looks at the traffic so far: a canary failing
/// 5 % of its requests is rolled back at the look that has the evidence, not at the next tick,
/// and a look that finds nothing changes nothing (no status write).
#[test]
fn a_look_between_ticks_rolls_back_a_failing_canary_before_the_next_tick() {
    let mut r = Rollout::started(mk_spec(json!({})));
    r.tick(30, Some(healthy()));
    assert_eq!(r.status.canary_weight, 10);
    let before = r.status.clone();
    r.look(5, mk_window(50, 0, 0));
    assert_eq!(r.status, before, "a clean look changed the status");
    assert!(r.last.is_empty(), "{:?}", r.last);
    r.look(5, mk_window(100, 6, 0));
    assert_eq!(r.status.phase, CanaryPhase::Failed);
    assert_eq!(r.weights(), Some((100, 0)));
    let d = r.status.decision.clone().unwrap();
    assert_eq!(d.outcome, mesh_crds::canary::Outcome::RolledBack);
    assert_eq!(d.decided_by, "canary-vs-primary-errors");
    // The totals the decision names include the traffic of the look.
    assert_eq!((d.canary_events, d.canary_requests), (6, 600));
    assert!(
        r.last
            .iter()
            .any(|a| matches!(a, Action::Event { message, .. }
            if message.contains("between analysis ticks"))),
        "{:?}",
        r.last
    );
}

/// A look at weight 0 decides nothing, whatever it reads.
#[test]
fn a_look_without_canary_traffic_does_nothing() {
    let mut r = Rollout::started(mk_spec(json!({})));
    // Between ticks, still at weight 0.
    r.status.last_analysis_time = Some(mesh_rollout_controller::schedule::time(r.now));
    let before = r.status.clone();
    r.look(5, mk_window(100, 50, 0));
    assert_eq!(r.status, before);
}
