//! Domain events (MCP Hangar's event names, inventory §7.2): every event has a sequence
//! number, `event_id`, `occurred_at` (unix seconds) and `produced_by` (node id), readable with
//! `GET /api/events?since=N&limit=M` and streamed to subscribers.
//!
//! On its own the log is a bounded in-memory ring (unit tests, tools). A running node attaches
//! a [`EventBackend`] (the cluster room): published events are then handed to it, batched
//! into Raft, and reads come from the replicated log, so every node shows the same events
//! with the same sequence numbers. The backend feeds applied events back with
//! [`EventLog::deliver`] for live subscribers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use super::unix_now;

/// One domain event.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Event {
    /// Position in this node's log (1-based, increasing).
    pub seq: u64,
    /// Unique id.
    pub event_id: String,
    /// Class name, e.g. `McpServerStarted`.
    pub event_type: String,
    /// Unix time (seconds, fractional).
    pub occurred_at: f64,
    /// Node that produced it.
    pub produced_by: String,
    /// Event fields (`mcp_server_id`, `reason`, …).
    pub data: Value,
}

/// Every domain event a node publishes, as data. Serialised at the edge to MCP Hangar's event
/// names (the variant name is the `event_type`) and its field names (the `data`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum DomainEvent {
    /// An instance changed lifecycle state.
    McpServerStateChanged {
        /// Server id.
        mcp_server_id: String,
        /// State before.
        old_state: &'static str,
        /// State after.
        new_state: &'static str,
    },
    /// An instance started (process spawned or connection made, handshake done).
    McpServerStarted {
        /// Server id.
        mcp_server_id: String,
        /// `subprocess` or `remote`.
        mode: &'static str,
        /// Tools learned.
        tools_count: usize,
        /// How long the start took.
        startup_duration_ms: u64,
    },
    /// An instance was stopped.
    McpServerStopped {
        /// Server id.
        mcp_server_id: String,
        /// Why (`idle`, `manual_stop`, `removed`, `shutdown`, …).
        reason: String,
    },
    /// An instance reached its failure threshold.
    McpServerDegraded {
        /// Server id.
        mcp_server_id: String,
        /// Consecutive failures.
        consecutive_failures: u32,
        /// Failures since the instance was created.
        total_failures: u64,
        /// The kind of the failure that tipped it.
        reason: &'static str,
        /// Its error.
        error: String,
    },
    /// A circuit breaker (of a server or a group) changed state.
    CircuitBreakerStateChanged {
        /// Server or group id.
        mcp_server_id: String,
        /// State before.
        old_state: &'static str,
        /// State after.
        new_state: &'static str,
    },
    /// A health check passed.
    HealthCheckPassed {
        /// Server id.
        mcp_server_id: String,
        /// Round trip.
        duration_ms: u64,
    },
    /// A health check failed.
    HealthCheckFailed {
        /// Server id.
        mcp_server_id: String,
        /// Consecutive failures, this one included.
        consecutive_failures: u32,
        /// Why.
        error_message: String,
    },
    /// An instance has been idle for its TTL and is being stopped.
    McpServerIdleDetected {
        /// Server id.
        mcp_server_id: String,
        /// Seconds without use.
        idle_duration_s: f64,
        /// Last use (unix seconds).
        last_used_at: f64,
    },
    /// A group member left or re-entered rotation.
    GroupMemberHealthChanged {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
        /// In rotation now.
        in_rotation: bool,
        /// Why.
        reason: &'static str,
    },
    /// A group's circuit opened.
    GroupCircuitOpened {
        /// Group id.
        group_id: String,
    },
    /// A group's circuit closed.
    GroupCircuitClosed {
        /// Group id.
        group_id: String,
    },
    /// A group was created through the API.
    GroupCreated {
        /// Group id.
        group_id: String,
    },
    /// A group was deleted through the API.
    GroupDeleted {
        /// Group id.
        group_id: String,
    },
    /// A member was added to a group.
    GroupMemberAdded {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
        /// Weight.
        weight: u32,
        /// Priority.
        priority: u32,
    },
    /// A member was removed from a group.
    GroupMemberRemoved {
        /// Group id.
        group_id: String,
        /// Member id.
        member_id: String,
    },
    /// An API key was created (never the key itself).
    KeyCreated {
        /// Key id.
        key_id: String,
        /// Principal.
        principal_id: String,
        /// Name.
        name: String,
    },
    /// An API key was revoked.
    KeyRevoked {
        /// Key id.
        key_id: String,
    },
    /// A role was given to a principal.
    RoleAssigned {
        /// Principal.
        principal_id: String,
        /// Role.
        role_name: String,
        /// Where it applies: `global`, `server:<id>` or `group:<id>`.
        scope: String,
    },
    /// A role was taken from a principal.
    RoleRevoked {
        /// Principal.
        principal_id: String,
        /// Role.
        role_name: String,
        /// The assignment's scope.
        scope: String,
    },
    /// A custom role was defined.
    CustomRoleCreated {
        /// Role.
        role_name: String,
        /// Its permissions.
        permissions: Vec<String>,
    },
    /// A custom role's permissions or description were replaced.
    CustomRoleUpdated {
        /// Role.
        role_name: String,
        /// Its permissions now.
        permissions: Vec<String>,
    },
    /// A custom role was deleted.
    CustomRoleDeleted {
        /// Role.
        role_name: String,
    },
    /// A tool access policy was set through `/api/auth/policies` (replicated).
    ToolAccessPolicySet {
        /// `global`, `server`, `group`, `principal` or `role`.
        scope: String,
        /// Its id within the scope (`*` for `global`).
        target: String,
        /// Allowed tool globs (empty: all).
        allow_list: Vec<String>,
        /// Denied tool globs.
        deny_list: Vec<String>,
    },
    /// A tool access policy set through `/api/auth/policies` was removed.
    ToolAccessPolicyCleared {
        /// Scope.
        scope: String,
        /// Its id within the scope (`*` for `global`).
        target: String,
    },
    /// This node lost its rate-limit lease (no leader reachable in time): each rule applies
    /// its `on_partition` mode until a grant comes back.
    RateLimitPartitionMode {
        /// This node.
        node_id: String,
        /// The lease that lapsed.
        lease_ms: u64,
    },
    /// This node holds a rate-limit lease again.
    RateLimitLeaseRestored {
        /// This node.
        node_id: String,
    },
    /// A reload of the configuration was requested.
    ConfigurationReloadRequested {
        /// The file.
        config_path: String,
        /// Who asked (`sighup`, `file_watch`, `api`, `tool`).
        requested_by: String,
    },
    /// A reload failed; the previous configuration keeps serving.
    ConfigurationReloadFailed {
        /// The file, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        config_path: Option<String>,
        /// Who asked.
        requested_by: String,
        /// Why.
        error: String,
    },
    /// A configuration was applied.
    ConfigurationReloaded {
        /// The file, if the configuration came from one.
        #[serde(skip_serializing_if = "Option::is_none")]
        config_path: Option<String>,
        /// Who asked.
        requested_by: String,
        /// Servers added.
        mcp_servers_added: Vec<String>,
        /// Servers removed.
        mcp_servers_removed: Vec<String>,
        /// Servers changed.
        mcp_servers_updated: Vec<String>,
        /// Servers unchanged (absent when not computed).
        #[serde(skip_serializing_if = "Option::is_none")]
        mcp_servers_unchanged: Option<Vec<String>>,
        /// How long it took (absent when not measured).
        #[serde(skip_serializing_if = "Option::is_none")]
        reload_duration_ms: Option<u64>,
    },
    /// A replicated configuration could not be applied on this node.
    ConfigurationApplyFailed {
        /// The replicated config version.
        config_version: u64,
        /// This node.
        node_id: String,
        /// Why.
        error: String,
    },
}

