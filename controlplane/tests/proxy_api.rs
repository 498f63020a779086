//! The proxy API of a real `mesh-controlplane` process: workload registration with heartbeats,
//! TTL expiry and deregistration feeding the endpoints stream, and certificate signing with the
//! bootstrap token from the state directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use mesh_core::proxy_api::{
    CERTIFY_PATH, CertifyRequest, CertifyResponse, Endpoints, Update, WATCH_ENDPOINTS_PATH,
    WORKLOADS_PATH, WorkloadLease, WorkloadRegistration,
};
use mesh_test_support::{
    assert_eventually, http_client,
    process::{MeshBinary, MeshProcess},
};

fn start(state_dir: &std::path::Path, ttl: &str) -> (MeshProcess, String) {
    let process = MeshBinary::new(env!("CARGO_BIN_EXE_mesh-controlplane"))
        .env("MESH_CONTROLPLANE_STATE_DIR", state_dir)
        .env("MESH_CONTROLPLANE_API_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_PROXY_ADDR", "127.0.0.1:0")
        .env("MESH_CONTROLPLANE_WORKLOAD_TTL", ttl)
        .env("MESH_CONTROLPLANE_CERT_LIFETIME", "90s")
        .listener("api")
        .listener("proxy")
        .run()
        .unwrap();
    let proxy = format!("http://{}", process.addr("proxy"));
    (process, proxy)
}

#[tokio::test]
async fn registered_workloads_become_endpoints_until_their_lease_expires() {
    let state = tempfile::tempdir().unwrap();
    let (_cp, proxy) = start(state.path(), "1s");
    let client = http_client();

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
        identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
        labels: BTreeMap::from([("version".to_string(), "v2".to_string())]),
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

#[tokio::test]
async fn a_deregistered_workload_leaves_the_endpoints_at_once() {
    let state = tempfile::tempdir().unwrap();
    // A TTL far longer than the test's patience: only the DELETE can remove the endpoint.
    let (_cp, proxy) = start(state.path(), "600s");
    let client = http_client();
    let endpoints = format!("{proxy}{WATCH_ENDPOINTS_PATH}?service=web.default:80");
    let mut resp = client.get(&endpoints).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let latest: Arc<Mutex<Vec<String>>> = Arc::default();
    let stream = {
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

    let mut leases = Vec::new();
    for addr in ["127.0.0.1:9001", "127.0.0.1:9002"] {
        let registration = WorkloadRegistration {
            service: "web.default:80".parse().unwrap(),
            addr: addr.parse().unwrap(),
            identity: None,
            labels: BTreeMap::new(),
        };
        let resp = client
            .post(format!("{proxy}{WORKLOADS_PATH}"))
            .json(&registration)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        leases.push(resp.json::<WorkloadLease>().await.unwrap());
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
        identity: "spiffe://cluster.local/ns/default/sa/web".into(),
    };
    let client = http_client();
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

    let refused = client
        .post(format!("{proxy}{CERTIFY_PATH}"))
        .json(&request("not-the-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}
