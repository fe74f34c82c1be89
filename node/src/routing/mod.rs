//! Routing room: resolve a target id (a server or a group) to a live upstream connection and
//! send one request, failing over to the next group member when the failure happened before
//! the request could have reached the upstream (or when the tool is declared idempotent).

mod breaker;

pub use breaker::{Admission, BreakerState, GroupBreaker};

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::config::{GroupMember, ServerSpec, Strategy};
use crate::runtime::{
    ForwardError, Group, Host, Instance, PLACEMENT_WAIT, Runtime, ServerState, StartError,
};
use crate::supervisor::lifecycle::Generation;
use crate::telemetry::events::DomainEvent;
use crate::upstream::{CallSink, Outcome, Upstream, UpstreamError};

/// Where the upstream that is serving a call can be found while the call runs (used by the
/// gateway to answer server→client requests relayed during the call).
pub type ServingSlot = Arc<Mutex<Option<Arc<Upstream>>>>;

/// Asked before a request goes to a group member (by member id): `Some(reason)` refuses the
/// request there, and the whole request fails with [`RouteError::Refused`] (the gateway's
/// tool access policies of the member the call was routed to).
pub type MemberGate<'a> = &'a (dyn Fn(&str) -> Option<String> + Send + Sync);

/// Why a routed request failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No server or group has this id.
    #[error("unknown MCP server or group '{0}'")]
    Unknown(String),
    /// Every member of the group failed or none is configured.
    #[error("no available member in group '{group}': {detail}")]
    NoAvailableMember {
        /// Group id.
        group: String,
        /// What happened to the members.
        detail: String,
    },
    /// The server could not be started.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The group's circuit breaker is open.
    #[error(
        "Circuit breaker open for group '{group}': too many failed requests; next probe in {retry_in_s:.1}s"
    )]
    GroupCircuitOpen {
        /// Group id.
        group: String,
        /// Seconds until a probe is allowed.
        retry_in_s: f64,
    },
    /// The member the request was routed to refused it (its [`MemberGate`]).
    #[error("group '{group}' routed the request to member '{member}', which refuses it: {reason}")]
    Refused {
        /// Group id.
        group: String,
        /// Member id.
        member: String,
        /// Why.
        reason: String,
    },
    /// The transport failed during the call.
    #[error("MCP server '{server}' failed: {source}")]
    Upstream {
        /// Server id.
        server: String,
        /// The transport error.
        #[source]
        source: UpstreamError,
    },
}

impl RouteError {
    /// Stable error type for metrics and `error_type` fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            RouteError::Unknown(_) => "McpServerNotFoundError",
            RouteError::NoAvailableMember { .. } => "NoAvailableMemberError",
            RouteError::GroupCircuitOpen { .. } => "CircuitBreakerOpen",
            RouteError::Refused { .. } => "ToolAccessDeniedError",
            RouteError::Start(StartError::CircuitOpen { .. }) => "CircuitBreakerOpen",
            RouteError::Start(_) => "McpServerStartError",
            RouteError::Upstream { source, .. } => match source {
                UpstreamError::Timeout { .. } => "TimeoutError",
                _ => "ToolInvocationError",
            },
        }
    }
}

/// A request to route.
pub struct RouteRequest<'a> {
    /// The JSON-RPC method sent upstream.
    pub method: &'a str,
    /// Raw params (already rewritten for the upstream).
    pub params: Option<Box<RawValue>>,
    /// Where call-scoped notifications and server→client requests go.
    pub sink: Option<CallSink>,
    /// Overall deadline.
    pub timeout: Duration,
    /// Safe to re-send after a failure that may have reached the upstream.
    pub idempotent: bool,
    /// Filled with the upstream serving the call.
    pub slot: Option<ServingSlot>,
    /// Asked before each group member is tried (not for a lone server).
    pub gate: Option<MemberGate<'a>>,
}

/// Why one try on one instance failed.
enum Attempt {
    /// It could not be started.
    Start(StartError),
    /// The transport failed on the connection of `generation`; `alive`: whether that
    /// connection is still alive afterwards.
    Upstream {
        /// The error.
        error: UpstreamError,
        /// Whether the connection survived.
        alive: bool,
        /// The instance's connection generation the call went to.
        generation: Generation,
    },
}

/// A successful routing: who served it and what they answered.
pub struct Routed {
    /// The instance that answered.
    pub instance: Arc<Instance>,
    /// The upstream's answer (a result or a JSON-RPC error).
    pub outcome: Outcome,
}

