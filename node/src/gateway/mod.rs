//! Gateway room: the MCP front door.
//!
//! Transport-independent dispatch lives here ([`Gateway::handle`]); `http.rs` (Streamable HTTP
//! at `/mcp` and `/servers/{id}/mcp`) and `stdio.rs` (`hangar serve --stdio`) feed it.
//! Session-less: every request is answered on its own; a client `Mcp-Session-Id` is
//! accepted and only used to correlate `notifications/cancelled`.

#[cfg(test)]
mod fuzz;
pub mod http;
pub mod management;
pub mod naming;
pub mod protocol;
pub mod stdio;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::policy::{self, Refusal, Rule};
use crate::config::Naming;
use crate::jsonrpc::{
    self, FORBIDDEN, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, Id, Kind, METHOD_NOT_FOUND,
    Message, RESOURCE_NOT_FOUND, RawObject, RpcError, TIMEOUT_ERROR, UPSTREAM_ERROR, raw,
    raw_from_object, raw_object,
};
use crate::routing::{MemberGate, RouteError, RouteRequest, Router, ServingSlot};
use crate::runtime::relay::Home;
use crate::runtime::{Instance, Runtime, RuntimeEvent, ServerState};
use crate::upstream::{CallEvent, Outcome, UpstreamError};
use naming::{Index, Route};

/// Gateway settings taken from the configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Exposed naming of tools and prompts.
    pub naming: Naming,
    /// Deadline of one forwarded request.
    pub request_timeout: Duration,
}

/// Which view of the gateway a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `/mcp`: every server, names prefixed.
    Aggregate,
    /// `/servers/{id}/mcp`: one server or group, transparent.
    Server(String),
}

/// Per-request context from the transport.
pub struct Ctx {
    /// The view addressed.
    pub scope: Scope,
    /// Channel for messages sent to the client before the response (progress, logs, relayed
    /// requests). `None` when the client cannot receive them (JSON-only HTTP client).
    pub out: Option<mpsc::Sender<Message>>,
    /// Correlates `notifications/cancelled` with in-flight requests (session id, connection).
    pub cancel_key: String,
    /// What the caller may do (`None`: auth is off).
    pub grants: Option<Arc<crate::auth::Grants>>,
    /// Who the caller is, for the rate limits.
    pub caller: Arc<crate::ratelimit::Caller>,
}

/// A notification for clients that listen (GET `/mcp` streams, stdio clients).
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// The server it concerns (for `/servers/{id}/mcp` listeners).
    pub server: String,
    /// Serialized JSON-RPC notification for aggregate listeners.
    pub json: Arc<str>,
}

type CallResult = Result<Box<RawValue>, RpcError>;

/// How a forwarded request may be routed.
#[derive(Clone, Copy)]
struct Routing<'a> {
    /// Safe to re-send after a failure that may have reached the upstream.
    idempotent: bool,
    /// Asked before each group member is tried (the member's tool access policies).
    gate: Option<MemberGate<'a>>,
}

/// The front door.
pub struct Gateway {
    router: Router,
    runtime: Arc<Runtime>,
    config: RwLock<GatewayConfig>,
    index: RwLock<Option<Arc<Index>>>,
    index_build: tokio::sync::Mutex<()>,
    listeners: broadcast::Sender<Broadcast>,
    /// Calls in flight by (session key, client request id) → (call number, cancel token), for
    /// `notifications/cancelled`. Entries are removed by [`InflightEntry`] when the call ends
    /// or its future is dropped.
    inflight: Mutex<HashMap<(String, Id), (u64, CancellationToken)>>,
    reloader: RwLock<Option<Arc<dyn management::ConfigReloader>>>,
    /// Cluster-wide rate limits (none until set).
    limits: std::sync::OnceLock<Arc<crate::ratelimit::RateLimits>>,
    /// The tool access policies set through the API (none until set).
    policies: std::sync::OnceLock<Arc<dyn policy::PolicySource>>,
}

