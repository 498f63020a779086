//! The rules of a Server.

use super::{
    checks::{check_range, non_empty},
    error::FieldError,
};
use crate::policy::{SelectorOperator, Server};

/// The rules of the Server schema: a port in range and a selector whose expressions make sense.
pub fn validate_server(server: &Server) -> Result<(), FieldError> {
    check_range("spec.port", Some(server.spec.port), 1, 65535)?;
    for (i, e) in server
        .spec
        .pod_selector
        .match_expressions
        .iter()
        .enumerate()
    {
        let at = |f: &str| format!("spec.podSelector.matchExpressions[{i}].{f}");
        non_empty(&at("key"), &e.key)?;
        let needs_values = matches!(e.operator, SelectorOperator::In | SelectorOperator::NotIn);
        if needs_values == e.values.is_empty() {
            return Err(FieldError::new(
                at("values"),
                if needs_values {
                    "required (non-empty) for In and NotIn"
                } else {
                    "must be empty for Exists and DoesNotExist"
                },
            ));
        }
    }
    Ok(())
}
