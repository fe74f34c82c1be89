//! Runtime room: the MCP server instances on THIS node.
//!
//! Each [`Instance`] carries out what its lifecycle (`supervisor::lifecycle`) decides: the
//! single-flight start (N concurrent first callers cause one start), connections, health
//! checks, idle stops; it keeps the learned catalogue (tools, prompts, resources) and the last
//! logs of a process that died. [`Runtime`] holds the instances and groups, applies
//! configuration changes, and is the [`crate::supervisor::Fleet`] the supervisor ticks.

mod catalog;
mod instance;
pub mod placement;
pub mod relay;
pub mod view;

pub use crate::upstream::lease::Lease;
pub use catalog::{Catalog, CatalogEntry};
pub use instance::{HealthError, Instance, InstanceStatus, PLACEMENT_WAIT, policy_of};
pub use placement::{Forward, ForwardError, ForwardFuture, Host};

use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use parking_lot::RwLock;
use tokio::sync::broadcast;

use crate::config::{Config, GroupSpec, ServerSpec};
pub use crate::supervisor::lifecycle::ServerState;
use crate::telemetry::Metrics;
use crate::telemetry::events::EventLog;
use crate::upstream::UpstreamError;

/// Something that happened in the runtime that other rooms react to.
#[derive(Debug, Clone)]
pub enum RuntimeEvent {
    /// A server's learned catalogue changed (after start or a `list_changed` notification).
    CatalogChanged {
        /// Which server.
        server: String,
        /// Which lists changed: "tools", "prompts", "resources".
        lists: Vec<&'static str>,
        /// Whether clients should be told (the visible lists really changed).
        notify: bool,
    },
    /// A server was added or removed.
    ServersChanged,
    /// The tool access policies changed (replicated ones, set through the API): which tools a
    /// caller may list and call may have changed.
    ToolAccessChanged,
    /// An upstream sent a notification not tied to a call (e.g. `notifications/resources/updated`).
    UpstreamNotification {
        /// Which server sent it.
        server: String,
        /// The raw message.
        message: Arc<crate::jsonrpc::Message>,
    },
}

/// Why a start failed; carries whether the request can safely go elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The upstream could not be started or reached.
    #[error("MCP server '{server}' could not be started: {source}")]
    Upstream {
        /// Server id.
        server: String,
        /// The transport error.
        #[source]
        source: UpstreamError,
    },
    /// The server was removed from the configuration.
    #[error("MCP server '{server}' was removed")]
    Removed {
        /// Server id.
        server: String,
    },
    /// The instance runs on another node (or nowhere yet): this node must not start it.
    #[error("MCP server '{server}' is not placed on this node ({host:?})")]
    NotPlacedHere {
        /// Server id.
        server: String,
        /// Where it is placed.
        host: Host,
    },
    /// It is placed here, but this node holds no placement lease (cut off from the leader).
    #[error("MCP server '{server}' cannot run on this node now: {detail}")]
    NoLease {
        /// Server id.
        server: String,
        /// Why (what was waited for).
        detail: String,
    },
    /// The leader placed it on no node within the wait.
    #[error("MCP server '{server}' is not placed on any node yet: {detail}")]
    NotPlaced {
        /// Server id.
        server: String,
        /// Why (what was waited for).
        detail: String,
    },
    /// The hosting node could not start it.
    #[error("MCP server '{server}' could not be started {source}")]
    Remote {
        /// Server id.
        server: String,
        /// What the host said.
        #[source]
        source: ForwardError,
    },
    /// The server is DEGRADED and its circuit is open until the next recovery attempt.
    #[error(
        "Circuit breaker open (too many consecutive failures): MCP server '{server}' failed {failures} times in a row; next recovery attempt in {retry_in_s:.1}s"
    )]
    CircuitOpen {
        /// Server id.
        server: String,
        /// Seconds until the next recovery attempt.
        retry_in_s: f64,
        /// Consecutive failures.
        failures: u32,
    },
}

/// A group of servers (members are ordinary instances).
pub struct Group {
    id: String,
    spec: RwLock<GroupSpec>,
    cursor: std::sync::atomic::AtomicUsize,
}

impl Group {
    /// Group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configured spec.
    pub fn spec(&self) -> GroupSpec {
        self.spec.read().clone()
    }

