//! The sidecar proxy, `mesh-proxy`: it sits beside every workload and carries all of its
//! service-to-service traffic. Outbound requests are routed by the control plane's HTTPRoute
//! tables to weighted backends and load-balanced endpoints over mTLS; inbound connections are
//! authorized and handed to the local app; both directions record golden metrics that the
//! rollout controller judges canaries by. Today: the outbound listener (HTTP/1.1 and h2c,
//! HTTPRoute matching, weighted backends, timeouts, filters, golden metrics) driven by a static
//! config file, and the admin server (`/live`, `/ready`, `/metrics`, `/config`).

pub mod admin;
pub mod config;
pub mod discovery;
pub mod metrics;
pub mod outbound;
pub mod tables;
