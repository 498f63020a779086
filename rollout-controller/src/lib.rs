//! The rollout controller: it moves traffic from a stable primary to a canary step by step,
//! judges the canary against the primary from the proxies' own golden metrics (absolute
//! thresholds plus an anytime-valid sequential test), and promotes or rolls back on its own.
//! The state machine is pure; metric sources (a direct proxy scrape, or Prometheus) and drivers
//! (the embedded supervisor, or Kubernetes Deployments and HTTPRoutes) are thin adapters around
//! it. Empty until the rollout-controller work lands; the resource types live in `mesh-crds`.

pub use mesh_crds::{Canary, CanaryPhase, CanarySpec, CanaryStatus};
