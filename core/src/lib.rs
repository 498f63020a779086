//! Shared domain types of the mesh and the vocabulary of the control-plane <-> proxy protocol.
//! Every other crate depends on this one, so it stays small and pure: no tokio, no kube, no I/O.
//! It holds workload identity names (SPIFFE IDs), typed env-var config, Flagger-style durations,
//! error chains as people read them, the start-up announcement with which a mesh process tells
//! its supervisor which addresses it bound, the proxy API (route tables, endpoints, identity and
//! workload-registration messages) and the pure routing decisions over route tables.

pub mod announce;
pub mod config;
pub mod duration;
pub mod error;
pub mod identity;
pub mod proxy_api;
pub mod routing;

pub use announce::Listening;
pub use identity::SpiffeId;
