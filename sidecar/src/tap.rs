//! Tap: live requests as the proxy carries them, served on the admin port (`GET /tap`) to an
//! authorized caller as newline-delimited JSON, one line per request (outbound: per attempt,
//! with the backend the split chose and the endpoint's identity; inbound: per request, with the
//! caller's identity).
//!
//! Tap is sensitive, so what it shows is bounded by design: never a body, and header values only
//! for the names on [`HEADER_ALLOWLIST`]. It is also free when nobody taps: the request path
//! asks [`Tap::active`], one relaxed atomic load, and builds nothing more unless a tap is open.
//! Events go through a bounded broadcast channel; a tap that reads too slowly loses events (and
//! is told how many), the proxy never waits for it.
//!
//! Who may tap is decided by a bearer token the proxy reads from a file
//! ([`crate::config::ENV_TAP_TOKEN_FILE`]) at each tap request: in the embedded mesh it is the
//! control plane's resource API token, so only a holder of that token (the control plane, or
//! `mesh tap` through it) can tap. In a cluster the proxy holds only the SHA-256 of the control
//! plane's tap token ([`crate::config::ENV_TAP_TOKEN_SHA256`], set by the injector), and admits
//! a token that hashes to it; the control plane authorizes users itself. With neither, tap is
//! off and every tap is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Uri};
use serde::Serialize;
use tokio::sync::broadcast;

/// Request headers whose values tap shows; every other header is left out, name and value.
/// None of these carries a credential or a body.
pub const HEADER_ALLOWLIST: &[&str] = &[
    "content-type",
    "content-length",
    "user-agent",
    "x-request-id",
    "traceparent",
    "grpc-timeout",
];

/// Events a slow tap may fall behind by before it loses some.
const BUFFER: usize = 4096;

/// The proxy's tap: where the request path publishes and the admin server subscribes.
#[derive(Clone, Debug)]
pub struct Tap {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Open taps; the request path reads only this while it is zero.
    watchers: AtomicUsize,
    events: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                watchers: AtomicUsize::new(0),
                events: broadcast::channel(BUFFER).0,
            }),
        }
    }
}

impl Tap {
    /// Whether anyone taps now: the only cost tap adds to a request nobody watches.
    #[inline]
    pub fn active(&self) -> bool {
        self.inner.watchers.load(Ordering::Relaxed) != 0
    }

    /// Hands `event` to every open tap.
    pub fn publish(&self, event: TapEvent) {
        // No receiver (the last tap closed meanwhile) is not an error.
        let _ = self.inner.events.send(Arc::new(event));
    }

    /// Opens a tap; it stays open (and [`Tap::active`] true) until the [`Watch`] is dropped.
    pub fn watch(&self) -> Watch {
        // Subscribe before counting, so the first event published after `active` turns true
        // reaches this receiver.
        let rx = self.inner.events.subscribe();
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        Watch {
            rx,
            tap: self.inner.clone(),
        }
    }
}

/// One open tap.
#[derive(Debug)]
pub struct Watch {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    tap: Arc<Inner>,
}

