//! `/api/system/`, `/api/events` (and its SSE stream), the probes `/health/ready|startup` and
//! `/metrics`.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiResult;
use crate::runtime::ServerState;

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

pub(super) async fn system(State(st): State<ApiState>) -> ApiResult {
    let rt = st.runtime();
    let mut by_state = serde_json::Map::new();
    for s in ["cold", "initializing", "ready", "degraded", "dead"] {
        by_state.insert(s.into(), json!(0));
    }
    let mut total_tools = 0;
    // Where each single-instance server runs and the state its host reported (the same on
    // every node).
    let mut instances = Vec::new();
    for i in rt.instances() {
        let s = i.status();
        total_tools += s.tools_count;
        if crate::runtime::placement::placed_by_leader(&i.spec()) {
            instances.push(json!({"mcp_server": s.id, "node": s.node, "state": s.state.as_str()}));
        }
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
            // True when other nodes are members: they share config, keys and placements.
            "coordinates_with_peers": st.cluster.status().voters.len() + st.cluster.status().learners.len() > 1,
            // The leader decides placements (and would run fleet-wide supervision).
            "manages_fleet": st.cluster.status().role == hangar_raft::Role::Leader,
            "storage_is_shareable": false,
            "rate_limits_are_per_instance": false,
        },
        "cluster": cluster_summary(&st.cluster),
        "placements": instances,
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

pub(super) async fn ready(State(st): State<ApiState>) -> Response {
    let rt = st.runtime();
    if let Err(reason) = st.cluster.readiness() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "reason": reason.to_string()})),
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

pub(super) async fn startup(State(st): State<ApiState>) -> Response {
    let done = st.cluster.startup_complete();
    let body = axum::Json(json!({
        "status": if done { "healthy" } else { "starting" },
        "startup_complete": done,
        "uptime_seconds": st.runtime().uptime().as_secs_f64(),
    }));
    if done {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

pub(super) async fn metrics(State(st): State<ApiState>) -> Response {
    let m = st.runtime().metrics();
    let refused = st.cluster.raft().tls_refusals();
    m.tls_refused
        .inc_by(refused.saturating_sub(m.tls_refused.get()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.runtime().metrics().render(),
    )
        .into_response()
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
    /// Replicate this node's pending events first (read-your-writes; bounded wait).
    #[serde(default)]
    sync: bool,
}

pub(super) async fn events(State(st): State<ApiState>, Query(q): Query<EventsQuery>) -> ApiResult {
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

pub(super) async fn event_stream(State(st): State<ApiState>) -> Response {
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
