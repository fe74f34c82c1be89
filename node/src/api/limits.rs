//! `/api/rate_limits`: the cluster-wide rate limits (definitions replicated through Raft) and
//! this node's view of them (its lease, its buckets and shares).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hangar_raft::Command;
use hangar_raft::state::RateLimitDef;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    rps: f64,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default, rename = "match")]
    matches: BTreeMap<String, String>,
    #[serde(default)]
    on_partition: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "ValidationError",
        message,
        Value::Null,
    )
}

/// `GET /api/rate_limits`.
pub(super) async fn list(State(st): State<ApiState>) -> ApiResult {
    let limits = st.cluster.rate_limits();
    // What is listed is enforced here (the applier may not have woken up yet).
    let defs: Vec<RateLimitDef> = st.cluster.raft().read(|s| {
        limits.set_definitions(&s.limits);
        s.limits.values().cloned().collect()
    });
    let status = st.cluster.raft().status();
    Ok(axum::Json(json!({
        "rate_limits": defs,
        "node": {
            "node_id": st.cluster.node_id(),
            "mode": limits.mode(),
            "lease_remaining_ms": limits.lease_remaining().as_millis() as u64,
            "leader": status.leader_id,
        },
        "buckets": limits.buckets(),
    }))
    .into_response())
}

/// `PUT /api/rate_limits/{id}`.
pub(super) async fn put(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let b: PutBody = serde_json::from_slice(&body).map_err(|e| {
        invalid(format!(
            "body must be {{\"rps\": <calls/s>, \"burst\": <n>, \"key\": [principal|tenant|server|tool], \"match\": {{dimension: glob}}, \"on_partition\": safe_share|fail_open|fail_closed}}: {e}"
        ))
    })?;
    if id == "rate_limit" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ConflictError",
            "`rate_limit` is the config file's command limiter; change it in the file",
            Value::Null,
        ));
    }
    let def = RateLimitDef {
        id,
        source: "api".into(),
        applies_to: "tools".into(),
        key: b.key,
        matches: b.matches,
        rps: b.rps,
        burst: b.burst.unwrap_or_else(|| b.rps.ceil().max(1.0) as u64),
        on_partition: b.on_partition.unwrap_or_else(|| "safe_share".into()),
    };
    if let Some(problem) = def.problem() {
        return Err(invalid(problem));
    }
    st.cluster
        .propose(Command::PutRateLimit { limit: def.clone() })
        .await?;
    Ok(axum::Json(json!({"rate_limit": def})).into_response())
}

/// `DELETE /api/rate_limits/{id}`.
pub(super) async fn delete(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    st.cluster
        .propose(Command::DeleteRateLimit { id: id.clone() })
        .await?;
    Ok(axum::Json(json!({"deleted": id})).into_response())
}
