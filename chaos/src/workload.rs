//! The workloads: logical clients that drive the REST API and `/mcp` of random nodes, one
//! operation at a time, and record every operation in the history ([`Recorder`]).
//!
//! Four workloads, each run by [`Workload::processes`] logical clients:
//!
//! * **register** ([`WorkloadKind::Register`]): registers `r0`, `r1`, … are the rate limits
//!   `chaos-r0`, … (whose `match` glob, `chaos-none-*`, matches no tool, so they throttle
//!   nothing). Half the operations write a unique, increasing integer as the limit's `rps`
//!   (`PUT /api/rate_limits/{id}`), half read it back (linearizable `GET /api/rate_limits`).
//! * **set** ([`WorkloadKind::Set`]): the set `keys` is the API keys named `chaos-<process>-<n>`.
//!   A third of the operations add one (`POST /api/auth/keys`; only its name is recorded, never
//!   the secret the node returns), two thirds read the whole set (linearizable
//!   `GET /api/auth/keys`).
//! * **calls** ([`WorkloadKind::Calls`]): `tools/call` of an echo tool through `/mcp`, with a
//!   unique message; the value is the text the tool answered.
//! * **events** ([`WorkloadKind::Events`]): `GET /api/events?since=0&limit=10000` (a plain,
//!   possibly stale read), recorded as `[{"seq", "id"}]`.
//!
//! For long runs two options bound what each read records (the history would otherwise grow
//! with the square of the run's length): [`Workload::set_period`] starts a new set every
//! period (set `<set_key>-g<n>`: the keys of principal `chaos-g<n>`, named
//! `chaos-g<n>-<process>-<k>`, read with `?principal_id=chaos-g<n>`), and
//! [`Workload::events_tail`] makes each event-log read start that many events before the
//! last one the client saw on that node.
//!
//! Every operation goes to a node drawn from a seeded generator among all targets, dead or
//! alive (a request to a dead node simply fails). Its outcome follows the rules of
//! [`classify`]. After an operation ends `Info` the client continues as a new process (a
//! process with a pending operation never invokes another one), so process numbers are unique
//! and a process's `Info` operation is its last. After a `Fail` the client pauses
//! ([`Workload::fail_backoff`]) so that a dead node is not hammered.
//!
//! [`final_reads`] reads every register, the set and the whole event log on every node after
//! the faults have stopped; [`stats`] summarises a history.

pub mod classify;
mod ops;
pub mod recorder;
pub mod stats;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::history::{Op, OpKind, Outcome};
use ops::Done;
pub use recorder::{Invocation, Recorder, read_history};
pub use stats::{
    Stats, WorkloadStats, latency_during, stats, unavailability, unavailability_during,
};

/// The id of the fixture MCP server the calls workload expects by default.
pub const DEFAULT_SERVER: &str = "chaos";

/// The key of event-log operations.
pub const EVENTS_KEY: &str = "events";

/// The prefix of the set's element names (`chaos-<process>-<n>`) and of the register's
/// rate-limit ids (`chaos-<key>`).
pub const NAME_PREFIX: &str = "chaos-";

/// One of the workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Registers on rate-limit definitions (`Write` / `Read`).
    Register,
    /// A grow-only set of API keys (`Add` / `ReadSet`).
    Set,
    /// Tool calls through `/mcp` (`Call`).
    Calls,
    /// Event-log reads (`Events`).
    Events,
}

impl WorkloadKind {
    /// Every workload.
    pub const ALL: [WorkloadKind; 4] = [
        WorkloadKind::Register,
        WorkloadKind::Set,
        WorkloadKind::Calls,
        WorkloadKind::Events,
    ];

    /// Its name (`register`, `set`, `calls`, `events`).
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Set => "set",
            WorkloadKind::Calls => "calls",
            WorkloadKind::Events => "events",
        }
    }

    /// The workload an operation kind belongs to.
    pub fn of(kind: OpKind) -> WorkloadKind {
        match kind {
            OpKind::Write | OpKind::Read => WorkloadKind::Register,
            OpKind::Add | OpKind::ReadSet => WorkloadKind::Set,
            OpKind::Call => WorkloadKind::Calls,
            OpKind::Events => WorkloadKind::Events,
        }
    }

    /// Whether operations of `kind` belong to this workload.
    pub fn covers(self, kind: OpKind) -> bool {
        Self::of(kind) == self
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkloadKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        WorkloadKind::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .with_context(|| format!("unknown workload {s:?}: register, set, calls or events"))
    }
}

