//! A cluster of real `hangar serve` processes on 127.0.0.1, shared by the cluster tests
//! (`tests/tests/cluster`) and `hangar-bench`'s Raft benchmarks.
//!
//! Each member has fixed random ports and its own directory (config, data, ready file, one
//! log per start) under a temporary root, so it can be killed and restarted in place. Every
//! failure is a [`ClusterError`] (the benchmark runs this outside tests). Dropping the
//! [`Cluster`] kills every process it started, then removes the root directory.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hangar_wait::Wait;
use serde_json::Value;
use tokio::time::Instant;

/// How long a node may take to write its ready file.
pub const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the node is killed.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Interval between two looks at the cluster's state.
const POLL: Duration = Duration::from_millis(20);

/// Something the cluster harness could not do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `hangar` binary does not exist.
    #[error("{0}: no such file (build it with cargo build -p hangar-node)")]
    NoBinary(PathBuf),
    /// A node process exited on its own.
    #[error("node {node} exited {status} while {during}; last lines of its log:\n{log}")]
    Exited {
        /// Node id.
        node: u64,
        /// What was being waited for.
        during: String,
        /// Its exit status.
        status: String,
        /// The tail of its log.
        log: String,
    },
    /// A condition did not become true in time.
    #[error("{what}: not within {after:?} ({detail})")]
    Timeout {
        /// The condition.
        what: String,
        /// The limit.
        after: Duration,
        /// The last observation.
        detail: String,
    },
    /// No member has this id.
    #[error("no node {0}")]
    NoSuchNode(u64),
    /// A member with this id exists already.
    #[error("node {0} exists already")]
    Duplicate(u64),
    /// The member is not running.
    #[error("node {0} is not running")]
    NotRunning(u64),
    /// The member is running already.
    #[error("node {0} is running already")]
    Running(u64),
    /// The HTTP client could not be built.
    #[error("cannot build an HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// An API key that cannot be sent as a header.
    #[error("the API key is not a valid header value: {0}")]
    BadApiKey(String),
}

type Result<T, E = ClusterError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

fn timeout(t: hangar_wait::Timeout, detail: String) -> ClusterError {
    ClusterError::Timeout {
        what: t.what,
        after: t.after,
        detail,
    }
}

/// The last `lines` lines of a file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One `hangar serve` process with fixed addresses and its own directory.
pub struct Member {
    id: u64,
    http: String,
    raft: String,
    /// The Raft address the other nodes use (`--advertise-addr`), when not `raft`.
    advertise: Option<String>,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
    /// `http` or `https` (a cluster with `server.tls`, see [`Cluster::https`]).
    scheme: &'static str,
}

impl Member {
    /// Node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `127.0.0.1:PORT` of its HTTP API.
    pub fn api_addr(&self) -> &str {
        &self.http
    }

    /// `127.0.0.1:PORT` of its Raft gRPC endpoint (the address it binds; see
    /// [`Cluster::add_with_ips`]).
    pub fn raft_addr(&self) -> &str {
        &self.raft
    }

    /// The Raft address the other members are told to use: [`Member::raft_addr`], unless
    /// the member was added with [`Cluster::add_with_ips`].
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.raft)
    }

    /// `http://127.0.0.1:PORT` (`https://` for a cluster with `server.tls`).
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.http)
    }

    /// URL of a path on its HTTP API.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Its directory (config, data, ready file, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its config file (`--config`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// Its data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Whether its process is running (started and not killed or stopped by the harness).
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// Its pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log (stdout and stderr) of its latest start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("log.{}", self.starts))
    }

    /// The whole log of its latest start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn ready_file(&self) -> PathBuf {
        self.dir.join("ready.json")
    }
}

