//! Runtime room: the MCP server instances on THIS node.
//!
//! Owns each instance's lifecycle state (COLD → INITIALIZING → READY, DEAD when its process
//! or connection goes away), the single-flight start (N concurrent first callers cause one
//! start), the learned catalogue (tools, prompts, resources) and the last logs of a process
//! that died. Decisions about *when* to restart or stop belong to `supervisor/`; this room
//! only executes them and reports transitions.

mod catalog;
pub mod view;

pub use catalog::{Catalog, CatalogEntry};

use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::{Config, GroupSpec, RemoteAuth, ServerSpec};
use crate::telemetry::events::EventLog;
use crate::telemetry::{Metrics, unix_now};
use crate::upstream::{
    self, ConnectOptions, LogLine, Outcome, StdioSpec, TransportSpec, Upstream, UpstreamError,
};

/// Delay before recovery attempt `attempt` (0-based): 1 s, 2 s, 4 s … capped at 60 s, with
/// ±20 % jitter so a fleet does not retry in lockstep.
pub fn recovery_delay(attempt: u32) -> f64 {
    let base = (2f64.powi(attempt.min(10) as i32)).min(60.0);
    let jitter: f64 = rand::random::<f64>() * 0.4 - 0.2;
    (base * (1.0 + jitter)).max(0.2)
}

/// Lifecycle state of an instance (MCP Hangar's five states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Not running; starts on first use.
    Cold,
    /// Starting: process spawned / connecting, MCP handshake in progress.
    Initializing,
    /// Serving.
    Ready,
    /// Failing repeatedly; recovery with backoff.
    Degraded,
    /// The process or connection went away; the next use restarts it.
    Dead,
}

impl ServerState {
    /// Lower-case name used in REST and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Cold => "cold",
            ServerState::Initializing => "initializing",
            ServerState::Ready => "ready",
            ServerState::Degraded => "degraded",
            ServerState::Dead => "dead",
        }
    }

    /// Encoding of `mcp_hangar_mcp_server_state`.
    pub fn metric_value(self) -> i64 {
        match self {
            ServerState::Cold => 0,
            ServerState::Initializing => 1,
            ServerState::Ready => 2,
            ServerState::Degraded => 3,
            ServerState::Dead => 4,
        }
    }

    /// Parse the lower-case name (REST `?state=` filters).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "cold" => ServerState::Cold,
            "initializing" => ServerState::Initializing,
            "ready" => ServerState::Ready,
            "degraded" => ServerState::Degraded,
            "dead" => ServerState::Dead,
            _ => return None,
        })
    }
}

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

struct Inner {
    state: ServerState,
    conn: Option<Arc<Upstream>>,
    catalog: Option<Arc<Catalog>>,
    last_error: Option<String>,
    last_used: f64,
    started_at: Option<f64>,
    last_state_change: f64,
    dead_logs: Vec<LogLine>,
    removed: bool,
    consecutive_failures: u32,
    total_failures: u64,
    next_health_at: f64,
    recovery_attempt: u32,
    next_recovery_at: Option<f64>,
}

/// One MCP server (subprocess or remote) on this node.
pub struct Instance {
    id: String,
    spec: RwLock<ServerSpec>,
    inner: Mutex<Inner>,
    start_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<RuntimeEvent>,
    log: Arc<EventLog>,
    starts: std::sync::atomic::AtomicU64,
    checking: std::sync::atomic::AtomicBool,
    idling: std::sync::atomic::AtomicBool,
    reviving: std::sync::atomic::AtomicBool,
    /// Per-server breaker state reported in metrics and events (`closed`/`open`/`half_open`).
    breaker: Mutex<&'static str>,
    /// Successful starts plus passed health checks: lets group routing see that a member
    /// that left rotation has proven itself healthy again.
    proven: std::sync::atomic::AtomicU64,
}

