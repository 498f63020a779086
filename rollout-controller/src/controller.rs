//! One reconcile of one Canary: observe the target, call the webhooks that are due, read the
//! metrics window when an analysis tick is due, run the pure [`machine::step`], and carry out its
//! actions through a [`Driver`]. The caller stores the returned status.
//!
//! Actions run before the status is stored. Every action is idempotent, so a controller killed
//! between the two repeats them on its next reconcile from the old status and reaches the same
//! outcome; storing first could lose an action for good.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mesh_crds::canary::{
    ABORT_ANNOTATION, HISTORY_LIMIT, HistoryEntry, PROMOTE_ANNOTATION, WebhookType,
};
use mesh_crds::{Canary, CanaryPhase, CanaryStatus, MetricTemplate};

use crate::duration;
use crate::judge::JudgeConfig;
use crate::machine::{self, Action, Observations, UserRequest};
use crate::sources::{self, MetricSource, Target};
use crate::webhooks::{self, Payload};

/// What a driver sees of a Canary's target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    /// The revision the target asks for (for a Deployment, its pod template hash).
    pub revision: String,
    /// All primary replicas are ready.
    pub primary_ready: bool,
    /// All canary replicas are ready.
    pub canary_ready: bool,
}

/// A driver could not observe or act.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// Where the controller meets the workloads: the embedded supervisor, or Kubernetes.
pub trait Driver {
    /// The target's revision and readiness.
    fn observe(
        &mut self,
        canary: &Canary,
    ) -> impl Future<Output = Result<TargetState, DriverError>> + Send;

    /// The MetricTemplate `namespace/name`, for metrics with a `templateRef`; `None` when
    /// there is none.
    fn metric_template(
        &mut self,
        _namespace: &str,
        _name: &str,
    ) -> impl Future<Output = Result<Option<MetricTemplate>, DriverError>> + Send {
        async { Ok(None) }
    }

    /// Carries out one action for `revision`. Must be idempotent.
    fn act(
        &mut self,
        canary: &Canary,
        revision: &str,
        action: &Action,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
}

/// Why a reconcile stopped before its end; the status was not changed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The spec cannot be run.
    #[error("{0}")]
    Spec(#[from] machine::SpecError),
    /// The driver failed.
    #[error("{0}")]
    Driver(#[from] DriverError),
}

/// What one reconcile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconciled {
    /// The status to store.
    pub status: CanaryStatus,
    /// The actions that were carried out, in order.
    pub actions: Vec<Action>,
}

/// The Canary's service: `service.name`, else the target's name (Flagger's default).
fn service_name(canary: &Canary) -> String {
    canary
        .spec
        .service
        .name
        .clone()
        .unwrap_or_else(|| canary.spec.target_ref.name.clone())
}

/// The metric target of a Canary: `<svc>-canary` against `<svc>-primary`.
pub fn metric_target(canary: &Canary) -> Target {
    let svc = service_name(canary);
    Target {
        namespace: canary.metadata.namespace.clone().unwrap_or_default(),
        canary: format!("{svc}-canary"),
        primary: format!("{svc}-primary"),
    }
}

/// Reconciles `canary` once at `now`.
pub async fn reconcile<D: Driver, S: MetricSource>(
    canary: &Canary,
    driver: &mut D,
    source: &mut S,
    client: &reqwest::Client,
    judge: &JudgeConfig,
    now: DateTime<Utc>,
) -> Result<Reconciled, ReconcileError> {
    let spec = &canary.spec;
    let status = canary.status.clone().unwrap_or_default();
    let target = driver.observe(canary).await?;
    let payload = |phase: CanaryPhase| Payload {
        name: canary.metadata.name.clone().unwrap_or_default(),
        namespace: canary.metadata.namespace.clone().unwrap_or_default(),
        phase: format!("{phase:?}"),
        checksum: target.revision.clone(),
        metadata: BTreeMap::new(),
    };

    let mut hooks = BTreeMap::new();
    for (_, name) in machine::due_webhooks(spec, &status, &target.revision, now) {
        let Some(hook) = spec.analysis.webhooks.iter().find(|h| h.name == name) else {
            continue;
        };
        let ok = match webhooks::call(client, hook, &payload(status.phase)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(canary = ?canary.metadata.name, error = %e, "webhook did not pass");
                false
            }
        };
        hooks.insert(name, ok);
    }

    let interval = duration::parse(&spec.analysis.interval).unwrap_or(Duration::from_secs(60));
    let analysing = status.phase == CanaryPhase::Progressing
        && target.canary_ready
        && status.last_analysis_time.as_ref().is_none_or(|t| {
            now.signed_duration_since(machine::chrono_time(t))
                >= chrono::Duration::from_std(interval).unwrap_or_default()
        });
    let metric_target = metric_target(canary);
    let window = if analysing {
        match source.window(&metric_target, interval).await {
            Ok(w) => Some(w),
            Err(e) => {
                // A gap in the metrics is no evidence either way: the tick is inconclusive.
                tracing::warn!(canary = ?canary.metadata.name, error = %e, "metrics unavailable");
                None
            }
        }
    } else {
        None
    };

