//! What retries need: a retry budget per route, and request bodies that can be sent again.
//!
//! The budget (as Linkerd's and Finagle's) caps the extra load retries add: over a sliding window
//! of `ttl`, retries may add `ratio` of the requests seen plus `min_per_second × ttl`, however
//! many requests fail. During an outage, retries then add at most `ratio` more load instead of
//! multiplying it by the number of attempts.
//!
//! A request can only be retried if its body can be sent again. [`Replayable`] forwards the body
//! as it arrives and keeps a copy of up to [`MAX_REPLAY_BODY`]; a body longer than that (or whose
//! Content-Length says it will be) is never retried, so memory per request stays bounded and
//! streams are never held back waiting for their end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use mesh_core::proxy_api::RetryBudget;
use prometheus_client::metrics::counter::Counter;

use crate::tee::{Tap, TeeBody};

/// Largest request body kept in memory so the request can be retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// How many slots the budget window is split into; the window slides a slot at a time.
const SLOTS: u32 = 10;
/// Bounds of a budget's window, as Linkerd allows them.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(60);

/// A retry budget: deposits for requests, withdrawals for retries, over a sliding window.
#[derive(Debug)]
pub struct Budget {
    config: RetryBudget,
    origin: Instant,
    slot_len: Duration,
    /// Per slot: (epoch it belongs to, requests, retries).
    slots: VecDeque<(u64, u64, u64)>,
}

impl Budget {
    /// An empty budget with `config`, starting at `now`.
    pub fn new(config: RetryBudget, now: Instant) -> Self {
        let ttl = Duration::from_millis(config.ttl_ms).clamp(MIN_TTL, MAX_TTL);
        Self {
            config,
            origin: now,
            slot_len: ttl / SLOTS,
            slots: VecDeque::with_capacity(SLOTS as usize),
        }
    }

    /// The settings the budget was made with.
    pub fn config(&self) -> &RetryBudget {
        &self.config
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot_len.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    /// The current slot, after dropping slots that left the window.
    fn slot(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let epoch = self.epoch(now);
        while self
            .slots
            .front()
            .is_some_and(|(e, _, _)| *e + u64::from(SLOTS) <= epoch)
        {
            self.slots.pop_front();
        }
        if self.slots.back().is_none_or(|(e, _, _)| *e != epoch) {
            self.slots.push_back((epoch, 0, 0));
        }
        // Just pushed or checked above, so there is a back.
        let len = self.slots.len();
        &mut self.slots[len - 1]
    }

    /// Counts a request (not a retry) towards the budget.
    pub fn deposit(&mut self, now: Instant) {
        self.slot(now).1 += 1;
    }

    /// Takes one retry from the budget, if it has one left.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.slot(now);
        let (requests, retries) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(q, r), (_, dq, dr)| (q + dq, r + dr));
        let ttl_secs = (self.slot_len * SLOTS).as_secs_f64();
        #[allow(clippy::cast_precision_loss, reason = "counts stay far below 2^52")]
        let allowed = self.config.ratio.max(0.0) * requests as f64
            + f64::from(self.config.min_per_second) * ttl_secs;
        #[allow(clippy::cast_precision_loss, reason = "counts stay far below 2^52")]
        // The epsilon keeps 0.2 × 5 from landing a hair under 1 and costing a retry.
        let ok = (retries + 1) as f64 <= allowed + 1e-9;
        if ok {
            self.slot(now).2 += 1;
        }
        ok
    }
}

/// The error type of [`ReplayBody`]: the source's error, or "superseded".
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An attempt's body was still being sent when a retry replaced the attempt.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
pub struct Superseded;

/// What the attempts of one request share: the source body, and what has been read of it.
#[derive(Debug)]
struct Shared<B> {
    source: Option<B>,
    /// Data read from the source so far, while it fits in [`MAX_REPLAY_BODY`].
    chunks: Vec<Bytes>,
    len: usize,
    /// More than [`MAX_REPLAY_BODY`] was read (or recording was never wanted): no replays.
    overflow: bool,
    /// The source has ended (with these trailers, if any).
    done: bool,
    trailers: Option<HeaderMap>,
    /// The id of the newest attempt's body; only it may read on from the source.
    newest: u64,
    /// Anything has been read from the source.
    read: bool,
    /// Mirror copies, offered each frame as it is read from the source.
    taps: Vec<Tap>,
}

