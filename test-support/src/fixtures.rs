//! Real servers and clients of protocols the proxy must carry untouched, from PyPI packages
//! rather than our own code: a gRPC echo server and checking client (`grpcio`), a WebSocket
//! echo server and checking client (`websockets`), and an HTTPS server (the standard library)
//! with a certificate the test issues. The scripts live in `test-support/fixtures/`
//! and run as `python3` (scripts/test installs the packages; a missing one fails the test,
//! naming the `pip install`).
//!
//! ```no_run
//! # async fn f(outbound: std::net::SocketAddr) -> mesh_test_support::Result<()> {
//! use mesh_test_support::fixtures::{grpc_check, grpc_echo};
//! let server = grpc_echo()?;
//! // ... a proxy routing grpc.default:80 to server.addr("grpc") ...
//! grpc_check(outbound, Some("grpc.default:80")).await.assert_passed();
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::Result;
use crate::process::{MeshBinary, MeshProcess};

/// The path of fixture script `name` (in `test-support/fixtures/`).
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn serve(name: &str, listener: &str) -> Result<MeshProcess> {
    MeshBinary::new("python3")
        .arg(script(name))
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .listener(listener)
        .run()
}

/// A gRPC echo server (service `echo.Echo`, see the script) on 127.0.0.1:0; its address is
/// `.addr("grpc")`.
pub fn grpc_echo() -> Result<MeshProcess> {
    serve("grpc_echo.py", "grpc")
}

/// A WebSocket echo server on 127.0.0.1:0; its address is `.addr("ws")`.
pub fn ws_echo() -> Result<MeshProcess> {
    serve("ws_echo.py", "ws")
}

/// An HTTPS server (Python's standard library) presenting `cert_pem` with `key_pem`, on
/// 127.0.0.1:0; its address is `.addr("https")`. Every GET is answered 200 with
/// `hello over TLS <path>`. The PEM files are written to `dir`.
pub fn https_hello(dir: &std::path::Path, cert_pem: &str, key_pem: &str) -> Result<MeshProcess> {
    let cert = crate::certs::write(dir, "https-cert.pem", cert_pem)?;
    let key = crate::certs::write(dir, "https-key.pem", key_pem)?;
    MeshBinary::new("python3")
        .arg(script("https_hello.py"))
        .arg("serve")
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .listener("https")
        .run()
}

/// What a checking client said.
#[derive(Debug)]
#[must_use = "assert on the outcome"]
pub struct Checked {
    /// Whether every case passed.
    pub passed: bool,
    /// Its output: `ok <case>` per case, `FAILED <case>: ...` for the first that failed.
    pub output: String,
}

impl Checked {
    /// Fails the test, with the client's output, unless every case passed.
    ///
    /// # Panics
    /// When a case failed.
    pub fn assert_passed(&self) {
        assert!(self.passed, "{}", self.output);
    }
}

async fn check(name: &str, args: &[String]) -> Checked {
    let out = tokio::process::Command::new("python3")
        .arg(script(name))
        .arg("check")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(out) => Checked {
            passed: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        },
        Err(e) => Checked {
            passed: false,
            output: format!("running python3 {name}: {e}"),
        },
    }
}

/// Runs the gRPC checking client against `target` (a proxy's listener or the server), with
/// `:authority` `authority` when given: unary (small and 1 MiB), server streaming,
/// bidirectional streaming, a deadline, and an error status with trailing metadata.
pub async fn grpc_check(target: SocketAddr, authority: Option<&str>) -> Checked {
    let mut args = vec!["--target".to_string(), target.to_string()];
    if let Some(a) = authority {
        args.extend(["--authority".to_string(), a.to_string()]);
    }
    check("grpc_echo.py", &args).await
}

/// How the WebSocket client reaches the server named by its URL.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// A TCP connection to this address (a proxy's listener); Host stays the URL's.
    Connect(SocketAddr),
    /// Through the HTTP proxy at this address, with `CONNECT`.
    HttpProxy(SocketAddr),
}

/// Runs the WebSocket checking client for `url` (`ws://name[:port]/path`), reaching it `via`:
/// a text message, a 1 MiB binary message, 200 messages in order, a ping.
pub async fn ws_check(url: &str, via: Via) -> Checked {
    let mut args = vec!["--url".to_string(), url.to_string()];
    match via {
        Via::Connect(addr) => args.extend(["--connect".to_string(), addr.to_string()]),
        Via::HttpProxy(addr) => args.extend(["--proxy".to_string(), format!("http://{addr}")]),
    }
    check("ws_echo.py", &args).await
}
