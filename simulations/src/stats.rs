//! Summary statistics for the report, and the Mann-Whitney U test the Kayenta-style baseline
//! uses. Small and exact enough to check by hand; see the tests.

use statrs::distribution::{ContinuousCDF, Normal};

/// The q-quantile of `values` by linear interpolation between order statistics (the common
/// "type 7" definition: the median of `[1, 2, 3, 4]` is 2.5). `None` for no values.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor();
    let i = usize::try_from(crate::traffic::to_u64(lo))
        .unwrap_or(v.len() - 1)
        .min(v.len() - 1);
    let frac = h - lo;
    let next = v.get(i + 1).copied().unwrap_or(v[i]);
    Some(v[i] + (next - v[i]) * frac)
}

/// The median of `values`.
pub fn median(values: &[f64]) -> Option<f64> {
    quantile(values, 0.5)
}

/// Wilson score interval for `k` successes in `n` trials at the given two-sided confidence
/// (e.g. 0.95): `(low, high)`. For `n = 0` the interval is `(0, 1)`.
pub fn wilson(k: u64, n: u64, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = Normal::standard().inverse_cdf(1.0 - (1.0 - confidence) / 2.0);
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mann-Whitney U test of `a` against `b`, two-sided, with mid-ranks for ties and the
/// tie-corrected normal approximation with continuity correction. Returns `(U of a, p)`.
/// `None` when either sample is empty.
pub fn mann_whitney(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&x| (x, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        rank_sum_a += rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let nn = n1 + n2;
    let var = n1 * n2 / 12.0 * ((nn + 1.0) - tie_term / (nn * (nn - 1.0)));
    if var <= 0.0 {
        return Some((u, 1.0));
    }
    let z = ((u - mean).abs() - 0.5).max(0.0) / var.sqrt();
    let p = 2.0 * (1.0 - Normal::standard().cdf(z));
    Some((u, p.min(1.0)))
}

/// P(X >= k) for X ~ Binomial(n, p).
pub fn binomial_at_least(k: u64, n: u64, p: f64) -> f64 {
    let mut total = 0.0;
    let mut choose = 1.0;
    for i in 0..=n {
        if i > 0 {
            choose *= (n - i + 1) as f64 / i as f64;
        }
        if i >= k {
            total += choose * p.powf(i as f64) * (1.0 - p).powf((n - i) as f64);
        }
    }
    total.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_tiny_known_input() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(median(&v), Some(2.5));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        // h = 3 * 0.95 = 2.85: 3 + 0.85 * (4 - 3).
        assert!((quantile(&v, 0.95).unwrap() - 3.85).abs() < 1e-12);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn wilson_interval_matches_the_textbook_value() {
        // 10 of 100 at 95 %: (0.0552, 0.1744).
        let (lo, hi) = wilson(10, 100, 0.95);
        assert!((lo - 0.0552).abs() < 1e-3, "{lo}");
        assert!((hi - 0.1744).abs() < 1e-3, "{hi}");
        let (lo, hi) = wilson(0, 1000, 0.95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.00383).abs() < 1e-4, "{hi}");
    }

    #[test]
    fn mann_whitney_on_a_tiny_known_input() {
        // Completely separated samples of 3: U = 0 for the smaller one.
        let (u, p) = mann_whitney(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert_eq!(u, 0.0);
        // Normal approximation: z = (4.5 - 0.5) / sqrt(5.25) = 1.7457, p = 0.0809.
        assert!((p - 0.0809).abs() < 1e-3, "{p}");
        // Identical samples: no evidence at all.
        let (_, p) = mann_whitney(&[1.0, 1.0, 2.0], &[1.0, 1.0, 2.0]).unwrap();
        assert!(p > 0.99, "{p}");
        assert!(mann_whitney(&[], &[1.0]).is_none());
    }

    #[test]
    fn binomial_tail_of_a_tiny_known_input() {
        // Two fair coins: P(at least one head) = 3/4, P(two) = 1/4.
        assert!((binomial_at_least(1, 2, 0.5) - 0.75).abs() < 1e-12);
        assert!((binomial_at_least(2, 2, 0.5) - 0.25).abs() < 1e-12);
        assert!((binomial_at_least(0, 3, 0.2) - 1.0).abs() < 1e-12);
        assert_eq!(binomial_at_least(4, 3, 0.9), 0.0);
    }
}