/// `hangar serve` processes on loopback; see the module documentation.
pub struct Cluster {
    hangar: PathBuf,
    env: Vec<(String, String)>,
    members: Vec<Member>,
    /// Killed processes not yet reaped (reaped before a restart and on drop), so that
    /// [`Cluster::kill9`] returns right after the signal.
    killed: Vec<Child>,
    client: reqwest::Client,
    /// The API key the harness sends, if any ([`Cluster::api_key`]).
    key: Option<String>,
    /// The CA the harness trusts for HTTPS members ([`Cluster::https`]).
    ca: Option<PathBuf>,
    // Last field: removed after `Drop::drop` has killed the processes.
    root: tempfile::TempDir,
}

/// Distinct free TCP ports on 127.0.0.1, none of them in `taken` (bound and released; a tiny
/// race with other programs is accepted).
fn free_ports(n: usize, taken: &[u16]) -> Result<Vec<u16>> {
    free_ports_on(IpAddr::V4(Ipv4Addr::LOCALHOST), n, taken)
}

/// Distinct free TCP ports on `ip`, none of them in `taken` (as [`free_ports`]).
fn free_ports_on(ip: IpAddr, n: usize, taken: &[u16]) -> Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let l = std::net::TcpListener::bind((ip, 0))
            .map_err(io(format!("bind a free port on {ip}")))?;
        let port = l.local_addr().map_err(io("read a bound port"))?.port();
        if !taken.contains(&port) {
            ports.push(port);
        }
        held.push(l);
    }
    Ok(ports)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

impl Cluster {
    /// An empty cluster running `hangar` (checked to exist), under a new temporary root.
    pub fn new(hangar: &Path) -> Result<Self> {
        if !hangar.is_file() {
            return Err(ClusterError::NoBinary(hangar.to_owned()));
        }
        let root = tempfile::Builder::new()
            .prefix("hangar-cluster.")
            .tempdir()
            .map_err(io("create a temporary directory"))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .build()
            .map_err(ClusterError::Client)?;
        Ok(Self {
            hangar: hangar.to_owned(),
            env: Vec::new(),
            members: Vec::new(),
            killed: Vec::new(),
            client,
            key: None,
            ca: None,
            root,
        })
    }

