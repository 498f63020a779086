//! The harness's one-node cluster is a real node: pods scheduled by the scheduler start on
//! containerd, get addresses from the bridge CNI, reach each other and a ClusterIP Service
//! through kube-proxy's rules, resolve Service names through CoreDNS, and a Job's pod runs to
//! completion.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "integration tests fail by panicking and report what they measured"
)]

use mesh_test_support::node::{BUSYBOX_IMAGE, Node};

fn manifest() -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: harness}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: harness}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {BUSYBOX_IMAGE}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "mkdir -p /www && echo served-by-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
        readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: harness}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: harness}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: client
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "exec sleep 100000"]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: once, namespace: harness}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: once
        image: {BUSYBOX_IMAGE}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "nslookup web.harness.svc.cluster.local."]
"#
    )
}

/// `GET /` over plain TCP with busybox `nc` from the client pod.
fn get_from_client(node: &Node, host: &str, port: u16) -> String {
    node.kubectl(&[
        "-n",
        "harness",
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}"),
    ])
    .unwrap_or_else(|e| format!("failed: {e}"))
}

#[test]
fn pods_run_and_reach_each_other_services_and_dns() {
    let node = Node::shared().expect("start the one-node cluster");
    eprintln!("node started in {:?}", node.started_in());
    node.apply_text(&manifest()).expect("apply the manifest");
    node.kubectl(&[
        "-n",
        "harness",
        "wait",
        "--for=condition=Available",
        "deployment/web",
        "--timeout=120s",
    ])
    .expect("web becomes available");
    node.kubectl(&[
        "-n",
        "harness",
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ])
    .expect("client becomes ready");

    let web_ip = node
        .kubectl(&[
            "-n",
            "harness",
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
        .unwrap();
    assert!(web_ip.starts_with("10.244.0."), "pod IP from the bridge CNI: {web_ip:?}");
    let web_name = node
        .kubectl(&[
            "-n",
            "harness",
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();

    // Pod to pod, across the bridge.
    let direct = get_from_client(node, &web_ip, 8080);
    assert!(direct.contains(&format!("served-by-{web_name}")), "{direct}");

    // Pod to a ClusterIP, through kube-proxy's DNAT (and back through the bridge).
    let cluster_ip = node
        .kubectl(&["-n", "harness", "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap();
    assert!(cluster_ip.starts_with("10.96."), "{cluster_ip:?}");
    let via_service = get_from_client(node, &cluster_ip, 80);
    assert!(via_service.contains(&format!("served-by-{web_name}")), "{via_service}");

    // The Service's short name resolves through CoreDNS to its ClusterIP, with the pod's
    // search path (busybox also tries the other search domains and exits 1 for their NXDOMAIN).
    let lookup = node
        .kubectl(&["-n", "harness", "exec", "client", "--", "sh", "-c", "nslookup web; true"])
        .unwrap();
    assert!(lookup.contains(&cluster_ip), "{lookup}");

    // A Job's pod runs to completion (and its DNS lookup succeeded, or it would have failed).
    node.kubectl(&[
        "-n",
        "harness",
        "wait",
        "--for=condition=Complete",
        "job/once",
        "--timeout=120s",
    ])
    .expect("the job completes");
    let logs = node.kubectl(&["-n", "harness", "logs", "job/once"]).unwrap();
    assert!(logs.contains(&cluster_ip), "{logs}");
}
