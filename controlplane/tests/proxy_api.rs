//! The proxy API of a real `mesh-controlplane` process, served over mTLS: workload registration
//! with heartbeats, TTL expiry and deregistration feeding the endpoints stream, certificate
//! signing with the bootstrap token from the state directory, and who may do what: plaintext is
//! refused, certify needs no client certificate, watches and registration need one from the
//! mesh CA (401 without, a foreign CA's fails the handshake), and a registration or lease of
//! another identity is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use mesh_core::proxy_api::{
    CERTIFY_PATH, CertifyRequest, CertifyResponse, Endpoints, HTTP_SD_PATH, ScrapeTarget, Update,
    WATCH_ENDPOINTS_PATH, WORKLOADS_PATH, WorkloadLease, WorkloadRegistration,
};
use mesh_test_support::{
    assert_eventually,
    mesh::{ControlPlane, ControlPlaneBuilder, control_plane},
    proxy_api::{MeshCa, client},
};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

/// A proxy API client presenting a certificate for `identity` from the control plane's CA.
fn client_for(state_dir: &std::path::Path, identity: &str) -> reqwest::Client {
    MeshCa::of_control_plane(state_dir)
        .unwrap()
        .client(identity)
        .unwrap()
}

/// This crate's control plane binary, with its state in `state_dir`.
fn control_plane_on(state_dir: &std::path::Path) -> ControlPlaneBuilder {
    control_plane()
        .binary(env!("CARGO_BIN_EXE_mesh-controlplane"))
        .state_dir(state_dir)
}

fn start(state_dir: &std::path::Path, ttl: &str) -> (ControlPlane, String) {
    let process = control_plane_on(state_dir)
        .env("MESH_CONTROLPLANE_WORKLOAD_TTL", ttl)
        .cert_lifetime("90s")
        .run()
        .unwrap();
    // The serving certificate names 127.0.0.1, which clients verify as a host name.
    let proxy = process.proxy_api_url();
    (process, proxy)
}

#[tokio::test]
async fn registered_workloads_become_endpoints_until_their_lease_expires() {
    let state = tempfile::tempdir().unwrap();
    let (cp, proxy) = start(state.path(), "1s");
    let client = client_for(state.path(), WEB);

    let latest: Arc<Mutex<Option<Update<Endpoints>>>> = Arc::default();
    let stream = {
        let latest = Arc::clone(&latest);
        let mut resp = client
            .get(format!(
                "{proxy}{WATCH_ENDPOINTS_PATH}?service=web-canary.default:80"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    *latest.lock().unwrap() = Some(serde_json::from_slice(&line).unwrap());
                }
            }
        })
    };
    let addrs = |latest: &Mutex<Option<Update<Endpoints>>>| -> Option<Vec<String>> {
        let guard = latest.lock().unwrap();
        let update = guard.as_ref()?;
        Some(
            update
                .value
                .as_ref()
                .map(|e| e.endpoints.iter().map(|e| e.addr.to_string()).collect())
                .unwrap_or_default(),
        )
    };
    assert_eventually!(addrs(&latest) == Some(vec![]));

    let register = |addr: &str| WorkloadRegistration {
        service: "web-canary.default:80".parse().unwrap(),
        addr: addr.parse().unwrap(),
        identity: Some(WEB.into()),
        labels: BTreeMap::from([("version".to_string(), "v2".to_string())]),
        // The first workload's proxy says where its admin server is; the second does not.
        admin_addr: (addr == "127.0.0.1:9001").then(|| "127.0.0.1:4191".parse().unwrap()),
        deployment: Some("web".into()),
        pod: Some(format!("web-{addr}")),
    };
    let mut leases = Vec::new();
    for addr in ["127.0.0.1:9001", "127.0.0.1:9002"] {
        let resp = client
            .post(format!("{proxy}{WORKLOADS_PATH}"))
            .json(&register(addr))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let lease: WorkloadLease = resp.json().await.unwrap();
        assert_eq!(lease.ttl_seconds, 1);
        leases.push(lease);
    }
    assert_eventually!(
        addrs(&latest) == Some(vec!["127.0.0.1:9001".into(), "127.0.0.1:9002".into()])
    );
    let labels = latest
        .lock()
        .unwrap()
        .clone()
        .unwrap()
        .value
        .unwrap()
        .endpoints[0]
        .labels
        .clone();
    assert_eq!(labels["version"], "v2");

    // Prometheus HTTP service discovery lists the proxy that gave its admin address, behind
    // the resource API's token.
    let sd = format!("{}{HTTP_SD_PATH}", cp.api_url());
    let refused = cp
        .api_client()
        .get(&sd)
        .header("authorization", "Bearer not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let targets: Vec<ScrapeTarget> = cp
        .api_client()
        .get(&sd)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0].targets, ["127.0.0.1:4191"]);
    assert_eq!(targets[0].labels["__meta_mesh_deployment"], "web");
    assert_eq!(targets[0].labels["__meta_mesh_pod"], "web-127.0.0.1:9001");
    assert_eq!(targets[0].labels["__meta_mesh_service"], "web-canary");
    assert_eq!(targets[0].labels["__meta_mesh_label_version"], "v2");

    // Only the first workload keeps heartbeating; the second drops out after its TTL.
    let heartbeat = format!("{proxy}{WORKLOADS_PATH}/{}/heartbeat", leases[0].id);
    assert_eventually!(
        {
            let status = client.post(&heartbeat).send().await.unwrap().status();
            assert_eq!(status, 204);
            addrs(&latest) == Some(vec!["127.0.0.1:9001".into()])
        },
        "the silent workload did not expire: {:?}",
        addrs(&latest)
    );
    let expired = client
        .post(format!(
            "{proxy}{WORKLOADS_PATH}/{}/heartbeat",
            leases[1].id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 404);
    stream.abort();
}

