//! The leader side: [`Core`], the node internals shared by the handle, the forwarding client
//! and the gRPC service, and [`Core::execute_local`], which runs a proposal, a membership
//! change or a leadership transfer on this node when it is the leader (a follower's request
//! arrives here through the `Forward` RPC).

use std::collections::BTreeSet;
use std::sync::Arc;

use openraft::ChangeMembers;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::Fatal;
use openraft::errors::ForwardToLeader;
use openraft::errors::LinearizableReadError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use tokio::sync::watch;

use crate::error::RaftError;
use crate::network::ForwardOp;
use crate::network::PeerPool;
use crate::state::Response;
use crate::store::SharedSm;
use crate::store::StateMachineStore;
use crate::typecfg::Proposal;
use crate::typecfg::TypeConfig;
use crate::types::NodeInfo;

/// This crate's openraft node.
pub(crate) type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

/// The Raft node internals shared by the handle, the forwarding client and the gRPC service.
pub(crate) struct Core {
    pub(crate) raft: Raft,
    pub(crate) sm: Arc<SharedSm>,
    pub(crate) pool: PeerPool,
    pub(crate) node_id: u64,
    /// Set to true when the node shuts down; long-lived server streams end on it.
    pub(crate) stopping: watch::Sender<bool>,
    /// Connections refused by mutual TLS.
    pub(crate) tls_refusals: Arc<std::sync::atomic::AtomicU64>,
}

/// openraft's fatal error as this crate's error.
pub(crate) fn fatal_err(e: &Fatal<TypeConfig>) -> RaftError {
    match e {
        Fatal::Stopped => RaftError::ShuttingDown,
        Fatal::Panicked => RaftError::Storage {
            message: "the Raft core panicked".to_string(),
        },
        Fatal::StorageError(s) => RaftError::Storage {
            message: s.to_string(),
        },
    }
}

fn not_leader(f: &ForwardToLeader<TypeConfig>) -> RaftError {
    RaftError::NotLeader {
        leader_id: f.leader_id,
        leader_api_addr: f.leader_node.as_ref().map(|n| n.api_addr.clone()),
    }
}

fn write_err(
    e: openraft::errors::RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> RaftError {
    match e {
        openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader(&f)
        }
        openraft::errors::RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
            RaftError::OutcomeUnknown {
                message: format!("the entry was discarded when leadership changed ({f})"),
            }
        }
        openraft::errors::RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            RaftError::Membership {
                message: m.to_string(),
            }
        }
        openraft::errors::RaftError::APIError(ClientWriteError::PreconditionFailed(p)) => {
            RaftError::Membership {
                message: p.to_string(),
            }
        }
        openraft::errors::RaftError::Fatal(f) => fatal_err(&f),
    }
}

impl Core {
    fn metrics(&self) -> openraft::RaftMetrics<TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// The addresses of member `id`, from the current membership.
    pub(crate) fn node_info(&self, id: u64) -> Option<NodeInfo> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .get_node(&id)
            .cloned()
    }

    /// Execute an operation on this node, which must be the leader (else `NotLeader`).
    pub(crate) async fn execute_local(&self, op: ForwardOp) -> Result<Option<Response>, RaftError> {
        match op {
            ForwardOp::Propose { cmd } => {
                let proposal = Proposal {
                    cmd,
                    at_ms: crate::types::now_ms(),
                };
                let resp = self.raft.client_write(proposal).await.map_err(write_err)?;
                Ok(Some(resp.data))
            }
            ForwardOp::AddLearner { id, info, blocking } => {
                self.raft
                    .add_learner(id, info, blocking)
                    .await
                    .map_err(write_err)?;
                Ok(None)
            }
            ForwardOp::ChangeVoters { voters } => {
                if voters.is_empty() {
                    return Err(RaftError::Membership {
                        message: "the voter set must not be empty".to_string(),
                    });
                }
                self.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                    .await
                    .map_err(write_err)?;
                Ok(None)
            }
            ForwardOp::RemoveNode { id } => {
                let m = self.metrics();
                let is_voter = m.membership_config.voter_ids().any(|v| v == id);
                if is_voter {
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_err)?;
                }
                let still_member = self
                    .metrics()
                    .membership_config
                    .nodes()
                    .any(|(node, _)| *node == id);
                if still_member {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_err)?;
                } else if !is_voter {
                    return Err(RaftError::Membership {
                        message: format!("node {id} is not a member of the cluster"),
                    });
                }
                Ok(None)
            }
            ForwardOp::TransferLeader { to } => {
                let m = self.metrics();
                if m.current_leader != Some(self.node_id) {
                    return Err(RaftError::NotLeader {
                        leader_id: m.current_leader,
                        leader_api_addr: m.current_leader.and_then(|l| {
                            m.membership_config.get_node(&l).map(|n| n.api_addr.clone())
                        }),
                    });
                }
                if !m.membership_config.voter_ids().any(|v| v == to) {
                    return Err(RaftError::Membership {
                        message: format!("node {to} is not a voter; only voters can lead"),
                    });
                }
                self.raft
                    .trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|e| fatal_err(&e))?;
                Ok(None)
            }
        }
    }

    /// On the leader: a read index that, once applied locally, makes a read linearizable.
    pub(crate) async fn read_index_local(&self) -> Result<u64, RaftError> {
        match self.raft.get_read_log_id(ReadPolicy::ReadIndex).await {
            Ok((read_log_id, _)) => Ok(read_log_id.index()),
            Err(openraft::errors::RaftError::APIError(LinearizableReadError::ForwardToLeader(
                f,
            ))) => Err(not_leader(&f)),
            Err(openraft::errors::RaftError::APIError(LinearizableReadError::QuorumNotEnough(
                _,
            ))) => Err(RaftError::NoLeader),
            Err(openraft::errors::RaftError::Fatal(f)) => Err(fatal_err(&f)),
        }
    }
}
