//! Tests of the checker: hand-built histories with known answers, simulated concurrent
//! histories (linearizable by construction), and property tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::*;
use crate::history::{Op, OpKind, Outcome};

// ---------------------------------------------------------------------------------------
// Building histories by hand
// ---------------------------------------------------------------------------------------

/// Builds histories by hand: indices are assigned in order of addition; times are in
/// "ticks" of 1 ms.
#[derive(Default)]
struct H {
    ops: Vec<Op>,
}

const MS: u64 = 1_000_000;

impl H {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        process: u64,
        kind: OpKind,
        key: &str,
        value: Value,
        outcome: Outcome,
        invoke: u64,
        complete: u64,
    ) -> u64 {
        let index = self.ops.len() as u64;
        self.ops.push(Op {
            index,
            process,
            node: process % 3 + 1,
            kind,
            key: key.to_owned(),
            value,
            outcome,
            invoke_ns: invoke * MS,
            complete_ns: complete * MS,
            error: None,
        });
        index
    }
    fn w(&mut self, p: u64, v: Value, o: Outcome, t: (u64, u64)) -> u64 {
        self.push(p, OpKind::Write, "x", v, o, t.0, t.1)
    }
    fn r(&mut self, p: u64, v: Value, t: (u64, u64)) -> u64 {
        self.push(p, OpKind::Read, "x", v, Outcome::Ok, t.0, t.1)
    }
    fn add(&mut self, p: u64, e: &str, o: Outcome, t: (u64, u64)) -> u64 {
        self.push(p, OpKind::Add, "s", json!(e), o, t.0, t.1)
    }
    fn rs(&mut self, p: u64, es: &[&str], t: (u64, u64)) -> u64 {
        self.push(p, OpKind::ReadSet, "s", json!(es), Outcome::Ok, t.0, t.1)
    }
    fn ev(&mut self, node: u64, v: Value, t: (u64, u64)) -> u64 {
        let i = self.push(node, OpKind::Events, "events", v, Outcome::Ok, t.0, t.1);
        self.ops[i as usize].node = node;
        i
    }
}

use Outcome::{Fail, Info, Ok as Done};

fn assert_violation(verdict: &Verdict, must_contain: &[u64]) -> Violation {
    let v = verdict
        .violations()
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("expected a violation, got {verdict:?}"));
    for i in must_contain {
        assert!(
            v.window.contains(i),
            "window {:?} should contain op {i}: {}",
            v.window,
            v.explanation
        );
    }
    v
}

// ---------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------

#[test]
fn register_concurrent_writes_reads_may_see_either() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 100));
    h.w(1, json!(2), Done, (0, 100));
    h.r(2, json!(2), (10, 90));
    h.r(3, json!(1), (20, 95));
    h.r(2, json!(1), (200, 210));
    assert!(check_register(&h.ops).is_ok());
    assert!(check_all(&h.ops).ok());
}

#[test]
fn register_read_of_null_before_any_write() {
    let mut h = H::default();
    h.r(0, Value::Null, (0, 10));
    h.w(1, json!(1), Done, (5, 30)); // concurrent with the next read, which may miss it
    h.r(2, Value::Null, (6, 20));
    h.r(0, json!(1), (40, 50));
    assert!(check_register(&h.ops).is_ok());
}

#[test]
fn register_info_write_applied() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.w(1, json!(2), Info, (20, 30));
    h.r(2, json!(2), (100, 110));
    assert!(check_register(&h.ops).is_ok());
}

#[test]
fn register_info_write_not_applied() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.w(1, json!(2), Info, (20, 30));
    h.r(2, json!(1), (100, 110));
    h.r(2, json!(1), (120, 130));
    assert!(check_register(&h.ops).is_ok());
    assert!(check_all(&h.ops).ok());
}

#[test]
fn register_info_write_applied_long_after_the_client_gave_up() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.w(1, json!(2), Info, (20, 30));
    h.r(2, json!(1), (100, 110));
    h.w(0, json!(3), Done, (120, 130));
    h.r(2, json!(3), (140, 150));
    h.r(2, json!(2), (160, 170));
    assert!(check_register(&h.ops).is_ok());
}

#[test]
fn register_failed_write_is_ignored_and_info_read_tells_nothing() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.w(1, json!(2), Fail, (20, 30));
    h.push(2, OpKind::Read, "x", json!(99), Info, 40, 50);
    h.r(2, json!(1), (60, 70));
    assert!(check_register(&h.ops).is_ok());
}

