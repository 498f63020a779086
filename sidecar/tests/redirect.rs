//! The redirect path, end to end: a pod network namespace with the injector's own iptables
//! rules and the real `mesh-proxy` running as the proxy's uid, and a cluster namespace with real
//! servers. The app in the pod has no proxy settings: it connects to a server's IP and port,
//! the rules send the connection to the proxy's outbound listener, and the proxy must get it to
//! where the app was going without breaking the protocol. Real clients check the protocol
//! (redis-cli, psql, curl verifying a server certificate, a WebSocket client, a gRPC client);
//! the proxy's own counters for that destination prove it was in the path, so each test fails
//! if the proxy is taken out of it (the last test is that control: without the rules the
//! counters stay at zero).
//!
//! The other way in is covered too: a client in the cluster reaches the pod's app, which
//! listens on loopback only, through the rule that sends what arrives to the inbound listener.
//!
//! A meshed service is reached the two ways an app in the embedded mesh has: with no proxy
//! settings, at the address its name stands for (the workload's registered address, which the
//! control plane answers for as an endpoint of the service, as a cluster's DNS answers with a
//! ClusterIP or pod IP), and by name through `HTTP_PROXY`, as `mesh up` configures its apps.
//! A meshed Redis is reached the first way, its bytes carried between the proxies over mTLS.
//!
//! Needs root (or passwordless sudo), iproute2, iptables, util-linux's `setpriv`, curl,
//! redis-server and redis-tools, PostgreSQL, and Python 3 with grpcio and websockets;
//! `scripts/test` installs them, and a test fails naming what is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use mesh_controlplane::inject::{InjectConfig, PROXY_UID, iptables_script};
use mesh_sidecar::config::{ENV_APP_ADDR, ENV_INBOUND_ADDR};
use mesh_test_support::fixtures::script;
use mesh_test_support::mesh::CLIENT_ID;
use mesh_test_support::netns::{
    ADMIN_PORT, CLUSTER_IP, INBOUND_PORT, MeshedPod, OUTBOUND_PORT, POD_IP, Server, meshed_pod,
};
use mesh_test_support::proxies::Sidecar;

/// An HTTP server answering every GET with its name and the `x-mesh-client-id` the mesh added
/// (`-` when none), so a test sees who answered and whether the request came over the mesh's
/// mTLS.
const HTTP_APP: &str = r#"
import http.server, sys
name, listen = sys.argv[1], sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"{name} {self.headers.get('x-mesh-client-id', '-')}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
host, port = listen.rsplit(":", 1)
http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
"#;

/// The pod: the injector's rules for its default ports, no port skipped.
fn pod() -> MeshedPod {
    let config = InjectConfig::default();
    assert_eq!(
        (config.outbound_port, config.inbound_port, config.admin_port),
        (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT),
        "the harness binds the proxy where the injector's rules send traffic"
    );
    let uid = u32::try_from(PROXY_UID).unwrap();
    meshed_pod(&iptables_script(&config, &[], &[]), uid)
        .start()
        .unwrap()
}

/// Fails the test, naming what is missing, unless every one of `programs` is installed (as
/// `controlplane/tests/iptables.rs`, these tests never skip: `scripts/test` installs them).
fn require(programs: &[&str]) {
    let missing: Vec<&&str> = programs.iter().filter(|p| which(p).is_none()).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}; scripts/test installs them"
    );
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| program.into());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Fails the test unless Python 3 can import `module` (grpcio is `grpc`).
fn require_python_module(module: &str) {
    require(&["python3"]);
    let found = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "python3 cannot import {module}; scripts/test installs it from PyPI"
    );
}

/// A fixture script of the test-support crate, as an argument.
fn fixture(name: &str) -> String {
    script(name).display().to_string()
}

/// The labels of the pod proxy's outbound series for traffic to `port` on the cluster IP.
fn to(port: u16) -> [String; 2] {
    [
        "direction=\"outbound\"".to_string(),
        format!("authority=\"{CLUSTER_IP}:{port}\""),
    ]
}

