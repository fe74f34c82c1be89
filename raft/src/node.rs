//! [`RaftHandle`]: the one object the node uses — start, bootstrap, propose, read, membership.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hangar_proto::raft::v1 as pb;
use openraft::ChangeMembers;
use openraft::ReadPolicy;
use openraft::ServerState;
use openraft::SnapshotPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::Fatal;
use openraft::errors::ForwardToLeader;
use openraft::errors::InitializeError;
use openraft::errors::LinearizableReadError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use pb::raft_service_client::RaftServiceClient;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::RaftError;
use crate::network::APPEND_BUDGET_BYTES;
use crate::network::ForwardOp;
use crate::network::ForwardResult;
use crate::network::NetworkFactory;
use crate::network::PeerPool;
use crate::state::Command;
use crate::state::Response;
use crate::state::State;
use crate::store::SharedSm;
use crate::types::Proposal;
use crate::types::Raft;
use crate::types::TypeConfig;

/// How long `propose`, membership changes and linearizable reads keep trying (leader
/// elections and forwarding included) before giving up.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest encoded command accepted by [`RaftHandle::propose`].
pub const MAX_COMMAND_BYTES: usize = APPEND_BUDGET_BYTES - 64 * 1024;
/// How long `start` waits for the state machine to re-apply the committed log after a restart.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster member's addresses, stored in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` of the node's Raft/gRPC endpoint.
    pub raft_addr: String,
    /// `host:port` of the node's HTTP API (`/api`, `/mcp`).
    pub api_addr: String,
}

/// Configuration of one Raft node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    /// This node's id; stable across restarts, unique in the cluster.
    pub node_id: u64,
    /// Address the gRPC server binds (port 0 picks a free port; see [`RaftHandle::local_addr`]).
    pub raft_addr: SocketAddr,
    /// Raft address other nodes use to reach this one; empty = the bound address.
    pub advertise_addr: String,
    /// This node's HTTP API address (stored in the membership for request forwarding).
    pub api_addr: String,
    /// Directory of the RocksDB store (created if missing).
    pub data_dir: PathBuf,
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Minimum election timeout, ms.
    pub election_min_ms: u64,
    /// Maximum election timeout, ms.
    pub election_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one (0 = only on demand).
    pub snapshot_logs_since_last: u64,
    /// Log entries kept after a snapshot (the rest is purged).
    pub max_in_snapshot_log_to_keep: u64,
}

impl RaftConfig {
    /// A config with default timings (heartbeat 50 ms, elections 250–500 ms, snapshot every
    /// 5000 entries, keep 1000 entries after it).
    pub fn new(node_id: u64, raft_addr: SocketAddr, data_dir: impl Into<PathBuf>) -> RaftConfig {
        RaftConfig {
            node_id,
            raft_addr,
            advertise_addr: String::new(),
            api_addr: String::new(),
            data_dir: data_dir.into(),
            heartbeat_ms: 50,
            election_min_ms: 250,
            election_max_ms: 500,
            snapshot_logs_since_last: 5000,
            max_in_snapshot_log_to_keep: 1000,
        }
    }

    fn openraft_config(&self) -> Result<openraft::Config, RaftError> {
        let config = openraft::Config {
            cluster_name: "hangar".to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            snapshot_policy: if self.snapshot_logs_since_last == 0 {
                SnapshotPolicy::Never
            } else {
                SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last)
            },
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            snapshot_max_chunk_size: hangar_proto::SNAPSHOT_CHUNK_BYTES as u64,
            // Enough time to send a large snapshot over a slow link.
            install_snapshot_timeout: (self.election_max_ms * 10).max(5000),
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        config.validate().map_err(|e| RaftError::Start {
            message: format!("invalid Raft timings: {e}; heartbeat must be well below election_min_ms < election_max_ms"),
        })
    }
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Decides and replicates.
    Leader,
    /// Voter following a leader.
    Follower,
    /// Voter campaigning.
    Candidate,
    /// Receives the log, does not vote (also: not yet initialized).
    Learner,
    /// Raft stopped.
    Shutdown,
}

