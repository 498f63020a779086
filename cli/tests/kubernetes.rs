//! `mesh check`, `mesh install`, `mesh inject`, `mesh rollout` and `mesh apply/get/delete`
//! against a real kube-apiserver + etcd. There is no kubelet: the test marks the mesh's
//! Deployments available itself, as a node would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use mesh_test_support::kube::KubeApiServer;
use mesh_test_support::process::workspace_bin;
use serde_json::{Value, json};

fn mesh(kube: &KubeApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(workspace_bin("mesh").unwrap());
    cmd.args(args)
        .env("KUBECONFIG", kube.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = stdin {
        cmd.stdin(std::fs::File::open(path).unwrap());
    } else {
        cmd.stdin(Stdio::null());
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn documents(yaml: &[u8]) -> Vec<Value> {
    serde_yaml::Deserializer::from_slice(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Server-side applies `doc`, as `kubectl apply --server-side` would.
async fn apply(client: &Client, discovery: &Discovery, doc: &Value) {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            doc["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let kind = doc["kind"].as_str().unwrap();
    let gvk = GroupVersionKind::gvk(&group, &version, kind);
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("the apiserver does not serve {gvk:?}"));
    let name = doc["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
        Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("mesh-install-test").force(),
        &Patch::Apply(doc),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

#[tokio::test]
async fn install_check_and_inject_on_a_real_apiserver() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();

    let pre = mesh(&kube, &["check", "--pre"], None);
    assert!(pre.status.success(), "{}", text(&pre));
    assert!(
        text(&pre).contains("√ can create customresourcedefinitions"),
        "{}",
        text(&pre)
    );
    let before = mesh(&kube, &["check"], None);
    assert_eq!(before.status.code(), Some(1), "{}", text(&before));
    assert!(
        text(&before).contains("× namespace mesh-system"),
        "{}",
        text(&before)
    );

    // `mesh install --crds`, then the rest, the way the docs say to apply them.
    let crds = mesh(&kube, &["install", "--crds"], None);
    assert!(crds.status.success(), "{}", text(&crds));
    let crds = documents(&crds.stdout);
    assert!(crds.iter().all(|d| d["kind"] == "CustomResourceDefinition"));
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in &crds {
        apply(&client, &discovery, crd).await;
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            await_condition(crd_api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let install = mesh(
        &kube,
        &["install", "--proxy-image", "example.test/proxy:dev"],
        None,
    );
    assert!(install.status.success(), "{}", text(&install));
    let docs = documents(&install.stdout);
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(&client, &discovery, doc).await;
    }

    // Installed, but no node runs the pods: check names what is missing.
    let waiting = mesh(&kube, &["check"], None);
    assert_eq!(waiting.status.code(), Some(1), "{}", text(&waiting));
    assert!(
        text(&waiting).contains("√ CRD canaries.rollouts.mesh.dev"),
        "{}",
        text(&waiting)
    );
    assert!(
        text(&waiting).contains("× mesh-controlplane is available: 0/1"),
        "{}",
        text(&waiting)
    );
    assert!(
        text(&waiting).contains("√ the proxy injector webhook is registered"),
        "{}",
        text(&waiting)
    );

    // Play the node: the Deployments become available.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "mesh-system");
    for name in ["mesh-controlplane", "mesh-rollout-controller"] {
        let d = deployments.get(name).await.unwrap();
        let status = json!({"status": {
            "observedGeneration": d.metadata.generation, "replicas": 1, "readyReplicas": 1,
            "availableReplicas": 1, "updatedReplicas": 1}});
        deployments
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }
    let healthy = mesh(&kube, &["check"], None);
    assert!(healthy.status.success(), "{}", text(&healthy));
    assert!(
        text(&healthy).contains("√ the mesh's certificates are valid"),
        "{}",
        text(&healthy)
    );

    // Broken on purpose, one thing at a time: check names it, and passes once it is repaired.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "mesh-system");
    services
        .delete("mesh-controlplane", &Default::default())
        .await
        .unwrap();
    let no_service = mesh(&kube, &["check"], None);
    assert_eq!(no_service.status.code(), Some(1), "{}", text(&no_service));
    assert!(
        text(&no_service).contains(
            "× the proxy injector's Service: Service mesh-system/mesh-controlplane, which the API \
             server calls the proxy injector through, is missing"
        ),
        "{}",
        text(&no_service)
    );
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    apply(&client, &discovery, service).await;
    assert!(mesh(&kube, &["check"], None).status.success());

    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "mesh-system");
    let good = secrets.get("mesh-injector-tls").await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["mesh-controlplane.mesh-system.svc".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired = params.self_signed(&key).unwrap().pem();
    let mut bad = good.clone();
    bad.metadata.managed_fields = None;
    bad.data.as_mut().unwrap().insert(
        "tls.crt".into(),
        k8s_openapi::ByteString(expired.into_bytes()),
    );
    secrets
        .replace("mesh-injector-tls", &PostParams::default(), &bad)
        .await
        .unwrap();
    let expired = mesh(&kube, &["check"], None);
    assert_eq!(expired.status.code(), Some(1), "{}", text(&expired));
    assert!(
        text(&expired).contains(
            "× the mesh's certificates are valid: the proxy injector's serving certificate \
             (Secret mesh-system/mesh-injector-tls) expired on 2021-01-01"
        ),
        "{}",
        text(&expired)
    );
    let mut repaired = secrets.get("mesh-injector-tls").await.unwrap();
    repaired.data = good.data.clone();
    secrets
        .replace("mesh-injector-tls", &PostParams::default(), &repaired)
        .await
        .unwrap();
    assert!(mesh(&kube, &["check"], None).status.success());
    let again = mesh(&kube, &["check", "--pre"], None);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    // `mesh inject` on a Deployment read from stdin; the apiserver accepts the result.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.yaml");
    std::fs::write(
        &file,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  \
         selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    \
         spec:\n      containers:\n      - name: web\n        image: podinfo:6\n        ports:\n        \
         - containerPort: 9898\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n\
         spec:\n  ports: [{port: 9898}]\n  selector: {app: web}\n",
    )
    .unwrap();
    // The trust roots the injected proxy verifies the control plane with: the issuer Secret's
    // certificate, which the control plane signs with.
    let issuer: k8s_openapi::api::core::v1::Secret = Api::namespaced(client.clone(), "mesh-system")
        .get("mesh-identity-issuer")
        .await
        .unwrap();
    let roots_pem = String::from_utf8(issuer.data.unwrap()["tls.crt"].0.clone()).unwrap();
    let roots = dir.path().join("trust-roots.pem");
    std::fs::write(&roots, &roots_pem).unwrap();
    let injected = mesh(
        &kube,
        &[
            "inject",
            "--trust-roots",
            roots.to_str().unwrap(),
            "-f",
            "-",
        ],
        Some(file.to_str().unwrap()),
    );
    assert!(injected.status.success(), "{}", text(&injected));
    assert!(String::from_utf8_lossy(&injected.stderr).contains("Deployment web: injected"));
    let docs = documents(&injected.stdout);
    assert_eq!(docs.len(), 2);
    let d: Deployment = serde_json::from_value(docs[0].clone()).unwrap();
    let created = Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let template = created.spec.unwrap().template.spec.unwrap();
    let names = |cs: &[k8s_openapi::api::core::v1::Container]| -> Vec<String> {
        cs.iter().map(|c| c.name.clone()).collect()
    };
    // A native sidecar by default: the API server accepts it (restartPolicy: Always).
    let init = template.init_containers.as_deref().unwrap();
    assert_eq!(names(init), ["mesh-init", "mesh-proxy"]);
    assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
    assert_eq!(names(&template.containers), ["web"]);
    let proxy_env = init[1].env.clone().unwrap();
    let roots_env = proxy_env
        .iter()
        .find(|e| e.name == "MESH_PROXY_TRUST_ROOTS")
        .and_then(|e| e.value.clone());
    assert_eq!(roots_env, Some(roots_pem));
}

#[tokio::test]
async fn rollout_commands_read_and_steer_a_canary_in_the_cluster() {
    use mesh_crds::Canary;
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let canaries: Api<Canary> = Api::namespaced(kube.client(), "default");
    let canary: Canary = serde_json::from_value(json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "service": {"port": 9898},
            "analysis": {"interval": "30s", "threshold": 5, "stepWeight": 10, "maxWeight": 50},
        },
    }))
    .unwrap();
    canaries
        .create(&PostParams::default(), &canary)
        .await
        .unwrap();
    let set_status = |phase: &'static str, weight: i32| {
        let canaries = canaries.clone();
        async move {
            let status = json!({"status": {"phase": phase, "canaryWeight": weight,
                                           "lastAppliedSpec": "abc123", "failedChecks": 0,
                                           "iterations": 1}});
            canaries
                .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    };
    let kc = kube.kubeconfig().to_str().unwrap().to_string();

    set_status("Progressing", 20).await;
    let status = mesh(
        &kube,
        &["rollout", "status", "web", "--kubeconfig", &kc],
        None,
    );
    assert_eq!(status.status.code(), Some(2), "{}", text(&status));
    assert!(
        text(&status).contains("primary 80% / canary 20%"),
        "{}",
        text(&status)
    );

    let paused = mesh(&kube, &["rollout", "pause", "web", "--kube"], None);
    assert!(paused.status.success(), "{}", text(&paused));
    let promoted = mesh(&kube, &["rollout", "promote", "web", "--kube"], None);
    assert!(promoted.status.success(), "{}", text(&promoted));
    let c = canaries.get("web").await.unwrap();
    assert!(c.spec.suspend, "pause did not set spec.suspend");
    assert_eq!(
        c.metadata.annotations.unwrap()["rollouts.mesh.dev/promote"],
        "abc123",
        "promote names the revision in progress"
    );

    set_status("Failed", 0).await;
    let failed = mesh(
        &kube,
        &["rollout", "status", "web", "--kube", "-o", "json"],
        None,
    );
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let report: Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(report["phase"], "Failed");
    let refused = mesh(&kube, &["rollout", "abort", "web", "--kube"], None);
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused));
    let missing = mesh(&kube, &["rollout", "status", "nope", "--kube"], None);
    assert_eq!(missing.status.code(), Some(4));
    assert!(text(&missing).contains("not found"), "{}", text(&missing));

    // A new pod template the controller has not picked up yet: the old verdict does not
    // count, the rollout is still to come.
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "podinfo:7"}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(kube.client(), "default")
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let stale = mesh(&kube, &["rollout", "status", "web", "--kube"], None);
    assert_eq!(stale.status.code(), Some(2), "{}", text(&stale));
}

/// A Canary with a custom metric and its MetricTemplate, shared by the resource tests of
/// both modes.
const CANARY_AND_TEMPLATE: &str = include_str!("fixtures/canary-and-template.yaml");

#[tokio::test]
async fn resource_commands_apply_get_and_delete_in_the_cluster() {
    use mesh_crds::{Canary, MetricTemplate};
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let kc = kube.kubeconfig().to_str().unwrap().to_string();
    let canaries: Api<Canary> = Api::namespaced(kube.client(), "default");
    let templates: Api<MetricTemplate> = Api::namespaced(kube.client(), "default");
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let manifest = write("canary.yaml", CANARY_AND_TEMPLATE);
    let applied = mesh(
        &kube,
        &["apply", "-f", &manifest, "--kubeconfig", &kc],
        None,
    );
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(
        stdout(&applied).contains("canary.rollouts.mesh.dev/web created"),
        "{}",
        text(&applied)
    );
    assert!(
        stdout(&applied).contains("metrictemplate.rollouts.mesh.dev/errors created"),
        "{}",
        text(&applied)
    );
    let stored = canaries.get("web").await.unwrap();
    assert_eq!(stored.spec.analysis.step_weight, Some(10));
    assert!(templates.get_opt("errors").await.unwrap().is_some());
    let again = mesh(
        &kube,
        &["apply", "-f", &manifest, "--kubeconfig", &kc],
        None,
    );
    assert!(
        stdout(&again).contains("canary.rollouts.mesh.dev/web unchanged"),
        "{}",
        text(&again)
    );

    let table = mesh(&kube, &["get", "canaries", "--kubeconfig", &kc], None);
    assert!(table.status.success(), "{}", text(&table));
    let table = stdout(&table);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("web "), "{table}");
    let yaml = mesh(
        &kube,
        &["get", "canary", "web", "-o", "yaml", "--kubeconfig", &kc],
        None,
    );
    assert!(yaml.status.success(), "{}", text(&yaml));
    let object: Value = serde_yaml::from_slice(&yaml.stdout).unwrap();
    assert_eq!(object["kind"], "Canary");
    assert_eq!(object["apiVersion"], "rollouts.mesh.dev/v1alpha1");
    assert_eq!(object["metadata"]["name"], "web");
    assert_eq!(object["metadata"]["namespace"], "default");
    assert_eq!(object["spec"]["analysis"]["stepWeight"], 10);
    assert!(object["metadata"]["managedFields"].is_null(), "{object}");

    // Refused here, with the embedded mesh's field-level error, before anything is written:
    // the valid first document is not stored either.
    let good = "apiVersion: rollouts.mesh.dev/v1alpha1\nkind: MetricTemplate\nmetadata: {name: good}\n\
                spec: {provider: {type: prometheus, address: \"http://prometheus:9090\"}, query: up}\n";
    let cases = [
        (
            "stepWeight above maxWeight",
            CANARY_AND_TEMPLATE
                .replace("name: web", "name: bad")
                .replace("stepWeight: 10", "stepWeight: 60"),
            "field spec.analysis.stepWeight",
        ),
        (
            "missing field",
            CANARY_AND_TEMPLATE
                .replace(
                    "  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}\n",
                    "",
                )
                .replace("name: web", "name: bad"),
            "field spec.targetRef",
        ),
        (
            "embedded-only kind",
            "apiVersion: workloads.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: bad}\n\
             spec: {command: [app]}\n"
                .to_string(),
            "field kind: Workload exists only in the embedded mesh",
        ),
    ];
    for (what, doc, expected) in cases {
        let file = write("manifest.yaml", &format!("{good}---\n{doc}"));
        let out = mesh(&kube, &["apply", "-f", &file, "--kubeconfig", &kc], None);
        assert!(!out.status.success(), "{what}: accepted");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{what}: {err:?} does not name {expected:?}"
        );
        assert!(err.contains("manifest.yaml (document 2)"), "{what}: {err}");
        assert!(err.contains("nothing was applied"), "{what}: {err}");
        assert!(
            templates.get_opt("good").await.unwrap().is_none(),
            "{what}: something was stored"
        );
        assert!(canaries.get_opt("bad").await.unwrap().is_none(), "{what}");
    }
    let workloads = mesh(&kube, &["get", "workloads", "--kubeconfig", &kc], None);
    assert!(!workloads.status.success());
    assert!(
        stderr(&workloads).contains("Workload exists only in the embedded mesh"),
        "{}",
        text(&workloads)
    );
    // The harness installs the mesh's CRDs but not Gateway API's.
    let routes = mesh(&kube, &["get", "httproutes", "--kubeconfig", &kc], None);
    assert!(!routes.status.success());
    assert!(
        stderr(&routes).contains("does not serve httproutes.gateway.networking.k8s.io"),
        "{}",
        text(&routes)
    );

    let deleted = mesh(
        &kube,
        &["delete", "canary", "web", "--kubeconfig", &kc],
        None,
    );
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(
        stdout(&deleted).contains("canary.rollouts.mesh.dev \"web\" deleted"),
        "{}",
        text(&deleted)
    );
    assert!(canaries.get_opt("web").await.unwrap().is_none());
    let gone = mesh(&kube, &["get", "canary", "web", "--kubeconfig", &kc], None);
    assert!(!gone.status.success());
    assert!(stderr(&gone).contains("NotFound"), "{}", text(&gone));
    let none = mesh(&kube, &["get", "canaries", "--kubeconfig", &kc], None);
    assert!(none.status.success(), "{}", text(&none));
    assert!(
        stderr(&none).contains("No resources found in default namespace."),
        "{}",
        text(&none)
    );
}

