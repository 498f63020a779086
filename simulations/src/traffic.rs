//! Synthetic proxy metrics. A [`World`] produces, second by second, what the callers' proxies
//! count for the canary and the primary: requests, failures and a latency histogram with
//! Linkerd's buckets. Strategies read windows of these counts the way the metric sources deliver
//! them ([`World::window`] builds the same [`Window`] the direct scrape and Prometheus sources
//! return).
//!
//! Counts are drawn in aggregate per second and arm: requests ~ Poisson(rate x share), failures
//! ~ Binomial(requests, p), latency buckets ~ Multinomial(requests, bucket masses of a
//! log-normal). That is exact for independent requests, and cheap enough to run a million
//! rollouts on two cores.

use mesh_rollout_controller::judge::{ArmWindow, Histogram, Window};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution, Poisson};
use statrs::distribution::{ContinuousCDF, LogNormal};

use crate::scenario::{Bursts, Delays, Gaps, Scenario};

/// Linkerd's latency bucket bounds in milliseconds, as the proxy exports them.
pub const BOUNDS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];
/// Buckets per histogram: the bounds above plus `+Inf`.
pub const BUCKETS: usize = BOUNDS_MS.len() + 1;
/// Longest simulated rollout, in seconds. Schedules (bursts, outages) are drawn this far ahead.
pub const HORIZON_S: u64 = 3_600;

/// One arm's traffic in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArmSecond {
    /// Requests answered.
    pub requests: u32,
    /// Of those, failures.
    pub failures: u32,
    /// Requests per latency bucket (not cumulative).
    pub latency: [u32; BUCKETS],
}

/// Both arms in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Second {
    /// The canary.
    pub canary: ArmSecond,
    /// The primary (or, for the Kayenta-style strategy, the baseline).
    pub primary: ArmSecond,
}

/// Mixes numbers into one seed (SplitMix64 finaliser), so runs get independent streams.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// A stable number for a name (FNV-1a), to seed per-scenario and per-strategy streams.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Probability mass of each latency bucket for a log-normal with the given median and p99.
pub fn bucket_masses(median_ms: f64, p99_ms: f64) -> [f64; BUCKETS] {
    // z of the 99th percentile of a standard normal.
    const Z99: f64 = 2.326_347_874_040_841;
    let sigma = (p99_ms / median_ms).ln() / Z99;
    let mut masses = [0.0; BUCKETS];
    let Ok(dist) = LogNormal::new(median_ms.ln(), sigma) else {
        masses[BUCKETS - 1] = 1.0;
        return masses;
    };
    let mut below = 0.0;
    for (i, bound) in BOUNDS_MS.iter().enumerate() {
        let c = dist.cdf(*bound);
        masses[i] = (c - below).max(0.0);
        below = c;
    }
    masses[BUCKETS - 1] = (1.0 - below).max(0.0);
    masses
}

/// Probability mass of each latency bucket for a log-normal latency (median, p99) plus an
/// independent log-normal delay (median, p99): the delay is integrated over its quantiles.
pub fn delayed_masses(median_ms: f64, p99_ms: f64, delay: &Delays) -> [f64; BUCKETS] {
    // Quantile points of the delay; 400 keeps each bucket's mass within about 0.1 %.
    const POINTS: u32 = 400;
    const Z99: f64 = 2.326_347_874_040_841;
    let mut masses = [0.0; BUCKETS];
    let sigma = (p99_ms / median_ms).ln() / Z99;
    let dsigma = (delay.p99_ms / delay.median_ms).ln() / Z99;
    let (Ok(own), Ok(added)) = (
        LogNormal::new(median_ms.ln(), sigma),
        LogNormal::new(delay.median_ms.ln(), dsigma),
    ) else {
        return bucket_masses(median_ms, p99_ms);
    };
    let delays: Vec<f64> = (0..POINTS)
        .map(|i| added.inverse_cdf((f64::from(i) + 0.5) / f64::from(POINTS)))
        .collect();
    let mut below = 0.0;
    for (i, bound) in BOUNDS_MS.iter().enumerate() {
        let c = delays
            .iter()
            .map(|d| if *bound > *d { own.cdf(bound - d) } else { 0.0 })
            .sum::<f64>()
            / f64::from(POINTS);
        masses[i] = (c - below).max(0.0);
        below = below.max(c);
    }
    masses[BUCKETS - 1] = (1.0 - below).max(0.0);
    masses
}