    /// Next round-robin position (used by the routing room).
    pub fn next_cursor(&self) -> usize {
        self.cursor
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Replace the spec (membership changes through the API).
    pub fn set_spec(&self, spec: GroupSpec) {
        *self.spec.write() = spec;
    }
}

/// How long an instance that moves to another node may finish its calls in flight here.
const MOVE_DRAIN: Duration = Duration::from_secs(10);

/// All instances and groups on this node.
pub struct Runtime {
    instances: RwLock<IndexMap<String, Arc<Instance>>>,
    groups: RwLock<IndexMap<String, Arc<Group>>>,
    metrics: Arc<Metrics>,
    log: Arc<EventLog>,
    events: broadcast::Sender<RuntimeEvent>,
    node_id: String,
    started: Instant,
    /// Catalogues learned anywhere in the cluster (replicated), for servers this node has
    /// not started itself.
    shared_catalogs: RwLock<std::collections::HashMap<String, Arc<Catalog>>>,
    /// The cluster's placements (`None` until a cluster attaches: every instance is here).
    placements: RwLock<Option<placement::Table>>,
    /// Calls to instances hosted elsewhere.
    forward: std::sync::OnceLock<Arc<dyn Forward>>,
    /// Server→client requests relayed during calls, waiting for the client's answer.
    relays: relay::Relays,
    /// This node's placement lease (renewed by the cluster; not required outside one).
    lease: tokio::sync::watch::Sender<Lease>,
}

/// Errors of runtime administration.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The id is taken.
    #[error("MCP server '{0}' already exists; delete it first or choose another id")]
    Exists(String),
    /// No such server.
    #[error("MCP server '{0}' is not configured")]
    NotFound(String),
    /// Groups are managed through configuration.
    #[error("'{0}' is a group; groups cannot be started or stopped as a whole here")]
    IsGroup(String),
}

