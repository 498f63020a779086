//! Running strategies over scenarios and seeds on all cores, and summarising the outcomes.
//! Each rollout has its own random stream, and results are gathered in seed order, so the
//! figures do not depend on the number of threads or on scheduling.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::scenario::Scenario;
use crate::stats;
use crate::strategy::{Decision, Outcome, Strategy};

/// Seeds per work item handed to a thread.
const CHUNK: u64 = 100;

/// Canary requests below which a promotion counts as "on too little evidence". A fixed bar, so
/// that changing the judge does not move it: the judge's `min_samples` before it was lowered to
/// 100, and twice what the sequential tests now need to conclude.
pub const FEW_REQUESTS: u64 = 200;

/// Outcomes of one strategy on one scenario, one per seed, in seed order.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The strategy's name.
    pub strategy: String,
    /// The scenario's name.
    pub scenario: String,
    /// One outcome per seed.
    pub outcomes: Vec<Outcome>,
}

/// Runs every strategy on every scenario for seeds `0..seeds`, on `threads` threads.
pub fn matrix(
    strategies: &[Strategy],
    scenarios: &[Scenario],
    seeds: u64,
    threads: usize,
) -> Vec<Cell> {
    let cells: Vec<(usize, usize)> = (0..strategies.len())
        .flat_map(|i| (0..scenarios.len()).map(move |j| (i, j)))
        .collect();
    let chunks = seeds.div_ceil(CHUNK);
    let tasks: Vec<(usize, u64)> = (0..cells.len())
        .flat_map(|c| (0..chunks).map(move |k| (c, k)))
        .collect();
    let results: Mutex<Vec<Option<Vec<Outcome>>>> = Mutex::new(vec![None; tasks.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(cell, chunk)) = tasks.get(i) else {
                        break;
                    };
                    let (si, sj) = cells[cell];
                    let from = chunk * CHUNK;
                    let to = (from + CHUNK).min(seeds);
                    let out: Vec<Outcome> = (from..to)
                        .map(|seed| strategies[si].run(&scenarios[sj], seed))
                        .collect();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(out);
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default().into_iter();
    cells
        .iter()
        .map(|&(si, sj)| {
            let outcomes = results
                .by_ref()
                .take(usize::try_from(chunks).unwrap_or(0))
                .flatten()
                .flatten()
                .collect();
            Cell {
                strategy: strategies[si].name.clone(),
                scenario: scenarios[sj].name.to_string(),
                outcomes,
            }
        })
        .collect()
}

/// The figures of one cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The strategy's name.
    pub strategy: String,
    /// The scenario's name.
    pub scenario: String,
    /// Rollouts simulated.
    pub runs: u64,
    /// Rolled back because the analysis failed.
    pub rollbacks: u64,
    /// Promoted.
    pub promotions: u64,
    /// Stopped without a verdict (deadline with only inconclusive ticks, or paused).
    pub inconclusive: u64,
    /// Not decided within the horizon.
    pub undecided: u64,
    /// Median seconds from the canary's first traffic to any decision.
    pub decision_s_median: Option<f64>,
    /// 95th percentile of the same.
    pub decision_s_p95: Option<f64>,
    /// Median seconds to promotion, over promoted rollouts.
    pub promote_s_median: Option<f64>,
    /// Median failed requests served by the canary before the decision.
    pub blast_failed_median: f64,
    /// Mean of the same.
    pub blast_failed_mean: f64,
    /// Promotions with fewer than [`FEW_REQUESTS`] canary requests seen.
    pub promoted_on_few: u64,
    /// Fewest canary requests behind any promotion.
    pub min_promote_requests: Option<u64>,
    /// Every decision time, for plots.
    pub decision_times: Vec<f64>,
}

