//! One JSON line per run (the stable output format), a fixed-width table for the terminal, and a
//! markdown comparison of a baseline and a candidate (e.g. direct stdio vs through Hangar).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cold::ColdRecord;
use crate::load::{ErrorCounts, RunStats};
use crate::raft::{FOLLOWER_LABEL, FailoverRecord, LEADER_LABEL};

/// Everything about one run: what was measured and the figures. Written as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Which benchmark: `load` (`stdio`/`http`; cold starts are [`ColdRecord`]s).
    pub bench: String,
    /// `stdio` or `http`.
    pub mode: String,
    /// A free label used to pair runs in reports (defaults to the mode).
    pub label: String,
    /// The client implementation (`pipe` for stdio, `raw` for HTTP).
    pub client: String,
    /// The server command or URL.
    pub target: String,
    /// The tool called.
    pub tool: String,
    /// Number of concurrent workers.
    pub concurrency: usize,
    /// Warm-up, seconds (not measured).
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Successful calls in the window (the latency samples).
    pub calls: u64,
    /// Failed calls in the window.
    pub errors: u64,
    /// Failed calls by kind.
    pub error_kinds: ErrorCounts,
    /// Successful calls per second.
    pub calls_per_s: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// CPU of the load generator during the window, % of one core.
    pub client_cpu_pct: Option<f64>,
    /// CPU of the server processes (with children) during the window, % of one core.
    pub server_cpu_pct: Option<f64>,
    /// CPU time of the load generator per call in the window, µs (its own overhead).
    #[serde(default)]
    pub client_cpu_us_per_call: Option<f64>,
    /// CPU time of the server side per call in the window, µs (all server processes together).
    #[serde(default)]
    pub server_cpu_us_per_call: Option<f64>,
    /// The first error message, if any.
    pub first_error: Option<String>,
}

/// The descriptive part of a [`RunRecord`].
#[derive(Clone, Debug)]
pub struct RunMeta {
    /// See [`RunRecord::mode`].
    pub mode: String,
    /// See [`RunRecord::label`].
    pub label: String,
    /// See [`RunRecord::client`].
    pub client: String,
    /// See [`RunRecord::target`].
    pub target: String,
    /// See [`RunRecord::tool`].
    pub tool: String,
    /// See [`RunRecord::concurrency`].
    pub concurrency: usize,
    /// See [`RunRecord::warmup_s`].
    pub warmup_s: f64,
}

impl RunRecord {
    /// Combine a description and measurements.
    pub fn new(meta: RunMeta, stats: &RunStats) -> Self {
        let s = stats.latency.summary();
        Self {
            bench: "load".into(),
            mode: meta.mode,
            label: meta.label,
            client: meta.client,
            target: meta.target,
            tool: meta.tool,
            concurrency: meta.concurrency,
            warmup_s: meta.warmup_s,
            duration_s: stats.window.as_secs_f64(),
            calls: s.count,
            errors: stats.errors.total(),
            error_kinds: stats.errors,
            calls_per_s: (stats.calls_per_s() * 10.0).round() / 10.0,
            p50_us: s.p50_us,
            p90_us: s.p90_us,
            p99_us: s.p99_us,
            max_us: s.max_us,
            mean_us: s.mean_us,
            client_cpu_pct: stats.client_cpu_pct,
            server_cpu_pct: stats.server_cpu_pct,
            client_cpu_us_per_call: per_call(stats.client_cpu_pct, stats),
            server_cpu_us_per_call: per_call(stats.server_cpu_pct, stats),
            first_error: stats.first_error.as_ref().map(ToString::to_string),
        }
    }

    /// The record as one line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"error":"cannot serialise run: {e}"}}"#))
    }
}

