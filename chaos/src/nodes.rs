//! An N-node `hangar` cluster for chaos runs, built on the shared test harness
//! ([`hangar_tests::cluster::Cluster`]), with every node-to-node connection routed through a
//! fault-injecting [`Proxy`].
//!
//! Addresses of node `i` (1 ≤ i ≤ 254):
//!
//! * its Raft (gRPC) listener binds `127.0.1.i:P`, and its outgoing Raft connections leave
//!   from `127.0.1.i` (the proxy's source map);
//! * it advertises `127.0.2.i:Q` as its Raft address: the proxy's front of node `i`, which
//!   forwards to `127.0.1.i:P`. Every static peer entry names the fronts, so all
//!   node-to-node gRPC (Raft, forwarded calls and writes, leases, quota reports) crosses the
//!   proxy;
//! * its HTTP API listens on `127.0.0.1:R`. Clients talk to it directly and are never
//!   partitioned. (Nodes also call each other's HTTP API for status reports; that traffic
//!   is not proxied.)
//!
//! Each node runs one MCP server, [`SERVER_ID`]: the fixture on stdio, a single instance
//! cluster-wide (the default placement, `replicas: 1`), whose command line carries a marker
//! unique to this run, so its processes can be found in `/proc` ([`Nodes::fixture_processes`])
//! and none is left behind. Auth is off (loopback).
//!
//! With [`Options::small_disks`] (root only), every node's data directory is a small tmpfs
//! mounted before the node first starts, so that a fault can fill it ([`Nodes::fill_disk`]).
//!
//! Dropping [`Nodes`] resumes paused upstream processes and paused nodes, kills every node,
//! then kills any process of this run still alive (reported on stderr: it outlived its node),
//! and finally unmounts the small disks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hangar_tests::cluster::Cluster;
use rustix::process::{Pid, Signal};
use serde_json::Value;
use tokio::time::Instant;

use crate::proxy::{Front, Proxy};

/// The id of the MCP server every cluster runs (the fixture, one instance cluster-wide).
pub const SERVER_ID: &str = "counter";
/// Interval between two looks at the cluster while waiting.
pub const POLL: Duration = Duration::from_millis(50);
/// How long one status request may take.
const STATUS_LIMIT: Duration = Duration::from_millis(800);
/// How long dropped nodes' upstream processes get to die with them before they are killed.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);
/// How long an unmount is retried while the killed nodes release their files.
const UNMOUNT_GRACE: Duration = Duration::from_secs(5);
/// The filler file [`Nodes::fill_disk`] writes in a node's data directory.
pub const FILLER: &str = ".hangar-chaos-filler";
/// Room a node's small disk leaves while the node starts: less than the 64 MiB RocksDB
/// preallocates for a new write-ahead log, so that the preallocation fails (RocksDB ignores
/// that) and the log is allocated as it is written; the disk grows to its full size once the
/// log has been written to (see [`Nodes::restart`]).
pub const STARTING_ROOM: u64 = 16 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;
/// Why a cluster with small disks cannot start without root.
pub const SMALL_DISKS_NEED_ROOT: &str = "small disks need root to mount a tmpfs on each node's data directory; run as root or leave them out";

/// Whether this process runs as root (may mount a tmpfs).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The IP node `id`'s Raft listener binds, and its outgoing Raft connections leave from.
pub fn raft_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, id as u8))
}

/// The IP of node `id`'s front on the proxy (its advertised Raft address).
pub fn front_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 2, id as u8))
}

/// Where a workspace binary (`hangar`, `hangar-fixture`) is: `$<NAME>_BIN` (e.g.
/// `HANGAR_BIN`, `HANGAR_FIXTURE_BIN`), else the first existing of `debug/<name>` next to the
/// running executable's profile directory, in `$CARGO_TARGET_DIR`, and in
/// `~/.cache/hangar/target`. An error names every place looked at.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let key = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&key) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{key}={}: no such file", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // …/target/debug/deps/test-xxxx or …/target/debug/hangar-chaos
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug").join(name));
    }
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(
            PathBuf::from(h)
                .join(".cache/hangar/target/debug")
                .join(name),
        );
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow!(
                "{name} not found (set {key}, or build it with cargo build --bins); looked at {}",
                looked.join(", ")
            )
        })
}

/// Wait until `f` gives `Some`, polling every [`POLL`]; an error of `f` ends the wait.
pub async fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Settings of a chaos cluster; [`Options::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of nodes (ids 1..=nodes, at most 254).
    pub nodes: u64,
    /// The `hangar` binary.
    pub hangar: PathBuf,
    /// The `hangar-fixture` binary (the MCP server [`SERVER_ID`]).
    pub fixture: PathBuf,
    /// The run's seed (part of the process marker).
    pub seed: u64,
    /// `cluster.heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// `cluster.election_min_ms`.
    pub election_min_ms: u64,
    /// `cluster.election_max_ms`.
    pub election_max_ms: u64,
    /// `cluster.node_loss_timeout_ms`: when the leader places a lost node's instances
    /// elsewhere.
    pub node_loss_timeout_ms: u64,
    /// `cluster.placement_lease_ms` (≥ 2 × election_max_ms, ≤ node_loss_timeout_ms − 500).
    pub placement_lease_ms: u64,
    /// More YAML under the server [`SERVER_ID`] (4-space indented keys).
    pub server_extra: String,
    /// More top-level YAML.
    pub config_extra: String,
    /// `MCP_LOG_LEVEL` of the nodes.
    pub log_level: String,
    /// Mount a tmpfs of this many MiB on every node's data directory before the nodes first
    /// start (root only: [`Nodes::start_with`] fails otherwise), for [`Nodes::fill_disk`].
    /// Each node starts with less room ([`STARTING_ROOM`]): see [`Nodes::restart`].
    pub small_disks: Option<u64>,
    /// `server.request_timeout_s`: how long a node waits for an upstream's answer to a call
    /// (Hangar's default is 60 s). `None`: Hangar's default.
    pub upstream_request_timeout: Option<Duration>,
}

