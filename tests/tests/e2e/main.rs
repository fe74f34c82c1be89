//! End-to-end tests: real `hangar` processes, real fixture MCP servers, real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod acceptance;
mod api;
mod cli;
mod coverage;
mod hardening;
mod jwt;
mod lifecycle;
mod policies;
mod proxy;
mod ratelimit;
mod roles;
mod thirdparty;
mod tls;
