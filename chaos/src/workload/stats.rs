//! Numbers about a history: throughput and outcomes per workload, latency of acknowledged
//! operations (overall and during time windows, e.g. faults) and unavailability (the longest
//! time without an acknowledged operation).
//!
//! Windows are `(start_ns, end_ns)` on the run's clock, like the operations' times.

use std::fmt;
use std::time::Duration;

use super::WorkloadKind;
use crate::history::{Op, Outcome};

/// Numbers about one workload's operations.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadStats {
    /// The workload.
    pub workload: WorkloadKind,
    /// Operations recorded.
    pub ops: u64,
    /// Acknowledged.
    pub ok: u64,
    /// Definitely without effect.
    pub fail: u64,
    /// Unknown.
    pub info: u64,
    /// Operations per second, from its first invocation to its last completion.
    pub ops_per_sec: f64,
    /// Median latency of its `Ok` operations.
    pub p50: Duration,
    /// 99th percentile latency of its `Ok` operations.
    pub p99: Duration,
    /// Longest time without an `Ok` completion ([`unavailability`]).
    pub max_gap: Duration,
}

/// Numbers about a history.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// One entry per workload with operations, in [`WorkloadKind::ALL`] order.
    pub workloads: Vec<WorkloadStats>,
    /// Median latency of every `Ok` operation.
    pub p50: Duration,
    /// 99th percentile latency of every `Ok` operation.
    pub p99: Duration,
}

/// Throughput, outcomes, latency and unavailability of `ops`, per workload and overall.
pub fn stats(ops: &[Op]) -> Stats {
    let workloads = WorkloadKind::ALL
        .iter()
        .filter_map(|&w| {
            let mine: Vec<&Op> = ops.iter().filter(|o| w.covers(o.kind)).collect();
            if mine.is_empty() {
                return None;
            }
            let count = |out: Outcome| mine.iter().filter(|o| o.outcome == out).count() as u64;
            let first = mine.iter().map(|o| o.invoke_ns).min().unwrap_or(0);
            let last = mine.iter().map(|o| o.complete_ns).max().unwrap_or(0);
            let span = Duration::from_nanos(last.saturating_sub(first));
            let (p50, p99) = percentiles(ok_latencies(mine.iter().copied(), None));
            Some(WorkloadStats {
                workload: w,
                ops: mine.len() as u64,
                ok: count(Outcome::Ok),
                fail: count(Outcome::Fail),
                info: count(Outcome::Info),
                ops_per_sec: if span.is_zero() {
                    0.0
                } else {
                    mine.len() as f64 / span.as_secs_f64()
                },
                p50,
                p99,
                max_gap: unavailability(ops, w),
            })
        })
        .collect();
    let (p50, p99) = percentiles(ok_latencies(ops.iter(), None));
    Stats {
        workloads,
        p50,
        p99,
    }
}

/// p50 and p99 latency of the `Ok` operations that overlap one of `windows` (that were in
/// flight at some time in it); zero when there are none.
pub fn latency_during(ops: &[Op], windows: &[(u64, u64)]) -> (Duration, Duration) {
    percentiles(ok_latencies(ops.iter(), Some(windows)))
}

/// The longest time `workload` went without an acknowledged operation: the largest gap
/// between two consecutive `Ok` completions, counting from its first invocation and up to its
/// last completion (zero without operations).
pub fn unavailability(ops: &[Op], workload: WorkloadKind) -> Duration {
    let mine = ops.iter().filter(|o| workload.covers(o.kind));
    let (mut from, mut to) = (u64::MAX, 0);
    for o in mine {
        from = from.min(o.invoke_ns);
        to = to.max(o.complete_ns);
    }
    if from > to {
        return Duration::ZERO;
    }
    max_gap(ok_completions(ops, workload), from, to)
}

/// For each window, the longest time within it that `workload` went without an `Ok`
/// completion (the window's edges count as the ends of gaps).
pub fn unavailability_during(
    ops: &[Op],
    workload: WorkloadKind,
    windows: &[(u64, u64)],
) -> Vec<Duration> {
    let done = ok_completions(ops, workload);
    windows
        .iter()
        .map(|&(from, to)| max_gap(done.clone(), from, to))
        .collect()
}

/// Sorted completion times of `workload`'s `Ok` operations.
fn ok_completions(ops: &[Op], workload: WorkloadKind) -> Vec<u64> {
    let mut done: Vec<u64> = ops
        .iter()
        .filter(|o| workload.covers(o.kind) && o.outcome == Outcome::Ok)
        .map(|o| o.complete_ns)
        .collect();
    done.sort_unstable();
    done
}

/// The largest gap between consecutive points of `points` (sorted) within `[from, to]`,
/// `from` and `to` included as points.
fn max_gap(points: Vec<u64>, from: u64, to: u64) -> Duration {
    if to <= from {
        return Duration::ZERO;
    }
    let mut prev = from;
    let mut gap = 0;
    for p in points.into_iter().filter(|p| (from..=to).contains(p)) {
        gap = gap.max(p - prev);
        prev = p;
    }
    Duration::from_nanos(gap.max(to - prev))
}

