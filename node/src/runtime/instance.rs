//! One MCP server instance on this node. Its [`Lifecycle`] decides (when to start, when it is
//! DEGRADED, when a check, a recovery probe or an idle stop is due); the instance carries the
//! decisions out: it spawns and connects, closes connections, runs health checks, and reports
//! state changes as metrics and domain events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::broadcast;

use super::placement::placed_by_leader;
use super::{Catalog, Host, RuntimeEvent, ServerState, StartError};
use crate::config::ServerSpec;
use crate::supervisor::lifecycle::{Action, BreakerState, Event, Generation, Lifecycle, Policy};
use crate::telemetry::events::{DomainEvent, EventLog};
use crate::telemetry::{Metrics, unix_now};
use crate::upstream::lease::LeaseWatch;
use crate::upstream::{ConnectOptions, LogLine, Outcome, Upstream, UpstreamError};

struct Inner {
    /// The decisions: state, failures, breaker, backoff, health and idle clocks.
    life: Lifecycle,
    /// The live connection and the lifecycle generation it belongs to.
    conn: Option<(Arc<Upstream>, Generation)>,
    catalog: Option<Arc<Catalog>>,
    started_at: Option<f64>,
    /// The last connection that went away: its log ring keeps what its reader still drains
    /// (a crash's last stderr lines can arrive after the loss was noticed).
    dead_conn: Option<Arc<Upstream>>,
    /// Hangar's own lines about that connection's end.
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
    host: tokio::sync::watch::Sender<Host>,
    /// The cluster node that runs it (0 = not known: unplaced, or no cluster).
    node: AtomicU64,
    /// The state its host last reported through the cluster: (state, reporting node).
    reported: Mutex<Option<(ServerState, u64)>>,
    /// Times a host elsewhere reported it READY anew (its proofs of health, as seen here).
    remote_proofs: AtomicU64,
    /// This node's placement lease: a single-instance server runs here only while it holds.
    lease: LeaseWatch,
    /// Failed connections being killed: their processes may still be alive, so this node
    /// still holds the instance until they exited (no other node may start it meanwhile).
    closing: Arc<std::sync::atomic::AtomicUsize>,
}

/// A point-in-time view of an instance for REST and management tools.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Server id.
    pub id: String,
    /// Lifecycle state (as reported by its host when it runs on another node).
    pub state: ServerState,
    /// The cluster node that runs it (`None`: not placed yet).
    pub node: Option<u64>,
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

