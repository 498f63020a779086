//! Identity bootstrap in a cluster: a proxy presents its pod's projected service-account token
//! (audience [`crate::inject::TOKEN_AUDIENCE`]), and the control plane asks the API server who
//! it belongs to with a TokenReview. The answer, `system:serviceaccount:<namespace>:<name>`, is
//! the only identity that token may be certified for.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

/// The service account a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    /// The API server could not be asked.
    #[error("TokenReview failed: {0}")]
    Api(String),
    /// The API server does not vouch for the token.
    #[error("the token is not valid for audience {audience}: {reason}")]
    Unauthenticated {
        /// The audience asked for.
        audience: String,
        /// What the API server said.
        reason: String,
    },
    /// The token is valid but not a service account's.
    #[error("the token belongs to {0:?}, not to a service account")]
    NotAServiceAccount(String),
}

/// Asks the API server whose `token` is, for `audience`.
pub async fn review(
    client: &Client,
    token: &str,
    audience: &str,
) -> Result<ServiceAccount, ReviewError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| ReviewError::Api(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Unauthenticated {
            audience: audience.to_string(),
            reason: status.error.unwrap_or_else(|| "not authenticated".into()),
        });
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    parse_service_account(&username).ok_or(ReviewError::NotAServiceAccount(username))
}

/// `system:serviceaccount:<namespace>:<name>` as a [`ServiceAccount`].
pub fn parse_service_account(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_name_service_accounts() {
        assert_eq!(
            parse_service_account("system:serviceaccount:shop:web"),
            Some(ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            })
        );
        for bad in [
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(parse_service_account(bad), None, "{bad}");
        }
    }
}
