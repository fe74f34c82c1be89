//! The replicated data model: one [`Command`] enum, one [`State`] struct and the pure
//! [`apply`] function. This is the only place that defines what the cluster agrees on.
//!
//! `apply` is deterministic: it depends only on the state, the command and the [`ApplyCtx`]
//! (log index, term and the leader's timestamp stored in the log entry), never on the local
//! clock or I/O, so every replica and every replay computes the same state.

mod command;
mod events;
mod model;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::collections::BTreeSet;

pub use command::Command;
pub use command::RejectCode;
pub use command::Response;
pub use events::DEFAULT_EVENT_MAX_AGE_MS;
pub use events::DEFAULT_EVENT_MAX_COUNT;
pub use events::EventLog;
pub use model::ApiKeyRecord;
pub use model::CatalogEntry;
pub use model::ConfigSource;
pub use model::ConfigSourceKind;
pub use model::EventRecord;
pub use model::InstanceState;
pub use model::InstanceStatus;
pub use model::NodeRecord;
pub use model::Placement;
pub use model::RateLimitDef;
pub use model::RoleDef;
pub use model::RoleScope;
pub use model::ServerRecord;
pub use model::StoredEvent;
pub use model::ToolPolicy;
pub use model::UnknownConfigSource;
use serde::Deserialize;
use serde::Serialize;
use sha2::Digest;
use sha2::Sha256;

/// Context of one applied log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyCtx {
    /// Raft log index of the entry.
    pub log_index: u64,
    /// Term of the leader that wrote the entry.
    pub term: u64,
    /// The leader's wall clock when it accepted the command (ms since the Unix epoch).
    pub now_ms: u64,
}

/// Everything the cluster agrees on (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct State {
    /// Desired specs of servers and groups by id.
    pub servers: BTreeMap<String, ServerRecord>,
    /// Cluster config version; bumped by every change to `servers`.
    pub config_version: u64,
    /// SHA-256 of the config file last applied with `SetDesiredConfig { source: file }`.
    pub config_file_hash: Option<String>,
    /// Learned tools/prompts/resources by server id.
    pub catalog: BTreeMap<String, CatalogEntry>,
    /// Instance id → placement.
    pub placements: BTreeMap<String, Placement>,
    /// Highest term seen in a placement command (the fence).
    pub placement_term: u64,
    /// Instance id → last reported status.
    pub status: BTreeMap<String, InstanceStatus>,
    /// API keys by id.
    pub keys: BTreeMap<String, ApiKeyRecord>,
    /// Bumped by every applied change to keys, roles or role assignments (what the nodes'
    /// authentication caches are valid for).
    #[serde(default)]
    pub auth_version: u64,
    /// Roles by name.
    pub roles: BTreeMap<String, RoleDef>,
    /// Principal → role names (global assignments).
    pub role_assignments: BTreeMap<String, BTreeSet<String>>,
    /// Principal → scope (`server:<id>`, `group:<id>`) → role names held only there.
    #[serde(default)]
    pub scoped_role_assignments: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Tool access policies by `<scope>:<target>`.
    pub policies: BTreeMap<String, ToolPolicy>,
    /// Rate-limit definitions by id.
    pub limits: BTreeMap<String, RateLimitDef>,
    /// The domain event log.
    pub events: EventLog,
    /// Node id → addresses.
    pub nodes: BTreeMap<u64, NodeRecord>,
    /// Apply clock: the highest `now_ms` seen (monotonic even if leader clocks differ).
    pub clock_ms: u64,
}

impl State {
    /// Events with `seq > after`, oldest first, at most `limit` (see [`EventLog::since`]).
    pub fn events_since(&self, after: u64, limit: usize) -> Vec<StoredEvent> {
        self.events.since(after, limit)
    }

    /// The API key whose secret hashes to `sha256_hex`, if any (revoked/expired ones included).
    pub fn key_by_hash(&self, sha256_hex: &str) -> Option<&ApiKeyRecord> {
        self.keys.values().find(|k| k.sha256_hex == sha256_hex)
    }

    /// The tool policy for `scope`/`target`.
    pub fn policy(&self, scope: &str, target: &str) -> Option<&ToolPolicy> {
        self.policies.get(&ToolPolicy::key(scope, target))
    }
}

/// Apply one command to the state. Pure and deterministic; refusals are
/// [`Response::Rejected`] values and leave the state unchanged.
pub fn apply(state: &mut State, cmd: &Command, ctx: ApplyCtx) -> Response {
    let auth = matches!(
        cmd,
        Command::CreateApiKey { .. }
            | Command::RevokeApiKey { .. }
            | Command::PutRole { .. }
            | Command::DeleteRole { .. }
            | Command::AssignRole { .. }
            | Command::UnassignRole { .. }
    );
    let r = apply_command(state, cmd, ctx);
    if auth && !matches!(r, Response::Rejected { .. }) {
        state.auth_version += 1;
    }
    r
}

