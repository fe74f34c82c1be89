//! The commands the cluster agrees on and the responses `apply` returns.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use super::model::ApiKeyRecord;
use super::model::ConfigSourceKind;
use super::model::EventRecord;
use super::model::InstanceState;
use super::model::RateLimitDef;
use super::model::RoleDef;
use super::model::ToolPolicy;

/// Every change to the replicated [`State`](super::State); the only input of
/// [`apply`](super::apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// Replace, atomically, every server whose source is `source` with `servers` (id → spec).
    ///
    /// Servers of other sources are untouched unless `servers` names them, in which case the
    /// new source takes them over. `file_hash` (SHA-256 hex of the config file) is required for
    /// `source: file`. The config version is bumped only when something changed.
    SetDesiredConfig {
        /// Server and group specs by id (the node's config type serialised to JSON).
        servers: BTreeMap<String, serde_json::Value>,
        /// Which source this set comes from.
        source: ConfigSourceKind,
        /// SHA-256 (hex) of the config file, for `source: file`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_hash: Option<String>,
    },
    /// Create or replace one server spec.
    PutServer {
        /// Server or group id.
        id: String,
        /// The spec (the node's config type serialised to JSON).
        spec: serde_json::Value,
        /// Where the change comes from (`api` or `cli`; `file` needs `file_hash`).
        source: ConfigSourceKind,
        /// SHA-256 of the config file when `source` is `file`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_hash: Option<String>,
        /// Reject with `server_exists` if the id is already defined.
        #[serde(default)]
        create_only: bool,
        /// Reject with `version_mismatch` unless the server's current `config_version` equals this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
    },
    /// Delete one server spec (and its learned catalogue).
    DeleteServer {
        /// Server or group id.
        id: String,
    },
    /// Store the tools/prompts/resources learned from an upstream.
    PutCatalog {
        /// Server id.
        server_id: String,
        /// `tools` array as raw JSON text.
        tools: String,
        /// `prompts` array as raw JSON text.
        prompts: String,
        /// `resources` array as raw JSON text.
        resources: String,
        /// `resourceTemplates` array as raw JSON text.
        resource_templates: String,
    },
    /// Forget the catalogue of a server.
    DeleteCatalog {
        /// Server id.
        server_id: String,
    },
    /// Place an instance on a node (leader only; `term` is the leader's term — the fencing token).
    SetPlacement {
        /// Instance id, e.g. `math#0`.
        instance_id: String,
        /// Node that must run it.
        node_id: u64,
        /// Term of the leader that decided it.
        term: u64,
    },
    /// Remove the placement of an instance (fenced by `term` like `SetPlacement`).
    RemovePlacement {
        /// Instance id.
        instance_id: String,
        /// Term of the leader that decided it.
        term: u64,
    },
    /// A node reports a lifecycle transition of an instance it runs.
    ReportStatus {
        /// Instance id.
        instance_id: String,
        /// Reporting node.
        node_id: u64,
        /// New state.
        state: InstanceState,
        /// Why (free text, may be empty).
        #[serde(default)]
        reason: String,
    },
    /// Create an API key record (the secret's SHA-256 only, never the secret).
    CreateApiKey {
        /// The key record; `created_at_ms` is overwritten with the apply time.
        key: ApiKeyRecord,
    },
    /// Mark an API key revoked (idempotent).
    RevokeApiKey {
        /// Key id.
        id: String,
    },
    /// Delete an API key record.
    DeleteApiKey {
        /// Key id.
        id: String,
    },
    /// Create or replace a role.
    PutRole {
        /// The role.
        role: RoleDef,
    },
    /// Delete a role and every assignment of it.
    DeleteRole {
        /// Role name.
        name: String,
    },
    /// Give a principal a role (idempotent).
    AssignRole {
        /// Principal (e.g. `user:alice`, `key:ci`).
        principal: String,
        /// Role name.
        role: String,
        /// Where it applies: absent or `global` (everywhere), `server:<id>` or `group:<id>`
        /// (see [`RoleScope`](super::RoleScope)).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// Take a role from a principal (idempotent); only the assignment of that scope.
    UnassignRole {
        /// Principal.
        principal: String,
        /// Role name.
        role: String,
        /// The assignment's scope (absent or `global`: the global one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// Create or replace the tool access policy for one scope/target.
    PutToolPolicy {
        /// The policy.
        policy: ToolPolicy,
    },
    /// Delete the tool access policy of one scope/target.
    DeleteToolPolicy {
        /// Scope (`global`, `server`, `group`, `principal`, `role`).
        scope: String,
        /// Target id within the scope (empty for `global`).
        target: String,
    },
    /// Create or replace a rate-limit definition.
    PutRateLimit {
        /// The definition.
        limit: RateLimitDef,
    },
    /// Delete a rate-limit definition.
    DeleteRateLimit {
        /// Limit id.
        id: String,
    },
    /// Replace every file-defined rate limit with `limits` (each with `source: file`).
    SetFileRateLimits {
        /// The config file's limits.
        limits: Vec<RateLimitDef>,
    },
    /// Append a batch of domain events (each gets the next `seq`); retention is applied after.
    AppendEvents {
        /// The events, in order.
        events: Vec<EventRecord>,
    },
    /// Change event-log retention (applied immediately).
    SetEventRetention {
        /// Keep at most this many events (0 = unlimited).
        max_count: u64,
        /// Drop events older than this, in milliseconds (0 = unlimited).
        max_age_ms: u64,
    },
    /// Record (or update) a node's API address for request forwarding.
    RegisterNode {
        /// Node id.
        node_id: u64,
        /// HTTP address of its `/api` and `/mcp`.
        api_addr: String,
        /// Address of its Raft/gRPC endpoint.
        raft_addr: String,
        /// Most local-mode instances it may run (`None` = no limit).
        #[serde(default)]
        capacity: Option<u32>,
        /// Its labels (`cluster.labels`), matched by `placement.labels`.
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// Mark a node as draining (the leader places nothing on it and moves its instances
    /// away) or not.
    SetNodeDrain {
        /// Node id.
        node_id: u64,
        /// Draining or not.
        draining: bool,
    },
    /// Forget a node's addresses.
    UnregisterNode {
        /// Node id.
        node_id: u64,
    },
}

impl Command {
    /// Short, stable name of the command kind (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SetDesiredConfig { .. } => "set_desired_config",
            Command::PutServer { .. } => "put_server",
            Command::DeleteServer { .. } => "delete_server",
            Command::PutCatalog { .. } => "put_catalog",
            Command::DeleteCatalog { .. } => "delete_catalog",
            Command::SetPlacement { .. } => "set_placement",
            Command::RemovePlacement { .. } => "remove_placement",
            Command::ReportStatus { .. } => "report_status",
            Command::CreateApiKey { .. } => "create_api_key",
            Command::RevokeApiKey { .. } => "revoke_api_key",
            Command::DeleteApiKey { .. } => "delete_api_key",
            Command::PutRole { .. } => "put_role",
            Command::DeleteRole { .. } => "delete_role",
            Command::AssignRole { .. } => "assign_role",
            Command::UnassignRole { .. } => "unassign_role",
            Command::PutToolPolicy { .. } => "put_tool_policy",
            Command::DeleteToolPolicy { .. } => "delete_tool_policy",
            Command::PutRateLimit { .. } => "put_rate_limit",
            Command::DeleteRateLimit { .. } => "delete_rate_limit",
            Command::SetFileRateLimits { .. } => "set_file_rate_limits",
            Command::AppendEvents { .. } => "append_events",
            Command::SetEventRetention { .. } => "set_event_retention",
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeDrain { .. } => "set_node_drain",
            Command::UnregisterNode { .. } => "unregister_node",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print payloads: specs may carry secrets (env values, headers).
        f.write_str(self.kind())
    }
}

/// Why `apply` refused a command. Stable codes, serialised in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectCode {
    /// A command field is malformed (empty id, bad hash, …).
    InvalidArgument,
    /// `PutServer { create_only: true }` on an existing id.
    ServerExists,
    /// The server id is not defined.
    ServerNotFound,
    /// `if_version` did not match the server's config version.
    VersionMismatch,
    /// The placement's term is older than the newest placement term (a deposed leader).
    StaleTerm,
    /// The instance is placed on another node than the reporter.
    NotPlacedHere,
    /// The API key id already exists.
    KeyExists,
    /// Another key already has this secret hash.
    KeyHashExists,
    /// The API key id does not exist.
    KeyNotFound,
    /// The role does not exist.
    RoleNotFound,
    /// No such tool policy / rate limit / node / placement.
    NotFound,
    /// The object is owned by another source (a rate limit defined in the config file).
    Conflict,
}