/// CPU µs per call in the window from a CPU percentage over the window.
fn per_call(pct: Option<f64>, stats: &RunStats) -> Option<f64> {
    let calls = stats.latency.count() + stats.errors.total();
    if calls == 0 {
        return None;
    }
    let cpu_us = pct? / 100.0 * stats.window.as_secs_f64() * 1e6;
    Some((cpu_us / calls as f64 * 10.0).round() / 10.0)
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Header of the terminal table.
pub fn table_header() -> String {
    format!(
        "{:<12} {:<5} {:<6} {:>4} {:>9} {:>6} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>7} {:>8} {:>8}",
        "label",
        "mode",
        "client",
        "c",
        "calls",
        "errors",
        "calls/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "cpu cl%",
        "cpu sv%",
        "cl µs/c",
        "sv µs/c"
    )
}

/// One row of the terminal table.
pub fn table_row(r: &RunRecord) -> String {
    format!(
        "{:<12} {:<5} {:<6} {:>4} {:>9} {:>6} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>7} {:>7} {:>8} {:>8}",
        r.label,
        r.mode,
        r.client,
        r.concurrency,
        r.calls,
        r.errors,
        r.calls_per_s,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.max_us,
        opt(r.client_cpu_pct),
        opt(r.server_cpu_pct),
        opt(r.client_cpu_us_per_call),
        opt(r.server_cpu_us_per_call)
    )
}

/// What to compare and which targets to check in [`markdown`].
#[derive(Clone, Debug)]
pub struct Targets {
    /// Label of the baseline runs (e.g. `direct`).
    pub baseline: String,
    /// Label of the candidate runs (e.g. `hangar`).
    pub candidate: String,
    /// Largest acceptable candidate p50 − baseline p50, µs (checked at every concurrency).
    pub max_added_p50_us: f64,
    /// Smallest acceptable candidate throughput at `at_concurrency`, calls/s.
    pub min_calls_per_s: f64,
    /// Instead of `min_calls_per_s`: the smallest acceptable candidate throughput as a
    /// fraction of the baseline's at `at_concurrency` (e.g. 0.5 for a forwarded call against
    /// a local one).
    pub min_calls_ratio: Option<f64>,
    /// Concurrency at which the throughput target applies.
    pub at_concurrency: usize,
}

/// A markdown report and whether every target was met (`None` when nothing could be compared).
pub fn markdown(records: &[RunRecord], t: &Targets) -> (String, Option<bool>) {
    let mut md = String::new();
    let _ = writeln!(md, "### Runs\n");
    let _ = writeln!(
        md,
        "| label | mode | client | c | calls | errors | calls/s | p50 µs | p90 µs | p99 µs | max µs | client CPU % | server CPU % | client CPU µs/call | server CPU µs/call |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r.label,
            r.mode,
            r.client,
            r.concurrency,
            r.calls,
            r.errors,
            r.calls_per_s,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.max_us,
            opt(r.client_cpu_pct),
            opt(r.server_cpu_pct),
            opt(r.client_cpu_us_per_call),
            opt(r.server_cpu_us_per_call)
        );
    }
    let find = |label: &str, c: usize| {
        records
            .iter()
            .rev()
            .find(|r| r.label == label && r.concurrency == c)
    };
    let mut levels: Vec<usize> = records.iter().map(|r| r.concurrency).collect();
    levels.sort_unstable();
    levels.dedup();
    let pairs: Vec<(&RunRecord, &RunRecord)> = levels
        .iter()
        .filter_map(|&c| Some((find(&t.baseline, c)?, find(&t.candidate, c)?)))
        .collect();
    if pairs.is_empty() {
        let _ = writeln!(
            md,
            "\nNo concurrency level has both a `{}` and a `{}` run: nothing to compare.",
            t.baseline, t.candidate
        );
        return (md, None);
    }
    let _ = writeln!(
        md,
        "\n### `{}` compared with `{}`\n",
        t.candidate, t.baseline
    );
    let _ = writeln!(
        md,
        "| c | p50 {b} µs | p50 {c} µs | **added p50 µs** | p99 {b} µs | p99 {c} µs | added p99 µs | calls/s {b} | calls/s {c} | added server CPU µs/call |",
        b = t.baseline,
        c = t.candidate
    );
    let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (b, c) in &pairs {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | **{:+.1}** | {:.1} | {:.1} | {:+.1} | {:.0} | {:.0} | {} |",
            b.concurrency,
            b.p50_us,
            c.p50_us,
            c.p50_us - b.p50_us,
            b.p99_us,
            c.p99_us,
            c.p99_us - b.p99_us,
            b.calls_per_s,
            c.calls_per_s,
            match (b.server_cpu_us_per_call, c.server_cpu_us_per_call) {
                (Some(b), Some(c)) => format!("{:+.1}", c - b),
                _ => "-".to_owned(),
            }
        );
    }
    let _ = writeln!(md, "\n### Targets\n");
    let mut all = true;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    for (b, c) in &pairs {
        let added = c.p50_us - b.p50_us;
        let ok = added <= t.max_added_p50_us && c.errors == 0 && c.calls > 0;
        all &= ok;
        let _ = writeln!(
            md,
            "- c={}: added p50 {:+.1} µs (target ≤ {:.0} µs), {} errors: {}",
            c.concurrency,
            added,
            t.max_added_p50_us,
            c.errors,
            verdict(ok)
        );
    }
    if let Some(ratio) = t.min_calls_ratio {
        match (
            find(&t.baseline, t.at_concurrency),
            find(&t.candidate, t.at_concurrency),
        ) {
            (Some(b), Some(c)) if b.calls_per_s > 0.0 => {
                let kept = c.calls_per_s / b.calls_per_s;
                let ok = kept >= ratio && c.errors == 0;
                all &= ok;
                let _ = writeln!(
                    md,
                    "- c={}: `{}` keeps {:.1} % of the calls/s of `{}` ({:.0} of {:.0}; target ≥ {:.0} %): {}",
                    t.at_concurrency,
                    t.candidate,
                    100.0 * kept,
                    t.baseline,
                    c.calls_per_s,
                    b.calls_per_s,
                    100.0 * ratio,
                    verdict(ok)
                );
            }
            _ => {
                all = false;
                let _ = writeln!(
                    md,
                    "- no `{}` and `{}` runs at c={}: throughput target not checked",
                    t.baseline, t.candidate, t.at_concurrency
                );
            }
        }
        return (md, Some(all));
    }
    match find(&t.candidate, t.at_concurrency) {
        Some(c) => {
            let ok = c.calls_per_s >= t.min_calls_per_s && c.errors == 0;
            all &= ok;
            let _ = writeln!(
                md,
                "- c={}: {:.0} calls/s through `{}` (target ≥ {:.0}): {}",
                t.at_concurrency,
                c.calls_per_s,
                t.candidate,
                t.min_calls_per_s,
                verdict(ok)
            );
        }
        None => {
            all = false;
            let _ = writeln!(
                md,
                "- no `{}` run at c={}: throughput target not checked",
                t.candidate, t.at_concurrency
            );
        }
    }
    (md, Some(all))
}