/// A request body that can be sent more than once, for retries.
///
/// It does not wait for the body to end: the first attempt forwards each frame as it arrives
/// (so streaming calls flow) and records it. A retry replays what was recorded, then reads on
/// from the source, recording as it goes. Once more than [`MAX_REPLAY_BODY`] has been read the
/// recording stops and the request can no longer be retried; a body whose Content-Length
/// already says it is larger is never recorded at all.
#[derive(Debug)]
pub struct Replayable<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B: Body> Replayable<B> {
    /// Wraps a request body; `record` says whether retries may need it again.
    pub fn new(source: B, record: bool, content_length: Option<u64>) -> Self {
        let too_long = content_length.is_some_and(|n| n > MAX_REPLAY_BODY as u64);
        let done = source.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!done).then_some(source),
                chunks: Vec::new(),
                len: 0,
                overflow: !record || too_long,
                done,
                trailers: None,
                newest: 0,
                read: false,
                taps: Vec::new(),
            })),
        }
    }

    /// A body with nothing in it, for a request made here (a mirror's copy).
    pub fn empty() -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: None,
                chunks: Vec::new(),
                len: 0,
                overflow: true,
                done: true,
                trailers: None,
                newest: 0,
                read: false,
                taps: Vec::new(),
            })),
        }
    }

    /// The body for the next attempt; `None` after the first when the body cannot be replayed.
    /// Earlier attempts' bodies fail from now on, should their connections still read them.
    pub fn attempt(&self) -> Option<ReplayBody<B>> {
        let mut s = lock(&self.shared);
        if s.newest > 0 && s.overflow {
            return None;
        }
        s.newest += 1;
        Some(ReplayBody(Inner::Attempt(Attempt {
            shared: self.shared.clone(),
            id: s.newest,
            pos: 0,
            trailers_sent: false,
        })))
    }

    /// Whether another attempt could carry the whole body.
    pub fn can_replay(&self) -> bool {
        !lock(&self.shared).overflow
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One attempt's view of a [`Replayable`] body, or a mirror's copy of one (see [`Self::tee`]).
#[derive(Debug)]
pub struct ReplayBody<B = Incoming>(Inner<B>);

#[derive(Debug)]
enum Inner<B> {
    Attempt(Attempt<B>),
    Copy(TeeBody),
}

#[derive(Debug)]
struct Attempt<B> {
    shared: Arc<Mutex<Shared<B>>>,
    id: u64,
    /// Next recorded chunk to send.
    pos: usize,
    trailers_sent: bool,
}

impl<B: Body> ReplayBody<B> {
    /// Whether this is the body of a request's first attempt (not a retry, nor a copy).
    pub fn is_first_attempt(&self) -> bool {
        matches!(&self.0, Inner::Attempt(a) if a.id == 1)
    }

    /// A copy of this body for a mirror, fed every frame the attempts read from the source
    /// (see [`crate::tee`]); it may fall `limit` bytes behind before it is given up, counted in
    /// `fell_behind`. `None` once any of the body has been read (the copy would miss its start)
    /// and for a copy.
    pub fn tee(&self, limit: usize, fell_behind: Counter) -> Option<Self> {
        let Inner::Attempt(attempt) = &self.0 else {
            return None;
        };
        let mut s = lock(&attempt.shared);
        if s.read {
            return None;
        }
        let hint = s.source.as_ref().map(Body::size_hint).unwrap_or_default();
        let (tap, body) = crate::tee::tee(limit, fell_behind, hint);
        if s.done {
            tap.finish();
        } else {
            s.taps.push(tap);
        }
        Some(Self(Inner::Copy(body)))
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Attempt(attempt) => attempt.poll_frame(cx),
            Inner::Copy(copy) => Pin::new(copy).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Attempt(attempt) => attempt.is_end_stream(),
            Inner::Copy(copy) => copy.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Attempt(attempt) => attempt.size_hint(),
            Inner::Copy(copy) => copy.size_hint(),
        }
    }
}