    /// Run member `id` with this environment variable too (from its next start; it wins over
    /// [`Cluster::env`]).
    pub fn member_env(&mut self, id: u64, key: &str, value: &str) -> Result<()> {
        let i = self.index(id)?;
        self.members[i].env.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Send this API key (X-API-Key) with the harness's own requests (status polls), for a
    /// cluster with `auth` on.
    pub fn api_key(mut self, key: &str) -> Result<Self> {
        self.key = Some(key.to_owned());
        self.client = self.harness_client()?;
        Ok(self)
    }

    /// Members serve HTTPS (`server.tls`) with certificates of the CA in `ca_pem`: their URLs
    /// start with `https://` and the harness trusts that CA. Call before adding members.
    pub fn https(mut self, ca_pem: &Path) -> Result<Self> {
        self.ca = Some(ca_pem.to_owned());
        for m in &mut self.members {
            m.scheme = "https";
        }
        self.client = self.harness_client()?;
        Ok(self)
    }

    /// The harness's own client: its API key and trusted CA, if any.
    fn harness_client(&self) -> Result<reqwest::Client> {
        let mut b = reqwest::Client::builder();
        if let Some(key) = &self.key {
            let mut headers = reqwest::header::HeaderMap::new();
            let v = reqwest::header::HeaderValue::from_str(key)
                .map_err(|e| ClusterError::BadApiKey(e.to_string()))?;
            headers.insert("x-api-key", v);
            b = b.default_headers(headers);
        }
        if let Some(ca) = &self.ca {
            b = b.tls_backend_preconfigured(crate::tls_config(&[ca], None));
        }
        b.build().map_err(ClusterError::Client)
    }

    /// Run every node with this environment variable too.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The temporary root directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Add a member (not started): new ports, a directory `node<id>`, and `args` appended to
    /// its command line. Write its config with [`Cluster::write_config`] before starting it.
    pub fn add(&mut self, id: u64, args: &[&str]) -> Result<&Member> {
        if self.member(id).is_some() {
            return Err(ClusterError::Duplicate(id));
        }
        let ports = free_ports(2, &self.taken_ports())?;
        let dir = self.root.path().join(format!("node{id}"));
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        self.members.push(Member {
            id,
            http: format!("127.0.0.1:{}", ports[0]),
            raft: format!("127.0.0.1:{}", ports[1]),
            advertise: None,
            dir,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
            child: None,
            starts: 0,
            scheme: if self.ca.is_some() { "https" } else { "http" },
        });
        Ok(&self.members[self.members.len() - 1])
    }

    /// Every port a member uses (HTTP, Raft, advertised Raft).
    fn taken_ports(&self) -> Vec<u16> {
        self.members
            .iter()
            .flat_map(|m| {
                [port_of(&m.http), port_of(&m.raft)]
                    .into_iter()
                    .chain(m.advertise.as_deref().map(port_of))
            })
            .collect()
    }

    /// Add a member (not started) like [`Cluster::add`], whose Raft listener binds a free
    /// port of `raft_ip` and which advertises `advertise_ip:PORT2` (another free port) as
    /// its Raft address (`--advertise-addr`); its HTTP API stays on 127.0.0.1. Something else
    /// (a proxy) must listen at the advertised address and forward to the bound one; the
    /// static peers of [`Cluster::static_peers_config`] name the advertised address. Since
    /// a node's outgoing Raft connections leave from the IP its listener binds, a distinct
    /// `raft_ip` per member tells the members apart by source IP.
    pub fn add_with_ips(
        &mut self,
        id: u64,
        raft_ip: IpAddr,
        advertise_ip: IpAddr,
        args: &[&str],
    ) -> Result<&Member> {
        if self.member(id).is_some() {
            return Err(ClusterError::Duplicate(id));
        }
        let mut taken = self.taken_ports();
        let raft = free_ports_on(raft_ip, 1, &taken)?[0];
        taken.push(raft);
        let advertise = free_ports_on(advertise_ip, 1, &taken)?[0];
        // An ordinary member (HTTP on 127.0.0.1), then its Raft addresses.
        self.add(id, args)?;
        let i = self.index(id)?;
        let m = &mut self.members[i];
        m.raft = std::net::SocketAddr::new(raft_ip, raft).to_string();
        m.advertise = Some(std::net::SocketAddr::new(advertise_ip, advertise).to_string());
        Ok(&self.members[i])
    }

    /// Write member `id`'s config file (read at its next start).
    pub fn write_config(&self, id: u64, yaml: &str) -> Result<()> {
        let path = self.get(id)?.config_path();
        std::fs::write(&path, yaml).map_err(io(format!("write {}", path.display())))
    }

    /// A config: `head` (top-level keys), then `cluster:` with `cluster_extra` (indented
    /// keys) and every member as a static peer (at its [`Member::advertise_addr`]).
    pub fn static_peers_config(&self, head: &str, cluster_extra: &str) -> String {
        let mut s = format!("{head}cluster:\n{cluster_extra}  peers:\n");
        for m in &self.members {
            let _ = writeln!(
                s,
                "    - {{node_id: {}, raft_addr: \"{}\", api_addr: \"{}\"}}",
                m.id,
                m.advertise_addr(),
                m.http
            );
        }
        s
    }

    /// Every member, in the order added.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Member `id`.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn get(&self, id: u64) -> Result<&Member> {
        self.member(id).ok_or(ClusterError::NoSuchNode(id))
    }

    fn index(&self, id: u64) -> Result<usize> {
        self.members
            .iter()
            .position(|m| m.id == id)
            .ok_or(ClusterError::NoSuchNode(id))
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Ids of the running nodes.
    pub fn alive(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.alive())
            .map(|m| m.id)
            .collect()
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(Member::pid).collect()
    }

    /// `host:port` of a node's HTTP API (empty for an unknown id).
    pub fn http(&self, id: u64) -> &str {
        self.member(id).map_or("", |m| m.http.as_str())
    }