#[test]
fn register_stale_read_is_caught() {
    let mut h = H::default();
    let w1 = h.w(0, json!(1), Done, (0, 10));
    let w2 = h.w(1, json!(2), Done, (20, 30));
    let r = h.r(2, json!(1), (40, 50));
    let v = assert_violation(&check_register(&h.ops), &[w1, w2, r]);
    assert_eq!(v.check, Check::Register);
    assert_eq!(v.key, "x");
    assert!(v.explanation.contains("returned 1"), "{}", v.explanation);
    assert!(v.explanation.contains("held 2"), "{}", v.explanation);
}

#[test]
fn register_lost_acknowledged_write_is_caught() {
    // Write 1 is acknowledged; a later read returns the previous value.
    let mut h = H::default();
    h.w(0, json!(0), Done, (0, 10));
    let w1 = h.w(1, json!(1), Done, (20, 30));
    let r = h.r(2, json!(0), (40, 50));
    assert_violation(&check_register(&h.ops), &[w1, r]);

    // The only write is acknowledged; the final read says absent.
    let mut h = H::default();
    let w = h.w(0, json!(1), Done, (0, 10));
    let r = h.r(1, Value::Null, (20, 30));
    assert_violation(&check_register(&h.ops), &[w, r]);
    let lost = lost_writes(&h.ops);
    assert_eq!(lost.len(), 1);
    assert!(lost[0].explanation.contains("acknowledged write lost"));
    assert_eq!(lost[0].window, vec![w, r]);
}

#[test]
fn register_reads_going_back_in_time_are_caught() {
    let mut h = H::default();
    let w1 = h.w(0, json!(1), Done, (0, 10));
    let w2 = h.w(1, json!(2), Done, (15, 100));
    let r1 = h.r(2, json!(2), (40, 50));
    let r2 = h.r(3, json!(1), (60, 70));
    let v = assert_violation(&check_register(&h.ops), &[w1, w2, r1, r2]);
    assert!(
        v.explanation.contains(&format!("op {r2}")),
        "{}",
        v.explanation
    );
}

#[test]
fn register_read_of_a_value_never_written_is_caught() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    let failed = h.w(0, json!(2), Fail, (20, 30));
    let r = h.r(1, json!(2), (40, 50));
    assert_violation(&check_register(&h.ops), &[r]);
    let lost = lost_writes(&h.ops);
    assert_eq!(lost.len(), 1);
    assert!(lost[0].explanation.contains("never written"));
    assert_eq!(lost[0].window, vec![failed, r]);
}

#[test]
fn register_keys_are_checked_independently() {
    let mut h = H::default();
    h.push(0, OpKind::Write, "a", json!(1), Done, 0, 10);
    h.push(1, OpKind::Write, "b", json!(1), Done, 20, 30);
    h.push(2, OpKind::Read, "a", json!(1), Done, 40, 50);
    let bad = h.push(2, OpKind::Read, "b", Value::Null, Done, 60, 70);
    let verdict = check_register(&h.ops);
    assert_eq!(verdict.violations().len(), 1);
    assert_eq!(verdict.violations()[0].key, "b");
    assert!(verdict.violations()[0].window.contains(&bad));
}

#[test]
fn window_is_small_in_a_long_history() {
    // 1000 sequential ops, one stale read in the middle.
    let mut h = H::default();
    let mut stale = None;
    let mut t = 0;
    for i in 0..500u64 {
        h.w(i % 4, json!(i), Done, (t, t + 5));
        let seen = if i == 250 { i - 1 } else { i };
        let r = h.r(i % 4 + 1, json!(seen), (t + 6, t + 9));
        if i == 250 {
            stale = Some(r);
        }
        t += 10;
    }
    let stale = stale.unwrap();
    let v = assert_violation(&check_register(&h.ops), &[stale, stale - 1, stale - 3]);
    assert!(v.window.len() <= 6, "window too large: {:?}", v.window);
    let table = render_window(&h.ops, &v.window);
    assert!(table.lines().count() == v.window.len() + 1, "{table}");
}

#[test]
fn search_budget_gives_unknown() {
    let mut h = H::default();
    for i in 0..12u64 {
        h.w(i, json!(i), Done, (0, 100));
    }
    h.r(0, json!(99), (200, 210));
    let limits = Limits {
        max_steps: 50,
        max_cache_bytes: 1 << 20,
    };
    let verdict = check_register_with(&h.ops, &limits);
    assert!(matches!(verdict, Verdict::Unknown { .. }), "{verdict:?}");
    assert!(verdict.unknown()[0].reason.contains("gave up"));
    let report = check_all_with(&h.ops, &limits);
    assert!(!report.ok());
}