/// A markdown table of cold-start series.
pub fn cold_markdown(records: &[ColdRecord]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "\n### Cold start (first tools/call)\n");
    let _ = writeln!(
        md,
        "| label | tool | reps | errors | p50 ms | p90 ms | min ms | max ms |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|");
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.label, r.tool, r.reps, r.errors, r.p50_ms, r.p90_ms, r.min_ms, r.max_ms
        );
    }
    md
}

/// Raft targets (issue: "commit p50 ≤ 5 ms with fsync; failover p99 ≤ 1.5 s").
#[derive(Clone, Copy, Debug)]
pub struct RaftTargets {
    /// Largest acceptable commit p50 at concurrency 1, ms.
    pub max_commit_p50_ms: f64,
    /// Largest acceptable failover p99, ms.
    pub max_failover_p99_ms: f64,
}

impl Default for RaftTargets {
    fn default() -> Self {
        Self {
            max_commit_p50_ms: 5.0,
            max_failover_p99_ms: 1500.0,
        }
    }
}

fn raft_target_name(label: &str) -> &str {
    match label {
        LEADER_LABEL => "leader",
        FOLLOWER_LABEL => "follower (forwarded)",
        other => other,
    }
}

/// Markdown tables of `raft-commit` runs and `raft-failover` series, with the target checks,
/// and whether every checked target was met (`None` when nothing was checked).
pub fn raft_markdown(
    commits: &[RunRecord],
    failovers: &[FailoverRecord],
    t: &RaftTargets,
) -> (String, Option<bool>) {
    let mut md = String::new();
    let mut verdicts: Vec<(String, bool)> = Vec::new();
    let ms = |us: f64| us / 1e3;
    if !commits.is_empty() {
        let _ = writeln!(
            md,
            "\n### Raft commit: `POST /api/auth/keys` (one Raft entry each), 3 nodes, fsync on every append\n"
        );
        let _ = writeln!(
            md,
            "| writes sent to | c | writes | errors | writes/s | p50 ms | p90 ms | p99 ms | max ms | 3 nodes' CPU % | nodes' CPU µs/write | client CPU % |"
        );
        let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for r in commits {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                raft_target_name(&r.label),
                r.concurrency,
                r.calls,
                r.errors,
                r.calls_per_s,
                ms(r.p50_us),
                ms(r.p90_us),
                ms(r.p99_us),
                ms(r.max_us),
                opt(r.server_cpu_pct),
                opt(r.server_cpu_us_per_call),
                opt(r.client_cpu_pct)
            );
            if r.concurrency == 1 {
                verdicts.push((
                    format!(
                        "commit p50 ≤ {} ms with fsync, c=1, writes sent to the {}: {:.2} ms, {} errors",
                        t.max_commit_p50_ms,
                        raft_target_name(&r.label),
                        ms(r.p50_us),
                        r.errors
                    ),
                    r.calls > 0 && r.errors == 0 && ms(r.p50_us) <= t.max_commit_p50_ms,
                ));
            }
        }
    }
    for f in failovers {
        let _ = writeln!(
            md,
            "\n### Raft leader failover: kill -9 of the leader → first write acknowledged through a survivor\n"
        );
        let _ = writeln!(
            md,
            "| kills | p50 ms | p90 ms | p99 ms | max ms | min ms | new leader reported: p50 / p99 / max ms | probes | background writes ok / failed |"
        );
        let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        let w = &f.first_write;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} / {} |",
            f.kills,
            w.p50_ms,
            w.p90_ms,
            w.p99_ms,
            w.max_ms,
            w.min_ms,
            f.new_leader.map_or_else(
                || "-".to_owned(),
                |l| format!("{:.1} / {:.1} / {:.1}", l.p50_ms, l.p99_ms, l.max_ms)
            ),
            f.probes,
            f.background_ok,
            f.background_errors
        );
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "\nPer kill, ms ({}; write probes time out after {:.0} ms and move to the next survivor):\n\n- first write: {}\n- new leader reported: {}",
            f.timings,
            f.probe_timeout_ms,
            list(&f.first_write_ms),
            list(&f.new_leader_ms)
        );
        verdicts.push((
            format!(
                "failover p99 ≤ {:.1} s ({} kills, default timings): {:.2} s",
                t.max_failover_p99_ms / 1e3,
                f.kills,
                w.p99_ms / 1e3
            ),
            f.kills > 0 && w.p99_ms <= t.max_failover_p99_ms,
        ));
    }
    if verdicts.is_empty() {
        return (md, None);
    }
    let _ = writeln!(md, "\n### Raft targets\n");
    let mut all = true;
    for (what, ok) in &verdicts {
        all &= ok;
        let _ = writeln!(md, "- {what}: {}", if *ok { "met" } else { "**missed**" });
    }
    (md, Some(all))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, c: usize, p50: f64, cps: f64, errors: u64) -> RunRecord {
        RunRecord {
            bench: "load".into(),
            mode: if label == "direct" { "stdio" } else { "http" }.into(),
            label: label.into(),
            client: "raw".into(),
            target: "t".into(),
            tool: "echo".into(),
            concurrency: c,
            warmup_s: 1.0,
            duration_s: 5.0,
            calls: 1000,
            errors,
            error_kinds: ErrorCounts {
                rpc: errors,
                ..Default::default()
            },
            calls_per_s: cps,
            p50_us: p50,
            p90_us: p50 * 1.2,
            p99_us: p50 * 2.0,
            max_us: p50 * 10.0,
            mean_us: p50,
            client_cpu_pct: Some(12.5),
            server_cpu_pct: None,
            client_cpu_us_per_call: Some(3.5),
            server_cpu_us_per_call: None,
            first_error: None,
        }
    }

    fn targets() -> Targets {
        Targets {
            baseline: "direct".into(),
            candidate: "hangar".into(),
            max_added_p50_us: 300.0,
            min_calls_per_s: 10_000.0,
            min_calls_ratio: None,
            at_concurrency: 8,
        }
    }

    #[test]
    fn throughput_target_as_a_share_of_the_baseline() {
        let t = Targets {
            baseline: "local".into(),
            candidate: "forward".into(),
            min_calls_ratio: Some(0.5),
            ..targets()
        };
        let runs = |fwd: f64| {
            vec![
                rec("local", 8, 400.0, 16000.0, 0),
                rec("forward", 8, 650.0, fwd, 0),
            ]
        };
        let (md, ok) = markdown(&runs(8800.0), &t);
        assert_eq!(ok, Some(true), "{md}");
        assert!(
            md.contains("c=8: `forward` keeps 55.0 % of the calls/s of `local` (8800 of 16000; target ≥ 50 %): met"),
            "{md}"
        );
        let (md, ok) = markdown(&runs(7000.0), &t);
        assert_eq!(ok, Some(false), "{md}");
        assert!(md.contains("keeps 43.8 %"), "{md}");
        assert!(md.contains("**missed**"), "{md}");
    }

    #[test]
    fn json_lines_round_trip() {
        let r = rec("direct", 1, 100.0, 9000.0, 0);
        let back: RunRecord = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(back, r);
        assert!(!r.to_json_line().contains('\n'));
    }

    #[test]
    fn comparison_and_targets() {
        let runs = vec![
            rec("direct", 1, 100.0, 9000.0, 0),
            rec("direct", 8, 400.0, 20000.0, 0),
            rec("hangar", 1, 250.0, 4000.0, 0),
            rec("hangar", 8, 650.0, 12000.0, 0),
        ];
        let (md, ok) = markdown(&runs, &targets());
        assert_eq!(ok, Some(true), "{md}");
        assert!(md.contains("| 1 | 100.0 | 250.0 | **+150.0** |"), "{md}");
        assert!(md.contains("| 8 | 400.0 | 650.0 | **+250.0** |"), "{md}");
        assert!(
            md.contains("12000 calls/s through `hangar` (target ≥ 10000): met"),
            "{md}"
        );

        let slow = vec![
            rec("direct", 1, 100.0, 9000.0, 0),
            rec("hangar", 1, 500.0, 2000.0, 0),
            rec("direct", 8, 100.0, 9000.0, 0),
            rec("hangar", 8, 150.0, 9000.0, 3),
        ];
        let (md, ok) = markdown(&slow, &targets());
        assert_eq!(ok, Some(false));
        assert!(
            md.contains("c=1: added p50 +400.0 µs (target ≤ 300 µs), 0 errors: **missed**"),
            "{md}"
        );
        assert!(
            md.contains("c=8: added p50 +50.0 µs (target ≤ 300 µs), 3 errors: **missed**"),
            "{md}"
        );
    }

    #[test]
    fn nothing_to_compare() {
        let (md, ok) = markdown(&[rec("direct", 1, 1.0, 1.0, 0)], &targets());
        assert_eq!(ok, None);
        assert!(md.contains("nothing to compare"));
    }

    #[test]
    fn raft_tables_and_targets() {
        use crate::raft::MsSummary;
        let mut lead = rec(LEADER_LABEL, 1, 3_200.0, 300.0, 0);
        lead.bench = "raft-commit".into();
        let mut fwd = rec(FOLLOWER_LABEL, 1, 5_600.0, 170.0, 0);
        fwd.bench = "raft-commit".into();
        let busy = rec(LEADER_LABEL, 16, 40_000.0, 400.0, 2);
        let summary = |p50_ms: f64, p90_ms: f64, p99_ms: f64, min_ms: f64| MsSummary {
            count: 20,
            p50_ms,
            p90_ms,
            p99_ms,
            max_ms: p99_ms,
            min_ms,
        };
        let f = FailoverRecord {
            bench: "raft-failover".into(),
            kills: 20,
            timings: crate::raft::DEFAULT_TIMINGS.into(),
            probe_timeout_ms: 500.0,
            first_write: summary(1000.0, 1400.0, 1500.0, 550.0),
            new_leader: Some(summary(800.0, 900.0, 1000.0, 400.0)),
            first_write_ms: vec![550.0, 600.0],
            new_leader_ms: vec![500.0],
            probes: 44,
            background_ok: 1234,
            background_errors: 21,
        };
        let (md, ok) = raft_markdown(&[lead, fwd, busy], &[f], &RaftTargets::default());
        assert_eq!(ok, Some(false), "{md}");
        assert!(
            md.contains("| leader | 1 | 1000 | 0 | 300 | 3.20 | 3.84 | 6.40 | 32.00 |"),
            "{md}"
        );
        assert!(md.contains("| follower (forwarded) | 1 |"), "{md}");
        assert!(
            md.contains("| leader | 16 | 1000 | 2 | 400 | 40.00 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "- commit p50 ≤ 5 ms with fsync, c=1, writes sent to the leader: 3.20 ms, 0 errors: met"
            ),
            "{md}"
        );
        assert!(
            md.contains("sent to the follower (forwarded): 5.60 ms, 0 errors: **missed**"),
            "{md}"
        );
        assert!(!md.contains("c=16"), "only c=1 is checked: {md}");
        assert!(
            md.contains("| 20 | 1000.0 | 1400.0 | 1500.0 | 1500.0 | 550.0 | 800.0 / 1000.0 / 1000.0 | 44 | 1234 / 21 |"),
            "{md}"
        );
        assert!(
            md.contains("- failover p99 ≤ 1.5 s (20 kills, default timings): 1.50 s: met"),
            "{md}"
        );
        assert!(md.contains("- first write: 550, 600\n"), "{md}");
        assert_eq!(raft_markdown(&[], &[], &RaftTargets::default()).1, None);
    }

    #[test]
    fn table_rows_line_up() {
        let r = rec("direct", 8, 123.4, 45678.9, 0);
        assert_eq!(
            table_header().chars().count(),
            table_row(&r).chars().count()
        );
    }
}
