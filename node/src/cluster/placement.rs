//! The leader's placement loop: it reads the replicated state, lets the pure
//! [`crate::supervisor::placement::plan`] decide, and writes the decisions as Raft commands
//! stamped with its term (the fencing token). Followers never decide; a deposed leader's
//! writes are refused by the state machine.

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
        let mut leader_since: Option<(u64, Instant)> = None;
        let mut last_unplaced: Vec<(String, String)> = Vec::new();
        loop {
            let status = self.raft.status();
            if status.role == Role::Leader {
                let since = match leader_since {
                    Some((term, at)) if term == status.term => at,
                    _ => {
                        let now = Instant::now();
                        leader_since = Some((status.term, now));
                        now
                    }
                };
                let unplaced = self.place_once(&runtime, status.term, since).await;
                if unplaced != last_unplaced {
                    for (id, why) in &unplaced {
                        tracing::warn!(server = %id, reason = %why, "instance_not_placed");
                    }
                    last_unplaced = unplaced;
                }
            } else {
                leader_since = None;
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

    /// One planning round as leader of `term` (leading since `since`); returns the servers
    /// that fit nowhere.
    async fn place_once(
        &self,
        runtime: &Runtime,
        term: u64,
        since: Instant,
    ) -> Vec<(String, String)> {
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
        let wants: Vec<Want> = specs
            .iter()
            .filter_map(|(id, spec)| match spec {
                ServerSpec::Subprocess(s) if placed_by_leader(spec) => Some(Want {
                    id: id.clone(),
                    nodes: s.placement.nodes.clone(),
                    groups: groups_of.get(id.as_str()).cloned().unwrap_or_default(),
                }),
                _ => None,
            })
            .collect();
        let status = self.raft.status();
        let ages = self.raft.peer_ack_ages().unwrap_or_default();
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
                    let alive = *id == self.cfg.node_id
                        || match ages.get(id) {
                            Some(Some(age)) => *age < loss,
                            // Not heard from since this node became leader.
                            _ => since.elapsed() < loss,
                        };
                    Some((
                        *id,
                        NodeView {
                            capacity: rec.capacity,
                            alive,
                            draining: rec.draining,
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
        // Members that have not registered their addresses yet cannot be placed on (nothing
        // could forward to them); right after an election, wait for them rather than crowd the
        // instances onto the early ones (nothing moves later without need).
        if nodes.len() < members.len() && since.elapsed() < loss {
            return Vec::new();
        }
        let decided = plan(&wants, &nodes, &current);
        for change in decided.changes {
            let cmd = match &change {
                Change::Place { id, node } => {
                    tracing::info!(server = %id, node, from = ?current.get(id), term, "instance_placed");
                    Command::SetPlacement {
                        instance_id: id.clone(),
                        node_id: *node,
                        term,
                    }
                }
                Change::Remove { id } => Command::RemovePlacement {
                    instance_id: id.clone(),
                    term,
                },
            };
            if let Err(e) = self.propose(cmd).await {
                tracing::warn!(error = %e, ?change, "placement_not_written");
                break;
            }
        }
        decided.unplaced
    }
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
