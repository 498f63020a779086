//! The analysis schedule: the one answer to "is an analysis tick due?". The controller asks it
//! before reading a metrics window and calling the analysis webhooks, and the state machine asks
//! it before judging, so the two can never disagree about an interval or its fallback.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use mesh_crds::{CanaryPhase, CanarySpec, CanaryStatus};

use crate::duration::{self, DurationError};

/// When a Canary's analysis runs: every `analysis.interval`, counted from the last analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// `analysis.interval`.
    pub interval: Duration,
}

impl Schedule {
    /// The schedule of `spec`; an interval that does not parse is a spec error (validation
    /// refuses it before it is stored, so this only meets specs stored by older versions).
    pub fn of(spec: &CanarySpec) -> Result<Self, DurationError> {
        Ok(Self {
            interval: duration::parse(&spec.analysis.interval)?,
        })
    }

    /// Whether an analysis is due at `now`: none has run yet, or the last one is at least an
    /// interval old. A last analysis in the future (clock skew after a restart) counts as now.
    pub fn due(&self, status: &CanaryStatus, now: DateTime<Utc>) -> bool {
        status
            .last_analysis_time
            .as_ref()
            .is_none_or(|t| elapsed(t, now) >= self.interval)
    }

    /// Whether this reconcile analyses the canary: it is progressing, ready, and a tick is due.
    pub fn analysing(&self, status: &CanaryStatus, canary_ready: bool, now: DateTime<Utc>) -> bool {
        status.phase == CanaryPhase::Progressing && canary_ready && self.due(status, now)
    }

    /// Whether this reconcile may look at the traffic since the last tick between ticks: the
    /// canary is progressing, ready and taking traffic, and no tick is due (a tick reads the
    /// window itself). This bounds the extra reads of a metric source to one per reconcile of
    /// a Canary with traffic on its canary.
    pub fn looking(&self, status: &CanaryStatus, canary_ready: bool, now: DateTime<Utc>) -> bool {
        status.phase == CanaryPhase::Progressing
            && canary_ready
            && status.canary_weight > 0
            && status.totals.is_some()
            && !self.due(status, now)
    }
}

/// A Kubernetes timestamp for a chrono time (the status uses Kubernetes' `Time`).
pub fn time(t: DateTime<Utc>) -> Time {
    let nanos = i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0);
    Time(Timestamp::new(t.timestamp(), nanos).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A chrono time for a Kubernetes timestamp.
pub fn chrono_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(
        t.0.as_second(),
        u32::try_from(t.0.subsec_nanosecond()).unwrap_or(0),
    )
    .unwrap_or_default()
}

/// Time from `since` to `now`; zero if `since` is in the future (clock skew after a restart).
pub fn elapsed(since: &Time, now: DateTime<Utc>) -> Duration {
    now.signed_duration_since(chrono_time(since))
        .to_std()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_status(phase: CanaryPhase, last: Option<DateTime<Utc>>) -> CanaryStatus {
        CanaryStatus {
            phase,
            last_analysis_time: last.map(time),
            ..CanaryStatus::default()
        }
    }

    #[test]
    fn an_analysis_is_due_once_per_interval() {
        let s = Schedule {
            interval: Duration::from_secs(10),
        };
        let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
        assert!(s.due(&mk_status(CanaryPhase::Progressing, None), t0));
        let st = mk_status(CanaryPhase::Progressing, Some(t0));
        assert!(!s.due(&st, at(9)));
        assert!(s.due(&st, at(10)));
        assert!(
            !s.due(&st, at(-5)),
            "a last analysis in the future is not due"
        );
        assert!(s.analysing(&st, true, at(10)));
        let taking_traffic = CanaryStatus {
            canary_weight: 10,
            totals: Some(mesh_crds::canary::AnalysisTotals::default()),
            ..st.clone()
        };
        assert!(s.looking(&taking_traffic, true, at(9)), "between ticks");
        assert!(
            !s.looking(&taking_traffic, true, at(10)),
            "a tick reads itself"
        );
        assert!(!s.looking(&st, true, at(9)), "no canary traffic");
        assert!(!s.looking(&taking_traffic, false, at(9)), "not ready");
        assert!(!s.analysing(&st, false, at(10)), "the canary is not ready");
        let waiting = mk_status(CanaryPhase::WaitingPromotion, Some(t0));
        assert!(
            !s.analysing(&waiting, true, at(10)),
            "only while progressing"
        );
    }

    #[test]
    fn a_bad_interval_is_a_spec_error() {
        let mut spec: CanarySpec = serde_json::from_value(serde_json::json!({
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "service": {"port": 80},
            "analysis": {"interval": "soon", "threshold": 1, "stepWeight": 10},
        }))
        .unwrap();
        assert!(Schedule::of(&spec).is_err());
        spec.analysis.interval = "30s".into();
        assert_eq!(
            Schedule::of(&spec).unwrap().interval,
            Duration::from_secs(30)
        );
    }
}
