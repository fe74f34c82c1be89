//! The `hangar_*` management tools (MCP Hangar's names, arguments and result shapes,
//! inventory §4.3), served by the aggregate front door next to the upstream tools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Ctx, Gateway, Scope};
use crate::config::{BoxFuture, ReloadError, ReloadReport, Reloader, Requester};
use crate::jsonrpc::{Id, raw};
use crate::routing::BreakerState;
use crate::runtime::ServerState;
use crate::runtime::view::{GroupView, MemberRow, ServerRow};

/// Reloads the configuration for `hangar_reload_config` (the config room's [`Reloader`]).
pub trait ConfigReloader: Send + Sync {
    /// Reload now, on behalf of the tool.
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, ReloadError>>;
}

impl ConfigReloader for Reloader {
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, ReloadError>> {
        Box::pin(Reloader::reload(self, Requester::Tool))
    }
}

/// Names of the management tools.
pub const TOOLS: &[&str] = &[
    "hangar_list",
    "hangar_status",
    "hangar_details",
    "hangar_tools",
    "hangar_health",
    "hangar_start",
    "hangar_stop",
    "hangar_warm",
    "hangar_group_list",
    "hangar_group_rebalance",
    "hangar_reload_config",
    "hangar_call",
];

/// Tool definitions for `tools/list`.
pub fn definitions() -> Vec<Value> {
    let obj = |props: Value, req: &[&str]| json!({"type": "object", "properties": props, "required": req});
    let server = json!({"mcp_server": {"type": "string", "description": "MCP server or group id"}});
    vec![
        json!({"name": "hangar_list", "description": "List MCP servers and groups with their state",
               "inputSchema": obj(json!({"state_filter": {"type": "string", "enum": ["cold", "ready", "degraded", "dead"]}}), &[])}),
        json!({"name": "hangar_status", "description": "Status dashboard of every MCP server", "inputSchema": obj(json!({}), &[])}),
        json!({"name": "hangar_details", "description": "Details of one MCP server or group", "inputSchema": obj(server.clone(), &["mcp_server"])}),
        json!({"name": "hangar_tools", "description": "Tools of one MCP server (starts it if needed)", "inputSchema": obj(server.clone(), &["mcp_server"])}),
        json!({"name": "hangar_health", "description": "Health summary", "inputSchema": obj(json!({}), &[])}),
        json!({"name": "hangar_start", "description": "Start an MCP server or every member of a group", "inputSchema": obj(server.clone(), &["mcp_server"])}),
        json!({"name": "hangar_stop", "description": "Stop an MCP server or every member of a group", "inputSchema": obj(server, &["mcp_server"])}),
        json!({"name": "hangar_warm", "description": "Pre-start MCP servers (comma list; all when omitted)",
               "inputSchema": obj(json!({"mcp_servers": {"type": "string"}}), &[])}),
        json!({"name": "hangar_group_list", "description": "List groups with members and rotation", "inputSchema": obj(json!({}), &[])}),
        json!({"name": "hangar_group_rebalance", "description": "Put every member back in rotation and reset the group's circuit",
               "inputSchema": obj(json!({"group": {"type": "string"}}), &["group"])}),
        json!({"name": "hangar_reload_config", "description": "Reload the configuration file (validated first)",
               "inputSchema": obj(json!({"graceful": {"type": "boolean"}}), &[])}),
        json!({"name": "hangar_call", "description": "Call up to 100 tools in one batch",
               "inputSchema": obj(json!({
                   "calls": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "object", "properties": {
                       "mcp_server": {"type": "string"}, "tool": {"type": "string"}, "arguments": {"type": "object"},
                       "timeout": {"type": "number"}}, "required": ["mcp_server", "tool"]}},
                   "max_concurrency": {"type": "integer", "minimum": 1, "maximum": 50},
                   "timeout": {"type": "number", "minimum": 1, "maximum": 300},
                   "fail_fast": {"type": "boolean"},
                   "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10}}), &["calls"])}),
    ]
}

fn ok(v: Value) -> Value {
    json!({"content": [{"type": "text", "text": v.to_string()}], "structuredContent": v})
}

fn tool_error(msg: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": msg.into()}], "isError": true})
}

fn indicator(s: ServerState) -> &'static str {
    match s {
        ServerState::Ready => "[READY]",
        ServerState::Cold => "[COLD]",
        ServerState::Initializing => "[STARTING]",
        ServerState::Degraded => "[DEGRADED]",
        ServerState::Dead => "[DEAD]",
    }
}

impl Gateway {
    /// The view of group `id` (REST and the management tools show the same one).
    pub fn group_view(&self, id: &str) -> Option<GroupView> {
        let g = self.runtime.group(id)?;
        let spec = g.spec();
        let members = self
            .router
            .members(id)
            .into_iter()
            .map(|m| {
                let state = self.runtime.instance(&m.id).map(|i| i.state());
                MemberRow::new(
                    m.id,
                    state,
                    m.in_rotation,
                    m.weight,
                    m.priority,
                    m.consecutive_failures,
                )
            })
            .collect();
        let breaker = self.router.breaker_state(id);
        Some(GroupView::new(
            id,
            &spec,
            members,
            breaker.as_str(),
            breaker == BreakerState::Open,
        ))
    }

    fn server_row(&self, id: &str) -> Option<Value> {
        let s = self.runtime.instance(id)?.status();
        serde_json::to_value(ServerRow::of(&s)).ok()
    }

    fn group_row(&self, id: &str) -> Option<Value> {
        serde_json::to_value(self.group_view(id)?).ok()
    }

    /// Run one management tool. Returns a tool result (errors are tool errors, `isError`).
    pub(super) async fn management(&self, ctx: &Ctx, name: &str, args: &Value) -> Value {
        let target = args.get("mcp_server").and_then(Value::as_str).unwrap_or("");
        match name {
            "hangar_list" => {
                let filter = args.get("state_filter").and_then(Value::as_str);
                if let Some(f) = filter
                    && ServerState::parse(f).is_none()
                {
                    return tool_error(format!(
                        "state_filter must be cold, ready, degraded or dead (got '{f}')"
                    ));
                }
                let servers: Vec<Value> = self
                    .runtime
                    .instances()
                    .iter()
                    .filter(|i| filter.is_none_or(|f| i.state().as_str() == f))
                    .filter_map(|i| self.server_row(i.id()))
                    .collect();
                let groups: Vec<Value> = self
                    .runtime
                    .groups()
                    .iter()
                    .filter_map(|g| self.group_row(g.id()))
                    .map(|g| json!({"group_id": g["group_id"], "state": g["state"], "strategy": g["strategy"],
                                    "healthy_count": g["healthy_count"], "total_members": g["total_members"]}))
                    .collect();
                ok(json!({"mcp_servers": servers, "groups": groups, "runtime_mcp_servers": []}))
            }
            "hangar_status" => {
                let mut lines = Vec::new();
                let mut rows = Vec::new();
                let mut healthy = 0;
                for i in self.runtime.instances() {
                    let s = i.status();
                    healthy += usize::from(s.state == ServerState::Ready);
                    lines.push(format!("{} {} ({})", indicator(s.state), s.id, s.mode));
                    rows.push(json!({"id": s.id, "indicator": indicator(s.state), "state": s.state.as_str(),
                                     "mode": s.mode, "last_used": s.last_used}));
                }
                let groups: Vec<Value> = self
                    .runtime
                    .groups()
                    .iter()
                    .filter_map(|g| self.group_row(g.id()))
                    .collect();
                let uptime = self.runtime.uptime().as_secs_f64();
                ok(
                    json!({"mcp_servers": rows, "groups": groups, "runtime_mcp_servers": [],
                          "summary": {"healthy_mcp_servers": healthy, "total_mcp_servers": rows.len(),
                                      "uptime": format!("{:.0}s", uptime), "uptime_seconds": uptime},
                          "formatted": lines.join("\n")}),
                )
            }
            "hangar_details" => {
                if let Some(g) = self.group_row(target) {
                    return ok(g);
                }
                let Some(inst) = self.runtime.instance(target) else {
                    return tool_error(format!("unknown_mcp_server: {target}"));
                };
                let s = inst.status();
                let tools: Vec<String> = inst
                    .catalog()
                    .map(|c| c.tools.iter().map(|t| t.key.clone()).collect())
                    .unwrap_or_default();
                ok(
                    json!({"mcp_server": s.id, "state": s.state.as_str(), "mode": s.mode, "alive": s.alive,
                          "tools": tools, "idle_time": (crate::telemetry::unix_now() - s.last_used).max(0.0),
                          "health": {"consecutive_failures": s.consecutive_failures, "total_failures": s.total_failures,
                                     "last_error": s.last_error, "next_recovery_at": s.next_recovery_at},
                          "meta": {"starts": s.starts, "pid": s.pid, "started_at": s.started_at}}),
                )
            }
            "hangar_tools" => {
                let candidates = match self.router.candidates(target) {
                    Ok(c) => c,
                    Err(_) => return tool_error(format!("unknown_mcp_server: {target}")),
                };
                let is_group = self.runtime.group(target).is_some();
                // Without the tools the tool access policies refuse to this caller.
                let (base, members) = self.list_rules(ctx, target);
                for inst in candidates {
                    if inst.ensure_ready().await.is_ok() {
                        let tools: Vec<Value> = inst
                            .catalog()
                            .map(|c| {
                                c.tools
                                    .iter()
                                    .filter(|t| {
                                        crate::auth::policy::listed(&base, &members, &t.key)
                                    })
                                    .map(|t| {
                                        json!({"name": t.key, "description": t.field("description"),
                                                    "inputSchema": t.field("inputSchema")})
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let mut v = json!({"mcp_server": target, "state": inst.state().as_str(), "tools": tools});
                        if is_group {
                            v["group"] = json!(true);
                        }
                        return ok(v);
                    }
                }
                tool_error(format!("{target} could not be started; see hangar_details"))
            }
            "hangar_health" => {
                let mut by_state = serde_json::Map::new();
                for i in self.runtime.instances() {
                    let k = i.state().as_str().to_owned();
                    let n = by_state.get(&k).and_then(Value::as_u64).unwrap_or(0) + 1;
                    by_state.insert(k, json!(n));
                }
                let groups: Vec<Value> = self
                    .runtime
                    .groups()
                    .iter()
                    .filter_map(|g| self.group_row(g.id()))
                    .collect();
                let mut g_by_state = serde_json::Map::new();
                for g in &groups {
                    let k = g["state"].as_str().unwrap_or("unknown").to_owned();
                    let n = g_by_state.get(&k).and_then(Value::as_u64).unwrap_or(0) + 1;
                    g_by_state.insert(k, json!(n));
                }
                // Healthy: every server is usable and every group at full strength; degraded:
                // some server is DEGRADED/DEAD or a group is short of members.
                let sick = self
                    .runtime
                    .instances()
                    .iter()
                    .any(|i| matches!(i.state(), ServerState::Degraded | ServerState::Dead))
                    || groups.iter().any(|g| g["state"] != "healthy");
                ok(json!({"status": if sick { "degraded" } else { "healthy" },
                          "mcp_servers": {"total": self.runtime.instances().len(), "by_state": by_state},
                          "groups": {"total": groups.len(), "by_state": g_by_state,
                                     "total_members": groups.iter().map(|g| g["total_members"].as_u64().unwrap_or(0)).sum::<u64>(),
                                     "healthy_members": groups.iter().map(|g| g["healthy_count"].as_u64().unwrap_or(0)).sum::<u64>()},
                          "security": {"rate_limiting": self.rate_limiting()}}))
            }
            "hangar_start" => {
                if let Some(g) = self.runtime.group(target) {
                    let members = g.spec().members;
                    let mut started = 0;
                    for m in &members {
                        if let Some(i) = self.runtime.instance(&m.id) {
                            started += usize::from(self.router.start(&i).await.is_ok());
                        }
                    }
                    let row = self.group_row(target).unwrap_or(Value::Null);
                    return ok(
                        json!({"group": target, "state": row["state"], "members_started": started,
                                     "healthy_count": row["healthy_count"], "total_members": members.len()}),
                    );
                }
                let Some(inst) = self.runtime.instance(target) else {
                    return tool_error(format!("unknown_mcp_server: {target}"));
                };
                match self.router.start(&inst).await {
                    Ok(()) => {
                        let tools = self.runtime.tool_names(&inst);
                        ok(
                            json!({"mcp_server": target, "state": inst.status().state.as_str(), "tools": tools}),
                        )
                    }
                    Err(e) => tool_error(e.to_string()),
                }
            }
            "hangar_stop" => {
                if let Some(g) = self.runtime.group(target) {
                    for m in g.spec().members {
                        if let Some(i) = self.runtime.instance(&m.id) {
                            i.stop("manual_stop").await;
                        }
                    }
                    return ok(json!({"group": target, "state": "inactive", "stopped": true}));
                }
                let Some(inst) = self.runtime.instance(target) else {
                    return tool_error(format!("unknown_mcp_server: {target}"));
                };
                inst.stop("manual_stop").await;
                ok(json!({"stopped": target, "reason": "manual_stop"}))
            }
            "hangar_warm" => {
                let wanted: Option<Vec<String>> =
                    args.get("mcp_servers").and_then(Value::as_str).map(|s| {
                        s.split(',')
                            .map(|x| x.trim().to_owned())
                            .filter(|x| !x.is_empty())
                            .collect()
                    });
                let ids: Vec<String> = match wanted {
                    Some(w) => w,
                    None => self
                        .runtime
                        .instances()
                        .iter()
                        .map(|i| i.id().to_owned())
                        .collect(),
                };
                let (mut warmed, mut already, mut failed) = (Vec::new(), Vec::new(), Vec::new());
                for id in ids {
                    let Some(inst) = self.runtime.instance(&id) else {
                        if self.runtime.group(&id).is_none() {
                            failed.push(json!({"id": id, "error": "unknown MCP server"}));
                        }
                        continue;
                    };
                    if inst.state() == ServerState::Ready {
                        already.push(id);
                        continue;
                    }
                    match inst.ensure_ready().await {
                        Ok(_) => warmed.push(id),
                        Err(e) => failed.push(json!({"id": id, "error": e.to_string()})),
                    }
                }
                let summary = format!(
                    "{} warmed, {} already warm, {} failed",
                    warmed.len(),
                    already.len(),
                    failed.len()
                );
                ok(
                    json!({"warmed": warmed, "already_warm": already, "failed": failed, "summary": summary}),
                )
            }
            "hangar_group_list" => {
                let groups: Vec<Value> = self
                    .runtime
                    .groups()
                    .iter()
                    .filter_map(|g| self.group_row(g.id()))
                    .collect();
                ok(json!({ "groups": groups }))
            }
            "hangar_group_rebalance" => {
                let group = args.get("group").and_then(Value::as_str).unwrap_or("");
                if self.runtime.group(group).is_none() {
                    return tool_error(format!("unknown_group: {group}"));
                }
                self.router.rebalance(group);
                let row = self.group_row(group).unwrap_or(Value::Null);
                let in_rotation: Vec<Value> = row["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter(|x| x["in_rotation"] == json!(true))
                            .map(|x| x["id"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                ok(
                    json!({"group_id": group, "state": row["state"], "healthy_count": row["healthy_count"],
                          "total_members": row["total_members"], "members_in_rotation": in_rotation}),
                )
            }
            "hangar_reload_config" => {
                let reloader = self.reloader.read().clone();
                let Some(r) = reloader else {
                    return tool_error("this node has no configuration file to reload");
                };
                match r.reload().await {
                    Ok(report) => {
                        let d = &report.diff;
                        ok(
                            json!({"status": report.status, "mcp_servers_added": d.added,
                            "mcp_servers_removed": d.removed, "mcp_servers_updated": d.updated,
                            "mcp_servers_unchanged": d.unchanged, "duration_ms": report.duration_ms,
                            "message": "configuration reloaded"}),
                        )
                    }
                    Err(e) => {
                        let v = json!({"status": "failed", "message": e.to_string(), "error_type": "ConfigurationReloadFailed"});
                        json!({"content": [{"type": "text", "text": v.to_string()}], "structuredContent": v, "isError": true})
                    }
                }
            }
            "hangar_call" => self.batch(ctx, args).await,
            other => tool_error(format!("unknown management tool '{other}'")),
        }
    }

    async fn batch(&self, ctx: &Ctx, args: &Value) -> Value {
        let mut problems = Vec::new();
        let calls = args
            .get("calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if calls.is_empty() || calls.len() > 100 {
            problems.push(json!({"index": null, "field": "calls", "message": "calls must hold 1 to 100 entries"}));
        }
        let num = |k: &str, d: f64, lo: f64, hi: f64, problems: &mut Vec<Value>| -> f64 {
            match args.get(k) {
                None | Some(Value::Null) => d,
                Some(v) => match v.as_f64() {
                    Some(x) if (lo..=hi).contains(&x) => x,
                    _ => {
                        problems.push(json!({"index": null, "field": k, "message": format!("{k} must be between {lo} and {hi}")}));
                        d
                    }
                },
            }
        };
        let max_concurrency = num("max_concurrency", 10.0, 1.0, 50.0, &mut problems) as usize;
        let timeout = num("timeout", 60.0, 1.0, 300.0, &mut problems);
        let max_attempts = num("max_attempts", 1.0, 1.0, 10.0, &mut problems) as u32;
        let fail_fast = args
            .get("fail_fast")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (i, c) in calls.iter().enumerate() {
            for f in ["mcp_server", "tool"] {
                if c.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    problems.push(json!({"index": i, "field": f, "message": format!("{f} (string) is required")}));
                }
            }
            if c.get("arguments").is_some_and(|a| !a.is_object()) {
                problems.push(json!({"index": i, "field": "arguments", "message": "arguments must be an object"}));
            }
        }
        let batch_id = uuid::Uuid::new_v4().to_string();
        if !problems.is_empty() {
            let v = json!({"batch_id": batch_id, "success": false, "validation_errors": problems});
            return json!({"content": [{"type": "text", "text": v.to_string()}], "structuredContent": v, "isError": true});
        }
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(timeout);
        let stop = tokio_util::sync::CancellationToken::new();
        let sub_ctx = Arc::new(Ctx {
            scope: Scope::Aggregate,
            out: None,
            cancel_key: format!("batch/{}/{batch_id}", ctx.cancel_key),
            grants: ctx.grants.clone(),
            caller: ctx.caller.clone(),
        });
        let sem = Arc::new(tokio::sync::Semaphore::new(max_concurrency));
        let mut runs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send + '_>>> =
            Vec::new();
        for (index, c) in calls.into_iter().enumerate() {
            let stop = stop.clone();
            let sub_ctx = sub_ctx.clone();
            let batch_id = batch_id.clone();
            let sem = sem.clone();
            runs.push(Box::pin(async move {
                let _permit = sem.acquire_owned().await.ok();
                let server = c["mcp_server"].as_str().unwrap_or_default().to_owned();
                let tool = c["tool"].as_str().unwrap_or_default().to_owned();
                let per_call = c.get("timeout").and_then(Value::as_f64).map(Duration::from_secs_f64);
                let call_id = format!("{batch_id}-{index}");
                let started = Instant::now();
                let mut attempts = 0;
                let mut last: (bool, Value, Value, Value) = (false, Value::Null, Value::Null, Value::Null);
                while attempts < max_attempts {
                    if stop.is_cancelled() {
                        last = (false, Value::Null, json!("cancelled (fail_fast)"), json!("CancellationError"));
                        break;
                    }
                    attempts += 1;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let limit = per_call.map_or(remaining, |p| p.min(remaining));
                    let params = json!({"name": tool, "arguments": c.get("arguments").cloned().unwrap_or(json!({}))});
                    let mut obj = crate::jsonrpc::raw_object(Some(&raw(&params))).unwrap_or_default();
                    obj.insert("name".into(), raw(&json!(tool)));
                    let id = Id::Str(call_id.clone());
                    let fut = self.call_tool(&sub_ctx, &server, &tool, obj, &id);
                    let res = tokio::select! {
                        r = tokio::time::timeout(limit, fut) => r,
                        _ = stop.cancelled() => {
                            last = (false, Value::Null, json!("cancelled (fail_fast)"), json!("CancellationError"));
                            break;
                        }
                    };
                    match res {
                        Err(_) => last = (false, Value::Null, json!("Global timeout exceeded"), json!("TimeoutError")),
                        Ok(Ok(r)) => {
                            let v: Value = serde_json::from_str(r.get()).unwrap_or(Value::Null);
                            if v.get("isError") == Some(&json!(true)) {
                                last = (false, v, json!("the tool reported an error"), json!("ToolInvocationError"));
                            } else {
                                last = (true, v, Value::Null, Value::Null);
                                break;
                            }
                        }
                        Ok(Err(e)) => {
                            let et = e
                                .data
                                .as_ref()
                                .and_then(|d| serde_json::from_str::<Value>(d.get()).ok())
                                .and_then(|d| d.get("error_type").cloned())
                                .unwrap_or_else(|| json!(if e.message.starts_with("Unknown tool") { "ToolNotFoundError" } else { "ToolInvocationError" }));
                            last = (false, Value::Null, json!(e.message), et);
                        }
                    }
                }
                if !last.0 && fail_fast {
                    stop.cancel();
                }
                let mut r = json!({"index": index, "call_id": call_id, "success": last.0, "result": last.1,
                                   "error": last.2, "error_type": last.3, "elapsed_ms": started.elapsed().as_millis() as u64});
                if max_attempts > 1 {
                    r["retry_metadata"] = json!({"attempts": attempts, "retries": attempts.saturating_sub(1)});
                }
                r
            }));
        }
        let mut results: Vec<Value> = futures::future::join_all(runs).await;
        results.sort_by_key(|r| r["index"].as_u64().unwrap_or(0));
        let succeeded = results
            .iter()
            .filter(|r| r["success"] == json!(true))
            .count();
        let v = json!({"batch_id": batch_id, "success": succeeded == results.len(), "total": results.len(),
                       "succeeded": succeeded, "failed": results.len() - succeeded,
                       "elapsed_ms": t0.elapsed().as_millis() as u64, "results": results});
        ok(v)
    }
}
