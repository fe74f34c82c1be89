//! `/api/auth/keys`: API keys in MCP Hangar's shapes, stored through Raft as SHA-256 hashes
//! only (the raw key is returned once, at creation, and never stored or logged).
//!
//! Keys are replicated to every node; the auth room checks them on every `/api` and MCP
//! request when `auth.enabled` (a key works on every node once its write is acknowledged).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hangar_raft::Command;
use hangar_raft::state::{ApiKeyRecord, RoleDef, RoleScope};

use crate::config::RoleAssignmentSpec;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::auth::rbac;
use crate::telemetry::events::DomainEvent;

const SHOWN_ONCE: &str = "Store the raw key now: it is shown once and never stored.";

#[derive(Deserialize)]
struct CreateBody {
    principal_id: String,
    name: String,
    #[serde(default)]
    expires_at: Option<f64>,
    /// The tenant its calls count under (rate limits).
    #[serde(default)]
    tenant: Option<String>,
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "key_id": k.id,
        "principal_id": k.principal,
        "name": k.name,
        "created_at": k.created_at_ms as f64 / 1000.0,
        "expires_at": k.expires_at_ms.map(|m| m as f64 / 1000.0),
        "revoked": k.revoked,
        "tenant": k.tenant,
    })
}

/// `POST /api/auth/keys`.
pub(super) async fn create(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b: CreateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            format!("body must be {{\"principal_id\": \"…\", \"name\": \"…\", \"expires_at\": <unix seconds, optional>}}: {e}"),
            Value::Null,
        )
    })?;
    if b.principal_id.trim().is_empty() || b.name.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            "principal_id and name must not be empty",
            Value::Null,
        ));
    }
    let now = crate::telemetry::unix_now();
    if b.expires_at.is_some_and(|t| !t.is_finite() || t <= now) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            "expires_at must be a future Unix time in seconds",
            json!({"field": "expires_at"}),
        ));
    }
    let secret: [u8; 32] = rand::random();
    let raw_key = format!("mcp_{}", hex::encode(secret));
    let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let record = ApiKeyRecord {
        id: id.clone(),
        principal: b.principal_id.clone(),
        name: b.name.clone(),
        sha256_hex: crate::config::sha256_hex(raw_key.as_bytes()),
        created_at_ms: 0,
        expires_at_ms: b.expires_at.map(|t| (t * 1000.0) as u64),
        revoked: false,
        tenant: b.tenant.clone().filter(|t| !t.trim().is_empty()),
    };
    st.cluster
        .propose(Command::CreateApiKey { key: record })
        .await?;
    st.runtime().events().emit(DomainEvent::KeyCreated {
        key_id: id.clone(),
        principal_id: b.principal_id.clone(),
        name: b.name.clone(),
    });
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"key_id": id, "raw_key": raw_key, "principal_id": b.principal_id,
            "name": b.name, "expires_at": b.expires_at, "warning": SHOWN_ONCE}),
        ),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    principal_id: Option<String>,
    #[serde(default)]
    include_revoked: bool,
}

/// `GET /api/auth/keys`.
pub(super) async fn list(State(st): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult {
    let keys: Vec<Value> = st.cluster.raft().read(|s| {
        s.keys
            .values()
            .filter(|k| q.include_revoked || !k.revoked)
            .filter(|k| q.principal_id.as_ref().is_none_or(|p| &k.principal == p))
            .map(key_json)
            .collect()
    });
    Ok(axum::Json(json!({"keys": keys, "count": keys.len()})).into_response())
}

/// `DELETE /api/auth/keys/{key_id}`: revoke (the record stays, marked revoked).
pub(super) async fn revoke(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    st.cluster
        .propose(Command::RevokeApiKey { id: id.clone() })
        .await?;
    // Acknowledge once every member refuses the key (bounded; a member that did not confirm
    // in time is named).
    let index = st.cluster.acknowledged_index().await;
    let lagging = st
        .cluster
        .wait_applied_everywhere(index, std::time::Duration::from_secs(5))
        .await;
    st.runtime()
        .events()
        .emit(DomainEvent::KeyRevoked { key_id: id.clone() });
    let mut body = json!({"key_id": id, "revoked": true});
    if !lagging.is_empty() {
        body["not_yet_applied_on"] = json!(lagging);
        body["warning"] = json!(
            "these members did not confirm the revocation within 5 s (unreachable?); they refuse the key once they catch up"
        );
    }
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize)]
struct AssignBody {
    principal_id: String,
    role_name: String,
    /// `global` (the default), `server:<id>` or `group:<id>`.
    #[serde(default)]
    scope: Option<String>,
}

