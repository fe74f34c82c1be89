//! Semantic validation of a whole document: every section and every server/group, each
//! problem reported with its path; builds the typed IR of [`super::spec`].

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde_json::Value;

use super::load::check_members;
use super::reader::{Obj, ProblemSink, join, type_name};
use super::*;

/// Sections MCP Hangar knows that Hangar does not implement yet, and how a present section
/// is judged: accepted only when it does not ask for behaviour Hangar lacks.
const NOT_YET: &[(&str, &str)] = &[
    ("approvals", "approval gates"),
    ("coordination", "multi-replica coordination"),
    ("discovery", "discovery"),
    ("event_store", "a persistent event store"),
    ("hot_loading", "hot loading from a registry"),
    ("interceptors", "interceptors"),
    ("observability", "tracing export"),
    ("persistence", "persistence backends"),
    ("startup_checks", "startup checks"),
    ("truncation", "response truncation"),
];

fn check_not_yet(root: &Obj<'_>) {
    for (section, what) in NOT_YET {
        let Some(v) = root.raw(section) else { continue };
        let path = root.at(section);
        let enabled = match v {
            Value::Object(m) => match m.get("enabled") {
                Some(Value::Bool(false)) => false,
                Some(_) => true,
                None => !m.is_empty(),
            },
            _ => true,
        };
        if enabled {
            root.p.push(
                &path,
                format!(
                    "{what} (`{section}`) is not supported by this Hangar version yet; remove the section or set `{section}.enabled: false`"
                ),
            );
        }
    }
    // A boolean flag MCP Hangar accepts at top level.
    root.allow(&["relay_tasks_enabled", "retry"]);
}