// ---------------------------------------------------------------------------------------
// Sets
// ---------------------------------------------------------------------------------------

#[test]
fn set_linearizable_with_concurrent_and_info_adds() {
    let mut h = H::default();
    h.add(0, "a", Done, (0, 10));
    h.add(1, "b", Done, (5, 40));
    h.rs(2, &["a"], (20, 25));
    h.rs(3, &["b", "a"], (21, 30));
    h.add(0, "c", Info, (50, 60)); // applied later
    h.add(1, "d", Info, (50, 60)); // never applied
    h.add(1, "e", Fail, (61, 62));
    h.rs(2, &["a", "b"], (100, 110));
    h.rs(2, &["a", "c", "b"], (120, 130));
    assert!(check_set(&h.ops).is_ok(), "{:?}", check_set(&h.ops));
    assert!(check_all(&h.ops).ok());
}

#[test]
fn set_lost_acknowledged_add_is_caught() {
    let mut h = H::default();
    let a = h.add(0, "a", Done, (0, 10));
    h.add(1, "b", Done, (0, 10));
    let r = h.rs(2, &["b"], (20, 30));
    let v = assert_violation(&check_set(&h.ops), &[a, r]);
    assert!(
        v.explanation.contains("missing [\"a\"]"),
        "{}",
        v.explanation
    );
    let lost = lost_writes(&h.ops);
    assert_eq!(lost.len(), 1);
    assert!(lost[0].explanation.contains("acknowledged write lost"));
    assert_eq!(lost[0].window, vec![a, r]);
}

#[test]
fn set_element_disappearing_is_caught() {
    let mut h = H::default();
    h.add(0, "a", Done, (0, 10));
    let b = h.add(1, "b", Info, (0, 10));
    let r1 = h.rs(2, &["a", "b"], (20, 30));
    let r2 = h.rs(2, &["a"], (40, 50));
    assert_violation(&check_set(&h.ops), &[b, r1, r2]);
    // Not a lost write in the lost_writes sense: b was never acknowledged.
    assert!(lost_writes(&h.ops).is_empty());
}

#[test]
fn set_read_with_a_duplicate_is_caught() {
    let mut h = H::default();
    h.add(0, "a", Done, (0, 10));
    let r = h.rs(2, &["a", "a"], (20, 30));
    let verdict = check_set(&h.ops);
    assert!(
        verdict
            .violations()
            .iter()
            .any(|v| v.explanation.contains("more than once") && v.window == vec![r])
    );
}

#[test]
fn malformed_set_read_is_unknown() {
    let mut h = H::default();
    h.add(0, "a", Done, (0, 10));
    h.push(1, OpKind::ReadSet, "s", json!("a"), Done, 20, 30);
    let verdict = check_set(&h.ops);
    assert!(matches!(verdict, Verdict::Unknown { .. }), "{verdict:?}");
}

// ---------------------------------------------------------------------------------------
// Event logs
// ---------------------------------------------------------------------------------------

#[test]
fn event_logs_consistent() {
    let mut h = H::default();
    h.ev(1, json!([1, 2, 3]), (0, 10));
    h.ev(2, json!([1, 2]), (0, 10));
    h.ev(1, json!([1, 2, 3, 4]), (20, 30));
    h.ev(3, json!([3, 4, 5]), (20, 30)); // truncated at the start
    h.ev(2, json!([]), (5, 8)); // concurrent with its node's first read: may lag
    h.ev(
        2,
        json!([{"seq": 1, "id": "a"}, {"seq": 2, "id": "b"}]),
        (40, 50),
    );
    h.ev(
        4,
        json!([{"seq": 2, "id": "b"}, {"seq": 3, "id": "c"}]),
        (40, 50),
    );
    assert!(
        event_prefixes(&h.ops).is_empty(),
        "{:?}",
        event_prefixes(&h.ops)
    );
    assert!(check_all(&h.ops).ok());
}

#[test]
fn event_log_reordered_or_with_a_hole_is_caught() {
    let mut h = H::default();
    h.ev(1, json!([1, 2, 3, 4]), (0, 10));
    let reordered = h.ev(2, json!([1, 2, 4, 3]), (0, 10));
    let hole = h.ev(2, json!([1, 2, 4]), (20, 30));
    let v = event_prefixes(&h.ops);
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(v[0].window, vec![reordered]);
    assert!(v[0].explanation.contains("out of order"));
    assert_eq!(v[1].window, vec![hole]);
    assert!(v[1].explanation.contains("gap"));
}