impl AssignBody {
    /// The scope as the replicated command takes it (`None`: global).
    fn scope(&self) -> Option<&str> {
        self.scope.as_deref().filter(|s| *s != "global")
    }

    /// The scope as shown (`global` when absent).
    fn scope_name(&self) -> &str {
        self.scope.as_deref().unwrap_or("global")
    }
}

fn assign_body(body: &[u8]) -> Result<AssignBody, ApiError> {
    let b: AssignBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            format!("body must be {{\"principal_id\": \"…\", \"role_name\": \"…\", \"scope\": \"global\" | \"server:<id>\" | \"group:<id>\" (optional)}}: {e}"),
            Value::Null,
        )
    })?;
    if b.principal_id.trim().is_empty() || b.role_name.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            "principal_id and role_name must not be empty",
            Value::Null,
        ));
    }
    if let Some(scope) = &b.scope
        && let Err(problem) = RoleScope::parse(scope)
    {
        let hint = if scope.starts_with("tenant:") {
            " (MCP Hangar's tenant scopes are not supported: scope a role to a server or a group)"
        } else {
            ""
        };
        return Err(ApiError::validation(
            format!("{problem}{hint}"),
            json!({"field": "scope", "accepted": ["global", "server:<id>", "group:<id>"]}),
        ));
    }
    Ok(b)
}

fn is_builtin(name: &str) -> bool {
    rbac::BUILTIN_ROLES.iter().any(|(n, _)| *n == name)
}

/// Who holds `role`: `[{"principal_id", "scope", "source"}]`, replicated assignments (global
/// first, `source: api`), then the config file's (`source: config`).
fn holders(s: &hangar_raft::state::State, file: &[RoleAssignmentSpec], role: &str) -> Vec<Value> {
    let global = s
        .role_assignments
        .iter()
        .filter(|(_, roles)| roles.contains(role))
        .map(|(p, _)| json!({"principal_id": p, "scope": "global", "source": "api"}));
    let scoped = s.scoped_role_assignments.iter().flat_map(|(p, scopes)| {
        scopes
            .iter()
            .filter(|(_, roles)| roles.contains(role))
            .map(move |(scope, _)| json!({"principal_id": p, "scope": scope, "source": "api"}))
    });
    let from_file = file
        .iter()
        .filter(|a| a.role == role)
        .map(|a| json!({"principal_id": a.principal, "scope": a.scope, "source": "config"}));
    global.chain(scoped).chain(from_file).collect()
}

/// `GET /api/auth/roles`: the built-in and custom roles with their permissions and who holds
/// each (`assignments` of every role, with scopes); `assignments` (global, principal → roles)
/// and `scoped_assignments` (principal → scope → roles) as maps.
pub(super) async fn roles(State(st): State<ApiState>) -> ApiResult {
    let file = st.auth.file_role_assignments();
    let body = st.cluster.raft().read(|s| {
        let mut roles: Vec<Value> = rbac::BUILTIN_ROLES
            .iter()
            .map(|(name, perms)| {
                json!({"name": name, "permissions": perms, "builtin": true,
                    "assignments": holders(s, &file, name)})
            })
            .collect();
        for (name, r) in s.roles.iter().filter(|(n, _)| !is_builtin(n)) {
            roles.push(
                json!({"name": name, "permissions": r.permissions, "builtin": false,
                "description": r.description, "assignments": holders(s, &file, name)}),
            );
        }
        json!({"roles": roles, "assignments": s.role_assignments,
            "scoped_assignments": s.scoped_role_assignments,
            "file_assignments": file.iter().map(|a| json!({"principal_id": a.principal,
                "role": a.role, "scope": a.scope})).collect::<Vec<_>>()})
    });
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize)]
struct RoleBody {
    #[serde(alias = "role_name")]
    name: String,
    permissions: Vec<String>,
    #[serde(default)]
    description: Option<String>,
}

