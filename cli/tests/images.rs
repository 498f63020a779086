//! `scripts/build-images`: the mesh's OCI images, built from the binaries this workspace's
//! test build made, with umoci and no daemon, then read back as a registry client would.
//!
//! Real: the script, umoci, skopeo (`skopeo inspect oci-archive:...` of every tag), and the
//! images' root filesystems, unpacked with umoci and run with chroot: each binary starts from
//! its image's own shared libraries, and the init image's iptables works. The cluster import
//! (`ctr images import`) is exercised by the one-node cluster tests.
//!
//! umoci and skopeo are Debian packages `scripts/test` installs. Under `CI=true` a missing tool
//! fails the test; elsewhere the test says what is missing and skips.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "tests; a skipped test says why on stderr"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh_test_support::process::workspace_bin;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Whether every tool is on PATH; under `CI=true` a missing one is a failure.
fn tools_present(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            !std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|dir| dir.join(name).is_file())
            })
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{missing:?} missing (./scripts/test installs them)");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    false
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// chroot, which lives in /usr/sbin, off some users' PATH.
fn chroot() -> Command {
    let sbin = Path::new("/usr/sbin/chroot");
    Command::new(if sbin.is_file() {
        sbin
    } else {
        Path::new("chroot")
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn build_images(args: &[&str]) -> Output {
    Command::new(repo_root().join("scripts/build-images"))
        .args(args)
        .output()
        .unwrap()
}

fn skopeo_inspect(archive: &str, reference: &str, config: bool) -> Value {
    let mut cmd = Command::new("skopeo");
    cmd.arg("inspect");
    if config {
        cmd.arg("--config");
    }
    let out = run(cmd.arg(format!("oci-archive:{archive}:{reference}")));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Unpacks `reference` of `archive` with umoci into `dir` and returns its root filesystem.
fn unpack(archive: &str, reference: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .args(["-xf", archive, "-C"])
        .arg(&layout));
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{reference}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

#[test]
fn images_carry_their_labels_users_and_demo_variants_and_their_binaries_run() {
    if !tools_present(&["umoci", "skopeo", "strip", "ldd"]) {
        return;
    }
    let bin_dir = workspace_bin("mesh-proxy")
        .expect("the workspace's binaries (cargo build --workspace --bins)")
        .parent()
        .unwrap()
        .to_path_buf();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let built = build_images(&[
        "--out",
        out,
        "--bin-dir",
        bin_dir.to_str().unwrap(),
        "--registry",
        "localhost/mesh-test",
        "--version",
        "t1",
    ]);
    let stdout = String::from_utf8_lossy(&built.stdout).to_string();
    assert!(
        built.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // The sizes table: one line per image, with its archive's size.
    eprintln!("{stdout}");
    for image in [
        "proxy",
        "proxy-init",
        "controlplane",
        "rollout-controller",
        "demo-app",
        "loadgen",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(image)
                && l.contains(&format!("localhost/mesh-test/{image}:t1"))
                && l.contains("MB archive")),
            "{image} in {stdout}"
        );
    }

    let revision = String::from_utf8(
        run(Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(["rev-parse", "HEAD"]))
        .stdout,
    )
    .unwrap();
    let listed = std::fs::read_to_string(out_dir.path().join("images.txt")).unwrap();
    let tags: Vec<(&str, &str)> = listed.lines().map(|l| l.split_once(' ').unwrap()).collect();
    assert_eq!(tags.len(), 8, "{listed}");
    for (archive, reference) in &tags {
        let inspected = skopeo_inspect(archive, reference, false);
        let labels = &inspected["Labels"];
        assert_eq!(
            labels["org.opencontainers.image.version"], "t1",
            "{reference}"
        );
        assert!(
            labels["org.opencontainers.image.revision"]
                .as_str()
                .unwrap()
                .starts_with(revision.trim()),
            "{reference}: {labels}"
        );
        assert!(
            labels["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
                .starts_with("mesh "),
            "{labels}"
        );
        assert_eq!(inspected["Os"], "linux");
    }

    let config = |reference: &str| {
        let (archive, _) = tags.iter().find(|(_, r)| *r == reference).unwrap();
        skopeo_inspect(archive, reference, true)["config"].clone()
    };
    let user = |reference: &str| config(reference)["User"].as_str().unwrap().to_string();
    let env = |reference: &str| -> Vec<String> {
        config(reference)["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    };
    // Non-root where possible; the proxy as the uid the init container's rules let through.
    assert_eq!(user("localhost/mesh-test/proxy:t1"), "2102:2102");
    assert_eq!(user("localhost/mesh-test/controlplane:t1"), "2103:2103");
    assert_eq!(
        user("localhost/mesh-test/rollout-controller:t1"),
        "2103:2103"
    );
    assert_eq!(user("localhost/mesh-test/demo-app:t1"), "65532:65532");
    assert_eq!(user("localhost/mesh-test/proxy-init:t1"), "0:0");
    // The demo's variants: the same binary, told by its environment what version it is.
    let good = env("localhost/mesh-test/demo-app:t1-v2");
    assert!(good.contains(&"DEMO_VERSION=v2".to_string()), "{good:?}");
    assert!(
        !good.iter().any(|e| e.starts_with("DEMO_ERROR_RATE")),
        "{good:?}"
    );
    let bad = env("localhost/mesh-test/demo-app:t1-bad");
    assert!(bad.contains(&"DEMO_ERROR_RATE=0.5".to_string()), "{bad:?}");
    assert!(
        bad.contains(&"DEMO_LISTEN_HOST=0.0.0.0".to_string()),
        "{bad:?}"
    );

    if !is_root() {
        eprintln!("skipping the chroot runs: they need root");
        return;
    }
    // Each binary runs from its image alone: the base layer holds its whole library closure.
    for (image, binary) in [
        ("proxy", "mesh-proxy"),
        ("controlplane", "mesh-controlplane"),
        ("rollout-controller", "mesh-rollout-controller"),
        ("demo-app", "mesh-demo-app"),
        ("loadgen", "mesh-loadgen"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let archive = format!("{out}/{image}.tar");
        let rootfs = unpack(
            &archive,
            &format!("localhost/mesh-test/{image}:t1"),
            dir.path(),
        );
        // Every binary starts without a missing library (`--help`; the control plane and the
        // proxy take no flags and say so, or fail later on their own terms).
        let ran = chroot()
            .arg("--userspec=65532:65532")
            .arg(&rootfs)
            .arg(format!("/usr/bin/{binary}"))
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&ran.stderr);
        assert!(
            !stderr.contains("error while loading shared libraries")
                && !stderr.contains("No such file"),
            "{image}: {stderr}"
        );
        // It got as far as its own main: help text, a usage line, or its own error.
        let said = format!("{}{stderr}", String::from_utf8_lossy(&ran.stdout));
        assert!(
            ran.status.code() != Some(127) && said.to_lowercase().contains(&binary[5..]),
            "{image}: {}\n{said}",
            ran.status
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = unpack(
        &format!("{out}/proxy-init.tar"),
        "localhost/mesh-test/proxy-init:t1",
        dir.path(),
    );
    let ran = run(chroot().arg(&rootfs).args([
        "/bin/sh",
        "-c",
        "iptables --version && iptables-legacy --version",
    ]));
    let versions = String::from_utf8_lossy(&ran.stdout);
    assert!(
        versions.contains("nf_tables") && versions.contains("legacy"),
        "{versions}"
    );
}

#[test]
fn bad_invocations_are_refused_naming_what_is_wrong() {
    let cases: [(&[&str], &str); 5] = [
        (&[], "--out DIR is required"),
        (
            &["--out", "/nonexistent/x", "nope"],
            "unknown image \"nope\"",
        ),
        (
            &["--out", "/nonexistent/x", "--registry", "Upper/Case"],
            "bad --registry \"Upper/Case\"",
        ),
        (
            &["--out", "/nonexistent/x", "--version", "-x"],
            "bad --version \"-x\"",
        ),
        (
            &["--out", "/nonexistent/x", "--frobnicate"],
            "unknown flag --frobnicate",
        ),
    ];
    for (args, needle) in cases {
        let out = build_images(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // A binary that is not there is named, with how to build it.
    let empty = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = build_images(&[
        "--out",
        out_dir.path().to_str().unwrap(),
        "--bin-dir",
        empty.path().to_str().unwrap(),
        "proxy",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mesh-proxy is missing") && stderr.contains("cargo build"),
        "{stderr}"
    );
}
