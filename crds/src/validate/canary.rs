//! The Canary's rules: references, ranges, durations, gates and webhooks, and the Rust twins
//! of the schema's CEL rules.

use super::{
    checks::{cel, check_duration, check_range, check_url, non_empty},
    error::FieldError,
};
use crate::canary::{self, Canary};

/// The rules of the Canary schema: ranges, durations, and the Rust twins of its CEL rules
/// ([`crate::canary::CEL_RULES`]).
pub fn validate_canary(canary: &Canary) -> Result<(), FieldError> {
    let spec = &canary.spec;
    non_empty("spec.targetRef.kind", &spec.target_ref.kind)?;
    non_empty("spec.targetRef.name", &spec.target_ref.name)?;
    check_range("spec.service.port", Some(spec.service.port), 1, 65535)?;
    check_duration("spec.service.timeout", spec.service.timeout.as_deref())?;
    check_range(
        "spec.progressDeadlineSeconds",
        spec.progress_deadline_seconds,
        1,
        i32::MAX,
    )?;

    let a = &spec.analysis;
    check_duration("spec.analysis.interval", Some(&a.interval))?;
    check_range("spec.analysis.threshold", Some(a.threshold), 1, i32::MAX)?;
    check_range("spec.analysis.maxWeight", a.max_weight, 1, 100)?;
    check_range("spec.analysis.stepWeight", a.step_weight, 1, 100)?;
    check_range(
        "spec.analysis.stepWeightPromotion",
        a.step_weight_promotion,
        1,
        100,
    )?;
    check_range("spec.analysis.iterations", a.iterations, 1, i32::MAX)?;
    cel(&canary::STEP_WEIGHT_WITHIN_MAX, "spec.analysis", a)?;
    if let Some(steps) = &a.step_weights {
        if steps.is_empty() || steps.len() > 100 {
            return Err(FieldError::new(
                "spec.analysis.stepWeights",
                "must hold between 1 and 100 entries",
            ));
        }
        cel(
            &canary::STEP_WEIGHTS_IN_RANGE,
            "spec.analysis.stepWeights",
            steps,
        )?;
    }
    cel(&canary::STEP_WEIGHTS_WITHIN_MAX, "spec.analysis", a)?;
    cel(&canary::A_WAY_TO_STEP, "spec.analysis", a)?;
    if a.metrics.len() > 32 {
        return Err(FieldError::new(
            "spec.analysis.metrics",
            "at most 32 entries",
        ));
    }
    for (i, m) in a.metrics.iter().enumerate() {
        let at = |f: &str| format!("spec.analysis.metrics[{i}].{f}");
        non_empty(&at("name"), &m.name)?;
        check_duration(&at("interval"), m.interval.as_deref())?;
        if mesh_core::gates::builtin(&m.name).is_none() && m.template_ref.is_none() {
            return Err(FieldError::new(
                at("templateRef"),
                format!(
                    "metric {:?} needs a templateRef: only {} are built in",
                    m.name,
                    mesh_core::gates::names_in_words("")
                ),
            ));
        }
        if let Some(r) = &m.threshold_range {
            cel(&canary::THRESHOLD_RANGE_ORDERED, &at("thresholdRange"), r)?;
        }
        if let Some(t) = &m.template_ref {
            non_empty(&at("templateRef.name"), &t.name)?;
        }
    }
    if a.webhooks.len() > 32 {
        return Err(FieldError::new(
            "spec.analysis.webhooks",
            "at most 32 entries",
        ));
    }
    for (i, w) in a.webhooks.iter().enumerate() {
        let at = |f: &str| format!("spec.analysis.webhooks[{i}].{f}");
        non_empty(&at("name"), &w.name)?;
        if let Some(url) = &w.url {
            check_url(&at("url"), url)?;
        }
        check_duration(&at("timeout"), w.timeout.as_deref())?;
    }
    cel(
        &canary::URL_ONLY_GATES_MAY_OMIT,
        "spec.analysis.webhooks",
        &a.webhooks,
    )?;
    Ok(())
}
