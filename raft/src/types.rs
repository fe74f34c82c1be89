//! openraft type configuration and the log payload. Crate-private: openraft types never
//! appear in the public API.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use crate::NodeInfo;
use crate::state::Command;
use crate::state::Response;

/// The application data of a log entry: a command plus the leader's timestamp, so `apply`
/// is deterministic on every replica and on replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Proposal {
    /// The command.
    pub cmd: Command,
    /// The accepting leader's wall clock (ms since the Unix epoch).
    pub at_ms: u64,
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
pub(crate) type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;

/// Snapshot data: the serialised state, fully in memory (the replicated state is small).
pub(crate) type SnapshotData = Vec<u8>;

/// Current wall clock in ms since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