/// How long a start waits for the leader to place an instance nobody hosts yet.
pub const PLACEMENT_WAIT: Duration = Duration::from_secs(10);

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
    pub(super) fn new(
        id: String,
        spec: ServerSpec,
        host: Host,
        lease: LeaseWatch,
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
                dead_conn: None,
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
            host: tokio::sync::watch::channel(host).0,
            node: AtomicU64::new(0),
            reported: Mutex::new(None),
            remote_proofs: AtomicU64::new(0),
            lease,
            closing: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let mode = inst.spec.read().mode_name();
        inst.metrics
            .server_info
            .with_label_values(&[&inst.id, mode])
            .set(1);
        inst.publish_state(ServerState::Cold, now);
        inst
    }

    /// The server was removed from the configuration: a start in progress must not make it
    /// READY again.
    pub(super) fn mark_removed(&self) {
        self.inner.lock().removed = true;
    }

    /// Where it runs in the cluster.
    pub fn host(&self) -> Host {
        *self.host.borrow()
    }

    /// Set where it runs; returns where it ran before.
    pub(super) fn set_host(&self, host: Host, node: Option<u64>) -> Host {
        self.node.store(node.unwrap_or(0), Ordering::Relaxed);
        self.host.send_replace(host)
    }

    /// The cluster node that runs it, when known.
    pub fn node(&self) -> Option<u64> {
        Some(self.node.load(Ordering::Relaxed)).filter(|n| *n != 0)
    }

    /// The state its host reported through the cluster (for an instance on another node).
    pub(super) fn set_reported(&self, reported: Option<(ServerState, u64)>) {
        let before = std::mem::replace(&mut *self.reported.lock(), reported);
        // Hosted elsewhere and newly READY there: that counts as it proving itself healthy
        // (a group member out of rotation on this node comes back on it).
        if let (Host::Node(n), Some((ServerState::Ready, by))) = (self.host(), reported)
            && by == n
            && before != reported
        {
            self.remote_proofs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The state its host reported, when it runs on another node (COLD until it reports).
    fn remote_state(&self) -> Option<ServerState> {
        match self.host() {
            Host::Node(n) => Some(match *self.reported.lock() {
                Some((st, by)) if by == n => st,
                _ => ServerState::Cold,
            }),
            _ => None,
        }
    }

    /// Where it runs, waiting up to `within` while it is not placed yet.
    pub async fn placed(&self, within: Duration) -> Host {
        self.host_changed(Host::Unplaced, within).await
    }

    /// Where it runs once that is no longer `from`, waiting up to `within` (then: where it
    /// runs, possibly still `from`).
    pub async fn host_changed(&self, from: Host, within: Duration) -> Host {
        let mut rx = self.host.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|h| *h != from)).await;
        self.host()
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

    /// Current state (as its host reported it, when it runs on another node).
    pub fn state(&self) -> ServerState {
        self.remote_state()
            .unwrap_or_else(|| self.inner.lock().life.state())
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
        // Hosted elsewhere: the state its host reported (COLD until it reports).
        let (state, alive) = match self.remote_state() {
            Some(st) => (st, st == ServerState::Ready),
            None => (inner.life.state(), conn.is_some_and(|c| c.is_alive())),
        };
        InstanceStatus {
            id: self.id.clone(),
            state,
            node: self.node(),
            mode: spec.mode_name(),
            alive,
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
        let mut all = inner
            .dead_conn
            .as_ref()
            .map(|c| c.logs(n))
            .unwrap_or_default();
        all.extend(inner.dead_logs.iter().cloned());
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
                        inner.dead_conn = Some(c.clone());
                        inner.dead_logs.clear();
                        // A failing process (hung, wedged, SIGSTOPped) would ignore an orderly
                        // stop for seconds: kill it, and hold the instance until it exited.
                        let closing = self.closing.clone();
                        closing.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            c.kill().await;
                            closing.fetch_sub(1, Ordering::SeqCst);
                        });
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
        // Right after a node starts, the leader may not have placed it yet.
        if self.host() == Host::Unplaced {
            let host = self.placed(PLACEMENT_WAIT).await;
            if host == Host::Unplaced {
                return Err(StartError::NotPlaced {
                    server: self.id.clone(),
                    detail: format!(
                        "no node took it within {}s (is there a leader? see `hangarctl cluster status` and the leader's log)",
                        PLACEMENT_WAIT.as_secs()
                    ),
                });
            }
        }
        if self.host() == Host::Here && self.lease_bound() && !self.lease.borrow().held() {
            self.wait_for_lease().await?;
        }
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

    /// Whether it runs here only under this node's placement lease (a single-instance server).
    fn lease_bound(&self) -> bool {
        placed_by_leader(&self.spec.read())
    }

    /// Wait (bounded) until this node holds a placement lease again.
    async fn wait_for_lease(&self) -> Result<(), StartError> {
        let mut rx = self.lease.clone();
        match tokio::time::timeout(PLACEMENT_WAIT, rx.wait_for(|l| l.held())).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StartError::NoLease {
                server: self.id.clone(),
                detail: format!(
                    "this node has held no placement lease for {}s: it cannot reach the cluster's leader (see `hangarctl cluster status`)",
                    PLACEMENT_WAIT.as_secs()
                ),
            }),
        }
    }

    /// Whether this node may have a process of it right now: connected, or a start or a stop
    /// in progress.
    pub fn holds_process(&self) -> bool {
        self.start_lock.try_lock().is_err()
            || self.inner.lock().conn.is_some()
            || self.closing.load(Ordering::SeqCst) > 0
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
                Action::Connect => {
                    // A failed connection's process must be gone before another starts (one
                    // copy at a time, here as across nodes); the kill takes milliseconds.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while self.closing.load(Ordering::SeqCst) > 0
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    return self.start_locked().await;
                }
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
        let host = self.host();
        if host != Host::Here {
            return Err(StartError::NotPlacedHere {
                server: self.id.clone(),
                host,
            });
        }
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
            inner.dead_conn = Some(c);
            inner.dead_logs.clear();
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
        let lease = placed_by_leader(&spec).then(|| self.lease.clone());
        let result = connect(&self.id, &spec, lease).await;
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

    /// Wait until no call is in flight on the live connection, at most `limit`.
    pub async fn drain_calls(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the instance (→ COLD). `reason` is reported in metrics and logs.
    pub async fn stop(&self, reason: &str) {
        let _guard = self.start_lock.lock().await;
        let conn = {
            let mut inner = self.inner.lock();
            let conn = inner.conn.take().map(|(c, _)| c);
            if let Some(c) = &conn {
                inner.dead_conn = Some(c.clone());
                inner.dead_logs.clear();
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
    ///
    /// Returns whether the failure is the loss of the connection: it is no longer alive, or it
    /// is a child process whose pipe closed (the calls in flight can learn of the exit before
    /// the connection's own reader has marked it dead).
    pub fn report_transport_failure(&self, conn: &Arc<Upstream>, error: &UpstreamError) -> bool {
        let lost = !conn.is_alive()
            || (conn.pid().is_some() && matches!(error, UpstreamError::Closed { .. }));
        let mut inner = self.inner.lock();
        let Some(generation) = inner
            .conn
            .as_ref()
            .filter(|(c, _)| Arc::ptr_eq(c, conn))
            .map(|(_, g)| *g)
        else {
            return lost;
        };
        if !lost {
            self.step(
                &mut inner,
                Event::CallFailed {
                    generation,
                    error: error.to_string(),
                },
            );
        } else {
            self.lose_connection(
                &mut inner,
                generation,
                "the upstream connection failed during a call",
            );
        }
        lost
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
        self.inner.lock().life.proven() + self.remote_proofs.load(Ordering::Relaxed)
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
async fn connect(
    id: &str,
    spec: &ServerSpec,
    lease: Option<LeaseWatch>,
) -> Result<Arc<Upstream>, UpstreamError> {
    // The allow-list again, with this node's environment (the definition may have been
    // validated on another node, or before the list changed).
    if let ServerSpec::Subprocess(s) = spec
        && let Some(program) = s.command.first()
        && let Err(why) = crate::config::CommandPolicy::from_env().check(program)
    {
        tracing::warn!(mcp_server = id, program = %program, "subprocess_command_refused");
        return Err(UpstreamError::Spawn {
            server: id.to_owned(),
            message: why,
        });
    }
    let transport = crate::config::transport_spec(spec);
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
        lease,
    };
    Upstream::connect(&transport, opts).await
}