impl DomainEvent {
    /// MCP Hangar's event name and fields.
    pub fn into_parts(self) -> (String, Value) {
        // Externally tagged: {"Name": {fields}}; every variant is a struct variant.
        match serde_json::to_value(&self) {
            Ok(Value::Object(map)) => match map.into_iter().next() {
                Some((name, data)) => (name, data),
                None => ("UnknownEvent".to_owned(), Value::Null),
            },
            Ok(other) => ("UnknownEvent".to_owned(), other),
            Err(e) => (
                "UnknownEvent".to_owned(),
                Value::String(format!("unserialisable event: {e}")),
            ),
        }
    }
}

/// Where events go once the node is part of a cluster.
pub trait EventBackend: Send + Sync {
    /// Take an event for replication (its `seq` is assigned by the replicated log).
    fn submit(&self, event: Event);
    /// Replicated events with `seq > since`, oldest first, at most `limit`.
    fn since(&self, since: u64, limit: usize) -> Vec<Arc<Event>>;
    /// Highest replicated sequence number.
    fn last_seq(&self) -> u64;
}

/// The event log of one node.
pub struct EventLog {
    node_id: String,
    seq: AtomicU64,
    events: Mutex<VecDeque<Arc<Event>>>,
    capacity: usize,
    tx: broadcast::Sender<Arc<Event>>,
    backend: std::sync::OnceLock<Arc<dyn EventBackend>>,
}

