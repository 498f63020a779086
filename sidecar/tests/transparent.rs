//! Redirected connections through the outbound proxy, on 127.0.0.1 without iptables: the
//! client-side proxy runs in-process and is handed each accepted connection together with the
//! original destination iptables would have left on it ([`Outbound::serve_connection`]), so
//! everything after `SO_ORIGINAL_DST` is the proxy's real path over real sockets. (The
//! redirect itself, with the injector's rules, is tested in network namespaces.)
//!
//! - a meshed opaque connection crosses two proxies over mTLS; the server's proxy authorizes it
//!   by the client's SPIFFE ID, admitting one identity and refusing another;
//! - connections to a meshed service are split by weight, one pick per connection;
//! - a server-first protocol works once the detect timeout passes;
//! - a port declared opaque is never sniffed, even when the bytes look like HTTP;
//! - Redis inline commands (capital letters, not HTTP) reach a real `redis-server` intact;
//! - HTTP to a meshed service's address is routed; HTTP to anything else is passed through.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_sidecar::config::{
    Config, ENV_ADMIN_ADDR, ENV_CONFIG_FILE, ENV_CONTROL_PLANE_ADDR, ENV_IDENTITY,
    ENV_OUTBOUND_ADDR, ENV_OUTBOUND_DETECT_TIMEOUT, ENV_OUTBOUND_OPAQUE_PORTS, ENV_TOKEN_FILE,
    ENV_TRUST_ROOTS_FILE,
};
use mesh_sidecar::proxy::{Proxy, RunningProxy};
use mesh_test_support::apps::{app, tcp_echo};
use mesh_test_support::assert_eventually;
use mesh_test_support::mesh::{ControlPlane, control_plane};
use mesh_test_support::proxies::Sidecar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DB_ID: &str = "spiffe://cluster.local/ns/default/sa/db";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";

/// The app's side of a meshed pod: a proxy started in-process, and a listener standing in for
/// the iptables redirect.
struct Pod {
    proxy: RunningProxy,
    redirect: TcpListener,
    _dir: tempfile::TempDir,
}

/// A pod's proxy with `env` (admin and outbound on 127.0.0.1:0) and, if given, a static config.
async fn pod(env: &[(&str, String)], config: Option<&str>) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let mut vars: BTreeMap<String, String> = BTreeMap::from([
        (ENV_ADMIN_ADDR.to_string(), "127.0.0.1:0".to_string()),
        (ENV_OUTBOUND_ADDR.to_string(), "127.0.0.1:0".to_string()),
    ]);
    if let Some(yaml) = config {
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        vars.insert(ENV_CONFIG_FILE.into(), path.display().to_string());
    }
    for (k, v) in env {
        vars.insert((*k).to_string(), v.clone());
    }
    let proxy = Proxy::new(Config::from_env(&vars).unwrap())
        .unwrap()
        .start()
        .await
        .unwrap();
    Pod {
        proxy,
        redirect: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        _dir: dir,
    }
}

/// A pod certified as `identity` by `cp`.
async fn meshed_pod(cp: &ControlPlane, identity: &str) -> Pod {
    let access = cp.access();
    pod(
        &[
            (ENV_CONTROL_PLANE_ADDR, access.addr.to_string()),
            (
                ENV_TRUST_ROOTS_FILE,
                access.trust_roots_file.display().to_string(),
            ),
            (ENV_TOKEN_FILE, access.token_file.display().to_string()),
            (ENV_IDENTITY, identity.to_string()),
        ],
        None,
    )
    .await
}

impl Pod {
    /// The app connects to `orig`; iptables sends the connection to the proxy, which reads
    /// `orig` back from it. Returns the app's end.
    async fn dial(&self, orig: SocketAddr) -> TcpStream {
        let app = TcpStream::connect(self.redirect.local_addr().unwrap())
            .await
            .unwrap();
        let (io, peer) = self.redirect.accept().await.unwrap();
        let (outbound, drain) = self.proxy.outbound();
        tokio::spawn(outbound.serve_connection(io, peer, Some(orig), drain));
        app
    }

