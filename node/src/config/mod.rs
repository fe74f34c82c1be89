//! Configuration room: MCP Hangar's YAML format, `${VAR}` / `${VAR:-default}` interpolation
//! over every string, and full semantic validation that reports every problem with its path.
//!
//! Loading never half-applies: a file either yields a complete, valid [`Config`] or a list of
//! problems. Unknown keys are errors (with a "did you mean" hint).

mod cluster;
mod diff;
mod error;
mod load;
mod lower;
mod reader;
mod reload;
mod spec;
mod validate;

pub use cluster::{ClusterConfig, ClusterOverrides, ClusterTls, NODE_SERVER_NAME, PeerSpec};
pub use diff::{ConfigDiff, diff};
pub use error::{ConfigError, Problem, Problems};
pub use load::{load_file, load_str, servers_from_raw, sha256_hex, validate_server};
pub use lower::transport_spec;
pub use reload::{
    BoxFuture, ReloadError, ReloadReport, ReloadStatus, ReloadTarget, Reloader, Requester,
    TargetError,
};
pub use spec::*;

#[cfg(test)]
mod tests;
