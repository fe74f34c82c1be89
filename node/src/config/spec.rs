//! The typed IR of a configuration: servers, groups, sections, secrets. [`super::validate`]
//! builds it from a document; the runtime rooms consume it.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value;

use super::ClusterConfig;
use super::reader::ProblemSink;
use super::validate::build;

/// A secret string: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The clear value (for building upstream requests only).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Settings common to subprocess and remote servers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommonSpec {
    /// Free text.
    pub description: Option<String>,
    /// Stop when unused this long (seconds).
    pub idle_ttl_s: u64,
    /// Health check period (seconds).
    pub health_check_interval_s: u64,
    /// Consecutive failures before DEGRADED.
    pub max_consecutive_failures: u32,
    /// Per-server concurrency cap.
    pub max_concurrency: Option<u32>,
    /// Start at boot.
    pub auto_start: bool,
    /// Predefined tool list or access policy.
    pub tools: Option<ToolsSpec>,
    /// Tool-name globs safe to retry after a failure that may have reached the upstream.
    pub idempotent_tools: Vec<String>,
}

/// A child-process server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubprocessSpec {
    /// Common settings.
    #[serde(flatten)]
    pub common: CommonSpec,
    /// Full argv (`command` followed by `args`).
    pub command: Vec<String>,
    /// Extra environment.
    pub env: IndexMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Where in a cluster it runs.
    pub placement: PlacementSpec,
}

/// How many copies of a local-mode server run in a cluster, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct PlacementSpec {
    /// Number of copies.
    pub replicas: Replicas,
    /// Nodes allowed to run it (empty = any node).
    pub nodes: Vec<u64>,
    /// Labels a node must carry (all of them, `cluster.labels`) to run it.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `placement.replicas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Replicas {
    /// Exactly one instance cluster-wide, on the node the leader chose (what a stateful server
    /// needs): every node's calls go to it.
    #[default]
    One,
    /// One instance on every node; each node calls its own copy.
    All,
    /// This many (2 or more) interchangeable instances on different nodes; calls are balanced
    /// over them. Lowered to a group (round robin) of single-instance members `<id>.1` …
    /// `<id>.N` (see `validate::expand_replicas`), so the runtime never sees it.
    Count(u32),
}

/// HTTP client settings for a remote server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpSpec {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Retries (reserved for the retry policy).
    pub max_retries: u32,
    /// Backoff factor (reserved for the retry policy).
    pub retry_backoff_factor: f64,
    /// Extra headers.
    pub headers: IndexMap<String, String>,
}

/// Credentials sent to a remote server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RemoteAuth {
    /// None.
    None,
    /// An API key header.
    ApiKey {
        /// Header name.
        header: String,
        /// The key.
        key: Secret,
    },
    /// `Authorization: Bearer`.
    Bearer {
        /// The token.
        token: Secret,
    },
    /// `Authorization: Basic`.
    Basic {
        /// User.
        username: String,
        /// Password.
        password: Secret,
    },
}

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsSpec {
    /// Verify certificates.
    pub verify_ssl: bool,
    /// Extra CA (PEM).
    pub ca_cert_path: Option<PathBuf>,
}

/// A remote Streamable HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteSpec {
    /// Common settings.
    #[serde(flatten)]
    pub common: CommonSpec,
    /// MCP endpoint URL.
    pub endpoint: String,
    /// HTTP settings.
    pub http: HttpSpec,
    /// Credentials.
    pub auth: RemoteAuth,
    /// TLS.
    pub tls: TlsSpec,
}

/// `tools:` — a predefined list or an access policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ToolsSpec {
    /// Tools listed before the server starts.
    Predefined(Vec<PredefinedTool>),
    /// Allow/deny/approval globs.
    Policy(ToolPolicy),
}

/// One predefined tool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredefinedTool {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// JSON Schema of the input.
    pub input_schema: Value,
    /// JSON Schema of the output.
    pub output_schema: Option<Value>,
}

