//! API room: REST under `/api` (MCP Hangar's shapes and error envelope), the probes
//! `/health/live|ready|startup`, and `/metrics` (Prometheus text format).
//!
//! Error envelope: `{"error":{"code":"<ErrorClass>","message":"…","details":{…}|null}}`.

mod config_api;
mod keys;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{self, ServerSpec};
use crate::gateway::Gateway;
use crate::gateway::naming::exposed_name;
use crate::runtime::{Instance, InstanceStatus, Runtime, RuntimeError, ServerState};

/// State shared by the API handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The gateway (for catalogue views).
    pub gateway: Arc<Gateway>,
    /// Configuration reloads (None in tests without a file).
    pub reloader: Option<Arc<crate::app::Reloader>>,
    /// The cluster: desired config changes go through Raft.
    pub cluster: Arc<crate::cluster::Cluster>,
}

impl ApiState {
    fn runtime(&self) -> &Arc<Runtime> {
        self.gateway.runtime()
    }
}

/// An API error rendered in MCP Hangar's envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    /// A new error.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        details: Value,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details,
        }
    }

    /// The details object.
    pub fn details(&self) -> &Value {
        &self.details
    }

    fn not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "McpServerNotFoundError",
            format!(
                "MCP server '{id}' not found; GET /api/mcp_servers/ lists the configured servers"
            ),
            json!({ "mcp_server_id": id }),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::Exists(id) => ApiError::new(
                StatusCode::CONFLICT,
                "McpServerAlreadyExistsError",
                e.to_string(),
                json!({ "mcp_server_id": id }),
            ),
            RuntimeError::NotFound(id) => ApiError::not_found(id),
            RuntimeError::IsGroup(id) => ApiError::new(
                StatusCode::CONFLICT,
                "ValidationError",
                e.to_string(),
                json!({ "mcp_server_id": id }),
            ),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// The `/api`, `/health` and `/metrics` routes.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/mcp_servers/", get(list_servers).post(create_server))
        .route(
            "/api/mcp_servers",
            get(|| async { Redirect::temporary("/api/mcp_servers/") }),
        )
        .route(
            "/api/mcp_servers/{id}",
            get(get_server).delete(delete_server),
        )
        .route("/api/mcp_servers/{id}/start", post(start_server))
        .route("/api/mcp_servers/{id}/stop", post(stop_server))
        .route("/api/mcp_servers/{id}/tools", get(server_tools))
        .route("/api/mcp_servers/{id}/logs", get(server_logs))
        .route("/api/tools/", get(list_tools))
        .route(
            "/api/tools",
            get(|| async { Redirect::temporary("/api/tools/") }),
        )
        .route("/api/system/", get(system))
        .route(
            "/api/system",
            get(|| async { Redirect::temporary("/api/system/") }),
        )
        .route("/api/groups/", get(list_groups).post(create_group))
        .route(
            "/api/groups",
            get(|| async { Redirect::temporary("/api/groups/") }),
        )
        .route("/api/groups/{id}", get(get_group).delete(delete_group))
        .route(
            "/api/groups/{id}/members",
            get(group_members).post(add_member),
        )
        .route(
            "/api/groups/{id}/members/{member}",
            axum::routing::delete(remove_member),
        )
        .route("/api/groups/{id}/rebalance", post(rebalance_group))
        .route("/api/config/reload", post(reload_config))
        .route("/api/config/validate", post(config_api::validate))
        .route("/api/config/diff", post(config_api::diff))
        .route("/api/config/apply", post(config_api::apply))
        .route("/api/config/export", get(config_api::export))
        .route("/api/auth/keys", get(keys::list).post(keys::create))
        .route("/api/auth/keys/{id}", axum::routing::delete(keys::revoke))
        .route("/api/events", get(events))
        .route("/api/events/stream", get(event_stream))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .route(
            "/health/live",
            get(|| async { axum::Json(json!({"status": "healthy"})) }),
        )
        .route("/health/ready", get(ready))
        .route("/health/startup", get(startup))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn api_not_found(Path(rest): Path<String>) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        format!("No API route /api/{rest}; see the README for the routes Hangar serves"),
        Value::Null,
    )
}

