//! Tap in a cluster, against a real kube-apiserver: the control plane (cluster mode, with its
//! injector webhook registered with the API server) lets a user bound to the `mesh-tap`
//! ClusterRole tap a workload's proxy, refuses a user without it with 403 naming the missing
//! permission, and refuses a caller without credentials with 401. The proxy, a real one
//! started with the environment the injector gave the pod, admits the control plane's taps
//! and nobody else's.
//!
//! No kubelet runs: the test starts the proxy itself and writes the pod's IP into its status,
//! as a node would. The pod's IP is a loopback address of its own so that the proxy can listen
//! on the admin port the injector declared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use mesh_controlplane::inject;
use mesh_test_support::apps::app;
use mesh_test_support::certs::{Leaf, TestCa};
use mesh_test_support::kube::KubeApiServer;
use mesh_test_support::process::{MeshBinary, MeshProcess};
use mesh_test_support::proxies::{Sidecar, proxy};
use serde_json::{Value, json};

const NS: &str = "shop";
/// The proxy's admin address variable.
const ENV_ADMIN_ADDR: &str = "MESH_PROXY_ADMIN_ADDR";
use inject::ENV_PROXY_TAP_TOKEN_SHA256 as ENV_TAP_TOKEN_SHA256;

/// The control plane in cluster mode with its injector serving `tls_dir`'s certificate.
fn control_plane(
    kube: &KubeApiServer,
    state: &std::path::Path,
    tls_dir: &std::path::Path,
) -> MeshProcess {
    MeshBinary::new(env!("CARGO_BIN_EXE_mesh-controlplane"))
        .env("MESH_CONTROLPLANE_STATE_DIR", state)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_INJECTOR_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_INJECTOR_TLS_DIR", tls_dir)
        .env("MESH_CONTROLPLANE_KUBERNETES", "true")
        .env("KUBECONFIG", kube.kubeconfig())
        .listener("api")
        .listener("proxy")
        .listener("injector")
        .run()
        .unwrap()
}