/// Reads an endpoints watch stream in a task, keeping the latest update's addresses.
fn endpoint_addrs(
    mut resp: reqwest::Response,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let latest: Arc<Mutex<Vec<String>>> = Arc::default();
    let task = {
        let latest = Arc::clone(&latest);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let update: Update<Endpoints> = serde_json::from_slice(&line).unwrap();
                    *latest.lock().unwrap() = update
                        .value
                        .map(|e| e.endpoints.iter().map(|e| e.addr.to_string()).collect())
                        .unwrap_or_default();
                }
            }
        })
    };
    (latest, task)
}

/// Registers a plain workload at `addr` for `web.default:80` through the proxy API at `proxy`,
/// and returns its lease.
async fn register(client: &reqwest::Client, proxy: &str, addr: &str) -> WorkloadLease {
    let registration = WorkloadRegistration {
        service: "web.default:80".parse().unwrap(),
        addr: addr.parse().unwrap(),
        identity: None,
        labels: BTreeMap::new(),
        admin_addr: None,
        deployment: None,
        pod: None,
    };
    let resp = client
        .post(format!("{proxy}{WORKLOADS_PATH}"))
        .json(&registration)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

/// A hundred watches of one service over four connections, on a control plane with two
/// connection threads (each connection and its streams on one thread, a change woken once per
/// thread and passed to its streams by the thread's relay): every stream sees every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watch_on_every_connection_sees_each_change() {
    let state = tempfile::tempdir().unwrap();
    let mut cp = control_plane_on(state.path())
        .env("MESH_CONTROLPLANE_CORES", "2")
        .env("MESH_CONTROLPLANE_WORKLOAD_TTL", "600s")
        .run()
        .unwrap();
    let proxy = cp.proxy_api_url();
    let endpoints = format!("{proxy}{WATCH_ENDPOINTS_PATH}?service=web.default:80");
    let mut watches = Vec::new();
    for _ in 0..4 {
        // A client per connection.
        let client = client_for(state.path(), WEB);
        for _ in 0..25 {
            let resp = client.get(&endpoints).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            watches.push(endpoint_addrs(resp));
        }
    }
    // The connections are served on the control plane's connection threads.
    let pid = cp.process().child().pid();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    let conn = threads
        .iter()
        .filter(|name| name.starts_with("mesh-conn-"))
        .count();
    assert_eq!(conn, 2, "{threads:?}");

    let seen = |watches: &[(Arc<Mutex<Vec<String>>>, _)], expected: &[&str]| {
        watches
            .iter()
            .filter(|(latest, _)| *latest.lock().unwrap() == expected)
            .count()
    };
    let client = client_for(state.path(), WEB);
    let mut expected: Vec<&str> = Vec::new();
    let mut leases = Vec::new();
    for addr in ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"] {
        leases.push(register(&client, &proxy, addr).await);
        expected.push(addr);
        assert_eventually!(
            seen(&watches, &expected) == watches.len(),
            "after registering {addr}, {} of {} watches have {expected:?}",
            seen(&watches, &expected),
            watches.len()
        );
    }
    let deleted = client
        .delete(format!("{proxy}{WORKLOADS_PATH}/{}", leases[1].id))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let expected = ["127.0.0.1:9001", "127.0.0.1:9003"];
    assert_eventually!(
        seen(&watches, &expected) == watches.len(),
        "after the deregistration, {} of {} watches have {expected:?}",
        seen(&watches, &expected),
        watches.len()
    );
    for (_, task) in watches {
        task.abort();
    }
}

