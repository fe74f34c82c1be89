//! `/api/auth/policies`: tool access policies set through the API, replicated through Raft
//! (`PutToolPolicy` / `DeleteToolPolicy`) and enforced by every node's gateway together with
//! the config file's policies (the merge is `auth::policy`'s).
//!
//! A policy is addressed by scope and target: `global/*`, `server/<id>` (also when the server
//! is a group member and a call is routed to it), `group/<id>`, `principal/<API key id, a key's
//! principal or a JWT subject>`, `role/<name>`. Its body is `{"allow": [globs], "deny": [globs]}`
//! (`allow_list`/`deny_list` accepted too). A write is acknowledged once every member applied
//! it (at most 5 s; members that did not confirm are named).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hangar_raft::Command;
use hangar_raft::state::ToolPolicy;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::auth::policy;
use crate::telemetry::events::DomainEvent;

/// How long a write waits for every member to apply it.
const APPLY_WAIT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default, alias = "allow_list")]
    allow: Vec<String>,
    #[serde(default, alias = "deny_list")]
    deny: Vec<String>,
    #[serde(default, alias = "approval_list")]
    approval: Vec<String>,
}

/// A policy as the API shows it (`*` as the target of `global`).
fn policy_json(p: &ToolPolicy) -> Value {
    json!({
        "scope": p.scope,
        "target": shown_target(&p.scope, &p.target),
        "allow": p.allow,
        "deny": p.deny,
        "approval": p.approval,
    })
}

fn shown_target<'a>(scope: &str, target: &'a str) -> &'a str {
    if scope == "global" { "*" } else { target }
}

/// The scope and target of a path, checked; the target as stored (empty for `global`).
fn address(scope: &str, target: &str) -> Result<String, ApiError> {
    if let Some(problem) = policy::scope_problem(scope, target) {
        return Err(ApiError::validation(
            problem,
            json!({"scope": scope, "target": target}),
        ));
    }
    Ok(if scope == "global" {
        String::new()
    } else {
        target.to_owned()
    })
}

fn not_found(scope: &str, target: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ToolPolicyNotFoundError",
        format!("no tool access policy for {scope}/{target}; GET /api/auth/policies lists them"),
        json!({"scope": scope, "target": target}),
    )
}

/// The problem with a body's lists, if any, naming the field, the index and the pattern.
fn lists_problem(b: &PutBody) -> Option<ApiError> {
    if !b.approval.is_empty() {
        return Some(ApiError::validation(
            "approval globs are not supported: Hangar has no approval gate (calls of such tools would be refused); remove `approval`, or deny the tools",
            json!({"field": "approval"}),
        ));
    }
    if b.allow.is_empty() && b.deny.is_empty() {
        return Some(ApiError::validation(
            "a policy needs at least one `allow` or `deny` pattern (DELETE removes a policy)",
            json!({"fields": ["allow", "deny"]}),
        ));
    }
    for (field, list) in [("allow", &b.allow), ("deny", &b.deny)] {
        if list.len() > policy::MAX_PATTERNS {
            return Some(ApiError::validation(
                format!(
                    "`{field}` has {} patterns; at most {} are accepted",
                    list.len(),
                    policy::MAX_PATTERNS
                ),
                json!({"field": field}),
            ));
        }
        for (i, pattern) in list.iter().enumerate() {
            if let Some(problem) = policy::glob_problem(pattern) {
                return Some(ApiError::validation(
                    format!("{field}[{i}] `{pattern}`: {problem}"),
                    json!({"field": field, "index": i, "pattern": pattern}),
                ));
            }
        }
    }
    None
}

/// A `server` policy naming a group, or a `group` policy naming a server, would never apply.
fn kind_problem(st: &ApiState, scope: &str, target: &str) -> Option<ApiError> {
    let rt = st.runtime();
    let (is_group, is_server) = (rt.group(target).is_some(), rt.instance(target).is_some());
    let problem = match scope {
        "server" if is_group => {
            format!("`{target}` is a group: use /api/auth/policies/group/{target}")
        }
        "group" if is_server && !is_group => {
            format!("`{target}` is a server, not a group: use /api/auth/policies/server/{target}")
        }
        _ => return None,
    };
    Some(ApiError::validation(
        problem,
        json!({"scope": scope, "target": target}),
    ))
}

/// Wait until every member applied the last write; the body says who did not in time.
async fn acknowledge(st: &ApiState, mut body: Value) -> Value {
    let index = st.cluster.acknowledged_index().await;
    let lagging = st.cluster.wait_applied_everywhere(index, APPLY_WAIT).await;
    if !lagging.is_empty() {
        body["not_yet_applied_on"] = json!(lagging);
        body["warning"] = json!(
            "these members did not confirm the change within 5 s (unreachable?); they enforce it once they catch up"
        );
    }
    body
}

