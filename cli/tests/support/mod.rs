//! What the tests on the one-node cluster (`node.rs`, `ha.rs`) do the same way: run `mesh`
//! against the node, pipe its output to `kubectl apply`, and build and import this workspace's
//! images.
#![allow(dead_code, reason = "each test binary uses the part it needs")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use mesh_test_support::{node::Node, process::workspace_bin};

/// The registry the images are built for and imported under.
pub const REGISTRY: &str = "localhost/mesh";

/// Runs the workspace's `mesh` with the node's kubeconfig.
pub fn mesh(node: &Node, args: &[&str]) -> Output {
    Command::new(workspace_bin("mesh").unwrap())
        .args(args)
        .env("KUBECONFIG", node.kubeconfig())
        .stdin(Stdio::null())
        .output()
        .expect("run mesh")
}

/// A finished command's status and both streams, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `mesh ARGS | kubectl apply -f -`, as the docs tell users.
pub fn mesh_apply(node: &Node, args: &[&str]) {
    let out = mesh(node, args);
    assert!(out.status.success(), "mesh {args:?}: {}", text(&out));
    node.apply_text(&String::from_utf8(out.stdout).unwrap())
        .unwrap_or_else(|e| panic!("kubectl apply of mesh {args:?}: {e}"));
}

/// kubectl against the node; panics naming the command when it fails.
pub fn kubectl(node: &Node, args: &[&str]) -> String {
    node.kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// kubectl's output, or its error as text: for failure messages, which must not panic on the way.
pub fn kubectl_text(node: &Node, args: &[&str]) -> String {
    node.kubectl(args)
        .unwrap_or_else(|e| format!("kubectl {args:?}: {e}"))
}

/// A kubectl command line and its output (or error), as a section of a failure message.
pub fn kubectl_section(node: &Node, args: &[&str]) -> String {
    format!(
        "--- kubectl {}\n{}\n",
        args.join(" "),
        kubectl_text(node, args)
    )
}

/// What a stuck install leaves to read: the node's conditions and taints (a node under disk
/// pressure leaves every pod Pending), every pod, and the recent events of `namespace`.
pub fn cluster_state(node: &Node, namespace: &str) -> String {
    let mut out = String::new();
    for args in [
        &[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} taints={.spec.taints}{range .status.conditions[*]}{\"\\n  \"}{.type}={.status} {.message}{end}{\"\\n\"}{end}",
        ][..],
        &["get", "pods", "-A", "-o", "wide"],
        &["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"],
    ] {
        out.push_str(&kubectl_section(node, args));
    }
    out
}

/// Waits, for at most `limit`, until `mesh check` passes; returns its output. On timeout it
/// panics with the last output and the cluster's state, so a failure says why.
#[allow(
    clippy::disallowed_methods,
    reason = "the tests that install the mesh run kubectl synchronously; nothing else shares their thread"
)]
pub fn wait_for_mesh_check(node: &Node, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = mesh(node, &["check"]);
        let last = text(&out);
        if out.status.success() {
            return last;
        }
        assert!(
            start.elapsed() < limit,
            "mesh check passes: not within {limit:?}\n--- last `mesh check`\n{last}\n{}",
            cluster_state(node, "mesh-system")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `kubectl rollout status` of a deployment; on failure panics with the cluster's state. It asks
/// kubectl for 115 s, so kubectl's own message comes before the harness stops any command at
/// 120 s.
pub fn wait_for_rollout(node: &Node, namespace: &str, deployment: &str) {
    let target = format!("deployment/{deployment}");
    if let Err(e) = node.kubectl(&[
        "-n",
        namespace,
        "rollout",
        "status",
        &target,
        "--timeout=115s",
    ]) {
        panic!(
            "{target} in {namespace} did not roll out: {e}\n{}",
            cluster_state(node, namespace)
        );
    }
}

/// `mesh rollout status NAME --watch` against the node, for at most five minutes: exits 0 on a
/// promotion, 1 on a rollback.
pub fn watch_rollout(node: &Node, namespace: &str, name: &str) -> Output {
    mesh(
        node,
        &[
            "rollout",
            "status",
            name,
            "-n",
            namespace,
            "--watch",
            "--timeout",
            "5m",
            "--kube",
        ],
    )
}

/// A Canary's phase, or "" before it has a status.
pub fn canary_phase(node: &Node, namespace: &str, name: &str) -> String {
    node.kubectl(&[
        "-n",
        namespace,
        "get",
        "canary",
        name,
        "-o",
        "jsonpath={.status.phase}",
    ])
    .unwrap_or_default()
}

/// Builds this workspace's images (all of them when `images` is empty) from the debug binaries
/// with `scripts/build-images`, tagged `REGISTRY/<image>:<version>`, and imports them into the
/// node. Prints what was built and how long it took.
pub fn build_and_import_images(node: &Node, version: &str, images: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let bin_dir: PathBuf = workspace_bin("mesh-proxy")
        .expect("the workspace's binaries (cargo build --workspace --bins)")
        .parent()
        .unwrap()
        .to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let started = Instant::now();
    let built = Command::new(root.join("scripts/build-images"))
        .args(["--out", out_dir.path().to_str().unwrap()])
        .args(["--bin-dir", bin_dir.to_str().unwrap()])
        .args(["--registry", REGISTRY, "--version", version])
        .args(images)
        .output()
        .expect("run scripts/build-images");
    assert!(built.status.success(), "build-images: {}", text(&built));
    eprintln!(
        "images built in {:?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&built.stdout)
    );
    let mut archives: Vec<PathBuf> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    archives.sort();
    assert!(
        !archives.is_empty(),
        "no archives in {}",
        out_dir.path().display()
    );
    for archive in &archives {
        node.import_image(archive).unwrap();
    }
}