impl Options {
    /// Defaults for chaos: Hangar's Raft timings (heartbeat 50 ms, election 250–500 ms) and
    /// a short node-loss timeout (3 s, lease 2 s) so that lost instances move quickly.
    pub fn new(nodes: u64, hangar: &Path, fixture: &Path, seed: u64) -> Self {
        Options {
            nodes,
            hangar: hangar.to_owned(),
            fixture: fixture.to_owned(),
            seed,
            heartbeat_ms: 50,
            election_min_ms: 250,
            election_max_ms: 500,
            node_loss_timeout_ms: 3000,
            placement_lease_ms: 2000,
            server_extra: String::new(),
            config_extra: String::new(),
            log_level: "info".into(),
            small_disks: None,
            upstream_request_timeout: None,
        }
    }
}

/// A running chaos cluster; see the module documentation.
pub struct Nodes {
    opts: Options,
    // Dropped after `Drop::drop` has run: the proxy, then the harness (which reaps the
    // killed nodes and removes their directories).
    proxy: Proxy,
    cluster: Cluster,
    paused: BTreeSet<u64>,
    /// Upstream processes stopped with [`Nodes::pause_upstream`] and not resumed yet.
    paused_upstreams: BTreeSet<u32>,
    /// The tmpfs mounted on each node's data directory ([`Options::small_disks`]).
    mounts: BTreeMap<u64, PathBuf>,
    /// The filler files written by [`Nodes::fill_disk`] and not removed yet.
    fillers: BTreeMap<u64, PathBuf>,
    /// Nodes that exited on their own ([`Nodes::exited`]) and were not started since: status.
    exits: BTreeMap<u64, String>,
    marker: String,
    client: reqwest::Client,
}

/// What [`Nodes::fill_disk`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filled {
    /// The filler file.
    pub path: PathBuf,
    /// Bytes written to it.
    pub bytes: u64,
    /// The tmpfs said ENOSPC (else the bound, the tmpfs size, was reached first).
    pub full: bool,
    /// Space the node's write-ahead logs held beyond their length when the filling began
    /// (preallocated by RocksDB: the node can go on appending into it with a full disk).
    pub preallocated: u64,
}

/// What a node looks like (typically under a fault): [`Nodes::condition`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCondition {
    /// Its process runs.
    pub running: bool,
    /// It exited on its own, with this status.
    pub exited: Option<String>,
    /// It answered `/api/cluster/status?local=true`.
    pub answers: bool,
    /// Its Raft core stopped on a fatal error (the status's `fatal`).
    pub raft_fatal: Option<String>,
    /// `/health/ready` answered 200.
    pub ready: bool,
    /// Its applied index.
    pub applied_index: Option<u64>,
    /// The commit index its leader reports (when another node leads and answers).
    pub leader_committed: Option<u64>,
    /// Lines of its current log that mention a full disk (`No space left on device`,
    /// `os error 28`, `ENOSPC`, `StorageFull`).
    pub enospc_lines: usize,
    /// The first of them (at most 300 characters).
    pub first_enospc: Option<String>,
}

impl NodeCondition {
    /// It refused writes: it logged a full disk, or its Raft core stopped.
    pub fn refused_writes(&self) -> bool {
        self.enospc_lines > 0 || self.raft_fatal.is_some()
    }

    /// Every line of `log` that mentions a full disk.
    fn enospc(log: &str) -> Vec<&str> {
        const SIGNS: [&str; 4] = [
            "No space left on device",
            "os error 28",
            "ENOSPC",
            "StorageFull",
        ];
        log.lines()
            .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
            .collect()
    }
}

impl fmt::Display for NodeCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |s: &str| -> String {
            let mut t: String = s.trim().chars().take(240).collect();
            if t.len() < s.trim().len() {
                t.push('…');
            }
            t
        };
        match &self.exited {
            Some(status) => write!(f, "exited on its own ({status})")?,
            None if !self.running => f.write_str("not running (stopped by hangar-chaos)")?,
            None if !self.answers => f.write_str("kept running, does not answer its status")?,
            None => {
                f.write_str("kept running")?;
                if let Some(e) = &self.raft_fatal {
                    write!(f, ", Raft stopped: {}", short(e))?;
                }
                write!(f, ", {}", if self.ready { "ready" } else { "not ready" })?;
                match (self.applied_index, self.leader_committed) {
                    (Some(a), Some(c)) => write!(f, ", applied {a} of the leader's {c}")?,
                    (Some(a), None) => write!(f, ", applied {a}")?,
                    _ => {}
                }
            }
        }
        if self.enospc_lines > 0 {
            write!(
                f,
                "; refused writes: {} log line(s) about the full disk",
                self.enospc_lines
            )?;
            if self.raft_fatal.is_none()
                && let Some(l) = &self.first_enospc
            {
                write!(f, ", first: {}", short(l))?;
            }
        }
        Ok(())
    }
}

impl Nodes {
    /// Start `n` nodes with the default [`Options`], and wait until they are all ready.
    pub async fn start(n: u64, hangar_bin: &Path, fixture_bin: &Path, seed: u64) -> Result<Nodes> {
        Self::start_with(Options::new(n, hangar_bin, fixture_bin, seed)).await
    }