fn apply_command(state: &mut State, cmd: &Command, ctx: ApplyCtx) -> Response {
    state.clock_ms = state.clock_ms.max(ctx.now_ms);
    let now = state.clock_ms;
    match cmd {
        Command::SetDesiredConfig {
            servers,
            source,
            file_hash,
        } => set_desired_config(state, servers, *source, file_hash.as_deref(), now),
        Command::PutServer {
            id,
            spec,
            source,
            file_hash,
            create_only,
            if_version,
        } => put_server(
            state,
            PutServer {
                id,
                spec,
                kind: *source,
                file_hash: file_hash.as_deref(),
                create_only: *create_only,
                if_version: *if_version,
            },
            now,
        ),
        Command::DeleteServer { id } => {
            if state.servers.remove(id).is_none() {
                return Response::rejected(
                    RejectCode::ServerNotFound,
                    format!("server {id:?} is not defined; list servers to see the defined ids"),
                );
            }
            state.catalog.remove(id);
            state.config_version += 1;
            Response::ServerChanged {
                config_version: state.config_version,
            }
        }
        Command::PutCatalog {
            server_id,
            tools,
            prompts,
            resources,
            resource_templates,
        } => put_catalog(
            state,
            server_id,
            [tools, prompts, resources, resource_templates],
            now,
        ),
        Command::DeleteCatalog { server_id } => match state.catalog.remove(server_id) {
            Some(_) => Response::Ok,
            None => Response::rejected(
                RejectCode::NotFound,
                format!("no catalogue stored for {server_id:?}"),
            ),
        },
        Command::SetPlacement {
            instance_id,
            node_id,
            term,
        } => {
            if let Some(r) = check_fence(state, *term, ctx) {
                return r;
            }
            if instance_id.is_empty() {
                return Response::rejected(
                    RejectCode::InvalidArgument,
                    "instance_id must not be empty",
                );
            }
            state.placement_term = *term;
            state.placements.insert(
                instance_id.clone(),
                Placement {
                    node_id: *node_id,
                    term: *term,
                },
            );
            Response::Ok
        }
        Command::RemovePlacement { instance_id, term } => {
            if let Some(r) = check_fence(state, *term, ctx) {
                return r;
            }
            state.placement_term = *term;
            match state.placements.remove(instance_id) {
                Some(_) => Response::Ok,
                None => Response::rejected(
                    RejectCode::NotFound,
                    format!("instance {instance_id:?} is not placed"),
                ),
            }
        }
        Command::ReportStatus {
            instance_id,
            node_id,
            state: st,
            reason,
        } => {
            if let Some(p) = state.placements.get(instance_id)
                && p.node_id != *node_id
            {
                return Response::rejected(
                    RejectCode::NotPlacedHere,
                    format!(
                        "instance {instance_id:?} is placed on node {} (term {}), not on reporting node {node_id}; \
                         stop the local instance",
                        p.node_id, p.term
                    ),
                );
            }
            state.status.insert(
                instance_id.clone(),
                InstanceStatus {
                    state: *st,
                    reason: reason.clone(),
                    node_id: *node_id,
                    at_ms: now,
                },
            );
            Response::Ok
        }
        Command::CreateApiKey { key } => create_api_key(state, key, now),
        Command::RevokeApiKey { id } => match state.keys.get_mut(id) {
            Some(k) => {
                k.revoked = true;
                Response::Ok
            }
            None => key_not_found(id),
        },
        Command::DeleteApiKey { id } => match state.keys.remove(id) {
            Some(_) => Response::Ok,
            None => key_not_found(id),
        },
        Command::PutRole { role } => {
            if role.name.is_empty() {
                return Response::rejected(
                    RejectCode::InvalidArgument,
                    "role name must not be empty",
                );
            }
            state.roles.insert(role.name.clone(), role.clone());
            Response::Ok
        }
        Command::DeleteRole { name } => {
            if state.roles.remove(name).is_none() {
                return role_not_found(name);
            }
            for roles in state.role_assignments.values_mut() {
                roles.remove(name);
            }
            state.role_assignments.retain(|_, roles| !roles.is_empty());
            for scopes in state.scoped_role_assignments.values_mut() {
                for roles in scopes.values_mut() {
                    roles.remove(name);
                }
                scopes.retain(|_, roles| !roles.is_empty());
            }
            state
                .scoped_role_assignments
                .retain(|_, scopes| !scopes.is_empty());
            Response::Ok
        }
        Command::AssignRole {
            principal,
            role,
            scope,
        } => {
            if principal.is_empty() {
                return Response::rejected(
                    RejectCode::InvalidArgument,
                    "principal must not be empty",
                );
            }
            let scope = match scope.as_deref().map(RoleScope::parse) {
                None | Some(Ok(RoleScope::Global)) => None,
                Some(Ok(_)) => scope.as_deref(),
                Some(Err(problem)) => {
                    return Response::rejected(RejectCode::InvalidArgument, problem);
                }
            };
            if !state.roles.contains_key(role) {
                return role_not_found(role);
            }
            let roles = match scope {
                None => state.role_assignments.entry(principal.clone()).or_default(),
                Some(scope) => state
                    .scoped_role_assignments
                    .entry(principal.clone())
                    .or_default()
                    .entry(scope.to_owned())
                    .or_default(),
            };
            roles.insert(role.clone());
            Response::Ok
        }
        Command::UnassignRole {
            principal,
            role,
            scope,
        } => {
            match scope.as_deref().map(RoleScope::parse) {
                None | Some(Ok(RoleScope::Global)) => {
                    if let Some(roles) = state.role_assignments.get_mut(principal) {
                        roles.remove(role);
                        if roles.is_empty() {
                            state.role_assignments.remove(principal);
                        }
                    }
                }
                Some(Ok(_)) => {
                    let scope = scope.as_deref().unwrap_or_default();
                    if let Some(scopes) = state.scoped_role_assignments.get_mut(principal) {
                        if let Some(roles) = scopes.get_mut(scope) {
                            roles.remove(role);
                            if roles.is_empty() {
                                scopes.remove(scope);
                            }
                        }
                        if scopes.is_empty() {
                            state.scoped_role_assignments.remove(principal);
                        }
                    }
                }
                Some(Err(problem)) => {
                    return Response::rejected(RejectCode::InvalidArgument, problem);
                }
            }
            Response::Ok
        }
        Command::PutToolPolicy { policy } => {
            if policy.scope.is_empty() {
                return Response::rejected(
                    RejectCode::InvalidArgument,
                    "policy scope must not be empty (global, server, group, principal or role)",
                );
            }
            state.policies.insert(
                ToolPolicy::key(&policy.scope, &policy.target),
                policy.clone(),
            );
            Response::Ok
        }
        Command::DeleteToolPolicy { scope, target } => {
            match state.policies.remove(&ToolPolicy::key(scope, target)) {
                Some(_) => Response::Ok,
                None => Response::rejected(
                    RejectCode::NotFound,
                    format!("no tool policy for scope {scope:?} target {target:?}"),
                ),
            }
        }
        Command::PutRateLimit { limit } => {
            if let Some(problem) = limit.problem() {
                return Response::rejected(RejectCode::InvalidArgument, problem);
            }
            if state
                .limits
                .get(&limit.id)
                .is_some_and(|l| l.source != limit.source)
            {
                return Response::rejected(
                    RejectCode::Conflict,
                    format!(
                        "rate limit {:?} is defined in the config file; change it there",
                        limit.id
                    ),
                );
            }
            state.limits.insert(limit.id.clone(), limit.clone());
            Response::Ok
        }
        Command::DeleteRateLimit { id } => match state.limits.get(id) {
            Some(l) if l.source == "file" => Response::rejected(
                RejectCode::Conflict,
                format!("rate limit {id:?} is defined in the config file; remove it there"),
            ),
            Some(_) => {
                state.limits.remove(id);
                Response::Ok
            }
            None => Response::rejected(
                RejectCode::NotFound,
                format!("no rate limit with id {id:?}"),
            ),
        },
        Command::SetFileRateLimits { limits } => {
            if let Some(problem) = limits.iter().find_map(|l| {
                if l.source != "file" {
                    Some(format!("rate limit {:?} must have source file", l.id))
                } else {
                    l.problem()
                }
            }) {
                return Response::rejected(RejectCode::InvalidArgument, problem);
            }
            state.limits.retain(|_, l| l.source != "file");
            for l in limits {
                // A file definition takes over an API one of the same id.
                state.limits.insert(l.id.clone(), l.clone());
            }
            Response::Ok
        }
        Command::AppendEvents { events } => {
            let range = state.events.append(events, now);
            Response::EventsAppended {
                first_seq: range.map(|r| r.0),
                last_seq: range.map(|r| r.1),
            }
        }
        Command::SetEventRetention {
            max_count,
            max_age_ms,
        } => {
            state.events.set_retention(*max_count, *max_age_ms, now);
            Response::Ok
        }
        Command::RegisterNode {
            node_id,
            api_addr,
            raft_addr,
            capacity,
            labels,
        } => {
            state.nodes.insert(
                *node_id,
                NodeRecord {
                    api_addr: api_addr.clone(),
                    raft_addr: raft_addr.clone(),
                    capacity: *capacity,
                    labels: labels.clone(),
                    // Re-registering (a restart) keeps an operator's drain.
                    draining: state.nodes.get(node_id).is_some_and(|n| n.draining),
                },
            );
            Response::Ok
        }
        Command::SetNodeDrain { node_id, draining } => match state.nodes.get_mut(node_id) {
            Some(n) => {
                n.draining = *draining;
                Response::Ok
            }
            None => Response::rejected(
                RejectCode::NotFound,
                format!("node {node_id} is not registered; see `hangarctl cluster status`"),
            ),
        },
        Command::UnregisterNode { node_id } => match state.nodes.remove(node_id) {
            Some(_) => Response::Ok,
            None => Response::rejected(
                RejectCode::NotFound,
                format!("node {node_id} is not registered"),
            ),
        },
    }
}