fn labels(l: &[String]) -> Vec<&str> {
    l.iter().map(String::as_str).collect()
}

#[test]
fn redis_cli_reaches_a_real_redis() {
    require(&["redis-server", "redis-cli"]);
    let mut pod = pod();
    let listen = CLUSTER_IP.to_string();
    let dir = pod.net().dir().display().to_string();
    // Redis's own port, which the proxy knows as opaque and never sniffs, and a port nobody
    // declared: there the proxy must see for itself that the client is not speaking HTTP.
    for port in [6379, 7379] {
        let port_arg = port.to_string();
        pod.serve(
            Server::new(
                &format!("redis-{port}"),
                &[
                    "redis-server",
                    "--bind",
                    &listen,
                    "--port",
                    &port_arg,
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    &dir,
                ],
            )
            .listening(port),
        )
        .unwrap();
    }

    for port in [6379, 7379] {
        let port_arg = port.to_string();
        let cli = |args: &[&str]| {
            let mut argv = vec!["redis-cli", "-h", &listen, "-p", &port_arg];
            argv.extend_from_slice(args);
            pod.app_run(&argv).unwrap().trim().to_string()
        };
        assert_eq!(cli(&["SET", "mesh:greeting", "through the proxy"]), "OK");
        assert_eq!(cli(&["GET", "mesh:greeting"]), "through the proxy");
        // 256 KiB up in four commands on one connection, and back in one reply.
        let chunk = "x".repeat(64 * 1024);
        assert_eq!(
            cli(&["-r", "4", "APPEND", "mesh:big", &chunk]),
            "65536\n131072\n196608\n262144"
        );
        assert_eq!(cli(&["STRLEN", "mesh:big"]), "262144");
        assert_eq!(cli(&["GET", "mesh:big"]), chunk.repeat(4));

        // Five connections, each through the proxy as opaque TCP to where the app was going,
        // and the big value counted both ways.
        let l = to(port);
        pod.wait_metric("tcp_close_total", &labels(&l), 5.0)
            .unwrap();
        for bytes in ["tcp_read_bytes_total", "tcp_write_bytes_total"] {
            let counted = pod.metric(bytes, &labels(&l)).unwrap();
            assert!(
                counted >= 256.0 * 1024.0,
                "{bytes} to port {port}: {counted}"
            );
        }
    }
}

