//! What validation reports: the field at fault and why, or why a document is no resource
//! the mesh serves.

use crate::kind::ResourceKind;

/// A field whose value is not allowed, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.analysis.stepWeight` or `spec.rules[0].backendRefs[1].weight`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a document was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The document is not a JSON/YAML object.
    #[error("the document is not an object")]
    NotAnObject,
    /// `apiVersion` or `kind` is missing or not a string.
    #[error("{0}: required, as a string")]
    MissingType(&'static str),
    /// The mesh serves no such kind.
    #[error(
        "unknown kind {kind:?} in apiVersion {api_version:?}: served kinds are Canary and \
         MetricTemplate (rollouts.mesh.dev/v1alpha1), HTTPRoute (gateway.networking.k8s.io/v1), \
         Workload (workloads.mesh.dev/v1alpha1), and Server, AuthorizationPolicy, \
         MeshTLSAuthentication and NetworkAuthentication (policy.mesh.dev/v1alpha1)"
    )]
    UnknownKind {
        /// The document's `apiVersion`.
        api_version: String,
        /// The document's `kind`.
        kind: String,
    },
    /// A field is malformed or breaks a rule.
    #[error("{kind} {name:?}: {error}")]
    Field {
        /// The resource's kind.
        kind: ResourceKind,
        /// The resource's name (empty if it has none).
        name: String,
        /// The field at fault.
        error: FieldError,
    },
}

impl ValidationError {
    /// The path of the field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::NotAnObject | Self::UnknownKind { .. } => None,
            Self::MissingType(f) => Some(f),
            Self::Field { error, .. } => Some(&error.field),
        }
    }
}
