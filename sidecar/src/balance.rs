//! Endpoint selection for the outbound path: power of two choices (P2C) over a peak-EWMA latency
//! estimate, with failure accrual.
//!
//! The weighted backend pick (in `mesh_core::routing`) chooses a *service*; this module chooses
//! one of that service's *endpoints*. Two candidates are drawn at random and the cheaper one
//! wins, where cost = latency estimate × (requests in flight + 1). The latency estimate jumps
//! up at once to a slower sample (the "peak") and otherwise follows samples as an exponentially
//! weighted moving average whose weight decays with time; while an endpoint is not sampled its
//! estimate decays towards zero, so an endpoint that was slow once gets tried again later
//! instead of being starved forever. An endpoint never measured is assumed to take
//! [`DEFAULT_RTT`].
//!
//! Failure accrual takes endpoints that keep failing out of the pick: after
//! [`DEFAULT_CONSECUTIVE_FAILURES`] failures in a row (connection errors and 5xx responses), the
//! endpoint is *failing*. A failing endpoint gets no requests until its backoff passes; then
//! exactly one request is let through as a probe (ahead of the cost comparison, so recovery is
//! noticed even beside faster endpoints). A success makes it ready again; a failed
//! probe doubles the backoff, up to a maximum. When every endpoint of a service is failing, the
//! service counts as having no ready endpoints, so the weighted pick gives it weight 0.
//!
//! State is kept per endpoint address and outlives route and endpoint table updates, so a
//! discovery update does not reset what the proxy learned about an endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Latency assumed for an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the latency estimate's decay.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures after which an endpoint is taken out of the pick.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 7;
/// First wait before a failing endpoint is probed.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between probes of a failing endpoint.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Tunables of the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Latency assumed for an endpoint not yet measured.
    pub default_rtt: Duration,
    /// Time constant of the latency estimate's decay.
    pub decay: Duration,
    /// Failure accrual.
    pub accrual: FailureAccrual,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            default_rtt: DEFAULT_RTT,
            decay: DEFAULT_DECAY,
            accrual: FailureAccrual::default(),
        }
    }
}

/// When endpoints are taken out of the pick, and how they are probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureAccrual {
    /// Failures in a row that make an endpoint failing; 0 turns failure accrual off.
    pub consecutive_failures: u32,
    /// Wait before the first probe.
    pub min_backoff: Duration,
    /// Longest wait between probes; the wait doubles after each failed probe.
    pub max_backoff: Duration,
}

impl Default for FailureAccrual {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// How an attempt to an endpoint ended, as failure accrual and the latency estimate see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A 5xx response, or the connection broke after the request was sent.
    Failure,
    /// No connection could be made. A failure, but it says nothing about the endpoint's latency.
    ConnectFailure,
}

/// Whether an endpoint takes requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Health {
    Ready,
    /// Out of the pick until `retry_at`; then one probe at a time.
    Failing {
        retry_at: Instant,
        backoff: Duration,
        probing: bool,
    },
}

#[derive(Debug)]
struct EndpointState {
    /// Latency estimate in nanoseconds as of `updated`; `None` until the first sample.
    rtt_ns: Option<f64>,
    updated: Instant,
    pending: u32,
    failures: u32,
    health: Health,
}

impl EndpointState {
    fn new(now: Instant) -> Self {
        Self {
            rtt_ns: None,
            updated: now,
            pending: 0,
            failures: 0,
            health: Health::Ready,
        }
    }

    /// Whether the endpoint may be picked now, and whether that pick is a probe.
    fn pickable(&self, now: Instant) -> Option<bool> {
        match self.health {
            Health::Ready => Some(false),
            Health::Failing {
                retry_at, probing, ..
            } => (now >= retry_at && !probing).then_some(true),
        }
    }