/// Routing state of one group member.
#[derive(Debug, Clone)]
struct MemberState {
    failures: u32,
    successes: u32,
    in_rotation: bool,
    current_weight: i64,
    /// The instance's `proven()` count already accounted for (set when it left rotation).
    proven_seen: u64,
    /// The last connection generation whose death was counted: the other calls that died
    /// with the same process are not counted again.
    dead_generation: Option<Generation>,
}

impl Default for MemberState {
    fn default() -> Self {
        MemberState {
            failures: 0,
            successes: 0,
            in_rotation: true,
            current_weight: 0,
            proven_seen: 0,
            dead_generation: None,
        }
    }
}

#[derive(Debug, Default)]
struct GroupState {
    members: HashMap<String, MemberState>,
    rr: usize,
    breaker: GroupBreaker,
}

/// A member's routing view (for REST and management tools).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberView {
    /// Member id.
    pub id: String,
    /// In rotation.
    pub in_rotation: bool,
    /// Consecutive failures seen by routing.
    pub consecutive_failures: u32,
    /// Weight.
    pub weight: u32,
    /// Priority.
    pub priority: u32,
}

/// Releases a half-open probe slot when a routed request is dropped before it finished.
struct ProbeGuard<'a> {
    router: &'a Router,
    group: Option<Arc<Group>>,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.group.take() {
            self.router.breaker_release_probe(g.id());
        }
    }
}

/// The router.
pub struct Router {
    runtime: Arc<Runtime>,
    groups: Mutex<HashMap<String, GroupState>>,
    /// Origin of the breakers' clock (monotonic seconds).
    epoch: Instant,
}

impl Router {
    /// A router over the node's runtime.
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Router {
            runtime,
            groups: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// The runtime this router routes into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Candidate instances for a target (members in rotation first) without consuming a
    /// load-balancing pick: for catalogue look-ups and handshakes, which must not shift the
    /// order that calls see.
    pub fn candidates(&self, target: &str) -> Result<Vec<Arc<Instance>>, RouteError> {
        self.ordered(target, false)
    }

    /// Candidates for one routed request, in the order they should be tried (advances the
    /// strategy's state: round-robin cursor, smooth weights, random pick).
    fn route_order(&self, target: &str) -> Result<Vec<Arc<Instance>>, RouteError> {
        self.ordered(target, true)
    }

    fn ordered(&self, target: &str, pick: bool) -> Result<Vec<Arc<Instance>>, RouteError> {
        if let Some(inst) = self.runtime.instance(target) {
            return Ok(vec![inst]);
        }
        let group = self
            .runtime
            .group(target)
            .ok_or_else(|| RouteError::Unknown(target.to_owned()))?;
        Ok(self.group_order(&group, pick))
    }

    /// Order the members of a group for one request: the strategy's choice first, then the
    /// other members in rotation (failover order), then members out of rotation (last resort,
    /// which is also how they prove themselves healthy again).
    fn group_order(&self, group: &Arc<Group>, pick: bool) -> Vec<Arc<Instance>> {
        let spec = group.spec();
        let members: Vec<(Arc<Instance>, &GroupMember)> = spec
            .members
            .iter()
            .filter_map(|m| self.runtime.instance(&m.id).map(|i| (i, m)))
            .collect();
        if members.is_empty() {
            return Vec::new();
        }
        let mut groups = self.groups.lock();
        let st = groups.entry(group.id().to_owned()).or_default();
        let back = Self::readmit(st, &spec, members.iter().map(|(i, _)| i));
        let order = Self::order(st, &spec, members, pick);
        drop(groups);
        self.announce_readmitted(group.id(), back);
        order
    }

    /// Members out of rotation whose instance proved itself healthy since it left (a
    /// successful restart by recovery, a passed health check) count those as successes and
    /// return to rotation at `healthy_threshold` while READY. Returns the readmitted ids.
    fn readmit<'a>(
        st: &mut GroupState,
        spec: &crate::config::GroupSpec,
        members: impl Iterator<Item = &'a Arc<Instance>>,
    ) -> Vec<String> {
        let mut back = Vec::new();
        for inst in members {
            let Some(ms) = st.members.get_mut(inst.id()) else {
                continue;
            };
            let proven = inst.proven();
            if ms.in_rotation || proven <= ms.proven_seen || inst.state() != ServerState::Ready {
                continue;
            }
            let gained = u32::try_from(proven - ms.proven_seen).unwrap_or(u32::MAX);
            ms.proven_seen = proven;
            ms.successes = ms.successes.saturating_add(gained);
            if ms.successes >= spec.health.healthy_threshold {
                ms.in_rotation = true;
                ms.failures = 0;
                back.push(inst.id().to_owned());
            }
        }
        back
    }

