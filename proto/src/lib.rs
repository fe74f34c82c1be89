//! Hangar's protobuf definitions and the tonic/prost code generated from them.
//!
//! The `.proto` sources live in `proto/proto/`; `build.rs` compiles them with `protox`, so no
//! `protoc` binary is needed. Modules mirror the protobuf packages (`hangar.raft.v1` →
//! [`raft::v1`]).

#![warn(unreachable_pub, missing_docs)]

/// Raft transport between Hangar nodes (package `hangar.raft.v1`).
pub mod raft {
    /// Version 1 of the Raft transport.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("hangar.raft.v1");
    }
}

/// Node-to-node services of the gateway (package `hangar.node.v1`).
pub mod node {
    /// Version 1: call forwarding, relayed answers and placement leases.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("hangar.node.v1");
    }
}

/// Maximum size of one gRPC message on the Raft transport, in bytes, for both encoding and
/// decoding on client and server.
///
/// It bounds one AppendEntries batch and one snapshot chunk plus framing; the raft crate keeps
/// snapshot chunks at [`SNAPSHOT_CHUNK_BYTES`] and splits AppendEntries batches that would exceed it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Size of one snapshot data chunk, in bytes (well under [`MAX_MESSAGE_BYTES`]).
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