impl Watch {
    /// The next event, or how many were lost because this tap read too slowly; `None` once
    /// the proxy is gone.
    pub async fn next(&mut self) -> Option<Result<Arc<TapEvent>, u64>> {
        match self.rx.recv().await {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.tap.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request as tap shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TapEvent {
    /// When the request started, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The request's method.
    pub method: String,
    /// The authority it was routed by (outbound) or the workload's service (inbound).
    pub authority: String,
    /// The path, without the query (which may carry secrets).
    pub path: String,
    /// The HTTPRoute rule that matched (outbound), else empty.
    pub route: String,
    /// The backend the split chose (`name.namespace`), outbound only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The endpoint picked, outbound only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// The caller's SPIFFE ID: this proxy's own outbound, the peer's (from mTLS) inbound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<String>,
    /// The callee's SPIFFE ID: the endpoint's outbound, this proxy's own inbound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    /// The response status; 502 or 504 when the proxy answered for a failed attempt.
    pub status: u16,
    /// `upstream` (the app answered 5xx), `mesh` (no answer from the backend), or empty.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub error: &'static str,
    /// Time to the response head, milliseconds.
    pub latency_ms: f64,
    /// The request headers on [`HEADER_ALLOWLIST`], by lower-case name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl TapEvent {
    /// What tap may show of a request: method, path (no query) and allowlisted headers.
    pub fn of_request(
        direction: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Self {
        let started_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let headers = HEADER_ALLOWLIST
            .iter()
            .filter_map(|name| {
                let value = headers.get(*name)?.to_str().ok()?;
                Some(((*name).to_string(), value.to_string()))
            })
            .collect();
        Self {
            started_ms,
            direction,
            method: method.to_string(),
            path: uri.path().to_string(),
            headers,
            ..Self::default()
        }
    }

    /// Completes the event with the answer.
    pub fn finish(&mut self, status: u16, error: &'static str, took: Duration) {
        self.status = status;
        self.error = error;
        self.latency_ms = took.as_secs_f64() * 1000.0;
    }
}

/// Which requests a tap shows (`GET /tap?path=/api&method=GET&authority=web...&direction=outbound`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Paths starting with this.
    pub path_prefix: Option<String>,
    /// This method, case-insensitive.
    pub method: Option<String>,
    /// This authority, or authorities starting with it (`web` matches `web.default:80`).
    pub authority: Option<String>,
    /// `inbound` or `outbound`.
    pub direction: Option<String>,
}

/// The names [`Filter::from_query`] accepts.
const FILTER_PARAMS: &[&str] = &["path", "method", "authority", "direction", "max"];

impl Filter {
    /// The filter a tap request's query asks for, and at most how many events it wants; an
    /// error names an unknown parameter or a bad value.
    pub fn from_query(query: Option<&str>) -> Result<(Self, Option<u64>), String> {
        let mut filter = Self::default();
        let mut max = None;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match name {
                "path" => filter.path_prefix = Some(value),
                "method" => filter.method = Some(value.to_ascii_uppercase()),
                "authority" => filter.authority = Some(value),
                "direction" => match value.as_str() {
                    "inbound" | "outbound" => filter.direction = Some(value),
                    _ => return Err(format!("direction={value}: want inbound or outbound")),
                },
                "max" => {
                    let n = value
                        .parse()
                        .map_err(|_| format!("max={value}: want a whole number"))?;
                    max = Some(n);
                }
                _ => {
                    return Err(format!(
                        "unknown tap parameter {name:?}; known: {}",
                        FILTER_PARAMS.join(", ")
                    ));
                }
            }
        }
        Ok((filter, max))
    }

    /// Whether `event` passes.
    pub fn admits(&self, event: &TapEvent) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|p| event.path.starts_with(p))
            && self
                .method
                .as_deref()
                .is_none_or(|m| event.method.eq_ignore_ascii_case(m))
            && self
                .authority
                .as_deref()
                .is_none_or(|a| event.authority.starts_with(a))
            && self
                .direction
                .as_deref()
                .is_none_or(|d| event.direction == d)
    }
}

/// `%XX` and `+` decoded; bad escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Who may tap: the holder of the token in a file, or of the token a digest stands for.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// See [`crate::config::ENV_TAP_TOKEN_FILE`].
    pub token_file: Option<std::path::PathBuf>,
    /// See [`crate::config::ENV_TAP_TOKEN_SHA256`] (lower-case hex).
    pub token_sha256: Option<String>,
}

