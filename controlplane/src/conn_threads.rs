//! Where the servers' connections run: each accepted connection, with every HTTP/2 stream it
//! opens, on one single-threaded runtime of a small set, one per worker of the process's
//! runtime.
//!
//! Why: a proxy's watches are HTTP/2 streams of one connection, and hyper serves each stream in
//! a task of its own. A weight change wakes every stream that watches the route. On a
//! work-stealing runtime one worker wakes them while another already runs them, so each
//! connection's task is polled, and flushes, after almost every stream: a write per stream
//! instead of a few per connection (at 10,000 watchers, 707,598 `writev`s in 5 s of changes
//! against 31,356 on one thread, and three times the CPU; docs/benchmarks.md). On one thread the
//! change wakes every stream before any of them runs, and each connection writes its streams'
//! updates at once.
//!
//! Two things together give every core that batching. Each connection, with its streams, runs
//! on one single-threaded runtime of a small set, one per worker of the process's runtime (the
//! least busy when it is accepted). And [`LocalWatch`] gives a stream a relay on its own thread:
//! one task per thread and watched value is woken from outside, and it wakes that thread's
//! streams all at once, before any of them runs. Either alone was measured to change nothing:
//! with the threads but no relay, each stream's wake came from the main runtime and woke its
//! thread's event loop, which again served that stream alone.
//!
//! The rest of the control plane (the store, the feeds, certificate renewal, the scraper) stays
//! on the process's runtime; the two meet only through `Send` channels and locks, which do not
//! care which runtime polls them.
//!
//! When the process's runtime has one thread (`MESH_CONTROLPLANE_CORES=1`), connections are
//! spawned on it as before and no thread is started. The threads end, cancelling their
//! connections, when the servers that share them are dropped.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{mpsc, watch};

type Connection = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One thread: its queue of connections to start and how many it is serving.
struct Thread {
    queue: mpsc::UnboundedSender<Connection>,
    serving: Arc<AtomicUsize>,
}

/// Runs connections on the current runtime, or on threads of their own (see the module).
pub struct ConnectionThreads {
    threads: Vec<Thread>,
}

impl ConnectionThreads {
    /// As many threads as the current runtime has workers, named `<name>-conn-<i>` (Linux keeps
    /// 15 bytes of a thread name); none when it has one, or when a thread cannot be started
    /// (then connections run on the current runtime, as they would with one worker).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn for_current_runtime(name: &str) -> Self {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        Self::new(name, workers)
    }

    /// `count` threads, or none when `count` is one or less.
    pub fn new(name: &str, count: usize) -> Self {
        if count <= 1 {
            return Self {
                threads: Vec::new(),
            };
        }
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            match start(name, i) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    tracing::warn!(threads = name, error = %e,
                        "cannot start a connection thread; serving connections on the main runtime");
                    return Self {
                        threads: Vec::new(),
                    };
                }
            }
        }
        Self { threads }
    }

    /// How many threads serve connections (zero: the current runtime does).
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether connections run on the current runtime.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Runs `connection` to its end: on the thread serving the fewest connections, or spawned
    /// on the current runtime when there are no threads.
    pub fn run<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|t| t.serving.load(Ordering::Relaxed))
        else {
            tokio::spawn(connection);
            return;
        };
        thread.serving.fetch_add(1, Ordering::Relaxed);
        let serving = Arc::clone(&thread.serving);
        let counted = async move {
            let _done = Decrement(serving);
            connection.await;
        };
        if let Err(mpsc::error::SendError(counted)) = thread.queue.send(Box::pin(counted)) {
            // The thread is gone (its runtime could not be polled any more); serve here.
            tokio::spawn(counted);
        }
    }
}

/// Counts a connection out of its thread when it ends or is cancelled.
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// Whether this thread is a connection thread.
    static CONNECTION_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread's relays, one per watched channel that a stream here watches.
    static RELAYS: RefCell<Vec<Relay>> = const { RefCell::new(Vec::new()) };
}

/// One watched channel's relay on this thread: the relay task's own receiver of the channel
/// (to find it again), and what it ticks.
struct Relay {
    source: Box<dyn Any>,
    ticks: Arc<watch::Sender<()>>,
}

/// A watch receiver that, on a connection thread, is woken through that thread's relay of its
/// channel (see the module), and elsewhere by the channel itself, as a plain receiver is.
pub struct LocalWatch<T> {
    rx: watch::Receiver<T>,
    ticks: Option<watch::Receiver<()>>,
}