/// Longest custom role description.
const MAX_DESCRIPTION: usize = 1024;

/// `POST /api/auth/roles`: create or replace a custom role (201 created, 200 replaced).
/// Built-in names are refused (409); every permission must be a known `resource:action`
/// (`*` for either part), else 422 naming the unknown ones.
pub(super) async fn create_role(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b: RoleBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            format!("body must be {{\"name\": \"…\", \"permissions\": [\"resource:action\", …], \"description\": \"…\" (optional)}}: {e}"),
            Value::Null,
        )
    })?;
    let name = b.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(ApiError::validation(
            format!("role name {name:?} must be 1-64 letters, digits, `_`, `-` or `.`"),
            json!({"field": "name"}),
        ));
    }
    if is_builtin(name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ConflictError",
            format!("`{name}` is a built-in role and cannot be redefined; choose another name"),
            json!({"role_name": name, "builtin": true}),
        ));
    }
    if b.permissions.is_empty() {
        return Err(ApiError::validation(
            "a role needs at least one permission",
            json!({"field": "permissions"}),
        ));
    }
    let unknown = rbac::unknown_permissions(b.permissions.iter().map(String::as_str));
    if !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|(p, why)| format!("{p} ({why})"))
            .collect();
        let known: serde_json::Map<String, Value> = rbac::KNOWN_PERMISSIONS
            .iter()
            .map(|(r, a)| ((*r).to_owned(), json!(a)))
            .collect();
        return Err(ApiError::validation(
            format!("unknown permissions: {}", list.join(", ")),
            json!({"unknown_permissions": unknown.iter().map(|(p, why)| json!({"permission": p, "problem": why})).collect::<Vec<_>>(),
                "known_permissions": known}),
        ));
    }
    let description = b.description.unwrap_or_default();
    if description.len() > MAX_DESCRIPTION {
        return Err(ApiError::validation(
            format!("description is longer than {MAX_DESCRIPTION} bytes"),
            json!({"field": "description"}),
        ));
    }
    let role = RoleDef {
        name: name.to_owned(),
        permissions: b.permissions.iter().cloned().collect(),
        description,
    };
    let existed = st.cluster.raft().read(|s| s.roles.contains_key(name));
    st.cluster
        .propose(Command::PutRole { role: role.clone() })
        .await?;
    let permissions: Vec<String> = role.permissions.iter().cloned().collect();
    st.runtime().events().emit(if existed {
        DomainEvent::CustomRoleUpdated {
            role_name: role.name.clone(),
            permissions: permissions.clone(),
        }
    } else {
        DomainEvent::CustomRoleCreated {
            role_name: role.name.clone(),
            permissions: permissions.clone(),
        }
    });
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        axum::Json(
            json!({"name": role.name, "permissions": permissions, "builtin": false,
            "description": role.description, "created": !existed}),
        ),
    )
        .into_response())
}