    /// Start a cluster as `opts` says, and wait until every node is ready.
    pub async fn start_with(opts: Options) -> Result<Nodes> {
        if !(1..=254).contains(&opts.nodes) {
            bail!("a chaos cluster has 1 to 254 nodes, not {}", opts.nodes);
        }
        if !opts.fixture.is_file() {
            bail!(
                "{}: no such file (the fixture MCP server)",
                opts.fixture.display()
            );
        }
        if opts.small_disks.is_some() && !is_root() {
            bail!(SMALL_DISKS_NEED_ROOT);
        }
        let mut cluster = Cluster::new(&opts.hangar)
            .context("start a chaos cluster")?
            .env("MCP_LOG_LEVEL", &opts.log_level);
        let mut fronts = Vec::new();
        for id in 1..=opts.nodes {
            let m = cluster
                .add_with_ips(id, raft_ip(id), front_ip(id), &[])
                .with_context(|| format!("add node {id}"))?;
            let addr = |a: &str| -> Result<SocketAddr> {
                a.parse()
                    .with_context(|| format!("node {id}: bad address {a}"))
            };
            fronts.push(Front {
                node: id,
                listen: addr(m.advertise_addr())?,
                target: addr(m.raft_addr())?,
            });
        }
        let proxy = Proxy::start(&fronts, (1..=opts.nodes).map(|id| (raft_ip(id), id)))
            .await
            .context("start the proxy")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let marker = format!(
            "hangar-chaos-{}-{}-{nanos:08x}",
            std::process::id(),
            opts.seed
        );
        let config =
            cluster.static_peers_config(&head_config(&opts, &marker)?, &cluster_config(&opts));
        for id in cluster.ids() {
            cluster.write_config(id, &config)?;
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .build()
            .context("build an HTTP client")?;
        let small_disks = opts.small_disks;
        let mut nodes = Nodes {
            opts,
            proxy,
            cluster,
            paused: BTreeSet::new(),
            paused_upstreams: BTreeSet::new(),
            mounts: BTreeMap::new(),
            fillers: BTreeMap::new(),
            exits: BTreeMap::new(),
            marker,
            client,
        };
        // From here on, a failure drops `nodes`, which cleans up (and unmounts).
        if let Some(mib) = small_disks {
            for id in nodes.ids() {
                nodes
                    .mount_small_disk(id, mib)
                    .with_context(|| format!("node {id}: mount a {mib} MiB tmpfs"))?;
            }
        }
        nodes
            .cluster
            .start_all()
            .await
            .with_context(|| format!("start the nodes\n{}", nodes.cluster.logs_tail(10)))?;
        let limit = Duration::from_secs(60);
        if let Err(e) = nodes.wait_all_ready(limit).await {
            let unknown = nodes.proxy.unknown_sources();
            if !unknown.is_empty() {
                bail!(
                    "the proxy refused connections from unknown source IPs {unknown:?}: this hangar binary does not bind its outgoing Raft connections to its Raft IP ({e})"
                );
            }
            return Err(e.context(nodes.cluster.logs_tail(15)));
        }
        // Every node created its store and wrote to its log (the format version): the small
        // disks may grow to their size.
        for id in nodes.mounts.keys().copied().collect::<Vec<_>>() {
            nodes.grow_disk(id)?;
        }
        Ok(nodes)
    }

    /// The settings the cluster runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// A handle to the proxy between the nodes.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// The underlying harness (addresses, logs, status helpers).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Node ids, 1..=n.
    pub fn ids(&self) -> Vec<u64> {
        self.cluster.ids()
    }

    /// The longest election timeout: a pause longer than this makes the others elect anew.
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.opts.election_max_ms)
    }

    /// The marker on the command line of this run's upstream processes.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// `http://127.0.0.1:PORT` of node `id`'s API.
    pub fn api_base(&self, id: u64) -> Result<String> {
        self.cluster
            .member(id)
            .map(|m| m.base())
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    /// Nodes whose process runs (paused ones included).
    pub fn alive(&self) -> Vec<u64> {
        self.cluster.alive()
    }

    /// Nodes stopped with [`Nodes::pause`].
    pub fn paused(&self) -> Vec<u64> {
        self.paused.iter().copied().collect()
    }

    /// Nodes that run and are not paused: the ones that can answer.
    pub fn responsive(&self) -> Vec<u64> {
        self.alive()
            .into_iter()
            .filter(|id| !self.paused.contains(id))
            .collect()
    }

    /// Node `id`'s process id while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.cluster.member(id).and_then(|m| m.pid())
    }

    /// The log of node `id`'s latest start.
    pub fn log_path(&self, id: u64) -> Option<PathBuf> {
        self.cluster.member(id).map(|m| m.log_path())
    }

    /// Every log file of node `id` (one per start), oldest first.
    pub fn log_paths(&self, id: u64) -> Vec<PathBuf> {
        let Some(m) = self.cluster.member(id) else {
            return Vec::new();
        };
        let mut logs: Vec<(u32, PathBuf)> = std::fs::read_dir(m.dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n = name.strip_prefix("log.")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        logs.sort();
        logs.into_iter().map(|(_, p)| p).collect()
    }

    /// The last lines of every node's current log.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.cluster.logs_tail(lines)
    }

    /// SIGKILL node `id` (resumed first if paused); returns when the signal was sent.
    pub fn kill(&mut self, id: u64) -> Result<Instant> {
        self.resume_if_paused(id)?;
        Ok(self.cluster.kill9(id)?)
    }

    /// Start node `id` again (after a kill or a stop) on its data; returns once it has
    /// written its ready file (not necessarily caught up: see [`Nodes::wait_all_ready`]).
    ///
    /// On a small disk, the node starts with little room (what its files hold, the length
    /// of its write-ahead logs — room for RocksDB to recover them — and [`STARTING_ROOM`])
    /// so that RocksDB's 64 MiB preallocation of its new log fails, and the disk grows to
    /// its size once that log was first written to (or after 3 s). Otherwise a full disk
    /// would not stop the node's writes until it had filled those 64 MiB. (Best effort: a
    /// node whose old logs held more than about 24 MiB may still get its preallocation;
    /// [`Filled::preallocated`] tells.)
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.exits.remove(&id);
        let before = match self.mounts.contains_key(&id) {
            // Best effort: never keep a node from starting.
            true => match self.shrink_disk_for_start(id) {
                Ok(before) => Some(before),
                Err(e) => {
                    eprintln!("hangar-chaos: {e:#}; node {id} starts on its full disk");
                    None
                }
            },
            false => None,
        };
        let started = self
            .cluster
            .restart(id)
            .await
            .with_context(|| format!("restart node {id}"));
        if let Some(before) = before {
            let deadline = Instant::now() + Duration::from_secs(3);
            while started.is_ok() && Instant::now() < deadline {
                let written = self
                    .wal_files(id)
                    .iter()
                    .any(|(p, len, _)| *len > 0 && !before.contains(p));
                if written {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            self.grow_disk(id)?;
        }
        started
    }

    /// Stop node `id` gracefully (SIGTERM, killed after the harness's limit); its exit code.
    pub async fn terminate(&mut self, id: u64) -> Result<Option<i32>> {
        self.resume_if_paused(id)?;
        Ok(self.cluster.terminate(id).await?)
    }

    /// SIGSTOP node `id`: it stays connected but answers nothing (its upstream processes
    /// run on).
    pub fn pause(&mut self, id: u64) -> Result<()> {
        let pid = self
            .pid(id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        signal(pid, Signal::STOP).with_context(|| format!("pause node {id}"))?;
        self.paused.insert(id);
        Ok(())
    }

    /// SIGCONT node `id` after [`Nodes::pause`].
    pub fn resume(&mut self, id: u64) -> Result<()> {
        let pid = self
            .pid(id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        signal(pid, Signal::CONT).with_context(|| format!("resume node {id}"))?;
        self.paused.remove(&id);
        Ok(())
    }

    fn resume_if_paused(&mut self, id: u64) -> Result<()> {
        if self.paused.contains(&id) {
            self.resume(id)?;
        }
        Ok(())
    }

    /// Each responsive node's own status (`/api/cluster/status?local=true`), asked at once.
    pub async fn statuses(&self) -> Vec<(u64, Option<Value>)> {
        let ids = self.responsive();
        let asks = ids
            .iter()
            .map(|&id| self.cluster.local_status(id, STATUS_LIMIT));
        ids.iter()
            .copied()
            .zip(futures::future::join_all(asks).await)
            .collect()
    }

    /// The leader a majority of the cluster (all nodes, dead or alive) reports, if any.
    pub async fn leader(&self) -> Option<u64> {
        let reports: Vec<Option<Value>> =
            self.statuses().await.into_iter().map(|(_, r)| r).collect();
        majority_leader(&reports, self.opts.nodes as usize)
    }

    /// Wait until a majority reports the same leader.
    pub async fn wait_leader(&mut self, limit: Duration) -> Result<u64> {
        wait_until("a majority agrees on a leader", limit, async || {
            self.cluster.check_alive("waiting for a leader")?;
            Ok(self.leader().await)
        })
        .await
    }

    /// GET `path` of node `id`'s API: status and body (JSON, or the text as a JSON string).
    pub async fn get(&self, id: u64, path: &str, limit: Duration) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.api_base(id)?);
        let r = self
            .client
            .get(&url)
            .timeout(limit)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status().as_u16();
        let text = r.text().await.with_context(|| format!("GET {url}: body"))?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Wait until every node runs (none paused), answers `/health/ready` with 200, reports
    /// the same leader, and has applied at least the leader's commit index as of when they
    /// first agreed on it. Fails at once when a node is down or paused, or exited on its
    /// own.
    pub async fn wait_all_ready(&mut self, limit: Duration) -> Result<()> {
        if let Some(p) = self.paused.first() {
            bail!("node {p} is paused");
        }
        let down: Vec<u64> = self
            .ids()
            .into_iter()
            .filter(|id| !self.alive().contains(id))
            .collect();
        if !down.is_empty() {
            bail!("nodes {down:?} are not running");
        }
        let mut target: Option<(u64, u64)> = None;
        let mut last = String::new();
        let waited = wait_until("every node ready and caught up", limit, async || {
            self.cluster
                .check_alive("waiting for every node to be ready")?;
            let (ok, why) = self.all_ready_once(&mut target).await;
            last = why;
            Ok(ok.then_some(()))
        })
        .await;
        waited.map_err(|e| e.context(format!("last seen: {last}")))
    }

    /// One look for [`Nodes::wait_all_ready`]: whether all is well, else why not.
    async fn all_ready_once(&self, target: &mut Option<(u64, u64)>) -> (bool, String) {
        let statuses = self.statuses().await;
        let mut leaders = BTreeSet::new();
        for (id, s) in &statuses {
            let Some(s) = s else {
                return (false, format!("node {id} does not answer"));
            };
            match s["leader_id"].as_u64() {
                Some(l) => leaders.insert(l),
                None => return (false, format!("node {id} knows no leader: {s}")),
            };
        }
        let mut named = leaders.iter();
        let leader = match (named.next(), named.next()) {
            (Some(&l), None) => l,
            _ => {
                return (
                    false,
                    format!("the nodes name different leaders {leaders:?}"),
                );
            }
        };
        // The commit index to reach, fixed when this leader is first agreed on.
        let index = match *target {
            Some((l, i)) if l == leader => i,
            _ => {
                let committed = statuses
                    .iter()
                    .find(|(id, _)| *id == leader)
                    .and_then(|(_, s)| s.as_ref()?["committed_index"].as_u64());
                let Some(i) = committed else {
                    return (false, format!("leader {leader} reports no commit index"));
                };
                *target = Some((leader, i));
                i
            }
        };
        for (id, s) in &statuses {
            let applied = s
                .as_ref()
                .and_then(|s| s["applied_index"].as_u64())
                .unwrap_or(0);
            if applied < index {
                return (false, format!("node {id} applied {applied} < {index}"));
            }
            match self.get(*id, "/health/ready", STATUS_LIMIT).await {
                Ok((200, _)) => {}
                Ok((code, body)) => {
                    return (false, format!("node {id} /health/ready {code}: {body}"));
                }
                Err(e) => return (false, format!("node {id} /health/ready: {e:#}")),
            }
        }
        (true, String::new())
    }

    /// The node running the single instance of server `server`, as node `ask` (or the
    /// first responsive node) reports it.
    pub async fn host_of(&self, server: &str, ask: Option<u64>) -> Result<Option<u64>> {
        let id = match ask {
            Some(id) => id,
            None => *self
                .responsive()
                .first()
                .ok_or_else(|| anyhow!("no responsive node"))?,
        };
        let (code, v) = self
            .get(
                id,
                &format!("/api/mcp_servers/{server}"),
                Duration::from_secs(3),
            )
            .await?;
        if code != 200 {
            bail!("GET /api/mcp_servers/{server} on node {id}: {code} {v}");
        }
        Ok(v["node"].as_u64())
    }

    /// This run's fixture processes, `(pid, parent pid)`: processes whose program is the
    /// fixture binary and whose command line carries this run's marker (wherever they are
    /// in the process tree: under a node, or orphaned).
    pub fn fixture_processes(&self) -> Vec<(u32, u32)> {
        marked_processes(&self.marker)
            .into_iter()
            .filter(|p| p.is_program(&self.opts.fixture))
            .map(|p| (p.pid, p.ppid))
            .collect()
    }

    /// The node each fixture process descends from (`None`: none of this cluster's
    /// running nodes — an orphan).
    pub fn fixture_hosts(&self) -> Vec<(u32, Option<u64>)> {
        let nodes: BTreeMap<u32, u64> = self
            .ids()
            .into_iter()
            .filter_map(|id| Some((self.pid(id)?, id)))
            .collect();
        self.fixture_processes()
            .into_iter()
            .map(|(pid, _)| {
                (
                    pid,
                    ancestors(pid).iter().find_map(|a| nodes.get(a).copied()),
                )
            })
            .collect()
    }

    /// SIGKILL upstream process `pid`, which must be one of this run's fixture processes.
    pub fn kill_upstream(&self, pid: u32) -> Result<()> {
        if !self.fixture_processes().iter().any(|&(p, _)| p == pid) {
            bail!("process {pid} is no upstream process of this run");
        }
        signal(pid, Signal::KILL)
    }

    /// SIGSTOP upstream process `pid` (one of this run's fixture processes) and wait until it
    /// is stopped: calls to it hang until [`Nodes::resume_upstream`]. Dropping the cluster
    /// resumes it too.
    pub fn pause_upstream(&mut self, pid: u32) -> Result<()> {
        if !self.fixture_processes().iter().any(|&(p, _)| p == pid) {
            bail!("process {pid} is no upstream process of this run");
        }
        signal(pid, Signal::STOP).with_context(|| format!("pause upstream process {pid}"))?;
        self.paused_upstreams.insert(pid);
        // The signal is delivered asynchronously: return once it took effect.
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while !matches!(process_state(pid), Some('T' | 't') | None) {
            if std::time::Instant::now() >= deadline {
                bail!("upstream process {pid} did not stop within 500 ms of SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONT upstream process `pid` after [`Nodes::pause_upstream`], if it still exists (and
    /// is still a fixture process of this run: pids are reused); whether it did.
    pub fn resume_upstream(&mut self, pid: u32) -> Result<bool> {
        self.paused_upstreams.remove(&pid);
        if !self.fixture_processes().iter().any(|&(p, _)| p == pid) {
            return Ok(false);
        }
        match signal(pid, Signal::CONT) {
            Ok(()) => Ok(true),
            // Gone between the look and the signal.
            Err(_) if process_state(pid).is_none() => Ok(false),
            Err(e) => Err(e.context(format!("resume upstream process {pid}"))),
        }
    }

    /// Upstream processes paused with [`Nodes::pause_upstream`] and not resumed.
    pub fn paused_upstreams(&self) -> Vec<u32> {
        self.paused_upstreams.iter().copied().collect()
    }

    /// Resume every paused upstream process still there; the pids resumed.
    pub fn resume_upstreams(&mut self) -> Vec<u32> {
        let mut resumed = Vec::new();
        for pid in self.paused_upstreams() {
            if let Ok(true) = self.resume_upstream(pid) {
                resumed.push(pid);
            }
        }
        resumed
    }

    /// This run's fixture processes that are stopped (state `T` or `t` in `/proc`), whoever
    /// stopped them.
    pub fn stopped_fixtures(&self) -> Vec<u32> {
        self.fixture_processes()
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|&pid| matches!(process_state(pid), Some('T' | 't')))
            .collect()
    }

    /// Node `id`'s data directory (`--data-dir`).
    pub fn data_dir(&self, id: u64) -> Option<PathBuf> {
        self.cluster.member(id).map(|m| m.data_dir())
    }

    /// The tmpfs mounted on each node's data directory ([`Options::small_disks`]).
    pub fn small_disks(&self) -> &BTreeMap<u64, PathBuf> {
        &self.mounts
    }

    /// Mount a tmpfs on node `id`'s data directory before it first starts: [`STARTING_ROOM`]
    /// while it starts, `mib` MiB once it runs ([`Nodes::start_with`] grows it).
    fn mount_small_disk(&mut self, id: u64, mib: u64) -> Result<()> {
        let dir = self.data_dir(id).ok_or_else(|| anyhow!("no node {id}"))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let size = STARTING_ROOM.min(mib * MIB);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg(&self.marker)
            .arg(&dir)
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs {}: {}: {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.mounts.insert(id, dir);
        Ok(())
    }

    /// Set node `id`'s small disk to `bytes` (at least what it holds: the kernel refuses
    /// less).
    fn resize_disk(&self, id: u64, bytes: u64) -> Result<()> {
        let dir = self
            .mounts
            .get(&id)
            .ok_or_else(|| anyhow!("node {id} has no small disk"))?;
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(dir)
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "mount -o remount,size={bytes} {}: {}: {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Give node `id`'s small disk its full size.
    fn grow_disk(&self, id: u64) -> Result<()> {
        self.resize_disk(id, self.opts.small_disks.unwrap_or(0) * MIB)
            .with_context(|| format!("grow node {id}'s disk"))
    }

    /// Shrink node `id`'s small disk for a start (see [`Nodes::restart`]); its write-ahead
    /// logs before the start.
    fn shrink_disk_for_start(&self, id: u64) -> Result<BTreeSet<PathBuf>> {
        let files = self.disk_usage(id);
        let held: u64 = files.iter().map(|f| f.2).sum();
        let wal = self.wal_files(id);
        let logged: u64 = wal.iter().map(|f| f.1).sum();
        let size = (held + logged + STARTING_ROOM).min(self.opts.small_disks.unwrap_or(0) * MIB);
        self.resize_disk(id, size)
            .with_context(|| format!("shrink node {id}'s disk for its start"))?;
        Ok(wal.into_iter().map(|f| f.0).collect())
    }

    /// Node `id`'s write-ahead logs (RocksDB's `*.log`): `(path, length, allocated)`.
    fn wal_files(&self, id: u64) -> Vec<(PathBuf, u64, u64)> {
        self.disk_usage(id)
            .into_iter()
            .filter(|(p, _, _)| p.extension().is_some_and(|e| e == "log"))
            .collect()
    }

    /// Fill node `id`'s small disk with a filler file ([`FILLER`]) until the tmpfs says ENOSPC
    /// (bounded by its size). The node's own writes fail from then on, except into space its
    /// files already hold. Undo with [`Nodes::free_disk`].
    pub async fn fill_disk(&mut self, id: u64) -> Result<Filled> {
        let dir = self
            .mounts
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow!("node {id} has no small disk (Options::small_disks)"))?;
        let limit = self.opts.small_disks.unwrap_or(0) * MIB;
        let preallocated = self
            .wal_files(id)
            .iter()
            .map(|(_, len, alloc)| alloc.saturating_sub(*len))
            .sum();
        let path = dir.join(FILLER);
        self.fillers.insert(id, path.clone());
        let filled = tokio::task::spawn_blocking(move || fill(&path, limit))
            .await
            .context("the filler task")??;
        Ok(Filled {
            preallocated,
            ..filled
        })
    }

    /// The files of node `id`'s data directory (the filler included): `(path, length,
    /// allocated bytes)`, the allocation being what the disk gave them (it exceeds the
    /// length where space was preallocated).
    pub fn disk_usage(&self, id: u64) -> Vec<(PathBuf, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut dirs: Vec<PathBuf> = self.data_dir(id).into_iter().collect();
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    dirs.push(e.path());
                } else {
                    out.push((e.path(), m.len(), m.blocks() * 512));
                }
            }
        }
        out.sort();
        out
    }

    /// Remove the filler of node `id`'s small disk; whether there was one.
    pub fn free_disk(&mut self, id: u64) -> Result<bool> {
        let Some(path) = self.fillers.remove(&id) else {
            return Ok(false);
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("remove {}", path.display()))),
        }
    }

    /// Nodes whose small disk holds a filler.
    pub fn full_disks(&self) -> Vec<u64> {
        self.fillers.keys().copied().collect()
    }

    /// Nodes that exited on their own since the harness last looked, with their exit status;
    /// they count as stopped from now on ([`Nodes::restart`] starts them again).
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for _ in 0..self.ids().len() {
            match self.cluster.check_alive("looking for nodes that exited") {
                Ok(()) => break,
                Err(hangar_tests::cluster::ClusterError::Exited { node, status, .. }) => {
                    self.exits.insert(node, status.clone());
                    out.push((node, status));
                }
                Err(_) => break,
            }
        }
        out
    }

    /// How node `id` is doing: exited (noticed by the harness), its status, readiness, how far
    /// it applied against its leader's commit index, and what its log says about a full disk.
    pub async fn condition(&mut self, id: u64) -> NodeCondition {
        let mut c = NodeCondition::default();
        self.exited();
        c.running = self.alive().contains(&id);
        if !c.running {
            c.exited = self.exits.get(&id).cloned();
        }
        let log = self.log_path(id).map(std::fs::read_to_string);
        if let Some(Ok(text)) = &log {
            let lines = NodeCondition::enospc(text);
            c.enospc_lines = lines.len();
            c.first_enospc = lines.first().map(|l| l.trim().chars().take(300).collect());
        }
        if !c.running || self.paused.contains(&id) {
            return c;
        }
        let Some(s) = self.cluster.local_status(id, STATUS_LIMIT).await else {
            return c;
        };
        c.answers = true;
        c.raft_fatal = s["fatal"].as_str().map(str::to_owned);
        c.applied_index = s["applied_index"].as_u64();
        if let Some(l) = s["leader_id"].as_u64().filter(|&l| l != id)
            && self.responsive().contains(&l)
        {
            c.leader_committed = self
                .cluster
                .local_status(l, STATUS_LIMIT)
                .await
                .and_then(|s| s["committed_index"].as_u64());
        }
        c.ready = matches!(
            self.get(id, "/health/ready", STATUS_LIMIT).await,
            Ok((200, _))
        );
        c
    }

    /// Fixture processes of this run that descend from no running node of the cluster
    /// (their node was killed or stopped): each one is a leak. Right after a kill, allow
    /// the kernel a moment to deliver the parent-death signal (poll).
    pub fn orphans(&self) -> Vec<(u32, u32)> {
        let orphaned: BTreeSet<u32> = self
            .fixture_hosts()
            .into_iter()
            .filter(|(_, node)| node.is_none())
            .map(|(pid, _)| pid)
            .collect();
        self.fixture_processes()
            .into_iter()
            .filter(|(pid, _)| orphaned.contains(pid))
            .collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        // No stopped process is left behind: a paused upstream is resumed before its node is
        // killed (it would die stopped anyway, but nothing may stay frozen).
        for pid in std::mem::take(&mut self.paused_upstreams) {
            if self.fixture_processes().iter().any(|&(p, _)| p == pid) {
                let _ = signal(pid, Signal::CONT);
            }
        }
        for id in std::mem::take(&mut self.paused) {
            if let Some(pid) = self.pid(id) {
                let _ = signal(pid, Signal::CONT);
            }
        }
        for id in self.cluster.alive() {
            let _ = self.cluster.kill9(id);
        }
        // The nodes' upstream processes die with them (parent-death signal); give them a
        // moment, then kill what is left — and say so: it is a leak.
        let deadline = std::time::Instant::now() + ORPHAN_GRACE;
        let mut left = marked_processes(&self.marker);
        while !left.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(POLL);
            left = marked_processes(&self.marker);
        }
        for p in &left {
            eprintln!(
                "hangar-chaos: process {} ({}) outlived its node by {ORPHAN_GRACE:?}; killing it",
                p.pid,
                p.argv.join(" ")
            );
            let _ = signal(p.pid, Signal::KILL);
        }
        // The small disks, once the killed nodes have let go of their files.
        for (_, dir) in std::mem::take(&mut self.mounts) {
            if let Err(e) = unmount(&dir) {
                eprintln!("hangar-chaos: {e:#}");
            }
        }
    }
}

