//! The policy index: a pure structure that resolves `Server`, `AuthorizationPolicy`,
//! `MeshTLSAuthentication` and `NetworkAuthentication` resources into the [`InboundPolicy`] of
//! each watched workload port, and publishes it through `tokio::sync::watch` channels exactly as
//! the discovery [`crate::index`] does (whole values, a growing version, only on change).
//!
//! Resolution, for a port of a workload with some namespace and labels:
//! 1. the `Server`s of that namespace whose `port` is the port and whose `podSelector` matches
//!    the labels; with several, the oldest wins (then the first by name), as with routes;
//! 2. none: the control plane's default policy (`all-unauthenticated` unless configured);
//! 3. otherwise every `AuthorizationPolicy` of that namespace targeting the Server by name, or
//!    targeting the namespace itself, becomes one authorization whose requirements are its
//!    authentication refs. A policy that names an authentication that does not exist authorizes
//!    nobody (it fails closed) until the authentication is created.

use std::collections::BTreeMap;

use mesh_core::proxy_api::PolicyTarget;
use mesh_crds::{
    policy::{AuthorizationPolicy, MeshTlsAuthentication, NetworkAuthentication, Server},
    validate::ResourceKind,
};
use mesh_policies::{
    Authorization, DefaultPolicy, IdentityMatch, InboundPolicy, NetworkMatch, Requirement,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::publish::{Published, send_changed};

type Key = (String, String);

/// The policy index.
#[derive(Debug)]
pub struct PolicyIndex {
    version: u64,
    trust_domain: String,
    default: DefaultPolicy,
    servers: BTreeMap<Key, Server>,
    authorizations: BTreeMap<Key, AuthorizationPolicy>,
    mesh_tls: BTreeMap<Key, MeshTlsAuthentication>,
    networks: BTreeMap<Key, NetworkAuthentication>,
    watches: BTreeMap<PolicyTarget, watch::Sender<Published<InboundPolicy>>>,
}

fn key_of(metadata: &kube::api::ObjectMeta) -> Key {
    (
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// Parses a stored object of `kind` into `map`'s type and files it under its key; an object
/// that does not parse (the store validated it, so only a newer schema) is dropped.
fn insert<T: serde::de::DeserializeOwned + kube::Resource>(
    map: &mut BTreeMap<Key, T>,
    object: &Value,
) {
    match serde_json::from_value::<T>(object.clone()) {
        Ok(resource) => {
            map.insert(key_of(resource.meta()), resource);
        }
        Err(error) => tracing::warn!(%error, "ignoring a policy resource that does not parse"),
    }
}

impl PolicyIndex {
    /// An empty index for `trust_domain` whose ports no Server selects get `default`; versions
    /// start after `initial_version` (see [`crate::index::Index::new`]).
    pub fn new(initial_version: u64, trust_domain: &str, default: DefaultPolicy) -> Self {
        Self {
            version: initial_version,
            trust_domain: trust_domain.to_string(),
            default,
            servers: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            mesh_tls: BTreeMap::new(),
            networks: BTreeMap::new(),
            watches: BTreeMap::new(),
        }
    }

    /// Adds or replaces a stored object of one of the policy kinds (others are ignored).
    pub fn apply(&mut self, kind: ResourceKind, object: &Value) {
        self.insert(kind, object);
        self.publish();
    }

    fn insert(&mut self, kind: ResourceKind, object: &Value) {
        match kind {
            ResourceKind::Server => insert(&mut self.servers, object),
            ResourceKind::AuthorizationPolicy => insert(&mut self.authorizations, object),
            ResourceKind::MeshTlsAuthentication => insert(&mut self.mesh_tls, object),
            ResourceKind::NetworkAuthentication => insert(&mut self.networks, object),
            _ => {}
        }
    }

    /// Removes an object of a policy kind.
    pub fn delete(&mut self, kind: ResourceKind, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let removed = match kind {
            ResourceKind::Server => self.servers.remove(&key).is_some(),
            ResourceKind::AuthorizationPolicy => self.authorizations.remove(&key).is_some(),
            ResourceKind::MeshTlsAuthentication => self.mesh_tls.remove(&key).is_some(),
            ResourceKind::NetworkAuthentication => self.networks.remove(&key).is_some(),
            _ => false,
        };
        if removed {
            self.publish();
        }
    }

    /// Replaces every object of `kind`, as after a relist.
    pub fn reset(&mut self, kind: ResourceKind, objects: &[impl std::borrow::Borrow<Value>]) {
        match kind {
            ResourceKind::Server => self.servers.clear(),
            ResourceKind::AuthorizationPolicy => self.authorizations.clear(),
            ResourceKind::MeshTlsAuthentication => self.mesh_tls.clear(),
            ResourceKind::NetworkAuthentication => self.networks.clear(),
            _ => return,
        }
        for object in objects {
            self.insert(kind, object.borrow());
        }
        self.publish();
    }

    /// Follows the policy of `target`.
    pub fn watch(&mut self, target: &PolicyTarget) -> watch::Receiver<Published<InboundPolicy>> {
        if let Some(tx) = self.watches.get(target) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Published::new(self.version, Some(self.policy(target))));
        self.watches.insert(target.clone(), tx);
        rx
    }

    /// The policy of `target`; see the module docs.
    pub fn policy(&self, target: &PolicyTarget) -> InboundPolicy {
        let selected = self
            .servers
            .iter()
            .filter(|((ns, _), s)| {
                *ns == target.namespace
                    && u16::try_from(s.spec.port).ok() == Some(target.port)
                    && s.spec.pod_selector.matches(&target.labels)
            })
            .min_by(|(ka, a), (kb, b)| {
                let created = |s: &Server| s.metadata.creation_timestamp.clone().map(|t| t.0);
                created(a).cmp(&created(b)).then_with(|| ka.cmp(kb))
            });
        let Some(((namespace, name), server)) = selected else {
            return self.default.policy();
        };
        let authorizations = self
            .authorizations
            .iter()
            .filter(|((ns, _), p)| {
                let t = &p.spec.target_ref;
                ns == namespace
                    && match t.kind.as_str() {
                        "Server" => t.name == *name,
                        "Namespace" => t.name == *namespace,
                        _ => false,
                    }
            })
            .filter_map(|((ns, policy_name), p)| {
                let require = p
                    .spec
                    .required_authentication_refs
                    .iter()
                    .map(|r| {
                        let ref_ns = r.namespace.as_deref().unwrap_or(ns);
                        self.requirement(&r.kind, ref_ns, &r.name)
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Authorization {
                    name: format!("AuthorizationPolicy/{policy_name}"),
                    require,
                })
            })
            .collect();
        InboundPolicy {
            server: format!("Server/{name}"),
            protocol: server.spec.proxy_protocol.unwrap_or_default(),
            authorizations,
        }
    }

    /// What passing the authentication `kind` `namespace/name` takes; `None` when it does not
    /// exist.
    fn requirement(&self, kind: &str, namespace: &str, name: &str) -> Option<Requirement> {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            "ServiceAccount" => Some(Requirement::Identities(vec![IdentityMatch::Exact(
                self.service_account_id(namespace, name),
            )])),
            "MeshTLSAuthentication" => {
                let m = self.mesh_tls.get(&key)?;
                let mut ids: Vec<IdentityMatch> = m
                    .spec
                    .identities
                    .iter()
                    .filter_map(|i| i.parse().ok())
                    .collect();
                ids.extend(m.spec.identity_refs.iter().map(|r| {
                    let ref_ns = r.namespace.as_deref().unwrap_or(namespace);
                    match r.kind.as_str() {
                        "Namespace" => IdentityMatch::Prefix(format!(
                            "spiffe://{}/ns/{}/",
                            self.trust_domain, r.name
                        )),
                        _ => IdentityMatch::Exact(self.service_account_id(ref_ns, &r.name)),
                    }
                }));
                Some(Requirement::Identities(ids))
            }
            "NetworkAuthentication" => {
                let n = self.networks.get(&key)?;
                let nets = n
                    .spec
                    .networks
                    .iter()
                    .filter_map(|net| {
                        Some(NetworkMatch {
                            cidr: mesh_policies::parse_cidr(&net.cidr).ok()?,
                            except: net
                                .except
                                .iter()
                                .filter_map(|e| mesh_policies::parse_cidr(e).ok())
                                .collect(),
                        })
                    })
                    .collect();
                Some(Requirement::Networks(nets))
            }
            _ => None,
        }
    }

    fn service_account_id(&self, namespace: &str, name: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{name}", self.trust_domain)
    }

    /// Recomputes every watched port and sends the ones that changed, under one new version.
    fn publish(&mut self) {
        self.watches.retain(|_, tx| tx.receiver_count() > 0);
        let next = self.version + 1;
        let values: Vec<_> = self
            .watches
            .keys()
            .map(|t| (t.clone(), Some(self.policy(t))))
            .collect();
        send_changed(&self.watches, values, next);
        self.version = next;
    }
}

#[cfg(test)]
#[allow(
    clippy::needless_pass_by_value,
    reason = "builders read better taking json! values"
)]
mod tests {
    use serde_json::json;

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn target(labels: &[(&str, &str)], port: u16) -> PolicyTarget {
        PolicyTarget {
            namespace: "default".into(),
            port,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }
    }

