//! `mesh-loadgen`: an open-loop HTTP load generator.
//!
//! Requests start on a fixed schedule whatever the responses do, as real users would: a slow
//! canary then shows up as latency and in-flight build-up instead of quietly lowering the
//! offered load (the coordinated-omission trap of closed-loop generators). Each request runs in
//! its own task; when `--max-in-flight` requests are outstanding a tick is counted as
//! `dropped` rather than queued, so the schedule never drifts.
//!
//! The schedule is kept by a [`Pacer`] on its own thread rather than by a Tokio interval:
//! Tokio's timer has millisecond granularity, which at 5,000 req/s would send bursts of five
//! every millisecond instead of one request every 200 µs. Latency is measured from the time the
//! schedule gave each request, not from when it was sent, so a generator that falls behind (a
//! busy machine) shows up in the numbers instead of hiding; how far behind it was is reported
//! separately (`lag_p99_us`).

use std::{
    io::Write,
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, RecvTimeoutError, TryRecvError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use tokio::{sync::Semaphore, time::MissedTickBehavior};

use crate::{
    HEADER_DOWNSTREAM_VERSION, HEADER_VERSION,
    app::parse_positive_duration,
    stats::{Report, Stats},
};

/// How report lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One readable line per report.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags of `mesh-loadgen`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-loadgen",
    about = "Sends HTTP requests at a constant rate and reports status, version and latency counts"
)]
pub struct LoadgenArgs {
    /// URL to request (through `HTTP_PROXY` when set).
    #[arg(long)]
    pub url: reqwest::Url,
    /// Requests per second.
    #[arg(long, default_value_t = 50.0, value_parser = parse_rate, allow_negative_numbers = true)]
    pub rate: f64,
    /// How long to run (e.g. `30s`) [default: until SIGTERM or Ctrl-C].
    #[arg(long, value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Send load for this long before measuring (e.g. `2s`), so connections are open and pools
    /// warm when counting starts; these requests appear in no report.
    #[arg(long, value_parser = parse_positive_duration)]
    pub warmup: Option<Duration>,
    /// Timeout of each request.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// Most requests outstanding at once (and so most connections open); ticks beyond it are
    /// counted as dropped.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Response header whose value counts as the version (falling back to `x-demo-version`).
    #[arg(long, default_value = HEADER_DOWNSTREAM_VERSION)]
    pub count_header: http::HeaderName,
    /// How often to print a report of the last interval.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub report_every: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Also write the latency of every measured response, in microseconds, one per line, to
    /// this file at the end, so runs can be merged for exact percentiles.
    #[arg(long)]
    pub samples: Option<std::path::PathBuf>,
}

/// Parses a positive, finite rate.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        // Below a billion per second, so the period stays at least a nanosecond.
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err("expected requests per second, greater than 0".to_string()),
    }
}

/// Counters for the current interval and the whole run, updated together.
#[derive(Debug, Default)]
struct Counters {
    interval: Stats,
    total: Stats,
    /// Every latency of the run in microseconds, kept only when `--samples` asks for them.
    samples: Option<Vec<u64>>,
}

impl Counters {
    fn both(&mut self, f: impl Fn(&mut Stats)) {
        f(&mut self.interval);
        f(&mut self.total);
    }
}

/// A configured load generator.
#[derive(Debug)]
pub struct Loadgen {
    args: LoadgenArgs,
    client: reqwest::Client,
}

impl Loadgen {
    /// Builds the HTTP client. It keeps reqwest's default proxy handling, so `HTTP_PROXY`
    /// sends the load through a sidecar.
    pub fn new(args: LoadgenArgs) -> Result<Self, reqwest::Error> {
        let client = crate::http_client_builder()
            .timeout(args.timeout)
            .pool_max_idle_per_host(usize::try_from(args.max_in_flight).unwrap_or(usize::MAX))
            .build()?;
        Ok(Self { args, client })
    }

