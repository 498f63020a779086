//! The proxy's one crypto stack: rustls with the aws-lc-rs provider, whose key exchange offers
//! the hybrid post-quantum group X25519MLKEM768 first and still accepts classical X25519 and
//! the NIST curves from peers that lack it. Identity (verifying peers' client certificates) and
//! TLS (every handshake) both build on it, so it sits below both.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one crypto provider of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
