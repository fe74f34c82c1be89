//! Hangar's Raft-replicated control plane.
//!
//! * [`state`]: the replicated data model — [`Command`], [`State`], the pure [`apply`].
//! * types: plain shared data ([`NodeInfo`], [`Role`], [`ClusterStatus`]); a leaf.
//! * typecfg: openraft's type configuration and the log payload (crate-private).
//! * storage: RocksDB log + state machine (crate-private, behind openraft's storage traits).
//! * network: the wire format between peers and the outgoing side of the gRPC transport.
//! * node: [`RaftHandle`], the one object the node uses, with the leader-side executor, the
//!   forwarding client and this node's gRPC service.
//!
//! Each module imports only from modules above it in this order, so there are no cycles:
//! `types`, `error`, `state` (leaves) · `typecfg` · `store`, `network` · `node`.
//!
//! openraft types never appear in this crate's public API, so an openraft upgrade touches only
//! this crate. Application-level refusals are [`Response::Rejected`] values; [`RaftError`] is
//! for cluster and storage failures.

#![warn(unreachable_pub, missing_docs)]

mod error;
mod network;
mod node;
pub mod state;
mod store;
mod typecfg;
mod types;

pub use error::RaftError;
pub use network::tls::PeerTls;
pub use node::MAX_COMMAND_BYTES;
pub use node::OPERATION_TIMEOUT;
pub use node::RaftConfig;
pub use node::RaftHandle;
pub use state::ApplyCtx;
pub use state::Command;
pub use state::RejectCode;
pub use state::Response;
pub use state::State;
pub use state::apply;
pub use store::StoreOpenError;
pub use types::ClusterStatus;
pub use types::NodeInfo;
pub use types::Role;
