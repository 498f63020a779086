//! The sidecar proxy, `mesh-proxy`: it sits beside every workload and carries all of its
//! service-to-service traffic. Outbound requests are routed by the control plane's HTTPRoute
//! tables to weighted backends and load-balanced endpoints over mTLS; inbound connections are
//! authorized and handed to the local app; both directions record golden metrics that the
//! rollout controller judges canaries by. So far only the admin server (`/live`, `/ready`,
//! `/metrics`) exists; the proxying listeners are the sidecar issue's work.

pub mod admin;
pub mod config;
