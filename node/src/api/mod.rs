//! API room: every HTTP route of a node except the MCP front door — REST under `/api`
//! (MCP Hangar's shapes; `/api/cluster/*` included), the probes `/health/live|ready|startup`
//! and `/metrics` (Prometheus text format).
//!
//! Errors: [`ApiError`] in MCP Hangar's envelope,
//! `{"error":{"code":"<ErrorClass>","message":"…","details":{…}|null}}`; `error.rs` maps each
//! room's typed error to it.

pub mod bootstrap;
mod cluster;
mod config_api;
mod error;
mod groups;
mod keys;
mod limits;
mod policies;
mod servers;
mod system;

pub use error::ApiError;

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::Redirect;
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::config::{self, ServerSpec};
use crate::gateway::Gateway;
use crate::runtime::Runtime;

/// State shared by the API handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The gateway (for catalogue and group views).
    pub gateway: Arc<Gateway>,
    /// Configuration reloads (None in tests without a file).
    pub reloader: Option<Arc<config::Reloader>>,
    /// The cluster: desired config changes go through Raft.
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Authentication and authorization (its file settings, e.g. `auth.role_assignments`).
    pub auth: Arc<crate::auth::Auth>,
}

impl ApiState {
    fn runtime(&self) -> &Arc<Runtime> {
        self.gateway.runtime()
    }
}

/// The `/api`, `/health` and `/metrics` routes.
pub fn routes(state: ApiState) -> Router {
    let cluster = cluster::routes(state.cluster.clone());
    Router::new()
        .route(
            "/api/mcp_servers/",
            get(servers::list_servers).post(servers::create_server),
        )
        .route(
            "/api/mcp_servers",
            get(|| async { Redirect::temporary("/api/mcp_servers/") }),
        )
        .route(
            "/api/mcp_servers/{id}",
            get(servers::get_server).delete(servers::delete_server),
        )
        .route("/api/mcp_servers/{id}/start", post(servers::start_server))
        .route("/api/mcp_servers/{id}/stop", post(servers::stop_server))
        .route("/api/mcp_servers/{id}/tools", get(servers::server_tools))
        .route("/api/mcp_servers/{id}/logs", get(servers::server_logs))
        .route("/api/tools/", get(servers::list_tools))
        .route(
            "/api/tools",
            get(|| async { Redirect::temporary("/api/tools/") }),
        )
        .route("/api/system/", get(system::system))
        .route(
            "/api/system",
            get(|| async { Redirect::temporary("/api/system/") }),
        )
        .route(
            "/api/groups/",
            get(groups::list_groups).post(groups::create_group),
        )
        .route(
            "/api/groups",
            get(|| async { Redirect::temporary("/api/groups/") }),
        )
        .route(
            "/api/groups/{id}",
            get(groups::get_group).delete(groups::delete_group),
        )
        .route(
            "/api/groups/{id}/members",
            get(groups::group_members).post(groups::add_member),
        )
        .route(
            "/api/groups/{id}/members/{member}",
            axum::routing::delete(groups::remove_member),
        )
        .route("/api/groups/{id}/rebalance", post(groups::rebalance_group))
        .route("/api/config/reload", post(config_api::reload))
        .route("/api/config/validate", post(config_api::validate))
        .route("/api/config/diff", post(config_api::diff))
        .route("/api/config/apply", post(config_api::apply))
        .route("/api/config/export", get(config_api::export))
        .route(bootstrap::PATH, post(bootstrap::bootstrap_admin))
        .route("/api/auth/keys", get(keys::list).post(keys::create))
        .route("/api/auth/keys/{id}", axum::routing::delete(keys::revoke))
        .route("/api/auth/roles", get(keys::roles).post(keys::create_role))
        .route(
            "/api/auth/roles/{name}",
            axum::routing::delete(keys::delete_role),
        )
        .route("/api/auth/roles/assign", post(keys::assign_role))
        .route(
            "/api/auth/roles/revoke",
            post(keys::revoke_role).delete(keys::revoke_role),
        )
        .route("/api/system/me", get(keys::me))
        .route("/api/events", get(system::events))
        .route("/api/rate_limits", get(limits::list))
        .route(
            "/api/rate_limits/{id}",
            axum::routing::put(limits::put).delete(limits::delete),
        )
        .route("/api/auth/policies", get(policies::list))
        .route(
            "/api/auth/policies/{scope}/{target}",
            get(policies::get)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route("/api/events/stream", get(system::event_stream))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .route(
            "/health/live",
            get(|| async { axum::Json(json!({"status": "healthy"})) }),
        )
        .route("/health/ready", get(system::ready))
        .route("/health/startup", get(system::startup))
        .route("/metrics", get(system::metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            linearizable_reads,
        ))
        .with_state(state)
        .merge(cluster)
}

/// The header that asks for a linearizable read (`X-Hangar-Consistency: linearizable`, or the
/// query parameter `consistency=linearizable`).
pub const CONSISTENCY_HEADER: &str = "x-hangar-consistency";

/// Whether a request asks for a linearizable read.
fn wants_linearizable(req: &axum::extract::Request) -> bool {
    let header = req
        .headers()
        .get(CONSISTENCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("linearizable"));
    let query = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "consistency=linearizable"));
    header || query
}

/// Reads of replicated state (`GET /api/...`) are served from this node's applied state: fast,
/// usually a replication round behind the leader, but without bound on a node cut off from the
/// majority (it keeps answering from what it has). A client that needs to observe every write
/// acknowledged anywhere before its request (a linearizable read) asks for it; the node first
/// catches up with the leader's commit index (ReadIndex: the leader confirms it still leads
/// with a majority round), then answers. When that cannot happen (no leader, or this node is
/// cut off from the majority) it answers 503 after the operation timeout instead of stale data.
async fn linearizable_reads(
    axum::extract::State(st): axum::extract::State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.method() == axum::http::Method::GET
        && wants_linearizable(&req)
        && let Err(e) = st.cluster.catch_up().await
    {
        return ApiError::from(e).into_response();
    }
    next.run(req).await
}

async fn api_not_found(Path(rest): Path<String>) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        format!("No API route /api/{rest}; see the README for the routes Hangar serves"),
        Value::Null,
    )
}

/// A JSON object body (400 `ValidationError` otherwise).
fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "request body must be a JSON object: {e}"
        ))),
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