    fn obj(kind: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "policy.mesh.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        })
    }

    fn server(name: &str, app: &str, port: u16) -> Value {
        obj(
            "Server",
            name,
            json!({"podSelector": {"matchLabels": {"app": app}}, "port": port}),
        )
    }

    fn authz(name: &str, server: &str, refs: Value) -> Value {
        obj(
            "AuthorizationPolicy",
            name,
            json!({
                "targetRef": {"group": "policy.mesh.dev", "kind": "Server", "name": server},
                "requiredAuthenticationRefs": refs,
            }),
        )
    }

    fn client(ip: &str, identity: Option<&str>) -> mesh_policies::Client<'static> {
        mesh_policies::Client {
            ip: ip.parse().unwrap(),
            identity: identity.map(|s| Box::leak(s.to_string().into_boxed_str()) as &str),
        }
    }

    #[test]
    fn unselected_ports_get_the_default_and_a_bare_server_denies() {
        let mut index = PolicyIndex::new(0, "cluster.local", DefaultPolicy::AllUnauthenticated);
        let backend = target(&[("app", "backend")], 8080);
        let mut rx = index.watch(&backend);
        assert_eq!(
            rx.borrow_and_update().value.as_ref().unwrap().server,
            "default:all-unauthenticated"
        );

        index.apply(
            ResourceKind::Server,
            &server("backend-http", "backend", 8080),
        );
        assert!(rx.has_changed().unwrap());
        let policy = rx.borrow_and_update().value.clone().unwrap();
        assert_eq!(policy.server, "Server/backend-http");
        assert!(policy.authorize(&client("127.0.0.1", Some(WEB))).is_err());
        // Another port and other labels keep the default.
        assert_eq!(
            index.policy(&target(&[("app", "backend")], 9090)).server,
            "default:all-unauthenticated"
        );
        assert_eq!(
            index.policy(&target(&[("app", "web")], 8080)).server,
            "default:all-unauthenticated"
        );
    }

    #[test]
    fn authorizations_resolve_their_authentications() {
        let mut index = PolicyIndex::new(0, "cluster.local", DefaultPolicy::Deny);
        let backend = target(&[("app", "backend"), ("version", "v2")], 8080);
        index.apply(
            ResourceKind::Server,
            &server("backend-http", "backend", 8080),
        );
        index.apply(
            ResourceKind::AuthorizationPolicy,
            &authz(
                "web-only",
                "backend-http",
                json!([{"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "web"}]),
            ),
        );
        // The authentication does not exist yet: the policy fails closed.
        assert!(index.policy(&backend).authorizations.is_empty());
        index.apply(
            ResourceKind::MeshTlsAuthentication,
            &obj(
                "MeshTLSAuthentication",
                "web",
                json!({"identityRefs": [{"kind": "ServiceAccount", "name": "web"}]}),
            ),
        );
        let policy = index.policy(&backend);
        assert_eq!(
            policy
                .authorize(&client("10.0.0.1", Some(WEB)))
                .unwrap()
                .name,
            "AuthorizationPolicy/web-only"
        );
        assert!(policy.authorize(&client("10.0.0.1", None)).is_err());
        assert!(
            policy
                .authorize(&client(
                    "10.0.0.1",
                    Some("spiffe://cluster.local/ns/default/sa/loadgen")
                ))
                .is_err()
        );

        // A second policy: plaintext from loopback, or the service account directly.
        index.apply(
            ResourceKind::NetworkAuthentication,
            &obj(
                "NetworkAuthentication",
                "local",
                json!({"networks": [{"cidr": "127.0.0.0/8"}]}),
            ),
        );
        index.apply(
            ResourceKind::AuthorizationPolicy,
            &authz(
                "local",
                "backend-http",
                json!([{"group": "policy.mesh.dev", "kind": "NetworkAuthentication", "name": "local"}]),
            ),
        );
        let policy = index.policy(&backend);
        assert_eq!(
            policy.authorize(&client("127.0.0.1", None)).unwrap().name,
            "AuthorizationPolicy/local"
        );
        assert!(policy.authorize(&client("10.0.0.1", None)).is_err());

        // Deleting the Server brings back the default.
        index.delete(ResourceKind::Server, "default", "backend-http");
        assert_eq!(index.policy(&backend).server, "default:deny");
    }

    #[test]
    fn namespace_targets_and_service_account_refs() {
        let mut index = PolicyIndex::new(0, "cluster.local", DefaultPolicy::AllUnauthenticated);
        index.apply(
            ResourceKind::Server,
            &server("backend-http", "backend", 8080),
        );
        index.apply(
            ResourceKind::AuthorizationPolicy,
            &obj(
                "AuthorizationPolicy",
                "whole-namespace",
                json!({
                    "targetRef": {"kind": "Namespace", "name": "default"},
                    "requiredAuthenticationRefs": [{"kind": "ServiceAccount", "name": "web"}],
                }),
            ),
        );
        let policy = index.policy(&target(&[("app", "backend")], 8080));
        assert_eq!(policy.authorizations.len(), 1);
        assert!(policy.authorize(&client("10.0.0.1", Some(WEB))).is_ok());
        assert!(
            policy
                .authorize(&client(
                    "10.0.0.1",
                    Some("spiffe://cluster.local/ns/other/sa/web")
                ))
                .is_err()
        );
    }

    #[test]
    fn reset_replaces_a_kind_and_watchers_only_hear_changes() {
        let mut index = PolicyIndex::new(10, "cluster.local", DefaultPolicy::AllUnauthenticated);
        let backend = target(&[("app", "backend")], 8080);
        let mut rx = index.watch(&backend);
        rx.borrow_and_update();
        // A change elsewhere does not wake this watcher.
        index.apply(ResourceKind::Server, &server("web-http", "web", 8080));
        assert!(!rx.has_changed().unwrap());
        index.reset(
            ResourceKind::Server,
            &[server("backend-http", "backend", 8080)],
        );
        assert!(rx.has_changed().unwrap());
        let update = rx.borrow_and_update().clone();
        assert_eq!(update.value.as_ref().unwrap().server, "Server/backend-http");
        assert!(update.version > 10);
        assert_eq!(
            index.policy(&target(&[("app", "web")], 8080)).server,
            "default:all-unauthenticated"
        );
    }
}
