//! The rollout metrics: every Canary's state as Prometheus series, read from the Canary
//! objects themselves (their status is the rollout controller's whole state), so whichever
//! process serves the resources can export them. Flagger's series names are mirrored where
//! Flagger has them, so alerts written for Flagger keep working; the `mesh_canary_*` series add
//! the phase by name and each gate's last values.
//!
//! | series | type | labels | value |
//! |---|---|---|---|
//! | `flagger_canary_total` | gauge | `namespace` | Canaries in the namespace |
//! | `flagger_canary_status` | gauge | `name`, `namespace` | Flagger's: 0 while a rollout runs, 1 succeeded or idle, 2 failed |
//! | `flagger_canary_weight` | gauge | `workload`, `namespace` | traffic percent of `<target>-primary` and of `<target>` (the canary) |
//! | `mesh_canary_phase` | gauge | `name`, `namespace`, `phase` | 1 for the current phase, 0 for the others |
//! | `mesh_canary_weight` | gauge | `name`, `namespace` | the canary's weight, percent |
//! | `mesh_canary_failed_checks` | gauge | `name`, `namespace` | failed checks in the current rollout |
//! | `mesh_canary_iterations` | gauge | `name`, `namespace` | analysis ticks done in the current rollout |
//! | `mesh_canary_analysis_seconds` | gauge | `name`, `namespace` | how long the current rollout has run, or how long the last one took |
//! | `mesh_canary_gate_value` | gauge | `name`, `namespace`, `gate`, `arm` | the gate's last value per arm (`canary`, `primary`) |
//! | `mesh_canary_gate_samples` | gauge | `name`, `namespace`, `gate`, `arm` | requests that value was computed from |
//! | `mesh_canary_gate_passed` | gauge | `name`, `namespace`, `gate` | 1 when the gate's last verdict passed, else 0 |

use std::collections::BTreeMap;
use std::fmt::Write;

use k8s_openapi::jiff::Timestamp;

use crate::canary::{Canary, CanaryPhase, CanaryStatus, Verdict};

/// Every phase, in the order a rollout goes through them.
const PHASES: [CanaryPhase; 9] = [
    CanaryPhase::Initializing,
    CanaryPhase::Initialized,
    CanaryPhase::Waiting,
    CanaryPhase::Progressing,
    CanaryPhase::WaitingPromotion,
    CanaryPhase::Promoting,
    CanaryPhase::Finalising,
    CanaryPhase::Succeeded,
    CanaryPhase::Failed,
];

/// Flagger's `flagger_canary_status` value of a phase.
fn flagger_status(phase: &CanaryPhase) -> u8 {
    match phase {
        CanaryPhase::Progressing
        | CanaryPhase::Waiting
        | CanaryPhase::WaitingPromotion
        | CanaryPhase::Promoting
        | CanaryPhase::Finalising => 0,
        CanaryPhase::Failed => 2,
        CanaryPhase::Initializing | CanaryPhase::Initialized | CanaryPhase::Succeeded => 1,
    }
}

