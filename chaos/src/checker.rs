//! The history checker: decides whether a recorded [`history`](crate::history) is one a
//! correct cluster could have produced.
//!
//! # Checks
//!
//! * **Linearizability** of the registers ([`check_register`]: `Write`/`Read`) and of the
//!   grow-only sets ([`check_set`]: `Add`/`ReadSet`), key by key.
//! * **Lost writes** ([`lost_writes`]): the final read of every set contains every element
//!   acknowledged before it started; the final read of every register returns a value that
//!   was written, and not "absent" once a write was acknowledged.
//! * **Event-log prefixes** ([`event_prefixes`]): every event-log read is a contiguous run of
//!   sequence numbers, all reads agree on each sequence number, and no node's log goes
//!   backwards.
//!
//! [`check_all`] runs them all and returns a serializable [`Report`].
//!
//! # Outcomes
//!
//! An `Ok` operation took effect (or returned what it read) somewhere between its invocation
//! and its completion. A `Fail` operation did not take effect: it is left out. An `Info`
//! operation may have taken effect at any time after its invocation — even after the client
//! gave up — or never: an `Info` update is *optional* and its completion is taken to be
//! infinitely late, while an `Info` read tells nothing and is left out.
//!
//! # How linearizability is decided
//!
//! A history is linearizable if every operation can be given a single instant inside its
//! interval such that running the operations one by one, in the order of those instants, on
//! the sequential object (the [`Model`]) produces exactly the results the clients saw.
//! Linearizability is *local*: a history of several independent objects is linearizable if
//! and only if the sub-history of each object is. The checker therefore splits the history per
//! key and decides each key on its own, which keeps every search small.
//!
//! For one key the checker runs the search of Wing and Gong as improved by Lowe (the "WGL"
//! algorithm, also used by Porcupine). All invocation and completion events are put in one
//! doubly linked list sorted by time. The search walks that list from its front, carrying
//! the model state reached so far and the set of operations already placed:
//!
//! * at the invocation of an operation not yet placed, it tries to place that operation next:
//!   if the model accepts it from the current state, the operation's two events are unlinked
//!   from the list, the choice is pushed on a stack, and the walk restarts from the front;
//!   if not, the walk moves on to the next event (a later-invoked concurrent operation may
//!   have to go first);
//! * at the completion of an operation not yet placed, the current partial order is a dead
//!   end, since that operation had to take effect before this point: the last choice is
//!   popped from the stack, its events are linked back, the state is restored, and the walk
//!   resumes just after that operation's invocation, trying the next candidate.
//!
//! The search succeeds once every acknowledged operation is placed (optional ones left over
//! simply never took effect), and fails when it must backtrack with an empty stack. Lowe's
//! key improvement is a cache of the configurations already explored, a configuration being
//! the pair (set of placed operations as a bitset, model state): the rest of the search only
//! depends on that pair, so reaching it a second time — by placing the same operations in
//! another order — is pruned. This turns a factorial search into one that is usually close to
//! linear in the length of the history. A step budget ([`Limits`]) bounds the search
//! nonetheless; when it runs out the key is reported as [`Unknown`] rather than hanging.
//!
//! # Explaining a violation
//!
//! A failed search says that *some* operation cannot be placed, not which. The checker then
//! cuts the key's history at each acknowledged completion time (operations still pending at
//! the cut become optional updates or are dropped if they are reads) and bisects for the
//! earliest cut that is already not linearizable. The last operation of that prefix is the
//! culprit; the reported window lists it, the operations overlapping it, the operations just
//! before it, and the writes whose values the reads among them returned: usually a handful,
//! printable with [`render_window`].

mod events;
mod lost;
mod models;
pub mod wgl;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::history::{Op, OpKind, Outcome};
use wgl::{KeyVerdict, check_calls};
pub use wgl::{Limits, Model};

/// Which check found a violation or could not decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Linearizability of a register (`Write`/`Read`).
    Register,
    /// Linearizability of a grow-only set (`Add`/`ReadSet`).
    Set,
    /// Acknowledged writes missing from the final read.
    LostWrites,
    /// Event-log reads: contiguity, agreement between reads, no going backwards.
    EventPrefixes,
}

impl Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Register => "register",
            Self::Set => "set",
            Self::LostWrites => "lost_writes",
            Self::EventPrefixes => "event_prefixes",
        })
    }
}

