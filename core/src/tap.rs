//! Who may tap a proxy in a cluster, as the control plane, the injector and the proxy agree on
//! it. The control plane alone holds the tap token ([`derive_token`], from its CA's key, so every
//! replica and every restart holds the same one); the injector gives each pod only its SHA-256
//! ([`token_sha256`], in `MESH_PROXY_TAP_TOKEN_SHA256`), which says nothing about the token to
//! whoever reads the pod spec. The proxy admits a tap whose bearer token hashes to it.
//!
//! Users never see the token: they ask the control plane, which authorizes them with a
//! SubjectAccessReview of [`VERB`] on [`RESOURCE`] in [`API_GROUP`] (the ClusterRole
//! [`CLUSTER_ROLE`] grants it) and relays the taps.

use aws_lc_rs::{digest, hmac};

/// The API group of the tap permission (no API server serves it; RBAC rules may name it).
pub const API_GROUP: &str = "tap.mesh.dev";
/// The resource of the tap permission: a workload is tapped by its Deployment's name.
pub const RESOURCE: &str = "deployments";
/// The verb of the tap permission, as Linkerd's `tap.linkerd.io` uses it.
pub const VERB: &str = "watch";
/// The ClusterRole `mesh install` renders that grants tap; bind it with a RoleBinding to let a
/// user tap in one namespace.
pub const CLUSTER_ROLE: &str = "mesh-tap";

/// What the tap token is derived for: changing it changes every token.
const PURPOSE: &[u8] = b"mesh.dev/tap-token/v1";

/// The tap token of a control plane whose CA key (PEM) is `ca_key_pem`: HMAC-SHA-256 of a fixed
/// purpose under that key, as 64 hex digits.
pub fn derive_token(ca_key_pem: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, ca_key_pem.as_bytes());
    hex(hmac::sign(&key, PURPOSE).as_ref())
}

/// The SHA-256 of `token` (trimmed), as 64 lower-case hex digits: what a proxy is given.
pub fn token_sha256(token: &str) -> String {
    hex(digest::digest(&digest::SHA256, token.trim().as_bytes()).as_ref())
}

/// Whether `digest` is a well-formed [`token_sha256`] value.
pub fn is_sha256_hex(digest: &str) -> bool {
    digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_sha256_and_the_token_depends_on_the_key() {
        assert_eq!(
            token_sha256("abc\n"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = derive_token("key a");
        assert_eq!(a, derive_token("key a"));
        assert_ne!(a, derive_token("key b"));
        assert!(is_sha256_hex(&a));
        assert!(is_sha256_hex(&token_sha256(&a)));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }
}
