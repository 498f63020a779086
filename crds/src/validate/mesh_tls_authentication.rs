//! The rules of a MeshTLSAuthentication.

use super::{checks::check_dns_name, error::FieldError};
use crate::policy::MeshTlsAuthentication;

/// The rules of the MeshTLSAuthentication schema: at least one identity, each well formed.
pub fn validate_mesh_tls_authentication(m: &MeshTlsAuthentication) -> Result<(), FieldError> {
    if m.spec.identities.is_empty() && m.spec.identity_refs.is_empty() {
        return Err(FieldError::new(
            "spec.identities",
            "give at least one identity or identityRef",
        ));
    }
    for (i, id) in m.spec.identities.iter().enumerate() {
        id.parse::<mesh_policies::IdentityMatch>()
            .map_err(|e| FieldError::new(format!("spec.identities[{i}]"), e.to_string()))?;
    }
    for (i, r) in m.spec.identity_refs.iter().enumerate() {
        let at = |f: &str| format!("spec.identityRefs[{i}].{f}");
        if !matches!(r.kind.as_str(), "ServiceAccount" | "Namespace") {
            return Err(FieldError::new(
                at("kind"),
                format!("{:?} is not ServiceAccount or Namespace", r.kind),
            ));
        }
        check_dns_name(&at("name"), &r.name, 253)?;
        if let Some(ns) = &r.namespace {
            check_dns_name(&at("namespace"), ns, 63)?;
        }
    }
    Ok(())
}
