//! `Canary`: the resource a user applies to roll a new version out step by step.
//!
//! The spec keeps Flagger's field names and meaning (`targetRef`, `service`, `analysis` with
//! `interval`/`threshold`/`maxWeight`/`stepWeight`/`stepWeights`/`stepWeightPromotion`/`iterations`,
//! `metrics[].thresholdRange`, `webhooks[].type`, `progressDeadlineSeconds`, `skipAnalysis`,
//! `suspend`). The schema rejects what cannot work (weights outside 0..=100, a step above the
//! maximum, an unparseable interval) before anything is stored. The status carries
//! everything the rollout controller needs to resume after a crash, and the numbers behind each
//! verdict.

use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cel::{Broken, CelRule, CelText};

/// Durations are written the way Flagger and Kubernetes users write them: `30s`, `1m`, `500ms`.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// The desired rollout of a new version of a workload.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rollouts.mesh.dev",
    version = "v1alpha1",
    kind = "Canary",
    plural = "canaries",
    namespaced,
    status = "CanaryStatus",
    category = "mesh",
    doc = "A progressive rollout of a new version, judged against the stable primary.",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"FailedChecks","type":"integer","jsonPath":".status.failedChecks"}"#,
    printcolumn = r#"{"name":"LastTransitionTime","type":"date","jsonPath":".status.lastTransitionTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// The traffic provider. Accepted for Flagger compatibility; the mesh is always its own
    /// provider, so the only meaningful values are empty, `mesh` and `gatewayapi:v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// The workload being rolled out. In Kubernetes this is the Deployment that holds the new
    /// version (the canary); in the embedded mesh it is a service in `mesh.yaml`.
    pub target_ref: TargetRef,

    /// An autoscaler to copy to the primary, as in Flagger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler_ref: Option<TargetRef>,

    /// The service whose traffic is split between primary and canary.
    pub service: CanaryService,

    /// How the rollout advances and how the canary is judged.
    pub analysis: CanaryAnalysis,

    /// Seconds the rollout may make no progress before it is rolled back (Flagger default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,

    /// Promote without running the analysis.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_analysis: bool,

    /// Stop acting on this canary until it is resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// On deletion, route all traffic back to the target before the primary goes away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_on_deletion: bool,
}

/// A reference to a workload or autoscaler in the canary's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API version of the referent, e.g. `apps/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Kind of the referent, e.g. `Deployment`.
    #[schemars(length(min = 1))]
    pub kind: String,
    /// Name of the referent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The service fronting primary and canary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryService {
    /// Name of the apex service; defaults to the target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port the service listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Container port (number or name) the service forwards to; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// Name of the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// Per-request timeout applied on the route, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
}

/// How the rollout advances and how the canary is judged.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = &STEP_WEIGHT_WITHIN_MAX,
    validation = &STEP_WEIGHTS_WITHIN_MAX,
    validation = &A_WAY_TO_STEP
)]
pub struct CanaryAnalysis {
    /// Time between analysis ticks, e.g. `1m` (Flagger's default).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: String,
    /// Failed checks tolerated before the canary is rolled back.
    #[schemars(range(min = 1))]
    pub threshold: i32,
    /// Highest canary weight before promotion, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_weight: Option<i32>,
    /// Weight added to the canary at each successful tick, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub step_weight: Option<i32>,
    /// Explicit weight steps, in percent, used instead of `stepWeight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = &STEP_WEIGHTS_IN_RANGE)]
    pub step_weights: Option<Vec<i32>>,
    /// Weight moved to the primary at each tick while promoting, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub step_weight_promotion: Option<i32>,
    /// Fixed number of analysis ticks, for blue/green style rollouts without weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub iterations: Option<i32>,
    /// The gates checked at every tick.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub metrics: Vec<CanaryMetric>,
    /// Hooks called at the rollout's milestones. A `confirm-rollout`,
    /// `confirm-traffic-increase` or `confirm-promotion` hook without a `url` is a gate the
    /// mesh holds itself until `mesh rollout promote` opens it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = &URL_ONLY_GATES_MAY_OMIT)]
    pub webhooks: Vec<CanaryWebhook>,
}