impl Access {
    /// Whether `headers` present an accepted token: the digest's when there is one, else the
    /// file's.
    pub fn admits(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        match &self.token_sha256 {
            Some(digest) => matches_digest(digest, headers),
            None => authorized(self.token_file.as_deref(), headers),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `headers` present a token whose SHA-256 is `digest`.
fn matches_digest(digest: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    let given = bearer(headers).ok_or(Refusal::NoToken)?;
    let hashed = mesh_core::tap::token_sha256(given);
    if constant_time_eq(hashed.as_bytes(), digest.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

/// Whether `headers` present the token in `token_file` (`Authorization: Bearer <token>`).
/// Without a readable, non-empty token file nobody is admitted: tap is off.
pub fn authorized(
    token_file: Option<&std::path::Path>,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let Some(path) = token_file else {
        return Err(Refusal::Disabled);
    };
    let secret = std::fs::read_to_string(path).map_err(|_| Refusal::Disabled)?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(Refusal::Disabled);
    }
    match bearer(headers) {
        Some(given) if constant_time_eq(given.as_bytes(), secret.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal::WrongToken),
        None => Err(Refusal::NoToken),
    }
}

/// Compares without stopping at the first difference, so timing says nothing of the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a tap was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The proxy has no tap token: tap is off.
    #[error("tap is not enabled on this proxy (it has no tap token)")]
    Disabled,
    /// No bearer token presented.
    #[error("tap needs an authorized caller: no bearer token presented")]
    NoToken,
    /// A token that is not the tap token.
    #[error("tap needs an authorized caller: the bearer token presented is not accepted")]
    WrongToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str) -> TapEvent {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        headers.insert("cookie", "session=1".parse().unwrap());
        headers.insert("user-agent", "curl/8".parse().unwrap());
        let uri: Uri = format!("http://web.default:80{path}?token=secret")
            .parse()
            .unwrap();
        let mut e = TapEvent::of_request("outbound", &Method::GET, &uri, &headers);
        e.authority = "web.default:80".into();
        e
    }

    #[test]
    fn only_allowlisted_headers_and_no_query_are_shown() {
        let e = event("/api/items");
        assert_eq!(e.path, "/api/items");
        assert_eq!(
            e.headers.into_iter().collect::<Vec<_>>(),
            [("user-agent".to_string(), "curl/8".to_string())]
        );
        let json = serde_json::to_string(&event("/x")).unwrap();
        assert!(!json.contains("secret"), "{json}");
        assert!(!json.contains("session"), "{json}");
    }

    #[tokio::test]
    async fn active_only_while_someone_watches() {
        let tap = Tap::default();
        assert!(!tap.active());
        let mut watch = tap.watch();
        assert!(tap.active());
        tap.publish(event("/a"));
        assert_eq!(watch.next().await.unwrap().unwrap().path, "/a");
        let second = tap.watch();
        drop(watch);
        assert!(tap.active());
        drop(second);
        assert!(!tap.active());
    }

    #[tokio::test]
    async fn a_slow_tap_is_told_what_it_lost() {
        let tap = Tap::default();
        let mut watch = tap.watch();
        for _ in 0..BUFFER + 10 {
            tap.publish(event("/a"));
        }
        assert_eq!(watch.next().await.unwrap().unwrap_err(), 10);
    }

    #[test]
    fn filters_match_prefixes_and_methods() {
        let (f, max) =
            Filter::from_query(Some("path=%2Fapi&method=get&authority=web&max=5")).unwrap();
        assert_eq!(max, Some(5));
        assert!(f.admits(&event("/api/items")));
        assert!(!f.admits(&event("/other")));
        let (f, _) = Filter::from_query(Some("authority=api")).unwrap();
        assert!(!f.admits(&event("/api")));
        let (f, _) = Filter::from_query(Some("direction=inbound")).unwrap();
        assert!(!f.admits(&event("/api")));
        let err = Filter::from_query(Some("body=1")).unwrap_err();
        assert!(err.contains("unknown tap parameter \"body\""), "{err}");
        assert!(Filter::from_query(Some("max=lots")).is_err());
        assert!(Filter::from_query(Some("direction=up")).is_err());
    }

    #[test]
    fn only_the_token_holder_may_tap() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let mut headers = HeaderMap::new();
        assert_eq!(authorized(None, &headers), Err(Refusal::Disabled));
        assert_eq!(authorized(Some(&file), &headers), Err(Refusal::Disabled));
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(authorized(Some(&file), &headers), Err(Refusal::NoToken));
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(authorized(Some(&file), &headers), Err(Refusal::WrongToken));
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(authorized(Some(&file), &headers), Ok(()));
    }

    #[test]
    fn a_digest_admits_only_the_token_it_stands_for() {
        let access = Access {
            token_file: None,
            token_sha256: Some(mesh_core::tap::token_sha256("s3cret")),
        };
        let mut headers = HeaderMap::new();
        assert_eq!(access.admits(&headers), Err(Refusal::NoToken));
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(access.admits(&headers), Err(Refusal::WrongToken));
        // The digest itself is not the token.
        let digest = mesh_core::tap::token_sha256("s3cret");
        headers.insert("authorization", format!("Bearer {digest}").parse().unwrap());
        assert_eq!(access.admits(&headers), Err(Refusal::WrongToken));
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(access.admits(&headers), Ok(()));
        assert_eq!(Access::default().admits(&headers), Err(Refusal::Disabled));
    }
}
