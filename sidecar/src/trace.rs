//! Distributed tracing: trace context in and out of every request, and one span per request on
//! each side, exported over OTLP.
//!
//! - **Propagation.** W3C `traceparent`/`tracestate` and B3, both the single `b3` header and
//!   the multi `X-B3-*` headers. A request keeps the format it came with; a request with no
//!   context gets a W3C `traceparent`.
//! - **Spans.** The outbound side records a client span per attempt, where the golden metrics
//!   are recorded ([`crate::outbound::metrics`]): it knows the route, the backend the split
//!   chose, the endpoint and the peer's identity. The inbound side records a server span per
//!   request, with the caller's verified identity. Each side writes its own span id into the
//!   headers it forwards, so the far side's span is its child: app A's span -> proxy A's client
//!   span -> proxy B's server span -> app B's spans, all under one trace id.
//! - **Sampling** is parent-based: a sampled (or unsampled) flag that comes with the request is
//!   honoured; a request without one is sampled at [`TraceConfig::sampling`], decided once per
//!   request (before retries) and passed on as the flag, so the far side agrees.
//! - **Export** never holds up a request: finished spans go into a bounded queue
//!   ([`QUEUE_CAPACITY`]); a full queue drops the span and counts it in
//!   `trace_spans_dropped_total{reason="queue_full"}`. A task on the proxy's runtime sends
//!   batches with `opentelemetry-otlp`'s OTLP/HTTP (protobuf) exporter over `reqwest`, the
//!   HTTP stack the proxy already has; a batch the collector refuses is counted with
//!   `reason="export_failed"`.
//!
//! Tracing is off unless a collector is configured ([`TraceConfig`], in `mesh_core::trace`);
//! while it is off, [`Tracing`] holds nothing and a request pays one branch for it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
pub use mesh_core::trace::{
    DEFAULT_SAMPLING, ENV_COLLECTOR, ENV_OTEL_ENDPOINT, ENV_SAMPLING, TraceConfig,
};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, oneshot};

/// Finished spans waiting for export; more are dropped (and counted), never waited for.
pub const QUEUE_CAPACITY: usize = 2048;

/// Spans sent in one OTLP request, at most.
pub const MAX_BATCH: usize = 512;

/// How long the first span of a batch waits for others before the batch is sent.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);

/// How long [`Tracing::flush`] waits for the queue to be sent when the proxy stops.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Span attribute keys beyond OpenTelemetry's HTTP conventions (`http.request.method`,
/// `http.response.status_code`, `url.path`, `server.address`, `error.type`).
pub mod attr {
    /// `inbound` or `outbound`.
    pub const DIRECTION: &str = "mesh.direction";
    /// The HTTPRoute rule's name (`default` inbound).
    pub const ROUTE: &str = "mesh.route";
    /// The backend service the split chose (`name.namespace:port`), outbound.
    pub const BACKEND: &str = "mesh.backend";
    /// The endpoint's `ip:port`, outbound.
    pub const ENDPOINT: &str = "mesh.endpoint";
    /// The owner of the endpoint (Linkerd's `dst_deployment`), outbound, when known.
    pub const DST_DEPLOYMENT: &str = "mesh.dst_deployment";
    /// The peer's SPIFFE identity: the server's outbound, the verified caller's inbound.
    pub const PEER_IDENTITY: &str = "mesh.peer.identity";
    /// Whether the request crossed the mesh over mTLS.
    pub const TLS: &str = "mesh.tls";
    /// Where a failure came from: `upstream` (the app answered 5xx) or `mesh` (no answer).
    pub const ERROR: &str = "mesh.error";
}

/// Labels of `trace_spans_dropped_total`: why spans were lost.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct DroppedLabels {
    /// `queue_full` or `export_failed` ([`mesh_core::metrics::DROP_REASONS`]).
    pub reason: &'static str,
}

impl EncodeLabelSet for DroppedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        (mesh_core::metrics::label::REASON, self.reason).encode(encoder.encode_label())
    }
}

/// The proxy's tracing: off (the default), or a handle on the export queue. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tracing(Option<Arc<Tracer>>);