pub(super) fn build(doc: &Value, p: &ProblemSink, allow_missing_servers: bool) -> Config {
    let Some(root) = Obj::new(doc, "", p) else {
        return fallback();
    };
    check_not_yet(&root);
    let logging = match root.obj("logging") {
        Some(o) => {
            let level = o.str("level");
            if let Some(l) = &level {
                let ok = [
                    "trace", "debug", "info", "warning", "warn", "error", "critical",
                ]
                .contains(&l.to_ascii_lowercase().as_str());
                if !ok {
                    p.push(
                        &o.at("level"),
                        "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
                    );
                }
            }
            let c = LoggingConfig {
                level,
                json_format: o.bool("json_format", false),
                file: o.str("file").map(PathBuf::from),
            };
            o.finish();
            c
        }
        None => LoggingConfig::default(),
    };
    let execution = match root.obj("execution") {
        Some(o) => {
            let max = o.int("max_concurrency", 50, 0, 1_000_000);
            let c = ExecutionConfig {
                max_concurrency: (max > 0).then_some(max as u32),
                default_mcp_server_concurrency: o.int(
                    "default_mcp_server_concurrency",
                    10,
                    1,
                    100_000,
                ) as u32,
            };
            o.finish();
            c
        }
        None => ExecutionConfig {
            max_concurrency: Some(50),
            default_mcp_server_concurrency: 10,
        },
    };
    let tool_access = match root.obj("tool_access") {
        Some(o) => {
            let mode = match o.str("mode").as_deref() {
                None | Some("front_door") => ToolAccessMode::FrontDoor,
                Some("egress") => {
                    p.push(
                        &o.at("mode"),
                        "`egress` (management tools only, upstream tools through hangar_call) is not supported by this Hangar version yet; use `front_door` (the default)",
                    );
                    ToolAccessMode::Egress
                }
                Some(other) => {
                    p.push(
                        &o.at("mode"),
                        format!("must be `front_door` or `egress`, got `{other}`"),
                    );
                    ToolAccessMode::FrontDoor
                }
            };
            let naming = match o.str("naming").as_deref() {
                None | Some("prefixed") => Naming::Prefixed,
                Some("plain") => Naming::Plain,
                Some(other) => {
                    p.push(
                        &o.at("naming"),
                        format!("must be `prefixed` or `plain`, got `{other}`"),
                    );
                    Naming::Prefixed
                }
            };
            o.allow(&["rules"]);
            o.finish();
            ToolAccessConfig { mode, naming }
        }
        None => ToolAccessConfig {
            mode: ToolAccessMode::FrontDoor,
            naming: Naming::Prefixed,
        },
    };
    let config_reload = match root.obj("config_reload") {
        Some(o) => {
            let c = ConfigReloadConfig {
                enabled: o.bool("enabled", true),
                interval_s: o.int("interval_s", 5, 1, 86_400),
                use_watchdog: o.bool("use_watchdog", true),
            };
            o.finish();
            c
        }
        None => ConfigReloadConfig {
            enabled: true,
            interval_s: 5,
            use_watchdog: true,
        },
    };
    let server = match root.obj("server") {
        Some(o) => {
            let listen = o.str("listen").unwrap_or_else(|| "127.0.0.1:8000".into());
            if listen.parse::<std::net::SocketAddr>().is_err() {
                p.push(
                    &o.at("listen"),
                    format!(
                        "must be HOST:PORT with an IP address, e.g. 127.0.0.1:8000 (got `{listen}`)"
                    ),
                );
            }
            let c = ServerConfig {
                listen,
                max_body_bytes: o.int("max_body_bytes", 4 * 1024 * 1024, 1024, 1 << 30) as usize,
                max_json_depth: o.int("max_json_depth", DEFAULT_JSON_DEPTH as u64, 2, 10_000)
                    as usize,
                max_header_bytes: o.int(
                    "max_header_bytes",
                    DEFAULT_HEADER_BYTES as u64,
                    1024,
                    256 * 1024,
                ) as usize,
                allowed_hosts: o.str_list("allowed_hosts").unwrap_or_else(default_hosts),
                allowed_origins: o.str_list("allowed_origins").unwrap_or_default(),
                request_timeout: Duration::from_secs_f64(o.num(
                    "request_timeout_s",
                    60.0,
                    0.1,
                    86_400.0,
                )),
                tls: o.obj("tls").map(|t| super::server_tls::parse(&t, p)),
            };
            o.finish();
            c
        }
        None => default_server(),
    };
    let mut servers = IndexMap::new();
    match root.raw("mcp_servers") {
        None if !allow_missing_servers && !root.has("mcp_servers") => {
            p.push(
                "mcp_servers",
                "is required (a mapping of server ids to definitions; `{}` for none)",
            );
        }
        None => {}
        Some(Value::Object(map)) => {
            let path = "mcp_servers";
            // First pass: servers; second pass: groups (inline members are hoisted).
            let mut groups = Vec::new();
            for (id, v) in map {
                let sp = join(path, id);
                check_id(id, &sp, p);
                let mode = v
                    .get("mode")
                    .and_then(Value::as_str)
                    .unwrap_or("subprocess");
                if mode == "group" {
                    groups.push((id.clone(), v));
                    continue;
                }
                if let Some(spec) = server_spec(v, &sp, p) {
                    expand_replicas(id, spec, &sp, &mut servers, p);
                }
            }
            for (id, v) in groups {
                let sp = join(path, &id);
                let mut inline = IndexMap::new();
                let g = group_spec(v, &sp, p, &|m| servers.contains_key(m), &mut inline);
                servers.extend(inline);
                if let Some(g) = g {
                    servers.insert(id, ServerSpec::Group(g));
                }
            }
            for (gid, spec) in &servers {
                if let ServerSpec::Group(g) = spec {
                    check_members(gid, g, &|m| servers.get(m), p);
                }
            }
        }
        Some(other) => p.push(
            "mcp_servers",
            format!("must be a mapping of server ids, got {}", type_name(other)),
        ),
    }
    let cluster = match root.obj("cluster") {
        Some(o) => cluster::parse(&o, p),
        None => ClusterConfig::default(),
    };
    let auth = root.obj("auth").map(|o| auth(&o)).unwrap_or_default();
    let rate_limits = rate_limits(&root, p);
    root.finish();
    Config {
        mcp_servers: servers,
        logging,
        execution,
        tool_access,
        config_reload,
        server,
        cluster,
        auth,
        rate_limits,
        raw_servers: Default::default(),
        file_hash: None,
    }
}