    let custom_metrics = if analysing {
        custom_metrics(canary, driver, source, &spec.analysis.interval).await
    } else {
        BTreeMap::new()
    };
    let obs = Observations {
        now,
        revision: target.revision.clone(),
        primary_ready: target.primary_ready,
        canary_ready: target.canary_ready,
        window,
        custom_metrics,
        webhooks: hooks,
        request: user_request(canary, &target.revision),
    };
    let step = machine::step(spec, &status, &obs, judge)?;
    let mut next = step.status;
    let mut last_event: Option<(String, bool)> = None;
    for action in &step.actions {
        match action {
            Action::Event {
                reason,
                message,
                warning,
            } => {
                if *warning {
                    tracing::warn!(canary = ?canary.metadata.name, reason, "{message}");
                } else {
                    tracing::info!(canary = ?canary.metadata.name, reason, "{message}");
                }
                last_event = Some((message.clone(), *warning));
                next.history.push(HistoryEntry {
                    time: machine::time(now),
                    reason: (*reason).to_string(),
                    message: message.clone(),
                    warning: *warning,
                });
            }
            Action::Notify(kind) => {
                let mut p = payload(next.phase);
                if *kind == WebhookType::Event
                    && let Some((message, warning)) = &last_event
                {
                    p.metadata.insert("eventMessage".into(), message.clone());
                    p.metadata.insert(
                        "eventType".into(),
                        if *warning { "Warning" } else { "Normal" }.into(),
                    );
                }
                notify(canary, client, *kind, &p).await;
            }
            Action::ScaleCanaryUp => {
                source.reset(&metric_target);
                driver.act(canary, &target.revision, action).await?;
            }
            _ => driver.act(canary, &target.revision, action).await?,
        }
    }
    if next.history.len() > HISTORY_LIMIT {
        let drop = next.history.len() - HISTORY_LIMIT;
        next.history.drain(..drop);
    }
    Ok(Reconciled {
        status: next,
        actions: step.actions,
    })
}

/// Values of the metrics read through MetricTemplates, by metric name. A template that is
/// missing or whose query fails gives `None`: its gate is inconclusive for the tick, and the
/// reason is logged.
async fn custom_metrics<D: Driver, S: MetricSource>(
    canary: &Canary,
    driver: &mut D,
    source: &mut S,
    analysis_interval: &str,
) -> BTreeMap<String, Option<f64>> {
    let ns = canary.metadata.namespace.clone().unwrap_or_default();
    let mut values = BTreeMap::new();
    for metric in &canary.spec.analysis.metrics {
        let Some(tref) = &metric.template_ref else {
            continue;
        };
        let tns = tref.namespace.clone().unwrap_or_else(|| ns.clone());
        let mut vars = BTreeMap::from([
            ("namespace".to_string(), ns.clone()),
            ("target".to_string(), canary.spec.target_ref.name.clone()),
            ("service".to_string(), service_name(canary)),
            (
                "interval".to_string(),
                metric
                    .interval
                    .clone()
                    .unwrap_or_else(|| analysis_interval.to_string()),
            ),
        ]);
        for (k, v) in metric.template_variables.iter().flatten() {
            vars.insert(format!("variables.{k}"), v.clone());
        }
        let value = match driver.metric_template(&tns, &tref.name).await {
            Ok(Some(t)) => match &t.spec.provider.address {
                Some(address) => sources::template_at(address, &t.spec.query, &vars).await,
                None => source.template(&t.spec.query, &vars).await,
            }
            .map_err(|e| e.to_string()),
            Ok(None) => Err(format!("MetricTemplate {tns}/{} not found", tref.name)),
            Err(e) => Err(e.to_string()),
        };
        let value = value.unwrap_or_else(|e| {
            tracing::warn!(canary = ?canary.metadata.name, metric = %metric.name, "{e}");
            None
        });
        values.insert(metric.name.clone(), value);
    }
    values
}

/// The promote/abort annotation that names `revision`, if any; abort wins over promote.
pub fn user_request(canary: &Canary, revision: &str) -> Option<UserRequest> {
    let names = |key: &str| {
        canary
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .is_some_and(|v| v == revision)
    };
    if names(ABORT_ANNOTATION) {
        Some(UserRequest::Abort)
    } else if names(PROMOTE_ANNOTATION) {
        Some(UserRequest::Promote)
    } else {
        None
    }
}

/// Calls the notification hooks of `kind`; their failures are logged, never fatal.
async fn notify(canary: &Canary, client: &reqwest::Client, kind: WebhookType, payload: &Payload) {
    for hook in canary
        .spec
        .analysis
        .webhooks
        .iter()
        .filter(|h| h.type_ == Some(kind))
    {
        if let Err(e) = webhooks::call(client, hook, payload).await {
            tracing::info!(canary = ?canary.metadata.name, error = %e, "notification hook failed");
        }
    }
}
