//! The quota exchange between the nodes and the leader: the gRPC `QuotaService` (the leader's
//! side, over the [`Allocator`]) and each node's report loop.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hangar_proto::node::v1 as pb;
use hangar_raft::RaftHandle;
use parking_lot::Mutex;
use pb::quota_service_client::QuotaServiceClient;
use pb::quota_service_server::{QuotaService, QuotaServiceServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::allocator::{Allocator, BucketReport, Grant, Report};
use super::{LEASE, REPORT_EVERY, RateLimits};
use crate::telemetry::events::DomainEvent;
use crate::upstream::lease::mono_now_ns;

/// The leader's side.
pub struct Quotas {
    limits: Arc<RateLimits>,
    allocator: Mutex<Allocator>,
    raft: OnceLock<RaftHandle>,
    /// A monotonic clock shared by the allocator's timestamps.
    origin: std::time::Instant,
}

impl Quotas {
    /// Allocate `limits`' rules; a node silent for `node_loss` counts as gone.
    pub fn new(limits: Arc<RateLimits>, node_loss: Duration) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            allocator: Mutex::new(Allocator::new(
                LEASE.as_nanos() as u64,
                node_loss.as_nanos() as u64,
            )),
            raft: OnceLock::new(),
            origin: std::time::Instant::now(),
        })
    }

    /// The gRPC service, to be served on the Raft listener; it refuses until
    /// [`attach`](Self::attach).
    pub fn service(self: &Arc<Self>) -> QuotaServiceServer<QuotaServer> {
        QuotaServiceServer::new(QuotaServer(self.clone()))
    }

    /// Grant through `raft` from now on.
    pub fn attach(&self, raft: RaftHandle) {
        let _ = self.raft.set(raft);
    }

    /// The node's rate limiter.
    pub fn limits(&self) -> &Arc<RateLimits> {
        &self.limits
    }

    /// Answer a report if this node leads (confirmed with a quorum first: a deposed leader
    /// grants nothing); returns the term and the grant.
    async fn grant(&self, report: Report) -> Result<(u64, Grant), Status> {
        let raft = self
            .raft
            .get()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let status = raft.status();
        if !status.voters.contains_key(&report.node) && !status.learners.contains_key(&report.node)
        {
            return Err(Status::failed_precondition(format!(
                "node {} is not a member",
                report.node
            )));
        }
        let term = raft
            .confirm_leadership()
            .await
            .map_err(|e| Status::failed_precondition(format!("not the leader: {e}")))?;
        let members: BTreeSet<u64> = status
            .voters
            .keys()
            .chain(status.learners.keys())
            .copied()
            .collect();
        let now = self.origin.elapsed().as_nanos() as u64;
        let grant = self
            .allocator
            .lock()
            .report(term, now, &members, report, |k| self.limits.limit_of(k));
        Ok((term, grant))
    }
}

/// The `QuotaService` gRPC server.
pub struct QuotaServer(Arc<Quotas>);

#[tonic::async_trait]
impl QuotaService for QuotaServer {
    async fn report(
        &self,
        request: Request<pb::QuotaReport>,
    ) -> Result<Response<pb::QuotaGrant>, Status> {
        let r = request.into_inner();
        let report = Report {
            node: r.node_id,
            acked: r.acked_seq,
            buckets: r
                .buckets
                .into_iter()
                .map(|b| BucketReport {
                    key: b.key,
                    demand: b.demand_rps,
                    holding: b.held.then_some(b.share_rps),
                    using: b.using_rps,
                })
                .collect(),
        };
        let (term, g) = self.0.grant(report).await?;
        Ok(Response::new(pb::QuotaGrant {
            term,
            seq: g.seq,
            shares: g
                .shares
                .into_iter()
                .map(|(key, share_rps)| pb::BucketShare { key, share_rps })
                .collect(),
        }))
    }
}

