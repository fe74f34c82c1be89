//! The two sequential models checked by the WGL engine — a register and a grow-only set —
//! and the translation of one key's [`Op`]s into engine [`Call`]s.
//!
//! JSON values are interned to small ids so that states are cheap to clone and hash.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::wgl::{Bits, Call, Model};
use crate::history::{Op, OpKind, Outcome};

/// Maps JSON values to dense ids, by canonical text (object keys sorted), so that two equal
/// values get the same id whatever their key order.
#[derive(Default)]
pub(crate) struct Interner {
    ids: HashMap<String, u32>,
    values: Vec<Value>,
}

impl Interner {
    pub(crate) fn intern(&mut self, value: &Value) -> u32 {
        let text = canonical(value);
        if let Some(&id) = self.ids.get(&text) {
            return id;
        }
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.ids.insert(text, id);
        self.values.push(value.clone());
        id
    }

    pub(crate) fn get(&self, value: &Value) -> Option<u32> {
        self.ids.get(&canonical(value)).copied()
    }

    pub(crate) fn value(&self, id: u32) -> &Value {
        &self.values[id as usize]
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }
}

/// Compact JSON text with object keys sorted (independent of serde_json's map ordering).
pub(crate) fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut fields: Vec<(&String, &Value)> = map.iter().collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// A problem with one op that keeps it out of the check.
pub(crate) struct Malformed {
    pub(crate) index: u64,
    pub(crate) reason: String,
}

/// Translation of one key's ops for the engine.
pub(crate) struct Prepared<M: Model> {
    pub(crate) model: M,
    pub(crate) calls: Vec<Call<M::Input>>,
    pub(crate) malformed: Vec<Malformed>,
    /// Violations visible without any search (duplicate elements in a set read).
    pub(crate) immediate: Vec<(String, Vec<u64>)>,
}

// ---------------------------------------------------------------------------------------
// Register
// ---------------------------------------------------------------------------------------

/// A register operation: write a value, or read one (`None` = absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RegisterInput {
    Write(Option<u32>),
    Read(Option<u32>),
}

/// A read/write register, initially absent. `null` (written or read) means absent.
pub(crate) struct Register {
    values: Interner,
}

impl Register {
    fn show(&self, v: Option<u32>) -> String {
        v.map_or_else(
            || "absent".to_owned(),
            |id| self.values.value(id).to_string(),
        )
    }
}

impl Model for Register {
    type State = Option<u32>;
    type Input = RegisterInput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, state: &Self::State, input: &Self::Input) -> Option<Self::State> {
        match input {
            RegisterInput::Write(v) => Some(*v),
            RegisterInput::Read(v) => (v == state).then_some(*state),
        }
    }

    fn is_read_only(&self, input: &Self::Input) -> bool {
        matches!(input, RegisterInput::Read(_))
    }

    fn describe_input(&self, input: &Self::Input) -> String {
        match input {
            RegisterInput::Write(v) => format!("write {}", self.show(*v)),
            RegisterInput::Read(v) => format!("read {}", self.show(*v)),
        }
    }

    fn explain(&self, input: &Self::Input, states: &[Self::State]) -> String {
        let shown: Vec<String> = states.iter().map(|s| self.show(*s)).collect();
        match input {
            RegisterInput::Read(v) if !shown.is_empty() => format!(
                "it returned {}, but wherever it could take effect the register held {}",
                self.show(*v),
                shown.join(" or ")
            ),
            _ => "no order of the operations around it explains what the reads returned".to_owned(),
        }
    }

    fn related(
        &self,
        calls: &[Call<Self::Input>],
        candidates: &[usize],
        window: &[usize],
    ) -> Vec<usize> {
        // The writes of the values the window's reads returned.
        let read: HashSet<u32> = window
            .iter()
            .filter_map(|&p| match calls[p].input {
                RegisterInput::Read(Some(v)) => Some(v),
                _ => None,
            })
            .collect();
        candidates
            .iter()
            .copied()
            .filter(
                |&p| matches!(calls[p].input, RegisterInput::Write(Some(v)) if read.contains(&v)),
            )
            .collect()
    }
}

