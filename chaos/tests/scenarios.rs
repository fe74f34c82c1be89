//! The bounded CI scenarios: real `hangar` clusters under faults and the workloads, each
//! checked end to end by [`hangar_chaos::run::run`] (linearizability, lost writes, event-log
//! prefixes, the single-instance invariant, orphans, recovery). Each asserts that work
//! actually happened (acknowledged operations per workload, every planned fault injected),
//! so none can pass vacuously; a missing binary fails the test.
//!
//! The scenarios run one at a time (a lock in this binary; under nextest, see the `chaos`
//! test group proposed in `chaos/README.md`): each starts three nodes on a 2-core machine.
//! A failing scenario keeps its outputs (history, faults, report, node logs) and prints where.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hangar_chaos::checker::{self, Check};
use hangar_chaos::faults::{Fault, FaultKind, PartitionKind, Planned, Schedule, Target};
use hangar_chaos::history::{Op, OpKind, Outcome};
use hangar_chaos::nodes::{SERVER_ID, find_binary};
use hangar_chaos::run::{RunOptions, RunReport, parse_mix, run};
use serde_json::{Value, json};
use tokio::time::Instant;

/// One scenario at a time in this process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const S: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The binaries; a missing one fails the test, with how to get it.
fn binaries() -> (PathBuf, PathBuf) {
    let find = |name: &str| {
        find_binary(name).unwrap_or_else(|e| {
            panic!(
                "the chaos scenarios need the `{name}` binary: build it (cargo build --bins) or set {}_BIN: {e:#}",
                name.to_ascii_uppercase().replace('-', "_")
            )
        })
    };
    (find("hangar"), find("hangar-fixture"))
}

fn options(seed: u64, out: &Path) -> RunOptions {
    let (hangar, fixture) = binaries();
    let mut o = RunOptions::new(&hangar, &fixture);
    o.seed = seed;
    o.out = Some(out.to_owned());
    o.progress = true;
    o
}

/// An explicit schedule: each fault at `offset` into its slot, slots back to back.
fn schedule(seed: u64, faults: &[(Duration, Fault)]) -> (Schedule, Duration) {
    let mut at = Duration::ZERO;
    let mut planned = Vec::new();
    for (slot, fault) in faults {
        planned.push(Planned {
            at: at + ms(300),
            fault: fault.clone(),
        });
        at += *slot;
    }
    (
        Schedule {
            seed,
            faults: planned,
        },
        at,
    )
}

/// Run a scenario; its report and its output directory (deleted unless the scenario fails).
async fn scenario(
    name: &str,
    seed: u64,
    set: impl FnOnce(&mut RunOptions),
) -> (RunReport, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("hangar-chaos-{name}-"))
        .tempdir()
        .unwrap();
    let mut o = options(seed, dir.path());
    set(&mut o);
    let t = Instant::now();
    let report = run(o)
        .await
        .unwrap_or_else(|e| panic!("{name}: the run could not be carried out: {e:#}"));
    eprintln!("{}", report.summary());
    eprintln!("{name}: {:.1} s in all", t.elapsed().as_secs_f64());
    (report, dir)
}

/// The figures a scenario must reach so that it cannot pass without doing anything.
struct Floors {
    /// Acknowledged ops of each of register, set and calls.
    ok_ops: u64,
    /// Acknowledged event-log reads.
    event_reads: u64,
}

const FLOORS: Floors = Floors {
    ok_ops: 50,
    event_reads: 10,
};

