//! What a driver reports when it cannot observe or act: a message naming what it was doing, and
//! the kind of failure, by which the controller's loops back off. Kubernetes API and resource
//! store failures are classified here, so both drivers map them the same way.

/// What kind of failure a driver met. The controller backs off by kind: a conflict is retried
/// at once from a fresh read, a missing object is looked for again at the next tick, an
/// invalid spec waits for the user to change it, and an unavailable backend is retried with a
/// growing delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Someone else changed the object first.
    Conflict,
    /// An object the rollout needs (the target, a template) does not exist.
    NotFound,
    /// The Canary or its target cannot be rolled out as written.
    InvalidSpec,
    /// The store or the apiserver could not be reached or failed.
    Unavailable,
}

/// A driver could not observe or act: what it was doing, why, and what kind of failure it is.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    /// The kind, which decides the backoff.
    pub kind: ErrorKind,
    /// What failed, with its cause.
    pub message: String,
}

impl DriverError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The spec cannot be carried out.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidSpec, message)
    }

    /// Something the rollout needs is missing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// A Kubernetes API failure while doing `what`, classified by its status code.
    pub fn kube(what: impl std::fmt::Display, e: &kube::Error) -> Self {
        let kind = match e {
            kube::Error::Api(status) => match status.code {
                409 => ErrorKind::Conflict,
                404 => ErrorKind::NotFound,
                400 | 422 => ErrorKind::InvalidSpec,
                _ => ErrorKind::Unavailable,
            },
            _ => ErrorKind::Unavailable,
        };
        Self::new(kind, format!("{what}: {e}"))
    }

    /// A resource-store failure while doing `what`.
    pub fn store(what: impl std::fmt::Display, e: &mesh_store::StoreError) -> Self {
        use mesh_store::StoreError;
        let kind = match e {
            StoreError::Conflict { .. } => ErrorKind::Conflict,
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Invalid { .. } => ErrorKind::InvalidSpec,
            StoreError::Gone { .. } | StoreError::Database { .. } | StoreError::Closed => {
                ErrorKind::Unavailable
            }
        };
        Self::new(kind, format!("{what}: {e}"))
    }
}
