//! A second reader of a request body as it streams: what a RequestMirror's copy is sent with.
//!
//! The body's one reader (the original request's [`crate::retry::ReplayBody`]) offers every
//! frame it reads from the source to its [`Tap`]s; each tap queues the frame for its
//! [`TeeBody`], which the copy's connection reads at its own pace. Offering never waits: a copy
//! that falls more than its `limit` of bytes behind is given up, its body ends in an error (so
//! the copy's connection aborts it rather than send it cut short as if whole), and the
//! original goes on untouched. A tap dropped before its source ended (the original was
//! cancelled, or never read its body) ends the copy's body in an error too.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

/// The error a copy's body ends in: any error, boxed, as request bodies' errors are.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a copy's body ended before its source did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Abandoned {
    /// The copy fell more than its limit behind the original.
    #[error("mirror copy abandoned: it fell more than its limit behind the original request")]
    FellBehind,
    /// The original request's body failed, or was dropped before it ended.
    #[error("mirror copy abandoned: the original request's body did not end")]
    SourceBroke,
}

#[derive(Debug)]
enum End {
    Open,
    Done,
    Abandoned(Abandoned),
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Frame<Bytes>>,
    /// Bytes of data queued and not yet read by the copy.
    queued: usize,
    limit: usize,
    end: End,
    waker: Option<Waker>,
    /// The copy's body was dropped: nothing more needs queueing.
    reader_gone: bool,
    /// The source's size hint before anything was read, and how much the copy has read since.
    hint: SizeHint,
    taken: u64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A tap and the body it feeds, for a source of size `hint` of which nothing has been read; the
/// copy may fall at most `limit` bytes behind. `fell_behind` counts copies given up for that.
pub fn tee(limit: usize, fell_behind: Counter, hint: SizeHint) -> (Tap, TeeBody) {
    let state = Arc::new(Mutex::new(State {
        frames: VecDeque::new(),
        queued: 0,
        limit,
        end: End::Open,
        waker: None,
        reader_gone: false,
        hint,
        taken: 0,
    }));
    (
        Tap {
            state: state.clone(),
            fell_behind,
        },
        TeeBody { state },
    )
}

/// The source's side of a tee: offered each frame as the original reads it.
#[derive(Debug)]
pub struct Tap {
    state: Arc<Mutex<State>>,
    fell_behind: Counter,
}

impl Tap {
    /// Queues a copy of `frame`, or gives the copy up if it would fall too far behind.
    pub fn offer(&self, frame: &Frame<Bytes>) {
        let mut s = lock(&self.state);
        if s.reader_gone || !matches!(s.end, End::Open) {
            return;
        }
        let copy = if let Some(data) = frame.data_ref() {
            if s.queued + data.len() > s.limit {
                s.frames.clear();
                s.queued = 0;
                s.end = End::Abandoned(Abandoned::FellBehind);
                self.fell_behind.inc();
                wake(&mut s);
                return;
            }
            s.queued += data.len();
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        s.frames.push_back(copy);
        wake(&mut s);
    }

    /// The source ended: the copy's body ends once it has read what is queued.
    pub fn finish(&self) {
        self.close(End::Done);
    }

    /// Whether the copy no longer reads (done, dropped or given up): the tap can be let go.
    pub fn is_closed(&self) -> bool {
        let s = lock(&self.state);
        s.reader_gone || !matches!(s.end, End::Open)
    }

    fn close(&self, end: End) {
        let mut s = lock(&self.state);
        if matches!(s.end, End::Open) {
            s.end = end;
            wake(&mut s);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.close(End::Abandoned(Abandoned::SourceBroke));
    }
}

fn wake(s: &mut State) {
    if let Some(waker) = s.waker.take() {
        waker.wake();
    }
}

/// The copy's side of a tee: the source's frames, in order, as the original read them.
#[derive(Debug)]
pub struct TeeBody {
    state: Arc<Mutex<State>>,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.state);
        if let Some(frame) = s.frames.pop_front() {
            if let Some(data) = frame.data_ref() {
                s.queued -= data.len();
                s.taken += data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match s.end {
            End::Done => Poll::Ready(None),
            End::Abandoned(why) => Poll::Ready(Some(Err(why.into()))),
            End::Open => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.state);
        s.frames.is_empty() && matches!(s.end, End::Done)
    }

    /// The source's own hint, less what the copy has read: a Content-Length the original
    /// declared frames the copy the same way.
    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.state);
        let mut hint = SizeHint::new();
        hint.set_lower(s.hint.lower().saturating_sub(s.taken));
        if let Some(upper) = s.hint.upper() {
            hint.set_upper(upper.saturating_sub(s.taken));
        }
        hint
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        s.reader_gone = true;
        s.frames.clear();
        s.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::BodyExt;

    fn data(s: &'static str) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn the_copy_reads_every_frame_then_ends() {
        let (tap, body) = tee(1024, Counter::default(), SizeHint::default());
        tap.offer(&data("hello "));
        tap.offer(&data("world"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tap.offer(&Frame::trailers(trailers.clone()));
        tap.finish();
        assert!(tap.is_closed());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "hello world");
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_ends_in_an_error_and_is_counted() {
        let fell_behind = Counter::default();
        let (tap, mut body) = tee(8, fell_behind.clone(), SizeHint::default());
        tap.offer(&data("12345"));
        // The copy reads the first frame; the next two together exceed the limit.
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "12345");
        tap.offer(&data("12345"));
        tap.offer(&data("12345"));
        assert!(tap.is_closed(), "given up");
        tap.finish();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), Abandoned::FellBehind.to_string());
        assert_eq!(fell_behind.get(), 1);
    }

    #[tokio::test]
    async fn a_source_dropped_before_its_end_fails_the_copy() {
        let (tap, body) = tee(1024, Counter::default(), SizeHint::default());
        tap.offer(&data("part"));
        drop(tap);
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.to_string(), Abandoned::SourceBroke.to_string());
    }

    #[tokio::test]
    async fn the_copy_waits_for_frames_the_source_has_not_read_yet() {
        let (tap, body) = tee(1024, Counter::default(), SizeHint::default());
        let reader = tokio::spawn(async move { body.collect().await.unwrap().to_bytes() });
        tokio::task::yield_now().await;
        tap.offer(&data("late"));
        tap.finish();
        assert_eq!(reader.await.unwrap(), "late");
    }

    #[test]
    fn a_dropped_copy_closes_its_tap() {
        let (tap, body) = tee(1024, Counter::default(), SizeHint::default());
        drop(body);
        assert!(tap.is_closed());
        tap.offer(&data("nobody reads this"));
        assert_eq!(lock(&tap.state).queued, 0);
    }
}