fn server_json(s: &InstanceStatus) -> Value {
    json!({
        "mcp_server": s.id,
        "state": s.state.as_str(),
        "mode": s.mode,
        "alive": s.alive,
        "tools_count": s.tools_count,
        "health_status": health_status(s.state),
        "tools_predefined": s.tools_predefined,
        "description": s.description,
    })
}

fn health_status(state: ServerState) -> &'static str {
    match state {
        ServerState::Ready => "healthy",
        ServerState::Degraded => "degraded",
        ServerState::Dead => "unhealthy",
        ServerState::Cold | ServerState::Initializing => "unknown",
    }
}

#[derive(Deserialize)]
struct StateFilter {
    state: Option<String>,
}

async fn list_servers(State(st): State<ApiState>, Query(q): Query<StateFilter>) -> ApiResult {
    let filter = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(ServerState::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "ValidationError",
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
        .map(|s| server_json(&s))
        .collect();
    if filter.is_none() {
        for g in rt.groups() {
            let spec = g.spec();
            servers.push(json!({
                "mcp_server": g.id(),
                "state": group_state(rt, g.id()),
                "mode": "group",
                "alive": true,
                "tools_count": Value::Null,
                "health_status": "unknown",
                "tools_predefined": false,
                "description": spec.description,
                "members": spec.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(axum::Json(json!({ "mcp_servers": servers })).into_response())
}

fn group_state(rt: &Runtime, id: &str) -> &'static str {
    let Some(g) = rt.group(id) else {
        return "inactive";
    };
    let spec = g.spec();
    let ready = spec
        .members
        .iter()
        .filter(|m| {
            rt.instance(&m.id)
                .is_some_and(|i| i.state() == ServerState::Ready)
        })
        .count() as u32;
    if ready == 0 {
        "inactive"
    } else if ready < spec.min_healthy {
        "partial"
    } else {
        "healthy"
    }
}

/// Mask secrets in a serialized spec: every value under `env`, `headers` and `auth`, and any
/// field whose name looks like a credential.
pub fn mask_secrets(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let lk = k.to_ascii_lowercase();
                if matches!(lk.as_str(), "env" | "headers") {
                    if let Value::Object(inner) = val {
                        for x in inner.values_mut() {
                            *x = Value::String("***".into());
                        }
                    }
                } else if ["password", "token", "secret", "api_key", "apikey", "key"]
                    .iter()
                    .any(|s| lk.contains(s))
                    && (val.is_string() || val.is_number())
                {
                    *val = Value::String("***".into());
                } else {
                    mask_secrets(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

fn spec_json(spec: &ServerSpec) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or(Value::Null);
    mask_secrets(&mut v);
    v
}

fn instance(st: &ApiState, id: &str) -> Result<Arc<Instance>, ApiError> {
    st.runtime()
        .instance(id)
        .ok_or_else(|| ApiError::not_found(id))
}

async fn get_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let rt = st.runtime();
    if let Some(g) = rt.group(&id) {
        let spec = g.spec();
        let members: Vec<Value> = spec
            .members
            .iter()
            .map(|m| {
                let state = rt
                    .instance(&m.id)
                    .map(|i| i.state().as_str())
                    .unwrap_or("unknown");
                json!({"id": m.id, "state": state, "weight": m.weight, "priority": m.priority})
            })
            .collect();
        return Ok(axum::Json(json!({
            "mcp_server": id,
            "group_id": id,
            "mode": "group",
            "state": group_state(rt, &id),
            "description": spec.description,
            "min_healthy": spec.min_healthy,
            "members": members,
            "config": spec_json(&ServerSpec::Group(spec.clone())),
        }))
        .into_response());
    }
    let inst = instance(&st, &id)?;
    let s = inst.status();
    let tools: Vec<String> = match st.runtime().catalog_of(&inst) {
        Some(c) => c.tools.iter().map(|t| t.key.clone()).collect(),
        None => Vec::new(),
    };
    let mut v = server_json(&s);
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

async fn create_server(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let mut v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            format!("request body must be a JSON object: {e}"),
            Value::Null,
        )
    })?;
    let obj = v.as_object_mut().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            "request body must be a JSON object",
            Value::Null,
        )
    })?;
    let id = obj
        .remove("mcp_server_id")
        .and_then(|v| v.as_str().map(str::to_owned))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "ValidationError",
                "mcp_server_id (string) is required",
                json!({"field": "mcp_server_id"}),
            )
        })?;
    obj.remove("source");
    let doc = json!({ "mcp_servers": { id.clone(): Value::Object(obj.clone()) } });
    // No ${VAR} interpolation for API input: values are taken literally.
    let cfg = config::load_str(&doc.to_string(), &|_| None).map_err(|e| {
        let problems: Vec<Value> = match &e {
            config::ConfigError::Invalid { problems } => problems
                .iter()
                .map(|p| json!({"path": p.path, "message": p.message}))
                .collect(),
            config::ConfigError::Unreadable { reason, .. } => {
                vec![json!({"path": "", "message": reason})]
            }
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            format!("invalid MCP server definition: {e}"),
            json!({ "problems": problems }),
        )
    })?;
    if st.runtime().exists(&id) || st.cluster.server_record(&id).is_some() {
        return Err(RuntimeError::Exists(id).into());
    }
    if cfg.mcp_servers.len() != 1
        || cfg
            .mcp_servers
            .values()
            .any(|s| matches!(s, ServerSpec::Group(_)))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            "groups are created under /api/groups/ (or in the config file)",
            json!({"field": "mode"}),
        ));
    }
    st.cluster
        .put_server(&id, Value::Object(obj.clone()), true, None)
        .await?;
    tracing::info!(mcp_server = %id, "mcp_server_registered_via_api");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"mcp_server_id": id, "created": true})),
    )
        .into_response())
}