fn phase_name(phase: &CanaryPhase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A label value, escaped as the exposition format asks.
fn esc(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// History reasons that end a rollout.
const ENDINGS: [&str; 2] = ["Succeeded", "RolledBack"];

/// Seconds the latest rollout has run (to `now` while it runs, to its ending once it ended):
/// from the history's last `Progressing` entry, the one a rollout starts with. `None` before the
/// first rollout, and when its start has left the history (it keeps the last few dozen entries).
fn analysis_seconds(status: &CanaryStatus, now: Timestamp) -> Option<f64> {
    let start = status
        .history
        .iter()
        .rposition(|h| h.reason == "Progressing")?;
    let end = status.history[start..]
        .iter()
        .find(|h| ENDINGS.contains(&h.reason.as_str()))
        .map_or(now, |h| h.time.0);
    let millis = end.as_millisecond() - status.history[start].time.0.as_millisecond();
    #[allow(clippy::cast_precision_loss, reason = "milliseconds far below 2^52")]
    Some(millis.max(0) as f64 / 1000.0)
}

/// The exposition text of `canaries`' series, with a running rollout's duration counted to `now`.
pub fn exposition(canaries: &[Canary], now: Timestamp) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let key = |c: &Canary| {
        (
            esc(c.metadata.namespace.as_deref().unwrap_or_default()),
            esc(c.metadata.name.as_deref().unwrap_or_default()),
        )
    };
    let mut per_ns: BTreeMap<String, f64> = BTreeMap::new();
    for c in canaries {
        *per_ns.entry(key(c).0).or_default() += 1.0;
    }
    family(
        "flagger_canary_total",
        "Canaries per namespace",
        per_ns
            .into_iter()
            .map(|(ns, n)| (format!("namespace=\"{ns}\""), n))
            .collect(),
    );
    let status = |c: &Canary| c.status.clone().unwrap_or_default();
    family(
        "flagger_canary_status",
        "Rollout state per canary: 0 running, 1 succeeded or idle, 2 failed",
        canaries
            .iter()
            .map(|c| {
                let (ns, name) = key(c);
                let value = f64::from(flagger_status(&status(c).phase));
                (format!("name=\"{name}\",namespace=\"{ns}\""), value)
            })
            .collect(),
    );
    family(
        "flagger_canary_weight",
        "Traffic weight of the primary and the canary workload, in percent",
        canaries
            .iter()
            .flat_map(|c| {
                let (ns, _) = key(c);
                let target = esc(&c.spec.target_ref.name);
                let weight = f64::from(status(c).canary_weight);
                [
                    (
                        format!("workload=\"{target}-primary\",namespace=\"{ns}\""),
                        100.0 - weight,
                    ),
                    (format!("workload=\"{target}\",namespace=\"{ns}\""), weight),
                ]
            })
            .collect(),
    );
    family(
        "mesh_canary_phase",
        "1 for the canary's current phase, 0 for the others",
        canaries
            .iter()
            .flat_map(|c| {
                let (ns, name) = key(c);
                let current = status(c).phase;
                PHASES.iter().map(move |p| {
                    (
                        format!(
                            "name=\"{name}\",namespace=\"{ns}\",phase=\"{}\"",
                            phase_name(p)
                        ),
                        if *p == current { 1.0 } else { 0.0 },
                    )
                })
            })
            .collect(),
    );
    let simple = |field: fn(&crate::CanaryStatus) -> i32| {
        canaries
            .iter()
            .map(|c| {
                let (ns, name) = key(c);
                (
                    format!("name=\"{name}\",namespace=\"{ns}\""),
                    f64::from(field(&status(c))),
                )
            })
            .collect::<Vec<_>>()
    };
    family(
        "mesh_canary_weight",
        "The canary's traffic weight, in percent",
        simple(|s| s.canary_weight),
    );
    family(
        "mesh_canary_failed_checks",
        "Failed checks in the current rollout",
        simple(|s| s.failed_checks),
    );
    family(
        "mesh_canary_iterations",
        "Analysis ticks done in the current rollout",
        simple(|s| s.iterations),
    );
    family(
        "mesh_canary_analysis_seconds",
        "How long the current rollout has run, or how long the last one took, in seconds",
        canaries
            .iter()
            .filter_map(|c| {
                let (ns, name) = key(c);
                analysis_seconds(&status(c), now)
                    .map(|secs| (format!("name=\"{name}\",namespace=\"{ns}\""), secs))
            })
            .collect(),
    );
    let gates = |value: fn(&crate::canary::GateResult, bool) -> Option<f64>| {
        canaries
            .iter()
            .flat_map(|c| {
                let (ns, name) = key(c);
                status(c).analysis.into_iter().flat_map(move |g| {
                    let gate = esc(&g.name);
                    let labels = |arm: &str| {
                        format!("name=\"{name}\",namespace=\"{ns}\",gate=\"{gate}\",arm=\"{arm}\"")
                    };
                    [
                        value(&g, true).map(|v| (labels("canary"), v)),
                        value(&g, false).map(|v| (labels("primary"), v)),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                })
            })
            .filter(|(_, v)| v.is_finite())
            .collect::<Vec<_>>()
    };
    family(
        "mesh_canary_gate_value",
        "Each gate's last value per arm (success rate in percent, latency in ms, or a failure share)",
        gates(|g, canary| if canary { g.canary } else { g.primary }),
    );
    #[allow(clippy::cast_precision_loss, reason = "request counts far below 2^52")]
    family(
        "mesh_canary_gate_samples",
        "Requests each gate's last value was computed from, per arm",
        gates(|g, canary| {
            Some(if canary {
                g.canary_samples
            } else {
                g.primary_samples
            } as f64)
        }),
    );
    family(
        "mesh_canary_gate_passed",
        "1 when the gate's last verdict passed, else 0",
        canaries
            .iter()
            .flat_map(|c| {
                let (ns, name) = key(c);
                status(c).analysis.into_iter().map(move |g| {
                    (
                        format!(
                            "name=\"{name}\",namespace=\"{ns}\",gate=\"{}\"",
                            esc(&g.name)
                        ),
                        if g.verdict == Verdict::Pass { 1.0 } else { 0.0 },
                    )
                })
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_canary(name: &str, phase: &str, weight: i32) -> Canary {
        with_history(name, phase, weight, &[])
    }

    fn with_history(name: &str, phase: &str, weight: i32, history: &[(&str, &str)]) -> Canary {
        let history: Vec<_> = history
            .iter()
            .map(
                |(time, reason)| serde_json::json!({"time": time, "reason": reason, "message": ""}),
            )
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "service": {"port": 80},
                     "analysis": {"interval": "5s", "threshold": 2, "stepWeight": 10, "maxWeight": 50}},
            "status": {"phase": phase, "canaryWeight": weight, "failedChecks": 1, "iterations": 3,
                       "analysis": [{"name": "request-success-rate", "canary": 97.5, "primary": 99.9,
                                     "canarySamples": 400, "primarySamples": 3600,
                                     "test": "threshold min 99", "verdict": "Fail",
                                     "message": "below 99"}],
                       "history": history},
        }))
        .unwrap()
    }

    #[test]
    fn canaries_become_flagger_s_series_and_ours() {
        let text = exposition(
            &[
                mk_canary("web", "Progressing", 30),
                mk_canary("api", "Failed", 0),
            ],
            Timestamp::UNIX_EPOCH,
        );
        for line in [
            r#"flagger_canary_total{namespace="shop"} 2"#,
            r#"flagger_canary_status{name="web",namespace="shop"} 0"#,
            r#"flagger_canary_status{name="api",namespace="shop"} 2"#,
            r#"flagger_canary_weight{workload="web-primary",namespace="shop"} 70"#,
            r#"flagger_canary_weight{workload="web",namespace="shop"} 30"#,
            r#"mesh_canary_phase{name="web",namespace="shop",phase="Progressing"} 1"#,
            r#"mesh_canary_phase{name="web",namespace="shop",phase="Failed"} 0"#,
            r#"mesh_canary_weight{name="web",namespace="shop"} 30"#,
            r#"mesh_canary_failed_checks{name="web",namespace="shop"} 1"#,
            r#"mesh_canary_gate_value{name="web",namespace="shop",gate="request-success-rate",arm="canary"} 97.5"#,
            r#"mesh_canary_gate_samples{name="web",namespace="shop",gate="request-success-rate",arm="primary"} 3600"#,
            r#"mesh_canary_gate_passed{name="web",namespace="shop",gate="request-success-rate"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn analysis_seconds_run_from_the_rollouts_start_to_now_or_to_its_end() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let running = with_history(
            "web",
            "Progressing",
            20,
            &[
                ("2026-01-01T00:00:00Z", "Progressing"),
                ("2026-01-01T00:01:00Z", "Succeeded"),
                ("2026-01-01T00:05:00Z", "Progressing"),
                ("2026-01-01T00:06:00Z", "WeightStepped"),
            ],
        );
        let ended = with_history(
            "api",
            "Failed",
            0,
            &[
                ("2026-01-01T00:02:00Z", "Progressing"),
                ("2026-01-01T00:03:30Z", "RolledBack"),
            ],
        );
        let never = mk_canary("db", "Initialized", 0);
        let text = exposition(&[running, ended, never], now);
        for line in [
            r#"mesh_canary_analysis_seconds{name="web",namespace="shop"} 300"#,
            r#"mesh_canary_analysis_seconds{name="api",namespace="shop"} 90"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        assert!(
            !text.contains(r#"mesh_canary_analysis_seconds{name="db""#),
            "a Canary that never rolled out has no duration:\n{text}"
        );
    }
}