impl Gateway {
    /// Build the gateway and start following runtime events.
    pub fn new(runtime: Arc<Runtime>, config: GatewayConfig) -> Arc<Self> {
        let (listeners, _) = broadcast::channel(1024);
        let gw = Arc::new(Gateway {
            router: Router::new(runtime.clone()),
            runtime,
            config: RwLock::new(config),
            index: RwLock::new(None),
            index_build: tokio::sync::Mutex::new(()),
            listeners,
            inflight: Mutex::new(HashMap::new()),
            reloader: RwLock::new(None),
            limits: std::sync::OnceLock::new(),
            policies: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&gw);
        let mut events = gw.runtime.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(gw) = weak.upgrade() {
                            *gw.index.write() = None;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let Some(gw) = weak.upgrade() else { break };
                gw.on_runtime_event(ev);
            }
        });
        gw
    }

    /// Install the configuration reloader used by `hangar_reload_config`.
    pub fn set_reloader(&self, r: Arc<dyn management::ConfigReloader>) {
        *self.reloader.write() = Some(r);
    }

    /// Enforce `limits` on tool calls from now on.
    pub fn set_rate_limits(&self, limits: Arc<crate::ratelimit::RateLimits>) {
        let _ = self.limits.set(limits);
    }

    /// Enforce the tool access policies of `source` (the replicated ones) from now on.
    pub fn set_policy_source(&self, source: Arc<dyn policy::PolicySource>) {
        let _ = self.policies.set(source);
    }

    /// `hangar_health`'s `security.rate_limiting`: this node's buckets and the definitions.
    fn rate_limiting(&self) -> serde_json::Value {
        match self.limits.get() {
            Some(l) => {
                let defs = l.definitions();
                serde_json::json!({
                    "active_buckets": l.active_buckets(),
                    "mode": l.mode(),
                    "config": if defs.is_empty() { serde_json::Value::Null } else { serde_json::json!(defs) },
                })
            }
            None => serde_json::json!({"active_buckets": 0, "config": null}),
        }
    }

    /// Replace the settings (hot reload).
    pub fn set_config(&self, config: GatewayConfig) {
        *self.config.write() = config;
        *self.index.write() = None;
    }

    /// The router (group state for REST and management tools).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The runtime behind the gateway.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Subscribe to notifications for listening clients.
    pub fn listen(&self) -> broadcast::Receiver<Broadcast> {
        self.listeners.subscribe()
    }

    /// Calls being forwarded upstream right now (cancellable by `notifications/cancelled`).
    pub fn calls_in_flight(&self) -> usize {
        self.inflight.lock().len()
    }

    /// Number of server→client requests relayed and not yet answered.
    pub fn pending_relays(&self) -> usize {
        self.runtime.relays().len()
    }

    fn on_runtime_event(&self, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::CatalogChanged {
                server,
                lists,
                notify,
            } => {
                *self.index.write() = None;
                if !notify {
                    return;
                }
                for list in lists {
                    let method = format!("notifications/{list}/list_changed");
                    let json = Message::notification(method, None).to_json();
                    let _ = self.listeners.send(Broadcast {
                        server: server.clone(),
                        json: Arc::from(json),
                    });
                }
            }
            RuntimeEvent::ServersChanged | RuntimeEvent::ToolAccessChanged => {
                *self.index.write() = None;
                let json =
                    Message::notification("notifications/tools/list_changed", None).to_json();
                let _ = self.listeners.send(Broadcast {
                    server: String::new(),
                    json: Arc::from(json),
                });
            }
            RuntimeEvent::UpstreamNotification { server, message } => {
                let _ = self.listeners.send(Broadcast {
                    server,
                    json: Arc::from(message.to_json()),
                });
            }
        }
    }

    /// Handle one incoming message. Returns the response for requests (and for invalid
    /// messages that carry an id); `None` for notifications and client responses.
    pub async fn handle(&self, ctx: &Ctx, msg: Message) -> Option<Message> {
        match msg.kind() {
            Kind::Request => Some(self.handle_request(ctx, msg).await),
            Kind::Notification => {
                self.handle_notification(ctx, msg).await;
                None
            }
            Kind::Response => {
                self.handle_client_response(msg).await;
                None
            }
            Kind::Invalid => Some(Message::error(
                msg.id,
                RpcError::new(
                    INVALID_REQUEST,
                    "Invalid Request: a JSON-RPC 2.0 message needs a 'method' (request or notification) or an 'id' with 'result' or 'error' (response)",
                ),
            )),
        }
    }

    async fn handle_request(&self, ctx: &Ctx, msg: Message) -> Message {
        let (Some(id), Some(method)) = (msg.id, msg.method) else {
            return Message::error(None, RpcError::new(INVALID_REQUEST, "Invalid Request"));
        };
        let params = match raw_object(msg.params.as_deref()) {
            Ok(p) => p,
            Err(_) => {
                return self.finish(
                    &method,
                    id,
                    Err(RpcError::new(
                        INVALID_PARAMS,
                        "Invalid params: 'params' must be a JSON object",
                    )),
                );
            }
        };
        let modern = match protocol::modern_meta(&params) {
            Ok(m) => m.is_some(),
            Err(e) => return self.finish(&method, id, Err(e)),
        };
        if let Some(e) = forbidden(ctx, &method, &params, &self.runtime) {
            return self.finish(&method, id, Err(e));
        }
        let result = match (&ctx.scope, method.as_str()) {
            (_, "initialize") => self.initialize(ctx, &params).await,
            (_, "server/discover") => self.discover(ctx).await,
            (_, "ping") if modern => Err(method_not_found(&method)),
            (_, "ping") => Ok(jsonrpc::empty_object()),
            (_, "logging/setLevel" | "resources/subscribe" | "resources/unsubscribe") if modern => {
                Err(method_not_found(&method))
            }
            // A caller who may not call tools sees none.
            (_, "tools/list") if !may_in_scope(ctx, &self.runtime, "tool:invoke") => {
                Ok(raw(&serde_json::json!({"tools": []})))
            }
            (Scope::Server(target), _) => {
                let target = target.clone();
                let r = self
                    .forward_transparent(ctx, &target, &method, params, &id)
                    .await;
                if method == "tools/list" {
                    r.map(|list| self.without_denied_tools(ctx, &target, list))
                } else {
                    r
                }
            }
            (Scope::Aggregate, "tools/list") => self
                .full_index()
                .await
                .map(|i| self.without_refused(ctx, &i, visible_tools(ctx, &self.runtime, &i))),
            (Scope::Aggregate, "tools/call") => self.tools_call(ctx, params, &id).await,
            (Scope::Aggregate, "prompts/list") => {
                self.full_index().await.map(|i| raw_str(&i.prompts_result))
            }
            (Scope::Aggregate, "prompts/get") => self.prompts_get(ctx, params, &id).await,
            (Scope::Aggregate, "resources/list") => self
                .full_index()
                .await
                .map(|i| raw_str(&i.resources_result)),
            (Scope::Aggregate, "resources/templates/list") => self
                .full_index()
                .await
                .map(|i| raw_str(&i.templates_result)),
            (
                Scope::Aggregate,
                "resources/read" | "resources/subscribe" | "resources/unsubscribe",
            ) => self.resource_call(ctx, &method, params, &id).await,
            (Scope::Aggregate, "completion/complete") => self.complete(ctx, params, &id).await,
            (Scope::Aggregate, "logging/setLevel") => self.set_level(params).await,
            (Scope::Aggregate, other) => Err(method_not_found(other)),
        };
        let result = if modern || method == "server/discover" {
            result.map(|r| protocol::modern_result(&method, r))
        } else {
            result
        };
        self.finish(&method, id, result)
    }

    fn finish(&self, method: &str, id: Id, result: CallResult) -> Message {
        let known = matches!(
            method,
            "initialize"
                | "server/discover"
                | "ping"
                | "tools/list"
                | "tools/call"
                | "prompts/list"
                | "prompts/get"
                | "resources/list"
                | "resources/templates/list"
                | "resources/read"
                | "resources/subscribe"
                | "resources/unsubscribe"
                | "completion/complete"
                | "logging/setLevel"
        );
        let label = if known { method } else { "other" };
        let metrics = self.runtime.metrics();
        match result {
            Ok(r) => {
                metrics
                    .front_requests
                    .with_label_values(&[label, "ok"])
                    .inc();
                Message::response(id, r)
            }
            Err(e) => {
                metrics
                    .front_requests
                    .with_label_values(&[label, "error"])
                    .inc();
                Message::error(Some(id), e)
            }
        }
    }

    fn capabilities() -> serde_json::Value {
        serde_json::json!({
            "tools": {"listChanged": true},
            "prompts": {"listChanged": true},
            "resources": {"subscribe": true, "listChanged": true},
            "logging": {},
            "completions": {}
        })
    }

    fn server_info() -> serde_json::Value {
        serde_json::json!({
            "name": "mcp-hangar",
            "title": "Hangar MCP gateway",
            "version": env!("CARGO_PKG_VERSION")
        })
    }

    const INSTRUCTIONS: &'static str =
        "Hangar fronts several MCP servers. Tools and prompts are named <server>__<name>.";

    async fn upstream_init(
        &self,
        target: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, RpcError> {
        let candidates = self
            .router
            .candidates(target)
            .map_err(|e| route_error(&e))?;
        let mut last = None;
        for inst in candidates {
            match inst.ensure_ready().await {
                Ok(conn) => {
                    let v: serde_json::Value = serde_json::from_str(conn.init().result.get())
                        .map_err(|e| {
                            RpcError::new(
                                INTERNAL_ERROR,
                                format!("upstream initialize result unreadable: {e}"),
                            )
                        })?;
                    return Ok(v.as_object().cloned().unwrap_or_default());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => route_error(&RouteError::Start(e)),
            None => route_error(&RouteError::NoAvailableMember {
                group: target.to_owned(),
                detail: "the group has no members".to_owned(),
            }),
        })
    }

    async fn initialize(&self, ctx: &Ctx, params: &RawObject) -> CallResult {
        let requested: Option<String> = params
            .get("protocolVersion")
            .and_then(|v| serde_json::from_str(v.get()).ok());
        let version = protocol::negotiate(requested.as_deref());
        match &ctx.scope {
            Scope::Aggregate => Ok(raw(&serde_json::json!({
                "protocolVersion": version,
                "capabilities": Self::capabilities(),
                "serverInfo": Self::server_info(),
                "instructions": Self::INSTRUCTIONS,
            }))),
            Scope::Server(target) => {
                let mut init = self.upstream_init(target).await?;
                init.insert(
                    "protocolVersion".into(),
                    serde_json::Value::String(version.to_owned()),
                );
                Ok(raw(&serde_json::Value::Object(init)))
            }
        }
    }

    async fn discover(&self, ctx: &Ctx) -> CallResult {
        let (caps, info, instructions) = match &ctx.scope {
            Scope::Aggregate => (
                Self::capabilities(),
                Self::server_info(),
                serde_json::Value::String(Self::INSTRUCTIONS.to_owned()),
            ),
            Scope::Server(target) => {
                let init = self.upstream_init(target).await?;
                (
                    init.get("capabilities")
                        .cloned()
                        .unwrap_or_else(|| serde_json::json!({})),
                    init.get("serverInfo")
                        .cloned()
                        .unwrap_or_else(Self::server_info),
                    init.get("instructions")
                        .cloned()
                        .unwrap_or(serde_json::Value::Null),
                )
            }
        };
        let mut result = serde_json::json!({
            "supportedVersions": protocol::SUPPORTED,
            "capabilities": caps,
            "serverInfo": info,
            "_meta": { protocol::META_SERVER: info },
        });
        if !instructions.is_null() {
            result["instructions"] = instructions;
        }
        Ok(raw(&result))
    }

    /// The aggregated index, starting servers whose catalogue is unknown (cold, no
    /// predefined tools) so that every node lists every tool.
    async fn full_index(&self) -> Result<Arc<Index>, RpcError> {
        if let Some(idx) = self.index.read().clone()
            && idx.unknown_targets.is_empty()
        {
            return Ok(idx);
        }
        let _guard = self.index_build.lock().await;
        let idx = self.quick_index();
        if idx.unknown_targets.is_empty() {
            return Ok(idx);
        }
        let starts = idx.unknown_targets.iter().filter_map(|t| {
            let candidates = self.router.candidates(t).ok()?;
            // Only try servers that are COLD: a server whose start just failed is DEAD and
            // is retried by calls, not by every listing.
            let first = candidates
                .into_iter()
                .find(|i| i.state() == ServerState::Cold)?;
            Some(async move {
                if let Err(e) = self.router.start(&first).await {
                    tracing::warn!(mcp_server = first.id(), error = %e, "catalog_start_failed");
                }
            })
        });
        let _ =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(starts)).await;
        *self.index.write() = None;
        Ok(self.quick_index())
    }

    /// The exposed name of every tool `tools/list` shows now, by (target, upstream name)
    /// (never starts anything).
    pub fn exposed_tool_names(&self) -> std::collections::HashMap<(String, String), String> {
        self.quick_index()
            .exposed_tools()
            .into_iter()
            .map(|((t, u), e)| ((t.to_owned(), u.to_owned()), e.to_owned()))
            .collect()
    }

    /// The index from what is known now (never starts anything).
    fn quick_index(&self) -> Arc<Index> {
        if let Some(idx) = self.index.read().clone() {
            return idx;
        }
        let naming = self.config.read().naming;
        let idx = Arc::new(naming::build(
            &naming::visible_targets(&self.runtime),
            naming,
            &management::definitions(),
        ));
        *self.index.write() = Some(idx.clone());
        idx
    }

    async fn resolve_tool(&self, name: &str) -> Result<Route, RpcError> {
        if let Some(r) = self.quick_index().tool(name) {
            return Ok(r.clone());
        }
        if let Some((server, tool)) = name.split_once(naming::SEPARATOR)
            && self.runtime.exists(server)
            && !tool.is_empty()
        {
            return Ok(Route {
                target: server.to_owned(),
                upstream_name: tool.to_owned(),
            });
        }
        if let Some(r) = self.full_index().await?.tool(name) {
            return Ok(r.clone());
        }
        Err(RpcError::with_data(
            INVALID_PARAMS,
            format!(
                "Unknown tool: '{name}'. Call tools/list to see the available tools (named <server>__<tool>)."
            ),
            &serde_json::json!({ "error_type": "ToolNotFoundError", "tool": name }),
        ))
    }

    async fn tools_call(&self, ctx: &Ctx, mut params: RawObject, id: &Id) -> CallResult {
        let name: String = params
            .get("name")
            .and_then(|v| serde_json::from_str(v.get()).ok())
            .ok_or_else(|| {
                RpcError::new(
                    INVALID_PARAMS,
                    "Invalid params: tools/call needs a string 'name'",
                )
            })?;
        if management::TOOLS.contains(&name.as_str()) {
            let args: serde_json::Value = params
                .get("arguments")
                .and_then(|a| serde_json::from_str(a.get()).ok())
                .unwrap_or(serde_json::Value::Null);
            let result = Box::pin(self.management(ctx, &name, &args)).await;
            return Ok(raw(&result));
        }
        let route = self.resolve_tool(&name).await?;
        params.insert(
            "name".to_owned(),
            raw(&serde_json::Value::String(route.upstream_name.clone())),
        );
        protocol::strip_modern_meta(&mut params);
        self.call_tool(ctx, &route.target, &route.upstream_name, params, id)
            .await
    }

    /// The tool access levels of a call by `ctx`'s caller to `target` before a member is
    /// picked: the config policy of the server or group, and the replicated `global`,
    /// `server`/`group`, `principal` and `role` policies. Also the group's spec when `target`
    /// is a group (its members add their own levels, see [`Self::member_rules`]).
    fn access_rules(
        &self,
        ctx: &Ctx,
        target: &str,
    ) -> (Vec<Rule>, Option<crate::config::GroupSpec>) {
        let group = self.runtime.group(target).map(|g| g.spec());
        let kind = if group.is_some() { "group" } else { "server" };
        let mut rules: Vec<Rule> = naming::policies_of(&self.runtime, target)
            .iter()
            .map(|p| Rule::from_config(format!("the config policy of {kind} `{target}`"), p))
            .collect();
        if let Some(source) = self.policies.get().filter(|s| s.any()) {
            let principals = policy::principal_targets(&ctx.caller.principal);
            // An API key's principal too (`principal_id`, as role assignments name it).
            let owner = (!ctx.caller.anonymous)
                .then(|| source.key_principal(&ctx.caller.principal))
                .flatten()
                .filter(|o| !principals.contains(&o.as_str()));
            let mut keys: Vec<(&str, &str)> = vec![("global", ""), (kind, target)];
            keys.extend(principals.iter().map(|p| ("principal", *p)));
            keys.extend(owner.iter().map(|o| ("principal", o.as_str())));
            if let Some(g) = &ctx.grants {
                keys.extend(g.roles.iter().map(|r| ("role", r.as_str())));
            }
            rules.extend(source.lookup(&keys).iter().map(Rule::from_api));
        }
        (rules, group)
    }

    /// The levels a group member adds when a call of `group` lands on it: its entry's `tools`
    /// in the group, the member server's own config policy, the replicated `server` policy of
    /// its id.
    fn member_rules(&self, group: &str, m: &crate::config::GroupMember) -> Vec<Rule> {
        let mut rules: Vec<Rule> = m
            .tools
            .iter()
            .map(|p| {
                Rule::from_config(
                    format!("the entry of member `{}` in group `{group}`", m.id),
                    p,
                )
            })
            .collect();
        rules.extend(
            naming::policies_of(&self.runtime, &m.id)
                .iter()
                .map(|p| Rule::from_config(format!("the config policy of server `{}`", m.id), p)),
        );
        if let Some(source) = self.policies.get().filter(|s| s.any()) {
            rules.extend(
                source
                    .lookup(&[("server", m.id.as_str())])
                    .iter()
                    .map(Rule::from_api),
            );
        }
        rules
    }

    /// What decides whether the caller sees a tool of `target` in `tools/list`: the levels
    /// before a member is picked, and each member's (a group lists a tool some member takes).
    fn list_rules(&self, ctx: &Ctx, target: &str) -> (Vec<Rule>, Vec<Vec<Rule>>) {
        let (base, group) = self.access_rules(ctx, target);
        let members: Vec<Vec<Rule>> = group
            .map(|g| {
                g.members
                    .iter()
                    .map(|m| self.member_rules(target, m))
                    .collect()
            })
            .unwrap_or_default();
        if members.iter().all(Vec::is_empty) {
            return (base, Vec::new());
        }
        (base, members)
    }

    /// A `tools/list` result of `target` without the tools its policies refuse to the caller.
    fn without_denied_tools(&self, ctx: &Ctx, target: &str, list: Box<RawValue>) -> Box<RawValue> {
        let (base, members) = self.list_rules(ctx, target);
        if base.iter().all(Rule::is_empty) && members.is_empty() {
            return list;
        }
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(list.get()) else {
            return list;
        };
        if let Some(tools) = v.get_mut("tools").and_then(|t| t.as_array_mut()) {
            tools.retain(|t| {
                t.get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| policy::listed(&base, &members, n))
            });
        }
        raw(&v)
    }

    /// The aggregate `tools/list` without the tools the replicated policies refuse to the
    /// caller (the index already leaves out what the config policies refuse).
    fn without_refused(&self, ctx: &Ctx, idx: &Index, list: Box<RawValue>) -> Box<RawValue> {
        if !self.policies.get().is_some_and(|s| s.any()) {
            return list;
        }
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(list.get()) else {
            return list;
        };
        let mut by_target: HashMap<String, (Vec<Rule>, Vec<Vec<Rule>>)> = HashMap::new();
        if let Some(tools) = v.get_mut("tools").and_then(|t| t.as_array_mut()) {
            tools.retain(|t| {
                // Management tools have no route and no policy.
                let Some(route) = t
                    .get("name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| idx.tool(n))
                else {
                    return true;
                };
                let (base, members) = by_target
                    .entry(route.target.clone())
                    .or_insert_with(|| self.list_rules(ctx, &route.target));
                policy::listed(base, members, &route.upstream_name)
            });
        }
        raw(&v)
    }

    /// Count a refusal by the tool access policies (against the server it concerns: the
    /// target, or the member a group call was routed to) and build its JSON-RPC error.
    fn refuse(&self, server: &str, group: Option<&str>, tool: &str, r: &Refusal) -> RpcError {
        self.runtime
            .metrics()
            .tool_access_denied
            .with_label_values(&[server, r.metric_reason()])
            .inc();
        tracing::info!(mcp_server = server, group, tool, reason = r.metric_reason(), detail = %r, "tool_access_denied");
        let what = match group {
            Some(g) => format!("Tool '{tool}' of '{g}' (routed to member '{server}')"),
            None => format!("Tool '{tool}' of '{server}'"),
        };
        let message = match r.why {
            policy::Why::NeedsApproval => {
                format!("{what} needs an approval, which this Hangar does not support: {r}")
            }
            _ => format!("{what} is denied by its tool access policy: {r}"),
        };
        let mut data =
            serde_json::json!({"mcp_server": server, "tool": tool, "error_type": r.error_type()});
        if let Some(g) = group {
            data["group"] = serde_json::Value::String(g.to_owned());
        }
        RpcError::with_data(FORBIDDEN, message, &data)
    }

    async fn call_tool(
        &self,
        ctx: &Ctx,
        target: &str,
        tool: &str,
        params: RawObject,
        id: &Id,
    ) -> CallResult {
        if let Some(e) = forbidden_on(ctx, &self.runtime, target, tool) {
            return Err(e);
        }
        let (rules, group) = self.access_rules(ctx, target);
        if let Some(r) = policy::decide(&rules, tool) {
            return Err(self.refuse(target, None, tool, &r));
        }
        // A group call is also decided by the levels of the member it is routed to.
        let refused: Mutex<Option<(String, Refusal)>> = Mutex::new(None);
        let gate = |member: &str| -> Option<String> {
            let m = group.as_ref()?.members.iter().find(|m| m.id == member)?;
            let r = policy::decide(&self.member_rules(target, m), tool)?;
            let reason = r.detail.clone();
            *refused.lock() = Some((member.to_owned(), r));
            Some(reason)
        };
        let gate: Option<MemberGate<'_>> = group.is_some().then_some(&gate as MemberGate<'_>);
        if let Some(limits) = self.limits.get()
            && let Err(limited) = limits.check(
                &ctx.caller,
                crate::ratelimit::Subject::Tool {
                    server: target,
                    tool,
                },
            )
        {
            self.runtime
                .metrics()
                .tool_call_errors
                .with_label_values(&[target, tool, "RateLimitExceeded"])
                .inc();
            return Err(limited.rpc_error());
        }
        let idempotent = self.router.is_idempotent(target, tool);
        let t0 = Instant::now();
        let res = self
            .forward_gated(
                ctx,
                target,
                "tools/call",
                Some(raw_from_object(&params)),
                Routing { idempotent, gate },
                id,
            )
            .await;
        if res.is_err()
            && let Some((member, r)) = refused.lock().take()
        {
            return Err(self.refuse(&member, Some(target), tool, &r));
        }
        let metrics = self.runtime.metrics();
        match res {
            Ok((inst, Outcome::Result(r))) => {
                let is_error =
                    r.get().contains("\"isError\":true") || r.get().contains("\"isError\": true");
                let server = inst.id();
                if is_error {
                    metrics
                        .tool_calls
                        .with_label_values(&[server, tool, "error"])
                        .inc();
                    metrics
                        .tool_call_errors
                        .with_label_values(&[server, tool, "ToolError"])
                        .inc();
                } else {
                    metrics
                        .tool_calls
                        .with_label_values(&[server, tool, "success"])
                        .inc();
                    metrics
                        .tool_call_duration
                        .with_label_values(&[server, tool])
                        .observe(t0.elapsed().as_secs_f64());
                }
                Ok(r)
            }
            Ok((inst, Outcome::Error(e))) => {
                let server = inst.id();
                metrics
                    .tool_calls
                    .with_label_values(&[server, tool, "error"])
                    .inc();
                metrics
                    .tool_call_errors
                    .with_label_values(&[server, tool, "JsonRpcError"])
                    .inc();
                Err(e)
            }
            Err((error_type, e)) => {
                metrics
                    .tool_calls
                    .with_label_values(&[target, tool, "error"])
                    .inc();
                metrics
                    .tool_call_errors
                    .with_label_values(&[target, tool, error_type])
                    .inc();
                Err(e)
            }
        }
    }

    /// Forward a request to one target, relaying call events to the client while it runs.
    async fn forward(
        &self,
        ctx: &Ctx,
        target: &str,
        method: &str,
        params: Option<Box<RawValue>>,
        idempotent: bool,
        client_id: &Id,
    ) -> Result<(Arc<Instance>, Outcome), (&'static str, RpcError)> {
        let routing = Routing {
            idempotent,
            gate: None,
        };
        self.forward_gated(ctx, target, method, params, routing, client_id)
            .await
    }

    /// [`Self::forward`] with a gate asked before each group member is tried.
    async fn forward_gated(
        &self,
        ctx: &Ctx,
        target: &str,
        method: &str,
        params: Option<Box<RawValue>>,
        routing: Routing<'_>,
        client_id: &Id,
    ) -> Result<(Arc<Instance>, Outcome), (&'static str, RpcError)> {
        let Routing { idempotent, gate } = routing;
        let call = self.runtime.relays().next_call();
        let (sink, mut rx) = match &ctx.out {
            Some(_) => {
                let (tx, rx) = mpsc::channel(64);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let slot: ServingSlot = Arc::new(Mutex::new(None));
        let timeout = self.config.read().request_timeout;
        let req = RouteRequest {
            method,
            params,
            sink,
            timeout,
            idempotent,
            slot: Some(slot.clone()),
            gate,
        };
        let token = CancellationToken::new();
        // Removes the entry and the call's relays even if this future is dropped (the client
        // went away, a batch timed out).
        let _entry = InflightEntry::register(
            self,
            (ctx.cancel_key.clone(), client_id.clone()),
            call,
            &token,
        );
        let fut = self.router.request(target, req);
        tokio::pin!(fut);
        let res = loop {
            tokio::select! {
                r = &mut fut => break Some(r),
                ev = recv_opt(&mut rx) => {
                    if let Some(ev) = ev {
                        self.pump(ctx, ev, &slot, call).await;
                    }
                }
                _ = token.cancelled() => break None,
            }
        };
        if let Some(rx) = rx.as_mut() {
            while let Ok(ev) = rx.try_recv() {
                self.pump(ctx, ev, &slot, call).await;
            }
        }
        match res {
            Some(Ok(routed)) => Ok((routed.instance, routed.outcome)),
            Some(Err(e)) => Err((e.error_type(), route_error(&e))),
            None => Err((
                "CancellationError",
                RpcError::new(-32800, "Request cancelled by the client"),
            )),
        }
    }

    async fn pump(&self, ctx: &Ctx, ev: CallEvent, slot: &ServingSlot, call: u64) {
        let Some(out) = &ctx.out else { return };
        let msg = match ev {
            // Relayed: already registered by the node hosting the instance.
            CallEvent::Notification(m) | CallEvent::Relayed(m) => m,
            CallEvent::Request(mut m) => {
                let conn = slot.lock().clone();
                let (Some(conn), Some(upstream_id)) = (conn, m.id.take()) else {
                    return;
                };
                m.id = Some(self.runtime.relays().register(conn, upstream_id, call));
                m
            }
        };
        let _ = out.send(msg).await;
    }

    async fn forward_transparent(
        &self,
        ctx: &Ctx,
        target: &str,
        method: &str,
        mut params: RawObject,
        id: &Id,
    ) -> CallResult {
        protocol::strip_modern_meta(&mut params);
        if method == "tools/call" {
            let tool: String = params
                .get("name")
                .and_then(|v| serde_json::from_str(v.get()).ok())
                .ok_or_else(|| {
                    RpcError::new(
                        INVALID_PARAMS,
                        "Invalid params: tools/call needs a string 'name'",
                    )
                })?;
            return self.call_tool(ctx, target, &tool, params, id).await;
        }
        let params = if params.is_empty() {
            None
        } else {
            Some(raw_from_object(&params))
        };
        match self.forward(ctx, target, method, params, false, id).await {
            Ok((_, Outcome::Result(r))) => Ok(r),
            Ok((_, Outcome::Error(e))) => Err(e),
            Err((_, e)) => Err(e),
        }
    }

    async fn routed_simple(
        &self,
        ctx: &Ctx,
        target: &str,
        method: &str,
        params: RawObject,
        id: &Id,
    ) -> CallResult {
        let mut params = params;
        protocol::strip_modern_meta(&mut params);
        match self
            .forward(
                ctx,
                target,
                method,
                Some(raw_from_object(&params)),
                false,
                id,
            )
            .await
        {
            Ok((_, Outcome::Result(r))) => Ok(r),
            Ok((_, Outcome::Error(e))) => Err(e),
            Err((_, e)) => Err(e),
        }
    }

    async fn prompts_get(&self, ctx: &Ctx, mut params: RawObject, id: &Id) -> CallResult {
        let name: String = params
            .get("name")
            .and_then(|v| serde_json::from_str(v.get()).ok())
            .ok_or_else(|| {
                RpcError::new(
                    INVALID_PARAMS,
                    "Invalid params: prompts/get needs a string 'name'",
                )
            })?;
        let route = match self.quick_index().prompt(&name).cloned() {
            Some(r) => r,
            None => self
                .full_index()
                .await?
                .prompt(&name)
                .cloned()
                .ok_or_else(|| {
                    RpcError::new(
                        INVALID_PARAMS,
                        format!("Unknown prompt: '{name}'. Call prompts/list to see the prompts."),
                    )
                })?,
        };
        params.insert(
            "name".to_owned(),
            raw(&serde_json::Value::String(route.upstream_name.clone())),
        );
        self.routed_simple(ctx, &route.target, "prompts/get", params, id)
            .await
    }

    async fn resource_target(&self, uri: &str) -> Result<String, RpcError> {
        if let Some(t) = self.quick_index().resource_target(uri) {
            return Ok(t.to_owned());
        }
        let idx = self.full_index().await?;
        if let Some(t) = idx.resource_target(uri) {
            return Ok(t.to_owned());
        }
        let targets = idx.resource_targets();
        if targets.len() == 1
            && let Some(t) = targets.into_iter().next()
        {
            return Ok(t.to_owned());
        }
        Err(RpcError::with_data(
            RESOURCE_NOT_FOUND,
            format!("Resource not found: '{uri}' is not offered by any server behind this gateway"),
            &serde_json::json!({ "uri": uri }),
        ))
    }

    async fn resource_call(
        &self,
        ctx: &Ctx,
        method: &str,
        params: RawObject,
        id: &Id,
    ) -> CallResult {
        let uri: String = params
            .get("uri")
            .and_then(|v| serde_json::from_str(v.get()).ok())
            .ok_or_else(|| {
                RpcError::new(
                    INVALID_PARAMS,
                    format!("Invalid params: {method} needs a string 'uri'"),
                )
            })?;
        let target = self.resource_target(&uri).await?;
        self.routed_simple(ctx, &target, method, params, id).await
    }

    async fn complete(&self, ctx: &Ctx, mut params: RawObject, id: &Id) -> CallResult {
        let reference: serde_json::Value = params
            .get("ref")
            .and_then(|v| serde_json::from_str(v.get()).ok())
            .ok_or_else(|| {
                RpcError::new(
                    INVALID_PARAMS,
                    "Invalid params: completion/complete needs 'ref'",
                )
            })?;
        match reference.get("type").and_then(|t| t.as_str()) {
            Some("ref/prompt") => {
                let name = reference
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default();
                let route = match self.quick_index().prompt(name).cloned() {
                    Some(r) => r,
                    None => self
                        .full_index()
                        .await?
                        .prompt(name)
                        .cloned()
                        .ok_or_else(|| {
                            RpcError::new(INVALID_PARAMS, format!("Unknown prompt: '{name}'"))
                        })?,
                };
                let mut r = reference.clone();
                r["name"] = serde_json::Value::String(route.upstream_name.clone());
                params.insert("ref".to_owned(), raw(&r));
                self.routed_simple(ctx, &route.target, "completion/complete", params, id)
                    .await
            }
            Some("ref/resource") => {
                let uri = reference
                    .get("uri")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default();
                let target = self.resource_target(uri).await?;
                self.routed_simple(ctx, &target, "completion/complete", params, id)
                    .await
            }
            _ => Err(RpcError::new(
                INVALID_PARAMS,
                "Invalid params: ref.type must be 'ref/prompt' or 'ref/resource'",
            )),
        }
    }

    async fn set_level(&self, params: RawObject) -> CallResult {
        let params = raw_from_object(&params);
        let sends = self.runtime.instances().into_iter().filter_map(|inst| {
            let conn = inst.connection()?;
            let logging = inst.catalog().is_some_and(|c| c.has_capability("logging"));
            logging.then(|| {
                let p = params.clone();
                async move {
                    if let Err(e) = conn.request("logging/setLevel", Some(p), None, Some(Duration::from_secs(5))).await {
                        tracing::debug!(mcp_server = conn.server_id(), error = %e, "set_level_failed");
                    }
                }
            })
        });
        futures::future::join_all(sends).await;
        Ok(jsonrpc::empty_object())
    }

    async fn handle_notification(&self, ctx: &Ctx, msg: Message) {
        let method = msg.method.as_deref().unwrap_or_default();
        match method {
            "notifications/cancelled" => {
                let request_id: Option<Id> = raw_object(msg.params.as_deref()).ok().and_then(|p| {
                    p.get("requestId")
                        .and_then(|v| serde_json::from_str(v.get()).ok())
                });
                if let Some(rid) = request_id {
                    let token = self
                        .inflight
                        .lock()
                        .get(&(ctx.cancel_key.clone(), rid))
                        .map(|(_, t)| t.clone());
                    if let Some(t) = token {
                        t.cancel();
                    }
                }
            }
            "notifications/initialized" => {}
            other => {
                let targets: Vec<Arc<Instance>> = match &ctx.scope {
                    Scope::Aggregate if other == "notifications/roots/list_changed" => {
                        self.runtime.instances()
                    }
                    Scope::Aggregate => Vec::new(),
                    Scope::Server(t) => self.router.candidates(t).unwrap_or_default(),
                };
                for inst in targets {
                    if let Some(conn) = inst.connection() {
                        let _ = conn.notify(other, msg.params.clone()).await;
                    }
                }
            }
        }
    }

    async fn handle_client_response(&self, msg: Message) {
        let Some(id) = msg.id.clone() else { return };
        let relays = self.runtime.relays();
        match relays.home(&id) {
            Home::Local => match relays.answer(&id, msg).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(id = %id, "relay_answer_for_unknown_request"),
                Err(e) => tracing::warn!(error = %e, "relay_answer_delivery_failed"),
            },
            Home::Node(node) => {
                let (Ok(node), Some(forward)) = (node.parse::<u64>(), self.runtime.forward())
                else {
                    tracing::warn!(id = %id, node, "relay_answer_for_unknown_node");
                    return;
                };
                match forward.answer(node, &id, msg).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(id = %id, node, "relay_answer_for_unknown_request"),
                    Err(e) => {
                        tracing::warn!(id = %id, node, error = %e, "relay_answer_delivery_failed");
                    }
                }
            }
            Home::Foreign => tracing::debug!(id = %id, "client_response_ignored"),
        }
    }
}