async fn delete_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_some() {
        return Err(RuntimeError::IsGroup(id).into());
    }
    if st.cluster.server_record(&id).is_none() {
        return Err(ApiError::not_found(&id));
    }
    st.cluster.delete_server(&id).await?;
    Ok(axum::Json(json!({"deleted": true, "mcp_server_id": id})).into_response())
}

async fn start_server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_some() {
        return Err(RuntimeError::IsGroup(id).into());
    }
    let inst = instance(&st, &id)?;
    match inst.ensure_ready().await {
        Ok(_) => {
            let tools: Vec<String> = inst
                .catalog()
                .map(|c| c.tools.iter().map(|t| t.key.clone()).collect())
                .unwrap_or_default();
            Ok(axum::Json(
                json!({"mcp_server": id, "state": inst.state().as_str(), "tools": tools}),
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

async fn stop_server(
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
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                format!("body must be JSON like {{\"reason\": \"...\"}}: {e}"),
                Value::Null,
            )
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

async fn server_tools(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
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
struct LogsQuery {
    lines: Option<usize>,
}

async fn server_logs(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult {
    let lines = q.lines.unwrap_or(100);
    if !(1..=1000).contains(&lines) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
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

async fn list_tools(State(st): State<ApiState>) -> ApiResult {
    let mut tools = Vec::new();
    for inst in st.runtime().instances() {
        let Some(c) = st.runtime().catalog_of(&inst) else {
            continue;
        };
        for t in &c.tools {
            tools.push(json!({
                "mcp_server_id": inst.id(),
                "tool_name": t.key,
                "exposed_name": exposed_name(inst.id(), &t.key),
                "description": t.field("description"),
                "input_schema": t.field("inputSchema").map(|s| s.to_string()),
            }));
        }
    }
    Ok(axum::Json(json!({ "tools": tools })).into_response())
}

fn counter_sum(vec: &prometheus::IntCounterVec, status: Option<&str>) -> u64 {
    use prometheus::core::Collector;
    vec.collect()
        .iter()
        .flat_map(|mf| mf.get_metric().iter())
        .filter(|m| {
            status.is_none_or(|s| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "status" && l.value() == s)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

async fn system(State(st): State<ApiState>) -> ApiResult {
    let rt = st.runtime();
    let mut by_state = serde_json::Map::new();
    for s in ["cold", "initializing", "ready", "degraded", "dead"] {
        by_state.insert(s.into(), json!(0));
    }
    let mut total_tools = 0;
    for i in rt.instances() {
        let s = i.status();
        total_tools += s.tools_count;
        if let Some(Value::Number(n)) = by_state.get(s.state.as_str()) {
            let next = n.as_u64().unwrap_or(0) + 1;
            by_state.insert(s.state.as_str().into(), json!(next));
        }
    }
    let calls = counter_sum(&rt.metrics().tool_calls, None);
    let failures = counter_sum(&rt.metrics().tool_calls, Some("error"));
    let rate = if calls == 0 {
        1.0
    } else {
        (calls - failures) as f64 / calls as f64
    };
    Ok(axum::Json(json!({"system": {
        "total_mcp_servers": rt.instances().len() + rt.groups().len(),
        "mcp_servers_by_state": by_state,
        "total_tools": total_tools,
        "total_invocations": calls,
        "total_failures": failures,
        "overall_success_rate": rate,
        "uptime_seconds": rt.uptime().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
        "instance": {
            "instance_id": rt.node_id(),
            "node_id": rt.node_id(),
            "coordinates_with_peers": true,
            "manages_fleet": true,
            "storage_is_shareable": false,
            "rate_limits_are_per_instance": true,
        },
        "cluster": cluster_summary(&st.cluster),
        "gateway": {
            "calls_in_flight": st.gateway.calls_in_flight(),
            "pending_relays": st.gateway.pending_relays(),
        },
    }}))
    .into_response())
}

fn cluster_summary(c: &crate::cluster::Cluster) -> Value {
    let s = c.status();
    let (version, file_hash) = c.config_version();
    json!({
        "node_id": s.node_id,
        "role": s.role,
        "leader_id": s.leader_id,
        "leader_api_addr": s.leader.as_ref().map(|l| l.api_addr.clone()),
        "term": s.term,
        "committed_index": s.committed_index,
        "applied_index": s.applied_index,
        "lag": s.committed_index.unwrap_or(0).saturating_sub(s.applied_index.unwrap_or(0)),
        "voters": s.voters.keys().collect::<Vec<_>>(),
        "learners": s.learners.keys().collect::<Vec<_>>(),
        "config_version": version,
        "config_file_hash": file_hash,
        "config_apply_error": c.apply_error(),
        "ready": c.readiness().is_ok(),
    })
}

async fn ready(State(st): State<ApiState>) -> Response {
    let rt = st.runtime();
    if let Err(reason) = st.cluster.readiness() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response();
    }
    let ready = rt
        .instances()
        .iter()
        .filter(|i| i.state() == ServerState::Ready)
        .count();
    axum::Json(json!({
        "status": "ready",
        "ready_mcp_servers": ready,
        "total_mcp_servers": rt.instances().len(),
    }))
    .into_response()
}

async fn startup(State(st): State<ApiState>) -> Response {
    axum::Json(json!({
        "status": "healthy",
        "startup_complete": true,
        "uptime_seconds": st.runtime().uptime().as_secs_f64(),
    }))
    .into_response()
}

async fn metrics(State(st): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.runtime().metrics().render(),
    )
        .into_response()
}

/// How long a graceful shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::mask_secrets;
    use serde_json::json;

    #[test]
    fn masks_env_headers_and_credentials() {
        let mut v = json!({"command": ["x"], "env": {"TOKEN": "abc"}, "http": {"headers": {"X": "1"}},
                           "auth": {"type": "bearer", "bearer_token": "zzz"}, "idle_ttl_s": 5});
        mask_secrets(&mut v);
        assert_eq!(v["env"]["TOKEN"], "***");
        assert_eq!(v["http"]["headers"]["X"], "***");
        assert_eq!(v["auth"]["bearer_token"], "***");
        assert_eq!(v["auth"]["type"], "bearer");
        assert_eq!(v["idle_ttl_s"], 5);
    }
}

fn group_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "GroupNotFoundError",
        format!("group '{id}' not found; GET /api/groups/ lists the groups"),
        json!({ "group_id": id }),
    )
}

fn group_json(st: &ApiState, id: &str) -> Option<Value> {
    let rt = st.runtime();
    let g = rt.group(id)?;
    let spec = g.spec();
    let router = st.gateway.router();
    let members: Vec<Value> = router
        .members(id)
        .into_iter()
        .map(|m| {
            let state = rt
                .instance(&m.id)
                .map(|i| i.state().as_str())
                .unwrap_or("unknown");
            json!({"id": m.id, "state": state, "in_rotation": m.in_rotation, "weight": m.weight,
                   "priority": m.priority, "consecutive_failures": m.consecutive_failures})
        })
        .collect();
    let healthy = members
        .iter()
        .filter(|m| m["in_rotation"] == json!(true) && m["state"] == json!("ready"))
        .count();
    let breaker = router.breaker_state(id);
    let state = if breaker == crate::routing::BreakerState::Open {
        "degraded"
    } else {
        group_state(rt, id)
    };
    Some(json!({
        "group_id": id,
        "description": spec.description,
        "state": state,
        "strategy": spec.strategy,
        "min_healthy": spec.min_healthy,
        "healthy_count": healthy,
        "total_members": members.len(),
        "circuit_breaker_state": breaker.as_str(),
        "members": members,
    }))
}

async fn list_groups(State(st): State<ApiState>) -> ApiResult {
    let groups: Vec<Value> = st
        .runtime()
        .groups()
        .iter()
        .filter_map(|g| group_json(&st, g.id()))
        .collect();
    Ok(axum::Json(json!({ "groups": groups })).into_response())
}

async fn get_group(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    group_json(&st, &id)
        .map(|v| axum::Json(v).into_response())
        .ok_or_else(|| group_not_found(&id))
}

async fn group_members(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let v = group_json(&st, &id).ok_or_else(|| group_not_found(&id))?;
    Ok(axum::Json(json!({"group_id": id, "members": v["members"]})).into_response())
}

fn validation(message: String, details: Value) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "ValidationError",
        message,
        details,
    )
}

/// Validate a group definition against the current servers by building a config document.
fn validated_group(
    st: &ApiState,
    id: &str,
    body: &Value,
) -> Result<crate::config::GroupSpec, ApiError> {
    let mut servers = serde_json::Map::new();
    for inst in st.runtime().instances() {
        // Members are validated by reference; any valid server definition stands in.
        servers.insert(inst.id().to_owned(), json!({"command": ["placeholder"]}));
    }
    let mut def = body.clone();
    def["mode"] = json!("group");
    servers.insert(id.to_owned(), def);
    let doc = json!({ "mcp_servers": servers });
    let cfg = config::load_str(&doc.to_string(), &|_| None).map_err(|e| {
        let problems: Vec<Value> = match &e {
            config::ConfigError::Invalid { problems } => problems
                .iter()
                .map(|p| json!({"path": p.path, "message": p.message}))
                .collect(),
            config::ConfigError::Unreadable { reason, .. } => {
                vec![json!({"path": "", "message": reason})]
            }
        };
        validation(
            format!("invalid group definition: {e}"),
            json!({ "problems": problems }),
        )
    })?;
    match cfg.mcp_servers.get(id) {
        Some(ServerSpec::Group(g)) => Ok(g.clone()),
        _ => Err(validation("invalid group definition".into(), Value::Null)),
    }
}

async fn create_group(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let mut v: Value = serde_json::from_slice(&body).map_err(|e| {
        validation(
            format!("request body must be a JSON object: {e}"),
            Value::Null,
        )
    })?;
    let id = v
        .as_object_mut()
        .and_then(|o| o.remove("group_id"))
        .and_then(|x| x.as_str().map(str::to_owned))
        .ok_or_else(|| {
            validation(
                "group_id (string) is required".into(),
                json!({"field": "group_id"}),
            )
        })?;
    if v.get("members").is_none() {
        v["members"] = json!([]);
        if v.get("min_healthy").is_none() {
            v["min_healthy"] = json!(1);
        }
    }
    if st.runtime().exists(&id) || st.cluster.server_record(&id).is_some() {
        return Err(RuntimeError::Exists(id).into());
    }
    let empty = v["members"].as_array().is_some_and(Vec::is_empty);
    let _spec = if empty {
        // An empty group is allowed through the API; members are added later.
        let mut probe = v.clone();
        probe["members"] = json!([]);
        probe["min_healthy"] = json!(1);
        let mut g = validated_group(
            &st,
            &id,
            &json!({"members": [{"id": "__probe__", "command": ["x"]}],
            "strategy": probe.get("strategy").cloned().unwrap_or(json!("round_robin"))}),
        )?;
        g.members.clear();
        g.description = v
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned);
        g
    } else {
        validated_group(&st, &id, &v)?
    };
    v["mode"] = json!("group");
    st.cluster.put_server(&id, v, true, None).await?;
    st.runtime()
        .events()
        .publish("GroupCreated", json!({"group_id": id}));
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"group_id": id, "created": true})),
    )
        .into_response())
}

