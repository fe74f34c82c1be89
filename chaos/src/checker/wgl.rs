//! The Wing–Gong–Lowe linearizability search, generic over a sequential [`Model`].
//!
//! See the documentation of [`crate::checker`] for an overview of the algorithm. This module
//! holds the engine ([`search`]), the per-key driver that turns a failed search into a small
//! window of operations ([`check_calls`]), and the bitset used both for the set of linearized
//! operations and by the grow-only set model.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification: the object the concurrent history is checked against.
///
/// Implementations describe one object (one register, one set); the checker splits a history
/// per key before searching, so a model never sees operations on two objects.
pub trait Model {
    /// The object's state. It is cloned at every search step and hashed into the search
    /// cache, so it should be small (interned ids rather than JSON values).
    type State: Clone + Eq + Hash;
    /// What an operation does or observed, in the model's terms.
    type Input;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// Applies `input` to `state`: `Some(next state)` if the operation is legal in `state`
    /// (a write always is; a read only if it observed exactly `state`), `None` otherwise.
    fn step(&self, state: &Self::State, input: &Self::Input) -> Option<Self::State>;

    /// `true` for operations that never change the state (reads). When a history is cut at
    /// a point in time, read-only operations still pending at the cut are dropped (they carry
    /// no information yet), while pending updates become optional.
    fn is_read_only(&self, input: &Self::Input) -> bool;

    /// A short human description of an operation, e.g. `read 3` or `write 4`.
    fn describe_input(&self, input: &Self::Input) -> String;

    /// Approximate heap and inline size of a state, in bytes, for the cache memory bound
    /// ([`Limits::max_cache_bytes`]). The default is the inline size.
    fn state_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        std::mem::size_of::<Self::State>()
    }

    /// Explains why `input` could not be linearized, given the states the search tried to
    /// apply it in (at most a handful, possibly none).
    fn explain(&self, input: &Self::Input, states: &[Self::State]) -> String;

    /// Operations (positions in `calls`, chosen among `candidates`) that help a human
    /// understand a failure involving the operations of `window`: typically the writes whose
    /// values the reads of the window returned. The default adds nothing.
    fn related(
        &self,
        calls: &[Call<Self::Input>],
        candidates: &[usize],
        window: &[usize],
    ) -> Vec<usize> {
        let _ = (calls, candidates, window);
        Vec::new()
    }
}

/// One operation of a single object's history, as the search sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call<I> {
    /// The index of the [`crate::history::Op`] it comes from.
    pub index: u64,
    /// What it did, in the model's terms.
    pub input: I,
    /// Invocation time (ns).
    pub invoke: u64,
    /// Completion time (ns); `None` = never returned (an `Info` update): the operation is
    /// *optional*, it may take effect at any point after `invoke`, or never.
    pub complete: Option<u64>,
}

/// Bounds on one search, so that a pathological history yields an "unknown" verdict rather
/// than a hang or an out-of-memory kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of search steps (one step = one list entry examined or one
    /// backtrack) per search.
    pub max_steps: u64,
    /// Maximum memory, in bytes (estimated), of the configurations a search remembers: each
    /// costs a bitset of the key's operations plus one state plus some table overhead.
    pub max_cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 10_000_000,
            max_cache_bytes: 1 << 30,
        }
    }
}

/// The result of one search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Search<S> {
    /// A legal sequential order exists.
    Linearizable,
    /// No legal order exists. `focus_states` holds (some of) the states in which the search
    /// tried, and failed, to apply the focus operation, if one was given.
    NotLinearizable {
        /// States the focus operation was tried in (at most [`MAX_FOCUS_STATES`]).
        focus_states: Vec<S>,
    },
    /// A limit was reached before the search could decide.
    Exhausted {
        /// Steps taken.
        steps: u64,
        /// Configurations in the cache.
        cache_entries: usize,
        /// Estimated memory of the cache, in bytes.
        cache_bytes: usize,
    },
}

/// How many focus states a search remembers for explanations.
pub const MAX_FOCUS_STATES: usize = 6;

/// The most operations a failure window lists.
pub const MAX_WINDOW: usize = 30;

/// A fixed-size bitset, hashable (the search cache key) and comparable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bits(Box<[u64]>);

