//! Placement leases: fencing that excludes a node even when it cannot learn that it was
//! replaced.
//!
//! A term on a placement is not enough: a node that is partitioned or frozen never hears of
//! the new term and keeps its instance running. So a node may run single-instance servers
//! only while it holds a **lease**, and the leader re-places a node's instances only when
//! every lease it may hold must have expired:
//!
//! * Each node asks the leader to renew its lease every `placement_lease / 5`. It notes the
//!   time `t0` (`CLOCK_MONOTONIC`) *before* sending; on success its lease runs until
//!   `t0 + placement_lease`. The node's lease shim of every child reads that deadline and
//!   kills the child when it passes, even if the node itself is frozen
//!   (`upstream/lease.rs`).
//! * The leader grants a renewal only after confirming with a quorum that it still leads (a
//!   deposed leader cannot extend anything), and notes the time of the grant, which is later
//!   than `t0`.
//! * The leader counts a node lost when its last grant (or, for a new leader, the start of
//!   its term, which is later than any grant of its predecessors) is older than
//!   `node_loss_timeout`, which exceeds `placement_lease` by a margin: by then the node's
//!   lease has lapsed and its shim has killed its instances.
//!
//! Why not use the Raft heartbeats the node receives: heartbeats that queued up while a node
//! was frozen are read when it resumes and would renew a lease that the leader has already
//! given up on. A renewal that the node starts itself measures from a time that is provably
//! before the grant.
//!
//! Each renewal also tells the leader what the node runs (the single-instance servers it has a
//! process of) and up to which log index it applied placements. The leader moves an instance
//! off a live node in two steps (unplace, wait until that node reports it applied that and
//! runs it no more, then place), so no two nodes run it at the same instant in a planned move
//! either.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hangar_proto::node::v1 as pb;
use hangar_raft::RaftHandle;
use parking_lot::Mutex;
use pb::lease_service_client::LeaseServiceClient;
use pb::lease_service_server::{LeaseService, LeaseServiceServer};
use tonic::{Request, Response, Status};

use super::{Cluster, ClusterError};
use crate::runtime::{Lease, Runtime};
use crate::upstream::lease::mono_now_ns;

/// What a node said with its last renewal, as the leader noted it.
#[derive(Debug, Clone)]
pub(super) struct Report {
    /// When the leader granted it (after confirming its leadership).
    pub(super) at: Instant,
    /// Placements are applied on the node up to this log index.
    pub(super) applied: u64,
    /// The single-instance servers it has a process of.
    pub(super) running: BTreeSet<String>,
}

/// The leader's side: grants and what each node reported.
#[derive(Default)]
pub struct Leases {
    raft: std::sync::OnceLock<RaftHandle>,
    reports: Mutex<HashMap<u64, Report>>,
    /// A node gets a lease only once it applied placements up to here: the start of this
    /// leader's term and its last placement change. (A node that was frozen must learn
    /// where its instances went before it may run anything again.)
    min_applied: std::sync::atomic::AtomicU64,
}

impl Leases {
    /// The gRPC service, to be served on the Raft listener; it refuses until
    /// [`attach`](Self::attach).
    pub fn service(self: &Arc<Self>) -> LeaseServiceServer<LeaseServer> {
        LeaseServiceServer::new(LeaseServer(self.clone()))
    }

    /// Grant renewals through `raft` from now on.
    pub fn attach(&self, raft: RaftHandle) {
        let _ = self.raft.set(raft);
    }

    /// Renew `node`'s lease if this node still leads (confirmed with a quorum); returns the
    /// term.
    async fn grant(&self, report: pb::RenewRequest) -> Result<u64, ClusterError> {
        let raft = self
            .raft
            .get()
            .ok_or(ClusterError::Raft(hangar_raft::RaftError::NoLeader))?;
        let status = raft.status();
        if !status.voters.contains_key(&report.node_id)
            && !status.learners.contains_key(&report.node_id)
        {
            // A removed node must stop what it runs: the leader placed it elsewhere.
            return Err(ClusterError::NotAMember(report.node_id));
        }
        let min = self.min_applied.load(Ordering::Acquire);
        if report.applied_index < min {
            return Err(ClusterError::PeerRpc {
                node: report.node_id,
                message: format!(
                    "placements are applied there up to index {} of {min}; no lease until it catches up",
                    report.applied_index
                ),
            });
        }
        let term = raft.confirm_leadership().await?;
        self.reports.lock().insert(
            report.node_id,
            Report {
                at: Instant::now(),
                applied: report.applied_index,
                running: report.running.into_iter().collect(),
            },
        );
        Ok(term)
    }

