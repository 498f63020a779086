//! The proxy's one crypto stack: rustls with the ring provider. Identity (verifying peers'
//! client certificates) and TLS (every handshake) both build on it, so it sits below both.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one crypto provider of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