/// Something a correct cluster cannot have produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The check that found it.
    pub check: Check,
    /// The register, set or event log concerned.
    pub key: String,
    /// What is wrong, in words.
    pub explanation: String,
    /// The indices of the ops to read to understand it (a few, sorted), see
    /// [`render_window`].
    pub window: Vec<u64>,
}

/// A part of the history the checker could not decide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unknown {
    /// The check that gave up.
    pub check: Check,
    /// The register, set or event log concerned.
    pub key: String,
    /// Why (search budget exhausted, malformed op…).
    pub reason: String,
}

/// The result of a linearizability check over all keys of a history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every key is linearizable.
    Ok,
    /// At least one key is not; other keys may also have been undecidable.
    Violated {
        /// One violation per failing key (plus any found without searching).
        violations: Vec<Violation>,
        /// Keys that could not be decided.
        unknown: Vec<Unknown>,
    },
    /// No violation found, but some keys could not be decided.
    Unknown {
        /// Keys that could not be decided.
        unknown: Vec<Unknown>,
    },
}

impl Verdict {
    fn from_parts(violations: Vec<Violation>, unknown: Vec<Unknown>) -> Self {
        match (violations.is_empty(), unknown.is_empty()) {
            (true, true) => Self::Ok,
            (true, false) => Self::Unknown { unknown },
            (false, _) => Self::Violated {
                violations,
                unknown,
            },
        }
    }

    /// `true` if every key was decided and found linearizable.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }

    /// The violations found (empty unless [`Verdict::Violated`]).
    pub fn violations(&self) -> &[Violation] {
        match self {
            Self::Violated { violations, .. } => violations,
            _ => &[],
        }
    }

    /// The keys that could not be decided.
    pub fn unknown(&self) -> &[Unknown] {
        match self {
            Self::Ok => &[],
            Self::Violated { unknown, .. } | Self::Unknown { unknown } => unknown,
        }
    }
}

/// Linearizability of the register ops (`Write`/`Read`), per key, with the default
/// [`Limits`].
pub fn check_register(ops: &[Op]) -> Verdict {
    check_register_with(ops, &Limits::default())
}

/// [`check_register`] with explicit search limits.
pub fn check_register_with(ops: &[Op], limits: &Limits) -> Verdict {
    check_keys(
        ops,
        &[OpKind::Write, OpKind::Read],
        Check::Register,
        models::prepare_register,
        limits,
    )
}

/// Linearizability of the grow-only set ops (`Add`/`ReadSet`), per key, with the default
/// [`Limits`]. A read must return exactly the elements added so far.
pub fn check_set(ops: &[Op]) -> Verdict {
    check_set_with(ops, &Limits::default())
}

/// [`check_set`] with explicit search limits.
pub fn check_set_with(ops: &[Op], limits: &Limits) -> Verdict {
    check_keys(
        ops,
        &[OpKind::Add, OpKind::ReadSet],
        Check::Set,
        models::prepare_set,
        limits,
    )
}

/// Splits `ops` of `kinds` per key and checks each key's history against model `M`.
fn check_keys<M: Model>(
    ops: &[Op],
    kinds: &[OpKind],
    check: Check,
    prepare: fn(&[&Op]) -> models::Prepared<M>,
    limits: &Limits,
) -> Verdict {
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for (key, key_ops) in by_key(ops, kinds) {
        let prepared = prepare(&key_ops);
        unknown.extend(prepared.malformed.into_iter().map(|m| Unknown {
            check,
            key: key.to_owned(),
            reason: format!("op {} left out: {}", m.index, m.reason),
        }));
        violations.extend(
            prepared
                .immediate
                .into_iter()
                .map(|(explanation, window)| Violation {
                    check,
                    key: key.to_owned(),
                    explanation,
                    window,
                }),
        );
        match check_calls(&prepared.model, &prepared.calls, limits) {
            KeyVerdict::Ok => {}
            KeyVerdict::Violated(failure) => violations.push(Violation {
                check,
                key: key.to_owned(),
                explanation: format!("not linearizable: {}", failure.explanation),
                window: failure.window,
            }),
            KeyVerdict::Unknown(reason) => unknown.push(Unknown {
                check,
                key: key.to_owned(),
                reason,
            }),
        }
    }
    Verdict::from_parts(violations, unknown)
}