/// A token the API server issues for service account `name` in [`NS`].
async fn token(client: &kube::Client, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    // No audiences: the API server's own, which is what a user's `kubectl create token` gives.
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let answer = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap();
    serde_json::to_value(&answer).unwrap()["status"]["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A tap of `workload` through the control plane at `api`, with `token` if any.
async fn tap(api: SocketAddr, workload: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!(
        "http://{api}/v1/observe/tap?workload={workload}&namespace={NS}&max=1"
    ));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

/// The `Status` message of a refusal.
async fn message(rsp: reqwest::Response) -> String {
    let body: Value = rsp.json().await.unwrap();
    body["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn only_a_user_the_api_server_authorizes_taps_and_the_proxy_admits_only_the_control_plane() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();

    // The injector's serving certificate, as `mesh install` renders it into a Secret.
    let ca = TestCa::new("mesh-tap-test-ca").unwrap();
    let serving = ca
        .issue(&Leaf::new("mesh-injector").san("127.0.0.1").server())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("injector");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::write(tls_dir.join("tls.crt"), &serving.cert_pem).unwrap();
    std::fs::write(tls_dir.join("tls.key"), &serving.key_pem).unwrap();
    let state = dir.path().join("state");
    let cp = control_plane(&kube, &state, &tls_dir);
    let api = cp.addr("api");

    let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mesh-proxy-injector"},
        "webhooks": [{
            "name": "proxy-injector.mesh.dev",
            "clientConfig": {
                "url": format!("https://{}{}", cp.addr("injector"), mesh_controlplane::injector::INJECT_PATH),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem()),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
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
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": NS, "annotations": {inject::INJECT_ANNOTATION: "enabled"}},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    // The role `mesh install` renders, bound to alice in the namespace; bob has nothing.
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": mesh_core::tap::CLUSTER_ROLE},
        "rules": [{"apiGroups": [mesh_core::tap::API_GROUP],
                   "resources": [mesh_core::tap::RESOURCE],
                   "verbs": [mesh_core::tap::VERB]}],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "alice-tap"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": mesh_core::tap::CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": NS}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let alice = token(&client, "alice").await;
    let bob = token(&client, "bob").await;

    // A pod of Deployment `web` (its ReplicaSet `web-5d8f9`), injected by the webhook. The API
    // server picks a new webhook configuration up within a moment: create until injected.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut injected = None;
    for i in 0..60 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": format!("web-5d8f9-{i}"),
                "labels": {"app": "web", "pod-template-hash": "5d8f9"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-5d8f9", "uid": "0f6c3c3e-1d7b-4c55-9d43-6f1b7c1e2a10"}],
            },
            "spec": {"containers": [{"name": "app", "image": "web:1",
                                     "ports": [{"containerPort": 8080}]}]},
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        let has_proxy = created.spec.iter().any(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == inject::PROXY_CONTAINER)
        });
        if has_proxy {
            injected = Some(created);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let pod = injected.expect("the injector never injected a pod");
    let pod_name = pod.metadata.name.clone().unwrap();
    let spec = pod.spec.clone().unwrap();
    let proxy_container = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == inject::PROXY_CONTAINER)
        .unwrap();
    let env: BTreeMap<String, String> = proxy_container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let digest = env
        .get(ENV_TAP_TOKEN_SHA256)
        .expect("the injector gives the proxy the tap token's digest")
        .clone();
    let admin_port = proxy_container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(inject::ADMIN_PORT_NAME))
        .unwrap()
        .container_port;
    assert!(
        !env.values().any(|v| v.contains(&alice) || v.contains(&bob)),
        "no token in the pod spec"
    );

    // The node's part: the pod runs (here, a real proxy on a loopback address of its own) and
    // its IP is in its status.
    let ip = IpAddr::V4(Ipv4Addr::new(
        127,
        91,
        u8::try_from(std::process::id() % 250).unwrap(),
        7,
    ));
    let upstream = app("web").start().await.unwrap();
    let p = proxy()
        .outbound(format!(
            r#"
routes:
  - parent: web.{NS}:80
    rules:
      - matches: [{{path: {{type: PathPrefix, value: /}}}}]
        backends: [{{service: web-v1.{NS}:80, weight: 1}}]
endpoints:
  - service: web-v1.{NS}:80
    endpoints: [{{addr: "{}"}}]
"#,
            upstream.addr()
        ))
        .env(ENV_ADMIN_ADDR, format!("{ip}:{admin_port}"))
        .env(ENV_TAP_TOKEN_SHA256, digest)
        .run()
        .unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                                   "podIPs": [{"ip": ip.to_string()}]}});
    pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    // No credentials: 401.
    let rsp = tap(api, "web", None).await;
    assert_eq!(rsp.status(), 401);
    let why = message(rsp).await;
    assert!(why.contains("needs Kubernetes credentials"), "{why}");
    // A token the API server does not know: 401.
    let rsp = tap(api, "web", Some("not-a-token")).await;
    assert_eq!(rsp.status(), 401);
    // bob is known but not bound: 403 naming the permission and the role.
    let rsp = tap(api, "web", Some(&bob)).await;
    assert_eq!(rsp.status(), 403);
    let why = message(rsp).await;
    assert!(
        why.contains("system:serviceaccount:shop:bob")
            && why.contains("watch on deployments.tap.mesh.dev \"web\" in namespace \"shop\"")
            && why.contains("--clusterrole=mesh-tap"),
        "{why}"
    );
    // alice is bound in shop only: another namespace is refused.
    let other = reqwest::Client::new()
        .get(format!(
            "http://{api}/v1/observe/tap?workload=web&namespace=prod"
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);

    // alice taps, and sees a request as it happens, from the pod's proxy.
    let mut rsp = tap(api, "web", Some(&alice)).await;
    assert_eq!(rsp.status(), 200, "{:?}", rsp.headers());
    let client = p.client();
    let load = tokio::spawn(async move {
        loop {
            let _ = client.get("http://web.shop:80/checkout").send().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let mut text = String::new();
    while let Some(chunk) = rsp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    load.abort();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(event.get("error").is_none(), "{event}");
    assert_eq!(event["path"], "/checkout", "{event}");
    assert_eq!(event["pod"], pod_name.as_str(), "{event}");
    assert_eq!(event["proxy"], format!("{ip}:{admin_port}"), "{event}");

    // The same through `mesh tap`, as a user runs it with a token from `kubectl create token`.
    let mesh = mesh_test_support::process::workspace_bin("mesh").unwrap();
    let mesh_tap = |token: &str| {
        let file = dir.path().join(format!("token-{}", token.len() % 97));
        std::fs::write(&file, token).unwrap();
        let mut cmd = tokio::process::Command::new(&mesh);
        cmd.args(["tap", "web", "-n", NS, "--max", "1", "--server"])
            .arg(format!("http://{api}"))
            .arg("--token-file")
            .arg(&file)
            .env("MESH_CONFIG_DIR", dir.path());
        cmd.output()
    };
    let refused = mesh_tap(&bob).await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    eprintln!("mesh tap as bob: {stderr}");
    assert!(!refused.status.success());
    assert!(
        stderr.contains("403") && stderr.contains("may not tap"),
        "{stderr}"
    );
    let client = p.client();
    let load = tokio::spawn(async move {
        loop {
            let _ = client.get("http://web.shop:80/checkout").send().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let tapped = mesh_tap(&alice).await.unwrap();
    load.abort();
    let stdout = String::from_utf8_lossy(&tapped.stdout);
    eprintln!("mesh tap as alice: {stdout}");
    assert!(
        tapped.status.success(),
        "{}",
        String::from_utf8_lossy(&tapped.stderr)
    );
    assert!(stdout.contains("/checkout"), "{stdout}");

    // The proxy admits the control plane only: alice's own token, or the digest the pod spec
    // shows, opens nothing there.
    for token in [alice.as_str(), env[ENV_TAP_TOKEN_SHA256].as_str()] {
        let direct = reqwest::Client::new()
            .get(format!("http://{ip}:{admin_port}/tap"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 401);
    }
    drop(p);
}
