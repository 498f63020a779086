//! TokenReview against a real kube-apiserver: a token minted for a service account (as the
//! kubelet does for a projected volume) names that account; others are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount as SaObject;
use kube::Api;
use kube::api::PostParams;
use mesh_controlplane::inject::TOKEN_AUDIENCE;
use mesh_controlplane::tokenreview::{ReviewError, ServiceAccount, review};
use mesh_test_support::kube::KubeApiServer;
use serde_json::json;

#[tokio::test]
async fn projected_tokens_name_their_service_account() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();
    let sas: Api<SaObject> = Api::namespaced(client.clone(), "default");
    let sa: SaObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}))
    .unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let mint = |audience: &str| {
        let sas = sas.clone();
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_string()]),
                expiration_seconds: Some(3600),
                bound_object_ref: None,
            }),
            ..TokenRequest::default()
        };
        async move {
            let r: TokenRequest = sas
                .create_subresource("token", "web", &PostParams::default(), &request)
                .await
                .unwrap();
            r.status.unwrap().token.unwrap()
        }
    };

    let token = mint(TOKEN_AUDIENCE).await;
    assert_eq!(
        review(&client, &token, TOKEN_AUDIENCE).await,
        Ok(ServiceAccount {
            namespace: "default".into(),
            name: "web".into()
        })
    );
    // A token for another audience (say, the API server's own) is not one for us.
    let other = mint("https://kubernetes.default.svc").await;
    assert!(matches!(
        review(&client, &other, TOKEN_AUDIENCE).await,
        Err(ReviewError::Unauthenticated { .. })
    ));
    assert!(matches!(
        review(&client, "not-a-token", TOKEN_AUDIENCE).await,
        Err(ReviewError::Unauthenticated { .. })
    ));
}
