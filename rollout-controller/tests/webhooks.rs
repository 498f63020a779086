//! Webhooks against a real HTTP server on 127.0.0.1: the payload arrives as Flagger sends it,
//! and a non-2xx answer, a refused connection and a timeout are all failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_crds::canary::CanaryWebhook;
use mesh_rollout_controller::webhooks::{HookError, Payload, call};
use tokio::net::TcpListener;

/// A hook server: `/ok` answers 200, `/no` 503, `/slow` after 5 s. Records bodies.
async fn hook_server() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        record
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap());
                        let status = match path.as_str() {
                            "/ok" => StatusCode::OK,
                            "/slow" => {
                                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                                StatusCode::OK
                            }
                            _ => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        let mut rsp = Response::new(Full::new(Bytes::from_static(b"nope")));
                        *rsp.status_mut() = status;
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn hook(name: &str, url: String, timeout: Option<&str>) -> CanaryWebhook {
    CanaryWebhook {
        type_: None,
        name: name.into(),
        url: Some(url),
        timeout: timeout.map(Into::into),
        metadata: Some(BTreeMap::from([("cmd".to_string(), "hey".to_string())])),
    }
}

fn payload() -> Payload {
    Payload {
        name: "podinfo".into(),
        namespace: "test".into(),
        phase: "Progressing".into(),
        checksum: "rev-2".into(),
        metadata: BTreeMap::new(),
    }
}

#[tokio::test]
async fn a_2xx_passes_and_the_payload_is_flaggers() {
    let client = mesh_test_support::http_client();
    let (base, seen) = hook_server().await;
    call(
        &client,
        &hook("load", format!("{base}/ok"), None),
        &payload(),
    )
    .await
    .unwrap();
    let body = seen.lock().unwrap()[0].clone();
    assert_eq!(
        body,
        serde_json::json!({"name": "podinfo", "namespace": "test", "phase": "Progressing",
                           "checksum": "rev-2", "metadata": {"cmd": "hey"}})
    );
}

#[tokio::test]
async fn non_2xx_refused_and_slow_hooks_fail() {
    let client = mesh_test_support::http_client();
    let (base, _) = hook_server().await;
    let e = call(
        &client,
        &hook("gate", format!("{base}/no"), None),
        &payload(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, HookError::Status { status: 503, .. }), "{e}");
    assert!(e.to_string().contains("gate"), "{e}");

    let port = mesh_test_support::ports::free_port().unwrap();
    let e = call(
        &client,
        &hook("down", format!("http://127.0.0.1:{port}/"), None),
        &payload(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, HookError::Request { .. }), "{e}");

    let e = call(
        &client,
        &hook("slow", format!("{base}/slow"), Some("200ms")),
        &payload(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, HookError::Request { ref source, .. } if source.is_timeout()),
        "{e}"
    );
}