fn key_not_found(id: &str) -> Response {
    Response::rejected(
        RejectCode::KeyNotFound,
        format!("API key {id:?} does not exist; list keys to see valid ids"),
    )
}

fn role_not_found(name: &str) -> Response {
    Response::rejected(
        RejectCode::RoleNotFound,
        format!("role {name:?} does not exist; create it first"),
    )
}

/// Placement fencing: a term older than the newest placement term is a deposed leader's
/// decision; a term newer than the entry's own term is a forged claim.
fn check_fence(state: &State, term: u64, ctx: ApplyCtx) -> Option<Response> {
    if term < state.placement_term {
        return Some(Response::rejected(
            RejectCode::StaleTerm,
            format!(
                "placement decided in term {term} but term {} already placed instances; \
                 this node is no longer the leader",
                state.placement_term
            ),
        ));
    }
    if term > ctx.term {
        return Some(Response::rejected(
            RejectCode::StaleTerm,
            format!(
                "placement claims term {term} but was written by the leader of term {}; \
                 use the current leader's term",
                ctx.term
            ),
        ));
    }
    // A decision of an earlier term that reaches the log only now: a leader cut off from the
    // majority decided it (e.g. "the host is lost, move the instance here"), could not commit
    // it, and its forwarder handed it to the next leader once the partition healed. That
    // leader's own view (the host is alive, the instance runs there) must win: applying the
    // old decision would move the instance without the stop-first handoff, and two copies
    // would run at once.
    if term < ctx.term {
        return Some(Response::rejected(
            RejectCode::StaleTerm,
            format!(
                "placement decided in term {term} reached the log in term {}: only the leader \
                 of a term places instances in it",
                ctx.term
            ),
        ));
    }
    None
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn source_of(kind: ConfigSourceKind, file_hash: Option<&str>) -> Result<ConfigSource, Response> {
    match kind {
        ConfigSourceKind::Api => Ok(ConfigSource::Api),
        ConfigSourceKind::Cli => Ok(ConfigSource::Cli),
        ConfigSourceKind::File => match file_hash {
            Some(h) if is_sha256_hex(h) => Ok(ConfigSource::File {
                sha256: h.to_string(),
            }),
            _ => Err(Response::rejected(
                RejectCode::InvalidArgument,
                "source \"file\" needs file_hash: the SHA-256 of the config file as 64 lowercase hex characters",
            )),
        },
    }
}

fn set_desired_config(
    state: &mut State,
    servers: &BTreeMap<String, serde_json::Value>,
    kind: ConfigSourceKind,
    file_hash: Option<&str>,
    now: u64,
) -> Response {
    let source = match source_of(kind, file_hash) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(id) = servers.keys().find(|id| id.is_empty()) {
        return Response::rejected(
            RejectCode::InvalidArgument,
            format!("server id {id:?} must not be empty"),
        );
    }
    let next_version = state.config_version + 1;
    let mut added = Vec::new();
    let mut updated = Vec::new();
    let mut removed = Vec::new();
    let stale: Vec<String> = state
        .servers
        .iter()
        .filter(|(id, rec)| rec.source.kind() == kind && !servers.contains_key(*id))
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        state.servers.remove(&id);
        state.catalog.remove(&id);
        removed.push(id);
    }
    for (id, spec) in servers {
        match state.servers.get_mut(id) {
            Some(rec) if rec.spec == *spec && rec.source == source => {}
            Some(rec) => {
                rec.spec = spec.clone();
                rec.source = source.clone();
                rec.config_version = next_version;
                rec.updated_at_ms = now;
                updated.push(id.clone());
            }
            None => {
                state.servers.insert(
                    id.clone(),
                    ServerRecord {
                        spec: spec.clone(),
                        config_version: next_version,
                        source: source.clone(),
                        updated_at_ms: now,
                    },
                );
                added.push(id.clone());
            }
        }
    }
    if kind == ConfigSourceKind::File {
        state.config_file_hash = file_hash.map(str::to_string);
    }
    if !(added.is_empty() && updated.is_empty() && removed.is_empty()) {
        state.config_version = next_version;
    }
    Response::ConfigApplied {
        config_version: state.config_version,
        added,
        updated,
        removed,
    }
}