    /// Start every member that is not running, then wait until each has written its ready file.
    pub async fn start_all(&mut self) -> Result<()> {
        let stopped: Vec<u64> = self
            .members
            .iter()
            .filter(|m| !m.alive())
            .map(|m| m.id)
            .collect();
        for &id in &stopped {
            self.spawn(self.index(id)?)?;
        }
        for &id in &stopped {
            self.wait_ready(self.index(id)?).await?;
        }
        Ok(())
    }

    /// Start member `id` (again, on its data directory and ports); returns once it has
    /// written its ready file.
    pub async fn start(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        if self.members[i].alive() {
            return Err(ClusterError::Running(id));
        }
        // Reap what was killed (the RocksDB lock is free once it is gone).
        for mut c in self.killed.drain(..) {
            let _ = c.wait();
        }
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        m.starts += 1;
        let ready = m.ready_file();
        let _ = std::fs::remove_file(&ready);
        let log_path = m.log_path();
        let log = File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("duplicate a log file handle"))?;
        let child = Command::new(&self.hangar)
            .arg("serve")
            .arg("--config")
            .arg(m.config_path())
            .args(["--listen", &m.http])
            .args(["--raft-addr", &m.raft])
            .args(["--node-id", &m.id.to_string()])
            .args(
                m.advertise
                    .iter()
                    .flat_map(|a| ["--advertise-addr", a.as_str()]),
            )
            .arg("--data-dir")
            .arg(m.data_dir())
            .arg("--ready-file")
            .arg(&ready)
            .args(&m.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("start {}", self.hangar.display())))?;
        m.child = Some(child);
        Ok(())
    }

    /// Fail when a node that should run has exited.
    pub fn check_alive(&mut self, during: &str) -> Result<()> {
        for m in &mut self.members {
            if let Some(c) = &mut m.child
                && let Ok(Some(status)) = c.try_wait()
            {
                m.child = None;
                return Err(ClusterError::Exited {
                    node: m.id,
                    during: during.to_owned(),
                    status: status.to_string(),
                    log: tail(&m.log_path(), 20),
                });
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, i: usize) -> Result<()> {
        let ready = self.members[i].ready_file();
        let what = format!("node {} writes its ready file", self.members[i].id);
        let waited = Wait::new(&what, START_LIMIT)
            .step(POLL)
            .try_poll_async(async || {
                self.check_alive(&what)?;
                Ok(ready.exists().then_some(()))
            })
            .await?;
        waited.map_err(|t| timeout(t, tail(&self.members[i].log_path(), 10)))
    }

    /// SIGKILL node `id`; returns the instant right after the signal was sent (the process
    /// is reaped later).
    pub fn kill9(&mut self, id: u64) -> Result<Instant> {
        let i = self.index(id)?;
        let mut child = self.members[i]
            .child
            .take()
            .ok_or(ClusterError::NotRunning(id))?;
        child.kill().map_err(io(format!("kill -9 node {id}")))?;
        let at = Instant::now();
        self.killed.push(child);
        Ok(at)
    }

    /// Same as [`Cluster::start`]: start node `id` again after a kill or a stop.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.start(id).await
    }

    /// SIGTERM node `id` and wait for it to exit (killed after [`STOP_LIMIT`]); its exit
    /// code, `None` when it had to be killed or died of a signal.
    pub async fn terminate(&mut self, id: u64) -> Result<Option<i32>> {
        let i = self.index(id)?;
        let mut child = self.members[i]
            .child
            .take()
            .ok_or(ClusterError::NotRunning(id))?;
        let sent = Command::new("kill")
            .args(["-s", "TERM", &child.id().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            self.killed.push(child);
            return Ok(None);
        }
        let exited = Wait::new(format!("node {id} to stop"), STOP_LIMIT)
            .step(POLL)
            .poll_async(async || child.try_wait().ok().flatten())
            .await;
        match exited {
            Ok(status) => Ok(status.code()),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(None)
            }
        }
    }

    /// GET a path of node `id`'s API as JSON, bounded by `limit`; `None` unless it answers
    /// 200 with JSON.
    pub async fn get_json(&self, id: u64, path: &str, limit: Duration) -> Option<Value> {
        let url = self.member(id)?.url(path);
        let r = self.client.get(url).timeout(limit).send().await.ok()?;
        if r.status() != reqwest::StatusCode::OK {
            return None;
        }
        serde_json::from_slice(&r.bytes().await.ok()?).ok()
    }

    /// Node `id`'s own view (`GET /api/cluster/status?local=true`).
    pub async fn local_status(&self, id: u64, limit: Duration) -> Option<Value> {
        self.get_json(id, "/api/cluster/status?local=true", limit)
            .await
    }

    /// Wait until every running node reports the same leader, and that leader is running.
    pub async fn wait_leader(&mut self, limit: Duration) -> Result<u64> {
        let mut reports: Vec<Option<Value>> = Vec::new();
        let waited = Wait::new("the running nodes agree on a running leader", limit)
            .step(POLL)
            .try_poll_async(async || {
                self.check_alive("waiting for a leader")?;
                let alive = self.alive();
                reports.clear();
                for &id in &alive {
                    reports.push(self.local_status(id, Duration::from_secs(1)).await);
                }
                Ok(agreed_leader(&reports, &alive))
            })
            .await?;
        waited.map_err(|t| {
            let seen: Vec<String> = reports
                .iter()
                .map(|r| r.as_ref().map_or("no answer".into(), Value::to_string))
                .collect();
            timeout(t, seen.join("; "))
        })
    }

    /// Wait until the leader lists every member as reachable and node `id` has applied at
    /// least the leader's commit index as of this call.
    pub async fn wait_caught_up(&mut self, id: u64, limit: Duration) -> Result<()> {
        let leader = self.wait_leader(limit).await?;
        let target = self
            .local_status(leader, Duration::from_secs(2))
            .await
            .and_then(|s| s["committed_index"].as_u64())
            .unwrap_or(0);
        let members = self.members.len();
        let mut last = None;
        let what = format!("node {id} applies up to index {target} (leader {leader})");
        let waited = Wait::new(what, limit)
            .step(POLL)
            .try_poll_async(async || {
                self.check_alive("waiting for a node to catch up")?;
                let full = self
                    .get_json(leader, "/api/cluster/status", Duration::from_secs(3))
                    .await;
                if full
                    .as_ref()
                    .is_some_and(|s| member_caught_up(s, id, members, target))
                {
                    return Ok(Some(()));
                }
                last = full.or(last.take());
                Ok(None)
            })
            .await?;
        waited.map_err(|t| timeout(t, last.map_or("no status".into(), |v| v.to_string())))
    }

    /// The last lines of every node's current log, for error reports.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        for m in &self.members {
            let _ = writeln!(
                s,
                "--- node {} ({}) ---\n{}",
                m.id,
                m.log_path().display(),
                tail(&m.log_path(), lines)
            );
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self
            .members
            .iter_mut()
            .filter_map(|m| m.child.take())
            .chain(self.killed.drain(..));
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The leader all `reports` (`GET /api/cluster/status?local=true` of the nodes in `alive`)
/// agree on, if every node answered and that leader is one of `alive`.
pub fn agreed_leader(reports: &[Option<Value>], alive: &[u64]) -> Option<u64> {
    let mut leader = None;
    for r in reports {
        let l = r.as_ref()?.get("leader_id")?.as_u64()?;
        if leader.is_some_and(|x| x != l) {
            return None;
        }
        leader = Some(l);
    }
    leader.filter(|l| alive.contains(l))
}

/// Whether the leader's full status (`GET /api/cluster/status`) lists exactly `members`
/// members, all reachable, and node `id` has applied at least `index`.
pub fn member_caught_up(status: &Value, id: u64, members: usize, index: u64) -> bool {
    let Some(ms) = status.get("members").and_then(Value::as_array) else {
        return false;
    };
    ms.len() == members
        && ms.iter().all(|m| m["reachable"] == Value::Bool(true))
        && ms.iter().any(|m| {
            m["node_id"].as_u64() == Some(id) && m["applied_index"].as_u64() >= Some(index)
        })
}

#[cfg(test)]
mod tests;
