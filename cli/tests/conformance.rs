//! The Gateway API conformance suite's mesh profiles against the mesh on a real one-node
//! cluster: `mesh install --crds` and `mesh install` piped to `kubectl apply`, the suite's
//! release of the Gateway API CRDs, the suite's echo-advanced image imported into the node, and
//! the suite itself (a Go test binary) run with the namespace annotation that injects our proxy.
//! Its requests leave the echo client pods for Service ClusterIPs through the proxy's redirect.
//!
//! `the_core_tests_of_mesh_http_and_mesh_grpc_pass` is the bounded run of `scripts/test`: both
//! profiles with no extended feature claimed, so only their core tests run. `full_suite`
//! (ignored; `scripts/conformance` runs it) claims every feature in [`FEATURES`] and writes the
//! suite's report where `MESH_CONFORMANCE_REPORT` says.
//!
//! Needs root, the node's binaries (`scripts/build-kube-binaries --node`), the workspace's debug
//! binaries and the suite and echo image from `scripts/conformance --build`, whose directory is
//! `MESH_CONFORMANCE_DIR`; scripts/test provides all of them. Without that directory the bounded
//! test says why and passes, except under `CI=true`, where it fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::disallowed_methods,
    reason = "integration tests fail by panicking and report what they measured; kubectl runs \
              synchronously, so the polls between its runs block"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_test_support::node::Node;

mod support;
use support::{REGISTRY, build_and_import_images, kubectl, mesh_apply, wait_for_mesh_check};

/// The directory `scripts/conformance --build` prints: `conformance.test`, `crds.yaml`,
/// `echo-advanced.oci.tar`.
const ENV_DIR: &str = "MESH_CONFORMANCE_DIR";
/// Where `full_suite` writes the suite's ConformanceReport.
const ENV_REPORT: &str = "MESH_CONFORMANCE_REPORT";
/// A comma-separated list of features `full_suite` claims instead of [`FEATURES`], to try a
/// feature before claiming it.
const ENV_FEATURES: &str = "MESH_CONFORMANCE_FEATURES";

const VERSION: &str = "dev";

/// The profiles the mesh runs.
const PROFILES: &str = "MESH-HTTP,MESH-GRPC";

/// Every feature the mesh claims: the profiles' core features and each extended feature whose
/// tests pass. A feature goes here only with its tests passing (docs/gateway-api.md lists the
/// rest and why).
const FEATURES: &[&str] = &[
    // The profiles' core features.
    "Mesh",
    "HTTPRoute",
    "GRPCRoute",
    // MESH-HTTP's extended features: every one.
    "MeshClusterIPMatching",
    "MeshConsumerRoute",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteNamedRouteRule",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
    // HTTPRoute features that mesh tests also rely on (MeshFrontend, MeshPorts, the 30x
    // redirect tests).
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteParentRefPort",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    // RequestMirror, bodies included (sidecar/tests/mirror.rs). This suite release tests
    // mirrors through a Gateway only, so no mesh test runs for them.
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror",
];

/// The core features of both profiles: the bounded run claims only these.
const CORE_FEATURES: &[&str] = &["Mesh", "HTTPRoute", "GRPCRoute"];

/// The suite's build directory, or `None` (with the reason printed) when it is not there and
/// this is not CI.
fn suite_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os(ENV_DIR).map(PathBuf::from) else {
        let why = format!(
            "{ENV_DIR} is not set: run `scripts/conformance --build` and export its output"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipped: {why}");
        return None;
    };
    for f in ["conformance.test", "crds.yaml", "echo-advanced.oci.tar"] {
        assert!(
            dir.join(f).is_file(),
            "{ENV_DIR}={}: {f} is missing (run scripts/conformance --build)",
            dir.display()
        );
    }
    Some(dir)
}

/// Installs the mesh as a user does, plus the suite's CRDs and its echo image. Once per node.
fn install(node: &Node, dir: &Path) {
    build_and_import_images(
        node,
        VERSION,
        &["proxy", "proxy-init", "controlplane", "rollout-controller"],
    );
    node.import_image(&dir.join("echo-advanced.oci.tar"))
        .unwrap();
    // The suite checks that the cluster's Gateway API CRDs are its own release's; with them
    // in place the mesh is installed as on any cluster that already has Gateway API.
    kubectl(
        node,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            dir.join("crds.yaml").to_str().unwrap(),
        ],
    );
    mesh_apply(node, &["install", "--crds", "--skip-gateway-api-crds"]);
    mesh_apply(
        node,
        &[
            "install",
            "--skip-gateway-api-crds",
            "--image-registry",
            REGISTRY,
            "--version",
            VERSION,
        ],
    );
    wait_for_mesh_check(node, Duration::from_secs(180));
}

