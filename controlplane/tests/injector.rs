//! The proxy-injector webhook behind a real kube-apiserver: pods created in an annotated
//! namespace come back with the proxy, as a native sidecar since this API server's version has
//! them; others are left alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::PostParams;
use mesh_controlplane::inject::{self, InjectConfig, ProxyLayout};
use mesh_controlplane::injector;
use mesh_test_support::certs::{Leaf, TestCa};
use mesh_test_support::kube::KubeApiServer;
use serde_json::json;

fn namespace(name: &str, inject: Option<&str>) -> Namespace {
    let mut annotations = BTreeMap::new();
    if let Some(v) = inject {
        annotations.insert(inject::INJECT_ANNOTATION.to_string(), v.to_string());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotations},
    }))
    .unwrap()
}

fn pod(name: &str, annotations: &serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{
            "name": "app", "image": "podinfo:6",
            "ports": [{"containerPort": 9898}],
        }]},
    }))
    .unwrap()
}

/// The pod's init containers, then its containers, by name.
fn containers(p: &Pod) -> Vec<String> {
    let spec = p.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn pods_in_annotated_namespaces_get_the_proxy() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();

    let ca = TestCa::new("mesh-injector-test-ca").unwrap();
    let serving = ca
        .issue(&Leaf::new("mesh-injector").san("127.0.0.1").server())
        .unwrap();
    let tls = injector::tls_config(&serving.cert_pem, &serving.key_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The layout comes from the API server's version, as in the control plane.
    let layout = injector::proxy_layout(&client).await.unwrap();
    assert_eq!(layout, ProxyLayout::NativeSidecar);
    let config = InjectConfig {
        layout,
        proxy_image: "example.test/mesh-proxy:dev".into(),
        ..InjectConfig::default()
    };
    let server = tokio::spawn(injector::serve(listener, tls, config, client.clone()));

    let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mesh-proxy-injector"},
        "webhooks": [{
            "name": "proxy-injector.mesh.dev",
            "clientConfig": {
                "url": format!("https://{addr}{}", injector::INJECT_PATH),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem()),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-system", "mesh-system"]}]},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": 10,
        }],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [namespace("shop", Some("enabled")), namespace("plain", None)] {
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");

    // The apiserver picks up a new webhook configuration within a moment; until then pods are
    // admitted unchanged, so keep creating until one comes back injected.
    let mut injected = None;
    for i in 0..60 {
        let p = shop
            .create(
                &PostParams::default(),
                &pod(&format!("web-{i}"), &json!({})),
            )
            .await
            .unwrap();
        if containers(&p).iter().any(|c| c == inject::PROXY_CONTAINER) {
            injected = Some(p);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let p = injected.expect("no pod in the annotated namespace was injected");
    assert_eq!(
        containers(&p),
        [inject::INIT_CONTAINER, inject::PROXY_CONTAINER, "app"]
    );
    let spec = p.spec.as_ref().unwrap();
    let init = spec.init_containers.as_ref().unwrap();
    // The API server kept the sidecar's restartPolicy: it validates native sidecars.
    assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        init[1].image.as_deref(),
        Some("example.test/mesh-proxy:dev")
    );
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()[inject::INJECTED_ANNOTATION],
        "example.test/mesh-proxy:dev"
    );
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.name == "mesh-identity-token"),
        "{spec:?}"
    );

    // Tracing: the injector's default collector (none here) gives way to the pod's
    // annotations; a value the proxy would refuse leaves the pod uninjected, and the API
    // server's warning names the annotation.
    let traced = shop
        .create(
            &PostParams::default(),
            &pod(
                "traced",
                &json!({inject::TRACE_COLLECTOR_ANNOTATION: "jaeger.tracing:4318",
                        inject::TRACE_SAMPLING_ANNOTATION: "0.25"}),
            ),
        )
        .await
        .unwrap();
    let proxy_env: BTreeMap<String, String> = traced
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[1]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    assert_eq!(
        proxy_env["MESH_PROXY_TRACE_COLLECTOR"],
        "jaeger.tracing:4318"
    );
    assert_eq!(proxy_env["MESH_PROXY_TRACE_SAMPLING"], "0.25");
    let refused = shop
        .create(
            &PostParams::default(),
            &pod(
                "badly-traced",
                &json!({inject::TRACE_SAMPLING_ANNOTATION: "all of them"}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(containers(&refused), ["app"]);

    // Opted out, or not opted in: unchanged.
    let out = shop
        .create(
            &PostParams::default(),
            &pod("opted-out", &json!({inject::INJECT_ANNOTATION: "disabled"})),
        )
        .await
        .unwrap();
    assert_eq!(containers(&out), ["app"]);
    let untouched = plain
        .create(&PostParams::default(), &pod("web", &json!({})))
        .await
        .unwrap();
    assert_eq!(containers(&untouched), ["app"]);
    let opted_in = plain
        .create(
            &PostParams::default(),
            &pod("opted-in", &json!({inject::INJECT_ANNOTATION: "enabled"})),
        )
        .await
        .unwrap();
    assert_eq!(
        containers(&opted_in),
        [inject::INIT_CONTAINER, inject::PROXY_CONTAINER, "app"]
    );

    // Point the webhook at a port nothing listens on: pods are still admitted (failurePolicy:
    // Ignore), uninjected. The mesh being down never blocks a deploy.
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let mut down = hooks.get("mesh-proxy-injector").await.unwrap();
    let dead = mesh_test_support::ports::free_port().unwrap();
    down.webhooks.as_mut().unwrap()[0].client_config.url =
        Some(format!("https://127.0.0.1:{dead}{}", injector::INJECT_PATH));
    hooks
        .replace("mesh-proxy-injector", &PostParams::default(), &down)
        .await
        .unwrap();
    let mut uninjected = false;
    for i in 0..60 {
        let p = shop
            .create(
                &PostParams::default(),
                &pod(&format!("down-{i}"), &json!({})),
            )
            .await
            .expect("a pod is admitted while the injector is down");
        if containers(&p) == ["app"] {
            uninjected = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        uninjected,
        "pods kept being injected after the webhook went away"
    );
    drop(server);
}