#[test]
fn diverging_event_logs_are_caught() {
    let mut h = H::default();
    let a = h.ev(
        1,
        json!([{"seq": 1, "id": "a"}, {"seq": 2, "id": "b"}]),
        (0, 10),
    );
    let b = h.ev(
        2,
        json!([{"seq": 1, "id": "a"}, {"seq": 2, "id": "x"}]),
        (0, 10),
    );
    let v = event_prefixes(&h.ops);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].window, vec![a, b]);
    assert!(v[0].explanation.contains("diverge at seq 2"));
}

#[test]
fn event_log_shrinking_on_a_node_is_caught() {
    let mut h = H::default();
    let long = h.ev(1, json!([1, 2, 3]), (0, 10));
    h.ev(1, json!([1]), (5, 15)); // overlaps the first: no violation
    h.ev(2, json!([1]), (20, 30)); // another node may lag
    let short = h.ev(1, json!([1, 2]), (20, 30));
    h.ev(1, json!([1]), (40, 50)); // same episode: reported once
    let v = event_prefixes(&h.ops);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].window, vec![long, short]);
    assert!(v[0].explanation.contains("went backwards on node 1"));
}

#[test]
fn malformed_events_are_unknown_in_the_report() {
    let mut h = H::default();
    h.ev(1, json!([1, -2]), (0, 10));
    let report = check_all(&h.ops);
    assert!(report.violations.is_empty());
    assert_eq!(report.unknown.len(), 1);
    assert!(!report.ok());
}

// ---------------------------------------------------------------------------------------
// Report, rendering, reading
// ---------------------------------------------------------------------------------------

#[test]
fn report_counts_and_serializes() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.w(0, json!(2), Fail, (10, 20));
    h.w(0, json!(3), Info, (20, 30));
    let r = h.r(1, json!(5), (40, 50));
    h.push(2, OpKind::Call, "tool", json!({"ok": true}), Done, 0, 1);
    let report = check_all(&h.ops);
    assert!(!report.ok());
    assert_eq!(report.ops, 5);
    assert_eq!(report.register_keys, 1);
    assert_eq!(
        report.counts["write"],
        Counts {
            ok: 1,
            fail: 1,
            info: 1
        }
    );
    assert_eq!(report.counts["call"].ok, 1);
    // Linearizability and lost-writes both flag the read of 5.
    assert_eq!(report.violations.len(), 2);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["ok"], json!(false));
    assert_eq!(json["violations"][0]["check"], json!("register"));
    assert_eq!(json["violations"][0]["window"], json!([0, r]));
    let back: Report = serde_json::from_value(json).unwrap();
    assert_eq!(back, report);
    let text = report.render(&h.ops);
    assert!(text.contains("[register] x: not linearizable"), "{text}");
}

#[test]
fn render_window_prints_a_table() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.ev(2, json!([1, 2, 3, 4, 6, 7, 9]), (1, 2));
    let table = render_window(&h.ops, &[1, 0, 7]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("index  process  node  kind"),
        "{table}"
    );
    assert!(
        lines[1].contains("write") && lines[1].contains("10.000"),
        "{table}"
    );
    assert!(lines[2].contains("[1..4, 6, 7, 9]"), "{table}");
    assert!(lines[3].contains("not in the history: 7"), "{table}");
}

