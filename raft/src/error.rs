//! The crate's error type. Application-level refusals are not errors: they are
//! [`Response::Rejected`](crate::Response::Rejected) values.

use serde::Deserialize;
use serde::Serialize;

/// Why a Raft operation failed. Serialisable, so a leader's error reaches a forwarding
/// follower unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RaftError {
    /// This node is not the leader and could not forward the request.
    #[error(
        "this node is not the Raft leader and could not forward the request; send it to node {} ({})",
        leader_id.map_or_else(|| "unknown".to_string(), |id| id.to_string()),
        leader_api_addr.as_deref().unwrap_or("address unknown")
    )]
    NotLeader {
        /// The leader, if known.
        leader_id: Option<u64>,
        /// The leader's API address, if known.
        leader_api_addr: Option<String>,
    },
    /// No leader is known (election in progress or quorum lost).
    #[error(
        "the cluster has no leader right now (election in progress or a majority of voters is down); \
         retry in a few seconds and check that most voters are running"
    )]
    NoLeader,
    /// The leader (or another peer) could not be reached.
    #[error(
        "node {node_id} at {addr} is unreachable: {message}; retry, and check that it runs and the network allows it"
    )]
    Unreachable {
        /// Target node.
        node_id: u64,
        /// Its Raft address.
        addr: String,
        /// Transport error.
        message: String,
    },
    /// Storage failed; this node's Raft has stopped (fatal).
    #[error(
        "the Raft storage of this node failed and Raft stopped: {message}; restart the node, and if it \
         fails again remove it from the cluster, wipe its data directory and add it back"
    )]
    Storage {
        /// What failed.
        message: String,
    },
    /// A membership change was refused or is invalid.
    #[error("membership change refused: {message}")]
    Membership {
        /// Why.
        message: String,
    },
    /// The operation did not finish in time.
    #[error(
        "{what} did not finish within {after_ms} ms; the cluster may be overloaded or without quorum, retry"
    )]
    Timeout {
        /// The operation.
        what: String,
        /// The deadline.
        after_ms: u64,
    },
    /// This node's Raft is shutting down or stopped.
    #[error("this node's Raft is shutting down; send the request to another node")]
    ShuttingDown,
    /// The write may or may not have been applied (leadership changed before it committed).
    #[error(
        "the write's outcome is unknown ({message}); read the state to see whether it was applied before retrying"
    )]
    OutcomeUnknown {
        /// Details.
        message: String,
    },
    /// Starting the node failed (bad config, data directory, address in use).
    #[error("cannot start Raft: {message}")]
    Start {
        /// Why.
        message: String,
    },
    /// The command is larger than one Raft message may be.
    #[error(
        "the command is {size} bytes, more than the {limit} byte limit of one Raft entry; split it"
    )]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// A bug or a protocol mismatch between nodes.
    #[error("internal Raft error: {message}; check that all nodes run the same hangar version")]
    Internal {
        /// Details.
        message: String,
    },
}

impl RaftError {
    /// True when retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RaftError::NoLeader
                | RaftError::Unreachable { .. }
                | RaftError::Timeout { .. }
                | RaftError::NotLeader { .. }
        )
    }

    pub(crate) fn internal(message: impl std::fmt::Display) -> RaftError {
        RaftError::Internal {
            message: message.to_string(),
        }
    }
}