/// Latencies (ns) of the `Ok` operations among `ops`, only those overlapping one of
/// `windows` if given.
fn ok_latencies<'a>(ops: impl Iterator<Item = &'a Op>, windows: Option<&[(u64, u64)]>) -> Vec<u64> {
    ops.filter(|o| o.outcome == Outcome::Ok)
        .filter(|o| {
            windows.is_none_or(|ws| {
                ws.iter()
                    .any(|&(a, b)| o.invoke_ns <= b && o.complete_ns >= a)
            })
        })
        .map(|o| o.complete_ns.saturating_sub(o.invoke_ns))
        .collect()
}

/// p50 and p99 (nearest rank) of latencies in ns.
fn percentiles(mut ns: Vec<u64>) -> (Duration, Duration) {
    ns.sort_unstable();
    (percentile(&ns, 0.50), percentile(&ns, 0.99))
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.workloads {
            writeln!(
                f,
                "{:<8} {:>6} ops {:>8.1}/s  ok {:>6} fail {:>6} info {:>6}  p50 {:>7.1} ms  p99 {:>7.1} ms  max gap {:>7.1} ms",
                w.workload.name(),
                w.ops,
                w.ops_per_sec,
                w.ok,
                w.fail,
                w.info,
                ms(w.p50),
                ms(w.p99),
                ms(w.max_gap),
            )?;
        }
        write!(
            f,
            "all ok   p50 {:.1} ms  p99 {:.1} ms",
            ms(self.p50),
            ms(self.p99)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::OpKind;
    use serde_json::Value;

    const MS: u64 = 1_000_000;

    fn op(kind: OpKind, outcome: Outcome, invoke_ms: u64, complete_ms: u64) -> Op {
        Op {
            index: 0,
            process: 0,
            node: 1,
            kind,
            key: "r0".into(),
            value: Value::Null,
            outcome,
            invoke_ns: invoke_ms * MS,
            complete_ns: complete_ms * MS,
            error: None,
        }
    }

    #[test]
    fn gaps_between_successes() {
        let ops = vec![
            op(OpKind::Write, Outcome::Ok, 0, 10),
            op(OpKind::Read, Outcome::Ok, 10, 20),
            op(OpKind::Write, Outcome::Info, 20, 520),
            op(OpKind::Read, Outcome::Fail, 25, 30),
            op(OpKind::Read, Outcome::Ok, 520, 600),
            op(OpKind::Write, Outcome::Ok, 600, 650),
            // Another workload does not count.
            op(OpKind::Call, Outcome::Ok, 100, 110),
        ];
        assert_eq!(
            unavailability(&ops, WorkloadKind::Register),
            Duration::from_millis(580)
        );
        assert_eq!(
            unavailability(&ops, WorkloadKind::Calls),
            Duration::from_millis(10)
        );
        assert_eq!(unavailability(&ops, WorkloadKind::Set), Duration::ZERO);
        // Per window: the window edges bound the gaps.
        assert_eq!(
            unavailability_during(
                &ops,
                WorkloadKind::Register,
                &[(0, 100 * MS), (100 * MS, 700 * MS)]
            ),
            vec![Duration::from_millis(80), Duration::from_millis(500)]
        );
        // Trailing gap: no success after 650 up to the last completion at 900.
        let mut more = ops.clone();
        more.push(op(OpKind::Write, Outcome::Info, 650, 900));
        assert_eq!(
            unavailability(&more, WorkloadKind::Register),
            Duration::from_millis(580)
        );
        more.push(op(OpKind::Write, Outcome::Info, 900, 1300));
        assert_eq!(
            unavailability(&more, WorkloadKind::Register),
            Duration::from_millis(650)
        );
    }

    #[test]
    fn latency_in_windows() {
        let mut ops: Vec<Op> = (0..100)
            .map(|i| op(OpKind::Write, Outcome::Ok, i * 10, i * 10 + 1))
            .collect();
        // Slow ones during a fault window 2000..3000 ms.
        ops.push(op(OpKind::Write, Outcome::Ok, 1990, 2100));
        ops.push(op(OpKind::Read, Outcome::Ok, 2500, 2800));
        ops.push(op(OpKind::Write, Outcome::Info, 2000, 5000));
        let (p50, p99) = latency_during(&ops, &[(2000 * MS, 3000 * MS)]);
        assert_eq!(p50, Duration::from_millis(110));
        assert_eq!(p99, Duration::from_millis(300));
        let s = stats(&ops);
        assert_eq!(s.p50, Duration::from_millis(1));
        assert_eq!(s.p99, Duration::from_millis(110));
        let reg = &s.workloads[0];
        assert_eq!(reg.workload, WorkloadKind::Register);
        assert_eq!((reg.ops, reg.ok, reg.fail, reg.info), (103, 102, 0, 1));
        assert!((reg.ops_per_sec - 103.0 / 5.0).abs() < 1e-9);
        assert_eq!(s.workloads.len(), 1);
        assert_eq!(latency_during(&ops, &[]), (Duration::ZERO, Duration::ZERO));
        assert!(s.to_string().contains("register"));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let ns: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&ns, 0.5), Duration::from_nanos(50));
        assert_eq!(percentile(&ns, 0.99), Duration::from_nanos(99));
        assert_eq!(percentile(&[7], 0.99), Duration::from_nanos(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