/// The ops of `kinds`, grouped per key (keys sorted, ops in history order).
fn by_key<'a>(ops: &'a [Op], kinds: &[OpKind]) -> BTreeMap<&'a str, Vec<&'a Op>> {
    let mut map: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops.iter().filter(|op| kinds.contains(&op.kind)) {
        map.entry(op.key.as_str()).or_default().push(op);
    }
    map
}

/// Lost-write checks on final reads:
///
/// * set: every element whose `Add` completed `Ok` before the invocation of the last `Ok`
///   `ReadSet` of its key is in that read ("acknowledged write lost", one violation per
///   missing element);
/// * register: the last `Ok` `Read` of a key returns a value written by some `Ok` or `Info`
///   `Write` ("read of a value never written"), and does not return absent when a write was
///   acknowledged before it started ("acknowledged write lost").
///
/// The linearizability checks cover these too; these are cheap, direct and easy to read.
pub fn lost_writes(ops: &[Op]) -> Vec<Violation> {
    lost::check(ops)
}

/// Event-log checks over the `Ok` `Events` ops (values: arrays of seqs, or of
/// `{"seq": n, "id": "…"}` objects):
///
/// * each read is strictly increasing without holes (it may start after 1: logs can be
///   truncated at the start);
/// * any two reads of the same log (same `key`, any nodes) agree on the id of every seq both
///   returned with an id, i.e. one is a prefix of the other on their overlap;
/// * a read on a node ends no earlier than any read of the same node that completed before
///   it was invoked ("event log went backwards").
///
/// Ops whose value cannot be parsed are ignored here ([`check_all`] reports them as
/// unknown).
pub fn event_prefixes(ops: &[Op]) -> Vec<Violation> {
    events::check(ops).0
}

/// How many ops of one kind ended in each outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Acknowledged.
    pub ok: usize,
    /// Definitely not applied.
    pub fail: usize,
    /// Unknown outcome.
    pub info: usize,
}

/// Everything [`check_all`] found. Serializes to JSON with an extra `"ok"` field
/// ([`Report::ok`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// Number of ops in the history.
    pub ops: usize,
    /// Outcome counts per op kind (`write`, `read`, `add`, `read_set`, `call`, `events`).
    pub counts: BTreeMap<String, Counts>,
    /// Number of registers checked.
    pub register_keys: usize,
    /// Number of sets checked.
    pub set_keys: usize,
    /// Number of `Ok` event-log reads checked.
    pub event_reads: usize,
    /// Everything found wrong.
    pub violations: Vec<Violation>,
    /// Everything that could not be decided.
    pub unknown: Vec<Unknown>,
}

impl Report {
    /// `true` if the whole history was checked and nothing is wrong: no violation and
    /// nothing left undecided.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.unknown.is_empty()
    }

    /// A human-readable account: the counts, then each violation with its window of ops.
    pub fn render(&self, ops: &[Op]) -> String {
        let mut out = format!(
            "{} ops; {} registers, {} sets, {} event-log reads checked: {}\n",
            self.ops,
            self.register_keys,
            self.set_keys,
            self.event_reads,
            if self.ok() {
                "OK".to_owned()
            } else {
                format!(
                    "{} violation(s), {} unknown",
                    self.violations.len(),
                    self.unknown.len()
                )
            }
        );
        for (kind, c) in &self.counts {
            out.push_str(&format!(
                "  {kind:<9} ok {:>6}  fail {:>6}  info {:>6}\n",
                c.ok, c.fail, c.info
            ));
        }
        for v in &self.violations {
            out.push_str(&format!("\n[{}] {}: {}\n", v.check, v.key, v.explanation));
            out.push_str(&render_window(ops, &v.window));
        }
        for u in &self.unknown {
            out.push_str(&format!(
                "\n[{}] {}: unknown: {}\n",
                u.check, u.key, u.reason
            ));
        }
        out
    }
}

impl Serialize for Report {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            ok: bool,
            ops: usize,
            counts: &'a BTreeMap<String, Counts>,
            register_keys: usize,
            set_keys: usize,
            event_reads: usize,
            violations: &'a [Violation],
            unknown: &'a [Unknown],
        }
        Json {
            ok: self.ok(),
            ops: self.ops,
            counts: &self.counts,
            register_keys: self.register_keys,
            set_keys: self.set_keys,
            event_reads: self.event_reads,
            violations: &self.violations,
            unknown: &self.unknown,
        }
        .serialize(serializer)
    }
}

