//! Hangar's Raft-replicated control plane.
//!
//! * [`state`]: the replicated data model — [`Command`], [`State`], the pure [`apply`].
//! * storage: RocksDB log + state machine (crate-private, behind openraft's storage traits).
//! * network: tonic gRPC transport between peers, including forwarding writes to the leader.
//! * [`RaftHandle`]: the one object the node uses.
//!
//! openraft types never appear in this crate's public API, so an openraft upgrade touches only
//! this crate. Application-level refusals are [`Response::Rejected`] values; [`RaftError`] is
//! for cluster and storage failures.

mod error;
mod network;
mod node;
pub mod state;
mod store;
mod types;

pub use error::RaftError;
pub use node::ClusterStatus;
pub use node::MAX_COMMAND_BYTES;
pub use node::NodeInfo;
pub use node::OPERATION_TIMEOUT;
pub use node::RaftConfig;
pub use node::RaftHandle;
pub use node::Role;
pub use state::ApplyCtx;
pub use state::Command;
pub use state::RejectCode;
pub use state::Response;
pub use state::State;
pub use state::apply;
pub use store::StoreOpenError;
