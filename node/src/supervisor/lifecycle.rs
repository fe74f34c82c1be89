//! The lifecycle of one MCP server instance, as a pure state machine.
//!
//! `Lifecycle::step(event, now, jitter) -> Vec<Action>` decides everything about an instance:
//! when it may start (the per-server circuit breaker), what a start, a lost connection, a
//! failed call or a health-check result do to its state (COLD, INITIALIZING, READY, DEGRADED,
//! DEAD), when it becomes DEGRADED (consecutive failures ≥ threshold), when the next recovery
//! attempt runs (exponential backoff with jitter — the jitter source is passed in), and, on
//! every tick, whether a health check, a recovery probe, a revival or an idle stop is due.
//! It does no I/O and reads no clock: the runtime room feeds it events and carries out the
//! actions; the supervisor room only ticks. The same machine can run wherever the decision is
//! taken (on the node that hosts the instance today, on the cluster leader later).
//!
//! Failures are attributed to the connection they happened on. Each successful start opens a
//! new *generation*; a failure reported for an older generation (a call that was in flight
//! when the previous process died) is ignored, and a lost connection counts as one failure
//! however many calls were in flight on it. So a member that died and was restarted is not
//! blamed again for the calls that died with it.

use serde::Serialize;

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

/// State of the per-server circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls may start the server.
    Closed,
    /// DEGRADED: calls are refused until the next recovery attempt.
    Open,
    /// A recovery attempt (probe) is running.
    HalfOpen,
}

impl BreakerState {
    /// Name used in metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Every state, for metrics that carry one series per state.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
}

/// What kind of failure was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server could not be started (spawn, connect or handshake failed).
    StartFailure,
    /// The connection of a READY server was lost (the process exited, the socket closed).
    ConnectionLost,
    /// A call failed on a connection that is still alive (timeout, protocol error).
    TransportFailure,
    /// A health check failed.
    HealthCheck,
}

impl FailureKind {
    /// The `reason` field of `McpServerDegraded` (MCP Hangar's names where it has them).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::StartFailure => "start_failure",
            FailureKind::ConnectionLost => "connection_lost",
            FailureKind::TransportFailure => "transport_failure",
            FailureKind::HealthCheck => "health_check_failures",
        }
    }
}

/// Exponential backoff with jitter: attempt `n` (0-based) waits `base · 2ⁿ`, capped, then
/// scaled by a random factor in `[1 − jitter, 1 + jitter]`, never below `floor_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay of the first attempt, seconds.
    pub base_s: f64,
    /// Largest delay before jitter, seconds.
    pub cap_s: f64,
    /// Relative jitter (0.2 = ±20 %).
    pub jitter: f64,
    /// Smallest delay after jitter, seconds.
    pub floor_s: f64,
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s … capped at 60 s, ±20 %, at least 0.2 s.
    fn default() -> Self {
        Backoff {
            base_s: 1.0,
            cap_s: 60.0,
            jitter: 0.2,
            floor_s: 0.2,
        }
    }
}

impl Backoff {
    /// Delay of attempt `attempt`, with `unit` a random number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> f64 {
        let exp = i32::try_from(attempt.min(30)).unwrap_or(30);
        let base = (self.base_s * 2f64.powi(exp)).min(self.cap_s);
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        (base * factor).max(self.floor_s)
    }
}

/// The knobs of one instance's lifecycle (from its server spec).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Consecutive failures that make the server DEGRADED (at least 1).
    pub max_consecutive_failures: u32,
    /// Seconds between health checks of a READY server.
    pub health_interval_s: f64,
    /// Seconds without use after which a READY server is stopped.
    pub idle_ttl_s: f64,
    /// Delays between recovery attempts of a DEGRADED server.
    pub backoff: Backoff,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_consecutive_failures: 3,
            health_interval_s: 60.0,
            idle_ttl_s: 300.0,
            backoff: Backoff::default(),
        }
    }
}

/// A connection generation: 0 before the first start, then one more per successful start.
pub type Generation = u64;