/// `DELETE /api/auth/roles/{name}`: delete a custom role. Refused (409) for a built-in role
/// and while anyone holds the role (the holders are named: revoke them first).
pub(super) async fn delete_role(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult {
    if is_builtin(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ConflictError",
            format!("`{name}` is a built-in role and cannot be deleted"),
            json!({"role_name": name, "builtin": true}),
        ));
    }
    let (exists, assigned) = st
        .cluster
        .raft()
        .read(|s| (s.roles.contains_key(&name), holders(s, &[], &name)));
    if !exists {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "RoleNotFoundError",
            format!("no custom role `{name}`; GET /api/auth/roles lists the roles"),
            json!({"role_name": name}),
        ));
    }
    if !assigned.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ConflictError",
            format!(
                "role `{name}` is still assigned ({} assignment(s)); revoke them first with POST /api/auth/roles/revoke",
                assigned.len()
            ),
            json!({"role_name": name, "assignments": assigned}),
        ));
    }
    st.cluster
        .propose(Command::DeleteRole { name: name.clone() })
        .await?;
    st.runtime().events().emit(DomainEvent::CustomRoleDeleted {
        role_name: name.clone(),
    });
    Ok(axum::Json(json!({"name": name, "deleted": true})).into_response())
}

/// `POST /api/auth/roles/assign`: `scope` (optional) is `global`, `server:<id>` or
/// `group:<id>`.
pub(super) async fn assign_role(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b = assign_body(&body)?;
    st.cluster
        .assign_role(&b.principal_id, &b.role_name, b.scope())
        .await?;
    st.runtime().events().emit(DomainEvent::RoleAssigned {
        principal_id: b.principal_id.clone(),
        role_name: b.role_name.clone(),
        scope: b.scope_name().to_owned(),
    });
    Ok(axum::Json(
        json!({"principal_id": b.principal_id, "role_name": b.role_name,
            "scope": b.scope_name(), "assigned": true}),
    )
    .into_response())
}

/// `POST /api/auth/roles/revoke` (and MCP Hangar's `DELETE`): takes back the assignment of
/// that scope only.
pub(super) async fn revoke_role(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b = assign_body(&body)?;
    st.cluster
        .propose(Command::UnassignRole {
            principal: b.principal_id.clone(),
            role: b.role_name.clone(),
            scope: b.scope().map(str::to_owned),
        })
        .await?;
    st.runtime().events().emit(DomainEvent::RoleRevoked {
        principal_id: b.principal_id.clone(),
        role_name: b.role_name.clone(),
        scope: b.scope_name().to_owned(),
    });
    Ok(axum::Json(
        json!({"principal_id": b.principal_id, "role_name": b.role_name,
            "scope": b.scope_name(), "revoked": true}),
    )
    .into_response())
}

/// `GET /api/system/me`: who the caller is and what it may do.
pub(super) async fn me(
    principal: Option<axum::Extension<crate::auth::Principal>>,
    grants: Option<axum::Extension<std::sync::Arc<crate::auth::Grants>>>,
) -> ApiResult {
    // The auth middleware sets these only when auth is on.
    let auth_enabled = principal.is_some();
    let (name, key_id) = match principal.as_deref() {
        Some(crate::auth::Principal::ApiKey {
            principal, key_id, ..
        }) => (principal.clone(), Some(key_id.clone())),
        Some(crate::auth::Principal::Bootstrap { key_id }) => {
            ("admin".to_owned(), Some(key_id.clone()))
        }
        Some(crate::auth::Principal::Jwt { subject, .. }) => (subject.clone(), None),
        _ => ("anonymous".to_owned(), None),
    };
    let g = grants.map(|g| g.0).unwrap_or_default();
    let mut body = json!({"principal_id": name, "key_id": key_id, "roles": g.roles,
        "permissions": g.permissions, "auth_enabled": auth_enabled});
    if g.has_scoped() {
        body["scoped_roles"] = json!(g.scoped_roles);
        body["scoped_permissions"] = json!(g.scoped_permissions);
    }
    if let Some(crate::auth::Principal::Jwt {
        issuer,
        tenant,
        groups,
        ..
    }) = principal.as_deref()
    {
        body["auth_method"] = json!("jwt");
        body["issuer"] = json!(issuer);
        body["tenant"] = json!(tenant);
        body["groups"] = json!(groups);
    }
    Ok(axum::Json(body).into_response())
}
