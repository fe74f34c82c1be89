//! The history of a run: one [`Op`] per client operation, with its invocation and completion
//! times, written as JSON lines (`history.jsonl`) and read back by the checker.
//!
//! Times are nanoseconds since the start of the run, from one monotonic clock of the chaos
//! process (the nodes' clocks are never used: the checker must not depend on synchronized
//! clocks).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the client learned about an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged: the operation took effect (a write) or returned a value (a read).
    Ok,
    /// Definitely did not take effect (refused before it was proposed, e.g. a 4xx/503
    /// answer that says so).
    Fail,
    /// Unknown: timed out, connection cut, 5xx after proposing. It may or may not have taken
    /// effect, at any time after its invocation (its completion is "never").
    Info,
}

/// The kind of an operation, per workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Register: write `value` to `key`.
    Write,
    /// Register: read `key`; `value` is what was read (`null` = absent).
    Read,
    /// Set: add the unique element `value` to the set `key`.
    Add,
    /// Set: read the whole set `key`; `value` is the array of elements read.
    ReadSet,
    /// Tool call through /mcp (workload b); `value` is the tool's result.
    Call,
    /// Event-log read on one node (workload c); `value` is the array of event ids read.
    Events,
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Unique, increasing in invocation order.
    pub index: u64,
    /// The logical client (one client runs one operation at a time).
    pub process: u64,
    /// The node the request was sent to.
    pub node: u64,
    pub kind: OpKind,
    /// The register or set the operation is on (the checker splits the history per key).
    pub key: String,
    /// Written value (`Write`, `Add`) or value read (`Read`, `ReadSet`, `Call`, `Events`).
    pub value: Value,
    pub outcome: Outcome,
    /// Nanoseconds since the start of the run.
    pub invoke_ns: u64,
    /// Nanoseconds since the start of the run (`Info`: when the client gave up).
    pub complete_ns: u64,
    /// Error or status text for `Fail` / `Info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