/// The canary's latency buckets: the primary's shape times the scenario's factor, with its slow
/// tail, if any, mixed in, and the scenario's shared delay, if given, added.
fn canary_masses(s: &Scenario, delay: Option<&Delays>) -> [f64; BUCKETS] {
    let f = s.canary_latency_factor;
    let shape = |median: f64, p99: f64| match delay {
        Some(d) => delayed_masses(median, p99, d),
        None => bucket_masses(median, p99),
    };
    let mut m = shape(s.median_ms * f, s.p99_ms * f);
    if let Some(tail) = s.canary_tail {
        let slow = shape(s.median_ms * tail.factor, s.p99_ms * tail.factor);
        for (a, b) in m.iter_mut().zip(slow) {
            *a = (1.0 - tail.share) * *a + tail.share * b;
        }
    }
    m
}

/// A non-negative, finite count or time held in an `f64` (a Poisson draw, a rounded start
/// time), as an integer. Negative or non-finite values become 0.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn to_u64(x: f64) -> u64 {
    // `as` saturates at the integer range; the guard keeps NaN and negatives at 0.
    if x.is_finite() && x > 0.0 {
        x as u64
    } else {
        0
    }
}

fn intervals(
    rng: &mut ChaCha8Rng,
    mean_gap_s: f64,
    len: impl Fn(&mut ChaCha8Rng) -> u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    // Start somewhere inside the first gap, so a rollout meets the process in its steady state.
    let mut t = -mean_gap_s * (1.0 - rng.random::<f64>()).ln() * rng.random::<f64>();
    while t < HORIZON_S as f64 {
        let start = t.max(0.0).round();
        let l = len(rng);
        out.push((to_u64(start), to_u64(start) + l));
        t = start + l as f64 - mean_gap_s * (1.0 - rng.random::<f64>()).ln();
    }
    out
}

fn bursts(rng: &mut ChaCha8Rng, b: &Bursts) -> Vec<(u64, u64)> {
    intervals(rng, b.mean_gap_s, |_| b.length_s)
}

fn outages(rng: &mut ChaCha8Rng, g: &Gaps) -> Vec<(u64, u64)> {
    intervals(rng, g.mean_gap_s, |r| r.random_range(g.min_s..=g.max_s))
}

fn inside(spans: &[(u64, u64)], t: u64) -> bool {
    spans.iter().any(|&(a, b)| a <= t && t < b)
}

/// The traffic of one simulated rollout.
#[derive(Debug)]
pub struct World {
    scenario: Scenario,
    rng: ChaCha8Rng,
    primary_latency: [f64; BUCKETS],
    canary_latency: [f64; BUCKETS],
    warm_latency: Option<(u64, [f64; BUCKETS])>,
    /// Both arms' latency buckets while the node is loaded.
    loaded_latency: Option<([f64; BUCKETS], [f64; BUCKETS])>,
    loaded: Vec<(u64, u64)>,
    canary_since: Option<u64>,
    canary_bursts: Vec<(u64, u64)>,
    shared_bursts: Vec<(u64, u64)>,
    outages: Vec<(u64, u64)>,
    day_phase: f64,
    /// Traffic of each second so far: index `t` holds second `[t, t + 1)`.
    pub history: Vec<Second>,
}

impl World {
    /// A world for `scenario`. The schedule of bursts, outages and time of day depends only on
    /// `(scenario, seed)`, so every strategy meets the same events for one seed; the request
    /// counts are drawn from `stream`, a strategy-specific seed.
    pub fn new(scenario: &Scenario, seed: u64, stream: u64) -> Self {
        let mut sched = ChaCha8Rng::seed_from_u64(mix(&[name_hash(scenario.name), seed]));
        let canary_bursts = scenario
            .canary_bursts
            .map(|b| bursts(&mut sched, &b))
            .unwrap_or_default();
        let shared_bursts = scenario
            .shared_bursts
            .map(|b| bursts(&mut sched, &b))
            .unwrap_or_default();
        let outages = scenario
            .gaps
            .map(|g| outages(&mut sched, &g))
            .unwrap_or_default();
        let day_phase = sched.random::<f64>();
        // Drawn after the time of day, so that adding load to a scenario leaves its other
        // events where they were.
        let loaded = scenario
            .shared_delays
            .map(|d| {
                intervals(&mut sched, d.mean_gap_s, |r| {
                    r.random_range(d.min_s..=d.max_s)
                })
            })
            .unwrap_or_default();
        Self {
            scenario: scenario.clone(),
            rng: ChaCha8Rng::seed_from_u64(mix(&[name_hash(scenario.name), seed, stream])),
            primary_latency: bucket_masses(scenario.median_ms, scenario.p99_ms),
            canary_latency: canary_masses(scenario, None),
            loaded_latency: scenario.shared_delays.map(|d| {
                (
                    canary_masses(scenario, Some(&d)),
                    delayed_masses(scenario.median_ms, scenario.p99_ms, &d),
                )
            }),
            loaded,
            warm_latency: scenario.canary_warmup.map(|(secs, tail)| {
                let with_tail = Scenario {
                    canary_tail: Some(tail),
                    ..scenario.clone()
                };
                (secs, canary_masses(&with_tail, None))
            }),
            canary_since: None,
            canary_bursts,
            shared_bursts,
            outages,
            day_phase,
            history: Vec::new(),
        }
    }