#[tokio::test]
async fn a_deregistered_workload_leaves_the_endpoints_at_once() {
    let state = tempfile::tempdir().unwrap();
    // A TTL far longer than the test's patience: only the DELETE can remove the endpoint.
    let (_cp, proxy) = start(state.path(), "600s");
    let client = client_for(state.path(), WEB);
    let endpoints = format!("{proxy}{WATCH_ENDPOINTS_PATH}?service=web.default:80");
    let resp = client.get(&endpoints).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (latest, stream) = endpoint_addrs(resp);

    let mut leases = Vec::new();
    for addr in ["127.0.0.1:9001", "127.0.0.1:9002"] {
        leases.push(register(&client, &proxy, addr).await);
    }
    assert_eventually!(
        *latest.lock().unwrap() == ["127.0.0.1:9001", "127.0.0.1:9002"],
        "registered workloads never showed up: {:?}",
        latest.lock().unwrap()
    );

    let lease = format!("{proxy}{WORKLOADS_PATH}/{}", leases[0].id);
    let deleted = client.delete(&lease).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eventually!(
        *latest.lock().unwrap() == ["127.0.0.1:9002"],
        "the deregistered workload is still an endpoint: {:?}",
        latest.lock().unwrap()
    );
    // The lease is gone: a second delete and a heartbeat both find nothing.
    assert_eq!(client.delete(&lease).send().await.unwrap().status(), 404);
    let heartbeat = client
        .post(format!("{lease}/heartbeat"))
        .send()
        .await
        .unwrap();
    assert_eq!(heartbeat.status(), 404);
    let unknown = client
        .delete(format!("{proxy}{WORKLOADS_PATH}/no-such-lease"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // The other workload's lease is untouched.
    let other = client
        .post(format!(
            "{proxy}{WORKLOADS_PATH}/{}/heartbeat",
            leases[1].id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 204);
    stream.abort();
}

#[tokio::test]
async fn proxies_with_the_bootstrap_token_get_certificates() {
    let state = tempfile::tempdir().unwrap();
    let (_cp, proxy) = start(state.path(), "30s");
    let token = std::fs::read_to_string(state.path().join("bootstrap-token")).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let request = |token: &str| CertifyRequest {
        token: token.trim().into(),
        csr_pem: csr.clone(),
        identity: WEB.into(),
    };
    // Certify is how a proxy gets its first certificate: it needs none.
    let roots = std::fs::read_to_string(state.path().join("trust-roots.pem")).unwrap();
    let client = client(&roots, None).unwrap();
    let resp = client
        .post(format!("{proxy}{CERTIFY_PATH}"))
        .json(&request(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cert: CertifyResponse = resp.json().await.unwrap();
    assert_eq!(cert.lifetime_seconds, 90);
    assert!(
        cert.certificate_chain_pem
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(
        cert.trust_roots_pem,
        std::fs::read_to_string(state.path().join("ca.crt")).unwrap()
    );
    assert_eq!(
        cert.trust_roots_pem, roots,
        "trust-roots.pem holds the CA's roots"
    );

    let refused = client
        .post(format!("{proxy}{CERTIFY_PATH}"))
        .json(&request("not-the-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}

/// Follows a watch stream until its first line; the status and that line.
async fn first_line(rsp: reqwest::Response) -> (u16, String) {
    let status = rsp.status().as_u16();
    let mut rsp = rsp;
    let mut buf = Vec::new();
    while !buf.contains(&b'\n') {
        match rsp.chunk().await.unwrap() {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => break,
        }
    }
    (status, String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn plaintext_clients_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let (cp, _) = start(state.path(), "30s");
    let plain = format!(
        "http://{}{WATCH_ENDPOINTS_PATH}?service=web.default:80",
        cp.proxy_api()
    );
    // A proxy from before mTLS (h2c with prior knowledge) cannot even start a request.
    let http1 = mesh_test_support::http_client();
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let refused = h2c.get(&plain).send().await;
    assert!(refused.is_err(), "h2c was answered: {refused:?}");
    // An HTTP/1.1 client is told why before it is disconnected.
    let rsp = http1.get(&plain).send().await.unwrap();
    assert_eq!(rsp.status(), 400);
    assert!(rsp.text().await.unwrap().contains("speaks TLS"));
}

#[tokio::test]
async fn without_a_client_certificate_only_certify_and_readiness_answer() {
    let state = tempfile::tempdir().unwrap();
    let (_cp, proxy) = start(state.path(), "30s");
    let ca = MeshCa::of_control_plane(state.path()).unwrap();
    let anonymous = ca.client_without_certificate().unwrap();
    assert_eq!(
        anonymous
            .get(format!("{proxy}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let watch = format!("{proxy}{WATCH_ENDPOINTS_PATH}?service=web.default:80");
    let registration = WorkloadRegistration {
        service: "web.default:80".parse().unwrap(),
        addr: "127.0.0.1:9001".parse().unwrap(),
        identity: None,
        labels: BTreeMap::new(),
        admin_addr: None,
        deployment: None,
        pod: None,
    };
    for rsp in [
        anonymous.get(&watch).send().await.unwrap(),
        anonymous
            .get(format!("{proxy}/v1/watch/routes?authority=web.default:80"))
            .send()
            .await
            .unwrap(),
        anonymous
            .post(format!("{proxy}{WORKLOADS_PATH}"))
            .json(&registration)
            .send()
            .await
            .unwrap(),
        anonymous
            .post(format!("{proxy}{WORKLOADS_PATH}/some-lease/heartbeat"))
            .send()
            .await
            .unwrap(),
        anonymous
            .delete(format!("{proxy}{WORKLOADS_PATH}/some-lease"))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(rsp.status(), 401);
        let status: serde_json::Value = rsp.json().await.unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], "Unauthorized");
        let message = status["message"].as_str().unwrap();
        assert!(
            message.contains("a client certificate issued by the mesh CA is required"),
            "{message}"
        );
    }

    // Certify answers without one, and the certificate it issues opens the watch.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let token = std::fs::read_to_string(state.path().join("bootstrap-token")).unwrap();
    let rsp = anonymous
        .post(format!("{proxy}{CERTIFY_PATH}"))
        .json(&CertifyRequest {
            token: token.trim().into(),
            csr_pem: csr,
            identity: WEB.into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let issued: CertifyResponse = rsp.json().await.unwrap();
    let certified = client(
        &issued.trust_roots_pem,
        Some(&mesh_test_support::certs::CertifiedKey {
            cert_pem: issued.certificate_chain_pem,
            key_pem: key.serialize_pem(),
        }),
    )
    .unwrap();
    let (status, line) = first_line(certified.get(&watch).send().await.unwrap()).await;
    assert_eq!(status, 200, "{line}");
    // Nothing registered or routed to web yet: the stream says it is unknown.
    let update: Update<Endpoints> = serde_json::from_str(&line).unwrap();
    assert!(update.value.is_none(), "{line}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let state = tempfile::tempdir().unwrap();
    let (_cp, proxy) = start(state.path(), "30s");
    let roots = std::fs::read_to_string(state.path().join("trust-roots.pem")).unwrap();
    let foreign = MeshCa::generate().unwrap().leaf(WEB).unwrap();
    let impostor = client(&roots, Some(&foreign)).unwrap();
    let refused = impostor
        .get(format!(
            "{proxy}{WATCH_ENDPOINTS_PATH}?service=web.default:80"
        ))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a foreign certificate was served: {refused:?}"
    );
    // Not even certify: the handshake itself fails.
    let refused = impostor.get(format!("{proxy}/ready")).send().await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn registrations_and_leases_belong_to_the_certificate_s_identity() {
    let state = tempfile::tempdir().unwrap();
    let (_cp, proxy) = start(state.path(), "600s");
    let web = client_for(state.path(), WEB);
    let other = client_for(state.path(), OTHER);
    let registration = |identity: &str| WorkloadRegistration {
        service: "web.default:80".parse().unwrap(),
        addr: "127.0.0.1:9001".parse().unwrap(),
        identity: Some(identity.into()),
        labels: BTreeMap::new(),
        admin_addr: None,
        deployment: None,
        pod: None,
    };
    let register = |client: &reqwest::Client, identity: &str| {
        client
            .post(format!("{proxy}{WORKLOADS_PATH}"))
            .json(&registration(identity))
            .send()
    };

    // Another identity's certificate cannot announce an endpoint under WEB.
    let rsp = register(&other, WEB).await.unwrap();
    assert_eq!(rsp.status(), 403);
    let message = rsp.text().await.unwrap();
    assert!(
        message.contains(WEB) && message.contains(OTHER),
        "{message}"
    );

    let rsp = register(&web, WEB).await.unwrap();
    assert_eq!(rsp.status(), 201);
    let lease: WorkloadLease = rsp.json().await.unwrap();
    let lease_url = format!("{proxy}{WORKLOADS_PATH}/{}", lease.id);

    // Its lease is WEB's: OTHER may neither heartbeat it, delete it, nor take its address.
    let heartbeat = other
        .post(format!("{lease_url}/heartbeat"))
        .send()
        .await
        .unwrap();
    assert_eq!(heartbeat.status(), 403);
    assert_eq!(other.delete(&lease_url).send().await.unwrap().status(), 403);
    assert_eq!(register(&other, OTHER).await.unwrap().status(), 409);
    // WEB still may.
    let heartbeat = web
        .post(format!("{lease_url}/heartbeat"))
        .send()
        .await
        .unwrap();
    assert_eq!(heartbeat.status(), 204);
    assert_eq!(web.delete(&lease_url).send().await.unwrap().status(), 204);
}

/// The DER of the certificate the proxy listener at `addr` presents to a fresh connection that
/// verifies it against `roots_pem` as `127.0.0.1`.
async fn serving_certificate(addr: std::net::SocketAddr, roots_pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_before_it_expires() {
    let state = tempfile::tempdir().unwrap();
    let cp = control_plane_on(state.path())
        .cert_lifetime("3s")
        .run()
        .unwrap();
    let roots = std::fs::read_to_string(state.path().join("trust-roots.pem")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    // Each certificate lives 3 s and is replaced after 2.1 s: new connections keep verifying,
    // against new certificates.
    assert_eventually!(
        {
            seen.insert(serving_certificate(cp.proxy_api(), &roots).await);
            seen.len() >= 3
        },
        "distinct serving certificates seen: {}",
        seen.len()
    );
}

/// The control plane binary scrapes the `/metrics` of every registered proxy that gave its admin
/// address (what `mesh stat`, `top` and the dashboard read in the embedded mesh). The binary
/// once built the scraper's HTTP client before any TLS provider was chosen, and the scraper's
/// task died at start with a panic while the rest of the control plane served on.
#[tokio::test]
async fn registered_proxies_are_scraped() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // A proxy's admin server, as far as the scraper sees it: `/metrics`, counted.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let scrapes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&scrapes);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = admin.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /metrics ") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let body = "request_total{direction=\"inbound\"} 1\n";
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(rsp.as_bytes()).await;
            });
        }
    });

    let state = tempfile::tempdir().unwrap();
    let mut cp = control_plane_on(state.path())
        .env("MESH_CONTROLPLANE_SCRAPE_INTERVAL", "1s")
        .run()
        .unwrap();
    let client = client_for(state.path(), WEB);
    let resp = client
        .post(format!("{}{WORKLOADS_PATH}", cp.proxy_api_url()))
        .json(&WorkloadRegistration {
            service: "web.default:80".parse().unwrap(),
            addr: "127.0.0.1:9001".parse().unwrap(),
            identity: Some(WEB.into()),
            labels: BTreeMap::new(),
            admin_addr: Some(admin_addr),
            deployment: Some("web".into()),
            pod: Some("web-0".into()),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eventually!(
        scrapes.load(Ordering::SeqCst) >= 2,
        "the control plane never scraped the registered proxy; its log ends:\n{}",
        cp.process().child().log_tail(40)
    );
    let log = cp.process().child().log_tail(200);
    assert!(!log.contains("panicked"), "{log}");
}