impl<T: Send + Sync + 'static> LocalWatch<T> {
    /// Watches `rx`'s channel from here; what `rx` has seen counts as seen.
    pub fn new(rx: watch::Receiver<T>) -> Self {
        let ticks = ticks_here(&rx);
        Self { rx, ticks }
    }

    /// Waits until the channel holds a value this watch has not read; false once it has closed.
    pub async fn changed(&mut self) -> bool {
        let Some(ticks) = &mut self.ticks else {
            return self.rx.changed().await.is_ok();
        };
        loop {
            // Ticks seen so far are spent: a change after this check ticks again.
            ticks.borrow_and_update();
            match self.rx.has_changed() {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            if ticks.changed().await.is_err() {
                // The relay ended (its channel closed, or the thread is going): ask the channel.
                return self.rx.changed().await.is_ok();
            }
        }
    }

    /// The latest value, marked as read.
    pub fn borrow_and_update(&mut self) -> watch::Ref<'_, T> {
        self.rx.borrow_and_update()
    }
}

/// A receiver that ticks, on this thread, after each change to `source`'s channel, when this is
/// a connection thread (see the module); `None` elsewhere, where the stream should wait on
/// `source` itself. After a tick, read `source` as usual; a tick may stand for several changes,
/// or for one already read. The tick receiver reports an error once the channel has closed.
fn ticks_here<T: Send + Sync + 'static>(
    source: &watch::Receiver<T>,
) -> Option<watch::Receiver<()>> {
    if !CONNECTION_THREAD.with(Cell::get) {
        return None;
    }
    RELAYS.with(|relays| {
        let mut relays = relays.borrow_mut();
        let found = relays.iter().find(|r| {
            r.source
                .downcast_ref::<watch::Receiver<T>>()
                .is_some_and(|s| s.same_channel(source))
        });
        if let Some(relay) = found {
            return Some(relay.ticks.subscribe());
        }
        let (ticks, receiver) = watch::channel(());
        let ticks = Arc::new(ticks);
        let mut watched = source.clone();
        watched.mark_unchanged();
        relays.push(Relay {
            source: Box::new(watched.clone()),
            ticks: Arc::clone(&ticks),
        });
        // This thread's runtime has this one thread: the relay runs here, beside the streams.
        tokio::spawn(relay(watched, ticks));
        Some(receiver)
    })
}

/// Ticks `ticks` after each change to `source` until the channel closes or no stream on this
/// thread listens any more, then leaves the thread's relays (dropping the last sender of the
/// ticks, so listeners see the end). It runs on the connection thread whose relays it is in.
async fn relay<T: Send + Sync + 'static>(
    mut source: watch::Receiver<T>,
    ticks: Arc<watch::Sender<()>>,
) {
    loop {
        tokio::select! {
            changed = source.changed() => {
                if changed.is_err() {
                    break;
                }
                ticks.send_replace(());
            }
            () = ticks.closed() => {
                // Single-threaded: no stream can subscribe between this check and the removal.
                if ticks.receiver_count() == 0 {
                    break;
                }
            }
        }
    }
    RELAYS.with(|relays| {
        relays
            .borrow_mut()
            .retain(|r| !Arc::ptr_eq(&r.ticks, &ticks));
    });
}