    fn decay_weight(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / decay.as_secs_f64().max(f64::MIN_POSITIVE)).exp()
    }

    /// The latency estimate now: the last estimate decayed by the time since it was made.
    fn rtt_ns(&self, now: Instant, config: &BalanceConfig) -> f64 {
        match self.rtt_ns {
            None => config.default_rtt.as_secs_f64() * 1e9,
            Some(rtt) => rtt * self.decay_weight(now, config.decay),
        }
    }

    fn cost(&self, now: Instant, config: &BalanceConfig) -> f64 {
        self.rtt_ns(now, config) * f64::from(self.pending.saturating_add(1))
    }

    fn sample(&mut self, now: Instant, rtt: Duration, config: &BalanceConfig) {
        let sample = rtt.as_secs_f64() * 1e9;
        let next = match self.rtt_ns {
            None => sample,
            Some(prev) => {
                let w = self.decay_weight(now, config.decay);
                let current = prev * w;
                // Peak: a slower answer is believed at once; faster ones only gradually.
                if sample > current {
                    sample
                } else {
                    current + sample * (1.0 - w)
                }
            }
        };
        self.rtt_ns = Some(next);
        self.updated = now;
    }

    fn accrue(&mut self, now: Instant, outcome: Outcome, probe: bool, accrual: &FailureAccrual) {
        if outcome == Outcome::Success {
            self.failures = 0;
            self.health = Health::Ready;
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if accrual.consecutive_failures == 0 {
            return;
        }
        match self.health {
            Health::Ready if self.failures >= accrual.consecutive_failures => {
                self.health = Health::Failing {
                    retry_at: now + accrual.min_backoff,
                    backoff: accrual.min_backoff,
                    probing: false,
                };
            }
            Health::Failing { backoff, .. } if probe => {
                let backoff = (backoff * 2).min(accrual.max_backoff);
                self.health = Health::Failing {
                    retry_at: now + backoff,
                    backoff,
                    probing: false,
                };
            }
            // Requests that were in flight when the endpoint became failing say nothing new.
            _ => {}
        }
    }
}

/// Picks endpoints and learns from how attempts to them end. Cheap to share: one per proxy.
#[derive(Debug, Default)]
pub struct Balancer {
    config: BalanceConfig,
    endpoints: Mutex<BTreeMap<SocketAddr, Arc<Mutex<EndpointState>>>>,
}

/// Locks a mutex; a panic while holding it leaves plain numbers behind, which are still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Balancer {
    /// A balancer with `config`.
    pub fn new(config: BalanceConfig) -> Self {
        Self {
            config,
            endpoints: Mutex::default(),
        }
    }

    fn states(&self, addrs: &[SocketAddr], now: Instant) -> Vec<Arc<Mutex<EndpointState>>> {
        let mut map = lock(&self.endpoints);
        addrs
            .iter()
            .map(|a| {
                map.entry(*a)
                    .or_insert_with(|| Arc::new(Mutex::new(EndpointState::new(now))))
                    .clone()
            })
            .collect()
    }

    /// Whether any of `addrs` may be picked now (ready, or failing and due for a probe).
    pub fn any_ready(&self, addrs: &[SocketAddr], now: Instant) -> bool {
        let map = lock(&self.endpoints);
        addrs
            .iter()
            .any(|a| map.get(a).is_none_or(|s| lock(s).pickable(now).is_some()))
    }

    /// Picks one of `addrs` by P2C over cost; `None` when all of them are failing. `roll` draws
    /// a random index below its argument (so tests can fix the draws). The returned handle
    /// counts the request as pending until it is finished or dropped.
    pub fn pick(
        &self,
        addrs: &[SocketAddr],
        now: Instant,
        mut roll: impl FnMut(usize) -> usize,
    ) -> Option<InFlight> {
        let states = self.states(addrs, now);
        let candidates: Vec<(usize, bool)> = states
            .iter()
            .enumerate()
            .filter_map(|(i, s)| lock(s).pickable(now).map(|probe| (i, probe)))
            .collect();
        // A failing endpoint due for its probe gets it, whatever its cost: otherwise a
        // recovered endpoint could wait long behind fast ready ones before anyone noticed.
        let due = candidates.iter().find(|(_, probe)| *probe).copied();
        let (index, _) = match (due, candidates.len()) {
            (_, 0) => return None,
            (Some(due), _) => due,
            (None, 1) => candidates[0],
            (None, n) => {
                let a = roll(n);
                // A second draw among the others, so the two candidates differ.
                let b = (a + 1 + roll(n - 1)) % n;
                let cost = |c: usize| lock(&states[candidates[c].0]).cost(now, &self.config);
                if cost(b) < cost(a) {
                    candidates[b]
                } else {
                    candidates[a]
                }
            }
        };
        let state = states[index].clone();
        let probe = {
            let mut s = lock(&state);
            // Re-checked under the lock: another request may have taken the probe meanwhile.
            let probe = s.pickable(now)?;
            if let Health::Failing { probing, .. } = &mut s.health {
                *probing = true;
            }
            s.pending = s.pending.saturating_add(1);
            probe
        };
        Some(InFlight {
            addr: addrs[index],
            state,
            config: self.config,
            started: now,
            probe,
            finished: false,
        })
    }

    /// Forgets endpoints that `keep` rejects, so the state does not grow with endpoint churn.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        lock(&self.endpoints).retain(|a, _| keep(a));
    }

    /// The latency estimate and health of an endpoint, for tests and debugging.
    pub fn describe(&self, addr: &SocketAddr, now: Instant) -> Option<(Duration, bool)> {
        let map = lock(&self.endpoints);
        let s = lock(map.get(addr)?);
        let rtt = Duration::from_secs_f64(s.rtt_ns(now, &self.config) / 1e9);
        Some((rtt, s.health == Health::Ready))
    }
}

