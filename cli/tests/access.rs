//! The embedded mesh's resource API admits only the holder of its token: `mesh up` writes it to
//! its state directory (mode 0600); every read, write and watch without it gets 401 and
//! changes nothing, rollout actions included; `mesh` keeps working for the user who started the
//! mesh, finding the token as kubectl finds a kubeconfig; and the token appears in no log and
//! no output.
//!
//! Needs the `mesh` binary built (`cargo build -p mesh-cli --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use mesh_test_support::process::{MeshBinary, workspace_bin};

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
    - backendRefs: [{name: web-primary, port: 80, weight: 100}]
";

/// `mesh args...` against `server`, as a user whose mesh config lives in `config_dir`.
fn mesh(server: &str, config_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("mesh").unwrap());
    cmd.args(args)
        .env("MESH_SERVER", server)
        .env("MESH_CONFIG_DIR", config_dir)
        .env_remove("MESH_TOKEN_FILE")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    eprintln!(
        "$ mesh {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_resource_api_needs_the_token_and_mesh_finds_it_for_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let owner = dir.path().join("owner");
    let stranger = dir.path().join("stranger");
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, ROUTE).unwrap();
    let mut up = MeshBinary::workspace("mesh")
        .unwrap()
        .arg("up")
        .arg("-f")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-addr")
        .arg("127.0.0.1:0")
        .arg("--proxy-addr")
        .arg("127.0.0.1:0")
        .env("MESH_CONFIG_DIR", &owner)
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap();
    let server = format!("http://{}", up.addr("api"));

    // The token: in the state directory, for its owner's eyes only.
    let token_file = state.join("controlplane/api-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{}", token_file.display());
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);

    // Every read, write and watch without it (or with another) is 401, and changes nothing.
    let http = mesh_test_support::http_client();
    let routes =
        format!("{server}/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes");
    let one = format!("{routes}/web");
    let owner_get = || {
        http.get(&one)
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    let before: serde_json::Value = owner_get().await.unwrap().json().await.unwrap();
    let version = before["metadata"]["resourceVersion"].clone();
    assert!(version.is_string(), "{before}");
    let changed = ROUTE.replace("weight: 100", "weight: 1");
    for auth in [None, Some("Bearer nope".to_string()), Some(token.clone())] {
        let with = |req: reqwest::RequestBuilder| match &auth {
            Some(value) if !value.contains(&token) => req.header("authorization", value),
            // The real token sent as Basic is no bearer token either.
            Some(_) => req.header("authorization", format!("Basic {token}")),
            None => req,
        };
        let requests = [
            ("list", with(http.get(&routes))),
            ("get", with(http.get(&one))),
            ("watch", with(http.get(format!("{routes}?watch=true")))),
            (
                "apply",
                with(http.post(format!("{server}/apply?namespace=default")))
                    .header("content-type", "application/yaml")
                    .body(changed.clone()),
            ),
            (
                "put",
                with(http.put(&one))
                    .header("content-type", "application/yaml")
                    .body(changed.clone()),
            ),
            ("delete", with(http.delete(&one))),
        ];
        for (what, req) in requests {
            let rsp = req.send().await.unwrap();
            assert_eq!(rsp.status(), 401, "{what} with {auth:?}");
            let body = rsp.text().await.unwrap();
            assert!(body.contains("Unauthorized"), "{what}: {body}");
            assert!(!body.contains(&token), "{what}: the 401 shows the token");
        }
    }
    let after: serde_json::Value = owner_get().await.unwrap().json().await.unwrap();
    assert_eq!(after["metadata"]["resourceVersion"], version, "{after}");

    // `mesh` works for the owner, finding the token on its own ...
    let out = mesh(
        &server,
        &owner,
        &[],
        &["get", "httproute", "web", "-o", "yaml"],
    );
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(shown.contains("web-primary"), "{shown}");
    assert!(!shown.contains(&token), "mesh get shows the token");
    let out = mesh(
        &server,
        &owner,
        &[],
        &["apply", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success());
    // ... or from --token-file / MESH_TOKEN_FILE.
    let file_env = [("MESH_TOKEN_FILE", token_file.to_str().unwrap())];
    let out = mesh(&server, &stranger, &file_env, &["get", "httproutes"]);
    assert!(out.status.success());

    // Anyone else is refused, told why, and changes nothing; rollout actions included.
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "0123").unwrap();
    let wrong_env = [("MESH_TOKEN_FILE", wrong.to_str().unwrap())];
    for (env, args) in [
        (&[][..], &["get", "httproutes"][..]),
        (&[][..], &["delete", "httproute", "web"][..]),
        (&wrong_env[..], &["delete", "httproute", "web"][..]),
        (&[][..], &["rollout", "pause", "web"][..]),
        (&wrong_env[..], &["rollout", "promote", "web"][..]),
        (&[][..], &["rollout", "abort", "web"][..]),
    ] {
        let out = mesh(&server, &stranger, env, args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Unauthorized"), "{args:?}: {stderr}");
        assert!(stderr.contains("MESH_TOKEN_FILE"), "{args:?}: {stderr}");
    }
    let missing = [("MESH_TOKEN_FILE", "/nonexistent/api-token")];
    let out = mesh(&server, &stranger, &missing, &["get", "httproutes"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/api-token"));
    let after: serde_json::Value = owner_get().await.unwrap().json().await.unwrap();
    assert_eq!(after["metadata"]["resourceVersion"], version, "{after}");

    // The token is in no log.
    up.child().terminate();
    mesh_test_support::assert_eventually!(up.child().check_running().is_err());
    let mut logs = vec![std::fs::read_to_string(up.child().log()).unwrap()];
    for entry in walk(&state) {
        if entry.extension().is_some_and(|e| e == "log") {
            logs.push(std::fs::read_to_string(&entry).unwrap_or_default());
        }
    }
    assert!(
        logs.iter().all(|l| !l.contains(&token)),
        "a log holds the token"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