#[test]
fn psql_reaches_a_real_postgres() {
    let bin = postgres_bin()
        .expect("PostgreSQL (/usr/lib/postgresql/*/bin/initdb); scripts/test installs it");
    require(&["psql"]);
    let mut pod = pod();
    // Postgres refuses to run as root: its data belongs to the postgres user.
    let uid = user_id("postgres");
    let data = pod.net().dir().join("pg");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
    let data = data.display().to_string();
    pod.net()
        .cluster()
        .run(
            Some(uid),
            &[
                &format!("{bin}/initdb"),
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )
        .unwrap();
    // The pod connects from its own address, which initdb's loopback-only rules do not cover.
    let hba = Path::new(&data).join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str(&format!("host all all {POD_IP}/32 trust\n"));
    std::fs::write(&hba, rules).unwrap();
    let listen = CLUSTER_IP.to_string();
    pod.serve(
        Server::new(
            "postgres",
            &[
                &format!("{bin}/postgres"),
                "-D",
                &data,
                "-h",
                &listen,
                "-p",
                "5432",
                "-k",
                &data,
            ],
        )
        .uid(uid)
        .listening(5432),
    )
    .unwrap();

    let psql = |sql: &str| {
        pod.app_run(&[
            "psql", "-h", &listen, "-p", "5432", "-U", "postgres", "-d", "postgres", "-qAtc", sql,
        ])
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(psql("SELECT 6 * 7"), "42");
    assert_eq!(
        psql(
            "CREATE TABLE t (v text); INSERT INTO t SELECT repeat('y', 100000); \
             SELECT length(v) FROM t"
        ),
        "100000"
    );
    // A large row back.
    assert_eq!(psql("SELECT repeat('z', 200000)"), "z".repeat(200_000));

    // Three connections through the proxy, and the large row among the bytes it carried.
    let l = to(5432);
    pod.wait_metric("tcp_close_total", &labels(&l), 3.0)
        .unwrap();
    let carried = pod.metric("tcp_read_bytes_total", &labels(&l)).unwrap()
        + pod.metric("tcp_write_bytes_total", &labels(&l)).unwrap();
    assert!(carried >= 200_000.0, "the proxy counted {carried} bytes");
}

fn postgres_bin() -> Option<String> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    Some(versions.pop()?.display().to_string())
}

fn user_id(name: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "no user {name}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn curl_verifies_an_https_servers_own_certificate() {
    require(&["curl", "python3"]);
    let mut pod = pod();
    let ca = mesh_test_support::certs::TestCa::new("an HTTPS server's CA").unwrap();
    let leaf = ca
        .issue(
            &mesh_test_support::certs::Leaf::new("https")
                .san(&CLUSTER_IP.to_string())
                .server(),
        )
        .unwrap();
    let net = pod.net();
    let ca_file = net.file("https-ca.pem", ca.cert_pem().as_bytes()).unwrap();
    let cert = net.file("https.pem", leaf.cert_pem.as_bytes()).unwrap();
    let key = net.file("https.key", leaf.key_pem.as_bytes()).unwrap();
    let listen = format!("{CLUSTER_IP}:8443");
    pod.serve(
        Server::new(
            "https",
            &[
                "python3",
                &fixture("https_hello.py"),
                "serve",
                "--listen",
                &listen,
                "--cert",
                &cert.display().to_string(),
                "--key",
                &key.display().to_string(),
            ],
        )
        .listening(8443),
    )
    .unwrap();

    // The client checks the server's own certificate against the CA that issued it: the
    // proxy passes TLS through untouched, or the handshake fails.
    let body = pod
        .app_run(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca_file.display().to_string(),
            &format!("https://{listen}/end-to-end"),
        ])
        .unwrap();
    assert_eq!(body.trim(), "hello over TLS /end-to-end");

    let l = to(8443);
    pod.wait_metric("tcp_open_total", &labels(&l), 1.0).unwrap();
}

#[test]
fn a_websocket_client_reaches_an_echo_server() {
    require(&["python3"]);
    require_python_module("websockets");
    let mut pod = pod();
    let listen = format!("{CLUSTER_IP}:8765");
    let script = fixture("ws_echo.py");
    pod.serve(
        Server::new("ws", &["python3", &script, "serve", "--listen", &listen]).listening(8765),
    )
    .unwrap();

    let out = pod.net().pod().run(
        None,
        &[
            "python3",
            &script,
            "check",
            "--url",
            &format!("ws://{listen}/echo"),
        ],
    );
    let out = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => panic!("{e}\n--- the proxy's log ---\n{}", pod.proxy_log(20)),
    };
    assert!(out.contains("all WebSocket cases passed"), "{out}");

    // The Upgrade request went through the proxy as HTTP, then the tunnel.
    let l = to(8765);
    pod.wait_metric("request_total", &labels(&l), 1.0).unwrap();
}

