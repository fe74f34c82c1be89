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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::{Config, GroupSpec, RemoteAuth, ServerSpec};
pub use crate::supervisor::lifecycle::ServerState;
use crate::supervisor::lifecycle::{Action, BreakerState, Event, Generation, Lifecycle, Policy};
use crate::telemetry::events::{DomainEvent, EventLog};
use crate::telemetry::{Metrics, unix_now};
use crate::upstream::{
    self, ConnectOptions, LogLine, Outcome, StdioSpec, TransportSpec, Upstream, UpstreamError,
};

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
    /// The decisions: state, failures, breaker, backoff, health and idle clocks.
    life: Lifecycle,
    /// The live connection and the lifecycle generation it belongs to.
    conn: Option<(Arc<Upstream>, Generation)>,
    catalog: Option<Arc<Catalog>>,
    started_at: Option<f64>,
    dead_logs: Vec<LogLine>,
    removed: bool,
}

/// One MCP server (subprocess or remote) on this node. It carries out what its
/// [`Lifecycle`] decides: starts, disconnects, health checks, idle stops.
pub struct Instance {
    id: String,
    spec: RwLock<ServerSpec>,
    inner: Mutex<Inner>,
    start_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<RuntimeEvent>,
    log: Arc<EventLog>,
    starts: AtomicU64,
    checking: AtomicBool,
    idling: AtomicBool,
    reviving: AtomicBool,
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
    /// Consecutive failures (health checks, starts, lost connections, transport errors).
    pub consecutive_failures: u32,
    /// Failures since the node started.
    pub total_failures: u64,
    /// When the next recovery attempt of a DEGRADED server runs (unix seconds).
    pub next_recovery_at: Option<f64>,
    /// Unix time of the last state change.
    pub last_state_change: f64,
}

/// The lifecycle policy of a server spec.
pub fn policy_of(spec: &ServerSpec) -> Policy {
    let defaults = Policy::default();
    match spec.common() {
        Some(c) => Policy {
            max_consecutive_failures: c.max_consecutive_failures.max(1),
            health_interval_s: c.health_check_interval_s as f64,
            idle_ttl_s: c.idle_ttl_s as f64,
            backoff: defaults.backoff,
        },
        None => defaults,
    }
}

