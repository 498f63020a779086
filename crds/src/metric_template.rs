//! `MetricTemplate`: a named query for a custom canary gate, as in Flagger. The query is a
//! Go-template-style string with `{{ namespace }}`, `{{ target }}`, `{{ interval }}` and the
//! canary's `templateVariables` substituted before it runs against the provider.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A query for a custom canary gate.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "rollouts.mesh.dev",
    version = "v1alpha1",
    kind = "MetricTemplate",
    namespaced,
    category = "mesh",
    doc = "A named query for a custom canary gate."
)]
#[serde(rename_all = "camelCase")]
pub struct MetricTemplateSpec {
    /// Where the query runs.
    pub provider: MetricProvider,
    /// The query, with `{{ variable }}` placeholders.
    #[schemars(length(min = 1))]
    pub query: String,
}

/// Kinds of metric providers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MetricProviderType {
    /// A Prometheus server queried over its HTTP API.
    Prometheus,
}

/// Where a template's query runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricProvider {
    /// Provider kind.
    #[serde(rename = "type")]
    pub type_: MetricProviderType,
    /// Base URL of the provider, e.g. `http://prometheus.monitoring:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// Secret holding credentials for the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Skip TLS verification of the provider.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A reference to a Secret in the template's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
}
