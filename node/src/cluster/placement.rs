//! The leader's placement loop: it reads the replicated state, lets the pure
//! [`crate::supervisor::placement::plan`] decide, and writes the decisions as Raft commands
//! stamped with its term. Followers never decide; a deposed leader's writes are refused by
//! the state machine. A node counts as lost only once every placement lease it may hold has
//! lapsed (`lease.rs`), and an instance starts on a new node only once no live node reports
//! a process of it: a move off a live node is two steps (unplace, then place).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_raft::state::InstanceState;
use hangar_raft::{Command, RejectCode, Role};

use super::{Cluster, ClusterError};
use crate::config::ServerSpec;
use crate::runtime::placement::placed_by_leader;
use crate::runtime::{Host, Runtime, ServerState};
use crate::supervisor::placement::{Change, NodeView, Want, plan};

/// How often the leader re-checks placements (also after every applied change).
const EVERY: Duration = Duration::from_millis(500);
/// How often a node compares its instances' states with what it last reported (a report is a
/// Raft write, made only when a state changed).
const REPORT_EVERY: Duration = Duration::from_millis(200);

impl Cluster {
    /// Run the placement loop until shutdown (acts only while this node leads).
    pub(super) async fn placement_loop(self: Arc<Self>, runtime: Arc<Runtime>) {
        let mut applied = self.raft.subscribe_applied();
        let mut term_state: Option<Term> = None;
        let mut last_unplaced: Vec<(String, String)> = Vec::new();
        loop {
            let status = self.raft.status();
            if status.role == Role::Leader {
                if term_state.as_ref().is_none_or(|t| t.term != status.term) {
                    term_state = Some(Term {
                        term: status.term,
                        since: Instant::now(),
                        // Every placement an earlier leader wrote is in this log.
                        start_index: status.last_log_index.unwrap_or(0),
                        handoffs: BTreeMap::new(),
                        failed_on: BTreeMap::new(),
                        waiting: Default::default(),
                    });
                    self.leases
                        .require_applied(status.last_log_index.unwrap_or(0));
                }
                if let Some(t) = term_state.as_mut() {
                    let unplaced = self.place_once(&runtime, t).await;
                    if unplaced != last_unplaced {
                        for (id, why) in &unplaced {
                            tracing::warn!(server = %id, reason = %why, "instance_not_placed");
                        }
                        last_unplaced = unplaced;
                    }
                }
            } else {
                term_state = None;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = applied.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(EVERY) => {}
            }
            // Coalesce bursts of applied entries.
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// One planning round as leader of `t`; returns the servers that fit nowhere.
    async fn place_once(&self, runtime: &Runtime, t: &mut Term) -> Vec<(String, String)> {
        let (term, since) = (t.term, t.since);
        // The plan is made from this node's running specs: a leader that could not apply the
        // replicated configuration (say, a variable missing here) would plan from stale
        // specs and could unplace servers it does not know. It decides nothing then.
        if let Some(e) = self.apply_error() {
            return vec![(
                "*".to_owned(),
                format!(
                    "this leader cannot apply the replicated configuration ({e}); placements are left as they are"
                ),
            )];
        }
        let specs = runtime.specs();
        let mut groups_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (gid, spec) in &specs {
            if let ServerSpec::Group(g) = spec {
                for m in &g.members {
                    groups_of
                        .entry(m.id.as_str())
                        .or_default()
                        .push(gid.clone());
                }
            }
        }
        let mut wants: Vec<Want> = specs
            .iter()
            .filter_map(|(id, spec)| match spec {
                ServerSpec::Subprocess(s) if placed_by_leader(spec) => Some(Want {
                    id: id.clone(),
                    nodes: s.placement.nodes.clone(),
                    labels: s.placement.labels.clone(),
                    groups: groups_of.get(id.as_str()).cloned().unwrap_or_default(),
                    avoid: Default::default(),
                }),
                _ => None,
            })
            .collect();
        let status = self.raft.status();
        let loss = self.cfg.node_loss_timeout;
        let members: Vec<u64> = status
            .voters
            .keys()
            .chain(status.learners.keys())
            .copied()
            .collect();
        let (nodes, current) = self.raft.read(|st| {
            let nodes: BTreeMap<u64, NodeView> = members
                .iter()
                .filter_map(|id| {
                    let rec = st.nodes.get(id)?;
                    // Alive while it may hold a placement lease.
                    let alive = *id == self.cfg.node_id || self.leases.may_hold(*id, since, loss);
                    Some((
                        *id,
                        NodeView {
                            capacity: rec.capacity,
                            alive,
                            draining: rec.draining,
                            labels: rec.labels.clone(),
                        },
                    ))
                })
                .collect();
            let current: BTreeMap<String, u64> = st
                .placements
                .iter()
                .map(|(i, p)| (i.clone(), p.node_id))
                .collect();
            (nodes, current)
        });
        // Recovery by moving: an instance its host reports DEGRADED or DEAD (it kept failing
        // there) goes to a node it has not failed on, when there is one; once it is READY
        // somewhere, its past failures are forgotten.
        let reports = self.raft.read(|st| {
            st.status
                .iter()
                .map(|(i, s)| (i.clone(), (local(s.state), s.node_id)))
                .collect::<Vec<_>>()
        });
        for (id, (state, node)) in reports {
            match state {
                ServerState::Degraded | ServerState::Dead
                    if current.get(&id) == Some(&node)
                        && t.failed_on.entry(id.clone()).or_default().insert(node) =>
                {
                    tracing::warn!(server = %id, node, state = ?state, "instance_failing_on_its_node (placing it elsewhere if another node can take it)");
                }
                ServerState::Ready => {
                    t.failed_on.remove(&id);
                }
                _ => {}
            }
        }
        for w in &mut wants {
            w.avoid = t.failed_on.get(&w.id).cloned().unwrap_or_default();
        }
        // Members that have not registered their addresses yet cannot be placed on (nothing
        // could forward to them); right after an election, wait for them rather than crowd the
        // instances onto the early ones (nothing moves later without need).
        if nodes.len() < members.len() && since.elapsed() < loss {
            return Vec::new();
        }
        let decided = plan(&wants, &nodes, &current);
        for change in decided.changes {
            let (cmd, handoff) = match &change {
                Change::Place { id, node } => {
                    let from = current.get(id).copied().filter(|f| f != node);
                    if let Some(old) = from.filter(|o| nodes.get(o).is_some_and(|v| v.alive)) {
                        // Its host is alive: it stops first, the new host starts after.
                        tracing::info!(server = %id, from = old, to = node, term, "instance_moving");
                        let cmd = Command::RemovePlacement {
                            instance_id: id.clone(),
                            term,
                        };
                        (cmd, Some(id.clone()))
                    } else {
                        let must_have_applied =
                            t.handoffs.get(id).copied().unwrap_or(0).max(t.start_index);
                        if let Some((b, why)) =
                            self.still_running(id, *node, &nodes, must_have_applied)
                        {
                            let key = (id.clone(), b, why.clone());
                            if t.waiting.insert(key) {
                                tracing::info!(server = %id, node, waiting_for = b, why = %why, "placement_waits_for_a_stop");
                            }
                            continue;
                        }
                        tracing::info!(server = %id, node, from = ?current.get(id), term, "instance_placed");
                        let cmd = Command::SetPlacement {
                            instance_id: id.clone(),
                            node_id: *node,
                            term,
                        };
                        (cmd, None)
                    }
                }
                Change::Remove { id } => (
                    Command::RemovePlacement {
                        instance_id: id.clone(),
                        term,
                    },
                    None,
                ),
            };
            if let Err(e) = self.propose(cmd).await {
                tracing::warn!(error = %e, ?change, "placement_not_written");
                break;
            }
            let index = self.raft.status().last_log_index.unwrap_or(0);
            self.leases.require_applied(index);
            if let Some(id) = handoff {
                t.handoffs.insert(id, index);
            }
        }
        decided.unplaced
    }

    /// A live node other than `target` that may still run `id`, and why: it has not
    /// reported (with a renewal) placements applied up to `must_have_applied`, or it reports a
    /// process of it.
    fn still_running(
        &self,
        id: &str,
        target: u64,
        nodes: &BTreeMap<u64, NodeView>,
        must_have_applied: u64,
    ) -> Option<(u64, String)> {
        nodes
            .iter()
            .filter(|(n, v)| **n != target && v.alive)
            .find_map(|(n, _)| {
                let why = match self.leases.report(*n) {
                    None => "it has not renewed its lease with this leader yet".to_owned(),
                    Some(r) if r.applied < must_have_applied => format!(
                        "it has applied placements up to index {} of {must_have_applied}",
                        r.applied
                    ),
                    Some(r) if r.running.contains(id) => "it still runs it".to_owned(),
                    Some(_) => return None,
                };
                Some((*n, why))
            })
    }
}

/// What the leader keeps for its current term.
struct Term {
    term: u64,
    /// When this node saw itself lead in this term (later than any grant of an earlier
    /// leader).
    since: Instant,
    /// The last log index when the term began: every placement of earlier leaders is at or
    /// below it.
    start_index: u64,
    /// Instances being moved off a live node → the log index of their unplacement.
    handoffs: BTreeMap<String, u64>,
    /// Nodes each instance kept failing on (reported DEGRADED or DEAD there) since it was
    /// last READY.
    failed_on: BTreeMap<String, std::collections::BTreeSet<u64>>,
    /// What placements were seen waiting for (logged once each).
    waiting: std::collections::BTreeSet<(String, u64, String)>,
}

/// The replicated form of a lifecycle state.
fn replicated(s: ServerState) -> InstanceState {
    match s {
        ServerState::Cold => InstanceState::Cold,
        ServerState::Initializing => InstanceState::Initializing,
        ServerState::Ready => InstanceState::Ready,
        ServerState::Degraded => InstanceState::Degraded,
        ServerState::Dead => InstanceState::Dead,
    }
}

/// The local form of a replicated lifecycle state.
pub(super) fn local(s: InstanceState) -> ServerState {
    match s {
        InstanceState::Cold => ServerState::Cold,
        InstanceState::Initializing => ServerState::Initializing,
        InstanceState::Ready => ServerState::Ready,
        InstanceState::Degraded => ServerState::Degraded,
        InstanceState::Dead => ServerState::Dead,
    }
}

impl Cluster {
    /// Report the lifecycle transitions of the single-instance servers this node hosts, so
    /// every node shows the same state (only transitions, never per-call data; one round of
    /// reports per tick).
    pub(super) async fn status_reporter(self: Arc<Self>, runtime: Arc<Runtime>) {
        let me = self.cfg.node_id;
        let mut refused: BTreeMap<String, ServerState> = BTreeMap::new();
        loop {
            for inst in runtime.instances() {
                if inst.host() != Host::Here || !placed_by_leader(&inst.spec()) {
                    continue;
                }
                let state = inst.state();
                let known = self.raft.read(|st| {
                    st.status
                        .get(inst.id())
                        .map(|s| (local(s.state), s.node_id))
                });
                if known == Some((state, me)) || refused.get(inst.id()) == Some(&state) {
                    continue;
                }
                let cmd = Command::ReportStatus {
                    instance_id: inst.id().to_owned(),
                    node_id: me,
                    state: replicated(state),
                    reason: String::new(),
                };
                match self.propose(cmd).await {
                    Err(ClusterError::Rejected {
                        code: RejectCode::NotPlacedHere,
                        ..
                    }) => {
                        // The placement moved on; the applier stops the instance here.
                        refused.insert(inst.id().to_owned(), state);
                    }
                    Ok(_) => {
                        refused.remove(inst.id());
                    }
                    Err(e) => {
                        tracing::debug!(server = inst.id(), error = %e, "status_report_failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(REPORT_EVERY) => {}
            }
        }
    }
}
