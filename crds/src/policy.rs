//! Inbound authorization, in `policy.mesh.dev/v1alpha1`, modelled on Linkerd's policy resources:
//!
//! - a `Server` selects a port on a set of workloads (by label) and says how its traffic is read;
//! - an `AuthorizationPolicy` targets a Server (or every Server of a namespace) and names the
//!   authentications a client must *all* pass;
//! - a `MeshTLSAuthentication` is passed by clients whose mTLS identity matches;
//! - a `NetworkAuthentication` is passed by clients whose address is in a network.
//!
//! A port no Server selects gets the control plane's default policy; a Server nobody authorizes
//! admits nobody. The control plane resolves these into one `mesh_policies::InboundPolicy` per
//! workload port, and the workload's sidecar enforces it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the policy resources.
pub const POLICY_GROUP: &str = "policy.mesh.dev";

/// A port on a set of workloads that policy applies to.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    category = "mesh",
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.proxyProtocol"}"#,
    doc = "A port on a set of workloads that inbound policy applies to."
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The workloads, by label, in the Server's namespace. An empty selector selects them all.
    pub pod_selector: LabelSelector,
    /// The port the workloads are called on: the Workload's `port` in the embedded mesh, the
    /// container port in a cluster.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// How the port's traffic is read: `unknown` (detect, the default), `HTTP/1`, `HTTP/2`,
    /// `gRPC` or `opaque`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<mesh_policies::ProxyProtocol>,
}

/// A Kubernetes label selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Expressions that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One expression of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Who may reach a Server: every authentication named must be passed.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    category = "mesh",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    doc = "Authorizes clients that pass all the named authentications to reach a Server."
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Server (`kind: Server`, group `policy.mesh.dev`) or the Namespace (`kind:
    /// Namespace`, core group; every Server in it) this policy opens.
    pub target_ref: PolicyTargetRef,
    /// Authentications a client must all pass; empty admits every client.
    #[serde(default)]
    pub required_authentication_refs: Vec<AuthenticationRef>,
}

/// What an AuthorizationPolicy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// `policy.mesh.dev` for a Server, empty (core) for a Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Server` or `Namespace`.
    pub kind: String,
    /// The Server's name (in the policy's namespace), or the namespace's.
    pub name: String,
}

/// An authentication a client must pass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationRef {
    /// `policy.mesh.dev` for MeshTLSAuthentication and NetworkAuthentication; empty (core) for
    /// ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `MeshTLSAuthentication`, `NetworkAuthentication` or `ServiceAccount` (the client's mTLS
    /// identity is that service account's).
    pub kind: String,
    /// The resource's name.
    pub name: String,
    /// Its namespace; the policy's own when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Passed by clients that authenticated with mTLS as one of the given identities.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "MeshTLSAuthentication",
    root = "MeshTlsAuthentication",
    namespaced,
    category = "mesh",
    doc = "Passed by clients whose mTLS identity is one of the given identities."
)]
#[serde(rename_all = "camelCase")]
pub struct MeshTlsAuthenticationSpec {
    /// SPIFFE IDs: exact (`spiffe://cluster.local/ns/default/sa/web`), a prefix ending in `/*`
    /// (`spiffe://cluster.local/ns/default/*`), or `*` for any authenticated client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Service accounts (`kind: ServiceAccount`) or whole namespaces (`kind: Namespace`) whose
    /// workloads' identities pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_refs: Vec<IdentityRef>,
}

/// A service account or namespace whose identities a MeshTLSAuthentication admits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRef {
    /// `ServiceAccount` or `Namespace`.
    pub kind: String,
    /// The service account's or namespace's name.
    pub name: String,
    /// The service account's namespace; the authentication's own when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Passed by clients whose address is in one of the given networks.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.mesh.dev",
    version = "v1alpha1",
    kind = "NetworkAuthentication",
    namespaced,
    category = "mesh",
    doc = "Passed by clients whose address is in one of the given networks."
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAuthenticationSpec {
    /// The networks.
    pub networks: Vec<Network>,
}

/// A network, less some sub-networks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address.
    pub cidr: String,
    /// CIDRs inside `cidr` that do not pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}
