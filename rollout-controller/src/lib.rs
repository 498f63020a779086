//! The rollout controller: it moves traffic from a stable primary to a canary step by step,
//! judges the canary against the primary from the proxies' own golden metrics (Flagger's absolute
//! thresholds plus anytime-valid sequential tests), and promotes or rolls back on its own.
//! [`machine`] is the pure state machine (spec + status + observations in, next status + actions
//! out) and [`judge`] the statistics it calls; metric sources (a direct proxy scrape, or
//! Prometheus) and drivers (the embedded supervisor, or Kubernetes Deployments and HTTPRoutes)
//! are thin adapters around them. The resource types live in `mesh-crds`.

pub use mesh_core::duration;
pub mod controller;
pub mod judge;
pub mod kubernetes;
pub mod machine;
pub mod scrape;
pub mod sources;
pub mod webhooks;

pub use mesh_crds::{Canary, CanaryPhase, CanarySpec, CanaryStatus};