#[test]
fn read_history_reads_json_lines_and_names_bad_lines() {
    let mut h = H::default();
    h.w(0, json!(1), Done, (0, 10));
    h.r(1, json!(1), (20, 30));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let mut text: String = h
        .ops
        .iter()
        .map(|op| serde_json::to_string(op).unwrap() + "\n")
        .collect();
    text.push('\n');
    std::fs::write(&path, &text).unwrap();
    assert_eq!(read_history(&path).unwrap(), h.ops);

    text.push_str("{\"index\": 2}\n");
    std::fs::write(&path, &text).unwrap();
    let err = format!("{:#}", read_history(&path).unwrap_err());
    assert!(err.contains("history.jsonl:4: bad history line"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Simulated concurrent histories (linearizable by construction)
// ---------------------------------------------------------------------------------------

/// Simulates `processes` clients running `n` ops over `keys` registers and `keys` sets.
/// Every op that takes effect gets an instant inside its interval (an `Info` op: any time
/// after its invocation, possibly after the client gave up, or never); the objects are then
/// executed in the order of those instants to fill in what the reads returned.
fn simulate(seed: u64, processes: u64, n: usize, keys: usize, info: f64, fail: f64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ready = vec![0u64; processes as usize];
    // (op, instant at which it takes effect)
    let mut ops: Vec<(Op, Option<u64>)> = Vec::with_capacity(n);
    for i in 0..n {
        let process = (0..processes)
            .min_by_key(|&p| ready[p as usize])
            .unwrap_or(0);
        let invoke = ready[process as usize] + rng.random_range(0..50);
        let register = rng.random_bool(0.5);
        let key = format!(
            "{}{}",
            if register { "r" } else { "s" },
            rng.random_range(0..keys)
        );
        let update = rng.random_bool(0.5);
        let (kind, value) = match (register, update) {
            (true, true) => (OpKind::Write, json!(i)),
            (true, false) => (OpKind::Read, Value::Null),
            (false, true) => (OpKind::Add, json!(format!("e{i}"))),
            (false, false) => (OpKind::ReadSet, json!([])),
        };
        let roll: f64 = rng.random();
        let (outcome, instant, complete) = if roll < info {
            let applied = update && rng.random_bool(0.5);
            let instant = applied.then(|| invoke + rng.random_range(1..2_000));
            (Info, instant, invoke + rng.random_range(1..300))
        } else if roll < info + fail {
            (Fail, None, invoke + rng.random_range(1..100))
        } else {
            let instant = invoke + rng.random_range(1..100);
            (Done, Some(instant), instant + rng.random_range(0..100))
        };
        ready[process as usize] = complete;
        let op = Op {
            index: 0,
            process,
            node: rng.random_range(1..4),
            kind,
            key,
            value,
            outcome,
            invoke_ns: invoke * 1_000,
            complete_ns: complete * 1_000,
            error: None,
        };
        ops.push((op, instant.map(|t| t * 1_000)));
    }
    // Execute in the order of the instants.
    let mut order: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].1.is_some()).collect();
    order.sort_by_key(|&i| (ops[i].1, i));
    let mut registers: std::collections::HashMap<String, Value> = Default::default();
    let mut sets: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for i in order {
        let op = &mut ops[i].0;
        match op.kind {
            OpKind::Write => {
                registers.insert(op.key.clone(), op.value.clone());
            }
            OpKind::Read => {
                op.value = registers.get(&op.key).cloned().unwrap_or(Value::Null);
            }
            OpKind::Add => sets
                .entry(op.key.clone())
                .or_default()
                .push(op.value.clone()),
            OpKind::ReadSet => {
                let mut seen = sets.get(&op.key).cloned().unwrap_or_default();
                // Any order: a set read is compared as a set.
                if seen.len() > 1 {
                    let k = rng.random_range(0..seen.len());
                    seen.swap(0, k);
                }
                op.value = Value::Array(seen);
            }
            OpKind::Call | OpKind::Events => {}
        }
    }
    let mut ops: Vec<Op> = ops.into_iter().map(|(op, _)| op).collect();
    ops.sort_by_key(|op| (op.invoke_ns, op.process));
    for (i, op) in ops.iter_mut().enumerate() {
        op.index = i as u64;
    }
    ops
}

#[test]
fn large_simulated_concurrent_history_checks_quickly() {
    let ops = simulate(7, 5, 2000, 3, 0.05, 0.03);
    let started = Instant::now();
    let report = check_all(&ops);
    let elapsed = started.elapsed();
    assert!(report.ok(), "{}", report.render(&ops));
    assert_eq!(report.register_keys, 3);
    assert_eq!(report.set_keys, 3);
    assert!(report.counts["write"].info > 0 && report.counts["add"].info > 0);
    // Really concurrent: most ops overlap the next one.
    let overlapping = ops
        .windows(2)
        .filter(|w| w[1].invoke_ns < w[0].complete_ns)
        .count();
    assert!(overlapping > ops.len() / 2, "{overlapping}");
    eprintln!("checked {} ops in {elapsed:?}", ops.len());
    assert!(
        elapsed.as_secs_f64() < 10.0,
        "checking took {elapsed:?} (debug build)"
    );
}

#[test]
fn simulated_history_with_a_corrupted_read_is_caught() {
    let mut ops = simulate(11, 5, 2000, 3, 0.05, 0.03);
    let target = ops
        .iter()
        .rposition(|op| op.kind == OpKind::Read && op.outcome == Outcome::Ok && op.index > 1000)
        .unwrap();
    ops[target].value = json!(1_000_000_000);
    let index = ops[target].index;
    let verdict = check_register(&ops);
    let v = assert_violation(&verdict, &[index]);
    assert!(v.window.len() <= 30);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Small concurrent simulations (with `Info` and `Fail` ops) are always accepted.
    #[test]
    fn simulated_concurrent_histories_are_linearizable(seed in any::<u64>(), n in 1usize..120) {
        let ops = simulate(seed, 4, n, 2, 0.1, 0.05);
        let report = check_all(&ops);
        prop_assert!(report.ok(), "{}", report.render(&ops));
    }
}

/// A sequential history executed on a real register: `true` = write, `false` = read.
/// Op `i` runs during `[10i, 10i + 5]`.
fn sequential(kinds: &[bool]) -> Vec<Op> {
    let mut h = H::default();
    let mut current = Value::Null;
    for (i, &write) in kinds.iter().enumerate() {
        let t = 10 * i as u64;
        if write {
            current = json!(i);
            h.w(i as u64 % 3, current.clone(), Done, (t, t + 5));
        } else {
            h.r(i as u64 % 3, current.clone(), (t, t + 5));
        }
    }
    h.ops
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn sequential_register_histories_are_linearizable(kinds in prop::collection::vec(any::<bool>(), 0..80)) {
        let ops = sequential(&kinds);
        prop_assert!(check_register(&ops).is_ok());
        prop_assert!(check_all(&ops).ok());
    }

    #[test]
    fn a_single_corrupted_read_is_caught(
        kinds in prop::collection::vec(any::<bool>(), 0..80),
        pick in any::<usize>(),
        stale in any::<bool>(),
    ) {
        let mut kinds = kinds;
        kinds.push(false); // at least one read
        let mut ops = sequential(&kinds);
        let reads: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].kind == OpKind::Read).collect();
        let target = reads[pick % reads.len()];
        // Values the register held before the target read, other than the current one.
        let current = ops[target].value.clone();
        let mut older: Vec<Value> = vec![Value::Null];
        older.extend(ops[..target].iter().filter(|op| op.kind == OpKind::Write).map(|op| op.value.clone()));
        older.retain(|v| *v != current);
        ops[target].value = if stale && !older.is_empty() {
            older[pick % older.len()].clone()
        } else {
            json!(-1)
        };
        let verdict = check_register(&ops);
        prop_assert!(!verdict.is_ok());
        let window = &verdict.violations()[0].window;
        prop_assert!(window.contains(&(target as u64)), "window {:?}, target {}", window, target);
    }
}

