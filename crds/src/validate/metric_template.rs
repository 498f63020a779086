//! The MetricTemplate's rules.

use super::{
    checks::{check_url, non_empty},
    error::FieldError,
};
use crate::metric_template::MetricTemplate;

/// The rules of the MetricTemplate schema.
pub fn validate_metric_template(template: &MetricTemplate) -> Result<(), FieldError> {
    non_empty("spec.query", &template.spec.query)?;
    if let Some(address) = &template.spec.provider.address {
        check_url("spec.provider.address", address)?;
    }
    Ok(())
}