    fn announce_readmitted(&self, group: &str, back: Vec<String>) {
        for member in back {
            tracing::info!(group, member = %member, "group_member_back_in_rotation");
            self.runtime
                .events()
                .emit(DomainEvent::GroupMemberHealthChanged {
                    group_id: group.to_owned(),
                    member_id: member,
                    in_rotation: true,
                    reason: "recovered",
                });
        }
    }

    fn order(
        st: &mut GroupState,
        spec: &crate::config::GroupSpec,
        members: Vec<(Arc<Instance>, &GroupMember)>,
        pick: bool,
    ) -> Vec<Arc<Instance>> {
        let (mut live, out): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|(i, _)| st.members.get(i.id()).is_none_or(|m| m.in_rotation));
        if live.is_empty() {
            return out.into_iter().map(|(i, _)| i).collect();
        }
        if !pick {
            live.sort_by_key(|(_, m)| m.priority);
            return live.into_iter().chain(out).map(|(i, _)| i).collect();
        }
        match spec.strategy {
            Strategy::RoundRobin => {
                let start = st.rr % live.len();
                st.rr = st.rr.wrapping_add(1);
                live.rotate_left(start);
            }
            Strategy::WeightedRoundRobin => {
                // Smooth weighted round robin (nginx): interleaves, never bursts.
                let total: i64 = live.iter().map(|(_, m)| i64::from(m.weight)).sum();
                let mut best = 0;
                let mut best_w = i64::MIN;
                for (idx, (inst, m)) in live.iter().enumerate() {
                    let ms = st.members.entry(inst.id().to_owned()).or_default();
                    ms.current_weight += i64::from(m.weight);
                    if ms.current_weight > best_w {
                        best_w = ms.current_weight;
                        best = idx;
                    }
                }
                if let Some(ms) = st.members.get_mut(live[best].0.id()) {
                    ms.current_weight -= total;
                }
                let chosen = live.remove(best);
                live.sort_by_key(|(_, m)| std::cmp::Reverse(m.weight));
                live.insert(0, chosen);
            }
            Strategy::LeastConnections => {
                let start = st.rr % live.len();
                st.rr = st.rr.wrapping_add(1);
                live.rotate_left(start);
                live.sort_by_key(|(i, _)| i.in_flight());
            }
            Strategy::Random => {
                let total: u32 = live.iter().map(|(_, m)| m.weight).sum();
                let mut pick = rand::random_range(0..total.max(1));
                let mut idx = 0;
                for (k, (_, m)) in live.iter().enumerate() {
                    if pick < m.weight {
                        idx = k;
                        break;
                    }
                    pick -= m.weight;
                }
                let chosen = live.remove(idx);
                live.insert(0, chosen);
            }
            Strategy::Priority => {
                live.sort_by_key(|(_, m)| m.priority);
            }
        }
        live.into_iter().chain(out).map(|(i, _)| i).collect()
    }

    /// Monotonic seconds for the breakers.
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Whether some member of the group can serve right now: in rotation and READY.
    fn can_serve(&self, st: &GroupState, spec: &crate::config::GroupSpec) -> bool {
        spec.members.iter().any(|m| {
            st.members.get(&m.id).is_none_or(|ms| ms.in_rotation)
                && self
                    .runtime
                    .instance(&m.id)
                    .is_some_and(|i| i.state() == ServerState::Ready)
        })
    }

    /// Whether the group breaker lets a request through now (OPEN → HALF_OPEN after the
    /// reset timeout, or as soon as a member can serve, admitting exactly one probe).
    fn breaker_admits(&self, group: &Group) -> Result<(), f64> {
        let spec = group.spec();
        let now = self.now();
        let mut groups = self.groups.lock();
        let st = groups.entry(group.id().to_owned()).or_default();
        let can_serve = st.breaker.state() != BreakerState::Closed && self.can_serve(st, &spec);
        let timeout = spec.circuit_breaker.reset_timeout.as_secs_f64();
        let admission = st.breaker.admit(now, timeout, can_serve);
        drop(groups);
        match admission {
            Admission::Admit(change) => {
                if let Some((old, new)) = change {
                    self.breaker_changed(group.id(), old, new);
                }
                Ok(())
            }
            Admission::Refuse(retry_in) => Err(retry_in),
        }
    }

    fn breaker_changed(&self, group: &str, old: BreakerState, new: BreakerState) {
        let m = self.runtime.metrics();
        for s in BreakerState::ALL {
            m.circuit_breaker_state
                .with_label_values(&[group, s.as_str()])
                .set(i64::from(s == new));
        }
        let log = self.runtime.events();
        log.emit(DomainEvent::CircuitBreakerStateChanged {
            mcp_server_id: group.to_owned(),
            old_state: old.as_str(),
            new_state: new.as_str(),
        });
        match new {
            BreakerState::Open => {
                log.emit(DomainEvent::GroupCircuitOpened {
                    group_id: group.to_owned(),
                });
            }
            BreakerState::Closed => {
                log.emit(DomainEvent::GroupCircuitClosed {
                    group_id: group.to_owned(),
                });
            }
            BreakerState::HalfOpen => {}
        }
    }

    /// Record the outcome of a whole group request for the breaker.
    fn breaker_record(&self, group: &Group, ok: bool) {
        let spec = group.spec();
        let now = self.now();
        let mut groups = self.groups.lock();
        let st = groups.entry(group.id().to_owned()).or_default();
        let can_serve = !ok && self.can_serve(st, &spec);
        let threshold = spec.circuit_breaker.failure_threshold;
        let change = st.breaker.record(ok, now, threshold, can_serve);
        drop(groups);
        if let Some((old, new)) = change {
            self.breaker_changed(group.id(), old, new);
        }
    }

    /// Record a member's outcome: members leave rotation after `unhealthy_threshold`
    /// consecutive failures and return after `healthy_threshold` consecutive successes.
    ///
    /// `died_with`: the failure was the loss of this connection generation; the calls that
    /// were in flight on the same connection count once together, not once each.
    fn member_record(&self, group: &Group, member: &str, ok: bool, died_with: Option<Generation>) {
        let spec = group.spec();
        let proven = self.runtime.instance(member).map_or(0, |i| i.proven());
        let mut groups = self.groups.lock();
        let st = groups.entry(group.id().to_owned()).or_default();
        let ms = st.members.entry(member.to_owned()).or_default();
        if let Some(generation) = died_with {
            if ms.dead_generation == Some(generation) {
                return;
            }
            ms.dead_generation = Some(generation);
        }
        let was = ms.in_rotation;
        if ok {
            ms.failures = 0;
            ms.successes += 1;
            if !ms.in_rotation && ms.successes >= spec.health.healthy_threshold {
                ms.in_rotation = true;
            }
        } else {
            ms.successes = 0;
            ms.failures += 1;
            if ms.in_rotation && ms.failures >= spec.health.unhealthy_threshold {
                ms.in_rotation = false;
                ms.proven_seen = proven;
            }
        }
        let now = ms.in_rotation;
        drop(groups);
        if was != now {
            let reason = if now {
                "healthy_threshold_reached"
            } else {
                "unhealthy_threshold_reached"
            };
            self.runtime
                .events()
                .emit(DomainEvent::GroupMemberHealthChanged {
                    group_id: group.id().to_owned(),
                    member_id: member.to_owned(),
                    in_rotation: now,
                    reason,
                });
        }
    }

    /// Members of a group with their routing state.
    pub fn members(&self, group: &str) -> Vec<MemberView> {
        let Some(g) = self.runtime.group(group) else {
            return Vec::new();
        };
        let spec = g.spec();
        let instances: Vec<Arc<Instance>> = spec
            .members
            .iter()
            .filter_map(|m| self.runtime.instance(&m.id))
            .collect();
        let mut groups = self.groups.lock();
        let back = match groups.get_mut(group) {
            Some(st) => Self::readmit(st, &spec, instances.iter()),
            None => Vec::new(),
        };
        let st = groups.get(group);
        let views = spec
            .members
            .iter()
            .map(|m| {
                let ms = st
                    .and_then(|s| s.members.get(&m.id))
                    .cloned()
                    .unwrap_or_default();
                MemberView {
                    id: m.id.clone(),
                    in_rotation: ms.in_rotation,
                    consecutive_failures: ms.failures,
                    weight: m.weight,
                    priority: m.priority,
                }
            })
            .collect();
        drop(groups);
        self.announce_readmitted(group, back);
        views
    }

    /// The group breaker state.
    pub fn breaker_state(&self, group: &str) -> BreakerState {
        self.groups
            .lock()
            .get(group)
            .map_or(BreakerState::Closed, |s| s.breaker.state())
    }

    /// Put every member back in rotation and close the breaker.
    pub fn rebalance(&self, group: &str) {
        let old = self.breaker_state(group);
        self.groups.lock().remove(group);
        if old != BreakerState::Closed {
            self.breaker_changed(group, old, BreakerState::Closed);
        }
    }

    /// Route one request. Tries candidates in order; moves on only when the failure is safe
    /// to retry (the request never reached the upstream, or the call is idempotent).
    pub async fn request(&self, target: &str, req: RouteRequest<'_>) -> Result<Routed, RouteError> {
        let group = self.runtime.group(target);
        if let Some(g) = &group
            && let Err(retry_in) = self.breaker_admits(g)
        {
            self.runtime
                .metrics()
                .errors
                .with_label_values(&["routing", "CircuitBreakerOpen"])
                .inc();
            return Err(RouteError::GroupCircuitOpen {
                group: target.to_owned(),
                retry_in_s: retry_in,
            });
        }
        // If the caller drops this request (client cancel, batch timeout) before it
        // finishes, a half-open probe must not stay "in progress" forever: the guard
        // releases it so the next request can probe.
        let mut guard = ProbeGuard {
            router: self,
            group: group.clone(),
        };
        let result = self.request_inner(target, group.as_deref(), req).await;
        if let Some(g) = guard.group.take() {
            // A refusal by a member's gate says nothing about the group's health.
            if matches!(result, Err(RouteError::Refused { .. })) {
                self.breaker_release_probe(g.id());
            } else {
                self.breaker_record(&g, result.is_ok());
            }
        }
        result
    }

    /// A probe request was abandoned: let another request probe.
    fn breaker_release_probe(&self, group: &str) {
        if let Some(st) = self.groups.lock().get_mut(group) {
            st.breaker.release_probe();
        }
    }

    async fn request_inner(
        &self,
        target: &str,
        group: Option<&Group>,
        req: RouteRequest<'_>,
    ) -> Result<Routed, RouteError> {
        let candidates = self.route_order(target)?;
        if candidates.is_empty() {
            return Err(RouteError::NoAvailableMember {
                group: target.to_owned(),
                detail: "the group has no members".to_owned(),
            });
        }
        // Members not placed on any node right now (moving between nodes) come last: the
        // others serve without waiting for the move.
        let (placed, moving): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|i| group.is_none() || i.host() != Host::Unplaced);
        // (instance, whether it already had its one restart after a dead connection)
        let mut queue: VecDeque<(Arc<Instance>, bool)> = placed
            .into_iter()
            .chain(moving)
            .map(|i| (i, false))
            .collect();
        let mut failures: Vec<String> = Vec::new();
        while let Some((inst, restarted)) = queue.pop_front() {
            if group.is_some()
                && let Some(reason) = req.gate.and_then(|gate| gate(inst.id()))
            {
                return Err(RouteError::Refused {
                    group: target.to_owned(),
                    member: inst.id().to_owned(),
                    reason,
                });
            }
            // A lone server waits for its instance to be re-placed when its host is
            // unreachable; a group member gives way to the next member at once.
            let err = match self.attempt(&inst, &req, group.is_none()).await {
                Ok(outcome) => {
                    if let Some(g) = group {
                        self.member_record(g, inst.id(), true, None);
                    }
                    return Ok(Routed {
                        instance: inst,
                        outcome,
                    });
                }
                Err(e) => e,
            };
            // The process behind the connection died before the request left (nothing had
            // noticed yet): one transparent restart. A single server restarts at once; a group
            // member goes to the back of the line, so the call is served by a member that is
            // running rather than waiting for a start.
            let dead_before_send = matches!(&err, Attempt::Upstream { error, alive: false, .. } if error.before_send());
            let Some(g) = group else {
                if dead_before_send && !restarted {
                    queue.push_front((inst, true));
                    continue;
                }
                return Err(match err {
                    Attempt::Start(e) => RouteError::Start(e),
                    Attempt::Upstream { error, .. } => RouteError::Upstream {
                        server: inst.id().to_owned(),
                        source: error,
                    },
                });
            };
            let died_with = match &err {
                Attempt::Upstream {
                    alive: false,
                    generation,
                    ..
                } => Some(*generation),
                _ => None,
            };
            self.member_record(g, inst.id(), false, died_with);
            if dead_before_send && !restarted {
                queue.push_back((inst.clone(), true));
            }
            match err {
                Attempt::Start(e) => failures.push(format!("{}: {e}", inst.id())),
                Attempt::Upstream { error, .. } if error.before_send() || req.idempotent => {
                    failures.push(format!("{}: {error}", inst.id()));
                    if !queue.is_empty() {
                        tracing::info!(group = target, member = inst.id(), error = %error, "group_member_failed_trying_next");
                    }
                }
                // It may have reached the upstream: not safe to send again.
                Attempt::Upstream { error, .. } => {
                    return Err(RouteError::Upstream {
                        server: inst.id().to_owned(),
                        source: error,
                    });
                }
            }
        }
        Err(RouteError::NoAvailableMember {
            group: target.to_owned(),
            detail: failures.join("; "),
        })
    }

    /// One try on one instance: start it if needed, send, record the outcome on the instance.
    async fn attempt(
        &self,
        inst: &Arc<Instance>,
        req: &RouteRequest<'_>,
        patient: bool,
    ) -> Result<Outcome, Attempt> {
        let host = match inst.host() {
            Host::Unplaced => inst.placed(req.timeout.min(PLACEMENT_WAIT)).await,
            h => h,
        };
        match host {
            Host::Node(_) => self.attempt_elsewhere(inst, req, patient).await,
            // Unplaced still: `ensure_ready` says so.
            Host::Here | Host::Unplaced => self.attempt_here(inst, req).await,
        }
    }

    /// One try on an instance this node hosts.
    async fn attempt_here(
        &self,
        inst: &Arc<Instance>,
        req: &RouteRequest<'_>,
    ) -> Result<Outcome, Attempt> {
        let conn = inst.ensure_ready().await.map_err(Attempt::Start)?;
        let generation = inst.generation();
        if let Some(slot) = &req.slot {
            *slot.lock() = Some(conn.clone());
        }
        match conn
            .request(
                req.method,
                req.params.clone(),
                req.sink.clone(),
                Some(req.timeout),
            )
            .await
        {
            Ok(outcome) => {
                inst.report_success(&conn);
                Ok(outcome)
            }
            Err(e) => {
                let lost = inst.report_transport_failure(&conn, &e);
                Err(Attempt::Upstream {
                    error: e,
                    alive: !lost,
                    generation,
                })
            }
        }
    }

    /// One try on an instance hosted by another node: forward it. When nothing was sent, it
    /// follows a placement that moved and — for a lone server — waits for the instance of an
    /// unreachable host to be re-placed, within the call's timeout and at most 3 moves.
    async fn attempt_elsewhere(
        &self,
        inst: &Arc<Instance>,
        req: &RouteRequest<'_>,
        patient: bool,
    ) -> Result<Outcome, Attempt> {
        let started = tokio::time::Instant::now();
        let left = || req.timeout.saturating_sub(started.elapsed());
        // Bounded: a placement that moves more often than this during one call is not followed.
        let mut moves_left = 3;
        loop {
            let node = match inst.host() {
                Host::Here | Host::Unplaced => return self.attempt_here(inst, req).await,
                Host::Node(n) => n,
            };
            let Some(fwd) = self.runtime.forward() else {
                return Err(Attempt::Start(StartError::NotPlacedHere {
                    server: inst.id().to_owned(),
                    host: Host::Node(node),
                }));
            };
            // A host that dies or freezes mid-call breaks the stream (connection reset, or
            // no answer to HTTP/2 keepalive pings within about 2 s); a host that stops the
            // instance for a planned move finishes the calls in flight first.
            let r = fwd
                .call(
                    node,
                    inst.id(),
                    req.method,
                    req.params.clone(),
                    req.sink.clone(),
                    left().max(Duration::from_millis(1)),
                )
                .await;
            return match r {
                Ok(o) => Ok(o),
                // Nothing was sent: the placement moved (wait for this node to learn where),
                // or — for a lone server — its host is unreachable (wait for the leader to
                // re-place it), then send it there within the same request.
                Err(ForwardError::NotHostedThere { .. }) if moves_left > 0 => {
                    moves_left -= 1;
                    inst.host_changed(Host::Node(node), left().min(PLACEMENT_WAIT))
                        .await;
                    continue;
                }
                Err(e @ ForwardError::Unreachable { .. }) if patient && moves_left > 0 => {
                    moves_left -= 1;
                    tracing::info!(server = inst.id(), error = %e, "host_unreachable_waiting_for_new_placement");
                    if inst.host_changed(Host::Node(node), left()).await == Host::Node(node) {
                        return Err(unreachable(inst, e));
                    }
                    continue;
                }
                // A group member gives way to the next member at once.
                Err(e @ ForwardError::Unreachable { .. }) => Err(unreachable(inst, e)),
                Err(e @ (ForwardError::NotHostedThere { .. } | ForwardError::Start { .. })) => {
                    Err(Attempt::Start(StartError::Remote {
                        server: inst.id().to_owned(),
                        source: e,
                    }))
                }
                Err(ForwardError::Upstream(error)) => Err(Attempt::Upstream {
                    error,
                    alive: true,
                    generation: inst.generation(),
                }),
            };
        }
    }

    /// Make sure `inst` runs where it is placed: started here, or (hosted elsewhere) started
    /// by its host through a forwarded `ping`, waiting until its catalogue reached this node
    /// (bounded).
    pub async fn start(&self, inst: &Arc<Instance>) -> Result<(), StartError> {
        let host = match inst.host() {
            Host::Unplaced => inst.placed(PLACEMENT_WAIT).await,
            h => h,
        };
        if !matches!(host, Host::Node(_)) {
            return inst.ensure_ready().await.map(|_| ());
        }
        let mut events = self.runtime.subscribe();
        let req = RouteRequest {
            method: "ping",
            params: None,
            sink: None,
            timeout: Duration::from_secs(60),
            idempotent: true,
            slot: None,
            gate: None,
        };
        self.attempt_elsewhere(inst, &req, true)
            .await
            .map_err(|e| match e {
                Attempt::Start(e) => e,
                Attempt::Upstream { error, .. } => StartError::Upstream {
                    server: inst.id().to_owned(),
                    source: error,
                },
            })?;
        let learned = async {
            while self.runtime.catalog_of(inst).is_none() {
                if events.recv().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), learned).await;
        Ok(())
    }

    /// Whether `tool` is declared idempotent for `target` (config `idempotent_tools` globs on
    /// the server, or on every member for a group).
    pub fn is_idempotent(&self, target: &str, tool: &str) -> bool {
        let check = |spec: &ServerSpec| {
            spec.common()
                .is_some_and(|c| c.idempotent_tools.iter().any(|g| glob_match(g, tool)))
        };
        if let Some(inst) = self.runtime.instance(target) {
            return check(&inst.spec());
        }
        if let Some(group) = self.runtime.group(target) {
            let members = group.spec().members;
            return !members.is_empty()
                && members.iter().all(|m| {
                    self.runtime
                        .instance(&m.id)
                        .is_some_and(|i| check(&i.spec()))
                });
        }
        false
    }
}