/// A point-in-time view of the cluster from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: u64,
    /// This node's role.
    pub role: Role,
    /// Current leader, if known.
    pub leader_id: Option<u64>,
    /// Current leader's addresses, if known.
    pub leader: Option<NodeInfo>,
    /// Current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last committed entry.
    pub committed_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Last index included in the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// Voters and their addresses (both configs while a joint change is in progress).
    pub voters: BTreeMap<u64, NodeInfo>,
    /// Learners and their addresses.
    pub learners: BTreeMap<u64, NodeInfo>,
    /// True while a joint-consensus membership change is in progress.
    pub joint: bool,
    /// On the leader: matched log index per follower/learner (`None` = nothing matched yet).
    pub replication: Option<BTreeMap<u64, Option<u64>>>,
    /// Why Raft stopped, if it did (storage failure or shutdown).
    pub fatal: Option<String>,
}

/// The Raft node internals shared by the handle and the gRPC service.
pub(crate) struct Core {
    pub(crate) raft: Raft,
    pub(crate) sm: Arc<SharedSm>,
    pub(crate) pool: PeerPool,
    pub(crate) node_id: u64,
    /// Set to true when the node shuts down; long-lived server streams end on it.
    pub(crate) stopping: watch::Sender<bool>,
}

fn fatal_err(e: &Fatal<TypeConfig>) -> RaftError {
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

    fn node_info(&self, id: u64) -> Option<NodeInfo> {
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

/// Outcome of one attempt to reach the leader.
enum Attempt<T> {
    Done(Result<T, RaftError>),
    /// Safe to retry (the leader did not act on it); carries the error to return at the deadline.
    Retry(RaftError),
}

/// True when a failed call provably never reached the server (connection not established).
fn not_sent(status: &tonic::Status) -> bool {
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        text.push(' ');
        text.push_str(&s.to_string().to_ascii_lowercase());
        source = s.source();
    }
    text.contains("connect") || text.contains("service was not ready")
}

/// Handle on this node's Raft: cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct RaftHandle {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    local: NodeInfo,
    local_addr: SocketAddr,
    leader_rx: watch::Receiver<Option<u64>>,
    server_shutdown: Mutex<Option<oneshot::Sender<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Observes when RocksDB is closed (every storage task dropped its handle).
    db_closed: watch::Receiver<()>,
    /// The store held a log or a snapshot when the node started.
    initialized_on_disk: bool,
}