/// Something that happened to the instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A caller wants the server running (first call, `auto_start`, operator start).
    StartRequested,
    /// The supervisor's recovery probe of a DEGRADED server.
    RecoveryProbe,
    /// The start succeeded: connection and catalogue are there.
    Started,
    /// The start failed.
    StartFailed {
        /// Why.
        error: String,
    },
    /// The connection of generation `generation` was lost.
    ConnectionLost {
        /// Which connection.
        generation: Generation,
        /// Why (for `last_error`).
        why: String,
    },
    /// A call on generation `generation` succeeded.
    CallSucceeded {
        /// Which connection served it.
        generation: Generation,
    },
    /// A call on generation `generation` failed in the transport while the connection stayed
    /// alive (a dead connection is reported as [`Event::ConnectionLost`]).
    CallFailed {
        /// Which connection.
        generation: Generation,
        /// Why.
        error: String,
    },
    /// A health check of generation `generation` passed.
    HealthPassed {
        /// Which connection was checked.
        generation: Generation,
    },
    /// A health check of generation `generation` failed.
    HealthFailed {
        /// Which connection was checked.
        generation: Generation,
        /// Why.
        error: String,
    },
    /// The server was used (idle accounting).
    Used,
    /// The server was stopped (operator, idle, removal, shutdown); it is COLD now.
    Stopped,
    /// Periodic look from the supervisor.
    Tick {
        /// Requests in flight on the live connection.
        in_flight: usize,
        /// Restart the server when it is DEAD (group members: no call reaches a member out
        /// of rotation, so nothing else would restart it).
        revive_when_dead: bool,
    },
}

/// What the runtime must do (or report) after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the server now (spawn / connect + handshake); the state is INITIALIZING.
    Connect,
    /// Do not start: the circuit is open until the next recovery attempt.
    Refuse {
        /// Seconds until the next recovery attempt.
        retry_in_s: f64,
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Close the live connection (the server went DEGRADED).
    Disconnect,
    /// Run one health check.
    CheckHealth,
    /// Run the recovery probe of a DEGRADED server (feed [`Event::RecoveryProbe`]).
    Recover,
    /// Restart a DEAD server (feed [`Event::StartRequested`]).
    Revive,
    /// Stop the server: it has been idle for its TTL with nothing in flight.
    StopIdle {
        /// Seconds since the last use.
        idle_for_s: f64,
        /// When it was last used.
        last_used: f64,
    },
    /// The state changed.
    StateChanged {
        /// Before.
        old: ServerState,
        /// After.
        new: ServerState,
    },
    /// The per-server breaker changed.
    BreakerChanged {
        /// Before.
        old: BreakerState,
        /// After.
        new: BreakerState,
    },
    /// The server became DEGRADED.
    Degraded {
        /// Consecutive failures.
        consecutive_failures: u32,
        /// Failures since the instance was created.
        total_failures: u64,
        /// What kind of failure tipped it.
        reason: FailureKind,
        /// The error of that failure.
        error: String,
    },
    /// The next recovery attempt was scheduled.
    RecoveryScheduled {
        /// Seconds from now.
        in_s: f64,
        /// Consecutive failures so far.
        failures: u32,
    },
}

/// The lifecycle of one instance.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    policy: Policy,
    state: ServerState,
    breaker: BreakerState,
    generation: Generation,
    consecutive_failures: u32,
    total_failures: u64,
    recovery_attempt: u32,
    next_recovery_at: Option<f64>,
    next_health_at: f64,
    last_used: f64,
    last_state_change: f64,
    last_error: Option<String>,
    /// Successful starts plus passed health checks (only grows): how often the instance has
    /// proven itself healthy.
    proven: u64,
    /// The start in progress began from DEGRADED (a failed probe returns there).
    starting_from_degraded: bool,
}

