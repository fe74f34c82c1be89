//! GCRA (the generic cell rate algorithm) over one atomic: a bucket is its theoretical
//! arrival time (TAT); a call is admitted when the TAT it would leave is at most one burst
//! ahead of now.
//!
//! Not `governor`: its limiter takes its quota once, at construction, while a node's share of
//! a cluster-wide limit changes with every grant from the leader (several times a second).
//! Rebuilding a governor limiter on every grant would forget the bucket's state (a full
//! burst after each grant); this keeps the TAT and applies the new rate from the next call.

use std::sync::atomic::{AtomicU64, Ordering};

/// A rate: one call per `interval_ns`, and up to `capacity_ns / interval_ns` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    interval_ns: u64,
    capacity_ns: u64,
}

impl Rate {
    /// `rps` calls per second with bursts of `burst` (at least 1); `None` when `rps` is not
    /// positive (nothing is admitted).
    pub fn new(rps: f64, burst: f64) -> Option<Rate> {
        if !(rps.is_finite() && rps > 0.0) {
            return None;
        }
        // Rounded up: the admitted rate never exceeds `rps`.
        let interval_ns = (1e9 / rps).ceil().clamp(1.0, 1e15) as u64;
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        let capacity_ns = (interval_ns as f64 * burst).min(1e18) as u64;
        Some(Rate {
            interval_ns,
            capacity_ns: capacity_ns.max(interval_ns),
        })
    }

    /// Calls per second.
    pub fn rps(&self) -> f64 {
        1e9 / self.interval_ns as f64
    }

    /// Calls admitted at once from a full bucket.
    pub fn burst(&self) -> u64 {
        self.capacity_ns / self.interval_ns
    }
}

/// A decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; `remaining` calls could follow at once, the bucket is full again in
    /// `reset_ns`.
    Allow {
        /// Calls that could follow at once.
        remaining: u64,
        /// Until the bucket is full again.
        reset_ns: u64,
    },
    /// Refused; the next call is admitted in `retry_after_ns`.
    Deny {
        /// Until the next call is admitted.
        retry_after_ns: u64,
        /// Until the bucket is full again.
        reset_ns: u64,
    },
}

/// One bucket.
#[derive(Debug, Default)]
pub struct Gcra {
    tat: AtomicU64,
}

impl Gcra {
    /// Admit or refuse one call at `now_ns` (a monotonic clock) at `rate`.
    pub fn check(&self, rate: Rate, now_ns: u64) -> Verdict {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now_ns).saturating_add(rate.interval_ns);
            let ahead = next - now_ns;
            if ahead > rate.capacity_ns {
                return Verdict::Deny {
                    retry_after_ns: ahead - rate.capacity_ns,
                    reset_ns: tat.saturating_sub(now_ns),
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Verdict::Allow {
                        remaining: (rate.capacity_ns - ahead) / rate.interval_ns,
                        reset_ns: ahead,
                    };
                }
                Err(t) => tat = t,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_bucket_admits_its_burst_then_its_rate() {
        let g = Gcra::default();
        let r = Rate::new(10.0, 3.0).unwrap();
        let t = 1_000_000_000;
        let admitted = (0..10)
            .filter(|_| matches!(g.check(r, t), Verdict::Allow { .. }))
            .count();
        assert_eq!(admitted, 3);
        match g.check(r, t) {
            Verdict::Deny { retry_after_ns, .. } => assert_eq!(retry_after_ns, 100_000_000),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            g.check(r, t + 100_000_000),
            Verdict::Allow { remaining: 0, .. }
        ));
    }

    #[test]
    fn no_rate_admits_nothing() {
        assert!(Rate::new(0.0, 5.0).is_none());
        assert!(Rate::new(f64::NAN, 5.0).is_none());
        assert_eq!(Rate::new(2.0, 0.2).unwrap().burst(), 1);
    }

    proptest! {
        /// Over any window, admitted ≤ rps × window + burst, whatever the arrivals.
        #[test]
        fn admitted_never_exceeds_rate_times_window_plus_burst(
            rps in 0.5f64..2000.0,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..20_000_000, 1..400),
        ) {
            let g = Gcra::default();
            let r = Rate::new(rps, burst as f64).unwrap();
            let mut t = 5_000_000_000u64;
            let mut admitted_at = Vec::new();
            for gap in gaps {
                t += gap;
                if let Verdict::Allow { .. } = g.check(r, t) {
                    admitted_at.push(t);
                }
            }
            for (i, &start) in admitted_at.iter().enumerate() {
                for (j, &end) in admitted_at.iter().enumerate().skip(i) {
                    let window_s = (end - start) as f64 / 1e9;
                    let count = (j - i + 1) as f64;
                    prop_assert!(count <= rps * window_s + burst as f64 + 1e-6,
                        "{count} calls in {window_s} s at {rps}/s burst {burst}");
                }
            }
        }
    }
}