impl Bits {
    /// An empty set able to hold `0..n`.
    pub(crate) fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)].into_boxed_slice())
    }

    pub(crate) fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub(crate) fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// The members, increasing.
    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// One operation as the engine sees it: a position in the caller's `calls` and the interval
/// used for this particular search (a history cut at time `t` turns operations pending at `t`
/// into optional ones without touching `calls`).
#[derive(Clone, Copy, Debug)]
struct Entry {
    pos: usize,
    invoke: u64,
    complete: Option<u64>,
}

/// Runs the search over the whole of `calls`.
pub fn search<M: Model>(model: &M, calls: &[Call<M::Input>], limits: &Limits) -> Search<M::State> {
    let entries: Vec<Entry> = calls
        .iter()
        .enumerate()
        .map(|(pos, c)| Entry {
            pos,
            invoke: c.invoke,
            complete: c.complete.map(|t| t.max(c.invoke)),
        })
        .collect();
    search_entries(model, calls, &entries, limits, &[])
}

/// Sentinel of the event list: "no node".
const NIL: usize = usize::MAX;
/// The list head (node 0); entry `i` has its call at node `2i + 1`, its return at `2i + 2`.
const HEAD: usize = 0;

/// The doubly linked list of call and return events, in time order, from which the search
/// removes ("lifts") the events of linearized operations and puts them back on backtracking.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl EventList {
    fn new(entries: &[Entry]) -> Self {
        // (time, 0 = call / 1 = return, entry): at equal times calls come first, so that an
        // operation returning at t and one invoked at t count as concurrent (the permissive
        // reading of equal timestamps, which cannot produce a false violation).
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * entries.len());
        for (i, e) in entries.iter().enumerate() {
            events.push((e.invoke, 0, i));
            events.push((e.complete.unwrap_or(u64::MAX), 1, i));
        }
        events.sort_unstable();
        let n = 2 * entries.len() + 1;
        let mut list = Self {
            next: vec![NIL; n],
            prev: vec![NIL; n],
        };
        let mut last = HEAD;
        for (_, kind, i) in events {
            let node = 2 * i + 1 + usize::from(kind);
            list.next[last] = node;
            list.prev[node] = last;
            last = node;
        }
        list
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Undoes [`Self::unlink`]; valid because relinks happen in the reverse order of unlinks.
    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    /// Removes the call node `call` and its return node.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(call + 1);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(call + 1);
        self.relink(call);
    }
}

/// The WGL search proper, over `entries` (views of `calls`). `focus` lists entries (indices
/// into `entries`) whose failed application states are recorded for explanations.
fn search_entries<M: Model>(
    model: &M,
    calls: &[Call<M::Input>],
    entries: &[Entry],
    limits: &Limits,
    focus: &[usize],
) -> Search<M::State> {
    let required = entries.iter().filter(|e| e.complete.is_some()).count();
    let mut list = EventList::new(entries);
    let mut linearized = Bits::new(entries.len());
    let mut done_required = 0usize;
    let mut state = model.init();
    // Linearized calls (list nodes) with the state before each, for backtracking.
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut cache: HashSet<(Bits, M::State)> = HashSet::new();
    let mut focus_states: Vec<M::State> = Vec::new();
    let mut steps = 0u64;
    let mut cache_bytes = 0usize;
    // Per cached configuration, besides the state: the bitset, its box and the table slot.
    let entry_overhead = 8 * entries.len().div_ceil(64) + 48;
    let mut node = list.next[HEAD];

    loop {
        // Every acknowledged operation has a place: the optional ones left are "never".
        if done_required == required {
            return Search::Linearizable;
        }
        steps += 1;
        if steps > limits.max_steps || cache_bytes > limits.max_cache_bytes {
            return Search::Exhausted {
                steps,
                cache_entries: cache.len(),
                cache_bytes,
            };
        }
        if node != NIL && node % 2 == 1 {
            // A call: try to linearize that operation now.
            let e = (node - 1) / 2;
            let input = &calls[entries[e].pos].input;
            match model.step(&state, input) {
                Some(next_state) => {
                    let mut next_bits = linearized.clone();
                    next_bits.set(e);
                    let key = (next_bits, next_state);
                    if cache.contains(&key) {
                        node = list.next[node];
                    } else {
                        let (next_bits, next_state) = key.clone();
                        cache_bytes += entry_overhead + model.state_bytes(&next_state);
                        cache.insert(key);
                        stack.push((node, std::mem::replace(&mut state, next_state)));
                        linearized = next_bits;
                        if entries[e].complete.is_some() {
                            done_required += 1;
                        }
                        list.lift(node);
                        node = list.next[HEAD];
                    }
                }
                None => {
                    if focus.contains(&e)
                        && focus_states.len() < MAX_FOCUS_STATES
                        && !focus_states.contains(&state)
                    {
                        focus_states.push(state.clone());
                    }
                    node = list.next[node];
                }
            }
        } else {
            // A return (or the end): the operation returning here was not linearized before
            // its response, so the current prefix of the linearization is a dead end.
            let Some((call, previous)) = stack.pop() else {
                return Search::NotLinearizable { focus_states };
            };
            let e = (call - 1) / 2;
            linearized.clear(e);
            if entries[e].complete.is_some() {
                done_required -= 1;
            }
            state = previous;
            list.unlift(call);
            node = list.next[call];
        }
    }
}