async fn delete_group(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_none() {
        return Err(group_not_found(&id));
    }
    st.cluster.delete_server(&id).await?;
    st.gateway.router().rebalance(&id);
    st.runtime()
        .events()
        .publish("GroupDeleted", json!({"group_id": id}));
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

async fn add_member(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let g = st
        .runtime()
        .group(&id)
        .ok_or_else(|| group_not_found(&id))?;
    let b: MemberBody = serde_json::from_slice(&body).map_err(|e| {
        validation(
            format!("body must be {{\"member_id\": \"…\", \"weight\": 1, \"priority\": 1}}: {e}"),
            Value::Null,
        )
    })?;
    if st.runtime().instance(&b.member_id).is_none() {
        return Err(validation(
            format!(
                "member '{}' is not a configured MCP server (groups cannot contain groups)",
                b.member_id
            ),
            json!({"field": "member_id"}),
        ));
    }
    if !(1..=100).contains(&b.weight) || !(1..=100).contains(&b.priority) {
        return Err(validation(
            "weight and priority must be between 1 and 100".into(),
            Value::Null,
        ));
    }
    let spec = g.spec();
    if spec.members.iter().any(|m| m.id == b.member_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ValidationError",
            format!("'{}' is already a member of '{id}'", b.member_id),
            Value::Null,
        ));
    }
    update_group_members(&st, &id, |members| {
        members.push(json!({"id": b.member_id, "weight": b.weight, "priority": b.priority}));
    })
    .await?;
    st.runtime().events().publish(
        "GroupMemberAdded",
        json!({"group_id": id, "member_id": b.member_id, "weight": b.weight, "priority": b.priority}),
    );
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"group_id": id, "member_id": b.member_id, "added": true})),
    )
        .into_response())
}

