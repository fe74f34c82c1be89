//! Event-log checks: every read of a node's event log must be a contiguous run of sequence
//! numbers, all reads must agree on what each sequence number is, and a node's log must not
//! go backwards.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::{Check, Unknown, Violation};
use crate::history::{Op, OpKind, Outcome};

/// One event as read: its sequence number and, in the object form, its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Event {
    seq: u64,
    id: Option<String>,
}

/// Parses an `Events` value: an array of sequence numbers, or of `{"seq": n, "id": …}`
/// objects (the `id`, when present, is compared as JSON text unless it is a string).
fn parse(value: &Value) -> Result<Vec<Event>, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("events value is not an array: {value}"))?;
    items
        .iter()
        .map(|item| match item {
            Value::Number(n) => n
                .as_u64()
                .map(|seq| Event { seq, id: None })
                .ok_or_else(|| format!("event seq is not a u64: {n}")),
            Value::Object(map) => {
                let seq = map
                    .get("seq")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("event object without a u64 \"seq\": {item}"))?;
                let id = map.get("id").map(|id| match id {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                Ok(Event { seq, id })
            }
            other => Err(format!("event is neither a seq nor an object: {other}")),
        })
        .collect()
}

/// The event-log checks over all `Ok` `Events` ops; ops whose value cannot be parsed are
/// returned as unknowns.
pub(crate) fn check(ops: &[Op]) -> (Vec<Violation>, Vec<Unknown>) {
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    let mut reads: Vec<(&Op, Vec<Event>)> = Vec::new();
    for op in ops
        .iter()
        .filter(|op| op.kind == OpKind::Events && op.outcome == Outcome::Ok)
    {
        match parse(&op.value) {
            Ok(events) => reads.push((op, events)),
            Err(reason) => unknown.push(Unknown {
                check: Check::EventPrefixes,
                key: op.key.clone(),
                reason: format!("op {}: {reason}", op.index),
            }),
        }
    }
    reads.sort_by_key(|(op, _)| op.index);

    contiguity(&reads, &mut violations);
    agreement(&reads, &mut violations);
    monotonicity(&reads, &mut violations);
    (violations, unknown)
}

/// Each read must be strictly increasing without holes (it may start anywhere: the log may
/// be truncated at the start).
fn contiguity(reads: &[(&Op, Vec<Event>)], out: &mut Vec<Violation>) {
    for (op, events) in reads {
        let backwards = events.windows(2).find(|w| w[1].seq <= w[0].seq);
        let gap = || events.windows(2).find(|w| w[1].seq != w[0].seq + 1);
        let found = backwards
            .map(|w| ("out of order", w))
            .or_else(|| gap().map(|w| ("with a gap", w)));
        if let Some((what, w)) = found {
            out.push(Violation {
                check: Check::EventPrefixes,
                key: op.key.clone(),
                explanation: format!(
                    "event log read on node {} is {what}: seq {} follows seq {} \
                     (a read must be a contiguous, increasing run of seqs)",
                    op.node, w[1].seq, w[0].seq
                ),
                window: vec![op.index],
            });
        }
    }
}

/// Any two reads must agree on the identity of every seq they both returned: one must be a
/// prefix of the other on their overlap. (With plain seqs this reduces to contiguity.)
fn agreement(reads: &[(&Op, Vec<Event>)], out: &mut Vec<Violation>) {
    // seq -> (id, op that first returned it with that id, its node)
    let mut first: HashMap<(&str, u64), (&str, u64, u64)> = HashMap::new();
    let mut reported: HashSet<(&str, u64)> = HashSet::new();
    for (op, events) in reads {
        for event in events {
            let Some(id) = event.id.as_deref() else {
                continue;
            };
            let slot = (op.key.as_str(), event.seq);
            match first.get(&slot) {
                None => {
                    first.insert(slot, (id, op.index, op.node));
                }
                Some(&(other, other_op, other_node)) if other != id => {
                    if reported.insert(slot) {
                        out.push(Violation {
                            check: Check::EventPrefixes,
                            key: op.key.clone(),
                            explanation: format!(
                                "event logs diverge at seq {}: node {other_node} returned \
                                 {other:?} (op {other_op}), node {} returned {id:?} (op {})",
                                event.seq, op.node, op.index
                            ),
                            window: vec![other_op, op.index],
                        });
                    }
                }
                Some(_) => {}
            }
        }
    }
}

/// A read on a node must not end before a read of the same node that completed before it
/// was invoked (the node lost events it had already served).
fn monotonicity(reads: &[(&Op, Vec<Event>)], out: &mut Vec<Violation>) {
    // (key, node) -> that node's reads of that log, with the last seq each returned.
    type LastSeqs<'a> = Vec<(&'a Op, Option<u64>)>;
    let mut per_node: BTreeMap<(&str, u64), LastSeqs> = BTreeMap::new();
    for (op, events) in reads {
        per_node
            .entry((op.key.as_str(), op.node))
            .or_default()
            .push((op, events.last().map(|e| e.seq)));
    }
    for ((key, node), mut node_reads) in per_node {
        node_reads.sort_by_key(|(op, _)| (op.complete_ns, op.index));
        // best[i]: the read with the greatest last seq among the first i+1 completed reads.
        let mut best: Vec<(&Op, Option<u64>)> = Vec::with_capacity(node_reads.len());
        for &(op, last) in &node_reads {
            let keep = match best.last() {
                Some(&(prev, prev_last)) if prev_last >= last => (prev, prev_last),
                _ => (op, last),
            };
            best.push(keep);
        }
        let mut reported: HashSet<u64> = HashSet::new();
        let mut by_invoke = node_reads.clone();
        by_invoke.sort_by_key(|(op, _)| (op.invoke_ns, op.index));
        for (op, last) in by_invoke {
            // Reads of this node completed strictly before `op` was invoked.
            let done = node_reads.partition_point(|(r, _)| r.complete_ns < op.invoke_ns);
            let Some(&(earlier, earlier_last)) = done.checked_sub(1).map(|i| &best[i]) else {
                continue;
            };
            if earlier_last > last && reported.insert(earlier.index) {
                let shown =
                    |s: Option<u64>| s.map_or_else(|| "nothing".to_owned(), |s| format!("seq {s}"));
                out.push(Violation {
                    check: Check::EventPrefixes,
                    key: key.to_owned(),
                    explanation: format!(
                        "event log went backwards on node {node}: op {} read up to {}, \
                         a later read (op {}) only up to {}",
                        earlier.index,
                        shown(earlier_last),
                        op.index,
                        shown(last)
                    ),
                    window: vec![earlier.index, op.index],
                });
            }
        }
    }
}