/// Whether the caller may do `permission` (always, when auth is off) in the view addressed:
/// on `/servers/{id}/mcp`, globally or through a role scoped to that server or group; on
/// `/mcp`, globally or for at least one server or group (the target is checked once known).
fn may_in_scope(ctx: &Ctx, runtime: &Runtime, permission: &str) -> bool {
    ctx.grants.as_ref().is_none_or(|g| match &ctx.scope {
        Scope::Server(target) => crate::auth::allows_on_id(g, permission, runtime, target),
        Scope::Aggregate => g.allows_somewhere(permission),
    })
}

/// The aggregate `tools/list` result the caller may see: all of it with a global
/// `tool:invoke`, else only the tools of the servers and groups its scoped roles let it call
/// (never the management tools, which need global permissions).
fn visible_tools(ctx: &Ctx, runtime: &Runtime, idx: &Index) -> Box<RawValue> {
    let Some(grants) = ctx.grants.as_ref().filter(|g| !g.allows("tool:invoke")) else {
        return raw_str(&idx.tools_result);
    };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&idx.tools_result) else {
        return raw(&serde_json::json!({"tools": []}));
    };
    let mut allowed: HashMap<String, bool> = HashMap::new();
    if let Some(tools) = v.get_mut("tools").and_then(|t| t.as_array_mut()) {
        tools.retain(|t| {
            let route = t
                .get("name")
                .and_then(|n| n.as_str())
                .and_then(|n| idx.tool(n));
            route.is_some_and(|r| {
                *allowed.entry(r.target.clone()).or_insert_with(|| {
                    crate::auth::allows_on_id(grants, "tool:invoke", runtime, &r.target)
                })
            })
        });
    }
    raw(&v)
}

