//! `mesh-controlplane` in a cluster (`MESH_CONTROLPLANE_KUBERNETES=true`) against a real
//! kube-apiserver: Services, EndpointSlices and Pods become the endpoints proxies watch, and
//! HTTPRoutes their route tables. No kubelet runs, so the test writes the EndpointSlices a node's
//! endpoint controller would (with pod IPs the apiserver accepts). The proxy API is mTLS here
//! too: watchers present a certificate from the control plane's CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use mesh_crds::HttpRoute;
use mesh_test_support::assert_eventually;
use mesh_test_support::kube::KubeApiServer;
use mesh_test_support::process::{MeshBinary, MeshProcess};
use mesh_test_support::proxy_api::MeshCa;
use serde_json::{Value, json};

fn start(kube: &KubeApiServer, state: &std::path::Path) -> MeshProcess {
    MeshBinary::new(env!("CARGO_BIN_EXE_mesh-controlplane"))
        .env("MESH_CONTROLPLANE_STATE_DIR", state)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_KUBERNETES", "true")
        .env("KUBECONFIG", kube.kubeconfig())
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap()
}

/// A real apiserver (the harness installs the mesh's CRDs; this adds Gateway API's HTTPRoute)
/// and the control plane in cluster mode against it, its state in the returned directory.
async fn cluster() -> (KubeApiServer, tempfile::TempDir, MeshProcess) {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    kube.install_crd(mesh_crds::httproute_crd()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&kube, dir.path());
    (kube, dir, cp)
}

/// A proxy API client with a certificate from the control plane's CA, as a proxy watching.
fn watcher(state: &std::path::Path) -> reqwest::Client {
    MeshCa::of_control_plane(state)
        .unwrap()
        .client("spiffe://cluster.local/ns/default/sa/watcher")
        .unwrap()
}

/// The current value of a watch stream: its first line. `client` presents a mesh certificate.
async fn current(client: &reqwest::Client, url: &str) -> Value {
    let mut rsp = client.get(url).send().await.unwrap();
    let mut line = Vec::new();
    while let Some(chunk) = rsp.chunk().await.unwrap() {
        if let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            break;
        }
        line.extend_from_slice(&chunk);
    }
    let update: Value = serde_json::from_slice(&line).unwrap();
    update["value"].clone()
}

fn endpoints(v: &Value) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["addr"].as_str().unwrap().to_string(),
                e["identity"].as_str().map(str::to_string),
            )
        })
        .collect();
    out.sort();
    out
}

fn weights(v: &Value) -> Vec<(String, u64)> {
    v["rules"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["service"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn route(primary: u32, canary: u32) -> HttpRoute {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"backendRefs": [
                {"name": "web-primary", "port": 80, "weight": primary},
                {"name": "web-canary", "port": 80, "weight": canary},
            ]}],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn cluster_objects_become_the_endpoints_and_routes_proxies_watch() {
    let (kube, dir, cp) = cluster().await;
    let client = kube.client();
    let proxy_api = format!("https://{}", cp.addr("proxy"));
    let watcher = watcher(dir.path());
    let endpoints_url = format!("{proxy_api}/v1/watch/endpoints?service=web.default:80");
    let routes_url = format!("{proxy_api}/v1/watch/routes?authority=web.default:80");

    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "selector": {"app": "web"}},
    }))
    .unwrap();
    let created = Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    // The ClusterIP the apiserver gave the Service is the service's own address: a proxy that
    // sees a redirected connection to it learns which service the app meant.
    let cluster_ip = created.spec.unwrap().cluster_ip.unwrap();
    let address_url = format!("{proxy_api}/v1/watch/address?addr={cluster_ip}:80");
    assert_eventually!(
        current(&watcher, &address_url).await["service"] == "web.default:80",
        "address {cluster_ip}:80: {:?}",
        current(&watcher, &address_url).await
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, annotations, sa) in [
        ("web-1", json!({"mesh.dev/injected": "proxy:dev"}), "web"),
        ("legacy-1", json!({}), "default"),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web", "version": "v1"},
                         "annotations": annotations},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "podinfo",
                     "ports": [{"containerPort": 8080}]}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.0.5"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}},
            {"addresses": ["10.244.0.6"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "legacy-1", "namespace": "default"}},
            {"addresses": ["10.244.0.7"], "conditions": {"ready": false}},
        ],
    }))
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    slices.create(&PostParams::default(), &slice).await.unwrap();

    // Ready addresses, at the target port; the meshed pod with its service account's identity,
    // at its proxy's inbound port (the target port is the one its app declares, where the proxy
    // forwards by default).
    let want = vec![
        (
            "10.244.0.5:4143".to_string(),
            Some("spiffe://cluster.local/ns/default/sa/web".to_string()),
        ),
        ("10.244.0.6:8080".to_string(), None),
    ];
    assert_eventually!(
        endpoints(&current(&watcher, &endpoints_url).await) == want,
        "endpoints of web.default:80: {:?}",
        current(&watcher, &endpoints_url).await
    );

    // An HTTPRoute made through the Kubernetes API becomes the route table; a weight change
    // follows.
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), "default");
    routes
        .create(&PostParams::default(), &route(90, 10))
        .await
        .unwrap();
    let split = |p: u64, c: u64| {
        vec![
            ("web-primary.default:80".to_string(), p),
            ("web-canary.default:80".to_string(), c),
        ]
    };
    assert_eventually!(
        weights(&current(&watcher, &routes_url).await) == split(90, 10),
        "routes of web.default:80: {:?}",
        current(&watcher, &routes_url).await
    );
    routes
        .patch(
            "web",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&route(50, 50)),
        )
        .await
        .unwrap();
    assert_eventually!(
        weights(&current(&watcher, &routes_url).await) == split(50, 50),
        "routes of web.default:80: {:?}",
        current(&watcher, &routes_url).await
    );

    // Gone from the cluster, gone from discovery.
    slices
        .delete("web-abc", &DeleteParams::default())
        .await
        .unwrap();
    routes
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    assert_eventually!(
        endpoints(&current(&watcher, &endpoints_url).await).is_empty(),
        "endpoints left: {:?}",
        current(&watcher, &endpoints_url).await
    );
    assert_eventually!(
        current(&watcher, &routes_url).await.is_null(),
        "route left: {:?}",
        current(&watcher, &routes_url).await
    );
}

