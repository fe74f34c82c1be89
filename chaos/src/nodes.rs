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
//! Dropping [`Nodes`] resumes paused nodes, kills every node, then kills any process of this
//! run still alive (reported on stderr: it outlived its node).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
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
    marker: String,
    client: reqwest::Client,
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
        let mut nodes = Nodes {
            opts,
            proxy,
            cluster,
            paused: BTreeSet::new(),
            marker,
            client,
        };
        // From here on, a failure drops `nodes`, which cleans up.
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
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.cluster
            .restart(id)
            .await
            .with_context(|| format!("restart node {id}"))
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
    }
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
    Ok(format!(
        "mcp_servers:\n  {SERVER_ID}:\n    mode: subprocess\n    command: [{}, stdio, --name, {SERVER_ID}, --chaos-run, {}]\n{}{}",
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
    fn a_missing_binary_is_an_error() {
        let err = find_binary("hangar-no-such-binary").unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
