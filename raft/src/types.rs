//! Plain data shared by the crate's modules and its public API: a member's addresses, a
//! node's role, the cluster status, the wall clock. A leaf: it imports nothing from the rest
//! of the crate, so every other module may use it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::Serialize;

/// A cluster member's addresses, stored in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` of the node's Raft/gRPC endpoint.
    pub raft_addr: String,
    /// `host:port` of the node's HTTP API (`/api`, `/mcp`).
    pub api_addr: String,
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Decides and replicates.
    Leader,
    /// Voter following a leader.
    Follower,
    /// Voter campaigning.
    Candidate,
    /// Receives the log, does not vote (also: not yet initialized).
    Learner,
    /// Raft stopped.
    Shutdown,
}

/// A point-in-time view of the cluster from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: u64,
    /// This node's role.
    pub role: Role,
    /// Current leader, if known.
    pub leader_id: Option<u64>,
    /// Current leader's addresses, if known.
    pub leader: Option<NodeInfo>,
    /// Current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last committed entry.
    pub committed_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Last index included in the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// Voters and their addresses (both configs while a joint change is in progress).
    pub voters: BTreeMap<u64, NodeInfo>,
    /// Learners and their addresses.
    pub learners: BTreeMap<u64, NodeInfo>,
    /// True while a joint-consensus membership change is in progress.
    pub joint: bool,
    /// On the leader: matched log index per follower/learner (`None` = nothing matched yet).
    pub replication: Option<BTreeMap<u64, Option<u64>>>,
    /// Why Raft stopped, if it did (storage failure or shutdown).
    pub fatal: Option<String>,
}

/// Current wall clock in ms since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