impl Lifecycle {
    /// A COLD instance created at `now`.
    pub fn new(policy: Policy, now: f64) -> Self {
        Lifecycle {
            policy,
            state: ServerState::Cold,
            breaker: BreakerState::Closed,
            generation: 0,
            consecutive_failures: 0,
            total_failures: 0,
            recovery_attempt: 0,
            next_recovery_at: None,
            next_health_at: 0.0,
            last_used: now,
            last_state_change: now,
            last_error: None,
            proven: 0,
            starting_from_degraded: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> ServerState {
        self.state
    }
    /// Current breaker state.
    pub fn breaker(&self) -> BreakerState {
        self.breaker
    }
    /// Generation of the current (or last) connection.
    pub fn generation(&self) -> Generation {
        self.generation
    }
    /// Consecutive failures.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
    /// Failures since creation.
    pub fn total_failures(&self) -> u64 {
        self.total_failures
    }
    /// When the next recovery attempt of a DEGRADED server may run (unix seconds).
    pub fn next_recovery_at(&self) -> Option<f64> {
        self.next_recovery_at
    }
    /// Last use (unix seconds).
    pub fn last_used(&self) -> f64 {
        self.last_used
    }
    /// Last state change (unix seconds).
    pub fn last_state_change(&self) -> f64 {
        self.last_state_change
    }
    /// The last error (start failure, lost connection, failed check); cleared by a start.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// How often the instance proved itself healthy (starts + passed checks).
    pub fn proven(&self) -> u64 {
        self.proven
    }
    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    /// Replace the policy (the spec changed in place).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Feed one event at time `now` (unix seconds); `jitter` yields random numbers in
    /// `[0, 1)` for the backoff. Returns what the runtime must do, in order.
    pub fn step(&mut self, event: Event, now: f64, jitter: &mut dyn FnMut() -> f64) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::StartRequested => self.on_start_requested(now, &mut out),
            Event::RecoveryProbe => {
                let due = self.next_recovery_at.is_some_and(|t| now >= t);
                if self.state == ServerState::Degraded && due {
                    self.next_recovery_at = None;
                    self.set_breaker(BreakerState::HalfOpen, &mut out);
                    self.begin_start(now, &mut out);
                }
            }
            Event::Started => {
                self.generation += 1;
                self.proven += 1;
                self.consecutive_failures = 0;
                self.recovery_attempt = 0;
                self.next_recovery_at = None;
                self.next_health_at = now + self.health_interval();
                self.last_used = now;
                self.last_error = None;
                self.starting_from_degraded = false;
                self.set_state(ServerState::Ready, now, &mut out);
                self.set_breaker(BreakerState::Closed, &mut out);
            }
            Event::StartFailed { error } => {
                let back = if self.starting_from_degraded {
                    ServerState::Degraded
                } else {
                    ServerState::Dead
                };
                self.starting_from_degraded = false;
                self.set_state(back, now, &mut out);
                self.fail(FailureKind::StartFailure, error, now, jitter, &mut out);
            }
            Event::ConnectionLost { generation, why } => {
                if self.is_current(generation) {
                    self.set_state(ServerState::Dead, now, &mut out);
                    self.fail(FailureKind::ConnectionLost, why, now, jitter, &mut out);
                }
            }
            Event::CallSucceeded { generation } => {
                if self.is_current(generation) {
                    self.consecutive_failures = 0;
                    self.last_used = now;
                }
            }
            Event::CallFailed { generation, error } => {
                if self.is_current(generation) {
                    self.fail(FailureKind::TransportFailure, error, now, jitter, &mut out);
                }
            }
            Event::HealthPassed { generation } => {
                self.next_health_at = now + self.health_interval();
                if self.is_current(generation) {
                    self.consecutive_failures = 0;
                    self.proven += 1;
                }
            }
            Event::HealthFailed { generation, error } => {
                self.next_health_at = now + self.health_interval();
                if self.is_current(generation) {
                    self.fail(FailureKind::HealthCheck, error, now, jitter, &mut out);
                }
            }
            Event::Used => self.last_used = now,
            Event::Stopped => {
                self.next_recovery_at = None;
                self.recovery_attempt = 0;
                self.consecutive_failures = 0;
                self.starting_from_degraded = false;
                self.set_state(ServerState::Cold, now, &mut out);
                self.set_breaker(BreakerState::Closed, &mut out);
            }
            Event::Tick {
                in_flight,
                revive_when_dead,
            } => self.on_tick(now, in_flight, revive_when_dead, &mut out),
        }
        out
    }