#[test]
fn curl_reaches_an_unmeshed_http_host_by_its_ip() {
    require(&["curl", "python3"]);
    let mut pod = pod();
    let listen = format!("{CLUSTER_IP}:8080");
    pod.serve(Server::new("plain", &["python3", "-c", HTTP_APP, "plain", &listen]).listening(8080))
        .unwrap();
    let url = format!("http://{listen}/");

    let body = pod
        .app_run(&["curl", "-sS", "--max-time", "10", &url])
        .unwrap();
    assert_eq!(body.trim(), "plain -");
    let l = to(8080);
    let counted = pod.wait_metric("request_total", &labels(&l), 1.0).unwrap();

    // The control: the proxy's own connections (its uid) leave the pod untouched, or the
    // proxy would loop into itself. The request still arrives, and the proxy counts nothing.
    let direct = pod
        .net()
        .pod()
        .stdout(
            Some(u32::try_from(PROXY_UID).unwrap()),
            &["curl", "-sS", "--max-time", "10", &url],
        )
        .unwrap();
    assert_eq!(direct.trim(), "plain -");
    assert_eq!(
        pod.metric("request_total", &labels(&l)).unwrap(),
        counted,
        "a connection from the proxy's uid went through the proxy"
    );
}

#[test]
fn a_grpc_client_reaches_an_unmeshed_server() {
    require(&["python3"]);
    require_python_module("grpc");
    let mut pod = pod();
    let listen = format!("{CLUSTER_IP}:50051");
    let script = fixture("grpc_echo.py");
    pod.serve(
        Server::new("grpc", &["python3", &script, "serve", "--listen", &listen]).listening(50051),
    )
    .unwrap();

    // Unary (small and 1 MiB), server streaming, bidirectional streaming, a deadline the
    // server overruns, and an error status with trailing metadata: see the fixture.
    let out = pod
        .net()
        .pod()
        .run(None, &["python3", &script, "check", "--target", &listen]);
    let out = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => panic!("{e}\n--- the proxy's log ---\n{}", pod.proxy_log(20)),
    };
    assert!(out.contains("all gRPC cases passed"), "{out}");

    // Six calls, each a request through the proxy over HTTP/2.
    let l = to(50051);
    pod.wait_metric("request_total", &labels(&l), 6.0).unwrap();
}

#[test]
fn a_meshed_service_is_reached_by_name_over_mtls() {
    require(&["curl", "python3"]);
    let mut pod = pod();
    let service = "web.default:80";
    let app_port = 8081;
    let listen = format!("127.0.0.1:{app_port}");
    let server = pod
        .meshed_service(
            service,
            mesh_test_support::mesh::SERVER_ID,
            Server::new("web", &["python3", "-c", HTTP_APP, "web", &listen]),
            app_port,
            INBOUND_PORT,
        )
        .unwrap();

    // 1. No proxy settings: the app dials the address the name stands for, here the address
    // the workload registered (what a headless Service's DNS answers in a cluster; the
    // control plane knows it as an endpoint of web.default:80). The rules redirect the
    // connection, and the proxy sends it to that endpoint over mTLS, counted under the service.
    let registered = format!("{CLUSTER_IP}:{INBOUND_PORT}");
    let body = pod
        .app_run(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &format!("web.default:{INBOUND_PORT}:{CLUSTER_IP}"),
            &format!("http://web.default:{INBOUND_PORT}/"),
        ])
        .unwrap();
    // The app answered, and saw the pod's identity: the request crossed mTLS between proxies.
    assert_eq!(body.trim(), format!("web {CLIENT_ID}"), "via {registered}");
    let routed = ["direction=\"outbound\"", "authority=\"web.default:80\""];
    pod.wait_metric("request_total", &routed, 1.0).unwrap();

    // 2. By name through HTTP_PROXY, as `mesh up` sets it for the apps it runs: the proxy's
    // listener is on loopback, which the rules leave alone.
    let body = pod
        .app_run(&[
            "env",
            &format!("http_proxy=http://127.0.0.1:{OUTBOUND_PORT}"),
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{service}/"),
        ])
        .unwrap();
    assert_eq!(body.trim(), format!("web {CLIENT_ID}"));
    pod.wait_metric("request_total", &routed, 2.0).unwrap();
    drop(server);
}

