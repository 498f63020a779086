//! The registry of kinds the mesh serves: each kind's API group, version, `kind` and plural,
//! and the names a user may type for it. The resource API routes by it, the stores key objects
//! by it, and validation dispatches on it.

use std::fmt;

/// A kind of resource the mesh serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// `rollouts.mesh.dev/v1alpha1` Canary.
    Canary,
    /// `rollouts.mesh.dev/v1alpha1` MetricTemplate.
    MetricTemplate,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    GrpcRoute,
    /// `workloads.mesh.dev/v1alpha1` Workload (embedded mesh only).
    Workload,
    /// `policy.mesh.dev/v1alpha1` Server.
    Server,
    /// `policy.mesh.dev/v1alpha1` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `policy.mesh.dev/v1alpha1` MeshTLSAuthentication.
    MeshTlsAuthentication,
    /// `policy.mesh.dev/v1alpha1` NetworkAuthentication.
    NetworkAuthentication,
}

impl ResourceKind {
    /// Every served kind.
    pub const ALL: [Self; 9] = [
        Self::Canary,
        Self::MetricTemplate,
        Self::HttpRoute,
        Self::GrpcRoute,
        Self::Workload,
        Self::Server,
        Self::AuthorizationPolicy,
        Self::MeshTlsAuthentication,
        Self::NetworkAuthentication,
    ];

    /// The policy kinds, which the control plane resolves into proxies' inbound policies.
    pub const POLICY: [Self; 4] = [
        Self::Server,
        Self::AuthorizationPolicy,
        Self::MeshTlsAuthentication,
        Self::NetworkAuthentication,
    ];

    /// The `kind` field.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Canary => "Canary",
            Self::MetricTemplate => "MetricTemplate",
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::Workload => "Workload",
            Self::Server => "Server",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::MeshTlsAuthentication => "MeshTLSAuthentication",
            Self::NetworkAuthentication => "NetworkAuthentication",
        }
    }

    /// The API group.
    pub fn group(self) -> &'static str {
        match self {
            Self::Canary | Self::MetricTemplate => crate::ROLLOUTS_GROUP,
            Self::HttpRoute | Self::GrpcRoute => "gateway.networking.k8s.io",
            Self::Workload => crate::workload::WORKLOADS_GROUP,
            Self::Server
            | Self::AuthorizationPolicy
            | Self::MeshTlsAuthentication
            | Self::NetworkAuthentication => crate::policy::POLICY_GROUP,
        }
    }

    /// The API version within the group.
    pub fn version(self) -> &'static str {
        match self {
            Self::Canary
            | Self::MetricTemplate
            | Self::Workload
            | Self::Server
            | Self::AuthorizationPolicy
            | Self::MeshTlsAuthentication
            | Self::NetworkAuthentication => "v1alpha1",
            Self::HttpRoute | Self::GrpcRoute => "v1",
        }
    }

    /// The `apiVersion` field: `<group>/<version>`.
    pub fn api_version(self) -> String {
        format!("{}/{}", self.group(), self.version())
    }

    /// The plural used in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Canary => "canaries",
            Self::MetricTemplate => "metrictemplates",
            Self::HttpRoute => "httproutes",
            Self::GrpcRoute => "grpcroutes",
            Self::Workload => "workloads",
            Self::Server => "servers",
            Self::AuthorizationPolicy => "authorizationpolicies",
            Self::MeshTlsAuthentication => "meshtlsauthentications",
            Self::NetworkAuthentication => "networkauthentications",
        }
    }

    /// Names a user may type for this kind on the command line, besides `<plural>.<group>`.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Self::Canary => &["canary", "canaries"],
            Self::MetricTemplate => &["metrictemplate", "metrictemplates", "mt"],
            Self::HttpRoute => &["httproute", "httproutes"],
            Self::GrpcRoute => &["grpcroute", "grpcroutes"],
            Self::Workload => &["workload", "workloads", "wl"],
            Self::Server => &["server", "servers", "srv"],
            Self::AuthorizationPolicy => &[
                "authorizationpolicy",
                "authorizationpolicies",
                "authzpolicy",
            ],
            Self::MeshTlsAuthentication => &[
                "meshtlsauthentication",
                "meshtlsauthentications",
                "meshtlsauthn",
            ],
            Self::NetworkAuthentication => &[
                "networkauthentication",
                "networkauthentications",
                "netauthn",
            ],
        }
    }

    /// The kind a user means by `name` (`canary`, `canaries`, `mt`, `httproutes.gateway.networking.k8s.io`).
    pub fn from_user(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|k| {
            k.names().contains(&name.as_str())
                || name == format!("{}.{}", k.plural(), k.group())
                || name == format!("{}.{}", k.kind().to_ascii_lowercase(), k.group())
        })
    }

    /// The kind served under `group`/`version` with plural `plural`.
    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }

    /// The kind a document declares with its `apiVersion` and `kind`.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.api_version() == api_version)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_resolve_from_user_names_and_paths() {
        assert_eq!(
            ResourceKind::from_user("canaries"),
            Some(ResourceKind::Canary)
        );
        assert_eq!(
            ResourceKind::from_user("mt"),
            Some(ResourceKind::MetricTemplate)
        );
        assert_eq!(
            ResourceKind::from_user("httproutes.gateway.networking.k8s.io"),
            Some(ResourceKind::HttpRoute)
        );
        assert_eq!(ResourceKind::from_user("pods"), None);
        assert_eq!(
            ResourceKind::from_path("gateway.networking.k8s.io", "v1", "httproutes"),
            Some(ResourceKind::HttpRoute)
        );
    }
}