/// Runs the suite with `features` claimed; returns whether it passed, and its report.
fn run_suite(node: &Node, dir: &Path, features: &[&str], report: &Path) -> (bool, String) {
    let begun = Instant::now();
    let status = Command::new(dir.join("conformance.test"))
        .args([
            "-test.run=TestConformance",
            "-test.v",
            "-test.timeout=50m",
            &format!("--conformance-profiles={PROFILES}"),
            &format!("--supported-features={}", features.join(",")),
            "--namespace-annotations=mesh.dev/inject=enabled",
            "--organization=mesh.dev",
            "--project=mesh",
            "--url=https://github.com/mesh-dev/mesh",
            &format!("--version={}", env!("CARGO_PKG_VERSION")),
            "--contact=https://github.com/mesh-dev/mesh/issues",
            "--mode=default",
            "--cleanup-base-resources=true",
            &format!("--report-output={}", report.display()),
        ])
        .env("KUBECONFIG", node.kubeconfig())
        .status()
        .expect("run conformance.test");
    let report = std::fs::read_to_string(report).unwrap_or_default();
    eprintln!(
        "conformance suite ({} features claimed) ran in {:?}: {status}",
        features.len(),
        begun.elapsed()
    );
    eprintln!("summary:\n{}", summary(&report));
    (status.success(), report)
}

/// A profile's result in the report: `(profile, "core" | "extended", result, failed tests)`.
fn results(report: &str) -> Vec<(String, &'static str, String, Vec<String>)> {
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(report) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in doc["profiles"].as_sequence().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?").to_string();
        for part in ["core", "extended"] {
            let s = &p[part];
            if s.is_null() {
                continue;
            }
            let failed = s["failedTests"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
                .collect();
            let result = s["result"].as_str().unwrap_or("?").to_string();
            out.push((name.clone(), part, result, failed));
        }
    }
    out
}

/// The report's per-profile lines: `MESH-HTTP core: success (passed 7, failed 0, skipped 0)`,
/// then the profile's summary and its failed tests.
fn summary(report: &str) -> String {
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(report) else {
        return format!("(no readable report)\n{report}");
    };
    let mut out = String::new();
    for p in doc["profiles"].as_sequence().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?");
        for part in ["core", "extended"] {
            let s = &p[part];
            if s.is_null() {
                continue;
            }
            let n = |k: &str| s["statistics"][k].as_u64().unwrap_or(0);
            out += &format!(
                "{name} {part}: {} (passed {}, failed {}, skipped {})\n",
                s["result"].as_str().unwrap_or("?"),
                n("Passed"),
                n("Failed"),
                n("Skipped"),
            );
            for key in [
                "failedTests",
                "skippedTests",
                "supportedFeatures",
                "unsupportedFeatures",
            ] {
                if let Some(list) = s[key].as_sequence() {
                    let names: Vec<&str> = list.iter().filter_map(|t| t.as_str()).collect();
                    out += &format!("  {key}: {}\n", names.join(", "));
                }
            }
        }
        if let Some(text) = p["summary"].as_str() {
            out += &format!("  {text}\n");
        }
    }
    out
}

#[test]
fn the_core_tests_of_mesh_http_and_mesh_grpc_pass() {
    let Some(dir) = suite_dir() else { return };
    let node = Node::shared().expect("start the one-node cluster");
    install(node, &dir);
    let report = tempfile::NamedTempFile::new().unwrap();
    let (passed, report) = run_suite(node, &dir, CORE_FEATURES, report.path());
    assert!(passed, "the suite failed; its report:\n{report}");
    let results = results(&report);
    for profile in ["MESH-HTTP", "MESH-GRPC"] {
        let core = results
            .iter()
            .find(|(p, part, _, _)| p == profile && *part == "core")
            .unwrap_or_else(|| panic!("{profile} core is not in the report:\n{report}"));
        assert_eq!(core.2, "success", "{profile} core failed {:?}", core.3);
    }
}

#[test]
#[ignore = "the whole suite, with every claimed feature; scripts/conformance runs it"]
fn full_suite() {
    let Some(dir) = suite_dir() else { return };
    let out: PathBuf = std::env::var_os(ENV_REPORT)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{ENV_REPORT} names the report file to write"));
    let begun = Instant::now();
    let node = Node::shared().expect("start the one-node cluster");
    eprintln!("node ready in {:?}", node.started_in());
    install(node, &dir);
    eprintln!("mesh installed after {:?}", begun.elapsed());
    let chosen = std::env::var(ENV_FEATURES).ok();
    let features: Vec<&str> = chosen
        .as_deref()
        .map_or_else(|| FEATURES.to_vec(), |f| f.split(',').collect());
    let (passed, report) = run_suite(node, &dir, &features, &out);
    eprintln!(
        "node, install and suite took {:?}; report written to {}",
        begun.elapsed(),
        out.display()
    );
    assert!(!report.is_empty(), "the suite wrote no report");
    assert!(passed, "the suite failed; see the summary above");
}
