//! Hangar node: one member of a Hangar gateway cluster.
//!
//! Rooms (see `DESIGN.md` §3): `config/` (schema, interpolation, validation),
//! `gateway/` (MCP front door), `routing/` (target resolution, failover),
//! `upstream/` (MCP client transports), `runtime/` (instances on this node),
//! `api/` (REST, probes, metrics endpoint), `telemetry/` (metrics registry, logging).
//! A request never walks backwards: gateway → routing → runtime/upstream.

pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod jsonrpc;
pub mod lines;
pub mod routing;
pub mod runtime;
pub mod supervisor;
pub mod telemetry;
pub mod upstream;