#[test]
fn redis_cli_reaches_a_meshed_redis_over_mtls() {
    require(&["redis-server", "redis-cli"]);
    let mut pod = pod();
    let dir = pod.net().dir().display().to_string();
    let server = pod
        .meshed_service(
            "cache.default:6379",
            "spiffe://cluster.local/ns/default/sa/cache",
            Server::new(
                "redis",
                &[
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "6390",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    &dir,
                ],
            ),
            6390,
            INBOUND_PORT,
        )
        .unwrap();

    // The app dials the workload's registered address; the pod's proxy carries the bytes to
    // the workload's proxy over mTLS, which hands them to Redis on its loopback.
    let host = CLUSTER_IP.to_string();
    let port = INBOUND_PORT.to_string();
    let cli = |args: &[&str]| {
        let mut argv = vec!["redis-cli", "-h", &host, "-p", &port];
        argv.extend_from_slice(args);
        pod.app_run(&argv).unwrap().trim().to_string()
    };
    assert_eq!(cli(&["SET", "mesh:meshed", "over mTLS"]), "OK");
    assert_eq!(cli(&["GET", "mesh:meshed"]), "over mTLS");

    let meshed = [
        "direction=\"outbound\"",
        "authority=\"cache.default:6379\"",
        "tls=\"true\"",
    ];
    pod.wait_metric("tcp_close_total", &meshed, 2.0).unwrap();
    // The far side counted them as opaque connections arriving over the mesh.
    let far = pod
        .net()
        .cluster()
        .metric_sum(
            server.addr("admin"),
            "tcp_open_total",
            &["direction=\"inbound\""],
        )
        .unwrap();
    assert!(
        far >= 2.0,
        "the workload's proxy counted {far} inbound connections"
    );
}

#[test]
fn a_client_in_the_cluster_reaches_the_pods_app_through_its_inbound_listener() {
    require(&["curl", "python3"]);
    // The injector points the proxy at the app's declared port; the rules send everything
    // arriving for the pod to the inbound listener.
    let config = InjectConfig::default();
    let mut pod = meshed_pod(
        &iptables_script(&config, &[], &[]),
        u32::try_from(PROXY_UID).unwrap(),
    )
    .env(ENV_INBOUND_ADDR, &format!("0.0.0.0:{INBOUND_PORT}"))
    .env(ENV_APP_ADDR, "127.0.0.1:8080")
    .start()
    .unwrap();
    pod.serve(
        Server::new("app", &["python3", "-c", HTTP_APP, "app", "127.0.0.1:8080"])
            .in_pod()
            .listening_on("127.0.0.1:8080".parse().unwrap()),
    )
    .unwrap();

    // The app listens on loopback only: nothing but the proxy can hand it this request.
    let (status, body) = pod
        .net()
        .cluster()
        .http_get(&format!("http://{POD_IP}:8080/"))
        .unwrap();
    assert_eq!((status, body.trim()), (200, "app -"));
    pod.wait_metric("request_total", &["direction=\"inbound\""], 1.0)
        .unwrap();
}

/// The control for every test above: a pod without the rules reaches the same server
/// directly, and the proxy's counters for it stay at zero, so "the proxy counted it" is what
/// tells the redirected path from a direct one.
#[test]
fn without_the_rules_the_proxy_counts_nothing() {
    require(&["curl", "python3"]);
    let mut pod = meshed_pod("true", u32::try_from(PROXY_UID).unwrap())
        .start()
        .unwrap();
    let listen = format!("{CLUSTER_IP}:8080");
    pod.serve(Server::new("plain", &["python3", "-c", HTTP_APP, "plain", &listen]).listening(8080))
        .unwrap();
    let body = pod
        .app_run(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{listen}/"),
        ])
        .unwrap();
    assert_eq!(body.trim(), "plain -");
    let l = to(8080);
    for family in ["request_total", "tcp_open_total"] {
        assert_eq!(pod.metric(family, &labels(&l)).unwrap(), 0.0, "{family}");
    }
}
