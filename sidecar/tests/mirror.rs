//! HTTPRoute RequestMirror through a real proxy: the mirror's service gets a copy of each
//! sampled request (method, path, headers and body), the client gets the primary's answer, and
//! a mirror that is down, never answers or stops reading neither fails nor holds up the
//! original.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{Sidecar, proxy};
use tokio::sync::Notify;

/// One request as the mirror saw it.
#[derive(Clone, Debug)]
struct Copy {
    method: String,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A mirror backend that records what it gets; while `hold` is set it answers nothing until
/// released.
struct Shadow {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Copy>>>,
    release: Arc<Notify>,
}

async fn shadow(hold: bool) -> Shadow {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Copy>>> = Arc::default();
    let release = Arc::new(Notify::new());
    let (s, r) = (seen.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (seen, release) = (s.clone(), r.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, release) = (seen.clone(), release.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(Copy {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_string(),
                            headers: parts.headers,
                            body,
                        });
                        if hold {
                            release.notified().await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"shadow"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Shadow {
        addr,
        seen,
        release,
    }
}

impl Shadow {
    fn seen(&self) -> Vec<Copy> {
        self.seen.lock().unwrap().clone()
    }
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn config(primary: SocketAddr, mirror: SocketAddr, down: SocketAddr) -> String {
    format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: half
        matches: [{{path: {{type: PathPrefix, value: /half}}}}]
        filters: [{{type: requestMirror, backend: shadow.default:80, percent: 50}}]
        backends: [{{service: web-primary.default:80, weight: 1}}]
      - name: down
        matches: [{{path: {{type: PathPrefix, value: /down}}}}]
        filters: [{{type: requestMirror, backend: gone.default:80}}]
        backends: [{{service: web-primary.default:80, weight: 1}}]
      - name: all
        matches: [{{path: {{type: PathPrefix, value: /}}}}]
        filters:
          - {{type: requestHeaderModifier, set: {{x-added: yes}}}}
          - {{type: requestMirror, backend: shadow.default:80}}
        backends: [{{service: web-primary.default:80, weight: 1}}]
endpoints:
  - service: web-primary.default:80
    endpoints: [{{addr: "{primary}"}}]
  - service: shadow.default:80
    endpoints: [{{addr: "{mirror}"}}]
  - service: gone.default:80
    endpoints: [{{addr: "{down}"}}]
"#
    )
}

#[tokio::test]
async fn the_mirror_gets_a_copy_while_the_client_gets_the_primarys_answer() {
    let primary = app("v1").start().await.unwrap();
    // The mirror holds every copy unanswered: the original must not wait for it.
    let mirror = shadow(true).await;
    let down = closed_port().await;
    let p = proxy()
        .outbound(config(primary.addr(), mirror.addr, down))
        .run()
        .unwrap();
    let client = p.client_with_timeout(Duration::from_secs(60));

    let rsp = client
        .put("http://web.default:80/api/items?x=1")
        .header("x-trace", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.text().await.unwrap(), "v1", "the primary answers");
    assert_eventually!(mirror.seen().len() == 1, "mirror saw {:?}", mirror.seen());
    let copy = &mirror.seen()[0];
    assert_eq!(copy.method, "PUT");
    assert_eq!(copy.path, "/api/items");
    assert_eq!(copy.headers["x-trace"], "abc");
    assert_eq!(
        copy.headers["x-added"], "yes",
        "the copy is the request as the rule's filters left it"
    );

    // More requests are answered while every earlier copy is still unanswered.
    for _ in 0..5 {
        let rsp = client.get("http://web.default:80/").send().await.unwrap();
        assert_eq!(rsp.text().await.unwrap(), "v1");
    }
    assert_eventually!(mirror.seen().len() == 6, "mirror saw {:?}", mirror.seen());
    mirror.release.notify_waiters();

    // A request with a body: the copy carries it, with its length.
    let rsp = client
        .post("http://web.default:80/upload")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.text().await.unwrap(), "v1");
    assert_eventually!(mirror.seen().len() == 7, "mirror saw {:?}", mirror.seen());
    let copy = mirror
        .seen()
        .into_iter()
        .find(|c| c.method == "POST")
        .unwrap();
    assert_eq!(copy.path, "/upload");
    assert_eq!(copy.body, "payload");
    assert_eq!(copy.headers["content-length"], "7");
    let skipped = p
        .metric_sum(
            "outbound_http_route_mirror_skipped_total",
            &[r#"route="all""#],
        )
        .await;
    assert!(skipped.abs() < f64::EPSILON, "skipped {skipped}");
}

/// A server that reads each request's body to the end and answers its length.
async fn sink() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let len = req.into_body().collect().await.unwrap().to_bytes().len();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(len.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A server that accepts connections and never reads from them.
async fn deaf() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_large_body_streams_to_the_primary_while_a_mirror_that_stops_reading_is_given_up() {
    let primary = sink().await;
    let (mirror, _held) = deaf().await;
    let down = closed_port().await;
    let p = proxy()
        .outbound(config(primary, mirror, down))
        .run()
        .unwrap();
    let client = p.client_with_timeout(Duration::from_secs(120));
    // 64 MiB, more than the kernel's buffers on both of the mirror's sockets can hold: the
    // copy falls behind, and the original must not wait for it.
    const LEN: usize = 64 * 1024 * 1024;
    let rsp = client
        .post("http://web.default:80/big")
        .body(vec![b'x'; LEN])
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        rsp.text().await.unwrap(),
        LEN.to_string(),
        "the primary read the whole body"
    );
    let sent = p
        .metric_sum(
            "outbound_http_route_mirror_requests_total",
            &[r#"route="all""#],
        )
        .await;
    let skipped = p
        .metric_sum(
            "outbound_http_route_mirror_skipped_total",
            &[r#"route="all""#],
        )
        .await;
    assert!((sent - 1.0).abs() < f64::EPSILON, "sent {sent}");
    assert!((skipped - 1.0).abs() < f64::EPSILON, "given up {skipped}");
}

#[tokio::test]
async fn a_mirror_that_is_down_does_not_fail_the_original() {
    let primary = app("v1").start().await.unwrap();
    let mirror = shadow(false).await;
    let down = closed_port().await;
    let p = proxy()
        .outbound(config(primary.addr(), mirror.addr, down))
        .run()
        .unwrap();
    let client = p.client();
    for _ in 0..20 {
        let rsp = client
            .get("http://web.default:80/down")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.text().await.unwrap(), "v1");
    }
    assert_eq!(primary.hits(), 20);
    let sent = p
        .metric_sum(
            "outbound_http_route_mirror_requests_total",
            &[r#"route="down""#],
        )
        .await;
    assert!((sent - 20.0).abs() < f64::EPSILON, "sent {sent}");
}

#[tokio::test]
async fn a_percent_of_50_mirrors_about_half() {
    let primary = app("v1").start().await.unwrap();
    let mirror = shadow(false).await;
    let down = closed_port().await;
    let p = proxy()
        .outbound(config(primary.addr(), mirror.addr, down))
        .run()
        .unwrap();
    let client = p.client();
    for _ in 0..400 {
        let rsp = client
            .get("http://web.default:80/half")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let sent = p
        .metric_sum(
            "outbound_http_route_mirror_requests_total",
            &[r#"route="half""#],
        )
        .await;
    // Binomial(400, 0.5): sd 10 requests; 60 is 6 sd.
    assert!((140.0..=260.0).contains(&sent), "mirrored {sent} of 400");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let sent = sent as usize;
    assert_eventually!(
        mirror.seen().len() == sent,
        "mirror saw {} of {sent}",
        mirror.seen().len()
    );
    assert_eq!(primary.hits(), 400);
}