/// Write `path` in 1 MiB chunks until the file system says ENOSPC or `limit` bytes are written.
fn fill(path: &Path, limit: u64) -> Result<Filled> {
    let mut file = std::fs::File::create(path)
        .with_context(|| format!("create the filler {}", path.display()))?;
    let chunk = vec![0xa5u8; 1024 * 1024];
    let mut bytes = 0u64;
    let mut full = false;
    while bytes < limit {
        let want = usize::try_from(limit - bytes).map_or(chunk.len(), |l| l.min(chunk.len()));
        match file.write(&chunk[..want]) {
            Ok(0) => {
                full = true;
                break;
            }
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                full = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(anyhow!(e).context(format!("write the filler {}", path.display())));
            }
        }
    }
    Ok(Filled {
        path: path.to_owned(),
        bytes,
        full,
        preallocated: 0,
    })
}

/// Whether `path` is a mount point (listed in `/proc/self/mounts`).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|m| Path::new(&unescape_mount(m)) == path)
    })
}

/// A mount point as `/proc/self/mounts` writes it: space, tab, newline and backslash as
/// octal escapes.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Unmount `dir`, retrying for [`UNMOUNT_GRACE`] while it is busy (killed processes letting
/// go of their files), then lazily (detached now, freed when the last user goes).
fn unmount(dir: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + UNMOUNT_GRACE;
    let mut last = String::new();
    while is_mount_point(dir) {
        if std::time::Instant::now() >= deadline {
            let lazy = Command::new("umount").arg("-l").arg(dir).output();
            return match lazy {
                Ok(o) if o.status.success() => Err(anyhow!(
                    "{} was still busy after {UNMOUNT_GRACE:?} ({last}): unmounted lazily",
                    dir.display()
                )),
                Ok(o) => Err(anyhow!(
                    "cannot unmount {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(anyhow!(e).context(format!("umount -l {}", dir.display()))),
            };
        }
        match Command::new("umount").arg(dir).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                last = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(anyhow!(e).context(format!("umount {}", dir.display()))),
        }
    }
    Ok(())
}

/// The state letter of `pid` in `/proc/<pid>/stat` (`R`, `S`, `T` stopped, `Z` zombie…),
/// `None` when there is no such process.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The leader that at least a majority of a `size`-node cluster reports in `reports` (each
/// a node's `/api/cluster/status?local=true`, `None` for no answer).
pub fn majority_leader(reports: &[Option<Value>], size: usize) -> Option<u64> {
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for r in reports.iter().flatten() {
        if let Some(l) = r["leader_id"].as_u64() {
            *votes.entry(l).or_default() += 1;
        }
    }
    votes
        .into_iter()
        .find(|&(_, n)| n > size / 2)
        .map(|(l, _)| l)
}

fn signal(pid: u32, sig: Signal) -> Result<()> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| anyhow!("bad pid {pid}"))?;
    rustix::process::kill_process(p, sig).with_context(|| format!("signal {sig:?} to {pid}"))
}