impl Quotas {
    /// Report this node's demand every [`REPORT_EVERY`] until `shutdown`, apply the grants,
    /// and say when the lease lapses or comes back (`emit`).
    pub async fn report_loop(
        self: Arc<Self>,
        node_id: u64,
        emit: impl Fn(DomainEvent) + Send + 'static,
        shutdown: CancellationToken,
    ) {
        let Some(raft) = self.raft.get().cloned() else {
            return;
        };
        let mut last = tokio::time::Instant::now();
        let mut last_error = String::new();
        let mut ack_now = false;
        loop {
            let started = tokio::time::Instant::now();
            // The definitions follow the replicated state in the cluster's applier.
            let limits = &self.limits;
            let status = raft.status();
            limits.set_members(status.voters.len() + status.learners.len());
            // Reported even without rules: the lease is then current when a rule appears.
            let report = if ack_now {
                limits.report(node_id, None)
            } else {
                let r = limits.report(node_id, Some(started - last));
                last = started;
                r
            };
            let resend = ack_now;
            ack_now = false;
            // Before sending: the leader's grant is provably later.
            let t0 = mono_now_ns();
            match tokio::time::timeout(REPORT_EVERY * 2, self.send(&raft, node_id, report)).await {
                Ok(Ok((term, grant))) => {
                    if term >= raft.status().term
                        && limits.apply_grant(&grant, t0.saturating_add(LEASE.as_nanos() as u64))
                        && !resend
                    {
                        // A lowered share is counted by the leader until acknowledged: say so
                        // at once, the freed rate goes to the nodes that need it.
                        ack_now = true;
                    }
                    last_error.clear();
                }
                Ok(Err(e)) => {
                    if e != last_error {
                        tracing::debug!(error = %e, "rate_limit_report_failed");
                        last_error = e;
                    }
                }
                Err(_) => tracing::debug!("rate_limit_report_timed_out"),
            }
            match limits.update_mode() {
                Some(true) => {
                    tracing::warn!(
                        lease_ms = LEASE.as_millis() as u64,
                        "rate_limit_partition_mode (no grant from a leader in time: each rule now applies its on_partition mode)"
                    );
                    emit(DomainEvent::RateLimitPartitionMode {
                        node_id: node_id.to_string(),
                        lease_ms: LEASE.as_millis() as u64,
                    });
                }
                Some(false) => {
                    tracing::info!("rate_limit_lease_restored");
                    emit(DomainEvent::RateLimitLeaseRestored {
                        node_id: node_id.to_string(),
                    });
                }
                None => {}
            }
            if ack_now {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(started + REPORT_EVERY) => {}
            }
        }
    }

    /// One report to the current leader (this node itself when it leads).
    async fn send(
        &self,
        raft: &RaftHandle,
        node_id: u64,
        report: Report,
    ) -> Result<(u64, Grant), String> {
        let leader = raft.status().leader_id.ok_or("no leader")?;
        if leader == node_id {
            return self.grant(report).await.map_err(|s| s.message().to_owned());
        }
        let addr = raft
            .read(|st| st.nodes.get(&leader).map(|n| n.raft_addr.clone()))
            .or_else(|| raft.status().leader.map(|l| l.raft_addr))
            .ok_or("the leader has no known address")?;
        let channel = raft.peer_channel(&addr).map_err(|e| e.to_string())?;
        let request = pb::QuotaReport {
            node_id,
            acked_seq: report.acked,
            buckets: report
                .buckets
                .into_iter()
                .map(|b| pb::BucketDemand {
                    key: b.key,
                    demand_rps: b.demand,
                    held: b.holding.is_some(),
                    share_rps: b.holding.unwrap_or(0.0),
                    using_rps: b.using,
                })
                .collect(),
        };
        match QuotaServiceClient::new(channel).report(request).await {
            Ok(r) => {
                let g = r.into_inner();
                Ok((
                    g.term,
                    Grant {
                        seq: g.seq,
                        shares: g.shares.into_iter().map(|s| (s.key, s.share_rps)).collect(),
                    },
                ))
            }
            Err(status) => {
                raft.peer_failed(&addr, &status);
                Err(status.message().to_owned())
            }
        }
    }
}