/// What the clients do.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// The workloads to run.
    pub workloads: Vec<WorkloadKind>,
    /// Logical clients per workload.
    pub processes: usize,
    /// The register keys (each is the rate limit `chaos-<key>`).
    pub register_keys: Vec<String>,
    /// The key of the set's operations.
    pub set_key: String,
    /// The echo tool the calls workload calls (`<server>__echo`); it takes `message` and
    /// answers it as text.
    pub call_tool: String,
    /// How long a client waits for one request (shorter than a typical fault, so that
    /// `Info` operations do not pile up).
    pub request_timeout: Duration,
    /// How long a client pauses after a `Fail` (a dead node refuses at once).
    pub fail_backoff: Duration,
    /// How long an events client pauses between two reads. Each read records the whole log
    /// (about 60 bytes per event), so this bounds the size of the history.
    pub events_interval: Duration,
    /// How long [`final_reads`] keeps retrying a read that fails.
    pub final_read_limit: Duration,
    /// Start a new set every this long (`None`: one set for the whole run); see the module
    /// documentation.
    pub set_period: Option<Duration>,
    /// Event-log reads start this many events before the last one the client read on the
    /// same node (`None`: from the start of the log).
    pub events_tail: Option<u64>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            workloads: WorkloadKind::ALL.to_vec(),
            processes: 3,
            register_keys: (0..3).map(|i| format!("r{i}")).collect(),
            set_key: "keys".to_owned(),
            call_tool: format!("{DEFAULT_SERVER}__echo"),
            request_timeout: Duration::from_secs(2),
            fail_backoff: Duration::from_millis(100),
            events_interval: Duration::from_millis(250),
            final_read_limit: Duration::from_secs(30),
            set_period: None,
            events_tail: None,
        }
    }
}

impl Workload {
    /// The rate-limit id of register `key`.
    pub fn limit_id(key: &str) -> String {
        format!("{NAME_PREFIX}{key}")
    }

    /// The name of the `n`-th element added by `process`.
    pub fn element_name(process: u64, n: u64) -> String {
        format!("{NAME_PREFIX}{process}-{n}")
    }

    /// The generation of the set at `now_ns` (`None` without [`Workload::set_period`]).
    pub fn set_generation(&self, now_ns: u64) -> Option<u64> {
        self.set_period
            .map(|p| now_ns / u64::try_from(p.as_nanos()).unwrap_or(u64::MAX).max(1))
    }

    /// The key of the set of generation `generation`.
    pub fn set_key_of(&self, generation: Option<u64>) -> String {
        match generation {
            None => self.set_key.clone(),
            Some(g) => format!("{}-g{g}", self.set_key),
        }
    }

    /// The principal the elements of generation `generation` are created for.
    fn set_principal(generation: Option<u64>) -> String {
        match generation {
            None => "chaos".to_owned(),
            Some(g) => format!("chaos-g{g}"),
        }
    }

    /// The prefix of the element names of generation `generation`.
    fn set_prefix(generation: Option<u64>) -> String {
        match generation {
            None => NAME_PREFIX.to_owned(),
            Some(g) => format!("{NAME_PREFIX}g{g}-"),
        }
    }

    /// Refuse a configuration that cannot run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.processes > 0, "at least one process per workload");
        anyhow::ensure!(
            self.set_period.is_none_or(|p| !p.is_zero()),
            "the set period must be positive"
        );
        anyhow::ensure!(
            !self.workloads.contains(&WorkloadKind::Register) || !self.register_keys.is_empty(),
            "the register workload needs at least one key"
        );
        anyhow::ensure!(
            !self.request_timeout.is_zero(),
            "the request timeout must be positive"
        );
        for key in &self.register_keys {
            let id = Self::limit_id(key);
            anyhow::ensure!(
                id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
                "register key {key:?}: rate-limit ids are 1-64 characters of A-Z a-z 0-9 _ - ."
            );
        }
        Ok(())
    }
}

/// The HTTP client of the workloads: `timeout` for each whole request, no proxy from the
/// environment, no redirects (a redirected write would be sent twice), rustls with ring.
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("build the workload HTTP client")
}

/// The process a client continues as after an operation with `outcome` by `process`: a new
/// one after `Info` (the operation stays pending forever), the same one otherwise.
pub fn process_after(outcome: Outcome, process: u64, recorder: &Recorder) -> u64 {
    match outcome {
        Outcome::Info => recorder.new_process(),
        Outcome::Ok | Outcome::Fail => process,
    }
}