impl Runtime {
    /// Build the runtime from a validated configuration. Nothing is started here.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        log: Arc<EventLog>,
        node_id: String,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let rt = Arc::new(Runtime {
            instances: RwLock::new(IndexMap::new()),
            groups: RwLock::new(IndexMap::new()),
            metrics,
            log,
            events,
            started: Instant::now(),
            shared_catalogs: RwLock::new(std::collections::HashMap::new()),
            placements: RwLock::new(None),
            forward: std::sync::OnceLock::new(),
            relays: relay::Relays::new(&node_id),
            node_id,
            lease: tokio::sync::watch::channel(Lease::NotRequired).0,
        });
        for (id, spec) in &config.mcp_servers {
            rt.insert(id.clone(), spec.clone());
        }
        rt
    }

    fn insert(&self, id: String, spec: ServerSpec) {
        match spec {
            ServerSpec::Group(g) => {
                self.metrics
                    .server_info
                    .with_label_values(&[&id, "group"])
                    .set(1);
                self.groups.write().insert(
                    id.clone(),
                    Arc::new(Group {
                        id,
                        spec: RwLock::new(g),
                        cursor: std::sync::atomic::AtomicUsize::new(0),
                    }),
                );
            }
            other => {
                let host = self.host_for(&id, &other);
                let inst = Arc::new(Instance::new(
                    id.clone(),
                    other,
                    host,
                    self.lease.subscribe(),
                    self.metrics.clone(),
                    self.events.clone(),
                    self.log.clone(),
                ));
                self.instances.write().insert(id, inst);
            }
        }
    }

    fn host_for(&self, id: &str, spec: &ServerSpec) -> Host {
        match &*self.placements.read() {
            Some(t) if placement::placed_by_leader(spec) => t.host_of(id),
            _ => Host::Here,
        }
    }

    /// From now on, single-instance servers run only where `table` (the replicated
    /// placements, instance → node) puts them; this node is `me`. Instances placed elsewhere
    /// are stopped here; those newly placed here start if they auto-start.
    pub fn set_placements(&self, me: u64, map: std::collections::HashMap<String, u64>) {
        let table = placement::Table { me, map };
        *self.placements.write() = Some(table.clone());
        for inst in self.instances() {
            let host = if placement::placed_by_leader(&inst.spec()) {
                table.host_of(inst.id())
            } else {
                Host::Here
            };
            let node = match host {
                Host::Here => Some(me),
                Host::Node(n) => Some(n),
                Host::Unplaced => None,
            };
            let before = inst.set_host(host, node);
            if before == host {
                continue;
            }
            tracing::info!(server = inst.id(), ?before, now = ?host, "instance_placement_changed");
            if before == Host::Here {
                // New calls go elsewhere from now on; those in flight here finish first
                // (bounded), so a planned move fails no call.
                let i = inst.clone();
                tokio::spawn(async move {
                    i.drain_calls(MOVE_DRAIN).await;
                    i.stop("placed_elsewhere").await;
                });
            } else if host == Host::Here && self.wants_auto_start(&inst) {
                let i = inst.clone();
                tokio::spawn(async move {
                    if let Err(e) = i.ensure_ready().await {
                        tracing::warn!(server = i.id(), error = %e, "auto_start_failed");
                    }
                });
            }
        }
    }

    /// The lifecycle states hosts reported through the cluster: instance → (state, node).
    pub fn set_reported_states(
        &self,
        reported: &std::collections::HashMap<String, (ServerState, u64)>,
    ) {
        for inst in self.instances() {
            inst.set_reported(reported.get(inst.id()).copied());
        }
    }

    /// Install the port to other nodes' instances (once, by the cluster).
    pub fn set_forward(&self, forward: Arc<dyn Forward>) {
        let _ = self.forward.set(forward);
    }

    /// The port to other nodes' instances, when in a cluster.
    pub fn forward(&self) -> Option<&Arc<dyn Forward>> {
        self.forward.get()
    }

    /// Whether `inst` starts without waiting for a call: it asks for it, or it is a member of
    /// a group that does (groups default to auto_start, as in MCP Hangar).
    pub fn wants_auto_start(&self, inst: &Instance) -> bool {
        inst.spec().common().is_some_and(|c| c.auto_start)
            || self.groups().iter().any(|g| {
                let spec = g.spec();
                spec.auto_start && spec.members.iter().any(|m| m.id == inst.id())
            })
    }

    /// This node's placement lease from now on (set by the cluster's renewal loop).
    pub fn set_lease(&self, lease: Lease) {
        self.lease.send_replace(lease);
    }

    /// The single-instance servers this node may have a process of (connected, starting or
    /// stopping), whatever their placement says: what it tells the leader with each renewal.
    pub fn single_instances_running(&self) -> Vec<String> {
        self.single_instances_holding()
            .iter()
            .map(|i| i.id().to_owned())
            .collect()
    }

    /// Single-instance servers with a process here (connected, starting or stopping).
    fn single_instances_holding(&self) -> Vec<Arc<Instance>> {
        self.instances()
            .into_iter()
            .filter(|i| placement::placed_by_leader(&i.spec()) && i.holds_process())
            .collect()
    }

    /// The placement lease lapsed: stop every single-instance server running here (the lease
    /// shim of each child has killed it already if this node was frozen).
    pub async fn lease_lapsed(&self) {
        let running = self.single_instances_holding();
        if !running.is_empty() {
            let ids: Vec<&str> = running.iter().map(|i| i.id()).collect();
            tracing::warn!(servers = ?ids, "placement_lease_lapsed_stopping_instances");
        }
        futures::future::join_all(running.iter().map(|i| i.stop("placement_lease_lapsed"))).await;
    }

    /// Server→client requests relayed during calls on this node's instances.
    pub fn relays(&self) -> &relay::Relays {
        &self.relays
    }

    /// The node id (stamped into events and relayed request ids).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Seconds since this runtime started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The domain event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// Subscribe to runtime events.
    pub fn subscribe(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.events.subscribe()
    }

    /// One instance.
    pub fn instance(&self, id: &str) -> Option<Arc<Instance>> {
        self.instances.read().get(id).cloned()
    }

    /// One group.
    pub fn group(&self, id: &str) -> Option<Arc<Group>> {
        self.groups.read().get(id).cloned()
    }

    /// All instances in configuration order.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances.read().values().cloned().collect()
    }

    /// All groups in configuration order.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().values().cloned().collect()
    }

    /// Whether `id` names a server or a group.
    pub fn exists(&self, id: &str) -> bool {
        self.instances.read().contains_key(id) || self.groups.read().contains_key(id)
    }

    /// Tell listeners that the tool access policies changed.
    pub fn tool_access_changed(&self) {
        let _ = self.events.send(RuntimeEvent::ToolAccessChanged);
    }

    /// Add a server at run time (REST/CLI). It starts COLD.
    pub fn add_server(&self, id: &str, spec: ServerSpec) -> Result<(), RuntimeError> {
        if self.exists(id) {
            return Err(RuntimeError::Exists(id.to_owned()));
        }
        self.insert(id.to_owned(), spec);
        let _ = self.events.send(RuntimeEvent::ServersChanged);
        Ok(())
    }

    /// Remove a server or group, stopping its process first.
    pub async fn remove_server(&self, id: &str) -> Result<(), RuntimeError> {
        if self.groups.write().shift_remove(id).is_some() {
            let _ = self.metrics.server_info.remove_label_values(&[id, "group"]);
            let _ = self.events.send(RuntimeEvent::ServersChanged);
            return Ok(());
        }
        let inst = self
            .instances
            .write()
            .shift_remove(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        inst.mark_removed();
        inst.stop("removed").await;
        self.metrics.forget_server(id);
        let _ = self.events.send(RuntimeEvent::ServersChanged);
        Ok(())
    }

    /// Set (or clear) the replicated catalogue of a server.
    pub fn set_shared_catalog(&self, id: &str, catalog: Option<Arc<Catalog>>) {
        let changed = {
            let mut map = self.shared_catalogs.write();
            match catalog {
                Some(c) => {
                    let same = map.get(id).is_some_and(|old| old.same_lists(&c));
                    map.insert(id.to_owned(), c);
                    !same
                }
                None => map.remove(id).is_some(),
            }
        };
        let local = self.instance(id).is_some_and(|i| i.catalog().is_some());
        if changed && !local {
            let _ = self.events.send(RuntimeEvent::CatalogChanged {
                server: id.to_owned(),
                lists: vec!["tools", "prompts", "resources"],
                notify: true,
            });
        }
    }

    /// What a server offers: its own catalogue when it ran on this node, else the one the
    /// cluster learned elsewhere.
    pub fn catalog_of(&self, inst: &Instance) -> Option<Arc<Catalog>> {
        inst.catalog()
            .or_else(|| self.shared_catalogs.read().get(inst.id()).cloned())
    }

    /// The names of the tools a server offers (learned here or anywhere in the cluster).
    pub fn tool_names(&self, inst: &Instance) -> Vec<String> {
        self.catalog_of(inst)
            .map(|c| c.tools.iter().map(|t| t.key.clone()).collect())
            .unwrap_or_default()
    }

    /// The current servers and groups as configuration specs.
    pub fn specs(&self) -> IndexMap<String, ServerSpec> {
        let mut out: IndexMap<String, ServerSpec> = self
            .instances()
            .iter()
            .map(|i| (i.id().to_owned(), i.spec()))
            .collect();
        for g in self.groups() {
            out.insert(g.id().to_owned(), ServerSpec::Group(g.spec()));
        }
        out
    }

    /// Apply a new set of servers: added ones appear COLD, removed ones stop and go, changed
    /// ones restart with the new definition, unchanged ones keep their processes and
    /// connections. Returns what changed.
    pub async fn apply(&self, new: &IndexMap<String, ServerSpec>) -> crate::config::ConfigDiff {
        let d = crate::config::diff(&self.specs(), new);
        for id in d.removed.iter().chain(d.updated.iter()) {
            let group = self.group(id);
            match (group, new.get(id)) {
                (Some(g), Some(ServerSpec::Group(spec))) => g.set_spec(spec.clone()),
                // A changed server is replaced in place (its id never disappears from the
                // listing), then the old instance is stopped.
                (None, Some(spec @ (ServerSpec::Subprocess(_) | ServerSpec::Remote(_)))) => {
                    let old = self.instance(id);
                    self.insert(id.clone(), spec.clone());
                    if let Some(old) = old {
                        old.mark_removed();
                        old.stop("config_changed").await;
                    }
                }
                _ => {
                    let _ = self.remove_server(id).await;
                }
            }
        }
        for id in d.added.iter().chain(d.updated.iter()) {
            if self.exists(id) {
                continue;
            }
            if let Some(spec) = new.get(id) {
                self.insert(id.clone(), spec.clone());
            }
        }
        // Keep configuration order.
        {
            let mut inst = self.instances.write();
            inst.sort_by_key(|k, _| new.get_index_of(k).unwrap_or(usize::MAX));
            let mut groups = self.groups.write();
            groups.sort_by_key(|k, _| new.get_index_of(k).unwrap_or(usize::MAX));
        }
        let _ = self.events.send(RuntimeEvent::ServersChanged);
        d
    }

    /// Wait until no instance has a call in flight, at most `limit` (before a graceful
    /// shutdown stops them).
    pub async fn drain_all(&self, limit: Duration) {
        let all = self.instances();
        futures::future::join_all(all.iter().map(|i| i.drain_calls(limit))).await;
    }

    /// Stop every instance (graceful shutdown), concurrently.
    pub async fn shutdown_all(&self) {
        let all = self.instances();
        futures::future::join_all(all.iter().map(|i| i.stop("shutdown"))).await;
    }
}

impl crate::supervisor::Fleet for Runtime {
    fn tick(&self) {
        // Group members out of rotation get no calls, so nothing else would restart a
        // member whose process died: their lifecycle revives them (failures lead to
        // DEGRADED and its backoff), so failback needs no operator.
        let members: std::collections::HashSet<String> = self
            .groups()
            .iter()
            .flat_map(|g| g.spec().members.into_iter().map(|m| m.id))
            .collect();
        for inst in self.instances() {
            // Supervision of an instance belongs to the node that hosts it.
            if inst.host() != Host::Here {
                continue;
            }
            let member = members.contains(inst.id());
            inst.tick(member);
        }
    }
}