/// A process found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Its command line.
    pub argv: Vec<String>,
}

impl ProcessInfo {
    /// Whether it runs `program` (its argv[0]).
    fn is_program(&self, program: &Path) -> bool {
        self.argv.first().is_some_and(|a| Path::new(a) == program)
    }
}

/// Every live process (zombies have no command line) with `marker` as a whole argument.
pub fn marked_processes(marker: &str) -> Vec<ProcessInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.iter().any(|a| a == marker) {
            continue;
        }
        if let Some(ppid) = parent_of(pid) {
            found.push(ProcessInfo { pid, ppid, argv });
        }
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// The parent of `pid` (from `/proc/<pid>/stat`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid`'s ancestors, parent first, up to init.
fn ancestors(pid: u32) -> Vec<u32> {
    let mut chain = Vec::new();
    let mut p = pid;
    while let Some(parent) = parent_of(p) {
        if parent == 0 || chain.contains(&parent) {
            break;
        }
        chain.push(parent);
        p = parent;
    }
    chain
}

/// Top-level YAML: the server [`SERVER_ID`] (the fixture, marked) and the extra keys.
fn head_config(opts: &Options, marker: &str) -> Result<String> {
    let fixture = opts
        .fixture
        .to_str()
        .ok_or_else(|| anyhow!("{}: not UTF-8", opts.fixture.display()))?;
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let server = opts
        .upstream_request_timeout
        .map(|t| format!("server:\n  request_timeout_s: {}\n", t.as_secs_f64()))
        .unwrap_or_default();
    Ok(format!(
        "mcp_servers:\n  {SERVER_ID}:\n    mode: subprocess\n    command: [{}, stdio, --name, {SERVER_ID}, --chaos-run, {}]\n{}{server}{}",
        q(fixture),
        q(marker),
        opts.server_extra,
        opts.config_extra,
    ))
}

