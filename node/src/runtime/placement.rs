//! Where this node's view of each instance runs in the cluster, and the port through which
//! calls reach an instance on another node.
//!
//! A single-instance (`replicas: 1`) local-mode server runs on the node the leader placed it
//! on; every other node forwards its calls there. `replicas: all` servers and remote servers
//! run (or are called) on every node.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::config::{Replicas, ServerSpec};
use crate::jsonrpc::{Id, Message};
use crate::upstream::{CallSink, Outcome, UpstreamError};

/// Where an instance runs, as this node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Host {
    /// On this node.
    Here,
    /// On another node of the cluster.
    Node(u64),
    /// Not placed yet (the leader has not decided, or no node can take it).
    Unplaced,
}

/// Whether the leader places `spec` (one instance cluster-wide) rather than every node running
/// or calling it itself.
pub fn placed_by_leader(spec: &ServerSpec) -> bool {
    matches!(spec, ServerSpec::Subprocess(s) if s.placement.replicas == Replicas::One)
}

/// The replicated placements as this node applies them.
#[derive(Debug, Clone, Default)]
pub(super) struct Table {
    /// This node's id in the cluster.
    pub(super) me: u64,
    /// Instance id → node id.
    pub(super) map: HashMap<String, u64>,
}

impl Table {
    pub(super) fn host_of(&self, id: &str) -> Host {
        match self.map.get(id) {
            Some(n) if *n == self.me => Host::Here,
            Some(n) => Host::Node(*n),
            None => Host::Unplaced,
        }
    }
}

/// Why a forwarded call produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The hosting node could not start the instance (nothing reached the upstream).
    #[error("on node {node}: {message}")]
    Start {
        /// Hosting node.
        node: u64,
        /// What it said.
        message: String,
    },
    /// The node no longer hosts the instance (the placement moved; nothing was sent).
    #[error("node {node} does not host '{instance}' (the placement moved)")]
    NotHostedThere {
        /// Node asked.
        node: u64,
        /// Instance.
        instance: String,
    },
    /// The node could not be reached: the request was not sent.
    #[error("node {node} is unreachable: {message}")]
    Unreachable {
        /// Node asked.
        node: u64,
        /// Why.
        message: String,
    },
    /// The transport to the node broke during the call, or the upstream behind it failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// A boxed future of a forwarded call.
pub type ForwardFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Outcome, ForwardError>> + Send + 'a>>;

/// The port to the instance hosts on other nodes (implemented over gRPC by `cluster/`).
pub trait Forward: Send + Sync + 'static {
    /// Run one JSON-RPC request on `instance`, hosted by `node`; call notifications go to
    /// `sink` as they arrive.
    fn call<'a>(
        &'a self,
        node: u64,
        instance: &'a str,
        method: &'a str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        timeout: Duration,
    ) -> ForwardFuture<'a>;

    /// Deliver a client's answer (`msg`) to the request relayed as `relay_id`, pending on
    /// `node`. `Ok(false)`: nothing is pending there under that id.
    fn answer<'a>(
        &'a self,
        node: u64,
        relay_id: &'a Id,
        msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<bool, ForwardError>> + Send + 'a>>;
}