/// The top-level `rate_limit` (MCP Hangar's command limiter, here cluster-wide: one bucket per
/// command kind) and the `rate_limits` rules on tool calls, as replicated definitions.
fn rate_limits(root: &Obj<'_>, p: &ProblemSink) -> Vec<hangar_raft::state::RateLimitDef> {
    use hangar_raft::state::RateLimitDef;
    let mut out = Vec::new();
    if let Some(o) = root.obj("rate_limit") {
        let enabled = o.bool("enabled", true);
        let rps = o.num("rps", 10.0, 0.001, 1e9);
        let burst = o.int("burst", 20, 1, 1_000_000_000);
        o.finish();
        if enabled {
            out.push(RateLimitDef {
                id: "rate_limit".into(),
                source: "file".into(),
                applies_to: "commands".into(),
                key: vec!["command".into()],
                matches: Default::default(),
                rps,
                burst,
                on_partition: "safe_share".into(),
            });
        }
    }
    let Some(list) = root.raw("rate_limits") else {
        return out;
    };
    let Value::Array(items) = list else {
        p.push(
            "rate_limits",
            format!(
                "must be a list of rules ({{id, rps, burst, key, match, on_partition}}), got {}",
                type_name(list)
            ),
        );
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("rate_limits[{i}]");
        let Some(o) = Obj::new(item, &path, p) else {
            continue;
        };
        let Some(id) = o.req_str("id", "a rule id") else {
            o.finish();
            continue;
        };
        let rps = o.num("rps", 0.0, 0.0, 1e9);
        if !o.has("rps") {
            p.push(&o.at("rps"), "is required: calls per second, cluster-wide");
        }
        let burst = o.int("burst", rps.ceil().max(1.0) as u64, 1, 1_000_000_000);
        let key = o.str_list("key").unwrap_or_default();
        let matches = o.str_map("match").into_iter().collect();
        let on_partition = o.str("on_partition").unwrap_or_else(|| "safe_share".into());
        o.finish();
        let def = RateLimitDef {
            id,
            source: "file".into(),
            applies_to: "tools".into(),
            key,
            matches,
            rps,
            burst,
            on_partition,
        };
        if out.iter().any(|d| d.id == def.id) {
            p.push(&o.at("id"), format!("rule id {:?} is used twice", def.id));
        } else if def.id == "rate_limit" {
            p.push(
                &o.at("id"),
                "`rate_limit` is the id of the top-level command limiter; choose another id",
            );
        } else if let Some(problem) = def.problem() {
            p.push(&path, problem);
        } else {
            out.push(def);
        }
    }
    out
}

fn default_hosts() -> Vec<String> {
    vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        "[::1]".into(),
    ]
}

/// `server.max_json_depth` when not set.
const DEFAULT_JSON_DEPTH: usize = 64;
/// `server.max_header_bytes` when not set (16 KiB, HTTP/2's default header list size).
const DEFAULT_HEADER_BYTES: usize = 16 * 1024;

fn default_server() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:8000".into(),
        max_body_bytes: 4 * 1024 * 1024,
        max_json_depth: DEFAULT_JSON_DEPTH,
        max_header_bytes: DEFAULT_HEADER_BYTES,
        allowed_hosts: default_hosts(),
        allowed_origins: Vec::new(),
        request_timeout: Duration::from_secs(60),
        tls: None,
    }
}

fn fallback() -> Config {
    Config {
        mcp_servers: IndexMap::new(),
        logging: LoggingConfig::default(),
        execution: ExecutionConfig {
            max_concurrency: Some(50),
            default_mcp_server_concurrency: 10,
        },
        tool_access: ToolAccessConfig {
            mode: ToolAccessMode::FrontDoor,
            naming: Naming::Prefixed,
        },
        config_reload: ConfigReloadConfig {
            enabled: true,
            interval_s: 5,
            use_watchdog: true,
        },
        server: default_server(),
        cluster: ClusterConfig::default(),
        auth: AuthConfig::default(),
        rate_limits: Vec::new(),
        raw_servers: Default::default(),
        file_hash: None,
    }
}

/// Insert server `id`; a server with `replicas: N` (N ≥ 2) becomes a round-robin group `id`
/// of N single-instance members `id.1` … `id.N` (ids with a `.`, which no configured server
/// can have), which the leader spreads over different nodes like any group's members.
fn expand_replicas(
    id: &str,
    spec: ServerSpec,
    path: &str,
    servers: &mut IndexMap<String, ServerSpec>,
    p: &ProblemSink,
) {
    let ServerSpec::Subprocess(s) = &spec else {
        servers.insert(id.to_owned(), spec);
        return;
    };
    let Replicas::Count(n) = s.placement.replicas else {
        servers.insert(id.to_owned(), spec);
        return;
    };
    if !s.placement.nodes.is_empty() && s.placement.nodes.len() < n as usize {
        p.push(
            &format!("{path}.placement"),
            format!(
                "replicas: {n} needs at least {n} allowed nodes, but placement.nodes lists {}",
                s.placement.nodes.len()
            ),
        );
    }
    let mut member = s.clone();
    member.placement.replicas = Replicas::One;
    let members: Vec<GroupMember> = (1..=n)
        .map(|k| {
            let mid = format!("{id}.{k}");
            servers.insert(mid.clone(), ServerSpec::Subprocess(member.clone()));
            GroupMember {
                id: mid,
                weight: 1,
                priority: 1,
                tools: None,
            }
        })
        .collect();
    servers.insert(
        id.to_owned(),
        ServerSpec::Group(GroupSpec {
            description: s.common.description.clone(),
            strategy: Strategy::RoundRobin,
            min_healthy: 1,
            auto_start: s.common.auto_start,
            health: GroupHealth {
                unhealthy_threshold: 2,
                healthy_threshold: 1,
            },
            circuit_breaker: GroupBreaker {
                failure_threshold: 10,
                reset_timeout: Duration::from_secs(60),
            },
            tools: None,
            members,
        }),
    );
}