    /// Whether `generation` is the live connection (READY on it).
    fn is_current(&self, generation: Generation) -> bool {
        generation == self.generation && self.state == ServerState::Ready
    }

    fn health_interval(&self) -> f64 {
        self.policy.health_interval_s.max(1.0)
    }

    fn on_start_requested(&mut self, now: f64, out: &mut Vec<Action>) {
        match self.state {
            ServerState::Ready => {}
            // The runtime serialises starts (single flight), so a start request that finds
            // the instance INITIALIZING comes after an attempt that was abandoned midway (its
            // caller went away): start again.
            ServerState::Initializing => out.push(Action::Connect),
            ServerState::Degraded => match self.next_recovery_at {
                Some(at) if now < at => out.push(Action::Refuse {
                    retry_in_s: (at - now).max(0.0),
                    failures: self.consecutive_failures,
                }),
                // The backoff has elapsed: a caller may make the attempt itself.
                _ => {
                    self.next_recovery_at = None;
                    self.set_breaker(BreakerState::HalfOpen, out);
                    self.begin_start(now, out);
                }
            },
            ServerState::Cold | ServerState::Dead => self.begin_start(now, out),
        }
    }

    fn begin_start(&mut self, now: f64, out: &mut Vec<Action>) {
        self.starting_from_degraded = self.state == ServerState::Degraded;
        self.set_state(ServerState::Initializing, now, out);
        out.push(Action::Connect);
    }

    fn on_tick(&mut self, now: f64, in_flight: usize, revive: bool, out: &mut Vec<Action>) {
        match self.state {
            ServerState::Ready => {
                if now >= self.next_health_at {
                    // Not due again until this check has had its interval.
                    self.next_health_at = now + self.health_interval();
                    out.push(Action::CheckHealth);
                }
                let idle = now - self.last_used;
                if idle >= self.policy.idle_ttl_s && in_flight == 0 {
                    out.push(Action::StopIdle {
                        idle_for_s: idle,
                        last_used: self.last_used,
                    });
                }
            }
            ServerState::Degraded if self.next_recovery_at.is_some_and(|t| now >= t) => {
                out.push(Action::Recover);
            }
            ServerState::Dead if revive => out.push(Action::Revive),
            _ => {}
        }
    }

    /// Count a failure; at the threshold the server is DEGRADED (its connection is closed)
    /// and the next recovery attempt is scheduled with backoff.
    fn fail(
        &mut self,
        kind: FailureKind,
        error: String,
        now: f64,
        jitter: &mut dyn FnMut() -> f64,
        out: &mut Vec<Action>,
    ) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.total_failures = self.total_failures.saturating_add(1);
        self.last_error = Some(error.clone());
        if self.consecutive_failures < self.policy.max_consecutive_failures.max(1) {
            return;
        }
        let delay = self.policy.backoff.delay(self.recovery_attempt, jitter());
        self.recovery_attempt = self.recovery_attempt.saturating_add(1);
        self.next_recovery_at = Some(now + delay);
        if self.state != ServerState::Degraded {
            if self.state == ServerState::Ready {
                out.push(Action::Disconnect);
            }
            self.set_state(ServerState::Degraded, now, out);
            out.push(Action::Degraded {
                consecutive_failures: self.consecutive_failures,
                total_failures: self.total_failures,
                reason: kind,
                error,
            });
        }
        self.set_breaker(BreakerState::Open, out);
        out.push(Action::RecoveryScheduled {
            in_s: delay,
            failures: self.consecutive_failures,
        });
    }

    fn set_state(&mut self, new: ServerState, now: f64, out: &mut Vec<Action>) {
        if self.state != new {
            out.push(Action::StateChanged {
                old: self.state,
                new,
            });
            self.state = new;
            self.last_state_change = now;
        }
    }

    fn set_breaker(&mut self, new: BreakerState, out: &mut Vec<Action>) {
        if self.breaker != new {
            out.push(Action::BreakerChanged {
                old: self.breaker,
                new,
            });
            self.breaker = new;
        }
    }
}

#[cfg(test)]
mod tests;
