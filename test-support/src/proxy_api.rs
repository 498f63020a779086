//! Clients and a stand-in for the control plane's proxy API, which is served over mTLS.
//!
//! [`MeshCa`] is a mesh CA: a real control plane's, read from its state directory, or a fresh
//! one (for a stand-in, or as a CA the control plane does not trust). It issues SPIFFE leaves,
//! and [`MeshCa::client`] is an HTTP client that verifies the proxy API against the CA's roots
//! and presents a certificate for a given identity, the way a proxy's watch streams do.
//! [`StandIn`] serves a test's own proxy API handler over TLS, with a certificate naming the
//! control plane's SPIFFE ID, and answers `certify` from its CA, so a real `mesh-proxy` can be
//! pointed at it; [`StandIn::serve_watches`] serves watch streams from a state the test changes,
//! written with [`watch_line`], [`canary_split`] and [`unmeshed_endpoints`]. [`ProxyApiAccess`] holds what a `mesh-proxy` needs to reach either one, and
//! [`MeshBinary::control_plane`] hands it to the proxy.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::proxy_api::{
    CERTIFY_PATH, CertifyRequest, CertifyResponse, Endpoint, Endpoints, RouteRule, RouteTable,
    ServiceRef, Update, WeightedBackend,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{
    HarnessError, Result,
    certs::{CertifiedKey, Leaf, TestCa, write},
    process::MeshBinary,
};

/// The identity the control plane's proxy API certificate names (trust domain `cluster.local`).
pub const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-controlplane";

/// A response body of a stand-in's handler.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

fn tls_err(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Tls(e.to_string())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(HarnessError::io(format!("reading {}", path.display())))
}

/// A mesh CA: the root every workload certificate and the proxy API's certificate chain to.
pub struct MeshCa {
    ca: TestCa,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa").finish_non_exhaustive()
    }
}

impl MeshCa {
    /// The CA of the control plane whose state directory is `state_dir` (`ca.crt`, `ca.key`).
    pub fn of_control_plane(state_dir: &Path) -> Result<Self> {
        let cert = read(&state_dir.join("ca.crt"))?;
        let key = read(&state_dir.join("ca.key"))?;
        Ok(Self {
            ca: TestCa::from_pem(&cert, &key)?,
        })
    }

    /// A fresh CA, unknown to any control plane.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            ca: TestCa::new("mesh test root CA")?,
        })
    }

    /// The trust roots, PEM.
    pub fn roots_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A workload certificate for `identity` (a SPIFFE ID), for client and server use.
    pub fn leaf(&self, identity: &str) -> Result<CertifiedKey> {
        self.ca
            .issue(&Leaf::new("workload").san(identity).client().server())
    }

    /// A client of the proxy API presenting a certificate for `identity`.
    pub fn client(&self, identity: &str) -> Result<reqwest::Client> {
        client(self.roots_pem(), Some(&self.leaf(identity)?))
    }

    /// A client of the proxy API presenting no certificate (as a proxy does before certify).
    pub fn client_without_certificate(&self) -> Result<reqwest::Client> {
        client(self.roots_pem(), None)
    }
}

