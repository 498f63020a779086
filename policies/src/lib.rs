//! The authorization model of the mesh, shared by the control plane (which indexes `Server`,
//! `AuthorizationPolicy`, `MeshTLSAuthentication` and `NetworkAuthentication` resources into a
//! per-port policy) and the sidecar (which evaluates that policy on every inbound connection,
//! after mTLS has established the peer's identity and before the request reaches the app).
//! Empty until the policy work lands; the crate exists so the workspace has its final shape.
