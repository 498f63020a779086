//! The rules of a Workload, the embedded mesh's stand-in for a Deployment.

use super::{
    checks::{check_dns_name, check_range},
    error::FieldError,
};
use crate::workload::Workload;

/// The rules of a Workload: the version to run is one it declares, each version has a command,
/// and the port and replica count are in range.
pub fn validate_workload(w: &Workload) -> Result<(), FieldError> {
    let spec = &w.spec;
    check_range("spec.port", spec.port, 1, 65535)?;
    check_range("spec.replicas", spec.replicas, 1, 16)?;
    if spec.versions.is_empty() {
        return Err(FieldError::new(
            "spec.versions",
            "declare at least one version, e.g. v1: {command: [my-app]}",
        ));
    }
    for (name, v) in &spec.versions {
        check_dns_name(&format!("spec.versions.{name}"), name, 63)?;
        if v.command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err(FieldError::new(
                format!("spec.versions.{name}.command"),
                "required: the program to run and its arguments",
            ));
        }
        if let Some(k) = v.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(FieldError::new(
                format!("spec.versions.{name}.env"),
                format!("{k:?} is not a valid environment variable name"),
            ));
        }
    }
    if !spec.versions.contains_key(&spec.version) {
        let known: Vec<&str> = spec.versions.keys().map(String::as_str).collect();
        return Err(FieldError::new(
            "spec.version",
            format!(
                "{:?} is not one of the declared versions ({})",
                spec.version,
                known.join(", ")
            ),
        ));
    }
    Ok(())
}