#[derive(Debug)]
struct Tracer {
    sampling: f64,
    spans: mpsc::Sender<SpanData>,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    dropped: Family<DroppedLabels, Counter>,
    scope: InstrumentationScope,
}

/// What the proxy knows about a request's trace: the context it came with (if any) and
/// whether it is sampled. Decided once per request, before retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    trace_id: TraceId,
    /// The caller's span, when the request came with a context.
    parent: Option<SpanId>,
    sampled: bool,
    format: Format,
    /// Whether the context came with the request (then an unsampled request's headers are
    /// left alone).
    incoming: bool,
}

/// The header format a context came in, and goes on in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `traceparent` (and `tracestate`, which is passed on as it came).
    W3c,
    /// The single `b3` header; `short` for a 64-bit trace id.
    B3Single {
        /// The trace id had 16 hex digits.
        short: bool,
    },
    /// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` ...; `short` for a 64-bit trace id.
    B3Multi {
        /// The trace id had 16 hex digits.
        short: bool,
    },
}

/// A context read from headers. `sampled` is `None` when the caller deferred the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extracted {
    /// The trace, when the headers named one (B3 may carry only a sampling decision).
    pub ids: Option<(TraceId, SpanId)>,
    /// The caller's sampling decision.
    pub sampled: Option<bool>,
    /// The format it came in.
    pub format: Format,
}

/// A span being recorded.
#[derive(Debug)]
pub struct Span {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
}

impl Span {
    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push(KeyValue::new(key, value));
    }

    /// The span's id, as the far side sees it as its parent.
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The trace's id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }
}

impl Tracing {
    /// Tracing that records nothing and leaves headers alone.
    pub fn off() -> Self {
        Self(None)
    }

    /// Starts the export task on the current runtime, sending to `config.endpoint` with
    /// `resource` naming the proxy; drops are counted in `dropped`. The task ends when every
    /// handle is dropped.
    pub fn start(
        config: &TraceConfig,
        resource: &Resource,
        dropped: Family<DroppedLabels, Counter>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), String> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.endpoint.clone());
        if let Some(pem) = &config.collector_roots_pem {
            builder = builder.with_http_client(collector_client(pem)?);
        }
        let mut exporter = builder
            .build()
            .map_err(|e| format!("OTLP exporter for {}: {e}", config.endpoint))?;
        exporter.set_resource(resource);
        let (spans_tx, spans_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (flush_tx, flush_rx) = mpsc::channel(1);
        let task = tokio::spawn(export(spans_rx, flush_rx, exporter, dropped.clone()));
        let tracer = Tracer {
            sampling: config.sampling,
            spans: spans_tx,
            flush: flush_tx,
            dropped,
            scope: InstrumentationScope::builder("mesh-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        };
        Ok((Self(Some(Arc::new(tracer))), task))
    }

    /// Whether spans are recorded at all.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The trace decision for a request with `headers`: the context it came with, or a new
    /// trace sampled at the configured rate. `None` when tracing is off.
    pub fn decide(&self, headers: &HeaderMap) -> Option<Decision> {
        let tracer = self.0.as_ref()?;
        let extracted = extract(headers);
        let sample = || tracer.sampling > 0.0 && fastrand::f64() < tracer.sampling;
        Some(match extracted {
            Some(Extracted {
                ids: Some((trace_id, parent)),
                sampled,
                format,
            }) => Decision {
                trace_id,
                parent: Some(parent),
                sampled: sampled.unwrap_or_else(sample),
                format,
                incoming: true,
            },
            // B3 `b3: 1` or `X-B3-Sampled: 0` alone: the decision, for a new trace.
            Some(Extracted {
                ids: None,
                sampled,
                format,
            }) => Decision {
                trace_id: new_trace_id(),
                parent: None,
                sampled: sampled.unwrap_or_else(sample),
                format,
                incoming: false,
            },
            None => Decision {
                trace_id: new_trace_id(),
                parent: None,
                sampled: sample(),
                format: Format::W3c,
                incoming: false,
            },
        })
    }

    /// Starts a span of `kind` under `decision` and writes its context into `headers` (what
    /// goes on to the far side), or, for an unsampled request, passes the decision on. `None`
    /// when the request is not sampled.
    pub fn span(
        &self,
        decision: &Decision,
        kind: SpanKind,
        name: impl Into<Cow<'static, str>>,
        headers: &mut HeaderMap,
    ) -> Option<Span> {
        if !decision.sampled {
            // A context that came with the request goes on untouched; a new one is passed on
            // as unsampled, so the far side does not sample the trace on its own.
            if !decision.incoming {
                inject(headers, decision, new_span_id(), false);
            }
            return None;
        }
        let span_id = new_span_id();
        inject(headers, decision, span_id, true);
        Some(Span {
            trace_id: decision.trace_id,
            span_id,
            parent: decision.parent,
            kind,
            name: name.into(),
            start: SystemTime::now(),
            attributes: Vec::with_capacity(12),
        })
    }

    /// Ends `span` with an HTTP status (`None`: no answer, a mesh error) and queues it for
    /// export; a full queue drops it.
    pub fn end(&self, mut span: Span, status: Option<u16>, error: &'static str) {
        let Some(tracer) = &self.0 else { return };
        let failed = status.is_none_or(|s| s >= 500) || !error.is_empty();
        if let Some(status) = status {
            span.set("http.response.status_code", i64::from(status));
        }
        if !error.is_empty() {
            span.set(attr::ERROR, error);
            span.set(
                "error.type",
                status.map_or_else(|| "no_response".to_string(), |s| s.to_string()),
            );
        }
        let data = SpanData {
            span_context: SpanContext::new(
                span.trace_id,
                span.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: span.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed {
                Status::error(error)
            } else {
                Status::Unset
            },
            instrumentation_scope: tracer.scope.clone(),
        };
        if tracer.spans.try_send(data).is_err() {
            tracer
                .dropped
                .get_or_create(&DroppedLabels {
                    reason: mesh_core::metrics::DROP_QUEUE_FULL,
                })
                .inc();
        }
    }

    /// Sends what is queued now, waiting at most [`FLUSH_TIMEOUT`]: the proxy calls it when it
    /// stops, so the last requests' spans are not lost.
    pub async fn flush(&self) {
        let Some(tracer) = &self.0 else { return };
        let (tx, rx) = oneshot::channel();
        if tracer.flush.send(tx).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, rx).await;
        }
    }
}