/// Everything wrong with a run, beyond [`RunReport::problems`]: each invariant spelled out,
/// every planned fault injected and healed, and enough work done.
fn shortfalls(r: &RunReport, floors: &Floors) -> Vec<String> {
    let mut s: Vec<String> = r.problems.clone();
    let lost = r
        .checker
        .violations
        .iter()
        .filter(|v| v.check == Check::LostWrites)
        .count();
    if !r.checker.ok() || lost > 0 {
        s.push(format!(
            "checker: {} violation(s), {lost} lost acknowledged write(s), {} undecided",
            r.checker.violations.len(),
            r.checker.unknown.len()
        ));
    }
    if !r.single_instance.violations.is_empty() {
        s.push("single-instance violations".into());
    }
    if !r.orphans_during.is_empty() || !r.orphans_after.is_empty() {
        s.push(format!(
            "orphans: {:?} {:?}",
            r.orphans_during, r.orphans_after
        ));
    }
    if !r.recovery.ready || !r.recovery.exited.is_empty() {
        s.push(format!("recovery: {:?}", r.recovery));
    }
    if !r.final_reads_missing.is_empty() {
        s.push(format!("final reads: {:?}", r.final_reads_missing));
    }
    let planned = r.schedule.faults.len();
    let injected: usize = r.fault_figures.iter().map(|f| f.injected).sum();
    if planned == 0 || injected != planned {
        s.push(format!("{injected} faults injected of {planned} planned"));
    }
    for f in &r.fault_figures {
        if f.injected != f.planned || f.inject_failed + f.heal_failed > 0 {
            s.push(format!(
                "{}: {} planned, {} injected, {} not injected, {} not healed",
                f.kind, f.planned, f.injected, f.inject_failed, f.heal_failed
            ));
        }
    }
    if let Some(e) = r.faults.iter().find(|f| f.error.is_some()) {
        s.push(format!("a fault failed: {e:?}"));
    }
    for w in ["register", "set", "calls", "events"] {
        let floor = if w == "events" {
            floors.event_reads
        } else {
            floors.ok_ops
        };
        let ok = r
            .workloads
            .iter()
            .find(|f| f.workload == w)
            .map_or(0, |f| f.ok);
        if ok < floor {
            s.push(format!("workload {w}: {ok} acknowledged ops < {floor}"));
        }
    }
    if r.single_instance.samples_running == 0 {
        s.push("the fixture never ran (no sample saw its process)".into());
    }
    s
}

/// Fail with everything wrong, keeping the outputs; delete them otherwise.
fn assert_sound(name: &str, r: &RunReport, dir: tempfile::TempDir, extra: Vec<String>) {
    let mut wrong = shortfalls(r, &FLOORS);
    wrong.extend(extra);
    if wrong.is_empty() {
        return;
    }
    let kept = dir.keep();
    panic!(
        "{name}: {} problem(s) (outputs kept in {}; the summary is above):\n  - {}\n\n{}",
        wrong.len(),
        kept.display(),
        wrong.join("\n  - "),
        r.failure_details()
    );
}

fn figures(r: &RunReport, kind: FaultKind) -> &hangar_chaos::run::FaultFigures {
    r.fault_figures
        .iter()
        .find(|f| f.kind == kind.name())
        .unwrap_or_else(|| panic!("no {kind} in the report"))
}

/// (a) Ten leader kills, each restarted after a quarter to a half of its 3 s slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_and_restarts() {
    let _one = SERIAL.lock().await;
    let (r, dir) = scenario("kills", 101, |o| {
        o.mix = parse_mix("kill-leader:10").unwrap();
        o.duration = 30 * S;
    })
    .await;
    let kills = figures(&r, FaultKind::Kill);
    let mut extra = Vec::new();
    if kills.injected < 10 {
        extra.push(format!("{} kills < 10", kills.injected));
    }
    // The target is resolved when the fault is injected: the leader a majority names.
    if kills.hit_leader < 9 {
        extra.push(format!(
            "only {} of the kills hit the leader",
            kills.hit_leader
        ));
    }
    assert_sound("leader_kills_and_restarts", &r, dir, extra);
}

/// (b) Pauses longer than the election timeout: of the leader and of a follower (1.5 s,
/// three election timeouts), and of the node running the fixture's single instance for
/// longer than the node-loss timeout (4.5 s > 3 s), so that its instance is placed elsewhere
/// while it is frozen: its lease shim must have stopped the old process (single instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_longer_than_the_election_timeout() {
    let _one = SERIAL.lock().await;
    let pause = |target: Target, d: Duration| Fault::Pause {
        target,
        duration: d,
    };
    let host = Target::HostOfInstance(SERVER_ID.to_owned());
    let (plan, length) = schedule(
        102,
        &[
            (ms(3500), pause(Target::Leader, ms(1500))),
            (ms(7000), pause(host.clone(), ms(4500))),
            (ms(3500), pause(Target::Follower, ms(1500))),
            (ms(7000), pause(host, ms(4500))),
            (ms(3500), pause(Target::Leader, ms(1500))),
        ],
    );
    let (r, dir) = scenario("pauses", 102, |o| {
        o.schedule = Some(plan);
        o.duration = length;
    })
    .await;
    let pauses = figures(&r, FaultKind::Pause);
    let mut extra = Vec::new();
    if pauses.injected < 5 {
        extra.push(format!("{} pauses < 5", pauses.injected));
    }
    let election = ms(500);
    for f in r.faults.iter().filter(|f| f.kind == FaultKind::Pause) {
        let lasted = Duration::from_nanos(f.heal_ns - f.start_ns);
        if lasted <= election {
            extra.push(format!("pause {} lasted {lasted:?} only", f.index));
        }
    }
    assert_sound("pauses_longer_than_the_election_timeout", &r, dir, extra);
}