/// Keys under `cluster:` (besides the peers).
fn cluster_config(opts: &Options) -> String {
    format!(
        "  heartbeat_ms: {}\n  election_min_ms: {}\n  election_max_ms: {}\n  node_loss_timeout_ms: {}\n  placement_lease_ms: {}\n",
        opts.heartbeat_ms,
        opts.election_min_ms,
        opts.election_max_ms,
        opts.node_loss_timeout_ms,
        opts.placement_lease_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_majority_names_the_leader() {
        let r = |l: Option<u64>| Some(json!({"leader_id": l}));
        assert_eq!(
            majority_leader(&[r(Some(2)), r(Some(2)), r(Some(1))], 3),
            Some(2)
        );
        assert_eq!(majority_leader(&[r(Some(2)), None, r(Some(1))], 3), None);
        assert_eq!(majority_leader(&[r(Some(2)), r(Some(2))], 3), Some(2));
        assert_eq!(majority_leader(&[r(Some(2)), r(Some(2))], 5), None);
        assert_eq!(majority_leader(&[r(None), r(None), r(None)], 3), None);
    }

    #[test]
    fn the_config_names_the_marked_fixture() {
        let o = Options::new(
            3,
            Path::new("/bin/hangar"),
            Path::new("/x/hangar-fixture"),
            7,
        );
        let head = head_config(&o, "m-1").unwrap();
        assert!(
            head.contains(
                r#"command: ["/x/hangar-fixture", stdio, --name, counter, --chaos-run, "m-1"]"#
            ),
            "{head}"
        );
        assert!(cluster_config(&o).contains("  placement_lease_ms: 2000\n"));
    }

    #[test]
    fn this_process_is_found_by_its_marker_and_has_ancestors() {
        let me = std::process::id();
        assert!(ancestors(me).contains(&parent_of(me).unwrap()));
        assert!(marked_processes("no-such-marker-anywhere-42").is_empty());
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount("/x\\134y\\011"), "/x\\y\t");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/odd\\9"), "/odd\\9");
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }

    #[test]
    fn a_full_disk_is_read_from_the_log_and_told() {
        let log =
            "a\nERROR raft: IO error: No space left on device While appending\nb os error 28\nc";
        assert_eq!(NodeCondition::enospc(log).len(), 2);
        let c = NodeCondition {
            running: true,
            answers: true,
            raft_fatal: Some("storage".into()),
            applied_index: Some(7),
            leader_committed: Some(9),
            enospc_lines: 2,
            first_enospc: Some("IO error".into()),
            ..NodeCondition::default()
        };
        assert!(c.refused_writes());
        assert_eq!(
            c.to_string(),
            "kept running, Raft stopped: storage, not ready, applied 7 of the leader's 9; refused writes: 2 log line(s) about the full disk"
        );
        let c = NodeCondition {
            raft_fatal: None,
            ready: true,
            ..c
        };
        assert_eq!(
            c.to_string(),
            "kept running, ready, applied 7 of the leader's 9; refused writes: 2 log line(s) about the full disk, first: IO error"
        );
        let e = NodeCondition {
            exited: Some("exit status: 1".into()),
            ..NodeCondition::default()
        };
        assert!(!e.refused_writes());
        assert_eq!(e.to_string(), "exited on its own (exit status: 1)");
    }

    #[test]
    fn a_filler_stops_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let f = fill(&dir.path().join(FILLER), 3 * 1024 * 1024 + 5).unwrap();
        assert_eq!(f.bytes, 3 * 1024 * 1024 + 5);
        assert!(!f.full);
        assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
        assert_eq!(process_state(u32::MAX), None);
    }

    #[test]
    fn the_request_timeout_goes_under_server() {
        let mut o = Options::new(3, Path::new("/h"), Path::new("/f"), 1);
        assert!(!head_config(&o, "m").unwrap().contains("server:"));
        o.upstream_request_timeout = Some(Duration::from_millis(1500));
        assert!(
            head_config(&o, "m")
                .unwrap()
                .contains("\nserver:\n  request_timeout_s: 1.5\n")
        );
    }

    #[test]
    fn a_missing_binary_is_an_error() {
        let err = find_binary("hangar-no-such-binary").unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
