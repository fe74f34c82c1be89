//! Configuration room: MCP Hangar's YAML format, `${VAR}` / `${VAR:-default}` interpolation
//! over every string, and full semantic validation that reports every problem with its path.
//!
//! Loading never half-applies: a file either yields a complete, valid [`Config`] or a list of
//! problems. Unknown keys are errors (with a "did you mean" hint).

mod cluster;
mod commands;
mod diff;
mod error;
mod jwt;
mod load;
mod lower;
mod reader;
mod reload;
mod secrets;
mod server_tls;
mod spec;
mod validate;

pub use cluster::{ClusterConfig, ClusterOverrides, ClusterTls, NODE_SERVER_NAME, PeerSpec};
pub use commands::{
    ABSOLUTE_COMMANDS_VAR, ALLOWED_COMMANDS_VAR, CommandPolicy, DEFAULT_ALLOWED_COMMANDS,
    command_problems, raw_command_problems,
};
pub use diff::{ConfigDiff, diff};
pub use error::{ConfigError, Problem, Problems};
pub use jwt::{
    JwtConfig, JwtIssuer, JwtPublicKey, is_loopback as is_loopback_url,
    public_key as jwt_public_key,
};
pub use load::{load_file, load_str, servers_from_raw, sha256_hex, validate_server};
pub use lower::transport_spec;
pub use reload::{
    BoxFuture, ReloadError, ReloadReport, ReloadStatus, ReloadTarget, Reloader, Requester,
    TargetError,
};
pub use secrets::{literal_secrets, literal_secrets_in, literal_secrets_in_file};
pub use server_tls::{ServerTls, TlsMinVersion, certified_key, read_certs, read_roots};
pub use spec::*;

#[cfg(test)]
mod tests;