/// An attempt to an endpoint in progress: counted as pending until finished or dropped.
#[derive(Debug)]
pub struct InFlight {
    addr: SocketAddr,
    state: Arc<Mutex<EndpointState>>,
    config: BalanceConfig,
    started: Instant,
    probe: bool,
    finished: bool,
}

impl InFlight {
    /// The endpoint picked.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records how the attempt ended, at `now`.
    pub fn finish(mut self, outcome: Outcome, now: Instant) {
        self.finished = true;
        let mut s = lock(&self.state);
        s.pending = s.pending.saturating_sub(1);
        if outcome != Outcome::ConnectFailure {
            s.sample(
                now,
                now.saturating_duration_since(self.started),
                &self.config,
            );
        }
        s.accrue(now, outcome, self.probe, &self.config.accrual);
    }
}

impl Drop for InFlight {
    /// An attempt dropped unfinished was cut off (the route timeout fired, or the client went
    /// away). How long it had taken so far still says the endpoint is at least that slow, but it
    /// is not counted for or against failure accrual; a cut-off probe frees the probe slot.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let now = Instant::now();
        let mut s = lock(&self.state);
        s.pending = s.pending.saturating_sub(1);
        let took = now.saturating_duration_since(self.started);
        if s.rtt_ns(now, &self.config) < took.as_secs_f64() * 1e9 {
            s.sample(now, took, &self.config);
        }
        if let Health::Failing { probing, .. } = &mut s.health
            && self.probe
        {
            *probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(n: usize) -> usize {
        fastrand::usize(..n)
    }

    fn mk_addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect()
    }

    fn mk_balancer(consecutive_failures: u32) -> Balancer {
        Balancer::new(BalanceConfig {
            accrual: FailureAccrual {
                consecutive_failures,
                ..FailureAccrual::default()
            },
            ..BalanceConfig::default()
        })
    }

    /// Runs one attempt that takes `rtt` and ends with `outcome`; returns the endpoint picked.
    fn attempt(
        b: &Balancer,
        addrs: &[SocketAddr],
        now: Instant,
        rtt: Duration,
        outcome: Outcome,
    ) -> Option<SocketAddr> {
        let pick = b.pick(addrs, now, rnd)?;
        let addr = pick.addr();
        pick.finish(outcome, now + rtt);
        Some(addr)
    }

    #[test]
    fn unmeasured_endpoints_cost_the_default_rtt_and_pending_multiplies_cost() {
        let b = Balancer::default();
        let addrs = mk_addrs(2);
        let now = Instant::now();
        let (rtt, ready) = {
            b.states(&addrs, now);
            b.describe(&addrs[0], now).unwrap()
        };
        assert_eq!(rtt, DEFAULT_RTT);
        assert!(ready);
        // Two requests held open on whichever endpoint comes first: the other one is cheaper.
        let first = b.pick(&addrs, now, |_| 0).unwrap();
        let second = b.pick(&addrs, now, |_| 0).unwrap();
        assert_ne!(first.addr(), second.addr(), "pending requests add cost");
    }

    #[test]
    fn the_faster_endpoint_wins_and_a_slow_one_is_tried_again_once_its_peak_decays() {
        let b = Balancer::default();
        let addrs = mk_addrs(2);
        let start = Instant::now();
        // Measure both: endpoint 0 takes 1 ms, endpoint 1 takes 50 ms.
        let rtt = |a: SocketAddr| {
            if a == addrs[0] {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(50)
            }
        };
        let mut now = start;
        // The slow one is measured first: were the fast one measured first, the unmeasured slow
        // one (default RTT) would never be picked and never get an estimate to decay.
        let pick = b.pick(&addrs[1..], now, rnd).unwrap();
        pick.finish(Outcome::Success, now + rtt(addrs[1]));
        let mut counts = [0u32; 2];
        for _ in 0..1000 {
            let pick = b.pick(&addrs, now, rnd).unwrap();
            let a = pick.addr();
            pick.finish(Outcome::Success, now + rtt(a));
            counts[usize::from(a != addrs[0])] += 1;
            now += Duration::from_millis(2);
        }
        assert!(counts[0] >= 998, "fast endpoint got {counts:?}");
        // Unsampled for a minute, the slow endpoint's estimate has decayed below the fast one's.
        let (slow, _) = b
            .describe(&addrs[1], now + Duration::from_secs(60))
            .unwrap();
        assert!(slow < Duration::from_millis(1), "{slow:?}");
    }