/// The JSON-RPC error for a call of `tool` on `target` the caller may not make (`tool:invoke`
/// neither global nor scoped to that server, that group or a group the server is in).
fn forbidden_on(ctx: &Ctx, runtime: &Runtime, target: &str, tool: &str) -> Option<RpcError> {
    let grants = ctx.grants.as_ref()?;
    if crate::auth::allows_on_id(grants, "tool:invoke", runtime, target) {
        return None;
    }
    Some(RpcError::with_data(
        FORBIDDEN,
        format!("Not authorized to call '{tool}' of '{target}': tool:invoke permission required"),
        &serde_json::json!({"required_permission": "tool:invoke", "mcp_server": target,
            "roles": grants.roles, "scoped_roles": grants.scoped_roles}),
    ))
}

/// The JSON-RPC error for a request the caller may not make, if it may not: each method needs
/// a permission, and management tools need theirs (starting and stopping servers, reloading
/// the configuration). The upstream never sees a refused call. On `/servers/{id}/mcp` roles
/// scoped to that server or group count; on `/mcp` they count for `tools/list` and
/// `tools/call` of upstream tools (the target is checked once resolved), while management
/// tools and the other methods need global permissions.
fn forbidden(ctx: &Ctx, method: &str, params: &RawObject, runtime: &Runtime) -> Option<RpcError> {
    let grants = ctx.grants.as_ref()?;
    let mut needed = crate::auth::rbac::mcp_permission(method)?;
    let mut what = format!("'{method}'");
    let mut management = false;
    if method == "tools/call"
        && let Some(tool) = params
            .get("name")
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    {
        management = management::TOOLS.contains(&tool.as_str());
        needed = match tool.as_str() {
            "hangar_start" | "hangar_stop" | "hangar_warm" => "mcp_servers:lifecycle",
            "hangar_reload_config" => "config:reload",
            "hangar_group_rebalance" => "group:update",
            _ => needed,
        };
        what = format!("'{tool}'");
    }
    let allowed = match &ctx.scope {
        Scope::Server(target) => crate::auth::allows_on_id(grants, needed, runtime, target),
        Scope::Aggregate if !management && matches!(method, "tools/call" | "tools/list") => {
            grants.allows_somewhere(needed)
        }
        Scope::Aggregate => grants.allows(needed),
    };
    if allowed {
        return None;
    }
    Some(RpcError::with_data(
        FORBIDDEN,
        format!("Not authorized to call {what}: {needed} permission required"),
        &serde_json::json!({"required_permission": needed, "roles": grants.roles}),
    ))
}

