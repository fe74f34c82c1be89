//! openraft type configuration and the log payload. Crate-private: openraft types never
//! appear in the public API.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use crate::state::Command;
use crate::state::Response;
use crate::types::NodeInfo;

/// The application data of a log entry: a command plus the leader's timestamp, so `apply`
/// is deterministic on every replica and on replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Proposal {
    /// The command.
    pub(crate) cmd: Command,
    /// The accepting leader's wall clock (ms since the Unix epoch).
    pub(crate) at_ms: u64,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.cmd, self.at_ms)
    }
}

openraft::declare_raft_types!(
    /// Hangar's openraft type configuration.
    pub(crate) TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
);

pub(crate) type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub(crate) type Vote = openraft::alias::VoteOf<TypeConfig>;
pub(crate) type Entry = openraft::alias::EntryOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub(crate) type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub(crate) type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Snapshot data: the serialised state, fully in memory (the replicated state is small).
pub(crate) type SnapshotData = Vec<u8>;