/// The fields of [`Command::PutServer`], borrowed.
struct PutServer<'a> {
    id: &'a str,
    spec: &'a serde_json::Value,
    kind: ConfigSourceKind,
    file_hash: Option<&'a str>,
    create_only: bool,
    if_version: Option<u64>,
}

fn put_server(state: &mut State, put: PutServer<'_>, now: u64) -> Response {
    let PutServer {
        id,
        spec,
        kind,
        file_hash,
        create_only,
        if_version,
    } = put;
    if id.is_empty() {
        return Response::rejected(RejectCode::InvalidArgument, "server id must not be empty");
    }
    let source = match source_of(kind, file_hash) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let existing = state.servers.get(id);
    if create_only && existing.is_some() {
        return Response::rejected(
            RejectCode::ServerExists,
            format!("server {id:?} already exists; update it instead or choose another id"),
        );
    }
    if let Some(expected) = if_version {
        let actual = existing.map(|r| r.config_version);
        if actual != Some(expected) {
            return Response::rejected(
                RejectCode::VersionMismatch,
                format!(
                    "server {id:?} is at config version {}, not {expected}; re-read it and retry",
                    actual.map_or_else(|| "none (not defined)".to_string(), |v| v.to_string())
                ),
            );
        }
    }
    state.config_version += 1;
    state.servers.insert(
        id.to_string(),
        ServerRecord {
            spec: spec.clone(),
            config_version: state.config_version,
            source,
            updated_at_ms: now,
        },
    );
    Response::ServerChanged {
        config_version: state.config_version,
    }
}

