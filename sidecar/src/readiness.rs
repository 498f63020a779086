//! Whether the workload behind this proxy should get traffic. Certification and registration
//! move it forward as they succeed, shutdown moves it to draining, and the admin server's
//! `/ready` answers from it; it sits apart from all three so none of them imports another.

/// What `/ready` answers: whether the workload behind this proxy should get traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Serving (200).
    Ready,
    /// The proxy has an identity configured and holds no certificate for it yet, so peers
    /// could not reach it over mTLS and it could not reach them (503).
    Certifying,
    /// The workload is not registered with the control plane yet, so peers cannot reach it
    /// (503).
    Registering,
    /// Shutting down: deregistered and finishing requests in flight (503).
    Draining,
}