/// The exporter's HTTP client when the collector's CA is given: the system's roots plus those
/// in `pem`, with the timeout the exporter's own client would have (OpenTelemetry's
/// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` in milliseconds, else 10 s).
fn collector_client(pem: &str) -> Result<reqwest::Client, String> {
    let roots = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("the collector's CA certificates: {e}"))?;
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis);
    reqwest::Client::builder()
        .tls_certs_merge(roots)
        .timeout(timeout)
        .build()
        .map_err(|e| format!("the collector's HTTP client: {e}"))
}

/// The export task: batches of up to [`MAX_BATCH`] spans, each sent [`BATCH_DELAY`] after its
/// first span arrived, or at once when asked to flush.
async fn export(
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    exporter: opentelemetry_otlp::SpanExporter,
    dropped: Family<DroppedLabels, Counter>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let flush = tokio::select! {
            n = spans.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                let delay = tokio::time::sleep(BATCH_DELAY);
                tokio::pin!(delay);
                let mut flush = None;
                while batch.len() < MAX_BATCH {
                    let room = MAX_BATCH - batch.len();
                    tokio::select! {
                        n = spans.recv_many(&mut batch, room) => {
                            if n == 0 { break }
                        }
                        () = &mut delay => break,
                        f = flushes.recv() => { flush = f; break }
                    }
                }
                send(&exporter, &mut batch, &dropped).await;
                flush
            }
            f = flushes.recv() => match f {
                Some(f) => Some(f),
                None => return,
            },
        };
        if let Some(done) = flush {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
                if batch.len() == MAX_BATCH {
                    send(&exporter, &mut batch, &dropped).await;
                }
            }
            send(&exporter, &mut batch, &dropped).await;
            let _ = done.send(());
        }
    }
}

/// Sends `batch` (emptying it); a failure drops the spans, counted.
async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    dropped: &Family<DroppedLabels, Counter>,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    if let Err(error) = exporter.export(std::mem::take(batch)).await {
        tracing::debug!(%error, spans = n, "exporting spans failed; dropped");
        dropped
            .get_or_create(&DroppedLabels {
                reason: mesh_core::metrics::DROP_EXPORT_FAILED,
            })
            .inc_by(n);
    }
}

