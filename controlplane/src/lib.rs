//! The control plane, `mesh-controlplane`: the single source of truth that tells every proxy
//! where traffic goes and who it is. It stores resources (an embedded transactional store, or
//! the Kubernetes API through reflectors), turns them into per-authority route tables,
//! per-backend endpoint sets and per-port inbound policy in pure indexes, streams those to the
//! sidecars over long-lived mTLS watches, and acts as the CA that issues workload certificates.
//! Empty until the control-plane work lands; the crate exists so the workspace has its final
//! shape.
