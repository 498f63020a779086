//! Tracing through two real proxies, checked at a real OTLP receiver: Jaeger v2 built from its
//! Go module (`MESH_JAEGER`, which `scripts/test` builds; without it the tests skip, and fail
//! under `CI=true`).
//!
//! - Over mTLS (a real control plane certifies both proxies): a request that brings a W3C
//!   context keeps its trace id; the client proxy's span is the child of the caller's span, the
//!   server proxy's span the child of the client proxy's, and the app is handed the server
//!   span as its parent. The spans carry the route, the backend, the endpoint, the status and
//!   both identities. A request without a context starts a trace; an unsampled one is passed on
//!   untouched and never exported.
//! - Over a static split: the backend the split chose, and both B3 formats.
//! - With tracing off, headers pass through untouched and nothing is added.
//! - A collector that cannot be reached costs the spans (counted), never a request.
//!
//! The control plane binary is found beside the test executable; build it first with
//! `cargo build -p mesh-controlplane --bins` (same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use mesh_core::trace::ENV_OTEL_CERTIFICATE;
use mesh_sidecar::trace::{ENV_COLLECTOR, ENV_SAMPLING};
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::certs::{Leaf, TestCa};
use mesh_test_support::jaeger::{self, Jaeger, StoredSpan};
use mesh_test_support::mesh::{CLIENT_ID, SERVER_ID, SERVICE, mesh_pair};
use mesh_test_support::proxies::{Sidecar, proxy, split_config};

/// A GET for `web.default:80` through the outbound listener at `outbound`, with `headers`;
/// the answer's headers.
async fn get(outbound: SocketAddr, headers: &[(&str, &str)]) -> reqwest::header::HeaderMap {
    let mut req = mesh_test_support::http_client()
        .get(format!("http://{outbound}/hello"))
        .header("host", SERVICE);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = req.send().await.unwrap();
    assert_eq!(rsp.status(), 200, "{:?}", rsp.headers());
    rsp.headers().clone()
}

/// What the app saw of header `name`.
fn seen(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(format!("x-seen-{name}"))
        .map(|v| v.to_str().unwrap().to_string())
}

/// The trace's spans, once Jaeger holds `n` of them.
async fn stored(jaeger: &Jaeger, trace_id: &str, n: usize) -> Vec<StoredSpan> {
    let mut spans: Vec<StoredSpan>;
    assert_eventually!(
        {
            spans = jaeger.trace(trace_id).await.unwrap();
            spans.len() >= n
        },
        "trace {trace_id} has {} of {n} spans: {spans:#?}\n{}",
        spans.len(),
        jaeger.log_tail(20)
    );
    assert_eq!(spans.len(), n, "{spans:#?}");
    spans
}

/// The span of `kind` (`client` or `server`).
fn kind<'a>(spans: &'a [StoredSpan], kind: &str) -> &'a StoredSpan {
    spans
        .iter()
        .find(|s| s.tag("span.kind").as_deref() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} span in {spans:#?}"))
}