pub(super) fn check_id(id: &str, path: &str, p: &ProblemSink) {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        p.push(
            path,
            "server ids must be 1-64 characters of letters, digits, `_` and `-`",
        );
    } else if id.contains("__") {
        p.push(
            path,
            "server ids must not contain `__` (it separates server and tool in exposed tool names)",
        );
    }
}

const SERVER_KEYS: &[&str] = &[
    "mode",
    "command",
    "args",
    "env",
    "cwd",
    "endpoint",
    "http",
    "auth",
    "tls",
    "idle_ttl_s",
    "health_check_interval_s",
    "max_consecutive_failures",
    "max_concurrency",
    "description",
    "auto_start",
    "tools",
    "idempotent_tools",
    "access",
    "tool_access",
    "capabilities",
    "tool_projection",
    "transport",
    "placement",
];

fn common(o: &Obj<'_>) -> CommonSpec {
    for k in ["access", "tool_access", "capabilities", "tool_projection"] {
        if let Some(v) = o.map_raw(k)
            && !v.is_object()
        {
            o.p.push(&o.at(k), format!("must be a mapping, got {}", type_name(v)));
        }
    }
    o.allow(&["transport"]);
    CommonSpec {
        description: o.str("description"),
        idle_ttl_s: o.int("idle_ttl_s", 300, 1, 86_400),
        health_check_interval_s: o.int("health_check_interval_s", 60, 1, 86_400),
        max_consecutive_failures: o.int("max_consecutive_failures", 3, 1, 1000) as u32,
        max_concurrency: o
            .has("max_concurrency")
            .then(|| o.int("max_concurrency", 10, 1, 100_000) as u32),
        auto_start: o.bool("auto_start", false),
        tools: tools_spec(o),
        idempotent_tools: o.str_list("idempotent_tools").unwrap_or_default(),
    }
}

impl Obj<'_> {
    fn map_raw(&self, key: &'static str) -> Option<&Value> {
        self.raw(key)
    }
}

