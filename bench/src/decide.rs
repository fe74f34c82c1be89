//! `hangar-bench decide`: the cost of one rate-limit decision (`RateLimits::check`, the exact
//! code on the call path) from C threads at once, with no rules and with rules, in the same
//! run. Each decision is timed alone (`Instant` around the call); the figures are per call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_node::ratelimit::allocator::Grant;
use hangar_node::ratelimit::{Caller, RateLimits, Subject};
use hangar_raft::state::RateLimitDef;
use hdrhistogram::Histogram;

/// One measured configuration of a per-call benchmark (`decide`, `authn`).
pub struct PerCall {
    /// What was measured (`off`/`on` rules; `off`/`api-key`/`jwt` auth).
    pub label: &'static str,
    /// Threads calling at once.
    pub concurrency: usize,
    /// Calls made.
    pub calls: u64,
    /// Calls per second, all threads together.
    pub per_sec: f64,
    /// Per-call latency, ns.
    pub p50_ns: u64,
    /// Per-call latency, ns.
    pub p99_ns: u64,
}

fn rule(id: &str, key: &[&str]) -> RateLimitDef {
    RateLimitDef {
        id: id.into(),
        source: "api".into(),
        applies_to: "tools".into(),
        key: key.iter().map(|k| (*k).to_owned()).collect(),
        matches: BTreeMap::new(),
        rps: 1e9,
        burst: 1_000_000_000,
        on_partition: "safe_share".into(),
    }
}

fn limiter(on: bool) -> Arc<RateLimits> {
    let l = RateLimits::new();
    if on {
        let defs = [
            rule("per-caller-tool", &["principal", "tool"]),
            rule("global", &[]),
        ];
        l.set_definitions(&defs.iter().map(|d| (d.id.clone(), d.clone())).collect());
    }
    // As after a first answer from the leader (no explicit shares: the provisional rate).
    l.set_members(1);
    l.apply_grant(
        &Grant {
            seq: 1,
            shares: Vec::new(),
        },
        hangar_node::upstream::lease::mono_now_ns() + 3_600_000_000_000,
    );
    Arc::new(l)
}

/// Per-call timings of an operation run from C threads at once: each call is timed alone
/// (`Instant` around it). `op(thread)` makes a thread's operation; it returns an error to stop.
pub(crate) fn per_call<F, O>(
    label: &'static str,
    concurrency: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<PerCall>
where
    F: Fn(usize) -> O,
    O: FnMut() -> anyhow::Result<()> + Send + 'static,
{
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|t| {
            let mut call = op(t);
            std::thread::spawn(move || -> anyhow::Result<(u64, Histogram<u64>)> {
                let mut h = Histogram::<u64>::new(3)?;
                let mut n = 0u64;
                while start.elapsed() < duration {
                    for _ in 0..64 {
                        let t0 = Instant::now();
                        call()?;
                        h.record((t0.elapsed().as_nanos() as u64).max(1))?;
                        n += 1;
                    }
                }
                Ok((n, h))
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new(3)?;
    let mut calls = 0;
    for t in threads {
        let (n, h) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a measuring thread panicked"))??;
        calls += n;
        total.add(h)?;
    }
    Ok(PerCall {
        label,
        concurrency,
        calls,
        per_sec: calls as f64 / start.elapsed().as_secs_f64(),
        p50_ns: total.value_at_quantile(0.5),
        p99_ns: total.value_at_quantile(0.99),
    })
}

/// Decide for `duration` from `concurrency` threads (8 callers, 4 tools each).
pub fn run(on: bool, concurrency: usize, duration: Duration) -> anyhow::Result<PerCall> {
    let l = limiter(on);
    let label = if on { "on" } else { "off" };
    per_call(label, concurrency, duration, |t| {
        let l = l.clone();
        let callers: Vec<Caller> = (0..8)
            .map(|i| Caller {
                principal: format!("key_{t}_{i}"),
                anonymous: false,
                tenant: String::new(),
            })
            .collect();
        let tools = ["echo", "add", "whoami", "sleep"];
        let mut i = 0usize;
        move || {
            i = (i + 1) % callers.len();
            let subject = Subject::Tool {
                server: "fixture",
                tool: tools[i % tools.len()],
            };
            let r = l.check(&callers[i], subject);
            anyhow::ensure!(r.is_ok(), "a decision refused a call: {r:?}");
            Ok(())
        }
    })
}
