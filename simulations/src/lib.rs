//! Rollout simulations: synthetic canaries (healthy, erroring, slow, bursty, low-traffic, with
//! a flaky primary or gaps in the metrics) run through the rollout controller's real state
//! machine and judge, and through re-implementations of Flagger's, Argo Rollouts' and a
//! Kayenta-style analysis, to measure how fast bad versions are caught, how often good ones are
//! wrongly rolled back, and how many failed requests a bad canary serves first.
//!
//! Nothing here runs in the data path. [`traffic`] synthesises the proxies' golden metrics
//! (request, failure and latency-histogram counts, as the metric sources deliver them),
//! [`strategy`] decides rollouts from them (the `mesh` strategy calls
//! `mesh_rollout_controller::machine::step`), [`run`] runs seeds in parallel and summarises,
//! and [`report`] writes `docs/simulations.md`, its plot and `target/sim/results.json`.

pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod strategy;
pub mod traffic;