#[tokio::test]
async fn pods_get_certificates_for_their_own_service_account_only() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use mesh_core::proxy_api::{CERTIFY_PATH, CertifyRequest, CertifyResponse};

    let (kube, dir, cp) = cluster().await;
    let client = kube.client();
    let url = format!("https://{}{CERTIFY_PATH}", cp.addr("proxy"));
    // Certify needs no client certificate, only the proxy API's roots.
    let anonymous = MeshCa::of_control_plane(dir.path())
        .unwrap()
        .client_without_certificate()
        .unwrap();

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let sa: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}))
    .unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    // What the kubelet mounts in an injected pod: a token for our audience.
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![mesh_controlplane::inject::TOKEN_AUDIENCE.to_string()]),
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        }),
        ..TokenRequest::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", "web", &PostParams::default(), &request)
        .await
        .unwrap();
    let token = token.status.unwrap().token.unwrap();

    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let certify = |token: &str, identity: &str| {
        let body = CertifyRequest {
            token: token.to_string(),
            csr_pem: csr.clone(),
            identity: identity.to_string(),
        };
        let url = url.clone();
        let anonymous = anonymous.clone();
        async move { anonymous.post(url).json(&body).send().await.unwrap() }
    };

    let ok = certify(&token, "spiffe://cluster.local/ns/default/sa/web").await;
    assert_eq!(ok.status(), 200);
    let issued: CertifyResponse = ok.json().await.unwrap();
    assert!(issued.certificate_chain_pem.contains("BEGIN CERTIFICATE"));

    // The same token may not claim another service account.
    let other = certify(&token, "spiffe://cluster.local/ns/default/sa/admin").await;
    assert_eq!(other.status(), 403);
    let text = other.text().await.unwrap();
    assert!(text.contains("default/web"), "{text}");
    // In a cluster the embedded bootstrap token is no credential.
    let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap-token")).unwrap();
    let refused = certify(&bootstrap, "spiffe://cluster.local/ns/default/sa/web").await;
    assert_eq!(refused.status(), 403);
}

