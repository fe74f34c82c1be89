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
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "key_id": k.id,
        "principal_id": k.principal,
        "name": k.name,
        "created_at": k.created_at_ms as f64 / 1000.0,
        "expires_at": k.expires_at_ms.map(|m| m as f64 / 1000.0),
        "revoked": k.revoked,
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