/// The verdict on one object's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Linearizable.
    Ok,
    /// Not linearizable.
    Violated(Failure),
    /// The search ran out of budget; the reason says how far it went.
    Unknown(String),
}

/// A non-linearizable history, narrowed down for a human.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, in words.
    pub explanation: String,
    /// Op indices (sorted) worth reading: the last operation of the shortest failing prefix,
    /// the operations overlapping it, those just before it and the writes its reads observed.
    pub window: Vec<u64>,
}

/// Checks one object's history and, when it is not linearizable, finds the shortest prefix
/// (by completion time) that already is not and reports a small window of operations around
/// the last operation of that prefix.
///
/// The prefix ending at time `t` is the history as it looked at `t`: operations completed by
/// `t` are kept as they are, updates still pending at `t` become optional (they may or may
/// not have taken effect), reads still pending are dropped, later operations are dropped.
/// Such prefixes are monotone (if the history seen at `t` cannot be linearized, neither can
/// the history seen at any later time), so the shortest failing one is found by bisection.
pub fn check_calls<M: Model>(model: &M, calls: &[Call<M::Input>], limits: &Limits) -> KeyVerdict {
    match search(model, calls, limits) {
        Search::Linearizable => return KeyVerdict::Ok,
        Search::Exhausted {
            steps,
            cache_entries,
            cache_bytes,
        } => {
            return KeyVerdict::Unknown(format!(
                "linearizability search gave up after {steps} steps and {cache_entries} cached \
                 configurations (~{} MiB) on {} operations; raise the limits to decide",
                cache_bytes >> 20,
                calls.len()
            ));
        }
        Search::NotLinearizable { .. } => {}
    }

    // Distinct completion times of the acknowledged operations.
    let mut times: Vec<u64> = calls
        .iter()
        .filter_map(|c| c.complete.map(|t| t.max(c.invoke)))
        .collect();
    times.sort_unstable();
    times.dedup();

    // Bisection: the prefix of the first `lo` times is not known to fail, that of `hi` fails.
    // (A budget-exhausted prefix counts as not failing: the answer stays a failing prefix.)
    let mut lo = 0usize;
    let mut hi = times.len();
    // The shortest failing cut found so far, with the states its last operation was tried in.
    let mut found: Option<(Cut, Vec<M::State>)> = None;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let cut = cut(model, calls, times[mid - 1]);
        match search_entries(model, calls, &cut.entries, limits, &cut.last) {
            Search::NotLinearizable { focus_states } => {
                hi = mid;
                found = Some((cut, focus_states));
            }
            _ => lo = mid,
        }
    }
    let (cut, focus_states) = match found {
        Some(found) => found,
        None => {
            // The shortest failing cut is the whole history: search it again for the states.
            let cut = cut(model, calls, times.last().copied().unwrap_or(0));
            let focus_states = match search_entries(model, calls, &cut.entries, limits, &cut.last) {
                Search::NotLinearizable { focus_states } => focus_states,
                _ => Vec::new(),
            };
            (cut, focus_states)
        }
    };
    KeyVerdict::Violated(failure(model, calls, &cut, &focus_states, hi, times.len()))
}