/// A metric gate: one of the built-in gates of `mesh_core::gates`, or a custom one read
/// through a `templateRef`. The schema's description and CEL rule name the built-in gates from
/// their definitions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(description = metric_description())]
#[x_kube(validation = builtin_metric_rule())]
pub struct CanaryMetric {
    /// Gate name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Window the metric is computed over, e.g. `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
    /// Accepted range of the canary's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_range: Option<ThresholdRange>,
    /// The MetricTemplate holding the query for a custom gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Values substituted into the template's query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_variables: Option<BTreeMap<String, String>>,
}

/// The schema description of a metric gate, naming the built-in gates.
fn metric_description() -> String {
    format!(
        "A metric gate. {} are built in; other names need\na `templateRef`.",
        mesh_core::gates::names_in_words("`")
    )
}

/// The CEL rule of a metric gate: a built-in gate's name, or a `templateRef`.
fn builtin_metric_rule() -> kube::core::Rule {
    kube::core::Rule::new(mesh_core::gates::metric_rule())
        .message(mesh_core::gates::metric_rule_message().as_str())
}

/// Accepted range of a metric value; either bound may be left open.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = &THRESHOLD_RANGE_ORDERED)]
pub struct ThresholdRange {
    /// Lowest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// The Canary schema's CEL rules, each with its Rust twin, which validation runs for the
/// embedded store (the built-in gate names' rule on [`CanaryMetric`] is stated with the gate list).
pub const CEL_RULES: [&CelText; 6] = [
    &STEP_WEIGHT_WITHIN_MAX.text,
    &STEP_WEIGHTS_WITHIN_MAX.text,
    &A_WAY_TO_STEP.text,
    &STEP_WEIGHTS_IN_RANGE.text,
    &THRESHOLD_RANGE_ORDERED.text,
    &URL_ONLY_GATES_MAY_OMIT.text,
];

/// Only the confirm-* hooks may leave `url` out: those are gates the mesh holds itself. Any
/// other hook is a call the controller makes, and needs somewhere to call.
pub const URL_ONLY_GATES_MAY_OMIT: CelRule<[CanaryWebhook]> = CelRule {
    text: CelText {
        expression: "self.all(h, has(h.url) || (has(h.type) && h.type in ['confirm-rollout', 'confirm-traffic-increase', 'confirm-promotion']))",
        message: "url is required, except on confirm-rollout, confirm-traffic-increase and confirm-promotion hooks, where leaving it out makes the mesh hold the gate until `mesh rollout promote`",
        pointer: "/spec/analysis/webhooks",
        keeps: &[
            r#"[{"name": "approval", "type": "confirm-promotion"}]"#,
            r#"[{"name": "step", "type": "confirm-traffic-increase"}, {"name": "start", "type": "confirm-rollout"}]"#,
            r#"[{"name": "load", "url": "http://loadtester.test/"}]"#,
        ],
        breaks: &[
            r#"[{"name": "load"}]"#,
            r#"[{"name": "approval", "type": "confirm-promotion"}, {"name": "smoke", "type": "pre-rollout"}]"#,
        ],
    },
    check: |hooks| match hooks
        .iter()
        .enumerate()
        .find(|(_, h)| h.url.is_none() && !h.is_builtin_gate())
    {
        Some((i, h)) => Err(Broken::at(
            format!("[{i}].url"),
            format!(
                "hook {:?} is of type {}",
                h.name,
                h.type_.unwrap_or(WebhookType::Rollout).name()
            ),
        )),
        None => Ok(()),
    },
};

/// A step never jumps past the maximum weight.
pub const STEP_WEIGHT_WITHIN_MAX: CelRule<CanaryAnalysis> = CelRule {
    text: CelText {
        expression: "!has(self.stepWeight) || !has(self.maxWeight) || self.stepWeight <= self.maxWeight",
        message: "stepWeight must not exceed maxWeight",
        pointer: "/spec/analysis",
        keeps: &[
            r#"{"interval": "1m", "threshold": 5, "maxWeight": 50, "stepWeight": 50}"#,
            r#"{"interval": "1m", "threshold": 5, "stepWeight": 60}"#,
        ],
        breaks: &[r#"{"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeight": 30}"#],
    },
    check: |a| match (a.step_weight, a.max_weight) {
        (Some(step), Some(max)) if step > max => {
            Err(Broken::at(".stepWeight", format!("{step} > {max}")))
        }
        _ => Ok(()),
    },
};

/// Explicit steps stay within the maximum weight too.
pub const STEP_WEIGHTS_WITHIN_MAX: CelRule<CanaryAnalysis> = CelRule {
    text: CelText {
        expression: "!has(self.stepWeights) || self.stepWeights.all(w, !has(self.maxWeight) || w <= self.maxWeight)",
        message: "every stepWeights entry must be at most maxWeight",
        pointer: "/spec/analysis",
        keeps: &[
            r#"{"interval": "1m", "threshold": 5, "maxWeight": 50, "stepWeights": [10, 50]}"#,
            r#"{"interval": "1m", "threshold": 5, "stepWeights": [10, 80]}"#,
        ],
        breaks: &[
            r#"{"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeights": [10, 30]}"#,
        ],
    },
    check: |a| {
        let (Some(steps), Some(max)) = (&a.step_weights, a.max_weight) else {
            return Ok(());
        };
        match steps.iter().enumerate().find(|(_, w)| **w > max) {
            Some((i, w)) => Err(Broken::at(
                format!(".stepWeights[{i}]"),
                format!("{w} > {max}"),
            )),
            None => Ok(()),
        }
    },
};

/// The rollout needs a way to advance: weight steps, or a number of iterations.
pub const A_WAY_TO_STEP: CelRule<CanaryAnalysis> = CelRule {
    text: CelText {
        expression: "has(self.stepWeight) || has(self.stepWeights) || has(self.iterations)",
        message: "one of stepWeight, stepWeights or iterations is required",
        pointer: "/spec/analysis",
        keeps: &[
            r#"{"interval": "1m", "threshold": 5, "stepWeight": 10}"#,
            r#"{"interval": "1m", "threshold": 5, "stepWeights": [10]}"#,
            r#"{"interval": "1m", "threshold": 5, "iterations": 3}"#,
        ],
        breaks: &[r#"{"interval": "1m", "threshold": 5, "maxWeight": 50}"#],
    },
    check: |a| {
        if a.step_weight.is_none() && a.step_weights.is_none() && a.iterations.is_none() {
            Err(Broken::at("", ""))
        } else {
            Ok(())
        }
    },
};

/// Every explicit step is a percentage of traffic.
pub const STEP_WEIGHTS_IN_RANGE: CelRule<[i32]> = CelRule {
    text: CelText {
        expression: "self.all(w, w >= 1 && w <= 100)",
        message: "stepWeights entries must be between 1 and 100",
        pointer: "/spec/analysis/stepWeights",
        keeps: &["[1, 50]", "[5, 10, 20]"],
        breaks: &["[0]", "[10, 101]", "[-5, 10]"],
    },
    check: |steps| match steps
        .iter()
        .enumerate()
        .find(|(_, w)| !(1..=100).contains(*w))
    {
        Some((i, w)) => Err(Broken::at(format!("[{i}]"), format!("got {w}"))),
        None => Ok(()),
    },
};

/// An accepted range is not empty.
pub const THRESHOLD_RANGE_ORDERED: CelRule<ThresholdRange> = CelRule {
    text: CelText {
        expression: "!has(self.min) || !has(self.max) || self.min <= self.max",
        message: "thresholdRange.min must not exceed thresholdRange.max",
        pointer: "/spec/analysis/metrics/0/thresholdRange",
        keeps: &[
            r#"{"min": 99, "max": 100}"#,
            r#"{"min": 5}"#,
            r#"{"max": 500}"#,
        ],
        breaks: &[r#"{"min": 3, "max": 2}"#],
    },
    check: |r| match (r.min, r.max) {
        (Some(min), Some(max)) if min > max => Err(Broken::at("", format!("{min} > {max}"))),
        _ => Ok(()),
    },
};

/// A reference to a MetricTemplate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TemplateRef {
    /// Template name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Template namespace; defaults to the canary's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// When a webhook is called, with Flagger's names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookType {
    /// Before any traffic shifts; a failure blocks the rollout.
    PreRollout,
    /// At every analysis tick, as a gate.
    Rollout,
    /// Before the rollout starts; waits until it answers 200.
    ConfirmRollout,
    /// Before each weight increase; waits until it answers 200.
    ConfirmTrafficIncrease,
    /// Before promotion; waits until it answers 200.
    ConfirmPromotion,
    /// After promotion or rollback.
    PostRollout,
    /// Polled during analysis; a 200 rolls the canary back.
    Rollback,
    /// Told of every event.
    Event,
}

/// A webhook called at a rollout milestone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryWebhook {
    /// When the hook is called; Flagger's default is `rollout`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<WebhookType>,
    /// Hook name, shown in events and status.
    #[schemars(length(min = 1))]
    pub name: String,
    /// URL the payload is POSTed to. Left out on a `confirm-rollout`,
    /// `confirm-traffic-increase` or `confirm-promotion` hook, the mesh holds the gate itself
    /// until `mesh rollout promote` opens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: Option<String>,
    /// Request timeout, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Extra fields passed in the payload's `metadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl WebhookType {
    /// The types whose hooks hold the rollout until they say yes.
    pub const CONFIRM: [Self; 3] = [
        Self::ConfirmRollout,
        Self::ConfirmTrafficIncrease,
        Self::ConfirmPromotion,
    ];

    /// The name a Canary spells it with, e.g. `confirm-promotion`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PreRollout => "pre-rollout",
            Self::Rollout => "rollout",
            Self::ConfirmRollout => "confirm-rollout",
            Self::ConfirmTrafficIncrease => "confirm-traffic-increase",
            Self::ConfirmPromotion => "confirm-promotion",
            Self::PostRollout => "post-rollout",
            Self::Rollback => "rollback",
            Self::Event => "event",
        }
    }
}