/// (c) Partitions through the proxy: majority/minority splits (the leader in the minority half
/// the time), the leader isolated (connections refused and cut) and blackholed (connections
/// kept, nothing delivered), and the fixture's host isolated. Three of them outlast the
/// node-loss timeout (3 s): an isolated host cannot renew its lease, so its shim stops the
/// old process before the instance is placed elsewhere; an isolated leader (when it does not
/// host the instance) believes the host lost, and must not be able to move the instance (the
/// instance's host is not known in advance: each leader isolation has that shape about two
/// times in three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_isolations() {
    let _one = SERIAL.lock().await;
    let part = |kind: PartitionKind, d: Duration| Fault::Partition { kind, duration: d };
    let (plan, length) = schedule(
        103,
        &[
            (ms(4000), part(PartitionKind::MajorityMinority, ms(2000))),
            (
                ms(7000),
                part(PartitionKind::Isolate(Target::Leader), ms(4500)),
            ),
            (
                ms(7000),
                part(
                    PartitionKind::Isolate(Target::HostOfInstance(SERVER_ID.to_owned())),
                    ms(4500),
                ),
            ),
            (
                ms(4000),
                part(PartitionKind::Blackhole(Target::Leader), ms(2000)),
            ),
            (
                ms(7000),
                part(PartitionKind::Isolate(Target::Leader), ms(4500)),
            ),
            (ms(7000), part(PartitionKind::MajorityMinority, ms(4500))),
        ],
    );
    let (r, dir) = scenario("partitions", 103, |o| {
        o.schedule = Some(plan);
        o.duration = length;
    })
    .await;
    let mut extra = Vec::new();
    let split = figures(&r, FaultKind::MajorityMinority).injected;
    let isolated = figures(&r, FaultKind::Isolate).injected;
    let blackholed = figures(&r, FaultKind::Blackhole).injected;
    if split + isolated + blackholed < 6 || split < 2 || isolated < 3 || blackholed < 1 {
        extra.push(format!(
            "partitions injected: {split} splits, {isolated} isolations, {blackholed} blackholes"
        ));
    }
    assert_sound("partitions_and_isolations", &r, dir, extra);
}

/// (d) Upstream kills: the fixture process is SIGKILLed five times (Hangar starts it again
/// on the next call), then the node hosting it is killed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_kills() {
    let _one = SERIAL.lock().await;
    let mut faults: Vec<(Duration, Fault)> =
        (0..5).map(|_| (ms(2000), Fault::KillUpstream)).collect();
    for _ in 0..2 {
        faults.push((
            ms(4000),
            Fault::Kill {
                target: Target::HostOfInstance(SERVER_ID.to_owned()),
                down_for: ms(1000),
            },
        ));
    }
    let (plan, length) = schedule(104, &faults);
    let (r, dir) = scenario("upstream", 104, |o| {
        o.schedule = Some(plan);
        o.duration = length;
    })
    .await;
    let mut extra = Vec::new();
    let upstream = figures(&r, FaultKind::KillUpstream);
    if upstream.injected < 5 {
        extra.push(format!("{} upstream kills < 5", upstream.injected));
    }
    let pids: Vec<u32> = r.faults.iter().filter_map(|f| f.pid).collect();
    if pids.len() < 5 {
        extra.push(format!("upstream processes killed: {pids:?}"));
    }
    let hosts = r
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Kill && f.detail.contains("host of"))
        .count();
    if hosts < 2 {
        extra.push(format!("{hosts} kills of the fixture's host < 2"));
    }
    assert_sound("upstream_kills", &r, dir, extra);
}

