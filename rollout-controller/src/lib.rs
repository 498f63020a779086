//! The rollout controller: it moves traffic from a stable primary to a canary step by step,
//! judges the canary against the primary from the proxies' own golden metrics (Flagger's absolute
//! thresholds plus anytime-valid sequential tests), and promotes or rolls back on its own.
//! [`machine`] is the pure state machine (spec + status + observations in, next status + actions
//! out), [`schedule`] says when an analysis is due, [`judge`] is the statistics it calls, and
//! [`owned`] builds the names and objects a Canary owns. [`controller`] is the one reconcile
//! turn and backoff over a [`controller::Driver`]; the two drivers sit side by side as thin
//! adapters: [`embedded`] (the resource store and the `mesh` command's supervised workloads)
//! and [`kubernetes`] (Deployments, Services and HTTPRoutes through the apiserver). Metric
//! sources (a direct proxy scrape, or Prometheus) are adapters too. The resource types live in
//! `mesh-crds`.

pub use mesh_core::duration;
pub mod config;
pub mod controller;
pub mod embedded;
pub mod error;
pub mod judge;
pub mod kubernetes;
pub mod machine;
pub mod owned;
pub mod schedule;
pub mod scrape;
pub mod sources;
pub mod webhooks;

pub use mesh_crds::{Canary, CanaryPhase, CanarySpec, CanaryStatus};
