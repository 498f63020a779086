//! The mesh's one crypto stack: rustls with the aws-lc-rs provider.
//!
//! rustls, and every client built on it without naming a provider (reqwest, kube,
//! tokio-rustls configs from `builder()`), takes the process's default provider; building one
//! before a provider is chosen panics, and in a background task such a panic is easy to miss
//! (the standalone control plane once lost its metrics scraper that way). So every binary calls
//! [`install_provider`] first, and every library entry point that may be the first to build a
//! TLS client or server (embedded controllers, shared client builders, test helpers) calls it
//! too: it is cheap and idempotent.

/// Makes aws-lc-rs the process's default rustls crypto provider. Calling it again, or after
/// another part of the process chose the same provider, changes nothing.
pub fn install_provider() {
    // Err only when a provider is already installed; the workspace builds rustls with
    // aws-lc-rs alone, so that provider is this one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn installs_once_and_again_without_harm() {
        super::install_provider();
        super::install_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