/// The whole pipeline catches a real anomaly: a history recorded from a real run passes the
/// checker, and the same history with one read made stale (or one acknowledged element
/// dropped from a set read) fails it, through the library and through `hangar-chaos check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_flags_a_corrupted_read_of_a_real_run() {
    let _one = SERIAL.lock().await;
    let (r, dir) = scenario("corrupt", 105, |o| {
        o.mix = parse_mix("pause-leader:2").unwrap();
        o.duration = 8 * S;
    })
    .await;
    let history = r.out_dir.join("history.jsonl");
    let ops = checker::read_history(&history).unwrap();
    assert_eq!(ops.len(), r.ops.len(), "history.jsonl holds every op");
    let clean = checker::check_all(&ops);
    assert!(
        clean.ok(),
        "the real run's history:\n{}",
        clean.render(&ops)
    );
    assert!(
        clean.counts.get("read").is_some_and(|c| c.ok > 10),
        "{:?}",
        clean.counts
    );

    // A stale register read.
    let (stale, culprit) = stale_read(&ops);
    let report = checker::check_all(&stale);
    assert!(!report.ok(), "a stale read went unnoticed");
    let v = report
        .violations
        .iter()
        .find(|v| v.check == Check::Register)
        .unwrap_or_else(|| panic!("no register violation:\n{}", report.render(&stale)));
    assert!(
        v.window.contains(&culprit),
        "the window {:?} does not show the corrupted read {culprit}:\n{}",
        v.window,
        report.render(&stale)
    );
    eprintln!("stale read {culprit} flagged:\n{}", report.render(&stale));

    // An acknowledged element dropped from the last set read.
    let lost = dropped_element(&ops);
    let report = checker::check_all(&lost);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.check == Check::LostWrites),
        "a lost acknowledged add went unnoticed:\n{}",
        report.render(&lost)
    );

    // The same through the command line.
    let cli = |ops: &[Op], file: &str| {
        let path = dir.path().join(file);
        let text: String = ops
            .iter()
            .map(|o| serde_json::to_string(o).unwrap() + "\n")
            .collect();
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_hangar-chaos"))
            .args(["check", "--history"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = cli(&stale, "stale.jsonl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("[register]"), "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar-chaos"))
        .args(["check", "--history"])
        .arg(&history)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_sound(
        "the_checker_flags_a_corrupted_read_of_a_real_run",
        &r,
        dir,
        Vec::new(),
    );
}

/// `ops` with one acknowledged register read made stale: it returns the value of a write
/// that a later acknowledged write had overwritten before the read began. Returns the index
/// of the read changed.
fn stale_read(ops: &[Op]) -> (Vec<Op>, u64) {
    let ok = |o: &&Op, k: OpKind| o.kind == k && o.outcome == Outcome::Ok;
    // A read that follows, in real time, two acknowledged writes w0 < w1 of its key (w1
    // invoked after w0 completed, the read invoked after w1 completed) returns w1's value or
    // a later one: make it return w0's.
    for r in ops.iter().filter(|o| ok(o, OpKind::Read)) {
        let writes: Vec<&Op> = ops
            .iter()
            .filter(|w| w.key == r.key && w.kind == OpKind::Write)
            .collect();
        let done_before: Vec<&&Op> = writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && w.complete_ns < r.invoke_ns)
            .collect();
        let Some(w1) = done_before.iter().max_by_key(|w| w.complete_ns) else {
            continue;
        };
        let Some(w0) = done_before
            .iter()
            .filter(|w| w.complete_ns < w1.invoke_ns && w.value != w1.value)
            .max_by_key(|w| w.complete_ns)
        else {
            continue;
        };
        // Values written are unique: no other write put w0's value back.
        if r.value == w0.value {
            continue;
        }
        let mut out = ops.to_vec();
        let changed = out.iter_mut().find(|o| o.index == r.index).unwrap();
        changed.value = w0.value.clone();
        return (out, r.index);
    }
    panic!(
        "no register read to make stale in a history of {} ops",
        ops.len()
    );
}

/// `ops` with the last acknowledged set read missing an element whose add was acknowledged
/// before that read began.
fn dropped_element(ops: &[Op]) -> Vec<Op> {
    let last = ops
        .iter()
        .filter(|o| o.kind == OpKind::ReadSet && o.outcome == Outcome::Ok)
        .max_by_key(|o| o.invoke_ns)
        .expect("an acknowledged set read");
    let added = ops
        .iter()
        .filter(|o| {
            o.kind == OpKind::Add
                && o.key == last.key
                && o.outcome == Outcome::Ok
                && o.complete_ns < last.invoke_ns
        })
        .map(|o| o.value.clone())
        .next_back()
        .expect("an acknowledged add before the last set read");
    let mut out = ops.to_vec();
    let read = out.iter_mut().find(|o| o.index == last.index).unwrap();
    let Value::Array(items) = &mut read.value else {
        panic!("a set read's value is an array: {}", read.value);
    };
    let before = items.len();
    items.retain(|v| v != &added);
    assert_eq!(items.len() + 1, before, "{added} in {}", json!(before));
    out
}