/// Applies `mesh install --crds` and then `mesh install <flags>`, as the docs say.
async fn install(kube: &KubeApiServer, flags: &[&str]) -> Vec<Value> {
    let client = kube.client();
    let crds = mesh(kube, &["install", "--crds"], None);
    assert!(crds.status.success(), "{}", text(&crds));
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in documents(&crds.stdout) {
        apply(&client, &discovery, &crd).await;
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            await_condition(crd_api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let args: Vec<&str> = std::iter::once("install")
        .chain(flags.iter().copied())
        .collect();
    let rendered = mesh(kube, &args, None);
    assert!(rendered.status.success(), "{}", text(&rendered));
    let docs = documents(&rendered.stdout);
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(&client, &discovery, doc).await;
    }
    docs
}

#[tokio::test]
async fn upgrade_keeps_the_keys_and_uninstall_leaves_injected_workloads_running() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::ClusterRole;

    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = kube.client();
    // Upgrading nothing is refused, naming why.
    let nothing = mesh(&kube, &["upgrade"], None);
    assert_eq!(nothing.status.code(), Some(1), "{}", text(&nothing));
    assert!(
        text(&nothing).contains("the mesh is not installed here"),
        "{}",
        text(&nothing)
    );

    install(
        &kube,
        &["--image-registry", "localhost/mesh", "--version", "1.0.0"],
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "mesh-system");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "mesh-system");
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "mesh-system");
    let issuer = secrets.get("mesh-identity-issuer").await.unwrap().data;
    let serving = secrets.get("mesh-injector-tls").await.unwrap().data;
    let bundle = |h: MutatingWebhookConfiguration| {
        h.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap()
    };
    let ca = bundle(hooks.get("mesh-proxy-injector").await.unwrap());
    let image = |d: Deployment| {
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };

    // An injected workload, as the webhook would have made it.
    let web: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"},
                                           "annotations": {"mesh.dev/injected": "localhost/mesh/proxy:1.0.0"}},
                              "spec": {"initContainers": [{"name": "mesh-proxy", "image": "localhost/mesh/proxy:1.0.0", "restartPolicy": "Always"}],
                                       "containers": [{"name": "web", "image": "localhost/mesh/demo-app:1.0.0"}]}}},
    }))
    .unwrap();
    let web = Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &web)
        .await
        .unwrap();

    // A new version, now highly available: new images, same keys, budgets added.
    let up = mesh(
        &kube,
        &[
            "upgrade",
            "--image-registry",
            "localhost/mesh",
            "--version",
            "1.1.0",
            "--ha",
        ],
        None,
    );
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        text(&up).contains("kept the identity issuer and the injector certificate"),
        "{}",
        text(&up)
    );
    let cp = deployments.get("mesh-controlplane").await.unwrap();
    assert_eq!(image(cp.clone()), "localhost/mesh/controlplane:1.1.0");
    assert_eq!(cp.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(
        image(deployments.get("mesh-rollout-controller").await.unwrap()),
        "localhost/mesh/rollout-controller:1.1.0"
    );
    assert_eq!(
        secrets.get("mesh-identity-issuer").await.unwrap().data,
        issuer
    );
    assert_eq!(
        secrets.get("mesh-injector-tls").await.unwrap().data,
        serving
    );
    assert_eq!(bundle(hooks.get("mesh-proxy-injector").await.unwrap()), ca);
    assert_eq!(pdbs.list(&Default::default()).await.unwrap().items.len(), 2);

    // Back to one replica: the budgets go.
    let down = mesh(
        &kube,
        &[
            "upgrade",
            "--image-registry",
            "localhost/mesh",
            "--version",
            "1.1.0",
        ],
        None,
    );
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        pdbs.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        deployments
            .get("mesh-controlplane")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(1)
    );

    // An injector certificate close to expiry is replaced, with the caBundle that checks it,
    // and the control plane's pods are told to restart; the identity issuer stays.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["mesh-controlplane.mesh-system.svc".into()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let old = params.self_signed(&key).unwrap().pem();
    let mut s = secrets.get("mesh-injector-tls").await.unwrap();
    s.metadata.managed_fields = None;
    s.data
        .as_mut()
        .unwrap()
        .insert("tls.crt".into(), k8s_openapi::ByteString(old.into_bytes()));
    secrets
        .replace("mesh-injector-tls", &PostParams::default(), &s)
        .await
        .unwrap();
    let template_serial = |d: Deployment| {
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["mesh.dev/injector-certificate-serial"]
            .clone()
    };
    let before = template_serial(deployments.get("mesh-controlplane").await.unwrap());
    let renewed = mesh(
        &kube,
        &[
            "upgrade",
            "--image-registry",
            "localhost/mesh",
            "--version",
            "1.1.0",
        ],
        None,
    );
    assert!(renewed.status.success(), "{}", text(&renewed));
    assert!(
        text(&renewed).contains("issued a new injector certificate"),
        "{}",
        text(&renewed)
    );
    assert_ne!(
        secrets.get("mesh-injector-tls").await.unwrap().data,
        serving
    );
    assert_ne!(bundle(hooks.get("mesh-proxy-injector").await.unwrap()), ca);
    assert_eq!(
        secrets.get("mesh-identity-issuer").await.unwrap().data,
        issuer
    );
    assert_ne!(
        template_serial(deployments.get("mesh-controlplane").await.unwrap()),
        before
    );
    // Play the node, then check: the new certificate chains to the new caBundle.
    for name in ["mesh-controlplane", "mesh-rollout-controller"] {
        let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}});
        deployments
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }
    let checked = mesh(&kube, &["check"], None);
    assert!(checked.status.success(), "{}", text(&checked));

    // Uninstall: everything install added is gone, the injected workload is untouched.
    let gone = mesh(&kube, &["uninstall"], None);
    assert!(gone.status.success(), "{}", text(&gone));
    assert!(
        text(&gone).contains("deleted MutatingWebhookConfiguration mesh-proxy-injector"),
        "{}",
        text(&gone)
    );
    assert!(
        hooks
            .get_opt("mesh-proxy-injector")
            .await
            .unwrap()
            .is_none()
    );
    let roles: Api<ClusterRole> = Api::all(client.clone());
    for name in ["mesh-controlplane", "mesh-rollout-controller"] {
        assert!(roles.get_opt(name).await.unwrap().is_none(), "{name}");
        assert!(deployments.get_opt(name).await.unwrap().is_none(), "{name}");
    }
    assert!(
        secrets
            .get_opt("mesh-identity-issuer")
            .await
            .unwrap()
            .is_none()
    );
    // No namespace controller runs here: the namespace is on its way out, or gone.
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt("mesh-system")
        .await
        .unwrap();
    assert!(ns.is_none_or(|n| n.metadata.deletion_timestamp.is_some()));
    let after = Api::<Deployment>::namespaced(client.clone(), "default")
        .get("web")
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, web.metadata.generation);
    assert_eq!(after.spec, web.spec);
    // The CRDs stay unless asked for; then the mesh's go and HTTPRoute stays.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("canaries.rollouts.mesh.dev")
            .await
            .unwrap()
            .is_some()
    );
    let all = mesh(&kube, &["uninstall", "--crds"], None);
    assert!(all.status.success(), "{}", text(&all));
    let canaries = crds.get_opt("canaries.rollouts.mesh.dev").await.unwrap();
    assert!(canaries.is_none_or(|c| c.metadata.deletion_timestamp.is_some()));
    assert!(
        crds.get_opt("httproutes.gateway.networking.k8s.io")
            .await
            .unwrap()
            .is_some()
    );
}