/// Translates one key's register ops. `Fail` ops and non-`Ok` reads are dropped; `Info`
/// writes become optional, and are dropped altogether when no read returned their value
/// (such a write can always be placed after every read that follows it, or never).
pub(crate) fn prepare_register(ops: &[&Op]) -> Prepared<Register> {
    let mut values = Interner::default();
    let mut id = |v: &Value| (!v.is_null()).then(|| values.intern(v));
    let mut calls = Vec::new();
    for op in ops {
        let input = match (op.kind, op.outcome) {
            (OpKind::Write, Outcome::Ok | Outcome::Info) => RegisterInput::Write(id(&op.value)),
            (OpKind::Read, Outcome::Ok) => RegisterInput::Read(id(&op.value)),
            _ => continue,
        };
        calls.push(Call {
            index: op.index,
            input,
            invoke: op.invoke_ns,
            complete: (op.outcome == Outcome::Ok).then_some(op.complete_ns),
        });
    }
    let read: HashSet<Option<u32>> = calls
        .iter()
        .filter_map(|c| match c.input {
            RegisterInput::Read(v) => Some(v),
            RegisterInput::Write(_) => None,
        })
        .collect();
    calls.retain(|c| match c.input {
        RegisterInput::Write(v) => c.complete.is_some() || read.contains(&v),
        RegisterInput::Read(_) => true,
    });
    Prepared {
        model: Register { values },
        calls,
        malformed: Vec::new(),
        immediate: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Grow-only set
// ---------------------------------------------------------------------------------------

/// A set operation: add one element, or read the whole set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SetInput {
    Add(u32),
    Read(Bits),
}

/// A grow-only set, initially empty; a read must return exactly the current elements.
pub(crate) struct GrowSet {
    elements: Interner,
}

impl GrowSet {
    fn show_list(&self, ids: impl Iterator<Item = usize>) -> String {
        const SHOWN: usize = 8;
        let all: Vec<String> = ids
            .map(|i| self.elements.value(i as u32).to_string())
            .collect();
        let mut text = all
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if all.len() > SHOWN {
            text.push_str(&format!(", … ({} in all)", all.len()));
        }
        format!("[{text}]")
    }
}

impl Model for GrowSet {
    type State = Bits;
    type Input = SetInput;

    fn init(&self) -> Self::State {
        Bits::new(self.elements.len())
    }

    fn state_bytes(&self, _state: &Self::State) -> usize {
        std::mem::size_of::<Bits>() + 8 * self.elements.len().div_ceil(64)
    }

    fn step(&self, state: &Self::State, input: &Self::Input) -> Option<Self::State> {
        match input {
            SetInput::Add(e) => {
                let mut next = state.clone();
                next.set(*e as usize);
                Some(next)
            }
            SetInput::Read(seen) => (seen == state).then(|| state.clone()),
        }
    }

    fn is_read_only(&self, input: &Self::Input) -> bool {
        matches!(input, SetInput::Read(_))
    }

    fn describe_input(&self, input: &Self::Input) -> String {
        match input {
            SetInput::Add(e) => format!("add {}", self.elements.value(*e)),
            SetInput::Read(seen) => match seen.iter().count() {
                1 => "read of 1 element".to_owned(),
                n => format!("read of {n} elements"),
            },
        }
    }

    fn explain(&self, input: &Self::Input, states: &[Self::State]) -> String {
        let SetInput::Read(seen) = input else {
            return "no order of the operations around it explains what the reads returned"
                .to_owned();
        };
        if states.is_empty() {
            return "no order of the operations around it explains what it returned".to_owned();
        }
        let cases: Vec<String> = states
            .iter()
            .take(3)
            .map(|s| {
                let missing: Vec<usize> = s.iter().filter(|&i| !seen.get(i)).collect();
                let extra: Vec<usize> = seen.iter().filter(|&i| !s.get(i)).collect();
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!("missing {}", self.show_list(missing.into_iter())));
                }
                if !extra.is_empty() {
                    parts.push(format!("with extra {}", self.show_list(extra.into_iter())));
                }
                parts.join(" and ")
            })
            .collect();
        format!(
            "compared with every state the set could have had when it took effect, the read \
             was {}",
            cases.join("; or ")
        )
    }

    fn related(
        &self,
        calls: &[Call<Self::Input>],
        candidates: &[usize],
        window: &[usize],
    ) -> Vec<usize> {
        const PER_READ: usize = 5;
        let reads: Vec<usize> = window
            .iter()
            .copied()
            .filter(|&p| matches!(calls[p].input, SetInput::Read(_)))
            .collect();
        let adds: HashMap<usize, usize> = candidates
            .iter()
            .rev()
            .filter_map(|&p| match calls[p].input {
                SetInput::Add(e) => Some((e as usize, p)),
                SetInput::Read(_) => None,
            })
            .collect();
        let add_of = |element: usize| adds.get(&element).copied();
        let mut out = Vec::new();
        for &r in &reads {
            let SetInput::Read(seen) = &calls[r].input else {
                continue;
            };
            let (r_invoke, r_complete) = (calls[r].invoke, calls[r].complete.unwrap_or(u64::MAX));
            // Acknowledged before the read started, yet missing from it.
            out.extend(
                candidates
                    .iter()
                    .copied()
                    .filter(|&p| {
                        matches!(calls[p].input, SetInput::Add(e) if !seen.get(e as usize))
                            && calls[p].complete.is_some_and(|c| c < r_invoke)
                    })
                    .take(PER_READ),
            );
            // Seen although added only after the read returned.
            out.extend(
                seen.iter()
                    .filter_map(add_of)
                    .filter(|&p| calls[p].invoke > r_complete)
                    .take(PER_READ),
            );
            // Seen by an earlier read of the window, gone from this one.
            for &earlier in &reads {
                let SetInput::Read(before) = &calls[earlier].input else {
                    continue;
                };
                if calls[earlier].complete.is_some_and(|c| c < r_invoke) {
                    out.extend(
                        before
                            .iter()
                            .filter(|&i| !seen.get(i))
                            .filter_map(add_of)
                            .take(PER_READ),
                    );
                }
            }
        }
        out
    }
}

