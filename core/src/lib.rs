//! Shared domain types of the mesh and the vocabulary of the control-plane <-> proxy protocol.
//! Every other crate depends on this one, so it stays small and pure: no tokio, no kube, no I/O.
//! Today it holds workload identity names (SPIFFE IDs), typed env-var config, and the start-up
//! announcement with which a mesh process tells its supervisor which addresses it bound; route
//! tables, endpoints and policy types join it as the sidecar and control plane grow.

pub mod announce;
pub mod config;
pub mod identity;

pub use announce::Listening;
pub use identity::SpiffeId;