/// A point-in-time view of an instance for REST and management tools.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Server id.
    pub id: String,
    /// Lifecycle state.
    pub state: ServerState,
    /// `subprocess` or `remote`.
    pub mode: &'static str,
    /// Connection alive.
    pub alive: bool,
    /// Number of tools known (learned, else predefined).
    pub tools_count: usize,
    /// Tools come from the configuration's predefined list (server not started yet).
    pub tools_predefined: bool,
    /// Description from config.
    pub description: Option<String>,
    /// Last error message (start failure, crash).
    pub last_error: Option<String>,
    /// Unix time of last use.
    pub last_used: f64,
    /// Unix time the current process/connection started.
    pub started_at: Option<f64>,
    /// Process id (stdio servers).
    pub pid: Option<u32>,
    /// How many times it was started by this node.
    pub starts: u64,
    /// Consecutive failures (health checks, starts, transport errors).
    pub consecutive_failures: u32,
    /// Failures since the node started.
    pub total_failures: u64,
    /// When the next recovery attempt of a DEGRADED server runs (unix seconds).
    pub next_recovery_at: Option<f64>,
    /// Unix time of the last state change.
    pub last_state_change: f64,
}

impl Instance {
    fn new(
        id: String,
        spec: ServerSpec,
        metrics: Arc<Metrics>,
        events: broadcast::Sender<RuntimeEvent>,
        log: Arc<EventLog>,
    ) -> Self {
        let now = unix_now();
        let inst = Instance {
            id,
            spec: RwLock::new(spec),
            inner: Mutex::new(Inner {
                state: ServerState::Cold,
                conn: None,
                catalog: None,
                last_error: None,
                last_used: now,
                started_at: None,
                last_state_change: now,
                dead_logs: Vec::new(),
                removed: false,
                consecutive_failures: 0,
                total_failures: 0,
                next_health_at: 0.0,
                recovery_attempt: 0,
                next_recovery_at: None,
            }),
            start_lock: tokio::sync::Mutex::new(()),
            metrics,
            events,
            log,
            starts: std::sync::atomic::AtomicU64::new(0),
            checking: std::sync::atomic::AtomicBool::new(false),
            idling: std::sync::atomic::AtomicBool::new(false),
            reviving: std::sync::atomic::AtomicBool::new(false),
            breaker: Mutex::new("closed"),
            proven: std::sync::atomic::AtomicU64::new(0),
        };
        let mode = inst.spec.read().mode_name();
        inst.metrics
            .server_info
            .with_label_values(&[&inst.id, mode])
            .set(1);
        inst.publish_state(ServerState::Cold, now);
        inst
    }

    /// Server id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configured spec.
    pub fn spec(&self) -> ServerSpec {
        self.spec.read().clone()
    }