fn new_trace_id() -> TraceId {
    TraceId::from_bytes(fastrand::u128(1..).to_be_bytes())
}

fn new_span_id() -> SpanId {
    SpanId::from_bytes(fastrand::u64(1..).to_be_bytes())
}

/// The trace context in `headers`: `traceparent` first, then `b3`, then `X-B3-*`. Malformed
/// headers count as absent.
pub fn extract(headers: &HeaderMap) -> Option<Extracted> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(e) = text(&TRACEPARENT).and_then(parse_traceparent) {
        return Some(e);
    }
    if let Some(e) = text(&B3).and_then(parse_b3_single) {
        return Some(e);
    }
    parse_b3_multi(
        text(&B3_TRACE_ID),
        text(&B3_SPAN_ID),
        text(&B3_SAMPLED),
        text(&B3_FLAGS),
    )
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; later versions may append fields.
fn parse_traceparent(value: &str) -> Option<Extracted> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || !is_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && (parts.next().is_some() || value.len() != 55) {
        return None;
    }
    if flags.len() != 2 || !is_hex(flags) {
        return None;
    }
    let ids = ids(trace, 32, span)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Extracted {
        ids: Some(ids),
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// `<trace id>-<span id>[-<sampling>[-<parent id>]]`, or the sampling state alone (`0`, `1`,
/// `d`).
fn parse_b3_single(value: &str) -> Option<Extracted> {
    let value = value.trim();
    let sampling = |s: &str| match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    };
    let mut parts = value.split('-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        return Some(Extracted {
            ids: None,
            sampled: sampling(first)?,
            format: Format::B3Single { short: false },
        });
    };
    let short = first.len() == 16;
    let ids = ids(first, if short { 16 } else { 32 }, span)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => sampling(s)?,
    };
    if let Some(parent) = parts.next()
        && (parent.len() != 16 || !is_hex(parent) || parts.next().is_some())
    {
        return None;
    }
    Some(Extracted {
        ids: Some(ids),
        sampled,
        format: Format::B3Single { short },
    })
}

/// `X-B3-TraceId` and `X-B3-SpanId` (both or neither), `X-B3-Sampled` (`1`/`0`, or
/// `true`/`false` from old tracers), `X-B3-Flags: 1` (debug, sampled).
fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<Extracted> {
    let sampled = match (flags.map(str::trim), sampled.map(str::trim)) {
        (Some("1"), _) => Some(true),
        (_, Some("1" | "true")) => Some(true),
        (_, Some("0" | "false")) => Some(false),
        (_, Some(_)) => return None,
        _ => None,
    };
    match (trace.map(str::trim), span.map(str::trim)) {
        (Some(trace), Some(span)) => {
            let short = trace.len() == 16;
            Some(Extracted {
                ids: Some(ids(trace, if short { 16 } else { 32 }, span)?),
                sampled,
                format: Format::B3Multi { short },
            })
        }
        (None, None) => sampled.map(|s| Extracted {
            ids: None,
            sampled: Some(s),
            format: Format::B3Multi { short: false },
        }),
        _ => None,
    }
}

/// A trace id of `trace_len` hex digits (a 64-bit one is widened with zeros) and a 16-digit
/// span id, neither all zeros.
fn ids(trace: &str, trace_len: usize, span: &str) -> Option<(TraceId, SpanId)> {
    if trace.len() != trace_len || !is_hex(trace) || span.len() != 16 || !is_hex(span) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some((trace_id, span_id))
}

