//! Latency histogram (HDR, nanoseconds, 3 significant digits) and its summary in microseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency recorded exactly: 10 minutes. Longer samples are clamped to it.
const MAX_NS: u64 = 600_000_000_000;

/// A histogram could not be created or merged (a bug in this crate, not a user error).
#[derive(Debug, thiserror::Error)]
pub enum HistogramError {
    /// Creation with the built-in bounds failed.
    #[error("cannot create the latency histogram: {0}")]
    Create(#[from] hdrhistogram::CreationError),
    /// Merging two histograms failed.
    #[error("cannot merge latency histograms: {0}")]
    Merge(#[from] hdrhistogram::AdditionError),
}

/// Per-call latencies of successful calls, in nanoseconds, ~0.1 % relative precision.
#[derive(Clone, Debug)]
pub struct Latency {
    h: Histogram<u64>,
}

/// Percentiles of a [`Latency`], in microseconds (fractional, so sub-µs differences show).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Smallest sample.
    pub min_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Latency {
    /// An empty histogram covering 1 ns … 10 min with 3 significant digits.
    pub fn new() -> Result<Self, HistogramError> {
        Ok(Self {
            h: Histogram::new_with_bounds(1, MAX_NS, 3)?,
        })
    }

    /// Record one sample (clamped to 1 ns … 10 min).
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos())
            .unwrap_or(MAX_NS)
            .clamp(1, MAX_NS);
        self.h.saturating_record(ns);
    }

    /// Add every sample of `other` to this histogram.
    pub fn merge(&mut self, other: &Latency) -> Result<(), HistogramError> {
        self.h.add(&other.h)?;
        Ok(())
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The value at quantile `q` (0.0 ..= 1.0), in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        ns_to_us(self.h.value_at_quantile(q))
    }

    /// Percentiles, max, min and mean in microseconds (all 0 when empty).
    pub fn summary(&self) -> LatencySummary {
        if self.h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.h.len(),
            p50_us: self.quantile_us(0.50),
            p90_us: self.quantile_us(0.90),
            p99_us: self.quantile_us(0.99),
            max_us: ns_to_us(self.h.max()),
            min_us: ns_to_us(self.h.min()),
            mean_us: round1(self.h.mean() / 1e3),
        }
    }
}

/// Microseconds as milliseconds with 0.1 ms resolution (the unit of the cold-start and Raft
/// tables).
pub fn us_to_ms(us: f64) -> f64 {
    (us / 100.0).round() / 10.0
}

fn ns_to_us(ns: u64) -> f64 {
    round1(ns as f64 / 1e3)
}

/// Round to one decimal (0.1 µs is below the histogram's precision for anything above 100 µs).
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: f64, expected: f64, rel: f64) -> bool {
        (actual - expected).abs() <= expected * rel
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut l = Latency::new().unwrap();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert!(within(s.p50_us, 500.0, 0.002), "p50 {}", s.p50_us);
        assert!(within(s.p90_us, 900.0, 0.002), "p90 {}", s.p90_us);
        assert!(within(s.p99_us, 990.0, 0.002), "p99 {}", s.p99_us);
        assert!(within(s.max_us, 1000.0, 0.002), "max {}", s.max_us);
        assert!(within(s.min_us, 1.0, 0.002), "min {}", s.min_us);
        assert!(within(s.mean_us, 500.5, 0.002), "mean {}", s.mean_us);
    }

    #[test]
    fn tail_is_not_hidden_by_the_median() {
        let mut l = Latency::new().unwrap();
        for _ in 0..980 {
            l.record(Duration::from_micros(100));
        }
        for _ in 0..20 {
            l.record(Duration::from_millis(50));
        }
        let s = l.summary();
        assert!(within(s.p50_us, 100.0, 0.002));
        assert!(within(s.p90_us, 100.0, 0.002));
        assert!(within(s.p99_us, 50_000.0, 0.002), "p99 {}", s.p99_us);
        assert!(within(s.max_us, 50_000.0, 0.002));
    }

    #[test]
    fn sub_microsecond_resolution_and_clamping() {
        let mut l = Latency::new().unwrap();
        l.record(Duration::from_nanos(1_234));
        // Reported to 0.1 µs.
        assert_eq!(l.summary().p50_us, 1.2);
        l.record(Duration::from_nanos(1_260));
        assert_eq!(l.summary().max_us, 1.3);
        let mut big = Latency::new().unwrap();
        big.record(Duration::from_secs(3600));
        big.record(Duration::ZERO);
        assert!(within(big.summary().max_us, MAX_NS as f64 / 1e3, 0.002));
        assert_eq!(big.count(), 2);
    }

    #[test]
    fn merging_workers() {
        let mut a = Latency::new().unwrap();
        let mut b = Latency::new().unwrap();
        for _ in 0..50 {
            a.record(Duration::from_micros(10));
            b.record(Duration::from_micros(30));
        }
        a.merge(&b).unwrap();
        let s = a.summary();
        assert_eq!(s.count, 100);
        assert!(within(s.p50_us, 10.0, 0.002));
        assert!(within(s.p90_us, 30.0, 0.002));
        assert!(within(s.mean_us, 20.0, 0.01));
    }

    #[test]
    fn empty_summary_is_zero() {
        let l = Latency::new().unwrap();
        assert_eq!(l.summary(), LatencySummary::default());
        assert_eq!(l.quantile_us(0.5), 0.0);
    }
}