    /// `subprocess` or `remote`.
    pub fn mode(&self) -> &'static str {
        self.spec.read().mode_name()
    }

    /// Current state.
    pub fn state(&self) -> ServerState {
        self.inner.lock().state
    }

    /// The learned catalogue, if the server has been started at least once.
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.inner.lock().catalog.clone()
    }

    /// The live connection if READY.
    pub fn connection(&self) -> Option<Arc<Upstream>> {
        let inner = self.inner.lock();
        match (&inner.conn, inner.state) {
            (Some(c), ServerState::Ready) if c.is_alive() => Some(c.clone()),
            _ => None,
        }
    }

    /// Record a use (for idle accounting).
    pub fn touch(&self) {
        self.inner.lock().last_used = unix_now();
    }

    /// Status snapshot.
    pub fn status(&self) -> InstanceStatus {
        let spec = self.spec.read();
        let common = spec.common();
        let inner = self.inner.lock();
        let predefined = match common.and_then(|c| c.tools.as_ref()) {
            Some(crate::config::ToolsSpec::Predefined(list)) => Some(list.len()),
            _ => None,
        };
        let (tools_count, tools_predefined) = match (&inner.catalog, predefined) {
            (Some(c), _) => (c.tools.len(), false),
            (None, Some(n)) => (n, true),
            (None, None) => (0, false),
        };
        InstanceStatus {
            id: self.id.clone(),
            state: inner.state,
            mode: spec.mode_name(),
            alive: inner.conn.as_ref().is_some_and(|c| c.is_alive()),
            tools_count,
            tools_predefined,
            description: common.and_then(|c| c.description.clone()),
            last_error: inner.last_error.clone(),
            last_used: inner.last_used,
            started_at: inner.started_at,
            pid: inner.conn.as_ref().and_then(|c| c.pid()),
            starts: self.starts.load(std::sync::atomic::Ordering::Relaxed),
            consecutive_failures: inner.consecutive_failures,
            total_failures: inner.total_failures,
            next_recovery_at: inner.next_recovery_at,
            last_state_change: inner.last_state_change,
        }
    }

    /// The last `n` log lines: those of the process that ended last (so a crash can be
    /// diagnosed after the restart), followed by the live process's.
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        let inner = self.inner.lock();
        let mut all = inner.dead_logs.clone();
        if let Some(c) = &inner.conn {
            all.extend(c.logs(n));
        }
        let skip = all.len().saturating_sub(n);
        all.split_off(skip)
    }

    fn publish_state(&self, state: ServerState, at: f64) {
        let id = [self.id.as_str()];
        self.metrics
            .server_state
            .with_label_values(&id)
            .set(state.metric_value());
        self.metrics
            .server_up
            .with_label_values(&id)
            .set(i64::from(state == ServerState::Ready));
        self.metrics
            .server_initialized
            .with_label_values(&id)
            .set(i64::from(state == ServerState::Ready));
        self.metrics
            .connections_active
            .with_label_values(&id)
            .set(i64::from(state == ServerState::Ready));
        self.metrics
            .server_last_state_change
            .with_label_values(&id)
            .set(at);
    }

    fn set_state(&self, inner: &mut Inner, state: ServerState) {
        if inner.state != state {
            let now = unix_now();
            self.log.publish(
                "McpServerStateChanged",
                serde_json::json!({"mcp_server_id": self.id, "old_state": inner.state.as_str(), "new_state": state.as_str()}),
            );
            inner.state = state;
            inner.last_state_change = now;
            self.publish_state(state, now);
        }
    }

    /// Return a live connection, starting the server if needed. Concurrent callers share one
    /// start (single flight); they wait for it, bounded by the start timeout.
    pub async fn ensure_ready(self: &Arc<Self>) -> Result<Arc<Upstream>, StartError> {
        if let Some(c) = self.fast_path()? {
            return Ok(c);
        }
        let _guard = self.start_lock.lock().await;
        if let Some(c) = self.fast_path()? {
            return Ok(c);
        }
        self.start_locked().await
    }

    fn fast_path(&self) -> Result<Option<Arc<Upstream>>, StartError> {
        let mut inner = self.inner.lock();
        if inner.removed {
            return Err(StartError::Removed {
                server: self.id.clone(),
            });
        }
        if inner.state == ServerState::Degraded
            && let Some(at) = inner.next_recovery_at
            && unix_now() < at
        {
            self.metrics
                .circuit_breaker_state
                .with_label_values(&[&self.id, "open"])
                .set(1);
            return Err(StartError::CircuitOpen {
                server: self.id.clone(),
                retry_in_s: (at - unix_now()).max(0.0),
                failures: inner.consecutive_failures,
            });
        }
        if let Some(c) = inner.conn.clone() {
            if c.is_alive() && inner.state == ServerState::Ready {
                inner.last_used = unix_now();
                return Ok(Some(c));
            }
            if !c.is_alive() {
                self.mark_dead(&mut inner, &c, "connection closed");
            }
        }
        Ok(None)
    }

    fn mark_dead(&self, inner: &mut Inner, conn: &Arc<Upstream>, why: &str) {
        inner.dead_logs = conn.logs(1000);
        inner.dead_logs.push(LogLine {
            timestamp: unix_now(),
            line: format!("[hangar] process ended: {why}"),
            stream: "hangar".to_owned(),
        });
        inner.conn = None;
        inner.last_error = Some(why.to_owned());
        self.metrics
            .stops
            .with_label_values(&[&self.id, "error"])
            .inc();
        self.set_state(inner, ServerState::Dead);
    }

    async fn start_locked(self: &Arc<Self>) -> Result<Arc<Upstream>, StartError> {
        let spec = self.spec.read().clone();
        let mode = spec.mode_name();
        let was_degraded = {
            let mut inner = self.inner.lock();
            let was = inner.state == ServerState::Degraded;
            self.set_state(&mut inner, ServerState::Initializing);
            was
        };
        let id = [self.id.as_str()];
        self.metrics
            .cold_start_in_progress
            .with_label_values(&id)
            .set(1);
        let t0 = Instant::now();
        let result = connect(&self.id, &spec).await;
        self.metrics
            .cold_start_in_progress
            .with_label_values(&id)
            .set(0);
        let conn = match result {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .starts
                    .with_label_values(&[&self.id, "failure"])
                    .inc();
                tracing::warn!(mcp_server = %self.id, error = %e, "mcp_server_start_failed");
                let mut inner = self.inner.lock();
                inner.last_error = Some(e.to_string());
                // A failed recovery attempt goes back to DEGRADED (its backoff continues);
                // any other failed start leaves the server DEAD (or DEGRADED at the threshold).
                let back = if was_degraded {
                    ServerState::Degraded
                } else {
                    ServerState::Dead
                };
                self.set_state(&mut inner, back);
                self.record_failure_locked(&mut inner, "start_failure", &e.to_string());
                return Err(StartError::Upstream {
                    server: self.id.clone(),
                    source: e,
                });
            }
        };
        // Learn the catalogue before declaring READY so every caller sees the tools.
        let catalog = Catalog::learn(&conn).await;
        let elapsed = t0.elapsed();
        self.metrics
            .starts
            .with_label_values(&[&self.id, "success"])
            .inc();
        self.metrics
            .cold_start
            .with_label_values(&[&self.id, mode])
            .observe(elapsed.as_secs_f64());
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let catalog = Arc::new(catalog);
        let (removed, previous) = {
            let inner = self.inner.lock();
            (inner.removed, inner.catalog.clone())
        };
        let changed = previous.is_some_and(|old| !old.same_lists(&catalog));
        if removed {
            conn.shutdown().await;
            return Err(StartError::Removed {
                server: self.id.clone(),
            });
        }
        {
            let mut inner = self.inner.lock();
            inner.conn = Some(conn.clone());
            inner.catalog = Some(catalog.clone());
            inner.started_at = Some(unix_now());
            inner.last_used = unix_now();
            inner.last_error = None;
            inner.consecutive_failures = 0;
            inner.recovery_attempt = 0;
            inner.next_recovery_at = None;
            inner.next_health_at = unix_now() + self.health_interval();
            self.set_state(&mut inner, ServerState::Ready);
        }
        self.proven
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.set_breaker("closed");
        self.log.publish(
            "McpServerStarted",
            serde_json::json!({"mcp_server_id": self.id, "mode": mode, "tools_count": catalog.tools.len(),
                "startup_duration_ms": elapsed.as_millis() as u64}),
        );
        tracing::info!(
            mcp_server = %self.id, mode, tools_count = catalog.tools.len(),
            startup_duration_ms = elapsed.as_millis() as u64, "mcp_server_started"
        );
        let _ = self.events.send(RuntimeEvent::CatalogChanged {
            server: self.id.clone(),
            lists: vec!["tools", "prompts", "resources"],
            notify: changed,
        });
        self.spawn_watchers(conn.clone());
        Ok(conn)
    }

    fn spawn_watchers(self: &Arc<Self>, conn: Arc<Upstream>) {
        let me = Arc::downgrade(self);
        let mut notes = conn.subscribe();
        let c2 = conn.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c2.closed() => {
                        if let Some(inst) = me.upgrade() {
                            let mut inner = inst.inner.lock();
                            if inner.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &c2)) {
                                tracing::warn!(mcp_server = %inst.id, "mcp_server_connection_lost");
                                inst.mark_dead(&mut inner, &c2, "the upstream process exited or the connection was lost");
                            }
                        }
                        break;
                    }
                    msg = notes.recv() => {
                        let msg = match msg {
                            Ok(m) => m,
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => break,
                        };
                        let Some(inst) = me.upgrade() else { break };
                        inst.on_notification(&c2, msg).await;
                    }
                }
            }
        });
    }

    async fn on_notification(
        self: &Arc<Self>,
        conn: &Arc<Upstream>,
        msg: Arc<crate::jsonrpc::Message>,
    ) {
        let method = msg.method.as_deref().unwrap_or_default();
        let list = match method {
            "notifications/tools/list_changed" => Some("tools"),
            "notifications/prompts/list_changed" => Some("prompts"),
            "notifications/resources/list_changed" => Some("resources"),
            _ => None,
        };
        match list {
            Some(list) => {
                let fresh = Catalog::learn(conn).await;
                {
                    let mut inner = self.inner.lock();
                    if inner.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                        inner.catalog = Some(Arc::new(fresh));
                    }
                }
                let _ = self.events.send(RuntimeEvent::CatalogChanged {
                    server: self.id.clone(),
                    lists: vec![list],
                    notify: true,
                });
            }
            None => {
                let _ = self.events.send(RuntimeEvent::UpstreamNotification {
                    server: self.id.clone(),
                    message: msg,
                });
            }
        }
    }

    /// Stop the instance (→ COLD). `reason` is reported in metrics and logs.
    pub async fn stop(&self, reason: &str) {
        let _guard = self.start_lock.lock().await;
        let conn = {
            let mut inner = self.inner.lock();
            let conn = inner.conn.take();
            if let Some(c) = &conn {
                inner.dead_logs = c.logs(1000);
            }
            conn
        };
        if let Some(c) = conn {
            c.shutdown().await;
            self.metrics
                .stops
                .with_label_values(&[&self.id, reason])
                .inc();
            self.log.publish(
                "McpServerStopped",
                serde_json::json!({"mcp_server_id": self.id, "reason": reason}),
            );
        }
        let mut inner = self.inner.lock();
        inner.next_recovery_at = None;
        inner.recovery_attempt = 0;
        inner.consecutive_failures = 0;
        self.set_state(&mut inner, ServerState::Cold);
        drop(inner);
        self.set_breaker("closed");
    }

    /// Report that a call saw the connection fail (transport error): if the connection is
    /// gone, the instance becomes DEAD at once so the next call restarts it.
    pub fn report_transport_failure(&self, conn: &Arc<Upstream>, error: &str) {
        let mut inner = self.inner.lock();
        if !conn.is_alive() && inner.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            self.mark_dead(
                &mut inner,
                conn,
                "the upstream connection failed during a call",
            );
        }
        self.record_failure_locked(&mut inner, "transport_failure", error);
    }

    /// Report a successful call (resets the consecutive-failure count).
    pub fn report_success(&self) {
        let mut inner = self.inner.lock();
        if inner.consecutive_failures > 0 && inner.state == ServerState::Ready {
            inner.consecutive_failures = 0;
        }
    }

    fn health_interval(&self) -> f64 {
        self.spec
            .read()
            .common()
            .map(|c| c.health_check_interval_s as f64)
            .unwrap_or(60.0)
            .max(1.0)
    }

    fn max_failures(&self) -> u32 {
        self.spec
            .read()
            .common()
            .map(|c| c.max_consecutive_failures)
            .unwrap_or(3)
            .max(1)
    }

    /// Move the per-server breaker to `state`: metric `mcp_hangar_circuit_breaker_state` and,
    /// on a change, event `CircuitBreakerStateChanged`.
    fn set_breaker(&self, state: &'static str) {
        let old = std::mem::replace(&mut *self.breaker.lock(), state);
        if old != state {
            self.log.publish(
                "CircuitBreakerStateChanged",
                serde_json::json!({"mcp_server_id": self.id, "old_state": old, "new_state": state}),
            );
        }
        for s in ["closed", "open", "half_open"] {
            self.metrics
                .circuit_breaker_state
                .with_label_values(&[&self.id, s])
                .set(i64::from(s == state));
        }
    }

    /// Count a failure; at `max_consecutive_failures` the server becomes DEGRADED and a
    /// recovery attempt is scheduled with exponential backoff and jitter.
    fn record_failure_locked(&self, inner: &mut Inner, reason: &str, error: &str) {
        inner.consecutive_failures += 1;
        inner.total_failures += 1;
        if inner.consecutive_failures < self.max_failures() {
            return;
        }
        let first = inner.state != ServerState::Degraded;
        let delay = recovery_delay(inner.recovery_attempt);
        inner.recovery_attempt = inner.recovery_attempt.saturating_add(1);
        inner.next_recovery_at = Some(unix_now() + delay);
        if first {
            if let Some(c) = inner.conn.take() {
                inner.dead_logs = c.logs(1000);
                tokio::spawn(async move { c.shutdown().await });
            }
            self.set_state(inner, ServerState::Degraded);
            self.log.publish(
                "McpServerDegraded",
                serde_json::json!({"mcp_server_id": self.id, "consecutive_failures": inner.consecutive_failures,
                    "total_failures": inner.total_failures, "reason": reason, "error": error}),
            );
        }
        self.set_breaker("open");
        tracing::warn!(mcp_server = %self.id, failures = inner.consecutive_failures, next_attempt_in_s = delay, "mcp_server_recovery_scheduled");
    }

    /// Number of requests in flight on the live connection.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().conn.as_ref().map_or(0, |c| c.in_flight())
    }

    /// How many times this instance proved itself healthy (successful starts and passed
    /// health checks); only ever grows.
    pub fn proven(&self) -> u64 {
        self.proven.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Try to bring a DEAD instance back (used for group members, which no call may reach
    /// while they are out of rotation). One attempt at a time; failures count toward
    /// DEGRADED, whose recovery then continues with backoff.
    pub async fn revive(self: &Arc<Self>) {
        if self
            .reviving
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        if self.state() == ServerState::Dead
            && let Err(e) = self.ensure_ready().await
        {
            tracing::warn!(mcp_server = %self.id, error = %e, "mcp_server_revive_failed");
        }
        self.reviving
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Seconds since the last use.
    pub fn idle_for(&self) -> f64 {
        (unix_now() - self.inner.lock().last_used).max(0.0)
    }

    /// Whether a health check is due (READY and its interval elapsed).
    pub fn health_due(&self) -> bool {
        let inner = self.inner.lock();
        inner.state == ServerState::Ready && unix_now() >= inner.next_health_at
    }

    /// Whether a recovery attempt is due (DEGRADED and its backoff elapsed).
    pub fn recovery_due(&self) -> bool {
        let inner = self.inner.lock();
        inner.state == ServerState::Degraded
            && inner.next_recovery_at.is_some_and(|t| unix_now() >= t)
    }

    /// Run one MCP-aware health check (`ping`, falling back to `tools/list`) with a timeout.
    /// Failures count toward `max_consecutive_failures`.
    pub async fn health_check(self: &Arc<Self>) -> Result<Duration, String> {
        self.inner.lock().next_health_at = unix_now() + self.health_interval();
        if self
            .checking
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return Err("a health check is already running".into());
        }
        let result = self.health_check_inner().await;
        self.checking
            .store(false, std::sync::atomic::Ordering::Release);
        let label = if result.is_ok() {
            "healthy"
        } else {
            "unhealthy"
        };
        self.metrics
            .health_checks
            .with_label_values(&[&self.id, label])
            .inc();
        let mut inner = self.inner.lock();
        inner.next_health_at = unix_now() + self.health_interval();
        match &result {
            Ok(d) => {
                self.metrics
                    .health_check_duration
                    .with_label_values(&[&self.id])
                    .observe(d.as_secs_f64());
                inner.consecutive_failures = 0;
                self.proven
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                self.log.publish(
                    "HealthCheckPassed",
                    serde_json::json!({"mcp_server_id": self.id, "duration_ms": d.as_millis() as u64}),
                );
            }
            Err(e) => {
                self.log.publish(
                    "HealthCheckFailed",
                    serde_json::json!({"mcp_server_id": self.id, "consecutive_failures": inner.consecutive_failures + 1,
                        "error_message": e}),
                );
                self.record_failure_locked(&mut inner, "health_check_failures", e);
            }
        }
        self.metrics
            .health_consecutive_failures
            .with_label_values(&[&self.id])
            .set(i64::from(inner.consecutive_failures));
        result
    }

    async fn health_check_inner(&self) -> Result<Duration, String> {
        let conn = self
            .connection()
            .ok_or_else(|| "the server is not READY".to_owned())?;
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(5));
        match conn.request("ping", None, None, timeout).await {
            Ok(Outcome::Result(_)) => Ok(t0.elapsed()),
            Ok(Outcome::Error(e)) if e.code == crate::jsonrpc::METHOD_NOT_FOUND => {
                match conn.request("tools/list", None, None, timeout).await {
                    Ok(Outcome::Result(_)) => Ok(t0.elapsed()),
                    Ok(Outcome::Error(e)) => Err(format!(
                        "tools/list answered error {}: {}",
                        e.code, e.message
                    )),
                    Err(e) => Err(e.to_string()),
                }
            }
            Ok(Outcome::Error(e)) => Err(format!("ping answered error {}: {}", e.code, e.message)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One recovery attempt of a DEGRADED server (half-open probe): start it; on success it
    /// is READY and its breaker closed, on failure the next attempt is scheduled.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StartError> {
        let _guard = self.start_lock.lock().await;
        {
            let mut inner = self.inner.lock();
            let due = inner.next_recovery_at.is_some_and(|t| unix_now() >= t);
            if inner.state != ServerState::Degraded || !due {
                return Ok(());
            }
            inner.next_recovery_at = None;
        }
        self.set_breaker("half_open");
        self.start_locked().await.map(|_| ())
    }

    /// Mark the instance idle-stopped (→ COLD) if it is still idle and nothing is in flight.
    pub async fn stop_if_idle(&self) -> bool {
        if self.idling.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return false;
        }
        let stopped = self.stop_if_idle_inner().await;
        self.idling
            .store(false, std::sync::atomic::Ordering::Release);
        stopped
    }

    async fn stop_if_idle_inner(&self) -> bool {
        let (idle, ttl, last_used) = {
            let inner = self.inner.lock();
            let ttl = self
                .spec
                .read()
                .common()
                .map(|c| c.idle_ttl_s as f64)
                .unwrap_or(300.0);
            (unix_now() - inner.last_used, ttl, inner.last_used)
        };
        if idle < ttl || self.in_flight() > 0 || self.state() != ServerState::Ready {
            return false;
        }
        self.log.publish(
            "McpServerIdleDetected",
            serde_json::json!({"mcp_server_id": self.id, "idle_duration_s": idle, "last_used_at": last_used}),
        );
        self.stop("idle").await;
        true
    }
}

/// Build the transport spec for a server and connect (spawn + MCP handshake).
async fn connect(id: &str, spec: &ServerSpec) -> Result<Arc<Upstream>, UpstreamError> {
    let transport = transport_spec(spec);
    let opts = ConnectOptions {
        server_id: id.to_owned(),
        client_name: "hangar".to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: "2025-11-25".to_owned(),
        init_timeout: Duration::from_secs(30),
        client_capabilities: serde_json::json!({
            "roots": {"listChanged": true},
            "sampling": {},
            "elicitation": {}
        }),
    };
    Upstream::connect(&transport, opts).await
}

/// Translate a configured server into the upstream room's transport spec.
pub fn transport_spec(spec: &ServerSpec) -> TransportSpec {
    match spec {
        ServerSpec::Subprocess(s) => TransportSpec::Stdio(StdioSpec {
            argv: s.command.clone(),
            env: s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            cwd: s.cwd.clone(),
        }),
        ServerSpec::Remote(r) => {
            let mut headers: Vec<(String, String)> = r
                .http
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match &r.auth {
                RemoteAuth::None => {}
                RemoteAuth::ApiKey { header, key } => {
                    headers.push((header.clone(), key.expose().to_owned()))
                }
                RemoteAuth::Bearer { token } => headers.push((
                    "Authorization".to_owned(),
                    format!("Bearer {}", token.expose()),
                )),
                RemoteAuth::Basic { username, password } => {
                    let raw = format!("{username}:{}", password.expose());
                    headers.push((
                        "Authorization".to_owned(),
                        format!("Basic {}", base64(raw.as_bytes())),
                    ));
                }
            }
            TransportSpec::Http(upstream::HttpSpec {
                endpoint: r.endpoint.clone(),
                headers,
                connect_timeout: r.http.connect_timeout,
                read_timeout: r.http.read_timeout,
                verify_tls: r.tls.verify_ssl,
                ca_cert_path: r.tls.ca_cert_path.clone(),
            })
        }
        // Groups have no transport of their own; the runtime never builds instances for them.
        ServerSpec::Group(_) => TransportSpec::Stdio(StdioSpec {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }),
    }
}

/// Standard base64 (RFC 4648) for Basic auth headers.
fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
            node_id,
            started: Instant::now(),
            shared_catalogs: RwLock::new(std::collections::HashMap::new()),
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
                let inst = Arc::new(Instance::new(
                    id.clone(),
                    other,
                    self.metrics.clone(),
                    self.events.clone(),
                    self.log.clone(),
                ));
                self.instances.write().insert(id, inst);
            }
        }
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
        inst.inner.lock().removed = true;
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
                        old.inner.lock().removed = true;
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

    /// Stop every instance (graceful shutdown), concurrently.
    pub async fn shutdown_all(&self) {
        let all = self.instances();
        futures::future::join_all(all.iter().map(|i| i.stop("shutdown"))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{base64, recovery_delay};

    #[test]
    fn recovery_backoff_grows_with_jitter_and_caps() {
        for attempt in 0..20 {
            let d = recovery_delay(attempt);
            let base = 2f64.powi(attempt.min(10) as i32).min(60.0);
            assert!(
                d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                "attempt {attempt}: {d}"
            );
        }
        assert!(recovery_delay(30) <= 72.0);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"user:pa55"), "dXNlcjpwYTU1");
    }
}