/// Tool access policy (fnmatch globs; deny > approval > allow).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ToolPolicy {
    /// Allowed tools (empty = all).
    pub allow_list: Vec<String>,
    /// Denied tools.
    pub deny_list: Vec<String>,
    /// Tools that need approval.
    pub approval_list: Vec<String>,
    /// Approval timeout.
    pub approval_timeout_seconds: u64,
    /// Approval channel.
    pub approval_channel: Option<String>,
}

/// Load-balancing strategy of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Cycle through members.
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Fewest in-flight calls.
    LeastConnections,
    /// Weighted random.
    Random,
    /// Lowest priority number first.
    Priority,
}

/// Member health thresholds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupHealth {
    /// Failures before leaving rotation.
    pub unhealthy_threshold: u32,
    /// Successes before returning.
    pub healthy_threshold: u32,
}

/// Group circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupBreaker {
    /// Failures before opening.
    pub failure_threshold: u32,
    /// Time open before a half-open probe.
    pub reset_timeout: Duration,
}

/// One member reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupMember {
    /// Server id.
    pub id: String,
    /// Weight 1..100.
    pub weight: u32,
    /// Priority 1..100 (lower first).
    pub priority: u32,
    /// Member-level policy.
    pub tools: Option<ToolPolicy>,
}

/// A group of servers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSpec {
    /// Free text.
    pub description: Option<String>,
    /// Strategy.
    pub strategy: Strategy,
    /// Members needed for "healthy".
    pub min_healthy: u32,
    /// Start members at boot.
    pub auto_start: bool,
    /// Member thresholds.
    pub health: GroupHealth,
    /// Breaker.
    pub circuit_breaker: GroupBreaker,
    /// Group policy.
    pub tools: Option<ToolPolicy>,
    /// Members.
    pub members: Vec<GroupMember>,
}

/// One configured MCP server or group.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ServerSpec {
    /// Child process.
    Subprocess(SubprocessSpec),
    /// Remote HTTP.
    Remote(RemoteSpec),
    /// Group.
    Group(GroupSpec),
}

impl ServerSpec {
    /// Common settings (none for groups).
    pub fn common(&self) -> Option<&CommonSpec> {
        match self {
            ServerSpec::Subprocess(s) => Some(&s.common),
            ServerSpec::Remote(r) => Some(&r.common),
            ServerSpec::Group(_) => None,
        }
    }

    /// `subprocess`, `remote` or `group`.
    pub fn mode_name(&self) -> &'static str {
        match self {
            ServerSpec::Subprocess(_) => "subprocess",
            ServerSpec::Remote(_) => "remote",
            ServerSpec::Group(_) => "group",
        }
    }
}

/// `logging:`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct LoggingConfig {
    /// Level name.
    pub level: Option<String>,
    /// JSON lines.
    pub json_format: bool,
    /// Log file.
    pub file: Option<PathBuf>,
}

/// `execution:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutionConfig {
    /// Global concurrency (None = unlimited).
    pub max_concurrency: Option<u32>,
    /// Per-server default.
    pub default_mcp_server_concurrency: u32,
}

/// Topology mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolAccessMode {
    /// Upstream tools listed directly (Hangar's default).
    FrontDoor,
    /// Only management tools; upstream tools through `hangar_call`.
    Egress,
}

/// Exposed naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// `<server>__<tool>`.
    Prefixed,
    /// Upstream names where unique.
    Plain,
}

/// `tool_access:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolAccessConfig {
    /// Mode.
    pub mode: ToolAccessMode,
    /// Naming.
    pub naming: Naming,
}

/// `config_reload:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigReloadConfig {
    /// Watch the file.
    pub enabled: bool,
    /// Poll period.
    pub interval_s: u64,
    /// Use file notifications.
    pub use_watchdog: bool,
}

