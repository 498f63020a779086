//! Tracing in the embedded mesh, as a user turns it on: `mesh up -f examples/mesh.yaml
//! --trace-collector ...` against Jaeger v2 built from its Go module (`MESH_JAEGER`, which
//! `scripts/test` builds; the test skips without it, and fails under `CI=true`). The example's
//! load generator calls frontend, which calls backend (the demo app carries the trace context
//! on), so one request is one trace of four spans across three workloads' sidecars, linked
//! parent to child, each hop over mTLS with both identities.
//!
//! Needs the workspace's binaries built (`cargo build -p mesh-cli -p mesh-sidecar -p mesh-demo
//! --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use mesh_test_support::assert_eventually;
use mesh_test_support::jaeger::{self, Jaeger, StoredSpan};
use mesh_test_support::mesh::mesh_up;

const ID: &str = "spiffe://cluster.local/ns/default/sa/";

/// The first trace of `spans.len() == 4` Jaeger holds for the load generator.
async fn a_whole_trace(jaeger: &Jaeger) -> Option<Vec<StoredSpan>> {
    for id in jaeger.trace_ids("loadgen-primary").await.ok()? {
        let spans = jaeger.trace(&id).await.ok()?;
        if spans.len() == 4 {
            return Some(spans);
        }
    }
    None
}

/// The one span of `service` and `kind` in `spans`.
fn span<'a>(spans: &'a [StoredSpan], service: &str, kind: &str) -> &'a StoredSpan {
    let found: Vec<&StoredSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.tag("span.kind").as_deref() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "{service} {kind} in {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn mesh_up_traces_a_request_across_three_workloads() {
    let Some(bin) = jaeger::binary() else { return };
    let jaeger = Jaeger::start(&bin).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml");
    let mut mesh = mesh_up(
        state.path(),
        &file,
        &["--trace-collector", &jaeger.otlp_url()],
    )
    .unwrap();

    let mut spans: Option<Vec<StoredSpan>>;
    assert_eventually!(
        {
            spans = a_whole_trace(&jaeger).await;
            spans.is_some()
        },
        "no four-span trace from loadgen yet\n{}",
        jaeger.log_tail(20)
    );
    let spans = spans.unwrap();
    let trace_id = &spans[0].trace_id;
    assert!(spans.iter().all(|s| &s.trace_id == trace_id), "{spans:#?}");

    let loadgen = span(&spans, "loadgen-primary", "client");
    let frontend_in = span(&spans, "frontend-primary", "server");
    let frontend_out = span(&spans, "frontend-primary", "client");
    let backend_in = span(&spans, "backend-primary", "server");
    assert_eq!(loadgen.parent, None, "the load generator starts the trace");
    assert_eq!(frontend_in.parent.as_ref(), Some(&loadgen.span_id));
    assert_eq!(frontend_out.parent.as_ref(), Some(&frontend_in.span_id));
    assert_eq!(backend_in.parent.as_ref(), Some(&frontend_out.span_id));

    assert_eq!(
        loadgen.tag("mesh.backend").as_deref(),
        Some("frontend-primary.default:8080")
    );
    assert_eq!(
        frontend_out.tag("mesh.backend").as_deref(),
        Some("backend-primary.default:9898")
    );
    assert_eq!(
        loadgen.tag("mesh.peer.identity"),
        Some(format!("{ID}frontend"))
    );
    assert_eq!(
        frontend_in.tag("mesh.peer.identity"),
        Some(format!("{ID}loadgen"))
    );
    assert_eq!(
        frontend_out.tag("mesh.peer.identity"),
        Some(format!("{ID}backend"))
    );
    assert_eq!(
        backend_in.tag("mesh.peer.identity"),
        Some(format!("{ID}frontend"))
    );
    for s in &spans {
        assert_eq!(s.tag("mesh.tls").as_deref(), Some("true"), "{s:#?}");
        assert_eq!(s.tag("http.response.status_code").as_deref(), Some("200"));
    }
    mesh.child().terminate();
}