impl Summary {
    /// Summarises a cell.
    pub fn of(cell: &Cell) -> Self {
        let o = &cell.outcomes;
        let count = |d: Decision| o.iter().filter(|x| x.decision == d).count() as u64;
        let decision_times: Vec<f64> = o.iter().filter_map(|x| x.decision_s).collect();
        let promote_times: Vec<f64> = o
            .iter()
            .filter(|x| x.decision == Decision::Promote)
            .filter_map(|x| x.decision_s)
            .collect();
        let blast: Vec<f64> = o.iter().map(|x| x.blast_failed as f64).collect();
        let promoted = o.iter().filter(|x| x.decision == Decision::Promote);
        Self {
            strategy: cell.strategy.clone(),
            scenario: cell.scenario.clone(),
            runs: o.len() as u64,
            rollbacks: count(Decision::Rollback),
            promotions: count(Decision::Promote),
            inconclusive: count(Decision::Inconclusive),
            undecided: count(Decision::Undecided),
            decision_s_median: stats::median(&decision_times),
            decision_s_p95: stats::quantile(&decision_times, 0.95),
            promote_s_median: stats::median(&promote_times),
            blast_failed_median: stats::median(&blast).unwrap_or(0.0),
            blast_failed_mean: if blast.is_empty() {
                0.0
            } else {
                blast.iter().sum::<f64>() / blast.len() as f64
            },
            promoted_on_few: promoted
                .clone()
                .filter(|x| x.canary_requests < FEW_REQUESTS)
                .count() as u64,
            min_promote_requests: promoted.map(|x| x.canary_requests).min(),
            decision_times,
        }
    }

    /// P(rollback on a failed analysis).
    pub fn p_rollback(&self) -> f64 {
        ratio(self.rollbacks, self.runs)
    }

    /// P(promote).
    pub fn p_promote(&self) -> f64 {
        ratio(self.promotions, self.runs)
    }

    /// P(no verdict).
    pub fn p_inconclusive(&self) -> f64 {
        ratio(self.inconclusive + self.undecided, self.runs)
    }

    /// The row of `results.json`.
    pub fn row(&self) -> Row {
        Row {
            strategy: self.strategy.clone(),
            scenario: self.scenario.clone(),
            p_rollback: self.p_rollback(),
            p_promote: self.p_promote(),
            decision_s_median: self.decision_s_median,
            decision_s_p95: self.decision_s_p95,
            blast_failed_median: self.blast_failed_median,
        }
    }
}

fn ratio(k: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { k as f64 / n as f64 }
}

/// One entry of `results.json`, with exactly the fields.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Strategy name.
    pub strategy: String,
    /// Scenario name.
    pub scenario: String,
    /// P(rollback).
    pub p_rollback: f64,
    /// P(promote).
    pub p_promote: f64,
    /// Median seconds from first canary traffic to the decision; null if nothing was decided.
    pub decision_s_median: Option<f64>,
    /// 95th percentile of the same.
    pub decision_s_p95: Option<f64>,
    /// Median failed requests served by the canary before the decision.
    pub blast_failed_median: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(decision: Decision, s: f64, failed: u64, requests: u64) -> Outcome {
        Outcome {
            decision,
            decision_s: Some(s),
            blast_failed: failed,
            canary_requests: requests,
        }
    }

    #[test]
    fn summary_of_a_tiny_known_cell() {
        let cell = Cell {
            strategy: "s".into(),
            scenario: "x".into(),
            outcomes: vec![
                mk(Decision::Rollback, 10.0, 4, 100),
                mk(Decision::Promote, 30.0, 1, 150),
                mk(Decision::Promote, 40.0, 0, 900),
                mk(Decision::Inconclusive, 60.0, 2, 50),
            ],
        };
        let s = Summary::of(&cell);
        assert_eq!(s.runs, 4);
        assert_eq!(s.p_rollback(), 0.25);
        assert_eq!(s.p_promote(), 0.5);
        assert_eq!(s.p_inconclusive(), 0.25);
        assert_eq!(s.decision_s_median, Some(35.0));
        // h = 3 * 0.95 = 2.85 between 40 and 60.
        assert!((s.decision_s_p95.unwrap() - 57.0).abs() < 1e-9);
        assert_eq!(s.promote_s_median, Some(35.0));
        assert_eq!(s.blast_failed_median, 1.5);
        assert_eq!(s.blast_failed_mean, 1.75);
        assert_eq!(s.promoted_on_few, 1);
        assert_eq!(s.min_promote_requests, Some(150));
        let row = serde_json::to_value(s.row()).unwrap();
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "blast_failed_median",
                "decision_s_median",
                "decision_s_p95",
                "p_promote",
                "p_rollback",
                "scenario",
                "strategy"
            ]
        );
    }
}
