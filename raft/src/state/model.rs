//! Record types stored in the replicated [`State`](super::State).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde::Serialize;

/// Which kind of source a desired server spec comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSourceKind {
    /// The YAML config file of the nodes.
    File,
    /// The `/api` admin API.
    Api,
    /// `hangarctl`.
    Cli,
}

/// Where a desired server spec came from; serialised as `file:<sha256>`, `api` or `cli`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ConfigSource {
    /// The config file with this SHA-256 (hex).
    File {
        /// SHA-256 of the file, lowercase hex.
        sha256: String,
    },
    /// The admin API.
    Api,
    /// The operator CLI.
    Cli,
}

impl ConfigSource {
    /// The kind of this source.
    pub fn kind(&self) -> ConfigSourceKind {
        match self {
            ConfigSource::File { .. } => ConfigSourceKind::File,
            ConfigSource::Api => ConfigSourceKind::Api,
            ConfigSource::Cli => ConfigSourceKind::Cli,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File { sha256 } => write!(f, "file:{sha256}"),
            ConfigSource::Api => f.write_str("api"),
            ConfigSource::Cli => f.write_str("cli"),
        }
    }
}

impl From<ConfigSource> for String {
    fn from(s: ConfigSource) -> String {
        s.to_string()
    }
}

/// A config source string that is none of `file:<sha256>`, `api` and `cli`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown config source {0:?}: expected \"file:<sha256>\", \"api\" or \"cli\"")]
pub struct UnknownConfigSource(pub String);

impl TryFrom<String> for ConfigSource {
    type Error = UnknownConfigSource;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "api" => Ok(ConfigSource::Api),
            "cli" => Ok(ConfigSource::Cli),
            other => match other.strip_prefix("file:") {
                Some(hash) => Ok(ConfigSource::File {
                    sha256: hash.to_string(),
                }),
                None => Err(UnknownConfigSource(other.to_string())),
            },
        }
    }
}

/// The desired spec of one server or group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The node's config type, serialised.
    pub spec: serde_json::Value,
    /// Cluster config version at which this record last changed.
    pub config_version: u64,
    /// Where it came from.
    pub source: ConfigSource,
    /// Apply time of the last change (ms since the Unix epoch, leader clock).
    pub updated_at_ms: u64,
}

/// What the cluster learned from an upstream's `*/list` calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// `tools` array, raw JSON text.
    pub tools: String,
    /// `prompts` array, raw JSON text.
    pub prompts: String,
    /// `resources` array, raw JSON text.
    pub resources: String,
    /// `resourceTemplates` array, raw JSON text.
    pub resource_templates: String,
    /// SHA-256 (hex) over the four lists.
    pub schema_digest: String,
    /// Apply time when the digest last changed (ms since the Unix epoch).
    pub learned_at_ms: u64,
}

/// Which node runs an instance, decided by the leader of `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Node that runs the instance.
    pub node_id: u64,
    /// Term of the deciding leader (fencing token).
    pub term: u64,
}

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceState {
    /// Not running.
    Cold,
    /// Starting / MCP handshake in progress.
    Initializing,
    /// Serving.
    Ready,
    /// Serving badly (health checks failing).
    Degraded,
    /// Failed and not serving.
    Dead,
}

/// Last reported lifecycle state of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The state.
    pub state: InstanceState,
    /// Why (free text).
    pub reason: String,
    /// Reporting node.
    pub node_id: u64,
    /// Apply time of the report (ms since the Unix epoch).
    pub at_ms: u64,
}

/// An API key record. Only the SHA-256 of the secret is stored, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Key id (public, e.g. the key prefix).
    pub id: String,
    /// Principal the key authenticates as.
    pub principal: String,
    /// Human-readable name.
    pub name: String,
    /// SHA-256 of the secret, 64 lowercase hex characters.
    pub sha256_hex: String,
    /// Creation time (ms since the Unix epoch; set by apply).
    #[serde(default)]
    pub created_at_ms: u64,
    /// Expiry (ms since the Unix epoch), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Revoked keys never authenticate.
    #[serde(default)]
    pub revoked: bool,
    /// The tenant its calls count under (rate limits keyed or matched by `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A role: a named set of permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleDef {
    /// Role name.
    pub name: String,
    /// Permissions (e.g. `tools:call`, `servers:write`).
    pub permissions: BTreeSet<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
}

