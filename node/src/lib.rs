//! Hangar node: one member of a Hangar gateway cluster.
//!
//! Rooms (see `DESIGN.md` §3): `config/` (schema, interpolation, validation),
//! `upstream/` (MCP client transports), `runtime/` (instances on this node),
//! `routing/` (target resolution), `gateway/` (MCP front door), `api/` (REST, probes,
//! metrics endpoints), `telemetry/` (metrics registry, logging).
//! A request never walks backwards through that list.

pub mod config;
pub mod jsonrpc;
pub mod upstream;