/// Runs every check with the default [`Limits`].
pub fn check_all(ops: &[Op]) -> Report {
    check_all_with(ops, &Limits::default())
}

/// [`check_all`] with explicit search limits.
pub fn check_all_with(ops: &[Op], limits: &Limits) -> Report {
    let mut report = Report {
        ops: ops.len(),
        register_keys: by_key(ops, &[OpKind::Write, OpKind::Read]).len(),
        set_keys: by_key(ops, &[OpKind::Add, OpKind::ReadSet]).len(),
        event_reads: ops
            .iter()
            .filter(|op| op.kind == OpKind::Events && op.outcome == Outcome::Ok)
            .count(),
        ..Report::default()
    };
    for op in ops {
        let counts = report
            .counts
            .entry(kind_name(op.kind).to_owned())
            .or_default();
        match op.outcome {
            Outcome::Ok => counts.ok += 1,
            Outcome::Fail => counts.fail += 1,
            Outcome::Info => counts.info += 1,
        }
    }
    for verdict in [
        check_register_with(ops, limits),
        check_set_with(ops, limits),
    ] {
        report.violations.extend_from_slice(verdict.violations());
        report.unknown.extend_from_slice(verdict.unknown());
    }
    report.violations.extend(lost_writes(ops));
    let (violations, unknown) = events::check(ops);
    report.violations.extend(violations);
    report.unknown.extend(unknown);
    report
}

fn kind_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Write => "write",
        OpKind::Read => "read",
        OpKind::Add => "add",
        OpKind::ReadSet => "read_set",
        OpKind::Call => "call",
        OpKind::Events => "events",
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Info => "info",
    }
}

/// A compact rendering of a value for tables: runs of consecutive integers in arrays are
/// shortened (`[1..5, 7]`), and long texts are cut.
fn short_value(value: &Value) -> String {
    const MAX: usize = 60;
    let text = match value.as_array() {
        Some(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let seqs: Vec<u64> = items.iter().filter_map(Value::as_u64).collect();
            let mut parts: Vec<String> = Vec::new();
            let mut start = 0;
            for i in 1..=seqs.len() {
                if i == seqs.len() || seqs[i] != seqs[i - 1] + 1 {
                    parts.push(if i - start > 2 {
                        format!("{}..{}", seqs[start], seqs[i - 1])
                    } else {
                        let run: Vec<String> = seqs[start..i].iter().map(u64::to_string).collect();
                        run.join(", ")
                    });
                    start = i;
                }
            }
            format!("[{}]", parts.join(", "))
        }
        _ => value.to_string(),
    };
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX - 1).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// Prints the ops with the given indices (in index order) as a table: index, process, node,
/// kind, key, value, outcome, invocation and completion times in milliseconds. Indices not in
/// `ops` are listed as missing.
pub fn render_window(ops: &[Op], indices: &[u64]) -> String {
    let mut wanted: Vec<u64> = indices.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let by_index: BTreeMap<u64, &Op> = ops
        .iter()
        .filter(|op| wanted.binary_search(&op.index).is_ok())
        .map(|op| (op.index, op))
        .collect();
    let ms = |ns: u64| format!("{:.3}", ns as f64 / 1e6);
    let header = [
        "index",
        "process",
        "node",
        "kind",
        "key",
        "value",
        "outcome",
        "invoke ms",
        "complete ms",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    let mut missing = Vec::new();
    for index in &wanted {
        match by_index.get(index) {
            Some(op) => rows.push(vec![
                op.index.to_string(),
                op.process.to_string(),
                op.node.to_string(),
                kind_name(op.kind).to_owned(),
                op.key.clone(),
                short_value(&op.value),
                outcome_name(op.outcome).to_owned(),
                ms(op.invoke_ns),
                ms(op.complete_ns),
            ]),
            None => missing.push(index.to_string()),
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                // Numbers right-aligned, text left-aligned.
                if matches!(c, 0..=2 | 7 | 8) {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if !missing.is_empty() {
        out.push_str(&format!("(not in the history: {})\n", missing.join(", ")));
    }
    out
}

/// Reads a history written as JSON lines (one [`Op`] per line; blank lines are skipped). A
/// line that does not parse is an error naming the file and the line number.
pub fn read_history(path: impl AsRef<Path>) -> anyhow::Result<Vec<Op>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open history {}", path.display()))?;
    let mut ops = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: bad history line", path.display(), n + 1))?;
        ops.push(op);
    }
    Ok(ops)
}