/// `GET /api/auth/policies`.
pub(super) async fn list(State(st): State<ApiState>) -> ApiResult {
    let mut policies: Vec<Value> = st.cluster.raft().read(|s| {
        s.policies
            .values()
            .map(|p| {
                let mut v = policy_json(p);
                v["source"] = json!("api");
                v
            })
            .collect()
    });
    policies.extend(config_policies(&st));
    Ok(axum::Json(json!({"count": policies.len(), "policies": policies})).into_response())
}

/// The config file's policies (`source: config`): each server's and group's `tools`, and each
/// group member entry's (`scope: member`, `target: <group>/<member>`). They are changed in the
/// file, not through this API.
fn config_policies(st: &ApiState) -> Vec<Value> {
    let runtime = st.runtime();
    let shown = |scope: &str, target: &str, p: &crate::config::ToolPolicy| {
        json!({"scope": scope, "target": target, "allow": p.allow_list, "deny": p.deny_list,
            "approval": p.approval_list, "source": "config"})
    };
    let mut out = Vec::new();
    for id in runtime.specs().keys() {
        let group = runtime.group(id);
        let kind = if group.is_some() { "group" } else { "server" };
        for p in crate::gateway::naming::policies_of(runtime, id) {
            out.push(shown(kind, id, &p));
        }
        for m in group.map(|g| g.spec().members).unwrap_or_default() {
            if let Some(p) = &m.tools {
                out.push(shown("member", &format!("{id}/{}", m.id), p));
            }
        }
    }
    out
}

/// `GET /api/auth/policies/{scope}/{target}`.
pub(super) async fn get(
    State(st): State<ApiState>,
    Path((scope, target)): Path<(String, String)>,
) -> ApiResult {
    let stored = address(&scope, &target)?;
    match st
        .cluster
        .raft()
        .read(|s| s.policy(&scope, &stored).map(policy_json))
    {
        Some(p) => Ok(axum::Json(json!({"policy": p})).into_response()),
        None => Err(not_found(&scope, &target)),
    }
}

/// `PUT /api/auth/policies/{scope}/{target}`: create or replace.
pub(super) async fn put(
    State(st): State<ApiState>,
    Path((scope, target)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let stored = address(&scope, &target)?;
    let b: PutBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            format!("body must be {{\"allow\": [tool globs], \"deny\": [tool globs]}}: {e}"),
            Value::Null,
        )
    })?;
    if let Some(e) = lists_problem(&b).or_else(|| kind_problem(&st, &scope, &target)) {
        return Err(e);
    }
    let p = ToolPolicy {
        scope: scope.clone(),
        target: stored,
        allow: b.allow,
        deny: b.deny,
        approval: Vec::new(),
    };
    st.cluster
        .propose(Command::PutToolPolicy { policy: p.clone() })
        .await?;
    st.runtime()
        .events()
        .emit(DomainEvent::ToolAccessPolicySet {
            scope: scope.clone(),
            target: shown_target(&scope, &target).to_owned(),
            allow_list: p.allow.clone(),
            deny_list: p.deny.clone(),
        });
    let body = acknowledge(&st, json!({"policy": policy_json(&p)})).await;
    Ok(axum::Json(body).into_response())
}

/// `DELETE /api/auth/policies/{scope}/{target}`.
pub(super) async fn delete(
    State(st): State<ApiState>,
    Path((scope, target)): Path<(String, String)>,
) -> ApiResult {
    let stored = address(&scope, &target)?;
    if st
        .cluster
        .raft()
        .read(|s| s.policy(&scope, &stored).is_none())
    {
        return Err(not_found(&scope, &target));
    }
    st.cluster
        .propose(Command::DeleteToolPolicy {
            scope: scope.clone(),
            target: stored,
        })
        .await
        .map_err(|e| match e {
            crate::cluster::ClusterError::Rejected {
                code: crate::cluster::RejectCode::NotFound,
                ..
            } => not_found(&scope, &target),
            other => other.into(),
        })?;
    st.runtime()
        .events()
        .emit(DomainEvent::ToolAccessPolicyCleared {
            scope: scope.clone(),
            target: shown_target(&scope, &target).to_owned(),
        });
    let body = acknowledge(
        &st,
        json!({"deleted": {"scope": scope, "target": shown_target(&scope, &target)}}),
    )
    .await;
    Ok(axum::Json(body).into_response())
}