/// An unreachable host as the attempt's error (nothing was sent: safe to try elsewhere).
fn unreachable(inst: &Instance, e: ForwardError) -> Attempt {
    Attempt::Upstream {
        error: UpstreamError::Connect {
            server: inst.id().to_owned(),
            message: e.to_string(),
        },
        alive: true,
        generation: inst.generation(),
    }
}

/// fnmatch-style glob: `*`, `?`, `[abc]`/`[!abc]`/`[a-z]` (an unclosed `[` is literal);
/// iterative, so no pattern makes it exponential.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    // Iterative with one backtrack point for the last `*` (linear in practice).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(&p[pi..], n[ni]) {
                        if matched {
                            pi += next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        // An unclosed `[` is a literal.
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A `[...]` class at the start of `p` against `c`: (matches, length of the class), or `None`
/// when it is not closed.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = p.get(1) == Some(&'!');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
        first = false;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;
    use crate::telemetry::events::EventLog;

    fn router(strategy: &str, members: &str) -> (Router, Arc<Group>) {
        let yaml = format!(
            "mcp_servers:\n  a: {{command: [x]}}\n  b: {{command: [x]}}\n  c: {{command: [x]}}\n  g:\n    mode: group\n    strategy: {strategy}\n    circuit_breaker: {{failure_threshold: 2, reset_timeout_s: 1}}\n    members: {members}\n"
        );
        let cfg = crate::config::load_str(&yaml, &|_| None).unwrap();
        let rt = Runtime::new(
            &cfg,
            Arc::new(Metrics::new()),
            Arc::new(EventLog::new("n", 100)),
            "n".into(),
        );
        let g = rt.group("g").unwrap();
        (Router::new(rt), g)
    }

    fn first(r: &Router, g: &Arc<Group>) -> String {
        r.group_order(g, true)[0].id().to_owned()
    }

    #[test]
    fn round_robin_is_exactly_cyclic_and_skips_members_out_of_rotation() {
        let (r, g) = router("round_robin", "[{id: a}, {id: b}, {id: c}]");
        let order: Vec<String> = (0..9).map(|_| first(&r, &g)).collect();
        assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
        r.member_record(&g, "c", false, None);
        r.member_record(&g, "c", false, None);
        let order: Vec<String> = (0..6).map(|_| first(&r, &g)).collect();
        assert!(order.iter().all(|m| m != "c"), "{order:?}");
        assert_eq!(
            r.group_order(&g, true).last().unwrap().id(),
            "c",
            "out-of-rotation members are the last resort"
        );
        r.member_record(&g, "c", true, None);
        assert!(r.members("g").iter().all(|m| m.in_rotation));
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_80_20() {
        let (r, g) = router(
            "weighted_round_robin",
            "[{id: a, weight: 80}, {id: b, weight: 20}]",
        );
        let picks: Vec<String> = (0..100).map(|_| first(&r, &g)).collect();
        assert_eq!(picks.iter().filter(|m| *m == "a").count(), 80);
        let mut run = 0;
        for p in &picks {
            run = if p == "a" { run + 1 } else { 0 };
            assert!(
                run < 5,
                "at most 4 consecutive picks of the heavy member: {picks:?}"
            );
        }
    }

    #[test]
    fn weighted_random_within_five_percent() {
        let (r, g) = router("random", "[{id: a, weight: 70}, {id: b, weight: 30}]");
        let a = (0..1000).filter(|_| first(&r, &g) == "a").count();
        assert!((650..=750).contains(&a), "{a}");
    }

    #[test]
    fn priority_prefers_the_lowest_number_and_fails_over_in_order() {
        let (r, g) = router(
            "priority",
            "[{id: a, priority: 2}, {id: b, priority: 1}, {id: c, priority: 3}]",
        );
        let order: Vec<String> = r
            .group_order(&g, true)
            .iter()
            .map(|i| i.id().to_owned())
            .collect();
        assert_eq!(order, ["b", "a", "c"]);
    }

    #[test]
    fn breaker_opens_rejects_half_opens_and_closes() {
        let (r, g) = router("round_robin", "[{id: a}]");
        assert!(r.breaker_admits(&g).is_ok());
        r.breaker_record(&g, false);
        r.breaker_record(&g, false);
        assert_eq!(r.breaker_state("g"), BreakerState::Open);
        assert!(r.breaker_admits(&g).is_err());
        // Reset timeout is 1 s: force it elapsed.
        r.groups.lock().get_mut("g").unwrap().breaker.backdate(2.0);
        assert!(
            r.breaker_admits(&g).is_ok(),
            "one probe after the reset timeout"
        );
        assert_eq!(r.breaker_state("g"), BreakerState::HalfOpen);
        assert!(r.breaker_admits(&g).is_err(), "only one probe at a time");
        r.breaker_record(&g, false);
        assert_eq!(
            r.breaker_state("g"),
            BreakerState::Open,
            "a failed probe re-opens"
        );
        r.groups.lock().get_mut("g").unwrap().breaker.backdate(2.0);
        assert!(r.breaker_admits(&g).is_ok());
        r.breaker_record(&g, true);
        assert_eq!(r.breaker_state("g"), BreakerState::Closed);
    }

    #[test]
    fn catalogue_lookups_do_not_consume_balancer_picks() {
        let (r, g) = router("round_robin", "[{id: a}, {id: b}, {id: c}]");
        for _ in 0..5 {
            assert_eq!(r.candidates("g").unwrap()[0].id(), "a");
        }
        let order: Vec<String> = (0..3).map(|_| first(&r, &g)).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn an_abandoned_half_open_probe_lets_the_next_request_probe() {
        let (r, g) = router("round_robin", "[{id: a}]");
        r.breaker_record(&g, false);
        r.breaker_record(&g, false);
        r.groups.lock().get_mut("g").unwrap().breaker.backdate(2.0);
        assert!(r.breaker_admits(&g).is_ok(), "the probe");
        assert!(r.breaker_admits(&g).is_err());
        // The probe's request is dropped (client cancel, batch timeout) before it finishes.
        drop(ProbeGuard {
            router: &r,
            group: Some(g.clone()),
        });
        assert!(r.breaker_admits(&g).is_ok(), "another probe is admitted");
        assert_eq!(r.breaker_state("g"), BreakerState::HalfOpen);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("get_*", "get_time"));
        assert!(!glob_match("get_*", "set_time"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("[ab]x", "bx"));
        assert!(!glob_match("[!ab]x", "bx"));
        assert!(glob_match("[a-c]*", "cat"));
        assert!(glob_match("read_*_file", "read_big_file"));
    }
}