/// Where a role assignment applies: everywhere (`global`), or only to requests about one
/// server (`server:<id>`) or one group and its members (`group:<id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleScope<'a> {
    /// Every request.
    Global,
    /// Requests about this server.
    Server(&'a str),
    /// Requests about this group (and its members).
    Group(&'a str),
}

impl<'a> RoleScope<'a> {
    /// Parse `global`, `server:<id>` or `group:<id>` (ids as server ids: 1-64 letters,
    /// digits, `_` and `-`); the error says what is accepted.
    pub fn parse(scope: &'a str) -> Result<RoleScope<'a>, String> {
        if scope == "global" {
            return Ok(RoleScope::Global);
        }
        let (kind, id) = scope.split_once(':').unwrap_or((scope, ""));
        let valid_id = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match kind {
            "server" | "group" if !valid_id => Err(format!(
                "role scope {scope:?}: the {kind} id must be 1-64 letters, digits, `_` or `-`"
            )),
            "server" => Ok(RoleScope::Server(id)),
            "group" => Ok(RoleScope::Group(id)),
            _ => Err(format!(
                "role scope {scope:?} is not one of \"global\", \"server:<id>\", \"group:<id>\""
            )),
        }
    }
}

/// Tool access lists for one scope/target. Evaluation (deny > approval > allow) is the auth
/// room's business; the state only stores the lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolPolicy {
    /// Scope: `global`, `server`, `group`, `principal` or `role`.
    pub scope: String,
    /// Target id within the scope (empty for `global`).
    #[serde(default)]
    pub target: String,
    /// Tool name patterns that are allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Tool name patterns that are denied.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Tool name patterns that need approval.
    #[serde(default)]
    pub approval: Vec<String>,
}

impl ToolPolicy {
    /// The map key of a policy: `<scope>:<target>`.
    pub fn key(scope: &str, target: &str) -> String {
        format!("{scope}:{target}")
    }
}

/// A rate-limit definition, cluster-wide (the counters are not replicated: the leader leases
/// shares of the limit to the nodes, see the node's `ratelimit` room).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimitDef {
    /// Limit id (`[A-Za-z0-9_.-]`, at most 64 characters).
    pub id: String,
    /// Where it was defined: `file` (the config file; replaced by each applied file) or `api`.
    #[serde(default = "default_limit_source")]
    pub source: String,
    /// What it counts: `tools` (tool calls) or `commands` (the config's top-level
    /// `rate_limit`: tool calls and REST commands, one bucket per command kind).
    #[serde(default = "default_applies_to")]
    pub applies_to: String,
    /// Dimensions that separate buckets: `principal`, `tenant`, `server`, `tool`, `command`
    /// (empty: one bucket for the whole rule).
    #[serde(default)]
    pub key: Vec<String>,
    /// Glob filters by dimension (`principal`, `tenant`, `server`, `tool`); all must match.
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// Calls per second, cluster-wide.
    pub rps: f64,
    /// Calls admitted at once from a full bucket, cluster-wide.
    pub burst: u64,
    /// What a node that lost the leader does at lease expiry: `safe_share`, `fail_open`,
    /// `fail_closed`.
    #[serde(default = "default_on_partition")]
    pub on_partition: String,
}

fn default_limit_source() -> String {
    "api".to_owned()
}
fn default_applies_to() -> String {
    "tools".to_owned()
}
fn default_on_partition() -> String {
    "safe_share".to_owned()
}

impl RateLimitDef {
    /// Dimensions a bucket key may use.
    pub const DIMENSIONS: [&'static str; 5] = ["principal", "tenant", "server", "tool", "command"];
    /// Partition modes.
    pub const PARTITION_MODES: [&'static str; 3] = ["safe_share", "fail_open", "fail_closed"];

    /// What is wrong with this definition, if anything (one message naming the field).
    pub fn problem(&self) -> Option<String> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Some(format!(
                "rate limit id {:?} must be 1-64 characters of A-Z a-z 0-9 _ - .",
                self.id
            ));
        }
        if !(self.rps.is_finite() && self.rps > 0.0 && self.rps <= 1e9) {
            return Some(format!(
                "rate limit {:?}: rps must be a number > 0 (and at most 1e9), got {}",
                self.id, self.rps
            ));
        }
        if self.burst == 0 || self.burst > 1_000_000_000 {
            return Some(format!(
                "rate limit {:?}: burst must be between 1 and 1e9, got {}",
                self.id, self.burst
            ));
        }
        if !matches!(self.source.as_str(), "file" | "api") {
            return Some(format!(
                "rate limit {:?}: source must be file or api, got {:?}",
                self.id, self.source
            ));
        }
        if !matches!(self.applies_to.as_str(), "tools" | "commands") {
            return Some(format!(
                "rate limit {:?}: applies_to must be tools or commands, got {:?}",
                self.id, self.applies_to
            ));
        }
        if let Some(k) = self
            .key
            .iter()
            .find(|k| !Self::DIMENSIONS.contains(&k.as_str()))
        {
            return Some(format!(
                "rate limit {:?}: key {k:?} is not one of principal, tenant, server, tool, command",
                self.id
            ));
        }
        if let Some(k) = self
            .matches
            .keys()
            .find(|k| !Self::DIMENSIONS[..4].contains(&k.as_str()))
        {
            return Some(format!(
                "rate limit {:?}: match {k:?} is not one of principal, tenant, server, tool",
                self.id
            ));
        }
        if !Self::PARTITION_MODES.contains(&self.on_partition.as_str()) {
            return Some(format!(
                "rate limit {:?}: on_partition must be safe_share, fail_open or fail_closed, got {:?}",
                self.id, self.on_partition
            ));
        }
        None
    }
}

/// A domain event as submitted by a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Event type, e.g. `server.started`, `tool.called`.
    pub kind: String,
    /// When it happened on the reporting node (ms since the Unix epoch).
    pub at_ms: u64,
    /// Reporting node.
    pub node_id: u64,
    /// What it is about (server id, instance id, key id…); may be empty.
    #[serde(default)]
    pub subject: String,
    /// Event payload (never secrets).
    #[serde(default)]
    pub data: serde_json::Value,
}

/// An event in the log, with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Monotonically increasing, gap-free at append, starting at 1.
    pub seq: u64,
    /// Apply time at which it entered the log (used for age retention).
    pub appended_at_ms: u64,
    /// The event.
    pub event: EventRecord,
}

/// A node's addresses, for forwarding requests to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// HTTP address of `/api` and `/mcp`.
    pub api_addr: String,
    /// Raft/gRPC address.
    pub raft_addr: String,
    /// Most local-mode instances it may run (`None` = no limit).
    #[serde(default)]
    pub capacity: Option<u32>,
    /// Draining: the leader places nothing on it and moves its instances away.
    #[serde(default)]
    pub draining: bool,
    /// Its labels (`cluster.labels`), matched by `placement.labels`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}