impl RejectCode {
    /// The snake_case wire name of the code.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectCode::InvalidArgument => "invalid_argument",
            RejectCode::ServerExists => "server_exists",
            RejectCode::ServerNotFound => "server_not_found",
            RejectCode::VersionMismatch => "version_mismatch",
            RejectCode::StaleTerm => "stale_term",
            RejectCode::NotPlacedHere => "not_placed_here",
            RejectCode::KeyExists => "key_exists",
            RejectCode::KeyHashExists => "key_hash_exists",
            RejectCode::KeyNotFound => "key_not_found",
            RejectCode::RoleNotFound => "role_not_found",
            RejectCode::NotFound => "not_found",
            RejectCode::Conflict => "conflict",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of applying one command. Application-level refusals are
/// [`Response::Rejected`] values, never errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Response {
    /// Applied; nothing to report (also the response of blank and membership entries).
    Ok,
    /// `SetDesiredConfig` result.
    ConfigApplied {
        /// Config version after the command (unchanged when nothing changed).
        config_version: u64,
        /// Ids added.
        added: Vec<String>,
        /// Ids whose spec or source changed.
        updated: Vec<String>,
        /// Ids removed.
        removed: Vec<String>,
    },
    /// `PutServer` / `DeleteServer` result.
    ServerChanged {
        /// Config version after the command.
        config_version: u64,
    },
    /// `PutCatalog` result.
    CatalogUpdated {
        /// SHA-256 (hex) over the four lists.
        schema_digest: String,
        /// False when the digest equals the stored one.
        changed: bool,
    },
    /// `AppendEvents` result: the sequence numbers assigned (inclusive range; empty batch → None).
    EventsAppended {
        /// First assigned seq.
        first_seq: Option<u64>,
        /// Last assigned seq.
        last_seq: Option<u64>,
    },
    /// The command was refused; the state is unchanged.
    Rejected {
        /// Stable reason code.
        code: RejectCode,
        /// What was wrong and what to do.
        message: String,
    },
}

impl Response {
    /// Build a [`Response::Rejected`].
    pub fn rejected(code: RejectCode, message: impl Into<String>) -> Response {
        Response::Rejected {
            code,
            message: message.into(),
        }
    }

    /// True for [`Response::Rejected`].
    pub fn is_rejected(&self) -> bool {
        matches!(self, Response::Rejected { .. })
    }
}
