//! Cluster room: this node's membership in the Raft cluster (boot, init, join), the one
//! handle through which the other rooms read the replicated state and propose changes, and
//! the loops that connect Raft to the node:
//!
//! * the **applier** turns the applied desired config into running servers (each node
//!   interpolates `${VAR}` with its own environment), installs catalogues learned elsewhere,
//!   and hands newly applied domain events to live subscribers;
//! * the **event flusher** batches domain events into `AppendEvents` entries (one Raft round
//!   trip per batch, never per event);
//! * the **catalogue publisher** replicates what an upstream offers once this node learned it.
//!
//! Its REST surface (`/api/cluster/*`) is the API room's; this room exposes typed methods
//! and a typed [`ClusterError`].

mod forward;
mod lease;
mod placement;

pub use forward::{CallServer, Forwarder};
pub use lease::{LeaseServer, Leases};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use hangar_raft::RejectCode;
use hangar_raft::state::{
    CatalogEntry as ReplicatedCatalog, ConfigSourceKind, EventRecord, RateLimitDef, StoredEvent,
};
use hangar_raft::{
    ClusterStatus, Command, NodeInfo, RaftConfig, RaftError, RaftHandle, Response, Role,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ClusterConfig, ConfigError, PeerSpec};
use crate::runtime::{Catalog, Runtime, RuntimeEvent};
use crate::telemetry::events::{DomainEvent, Event, EventBackend};

/// Most events one `AppendEvents` entry carries.
const EVENT_BATCH: usize = 512;
/// How often the flusher looks for pending events when not woken (and the first retry delay).
const EVENT_FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Events kept while the cluster cannot take them (oldest dropped beyond this, and counted).
const EVENT_QUEUE_CAP: usize = 100_000;

impl crate::auth::policy::PolicySource for Cluster {
    fn lookup(&self, keys: &[(&str, &str)]) -> Vec<hangar_raft::state::ToolPolicy> {
        self.raft.read(|st| {
            keys.iter()
                .filter_map(|(scope, target)| st.policy(scope, target).cloned())
                .collect()
        })
    }

    fn any(&self) -> bool {
        self.raft.read(|st| !st.policies.is_empty())
    }

    fn key_principal(&self, key_id: &str) -> Option<String> {
        self.raft
            .read(|st| st.keys.get(key_id).map(|k| k.principal.clone()))
    }
}

impl crate::auth::KeyStore for Cluster {
    fn version(&self) -> u64 {
        self.raft.read(|st| st.auth_version)
    }

    fn roles_of(&self, principal: &str) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
        self.raft.read(|st| {
            let roles = st
                .role_assignments
                .get(principal)
                .cloned()
                .unwrap_or_default();
            let custom = roles
                .iter()
                .filter_map(|r| st.roles.get(r).map(|d| (r.clone(), d.permissions.clone())))
                .collect();
            (roles, custom)
        })
    }

    fn scoped_roles_of(
        &self,
        principal: &str,
    ) -> (
        BTreeMap<String, BTreeSet<String>>,
        BTreeMap<String, BTreeSet<String>>,
    ) {
        self.raft.read(|st| {
            let scoped = st
                .scoped_role_assignments
                .get(principal)
                .cloned()
                .unwrap_or_default();
            let custom = scoped
                .values()
                .flatten()
                .filter_map(|r| st.roles.get(r).map(|d| (r.clone(), d.permissions.clone())))
                .collect();
            (scoped, custom)
        })
    }

    fn catch_up(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move { self.raft.linearizable_read(|_| ()).await.is_ok() })
    }

    fn find(&self, sha256_hex: &str) -> Option<hangar_raft::state::ApiKeyRecord> {
        self.raft.read(|st| {
            st.keys
                .values()
                .find(|k| crate::auth::constant_time_eq(&k.sha256_hex, sha256_hex))
                .cloned()
        })
    }
}

/// Errors of cluster operations, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Raft could not do it (no leader, timeout, membership refused…).
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The replicated state refused the command.
    #[error("{message}")]
    Rejected {
        /// Stable code (`server_exists`, `server_not_found`, `version_mismatch`, …).
        code: RejectCode,
        /// Why.
        message: String,
    },
    /// The resulting configuration would be invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// This node did not apply the change locally in time.
    #[error(
        "the change was committed but this node has not applied it within {0:?}; it will shortly — re-read to confirm"
    )]
    ApplyTimeout(Duration),
    /// `init` on a node that already has cluster data.
    #[error("this node is already part of an initialized cluster; use `hangarctl cluster status`")]
    AlreadyInitialized,
    /// `promote` of a node that is not a learner.
    #[error(
        "node {0} is not a learner of this cluster; add it first (hangarctl cluster add-learner)"
    )]
    NotALearner(u64),
    /// `remove` of a node that is not a member.
    #[error("node {0} is not a member of this cluster")]
    NotAMember(u64),
    /// `remove` of the only voter.
    #[error("cannot remove the last voter")]
    LastVoter,
    /// A read-modify-write kept losing the compare-and-set race.
    #[error("'{id}' kept changing while being edited; retry")]
    Contended {
        /// The server or group.
        id: String,
    },
    /// A peer node could not be reached.
    #[error("cannot reach {url}: {source}")]
    PeerUnreachable {
        /// What was called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A peer node's gRPC service refused or could not be reached.
    #[error("node {node}: {message}")]
    PeerRpc {
        /// The node called.
        node: u64,
        /// What went wrong.
        message: String,
    },
    /// A peer node refused.
    #[error("{url} answered {status}: {message}")]
    PeerRefused {
        /// What was called.
        url: String,
        /// Its HTTP status.
        status: u16,
        /// Its error class, when it sent one.
        code: Option<String>,
        /// Its message (or the start of its body).
        message: String,
    },
}