    /// Sends load until the duration elapses or `shutdown` completes, writing a report line to
    /// `out` every interval and a final summary at the end. Requests in flight at the end are
    /// waited for (at most the request timeout), so in the summary every sent request is
    /// either a status or an error. Must be called inside a Tokio runtime, whose workers run
    /// the requests.
    pub async fn run(
        self,
        out: &mut impl Write,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<Report> {
        let Self { args, client } = self;
        let counters = Arc::new(Mutex::new(Counters {
            samples: args.samples.as_ref().map(|_| Vec::new()),
            ..Counters::default()
        }));
        let in_flight = Arc::new(Semaphore::new(
            usize::try_from(args.max_in_flight).unwrap_or(usize::MAX),
        ));

        let first_tick = Instant::now();
        // Reports and the run's duration count from the end of the warm-up.
        let start = first_tick + args.warmup.unwrap_or_default();
        let tokio_start = tokio::time::Instant::from_std(start);
        let runtime = tokio::runtime::Handle::current();
        let pacer = {
            let (counters, in_flight) = (counters.clone(), in_flight.clone());
            let (url, count_header) = (args.url.clone(), args.count_header.clone());
            Pacer::start(first_tick, args.rate, move |due| {
                let measured = due >= start;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    if measured {
                        locked(&counters).both(Stats::dropped);
                    }
                    return;
                };
                if measured {
                    locked(&counters).both(Stats::sent);
                }
                let request = client.get(url.clone());
                let counters = counters.clone();
                let count_header = count_header.clone();
                runtime.spawn(async move {
                    let started = Instant::now();
                    let outcome = send(request, &count_header).await;
                    let latency = Instant::now().saturating_duration_since(due);
                    if measured {
                        let mut c = locked(&counters);
                        c.both(|s| s.started_late(started.saturating_duration_since(due)));
                        match outcome {
                            Ok((status, version)) => {
                                c.both(|s| s.response(status, version.as_deref(), latency));
                                if let Some(samples) = &mut c.samples {
                                    samples.push(
                                        u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                                    );
                                }
                            }
                            Err(error) => {
                                tracing::debug!(%error, "request failed");
                                c.both(Stats::error);
                            }
                        }
                    }
                    drop(permit);
                });
            })?
        };

        let mut reports =
            tokio::time::interval_at(tokio_start + args.report_every, args.report_every);
        reports.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let end = async {
            match args.duration {
                Some(d) => tokio::time::sleep_until(tokio_start + d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end, shutdown);

        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = &mut end => break,
                _ = reports.tick() => {
                    let interval = std::mem::take(&mut locked(&counters).interval);
                    write_report(out, args.output, &interval.report(start.elapsed(), false))?;
                }
            }
        }
        // No tick after this point, so the permits below are the last ones handed out.
        if !matches!(
            tokio::task::spawn_blocking(move || pacer.stop()).await,
            Ok(Ok(()))
        ) {
            tracing::warn!("the pacer thread panicked");
        }

        // Every request holds a permit until it is counted; getting them all back means the
        // summary is complete. Each request ends within its timeout.
        let _all = in_flight.acquire_many(args.max_in_flight).await;
        let c = std::mem::take(&mut *locked(&counters));
        let elapsed = start.elapsed();
        if c.interval != Stats::default() {
            write_report(out, args.output, &c.interval.report(elapsed, false))?;
        }
        if let (Some(path), Some(samples)) = (&args.samples, &c.samples) {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
            for us in samples {
                writeln!(file, "{us}")?;
            }
            file.flush()?;
        }
        let summary = c.total.report(elapsed, true);
        write_report(out, args.output, &summary)?;
        Ok(summary)
    }
}