impl CanaryWebhook {
    /// A confirm-* hook without a URL: a gate the mesh holds until `mesh rollout promote`.
    pub fn is_builtin_gate(&self) -> bool {
        self.url.is_none()
            && self
                .type_
                .is_some_and(|t| WebhookType::CONFIRM.contains(&t))
    }
}

/// Flagger's rollout phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CanaryPhase {
    /// The controller has seen the canary and is creating the primary.
    #[default]
    Initializing,
    /// The primary serves all traffic; waiting for a new revision.
    Initialized,
    /// Waiting for confirmation before starting.
    Waiting,
    /// Shifting traffic and analysing the canary.
    Progressing,
    /// Analysis passed; waiting for confirmation to promote.
    WaitingPromotion,
    /// Copying the canary's version into the primary.
    Promoting,
    /// Routing all traffic back to the primary after promotion.
    Finalising,
    /// The new version is the primary.
    Succeeded,
    /// The canary was rolled back.
    Failed,
}

/// What the controller has observed and done; all rollout progress lives here, so a restarted
/// controller resumes from it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: CanaryPhase,
    /// Current canary weight, in percent.
    #[serde(default)]
    pub canary_weight: i32,
    /// Failed checks in the current rollout.
    #[serde(default)]
    pub failed_checks: i32,
    /// Analysis ticks done in the current rollout.
    #[serde(default)]
    pub iterations: i32,
    /// Hash of the target revision the rollout is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_spec: Option<String>,
    /// Hash of the last promoted revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promoted_spec: Option<String>,
    /// When the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// Standard conditions, including `Promoted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the last analysis tick ran; the next runs one `analysis.interval` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis_time: Option<Time>,
    /// When the rollout last moved forward (started, or stepped its weight); waiting longer than
    /// `progressDeadlineSeconds` since then, for readiness or for a conclusive verdict, fails it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// The last analysis result for each gate, with the numbers behind the verdict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<GateResult>,
    /// Request counts accumulated since the rollout started, which the sequential tests read;
    /// kept in status so a restarted controller keeps its evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<AnalysisTotals>,
    /// What happened in the latest rollouts, oldest first, newest last; the controller keeps the
    /// last [`HISTORY_LIMIT`] entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// The gate held by the mesh (a confirm-* hook without a URL) that the rollout waits at,
    /// or the last one it passed in this rollout, with who opened it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
    /// Why the last rollout ended as it did: which test decided, its statistic and threshold,
    /// and the counts on each side. Absent while a rollout runs, and in statuses stored before
    /// the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionExplanation>,
}