fn start(name: &str, index: usize) -> std::io::Result<Thread> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (queue, mut connections) = mpsc::unbounded_channel::<Connection>();
    std::thread::Builder::new()
        .name(format!("{name}-conn-{index}"))
        .spawn(move || {
            CONNECTION_THREAD.with(|c| c.set(true));
            runtime.block_on(async move {
                while let Some(connection) = connections.recv().await {
                    tokio::spawn(connection);
                }
            });
            // The server is gone: dropping the runtime cancels the connections still open.
        })?;
    Ok(Thread {
        queue,
        serving: Arc::new(AtomicUsize::new(0)),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ConnectionThreads;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_run_on_their_own_threads_spread_by_load() {
        let threads = ConnectionThreads::for_current_runtime("test");
        assert_eq!(threads.len(), 2, "one thread per worker");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            let (tx, mut hold) = (tx.clone(), hold_rx.clone());
            threads.run(async move {
                let name = std::thread::current().name().map(str::to_owned);
                // A connection's streams are spawned where it runs: on the same thread.
                let spawned =
                    tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                        .await
                        .ok()
                        .flatten();
                tx.send((name, spawned)).ok();
                let _ = hold.wait_for(|go| *go).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            let (name, spawned) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every connection starts")
                .expect("the channel is open");
            assert_eq!(
                name, spawned,
                "a task a connection spawns stays on its thread"
            );
            names.push(name.expect("connection threads are named"));
        }
        names.sort();
        assert_eq!(
            names,
            ["test-conn-0", "test-conn-0", "test-conn-1", "test-conn-1"],
            "connections go to the thread serving the fewest"
        );
        hold_tx.send(true).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_on_a_connection_thread_share_one_relay_per_channel() {
        use super::{RELAYS, ticks_here};
        use tokio::sync::watch;

        let (tx, rx) = watch::channel(0u32);
        assert!(ticks_here(&rx).is_none(), "not a connection thread");
        let threads = ConnectionThreads::for_current_runtime("test");
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        let (step_tx, mut step) = tokio::sync::mpsc::unbounded_channel::<()>();
        threads.run(async move {
            let relays = || RELAYS.with(|r| r.borrow().len());
            let mut a = ticks_here(&rx).expect("a connection thread relays");
            let mut b = ticks_here(&rx.clone()).expect("a connection thread relays");
            assert_eq!(relays(), 1, "one relay per channel and thread");
            report.send("subscribed").ok();
            step.recv().await;
            // A change ticks every stream of the thread.
            a.changed().await.expect("a ticks");
            b.changed().await.expect("b ticks");
            assert_eq!(*rx.borrow(), 1);
            drop((a, b));
            // With no stream left, the relay leaves.
            while relays() != 0 {
                tokio::task::yield_now().await;
            }
            let mut c = ticks_here(&rx).expect("a new relay");
            assert_eq!(relays(), 1);
            report.send("resubscribed").ok();
            // The channel closing ends the ticks.
            assert!(
                c.changed().await.is_err(),
                "the relay's end reaches the stream"
            );
            assert_eq!(relays(), 0);
            report.send("closed").ok();
        });
        let wait = Duration::from_secs(10);
        let next = tokio::time::timeout(wait, reports.recv()).await;
        assert_eq!(next, Ok(Some("subscribed")));
        tx.send_replace(1);
        step_tx.send(()).ok();
        let next = tokio::time::timeout(wait, reports.recv()).await;
        assert_eq!(next, Ok(Some("resubscribed")));
        drop(tx);
        let next = tokio::time::timeout(wait, reports.recv()).await;
        assert_eq!(next, Ok(Some("closed")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_watch_sees_each_change_on_and_off_connection_threads() {
        use super::LocalWatch;
        use tokio::sync::watch;

        let (tx, rx) = watch::channel(0u32);
        let mut here = LocalWatch::new(rx.clone());
        assert!(here.ticks.is_none(), "not a connection thread");
        let threads = ConnectionThreads::for_current_runtime("test");
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        threads.run(async move {
            let mut there = LocalWatch::new(rx);
            assert!(there.ticks.is_some(), "a connection thread relays");
            while there.changed().await {
                let value = *there.borrow_and_update();
                seen_tx.send(value).ok();
            }
            seen_tx.send(u32::MAX).ok();
        });
        let wait = Duration::from_secs(10);
        for value in 1..=3 {
            tx.send_replace(value);
            assert!(here.changed().await);
            assert_eq!(*here.borrow_and_update(), value);
            // The relayed watch may skip a value only when a later one came first.
            let mut got = 0;
            while got != value {
                got = tokio::time::timeout(wait, seen.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert!(got <= value, "{got}");
            }
        }
        drop(tx);
        assert!(!here.changed().await, "the channel closed");
        let end = tokio::time::timeout(wait, seen.recv()).await.unwrap();
        assert_eq!(
            end,
            Some(u32::MAX),
            "the relayed watch ends with its channel"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_thread_runtimes_serve_connections_themselves() {
        let threads = ConnectionThreads::for_current_runtime("test");
        assert!(threads.is_empty());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let here = std::thread::current().id();
        threads.run(async move {
            tx.send(std::thread::current().id()).ok();
        });
        assert_eq!(rx.await.ok(), Some(here));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_threads_cancels_their_connections() {
        let threads = ConnectionThreads::for_current_runtime("test");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        threads.run(async move {
            let _held = tx;
            started_tx.send(()).ok();
            std::future::pending::<()>().await;
        });
        started_rx.await.expect("the connection starts");
        drop(threads);
        // The connection's future, and the sender it holds, are dropped with its thread.
        let closed = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(closed, Ok(None), "the connection is cancelled");
    }
}