/// Run the configured workloads against `targets` (`(node id, base URL)`) until `stop`
/// turns true (or its sender is dropped), recording every operation in `recorder`. Each
/// client finishes the operation it is running, so this returns at most one request
/// timeout after the stop. `seed` fixes every client's choices (operations, keys, nodes).
pub async fn run(
    targets: Vec<(u64, String)>,
    cfg: Workload,
    recorder: Recorder,
    stop: watch::Receiver<bool>,
    seed: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(!targets.is_empty(), "no nodes to send the workload to");
    cfg.validate()?;
    let http = http_client(cfg.request_timeout)?;
    let targets: Arc<[(u64, String)]> = targets.into();
    let cfg = Arc::new(cfg);
    let register_values = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    for &workload in &cfg.workloads {
        for slot in 0..cfg.processes {
            let client = Client {
                workload,
                http: http.clone(),
                targets: targets.clone(),
                cfg: cfg.clone(),
                process: recorder.new_process(),
                recorder: recorder.clone(),
                rng: StdRng::seed_from_u64(client_seed(seed, workload, slot)),
                sent: 0,
                register_values: register_values.clone(),
                events_seen: BTreeMap::new(),
            };
            tasks.spawn(client.run(stop.clone()));
        }
    }
    let mut failed = None;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            failed.get_or_insert(e);
        }
    }
    recorder.flush()?;
    match failed {
        Some(e) => Err(anyhow::anyhow!("a workload client failed: {e}")),
        None => Ok(()),
    }
}

