//! `/api/mcp_servers/*` and `/api/tools/`: servers, their tools and logs; creation and
//! deletion go through the cluster (validated by the config room first).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::{ApiState, json_body, spec_json};
use crate::config::{self, ServerSpec};
use crate::runtime::view::ServerRow;
use crate::runtime::{Instance, RuntimeError, ServerState};

fn instance(st: &ApiState, id: &str) -> Result<Arc<Instance>, ApiError> {
    st.runtime()
        .instance(id)
        .ok_or_else(|| ApiError::server_not_found(id))
}

fn row(s: &crate::runtime::InstanceStatus) -> Value {
    serde_json::to_value(ServerRow::of(s)).unwrap_or(Value::Null)
}

#[derive(Deserialize)]
pub(super) struct StateFilter {
    state: Option<String>,
}

pub(super) async fn list_servers(
    State(st): State<ApiState>,
    Query(q): Query<StateFilter>,
) -> ApiResult {
    let filter = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(ServerState::parse(s).ok_or_else(|| {
            ApiError::validation(
                format!(
                    "state must be one of cold, initializing, ready, degraded, dead (got '{s}')"
                ),
                json!({ "field": "state" }),
            )
        })?),
    };
    let rt = st.runtime();
    let mut servers: Vec<Value> = rt
        .instances()
        .iter()
        .map(|i| i.status())
        .filter(|s| filter.is_none_or(|f| s.state == f))
        .map(|s| row(&s))
        .collect();
    if filter.is_none() {
        for g in rt.groups() {
            let Some(view) = st.gateway.group_view(g.id()) else {
                continue;
            };
            servers.push(json!({
                "mcp_server": g.id(),
                "state": view.state,
                "mode": "group",
                "alive": true,
                "tools_count": Value::Null,
                "health_status": view.state.health(),
                "tools_predefined": false,
                "description": view.description,
                "members": view.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(axum::Json(json!({ "mcp_servers": servers })).into_response())
}

pub(super) async fn get_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let rt = st.runtime();
    if let (Some(g), Some(view)) = (rt.group(&id), st.gateway.group_view(&id)) {
        let members: Vec<Value> = view
            .members
            .iter()
            .map(|m| json!({"id": m.id, "state": m.state, "weight": m.weight, "priority": m.priority}))
            .collect();
        return Ok(axum::Json(json!({
            "mcp_server": id,
            "group_id": id,
            "mode": "group",
            "state": view.state,
            "description": view.description,
            "min_healthy": view.min_healthy,
            "members": members,
            "config": spec_json(&ServerSpec::Group(g.spec())),
        }))
        .into_response());
    }
    let inst = instance(&st, &id)?;
    let s = inst.status();
    let tools: Vec<String> = match rt.catalog_of(&inst) {
        Some(c) => c.tools.iter().map(|t| t.key.clone()).collect(),
        None => Vec::new(),
    };
    let mut v = row(&s);
    if let Value::Object(o) = &mut v {
        o.insert("tools".into(), json!(tools));
        o.insert(
            "health".into(),
            json!({"last_error": s.last_error, "starts": s.starts, "started_at": s.started_at,
                "consecutive_failures": s.consecutive_failures, "total_failures": s.total_failures,
                "next_recovery_at": s.next_recovery_at}),
        );
        o.insert("last_used".into(), json!(s.last_used));
        o.insert("pid".into(), json!(s.pid));
        o.insert("config".into(), spec_json(&inst.spec()));
    }
    Ok(axum::Json(v).into_response())
}

pub(super) async fn create_server(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> ApiResult {
    let mut obj = json_body(&body)?;
    let id = obj
        .remove("mcp_server_id")
        .and_then(|v| v.as_str().map(str::to_owned))
        .ok_or_else(|| {
            ApiError::validation(
                "mcp_server_id (string) is required",
                json!({"field": "mcp_server_id"}),
            )
        })?;
    obj.remove("source");
    if obj.get("mode").and_then(Value::as_str) == Some("group") {
        return Err(ApiError::validation(
            "groups are created under /api/groups/ (or in the config file)",
            json!({"field": "mode"}),
        ));
    }
    let raw = Value::Object(obj);
    // No ${VAR} interpolation for API input: values are taken literally.
    config::validate_server(&id, &raw, &st.runtime().specs())
        .map_err(|p| ApiError::invalid_config("invalid MCP server definition", &p.into()))?;
    let refused = config::raw_command_problems(&id, &raw, &config::CommandPolicy::from_env());
    if !refused.is_empty() {
        return Err(ApiError::invalid_config(
            "invalid MCP server definition",
            &config::ConfigError::Invalid { problems: refused },
        ));
    }
    if st.runtime().exists(&id) || st.cluster.server_record(&id).is_some() {
        return Err(RuntimeError::Exists(id).into());
    }
    st.cluster.put_server(&id, raw, true, None).await?;
    tracing::info!(mcp_server = %id, "mcp_server_registered_via_api");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"mcp_server_id": id, "created": true})),
    )
        .into_response())
}

