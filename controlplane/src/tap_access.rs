//! Who may tap in a cluster. A caller presents a bearer token the API server vouches for (a
//! service account's token, or any token its authenticators accept, as `kubectl create token`
//! makes); the control plane learns who it is with a TokenReview and asks the API server
//! whether that user may tap the workload with a SubjectAccessReview: verb
//! [`mesh_core::tap::VERB`] on [`mesh_core::tap::RESOURCE`] in [`mesh_core::tap::API_GROUP`],
//! named by the workload, in its namespace. The ClusterRole [`mesh_core::tap::CLUSTER_ROLE`]
//! that `mesh install` renders grants it. Linkerd authorizes its tap the same way (`watch` on
//! `tap.linkerd.io`), so a RoleBinding reads the same.
//!
//! The control plane then opens the taps itself, with a token only it holds: the proxies never
//! see, and could not check, the user's credentials.

use http::{HeaderMap, StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use mesh_core::tap::{API_GROUP, CLUSTER_ROLE, RESOURCE, VERB};

/// Why a tap was not allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, or credentials the API server does not vouch for.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known user without the permission.
    #[error("{0}")]
    Forbidden(String),
    /// The API server could not be asked.
    #[error("cannot check the caller with the Kubernetes API: {0}")]
    Api(String),
}

impl Denied {
    /// The HTTP status the refusal is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Api(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `Status` reason it is answered with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::Api(_) => "ServiceUnavailable",
        }
    }
}

/// The user a token belongs to, as the API server names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Username (`system:serviceaccount:<ns>:<name>` for a service account).
    pub name: String,
    uid: Option<String>,
    groups: Option<Vec<String>>,
    extra: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

/// Checks that the caller whose credentials are in `headers` may tap `workload` in
/// `namespace`; the user, when they may.
pub async fn authorize(
    client: &Client,
    headers: &HeaderMap,
    namespace: &str,
    workload: &str,
) -> Result<User, Denied> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Denied::Unauthenticated(
                "tap needs Kubernetes credentials: present a bearer token the API server \
                 accepts (for example `--token-file` with the output of `kubectl create token`)"
                    .into(),
            )
        })?;
    let user = authenticate(client, token).await?;
    let attributes = ResourceAttributes {
        group: Some(API_GROUP.into()),
        resource: Some(RESOURCE.into()),
        verb: Some(VERB.into()),
        namespace: Some(namespace.into()),
        name: Some(workload.into()),
        ..ResourceAttributes::default()
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Denied::Api(format!("SubjectAccessReview: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        return Ok(user);
    }
    Err(Denied::Forbidden(forbidden_message(
        &user.name,
        namespace,
        workload,
        status.reason.as_deref(),
    )))
}

/// The 403's text: who, which permission, and how to grant it.
fn forbidden_message(user: &str, namespace: &str, workload: &str, why: Option<&str>) -> String {
    let why = why
        .filter(|w| !w.is_empty())
        .map(|w| format!(" ({w})"))
        .unwrap_or_default();
    format!(
        "user {user:?} may not tap: it lacks {VERB} on {RESOURCE}.{API_GROUP} {workload:?} in \
         namespace {namespace:?}{why}; bind the ClusterRole {CLUSTER_ROLE} to it, e.g. `kubectl \
         create rolebinding {user_arg}-tap -n {namespace} --clusterrole={CLUSTER_ROLE} {subject}`",
        user_arg = user.rsplit(':').next().unwrap_or(user),
        subject = match crate::tokenreview::parse_service_account(user) {
            Some(sa) => format!("--serviceaccount={}:{}", sa.namespace, sa.name),
            None => format!("--user={user}"),
        },
    )
}

/// Who `token` belongs to, by TokenReview (for the API server's own audiences).
async fn authenticate(client: &Client, token: &str) -> Result<User, Denied> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Denied::Api(format!("TokenReview: {e}")))?;
    let status = answer.status.unwrap_or_default();
    let user = status.user.unwrap_or_default();
    match (status.authenticated, user.username) {
        (Some(true), Some(name)) if !name.is_empty() => Ok(User {
            name,
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
        }),
        _ => Err(Denied::Unauthenticated(format!(
            "tap needs Kubernetes credentials: the API server does not accept the bearer token \
             presented ({})",
            status.error.unwrap_or_else(|| "not authenticated".into())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_permission_and_the_binding() {
        let m = forbidden_message("system:serviceaccount:shop:bob", "shop", "web", None);
        assert!(
            m.contains("lacks watch on deployments.tap.mesh.dev \"web\" in namespace \"shop\""),
            "{m}"
        );
        assert!(
            m.contains("--clusterrole=mesh-tap --serviceaccount=shop:bob"),
            "{m}"
        );
        let m = forbidden_message("jane", "prod", "api", Some("no RBAC policy matched"));
        assert!(m.contains("(no RBAC policy matched)"), "{m}");
        assert!(m.contains("--user=jane"), "{m}");
    }
}