async fn remove_member(
    State(st): State<ApiState>,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult {
    let g = st
        .runtime()
        .group(&id)
        .ok_or_else(|| group_not_found(&id))?;
    let spec = g.spec();
    if !spec.members.iter().any(|m| m.id == member) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "MemberNotFoundError",
            format!("'{member}' is not a member of '{id}'"),
            Value::Null,
        ));
    }
    update_group_members(&st, &id, |members| {
        members.retain(|m| m.get("id").and_then(Value::as_str) != Some(member.as_str()));
    })
    .await?;
    st.runtime().events().publish(
        "GroupMemberRemoved",
        json!({"group_id": id, "member_id": member}),
    );
    Ok(axum::Json(json!({"group_id": id, "member_id": member, "removed": true})).into_response())
}

async fn rebalance_group(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    if st.runtime().group(&id).is_none() {
        return Err(group_not_found(&id));
    }
    st.gateway.router().rebalance(&id);
    Ok(axum::Json(json!({"status": "rebalanced", "group_id": id})).into_response())
}

/// Change a group's member list in its replicated definition (compare-and-set on the
/// config version, so concurrent edits on different nodes cannot lose each other).
async fn update_group_members(
    st: &ApiState,
    id: &str,
    edit: impl Fn(&mut Vec<Value>),
) -> Result<(), ApiError> {
    for _ in 0..5 {
        // Read the latest committed definition (read index), not a possibly stale copy.
        let Some((mut raw, version, _)) = st.cluster.server_record_linearizable(id).await? else {
            return Err(group_not_found(id));
        };
        let mut members = raw
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        edit(&mut members);
        raw["members"] = Value::Array(members);
        match st.cluster.put_server(id, raw, false, Some(version)).await {
            Err(crate::cluster::ClusterError::Rejected { code, .. })
                if code == "version_mismatch" =>
            {
                continue;
            }
            other => return other.map_err(ApiError::from),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "ConcurrentModificationError",
        format!("group '{id}' kept changing while being edited; retry"),
        Value::Null,
    ))
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
    /// Replicate this node's pending events first (read-your-writes; bounded wait).
    #[serde(default)]
    sync: bool,
}

