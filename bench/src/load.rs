//! Closed-loop load: N workers, each with its own connection (a [`Caller`]), call back to back
//! for warm-up + duration. Only calls that start after the warm-up and finish before the deadline
//! are counted; successful ones are latency samples, failed ones are counted by kind.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cpu::CpuProbe;
use crate::histogram::{HistogramError, Latency};
use crate::rpc::{CallError, ErrorKind};

/// The answer to one call: its outcome and the instant the answer was complete
/// (taken where the reply was parsed, so multiplexed transports do not add a task hop).
#[derive(Debug)]
pub struct CallResult {
    /// Success or the failure.
    pub outcome: Result<(), CallError>,
    /// When the reply was complete.
    pub done: Instant,
}

/// One worker's way to make a call (owns its connection or its slot on a shared pipe).
pub trait Caller: Send + 'static {
    /// Make one call and wait for its answer. Must tolerate being cancelled (on timeout)
    /// and leave itself usable for the next call.
    fn call(&mut self) -> impl Future<Output = CallResult> + Send;
}

/// Timing of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Calls before this much time are not counted.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// A call without an answer after this long is a timeout error.
    pub timeout: Duration,
    /// Processes whose CPU use (with their children) is reported as the server's.
    pub server_pids: Vec<u32>,
}

/// Errors by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// JSON-RPC error responses.
    pub rpc: u64,
    /// Tool results with `isError: true`.
    pub tool: u64,
    /// HTTP statuses other than 2xx.
    pub http: u64,
    /// Connection, pipe, framing or parse failures.
    pub transport: u64,
    /// No answer within the timeout.
    pub timeout: u64,
}

impl ErrorCounts {
    /// Count one error of this kind.
    pub fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Rpc => self.rpc += 1,
            ErrorKind::Tool => self.tool += 1,
            ErrorKind::Http => self.http += 1,
            ErrorKind::Transport => self.transport += 1,
            ErrorKind::Timeout => self.timeout += 1,
        }
    }

    /// Add another set of counters.
    pub fn merge(&mut self, o: &ErrorCounts) {
        self.rpc += o.rpc;
        self.tool += o.tool;
        self.http += o.http;
        self.transport += o.transport;
        self.timeout += o.timeout;
    }

    /// All errors.
    pub fn total(&self) -> u64 {
        self.rpc + self.tool + self.http + self.transport + self.timeout
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct RunStats {
    /// Latency of successful calls inside the window.
    pub latency: Latency,
    /// Failed calls inside the window, by kind.
    pub errors: ErrorCounts,
    /// The first error seen (in or out of the window), for diagnosis.
    pub first_error: Option<CallError>,
    /// Length of the measured window.
    pub window: Duration,
    /// Calls made in total, including warm-up and calls straddling the window edges.
    pub total_calls: u64,
    /// CPU used by this process during the window, % of one core.
    pub client_cpu_pct: Option<f64>,
    /// CPU used by the server processes (and their children) during the window, % of one core.
    pub server_cpu_pct: Option<f64>,
}

impl RunStats {
    /// Successful calls per second in the window.
    pub fn calls_per_s(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.latency.count() as f64 / secs
        } else {
            0.0
        }
    }
}

/// The load generator failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A histogram could not be created or merged.
    #[error(transparent)]
    Histogram(#[from] HistogramError),
    /// A worker task panicked or was cancelled.
    #[error("a load worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    /// No callers were given.
    #[error("no workers: concurrency must be at least 1")]
    NoWorkers,
}

struct WorkerOut<C> {
    caller: C,
    latency: Latency,
    errors: ErrorCounts,
    first_error: Option<CallError>,
    total: u64,
}