/// Why the cluster machinery of this node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `cluster.raft_addr` is not an address.
    #[error("cluster.raft_addr `{0}` is not IP:PORT (e.g. 127.0.0.1:7400)")]
    RaftAddr(String),
    /// The data directory cannot be created.
    #[error(
        "cannot create the data directory {}: {source}; choose another with --data-dir or cluster.data_dir",
        dir.display()
    )]
    DataDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Raft did not start on that directory.
    #[error("cannot start Raft with data directory {}: {source}", dir.display())]
    Raft {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: RaftError,
    },
    /// No HTTP client for peers.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(reqwest::Error),
    /// A `cluster.tls` file cannot be read.
    #[error("cannot read {key} {}: {source}", file.display())]
    TlsFile {
        /// The config key.
        key: &'static str,
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why this node does not serve yet (`/health/ready`, `/api/cluster/status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Raft stopped.
    #[error("Raft stopped: {0}")]
    RaftStopped(String),
    /// Not initialized and not joined.
    #[error(
        "this node is not part of a cluster yet (run `hangarctl cluster init` or `cluster join`)"
    )]
    NotInitialized,
    /// No leader known.
    #[error("no Raft leader is known (election in progress or no quorum)")]
    NoLeader,
    /// Too far behind the commit index.
    #[error("this node lags {lag} entries behind the commit index (limit {limit})")]
    Lagging {
        /// Entries behind.
        lag: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The replicated config is not running here yet.
    #[error("applying config version {want} (running {running})")]
    Applying {
        /// The replicated version.
        want: u64,
        /// The version this node runs.
        running: u64,
    },
}

/// One member's own report of its Raft indexes (`GET /api/cluster/status?local=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReport {
    /// The member.
    pub node_id: u64,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: u64,
    /// Its last log index.
    pub last_log_index: Option<u64>,
    /// Its commit index.
    pub committed_index: Option<u64>,
    /// Its applied index.
    pub applied_index: Option<u64>,
    /// Whether it serves.
    pub ready: bool,
}

/// A peer's refusal as its API sends it (`{"error": {"code", "message"}}`).
#[derive(Deserialize)]
struct PeerRefusal {
    error: PeerRefusalBody,
}

#[derive(Deserialize)]
struct PeerRefusalBody {
    code: Option<String>,
    message: String,
}

/// An edit of a group's member list (see [`Cluster::edit_group_members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEdit {
    /// Append a member.
    Add {
        /// The member server.
        id: String,
        /// Its weight.
        weight: u32,
        /// Its priority.
        priority: u32,
    },
    /// Remove a member.
    Remove {
        /// The member server.
        id: String,
    },
}

/// How this node's REST API is reached, and how it reaches the other members' (join,
/// status).
#[derive(Debug, Default)]
pub struct PeerHttp {
    /// This node serves HTTPS (`server.tls`): its advertised API address is `https://…`
    /// (unless `cluster.api_advertise_addr` names a scheme itself).
    pub https: bool,
    /// TLS of calls to members' HTTPS API (trusted CA, this node's client certificate);
    /// `None`: the system's roots.
    pub tls: Option<rustls::ClientConfig>,
}

/// The base URL of a member's API address: `host:port` is plain HTTP, an address with a
/// scheme (`https://host:port`, what a member with `server.tls` advertises) is taken as is.
pub fn api_url(api_addr: &str) -> String {
    if api_addr.starts_with("http://") || api_addr.starts_with("https://") {
        api_addr.trim_end_matches('/').to_owned()
    } else {
        format!("http://{api_addr}")
    }
}

/// This node in the cluster.
pub struct Cluster {
    raft: RaftHandle,
    cfg: ClusterConfig,
    api_addr: String,
    node_name: String,
    /// Config version the local runtime runs (set by the applier).
    applied_version: watch::Sender<u64>,
    /// Why the last replicated config could not be applied here, if it could not.
    apply_error: Mutex<Option<String>>,
    pending_events: Mutex<VecDeque<Event>>,
    dropped_events: std::sync::atomic::AtomicU64,
    /// Events taken from the queue whose `AppendEvents` has not returned yet.
    in_flight_events: std::sync::atomic::AtomicUsize,
    events_notify: Notify,
    http: reqwest::Client,
    shutdown: CancellationToken,
    /// Ends the placement lease renewals: once the runtime stopped (see [`Cluster::shutdown`]).
    lease_end: CancellationToken,
    /// The host side of call forwarding, served on the Raft listener.
    calls: Arc<CallServer>,
    /// Placement leases: the renewals this node granted while leading.
    leases: Arc<Leases>,
    /// Cluster-wide rate limits: this node's limiter and, while it leads, the allocator.
    quotas: Arc<crate::ratelimit::service::Quotas>,
    /// The API key this node sends to other members' REST API (join, status) when they
    /// require one: `auth.api_key.bootstrap_key`.
    peer_key: Mutex<Option<crate::config::Secret>>,
    /// Placements up to this log index are in effect in the local runtime.
    placements_applied: std::sync::atomic::AtomicU64,
    /// The replicated configuration was applied here once (the node finished starting).
    started: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Open the Raft store in `data_dir` and start the gRPC server. Nothing is initialized
    /// here; see [`boot`](Self::boot).
    pub async fn start(
        cfg: ClusterConfig,
        api_addr: SocketAddr,
        peer: PeerHttp,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, StartError> {
        let raft_addr: SocketAddr = cfg
            .raft_addr
            .parse()
            .map_err(|_| StartError::RaftAddr(cfg.raft_addr.clone()))?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| StartError::DataDir {
            dir: cfg.data_dir.clone(),
            source,
        })?;
        let mut api_addr = cfg
            .api_advertise_addr
            .clone()
            .unwrap_or_else(|| api_addr.to_string());
        if peer.https && !api_addr.contains("://") {
            api_addr = format!("https://{api_addr}");
        }
        let mut rc = RaftConfig::new(cfg.node_id, raft_addr, cfg.data_dir.join("raft"));
        rc.advertise_addr = cfg.advertise_addr.clone().unwrap_or_default();
        rc.api_addr = api_addr.clone();
        rc.heartbeat_ms = cfg.heartbeat_ms;
        rc.election_min_ms = cfg.election_min_ms;
        rc.election_max_ms = cfg.election_max_ms;
        rc.snapshot_logs_since_last = cfg.snapshot_every;
        rc.max_in_snapshot_log_to_keep = cfg.keep_logs;
        if let Some(t) = &cfg.tls {
            let read = |key: &'static str, file: &std::path::Path| {
                std::fs::read(file).map_err(|source| StartError::TlsFile {
                    key,
                    file: file.to_owned(),
                    source,
                })
            };
            rc.tls = Some(hangar_raft::PeerTls {
                ca_pem: read("cluster.tls.ca_file", &t.ca_file)?,
                cert_pem: read("cluster.tls.cert_file", &t.cert_file)?,
                key_pem: read("cluster.tls.key_file", &t.key_file)?,
                server_name: t.server_name.clone(),
            });
        }
        let calls = Arc::new(CallServer::default());
        let leases = Arc::new(Leases::default());
        let quotas = crate::ratelimit::service::Quotas::new(
            Arc::new(crate::ratelimit::RateLimits::new()),
            cfg.node_loss_timeout,
        );
        let routes = calls
            .routes()
            .add_service(leases.service())
            .add_service(quotas.service());
        let raft = RaftHandle::start_with(rc, Some(routes))
            .await
            .map_err(|source| StartError::Raft {
                dir: cfg.data_dir.clone(),
                source,
            })?;
        leases.attach(raft.clone());
        quotas.attach(raft.clone());
        tracing::info!(node_id = cfg.node_id, raft_addr = %raft.local_addr(), data_dir = %cfg.data_dir.display(), "raft_started");
        let (applied_version, _) = watch::channel(0);
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(tls) = peer.tls {
            http = http.tls_backend_preconfigured(tls);
        }
        let http = http.build().map_err(StartError::HttpClient)?;
        Ok(Arc::new(Cluster {
            raft,
            node_name: cfg.node_id.to_string(),
            cfg,
            api_addr,
            applied_version,
            apply_error: Mutex::new(None),
            pending_events: Mutex::new(VecDeque::new()),
            dropped_events: std::sync::atomic::AtomicU64::new(0),
            in_flight_events: std::sync::atomic::AtomicUsize::new(0),
            events_notify: Notify::new(),
            http,
            shutdown,
            lease_end: CancellationToken::new(),
            calls,
            leases,
            quotas,
            peer_key: Mutex::new(None),
            placements_applied: std::sync::atomic::AtomicU64::new(0),
            started: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// This node's rate limiter (cluster-wide limits).
    pub fn rate_limits(&self) -> &Arc<crate::ratelimit::RateLimits> {
        self.quotas.limits()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// This node's id as text (`produced_by` of events, relayed request ids).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The cluster settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The Raft handle.
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// This node's addresses as stored in the membership.
    pub fn node_info(&self) -> NodeInfo {
        self.raft.local_node_info()
    }

    /// Raft status as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        self.raft.status()
    }

    /// Whether this node can serve: it knows a leader, its state is close to the commit
    /// index, and it runs the replicated config version.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let s = self.raft.status();
        if let Some(f) = &s.fatal {
            return Err(NotReady::RaftStopped(f.clone()));
        }
        if !self.raft.is_initialized() {
            return Err(NotReady::NotInitialized);
        }
        if s.leader_id.is_none() {
            return Err(NotReady::NoLeader);
        }
        let lag = s
            .committed_index
            .unwrap_or(0)
            .saturating_sub(s.applied_index.unwrap_or(0));
        if lag > self.cfg.max_ready_lag {
            return Err(NotReady::Lagging {
                lag,
                limit: self.cfg.max_ready_lag,
            });
        }
        let want = self.raft.read(|st| st.config_version);
        let running = *self.applied_version.borrow();
        if running < want {
            return Err(NotReady::Applying { want, running });
        }
        Ok(())
    }

    /// Whether the node finished starting: it joined a cluster and ran the replicated
    /// configuration once.
    pub fn startup_complete(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's own report of its indexes.
    pub fn local_report(&self) -> LocalReport {
        let s = self.status();
        LocalReport {
            node_id: s.node_id,
            role: s.role,
            term: s.term,
            last_log_index: s.last_log_index,
            committed_index: s.committed_index,
            applied_index: s.applied_index,
            ready: self.readiness().is_ok(),
        }
    }

    /// A member's own report (this node's without a call), `None` when it did not answer
    /// within `within`.
    pub async fn member_report(
        &self,
        id: u64,
        info: &NodeInfo,
        within: Duration,
    ) -> Option<LocalReport> {
        if id == self.node_id() {
            return Some(self.local_report());
        }
        // The membership's address, with the scheme the member registered last (it may have
        // turned HTTPS on or off since it joined).
        let bare = |a: &str| api_url(a).split_once("://").map(|(_, r)| r.to_owned());
        let addr = self
            .raft
            .read(|st| st.nodes.get(&id).map(|n| n.api_addr.clone()))
            .filter(|r| bare(r) == bare(&info.api_addr))
            .unwrap_or_else(|| info.api_addr.clone());
        let url = format!("{}/api/cluster/status?local=true", api_url(&addr));
        let r = self
            .with_peer_key(self.http.get(&url))
            .timeout(within)
            .send()
            .await
            .ok()?;
        serde_json::from_str(&r.text().await.ok()?).ok()
    }

    /// Why the replicated config could not be applied on this node, if so.
    pub fn apply_error(&self) -> Option<String> {
        self.apply_error.lock().clone()
    }

    // ------------------------------------------------------------------ membership

    /// Initialize the cluster if this node has no data yet, as configured: join through
    /// seeds, bootstrap with static peers (the lowest id does it), or alone.
    pub async fn boot(self: &Arc<Self>) -> Result<(), RaftError> {
        if self.raft.is_initialized() {
            return Ok(());
        }
        if !self.cfg.join.is_empty() {
            let me = self.clone();
            tokio::spawn(async move { me.join_loop().await });
            return Ok(());
        }
        if !self.cfg.peers.is_empty() {
            let lowest = self
                .cfg
                .peers
                .iter()
                .map(|p| p.node_id)
                .chain([self.cfg.node_id])
                .min()
                .unwrap_or(self.cfg.node_id);
            if lowest == self.cfg.node_id {
                let mut members = BTreeMap::new();
                for p in &self.cfg.peers {
                    members.insert(
                        p.node_id,
                        NodeInfo {
                            raft_addr: p.raft_addr.clone(),
                            api_addr: p.api_addr.clone(),
                        },
                    );
                }
                members.insert(self.cfg.node_id, self.node_info());
                self.raft.initialize(members).await?;
                self.wait_leader(Duration::from_secs(10)).await;
                tracing::info!("cluster_initialized_from_peers");
            }
            return Ok(());
        }
        if self.cfg.bootstrap {
            self.raft.initialize_single().await?;
            self.wait_leader(Duration::from_secs(10)).await;
            tracing::info!("single_node_cluster_initialized");
        } else {
            tracing::info!(
                "waiting to be added to a cluster (hangarctl cluster init / cluster join)"
            );
        }
        Ok(())
    }

    /// Wait (bounded) until a leader is known.
    async fn wait_leader(&self, within: Duration) {
        let mut leader = self.raft.leader_watch();
        let _ = tokio::time::timeout(within, leader.wait_for(Option::is_some)).await;
    }

    async fn join_loop(self: Arc<Self>) {
        let mut delay = Duration::from_millis(200);
        loop {
            for seed in &self.cfg.join {
                if self.raft.is_initialized() {
                    return;
                }
                match self.join_via(seed, true).await {
                    Ok(()) => {
                        tracing::info!(seed, "joined_cluster");
                        return;
                    }
                    Err(e) => tracing::warn!(seed, error = %e, "join_attempt_failed"),
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Ask the member at `seed` (an API URL) to add this node (as a voter or a learner).
    pub async fn join_via(&self, seed: &str, voter: bool) -> Result<(), ClusterError> {
        let info = self.node_info();
        let url = format!("{}/api/cluster/members", seed.trim_end_matches('/'));
        let body = json!({"node_id": self.cfg.node_id, "raft_addr": info.raft_addr,
            "api_addr": info.api_addr, "role": if voter { "voter" } else { "learner" }});
        let resp = self
            .with_peer_key(self.http.post(&url))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|source| ClusterError::PeerUnreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<PeerRefusal>(&text) {
            Ok(r) => (r.error.code, r.error.message),
            Err(_) => (None, text.chars().take(500).collect()),
        };
        Err(ClusterError::PeerRefused {
            url,
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Initialize a new cluster on this node: alone, or with the given members.
    pub async fn init(&self, members: &[PeerSpec]) -> Result<(), ClusterError> {
        if self.raft.is_initialized() {
            return Err(ClusterError::AlreadyInitialized);
        }
        if members.is_empty() {
            self.raft.initialize_single().await?;
        } else {
            let mut m: BTreeMap<u64, NodeInfo> = members
                .iter()
                .map(|p| {
                    (
                        p.node_id,
                        NodeInfo {
                            raft_addr: p.raft_addr.clone(),
                            api_addr: p.api_addr.clone(),
                        },
                    )
                })
                .collect();
            m.insert(self.cfg.node_id, self.node_info());
            self.raft.initialize(m).await?;
        }
        // Return once a leader is elected and the initial membership is committed, so the
        // next membership change (a join) is accepted.
        let settled = async {
            let mut leader = self.raft.leader_watch();
            let _ = leader.wait_for(Option::is_some).await;
            loop {
                let s = self.raft.status();
                if s.committed_index.is_some() && s.committed_index >= s.last_log_index {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), settled).await;
        Ok(())
    }

    /// Run a membership change, retrying while another change is still in progress.
    async fn membership<F, Fut>(&self, mut op: F) -> Result<(), ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), RaftError>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match op().await {
                Err(RaftError::Membership { message })
                    if message.contains("undergoing") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other.map_err(ClusterError::from),
            }
        }
    }

    /// Add a node: as a learner (waiting until it caught up), then, for a voter, promote it.
    pub async fn add_member(&self, peer: &PeerSpec, voter: bool) -> Result<(), ClusterError> {
        let info = NodeInfo {
            raft_addr: peer.raft_addr.clone(),
            api_addr: peer.api_addr.clone(),
        };
        let s = self.raft.status();
        let known = s
            .voters
            .get(&peer.node_id)
            .or(s.learners.get(&peer.node_id));
        if known != Some(&info) {
            if self.cfg.tls.is_some() {
                // With mutual TLS, a node is let in only once it showed a node certificate of
                // this cluster's CA (a membership change to a node nobody can talk to would
                // stay in the configuration).
                self.raft.probe_peer(&peer.raft_addr).await.map_err(|e| {
                    ClusterError::PeerRpc {
                        node: peer.node_id,
                        message: format!(
                            "not added: its Raft address does not complete a mutual-TLS handshake with a node certificate of this cluster's CA ({e})"
                        ),
                    }
                })?;
            }
            self.membership(|| self.raft.add_learner(peer.node_id, info.clone(), true))
                .await?;
        }
        if voter {
            self.promote(peer.node_id).await?;
        }
        Ok(())
    }

    /// Make a learner a voter.
    pub async fn promote(&self, id: u64) -> Result<(), ClusterError> {
        let s = self.raft.status();
        if s.voters.contains_key(&id) {
            return Ok(());
        }
        if !s.learners.contains_key(&id) {
            return Err(ClusterError::NotALearner(id));
        }
        let mut voters: BTreeSet<u64> = s.voters.keys().copied().collect();
        voters.insert(id);
        self.membership(|| self.raft.change_voters(voters.clone()))
            .await
    }

    /// Remove a node (demoting it first if it votes).
    pub async fn remove_member(&self, id: u64) -> Result<(), ClusterError> {
        let s = self.raft.status();
        if !s.voters.contains_key(&id) && !s.learners.contains_key(&id) {
            return Err(ClusterError::NotAMember(id));
        }
        if s.voters.contains_key(&id) {
            let voters: BTreeSet<u64> = s.voters.keys().copied().filter(|v| *v != id).collect();
            if voters.is_empty() {
                return Err(ClusterError::LastVoter);
            }
            self.membership(|| self.raft.change_voters(voters.clone()))
                .await?;
        }
        self.membership(|| self.raft.remove_node(id)).await?;
        let _ = self.propose(Command::UnregisterNode { node_id: id }).await;
        Ok(())
    }

    // ------------------------------------------------------------------ writes

    /// Replicate a command; a refusal of `apply` becomes [`ClusterError::Rejected`].
    pub async fn propose(&self, cmd: Command) -> Result<Response, ClusterError> {
        match self.raft.propose(cmd).await? {
            Response::Rejected { code, message } => Err(ClusterError::Rejected { code, message }),
            other => Ok(other),
        }
    }

    /// Wait until the local runtime runs config version `v` (or a later one).
    pub async fn wait_applied(&self, v: u64) -> Result<(), ClusterError> {
        let mut rx = self.applied_version.subscribe();
        let limit = Duration::from_secs(15);
        match tokio::time::timeout(limit, rx.wait_for(|have| *have >= v)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClusterError::ApplyTimeout(limit)),
        }
    }

    fn version_of(r: &Response) -> Option<u64> {
        match r {
            Response::ConfigApplied { config_version, .. }
            | Response::ServerChanged { config_version } => Some(*config_version),
            _ => None,
        }
    }

    /// Validate the desired servers as they would be after replacing the servers of
    /// `kind` with `servers` (so a file cannot remove a server an API group still uses).
    fn validate_merged(
        &self,
        replace_kind: Option<ConfigSourceKind>,
        changes: &BTreeMap<String, Option<(Value, bool)>>,
    ) -> Result<(), ClusterError> {
        let mut entries: BTreeMap<String, (Value, bool)> = self.raft.read(|st| {
            st.servers
                .iter()
                .filter(|(_, r)| Some(r.source.kind()) != replace_kind)
                .map(|(id, r)| {
                    (
                        id.clone(),
                        (r.spec.clone(), r.source.kind() == ConfigSourceKind::File),
                    )
                })
                .collect()
        });
        for (id, ch) in changes {
            match ch {
                Some(v) => {
                    entries.insert(id.clone(), v.clone());
                }
                None => {
                    entries.remove(id);
                }
            }
        }
        let list: Vec<(String, Value, bool)> =
            entries.into_iter().map(|(k, (v, i))| (k, v, i)).collect();
        config::servers_from_raw(&list, &|k| std::env::var(k).ok())?;
        Ok(())
    }

    /// Make `raw` (the `mcp_servers` of a config file, before interpolation) the desired
    /// file-sourced servers of the cluster, and wait until this node runs them.
    pub async fn apply_file_config(
        &self,
        raw: &BTreeMap<String, Value>,
        limits: &[RateLimitDef],
        file_hash: &str,
    ) -> Result<Response, ClusterError> {
        let changes = raw
            .iter()
            .map(|(k, v)| (k.clone(), Some((v.clone(), true))))
            .collect();
        self.validate_merged(Some(ConfigSourceKind::File), &changes)?;
        let replicated: Vec<RateLimitDef> = self.raft.read(|st| {
            st.limits
                .values()
                .filter(|l| l.source == "file")
                .cloned()
                .collect()
        });
        let mut wanted = limits.to_vec();
        wanted.sort_by(|a, b| a.id.cmp(&b.id));
        if replicated != wanted {
            self.propose(Command::SetFileRateLimits { limits: wanted })
                .await?;
        }
        let r = self
            .propose(Command::SetDesiredConfig {
                servers: raw.clone(),
                source: ConfigSourceKind::File,
                file_hash: Some(file_hash.to_owned()),
            })
            .await?;
        if let Some(v) = Self::version_of(&r) {
            self.wait_applied(v).await?;
        }
        Ok(r)
    }

    /// Create or replace one server or group from the API (taken literally, no `${VAR}`).
    pub async fn put_server(
        &self,
        id: &str,
        spec: Value,
        create_only: bool,
        if_version: Option<u64>,
    ) -> Result<(), ClusterError> {
        let changes = BTreeMap::from([(id.to_owned(), Some((spec.clone(), false)))]);
        self.validate_merged(None, &changes)?;
        let r = self
            .propose(Command::PutServer {
                id: id.to_owned(),
                spec,
                source: ConfigSourceKind::Api,
                file_hash: None,
                create_only,
                if_version,
            })
            .await?;
        if let Some(v) = Self::version_of(&r) {
            self.wait_applied(v).await?;
        }
        Ok(())
    }

    /// Delete one server or group.
    pub async fn delete_server(&self, id: &str) -> Result<(), ClusterError> {
        let changes = BTreeMap::from([(id.to_owned(), None)]);
        self.validate_merged(None, &changes)?;
        let r = self
            .propose(Command::DeleteServer { id: id.to_owned() })
            .await?;
        if let Some(v) = Self::version_of(&r) {
            self.wait_applied(v).await?;
        }
        Ok(())
    }

    /// The replicated definition of a server: (raw spec, config version, source).
    pub fn server_record(&self, id: &str) -> Option<(Value, u64, String)> {
        self.raft.read(|st| {
            st.servers
                .get(id)
                .map(|r| (r.spec.clone(), r.config_version, r.source.to_string()))
        })
    }

    /// Like [`server_record`](Self::server_record), after catching up with the leader's
    /// commit index (ReadIndex), for read-modify-write cycles.
    pub async fn server_record_linearizable(
        &self,
        id: &str,
    ) -> Result<Option<(Value, u64, String)>, ClusterError> {
        Ok(self
            .raft
            .linearizable_read(|st| {
                st.servers
                    .get(id)
                    .map(|r| (r.spec.clone(), r.config_version, r.source.to_string()))
            })
            .await?)
    }

    /// Change a group's member list in its replicated definition: read the latest committed
    /// definition (ReadIndex, not a possibly stale copy), edit it, write it back with a
    /// compare-and-set on its config version, and retry a few times, so that concurrent edits
    /// on different nodes cannot lose each other.
    pub async fn edit_group_members(
        &self,
        id: &str,
        edit: &MemberEdit,
    ) -> Result<(), ClusterError> {
        for _ in 0..5 {
            let Some((mut raw, version, _)) = self.server_record_linearizable(id).await? else {
                return Err(ClusterError::Rejected {
                    code: RejectCode::ServerNotFound,
                    message: format!("group '{id}' is not defined"),
                });
            };
            let mut members = raw
                .get("members")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match edit {
                MemberEdit::Add {
                    id: member,
                    weight,
                    priority,
                } => members.push(json!({"id": member, "weight": weight, "priority": priority})),
                MemberEdit::Remove { id: member } => {
                    members.retain(|m| m.get("id").and_then(Value::as_str) != Some(member.as_str()))
                }
            }
            if let Value::Object(o) = &mut raw {
                o.insert("members".into(), Value::Array(members));
            }
            match self.put_server(id, raw, false, Some(version)).await {
                Err(ClusterError::Rejected {
                    code: RejectCode::VersionMismatch,
                    ..
                }) => continue,
                other => return other,
            }
        }
        Err(ClusterError::Contended { id: id.to_owned() })
    }

    /// Wait until this node has applied everything the leader committed as of now.
    pub async fn catch_up(&self) -> Result<(), ClusterError> {
        Ok(self.raft.linearizable_read(|_| ()).await?)
    }

    /// Every replicated definition: id → (raw spec, config version, source).
    pub fn server_records(&self) -> BTreeMap<String, (Value, u64, String)> {
        self.raft.read(|st| {
            st.servers
                .iter()
                .map(|(id, r)| {
                    (
                        id.clone(),
                        (r.spec.clone(), r.config_version, r.source.to_string()),
                    )
                })
                .collect()
        })
    }

    /// The cluster config version and the hash of the file it came from.
    pub fn config_version(&self) -> (u64, Option<String>) {
        self.raft
            .read(|st| (st.config_version, st.config_file_hash.clone()))
    }

    // ------------------------------------------------------------------ loops

    /// Start the applier, event flusher and catalogue publisher; register this node's
    /// addresses and, when this node was given a config file that differs from the
    /// replicated one, propose it. Returns once the first config is applied locally (or
    /// at once when the node is not part of a cluster yet).
    pub async fn run(
        self: &Arc<Self>,
        runtime: Arc<Runtime>,
        file: Option<(BTreeMap<String, Value>, Vec<RateLimitDef>, String)>,
    ) -> Result<(), ClusterError> {
        // (Idempotent: `app` attaches the log before serving; a second attach changes nothing.)
        runtime.events().attach(self.clone());
        // One gateway: single-instance servers run where the leader places them, and calls
        // for them are forwarded there.
        self.calls.attach(runtime.clone());
        runtime.set_forward(Arc::new(Forwarder::new(
            self.raft.clone(),
            self.cfg.node_id,
        )));
        // From now on a single-instance server runs here only under a placement lease.
        runtime.set_lease(crate::runtime::Lease::Until(0));
        self.apply_placements(&runtime);
        tokio::spawn(self.clone().lease_loop(runtime.clone()));
        {
            let events = runtime.events().clone();
            tokio::spawn(self.quotas.clone().report_loop(
                self.cfg.node_id,
                move |e| {
                    events.emit(e);
                },
                self.shutdown.clone(),
            ));
        }
        tokio::spawn(self.clone().placement_loop(runtime.clone()));
        tokio::spawn(self.clone().status_reporter(runtime.clone()));
        tokio::spawn(self.clone().applier(runtime.clone()));
        tokio::spawn(self.clone().event_flusher());
        tokio::spawn(self.clone().catalog_publisher(runtime));
        let me = self.clone();
        let first = async move {
            // Wait for a leader (bounded by the caller), then register and propose.
            let mut leader = me.raft.leader_watch();
            let _ = leader.wait_for(Option::is_some).await;
            me.register().await;
            if let Some((raw, limits, hash)) = file {
                let current = me.raft.read(|st| st.config_file_hash.clone());
                let status = me.raft.status();
                let alone = status.voters.len() + status.learners.len() <= 1;
                // A member of a multi-node cluster that already runs a file's configuration
                // does not replace it with its own file at start (the last node to start
                // would otherwise win silently); the operator asks for it explicitly.
                let differs = current.as_deref() != Some(hash.as_str());
                if differs && current.is_some() && !alone && !me.cfg.apply_config_at_boot {
                    tracing::warn!(
                        file_hash = %hash,
                        cluster_file_hash = current.as_deref().unwrap_or(""),
                        "config_file_not_applied: this node's configuration file differs from the one the cluster runs; \
                         the cluster's is kept. Apply this file with `hangarctl config apply FILE`, SIGHUP to this node, \
                         or restart it with --apply-config"
                    );
                    let v = me.raft.read(|st| st.config_version);
                    let _ = me.wait_applied(v).await;
                } else if differs {
                    match me.apply_file_config(&raw, &limits, &hash).await {
                        Ok(_) => tracing::info!(file_hash = %hash, "config_file_proposed"),
                        Err(e) => {
                            tracing::error!(error = %e, "config_file_proposal_failed");
                            return Err(e);
                        }
                    }
                } else {
                    let v = me.raft.read(|st| st.config_version);
                    let _ = me.wait_applied(v).await;
                }
            } else {
                let v = me.raft.read(|st| st.config_version);
                let _ = me.wait_applied(v).await;
            }
            Ok(())
        };
        if self.raft.is_initialized() {
            match tokio::time::timeout(Duration::from_secs(30), first).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "no Raft leader within 30 s; serving what is replicated so far (not ready)"
                    );
                    Ok(())
                }
            }
        } else {
            // Nothing more to start: the node waits for `hangarctl cluster init` or `join`.
            self.started
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move {
                let mut init = me.raft.leader_watch();
                let _ = init.wait_for(Option::is_some).await;
                if let Err(e) = first.await {
                    tracing::error!(error = %e, "initial_config_not_applied");
                }
            });
            Ok(())
        }
    }

    /// Drain a node (`true`: the leader places nothing on it and moves its instances away) or
    /// lift the drain.
    pub async fn set_drain(&self, node_id: u64, draining: bool) -> Result<(), ClusterError> {
        self.propose(Command::SetNodeDrain { node_id, draining })
            .await
            .map(|_| ())
    }

    /// The replicated placements: instance id → node id.
    pub fn placements(&self) -> std::collections::HashMap<String, u64> {
        self.raft.read(|st| {
            st.placements
                .iter()
                .map(|(i, p)| (i.clone(), p.node_id))
                .collect()
        })
    }

    /// Send `key` to other members' REST API (join, status) from now on.
    pub fn set_peer_key(&self, key: Option<crate::config::Secret>) {
        *self.peer_key.lock() = key;
    }

    fn with_peer_key(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &*self.peer_key.lock() {
            Some(k) => rb.header("X-API-Key", k.expose()),
            None => rb,
        }
    }

    /// A log index that covers every write acknowledged so far: this node's applied index
    /// after a ReadIndex round (a write proposed through a follower is answered once the
    /// leader applied it, possibly before this node did).
    pub async fn acknowledged_index(&self) -> u64 {
        if let Err(e) = self.catch_up().await {
            tracing::debug!(error = %e, "acknowledged_index_catch_up_failed");
        }
        self.raft.applied_index()
    }

    /// Wait (at most `within`) until every member has applied the log up to `index`; returns
    /// the members that did not confirm it in time.
    pub async fn wait_applied_everywhere(&self, index: u64, within: Duration) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + within;
        let status = self.status();
        let mut left: BTreeMap<u64, NodeInfo> =
            status.voters.into_iter().chain(status.learners).collect();
        loop {
            let reports = futures::future::join_all(left.iter().map(|(id, info)| async move {
                let r = self
                    .member_report(*id, info, Duration::from_millis(500))
                    .await;
                (
                    *id,
                    r.and_then(|r| r.applied_index).is_some_and(|a| a >= index),
                )
            }))
            .await;
            for (id, done) in reports {
                if done {
                    left.remove(&id);
                }
            }
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                return left.into_keys().collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Make sure the cluster knows the bootstrap admin key (`auth.api_key.bootstrap_key`), by
    /// its hash: created once, as principal `admin`; never logged or stored in clear.
    pub async fn ensure_bootstrap_key(
        &self,
        key: &crate::config::Secret,
    ) -> Result<(), ClusterError> {
        let sha = crate::config::sha256_hex(key.expose().as_bytes());
        let known = self.raft.read(|st| {
            st.keys
                .values()
                .any(|k| crate::auth::constant_time_eq(&k.sha256_hex, &sha))
        });
        if !known {
            let id = format!("key_bootstrap_{}", &sha[..12]);
            let record = hangar_raft::state::ApiKeyRecord {
                id: id.clone(),
                principal: "admin".to_owned(),
                name: "bootstrap-admin".to_owned(),
                sha256_hex: sha,
                created_at_ms: 0,
                expires_at_ms: None,
                revoked: false,
                tenant: None,
            };
            match self.propose(Command::CreateApiKey { key: record }).await {
                Ok(_) => tracing::info!(key_id = %id, "bootstrap_admin_key_registered"),
                // Another node registered it first.
                Err(ClusterError::Rejected {
                    code: RejectCode::KeyExists | RejectCode::KeyHashExists,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        let assigned = self.raft.read(|st| {
            st.role_assignments
                .get("admin")
                .is_some_and(|r| r.contains("admin"))
        });
        if assigned {
            return Ok(());
        }
        self.assign_role("admin", "admin", None).await
    }

    /// Give `principal` the role `role`, everywhere or only within `scope` (`server:<id>`,
    /// `group:<id>`; a built-in role is defined in the replicated state the first time it is
    /// assigned).
    pub async fn assign_role(
        &self,
        principal: &str,
        role: &str,
        scope: Option<&str>,
    ) -> Result<(), ClusterError> {
        let defined = self.raft.read(|st| st.roles.contains_key(role));
        if !defined {
            let builtin = crate::auth::rbac::BUILTIN_ROLES
                .iter()
                .find(|(n, _)| *n == role);
            let Some((_, perms)) = builtin else {
                let names: Vec<&str> = crate::auth::rbac::BUILTIN_ROLES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Err(ClusterError::Rejected {
                    code: RejectCode::RoleNotFound,
                    message: format!(
                        "no role `{role}`: use a built-in role ({}) or define it first",
                        names.join(", ")
                    ),
                });
            };
            self.propose(Command::PutRole {
                role: hangar_raft::state::RoleDef {
                    name: role.to_owned(),
                    permissions: perms.iter().map(|p| (*p).to_owned()).collect(),
                    description: format!("built-in role {role}"),
                },
            })
            .await?;
        }
        self.propose(Command::AssignRole {
            principal: principal.to_owned(),
            role: role.to_owned(),
            scope: scope.map(str::to_owned),
        })
        .await?;
        Ok(())
    }

    /// Put the replicated placements into effect in `runtime`, and note up to which log index
    /// they are (reported with lease renewals).
    fn apply_placements(&self, runtime: &Runtime) {
        // The index first: the placements read after it are at least that recent.
        let index = self.raft.applied_index();
        runtime.set_placements(self.cfg.node_id, self.placements());
        self.placements_applied
            .fetch_max(index, std::sync::atomic::Ordering::AcqRel);
    }

    async fn register(&self) {
        let info = self.node_info();
        let same = self.raft.read(|st| {
            st.nodes.get(&self.cfg.node_id).is_some_and(|n| {
                n.api_addr == info.api_addr
                    && n.raft_addr == info.raft_addr
                    && n.capacity == self.cfg.capacity
                    && n.labels == self.cfg.labels
            })
        });
        if same {
            return;
        }
        if let Err(e) = self
            .propose(Command::RegisterNode {
                node_id: self.cfg.node_id,
                api_addr: info.api_addr,
                raft_addr: info.raft_addr,
                capacity: self.cfg.capacity,
                labels: self.cfg.labels.clone(),
            })
            .await
        {
            tracing::warn!(error = %e, "node_registration_failed");
        }
    }

    /// Keep the runtime in line with the replicated state.
    async fn applier(self: Arc<Self>, runtime: Arc<Runtime>) {
        let mut applied = self.raft.subscribe_applied();
        let mut running_version: Option<u64> = None;
        let mut catalogs: BTreeMap<String, String> = BTreeMap::new();
        let mut delivered = self.raft.read(|st| st.events.last_seq());
        let mut policies = self.raft.read(|st| st.policies.clone());
        loop {
            // Rate-limit definitions: enforced as soon as applied here (and listed).
            {
                let limits = self.quotas.limits();
                self.raft.read(|st| limits.set_definitions(&st.limits));
            }
            // Tool access policies: clients listening on this node learn that their tool lists
            // may have changed, whichever node took the write.
            let now = self
                .raft
                .read(|st| (st.policies != policies).then(|| st.policies.clone()));
            if let Some(now) = now {
                policies = now;
                runtime.tool_access_changed();
            }
            // Config.
            let (version, entries) = self.raft.read(|st| {
                (
                    st.config_version,
                    st.servers
                        .iter()
                        .map(|(id, r)| {
                            (
                                id.clone(),
                                r.spec.clone(),
                                r.source.kind() == ConfigSourceKind::File,
                            )
                        })
                        .collect::<Vec<_>>(),
                )
            });
            if running_version != Some(version) {
                match config::servers_from_raw(&entries, &|k| std::env::var(k).ok()) {
                    Ok(specs) => {
                        let d = runtime.apply(&specs).await;
                        *self.apply_error.lock() = None;
                        tracing::info!(config_version = version, added = ?d.added, removed = ?d.removed,
                            updated = ?d.updated, "replicated_config_applied");
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        tracing::error!(config_version = version, error = %msg,
                            "replicated_config_not_applicable_here (this node keeps its previous servers)");
                        runtime
                            .events()
                            .emit(DomainEvent::ConfigurationApplyFailed {
                                config_version: version,
                                node_id: self.node_name.clone(),
                                error: msg.clone(),
                            });
                        *self.apply_error.lock() = Some(msg);
                    }
                }
                running_version = Some(version);
                self.applied_version.send_replace(version);
                if self.raft.is_initialized() {
                    self.started
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // Where single-instance servers run, and what their hosts report.
            self.apply_placements(&runtime);
            let reported = self.raft.read(|st| {
                st.status
                    .iter()
                    .map(|(id, s)| (id.clone(), (placement::local(s.state), s.node_id)))
                    .collect()
            });
            runtime.set_reported_states(&reported);
            // Catalogues learned anywhere.
            let current: BTreeMap<String, ReplicatedCatalog> =
                self.raft.read(|st| st.catalog.clone());
            for (id, c) in &current {
                if catalogs.get(id) != Some(&c.schema_digest) {
                    let cat = Catalog::from_lists(
                        [&c.tools, &c.prompts, &c.resources, &c.resource_templates],
                        c.learned_at_ms as f64 / 1000.0,
                    );
                    runtime.set_shared_catalog(id, Some(Arc::new(cat)));
                    catalogs.insert(id.clone(), c.schema_digest.clone());
                }
            }
            let gone: Vec<String> = catalogs
                .keys()
                .filter(|k| !current.contains_key(*k))
                .cloned()
                .collect();
            for id in gone {
                runtime.set_shared_catalog(&id, None);
                catalogs.remove(&id);
            }
            // Events for live subscribers.
            loop {
                let batch = self.raft.read(|st| st.events_since(delivered, 1000));
                if batch.is_empty() {
                    break;
                }
                for ev in batch {
                    delivered = ev.seq;
                    runtime.events().deliver(Arc::new(to_event(&ev)));
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = applied.changed() => if r.is_err() { return },
            }
        }
    }

    async fn event_flusher(self: Arc<Self>) {
        let mut backoff = EVENT_FLUSH_EVERY;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = self.events_notify.notified() => {}
                _ = tokio::time::sleep(EVENT_FLUSH_EVERY) => {}
            }
            if !self.raft.is_initialized() {
                if self.shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            loop {
                let batch: Vec<Event> = {
                    let mut q = self.pending_events.lock();
                    let n = q.len().min(EVENT_BATCH);
                    self.in_flight_events
                        .store(n, std::sync::atomic::Ordering::SeqCst);
                    q.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let records: Vec<EventRecord> = batch.iter().map(|e| self.to_record(e)).collect();
                let result = self
                    .raft
                    .propose(Command::AppendEvents { events: records })
                    .await;
                if result.is_ok() {
                    self.in_flight_events
                        .store(0, std::sync::atomic::Ordering::SeqCst);
                }
                match result {
                    Ok(_) => backoff = EVENT_FLUSH_EVERY,
                    Err(e) => {
                        tracing::warn!(error = %e, pending = batch.len(), "event_batch_not_replicated_yet");
                        {
                            let mut q = self.pending_events.lock();
                            for ev in batch.into_iter().rev() {
                                q.push_front(ev);
                            }
                            self.in_flight_events
                                .store(0, std::sync::atomic::Ordering::SeqCst);
                        }
                        if self.shutdown.is_cancelled() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        break;
                    }
                }
            }
            if self.shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Wait (bounded) until every event this node published so far is replicated and
    /// applied locally: `GET /api/events?sync=true`.
    pub async fn sync_events(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        self.events_notify.notify_one();
        while tokio::time::Instant::now() < deadline {
            let idle = self.pending_events.lock().is_empty()
                && self
                    .in_flight_events
                    .load(std::sync::atomic::Ordering::SeqCst)
                    == 0;
            if idle {
                let _ =
                    tokio::time::timeout_at(deadline, self.raft.linearizable_read(|_| ())).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Replicate pending events now (best effort, bounded): used at shutdown.
    pub async fn flush_events(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let batch: Vec<Event> = {
                let mut q = self.pending_events.lock();
                let n = q.len().min(EVENT_BATCH);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let records: Vec<EventRecord> = batch.iter().map(|e| self.to_record(e)).collect();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(
                left,
                self.raft.propose(Command::AppendEvents { events: records }),
            )
            .await
            {
                Ok(Ok(_)) => {}
                _ => return,
            }
        }
    }

    fn to_record(&self, e: &Event) -> EventRecord {
        let subject = ["mcp_server_id", "group_id", "server_id"]
            .iter()
            .find_map(|k| e.data.get(*k).and_then(Value::as_str))
            .unwrap_or_default()
            .to_owned();
        EventRecord {
            kind: e.event_type.clone(),
            at_ms: (e.occurred_at * 1000.0) as u64,
            node_id: self.cfg.node_id,
            subject,
            data: json!({"event_id": e.event_id, "produced_by": e.produced_by, "data": e.data}),
        }
    }

    async fn catalog_publisher(self: Arc<Self>, runtime: Arc<Runtime>) {
        let mut rx = runtime.subscribe();
        loop {
            let ev = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                ev = rx.recv() => ev,
            };
            let server = match ev {
                Ok(RuntimeEvent::CatalogChanged { server, .. }) => server,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let Some(cat) = runtime.instance(&server).and_then(|i| i.catalog()) else {
                continue;
            };
            let lists = cat.lists_json();
            let same = self.raft.read(|st| {
                st.catalog.get(&server).is_some_and(|c| {
                    c.tools == lists[0]
                        && c.prompts == lists[1]
                        && c.resources == lists[2]
                        && c.resource_templates == lists[3]
                })
            });
            if same || !self.raft.read(|st| st.servers.contains_key(&server)) {
                continue;
            }
            let [tools, prompts, resources, resource_templates] = lists;
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me
                    .propose(Command::PutCatalog {
                        server_id: server.clone(),
                        tools,
                        prompts,
                        resources,
                        resource_templates,
                    })
                    .await
                {
                    tracing::warn!(mcp_server = %server, error = %e, "catalog_not_replicated");
                }
            });
        }
    }

    /// Stop taking forwarded calls (those in flight finish): before the runtime stops.
    pub fn stop_calls(&self) {
        self.calls.stop();
    }

    /// Stop Raft (after the runtime stopped).
    pub async fn shutdown(&self) {
        self.lease_end.cancel();
        self.flush_events(Duration::from_secs(2)).await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft_shutdown_incomplete");
        }
    }

    /// The API address other nodes use for this node.
    pub fn api_addr(&self) -> &str {
        &self.api_addr
    }
}

impl EventBackend for Cluster {
    fn submit(&self, event: Event) {
        let mut q = self.pending_events.lock();
        if q.len() >= EVENT_QUEUE_CAP {
            q.pop_front();
            let n = self
                .dropped_events
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::error!(
                    dropped = n + 1,
                    "domain events dropped: the cluster has not accepted events for a long time"
                );
            }
        }
        q.push_back(event);
        drop(q);
        // Group commit: an idle flusher sends at once; while a batch is in flight, new
        // events accumulate and go in the next entry.
        self.events_notify.notify_one();
    }

    fn since(&self, since: u64, limit: usize) -> Vec<Arc<Event>> {
        self.raft
            .read(|st| st.events_since(since, limit))
            .iter()
            .map(|e| Arc::new(to_event(e)))
            .collect()
    }

    fn last_seq(&self) -> u64 {
        self.raft.read(|st| st.events.last_seq())
    }
}

fn to_event(e: &StoredEvent) -> Event {
    let d = &e.event.data;
    Event {
        seq: e.seq,
        event_id: d
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        event_type: e.event.kind.clone(),
        occurred_at: e.event.at_ms as f64 / 1000.0,
        produced_by: d
            .get("produced_by")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| e.event.node_id.to_string()),
        data: d.get("data").cloned().unwrap_or(Value::Null),
    }
}