impl EventLog {
    /// A log keeping the last `capacity` events.
    pub fn new(node_id: &str, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        EventLog {
            node_id: node_id.to_owned(),
            seq: AtomicU64::new(0),
            events: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            tx,
            backend: std::sync::OnceLock::new(),
        }
    }

    /// Route events through `backend` from now on (once; later calls are ignored). Events
    /// already in the local ring are submitted to it so nothing published at boot is lost.
    pub fn attach(&self, backend: Arc<dyn EventBackend>) {
        let earlier: Vec<Arc<Event>> = self.events.lock().drain(..).collect();
        if self.backend.set(backend.clone()).is_ok() {
            for ev in earlier {
                backend.submit((*ev).clone());
            }
        }
    }

    /// This node's id as stamped into `produced_by`.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Hand a replicated event to live subscribers (called by the backend after apply).
    pub fn deliver(&self, event: Arc<Event>) {
        let _ = self.tx.send(event);
    }

    /// Publish a domain event (the one way rooms publish events).
    pub fn emit(&self, event: DomainEvent) -> Arc<Event> {
        let (name, data) = event.into_parts();
        self.publish(&name, data)
    }

    /// Append an event and publish it; also logged as `domain_event`.
    fn publish(&self, event_type: &str, data: Value) -> Arc<Event> {
        if let Some(backend) = self.backend.get() {
            let ev = Event {
                seq: 0,
                event_id: uuid::Uuid::new_v4().to_string(),
                event_type: event_type.to_owned(),
                occurred_at: unix_now(),
                produced_by: self.node_id.clone(),
                data,
            };
            tracing::info!(event_type, event_id = %ev.event_id, data = %ev.data, "domain_event");
            backend.submit(ev.clone());
            return Arc::new(ev);
        }
        let mut events = self.events.lock();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ev = Arc::new(Event {
            seq,
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type: event_type.to_owned(),
            occurred_at: unix_now(),
            produced_by: self.node_id.clone(),
            data,
        });
        if events.len() == self.capacity {
            events.pop_front();
        }
        events.push_back(ev.clone());
        drop(events);
        tracing::info!(event_type, seq, data = %ev.data, "domain_event");
        let _ = self.tx.send(ev.clone());
        ev
    }

    /// Events with `seq > since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Vec<Arc<Event>> {
        if let Some(b) = self.backend.get() {
            return b.since(since, limit);
        }
        self.events
            .lock()
            .iter()
            .filter(|e| e.seq > since)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Highest sequence number issued so far.
    pub fn last_seq(&self) -> u64 {
        if let Some(b) = self.backend.get() {
            return b.last_seq();
        }
        self.seq.load(Ordering::SeqCst)
    }

    /// Live subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered() {
        let log = EventLog::new("n1", 3);
        for i in 0..5 {
            log.publish("McpServerStarted", serde_json::json!({"i": i}));
        }
        let all = log.since(0, 100);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.since(4, 100).len(), 1);
        assert_eq!(log.since(0, 2).len(), 2);
        assert_eq!(all[0].produced_by, "n1");
        assert_eq!(log.last_seq(), 5);
    }

    #[test]
    fn domain_events_serialise_to_mcp_hangar_names_and_fields() {
        let log = EventLog::new("n1", 8);
        let ev = log.emit(DomainEvent::McpServerStateChanged {
            mcp_server_id: "math".into(),
            old_state: "cold",
            new_state: "initializing",
        });
        assert_eq!(ev.event_type, "McpServerStateChanged");
        assert_eq!(
            ev.data,
            serde_json::json!({"mcp_server_id": "math", "old_state": "cold", "new_state": "initializing"})
        );
        let (name, data) = DomainEvent::ConfigurationReloaded {
            config_path: None,
            requested_by: "api_apply".into(),
            mcp_servers_added: vec!["a".into()],
            mcp_servers_removed: vec![],
            mcp_servers_updated: vec![],
            mcp_servers_unchanged: None,
            reload_duration_ms: None,
        }
        .into_parts();
        assert_eq!(name, "ConfigurationReloaded");
        assert_eq!(
            data,
            serde_json::json!({"requested_by": "api_apply", "mcp_servers_added": ["a"],
                "mcp_servers_removed": [], "mcp_servers_updated": []})
        );
    }
}
