//! The injected init container's iptables rules, run for real: in a network namespace standing
//! in for the pod, joined by a veth pair to a second one standing in for the rest of the
//! cluster. Connections are made and the listener that answers says where they landed.
//!
//! Needs root (or passwordless sudo), `ip` and `iptables`; `scripts/test` installs them. Nothing
//! outside the two namespaces is touched, and both are deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_controlplane::inject::{InjectConfig, PROXY_UID, iptables_script};

/// Answers every connection on each `port:name` with `name\n`.
const SERVER: &str = r#"
import socket, sys, threading
def serve(port, name):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall((name + "\n").encode()); c.close()
for spec in sys.argv[1:]:
    port, name = spec.split(":")
    threading.Thread(target=serve, args=(int(port), name), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects to host:port as uid, prints the answer (or the error).
const CLIENT: &str = r#"
import os, socket, sys
import encodings.idna  # loaded before dropping privileges; the interpreter may live under /root
host, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if uid != 0:
    os.setuid(uid)
try:
    s = socket.create_connection((host, port), timeout=3)
    print(s.recv(100).decode().strip())
except Exception as e:
    print("error: " + type(e).__name__)
"#;

fn sudo() -> Vec<String> {
    if rustix::process::getuid().is_root() {
        Vec::new()
    } else {
        vec!["sudo".into(), "-n".into()]
    }
}

fn run(args: &[&str]) -> Output {
    let mut argv = sudo();
    argv.extend(args.iter().map(|a| (*a).to_string()));
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Namespaces {
    pod: String,
    peer: String,
    servers: Vec<Child>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.pod, &self.peer] {
            let mut argv = sudo();
            argv.extend(["ip", "netns", "pids", ns].map(String::from));
            if let Ok(out) = Command::new(&argv[0]).args(&argv[1..]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let mut kill = sudo();
                    kill.extend(["kill", "-9", pid].map(String::from));
                    let _ = Command::new(&kill[0]).args(&kill[1..]).status();
                }
            }
            let mut del = sudo();
            del.extend(["ip", "netns", "del", ns].map(String::from));
            let _ = Command::new(&del[0]).args(&del[1..]).status();
        }
    }
}

fn serve(ns: &str, specs: &[&str]) -> Child {
    let mut argv = sudo();
    argv.extend(["ip", "netns", "exec", ns, "python3", "-c", SERVER].map(String::from));
    argv.extend(specs.iter().map(|s| (*s).to_string()));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "server in {ns} did not start");
    child
}

fn connect(ns: &str, host: &str, port: u16, uid: i64) -> String {
    let out = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "python3",
        "-c",
        CLIENT,
        host,
        &port.to_string(),
        &uid.to_string(),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "a plain test thread with no runtime to stall; it polls a subprocess"
)]
fn the_init_rules_send_pod_traffic_through_the_proxy_ports() {
    let id = std::process::id() % 100_000;
    let mut n = Namespaces {
        pod: format!("mesh-pod-{id}"),
        peer: format!("mesh-peer-{id}"),
        servers: Vec::new(),
    };
    let (veth_pod, veth_peer) = (format!("mp{id}"), format!("mq{id}"));
    run(&["ip", "netns", "add", &n.pod]);
    run(&["ip", "netns", "add", &n.peer]);
    run(&[
        "ip", "link", "add", &veth_pod, "type", "veth", "peer", "name", &veth_peer,
    ]);
    run(&["ip", "link", "set", &veth_pod, "netns", &n.pod]);
    run(&["ip", "link", "set", &veth_peer, "netns", &n.peer]);
    for (ns, dev, addr) in [
        (&n.pod, &veth_pod, "10.201.0.2/24"),
        (&n.peer, &veth_peer, "10.201.0.1/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    // The pod: the proxy's inbound, outbound and admin ports, and the app on 8080.
    let config = InjectConfig::default();
    let script = iptables_script(&config, &[], &[5432]);
    run(&["ip", "netns", "exec", &n.pod, "sh", "-c", &script]);
    n.servers.push(serve(
        &n.pod,
        &[
            "4143:proxy-inbound",
            "4140:proxy-outbound",
            "4191:proxy-admin",
            "8080:app",
        ],
    ));
    // The rest of the cluster: another service, and a database the pod skips.
    n.servers
        .push(serve(&n.peer, &["9000:peer", "5432:database"]));

    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&n.peer, "10.201.0.2", 4191, 0) != "proxy-admin" {
        assert!(
            Instant::now() < deadline,
            "the pod namespace never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cases = [
        // From outside, the app's port lands on the proxy's inbound listener...
        (&n.peer, "10.201.0.2", 8080, 0, "proxy-inbound"),
        // ...but the proxy's own ports are left alone.
        (&n.peer, "10.201.0.2", 4191, 0, "proxy-admin"),
        // The app's connections out land on the proxy's outbound listener...
        (&n.pod, "10.201.0.1", 9000, 0, "proxy-outbound"),
        // ...except the proxy's own (it runs as PROXY_UID), skipped ports and loopback.
        (&n.pod, "10.201.0.1", 9000, PROXY_UID, "peer"),
        (&n.pod, "10.201.0.1", 5432, 0, "database"),
        (&n.pod, "127.0.0.1", 8080, 0, "app"),
    ];
    for (ns, host, port, uid, want) in cases {
        assert_eq!(
            connect(ns, host, port, uid),
            want,
            "from {ns} to {host}:{port} as uid {uid}"
        );
    }
}