/// How a rollout ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Outcome {
    /// The analysis showed the canary is not worse than the guarantee allows; it was promoted.
    Promoted,
    /// A test showed the canary is worse; it was rolled back.
    RolledBack,
    /// The rollout ran out of time without the evidence the guarantee needs either way; the
    /// canary was rolled back without being judged worse.
    Inconclusive,
    /// A person or a hook decided (`mesh rollout promote|abort`, a rollback webhook, skipAnalysis,
    /// a canary that never became ready).
    Other,
}

/// The explanation of a rollout's ending, in numbers and in words.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionExplanation {
    /// How the rollout ended.
    pub outcome: Outcome,
    /// The gate that decided, e.g. `canary-vs-primary-errors`, or the reason when no test did.
    pub decided_by: String,
    /// The test, e.g. `sequential likelihood ratio, canary vs primary failures`.
    pub test: String,
    /// The test's statistic when it decided (a likelihood ratio, a p-value, a rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistic: Option<f64>,
    /// The threshold the statistic was compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The canary's requests behind the decision.
    pub canary_requests: u64,
    /// The canary's events (failures, or slow requests) behind the decision.
    pub canary_events: u64,
    /// The primary's requests over the same windows.
    pub primary_requests: u64,
    /// The primary's events.
    pub primary_events: u64,
    /// One or two sentences a person reads at a glance.
    pub summary: String,
}

