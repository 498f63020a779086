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
    ABORT_ANNOTATION, ABORT_BY_ANNOTATION, HISTORY_LIMIT, HistoryEntry, OPEN_GATE_ANNOTATION,
    OPEN_GATE_BY_ANNOTATION, PROMOTE_ANNOTATION, PROMOTE_BY_ANNOTATION, WebhookType,
};
use mesh_crds::{Canary, CanaryPhase, CanaryStatus, MetricTemplate};

use crate::error::{DriverError, ErrorKind};
use crate::judge::JudgeConfig;
use crate::machine::{self, Action, GateOpening, Observations, UserRequest};
use crate::owned::Names;
use crate::schedule::{self, Schedule};
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

    /// Stores the whole status of `canary`.
    fn write_status(
        &mut self,
        canary: &Canary,
        status: &CanaryStatus,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Publishes the events of a stored reconcile where users look for them besides the
    /// status history (Kubernetes Events); nothing by default. Failures are the driver's to log.
    fn publish(
        &mut self,
        _canary: &Canary,
        _events: &[&Action],
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
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

impl ReconcileError {
    /// The kind of failure, which decides the backoff.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Spec(_) => ErrorKind::InvalidSpec,
            Self::Driver(e) => e.kind,
        }
    }
}

/// What one reconcile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconciled {
    /// The status to store.
    pub status: CanaryStatus,
    /// The actions that were carried out, in order.
    pub actions: Vec<Action>,
}

/// The metric target of a Canary: `<svc>-canary` against `<svc>-primary`.
pub fn metric_target(canary: &Canary) -> Target {
    let names = Names::of(canary);
    Target {
        namespace: names.namespace,
        canary: names.service_canary,
        primary: names.service_primary,
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
    let schedule = Schedule::of(spec).map_err(machine::SpecError::from)?;
    let target = driver.observe(canary).await?;
    let payload = |phase: CanaryPhase| Payload {
        name: canary.metadata.name.clone().unwrap_or_default(),
        namespace: canary.metadata.namespace.clone().unwrap_or_default(),
        phase: format!("{phase:?}"),
        checksum: target.revision.clone(),
        metadata: BTreeMap::new(),
    };

    let mut hooks = BTreeMap::new();
    for (_, name) in machine::due_webhooks(spec, &status, &schedule, &target.revision, now) {
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

    let analysing = schedule.analysing(&status, target.canary_ready, now);
    let interval = schedule.interval;
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

    // Between ticks, the failure comparison looks at the traffic so far (see `judge::look`);
    // a source that cannot read it without moving its baseline gives nothing.
    let look = if !analysing
        && judge.look_between_ticks
        && schedule.looking(&status, target.canary_ready, now)
    {
        source.peek(&metric_target).await.unwrap_or_else(|e| {
            tracing::debug!(canary = ?canary.metadata.name, error = %e, "metrics unavailable between ticks");
            None
        })
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
        look,
        custom_metrics,
        webhooks: hooks,
        request: user_request(canary, &target.revision),
        request_by: request_by(canary, &target.revision),
        gate_open: gate_opening(canary),
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
                    time: schedule::time(now),
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
            ("service".to_string(), Names::of(canary).service),
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

fn annotation<'a>(canary: &'a Canary, key: &str) -> Option<&'a str> {
    canary
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Who made the promote/abort request that [`user_request`] reads, when it was recorded.
pub fn request_by(canary: &Canary, revision: &str) -> Option<String> {
    let by = match user_request(canary, revision)? {
        UserRequest::Abort => ABORT_BY_ANNOTATION,
        UserRequest::Promote => PROMOTE_BY_ANNOTATION,
    };
    annotation(canary, by).map(str::to_string)
}

/// The request to open a gate the mesh holds, if the Canary carries one. The machine opens the
/// wait only when the id names it.
pub fn gate_opening(canary: &Canary) -> Option<GateOpening> {
    let id = annotation(canary, OPEN_GATE_ANNOTATION)?;
    Some(GateOpening {
        id: id.to_string(),
        by: annotation(canary, OPEN_GATE_BY_ANNOTATION)
            .filter(|b| !b.trim().is_empty())
            .unwrap_or("an unnamed requester (no rollouts.mesh.dev/open-gate-by annotation)")
            .to_string(),
    })
}

/// Calls the notification hooks of `kind`; their failures are logged, never fatal.
async fn notify(canary: &Canary, client: &reqwest::Client, kind: WebhookType, payload: &Payload) {
    for hook in canary
        .spec
        .analysis
        .webhooks
        .iter()
        .filter(|h| h.type_ == Some(kind) && h.url.is_some())
    {
        if let Err(e) = webhooks::call(client, hook, payload).await {
            tracing::info!(canary = ?canary.metadata.name, error = %e, "notification hook failed");
        }
    }
}

/// One turn of the reconcile loop, the same for every driver: reconcile, store the status when
/// it changed, then publish the events. Actions run before the status is stored (see the module
/// docs), and events follow the status: a crash before the write repeats the step and its
/// events, a crash after it loses at most the published events, never history entries.
pub async fn reconcile_and_store<D: Driver, S: MetricSource>(
    canary: &Canary,
    driver: &mut D,
    source: &mut S,
    client: &reqwest::Client,
    judge: &JudgeConfig,
    now: DateTime<Utc>,
) -> Result<Reconciled, ReconcileError> {
    let reconciled = reconcile(canary, driver, source, client, judge, now).await?;
    if Some(&reconciled.status) != canary.status.as_ref() {
        driver.write_status(canary, &reconciled.status).await?;
    }
    let events: Vec<&Action> = reconciled
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Event { .. }))
        .collect();
    if !events.is_empty() {
        driver.publish(canary, &events).await;
    }
    Ok(reconciled)
}

/// When each Canary is reconciled next: every `tick` while all is well, and after a failure a
/// delay chosen by its kind. Both drivers' loops ask it, so they back off alike.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// The steady reconcile interval.
    pub tick: Duration,
    /// The first delay after an unavailable backend; it doubles with each failure in a row.
    pub error_backoff: Duration,
    /// The longest delay, and the wait after an invalid spec (a change of the Canary is
    /// noticed sooner: the loops reconcile a changed Canary at once).
    pub max_backoff: Duration,
    failures: BTreeMap<String, u32>,
}

