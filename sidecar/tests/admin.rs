//! `mesh-proxy` started as a real process on port 0: the harness reads the admin address it
//! announced, and the admin endpoints answer there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use mesh_test_support::proxies::{Sidecar, proxy};

#[tokio::test]
async fn proxy_announces_its_admin_port_and_serves_probes() {
    // The announcement is the binary's: this proxy is a process.
    let proxy = proxy().spawn().unwrap();
    let admin = proxy.addr("admin");
    assert!(admin.ip().is_loopback());
    assert_ne!(
        admin.port(),
        0,
        "the announced port is the one the kernel chose"
    );

    let http = mesh_test_support::http_client();
    let live = http
        .get(format!("http://{admin}/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(live.text().await.unwrap(), "live\n");
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().ends_with("# EOF\n"));
}

#[test]
fn bad_config_exits_64_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .env("MESH_PROXY_ADMIN_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MESH_PROXY_ADMIN_ADDR") && stderr.contains("not-an-address"),
        "{stderr}"
    );
}