fn tools_spec(o: &Obj<'_>) -> Option<ToolsSpec> {
    let v = o.raw("tools")?;
    let path = o.at("tools");
    match v {
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let ip = format!("{path}[{i}]");
                let Some(t) = Obj::new(it, &ip, o.p) else {
                    continue;
                };
                let name = t.req_str("name", "the tool name");
                let input = t
                    .raw("inputSchema")
                    .or_else(|| t.raw("input_schema"))
                    .cloned();
                let output = t
                    .raw("outputSchema")
                    .or_else(|| t.raw("output_schema"))
                    .cloned();
                t.allow(&[
                    "inputSchema",
                    "input_schema",
                    "outputSchema",
                    "output_schema",
                ]);
                let desc = t.str("description");
                t.finish();
                if let Some(name) = name {
                    out.push(PredefinedTool {
                        name,
                        description: desc,
                        input_schema: input
                            .unwrap_or_else(|| serde_json::json!({"type": "object"})),
                        output_schema: output,
                    });
                }
            }
            Some(ToolsSpec::Predefined(out))
        }
        Value::Object(_) => policy(v, &path, o.p).map(ToolsSpec::Policy),
        other => {
            o.p.push(
                &path,
                format!(
                    "must be a list of tools or a policy mapping, got {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

fn policy(v: &Value, path: &str, p: &ProblemSink) -> Option<ToolPolicy> {
    let o = Obj::new(v, path, p)?;
    let pol = ToolPolicy {
        allow_list: o.str_list("allow_list").unwrap_or_default(),
        deny_list: o.str_list("deny_list").unwrap_or_default(),
        approval_list: o.str_list("approval_list").unwrap_or_default(),
        approval_timeout_seconds: o.int("approval_timeout_seconds", 300, 1, 86_400),
        approval_channel: o.str("approval_channel"),
    };
    if !pol.approval_list.is_empty() {
        p.push(
            &o.at("approval_list"),
            "approval gates are not supported by this Hangar version yet; remove approval_list",
        );
    }
    o.finish();
    Some(pol)
}

pub(super) fn server_spec(v: &Value, path: &str, p: &ProblemSink) -> Option<ServerSpec> {
    let o = Obj::new(v, path, p)?;
    let mode = o.str("mode").unwrap_or_else(|| "subprocess".into());
    let spec = match mode.as_str() {
        "subprocess" => {
            let mut command = o.str_list("command").unwrap_or_default();
            if command.is_empty() && !o.has("command") {
                p.push(&o.at("command"), "is required for mode `subprocess` (the program and its arguments, e.g. [python3, -m, my_server])");
            } else if command.is_empty() {
                p.push(&o.at("command"), "must not be empty");
            } else if command[0].trim().is_empty() {
                p.push(
                    &o.at("command"),
                    "the program (first element) must not be empty",
                );
            }
            command.extend(o.str_list("args").unwrap_or_default());
            let env = o.str_map("env");
            let cwd = o.str("cwd").map(PathBuf::from);
            let c = common(&o);
            let placement = placement(&o);
            for k in ["endpoint", "http", "auth", "tls"] {
                if o.has(k) {
                    p.push(&o.at(k), format!("`{k}` applies to mode `remote` only"));
                }
            }
            o.allow(&["endpoint", "http", "auth", "tls"]);
            Some(ServerSpec::Subprocess(SubprocessSpec {
                common: c,
                command,
                env,
                cwd,
                placement,
            }))
        }
        "remote" => {
            let endpoint = o.req_str(
                "endpoint",
                "the MCP endpoint URL, e.g. http://127.0.0.1:8080/mcp",
            );
            if let Some(e) = &endpoint {
                check_url(e, &o.at("endpoint"), p);
            }
            let http = match o.obj("http") {
                Some(h) => {
                    let c = HttpSpec {
                        connect_timeout: Duration::from_secs_f64(h.num(
                            "connect_timeout",
                            10.0,
                            0.01,
                            3600.0,
                        )),
                        read_timeout: Duration::from_secs_f64(h.num(
                            "read_timeout",
                            30.0,
                            0.01,
                            86_400.0,
                        )),
                        max_retries: h.int("max_retries", 3, 0, 100) as u32,
                        retry_backoff_factor: h.num("retry_backoff_factor", 0.5, 0.0, 60.0),
                        headers: h.str_map("headers"),
                    };
                    h.finish();
                    c
                }
                None => HttpSpec {
                    connect_timeout: Duration::from_secs(10),
                    read_timeout: Duration::from_secs(30),
                    max_retries: 3,
                    retry_backoff_factor: 0.5,
                    headers: IndexMap::new(),
                },
            };
            let auth = match o.obj("auth") {
                Some(a) => {
                    let t = a.str("type").unwrap_or_else(|| "none".into());
                    let r = match t.as_str() {
                        "none" => RemoteAuth::None,
                        "api_key" => RemoteAuth::ApiKey {
                            header: a
                                .str("api_key_header")
                                .unwrap_or_else(|| "X-API-Key".into()),
                            key: Secret::new(
                                a.req_str("api_key", "the key for auth.type api_key")
                                    .unwrap_or_default(),
                            ),
                        },
                        "bearer" => RemoteAuth::Bearer {
                            token: Secret::new(
                                a.req_str("bearer_token", "the token for auth.type bearer")
                                    .unwrap_or_default(),
                            ),
                        },
                        "basic" => RemoteAuth::Basic {
                            username: a
                                .req_str("username", "the user for auth.type basic")
                                .unwrap_or_default(),
                            password: Secret::new(
                                a.req_str("password", "the password for auth.type basic")
                                    .unwrap_or_default(),
                            ),
                        },
                        other => {
                            p.push(
                                &a.at("type"),
                                format!("must be none, api_key, bearer or basic (got `{other}`)"),
                            );
                            RemoteAuth::None
                        }
                    };
                    a.allow(&[
                        "api_key",
                        "api_key_header",
                        "bearer_token",
                        "username",
                        "password",
                    ]);
                    a.finish();
                    r
                }
                None => RemoteAuth::None,
            };
            let tls = match o.obj("tls") {
                Some(t) => {
                    let c = TlsSpec {
                        verify_ssl: t.bool("verify_ssl", true),
                        ca_cert_path: t.str("ca_cert_path").map(PathBuf::from),
                    };
                    t.finish();
                    c
                }
                None => TlsSpec {
                    verify_ssl: true,
                    ca_cert_path: None,
                },
            };
            let c = common(&o);
            for k in ["command", "args", "env", "cwd"] {
                if o.has(k) {
                    p.push(&o.at(k), format!("`{k}` applies to mode `subprocess` only"));
                }
            }
            o.allow(&["command", "args", "env", "cwd"]);
            endpoint.map(|endpoint| {
                ServerSpec::Remote(RemoteSpec {
                    common: c,
                    endpoint,
                    http,
                    auth,
                    tls,
                })
            })
        }
        "docker" | "container" | "podman" => {
            p.push(
                &o.at("mode"),
                format!(
                    "mode `{mode}` is not yet supported by Hangar; use `subprocess` or `remote`"
                ),
            );
            o.allow(&[
                "image",
                "build",
                "volumes",
                "network",
                "network_mode",
                "read_only",
                "resources",
                "user",
            ]);
            o.allow(SERVER_KEYS);
            None
        }
        other => {
            p.push(
                &o.at("mode"),
                format!("must be subprocess, remote or group (got `{other}`)"),
            );
            o.allow(SERVER_KEYS);
            None
        }
    };
    o.finish();
    spec
}

/// `auth.role_assignments`: `[{principal, role, scope}]` (MCP Hangar's shape; `scope`
/// defaults to `global`).
fn role_assignments(o: &Obj<'_>) -> Vec<RoleAssignmentSpec> {
    let Some(v) = o.raw("role_assignments") else {
        return Vec::new();
    };
    let Value::Array(items) = v else {
        o.p.push(
            &o.at("role_assignments"),
            format!(
                "must be a list of {{principal, role, scope}} entries, got {}",
                type_name(v)
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", o.at("role_assignments"));
        let Some(a) = Obj::new(item, &path, o.p) else {
            continue;
        };
        let principal = a.req_str(
            "principal",
            "the API key principal id, JWT subject or group:<name>",
        );
        let role = a.req_str("role", "a built-in role");
        let scope = a.str("scope").unwrap_or_else(|| "global".to_owned());
        a.finish();
        if let Some(r) = &role
            && !crate::auth::rbac::BUILTIN_ROLES.iter().any(|(n, _)| n == r)
        {
            let known: Vec<&str> = crate::auth::rbac::BUILTIN_ROLES
                .iter()
                .map(|(n, _)| *n)
                .collect();
            o.p.push(
                &format!("{path}.role"),
                format!(
                    "unknown role `{r}`: the file assigns built-in roles ({}); assign custom roles through POST /api/auth/roles/assign",
                    known.join(", ")
                ),
            );
            continue;
        }
        let scope_ok = match scope.strip_prefix("tenant:") {
            Some(t) => !t.is_empty() && t.len() <= 128 && !t.contains(char::is_whitespace),
            None => hangar_raft::state::RoleScope::parse(&scope).is_ok(),
        };
        if !scope_ok {
            o.p.push(
                &format!("{path}.scope"),
                format!(
                    "`{scope}` is not a scope: use global, server:<id>, group:<id> or tenant:<id>"
                ),
            );
            continue;
        }
        if let (Some(principal), Some(role)) = (principal, role) {
            out.push(RoleAssignmentSpec {
                principal,
                role,
                scope,
            });
        }
    }
    out
}

/// `auth:`: API keys, bearer JWTs (`jwt`, or MCP Hangar's `oidc`: see [`super::jwt`]), role
/// assignments and the failed-attempt lockout; OPA is refused with a clear error.
fn auth(o: &Obj<'_>) -> AuthConfig {
    if o.has("opa") {
        o.p.push(
            &o.at("opa"),
            "OPA authorization is not supported by this Hangar version; remove `opa` (roles: auth.role_assignments or the API; tool policies: tool_access)",
        );
    }
    let role_assignments = role_assignments(o);
    // Keys live in the cluster's replicated state whatever MCP Hangar's `storage` says.
    o.allow(&["opa", "role_assignments", "storage"]);
    if o.has("jwt") && o.has("oidc") {
        o.p.push(
            &o.at("oidc"),
            "auth.jwt is set too: they are the same setting (oidc is MCP Hangar's name); keep one",
        );
    }
    let jwt = o
        .obj("jwt")
        .and_then(|j| super::jwt::parse(&j, super::jwt::Section::Jwt));
    let oidc = o
        .obj("oidc")
        .and_then(|j| super::jwt::parse(&j, super::jwt::Section::Oidc));
    let rate_limit = match o.obj("rate_limit") {
        Some(r) => {
            let d = AuthLockout::default();
            let c = AuthLockout {
                enabled: r.bool("enabled", d.enabled),
                max_attempts: r.int("max_attempts", u64::from(d.max_attempts), 1, 1_000_000) as u32,
                window: Duration::from_secs(r.int("window_seconds", d.window.as_secs(), 1, 86_400)),
                lockout: Duration::from_secs(r.int(
                    "lockout_seconds",
                    d.lockout.as_secs(),
                    1,
                    3600,
                )),
            };
            r.finish();
            c
        }
        None => AuthLockout::default(),
    };
    let api_key = match o.obj("api_key") {
        Some(k) => {
            let d = ApiKeyConfig::default();
            let header_name = k.str("header_name").unwrap_or(d.header_name);
            if axum::http::HeaderName::from_bytes(header_name.as_bytes()).is_err() {
                k.p.push(
                    &k.at("header_name"),
                    format!("`{header_name}` is not a valid HTTP header name"),
                );
            }
            let bootstrap_key = k.str("bootstrap_key").map(Secret::new);
            if let Some(key) = bootstrap_key.as_ref().map(Secret::expose)
                && (!key.starts_with("mcp_") || key.len() < 36 || key.len() > 256)
            {
                k.p.push(
                    &k.at("bootstrap_key"),
                    "must be an API key: `mcp_` followed by at least 32 random characters (pass it as ${VAR}, e.g. HANGAR_BOOTSTRAP_KEY=mcp_$(openssl rand -hex 32))",
                );
            }
            let c = ApiKeyConfig {
                enabled: k.bool("enabled", d.enabled),
                header_name,
                bootstrap_key,
            };
            k.finish();
            c
        }
        None => ApiKeyConfig::default(),
    };
    let c = AuthConfig {
        enabled: o.bool("enabled", false),
        allow_anonymous: o.bool("allow_anonymous", false),
        api_key,
        rate_limit,
        jwt: jwt.or(oidc),
        role_assignments,
    };
    if c.enabled && !c.api_key.enabled && c.jwt.is_none() && !c.allow_anonymous {
        o.p.push(
            &o.path_str(),
            "auth is enabled but no authenticator is: enable auth.api_key or auth.jwt, or allow_anonymous",
        );
    }
    o.finish();
    c
}

/// Most replicas of one server.
const MAX_REPLICAS: u64 = 64;

/// `placement: {replicas: 1 | N | all, nodes: [ids]}` of a local-mode server.
fn placement(o: &Obj<'_>) -> PlacementSpec {
    let Some(pl) = o.obj("placement") else {
        return PlacementSpec::default();
    };
    let replicas = match pl.raw("replicas") {
        None => Replicas::One,
        Some(Value::String(s)) if s == "all" => Replicas::All,
        Some(v) => match v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        {
            Some(1) => Replicas::One,
            Some(n) if (2..=MAX_REPLICAS).contains(&n) => Replicas::Count(n as u32),
            _ => {
                pl.p.push(
                    &pl.at("replicas"),
                    format!(
                        "must be 1 (one instance cluster-wide, the default), a count from 2 to {MAX_REPLICAS} (that many interchangeable instances on different nodes) or `all` (one on every node); got {v}"
                    ),
                );
                Replicas::One
            }
        },
    };
    let mut nodes = Vec::new();
    match pl.raw("nodes") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, it) in items.iter().enumerate() {
                match it
                    .as_u64()
                    .or_else(|| it.as_str().and_then(|s| s.parse().ok()))
                {
                    Some(n) if n > 0 => nodes.push(n),
                    _ => pl.p.push(
                        &format!("{}[{i}]", pl.at("nodes")),
                        format!("must be a node id (a positive integer), got {it}"),
                    ),
                }
            }
        }
        Some(other) => pl.p.push(
            &pl.at("nodes"),
            format!("must be a list of node ids, got {}", type_name(other)),
        ),
    }
    let labels = labels(pl.raw("labels"), &pl.at("labels"), pl.p);
    pl.finish();
    PlacementSpec {
        replicas,
        nodes,
        labels,
    }
}

/// A `{key: value}` map of node labels (`cluster.labels`, `placement.labels`): keys and
/// values are non-empty strings (numbers and booleans are taken as text).
pub(super) fn labels(
    v: Option<&Value>,
    path: &str,
    p: &ProblemSink,
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    match v {
        None => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let text = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                };
                match text {
                    Some(t) if !k.is_empty() && !t.is_empty() => {
                        out.insert(k.clone(), t);
                    }
                    _ => p.push(
                        &join(path, k),
                        format!("a label must be a non-empty text value, got {v}"),
                    ),
                }
            }
        }
        Some(other) => p.push(
            path,
            format!(
                "must be a mapping of label names to values, e.g. {{zone: eu-1}}; got {}",
                type_name(other)
            ),
        ),
    }
    out
}

