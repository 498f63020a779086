//! The rules of an AuthorizationPolicy.

use super::{
    checks::{check_dns_name, non_empty},
    error::FieldError,
};
use crate::policy::{AuthorizationPolicy, POLICY_GROUP};

/// The rules of the AuthorizationPolicy schema: a target and authentications of known kinds.
pub fn validate_authorization_policy(policy: &AuthorizationPolicy) -> Result<(), FieldError> {
    let target = &policy.spec.target_ref;
    let group = target.group.as_deref().unwrap_or_default();
    match (target.kind.as_str(), group) {
        ("Server", POLICY_GROUP) | ("Namespace", "") => {}
        (kind, group) => {
            return Err(FieldError::new(
                "spec.targetRef",
                format!(
                    "kind {kind:?} in group {group:?} cannot be targeted: use kind Server \
                     (group policy.mesh.dev) or kind Namespace (core group)"
                ),
            ));
        }
    }
    non_empty("spec.targetRef.name", &target.name)?;
    for (i, r) in policy.spec.required_authentication_refs.iter().enumerate() {
        let at = |f: &str| format!("spec.requiredAuthenticationRefs[{i}].{f}");
        let group = r.group.as_deref().unwrap_or_default();
        match (r.kind.as_str(), group) {
            ("MeshTLSAuthentication" | "NetworkAuthentication", POLICY_GROUP)
            | ("ServiceAccount", "") => {}
            (kind, group) => {
                return Err(FieldError::new(
                    at("kind"),
                    format!(
                        "kind {kind:?} in group {group:?} is not an authentication: use \
                         MeshTLSAuthentication or NetworkAuthentication (group policy.mesh.dev) \
                         or ServiceAccount (core group)"
                    ),
                ));
            }
        }
        check_dns_name(&at("name"), &r.name, 253)?;
        if let Some(ns) = &r.namespace {
            check_dns_name(&at("namespace"), ns, 63)?;
        }
    }
    Ok(())
}
