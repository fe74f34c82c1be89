//! hangar-chaos: a fault-injection suite for Hangar clusters (DESIGN.md §3, `chaos/`).
//!
//! It starts real `hangar` processes ([`nodes`]), routes node-to-node traffic through a
//! fault-injecting TCP proxy ([`proxy`]), drives workloads against the REST API and `/mcp` of
//! random nodes ([`workload`]), injects seeded faults ([`faults`]), records a history
//! ([`history`]) and checks it ([`checker`]).

pub mod checker;
pub mod faults;
pub mod history;
pub mod nodes;
pub mod proxy;
pub mod run;
pub mod workload;