    async fn admin(&self, path: &str) -> reqwest::Response {
        mesh_test_support::http_client()
            .get(format!("http://{}{path}", self.proxy.addrs().admin))
            .send()
            .await
            .unwrap()
    }

    async fn ready(&self) -> bool {
        self.admin("/ready").await.status() == 200
    }

    /// The sum of `name`'s samples whose labels include every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.admin("/metrics").await.text().await.unwrap();
        sum(&text, name, labels)
    }
}

fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Writes `payload` on `io` and reads until as many bytes came back, the peer closed, or it
/// went quiet for a second.
async fn roundtrip(mut io: TcpStream, payload: &[u8]) -> Vec<u8> {
    if io.write_all(payload).await.is_err() {
        return Vec::new();
    }
    read_upto(&mut io, payload.len()).await
}

async fn read_upto(io: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < want {
        match tokio::time::timeout(Duration::from_secs(1), io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

const ONLY_CLIENT: &str = r"
apiVersion: policy.mesh.dev/v1alpha1
kind: Server
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  port: 5432
  proxyProtocol: opaque
---
apiVersion: policy.mesh.dev/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: client}
spec:
  identityRefs: [{kind: ServiceAccount, name: client}]
---
apiVersion: policy.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-from-client}
spec:
  targetRef: {group: policy.mesh.dev, kind: Server, name: db}
  requiredAuthenticationRefs:
  - {group: policy.mesh.dev, kind: MeshTLSAuthentication, name: client}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_opaque_tcp_crosses_proxies_over_mtls_and_is_authorized_by_identity() {
    let cp = control_plane().run().unwrap();
    let echo = tcp_echo().await.unwrap();
    let db = cp
        .proxy(DB_ID)
        .app(echo)
        .service("db.default:5432")
        .labels("app=db")
        .run()
        .unwrap();
    let friend = meshed_pod(&cp, CLIENT_ID).await;
    let intruder = meshed_pod(&cp, INTRUDER_ID).await;
    assert_eventually!(db.ready().await == 200 && friend.ready().await && intruder.ready().await);
    // The app dials the database's registered address, as a pod dials a pod IP.
    let orig = db.addr("inbound");
    let payload = b"\x00\x00\x00\x08\x04\xd2\x16\x2f opaque bytes";

    // The default policy admits everyone; the connection goes over mTLS to the db's proxy.
    assert_eventually!(roundtrip(friend.dial(orig).await, payload).await == payload);
    assert!(
        friend
            .metric(
                "tcp_open_total",
                &[
                    r#"direction="outbound""#,
                    r#"authority="db.default:5432""#,
                    r#"dst_service="db""#,
                    r#"tls="true""#
                ]
            )
            .await
            >= 1.0
    );
    assert!(
        db.metric_sum(
            "tcp_read_bytes_total",
            &[r#"direction="inbound""#, r#"tls="true""#]
        )
        .await
            >= payload.len() as f64
    );

    // Only the client's identity is admitted: the intruder's connection is closed by the db's
    // proxy, though it is meshed too.
    cp.apply(ONLY_CLIENT).await;
    assert_eventually!(
        roundtrip(intruder.dial(orig).await, payload)
            .await
            .is_empty()
    );
    assert_eq!(roundtrip(friend.dial(orig).await, payload).await, payload);
    assert!(
        db.metric_sum("inbound_tcp_authz_deny_total", &[r#"server="Server/db""#])
            .await
            >= 1.0
    );
    // Plaintext straight to the inbound listener has no identity: refused as well.
    let plain = TcpStream::connect(orig).await.unwrap();
    assert!(roundtrip(plain, payload).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_meshed_service_are_split_by_weight_per_connection() {
    let a = tcp_echo().banner(b"a").await.unwrap();
    let b = tcp_echo().banner(b"b").await.unwrap();
    let config = format!(
        r#"
addresses:
  - {{addr: "10.96.0.10:5432", service: db.default:5432}}
routes:
  - parent: db.default:5432
    rules:
      - name: split
        backends:
          - {{service: db-a.default:5432, weight: 3}}
          - {{service: db-b.default:5432, weight: 1}}
endpoints:
  - {{service: db-a.default:5432, endpoints: [{{addr: "{a}"}}]}}
  - {{service: db-b.default:5432, endpoints: [{{addr: "{b}"}}]}}
"#
    );
    let client = pod(&[], Some(&config)).await;
    let vip: SocketAddr = "10.96.0.10:5432".parse().unwrap();
    let mut seen = BTreeMap::<Vec<u8>, usize>::new();
    for _ in 0..200 {
        // Port 5432 is opaque by default: the banner-first servers are never waited on.
        let mut io = client.dial(vip).await;
        *seen.entry(read_upto(&mut io, 1).await).or_default() += 1;
    }
    let (na, nb) = (seen[&b"a".to_vec()], seen[&b"b".to_vec()]);
    assert_eq!(na + nb, 200, "{seen:?}");
    assert!(nb > 0 && na > nb, "3:1 split gave {na}:{nb}");
    for (backend, n) in [(r#"dst_service="db-a""#, na), (r#"dst_service="db-b""#, nb)] {
        let labels = [
            r#"direction="outbound""#,
            r#"authority="db.default:5432""#,
            backend,
        ];
        assert_eq!(client.metric("tcp_open_total", &labels).await, n as f64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_works_after_the_detect_timeout() {
    let smtp = tcp_echo().banner(b"220 mail ready\r\n").await.unwrap();
    let client = pod(&[(ENV_OUTBOUND_DETECT_TIMEOUT, "200ms".into())], None).await;
    let mut io = client.dial(smtp).await;
    assert_eq!(read_upto(&mut io, 16).await, b"220 mail ready\r\n");
    assert_eq!(roundtrip(io, b"QUIT\r\n").await, b"QUIT\r\n");
    let authority = format!(r#"authority="{smtp}""#);
    assert_eq!(
        client
            .metric("tcp_open_total", &[&authority, r#"dst_service="""#])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_port_is_never_sniffed() {
    let echo = tcp_echo().await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: db\r\n\r\n";
    // Sniffed, this would be HTTP, and the echo server no HTTP server: a 502.
    let sniffing = pod(&[], None).await;
    let answer = roundtrip(sniffing.dial(echo).await, request).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 502"),
        "{}",
        answer.escape_ascii()
    );
    // Declared opaque, the same bytes go through as they are.
    let opaque = pod(
        &[(ENV_OUTBOUND_OPAQUE_PORTS, echo.port().to_string())],
        None,
    )
    .await;
    assert_eq!(roundtrip(opaque.dial(echo).await, request).await, request);
}

/// A real `redis-server` on a free port (not Redis's own, which is opaque by default);
/// `scripts/test` installs it.
async fn redis() -> (tokio::process::Child, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server is needed (apt-get install redis-server): {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eventually!(TcpStream::connect(addr).await.is_ok());
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_inline_commands_are_not_taken_for_http() {
    let (_redis, addr) = redis().await;
    let client = pod(&[(ENV_OUTBOUND_DETECT_TIMEOUT, "5s".into())], None).await;
    let mut io = client.dial(addr).await;
    for (command, reply) in [
        (&b"PING\r\n"[..], &b"+PONG\r\n"[..]),
        (b"SET greeting hello\r\n", b"+OK\r\n"),
        (b"GET greeting\r\n", b"$5\r\nhello\r\n"),
    ] {
        io.write_all(command).await.unwrap();
        assert_eq!(read_upto(&mut io, reply.len()).await, reply);
    }
}

/// Sends one HTTP/1.1 request over `io` and returns the whole answer.
async fn http_get(mut io: TcpStream, host: &str) -> String {
    let request = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    io.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_a_meshed_address_is_routed_and_anything_else_passed_through() {
    let web = app("v1").await.unwrap();
    let outside = app("outside").await.unwrap();
    let config = format!(
        r#"
addresses:
  - {{addr: "10.96.0.20:80", service: web.default:80}}
endpoints:
  - {{service: web.default:80, endpoints: [{{addr: "{}"}}]}}
"#,
        web.addr()
    );
    let client = pod(&[], Some(&config)).await;

    // The service's address: routed by its table, whatever Host says.
    let answer = http_get(client.dial("10.96.0.20:80".parse().unwrap()).await, "x").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("v1"), "{answer}");
    assert_eq!(
        client
            .metric(
                "request_total",
                &[r#"authority="web.default:80""#, r#"dst_service="web""#]
            )
            .await,
        1.0
    );

    // An address outside the mesh: the request goes there, with the app's Host.
    let answer = http_get(client.dial(outside.addr()).await, "example.com").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("outside"), "{answer}");
    let authority = format!(r#"authority="{}""#, outside.addr());
    assert_eq!(
        client
            .metric("request_total", &[&authority, r#"dst_service="""#])
            .await,
        1.0
    );
    assert_eq!(
        client
            .metric("response_total", &[&authority, r#"status_code="200""#])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_one_endpoint_of_a_service_goes_there_without_the_services_routes() {
    // A pod IP (as a headless Service's DNS answers) is an endpoint of its service: the request
    // goes to that endpoint and the service's routes do not apply to it, as the Gateway API's
    // mesh profile expects (MeshFrontend's "Send to pod IP"). The service's address is routed.
    let v1 = app("v1").await.unwrap();
    let v2 = app("v2").await.unwrap();
    let config = format!(
        r#"
addresses:
  - {{addr: "10.96.0.30:80", service: web.default:80}}
routes:
  - parent: web.default:80
    rules:
      - name: all-to-v1
        filters: [{{type: responseHeaderModifier, set: {{x-routed: "yes"}}}}]
        backends: [{{service: web-v1.default:80, weight: 1}}]
endpoints:
  - {{service: web-v1.default:80, endpoints: [{{addr: "{}"}}]}}
  - {{service: web.default:80, endpoints: [{{addr: "{}"}}]}}
"#,
        v1.addr(),
        v2.addr()
    );
    let client = pod(&[], Some(&config)).await;

    let routed = http_get(client.dial("10.96.0.30:80".parse().unwrap()).await, "x").await;
    assert!(routed.starts_with("HTTP/1.1 200"), "{routed}");
    assert!(
        routed.ends_with("v1"),
        "the route sends everything to v1: {routed}"
    );
    assert!(
        routed.to_ascii_lowercase().contains("x-routed: yes"),
        "{routed}"
    );

    let direct = http_get(client.dial(v2.addr()).await, "x").await;
    assert!(direct.starts_with("HTTP/1.1 200"), "{direct}");
    assert!(direct.ends_with("v2"), "the pod dialled answers: {direct}");
    assert!(
        !direct.to_ascii_lowercase().contains("x-routed"),
        "no route applies to a pod's own address: {direct}"
    );
    assert_eq!(
        client
            .metric(
                "response_total",
                &[r#"authority="web.default:80""#, r#"dst_service="web""#]
            )
            .await,
        1.0,
        "the request to the endpoint is counted under its service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_service_without_endpoints_still_reaches_the_address_dialled() {
    // The address is a service's, but no endpoint of it is known (discovery has not answered,
    // or none is ready): the connection goes where the app dialled rather than fail.
    let echo = tcp_echo().await.unwrap();
    let config = format!("addresses:\n  - {{addr: \"{echo}\", service: db.default:5432}}\n");
    let client = pod(&[], Some(&config)).await;
    let payload = b"\x00still works";
    assert_eq!(roundtrip(client.dial(echo).await, payload).await, payload);
    // HTTP alike: passed through to the address, not answered 404 for want of a route.
    let web = app("web").await.unwrap();
    let config = format!(
        "addresses:\n  - {{addr: \"{}\", service: web.default:80}}\n",
        web.addr()
    );
    let http = pod(&[], Some(&config)).await;
    let answer = http_get(http.dial(web.addr()).await, "web").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        client
            .metric(
                "tcp_open_total",
                &[r#"authority="db.default:5432""#, r#"dst_service="""#]
            )
            .await,
        1.0
    );
}