    /// The current time: seconds simulated so far.
    pub fn now(&self) -> u64 {
        self.history.len() as u64
    }

    /// Total request rate at second `t`.
    pub fn rate(&self, t: u64) -> f64 {
        match self.scenario.diurnal_amplitude {
            Some(a) => {
                let day = t as f64 / 86_400.0 + self.day_phase;
                self.scenario.rps * (1.0 + a * (std::f64::consts::TAU * day).sin())
            }
            None => self.scenario.rps,
        }
    }

    /// Whether the metrics source answers at second `t`.
    pub fn source_up(&self, t: u64) -> bool {
        !inside(&self.outages, t)
    }

    fn fail_probs(&self, t: u64) -> (f64, f64) {
        let s = &self.scenario;
        let mut canary = s.canary_fail;
        let mut primary = s.primary_fail;
        if let Some(b) = s.canary_bursts
            && inside(&self.canary_bursts, t)
        {
            canary = canary.max(b.fail);
        }
        if let Some(b) = s.shared_bursts
            && inside(&self.shared_bursts, t)
        {
            canary = canary.max(b.fail);
            primary = primary.max(b.fail);
        }
        if let Some(o) = s.shared_outage
            && (o.start_s..o.start_s + o.length_s).contains(&t)
        {
            canary = canary.max(o.fail);
            primary = primary.max(o.fail);
        }
        (canary, primary)
    }

    /// Simulates one more second with the given shares of the total traffic going to the canary
    /// and to the primary arm, and returns it.
    pub fn advance(&mut self, canary_share: f64, primary_share: f64) -> Second {
        let t = self.now();
        let rate = self.rate(t);
        let (pc, pp) = self.fail_probs(t);
        if canary_share > 0.0 && self.canary_since.is_none() {
            self.canary_since = Some(t);
        }
        let (canary_latency, primary_latency) = match self.loaded_latency {
            Some((canary, primary)) if inside(&self.loaded, t) => (canary, primary),
            _ => {
                let canary = match (self.warm_latency, self.canary_since) {
                    (Some((secs, warm)), Some(since)) if t < since + secs => warm,
                    _ => self.canary_latency,
                };
                (canary, self.primary_latency)
            }
        };
        let second = Second {
            canary: self.arm(rate * canary_share, pc, &canary_latency),
            primary: self.arm(rate * primary_share, pp, &primary_latency),
        };
        self.history.push(second);
        second
    }

    fn arm(&mut self, rate: f64, fail: f64, masses: &[f64; BUCKETS]) -> ArmSecond {
        let mut out = ArmSecond::default();
        if rate <= 0.0 {
            return out;
        }
        let n = match Poisson::new(rate) {
            Ok(p) => to_u64(p.sample(&mut self.rng)),
            Err(_) => 0,
        };
        if n == 0 {
            return out;
        }
        out.requests = u32::try_from(n).unwrap_or(u32::MAX);
        out.failures = u32::try_from(self.binomial(n, fail)).unwrap_or(u32::MAX);
        let mut remaining = n;
        let mut mass_left = 1.0;
        for (i, &m) in masses.iter().enumerate() {
            if remaining == 0 {
                break;
            }
            let k = if i == BUCKETS - 1 || mass_left <= m {
                remaining
            } else {
                self.binomial(remaining, (m / mass_left).clamp(0.0, 1.0))
            };
            out.latency[i] = u32::try_from(k).unwrap_or(u32::MAX);
            remaining -= k;
            mass_left -= m;
        }
        out
    }

    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if p <= 0.0 || n == 0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        Binomial::new(n, p).map_or(0, |b| b.sample(&mut self.rng))
    }

    /// Sums of the seconds `[from, to)` for both arms, as a judge window.
    pub fn window(&self, from: u64, to: u64) -> Window {
        let (c, p) = self.sum(from, to);
        Window {
            canary: arm_window(&c),
            primary: arm_window(&p),
        }
    }

    /// Raw sums of the seconds `[from, to)`.
    pub fn sum(&self, from: u64, to: u64) -> (Sums, Sums) {
        let mut c = Sums::default();
        let mut p = Sums::default();
        let to = usize::try_from(to.min(self.now())).unwrap_or(usize::MAX);
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        for s in self.history.iter().take(to).skip(from) {
            c.add(&s.canary);
            p.add(&s.primary);
        }
        (c, p)
    }
}

