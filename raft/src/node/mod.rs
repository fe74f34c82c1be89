//! [`RaftHandle`]: the one object the node uses — start, bootstrap, propose, read, membership.
//!
//! * `executor` — the leader side: `Core` (the internals all three share) and what runs an
//!   operation on the leader;
//! * `forward` — the forwarding client: routes an operation to the leader, with retries;
//! * `service` — this node's gRPC service (peer messages, `Forward`, `ReadIndex`).

mod executor;
mod forward;
mod service;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::SnapshotPolicy;
use openraft::errors::InitializeError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::executor::Core;
use self::executor::fatal_err;
use self::forward::Forwarder;
pub use self::forward::OPERATION_TIMEOUT;
use crate::error::RaftError;
use crate::network::APPEND_BUDGET_BYTES;
use crate::network::ForwardOp;
use crate::network::NetworkFactory;
use crate::network::PeerPool;
use crate::state::Command;
use crate::state::Response;
use crate::state::State;
use crate::types::ClusterStatus;
use crate::types::NodeInfo;
use crate::types::Role;

/// Largest encoded command accepted by [`RaftHandle::propose`].
pub const MAX_COMMAND_BYTES: usize = APPEND_BUDGET_BYTES - 64 * 1024;
/// How long `start` waits for the state machine to re-apply the committed log after a restart.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Mutual TLS between the nodes (`None`: plaintext).
    pub tls: Option<crate::network::tls::PeerTls>,
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
            tls: None,
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

/// Handle on this node's Raft: cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct RaftHandle {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    /// Routes writes, membership changes and read-index requests to the leader.
    forward: Forwarder,
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
        Self::start_with(cfg, None).await
    }

    /// [`RaftHandle::start`], also serving `extra` gRPC services (the gateway's call
    /// forwarding) on the Raft listener.
    pub async fn start_with(
        cfg: RaftConfig,
        extra: Option<tonic::service::Routes>,
    ) -> Result<RaftHandle, RaftError> {
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
        let server_tls = match &cfg.tls {
            Some(t) => Some(
                t.server_config()
                    .map_err(|message| RaftError::Start { message })?,
            ),
            None => None,
        };
        let pool = PeerPool::new(
            cfg.tls.as_ref().map(|t| t.client_config()),
            cfg.raft_addr.ip(),
        );
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
            tls_refusals: Default::default(),
        });

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = {
            let core = core.clone();
            tokio::spawn(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = service::serve(core, listener, server_tls, extra, shutdown).await {
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
                forward: Forwarder::new(core.clone(), leader_rx.clone()),
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
        self.inner
            .forward
            .route(ForwardOp::Propose { cmd })
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
        let index = self.inner.forward.read_index(deadline).await?;
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

    /// On the leader: confirm with a quorum that this node still leads (a heartbeat round, as
    /// for a ReadIndex) and return its term. A deposed leader that has not heard of its
    /// successor fails here, so it cannot vouch for anything after it lost the majority.
    pub async fn confirm_leadership(&self) -> Result<u64, RaftError> {
        let term = self.status().term;
        self.core().read_index_local().await?;
        // The quorum confirmed `term` (a later term would have failed the round).
        Ok(term)
    }

    /// A gRPC channel to the node whose Raft address is `addr`, shared with Raft's own
    /// traffic (for the services served next to Raft, such as call forwarding).
    pub fn peer_channel(&self, addr: &str) -> Result<tonic::transport::Channel, RaftError> {
        self.core().pool.channel(addr)
    }

    /// Connect to the node whose Raft address is `addr` now, with the mutual-TLS handshake
    /// when `tls` is configured: fails unless it is reachable and holds a node certificate of
    /// this cluster's CA (checked before such a node is let into the membership).
    pub async fn probe_peer(&self, addr: &str) -> Result<(), RaftError> {
        self.core().pool.probe(addr).await
    }

    /// Connections to this node's Raft listener refused by mutual TLS so far.
    pub fn tls_refusals(&self) -> u64 {
        self.core()
            .tls_refusals
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A call on [`peer_channel`](Self::peer_channel) failed with `status`: drop the channel
    /// if the transport is broken, so the next call dials afresh.
    pub fn peer_failed(&self, addr: &str, status: &tonic::Status) {
        self.core().pool.invalidate(addr, status);
    }

    /// On the leader: for each other member, how long ago it last acknowledged a heartbeat
    /// or an append (`None` = not since this node became leader). `None` on a non-leader.
    pub fn peer_ack_ages(&self) -> Option<BTreeMap<u64, Option<Duration>>> {
        let m = self.core().raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader {
            return None;
        }
        m.heartbeat.as_ref().map(|h| {
            h.iter()
                .filter(|(id, _)| **id != self.core().node_id)
                .map(|(id, t)| (*id, t.as_ref().map(|t| openraft::Instant::elapsed(&**t))))
                .collect()
        })
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

    /// Resolves when the Raft core stopped on an error it cannot recover from (a storage
    /// failure such as a full disk): the reason. Never resolves while the core runs.
    pub async fn fatal(&self) -> String {
        let mut m = self.core().raft.metrics();
        loop {
            if let Err(e) = &m.borrow_and_update().running_state {
                return e.to_string();
            }
            if m.changed().await.is_err() {
                // The core is gone without saying why (it only drops its metrics when it
                // stops).
                return "the Raft core stopped".to_owned();
            }
        }
    }

    /// Watch the applied log index.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.core().sm.subscribe()
    }

    /// The index of the last entry applied to the local state (what [`read`](Self::read)
    /// sees at least).
    pub fn applied_index(&self) -> u64 {
        self.core().sm.applied_index()
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
        self.inner
            .forward
            .route(ForwardOp::AddLearner { id, info, blocking })
            .await
            .map(|_| ())
    }

    /// Make exactly `voters` the voters (they must be members already, e.g. learners); removed
    /// voters stay as learners until [`remove_node`](Self::remove_node).
    pub async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<(), RaftError> {
        self.inner
            .forward
            .route(ForwardOp::ChangeVoters { voters })
            .await
            .map(|_| ())
    }

    /// Remove a node (voter or learner) from the cluster. The removed node keeps running until
    /// it is shut down; shut it down.
    pub async fn remove_node(&self, id: u64) -> Result<(), RaftError> {
        self.inner
            .forward
            .route(ForwardOp::RemoveNode { id })
            .await
            .map(|_| ())
    }

    /// Ask the leader to hand leadership to voter `to` (returns once requested).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.inner
            .forward
            .route(ForwardOp::TransferLeader { to })
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
}