fn check_url(u: &str, path: &str, p: &ProblemSink) {
    let ok = (u.starts_with("http://") || u.starts_with("https://"))
        && u.split("://").nth(1).is_some_and(|rest| {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !host.starts_with(':')
        });
    if !ok {
        p.push(
            path,
            format!("must be an http:// or https:// URL with a host (got `{u}`)"),
        );
    }
}

/// A group definition; members defined inline (with `mode` and `command`/`endpoint`) are
/// added to `inline`, `defined` tells which ids are defined already (they must be referenced
/// by id only).
pub(super) fn group_spec(
    v: &Value,
    path: &str,
    p: &ProblemSink,
    defined: &dyn Fn(&str) -> bool,
    inline: &mut IndexMap<String, ServerSpec>,
) -> Option<GroupSpec> {
    let o = Obj::new(v, path, p)?;
    o.allow(&["mode", "canary", "access"]);
    let strategy = match o.str("strategy").as_deref() {
        None | Some("round_robin") => Strategy::RoundRobin,
        Some("weighted_round_robin") => Strategy::WeightedRoundRobin,
        Some("least_connections") => Strategy::LeastConnections,
        Some("random") => Strategy::Random,
        Some("priority") => Strategy::Priority,
        Some(other) => {
            p.push(
                &o.at("strategy"),
                format!("must be round_robin, weighted_round_robin, least_connections, random or priority (got `{other}`)"),
            );
            Strategy::RoundRobin
        }
    };
    let health = match o.obj("health") {
        Some(h) => {
            let c = GroupHealth {
                unhealthy_threshold: h.int("unhealthy_threshold", 2, 1, 1000) as u32,
                healthy_threshold: h.int("healthy_threshold", 1, 1, 1000) as u32,
            };
            h.finish();
            c
        }
        None => GroupHealth {
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        },
    };
    let circuit_breaker = match o.obj("circuit_breaker") {
        Some(b) => {
            let c = GroupBreaker {
                failure_threshold: b.int("failure_threshold", 10, 1, 100_000) as u32,
                reset_timeout: Duration::from_secs_f64(b.num(
                    "reset_timeout_s",
                    60.0,
                    1.0,
                    86_400.0,
                )),
            };
            b.finish();
            c
        }
        None => GroupBreaker {
            failure_threshold: 10,
            reset_timeout: Duration::from_secs(60),
        },
    };
    let tools = o.raw("tools").and_then(|t| policy(t, &o.at("tools"), p));
    let mut members = Vec::new();
    let mut seen = std::collections::HashSet::new();
    match o.raw("members") {
        Some(Value::Array(items)) => {
            for (i, it) in items.iter().enumerate() {
                let mp = format!("{}[{i}]", o.at("members"));
                let Some(m) = Obj::new(it, &mp, p) else {
                    continue;
                };
                let Some(id) = m.req_str("id", "the member's server id") else {
                    m.allow(SERVER_KEYS);
                    m.allow(&["weight", "priority"]);
                    continue;
                };
                if !seen.insert(id.clone()) {
                    p.push(&m.at("id"), format!("member `{id}` is listed twice"));
                }
                let weight = m.int("weight", 1, 1, 100) as u32;
                let priority = m.int("priority", 1, 1, 100) as u32;
                let mtools = m
                    .raw("tools")
                    .filter(|t| t.is_object())
                    .and_then(|t| policy(t, &m.at("tools"), p));
                let is_inline = SERVER_KEYS.iter().any(|k| *k != "tools" && m.has(k));
                if is_inline {
                    if defined(&id) || inline.contains_key(&id) {
                        p.push(
                            &mp,
                            format!("member `{id}` is already defined under mcp_servers; reference it by id only"),
                        );
                    } else {
                        let mut mv = it.clone();
                        if let Value::Object(mm) = &mut mv {
                            mm.remove("id");
                            mm.remove("weight");
                            mm.remove("priority");
                            if mm.get("tools").is_some_and(Value::is_object) {
                                mm.remove("tools");
                            }
                        }
                        check_id(&id, &m.at("id"), p);
                        if let Some(spec) = server_spec(&mv, &mp, p) {
                            inline.insert(id.clone(), spec);
                        }
                    }
                }
                m.allow(SERVER_KEYS);
                m.finish();
                members.push(GroupMember {
                    id,
                    weight,
                    priority,
                    tools: mtools,
                });
            }
        }
        None => p.push(
            &o.at("members"),
            "is required for a group (a list of {id: <server>})",
        ),
        Some(other) => p.push(
            &o.at("members"),
            format!("must be a list, got {}", type_name(other)),
        ),
    }
    let min_healthy = o.int("min_healthy", 1, 1, 10_000) as u32;
    if !members.is_empty() && min_healthy as usize > members.len() {
        p.push(
            &o.at("min_healthy"),
            format!(
                "is {min_healthy} but the group has only {} member(s)",
                members.len()
            ),
        );
    }
    let g = GroupSpec {
        description: o.str("description"),
        strategy,
        min_healthy,
        auto_start: o.bool("auto_start", true),
        health,
        circuit_breaker,
        tools,
        members,
    };
    o.finish();
    Some(g)
}
