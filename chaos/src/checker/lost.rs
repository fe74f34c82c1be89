//! Cheap lost-write checks on the final read of every set and register.

use std::collections::{BTreeMap, HashSet};

use super::models::canonical;
use super::{Check, Violation};
use crate::history::{Op, OpKind, Outcome};

/// The `Ok` op of `kind` invoked last (ties: the highest index).
fn final_read<'a>(ops: &[&'a Op], kind: OpKind) -> Option<&'a Op> {
    ops.iter()
        .copied()
        .filter(|op| op.kind == kind && op.outcome == Outcome::Ok)
        .max_by_key(|op| (op.invoke_ns, op.index))
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

pub(crate) fn check(ops: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut out = Vec::new();
    for (key, ops) in by_key {
        if let Some(read) = final_read(&ops, OpKind::ReadSet) {
            set(key, &ops, read, &mut out);
        }
        if let Some(read) = final_read(&ops, OpKind::Read) {
            register(key, &ops, read, &mut out);
        }
    }
    out
}

/// Every element whose add was acknowledged before the final read started must be in it.
fn set(key: &str, ops: &[&Op], read: &Op, out: &mut Vec<Violation>) {
    let Some(items) = read.value.as_array() else {
        return; // reported as malformed by the set check
    };
    let seen: HashSet<String> = items.iter().map(canonical).collect();
    for add in ops.iter().filter(|op| {
        op.kind == OpKind::Add && op.outcome == Outcome::Ok && op.complete_ns < read.invoke_ns
    }) {
        if !seen.contains(&canonical(&add.value)) {
            out.push(Violation {
                check: Check::LostWrites,
                key: key.to_owned(),
                explanation: format!(
                    "acknowledged write lost: element {} added by op {} (acknowledged at {}) \
                     is missing from the final read op {} (invoked at {})",
                    add.value,
                    add.index,
                    ms(add.complete_ns),
                    read.index,
                    ms(read.invoke_ns)
                ),
                window: vec![add.index, read.index],
            });
        }
    }
}

/// The final read must return a value some `Ok`/`Info` write wrote, and not "absent" once a
/// write has been acknowledged.
fn register(key: &str, ops: &[&Op], read: &Op, out: &mut Vec<Violation>) {
    let writes = || {
        ops.iter()
            .copied()
            .filter(|op| op.kind == OpKind::Write && op.outcome != Outcome::Fail)
    };
    if read.value.is_null() {
        let acknowledged = writes()
            .filter(|w| {
                w.outcome == Outcome::Ok && w.complete_ns < read.invoke_ns && !w.value.is_null()
            })
            .max_by_key(|w| w.complete_ns);
        if let Some(w) = acknowledged {
            out.push(Violation {
                check: Check::LostWrites,
                key: key.to_owned(),
                explanation: format!(
                    "acknowledged write lost: the final read op {} returned absent, although \
                     write op {} of {} was acknowledged at {}, before the read started",
                    read.index,
                    w.index,
                    w.value,
                    ms(w.complete_ns)
                ),
                window: vec![w.index, read.index],
            });
        }
        return;
    }
    let value = canonical(&read.value);
    if !writes().any(|w| canonical(&w.value) == value) {
        let failed: Vec<u64> = ops
            .iter()
            .filter(|op| {
                op.kind == OpKind::Write
                    && op.outcome == Outcome::Fail
                    && canonical(&op.value) == value
            })
            .map(|op| op.index)
            .collect();
        let note = if failed.is_empty() {
            String::new()
        } else {
            format!(" (only by write(s) that failed: {failed:?})")
        };
        let mut window = failed;
        window.push(read.index);
        out.push(Violation {
            check: Check::LostWrites,
            key: key.to_owned(),
            explanation: format!(
                "read of a value never written: the final read op {} returned {}{note}",
                read.index, read.value
            ),
            window,
        });
    }
}