    /// From now on, grant leases only to nodes that applied placements up to `index`.
    pub(super) fn require_applied(&self, index: u64) {
        self.min_applied.fetch_max(index, Ordering::AcqRel);
    }

    /// The last renewal of `node` this node granted.
    pub(super) fn report(&self, node: u64) -> Option<Report> {
        self.reports.lock().get(&node).cloned()
    }

    /// Whether `node` may still hold a lease, as the leader of a term that began at `since`
    /// sees it: a grant (by this leader, or by an earlier one before `since`) younger than
    /// `loss`.
    pub(super) fn may_hold(&self, node: u64, since: Instant, loss: Duration) -> bool {
        let last = self
            .reports
            .lock()
            .get(&node)
            .map_or(since, |r| r.at.max(since));
        last.elapsed() < loss
    }
}

/// The `LeaseService` gRPC server.
pub struct LeaseServer(Arc<Leases>);

#[tonic::async_trait]
impl LeaseService for LeaseServer {
    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewReply>, Status> {
        match self.0.grant(request.into_inner()).await {
            Ok(term) => Ok(Response::new(pb::RenewReply { term })),
            Err(e) => Err(Status::failed_precondition(format!(
                "no lease granted: {e}"
            ))),
        }
    }
}

impl Cluster {
    /// Keep this node's placement lease renewed until its instances have stopped; stop the
    /// single-instance servers here when it lapses.
    pub(super) async fn lease_loop(self: Arc<Self>, runtime: Arc<Runtime>) {
        let lease = self.cfg.placement_lease;
        let every = (lease / 5).max(Duration::from_millis(20));
        let lease_ns = u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX);
        let mut until = 0u64;
        let mut held = false;
        let mut last_error = String::new();
        loop {
            let started = tokio::time::Instant::now();
            // Before sending: the grant is provably later.
            let t0 = mono_now_ns();
            match tokio::time::timeout(every * 2, self.renew(&runtime)).await {
                Ok(Ok(term)) => {
                    until = t0.saturating_add(lease_ns);
                    runtime.set_lease(Lease::Until(until));
                    if !held {
                        tracing::info!(
                            term,
                            lease_ms = lease.as_millis() as u64,
                            "placement_lease_held"
                        );
                        held = true;
                    }
                    last_error.clear();
                }
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::debug!(error = %e, "placement_lease_not_renewed");
                        last_error = e;
                    }
                }
                Err(_) => tracing::debug!("placement_lease_renewal_timed_out"),
            }
            if held && mono_now_ns() >= until {
                held = false;
                tracing::warn!(
                    lease_ms = lease.as_millis() as u64,
                    "placement_lease_lapsed (no renewal from a leader in time: this node stops its single-instance servers)"
                );
                let rt = runtime.clone();
                tokio::spawn(async move { rt.lease_lapsed().await });
            }
            // Not `shutdown`: a node that stops keeps its lease while the calls running on
            // its instances finish; it ends after the instances have stopped.
            tokio::select! {
                _ = self.lease_end.cancelled() => return,
                _ = tokio::time::sleep_until(started + every) => {}
            }
        }
    }

    /// One renewal through the current leader (this node itself when it leads).
    async fn renew(&self, runtime: &Runtime) -> Result<u64, ClusterError> {
        // Read the applied index first: what it runs is then counted after the placements
        // up to that index took effect here.
        let request = pb::RenewRequest {
            node_id: self.cfg.node_id,
            applied_index: self.placements_applied.load(Ordering::Acquire),
            running: runtime.single_instances_running(),
        };
        let leader = self
            .raft
            .status()
            .leader_id
            .ok_or(ClusterError::Raft(hangar_raft::RaftError::NoLeader))?;
        if leader == self.cfg.node_id {
            return self.leases.grant(request).await;
        }
        let addr = self
            .raft
            .read(|st| st.nodes.get(&leader).map(|n| n.raft_addr.clone()))
            .or_else(|| self.raft.status().leader.map(|l| l.raft_addr))
            .ok_or(ClusterError::Raft(hangar_raft::RaftError::NoLeader))?;
        let channel = self.raft.peer_channel(&addr)?;
        let mut client = LeaseServiceClient::new(channel);
        match client.renew(request).await {
            Ok(r) => Ok(r.into_inner().term),
            Err(status) => {
                self.raft.peer_failed(&addr, &status);
                Err(ClusterError::PeerRpc {
                    node: leader,
                    message: status.message().to_owned(),
                })
            }
        }
    }
}