#[test]
fn simulated_history_with_a_stale_read_is_caught_with_a_small_window() {
    let mut ops = simulate(11, 5, 2000, 3, 0.05, 0.03);
    let target = ops
        .iter()
        .rposition(|op| op.kind == OpKind::Read && op.outcome == Done && op.index > 1000)
        .unwrap();
    // The value of an older acknowledged write of the same key, finished before the read.
    let stale = ops[..target]
        .iter()
        .rev()
        .find(|w| {
            w.kind == OpKind::Write
                && w.key == ops[target].key
                && w.outcome == Done
                && w.complete_ns < ops[target].invoke_ns
                && w.value != ops[target].value
        })
        .unwrap()
        .value
        .clone();
    ops[target].value = stale;
    let index = ops[target].index;
    let report = check_all(&ops);
    let v = report
        .violations
        .iter()
        .find(|v| v.check == Check::Register)
        .unwrap_or_else(|| panic!("{}", report.render(&ops)));
    assert!(v.window.contains(&index), "{}", report.render(&ops));
    assert!(v.window.len() <= 10, "{}", report.render(&ops));
    assert!(
        v.explanation
            .starts_with(&format!("not linearizable: op {index} (read "))
    );
}

#[test]
fn cache_memory_bound_gives_unknown() {
    let mut h = H::default();
    for i in 0..16u64 {
        h.w(i, json!(i), Done, (0, 100));
    }
    h.r(0, json!(99), (200, 210));
    let limits = Limits {
        max_steps: u64::MAX,
        max_cache_bytes: 64 << 10,
    };
    let verdict = check_register_with(&h.ops, &limits);
    assert!(matches!(verdict, Verdict::Unknown { .. }), "{verdict:?}");
}
