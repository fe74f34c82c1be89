//! `/api/auth/keys`: API keys in MCP Hangar's shapes, stored through Raft as SHA-256 hashes
//! only (the raw key is returned once, at creation, and never stored or logged).
//!
//! Keys are replicated to every node; the auth room checks them on every `/api` and MCP
//! request when `auth.enabled` (a key works on every node once its write is acknowledged).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hangar_raft::Command;
use hangar_raft::state::ApiKeyRecord;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
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
    let index = st.cluster.raft().applied_index();
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
}

fn assign_body(body: &[u8]) -> Result<AssignBody, ApiError> {
    let b: AssignBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            format!("body must be {{\"principal_id\": \"…\", \"role_name\": \"…\"}}: {e}"),
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
    Ok(b)
}

/// `GET /api/auth/roles`: the built-in and custom roles with their permissions, and who holds
/// which.
pub(super) async fn roles(State(st): State<ApiState>) -> ApiResult {
    let (custom, assignments) = st
        .cluster
        .raft()
        .read(|s| (s.roles.clone(), s.role_assignments.clone()));
    let mut roles: Vec<Value> = crate::auth::rbac::BUILTIN_ROLES
        .iter()
        .map(|(name, perms)| json!({"name": name, "permissions": perms, "builtin": true}))
        .collect();
    for (name, r) in &custom {
        if !crate::auth::rbac::BUILTIN_ROLES
            .iter()
            .any(|(n, _)| n == name)
        {
            roles.push(
                json!({"name": name, "permissions": r.permissions, "builtin": false,
                "description": r.description}),
            );
        }
    }
    Ok(axum::Json(json!({"roles": roles, "assignments": assignments})).into_response())
}

/// `POST /api/auth/roles/assign`.
pub(super) async fn assign_role(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b = assign_body(&body)?;
    st.cluster
        .assign_role(&b.principal_id, &b.role_name)
        .await?;
    st.runtime().events().emit(DomainEvent::RoleAssigned {
        principal_id: b.principal_id.clone(),
        role_name: b.role_name.clone(),
    });
    Ok(axum::Json(
        json!({"principal_id": b.principal_id, "role_name": b.role_name, "assigned": true}),
    )
    .into_response())
}

/// `POST /api/auth/roles/revoke`.
pub(super) async fn revoke_role(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let b = assign_body(&body)?;
    st.cluster
        .propose(Command::UnassignRole {
            principal: b.principal_id.clone(),
            role: b.role_name.clone(),
        })
        .await?;
    st.runtime().events().emit(DomainEvent::RoleRevoked {
        principal_id: b.principal_id.clone(),
        role_name: b.role_name.clone(),
    });
    Ok(axum::Json(
        json!({"principal_id": b.principal_id, "role_name": b.role_name, "revoked": true}),
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
    let (roles, permissions) = grants
        .map(|g| (g.roles.clone(), g.permissions.clone()))
        .unwrap_or_default();
    let mut body = json!({"principal_id": name, "key_id": key_id, "roles": roles,
        "permissions": permissions, "auth_enabled": auth_enabled});
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