/// A wait at a gate the mesh holds: a `confirm-rollout`, `confirm-traffic-increase` or
/// `confirm-promotion` hook without a URL, opened by `mesh rollout promote`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// Which gate: `confirm-rollout`, `confirm-traffic-increase` or `confirm-promotion`.
    #[serde(rename = "type")]
    pub type_: WebhookType,
    /// The url-less hooks of that type this gate stands for.
    pub hooks: Vec<String>,
    /// Names this wait, and no other: [`OPEN_GATE_ANNOTATION`] opens it when it holds this.
    pub id: String,
    /// The revision the rollout is for.
    pub revision: String,
    /// The canary weight while it waits.
    pub weight: i32,
    /// For `confirm-traffic-increase`, the weight the opened gate lets the canary step to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_weight: Option<i32>,
    /// When the wait began.
    pub since: Time,
    /// When the gate was opened; absent while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<Time>,
    /// Who or what opened it (`mesh rollout promote --by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_by: Option<String>,
}

impl GateStatus {
    /// Whether the rollout still waits here.
    pub fn waiting(&self) -> bool {
        self.opened_at.is_none()
    }
}

/// How many [`HistoryEntry`]s a status keeps.
pub const HISTORY_LIMIT: usize = 40;

/// Annotation set by `mesh rollout promote`: the revision to promote now, skipping the rest of
/// its analysis. It names a revision so that a leftover annotation never promotes a later one.
pub const PROMOTE_ANNOTATION: &str = "rollouts.mesh.dev/promote";

