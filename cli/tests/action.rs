//! The GitHub Action (`action.yml`, `action/install.sh`, `action/run.sh`) in a real Actions
//! runner: `act` in its self-hosted mode runs the workflows of `tests/fixtures/action/workflows/`
//! on this machine, no container, each job checking out this repository and calling the action
//! as `uses: ./`, with `$GITHUB_OUTPUT`, `$GITHUB_STEP_SUMMARY` and annotations handled by act.
//!
//! Real: act, the action and its scripts, the `mesh` CLI, the embedded mesh (`mesh up`: control
//! plane, rollout controller, apps with their sidecars, 100 req/s of load), a kube-apiserver +
//! etcd with the `mesh-rollout-controller` binary, release archives made by
//! `scripts/package-release` and fetched with curl. Stand-ins: the HTTP server on 127.0.0.1 that
//! plays GitHub's release downloads, and the node in the cluster test (the harness marks
//! Deployments available). The rollout jobs use the CLI this workspace built (`mesh-binary`),
//! to save packaging it for each run; the install test downloads it as a release archive.
//!
//! What it shows: a healthy canary passes the job with the gate table in the step summary; a
//! failing one fails it with an annotation naming the gate; a canary behind a confirm-promotion
//! (embedded) or confirm-rollout (cluster) gate stops the first job at exit 3 and a second job's
//! `promote` opens it, the history naming the run's URL; a release archive is used only when its
//! SHA-256 matches the committed sum; and the step's exit status and outputs follow
//! `mesh rollout status` in every phase.
//!
//! act and actionlint are Go modules that `scripts/test` installs, pinned, and passes as
//! `MESH_ACT` and `MESH_ACTIONLINT` (else they are looked up on PATH); jq and shellcheck are
//! Debian packages. Under `CI=true` a missing tool fails the test; elsewhere the test says what
//! is missing and skips.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "tests; a skipped test says why on stderr"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mesh_crds::{Canary, CanaryPhase};
use mesh_test_support::{
    assert_eventually,
    kube::KubeApiServer,
    process::{MeshProcess, workspace_bin},
};
use serde_json::{Value, json};

/// Longest an act run may take before the test kills it; each job also has timeout-minutes.
const ACT_TIMEOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A tool from `$var`, or else from PATH. `None` (the test skips) when it is missing, except
/// under `CI=true`, where that is a failure.
fn tool(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{var}={} is not a file", path.display());
        return Some(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why =
            format!("{name} is missing (set {var} or put it on PATH; ./scripts/test installs it)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipping: {why}");
    }
    found
}

/// What one act run left: its exit code, its log, and the `key=value` lines the workflow's
/// last step wrote to `$MESH_TEST_OUT`.
struct ActRun {
    code: Option<i32>,
    log: String,
    outputs: BTreeMap<String, String>,
}

impl ActRun {
    fn get(&self, key: &str) -> &str {
        self.outputs.get(key).unwrap_or_else(|| {
            panic!(
                "no {key} in {:?}
{}",
                self.outputs, self.log
            )
        })
    }
}

