//! `hangar-bench`: a lean load generator for MCP servers and for Hangar's `/mcp` front door.
//!
//! The binary (`src/main.rs`) has one subcommand per benchmark:
//!
//! * `stdio`  – spawn an MCP server as a child process, handshake, and drive `tools/call`
//!   from N workers multiplexed over the one stdin/stdout pipe (distinct JSON-RPC ids);
//! * `http`   – stateless `tools/call` POSTs to a Streamable HTTP endpoint (Hangar's `/mcp`),
//!   one keep-alive HTTP/1.1 connection per worker, JSON or SSE answers;
//! * `report` – turn the JSON lines of several runs into markdown tables;
//! * `cold`   – cold start: time to the first `tools/call` answer, spawning the server
//!   directly or through Hangar after stopping it via the API;
//! * `raft-commit`, `raft-failover` – Raft write latency and leader failover on a 3-node
//!   loopback cluster of real `hangar` processes ([`raft`]).
//!
//! Pieces: [`load`] (closed-loop workers with warm-up and a deadline), [`histogram`]
//! (latency summary), [`cpu`] (CPU use of the processes involved), [`report`] (one JSON line
//! per run, markdown tables) and [`cold`].

#![warn(missing_docs, unreachable_pub)]

pub mod authn;
pub mod cold;
pub mod cpu;
pub mod decide;
pub mod histogram;
pub mod http1;
pub mod instance;
pub mod load;
pub mod raft;
pub mod report;
pub mod rpc;
pub mod sse;
pub mod stdio;
pub mod util;