/// Annotation set by `mesh rollout abort`: the revision to roll back now.
pub const ABORT_ANNOTATION: &str = "rollouts.mesh.dev/abort";

/// Annotation set by `mesh rollout promote` when the rollout waits at a gate the mesh holds:
/// the [`GateStatus::id`] of that wait, which it opens once. Naming the wait means a leftover
/// annotation never opens a later gate, nor the same gate of a later rollout.
pub const OPEN_GATE_ANNOTATION: &str = "rollouts.mesh.dev/open-gate";

/// Who or what opened the gate (`mesh rollout promote --by`), recorded in the history.
pub const OPEN_GATE_BY_ANNOTATION: &str = "rollouts.mesh.dev/open-gate-by";

/// Who or what asked to promote now (`mesh rollout promote --by`).
pub const PROMOTE_BY_ANNOTATION: &str = "rollouts.mesh.dev/promote-by";

/// Who or what asked to abort (`mesh rollout abort --by`).
pub const ABORT_BY_ANNOTATION: &str = "rollouts.mesh.dev/abort-by";

/// One thing that happened during a rollout, as an event records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// When.
    pub time: Time,
    /// Machine-readable reason, e.g. `WeightStepped`, `CheckFailed`, `RolledBack`.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// Whether it is a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
}

/// How a gate judged the canary at one analysis tick.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Verdict {
    /// The canary is no worse than allowed.
    Pass,
    /// The canary is worse than allowed; counts as a failed check.
    Fail,
    /// Too little traffic to tell; neither a pass nor a failure.
    Inconclusive,
}

/// One gate's result: the numbers, the test and the verdict.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateResult {
    /// Gate name: a metric name from `analysis.metrics`, or a sequential comparison.
    pub name: String,
    /// The canary's value (success rate in percent, latency in ms, or a failure share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<f64>,
    /// The primary's value, same unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<f64>,
    /// Canary requests the value was computed from.
    pub canary_samples: u64,
    /// Primary requests the value was computed from.
    pub primary_samples: u64,
    /// The test applied, e.g. `threshold min 99` or `msprt one-sided alpha 0.05`.
    pub test: String,
    /// Always-valid p-value of a sequential test, when one was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
    /// One sentence a person can read.
    pub message: String,
}

/// Requests of one side since the rollout started.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArmTotals {
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed (5xx or a mesh error).
    pub failures: u64,
    /// Requests slower than the slow bound of their window (`AnalysisTotals::slow_ms` holds the
    /// latest), counted in the windows the latency comparison read.
    pub slow: u64,
    /// Requests in the windows the latency comparison read: every window after the canary's
    /// warm-up. Absent in statuses stored before it existed.
    #[serde(default)]
    pub timed: u64,
}

/// Accumulated evidence for the sequential canary-vs-primary tests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisTotals {
    /// The canary's requests.
    pub canary: ArmTotals,
    /// The primary's requests over the same windows.
    pub primary: ArmTotals,
    /// Latency bound, in ms, that made a request "slow" in the latest window the latency
    /// comparison read; each window takes its own from both sides' pooled latencies (the highest
    /// histogram bucket bound at or below their p95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_ms: Option<f64>,
    /// Evidence of the failure comparison, accumulated window by window; absent in statuses
    /// stored before it existed (the judge then starts it afresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_evidence: Option<Evidence>,
    /// Evidence of the slow-request comparison, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_evidence: Option<Evidence>,
}

/// Log-likelihood ratios of a canary-vs-primary comparison, summed over analysis windows (each
/// window compared within itself, so a burst hitting both sides at a moment when the canary
/// carries more traffic does not count against it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// Against "the canary's rate is no higher than the primary's": one per rate ratio of the
    /// judge's grid of alternatives.
    pub worse: Vec<f64>,
    /// Against "the canary's rate is at least the guarded ratio times the primary's": one per
    /// alternative ratio below it.
    pub not_worse: Vec<f64>,
}
