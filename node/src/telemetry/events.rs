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

    /// Append an event and publish it; also logged as `domain_event`.
    pub fn publish(&self, event_type: &str, data: Value) -> Arc<Event> {
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
}