fn is_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes the context (trace, this hop's span, the sampling flag) in the decision's format.
fn inject(headers: &mut HeaderMap, decision: &Decision, span_id: SpanId, sampled: bool) {
    let trace = |short: bool| {
        let hex = decision.trace_id.to_string();
        if short { hex[16..].to_string() } else { hex }
    };
    let flag = if sampled { "1" } else { "0" };
    match decision.format {
        Format::W3c => {
            let flags = if sampled { "01" } else { "00" };
            let value = format!("00-{}-{span_id}-{flags}", decision.trace_id);
            put(headers, TRACEPARENT, &value);
        }
        Format::B3Single { short } => {
            put(headers, B3, &format!("{}-{span_id}-{flag}", trace(short)));
        }
        Format::B3Multi { short } => {
            put(headers, B3_TRACE_ID, &trace(short));
            put(headers, B3_SPAN_ID, &span_id.to_string());
            match decision.parent {
                Some(parent) => put(headers, B3_PARENT_SPAN_ID, &parent.to_string()),
                None => {
                    headers.remove(B3_PARENT_SPAN_ID);
                }
            }
            headers.remove(B3_FLAGS);
            headers.insert(B3_SAMPLED, HeaderValue::from_static(flag));
        }
    }
}

/// Sets a header; every value written here is hex digits and dashes.
fn put(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn ids(trace: &str, span: &str) -> Option<(TraceId, SpanId)> {
        Some((
            TraceId::from_hex(trace).unwrap(),
            SpanId::from_hex(span).unwrap(),
        ))
    }

    /// Tracing on, at `sampling`, with the queue's receiving end kept (and never read) by the
    /// test: spans stay queued, so a full queue can be seen.
    fn tracing(sampling: f64, capacity: usize) -> (Tracing, mpsc::Receiver<SpanData>) {
        let (spans, rx) = mpsc::channel(capacity);
        let (flush, _) = mpsc::channel(1);
        let tracer = Tracer {
            sampling,
            spans,
            flush,
            dropped: Family::default(),
            scope: InstrumentationScope::builder("test").build(),
        };
        (Tracing(Some(Arc::new(tracer))), rx)
    }

    #[test]
    fn w3c_traceparent_is_read_with_its_sampled_flag() {
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let e = extract(&h).unwrap();
        assert_eq!(e.ids, ids(TRACE, SPAN));
        assert_eq!(e.sampled, Some(true));
        assert_eq!(e.format, Format::W3c);
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert_eq!(extract(&h).unwrap().sampled, Some(false));
        // A later version may append fields.
        let h = headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-extra"))]);
        assert_eq!(extract(&h).unwrap().ids, ids(TRACE, SPAN));
    }

    #[test]
    fn malformed_contexts_count_as_absent() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{TRACE}x-{SPAN}-01"),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
        }
        for bad in ["x", &format!("{TRACE}-{SPAN}-2"), &format!("{TRACE}-abc")] {
            assert_eq!(extract(&headers(&[("b3", bad)])), None, "{bad}");
        }
        // A trace id without a span id.
        assert_eq!(extract(&headers(&[("x-b3-traceid", TRACE)])), None);
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let e = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-1-{SPAN}"))])).unwrap();
        assert_eq!(e.ids, ids(TRACE, SPAN));
        assert_eq!(e.sampled, Some(true));
        assert_eq!(e.format, Format::B3Single { short: false });
        // Deferred, and a 64-bit trace id widened with zeros.
        let e = extract(&headers(&[("b3", &format!("{}-{SPAN}", &TRACE[16..]))])).unwrap();
        assert_eq!(e.ids, ids(&format!("{:0>32}", &TRACE[16..]), SPAN));
        assert_eq!(e.sampled, None);
        assert_eq!(e.format, Format::B3Single { short: true });
        // The decision alone.
        let e = extract(&headers(&[("b3", "0")])).unwrap();
        assert_eq!((e.ids, e.sampled), (None, Some(false)));
        let e = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "true"),
        ]))
        .unwrap();
        assert_eq!(e.ids, ids(TRACE, SPAN));
        assert_eq!(e.sampled, Some(true));
        assert_eq!(e.format, Format::B3Multi { short: false });
        let e = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        assert_eq!(e.sampled, Some(true), "debug means sampled");
        // traceparent wins over B3.
        let e = extract(&headers(&[
            ("b3", "0"),
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
        ]))
        .unwrap();
        assert_eq!(e.format, Format::W3c);
    }

    #[test]
    fn an_incoming_sampling_decision_is_honoured_whatever_the_rate() {
        let (never, _rx) = tracing(0.0, 8);
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        assert!(never.decide(&h).unwrap().sampled);
        let (always, _rx) = tracing(1.0, 8);
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert!(!always.decide(&h).unwrap().sampled);
        // Without a decision, the rate decides.
        assert!(always.decide(&HeaderMap::new()).unwrap().sampled);
        assert!(!never.decide(&HeaderMap::new()).unwrap().sampled);
        let h = headers(&[("b3", &format!("{TRACE}-{SPAN}"))]);
        assert!(always.decide(&h).unwrap().sampled);
        assert!(!never.decide(&h).unwrap().sampled);
        assert_eq!(Tracing::off().decide(&h), None);
    }

    #[test]
    fn a_span_is_the_child_of_the_incoming_context_and_the_parent_of_what_goes_on() {
        let (t, _rx) = tracing(1.0, 8);
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "a=1"),
        ]);
        let d = t.decide(&h).unwrap();
        let span = t.span(&d, SpanKind::Client, "GET", &mut h).unwrap();
        assert_eq!(span.trace_id().to_string(), TRACE);
        assert_eq!(span.parent, Some(SpanId::from_hex(SPAN).unwrap()));
        assert_eq!(
            h["traceparent"],
            format!("00-{TRACE}-{}-01", span.span_id())
        );
        assert_eq!(h["tracestate"], "a=1");

        // B3 goes on as B3, keeping a 64-bit trace id 64-bit.
        let short = &TRACE[16..];
        let mut h = headers(&[
            ("x-b3-traceid", short),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        let d = t.decide(&h).unwrap();
        let span = t.span(&d, SpanKind::Server, "GET", &mut h).unwrap();
        assert_eq!(h["x-b3-traceid"], short);
        assert_eq!(h["x-b3-spanid"], span.span_id().to_string());
        assert_eq!(h["x-b3-parentspanid"], SPAN);
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(h.get("x-b3-flags").is_none());
        assert!(h.get("traceparent").is_none());
    }

    #[test]
    fn an_unsampled_request_passes_its_context_on_untouched_and_a_new_one_as_unsampled() {
        let (t, _rx) = tracing(0.0, 8);
        let incoming = format!("00-{TRACE}-{SPAN}-00");
        let mut h = headers(&[("traceparent", &incoming)]);
        let d = t.decide(&h).unwrap();
        assert!(t.span(&d, SpanKind::Client, "GET", &mut h).is_none());
        assert_eq!(h["traceparent"], incoming.as_str());
        let mut h = HeaderMap::new();
        let d = t.decide(&h).unwrap();
        assert!(t.span(&d, SpanKind::Client, "GET", &mut h).is_none());
        let value = h["traceparent"].to_str().unwrap();
        assert!(value.ends_with("-00"), "{value}");
        assert!(parse_traceparent(value).is_some(), "{value}");
    }

    #[test]
    fn a_full_queue_drops_spans_and_counts_them_without_waiting() {
        let (t, mut rx) = tracing(1.0, 2);
        for _ in 0..5 {
            let mut h = HeaderMap::new();
            let d = t.decide(&h).unwrap();
            let span = t.span(&d, SpanKind::Client, "GET", &mut h).unwrap();
            t.end(span, Some(200), "");
        }
        let dropped = t.0.as_ref().unwrap().dropped.clone();
        let queue_full = DroppedLabels {
            reason: mesh_core::metrics::DROP_QUEUE_FULL,
        };
        assert_eq!(dropped.get_or_create(&queue_full).get(), 3);
        let queued = rx.try_recv().unwrap();
        assert_eq!(queued.span_kind, SpanKind::Client);
        assert_eq!(queued.status, Status::Unset);
        assert!(
            queued
                .attributes
                .contains(&KeyValue::new("http.response.status_code", 200_i64))
        );
    }

    #[test]
    fn a_failure_marks_the_span_as_an_error() {
        let (t, mut rx) = tracing(1.0, 2);
        let mut h = HeaderMap::new();
        let d = t.decide(&h).unwrap();
        let span = t.span(&d, SpanKind::Client, "GET", &mut h).unwrap();
        t.end(span, None, "mesh");
        let data = rx.try_recv().unwrap();
        assert!(matches!(data.status, Status::Error { .. }), "{data:?}");
        assert!(
            data.attributes
                .contains(&KeyValue::new(attr::ERROR, "mesh"))
        );
    }
}