/// Translates one key's set ops. A read that is not an array is malformed (left out); a read
/// listing an element twice is a violation by itself. `Info` adds whose element no read ever
/// returned are dropped (placing them after every read, or never, is always possible).
pub(crate) fn prepare_set(ops: &[&Op]) -> Prepared<GrowSet> {
    let mut elements = Interner::default();
    let mut malformed = Vec::new();
    let mut immediate = Vec::new();
    // First pass: intern every element, so that read bitsets all have the same width.
    let mut reads: Vec<(&Op, Vec<u32>)> = Vec::new();
    for op in ops {
        match (op.kind, op.outcome) {
            (OpKind::Add, Outcome::Ok | Outcome::Info) => {
                elements.intern(&op.value);
            }
            (OpKind::ReadSet, Outcome::Ok) => match op.value.as_array() {
                Some(items) => {
                    let ids: Vec<u32> = items.iter().map(|v| elements.intern(v)).collect();
                    reads.push((op, ids));
                }
                None => malformed.push(Malformed {
                    index: op.index,
                    reason: format!("read_set value is not an array: {}", op.value),
                }),
            },
            _ => {}
        }
    }
    let mut read_bits: HashMap<u64, Bits> = HashMap::new();
    let mut ever_read: HashSet<u32> = HashSet::new();
    for (op, ids) in reads {
        let mut bits = Bits::new(elements.len());
        let mut twice = Vec::new();
        for &id in &ids {
            if bits.get(id as usize) {
                twice.push(elements.value(id).to_string());
            }
            bits.set(id as usize);
            ever_read.insert(id);
        }
        if !twice.is_empty() {
            immediate.push((
                format!(
                    "set read op {} returned element(s) {} more than once",
                    op.index,
                    twice.join(", ")
                ),
                vec![op.index],
            ));
        }
        read_bits.insert(op.index, bits);
    }
    let mut calls = Vec::new();
    for op in ops {
        let input = match (op.kind, op.outcome) {
            (OpKind::Add, Outcome::Ok) => elements.get(&op.value).map(SetInput::Add),
            (OpKind::Add, Outcome::Info) => elements
                .get(&op.value)
                .filter(|id| ever_read.contains(id))
                .map(SetInput::Add),
            (OpKind::ReadSet, Outcome::Ok) => read_bits.remove(&op.index).map(SetInput::Read),
            _ => None,
        };
        if let Some(input) = input {
            calls.push(Call {
                index: op.index,
                input,
                invoke: op.invoke_ns,
                complete: (op.outcome == Outcome::Ok).then_some(op.complete_ns),
            });
        }
    }
    Prepared {
        model: GrowSet { elements },
        calls,
        malformed,
        immediate,
    }
}