/// A history cut at a point in time: its entries, and those (indices into `entries`)
/// completing exactly at the cut.
struct Cut {
    entries: Vec<Entry>,
    last: Vec<usize>,
}

/// The history as seen at time `t`.
fn cut<M: Model>(model: &M, calls: &[Call<M::Input>], t: u64) -> Cut {
    let mut entries = Vec::new();
    let mut last = Vec::new();
    for (pos, c) in calls.iter().enumerate() {
        if c.invoke > t {
            continue;
        }
        let complete = c.complete.map(|x| x.max(c.invoke)).filter(|&x| x <= t);
        if complete.is_none() && model.is_read_only(&c.input) {
            continue;
        }
        if complete == Some(t) {
            last.push(entries.len());
        }
        entries.push(Entry {
            pos,
            invoke: c.invoke,
            complete,
        });
    }
    Cut { entries, last }
}

/// Builds the window and explanation of a failing cut.
fn failure<M: Model>(
    model: &M,
    calls: &[Call<M::Input>],
    cut: &Cut,
    focus_states: &[M::State],
    prefix_len: usize,
    total_len: usize,
) -> Failure {
    let (entries, last) = (&cut.entries, &cut.last[..]);
    let last_invoke = last.iter().map(|&e| entries[e].invoke).min().unwrap_or(0);
    let last_complete = last
        .iter()
        .filter_map(|&e| entries[e].complete)
        .max()
        .unwrap_or(0);

    // Operations completed before the last one was invoked, and among them the "frontier":
    // those not followed (in real time) by another such operation. Any of them could be the
    // one linearized just before the last operation.
    let before: Vec<usize> = (0..entries.len())
        .filter(|&e| entries[e].complete.is_some_and(|c| c < last_invoke))
        .collect();
    let latest_start = before.iter().map(|&e| entries[e].invoke).max().unwrap_or(0);
    let frontier: Vec<usize> = before
        .iter()
        .copied()
        .filter(|&e| entries[e].complete.is_some_and(|c| c >= latest_start))
        .collect();
    let recent = frontier
        .iter()
        .map(|&e| entries[e].invoke)
        .min()
        .unwrap_or(last_invoke);

    // Operations overlapping the last one. Pending (optional) updates overlap it by
    // construction; only the recent ones are listed (older ones come in through `related`).
    let overlap: Vec<usize> = (0..entries.len())
        .filter(|e| !last.contains(e))
        .filter(|&e| {
            let x = &entries[e];
            match x.complete {
                Some(c) => x.invoke <= last_complete && c >= last_invoke,
                None => x.invoke >= recent,
            }
        })
        .collect();

    let to_pos = |es: &[usize]| es.iter().map(|&e| entries[e].pos).collect::<Vec<_>>();
    let candidates = to_pos(&(0..entries.len()).collect::<Vec<_>>());
    let base: Vec<usize> = to_pos(last)
        .into_iter()
        .chain(to_pos(&frontier))
        .chain(to_pos(&overlap))
        .collect();
    let related = model.related(calls, &candidates, &base);

    let mut window: Vec<usize> = Vec::new();
    for pos in to_pos(last)
        .into_iter()
        .chain(related)
        .chain(to_pos(&frontier))
        .chain(to_pos(&overlap))
    {
        if window.len() < MAX_WINDOW && !window.contains(&pos) {
            window.push(pos);
        }
    }
    let mut window: Vec<u64> = window.into_iter().map(|p| calls[p].index).collect();
    window.sort_unstable();

    let culprit = last.first().map(|&e| &calls[entries[e].pos]);
    let mut explanation = match culprit {
        Some(c) => format!(
            "op {} ({}) cannot be linearized: {}",
            c.index,
            model.describe_input(&c.input),
            model.explain(&c.input, focus_states)
        ),
        None => "no linearization exists".to_owned(),
    };
    explanation.push_str(&format!(
        " (shortest failing prefix: the key's history cut at acknowledged completion \
         {prefix_len} of {total_len})"
    ));
    Failure {
        explanation,
        window,
    }
}