pub(super) async fn delete_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_some() {
        return Err(RuntimeError::IsGroup(id).into());
    }
    if st.cluster.server_record(&id).is_none() {
        return Err(ApiError::server_not_found(&id));
    }
    st.cluster.delete_server(&id).await?;
    Ok(axum::Json(json!({"deleted": true, "mcp_server_id": id})).into_response())
}

pub(super) async fn start_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_some() {
        return Err(RuntimeError::IsGroup(id).into());
    }
    let inst = instance(&st, &id)?;
    match st.gateway.router().start(&inst).await {
        Ok(()) => {
            let tools = st.runtime().tool_names(&inst);
            Ok(axum::Json(
                json!({"mcp_server": id, "state": inst.status().state.as_str(), "tools": tools}),
            )
            .into_response())
        }
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "McpServerStartError",
            e.to_string(),
            json!({"mcp_server_id": id, "state": inst.state().as_str()}),
        )),
    }
}

#[derive(Deserialize, Default)]
struct StopBody {
    reason: Option<String>,
}

pub(super) async fn stop_server(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    if st.runtime().group(&id).is_some() {
        return Err(RuntimeError::IsGroup(id).into());
    }
    let inst = instance(&st, &id)?;
    let body: StopBody = if body.is_empty() {
        StopBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "body must be JSON like {{\"reason\": \"...\"}}: {e}"
            ))
        })?
    };
    let reason = body.reason.unwrap_or_else(|| "user_request".to_owned());
    let reason = match reason.as_str() {
        "user_request" | "manual_stop" | "maintenance" => reason,
        _ => "user_request".to_owned(),
    };
    inst.stop(&reason).await;
    Ok(axum::Json(json!({"stopped": id, "reason": reason})).into_response())
}

pub(super) async fn server_tools(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let inst = instance(&st, &id)?;
    let tools: Vec<Value> = match st.runtime().catalog_of(&inst) {
        Some(c) => c
            .tools
            .iter()
            .map(|t| {
                json!({
                    "name": t.key,
                    "description": t.field("description"),
                    "parameters": t.field("inputSchema"),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(
        axum::Json(json!({"mcp_server": id, "state": inst.state().as_str(), "tools": tools}))
            .into_response(),
    )
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    lines: Option<usize>,
}

pub(super) async fn server_logs(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult {
    let lines = q.lines.unwrap_or(100);
    if !(1..=1000).contains(&lines) {
        return Err(ApiError::validation(
            format!("lines must be between 1 and 1000 (got {lines})"),
            json!({"field": "lines"}),
        ));
    }
    let inst = instance(&st, &id)?;
    let logs: Vec<Value> = inst
        .logs(lines)
        .into_iter()
        .map(|l| json!({"timestamp": l.timestamp, "line": l.line, "mcp_server_id": id, "stream": l.stream}))
        .collect();
    Ok(axum::Json(json!({"logs": logs, "mcp_server_id": id, "count": logs.len()})).into_response())
}

pub(super) async fn list_tools(State(st): State<ApiState>) -> ApiResult {
    // The names `tools/list` exposes (prefixed, plain or hashed): `null` for a tool that is
    // not exposed under its server (a group member's tools appear under the group).
    let exposed = st.gateway.exposed_tool_names();
    let mut tools = Vec::new();
    for inst in st.runtime().instances() {
        let Some(c) = st.runtime().catalog_of(&inst) else {
            continue;
        };
        for t in &c.tools {
            tools.push(json!({
                "mcp_server_id": inst.id(),
                "tool_name": t.key,
                "exposed_name": exposed.get(&(inst.id().to_owned(), t.key.clone())),
                "description": t.field("description"),
                "input_schema": t.field("inputSchema").map(|s| s.to_string()),
            }));
        }
    }
    Ok(axum::Json(json!({ "tools": tools })).into_response())
}