/// Hangar's `server:` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: String,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Deepest nesting of `[`/`{` accepted in a JSON request body (MCP and REST).
    pub max_json_depth: usize,
    /// Limit on the total size of a request's header fields (names and values).
    pub max_header_bytes: usize,
    /// Host allow-list.
    pub allowed_hosts: Vec<String>,
    /// Origin allow-list.
    pub allowed_origins: Vec<String>,
    /// Deadline of one forwarded request, and of one REST (`/api`) request.
    pub request_timeout: Duration,
    /// HTTPS at the listener (`server.tls`); `None`: plain HTTP.
    pub tls: Option<super::ServerTls>,
}

/// `auth:` — who may call `/api` and `/mcp`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct AuthConfig {
    /// Require credentials (API keys) on `/api` and `/mcp`.
    pub enabled: bool,
    /// Callers without credentials are let through as `anonymous`.
    pub allow_anonymous: bool,
    /// API keys.
    pub api_key: ApiKeyConfig,
    /// Failed-attempt lockout per source address.
    pub rate_limit: AuthLockout,
    /// Bearer JWTs from trusted issuers (`auth.jwt`, or MCP Hangar's `auth.oidc`).
    pub jwt: Option<super::JwtConfig>,
    /// Roles given in the file (`auth.role_assignments`), on top of the replicated ones.
    pub role_assignments: Vec<RoleAssignmentSpec>,
}

/// One `auth.role_assignments[]` entry: `{principal, role, scope}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleAssignmentSpec {
    /// An API key's principal id, a JWT subject, or `group:<JWT group>`.
    pub principal: String,
    /// A built-in role (custom roles are assigned through the API).
    pub role: String,
    /// `global`, `server:<id>`, `group:<id>` (requests about that server or group), or
    /// `tenant:<id>` (every request of a caller of that tenant).
    pub scope: String,
}

/// `auth.rate_limit`: failed-attempt lockout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthLockout {
    /// On (the default).
    pub enabled: bool,
    /// Failures within `window` that lock an address.
    pub max_attempts: u32,
    /// The counting window.
    pub window: Duration,
    /// First lockout (doubled for each repeated one, at most an hour).
    pub lockout: Duration,
}

impl Default for AuthLockout {
    fn default() -> Self {
        AuthLockout {
            enabled: true,
            max_attempts: 10,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
        }
    }
}

/// `auth.api_key`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyConfig {
    /// Accept API keys.
    pub enabled: bool,
    /// The header that carries one (`Authorization: Bearer mcp_…` is accepted too).
    pub header_name: String,
    /// A first admin key, from `${VAR}`: the node makes sure the cluster knows it (by its
    /// hash; the key itself is never stored, logged or replicated).
    #[serde(skip)]
    pub bootstrap_key: Option<Secret>,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig {
            enabled: true,
            header_name: "X-API-Key".to_owned(),
            bootstrap_key: None,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Servers and groups (inline group members hoisted as servers).
    pub mcp_servers: IndexMap<String, ServerSpec>,
    /// Logging.
    pub logging: LoggingConfig,
    /// Execution.
    pub execution: ExecutionConfig,
    /// Tool access.
    pub tool_access: ToolAccessConfig,
    /// Reload.
    pub config_reload: ConfigReloadConfig,
    /// Listener.
    pub server: ServerConfig,
    /// This node in the Raft cluster.
    pub cluster: ClusterConfig,
    /// Authentication of `/api` and `/mcp` callers.
    pub auth: AuthConfig,
    /// Cluster-wide rate limits from the file (`rate_limit` and `rate_limits`), replicated
    /// with the file's servers.
    pub rate_limits: Vec<hangar_raft::state::RateLimitDef>,
    /// `mcp_servers` as written, before `${VAR}` interpolation: what the cluster replicates
    /// (each node interpolates with its own environment, so secrets passed as variables
    /// never enter the replicated state).
    #[serde(skip)]
    pub raw_servers: std::collections::BTreeMap<String, Value>,
    /// SHA-256 (hex) of the file's text, when loaded from a file.
    pub file_hash: Option<String>,
}

impl Config {
    /// No servers, all defaults.
    pub fn empty() -> Config {
        let p = ProblemSink::default();
        let v = Value::Object(serde_json::Map::new());
        build(&v, &p, true)
    }
}
