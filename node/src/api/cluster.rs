//! `/api/cluster/*`: status and membership operations behind `hangarctl cluster`.
//! Membership changes may be sent to any node: the Raft layer forwards them to the leader.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use crate::cluster::{Cluster, ClusterError};
use crate::config::PeerSpec;

/// The `/api/cluster` routes.
pub(super) fn routes(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/api/cluster/status", get(status))
        .route("/api/cluster/init", post(init))
        .route("/api/cluster/join", post(join))
        .route("/api/cluster/members", post(add_member))
        .route("/api/cluster/members/{id}", delete(remove_member))
        .route("/api/cluster/members/{id}/promote", post(promote))
        .route("/api/cluster/members/{id}/drain", post(drain))
        .route("/api/cluster/members/{id}/undrain", post(undrain))
        .route("/api/cluster/transfer-leader", post(transfer_leader))
        .route("/api/cluster/snapshot", post(snapshot))
        .with_state(cluster)
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            format!("the body must be JSON like {shape}: {e}"),
            Value::Null,
        )
    })
}

#[derive(Deserialize)]
struct StatusQuery {
    /// Only this node's own view (no calls to the other members).
    #[serde(default)]
    local: bool,
}

/// This node's view, plus (unless `?local=true`) each member's own report of its indexes.
async fn status(State(c): State<Arc<Cluster>>, Query(q): Query<StatusQuery>) -> ApiResult {
    let s = c.status();
    let mut out = json!({
        "node_id": s.node_id,
        "role": s.role,
        "leader_id": s.leader_id,
        "leader": s.leader,
        "term": s.term,
        "last_log_index": s.last_log_index,
        "committed_index": s.committed_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "purged_index": s.purged_index,
        "initialized": c.raft().is_initialized(),
        "joint": s.joint,
        "fatal": s.fatal,
        "config_version": c.config_version().0,
        "draining": c.raft().read(|st| {
            st.nodes
                .iter()
                .filter(|(_, n)| n.draining)
                .map(|(id, _)| *id)
                .collect::<Vec<u64>>()
        }),
        // Nodes with labels (`cluster.labels`), matched by `placement.labels`.
        "labels": c.raft().read(|st| {
            st.nodes
                .iter()
                .filter(|(_, n)| !n.labels.is_empty())
                .map(|(id, n)| (id.to_string(), n.labels.clone()))
                .collect::<std::collections::BTreeMap<String, _>>()
        }),
        "ready": c.readiness().is_ok(),
        "not_ready_reason": c.readiness().err().map(|r| r.to_string()),
    });
    if q.local {
        return Ok(axum::Json(out).into_response());
    }
    let all: Vec<(u64, &'static str, hangar_raft::NodeInfo)> = s
        .voters
        .iter()
        .map(|(id, i)| (*id, "voter", i.clone()))
        .chain(s.learners.iter().map(|(id, i)| (*id, "learner", i.clone())))
        .collect();
    let probes = all
        .iter()
        .map(|(id, _, info)| c.member_report(*id, info, Duration::from_millis(800)));
    let reports = futures::future::join_all(probes).await;
    let leader_last = if s.leader_id == Some(s.node_id) {
        s.last_log_index
    } else {
        // The leader's own report carries its last log index.
        all.iter()
            .zip(&reports)
            .find(|((id, _, _), _)| Some(*id) == s.leader_id)
            .and_then(|(_, rep)| rep.as_ref())
            .and_then(|r| r.last_log_index)
    };
    let mut members = Vec::new();
    for ((id, kind, info), rep) in all.iter().zip(reports) {
        let applied = rep.as_ref().and_then(|r| r.applied_index);
        let matched = s
            .replication
            .as_ref()
            .and_then(|m| m.get(id).cloned().flatten());
        members.push(json!({
            "node_id": id,
            "membership": kind,
            "role": rep.as_ref().map_or(json!("unreachable"), |r| json!(r.role)),
            "raft_addr": info.raft_addr,
            "api_addr": info.api_addr,
            "reachable": rep.is_some(),
            "term": rep.as_ref().map(|r| r.term),
            "committed_index": rep.as_ref().map(|r| r.committed_index),
            "applied_index": applied,
            "matched_index": matched,
            "lag": match (leader_last, applied) { (Some(l), Some(a)) => Some(l.saturating_sub(a)), _ => None },
            "ready": rep.as_ref().map(|r| r.ready),
        }));
    }
    out["members"] = Value::Array(members);
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
struct InitBody {
    #[serde(default)]
    members: Vec<PeerBody>,
}

#[derive(Deserialize)]
struct PeerBody {
    node_id: u64,
    raft_addr: String,
    api_addr: String,
    #[serde(default)]
    role: Option<String>,
}

impl PeerBody {
    fn spec(&self) -> Result<PeerSpec, ApiError> {
        if self.node_id == 0 || self.raft_addr.is_empty() || self.api_addr.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                "node_id (≥ 1), raft_addr and api_addr (host:port) are required",
                Value::Null,
            ));
        }
        Ok(PeerSpec {
            node_id: self.node_id,
            raft_addr: self.raft_addr.clone(),
            api_addr: self.api_addr.clone(),
        })
    }

    fn voter(&self) -> Result<bool, ApiError> {
        match self.role.as_deref() {
            None | Some("voter") => Ok(true),
            Some("learner") => Ok(false),
            Some(other) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                format!("role must be `voter` or `learner`, got `{other}`"),
                Value::Null,
            )),
        }
    }
}

