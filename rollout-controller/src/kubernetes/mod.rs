//! The rollout controller on Kubernetes: a kube-runtime `Controller` over Canaries that runs
//! [`controller::reconcile`] with the [`KubeDriver`], writes the whole status back with
//! server-side apply, turns each status history entry into a Kubernetes Event, and holds a
//! finalizer whose cleanup leaves traffic on the primary. [`run_elected`] does the same only
//! while this replica holds a Lease ([`lease`]), so several replicas can run for availability.
//!
//! Every Canary is requeued every [`Settings::tick`]: the machine is driven by time (analysis
//! intervals, deadlines) and by the target Deployment, whose changes are read on the next tick.

pub mod driver;
pub mod lease;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use mesh_crds::Canary;
use tokio::sync::Mutex;

pub use driver::{FIELD_MANAGER, KubeDriver, template_revision};
pub use lease::{ElectionConfig, Elector};

use crate::controller::{self, Backoff, ReconcileError};
use crate::error::{DriverError, ErrorKind};
use crate::judge::{JudgeConfig, Window};
use crate::sources::{MetricSource, SourceError, Target};

/// The finalizer that routes traffic back before a Canary goes away.
pub const FINALIZER: &str = "rollouts.mesh.dev/finalizer";
/// The reporting controller named in Events.
pub const REPORTER: &str = "mesh-rollout-controller";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only Canaries in this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// How often each Canary is reconciled when nothing changes.
    pub tick: Duration,
    /// First backoff after a failed reconcile whose backend was unavailable; it doubles with
    /// each failure in a row (see [`Backoff`]).
    pub error_backoff: Duration,
    /// The longest backoff, and the wait after an invalid spec.
    pub max_backoff: Duration,
    /// This instance's name in Events (e.g. the pod name).
    pub instance: Option<String>,
    /// The judge's parameters.
    pub judge: JudgeConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            tick: Duration::from_secs(5),
            error_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            instance: None,
            judge: JudgeConfig::default(),
        }
    }
}

/// Why a reconcile of one Canary failed; it is retried after a delay chosen by
/// [`Error::kind`] (see [`Backoff`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rollout could not proceed (bad spec, or the driver failed, writing the status
    /// included).
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// Cleaning up a deleted Canary failed.
    #[error("releasing the traffic of deleted Canary {canary}: {source}")]
    Cleanup {
        /// `namespace/name`.
        canary: String,
        /// What went wrong.
        source: DriverError,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer of Canary {canary}: {message}")]
    Finalizer {
        /// `namespace/name`.
        canary: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// The kind of failure, which sets the backoff.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Reconcile(e) => e.kind(),
            Self::Cleanup { source, .. } => source.kind,
            Self::Finalizer { .. } => ErrorKind::Unavailable,
        }
    }
}

/// A metric source whose look-back is never shorter than `floor`. Prometheus needs at least
/// two scrapes inside a range for `increase()` to answer, so an `analysis.interval` shorter
/// than twice the scrape interval would make every tick inconclusive; this widens the range
/// instead (windows then overlap, counting some requests twice in the sequential totals).
#[derive(Clone, Debug)]
pub struct WindowFloor<S> {
    inner: S,
    floor: Duration,
}

impl<S> WindowFloor<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, floor: Duration) -> Self {
        Self { inner, floor }
    }
}

impl<S: MetricSource + Send> MetricSource for WindowFloor<S> {
    async fn window(&mut self, target: &Target, interval: Duration) -> Result<Window, SourceError> {
        self.inner.window(target, interval.max(self.floor)).await
    }

    fn reset(&mut self, target: &Target) {
        self.inner.reset(target);
    }
}

struct Context<S> {
    client: Client,
    source: Mutex<S>,
    http: reqwest::Client,
    recorder: Recorder,
    settings: Settings,
    backoff: std::sync::Mutex<Backoff>,
}

fn id(canary: &Canary) -> String {
    format!(
        "{}/{}",
        canary.namespace().unwrap_or_default(),
        canary.name_any()
    )
}

