//! `mesh install --ha` on a real one-node cluster (test-support's `node`): three rollout
//! controller replicas elect a leader on their Lease; the leader's pod is deleted while a
//! promotion is under way; another replica takes the Lease over, the rollout finishes, and the
//! promotion happens once.
//!
//! Real: the node (kubelet, containerd, kube-proxy, CoreDNS), the images `scripts/build-images`
//! builds from this workspace's binaries, `mesh install --ha` applied with kubectl, the rollout
//! controller's replicas in pods, `mesh rollout status`. The Canary skips analysis
//! (`skipAnalysis: true`), so no Prometheus or traffic is needed: the rollout under way when the
//! leader dies is the promotion itself, held open by a new primary revision that takes seconds
//! to become ready (a readiness delay), which the new leader must wait out and finish.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "tests print their measurements"
)]

use std::time::{Duration, Instant};

use mesh_test_support::node::Node;
use serde_json::Value;

mod support;
use support::{
    REGISTRY, build_and_import_images, canary_phase, cluster_state, kubectl, kubectl_section,
    kubectl_text, mesh_apply, text, wait_for_rollout, watch_rollout,
};

const VERSION: &str = "ha";
const NS: &str = "shop";

async fn poll<T>(what: &str, patience: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < patience, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn lease_holder(node: &Node) -> String {
    node.kubectl(&[
        "-n",
        "mesh-system",
        "get",
        "lease",
        "mesh-rollout-controller",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .unwrap_or_default()
}

/// How many times the controller recorded `reason` on the Canary (counting repeats an Event's
/// series folds together).
fn events(node: &Node, reason: &str) -> u64 {
    let list: Value = serde_json::from_str(&kubectl(
        node,
        &["-n", NS, "get", "events.events.k8s.io", "-o", "json"],
    ))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["regarding"]["kind"] == "Canary" && e["regarding"]["name"] == "backend")
        .filter(|e| e["reason"] == reason)
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

/// What a stuck failover leaves to read: the node, every pod and the namespace's events
/// ([`cluster_state`]), the Lease, the primary's rollout, and each controller replica's last log
/// lines.
fn diagnosis(node: &Node) -> String {
    let mut out = cluster_state(node, NS);
    for args in [
        &[
            "-n",
            "mesh-system",
            "get",
            "lease",
            "mesh-rollout-controller",
            "-o",
            "yaml",
        ][..],
        &[
            "-n",
            NS,
            "get",
            "deployment",
            "backend-primary",
            "-o",
            "jsonpath={.status}",
        ],
    ] {
        out.push_str(&kubectl_section(node, args));
    }
    let pods = kubectl_text(
        node,
        &[
            "-n",
            "mesh-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=mesh-rollout-controller",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    );
    for pod in pods.split_whitespace() {
        let logs = kubectl_text(node, &["-n", "mesh-system", "logs", pod, "--tail", "40"]);
        out.push_str(&format!("--- logs of {pod}\n{logs}\n"));
    }
    out
}

#[tokio::test]
async fn the_leaders_pod_dies_mid_promotion_and_the_rollout_finishes_once() {
    let started = Instant::now();
    let node = Node::shared().expect("a one-node cluster");
    build_and_import_images(
        node,
        VERSION,
        &[
            "controlplane",
            "rollout-controller",
            "demo-app",
            "proxy",
            "proxy-init",
        ],
    );
    mesh_apply(node, &["install", "--crds"]);
    kubectl(
        node,
        &[
            "wait",
            "--for=condition=Established",
            "crd/canaries.rollouts.mesh.dev",
            "--timeout=60s",
        ],
    );
    mesh_apply(
        node,
        &[
            "install",
            "--ha",
            "--image-registry",
            REGISTRY,
            "--version",
            VERSION,
        ],
    );
    wait_for_rollout(node, "mesh-system", "mesh-rollout-controller");
    let replicas = kubectl(
        node,
        &[
            "-n",
            "mesh-system",
            "get",
            "deployment",
            "mesh-rollout-controller",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
    );
    assert_eq!(replicas, "3");
    let first = poll("a leader", Duration::from_secs(120), || {
        Some(lease_holder(node)).filter(|h| h.starts_with("mesh-rollout-controller-"))
    })
    .await;

    kubectl(node, &["create", "namespace", NS]);
    let demo = format!("{REGISTRY}/demo-app:{VERSION}");
    node.apply_text(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: backend, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  template:
    metadata: {{labels: {{app: backend}}}}
    spec:
      containers:
      - name: app
        image: {demo}
        ports: [{{name: http, containerPort: 9898}}]
        # A revision takes seconds to become ready: the promotion waits for it.
        readinessProbe: {{tcpSocket: {{port: 9898}}, initialDelaySeconds: 12, periodSeconds: 1}}
---
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata: {{name: backend, namespace: {NS}}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: backend}}
  service: {{port: 9898}}
  skipAnalysis: true
  analysis: {{interval: 2s, threshold: 2, stepWeight: 50, maxWeight: 50}}
"#
    ))
    .unwrap();
    poll("the Canary initializes", Duration::from_secs(240), || {
        (canary_phase(node, NS, "backend") == "Initialized").then_some(())
    })
    .await;

    // A new revision; as soon as the promotion is under way, the leader's pod goes at once (as
    // when its node dies): no graceful shutdown in which it could finish the work itself.
    kubectl(
        node,
        &[
            "-n",
            NS,
            "set",
            "image",
            "deployment/backend",
            &format!("app={demo}-v2"),
        ],
    );
    let during = poll("the promotion starts", Duration::from_secs(120), || {
        let p = canary_phase(node, NS, "backend");
        matches!(p.as_str(), "Progressing" | "Promoting" | "Finalising").then_some(p)
    })
    .await;
    let leader = lease_holder(node);
    kubectl(
        node,
        &[
            "-n",
            "mesh-system",
            "delete",
            "pod",
            &leader,
            "--grace-period=0",
            "--force",
        ],
    );
    eprintln!("deleted the leader {leader} (first leader {first}) while the Canary was {during}");

    let status = watch_rollout(node, NS, "backend");
    assert!(
        status.status.success(),
        "{}\n{}",
        text(&status),
        diagnosis(node)
    );
    assert_eq!(canary_phase(node, NS, "backend"), "Succeeded");
    let primary = kubectl(
        node,
        &[
            "-n",
            NS,
            "get",
            "deployment",
            "backend-primary",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ],
    );
    assert_eq!(primary, format!("{demo}-v2"));
    let now = lease_holder(node);
    assert!(
        now != leader && now.starts_with("mesh-rollout-controller-"),
        "{now}"
    );
    // Promoted once: one Promoting and one Succeeded for this revision.
    assert_eq!(events(node, "Promoting"), 1);
    assert_eq!(events(node, "Succeeded"), 1);
    eprintln!("HA failover test took {:?}", started.elapsed());
}