/// Counts of one arm over several seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    /// Requests.
    pub requests: u64,
    /// Failures.
    pub failures: u64,
    /// Requests per latency bucket (not cumulative).
    pub latency: [u64; BUCKETS],
}

impl Sums {
    /// Adds one second.
    pub fn add(&mut self, s: &ArmSecond) {
        self.requests += u64::from(s.requests);
        self.failures += u64::from(s.failures);
        for (a, b) in self.latency.iter_mut().zip(s.latency.iter()) {
            *a += u64::from(*b);
        }
    }

    /// The cumulative histogram the proxies export, `+Inf` last.
    pub fn histogram(&self) -> Histogram {
        let mut total = 0;
        let buckets = BOUNDS_MS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.latency.iter())
            .map(|(bound, n)| {
                total += n;
                (bound, total)
            })
            .collect();
        Histogram { buckets }
    }
}

fn arm_window(s: &Sums) -> ArmWindow {
    ArmWindow {
        requests: s.requests,
        failures: s.failures,
        latency: s.histogram(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{self, MEDIAN_MS, P99_MS};

    #[test]
    fn bucket_masses_sum_to_one_and_put_the_p99_near_100ms() {
        let m = bucket_masses(MEDIAN_MS, P99_MS);
        assert!((m.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // 100 ms is bucket index 10: 99 % of the mass lies at or below it.
        let below: f64 = m[..=10].iter().sum();
        assert!((below - 0.99).abs() < 1e-6, "{below}");
    }

    #[test]
    fn counts_match_the_rates() {
        let s = scenario::by_name("errors-5pct").unwrap();
        let mut w = World::new(&s, 1, 0);
        for _ in 0..600 {
            w.advance(0.1, 0.9);
        }
        let (c, p) = w.sum(0, 600);
        assert!((5_700..6_300).contains(&c.requests), "{}", c.requests);
        assert!((51_000..57_000).contains(&p.requests), "{}", p.requests);
        let share = c.failures as f64 / c.requests as f64;
        assert!((0.04..0.06).contains(&share), "{share}");
        assert_eq!(c.latency.iter().sum::<u64>(), c.requests);
        let h = w.window(0, 600).primary.latency;
        let p99 = h.quantile(0.99).unwrap();
        assert!((80.0..=110.0).contains(&p99), "{p99}");
    }

    #[test]
    fn a_shared_delay_moves_mass_up_on_both_arms() {
        let d = scenario::LOADED_NODE;
        let quiet = bucket_masses(5.0, 20.0);
        let loaded = delayed_masses(5.0, 20.0, &d);
        assert!((loaded.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        // Share above 20 ms (bucket index 6): 1 % quiet; with a 30 ms median delay most requests.
        let above = |m: &[f64; BUCKETS]| m[7..].iter().sum::<f64>();
        assert!((above(&quiet) - 0.01).abs() < 1e-3, "{}", above(&quiet));
        assert!(above(&loaded) > 0.6, "{}", above(&loaded));
        // A loaded scenario's schedule delays some seconds and leaves most alone.
        let s = scenario::by_name("latency-2x-loaded").unwrap();
        let mut w = World::new(&s, 3, 0);
        for _ in 0..3_600 {
            w.advance(0.5, 0.5);
        }
        let (_, p) = w.sum(0, 3_600);
        let share = p.latency[7..].iter().sum::<u64>() as f64 / p.requests as f64;
        assert!((0.02..0.2).contains(&share), "{share}");
    }
}