async fn worker<C: Caller>(
    mut caller: C,
    measure_from: Instant,
    end: Instant,
    timeout: Duration,
    mut latency: Latency,
) -> WorkerOut<C> {
    let mut errors = ErrorCounts::default();
    let mut first_error = None;
    let mut total = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let r = match tokio::time::timeout(timeout, caller.call()).await {
            Ok(r) => r,
            Err(_) => CallResult {
                outcome: Err(CallError::new(
                    ErrorKind::Timeout,
                    format!("no answer within {timeout:?}"),
                )),
                done: Instant::now(),
            },
        };
        total += 1;
        let counted = t0 >= measure_from && r.done <= end;
        match r.outcome {
            Ok(()) if counted => latency.record(r.done.saturating_duration_since(t0)),
            Ok(()) => {}
            Err(e) => {
                if counted {
                    errors.add(e.kind);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    WorkerOut {
        caller,
        latency,
        errors,
        first_error,
        total,
    }
}

/// Run `callers.len()` workers under `plan` and merge their measurements. The callers are
/// handed back (so a shared server can serve several runs).
pub async fn run<C: Caller>(callers: Vec<C>, plan: &Plan) -> Result<(Vec<C>, RunStats), LoadError> {
    if callers.is_empty() {
        return Err(LoadError::NoWorkers);
    }
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let mut handles = Vec::with_capacity(callers.len());
    for c in callers {
        let latency = Latency::new()?;
        handles.push(tokio::spawn(worker(
            c,
            measure_from,
            end,
            plan.timeout,
            latency,
        )));
    }
    let server_pids = plan.server_pids.clone();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from).await;
        let client = CpuProbe::exact(&[std::process::id()]);
        let server = CpuProbe::new(&server_pids);
        let (c0, s0, t0) = (client.ticks(), server.ticks(), Instant::now());
        tokio::time::sleep_until(end).await;
        let wall = t0.elapsed();
        let client_pct = client.percent_since(c0, wall);
        let server_pct = if server_pids.is_empty() {
            None
        } else {
            server.percent_since(s0, wall)
        };
        (client_pct, server_pct)
    });
    let mut callers = Vec::with_capacity(handles.len());
    let mut latency = Latency::new()?;
    let mut errors = ErrorCounts::default();
    let mut first_error = None;
    let mut total_calls = 0;
    for h in handles {
        let out = h.await?;
        latency.merge(&out.latency)?;
        errors.merge(&out.errors);
        if first_error.is_none() {
            first_error = out.first_error;
        }
        total_calls += out.total;
        callers.push(out.caller);
    }
    let (client_cpu_pct, server_cpu_pct) = cpu.await.unwrap_or((None, None));
    Ok((
        callers,
        RunStats {
            latency,
            errors,
            first_error,
            window: plan.duration,
            total_calls,
            client_cpu_pct,
            server_cpu_pct,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay`; every `fail_every`-th call fails with a tool error; optionally hangs.
    struct Fake {
        delay: Duration,
        fail_every: u64,
        n: u64,
        hang_on: Option<u64>,
    }

    impl Caller for Fake {
        async fn call(&mut self) -> CallResult {
            self.n += 1;
            if self.hang_on == Some(self.n) {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.delay).await;
            let outcome = if self.fail_every > 0 && self.n.is_multiple_of(self.fail_every) {
                Err(CallError::new(ErrorKind::Tool, "isError"))
            } else {
                Ok(())
            };
            CallResult {
                outcome,
                done: Instant::now(),
            }
        }
    }

    fn plan(warmup_ms: u64, duration_ms: u64, timeout_ms: u64) -> Plan {
        Plan {
            warmup: Duration::from_millis(warmup_ms),
            duration: Duration::from_millis(duration_ms),
            timeout: Duration::from_millis(timeout_ms),
            server_pids: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_counted_not_sampled() {
        let callers = (0..4)
            .map(|_| Fake {
                delay: Duration::from_millis(10),
                fail_every: 4,
                n: 0,
                hang_on: None,
            })
            .collect();
        let (callers, s) = run(callers, &plan(100, 1000, 1000)).await.unwrap();
        assert_eq!(callers.len(), 4);
        // 4 workers × 100 calls of 10 ms in the 1 s window, 1 in 4 failing.
        let ok = s.latency.count();
        let bad = s.errors.total();
        assert!((396..=400).contains(&(ok + bad)), "ok {ok} bad {bad}");
        assert_eq!(bad, s.errors.tool);
        assert!((99..=100).contains(&bad), "bad {bad}");
        let sum = s.latency.summary();
        assert!((sum.p50_us - 10_000.0).abs() < 50.0, "p50 {}", sum.p50_us);
        assert!((sum.max_us - 10_000.0).abs() < 50.0, "max {}", sum.max_us);
        assert!((s.calls_per_s() - 300.0).abs() < 5.0, "{}", s.calls_per_s());
        // Warm-up calls were made but not counted.
        assert!(s.total_calls >= ok + bad + 4 * 9);
        assert_eq!(s.first_error.unwrap().kind, ErrorKind::Tool);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_is_a_timeout_and_the_worker_carries_on() {
        let callers = vec![Fake {
            delay: Duration::from_millis(1),
            fail_every: 0,
            n: 0,
            hang_on: Some(3),
        }];
        let (_, s) = run(callers, &plan(0, 1000, 100)).await.unwrap();
        assert_eq!(s.errors.timeout, 1);
        assert_eq!(s.errors.total(), 1);
        // ~900 ms of 1 ms calls after the 100 ms timeout.
        assert!(s.latency.count() > 850, "{}", s.latency.count());
    }

    #[tokio::test]
    async fn no_workers_is_an_error() {
        assert!(matches!(
            run(Vec::<Fake>::new(), &plan(0, 10, 10)).await,
            Err(LoadError::NoWorkers)
        ));
    }
}