/// Runs `fixtures/action/workflows/<workflow>` with act, on the host, from this repository's
/// root. `cache` is act's cache directory (host workspaces and `$RUNNER_TOOL_CACHE`).
async fn act(act: &Path, workflow: &str, cache: &Path, env: &[(&str, &str)]) -> ActRun {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = tokio::process::Command::new(act);
    cmd.current_dir(repo_root())
        .args([
            "push",
            "-P",
            "self-hosted=-self-hosted",
            "--no-cache-server",
        ])
        .arg("-W")
        .arg(format!("cli/tests/fixtures/action/workflows/{workflow}"))
        .arg("--action-cache-path")
        .arg(cache)
        .arg("--env")
        .arg(format!("MESH_TEST_OUT={}", out.path().display()));
    for (k, v) in env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    let output = match tokio::time::timeout(ACT_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // act and every step it started are in the group.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
            panic!("act ran {workflow} for more than {ACT_TIMEOUT:?}");
        }
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs = std::fs::read_to_string(out.path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ActRun {
        code: output.status.code(),
        log,
        outputs,
    }
}

/// The markdown act read from `$GITHUB_STEP_SUMMARY` after the action's step: act prints it
/// as `Summary - <content>` and empties the file for the next step.
fn step_summary(log: &str) -> String {
    let start = log
        .find("Summary - ")
        .unwrap_or_else(|| panic!("no step summary in the log:\n{log}"));
    let rest = &log[start + "Summary - ".len()..];
    // The summary runs until act's next prefixed line.
    let end = rest.find("\n[action-").map_or(rest.len(), |i| i + 1);
    rest[..end].to_string()
}

fn mesh(args: &[&str]) -> Output {
    Command::new(workspace_bin("mesh").unwrap())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The embedded mesh of `fixtures/action/mesh.yaml`, with backend at `version` and, when
/// `gated`, a confirm-promotion gate that only `mesh rollout promote` opens.
fn manifest(dir: &Path, version: &str, gated: bool) -> PathBuf {
    let text = include_str!("fixtures/action/mesh.yaml");
    let mut edited = text.replacen(
        "  port: 9898\n  version: v1\n",
        &format!("  port: 9898\n  version: {version}\n"),
        1,
    );
    if gated {
        edited = edited.replacen(
            "    maxWeight: 50\n",
            "    maxWeight: 50\n    webhooks:\n      - name: approval\n        type: confirm-promotion\n",
            1,
        );
    }
    assert!(
        edited.contains(&format!("version: {version}\n"))
            && (!gated || edited.contains("approval")),
        "fixtures/action/mesh.yaml changed; update this test"
    );
    let path = dir.join(format!("mesh-{version}.yaml"));
    std::fs::write(&path, edited).unwrap();
    path
}

fn apply(server: &str, file: &Path) {
    let out = mesh(&["apply", "-f", file.to_str().unwrap(), "--server", server]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn report(server: &str, canary: &str) -> Value {
    let out = mesh(&[
        "rollout", "status", canary, "--server", server, "-o", "json",
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn primary_version(server: &str) -> String {
    let out = mesh(&[
        "get", "workload", "backend", "-o", "json", "--server", server,
    ]);
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    w["status"]["primary"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn up(dir: &Path, file: &Path) -> MeshProcess {
    mesh_test_support::mesh::mesh_up(&dir.join("state"), file, &[]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_action_gates_good_bad_and_gated_rollouts_on_the_embedded_mesh() {
    let Some(act_bin) = tool("MESH_ACT", "act") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("act");
    let mut mesh_up = up(dir.path(), &manifest(dir.path(), "v1", false));
    let server = format!("http://{}", mesh_up.addr("api"));
    assert_eventually!(
        report(&server, "backend")["phase"] == "Initialized",
        "the canary never initialized: {}",
        report(&server, "backend")
    );
    let binary = workspace_bin("mesh").unwrap();
    let binary = binary.to_str().unwrap();
    // The runner's steps may not share this user's home, where mesh up left the pointer to its
    // token; the job is given the token file as a workflow would be.
    let token = dir.path().join("state/controlplane/api-token");
    let token = token.to_str().unwrap();
    let env = [
        ("MESH_TOKEN_FILE", token),
        ("MESH_TEST_SERVER", server.as_str()),
        ("MESH_TEST_BINARY", binary),
        ("MESH_TEST_CANARY", "backend"),
    ];

    // (a) A healthy v3: the job passes, with the gates' numbers in the step summary.
    apply(&server, &manifest(dir.path(), "v3", false));
    let good = act(&act_bin, "rollout.yml", &cache, &env).await;
    assert_eq!(good.code, Some(0), "{}", good.log);
    assert_eq!(good.get("outcome"), "success");
    assert_eq!(good.get("result"), "promoted");
    assert_eq!(good.get("phase"), "Succeeded");
    assert_eq!(good.get("canary-weight"), "0");
    assert_eq!(good.get("exit-code"), "0");
    assert_eq!(good.get("failed-checks"), "0");
    assert_eq!(good.get("failed-gates"), "");
    assert!(
        good.get("decision-seconds").parse::<u64>().is_ok(),
        "{:?}",
        good.outputs
    );
    let md = step_summary(&good.log);
    assert!(md.contains("### Canary `backend`: Succeeded"), "{md}");
    assert!(
        md.contains("| gate | canary | primary | samples c/p | verdict | test |"),
        "{md}"
    );
    for gate in ["request-success-rate", "request-duration"] {
        assert!(md.contains(&format!("| {gate} | ")), "{gate} missing: {md}");
    }
    assert!(md.contains("result `promoted`"), "{md}");
    assert_eq!(primary_version(&server), "v3");

    // (b) v2 fails one request in ten: the job fails, and an annotation names the gate.
    apply(&server, &manifest(dir.path(), "v2", false));
    let bad = act(&act_bin, "rollout.yml", &cache, &env).await;
    assert_ne!(bad.code, Some(0), "{}", bad.log);
    assert_eq!(bad.get("outcome"), "failure");
    assert_eq!(bad.get("result"), "rolled-back");
    assert_eq!(bad.get("phase"), "Failed");
    assert_eq!(bad.get("exit-code"), "1");
    // A failed sequential comparison rolls back at once, whatever the absolute gates have
    // counted so far; an absolute gate alone rolls back at the threshold of two.
    assert!(
        bad.get("failed-checks")
            .parse::<u32>()
            .is_ok_and(|checks| checks <= 2),
        "{:?}",
        bad.outputs
    );
    // Either error gate may be the one that decides: the absolute success rate, or the
    // sequential comparison of canary and primary errors, whichever reaches its verdict first.
    // Each gate named is annotated in the log.
    let failed: Vec<&str> = bad
        .get("failed-gates")
        .split(',')
        .filter(|g| !g.is_empty())
        .collect();
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|g| ["request-success-rate", "canary-vs-primary-errors"].contains(g)),
        "{:?}",
        bad.outputs
    );
    for gate in &failed {
        assert!(
            bad.log.contains(&format!(
                "::error title=Canary backend gate {gate} failed::"
            )),
            "{gate} is not annotated: {}",
            bad.log
        );
    }
    assert!(step_summary(&bad.log).contains("result `rolled-back`"));
    assert_eq!(primary_version(&server), "v3", "the rollback kept v3");

    // (c) A healthy v4 behind a confirm-promotion gate: the first job stops at the gate (exit
    // 3, `allow-waiting` lets the job pass), the second opens it with this run's URL.
    apply(&server, &manifest(dir.path(), "v4", true));
    let waiting = act(&act_bin, "rollout.yml", &cache, &env).await;
    assert_ne!(waiting.code, Some(0), "{}", waiting.log);
    assert_eq!(waiting.get("result"), "waiting-promotion");
    assert_eq!(waiting.get("phase"), "WaitingPromotion");
    assert_eq!(waiting.get("exit-code"), "3");
    assert!(
        waiting.log.contains("::warning title=Canary backend"),
        "{}",
        waiting.log
    );
    let run_id = format!("{}", std::process::id());
    let gated_env = [env.as_slice(), &[("GITHUB_RUN_ID", run_id.as_str())]].concat();
    let gated = act(&act_bin, "gated.yml", &cache, &gated_env).await;
    assert_eq!(gated.code, Some(0), "{}", gated.log);
    assert_eq!(gated.get("analysis.outcome"), "success");
    assert_eq!(gated.get("analysis.result"), "waiting-promotion");
    assert_eq!(gated.get("analysis.exit-code"), "3");
    assert_eq!(gated.get("promote.outcome"), "success");
    assert_eq!(gated.get("promote.result"), "promoted");
    assert_eq!(gated.get("promote.phase"), "Succeeded");
    let run_url = gated.get("promote.run-url");
    assert!(
        run_url.ends_with(&format!("/actions/runs/{run_id}")),
        "{run_url}"
    );
    let c = report(&server, "backend");
    assert_eq!(c["phase"], "Succeeded", "{c:#}");
    let history = c["history"].as_array().unwrap();
    assert!(
        history.iter().any(
            |h| h["reason"] == "GateOpened" && h["message"].as_str().unwrap().contains(run_url)
        ),
        "the history does not name {run_url}: {history:#?}"
    );
    assert_eq!(primary_version(&server), "v4");

    mesh_up.child().check_running().unwrap();
    mesh_up.child().terminate();
    let status = mesh_up.child().exited_within(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// A tiny static file server standing in for GitHub's release downloads; counts requests.
struct Releases {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Releases {
    fn serve(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let file = root.join(path.trim_start_matches('/'));
                let body = if path.contains("..") {
                    None
                } else {
                    std::fs::read(&file).ok()
                };
                let _ = match body {
                    Some(body) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| conn.write_all(&body)),
                    None => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        Self { addr, requests }
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_action_installs_a_released_cli_only_when_its_checksum_matches() {
    let Some(act_bin) = tool("MESH_ACT", "act") else {
        return;
    };
    let target = match std::env::consts::ARCH {
        "x86_64" => "x86_64-unknown-linux-gnu",
        "aarch64" => "aarch64-unknown-linux-gnu",
        other => panic!("no release target for {other}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let releases = dir.path().join("releases");
    let trusted = dir.path().join("trusted");
    std::fs::create_dir_all(&trusted).unwrap();

    // A real release archive of the CLI this workspace built, packaged as release.yml does.
    let bin_dir = workspace_bin("mesh")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let version = "0.0.0-test";
    let packaged = Command::new(repo_root().join("scripts/package-release"))
        .arg(version)
        .arg(target)
        .arg(&bin_dir)
        .arg(releases.join(format!("v{version}")))
        .arg("mesh")
        .output()
        .unwrap();
    assert!(
        packaged.status.success(),
        "{}",
        String::from_utf8_lossy(&packaged.stderr)
    );
    let archive = format!("mesh-v{version}-{target}.tar.gz");
    let sums = std::fs::read_to_string(releases.join(format!("v{version}/SHA256SUMS"))).unwrap();
    let sum = sha256_of(&releases.join(format!("v{version}/{archive}")));
    assert_eq!(sums, format!("{sum}  {archive}\n"));
    std::fs::write(trusted.join(format!("v{version}.sha256")), &sums).unwrap();

    // The same archive with one byte more, as a tampered download would arrive, while the
    // trusted file pins the genuine sum.
    let tampered = "0.0.0-tampered";
    let tampered_archive = format!("mesh-v{tampered}-{target}.tar.gz");
    std::fs::create_dir_all(releases.join(format!("v{tampered}"))).unwrap();
    let mut bytes = std::fs::read(releases.join(format!("v{version}/{archive}"))).unwrap();
    bytes.push(0);
    std::fs::write(
        releases.join(format!("v{tampered}/{tampered_archive}")),
        bytes,
    )
    .unwrap();
    std::fs::write(
        trusted.join(format!("v{tampered}.sha256")),
        format!("{sum}  {tampered_archive}\n"),
    )
    .unwrap();

    let server = Releases::serve(releases.clone());
    let url = format!("http://{}", server.addr);
    let cache = dir.path().join("act");
    let trusted_dir = trusted.to_str().unwrap();
    let run = |v: &'static str| {
        let (act_bin, cache, url) = (act_bin.clone(), cache.clone(), url.clone());
        async move {
            act(
                &act_bin,
                "install.yml",
                &cache,
                &[
                    ("MESH_TEST_VERSION", v),
                    ("MESH_TEST_DOWNLOAD_URL", url.as_str()),
                    ("MESH_ACTION_CHECKSUMS_DIR", trusted_dir),
                ],
            )
            .await
        }
    };

    // Downloaded once, verified, cached by version, target and sum, and put on PATH.
    let first = run(version).await;
    assert_eq!(first.code, Some(0), "{}", first.log);
    let cached = cache.join(format!("tool_cache/mesh/{version}/{target}/{sum}/mesh"));
    assert_eq!(first.get("mesh-path"), cached.to_str().unwrap());
    assert!(
        first
            .log
            .contains(&format!("mesh on PATH is {}", cached.display())),
        "{}",
        first.log
    );
    assert_eq!(server.count(), 1);
    let second = run(version).await;
    assert_eq!(second.code, Some(0), "{}", second.log);
    assert!(second.log.contains("from the tool cache"), "{}", second.log);
    assert_eq!(server.count(), 1, "the cached CLI was downloaded again");
    // No mesh-version: the newest version with a committed checksum file.
    let default = run("").await;
    assert_eq!(default.code, Some(0), "{}", default.log);
    assert!(
        default
            .log
            .contains(&format!("mesh v{version} ({target}) from the tool cache")),
        "{}",
        default.log
    );

    // A download whose sum differs fails the step, names both sums, and is not kept.
    let bad = run(tampered).await;
    assert_ne!(bad.code, Some(0), "{}", bad.log);
    assert_eq!(bad.get("outcome"), "failure");
    assert!(
        bad.log.contains(&format!(
            "checksum mismatch for {tampered_archive} from {url}/v{tampered}/{tampered_archive}"
        )) && bad.log.contains(&format!("pins {sum}")),
        "{}",
        bad.log
    );
    assert!(!bad.log.contains("mesh on PATH is"), "{}", bad.log);
    assert!(
        !cache
            .join(format!("tool_cache/mesh/{tampered}"))
            .join(target)
            .join(&sum)
            .exists()
    );
    assert_eq!(server.count(), 2);

    // A version without committed sums is never downloaded.
    let unpinned = run("0.0.0-unpinned").await;
    assert_ne!(unpinned.code, Some(0), "{}", unpinned.log);
    assert!(
        unpinned
            .log
            .contains("mesh v0.0.0-unpinned has no committed checksums"),
        "{}",
        unpinned.log
    );
    assert_eq!(server.count(), 2, "an unpinned version was downloaded");
}

/// examples/github/promote.yml's steps that use the action, with their `with:` keys.
fn action_uses(workflow: &Value) -> Vec<(String, BTreeSet<String>)> {
    let mut found = Vec::new();
    for job in workflow["jobs"]
        .as_object()
        .into_iter()
        .flat_map(|j| j.values())
    {
        for step in job["steps"].as_array().into_iter().flatten() {
            let Some(uses) = step["uses"].as_str() else {
                continue;
            };
            if uses == "./" || uses.starts_with("mesh-dev/mesh@") {
                let keys = step["with"]
                    .as_object()
                    .map(|w| w.keys().cloned().collect())
                    .unwrap_or_default();
                found.push((uses.to_string(), keys));
            }
        }
    }
    found
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

#[test]
fn actionlint_and_shellcheck_pass_on_the_workflows_the_action_and_its_scripts() {
    let root = repo_root();
    let workflows: Vec<PathBuf> = [
        files(".github/workflows", "yml"),
        files("examples/github", "yml"),
        files("cli/tests/fixtures/action/workflows", "yml"),
    ]
    .concat();
    assert!(workflows.len() >= 6, "{workflows:?}");

    // actionlint checks action.yml through the workflows that call it as `uses: ./`; the
    // example calls it by its published name, which actionlint does not resolve, so its inputs
    // are checked against action.yml here.
    let action = yaml(&root.join("action.yml"));
    let inputs: BTreeSet<String> = action["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut local_uses = 0;
    for w in &workflows {
        for (uses, keys) in action_uses(&yaml(w)) {
            local_uses += usize::from(uses == "./");
            let unknown: Vec<_> = keys.difference(&inputs).collect();
            assert!(
                unknown.is_empty(),
                "{}: {uses} has no input {unknown:?}",
                w.display()
            );
        }
    }
    assert!(
        local_uses >= 3,
        "no workflow checks action.yml through `uses: ./`"
    );

    let (Some(actionlint), Some(shellcheck)) = (
        tool("MESH_ACTIONLINT", "actionlint"),
        tool("MESH_SHELLCHECK", "shellcheck"),
    ) else {
        return;
    };
    let mut lint = Command::new(&actionlint);
    lint.current_dir(&root).arg("-shellcheck").arg(&shellcheck);
    for w in &workflows {
        lint.arg(w.strip_prefix(&root).unwrap());
    }
    let out = lint.output().unwrap();
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&shellcheck)
        .current_dir(&root)
        .args([
            "action/install.sh",
            "action/run.sh",
            "scripts/package-release",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A Deployment `podinfo` running `image`.
fn deployment(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "podinfo", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {"metadata": {"labels": {"app": "podinfo"}},
                         "spec": {"containers": [{"name": "podinfo", "image": image,
                                                  "ports": [{"containerPort": 9898}]}]}},
        },
    }))
    .unwrap()
}

fn canary_named(name: &str, spec: &Value) -> Canary {
    serde_json::from_value(json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

async fn phase_of(canaries: &Api<Canary>, name: &str) -> Option<CanaryPhase> {
    canaries
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status)
        .map(|s| s.phase)
}

/// The `mesh-rollout-controller` binary on the harness's apiserver. The Canary here skips
/// analysis, so the Prometheus it is given is never asked.
fn controller(kube: &KubeApiServer) -> mesh_test_support::process::ChildGuard {
    let mut cmd = Command::new(workspace_bin("mesh-rollout-controller").unwrap());
    cmd.arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["--context", "mesh-test", "--namespace", "default"])
        .args(["--prometheus-url", "http://127.0.0.1:9"])
        .args(["--reconcile-interval", "250ms"]);
    mesh_test_support::process::ChildGuard::spawn(
        "mesh-rollout-controller",
        cmd,
        &kube.dir().join("controller.log"),
    )
    .unwrap()
}

#[tokio::test]
async fn the_action_follows_a_rollout_in_a_cluster_through_a_kubeconfig() {
    let Some(act_bin) = tool("MESH_ACT", "act") else {
        return;
    };
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    // As in the upstream manifests: *.k8s.io groups need the API-review annotation.
    let mut crd = <mesh_crds::HttpRoute as kube::CustomResourceExt>::crd();
    crd.metadata.annotations = Some(
        [(
            "api-approved.kubernetes.io".to_string(),
            "https://github.com/kubernetes-sigs/gateway-api/pull/2466".to_string(),
        )]
        .into(),
    );
    kube.install_crd(crd).await.unwrap();
    let _node = kube.play_node("default");
    let _controller = controller(&kube);
    let client = kube.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let canaries: Api<Canary> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("podinfo:1"))
        .await
        .unwrap();
    let spec = json!({
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
        "service": {"port": 9898},
        "skipAnalysis": true,
        "analysis": {"interval": "2s", "threshold": 2, "stepWeight": 50, "maxWeight": 50},
    });
    canaries
        .create(&PostParams::default(), &canary_named("podinfo", &spec))
        .await
        .unwrap();
    assert_eventually!(
        phase_of(&canaries, "podinfo").await == Some(CanaryPhase::Initialized),
        "canary is {:?}; log in {}",
        phase_of(&canaries, "podinfo").await,
        kube.dir().display()
    );

    // A new image; the job follows the rollout from the kubeconfig alone.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "podinfo", "image": "podinfo:2"}]}}}});
    deployments
        .patch("podinfo", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let binary = workspace_bin("mesh").unwrap();
    let run = act(
        &act_bin,
        "rollout.yml",
        &dir.path().join("act"),
        &[
            ("MESH_TEST_KUBECONFIG", kube.kubeconfig().to_str().unwrap()),
            ("MESH_TEST_BINARY", binary.to_str().unwrap()),
            ("MESH_TEST_CANARY", "podinfo"),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.log);
    assert_eq!(run.get("result"), "promoted");
    assert_eq!(run.get("phase"), "Succeeded");
    assert!(
        step_summary(&run.log).contains("### Canary `podinfo`: Succeeded"),
        "{}",
        run.log
    );
    let primary = deployments.get("podinfo-primary").await.unwrap();
    let image = primary.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("podinfo:2"));

    // The next revision waits for a person before it starts (a confirm-rollout gate the mesh
    // holds in the cluster): one job stops there with exit 3, a second opens it.
    let gate = json!({"spec": {"analysis": {"webhooks": [{"name": "approval", "type": "confirm-rollout"}]}}});
    canaries
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(&gate))
        .await
        .unwrap();
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "podinfo", "image": "podinfo:3"}]}}}});
    deployments
        .patch("podinfo", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let kubeconfig = kube.kubeconfig().to_str().unwrap();
    let env = [
        ("MESH_TEST_KUBECONFIG", kubeconfig),
        ("MESH_TEST_BINARY", binary.to_str().unwrap()),
        ("MESH_TEST_CANARY", "podinfo"),
        ("GITHUB_RUN_ID", "4242"),
    ];
    let waiting = act(&act_bin, "rollout.yml", &dir.path().join("act"), &env).await;
    assert_ne!(waiting.code, Some(0), "{}", waiting.log);
    assert_eq!(
        waiting.get("result"),
        "waiting-promotion",
        "{}",
        waiting.log
    );
    assert_eq!(waiting.get("exit-code"), "3");
    assert_eq!(waiting.get("phase"), "Waiting");
    let promote = [env.as_slice(), &[("MESH_TEST_COMMAND", "promote")]].concat();
    let promoted = act(&act_bin, "rollout.yml", &dir.path().join("act"), &promote).await;
    assert_eq!(promoted.code, Some(0), "{}", promoted.log);
    assert_eq!(promoted.get("result"), "promoted");
    assert_eq!(promoted.get("phase"), "Succeeded");
    let status = canaries.get("podinfo").await.unwrap().status.unwrap();
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason == "GateOpened" && h.message.contains("/actions/runs/4242")),
        "{:#?}",
        status.history
    );
    let primary = deployments.get("podinfo-primary").await.unwrap();
    let image = primary.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("podinfo:3"));
}

/// Every phase a Canary can be in; the match makes a new phase a compile error here.
fn all_phases() -> Vec<CanaryPhase> {
    let phases = [
        CanaryPhase::Initializing,
        CanaryPhase::Initialized,
        CanaryPhase::Waiting,
        CanaryPhase::Progressing,
        CanaryPhase::WaitingPromotion,
        CanaryPhase::Promoting,
        CanaryPhase::Finalising,
        CanaryPhase::Succeeded,
        CanaryPhase::Failed,
    ];
    for p in phases {
        match p {
            CanaryPhase::Initializing
            | CanaryPhase::Initialized
            | CanaryPhase::Waiting
            | CanaryPhase::Progressing
            | CanaryPhase::WaitingPromotion
            | CanaryPhase::Promoting
            | CanaryPhase::Finalising
            | CanaryPhase::Succeeded
            | CanaryPhase::Failed => {}
        }
    }
    phases.to_vec()
}

/// The outputs action.yml declares, each with the step (`install` or `run`) and the key it
/// reads, as `${{ steps.<step>.outputs.<key> }}`.
fn declared_outputs() -> BTreeMap<String, (String, String)> {
    let action = yaml(&repo_root().join("action.yml"));
    action["outputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, o)| {
            let value = o["value"].as_str().unwrap_or_default();
            let inner = value
                .strip_prefix("${{ steps.")
                .and_then(|v| v.strip_suffix(" }}"))
                .unwrap_or_else(|| panic!("output {name}: unexpected value {value:?}"));
            let (step, key) = inner
                .split_once(".outputs.")
                .unwrap_or_else(|| panic!("output {name}: unexpected value {value:?}"));
            (name.clone(), (step.to_string(), key.to_string()))
        })
        .collect()
}

/// Runs action/run.sh as the action's step does, on the Canary `web` of the cluster behind
/// `kubeconfig`; returns how it ended and the outputs it wrote.
fn run_sh(
    command: &str,
    kubeconfig: &str,
    outputs: &Path,
    summary: &Path,
) -> (Output, BTreeMap<String, String>) {
    let step = Command::new(repo_root().join("action/run.sh"))
        .env("MESH", workspace_bin("mesh").unwrap())
        .env("INPUT_COMMAND", command)
        .env("INPUT_CANARY", "web")
        .env("INPUT_NAMESPACE", "default")
        .env("INPUT_TIMEOUT", "1s")
        .env("INPUT_KUBECONFIG", kubeconfig)
        .env("GITHUB_OUTPUT", outputs)
        .env("GITHUB_STEP_SUMMARY", summary)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let written = std::fs::read_to_string(outputs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (step, written)
}

/// For every phase, the action's step exits as `mesh rollout status` does and its outputs say
/// what `mesh rollout status -o json` says; and action.yml declares exactly the outputs the
/// scripts write. Runs action/run.sh directly (as the action's step does) against Canaries whose
/// status the test writes in a real apiserver.
#[tokio::test]
async fn the_action_outputs_and_exit_codes_follow_mesh_rollout_status() {
    if tool("MESH_JQ", "jq").is_none() {
        return;
    }
    let declared = declared_outputs();
    for (name, (step, key)) in &declared {
        assert_eq!(name, key, "output {name} reads steps.{step}.outputs.{key}");
        assert!(
            ["install", "run"].contains(&step.as_str()),
            "output {name}: step {step}"
        );
    }
    let from_run: BTreeSet<&str> = declared
        .iter()
        .filter(|(_, (step, _))| step == "run")
        .map(|(name, _)| name.as_str())
        .collect();
    let install_sh = std::fs::read_to_string(repo_root().join("action/install.sh")).unwrap();
    for (name, (step, _)) in &declared {
        if step == "install" {
            assert!(
                install_sh.contains(&format!("echo \"{name}=")),
                "install.sh never writes {name}"
            );
        }
    }

    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let canaries: Api<Canary> = Api::namespaced(kube.client(), "default");
    let spec = json!({
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
        "service": {"port": 9898},
        "analysis": {"interval": "30s", "threshold": 3, "stepWeight": 10, "maxWeight": 50},
    });
    canaries
        .create(&PostParams::default(), &canary_named("web", &spec))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = kube.kubeconfig().to_str().unwrap().to_string();
    for (i, phase) in all_phases().into_iter().enumerate() {
        let weight = i32::try_from(i).unwrap() * 5;
        let checks = i32::try_from(i % 3).unwrap();
        let status = json!({"status": {
            "phase": phase, "canaryWeight": weight, "failedChecks": checks,
            "lastAppliedSpec": "abc123", "iterations": i,
            "analysis": [{"name": "request-success-rate", "canary": 97.5, "primary": 100.0,
                          "canarySamples": 400, "primarySamples": 900,
                          "test": "threshold value >= 99", "verdict": "Fail",
                          "message": "request-success-rate is 97.50, outside threshold value >= 99"}],
        }});
        canaries
            .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();

        let cli = mesh(&[
            "rollout",
            "status",
            "web",
            "--kubeconfig",
            &kc,
            "-o",
            "json",
        ]);
        let report: Value = serde_json::from_slice(&cli.stdout)
            .unwrap_or_else(|e| panic!("{phase:?}: {e}: {}", String::from_utf8_lossy(&cli.stderr)));
        let code = report["exitCode"].as_i64().unwrap();
        assert_eq!(cli.status.code().map(i64::from), Some(code), "{phase:?}");

        let outputs = dir.path().join(format!("outputs-{i}"));
        let summary = dir.path().join(format!("summary-{i}"));
        let (step, written) = run_sh("status", &kc, &outputs, &summary);
        let log = String::from_utf8_lossy(&step.stdout);
        assert_eq!(
            step.status.code().map(i64::from),
            Some(code),
            "{phase:?}: the step's exit status is not mesh rollout status's: {log}"
        );
        assert_eq!(
            written.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            from_run,
            "{phase:?}: action.yml's outputs and what run.sh writes differ"
        );
        assert_eq!(
            written["phase"],
            report["phase"].as_str().unwrap(),
            "{phase:?}"
        );
        assert_eq!(written["canary-weight"], report["canaryWeight"].to_string());
        assert_eq!(written["failed-checks"], report["failedChecks"].to_string());
        assert_eq!(written["exit-code"], code.to_string());
        let expected = report["result"]
            .as_str()
            .unwrap_or_else(|| panic!("{phase:?}: no result in {report:#}"));
        assert_eq!(written["result"], expected, "{phase:?}");
        if code == 0 {
            assert!(
                !log.contains("::error title=Canary web gate"),
                "{phase:?}: {log}"
            );
        } else {
            assert!(
                log.contains("::error title=Canary web gate request-success-rate failed::"),
                "{phase:?}: {log}"
            );
        }
        assert!(
            std::fs::read_to_string(&summary)
                .unwrap()
                .contains("| request-success-rate | 97.50 | 100.00 | 400/900 | FAIL |"),
            "{phase:?}"
        );
    }

    // The last phase was Failed: abort has nothing to act on, and the step says so with exit 4.
    let (step, written) = run_sh(
        "abort",
        &kc,
        &dir.path().join("abort-out"),
        &dir.path().join("abort-summary"),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&step.stdout),
        String::from_utf8_lossy(&step.stderr)
    );
    assert_eq!(step.status.code(), Some(4), "{text}");
    assert_eq!(written["result"], "error", "{text}");
    assert!(text.contains("no rollout in progress to abort"), "{text}");
    // Pause freezes the rollout and the step succeeds.
    let (step, written) = run_sh(
        "pause",
        &kc,
        &dir.path().join("pause-out"),
        &dir.path().join("pause-summary"),
    );
    assert_eq!(
        step.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&step.stderr)
    );
    assert_eq!(written["result"], "paused");
    assert!(canaries.get("web").await.unwrap().spec.suspend);
}