/// A call's entry in the gateway's in-flight map; dropping it removes the entry (only if it is
/// still this call's: a client may reuse a request id) and forgets the call's pending relays.
struct InflightEntry<'a> {
    gateway: &'a Gateway,
    key: (String, Id),
    call: u64,
}

impl<'a> InflightEntry<'a> {
    fn register(
        gateway: &'a Gateway,
        key: (String, Id),
        call: u64,
        token: &CancellationToken,
    ) -> InflightEntry<'a> {
        gateway
            .inflight
            .lock()
            .insert(key.clone(), (call, token.clone()));
        InflightEntry { gateway, key, call }
    }
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        {
            let mut map = self.gateway.inflight.lock();
            if map.get(&self.key).is_some_and(|(c, _)| *c == self.call) {
                map.remove(&self.key);
            }
        }
        self.gateway.runtime.relays().forget_call(self.call);
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<CallEvent>>) -> Option<CallEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn raw_str(s: &Arc<str>) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap_or_else(|_| jsonrpc::empty_object())
}

fn method_not_found(method: &str) -> RpcError {
    RpcError::new(METHOD_NOT_FOUND, format!("Method not found: '{method}'"))
}

/// Translate a routing failure into the JSON-RPC error a client sees.
pub fn route_error(e: &RouteError) -> RpcError {
    let data = |extra: serde_json::Value| {
        let mut d = serde_json::json!({ "error_type": e.error_type() });
        if let (Some(o), Some(x)) = (d.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        d
    };
    match e {
        RouteError::Unknown(t) => RpcError::with_data(
            INVALID_PARAMS,
            format!(
                "Unknown MCP server or group '{t}'. GET /api/mcp_servers/ lists the configured servers."
            ),
            &data(serde_json::json!({ "mcp_server": t })),
        ),
        RouteError::NoAvailableMember { group, .. } => RpcError::with_data(
            UPSTREAM_ERROR,
            e.to_string(),
            &data(serde_json::json!({ "group": group })),
        ),
        RouteError::Start(_) => {
            RpcError::with_data(UPSTREAM_ERROR, e.to_string(), &data(serde_json::json!({})))
        }
        RouteError::GroupCircuitOpen { group, retry_in_s } => RpcError::with_data(
            UPSTREAM_ERROR,
            e.to_string(),
            &data(serde_json::json!({ "group": group, "retry_after_s": retry_in_s })),
        ),
        RouteError::Refused { group, member, .. } => RpcError::with_data(
            FORBIDDEN,
            e.to_string(),
            &data(serde_json::json!({ "group": group, "mcp_server": member })),
        ),
        RouteError::Upstream { server, source } => {
            let code = if matches!(source, UpstreamError::Timeout { .. }) {
                TIMEOUT_ERROR
            } else {
                UPSTREAM_ERROR
            };
            RpcError::with_data(
                code,
                e.to_string(),
                &data(serde_json::json!({ "mcp_server": server })),
            )
        }
    }
}