async fn init(State(c): State<Arc<Cluster>>, bytes: axum::body::Bytes) -> ApiResult {
    let b: InitBody = body(
        &bytes,
        r#"{"members": [{"node_id":2,"raft_addr":"…","api_addr":"…"}]}"#,
    )?;
    let members = b
        .members
        .iter()
        .filter(|m| m.node_id != c.node_id())
        .map(PeerBody::spec)
        .collect::<Result<Vec<_>, _>>()?;
    c.init(&members).await?;
    Ok(axum::Json(json!({"initialized": true, "node_id": c.node_id()})).into_response())
}

#[derive(Deserialize)]
struct JoinBody {
    seed: String,
    #[serde(default)]
    role: Option<String>,
}

/// Sent to the NEW node: it asks the member at `seed` to add it.
async fn join(State(c): State<Arc<Cluster>>, bytes: axum::body::Bytes) -> ApiResult {
    let b: JoinBody = body(&bytes, r#"{"seed": "http://host:port", "role": "voter"}"#)?;
    if c.raft().is_initialized() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "MembershipError",
            "this node already has cluster data (it bootstrapped or joined before); to join another \
             cluster start it with --no-bootstrap and an empty --data-dir",
            Value::Null,
        ));
    }
    let voter = !matches!(b.role.as_deref(), Some("learner"));
    c.join_via(&b.seed, voter).await?;
    Ok(axum::Json(json!({"joined": true, "node_id": c.node_id(), "seed": b.seed})).into_response())
}

async fn add_member(State(c): State<Arc<Cluster>>, bytes: axum::body::Bytes) -> ApiResult {
    let b: PeerBody = body(
        &bytes,
        r#"{"node_id": 4, "raft_addr": "host:port", "api_addr": "host:port", "role": "learner|voter"}"#,
    )?;
    let spec = b.spec()?;
    let voter = b.voter()?;
    c.add_member(&spec, voter).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"node_id": spec.node_id, "role": if voter {"voter"} else {"learner"}, "added": true})),
    )
        .into_response())
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse::<u64>().ok().filter(|i| *i > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            format!("node id must be a positive integer, got `{id}`"),
            Value::Null,
        )
    })
}

async fn promote(State(c): State<Arc<Cluster>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    c.promote(id).await?;
    Ok(axum::Json(json!({"node_id": id, "role": "voter"})).into_response())
}

/// Move every instance off a node before maintenance: the leader places nothing on it and
/// re-places what it runs on the other nodes.
async fn drain(State(c): State<Arc<Cluster>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    c.set_drain(id, true).await?;
    Ok(axum::Json(json!({"node_id": id, "draining": true})).into_response())
}

/// Let the leader place instances on a node again (nothing moves back by itself).
async fn undrain(State(c): State<Arc<Cluster>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    c.set_drain(id, false).await?;
    Ok(axum::Json(json!({"node_id": id, "draining": false})).into_response())
}

async fn remove_member(State(c): State<Arc<Cluster>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    c.remove_member(id).await?;
    Ok(axum::Json(json!({"node_id": id, "removed": true})).into_response())
}

#[derive(Deserialize)]
struct TransferBody {
    node_id: u64,
}

async fn transfer_leader(State(c): State<Arc<Cluster>>, bytes: axum::body::Bytes) -> ApiResult {
    let b: TransferBody = body(&bytes, r#"{"node_id": 2}"#)?;
    if !c.status().voters.contains_key(&b.node_id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            format!("node {} is not a voter; only voters can lead", b.node_id),
            Value::Null,
        ));
    }
    c.raft()
        .transfer_leader(b.node_id)
        .await
        .map_err(ClusterError::from)?;
    // Report once the new leader is known (bounded).
    let mut w = c.raft().leader_watch();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        w.wait_for(|l| *l == Some(b.node_id)),
    )
    .await;
    Ok(
        axum::Json(json!({"requested": true, "to": b.node_id, "leader_id": c.status().leader_id}))
            .into_response(),
    )
}

#[derive(Deserialize)]
struct SnapshotQuery {
    /// Also purge the log up to the snapshot.
    #[serde(default)]
    purge: bool,
}

async fn snapshot(State(c): State<Arc<Cluster>>, Query(q): Query<SnapshotQuery>) -> ApiResult {
    c.raft()
        .trigger_snapshot()
        .await
        .map_err(ClusterError::from)?;
    let s = c.status();
    if q.purge
        && let Some(i) = s.snapshot_index
    {
        c.raft().purge_log(i).await.map_err(ClusterError::from)?;
    }
    let s = c.status();
    Ok(axum::Json(json!({"node_id": s.node_id, "snapshot_index": s.snapshot_index, "purged_index": s.purged_index}))
        .into_response())
}
