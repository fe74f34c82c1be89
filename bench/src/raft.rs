//! Raft benchmarks on a 3-node loopback cluster of real `hangar serve` processes.
//!
//! * `raft-commit`: closed-loop writes (`POST /api/auth/keys`, one Raft entry each) sent to
//!   the leader and, separately, to a follower (which forwards them to the leader over gRPC);
//!   latency p50/p90/p99/max and writes/s per concurrency level.
//! * `raft-failover`: while a background writer keeps writing, kill -9 the leader and time
//!   (a) the first write acknowledged through a surviving node and (b) the first report of a
//!   new leader by a survivor; restart the killed node on its data directory, wait until it
//!   has caught up, repeat.
//!
//! The nodes are started with static peers (`cluster.peers`), default Raft timings, no MCP
//! servers, random free ports on 127.0.0.1 and data directories under a temporary directory,
//! by the cluster harness shared with the cluster tests ([`hangar_tests::cluster`]). Every
//! child process is killed (SIGKILL) and the directory removed when the [`Cluster`] is
//! dropped: on success, on error, on panic, and — via [`interrupted`] in the binary — on
//! Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hangar_tests::cluster::{Cluster, ClusterError};
use hangar_wait::Wait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::histogram::{HistogramError, Latency, us_to_ms};
use crate::http1::{HttpTarget, RawClient, classify_status, parse_url, simple_request};
use crate::load::{self, LoadError, Plan};
use crate::report::{RunMeta, RunRecord};
use crate::rpc::{CallError, CallTemplate, ErrorKind};
use crate::util::{ArgError, parse_concurrency, parse_duration};

