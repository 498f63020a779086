//! Shared domain types of the mesh and the vocabulary of the control-plane <-> proxy protocol.
//! Every other crate depends on this one, so it stays small and pure: no tokio, no kube, no I/O.
//! It holds workload identity names (SPIFFE IDs), typed env-var config, Flagger-style durations,
//! error chains as people read them, the start-up announcement with which a mesh process tells
//! its supervisor which addresses it bound, the proxy API (route tables, endpoints, identity and
//! workload-registration messages), the pure routing decisions over route tables, the proxy's
//! metric contract (series, labels, buckets) with a reader of the Prometheus text format, and
//! the built-in canary gates defined over that contract.

pub mod announce;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod error;
pub mod exposition;
pub mod gates;
pub mod identity;
pub mod metrics;
pub mod name;
pub mod prometheus;
pub mod proxy_api;
pub mod routing;
pub mod tap;
pub mod trace;

pub use announce::Listening;
pub use identity::SpiffeId;
pub use name::Name;