/// The parts of a `traceparent`: trace id, parent id, flags.
fn traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn a_request_through_two_proxies_yields_linked_spans_at_jaeger() {
    let Some(bin) = jaeger::binary() else { return };
    let jaeger = Jaeger::start(&bin).await.unwrap();
    let web = app("v1").await.unwrap();
    let pair = mesh_pair(web.addr())
        .proxy_env(ENV_COLLECTOR, jaeger.otlp_url())
        .proxy_env(ENV_SAMPLING, "1")
        .run()
        .await
        .unwrap();
    let outbound = pair.client_outbound();
    let inbound = pair.server.addr("inbound");

    // An unsampled context first: it goes on untouched and is never exported. The sampled
    // requests after it are exported after it (one queue, in order), so once they are in
    // Jaeger, so would it be.
    let unsampled_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let unsampled = format!("00-{unsampled_trace}-00f067aa0ba902b8-00");
    let rsp = get(outbound, &[("traceparent", &unsampled)]).await;
    assert_eq!(
        seen(&rsp, "traceparent").as_deref(),
        Some(unsampled.as_str())
    );

    // The caller's own context is kept: its trace id, and its span as the client span's parent.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let rsp = get(
        outbound,
        &[
            ("traceparent", &format!("00-{trace_id}-{caller_span}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    let (app_trace, app_parent, flags) = traceparent(&seen(&rsp, "traceparent").unwrap());
    assert_eq!(app_trace, trace_id);
    assert_eq!(flags, "01");
    assert_eq!(seen(&rsp, "tracestate").as_deref(), Some("vendor=opaque"));

    let spans = stored(&jaeger, trace_id, 2).await;
    let client = kind(&spans, "client");
    let server = kind(&spans, "server");
    eprintln!("as Jaeger stored them:\n{client:#?}\n{server:#?}");
    assert_eq!(client.parent.as_deref(), Some(caller_span), "{spans:#?}");
    assert_eq!(server.parent.as_ref(), Some(&client.span_id), "{spans:#?}");
    assert_eq!(
        app_parent, server.span_id,
        "the app's parent is the server span"
    );
    for s in [client, server] {
        assert_eq!(s.trace_id, trace_id);
        assert_eq!(s.tag("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.tag("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.tag("url.path").as_deref(), Some("/hello"));
        assert_eq!(s.tag("mesh.route").as_deref(), Some("default"));
        assert_eq!(s.tag("mesh.tls").as_deref(), Some("true"));
    }
    assert_eq!(client.tag("mesh.direction").as_deref(), Some("outbound"));
    assert_eq!(client.tag("mesh.backend").as_deref(), Some(SERVICE));
    assert_eq!(
        client.tag("mesh.endpoint"),
        Some(inbound.to_string()),
        "{client:#?}"
    );
    assert_eq!(client.tag("mesh.peer.identity").as_deref(), Some(SERVER_ID));
    assert_eq!(server.tag("mesh.direction").as_deref(), Some("inbound"));
    assert_eq!(server.tag("mesh.peer.identity").as_deref(), Some(CLIENT_ID));
    assert_eq!(server.service, "web", "named by the workload's service");

    // No context: the client proxy starts a trace, and the server proxy joins it.
    let rsp = get(outbound, &[]).await;
    let (new_trace, app_parent, flags) = traceparent(&seen(&rsp, "traceparent").unwrap());
    assert_eq!(flags, "01");
    let spans = stored(&jaeger, &new_trace, 2).await;
    let client = kind(&spans, "client");
    let server = kind(&spans, "server");
    assert_eq!(client.parent, None, "a new trace's first span is its root");
    assert_eq!(server.parent.as_ref(), Some(&client.span_id));
    assert_eq!(app_parent, server.span_id);

    assert!(
        jaeger.trace(unsampled_trace).await.unwrap().is_empty(),
        "an unsampled request was exported"
    );
    // Nothing was dropped on the way.
    for p in [&pair.client, &pair.server] {
        let metrics = p.metrics().await;
        assert!(!metrics.contains("trace_spans_dropped_total{"), "{metrics}");
    }
}

/// Proxy A routes `web.default:80` by a split whose only backend is `web-canary`, at proxy B's
/// inbound listener.
fn split(inbound: SocketAddr) -> String {
    split_config("127.0.0.1:9", inbound, (0, 1))
}

#[tokio::test]
async fn spans_name_the_backend_the_split_chose_and_b3_contexts_are_kept() {
    let Some(bin) = jaeger::binary() else { return };
    let jaeger = Jaeger::start(&bin).await.unwrap();
    let web = app("v1").await.unwrap();
    let b = proxy()
        .app(web.addr())
        .service("web-canary.default:80")
        .env(ENV_COLLECTOR, jaeger.otlp_addr().to_string())
        .run()
        .unwrap();
    let a = proxy()
        .outbound(split(b.addr("inbound")))
        .env(ENV_COLLECTOR, jaeger.otlp_url())
        .run()
        .unwrap();
    let outbound = a.addr("outbound");

    // B3 multi, with a 64-bit trace id: it stays 64-bit on the wire, and Jaeger stores it
    // widened.
    let short = "a3ce929d0e0e4736";
    let rsp = get(
        outbound,
        &[
            ("x-b3-traceid", short),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(seen(&rsp, "x-b3-traceid").as_deref(), Some(short));
    assert_eq!(seen(&rsp, "x-b3-sampled").as_deref(), Some("1"));
    assert_eq!(
        seen(&rsp, "traceparent"),
        None,
        "the format it came in is kept"
    );
    let long = format!("0000000000000000{short}");
    let spans = stored(&jaeger, &long, 2).await;
    let client = kind(&spans, "client");
    let server = kind(&spans, "server");
    assert_eq!(client.parent.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(server.parent.as_ref(), Some(&client.span_id));
    assert_eq!(seen(&rsp, "x-b3-spanid"), Some(server.span_id.clone()));
    assert_eq!(
        seen(&rsp, "x-b3-parentspanid"),
        Some(client.span_id.clone())
    );
    assert_eq!(client.tag("mesh.route").as_deref(), Some("split"));
    assert_eq!(
        client.tag("mesh.backend").as_deref(),
        Some("web-canary.default:80")
    );
    assert_eq!(
        client.tag("mesh.endpoint"),
        Some(b.addr("inbound").to_string())
    );
    assert_eq!(client.tag("mesh.tls").as_deref(), Some("false"));
    assert_eq!(client.tag("mesh.peer.identity"), None);
    assert_eq!(server.service, "web-canary");

    // B3 single.
    let trace_id = "80f198ee56343ba864fe8b2a57d3eff7";
    let rsp = get(
        outbound,
        &[("b3", &format!("{trace_id}-e457b5a2e4d86bd1-1"))],
    )
    .await;
    let spans = stored(&jaeger, trace_id, 2).await;
    let client = kind(&spans, "client");
    let server = kind(&spans, "server");
    assert_eq!(client.parent.as_deref(), Some("e457b5a2e4d86bd1"));
    assert_eq!(server.parent.as_ref(), Some(&client.span_id));
    assert_eq!(
        seen(&rsp, "b3"),
        Some(format!("{trace_id}-{}-1", server.span_id))
    );
}

#[tokio::test]
async fn with_tracing_off_headers_pass_through_untouched() {
    let web = app("v1").await.unwrap();
    let b = proxy()
        .app(web.addr())
        .service("web-canary.default:80")
        .run()
        .unwrap();
    let a = proxy().outbound(split(b.addr("inbound"))).run().unwrap();
    let outbound = a.addr("outbound");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
    let rsp = get(
        outbound,
        &[
            ("traceparent", traceparent),
            ("tracestate", "vendor=opaque"),
            ("b3", b3),
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ],
    )
    .await;
    assert_eq!(seen(&rsp, "traceparent").as_deref(), Some(traceparent));
    assert_eq!(seen(&rsp, "tracestate").as_deref(), Some("vendor=opaque"));
    assert_eq!(seen(&rsp, "b3").as_deref(), Some(b3));
    assert_eq!(
        seen(&rsp, "x-b3-traceid").as_deref(),
        Some("a3ce929d0e0e4736")
    );
    assert_eq!(
        seen(&rsp, "x-b3-spanid").as_deref(),
        Some("00f067aa0ba902b7")
    );
    // Nothing is added to a request without a context.
    let rsp = get(outbound, &[]).await;
    for name in mesh_test_support::apps::TRACE_HEADERS {
        assert_eq!(seen(&rsp, name), None, "{name} was added");
    }
}

#[tokio::test]
async fn a_collector_that_cannot_be_reached_costs_spans_never_requests() {
    // Nothing listens on this port: every export fails.
    let closed = mesh_test_support::ports::free_port().unwrap();
    let web = app("v1").await.unwrap();
    let b = proxy()
        .app(web.addr())
        .service("web-canary.default:80")
        .run()
        .unwrap();
    let a = proxy()
        .outbound(split(b.addr("inbound")))
        .env(ENV_COLLECTOR, format!("127.0.0.1:{closed}"))
        .run()
        .unwrap();
    every_span_fails_to_export(&a, 20).await;
}

/// Sends `n` requests through `proxy` and waits until all `n` of their spans are counted as
/// export failures.
async fn every_span_fails_to_export(proxy: &impl Sidecar, n: usize) {
    for _ in 0..n {
        get(proxy.addr("outbound"), &[]).await;
    }
    let failed = format!(r#"trace_spans_dropped_total{{reason="export_failed"}} {n}"#);
    let mut metrics: String;
    assert_eventually!(
        {
            metrics = proxy.metrics().await;
            metrics.contains(&failed)
        },
        "{metrics}"
    );
}

#[tokio::test]
async fn an_https_collector_is_verified_with_the_ca_it_is_given() {
    let Some(bin) = jaeger::binary() else { return };
    let ca = TestCa::new("mesh-test-collector-ca").unwrap();
    let serving = ca
        .issue(&Leaf::new("collector").san("127.0.0.1").server())
        .unwrap();
    let jaeger = Jaeger::start_tls(&bin, &serving.cert_pem, &serving.key_pem)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("collector-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let web = app("v1").await.unwrap();
    let b = proxy()
        .app(web.addr())
        .service("web-canary.default:80")
        .run()
        .unwrap();

    // Given the collector's CA, the proxy's spans arrive over HTTPS.
    let trusting = proxy()
        .outbound(split(b.addr("inbound")))
        .env(ENV_COLLECTOR, jaeger.otlp_https_url())
        .env(ENV_OTEL_CERTIFICATE, ca_file.to_str().unwrap())
        .run()
        .unwrap();
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4738";
    get(
        trusting.addr("outbound"),
        &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b9-01"))],
    )
    .await;
    let spans = stored(&jaeger, trace_id, 1).await;
    assert_eq!(spans[0].tag("span.kind").as_deref(), Some("client"));

    // Without it, the collector's certificate is not trusted: nothing is sent, and every span
    // is counted as an export failure.
    let doubting = proxy()
        .outbound(split(b.addr("inbound")))
        .env(ENV_COLLECTOR, jaeger.otlp_https_url())
        .run()
        .unwrap();
    every_span_fails_to_export(&doubting, 5).await;
}