/// Number of nodes in the benchmark cluster.
pub const NODES: usize = 3;
/// The Raft timings the nodes run with (Hangar's defaults; the config sets none).
pub const DEFAULT_TIMINGS: &str = "heartbeat 50 ms, election timeout 250–500 ms";
/// The write every benchmark sends: one API key, i.e. one `CreateApiKey` Raft entry.
pub const WRITE_PATH: &str = "/api/auth/keys";
/// How long the cluster may take to agree on a leader.
const LEADER_LIMIT: Duration = Duration::from_secs(30);
/// How long a restarted node may take to catch up with the leader.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// A Raft benchmark failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RaftBenchError {
    /// Starting, stopping or watching the cluster failed (a node exited, a wait timed out…).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
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
    /// The first write before measuring failed.
    #[error("the preflight write through node {node} failed ({error}); not measuring")]
    Preflight {
        /// Node id.
        node: u64,
        /// The failure.
        error: CallError,
    },
    /// A command-line value is invalid.
    #[error(transparent)]
    Arg(#[from] ArgError),
    /// A command-line value is out of range.
    #[error("{0}")]
    Range(String),
    /// The load generator failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A histogram could not be created.
    #[error(transparent)]
    Histogram(#[from] HistogramError),
    /// The caller could not record a result.
    #[error("cannot record a result: {0}")]
    Emit(Box<dyn std::error::Error + Send + Sync>),
}

type Result<T, E = RaftBenchError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------
// Command-line options
// ---------------------------------------------------------------------------------------

/// Options of `raft-commit`.
#[derive(clap::Args, Clone, Debug)]
pub struct CommitArgs {
    /// The `hangar` binary to run (a release build).
    #[arg(long)]
    pub hangar: PathBuf,
    /// Concurrent writers; a comma list runs one measurement per level and target.
    #[arg(long, default_value = "1,16")]
    pub concurrency: String,
    /// Measured window per level and target, e.g. 10s.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Unmeasured warm-up before each window, e.g. 2s.
    #[arg(long, default_value = "2s")]
    pub warmup: String,
    /// A write without an answer after this long counts as a timeout error.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Options of `raft-failover`.
#[derive(clap::Args, Clone, Debug)]
pub struct FailoverArgs {
    /// The `hangar` binary to run (a release build).
    #[arg(long)]
    pub hangar: PathBuf,
    /// Leader kills (rounds).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Per-request limit of a write probe after a kill (then the next survivor is tried).
    #[arg(long, default_value = "500ms")]
    pub probe_timeout: String,
    /// A round fails when no write succeeds within this long after the kill.
    #[arg(long, default_value = "15s")]
    pub deadline: String,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// A validated `raft-commit` plan.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitPlan {
    /// Concurrency levels.
    pub levels: Vec<usize>,
    /// Warm-up per run.
    pub warmup: Duration,
    /// Measured window per run.
    pub duration: Duration,
    /// Per-write timeout.
    pub timeout: Duration,
}

impl CommitPlan {
    /// Parse and check the options.
    pub fn from_args(a: &CommitArgs) -> Result<Self> {
        let p = Self {
            levels: parse_concurrency(&a.concurrency)?,
            warmup: parse_duration(&a.warmup)?,
            duration: parse_duration(&a.duration)?,
            timeout: parse_duration(&a.timeout)?,
        };
        if p.duration.is_zero() || p.timeout.is_zero() {
            return Err(RaftBenchError::Range(
                "--duration and --timeout must be longer than 0".into(),
            ));
        }
        if p.levels.iter().any(|&c| c > 1024) {
            return Err(RaftBenchError::Range(
                "--concurrency: at most 1024 writers per level".into(),
            ));
        }
        Ok(p)
    }
}

/// A validated `raft-failover` plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverPlan {
    /// Rounds.
    pub kills: usize,
    /// Per-request limit of a probe write.
    pub probe_timeout: Duration,
    /// Per-round limit from the kill to the first acknowledged write.
    pub deadline: Duration,
}

impl FailoverPlan {
    /// Parse and check the options.
    pub fn from_args(a: &FailoverArgs) -> Result<Self> {
        let p = Self {
            kills: a.kills,
            probe_timeout: parse_duration(&a.probe_timeout)?,
            deadline: parse_duration(&a.deadline)?,
        };
        if !(1..=1000).contains(&p.kills) {
            return Err(RaftBenchError::Range("--kills must be 1 … 1000".into()));
        }
        if p.probe_timeout < Duration::from_millis(10) || p.deadline < p.probe_timeout {
            return Err(RaftBenchError::Range(
                "--probe-timeout must be ≥ 10ms and --deadline ≥ --probe-timeout".into(),
            ));
        }
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

/// The YAML head of every node's config: no MCP servers, quiet logs (the static peers follow).
const CONFIG_HEAD: &str = "logging:\n  level: WARNING\nmcp_servers: {}\n";

/// Start [`NODES`] nodes of `hangar` with static peers and wait until every node has written
/// its ready file.
pub async fn start_cluster(hangar: &Path) -> Result<Cluster> {
    if !hangar.is_file() {
        return Err(RaftBenchError::Range(format!(
            "--hangar {}: no such file (build it with cargo build --release -p hangar-node)",
            hangar.display()
        )));
    }
    let mut c = Cluster::new(hangar)?;
    for id in 1..=NODES as u64 {
        c.add(id, &[])?;
    }
    let config = c.static_peers_config(CONFIG_HEAD, "");
    for id in c.ids() {
        c.write_config(id, &config)?;
    }
    c.start_all().await?;
    Ok(c)
}

// ---------------------------------------------------------------------------------------
// Reading the cluster's state (pure parts are unit-tested)
// ---------------------------------------------------------------------------------------

/// A new leader (not `old`) reported by a node's local status.
pub fn new_leader(report: &Value, old: u64) -> Option<u64> {
    report
        .get("leader_id")
        .and_then(Value::as_u64)
        .filter(|&l| l != old)
}

async fn get_json(addr: &str, path: &str, limit: Duration) -> Option<Value> {
    let (status, body) = tokio::time::timeout(limit, simple_request(addr, "GET", path, &[], b""))
        .await
        .ok()?
        .ok()?;
    (status == 200).then_some(())?;
    serde_json::from_slice(&body).ok()
}

async fn local_status(addr: &str, limit: Duration) -> Option<Value> {
    get_json(addr, "/api/cluster/status?local=true", limit).await
}

fn key_body(name: &str) -> Vec<u8> {
    serde_json::json!({"principal_id": "svc", "name": name})
        .to_string()
        .into_bytes()
}

/// One key creation on a new connection, bounded by `limit`.
async fn post_key(addr: &str, name: &str, limit: Duration) -> Result<(), CallError> {
    let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
    let body = key_body(name);
    match tokio::time::timeout(
        limit,
        simple_request(addr, "POST", WRITE_PATH, &headers, &body),
    )
    .await
    {
        Ok(Ok((status, body))) => classify_status(status, &body),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CallError::new(
            ErrorKind::Timeout,
            format!("no answer within {limit:?}"),
        )),
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM with the signal's name.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let int = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            () = int => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            int.await;
            "SIGINT"
        }
    }
}

// ---------------------------------------------------------------------------------------
// raft-commit
// ---------------------------------------------------------------------------------------

/// Label of the runs that write to the leader.
pub const LEADER_LABEL: &str = "raft-leader";
/// Label of the runs that write to a follower (forwarded to the leader).
pub const FOLLOWER_LABEL: &str = "raft-follower";

/// The leader's term, from its local status.
async fn term_of(cluster: &Cluster, id: u64) -> Option<u64> {
    cluster
        .local_status(id, Duration::from_secs(2))
        .await
        .and_then(|s| s["term"].as_u64())
}

/// Run the commit benchmark; `emit` receives each run's record as soon as it is measured.
pub async fn commit(
    hangar: &Path,
    plan: &CommitPlan,
    mut emit: impl FnMut(&RunRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<()> {
    let mut cluster = start_cluster(hangar).await?;
    let result = commit_on(&mut cluster, plan, &mut emit).await;
    if result.is_err() {
        eprintln!(
            "hangar-bench: last lines of the node logs:\n{}",
            cluster.logs_tail(15)
        );
    }
    result
}

async fn commit_on(
    cluster: &mut Cluster,
    plan: &CommitPlan,
    emit: &mut impl FnMut(&RunRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<()> {
    let leader = cluster.wait_leader(LEADER_LIMIT).await?;
    for id in cluster.ids() {
        cluster.wait_caught_up(id, CATCH_UP_LIMIT).await?;
    }
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .unwrap_or(leader);
    eprintln!(
        "hangar-bench: 3-node cluster up (leader {leader}, follower used: {follower}); {DEFAULT_TIMINGS}"
    );
    for (label, id) in [(LEADER_LABEL, leader), (FOLLOWER_LABEL, follower)] {
        if let Err(error) = post_key(
            cluster.http(id),
            &format!("preflight-{label}"),
            Duration::from_secs(15),
        )
        .await
        {
            return Err(RaftBenchError::Preflight { node: id, error });
        }
    }
    let template = CallTemplate::around_id(r#"{"principal_id":"svc","name":"raft-bench-"#, r#""}"#);
    let mut run_no: u64 = 0;
    for &c in &plan.levels {
        for (label, id) in [(LEADER_LABEL, leader), (FOLLOWER_LABEL, follower)] {
            run_no += 1;
            let url = format!("http://{}{WRITE_PATH}", cluster.http(id));
            let target = HttpTarget {
                url: parse_url(&url).map_err(|e| RaftBenchError::Range(e.to_string()))?,
                protocol_version: String::new(),
                headers: Vec::new(),
            };
            // Ids (the key names' suffix) are distinct across runs and workers.
            let callers = (0..c)
                .map(|i| {
                    RawClient::rest(
                        &target,
                        template.clone(),
                        (run_no << 48) | ((i as u64) << 32),
                    )
                })
                .collect();
            let load_plan = Plan {
                warmup: plan.warmup,
                duration: plan.duration,
                timeout: plan.timeout,
                server_pids: cluster.pids(),
            };
            let term_before = term_of(cluster, leader).await;
            let (_, stats) = load::run(callers, &load_plan).await?;
            let term_after = term_of(cluster, leader).await;
            cluster.check_alive("measuring")?;
            if term_before.is_none() || term_before != term_after {
                eprintln!(
                    "hangar-bench: WARNING: the leader's term changed during the {label} c={c} run ({term_before:?} → {term_after:?}): an election happened under load"
                );
            }
            let mut rec = RunRecord::new(
                RunMeta {
                    mode: "http".into(),
                    label: label.into(),
                    client: "raw".into(),
                    target: url,
                    tool: format!("POST {WRITE_PATH}"),
                    concurrency: c,
                    warmup_s: plan.warmup.as_secs_f64(),
                },
                &stats,
            );
            rec.bench = "raft-commit".into();
            emit(&rec).map_err(RaftBenchError::Emit)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// raft-failover
// ---------------------------------------------------------------------------------------

/// Percentiles of a series of durations, ms (0.1 ms resolution; nearest rank, HDR histogram).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MsSummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile (with fewer than 100 samples: the largest).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Smallest.
    pub min_ms: f64,
}

impl MsSummary {
    /// Summarise durations.
    pub fn of(samples: &[Duration]) -> Result<Self, HistogramError> {
        let mut l = Latency::new()?;
        for &d in samples {
            l.record(d);
        }
        let s = l.summary();
        Ok(Self {
            count: s.count,
            p50_ms: us_to_ms(s.p50_us),
            p90_ms: us_to_ms(s.p90_us),
            p99_ms: us_to_ms(s.p99_us),
            max_ms: us_to_ms(s.max_us),
            min_ms: us_to_ms(s.min_us),
        })
    }
}

/// The result of `raft-failover`, written as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// Always `raft-failover`.
    pub bench: String,
    /// Rounds (leader kills) completed.
    pub kills: u64,
    /// Raft timings of the nodes.
    pub timings: String,
    /// Per-request limit of the write probes, ms.
    pub probe_timeout_ms: f64,
    /// kill -9 → first write acknowledged through a surviving node.
    pub first_write: MsSummary,
    /// kill -9 → a survivor first reports a new leader (`None` if never seen in some round).
    pub new_leader: Option<MsSummary>,
    /// Every round's kill → first write, ms, in round order.
    pub first_write_ms: Vec<f64>,
    /// Every round's kill → new leader reported, ms (missing rounds left out).
    pub new_leader_ms: Vec<f64>,
    /// Write probes sent after the kills (all rounds).
    pub probes: u64,
    /// Writes of the background writer acknowledged during the whole run.
    pub background_ok: u64,
    /// Writes of the background writer that failed (includes the killed node refusing).
    pub background_errors: u64,
}

/// Keeps writing keys round robin over every node (running or not) until stopped.
struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundWriter {
    fn start(addrs: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (s, o, e) = (stop.clone(), ok.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let addr = &addrs[(n as usize) % addrs.len()];
                n += 1;
                match post_key(addr, &format!("bg-{n}"), Duration::from_secs(2)).await {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                        // A killed node refuses at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
        Self {
            stop,
            ok,
            errors,
            task,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        (
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Write probes round robin over `survivors` from `killed_at` until one is acknowledged:
/// (time since the kill, node that acknowledged, probes sent).
async fn first_write(
    survivors: &[(u64, String)],
    round: usize,
    killed_at: Instant,
    plan: &FailoverPlan,
) -> Result<(Duration, u64, u64)> {
    let deadline = killed_at + plan.deadline;
    let mut probes: u64 = 0;
    let mut last = None;
    loop {
        let now = Instant::now();
        if now >= deadline || survivors.is_empty() {
            return Err(RaftBenchError::Timeout {
                what: format!("round {round}: a write acknowledged through a surviving node"),
                after: plan.deadline,
                detail: format!("{probes} probes, last error: {last:?}"),
            });
        }
        let (id, addr) = &survivors[(probes as usize) % survivors.len()];
        probes += 1;
        let limit = plan.probe_timeout.min(deadline - now);
        match post_key(addr, &format!("failover-{round}-{probes}"), limit).await {
            Ok(()) => return Ok((killed_at.elapsed(), *id, probes)),
            Err(e) => {
                // Survivors hold writes until a leader is known; an instant error (e.g. 503)
                // must not turn this into a busy loop.
                if now.elapsed() < Duration::from_millis(2) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                last = Some(e);
            }
        }
    }
}

/// Poll the survivors' local status until one reports a leader other than `old`.
async fn first_new_leader(
    survivors: &[(u64, String)],
    old: u64,
    killed_at: Instant,
    limit: Duration,
) -> Option<(Duration, u64)> {
    let left = limit.saturating_sub(killed_at.elapsed());
    Wait::new("a survivor reports a new leader", left)
        .step(Duration::from_millis(5))
        .poll_async(async || {
            for (_, addr) in survivors {
                if let Some(s) = local_status(addr, Duration::from_millis(200)).await
                    && let Some(l) = new_leader(&s, old)
                {
                    return Some((killed_at.elapsed(), l));
                }
            }
            None
        })
        .await
        .ok()
}

/// Run the failover benchmark.
pub async fn failover(hangar: &Path, plan: &FailoverPlan) -> Result<FailoverRecord> {
    let mut cluster = start_cluster(hangar).await?;
    let result = failover_on(&mut cluster, plan).await;
    if result.is_err() {
        eprintln!(
            "hangar-bench: last lines of the node logs:\n{}",
            cluster.logs_tail(15)
        );
    }
    result
}

async fn failover_on(cluster: &mut Cluster, plan: &FailoverPlan) -> Result<FailoverRecord> {
    cluster.wait_leader(LEADER_LIMIT).await?;
    for id in cluster.ids() {
        cluster.wait_caught_up(id, CATCH_UP_LIMIT).await?;
    }
    let writer = BackgroundWriter::start(
        cluster
            .ids()
            .iter()
            .map(|&id| cluster.http(id).to_owned())
            .collect(),
    );
    let result = rounds(cluster, plan).await;
    let (background_ok, background_errors) = writer.finish().await;
    let (writes, leaders, probes) = result?;
    let ms = |d: &Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    Ok(FailoverRecord {
        bench: "raft-failover".into(),
        kills: writes.len() as u64,
        timings: DEFAULT_TIMINGS.into(),
        probe_timeout_ms: plan.probe_timeout.as_secs_f64() * 1e3,
        first_write: MsSummary::of(&writes)?,
        new_leader: if leaders.len() == writes.len() {
            Some(MsSummary::of(&leaders)?)
        } else {
            None
        },
        first_write_ms: writes.iter().map(ms).collect(),
        new_leader_ms: leaders.iter().map(ms).collect(),
        probes,
        background_ok,
        background_errors,
    })
}

type Rounds = (Vec<Duration>, Vec<Duration>, u64);

async fn rounds(cluster: &mut Cluster, plan: &FailoverPlan) -> Result<Rounds> {
    let mut writes = Vec::with_capacity(plan.kills);
    let mut leaders = Vec::with_capacity(plan.kills);
    let mut probes_total = 0;
    for round in 1..=plan.kills {
        let leader = cluster.wait_leader(LEADER_LIMIT).await?;
        let survivors: Vec<(u64, String)> = cluster
            .alive()
            .into_iter()
            .filter(|&id| id != leader)
            .map(|id| (id, cluster.http(id).to_owned()))
            .collect();
        let killed_at = cluster.kill9(leader)?;
        let (write, elected) = tokio::join!(
            first_write(&survivors, round, killed_at, plan),
            first_new_leader(&survivors, leader, killed_at, plan.deadline),
        );
        let (took, via, probes) = write?;
        probes_total += probes;
        writes.push(took);
        if let Some((d, _)) = elected {
            leaders.push(d);
        }
        eprintln!(
            "round {round:>3}/{}: killed leader {leader}; new leader {} reported after {}; first write after {:.1} ms via node {via} ({probes} probes)",
            plan.kills,
            elected.map_or("?".into(), |(_, l)| l.to_string()),
            elected.map_or("-".into(), |(d, _)| format!(
                "{:.1} ms",
                d.as_secs_f64() * 1e3
            )),
            took.as_secs_f64() * 1e3,
        );
        cluster.restart(leader).await?;
        cluster.wait_caught_up(leader, CATCH_UP_LIMIT).await?;
    }
    Ok((writes, leaders, probes_total))
}

#[cfg(test)]
mod tests;