impl RaftHandle {
    /// Open the store in `cfg.data_dir`, start Raft and serve gRPC on `cfg.raft_addr`.
    ///
    /// On restart this recovers the state (latest snapshot + committed log) before returning.
    /// It never initializes a cluster; see [`initialize_single`](Self::initialize_single).
    pub async fn start(cfg: RaftConfig) -> Result<RaftHandle, RaftError> {
        let config = Arc::new(cfg.openraft_config()?);
        let listener = tokio::net::TcpListener::bind(cfg.raft_addr)
            .await
            .map_err(|e| RaftError::Start {
                message: format!(
                    "cannot listen on {}: {e}; choose a free address for the Raft port",
                    cfg.raft_addr
                ),
            })?;
        let local_addr = listener.local_addr().map_err(|e| RaftError::Start {
            message: format!("cannot read the bound Raft address: {e}"),
        })?;
        let local = NodeInfo {
            raft_addr: if cfg.advertise_addr.is_empty() {
                local_addr.to_string()
            } else {
                cfg.advertise_addr.clone()
            },
            api_addr: cfg.api_addr.clone(),
        };
        let dir = cfg.data_dir.join("raft");
        let (log_store, sm) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| RaftError::Start {
                message: format!("cannot create data directory {}: {e}", dir.display()),
            })?;
            crate::store::open(&dir).map_err(|e| RaftError::Start {
                message: e.to_string(),
            })
        })
        .await
        .map_err(RaftError::internal)??;
        let shared = sm.shared();
        let db_closed = log_store.db().closed();
        // Entries committed before a restart are re-applied from the log; `start` waits for it.
        let start_err = |e: std::io::Error| RaftError::Start {
            message: format!("cannot read the Raft store: {e}"),
        };
        let mut reader = log_store.clone();
        let committed_before = openraft::storage::RaftLogStorage::read_committed(&mut reader)
            .await
            .map_err(start_err)?
            .map_or(0, |l| l.index);
        // Metrics are published asynchronously after `Raft::new`; remember what the disk says.
        let initialized_on_disk = openraft::storage::RaftLogStorage::get_log_state(&mut reader)
            .await
            .map_err(start_err)?
            .last_log_id
            .is_some()
            || shared.applied_index() > 0;
        drop(reader);
        let pool = PeerPool::default();
        let raft = openraft::Raft::new(
            cfg.node_id,
            config,
            NetworkFactory::new(pool.clone()),
            log_store,
            sm,
        )
        .await
        .map_err(|e| RaftError::Start {
            message: format!("openraft refused to start: {e}"),
        })?;
        let core = Arc::new(Core {
            raft,
            sm: shared,
            pool,
            node_id: cfg.node_id,
            stopping: watch::channel(false).0,
        });

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = {
            let core = core.clone();
            tokio::spawn(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = crate::network::serve(core, listener, shutdown).await {
                    tracing::error!(error = %e, "Raft gRPC server failed");
                }
            })
        };
        let (leader_tx, leader_rx) = watch::channel(None);
        let leader_task = {
            let mut metrics = core.raft.metrics();
            tokio::spawn(async move {
                loop {
                    let leader = metrics.borrow_watched().current_leader;
                    leader_tx.send_if_modified(|cur| {
                        let changed = *cur != leader;
                        *cur = leader;
                        changed
                    });
                    if metrics.changed().await.is_err() {
                        leader_tx.send_replace(None);
                        return;
                    }
                }
            })
        };
        let handle = RaftHandle {
            inner: Arc::new(Inner {
                core,
                local,
                local_addr,
                leader_rx,
                server_shutdown: Mutex::new(Some(stop_tx)),
                tasks: Mutex::new(vec![server, leader_task]),
                db_closed,
                initialized_on_disk,
            }),
        };
        let mut applied = handle.subscribe_applied();
        let recovered = tokio::time::timeout(
            RECOVERY_TIMEOUT,
            applied.wait_for(|a| *a >= committed_before),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !recovered {
            tracing::warn!(
                committed_before,
                applied = *applied.borrow(),
                "state machine did not re-apply the committed log in time; reads may be stale until it does"
            );
        }
        tracing::info!(node_id = cfg.node_id, addr = %local_addr, "Raft node started");
        Ok(handle)
    }

    /// The address the gRPC server is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's addresses as other members should record them.
    pub fn local_node_info(&self) -> NodeInfo {
        self.inner.local.clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.core.node_id
    }

    fn core(&self) -> &Core {
        &self.inner.core
    }

    /// Bootstrap a one-node cluster of this node. No-op when already initialized (restart).
    pub async fn initialize_single(&self) -> Result<(), RaftError> {
        let members = BTreeMap::from([(self.node_id(), self.local_node_info())]);
        self.initialize(members).await
    }

    /// Bootstrap a cluster with these voters; call once, on one node. No-op when this node is
    /// already initialized (restart).
    pub async fn initialize(&self, members: BTreeMap<u64, NodeInfo>) -> Result<(), RaftError> {
        if self.is_initialized() {
            return Ok(());
        }
        match self.core().raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(openraft::errors::RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(openraft::errors::RaftError::APIError(InitializeError::NotInMembers(e))) => {
                Err(RaftError::Membership {
                    message: format!("{e}; include this node in the initial members"),
                })
            }
            Err(openraft::errors::RaftError::Fatal(f)) => Err(fatal_err(&f)),
        }
    }

    /// True once this node has a log or a membership (bootstrapped or joined).
    pub fn is_initialized(&self) -> bool {
        if self.inner.initialized_on_disk {
            return true;
        }
        let m = self.core().raft.metrics();
        let m = m.borrow_watched();
        m.last_log_index.is_some() || m.membership_config.nodes().next().is_some()
    }

    /// Replicate a command and return `apply`'s response. On a follower the command is
    /// forwarded to the leader. Retries only when the leader provably did not receive it
    /// (no leader yet, leader changed, connection refused), for up to [`OPERATION_TIMEOUT`].
    pub async fn propose(&self, cmd: Command) -> Result<Response, RaftError> {
        let size = serde_json::to_vec(&cmd).map_err(RaftError::internal)?.len();
        if size > MAX_COMMAND_BYTES {
            return Err(RaftError::TooLarge {
                size,
                limit: MAX_COMMAND_BYTES,
            });
        }
        self.route(ForwardOp::Propose { cmd })
            .await?
            .ok_or_else(|| RaftError::internal("the leader returned no response for a proposal"))
    }

    /// Run `f` on the local applied state (bounded staleness, no network).
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        self.core().sm.read(f)
    }

    /// Run `f` on the local state after it caught up with the leader's commit index as of
    /// this call (ReadIndex; works on followers by asking the leader for the index).
    pub async fn linearizable_read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, RaftError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let index = self.read_index(deadline).await?;
        let mut applied = self.core().sm.subscribe();
        let wait = applied.wait_for(|a| *a >= index);
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(_)) => Ok(self.read(f)),
            Ok(Err(_)) => Err(RaftError::ShuttingDown),
            Err(_) => Err(RaftError::Timeout {
                what: format!("applying up to read index {index}"),
                after_ms: OPERATION_TIMEOUT.as_millis() as u64,
            }),
        }
    }

    /// A snapshot of the cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let m = self.core().raft.metrics();
        let m = m.borrow_watched();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let membership = m.membership_config.membership();
        let voter_ids: BTreeSet<u64> = membership.voter_ids().collect();
        let mut voters = BTreeMap::new();
        let mut learners = BTreeMap::new();
        for (id, info) in membership.nodes() {
            if voter_ids.contains(id) {
                voters.insert(*id, info.clone());
            } else {
                learners.insert(*id, info.clone());
            }
        }
        ClusterStatus {
            node_id: m.id,
            role,
            leader_id: m.current_leader,
            leader: m
                .current_leader
                .and_then(|l| membership.get_node(&l).cloned()),
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: m.local_committed.as_ref().map(|l| l.index),
            applied_index: m.last_applied.as_ref().map(|l| l.index),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index),
            purged_index: m.purged.as_ref().map(|l| l.index),
            voters,
            learners,
            joint: membership.get_joint_config().len() > 1,
            replication: m.replication.as_ref().map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                    .collect()
            }),
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }

    /// Watch the applied log index.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.core().sm.subscribe()
    }

    /// Watch the current leader id (`None` while unknown).
    pub fn leader_watch(&self) -> watch::Receiver<Option<u64>> {
        self.inner.leader_rx.clone()
    }

    /// Add a learner (forwarded to the leader). With `blocking`, wait until it caught up.
    pub async fn add_learner(
        &self,
        id: u64,
        info: NodeInfo,
        blocking: bool,
    ) -> Result<(), RaftError> {
        self.route(ForwardOp::AddLearner { id, info, blocking })
            .await
            .map(|_| ())
    }

    /// Make exactly `voters` the voters (they must be members already, e.g. learners); removed
    /// voters stay as learners until [`remove_node`](Self::remove_node).
    pub async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<(), RaftError> {
        self.route(ForwardOp::ChangeVoters { voters })
            .await
            .map(|_| ())
    }

    /// Remove a node (voter or learner) from the cluster. The removed node keeps running until
    /// it is shut down; shut it down.
    pub async fn remove_node(&self, id: u64) -> Result<(), RaftError> {
        self.route(ForwardOp::RemoveNode { id }).await.map(|_| ())
    }

    /// Ask the leader to hand leadership to voter `to` (returns once requested).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.route(ForwardOp::TransferLeader { to })
            .await
            .map(|_| ())
    }

    /// Build a snapshot of this node's state now and wait until it is recorded.
    pub async fn trigger_snapshot(&self) -> Result<(), RaftError> {
        let applied = self.core().sm.applied_index();
        self.core()
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| fatal_err(&e))?;
        self.wait_metric("snapshot", |s| s.snapshot_index.unwrap_or(0) >= applied)
            .await
    }

    /// Purge this node's log up to `upto` (only entries already in a snapshot are purged) and
    /// wait until that happened.
    pub async fn purge_log(&self, upto: u64) -> Result<(), RaftError> {
        self.core()
            .raft
            .trigger()
            .purge_log(upto)
            .await
            .map_err(|e| fatal_err(&e))?;
        self.wait_metric("log purge", |s| {
            let limit = upto.min(s.snapshot_index.unwrap_or(0));
            s.purged_index.unwrap_or(0) >= limit
        })
        .await
    }

    /// Stop Raft and the gRPC server. Other clones of the handle fail with `ShuttingDown` after.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.core().stopping.send_replace(true);
        if let Some(tx) = self.inner.server_shutdown.lock().take() {
            let _ = tx.send(());
        }
        let res = self.core().raft.shutdown().await;
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock());
        for mut task in tasks {
            // Graceful first; a peer that keeps a stream open must not block shutdown.
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("Raft server task did not stop in time; aborting it");
                task.abort();
            }
        }
        self.core().pool.clear();
        res.map_err(|e| RaftError::Internal {
            message: format!("Raft core task failed while shutting down: {e}"),
        })?;
        // openraft's storage tasks finish asynchronously; wait until the database is closed so
        // the data directory can be reopened as soon as this returns.
        let mut closed = self.inner.db_closed.clone();
        let wait = async { while closed.changed().await.is_ok() {} };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .map_err(|_| RaftError::Timeout {
                what: "closing the Raft store".to_string(),
                after_ms: 5000,
            })
    }

    async fn wait_metric(
        &self,
        what: &str,
        done: impl Fn(&ClusterStatus) -> bool,
    ) -> Result<(), RaftError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let mut metrics = self.core().raft.metrics();
        loop {
            let status = self.status();
            if done(&status) {
                return Ok(());
            }
            if status.role == Role::Shutdown {
                return Err(RaftError::ShuttingDown);
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RaftError::ShuttingDown),
                Err(_) => {
                    return Err(RaftError::Timeout {
                        what: what.to_string(),
                        after_ms: OPERATION_TIMEOUT.as_millis() as u64,
                    });
                }
            }
        }
    }

    /// Wait (until `deadline`) for the leader to change from `seen`, or a short backoff.
    async fn wait_leader_change(&self, seen: Option<u64>, deadline: Instant) {
        let mut rx = self.inner.leader_rx.clone();
        let wait = rx.wait_for(|l| *l != seen);
        let backoff = Instant::now() + Duration::from_millis(100);
        let _ = tokio::time::timeout_at(deadline.min(backoff), wait).await;
    }

    /// Run `op` on the leader, forwarding when this node is not the leader.
    async fn route(&self, op: ForwardOp) -> Result<Option<Response>, RaftError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        loop {
            let leader = *self.inner.leader_rx.borrow();
            let attempt = match leader {
                None => Attempt::Retry(RaftError::NoLeader),
                Some(id) if id == self.node_id() => {
                    match self.core().execute_local(op.clone()).await {
                        Err(e @ RaftError::NotLeader { .. }) => Attempt::Retry(e),
                        other => Attempt::Done(other),
                    }
                }
                Some(id) => self.forward(id, &op, deadline).await,
            };
            match attempt {
                Attempt::Done(result) => return result,
                Attempt::Retry(e) if Instant::now() >= deadline => {
                    return Err(match e {
                        e @ (RaftError::NoLeader | RaftError::Unreachable { .. }) => e,
                        other => {
                            tracing::debug!(error = %other, "giving up after retries");
                            RaftError::Timeout {
                                what: "reaching the leader".to_string(),
                                after_ms: OPERATION_TIMEOUT.as_millis() as u64,
                            }
                        }
                    });
                }
                Attempt::Retry(_) => self.wait_leader_change(leader, deadline).await,
            }
        }
    }

    fn leader_client(
        &self,
        leader: u64,
    ) -> Result<(RaftServiceClient<tonic::transport::Channel>, String), RaftError> {
        let info = self.core().node_info(leader).ok_or(RaftError::NoLeader)?;
        let client = self.core().pool.client(&info.raft_addr)?;
        Ok((client, info.raft_addr))
    }

    async fn forward(
        &self,
        leader: u64,
        op: &ForwardOp,
        deadline: Instant,
    ) -> Attempt<Option<Response>> {
        let (mut client, addr) = match self.leader_client(leader) {
            Ok(c) => c,
            Err(e) => return Attempt::Retry(e),
        };
        let bytes = match serde_json::to_vec(op) {
            Ok(b) => b,
            Err(e) => return Attempt::Done(Err(RaftError::internal(e))),
        };
        let mut req = tonic::Request::new(pb::ForwardRequest {
            format: pb::Format::Json as i32,
            op: bytes,
            from_node: self.node_id(),
        });
        req.set_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        let unreachable = |message: String| RaftError::Unreachable {
            node_id: leader,
            addr: addr.clone(),
            message,
        };
        let result = client.forward(req).await;
        if let Err(status) = &result {
            self.core().pool.invalidate(&addr, status);
        }
        match result {
            Ok(reply) => {
                let reply = reply.into_inner();
                match crate::network::decode_bytes::<ForwardResult>(reply.format, &reply.result) {
                    Ok(ForwardResult::Done { response }) => Attempt::Done(Ok(response)),
                    Ok(ForwardResult::Failed {
                        error:
                            e @ (RaftError::NotLeader { .. }
                            | RaftError::NoLeader
                            | RaftError::ShuttingDown),
                    }) => Attempt::Retry(e),
                    Ok(ForwardResult::Failed { error }) => Attempt::Done(Err(error)),
                    Ok(ForwardResult::ReadIndex { .. }) => Attempt::Done(Err(RaftError::internal(
                        "leader answered a forward with a read index",
                    ))),
                    Err(e) => Attempt::Done(Err(RaftError::internal(e))),
                }
            }
            Err(status) if not_sent(&status) => {
                Attempt::Retry(unreachable(status.message().to_string()))
            }
            Err(status) => match op {
                ForwardOp::Propose { .. } => Attempt::Done(Err(RaftError::OutcomeUnknown {
                    message: format!(
                        "forwarding to leader {leader} at {addr} failed: {}",
                        status.message()
                    ),
                })),
                _ => Attempt::Done(Err(unreachable(status.message().to_string()))),
            },
        }
    }

    /// The leader's read index (asked over gRPC when this node is a follower).
    async fn read_index(&self, deadline: Instant) -> Result<u64, RaftError> {
        loop {
            let leader = *self.inner.leader_rx.borrow();
            let result = match leader {
                None => Err(RaftError::NoLeader),
                Some(id) if id == self.node_id() => self.core().read_index_local().await,
                Some(id) => self.remote_read_index(id, deadline).await,
            };
            match result {
                Ok(index) => return Ok(index),
                Err(e) if !e.is_retryable() && !matches!(e, RaftError::ShuttingDown) => {
                    return Err(e);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => self.wait_leader_change(leader, deadline).await,
            }
        }
    }

    async fn remote_read_index(&self, leader: u64, deadline: Instant) -> Result<u64, RaftError> {
        let (mut client, addr) = self.leader_client(leader)?;
        let mut req = tonic::Request::new(pb::ReadIndexRequest {
            from_node: self.node_id(),
        });
        req.set_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        let reply = client
            .read_index(req)
            .await
            .inspect_err(|s| self.core().pool.invalidate(&addr, s))
            .map_err(|s| RaftError::Unreachable {
                node_id: leader,
                addr,
                message: s.message().to_string(),
            })?
            .into_inner();
        match crate::network::decode_bytes::<ForwardResult>(reply.format, &reply.result)
            .map_err(RaftError::internal)?
        {
            ForwardResult::ReadIndex { index } => Ok(index),
            ForwardResult::Failed { error } => Err(error),
            ForwardResult::Done { .. } => Err(RaftError::internal(
                "leader answered a read index with a write result",
            )),
        }
    }
}