/// Runs the controller until the watch stream ends (it restarts itself on errors) or
/// `shutdown` resolves.
pub async fn run<S>(
    client: Client,
    settings: Settings,
    source: S,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) where
    S: MetricSource + Send + 'static,
{
    let api: Api<Canary> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let reporter = Reporter {
        controller: REPORTER.into(),
        instance: settings.instance.clone(),
    };
    let ctx = Arc::new(Context {
        backoff: std::sync::Mutex::new(Backoff::new(
            settings.tick,
            settings.error_backoff,
            settings.max_backoff,
        )),
        recorder: Recorder::new(client.clone(), reporter),
        client,
        source: Mutex::new(source),
        http: {
            mesh_core::crypto::install_provider();
            reqwest::Client::new()
        },
        settings,
    });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

/// How a run with leader election ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop; the Lease was released.
    Shutdown,
    /// The Lease could not be renewed or went to another replica; reconciling stopped.
    LostLease,
}

/// Like [`run`], but only while this replica holds the election's Lease: waits to become the
/// leader, reconciles while it renews, and stops as soon as it cannot renew. A replica that lost
/// the Lease should exit and start over as a candidate.
pub async fn run_elected<S>(
    client: Client,
    settings: Settings,
    source: S,
    election: ElectionConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Ended
where
    S: MetricSource + Send + 'static,
{
    let mut elector = Elector::new(client.clone(), election);
    tokio::pin!(shutdown);
    tokio::select! {
        () = elector.acquire() => {}
        () = &mut shutdown => return Ended::Shutdown,
    }
    // Dropping the controller's future cancels its reconciles; each is idempotent, so one cut
    // short is simply repeated by the next leader.
    let ended = tokio::select! {
        () = run(client, settings, source, std::future::pending()) => Ended::Shutdown,
        () = elector.hold() => Ended::LostLease,
        () = &mut shutdown => Ended::Shutdown,
    };
    if ended == Ended::Shutdown
        && let Err(e) = elector.release().await
    {
        tracing::warn!(error = %e, "releasing the Lease");
    }
    ended
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "kube-runtime's error policy signature takes the Arcs by value"
)]
fn error_policy<S>(canary: Arc<Canary>, error: &Error, ctx: Arc<Context<S>>) -> Requeue {
    tracing::warn!(canary = %id(&canary), error = %error, "rollout cannot proceed");
    let delay = ctx
        .backoff
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .after_failure(&id(&canary), error.kind());
    Requeue::requeue(delay)
}

async fn reconcile<S>(canary: Arc<Canary>, ctx: Arc<Context<S>>) -> Result<Requeue, Error>
where
    S: MetricSource + Send + 'static,
{
    let ns = canary.namespace().unwrap_or_default();
    let api: Api<Canary> = Api::namespaced(ctx.client.clone(), &ns);
    let name = id(&canary);
    finalizer(&api, FINALIZER, canary, |event| async {
        match event {
            finalizer::Event::Apply(c) => apply(&c, &ctx).await,
            finalizer::Event::Cleanup(c) => {
                ctx.backoff
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .forget(&id(&c));
                KubeDriver::new(ctx.client.clone())
                    .release(&c)
                    .await
                    .map_err(|source| Error::Cleanup {
                        canary: id(&c),
                        source,
                    })?;
                Ok(Requeue::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer {
            canary: name,
            message: other.to_string(),
        },
    })
}

async fn apply<S>(canary: &Canary, ctx: &Context<S>) -> Result<Requeue, Error>
where
    S: MetricSource + Send + 'static,
{
    let mut driver = KubeDriver::with_recorder(ctx.client.clone(), ctx.recorder.clone());
    let outcome = {
        let mut source = ctx.source.lock().await;
        controller::reconcile_and_store(
            canary,
            &mut driver,
            &mut *source,
            &ctx.http,
            &ctx.settings.judge,
            chrono::Utc::now(),
        )
        .await
    };
    // A failure is counted once, by `error_policy`; a success resets the count here.
    outcome?;
    let delay = ctx
        .backoff
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .after_success(&id(canary));
    Ok(Requeue::requeue(delay))
}