impl<B> Attempt<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        let mut guard = lock(&this.shared);
        let s = &mut *guard;
        if this.id != s.newest {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if let Some(chunk) = s.chunks.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.done {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                s.source = None;
                this.trailers_sent = true;
                for tap in s.taps.drain(..) {
                    tap.finish();
                }
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                // A body that broke cannot be sent again whole; nor can its copies.
                s.overflow = true;
                s.taps.clear();
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        s.read = true;
        if !s.taps.is_empty() {
            for tap in &s.taps {
                tap.offer(&frame);
            }
            s.taps.retain(|tap| !tap.is_closed());
        }
        let frame = match frame.into_data() {
            Ok(data) => {
                if !s.overflow {
                    s.len += data.len();
                    if s.len > MAX_REPLAY_BODY {
                        // Only this attempt reads on; what was recorded is no longer needed.
                        s.overflow = true;
                        s.chunks = Vec::new();
                        this.pos = 0;
                    } else {
                        s.chunks.push(data.clone());
                        this.pos += 1;
                    }
                }
                Frame::data(data)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    s.trailers = Some(trailers.clone());
                    s.done = true;
                    s.source = None;
                    this.trailers_sent = true;
                    for tap in s.taps.drain(..) {
                        tap.finish();
                    }
                    Frame::trailers(trailers)
                }
                Err(other) => other,
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.done && self.pos >= s.chunks.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        let held: u64 = s
            .chunks
            .get(self.pos..)
            .unwrap_or_default()
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        match &s.source {
            None => SizeHint::with_exact(held),
            Some(source) => {
                let r = source.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + held);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::channel::Channel;

    type Source = Channel<Bytes, BoxError>;

    async fn collect(body: ReplayBody<Source>) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_small_body_is_forwarded_as_it_arrives_and_replayed_whole() {
        let (mut tx, rx) = Source::new(4);
        let body = Replayable::new(rx, true, None);
        let mut first = body.attempt().unwrap();
        tx.send_data(Bytes::from("hello ")).await.unwrap();
        // The first frame is forwarded before the body has ended.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello ");
        assert!(body.can_replay());

        // A retry starts while the body is still arriving: it replays, then reads on.
        let second = body.attempt().unwrap();
        assert!(
            first.frame().await.unwrap().is_err(),
            "the old attempt is cut off"
        );
        tx.send_data(Bytes::from("world")).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send_trailers(trailers.clone()).await.unwrap();
        drop(tx);
        assert_eq!(
            collect(second).await,
            (b"hello world".to_vec(), Some(trailers.clone()))
        );

        let third = body.attempt().unwrap();
        assert!(third.size_hint().exact() == Some(11));
        assert_eq!(
            collect(third).await,
            (b"hello world".to_vec(), Some(trailers))
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayed() {
        let (mut tx, rx) = Source::new(4);
        let body = Replayable::new(rx, true, None);
        let first = body.attempt().unwrap();
        tokio::spawn(async move {
            for _ in 0..3 {
                tx.send_data(Bytes::from(vec![b'x'; 30 * 1024]))
                    .await
                    .unwrap();
            }
        });
        assert_eq!(collect(first).await.0.len(), 90 * 1024, "forwarded whole");
        assert!(!body.can_replay());
        assert!(body.attempt().is_none());
    }

    #[test]
    fn a_declared_length_over_the_limit_or_no_retry_policy_records_nothing() {
        let (_tx, rx) = Source::new(1);
        let body = Replayable::new(rx, true, Some(64 * 1024 + 1));
        assert!(body.attempt().is_some());
        assert!(body.attempt().is_none());
        let (_tx, rx) = Source::new(1);
        let body = Replayable::new(rx, false, Some(10));
        assert!(body.attempt().is_some());
        assert!(!body.can_replay());
    }

    #[tokio::test]
    async fn an_empty_body_is_at_its_end_from_the_start() {
        let body = Replayable::new(http_body_util::Empty::<Bytes>::new(), true, None);
        for _ in 0..3 {
            let attempt = body.attempt().unwrap();
            assert!(attempt.is_end_stream());
            assert_eq!(attempt.size_hint().exact(), Some(0));
        }
    }

    fn mk_budget(ratio: f64, min_per_second: u32, ttl_ms: u64) -> Budget {
        Budget::new(
            RetryBudget {
                ratio,
                min_per_second,
                ttl_ms,
            },
            Instant::now(),
        )
    }

    #[test]
    fn retries_are_bounded_by_the_ratio_of_requests() {
        let mut b = mk_budget(0.2, 0, 10_000);
        let now = Instant::now();
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit(now);
            // Every request would like three retries.
            for _ in 0..3 {
                if b.withdraw(now) {
                    retries += 1;
                }
            }
        }
        assert_eq!(retries, 200);
    }

    #[test]
    fn the_minimum_per_second_allows_retries_without_traffic() {
        let mut b = mk_budget(0.2, 10, 10_000);
        let now = Instant::now();
        let granted = (0..1000).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 100, "10 per second over a 10 s window");
    }

    #[test]
    fn the_window_slides() {
        let mut b = mk_budget(0.5, 0, 1_000);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit(t0);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(t0)).count(), 5);
        // A window later the old requests and retries are forgotten.
        let t1 = t0 + Duration::from_millis(1_100);
        assert!(!b.withdraw(t1));
        for _ in 0..4 {
            b.deposit(t1);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(t1)).count(), 2);
    }

    #[test]
    fn the_window_is_clamped_to_linkerd_bounds() {
        let b = mk_budget(0.2, 10, 0);
        assert_eq!(b.slot_len * SLOTS, MIN_TTL);
        let b = mk_budget(0.2, 10, 3_600_000);
        assert_eq!(b.slot_len * SLOTS, MAX_TTL);
    }
}