/// A random number in `[0, 1)`: the jitter source of the backoff.
fn jitter() -> f64 {
    rand::random::<f64>()
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
            inner: Mutex::new(Inner {
                life: Lifecycle::new(policy_of(&spec), now),
                conn: None,
                catalog: None,
                started_at: None,
                dead_logs: Vec::new(),
                removed: false,
            }),
            spec: RwLock::new(spec),
            start_lock: tokio::sync::Mutex::new(()),
            metrics,
            events,
            log,
            starts: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            idling: AtomicBool::new(false),
            reviving: AtomicBool::new(false),
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
        self.inner.lock().life.state()
    }

    /// The learned catalogue, if the server has been started at least once.
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.inner.lock().catalog.clone()
    }

    /// The live connection if READY.
    pub fn connection(&self) -> Option<Arc<Upstream>> {
        let inner = self.inner.lock();
        match (&inner.conn, inner.life.state()) {
            (Some((c, _)), ServerState::Ready) if c.is_alive() => Some(c.clone()),
            _ => None,
        }
    }

    /// Record a use (for idle accounting).
    pub fn touch(&self) {
        self.step(&mut self.inner.lock(), Event::Used);
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
        let conn = inner.conn.as_ref().map(|(c, _)| c);
        InstanceStatus {
            id: self.id.clone(),
            state: inner.life.state(),
            mode: spec.mode_name(),
            alive: conn.is_some_and(|c| c.is_alive()),
            tools_count,
            tools_predefined,
            description: common.and_then(|c| c.description.clone()),
            last_error: inner.life.last_error().map(str::to_owned),
            last_used: inner.life.last_used(),
            started_at: inner.started_at,
            pid: conn.and_then(|c| c.pid()),
            starts: self.starts.load(Ordering::Relaxed),
            consecutive_failures: inner.life.consecutive_failures(),
            total_failures: inner.life.total_failures(),
            next_recovery_at: inner.life.next_recovery_at(),
            last_state_change: inner.life.last_state_change(),
        }
    }

    /// The last `n` log lines: those of the process that ended last (so a crash can be
    /// diagnosed after the restart), followed by the live process's.
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        let inner = self.inner.lock();
        let mut all = inner.dead_logs.clone();
        if let Some((c, _)) = &inner.conn {
            all.extend(c.logs(n));
        }
        let skip = all.len().saturating_sub(n);
        all.split_off(skip)
    }

    fn publish_state(&self, state: ServerState, at: f64) {
        let id = [self.id.as_str()];
        let m = &self.metrics;
        m.server_state
            .with_label_values(&id)
            .set(state.metric_value());
        let ready = i64::from(state == ServerState::Ready);
        m.server_up.with_label_values(&id).set(ready);
        m.server_initialized.with_label_values(&id).set(ready);
        m.connections_active.with_label_values(&id).set(ready);
        m.server_last_state_change.with_label_values(&id).set(at);
    }

    /// Feed one event to the lifecycle and carry out what it decided that needs no waiting
    /// (state and breaker reports, events, disconnecting a DEGRADED server). Returns the
    /// decisions that the caller carries out (start, refuse, health check, …).
    fn step(&self, inner: &mut Inner, event: Event) -> Vec<Action> {
        let now = unix_now();
        let failures_before = inner.life.consecutive_failures();
        let actions = inner.life.step(event, now, &mut jitter);
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::StateChanged { old, new } => {
                    self.log.emit(DomainEvent::McpServerStateChanged {
                        mcp_server_id: self.id.clone(),
                        old_state: old.as_str(),
                        new_state: new.as_str(),
                    });
                    self.publish_state(new, now);
                }
                Action::BreakerChanged { old, new } => {
                    self.log.emit(DomainEvent::CircuitBreakerStateChanged {
                        mcp_server_id: self.id.clone(),
                        old_state: old.as_str(),
                        new_state: new.as_str(),
                    });
                    for s in BreakerState::ALL {
                        self.metrics
                            .circuit_breaker_state
                            .with_label_values(&[&self.id, s.as_str()])
                            .set(i64::from(s == new));
                    }
                }
                Action::Disconnect => {
                    if let Some((c, _)) = inner.conn.take() {
                        inner.dead_logs = c.logs(1000);
                        tokio::spawn(async move { c.shutdown().await });
                    }
                }
                Action::Degraded {
                    consecutive_failures,
                    total_failures,
                    reason,
                    error,
                } => {
                    self.log.emit(DomainEvent::McpServerDegraded {
                        mcp_server_id: self.id.clone(),
                        consecutive_failures,
                        total_failures,
                        reason: reason.as_str(),
                        error,
                    });
                }
                Action::RecoveryScheduled { in_s, failures } => {
                    tracing::warn!(mcp_server = %self.id, failures, next_attempt_in_s = in_s, "mcp_server_recovery_scheduled");
                }
                other => rest.push(other),
            }
        }
        let failures = inner.life.consecutive_failures();
        if failures != failures_before {
            self.metrics
                .health_consecutive_failures
                .with_label_values(&[&self.id])
                .set(i64::from(failures));
        }
        rest
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
        let actions = self.step(&mut self.inner.lock(), Event::StartRequested);
        self.carry_out_start(actions).await
    }

    /// Under the start lock: run the start the lifecycle asked for, or refuse.
    async fn carry_out_start(
        self: &Arc<Self>,
        actions: Vec<Action>,
    ) -> Result<Arc<Upstream>, StartError> {
        for action in actions {
            match action {
                Action::Refuse {
                    retry_in_s,
                    failures,
                } => {
                    return Err(StartError::CircuitOpen {
                        server: self.id.clone(),
                        retry_in_s,
                        failures,
                    });
                }
                Action::Connect => return self.start_locked().await,
                _ => {}
            }
        }
        // Nothing to start: READY (or started by the lifecycle's own decision meanwhile).
        match self.fast_path()? {
            Some(c) => Ok(c),
            None => Err(StartError::Upstream {
                server: self.id.clone(),
                source: UpstreamError::Closed {
                    server: self.id.clone(),
                    message: "the server stopped while the call waited for its start".to_owned(),
                    before_send: true,
                },
            }),
        }
    }

    /// A live READY connection without waiting, or `None` (then a start is needed). Notices
    /// a connection that died unnoticed and a server that was removed or whose circuit is open.
    fn fast_path(&self) -> Result<Option<Arc<Upstream>>, StartError> {
        let mut inner = self.inner.lock();
        if inner.removed {
            return Err(StartError::Removed {
                server: self.id.clone(),
            });
        }
        if inner.life.state() == ServerState::Degraded
            && let Some(at) = inner.life.next_recovery_at()
        {
            let now = unix_now();
            if now < at {
                return Err(StartError::CircuitOpen {
                    server: self.id.clone(),
                    retry_in_s: (at - now).max(0.0),
                    failures: inner.life.consecutive_failures(),
                });
            }
        }
        if let Some((c, generation)) = inner.conn.clone() {
            if c.is_alive() && inner.life.state() == ServerState::Ready {
                self.step(&mut inner, Event::Used);
                return Ok(Some(c));
            }
            if !c.is_alive() {
                self.lose_connection(&mut inner, generation, "connection closed");
            }
        }
        Ok(None)
    }

    /// The connection of `generation` is gone: keep its logs, drop it, tell the lifecycle.
    fn lose_connection(&self, inner: &mut Inner, generation: Generation, why: &str) {
        let current = inner.conn.as_ref().is_some_and(|(_, g)| *g == generation);
        if !current {
            return;
        }
        if let Some((c, _)) = inner.conn.take() {
            inner.dead_logs = c.logs(1000);
        }
        inner.dead_logs.push(LogLine {
            timestamp: unix_now(),
            line: format!("[hangar] process ended: {why}"),
            stream: "hangar".to_owned(),
        });
        self.metrics
            .stops
            .with_label_values(&[&self.id, "error"])
            .inc();
        self.step(
            inner,
            Event::ConnectionLost {
                generation,
                why: why.to_owned(),
            },
        );
    }

    /// Under the start lock, INITIALIZING: connect, learn the catalogue, become READY.
    async fn start_locked(self: &Arc<Self>) -> Result<Arc<Upstream>, StartError> {
        let spec = self.spec.read().clone();
        let mode = spec.mode_name();
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
                self.step(
                    &mut self.inner.lock(),
                    Event::StartFailed {
                        error: e.to_string(),
                    },
                );
                return Err(StartError::Upstream {
                    server: self.id.clone(),
                    source: e,
                });
            }
        };
        // Learn the catalogue before declaring READY so every caller sees the tools.
        let catalog = Arc::new(Catalog::learn(&conn).await);
        let elapsed = t0.elapsed();
        let (removed, previous) = {
            let inner = self.inner.lock();
            (inner.removed, inner.catalog.clone())
        };
        if removed {
            conn.shutdown().await;
            self.step(&mut self.inner.lock(), Event::Stopped);
            return Err(StartError::Removed {
                server: self.id.clone(),
            });
        }
        self.metrics
            .starts
            .with_label_values(&[&self.id, "success"])
            .inc();
        self.metrics
            .cold_start
            .with_label_values(&[&self.id, mode])
            .observe(elapsed.as_secs_f64());
        self.starts.fetch_add(1, Ordering::Relaxed);
        let changed = previous.is_some_and(|old| !old.same_lists(&catalog));
        let generation = {
            let mut inner = self.inner.lock();
            inner.catalog = Some(catalog.clone());
            inner.started_at = Some(unix_now());
            self.step(&mut inner, Event::Started);
            let generation = inner.life.generation();
            inner.conn = Some((conn.clone(), generation));
            generation
        };
        let startup_duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self.log.emit(DomainEvent::McpServerStarted {
            mcp_server_id: self.id.clone(),
            mode,
            tools_count: catalog.tools.len(),
            startup_duration_ms,
        });
        tracing::info!(
            mcp_server = %self.id, mode, tools_count = catalog.tools.len(),
            startup_duration_ms, "mcp_server_started"
        );
        let _ = self.events.send(RuntimeEvent::CatalogChanged {
            server: self.id.clone(),
            lists: vec!["tools", "prompts", "resources"],
            notify: changed,
        });
        self.spawn_watchers(conn.clone(), generation);
        Ok(conn)
    }

    fn spawn_watchers(self: &Arc<Self>, conn: Arc<Upstream>, generation: Generation) {
        let me = Arc::downgrade(self);
        let mut notes = conn.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = conn.closed() => {
                        if let Some(inst) = me.upgrade() {
                            let mut inner = inst.inner.lock();
                            if inner.conn.as_ref().is_some_and(|(_, g)| *g == generation) {
                                tracing::warn!(mcp_server = %inst.id, "mcp_server_connection_lost");
                            }
                            inst.lose_connection(&mut inner, generation, "the upstream process exited or the connection was lost");
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
                        inst.on_notification(&conn, generation, msg).await;
                    }
                }
            }
        });
    }

    async fn on_notification(
        self: &Arc<Self>,
        conn: &Arc<Upstream>,
        generation: Generation,
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
                    if inner.conn.as_ref().is_some_and(|(_, g)| *g == generation) {
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
            let conn = inner.conn.take().map(|(c, _)| c);
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
            self.log.emit(DomainEvent::McpServerStopped {
                mcp_server_id: self.id.clone(),
                reason: reason.to_owned(),
            });
        }
        self.step(&mut self.inner.lock(), Event::Stopped);
    }

    /// Report that a call on `conn` failed in the transport. A dead connection is one lost
    /// connection (however many calls were on it); a failure on a connection that has since
    /// been replaced is not held against the new one.
    pub fn report_transport_failure(&self, conn: &Arc<Upstream>, error: &str) {
        let mut inner = self.inner.lock();
        let Some(generation) = inner
            .conn
            .as_ref()
            .filter(|(c, _)| Arc::ptr_eq(c, conn))
            .map(|(_, g)| *g)
        else {
            return;
        };
        if conn.is_alive() {
            self.step(
                &mut inner,
                Event::CallFailed {
                    generation,
                    error: error.to_owned(),
                },
            );
        } else {
            self.lose_connection(
                &mut inner,
                generation,
                "the upstream connection failed during a call",
            );
        }
    }

    /// Report a successful call on `conn` (resets the consecutive-failure count).
    pub fn report_success(&self, conn: &Arc<Upstream>) {
        let mut inner = self.inner.lock();
        if let Some(generation) = inner
            .conn
            .as_ref()
            .filter(|(c, _)| Arc::ptr_eq(c, conn))
            .map(|(_, g)| *g)
        {
            self.step(&mut inner, Event::CallSucceeded { generation });
        }
    }

    /// Generation of the current (or last) connection: one more per successful start.
    pub fn generation(&self) -> Generation {
        self.inner.lock().life.generation()
    }

    /// Number of requests in flight on the live connection.
    pub fn in_flight(&self) -> usize {
        self.inner
            .lock()
            .conn
            .as_ref()
            .map_or(0, |(c, _)| c.in_flight())
    }

    /// How many times this instance proved itself healthy (successful starts and passed
    /// health checks); only ever grows.
    pub fn proven(&self) -> u64 {
        self.inner.lock().life.proven()
    }

    /// Seconds since the last use.
    pub fn idle_for(&self) -> f64 {
        (unix_now() - self.inner.lock().life.last_used()).max(0.0)
    }

    /// One supervisor tick: ask the lifecycle what is due (health check, recovery probe,
    /// revival of a DEAD group member, idle stop) and start it in the background.
    pub fn tick(self: &Arc<Self>, group_member: bool) {
        let in_flight = self.in_flight();
        let actions = self.step(
            &mut self.inner.lock(),
            Event::Tick {
                in_flight,
                revive_when_dead: group_member,
            },
        );
        for action in actions {
            let me = self.clone();
            match action {
                Action::CheckHealth => {
                    tokio::spawn(async move {
                        if let Err(e) = me.health_check().await {
                            tracing::warn!(mcp_server = me.id(), error = %e, "health_check_failed");
                        }
                    });
                }
                Action::Recover => {
                    tokio::spawn(async move {
                        match me.recover().await {
                            Ok(()) => tracing::info!(mcp_server = me.id(), "mcp_server_recovered"),
                            Err(e) => {
                                tracing::warn!(mcp_server = me.id(), error = %e, "mcp_server_recovery_failed")
                            }
                        }
                    });
                }
                Action::Revive => {
                    tokio::spawn(async move { me.revive().await });
                }
                Action::StopIdle {
                    idle_for_s,
                    last_used,
                } => {
                    tokio::spawn(async move { me.stop_if_idle(idle_for_s, last_used).await });
                }
                _ => {}
            }
        }
    }

    /// Bring a DEAD instance back (group members, which no call may reach while they are out
    /// of rotation). One attempt at a time.
    async fn revive(self: &Arc<Self>) {
        if self.reviving.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.state() == ServerState::Dead
            && let Err(e) = self.ensure_ready().await
        {
            tracing::warn!(mcp_server = %self.id, error = %e, "mcp_server_revive_failed");
        }
        self.reviving.store(false, Ordering::Release);
    }

    /// Run one MCP-aware health check (`ping`, falling back to `tools/list`) with a timeout.
    /// Failures count toward `max_consecutive_failures`.
    pub async fn health_check(self: &Arc<Self>) -> Result<Duration, HealthError> {
        if self.checking.swap(true, Ordering::AcqRel) {
            return Err(HealthError::AlreadyRunning);
        }
        let target = {
            let inner = self.inner.lock();
            match (&inner.conn, inner.life.state()) {
                (Some((c, g)), ServerState::Ready) if c.is_alive() => Some((c.clone(), *g)),
                _ => None,
            }
        };
        let result = match &target {
            Some((conn, _)) => probe(conn).await,
            None => Err(HealthError::NotReady),
        };
        self.checking.store(false, Ordering::Release);
        let label = if result.is_ok() {
            "healthy"
        } else {
            "unhealthy"
        };
        self.metrics
            .health_checks
            .with_label_values(&[&self.id, label])
            .inc();
        let generation = target.map_or(0, |(_, g)| g);
        let mut inner = self.inner.lock();
        match &result {
            Ok(d) => {
                self.metrics
                    .health_check_duration
                    .with_label_values(&[&self.id])
                    .observe(d.as_secs_f64());
                self.step(&mut inner, Event::HealthPassed { generation });
                self.log.emit(DomainEvent::HealthCheckPassed {
                    mcp_server_id: self.id.clone(),
                    duration_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                });
            }
            Err(e) => {
                self.log.emit(DomainEvent::HealthCheckFailed {
                    mcp_server_id: self.id.clone(),
                    consecutive_failures: inner.life.consecutive_failures() + 1,
                    error_message: e.to_string(),
                });
                self.step(
                    &mut inner,
                    Event::HealthFailed {
                        generation,
                        error: e.to_string(),
                    },
                );
            }
        }
        result
    }

    /// One recovery attempt of a DEGRADED server (half-open probe): start it; on success it
    /// is READY and its breaker closed, on failure the next attempt is scheduled.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StartError> {
        let _guard = self.start_lock.lock().await;
        let actions = self.step(&mut self.inner.lock(), Event::RecoveryProbe);
        if !actions.contains(&Action::Connect) {
            return Ok(());
        }
        self.start_locked().await.map(|_| ())
    }

    /// Stop the instance as idle, if it still is (and nothing is in flight).
    async fn stop_if_idle(&self, idle_for_s: f64, last_used: f64) {
        if self.idling.swap(true, Ordering::AcqRel) {
            return;
        }
        let still_idle = {
            let inner = self.inner.lock();
            inner.life.last_used() <= last_used && inner.life.state() == ServerState::Ready
        };
        if still_idle && self.in_flight() == 0 {
            self.log.emit(DomainEvent::McpServerIdleDetected {
                mcp_server_id: self.id.clone(),
                idle_duration_s: idle_for_s,
                last_used_at: last_used,
            });
            self.stop("idle").await;
        }
        self.idling.store(false, Ordering::Release);
    }
}

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// Another check of the same instance is running.
    #[error("a health check is already running")]
    AlreadyRunning,
    /// There is no READY connection to check.
    #[error("the server is not READY")]
    NotReady,
    /// The server answered `ping` (or `tools/list`) with an error.
    #[error("{method} answered error {code}: {message}")]
    Answered {
        /// `ping` or `tools/list`.
        method: &'static str,
        /// JSON-RPC error code.
        code: i64,
        /// Its message.
        message: String,
    },
    /// The transport failed (timeout, closed).
    #[error(transparent)]
    Transport(#[from] UpstreamError),
}

/// MCP-aware probe: `ping`, falling back to `tools/list` for servers without `ping`.
async fn probe(conn: &Upstream) -> Result<Duration, HealthError> {
    let t0 = Instant::now();
    let timeout = Some(Duration::from_secs(5));
    match conn.request("ping", None, None, timeout).await? {
        Outcome::Result(_) => Ok(t0.elapsed()),
        Outcome::Error(e) if e.code == crate::jsonrpc::METHOD_NOT_FOUND => {
            match conn.request("tools/list", None, None, timeout).await? {
                Outcome::Result(_) => Ok(t0.elapsed()),
                Outcome::Error(e) => Err(HealthError::Answered {
                    method: "tools/list",
                    code: e.code,
                    message: e.message,
                }),
            }
        }
        Outcome::Error(e) => Err(HealthError::Answered {
            method: "ping",
            code: e.code,
            message: e.message,
        }),
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
            let member = members.contains(inst.id());
            inst.tick(member);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

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
