//! Hangar node: one member of a Hangar gateway cluster.
//!
//! Rooms (see `DESIGN.md` §3), each owning one concern:
//! `config/` (schema, interpolation, validation, lowering, diff, reload),
//! `cluster/` (boot/join, the handle to Raft), `gateway/` (MCP front door),
//! `routing/` (target resolution, strategies, group breakers, failover),
//! `upstream/` (MCP client transports), `runtime/` (the instances on this node: carries out
//! what their lifecycle decides), `supervisor/` (the pure lifecycle state machine and the
//! loop that ticks it), `api/` (REST, probes, metrics endpoint, the error envelope),
//! `telemetry/` (metrics registry, logging, domain events).
//! A request never walks backwards: gateway → routing → runtime/upstream; decisions flow
//! supervisor → runtime.

#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod jsonrpc;
pub mod lines;
pub mod ratelimit;
pub mod routing;
pub mod runtime;
pub mod supervisor;
pub mod telemetry;
pub mod upstream;