/// The policy CRDs install on a real apiserver, and Server, AuthorizationPolicy and
/// MeshTLSAuthentication objects made through the Kubernetes API become the policy a workload
/// port's proxy watches.
#[tokio::test]
async fn policy_objects_in_the_cluster_become_the_policy_proxies_watch() {
    use mesh_crds::policy::{AuthorizationPolicy, MeshTlsAuthentication, Server};
    let (kube, dir, cp) = cluster().await;
    let client = kube.client();
    let watcher = watcher(dir.path());
    let policy_url = format!(
        "https://{}/v1/watch/policy?namespace=default&port=8080&labels=app%3Dweb%2Cversion%3Dv1",
        cp.addr("proxy")
    );
    assert_eq!(
        current(&watcher, &policy_url).await["server"],
        "default:all-unauthenticated"
    );

    let pp = PostParams::default();
    let server: Server = serde_json::from_value(json!({
        "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "Server",
        "metadata": {"name": "web-http", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080, "proxyProtocol": "HTTP/1"},
    }))
    .unwrap();
    let authn: MeshTlsAuthentication = serde_json::from_value(json!({
        "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "MeshTLSAuthentication",
        "metadata": {"name": "frontend", "namespace": "default"},
        "spec": {"identityRefs": [{"kind": "ServiceAccount", "name": "frontend"}]},
    }))
    .unwrap();
    let authz: AuthorizationPolicy = serde_json::from_value(json!({
        "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "web-from-frontend", "namespace": "default"},
        "spec": {
            "targetRef": {"group": "policy.mesh.dev", "kind": "Server", "name": "web-http"},
            "requiredAuthenticationRefs": [
                {"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "frontend"},
            ],
        },
    }))
    .unwrap();
    let servers: Api<Server> = Api::namespaced(client.clone(), "default");
    servers.create(&pp, &server).await.unwrap();
    Api::<MeshTlsAuthentication>::namespaced(client.clone(), "default")
        .create(&pp, &authn)
        .await
        .unwrap();
    Api::<AuthorizationPolicy>::namespaced(client.clone(), "default")
        .create(&pp, &authz)
        .await
        .unwrap();

    let want = json!({
        "server": "Server/web-http",
        "protocol": "HTTP/1",
        "authorizations": [{
            "name": "AuthorizationPolicy/web-from-frontend",
            "require": [{"identities": ["spiffe://cluster.local/ns/default/sa/frontend"]}],
        }],
    });
    assert_eventually!(
        current(&watcher, &policy_url).await == want,
        "policy of web:8080: {}",
        current(&watcher, &policy_url).await
    );

    // The apiserver enforces the generated schema: a Server without a port is refused.
    let bad: Result<Server, _> = serde_json::from_value(json!({
        "apiVersion": "policy.mesh.dev/v1alpha1", "kind": "Server",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"podSelector": {}, "port": 0},
    }));
    let refused = servers.create(&pp, &bad.unwrap()).await.unwrap_err();
    assert!(refused.to_string().contains("spec.port"), "{refused}");

    servers
        .delete("web-http", &DeleteParams::default())
        .await
        .unwrap();
    assert_eventually!(
        current(&watcher, &policy_url).await["server"] == "default:all-unauthenticated",
        "policy of web:8080 after the Server left: {}",
        current(&watcher, &policy_url).await
    );
}

/// In a cluster the control plane's resource API is the cluster: `mesh apply`-style writes
/// are validated (a batch with one bad document writes nothing) and land as Kubernetes objects,
/// reads see objects made with any other client, and deletes delete.
#[tokio::test]
async fn the_resource_api_reads_and_writes_the_cluster() {
    let (kube, state, cp) = cluster().await;
    let client = kube.client();
    let api = format!("http://{}", cp.addr("api"));
    let http = mesh_test_support::mesh::api_client(state.path());
    let apply = |body: &'static str| {
        http.post(format!("{api}/apply?namespace=default"))
            .header("content-type", "application/yaml")
            .body(body)
            .send()
    };
    const SERVER: &str = "apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {name: web-http}
spec: {podSelector: {matchLabels: {app: web}}, port: 8080}
";
    const BAD_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web-primary, port: 80, weight: -5}]}]
";
    let servers: Api<mesh_crds::policy::Server> = Api::namespaced(client.clone(), "default");
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), "default");

    // A batch whose second document is invalid is refused whole, naming the field.
    let body: &'static str = Box::leak(format!("{SERVER}---\n{BAD_ROUTE}").into_boxed_str());
    let rsp = apply(body).await.unwrap();
    assert_eq!(rsp.status(), 422);
    let status: Value = rsp.json().await.unwrap();
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.rules[0].backendRefs[0].weight"
    );
    assert!(servers.get_opt("web-http").await.unwrap().is_none());

    // Workloads are the embedded mesh's; a cluster refuses them by name.
    let rsp = apply(
        "apiVersion: workloads.mesh.dev/v1alpha1
kind: Workload
metadata: {name: web}
spec: {version: v1, versions: {v1: {command: [web]}}}
",
    )
    .await
    .unwrap();
    assert_eq!(rsp.status(), 422);
    assert!(
        rsp.text()
            .await
            .unwrap()
            .contains("only in the embedded mesh")
    );

    // A valid apply lands in the cluster.
    let rsp = apply(SERVER).await.unwrap();
    assert!(rsp.status().is_success(), "{}", rsp.text().await.unwrap());
    let stored = servers.get("web-http").await.unwrap();
    assert_eq!(stored.spec.port, 8080);

    // An object made with another client is read through the API.
    routes
        .create(&PostParams::default(), &route(80, 20))
        .await
        .unwrap();
    let list_url = format!("{api}/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes");
    assert_eventually!(
        http.get(&list_url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["items"][0]["metadata"]["name"]
            == "web"
    );

    // Deleting through the API deletes in the cluster.
    let rsp = http
        .delete(format!(
            "{api}/apis/policy.mesh.dev/v1alpha1/namespaces/default/servers/web-http"
        ))
        .send()
        .await
        .unwrap();
    assert!(rsp.status().is_success(), "{}", rsp.status());
    assert_eventually!(servers.get_opt("web-http").await.unwrap().is_none());
}