/// After the faults: on every node, read every register, the set and the whole event log
/// (all linearizable), each retried until it succeeds or [`Workload::final_read_limit`] has
/// passed; every attempt is recorded. Returns the reads that never succeeded
/// (`"node N: what"`; empty when all did).
pub async fn final_reads(
    targets: &[(u64, String)],
    cfg: &Workload,
    recorder: &Recorder,
) -> anyhow::Result<Vec<String>> {
    let http = http_client(cfg.request_timeout.max(Duration::from_secs(5)))?;
    let deadline = Instant::now() + cfg.final_read_limit;
    let mut plans: Vec<Plan> = cfg
        .register_keys
        .iter()
        .map(|key| Plan::Read { key: key.clone() })
        .collect();
    match cfg.set_generation(recorder.now_ns()) {
        None => plans.push(Plan::ReadSet { generation: None }),
        Some(last) => plans.extend((0..=last).map(|g| Plan::ReadSet {
            generation: Some(g),
        })),
    }
    plans.push(Plan::AllEvents);
    let per_node = targets.iter().map(|(node, base)| {
        let (http, plans) = (&http, &plans);
        async move {
            let mut missing = Vec::new();
            let process = recorder.new_process();
            for plan in plans {
                loop {
                    let op = perform(http, cfg, recorder, process, *node, base, plan).await;
                    if op.outcome == Outcome::Ok {
                        break;
                    }
                    if Instant::now() >= deadline {
                        missing.push(format!("node {node}: {}", plan.describe(cfg)));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            missing
        }
    });
    let missing = futures::future::join_all(per_node).await.concat();
    recorder.flush()?;
    Ok(missing)
}

/// A seed per client, mixed from the run's seed (splitmix64).
fn client_seed(seed: u64, workload: WorkloadKind, slot: usize) -> u64 {
    let mut z = seed ^ ((workload as u64) << 32) ^ slot as u64;
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One planned operation.
#[derive(Clone, Debug, PartialEq)]
enum Plan {
    Write {
        key: String,
        value: u64,
    },
    Read {
        key: String,
    },
    Add {
        name: String,
        generation: Option<u64>,
    },
    ReadSet {
        generation: Option<u64>,
    },
    Call {
        message: String,
    },
    /// The first page of the event log after `since`, plain read (the events workload).
    Events {
        since: u64,
    },
    /// The whole event log, linearizable (final reads).
    AllEvents,
}

impl Plan {
    fn kind(&self) -> OpKind {
        match self {
            Plan::Write { .. } => OpKind::Write,
            Plan::Read { .. } => OpKind::Read,
            Plan::Add { .. } => OpKind::Add,
            Plan::ReadSet { .. } => OpKind::ReadSet,
            Plan::Call { .. } => OpKind::Call,
            Plan::Events { .. } | Plan::AllEvents => OpKind::Events,
        }
    }

    fn key(&self, cfg: &Workload) -> String {
        match self {
            Plan::Write { key, .. } | Plan::Read { key } => key.clone(),
            Plan::Add { generation, .. } | Plan::ReadSet { generation } => {
                cfg.set_key_of(*generation)
            }
            Plan::Call { .. } => cfg.call_tool.clone(),
            Plan::Events { .. } | Plan::AllEvents => EVENTS_KEY.to_owned(),
        }
    }

    fn describe(&self, cfg: &Workload) -> String {
        match self {
            Plan::Read { key } => format!("read register {key}"),
            Plan::ReadSet { generation } => format!("read set {}", cfg.set_key_of(*generation)),
            Plan::AllEvents => "read the event log".to_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// Invoke `plan` on `node`, record it, and return it as recorded.
async fn perform(
    http: &reqwest::Client,
    cfg: &Workload,
    recorder: &Recorder,
    process: u64,
    node: u64,
    base: &str,
    plan: &Plan,
) -> Op {
    let inv = recorder.invoke();
    let done: Done = match plan {
        Plan::Write { key, value } => {
            ops::write_register(http, base, &Workload::limit_id(key), *value).await
        }
        Plan::Read { key } => ops::read_register(http, base, &Workload::limit_id(key)).await,
        Plan::Add { name, generation } => {
            ops::add_key(http, base, name, &Workload::set_principal(*generation)).await
        }
        Plan::ReadSet { generation } => {
            let principal = generation.map(|g| Workload::set_principal(Some(g)));
            let prefix = Workload::set_prefix(*generation);
            ops::read_keys(http, base, &prefix, principal.as_deref()).await
        }
        Plan::Call { message } => {
            ops::call_echo(http, base, &cfg.call_tool, message, inv.index).await
        }
        Plan::Events { since } => ops::read_events(http, base, *since, false, false).await,
        Plan::AllEvents => ops::read_events(http, base, 0, true, true).await,
    };
    let op = Op {
        index: inv.index,
        process,
        node,
        kind: plan.kind(),
        key: plan.key(cfg),
        value: done.value,
        outcome: done.outcome,
        invoke_ns: inv.invoke_ns,
        complete_ns: recorder.now_ns(),
        error: done.error,
    };
    recorder.record(op.clone());
    op
}

/// One logical client of one workload.
struct Client {
    workload: WorkloadKind,
    http: reqwest::Client,
    targets: Arc<[(u64, String)]>,
    cfg: Arc<Workload>,
    recorder: Recorder,
    rng: StdRng,
    /// The process it currently is.
    process: u64,
    /// Operations it planned so far (numbers its elements and messages).
    sent: u64,
    /// The next register value (shared by the register clients: unique and increasing).
    register_values: Arc<AtomicU64>,
    /// Per node, the highest event sequence number this client has read there.
    events_seen: BTreeMap<u64, u64>,
}

impl Client {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        while !stopped(&stop) {
            let (node, base) = self.target();
            let mut plan = self.plan();
            if let (Plan::Events { since }, Some(tail)) = (&mut plan, self.cfg.events_tail) {
                // From the node's own log as this client last saw it: a correct node still
                // has at least that much, so the read is never empty by construction.
                let seen = self.events_seen.get(&node).copied().unwrap_or(0);
                *since = seen.saturating_sub(tail);
            }
            let op = perform(
                &self.http,
                &self.cfg,
                &self.recorder,
                self.process,
                node,
                &base,
                &plan,
            )
            .await;
            let outcome = op.outcome;
            if op.kind == OpKind::Events && outcome == Outcome::Ok {
                let last = op.value.as_array().and_then(|a| a.last());
                if let Some(seq) = last.and_then(|e| e["seq"].as_u64()) {
                    let seen = self.events_seen.entry(node).or_default();
                    *seen = (*seen).max(seq);
                }
            }
            self.process = process_after(outcome, self.process, &self.recorder);
            if outcome == Outcome::Fail {
                pause(self.cfg.fail_backoff, &mut stop).await;
            }
            if self.workload == WorkloadKind::Events {
                pause(self.cfg.events_interval, &mut stop).await;
            }
        }
    }

    /// A node drawn among all targets.
    fn target(&mut self) -> (u64, String) {
        let i = self.rng.random_range(0..self.targets.len());
        self.targets[i].clone()
    }

    /// The next operation of this client's workload.
    fn plan(&mut self) -> Plan {
        let n = self.sent;
        self.sent += 1;
        match self.workload {
            WorkloadKind::Register => {
                let keys = &self.cfg.register_keys;
                let key = keys[self.rng.random_range(0..keys.len())].clone();
                if self.rng.random_bool(0.5) {
                    let value = self.register_values.fetch_add(1, Ordering::Relaxed);
                    Plan::Write { key, value }
                } else {
                    Plan::Read { key }
                }
            }
            WorkloadKind::Set => {
                let generation = self.cfg.set_generation(self.recorder.now_ns());
                if self.rng.random_ratio(1, 3) {
                    Plan::Add {
                        name: format!("{}{}-{n}", Workload::set_prefix(generation), self.process),
                        generation,
                    }
                } else {
                    Plan::ReadSet { generation }
                }
            }
            WorkloadKind::Calls => Plan::Call {
                message: format!("{NAME_PREFIX}{}-{n}", self.process),
            },
            WorkloadKind::Events => Plan::Events { since: 0 },
        }
    }
}

/// Whether the clients must stop: `stop` is true or its sender is gone.
fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleep for `d`, or less when `stop` turns true.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) {
    if d.is_zero() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

#[cfg(test)]
mod tests;
