//! `/api/config/{validate,diff,apply,export,reload}`: the desired configuration of the
//! cluster, behind `hangarctl config`. Bodies are config files (YAML or JSON text).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::config;
use crate::telemetry::events::DomainEvent;

fn parse(body: &[u8]) -> Result<config::Config, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the body must be the config file as UTF-8 text"))?;
    let cfg = config::load_str(text, &|k| std::env::var(k).ok())?;
    let problems = config::command_problems(&cfg.mcp_servers, &config::CommandPolicy::from_env());
    if !problems.is_empty() {
        return Err(config::ConfigError::Invalid { problems }.into());
    }
    Ok(cfg)
}

/// `POST /api/config/validate`: every problem with its path (200 with `valid: false`).
pub(super) async fn validate(body: axum::body::Bytes) -> ApiResult {
    match parse(&body) {
        Ok(cfg) => Ok(axum::Json(json!({"valid": true, "problems": [],
            "mcp_servers": cfg.mcp_servers.len()}))
        .into_response()),
        Err(e) => Ok(
            axum::Json(json!({"valid": false, "problems": e.details()["problems"]}))
                .into_response(),
        ),
    }
}

/// The file-sourced servers of the cluster now vs. in `cfg`.
fn diff_against(st: &ApiState, cfg: &config::Config) -> config::ConfigDiff {
    let current = st.cluster.server_records();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut updated = Vec::new();
    let mut unchanged = Vec::new();
    for (id, raw) in &cfg.raw_servers {
        match current.get(id) {
            None => added.push(id.clone()),
            Some((spec, _, _)) if spec == raw => unchanged.push(id.clone()),
            Some(_) => updated.push(id.clone()),
        }
    }
    for (id, (_, _, source)) in &current {
        if source.starts_with("file:") && !cfg.raw_servers.contains_key(id) {
            removed.push(id.clone());
        }
    }
    config::ConfigDiff {
        added,
        removed,
        updated,
        unchanged,
    }
}

/// `POST /api/config/diff`: what applying the file would change.
pub(super) async fn diff(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let cfg = parse(&body)?;
    Ok(axum::Json(json!(diff_against(&st, &cfg))).into_response())
}

/// `POST /api/config/apply`: make the file the cluster's desired config (file-sourced
/// servers are replaced; servers added through the API stay).
pub(super) async fn apply(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let cfg = parse(&body)?;
    let d = diff_against(&st, &cfg);
    let hash = config::sha256_hex(&body);
    st.cluster
        .apply_file_config(&cfg.raw_servers, &cfg.rate_limits, &hash)
        .await?;
    st.runtime()
        .events()
        .emit(DomainEvent::ConfigurationReloaded {
            config_path: None,
            requested_by: "api_apply".to_owned(),
            mcp_servers_added: d.added.clone(),
            mcp_servers_removed: d.removed.clone(),
            mcp_servers_updated: d.updated.clone(),
            mcp_servers_unchanged: None,
            reload_duration_ms: None,
        });
    let (version, _) = st.cluster.config_version();
    let mut out = json!(d);
    out["status"] = json!("applied");
    out["config_version"] = json!(version);
    Ok(axum::Json(out).into_response())
}

/// `GET /api/config/export`: the desired servers as a config document (JSON, which is YAML),
/// with `${VAR}` references as written and each server's source.
pub(super) async fn export(State(st): State<ApiState>) -> ApiResult {
    // Linearizable: an export right after a write on another node includes that write.
    st.cluster.catch_up().await?;
    let records = st.cluster.server_records();
    let (version, file_hash) = st.cluster.config_version();
    let servers: serde_json::Map<String, Value> = records
        .iter()
        .map(|(id, (spec, _, _))| (id.clone(), spec.clone()))
        .collect();
    let sources: serde_json::Map<String, Value> = records
        .iter()
        .map(|(id, (_, v, src))| (id.clone(), json!({"source": src, "config_version": v})))
        .collect();
    Ok(axum::Json(json!({
        "mcp_servers": servers,
        "_hangar": {"config_version": version, "config_file_hash": file_hash, "servers": sources},
    }))
    .into_response())
}

/// `POST /api/config/reload`: reload the file this node was started with.
pub(super) async fn reload(State(st): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::validation(
                format!("body must be JSON like {{\"graceful\": true}}: {e}"),
                Value::Null,
            )
        })?;
        if v.get("config_path").is_some() {
            return Err(ApiError::validation(
                "config_path cannot be changed through the API; edit the file the node was started with",
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
    let report = r.reload(config::Requester::Api).await?;
    Ok(axum::Json(report).into_response())
}