    #[test]
    fn a_slower_sample_is_believed_at_once_a_faster_one_gradually() {
        let b = Balancer::default();
        let addrs = mk_addrs(1);
        let now = Instant::now();
        attempt(&b, &addrs, now, Duration::from_millis(10), Outcome::Success);
        let t1 = now + Duration::from_millis(10);
        attempt(&b, &addrs, t1, Duration::from_millis(80), Outcome::Success);
        let t2 = t1 + Duration::from_millis(80);
        let (rtt, _) = b.describe(&addrs[0], t2).unwrap();
        assert_eq!(rtt.as_millis(), 80, "peak");
        attempt(&b, &addrs, t2, Duration::from_millis(1), Outcome::Success);
        let (rtt, _) = b
            .describe(&addrs[0], t2 + Duration::from_millis(1))
            .unwrap();
        assert!(rtt > Duration::from_millis(70), "{rtt:?}");
    }

    #[test]
    fn consecutive_failures_take_an_endpoint_out_until_a_probe_succeeds() {
        let b = mk_balancer(3);
        let addrs = mk_addrs(1);
        let now = Instant::now();
        let ms = Duration::from_millis;
        // Failures interrupted by a success do not accrue.
        for outcome in [Outcome::Failure, Outcome::Failure, Outcome::Success] {
            attempt(&b, &addrs, now, ms(1), outcome).unwrap();
        }
        for _ in 0..3 {
            attempt(&b, &addrs, now, ms(1), Outcome::ConnectFailure).unwrap();
        }
        let t = now + ms(1);
        assert!(b.pick(&addrs, t, rnd).is_none(), "failing");
        assert!(!b.any_ready(&addrs, t));

        // After the backoff, one probe at a time; it fails, and the backoff doubles.
        let t = now + DEFAULT_MIN_BACKOFF + ms(2);
        let probe = b.pick(&addrs, t, rnd).unwrap();
        assert!(b.pick(&addrs, t, rnd).is_none(), "one probe at a time");
        probe.finish(Outcome::ConnectFailure, t);
        assert!(b.pick(&addrs, t + DEFAULT_MIN_BACKOFF, rnd).is_none());
        let t = t + DEFAULT_MIN_BACKOFF * 2;
        // A probe cut off by a timeout frees the slot without changing the backoff.
        drop(b.pick(&addrs, t, rnd).unwrap());
        let probe = b.pick(&addrs, t, rnd).unwrap();
        probe.finish(Outcome::Success, t);
        assert!(b.describe(&addrs[0], t).unwrap().1, "ready again");
        assert!(b.pick(&addrs, t, rnd).is_some());
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let b = mk_balancer(1);
        let addrs = mk_addrs(1);
        let mut t = Instant::now();
        attempt(&b, &addrs, t, Duration::ZERO, Outcome::Failure).unwrap();
        let mut backoff = DEFAULT_MIN_BACKOFF;
        let mut waits = vec![];
        for _ in 0..10 {
            // Not yet due just before the backoff ends; due when it does.
            assert!(
                b.pick(&addrs, t + backoff - Duration::from_millis(1), rnd)
                    .is_none()
            );
            t += backoff;
            waits.push(backoff.as_secs());
            attempt(&b, &addrs, t, Duration::ZERO, Outcome::Failure).unwrap();
            backoff = (backoff * 2).min(DEFAULT_MAX_BACKOFF);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }

    #[test]
    fn failing_endpoints_are_skipped_while_others_are_ready() {
        let b = mk_balancer(2);
        let addrs = mk_addrs(3);
        let now = Instant::now();
        for _ in 0..2 {
            b.pick(&addrs[..1], now, rnd)
                .unwrap()
                .finish(Outcome::Failure, now);
        }
        for _ in 0..100 {
            let a = attempt(&b, &addrs, now, Duration::ZERO, Outcome::Success).unwrap();
            assert_ne!(a, addrs[0]);
        }
        assert!(b.any_ready(&addrs, now));

        // Once due, the failing endpoint gets exactly one probe, even though it costs more.
        let later = now + DEFAULT_MIN_BACKOFF;
        let picks: Vec<InFlight> = (0..10)
            .map(|_| b.pick(&addrs, later, rnd).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|p| p.addr() == addrs[0]).count(), 1);
    }

    #[test]
    fn zero_consecutive_failures_turns_accrual_off() {
        let b = mk_balancer(0);
        let addrs = mk_addrs(1);
        let now = Instant::now();
        for _ in 0..100 {
            attempt(&b, &addrs, now, Duration::ZERO, Outcome::Failure).unwrap();
        }
    }
}