impl Backoff {
    /// A backoff with these delays.
    pub fn new(tick: Duration, error_backoff: Duration, max_backoff: Duration) -> Self {
        Self {
            tick,
            error_backoff,
            max_backoff,
            failures: BTreeMap::new(),
        }
    }

    /// The delay before reconciling the Canary `id` again after `outcome`.
    pub fn next<T>(&mut self, id: &str, outcome: &Result<T, ReconcileError>) -> Duration {
        match outcome {
            Ok(_) => self.after_success(id),
            Err(e) => self.after_failure(id, e.kind()),
        }
    }

    /// The delay after a turn that went well: the tick; the failure count starts over.
    pub fn after_success(&mut self, id: &str) -> Duration {
        self.failures.remove(id);
        self.tick
    }

    /// The delay after a failure of `kind`, counting it.
    pub fn after_failure(&mut self, id: &str, kind: ErrorKind) -> Duration {
        let n = self.failures.entry(id.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        match kind {
            // Someone wrote first: read again right away, but never spin.
            ErrorKind::Conflict => Duration::from_millis(200).saturating_mul(*n).min(self.tick),
            // The target may appear at any moment (an apply in flight): look again each tick.
            ErrorKind::NotFound => self.tick,
            ErrorKind::InvalidSpec => self.max_backoff,
            ErrorKind::Unavailable => self
                .error_backoff
                .saturating_mul(1 << (*n - 1).min(16))
                .min(self.max_backoff),
        }
    }

    /// Forgets a Canary that is gone.
    pub fn forget(&mut self, id: &str) {
        self.failures.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: ErrorKind) -> Result<(), ReconcileError> {
        Err(ReconcileError::Driver(DriverError::new(kind, "x")))
    }

    #[test]
    fn backoff_follows_the_kind_of_failure() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(5), s(5), s(300));
        assert_eq!(b.next("a", &Ok::<(), ReconcileError>(())), s(5));
        assert_eq!(
            b.next("a", &failed(ErrorKind::Conflict)),
            Duration::from_millis(200)
        );
        assert_eq!(b.next("a", &failed(ErrorKind::NotFound)), s(5));
        assert_eq!(b.next("a", &failed(ErrorKind::InvalidSpec)), s(300));
        let mut b = Backoff::new(s(5), s(5), s(300));
        let delays: Vec<_> = (0..8)
            .map(|_| b.next("a", &failed(ErrorKind::Unavailable)))
            .collect();
        assert_eq!(
            delays,
            [s(5), s(10), s(20), s(40), s(80), s(160), s(300), s(300)],
            "unavailable backs off exponentially up to the cap"
        );
        assert_eq!(
            b.next("b", &failed(ErrorKind::Unavailable)),
            s(5),
            "per Canary"
        );
        assert_eq!(b.next("a", &Ok::<(), ReconcileError>(())), s(5));
        assert_eq!(
            b.next("a", &failed(ErrorKind::Unavailable)),
            s(5),
            "a success resets the count"
        );
    }

    #[test]
    fn kube_and_store_errors_are_classified() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            }))
        };
        assert_eq!(DriverError::kube("x", &api(409)).kind, ErrorKind::Conflict);
        assert_eq!(DriverError::kube("x", &api(404)).kind, ErrorKind::NotFound);
        assert_eq!(
            DriverError::kube("x", &api(422)).kind,
            ErrorKind::InvalidSpec
        );
        assert_eq!(
            DriverError::kube("x", &api(503)).kind,
            ErrorKind::Unavailable
        );
        let key =
            mesh_store::ObjectKey::new(mesh_crds::validate::ResourceKind::Canary, "default", "web");
        let conflict = mesh_store::StoreError::Conflict {
            key: key.clone(),
            given: "1".into(),
            current: 2,
        };
        assert_eq!(DriverError::store("x", &conflict).kind, ErrorKind::Conflict);
        assert_eq!(
            DriverError::store("x", &mesh_store::StoreError::NotFound(key)).kind,
            ErrorKind::NotFound
        );
        assert!(
            DriverError::store("writing", &conflict)
                .to_string()
                .starts_with("writing: "),
            "the message says what was being done"
        );
    }
}
