//! `/api/groups/*`: groups, their members and rotation. Definitions are validated by the
//! config room and changed through the cluster; the view is the one the management tools
//! show ([`crate::runtime::view`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::cluster::{ClusterError, MemberEdit, RejectCode};
use crate::config;
use crate::runtime::RuntimeError;
use crate::telemetry::events::DomainEvent;

fn group_json(st: &ApiState, id: &str) -> Result<Value, ApiError> {
    st.gateway
        .group_view(id)
        .and_then(|v| serde_json::to_value(v).ok())
        .ok_or_else(|| ApiError::group_not_found(id))
}

pub(super) async fn list_groups(State(st): State<ApiState>) -> ApiResult {
    let groups: Vec<Value> = st
        .runtime()
        .groups()
        .iter()
        .filter_map(|g| group_json(&st, g.id()).ok())
        .collect();
    Ok(axum::Json(json!({ "groups": groups })).into_response())
}

pub(super) async fn get_group(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    Ok(axum::Json(group_json(&st, &id)?).into_response())
}

pub(super) async fn group_members(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let v = group_json(&st, &id)?;
    Ok(axum::Json(json!({"group_id": id, "members": v["members"]})).into_response())
}

pub(super) async fn create_group(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let mut v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            format!("request body must be a JSON object: {e}"),
            Value::Null,
        )
    })?;
    let id = v
        .as_object_mut()
        .and_then(|o| o.remove("group_id"))
        .and_then(|x| x.as_str().map(str::to_owned))
        .ok_or_else(|| {
            ApiError::validation(
                "group_id (string) is required",
                json!({"field": "group_id"}),
            )
        })?;
    let Value::Object(def) = &mut v else {
        return Err(ApiError::validation(
            "request body must be a JSON object",
            Value::Null,
        ));
    };
    // An empty group is allowed through the API; members are added later.
    if !def.contains_key("members") {
        def.insert("members".into(), json!([]));
        def.entry("min_healthy").or_insert(json!(1));
    }
    def.insert("mode".into(), json!("group"));
    if st.runtime().exists(&id) || st.cluster.server_record(&id).is_some() {
        return Err(RuntimeError::Exists(id).into());
    }
    config::validate_server(&id, &v, &st.runtime().specs())
        .map_err(|p| ApiError::invalid_config("invalid group definition", &p.into()))?;
    let refused = config::raw_command_problems(&id, &v, &config::CommandPolicy::from_env());
    if !refused.is_empty() {
        return Err(ApiError::invalid_config(
            "invalid group definition",
            &config::ConfigError::Invalid { problems: refused },
        ));
    }
    st.cluster.put_server(&id, v, true, None).await?;
    st.runtime().events().emit(DomainEvent::GroupCreated {
        group_id: id.clone(),
    });
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"group_id": id, "created": true})),
    )
        .into_response())
}

pub(super) async fn delete_group(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_none() {
        return Err(ApiError::group_not_found(&id));
    }
    st.cluster.delete_server(&id).await?;
    st.gateway.router().rebalance(&id);
    st.runtime().events().emit(DomainEvent::GroupDeleted {
        group_id: id.clone(),
    });
    Ok(axum::Json(json!({"deleted": true, "group_id": id})).into_response())
}

#[derive(Deserialize)]
struct MemberBody {
    member_id: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default = "one")]
    priority: u32,
}

fn one() -> u32 {
    1
}

/// Change a group's members through the cluster (compare-and-set, retried there).
async fn edit_members(st: &ApiState, id: &str, edit: &MemberEdit) -> Result<(), ApiError> {
    match st.cluster.edit_group_members(id, edit).await {
        Err(ClusterError::Rejected {
            code: RejectCode::ServerNotFound,
            ..
        }) => Err(ApiError::group_not_found(id)),
        other => Ok(other?),
    }
}

pub(super) async fn add_member(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let g = st
        .runtime()
        .group(&id)
        .ok_or_else(|| ApiError::group_not_found(&id))?;
    let b: MemberBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            format!("body must be {{\"member_id\": \"…\", \"weight\": 1, \"priority\": 1}}: {e}"),
            Value::Null,
        )
    })?;
    if st.runtime().instance(&b.member_id).is_none() {
        return Err(ApiError::validation(
            format!(
                "member '{}' is not a configured MCP server (groups cannot contain groups)",
                b.member_id
            ),
            json!({"field": "member_id"}),
        ));
    }
    if !(1..=100).contains(&b.weight) || !(1..=100).contains(&b.priority) {
        return Err(ApiError::validation(
            "weight and priority must be between 1 and 100",
            Value::Null,
        ));
    }
    if g.spec().members.iter().any(|m| m.id == b.member_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ValidationError",
            format!("'{}' is already a member of '{id}'", b.member_id),
            Value::Null,
        ));
    }
    let edit = MemberEdit::Add {
        id: b.member_id.clone(),
        weight: b.weight,
        priority: b.priority,
    };
    edit_members(&st, &id, &edit).await?;
    st.runtime().events().emit(DomainEvent::GroupMemberAdded {
        group_id: id.clone(),
        member_id: b.member_id.clone(),
        weight: b.weight,
        priority: b.priority,
    });
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"group_id": id, "member_id": b.member_id, "added": true})),
    )
        .into_response())
}

pub(super) async fn remove_member(
    State(st): State<ApiState>,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult {
    let g = st
        .runtime()
        .group(&id)
        .ok_or_else(|| ApiError::group_not_found(&id))?;
    if !g.spec().members.iter().any(|m| m.id == member) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "MemberNotFoundError",
            format!("'{member}' is not a member of '{id}'"),
            Value::Null,
        ));
    }
    let edit = MemberEdit::Remove { id: member.clone() };
    edit_members(&st, &id, &edit).await?;
    st.runtime().events().emit(DomainEvent::GroupMemberRemoved {
        group_id: id.clone(),
        member_id: member.clone(),
    });
    Ok(axum::Json(json!({"group_id": id, "member_id": member, "removed": true})).into_response())
}

pub(super) async fn rebalance_group(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult {
    if st.runtime().group(&id).is_none() {
        return Err(ApiError::group_not_found(&id));
    }
    st.gateway.router().rebalance(&id);
    Ok(axum::Json(json!({"status": "rebalanced", "group_id": id})).into_response())
}
