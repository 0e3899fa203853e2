//! Samples and what the report says about them: min, median and p99 (nearest rank), and
//! the ratio of two medians. Units are whatever the samples are in (ns for latencies).

/// Min, median and p99 of a sample set, nearest-rank (no interpolation: every figure is a
/// sample that was actually measured).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The smallest.
    pub min: f64,
    /// The nearest-rank median (the lower one for an even count).
    pub median: f64,
    /// The nearest-rank 99th percentile.
    pub p99: f64,
}

/// The `q`-quantile (0 < q ≤ 1) of sorted samples, nearest rank: the smallest sample with at
/// least `q · n` samples at or below it.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = (q * n as f64).ceil();
    // rank is in 1..=n for 0 < q ≤ 1; clamp anyway so a q outside that cannot index out.
    let mut i = 0;
    while i + 1 < n && ((i + 1) as f64) < rank {
        i += 1;
    }
    sorted[i]
}

/// Summarises `samples` (sorted in place); `None` for an empty set or one with a NaN.
pub fn summarize(samples: &mut [f64]) -> Option<Summary> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    Some(Summary {
        n: samples.len(),
        min: samples[0],
        median: nearest_rank(samples, 0.5),
        p99: nearest_rank(samples, 0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_figures_are_samples() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&mut v).expect("summary");
        assert_eq!(s.n, 100);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.median, 50.0);
        assert_eq!(s.p99, 99.0);
    }

    #[test]
    fn small_and_odd_sets() {
        let mut one = [7.0];
        let s = summarize(&mut one).expect("summary");
        assert_eq!((s.min, s.median, s.p99), (7.0, 7.0, 7.0));
        let mut three = [3.0, 1.0, 2.0];
        let s = summarize(&mut three).expect("summary");
        assert_eq!((s.min, s.median, s.p99), (1.0, 2.0, 3.0));
        let mut ten: Vec<f64> = (0..10).map(f64::from).collect();
        let s = summarize(&mut ten).expect("summary");
        assert_eq!(s.median, 4.0, "lower median");
        assert_eq!(s.p99, 9.0);
    }

    #[test]
    fn empty_or_nan_has_no_summary() {
        assert!(summarize(&mut []).is_none());
        assert!(summarize(&mut [1.0, f64::NAN]).is_none());
    }
}