/// An HTTP client of the proxy API: it verifies the server's certificate against `roots_pem`
/// (the control plane's names `localhost` and `127.0.0.1`, so `https://127.0.0.1:<port>` works)
/// and presents `cert` when given. HTTP/2 or HTTP/1.1, by ALPN.
pub fn client(roots_pem: &str, cert: Option<&CertifiedKey>) -> Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.map_err(tls_err)?).map_err(tls_err)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_err)?
    .with_root_certificates(roots);
    let mut config = match cert {
        Some(cert) => {
            let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(tls_err)?;
            let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(tls_err)?;
            builder.with_client_auth_cert(chain, key).map_err(tls_err)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .map_err(tls_err)
}

/// What a `mesh-proxy` needs to reach a proxy API: its address, a file with the trust roots and
/// a file with a bootstrap token its certify accepts.
#[derive(Clone, Debug)]
pub struct ProxyApiAccess {
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The trust roots, PEM.
    pub trust_roots_file: PathBuf,
    /// The bootstrap token.
    pub token_file: PathBuf,
}

impl ProxyApiAccess {
    /// The real control plane's at `addr`, whose state directory is `state_dir` (where it keeps
    /// `trust-roots.pem` and `bootstrap-token`).
    pub fn of_control_plane(addr: SocketAddr, state_dir: &Path) -> Self {
        Self {
            addr,
            trust_roots_file: state_dir.join("trust-roots.pem"),
            token_file: state_dir.join("bootstrap-token"),
        }
    }
}

impl MeshBinary {
    /// Points a `mesh-proxy` at the proxy API behind `access`, with `identity` (a SPIFFE ID in
    /// `cluster.local`) for its certificate: the control plane's address, trust roots, identity
    /// and token.
    pub fn control_plane(self, access: &ProxyApiAccess, identity: &str) -> Self {
        self.env("MESH_PROXY_CONTROL_PLANE_ADDR", access.addr.to_string())
            .env("MESH_PROXY_TRUST_ROOTS_FILE", &access.trust_roots_file)
            .env("MESH_PROXY_TOKEN_FILE", &access.token_file)
            .env("MESH_PROXY_IDENTITY", identity)
    }
}

/// The token a [`StandIn`] accepts.
const STAND_IN_TOKEN: &str = "stand-in-token";

/// How long a [`StandIn`]'s certificates live.
const STAND_IN_LIFETIME: Duration = Duration::from_secs(3600);

/// A stand-in control plane for tests of the proxy: a test's own handler behind the proxy API's
/// TLS (a certificate for [`CONTROL_PLANE_ID`] from a fresh [`MeshCa`], client certificates
/// optional), with `certify` answered from that CA for its token.
pub struct StandIn {
    ca: Arc<MeshCa>,
    tls: Arc<rustls::ServerConfig>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl StandIn {
    /// A stand-in with a fresh CA; it serves nothing until [`StandIn::serve`].
    pub fn new() -> Result<Self> {
        let ca = MeshCa::generate()?;
        let serving = ca.ca.issue(
            &Leaf::new("mesh-controlplane")
                .san(CONTROL_PLANE_ID)
                .san("localhost")
                .san("127.0.0.1")
                .server(),
        )?;
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(ca.roots_pem().as_bytes()) {
            roots.add(root.map_err(tls_err)?).map_err(tls_err)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
        let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(tls_err)?;
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(tls_err)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let dir = tempfile::Builder::new()
            .prefix("mesh-stand-in-")
            .tempdir()
            .map_err(HarnessError::io("creating the stand-in's directory"))?;
        write(dir.path(), "trust-roots.pem", ca.roots_pem())?;
        write(dir.path(), "bootstrap-token", STAND_IN_TOKEN)?;
        Ok(Self {
            ca: Arc::new(ca),
            tls: Arc::new(tls),
            dir,
        })
    }

    /// The stand-in's CA.
    pub fn ca(&self) -> &MeshCa {
        &self.ca
    }

    /// What a proxy needs to reach the stand-in once it serves on `addr`.
    pub fn access(&self, addr: SocketAddr) -> ProxyApiAccess {
        ProxyApiAccess {
            addr,
            trust_roots_file: self.dir.path().join("trust-roots.pem"),
            token_file: self.dir.path().join("bootstrap-token"),
        }
    }

    /// Serves `listener`: certify from the CA, everything else from `handler`. The connections
    /// live in the returned future: drop it (abort its task) and the stand-in is gone, as a
    /// control plane that went away.
    pub fn serve<H, F>(
        &self,
        listener: tokio::net::TcpListener,
        handler: H,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.tls));
        let ca = Arc::clone(&self.ca);
        async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                let ca = Arc::clone(&ca);
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let ca = Arc::clone(&ca);
                        async move {
                            if req.uri().path() == CERTIFY_PATH {
                                return Ok::<_, Infallible>(certify(&ca, req).await);
                            }
                            Ok(handler(req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        }
    }
}

impl StandIn {
    /// Serves watch streams from `state`: each request gets `answer(path, query, state)` as its
    /// first chunk and again after every change of `state`, until the client goes, the way the
    /// control plane's NDJSON streams behave. Certify is answered as by [`StandIn::serve`].
    pub fn serve_watches<T, A>(
        &self,
        listener: tokio::net::TcpListener,
        state: tokio::sync::watch::Receiver<T>,
        answer: A,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        T: Clone + Send + Sync + 'static,
        A: Fn(&str, &str, &T) -> Bytes + Clone + Send + Sync + 'static,
    {
        self.serve(listener, move |req: Request<Incoming>| {
            let mut state = state.clone();
            let answer = answer.clone();
            async move {
                let path = req.uri().path().to_string();
                let query = req.uri().query().unwrap_or("").to_string();
                let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
                tokio::spawn(async move {
                    loop {
                        let current = state.borrow_and_update().clone();
                        if tx.send_data(answer(&path, &query, &current)).await.is_err() {
                            return;
                        }
                        if state.changed().await.is_err() {
                            return;
                        }
                    }
                });
                Response::new(body.boxed_unsync())
            }
        })
    }
}

/// One line of a watch stream as the control plane writes it (NDJSON): `value` at `version`,
/// `None` when there is none.
pub fn watch_line<T: serde::Serialize>(version: u64, value: Option<T>) -> Bytes {
    let mut line = serde_json::to_string(&Update { version, value }).unwrap_or_default();
    line.push('\n');
    Bytes::from(line)
}

/// The route table of a Canary's HTTPRoute for `parent`: one rule, `rule`, sending `weights.0`
/// of the traffic to `<parent>-primary` and `weights.1` to `<parent>-canary`.
pub fn canary_split(parent: &ServiceRef, rule: &str, weights: (u32, u32)) -> RouteTable {
    let backend = |suffix: &str, weight| WeightedBackend {
        service: ServiceRef::new(
            format!("{}-{suffix}", parent.name),
            parent.namespace.clone(),
            parent.port,
        ),
        weight,
    };
    RouteTable {
        parent: parent.clone(),
        rules: vec![RouteRule {
            name: rule.into(),
            backends: vec![backend("primary", weights.0), backend("canary", weights.1)],
            ..Default::default()
        }],
    }
}

/// The endpoints of `service` at `addrs`, unmeshed: no identity, no labels.
pub fn unmeshed_endpoints(
    service: ServiceRef,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Endpoints {
    Endpoints {
        service,
        endpoints: addrs
            .into_iter()
            .map(|addr| Endpoint {
                addr,
                identity: None,
                labels: BTreeMap::new(),
                deployment: None,
            })
            .collect(),
    }
}

fn respond(status: u16, body: String) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *rsp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    rsp
}

/// The stand-in's certify: the CA signs the CSR for the identity asked for, given its token.
async fn certify(ca: &MeshCa, req: Request<Incoming>) -> Response<Body> {
    let Ok(body) = req.into_body().collect().await else {
        return respond(400, "unreadable body".into());
    };
    let request: CertifyRequest = match serde_json::from_slice(&body.to_bytes()) {
        Ok(r) => r,
        Err(e) => return respond(400, e.to_string()),
    };
    if request.token.trim() != STAND_IN_TOKEN {
        return respond(403, "not the stand-in's token".into());
    }
    match ca
        .ca
        .sign_csr(&request.csr_pem, &request.identity, STAND_IN_LIFETIME)
    {
        Ok(chain) => {
            let answer = CertifyResponse {
                certificate_chain_pem: chain,
                trust_roots_pem: ca.roots_pem().to_string(),
                not_after: String::new(),
                lifetime_seconds: STAND_IN_LIFETIME.as_secs(),
            };
            respond(200, serde_json::to_string(&answer).unwrap_or_default())
        }
        Err(e) => respond(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stand_in_serves_its_handler_over_tls_and_certifies_with_its_token() {
        let stand_in = StandIn::new().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(stand_in.serve(listener, |_req| async {
            Response::new(Full::new(Bytes::from("hello")).boxed_unsync())
        }));
        let client = stand_in
            .ca()
            .client("spiffe://cluster.local/ns/a/sa/b")
            .unwrap();
        let rsp = client
            .get(format!("https://127.0.0.1:{}/anything", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.version(), reqwest::Version::HTTP_2);
        assert_eq!(rsp.text().await.unwrap(), "hello");

        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let ask = |token: &str| CertifyRequest {
            token: token.into(),
            csr_pem: csr.clone(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
        };
        let url = format!("https://127.0.0.1:{}{CERTIFY_PATH}", addr.port());
        let anonymous = stand_in.ca().client_without_certificate().unwrap();
        let token = std::fs::read_to_string(stand_in.access(addr).token_file).unwrap();
        let rsp = anonymous
            .post(&url)
            .json(&ask(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        let answer: CertifyResponse = rsp.json().await.unwrap();
        assert_eq!(answer.trust_roots_pem, stand_in.ca().roots_pem());
        let rsp = anonymous
            .post(&url)
            .json(&ask("nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 403);
        task.abort();
    }
}