async fn events(State(st): State<ApiState>, Query(q): Query<EventsQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    if q.sync {
        st.cluster.sync_events(Duration::from_secs(5)).await;
    }
    let log = st.runtime().events();
    let events: Vec<Value> = log
        .since(q.since.unwrap_or(0), limit)
        .iter()
        .filter_map(|e| serde_json::to_value(&**e).ok())
        .collect();
    Ok(axum::Json(json!({"events": events, "last_seq": log.last_seq()})).into_response())
}

async fn event_stream(State(st): State<ApiState>) -> Response {
    use futures::StreamExt;
    let rx = st.runtime().events().subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|ev| async move {
        let ev = ev.ok()?;
        let data = serde_json::to_string(&*ev).ok()?;
        Some(Ok::<_, std::convert::Infallible>(
            axum::response::sse::Event::default()
                .event(ev.event_type.clone())
                .id(ev.seq.to_string())
                .data(data),
        ))
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn reload_config(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            validation(
                format!("body must be JSON like {{\"graceful\": true}}: {e}"),
                Value::Null,
            )
        })?;
        if v.get("config_path").is_some() {
            return Err(validation(
                "config_path cannot be changed through the API; edit the file the node was started with".into(),
                json!({"field": "config_path"}),
            ));
        }
    }
    let Some(r) = &st.reloader else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ConfigurationUnavailableError",
            "this node has no configuration file to reload",
            Value::Null,
        ));
    };
    match r.reload("api").await {
        Ok(report) => Ok(axum::Json(report).into_response()),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ConfigurationReloadFailed",
            format!("the new configuration is invalid; the previous one keeps serving: {e}"),
            Value::Null,
        )),
    }
}