/// Calls a function at a constant rate on a thread of its own, with the time each call was due.
///
/// Calls run on the schedule `first + n / rate`. A thread sleeping to the next deadline wakes
/// within the kernel's timer slack (tens of microseconds), where Tokio's timer would round up
/// to the next millisecond. Deadlines missed while the thread was not running are caught up at
/// once, so the offered rate holds on average (as `MissedTickBehavior::Burst` did).
#[derive(Debug)]
pub struct Pacer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Pacer {
    /// Starts calling `tick` with each deadline, the first at `first`.
    pub fn start(
        first: Instant,
        rate: f64,
        mut tick: impl FnMut(Instant) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                for n in 0u64.. {
                    // From the start each time rather than adding periods, so rounding never
                    // accumulates into drift.
                    let due = first + Duration::from_secs_f64(n as f64 / rate);
                    let wait = due.saturating_duration_since(Instant::now());
                    // Waiting on the stop channel is the sleep, so a stop wakes the thread at
                    // once. Only "nothing before the deadline" goes on; a stop message or a
                    // dropped sender ends the schedule.
                    let stop_asked = if wait.is_zero() {
                        !matches!(stopped.try_recv(), Err(TryRecvError::Empty))
                    } else {
                        !matches!(stopped.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
                    };
                    if stop_asked {
                        return;
                    }
                    tick(due);
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the schedule and waits for the thread, which ends at once (or after the `tick`
    /// it is running); no call starts after this returns. Blocks, so async callers use
    /// `spawn_blocking`. Errors when a `tick` panicked.
    pub fn stop(self) -> std::thread::Result<()> {
        let _ = self.stop.send(());
        self.thread.join()
    }
}

fn locked(c: &Mutex<Counters>) -> std::sync::MutexGuard<'_, Counters> {
    // Counters are plain numbers; a task that panicked mid-update leaves them usable.
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends one request and reads the whole body (so the connection can be reused and the
/// latency covers the full response). Returns the status and the version header.
async fn send(
    request: reqwest::RequestBuilder,
    count_header: &http::HeaderName,
) -> Result<(u16, Option<String>), reqwest::Error> {
    let rsp = request.send().await?;
    let status = rsp.status().as_u16();
    let headers = rsp.headers();
    let version = headers
        .get(count_header)
        .or_else(|| headers.get(HEADER_VERSION))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    rsp.bytes().await?;
    Ok((status, version))
}

fn write_report(out: &mut impl Write, output: Output, report: &Report) -> std::io::Result<()> {
    match output {
        Output::Json => writeln!(out, "{}", report.to_json())?,
        Output::Text => writeln!(out, "{report}")?,
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Result<LoadgenArgs, clap::Error> {
        LoadgenArgs::try_parse_from(std::iter::once("mesh-loadgen").chain(flags.iter().copied()))
    }

    #[test]
    fn defaults() {
        let a = args(&["--url", "http://frontend.default:9898/"]).unwrap();
        assert_eq!(a.rate, 50.0);
        assert_eq!(a.duration, None);
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert_eq!(a.max_in_flight, 512);
        assert_eq!(a.count_header.as_str(), HEADER_DOWNSTREAM_VERSION);
        assert_eq!(a.report_every, Duration::from_secs(1));
        assert_eq!(a.output, Output::Text);
    }

    #[test]
    fn pacer_calls_on_the_schedule_never_early_and_stops() {
        let (tx, rx) = std::sync::mpsc::channel();
        let first = Instant::now();
        let pacer = Pacer::start(first, 2000.0, move |due| {
            let _ = tx.send((due, Instant::now()));
        })
        .unwrap();
        let calls: Vec<_> = rx.iter().take(20).collect();
        pacer.stop().unwrap();
        for (n, (due, called)) in calls.iter().enumerate() {
            assert_eq!(
                *due,
                first + Duration::from_micros(500 * n as u64),
                "call {n}"
            );
            assert!(called >= due, "call {n} came early");
        }
        // The thread has ended and dropped the sender: nothing more will come.
        while rx.try_recv().is_ok() {}
        assert!(rx.recv().is_err());
    }

    #[test]
    fn warmup_is_optional_and_positive() {
        assert_eq!(args(&["--url", "http://x/"]).unwrap().warmup, None);
        let a = args(&["--url", "http://x/", "--warmup", "2s"]).unwrap();
        assert_eq!(a.warmup, Some(Duration::from_secs(2)));
        assert!(args(&["--url", "http://x/", "--warmup", "0s"]).is_err());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flags, name) in [
            (&["--rate", "0"][..], "--rate"),
            (&["--rate", "-5"][..], "--rate"),
            (&["--rate", "fast"][..], "--rate"),
            (&["--duration", "2"][..], "--duration"),
            (&["--report-every", "0s"][..], "--report-every"),
            (&["--max-in-flight", "0"][..], "--max-in-flight"),
            (&["--output", "xml"][..], "--output"),
        ] {
            let flags: Vec<_> = ["--url", "http://x/"]
                .iter()
                .chain(flags)
                .copied()
                .collect();
            let e = args(&flags).unwrap_err();
            assert!(e.to_string().contains(name), "{flags:?}: {e}");
        }
        assert!(args(&[]).unwrap_err().to_string().contains("--url"));
    }
}