/// SHA-256 (hex) over the four catalogue lists, length-prefixed so boundaries are unambiguous.
pub fn schema_digest(lists: [&str; 4]) -> String {
    let mut h = Sha256::new();
    for part in lists {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

fn put_catalog(state: &mut State, server_id: &str, lists: [&String; 4], now: u64) -> Response {
    if server_id.is_empty() {
        return Response::rejected(RejectCode::InvalidArgument, "server_id must not be empty");
    }
    let digest = schema_digest(lists.map(String::as_str));
    if state
        .catalog
        .get(server_id)
        .is_some_and(|c| c.schema_digest == digest)
    {
        return Response::CatalogUpdated {
            schema_digest: digest,
            changed: false,
        };
    }
    let [tools, prompts, resources, resource_templates] = lists;
    state.catalog.insert(
        server_id.to_string(),
        CatalogEntry {
            tools: tools.clone(),
            prompts: prompts.clone(),
            resources: resources.clone(),
            resource_templates: resource_templates.clone(),
            schema_digest: digest.clone(),
            learned_at_ms: now,
        },
    );
    Response::CatalogUpdated {
        schema_digest: digest,
        changed: true,
    }
}

fn create_api_key(state: &mut State, key: &ApiKeyRecord, now: u64) -> Response {
    if key.id.is_empty() || key.principal.is_empty() {
        return Response::rejected(
            RejectCode::InvalidArgument,
            "API key needs a non-empty id and principal",
        );
    }
    if !is_sha256_hex(&key.sha256_hex) {
        return Response::rejected(
            RejectCode::InvalidArgument,
            "sha256_hex must be the SHA-256 of the secret as 64 lowercase hex characters (never the secret)",
        );
    }
    if state.keys.contains_key(&key.id) {
        return Response::rejected(
            RejectCode::KeyExists,
            format!("API key id {:?} already exists; choose another id", key.id),
        );
    }
    if state.key_by_hash(&key.sha256_hex).is_some() {
        return Response::rejected(
            RejectCode::KeyHashExists,
            "another API key has the same secret; generate a new secret",
        );
    }
    let mut rec = key.clone();
    rec.created_at_ms = now;
    state.keys.insert(rec.id.clone(), rec);
    Response::Ok
}
