//! The dashboard in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver), against `mesh up -f examples/mesh.yaml`. A regressed backend is rolled out
//! and the Canary page shows the weight stepping, a gate's numbers and the verdict; a healthy
//! one is rolled out and the abort button rolls it back, which the page shows. A screenshot of
//! each page is saved (`MESH_SCREENSHOT_DIR`, default `target/dashboard-screenshots`).
//!
//! Needs `chromium` and `chromium-driver` (scripts/test installs them); without them the test
//! is skipped, except under `CI=true`, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use mesh_test_support::assert_eventually;
use mesh_test_support::process::workspace_bin;
use serde_json::{Value, json};

/// A WebDriver session on a chromedriver this test started.
struct Browser {
    driver: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start() -> Option<Self> {
        let Ok(driver) = which("chromedriver") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "chromedriver is missing (apt-get install chromium chromium-driver)"
            );
            eprintln!("skipped: chromedriver is not installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, so the browser it starts goes with it whatever happens.
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = mesh_test_support::http_client();
        let base = format!("http://127.0.0.1:{port}");
        assert_eventually!(
            http.get(format!("{base}/status")).send().await.is_ok(),
            "chromedriver did not start"
        );
        let session: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"]
            }}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"));
        Some(Self {
            driver,
            url: format!("{base}/session/{id}"),
            http,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if !body.is_null() {
            req = req.json(&body);
        }
        let rsp: Value = req.send().await.unwrap().json().await.unwrap();
        rsp["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn click(&self, css: &str) {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string();
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = png
            .as_str()
            .unwrap_or_else(|| panic!("no screenshot: {png}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.driver);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = self.driver.wait();
    }
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(program))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

fn screenshot_dir() -> PathBuf {
    std::env::var_os("MESH_SCREENSHOT_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots"),
        PathBuf::from,
    )
}

/// examples/mesh.yaml with the backend at `version`.
fn manifest(dir: &std::path::Path, version: &str, healthy_v3: bool) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let v1 = "  version: v1\n  versions:\n    v1:\n      command: [mesh-demo-app, --version, v1, --latency-ms";
    assert!(text.contains(v1), "the example changed; update this test");
    let mut edited = text.replacen(
        v1,
        &v1.replacen("version: v1", &format!("version: {version}"), 1),
        1,
    );
    if healthy_v3 {
        edited = edited.replacen(
            "    v2:\n",
            "    v3:\n      command: [mesh-demo-app, --version, v3, --latency-ms, \"5\", --latency-p99-ms, \"20\"]\n    v2:\n",
            1,
        );
    }
    let out = dir.join(format!("mesh-{version}.yaml"));
    std::fs::write(&out, edited).unwrap();
    out
}

fn apply(server: &str, file: &std::path::Path) {
    let out = Command::new(workspace_bin("mesh").unwrap())
        .args(["apply", "-f", file.to_str().unwrap()])
        .env("MESH_SERVER", server)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `mesh stat deploy` shows frontend's primary carrying traffic.
fn frontend_has_traffic(server: &str) -> bool {
    let out = Command::new(workspace_bin("mesh").unwrap())
        .args(["stat", "deploy", "-o", "json"])
        .env("MESH_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|rows| {
        rows.as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["name"] == "frontend-primary"
                    && r["golden"]["rps"].as_f64().unwrap_or_default() > 0.0
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_rollouts_and_aborts_one_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let mut up = mesh_test_support::mesh::mesh_up(&state, &example, &[]).unwrap();
    let server = format!("http://{}", up.addr("api"));
    let dashboard = up.addr("dashboard");
    let token = std::fs::read_to_string(state.join("controlplane/api-token")).unwrap();

    // Without signing in, nothing is shown.
    browser.go(&format!("http://{dashboard}/")).await;
    let text = browser.js("return document.body.innerText").await;
    assert!(text.as_str().unwrap().contains("Sign in"), "{text}");

    // The user's way in: the link mesh up printed, which carries a one-time code, not the
    // token, and is spent once used.
    let log = std::fs::read_to_string(up.child().log()).unwrap();
    let link = log
        .lines()
        .find_map(|l| l.split_once("dashboard: http://").map(|(_, rest)| rest))
        .map(|rest| format!("http://{rest}"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("mesh up printed no sign-in link:\n{log}"));
    assert!(!link.contains(token.trim()), "the link carries the token");
    assert!(
        link.starts_with(&format!("http://{dashboard}/login?code=")),
        "{link}"
    );
    // First the mesh itself: the control plane's window shows frontend's traffic (a cold,
    // busy machine takes a while to start the workloads and scrape them twice); then the page.
    assert_eventually!(
        frontend_has_traffic(&server),
        "the control plane never saw frontend's traffic"
    );
    browser.go(&link).await;
    assert_eventually!(
        browser
            .js("return document.querySelector('#workloads tr[data-name=\"frontend-primary\"] td:nth-child(6)')?.innerText || ''")
            .await
            .as_str()
            .is_some_and(|rps| rps.parse::<f64>().is_ok_and(|r| r > 0.0)),
        "the workloads page never showed frontend's traffic"
    );
    browser.screenshot("overview").await;
    let again = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(&link)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401, "a spent sign-in link signed in again");
    browser.click("nav a[data-page=graph]").await;
    let graph = browser
        .js("return document.querySelector('#edges').innerText")
        .await;
    assert!(
        graph
            .as_str()
            .unwrap()
            .contains("spiffe://cluster.local/ns/default/sa/frontend"),
        "{graph}"
    );
    browser.screenshot("graph").await;

    // A regressed backend: the weight steps up, a gate's numbers show, and the rollback is
    // the verdict.
    browser.click("nav a[data-page=canaries]").await;
    apply(&server, &manifest(dir.path(), "v2", false));
    assert_eventually!(
        browser
            .js("return +(document.querySelector('#canary-backend .weight')?.innerText || 0)")
            .await
            .as_f64()
            .is_some_and(|w| w > 0.0),
        "the canary weight never stepped up on the page"
    );
    assert_eventually!(
        browser
            .js("return document.querySelectorAll('#canary-backend .gate-row').length")
            .await
            .as_u64()
            .is_some_and(|n| n > 0),
        "no gate numbers on the page"
    );
    let gates = browser
        .js("return document.querySelector('#canary-backend .gates').innerText")
        .await;
    assert!(
        gates.as_str().unwrap().contains("request-success-rate"),
        "{gates}"
    );
    assert_eventually!(
        browser
            .js("return document.querySelector('#canary-backend')?.dataset.phase")
            .await
            == "Failed",
        "the page never showed the rollback"
    );
    let decision = browser
        .js("return document.querySelector('#canary-backend .decision').innerText")
        .await;
    assert!(
        !decision.as_str().unwrap().contains("none yet"),
        "{decision}"
    );
    browser.screenshot("canary-rolled-back").await;

    // A healthy backend, aborted from the page.
    apply(&server, &manifest(dir.path(), "v3", true));
    assert_eventually!(
        browser
            .js("return document.querySelector('#canary-backend')?.dataset.phase")
            .await
            == "Progressing",
        "the healthy rollout never started on the page"
    );
    browser.screenshot("canary-progressing").await;
    browser
        .click("#canary-backend button[data-action=abort]")
        .await;
    assert_eventually!(
        browser
            .js("return document.querySelector('#canary-backend')?.dataset.phase")
            .await
            == "Failed",
        "the abort button did not roll the canary back"
    );
    let history = browser
        .js("return document.querySelector('#canary-backend .history').innerText")
        .await;
    assert!(
        history.as_str().unwrap().contains("dashboard"),
        "the abort is recorded as the dashboard's: {history}"
    );
    browser.screenshot("canary-aborted").await;

    // Live tap.
    browser.click("nav a[data-page=tap]").await;
    browser.click("#tap-start").await;
    assert_eventually!(
        browser
            .js("return document.querySelector('#tap-log').innerText")
            .await
            .as_str()
            .is_some_and(|t| t.contains("backend=backend-primary.default")),
        "the tap page showed no requests"
    );
    browser.screenshot("tap").await;
    browser.call(reqwest::Method::DELETE, "", Value::Null).await;

    up.child().terminate();
}
