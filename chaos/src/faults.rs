//! Faults as data, a seeded schedule of them, and the [`Injector`] that applies and heals
//! them on a [`Nodes`] cluster, keeping a log.
//!
//! A [`Fault`] names its victims by [`Target`] (the leader, a follower, the host of a server's
//! instance…), resolved when it is injected, so a schedule means the same thing whatever the
//! cluster looks like by then. [`Schedule::generate`] draws faults from a seed: the same seed,
//! kinds, duration and interval give the same schedule. The injector's own choices (which
//! follower, which minority) come from its seeded generator too.
//!
//! A fault's life: [`Injector::inject`] applies it and returns an [`Injected`] (the resolved
//! nodes, when it started, when it is meant to end); [`Injector::heal`] ends it (restarts a
//! killed node, resumes a paused one, restores the links) and appends a [`FaultRecord`] to the
//! log; [`Injector::run`] does both with the fault's intended duration in between. Faults of a
//! generated schedule never overlap.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::nodes::{Nodes, SERVER_ID};
use crate::proxy::{NodeId, Rule, millis};

/// Which node a fault hits, resolved when it is injected among the nodes that can answer
/// (running, not paused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The leader a majority reports.
    Leader,
    /// A node other than the leader.
    Follower,
    /// Any node.
    Random,
    /// This node.
    Node(NodeId),
    /// The node running the single instance of this MCP server.
    HostOfInstance(String),
}

/// How a partition cuts the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    /// One node against the others (connections refused and cut).
    Isolate(Target),
    /// A random minority against the majority (the leader in the minority half the time).
    MajorityMinority,
    /// One node silently cut off: its connections stay open, nothing gets through.
    Blackhole(Target),
}

/// Which links a delay slows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DelayScope {
    /// Every link from and to this node.
    Node(Target),
    /// The connections `from` opens to `to`.
    Link {
        /// Connecting node.
        from: Target,
        /// Node called.
        to: Target,
    },
    /// Every link.
    All,
}

/// A fault and its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL a node; it is restarted after `down_for`.
    Kill {
        /// Victim.
        target: Target,
        /// How long it stays down.
        #[serde(with = "millis")]
        down_for: Duration,
    },
    /// Stop a node gracefully (SIGTERM, waiting for it to exit) and start it again at once
    /// (the heal step).
    Restart {
        /// Victim.
        node: Target,
    },
    /// SIGSTOP a node, SIGCONT it after `duration` (longer than the election timeout: the
    /// others elect anew if it led, and it comes back with a stale view).
    Pause {
        /// Victim.
        target: Target,
        /// How long it is stopped.
        #[serde(with = "millis")]
        duration: Duration,
    },
    /// Cut the network between nodes for `duration`.
    Partition {
        /// How.
        kind: PartitionKind,
        /// How long.
        #[serde(with = "millis")]
        duration: Duration,
    },
    /// Slow links by `by` in each direction for `duration`.
    Delay {
        /// Which links.
        scope: DelayScope,
        /// Added latency per direction.
        #[serde(with = "millis")]
        by: Duration,
        /// How long.
        #[serde(with = "millis")]
        duration: Duration,
    },
    /// SIGKILL one of the run's upstream (fixture) processes; Hangar is expected to start it
    /// again on the next call.
    KillUpstream,
    /// SIGSTOP the fixture process (the instance, not its `hangar exec-child` shim) for
    /// `duration`, then SIGCONT it if it still exists. Calls to it hang: Hangar's call timeout
    /// fails them, and it may replace the instance — after killing the hung process.
    HangUpstream {
        /// How long it is stopped.
        #[serde(with = "millis")]
        duration: Duration,
    },
    /// Fill a node's data directory (a small tmpfs: [`crate::nodes::Options::small_disks`],
    /// root only) with a filler file until ENOSPC, for `duration`; then delete the filler and
    /// start the node again if it exited meanwhile.
    DiskFull {
        /// Victim.
        target: Target,
        /// How long the disk stays full.
        #[serde(with = "millis")]
        duration: Duration,
    },
}

impl Fault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Kill { .. } => FaultKind::Kill,
            Fault::Restart { .. } => FaultKind::Restart,
            Fault::Pause { .. } => FaultKind::Pause,
            Fault::Partition { kind, .. } => match kind {
                PartitionKind::Isolate(_) => FaultKind::Isolate,
                PartitionKind::MajorityMinority => FaultKind::MajorityMinority,
                PartitionKind::Blackhole(_) => FaultKind::Blackhole,
            },
            Fault::Delay { .. } => FaultKind::Delay,
            Fault::KillUpstream => FaultKind::KillUpstream,
            Fault::HangUpstream { .. } => FaultKind::HangUpstream,
            Fault::DiskFull { .. } => FaultKind::DiskFull,
        }
    }

    /// How long it lasts before it is healed (zero for the instantaneous ones).
    pub fn duration(&self) -> Duration {
        match self {
            Fault::Kill { down_for, .. } => *down_for,
            Fault::Pause { duration, .. }
            | Fault::Partition { duration, .. }
            | Fault::Delay { duration, .. }
            | Fault::HangUpstream { duration }
            | Fault::DiskFull { duration, .. } => *duration,
            Fault::Restart { .. } | Fault::KillUpstream => Duration::ZERO,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{self:?}"),
        }
    }
}

/// A kind of fault, without parameters (what a schedule draws from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// [`Fault::Kill`].
    Kill,
    /// [`Fault::Restart`].
    Restart,
    /// [`Fault::Pause`].
    Pause,
    /// [`PartitionKind::Isolate`].
    Isolate,
    /// [`PartitionKind::MajorityMinority`].
    MajorityMinority,
    /// [`PartitionKind::Blackhole`].
    Blackhole,
    /// [`Fault::Delay`].
    Delay,
    /// [`Fault::KillUpstream`].
    KillUpstream,
    /// [`Fault::HangUpstream`].
    HangUpstream,
    /// [`Fault::DiskFull`] (root only).
    DiskFull,
}

impl FaultKind {
    /// Every kind (`all` is every kind but those that [need root](FaultKind::needs_root)).
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Kill,
        FaultKind::Restart,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::MajorityMinority,
        FaultKind::Blackhole,
        FaultKind::Delay,
        FaultKind::KillUpstream,
        FaultKind::HangUpstream,
        FaultKind::DiskFull,
    ];

    /// Why this kind cannot run without root, if it needs root.
    pub fn needs_root(self) -> Option<&'static str> {
        match self {
            FaultKind::DiskFull => {
                Some("disk-full needs root to mount a tmpfs; run as root or leave it out")
            }
            _ => None,
        }
    }

    /// Its name (as parsed).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Restart => "restart",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::MajorityMinority => "majority-minority",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Delay => "delay",
            FaultKind::KillUpstream => "kill-upstream",
            FaultKind::HangUpstream => "hang-upstream",
            FaultKind::DiskFull => "disk-full",
        }
    }

    /// Parse a comma-separated list of kinds; `partition` stands for `isolate`,
    /// `majority-minority` and `blackhole`, `all` for every kind that needs no root (so that
    /// a seed means the same schedule whoever runs it: name `disk-full` to have it).
    pub fn parse_list(s: &str) -> Result<Vec<FaultKind>> {
        let mut kinds = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let more: Vec<FaultKind> = match name {
                "all" => FaultKind::ALL
                    .into_iter()
                    .filter(|k| k.needs_root().is_none())
                    .collect(),
                "partition" => vec![
                    FaultKind::Isolate,
                    FaultKind::MajorityMinority,
                    FaultKind::Blackhole,
                ],
                other => vec![other.parse()?],
            };
            for k in more {
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        Ok(kinds)
    }

    /// A fault of this kind with parameters drawn from `rng`; it lasts between a quarter and
    /// a half of `interval`.
    fn draw(self, rng: &mut StdRng, interval: Duration) -> Fault {
        let duration = between(rng, interval / 4, interval / 2);
        match self {
            FaultKind::Kill => Fault::Kill {
                target: draw_target(rng, true),
                down_for: duration,
            },
            FaultKind::Restart => Fault::Restart {
                node: draw_target(rng, false),
            },
            FaultKind::Pause => Fault::Pause {
                target: draw_target(rng, false),
                duration,
            },
            FaultKind::Isolate => Fault::Partition {
                kind: PartitionKind::Isolate(draw_target(rng, false)),
                duration,
            },
            FaultKind::MajorityMinority => Fault::Partition {
                kind: PartitionKind::MajorityMinority,
                duration,
            },
            FaultKind::Blackhole => Fault::Partition {
                kind: PartitionKind::Blackhole(draw_target(rng, false)),
                duration,
            },
            FaultKind::Delay => Fault::Delay {
                scope: if rng.random_bool(0.25) {
                    DelayScope::All
                } else {
                    DelayScope::Node(draw_target(rng, false))
                },
                by: between(rng, Duration::from_millis(10), Duration::from_millis(150)),
                duration,
            },
            FaultKind::KillUpstream => Fault::KillUpstream,
            FaultKind::HangUpstream => Fault::HangUpstream { duration },
            FaultKind::DiskFull => Fault::DiskFull {
                target: draw_target(rng, false),
                duration,
            },
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        let alias = match s.as_str() {
            "majority" | "minority" | "split" => "majority-minority",
            "upstream" => "kill-upstream",
            "hang" => "hang-upstream",
            "disk" | "enospc" => "disk-full",
            other => other,
        };
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == alias)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                anyhow!(
                    "unknown fault kind `{s}` (one of {}, partition, all)",
                    names.join(", ")
                )
            })
    }
}

/// A uniformly drawn duration in `[lo, hi]` (whole milliseconds).
pub(crate) fn between(rng: &mut StdRng, lo: Duration, hi: Duration) -> Duration {
    let lo = lo.as_millis() as u64;
    let hi = (hi.as_millis() as u64).max(lo);
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// A target: the leader 40 %, a follower 30 %, any node 30 % (with `host`, the host of
/// [`SERVER_ID`] takes a share too).
pub(crate) fn draw_target(rng: &mut StdRng, host: bool) -> Target {
    let mut choices = vec![
        (Target::Leader, 4),
        (Target::Follower, 3),
        (Target::Random, 3),
    ];
    if host {
        choices.push((Target::HostOfInstance(SERVER_ID.to_owned()), 3));
    }
    choices
        .choose_weighted(rng, |c| c.1)
        .map(|c| c.0.clone())
        .unwrap_or(Target::Random)
}

/// A fault planned at an offset from the start of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// When to inject it, from the start of the run.
    #[serde(with = "millis")]
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// Faults to inject during a run, in order, none overlapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The seed it was drawn from.
    pub seed: u64,
    /// The faults, by increasing `at`.
    pub faults: Vec<Planned>,
}

impl Schedule {
    /// One fault of a kind drawn from `kinds` per `interval` of `duration`: it starts in the
    /// first quarter of its interval and lasts a quarter to a half of it, so it has ended
    /// (and the cluster had a quarter of the interval at least to recover) before the next
    /// one. Pauses exceed the election timeout when `interval` is over 4 × that timeout.
    /// Reproducible: the same arguments give the same schedule.
    pub fn generate(
        seed: u64,
        kinds: &[FaultKind],
        duration: Duration,
        interval: Duration,
    ) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut faults = Vec::new();
        if kinds.is_empty() || interval.is_zero() {
            return Schedule { seed, faults };
        }
        let mut slot = Duration::ZERO;
        while slot + interval <= duration {
            let at = slot + between(&mut rng, Duration::ZERO, interval / 4);
            let kind = *kinds.choose(&mut rng).unwrap_or(&FaultKind::Kill);
            faults.push(Planned {
                at,
                fault: kind.draw(&mut rng, interval),
            });
            slot += interval;
        }
        Schedule { seed, faults }
    }
}

/// What undoes an injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Undo {
    /// Nothing (instantaneous faults).
    Nothing,
    /// Start these (killed) nodes again.
    Restart(Vec<NodeId>),
    /// SIGCONT these (paused) nodes.
    Resume(Vec<NodeId>),
    /// Put these links back to these rules.
    Links(Vec<(NodeId, NodeId, Rule)>),
    /// SIGCONT this (paused) upstream process, if it still exists.
    ResumeUpstream(u32),
    /// Delete the filler on this node's disk; start the node again if it exited.
    FreeDisk(NodeId),
}

/// What [`Injector::apply`] did.
struct Applied {
    nodes: Vec<NodeId>,
    pid: Option<u32>,
    detail: String,
    undo: Undo,
    /// When it took effect.
    at: Instant,
}

/// An applied fault, until it is healed.
#[derive(Debug)]
pub struct Injected {
    /// Its number in the injector's log.
    pub index: u64,
    /// The fault as planned.
    pub fault: Fault,
    /// The nodes it hit (for a majority/minority split: the minority).
    pub nodes: Vec<NodeId>,
    /// The upstream process killed ([`Fault::KillUpstream`]).
    pub pid: Option<u32>,
    /// What was done, for people.
    pub detail: String,
    /// When it was applied.
    pub start: Instant,
    /// When it is meant to be healed.
    pub until: Instant,
    undo: Undo,
}

/// One fault in the log (JSON): times are nanoseconds since the start of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Its number, from 0.
    pub index: u64,
    /// Its kind.
    pub kind: FaultKind,
    /// The fault as planned.
    pub fault: Fault,
    /// The nodes it hit.
    pub nodes: Vec<NodeId>,
    /// The upstream process killed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// What was done.
    pub detail: String,
    /// When it was applied.
    pub start_ns: u64,
    /// When healing began.
    pub heal_ns: u64,
    /// When healing was done (a restarted node had written its ready file).
    pub end_ns: u64,
    /// What happened to the victim, as seen when healing began (a full disk: whether the node
    /// kept running, refused writes or exited; a hung upstream: whether it still existed and
    /// which fixture processes ran) and what the heal did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why it could not be injected or healed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Applies and heals faults on a cluster, and logs them.
#[derive(Debug)]
pub struct Injector {
    rng: StdRng,
    start: Instant,
    log: Vec<FaultRecord>,
}

impl Injector {
    /// An injector whose choices come from `seed`, timing its log from `start` (the start of
    /// the run).
    pub fn new(seed: u64, start: Instant) -> Self {
        Injector {
            // Another stream than the schedule's, from the same seed.
            rng: StdRng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908),
            start,
            log: Vec::new(),
        }
    }

    /// The start of the run.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Nanoseconds from the start of the run to `t`.
    pub fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Every fault healed (or failed) so far.
    pub fn log(&self) -> &[FaultRecord] {
        &self.log
    }

    /// The log as JSON lines.
    pub fn log_jsonl(&self) -> Result<String> {
        let mut s = String::new();
        for r in &self.log {
            s.push_str(&serde_json::to_string(r).context("serialize a fault record")?);
            s.push('\n');
        }
        Ok(s)
    }

    /// Apply `fault`; see [`Injected`]. A fault that cannot be applied (no node to hit)
    /// is an error, and is logged with it.
    pub async fn inject(&mut self, nodes: &mut Nodes, fault: &Fault) -> Result<Injected> {
        let index = self.log.len() as u64;
        let begun = Instant::now();
        match self.apply(nodes, fault).await {
            Ok(a) => Ok(Injected {
                index,
                fault: fault.clone(),
                nodes: a.nodes,
                pid: a.pid,
                detail: a.detail,
                start: a.at,
                until: a.at + fault.duration(),
                undo: a.undo,
            }),
            Err(e) => {
                let at = self.ns(begun);
                self.log.push(FaultRecord {
                    index,
                    kind: fault.kind(),
                    fault: fault.clone(),
                    nodes: Vec::new(),
                    pid: None,
                    detail: String::new(),
                    start_ns: at,
                    heal_ns: at,
                    end_ns: self.ns(Instant::now()),
                    outcome: None,
                    error: Some(format!("{e:#}")),
                });
                Err(e.context(format!("inject {fault}")))
            }
        }
    }

    /// End an injected fault now (restart, resume, restore links) and log it. A heal that
    /// fails is logged with its error, and returned as one.
    pub async fn heal(&mut self, nodes: &mut Nodes, injected: Injected) -> Result<FaultRecord> {
        let heal = Instant::now();
        let (outcome, result) = undo(nodes, &injected.undo).await;
        let record = FaultRecord {
            index: injected.index,
            kind: injected.fault.kind(),
            fault: injected.fault.clone(),
            nodes: injected.nodes.clone(),
            pid: injected.pid,
            detail: injected.detail.clone(),
            start_ns: self.ns(injected.start),
            heal_ns: self.ns(heal),
            end_ns: self.ns(Instant::now()),
            outcome,
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        };
        self.log.push(record.clone());
        result
            .map(|()| record)
            .with_context(|| format!("heal {}", injected.fault))
    }

    /// Inject `fault`, let it last its duration, heal it.
    pub async fn run(&mut self, nodes: &mut Nodes, fault: &Fault) -> Result<FaultRecord> {
        let injected = self.inject(nodes, fault).await?;
        tokio::time::sleep_until(injected.until).await;
        self.heal(nodes, injected).await
    }

    /// Run every fault of `schedule` at its time (late when the previous one healed late).
    /// A fault that could not be injected or healed is logged and the run goes on; returns
    /// how many failed.
    pub async fn run_schedule(&mut self, nodes: &mut Nodes, schedule: &Schedule) -> usize {
        let mut failed = 0;
        for p in &schedule.faults {
            tokio::time::sleep_until(self.start + p.at).await;
            if self.run(nodes, &p.fault).await.is_err() {
                failed += 1;
            }
        }
        failed
    }

    /// Apply a fault.
    async fn apply(&mut self, nodes: &mut Nodes, fault: &Fault) -> Result<Applied> {
        let proxy = nodes.proxy().clone();
        // Set right before the fault takes effect (after the targets are resolved).
        let at: Instant;
        let (hit, pid, detail, undo) = match fault {
            Fault::Kill { target, .. } => {
                let (id, how) = self.resolve(nodes, target).await?;
                at = Instant::now();
                nodes.kill(id)?;
                (
                    vec![id],
                    None,
                    format!("SIGKILL node {id} ({how})"),
                    Undo::Restart(vec![id]),
                )
            }
            Fault::Restart { node } => {
                let (id, how) = self.resolve(nodes, node).await?;
                at = Instant::now();
                let code = nodes.terminate(id).await?;
                let detail =
                    format!("SIGTERM node {id} ({how}): exit code {code:?}; started again at once");
                (vec![id], None, detail, Undo::Restart(vec![id]))
            }
            Fault::Pause { target, .. } => {
                let (id, how) = self.resolve(nodes, target).await?;
                at = Instant::now();
                nodes.pause(id)?;
                (
                    vec![id],
                    None,
                    format!("SIGSTOP node {id} ({how})"),
                    Undo::Resume(vec![id]),
                )
            }
            Fault::Partition { kind, .. } => match kind {
                PartitionKind::Isolate(t) | PartitionKind::Blackhole(t) => {
                    let (id, how) = self.resolve(nodes, t).await?;
                    let rule = match kind {
                        PartitionKind::Blackhole(_) => Rule::Blackhole,
                        _ => Rule::Drop,
                    };
                    let links = node_links(&proxy.nodes(), id);
                    at = Instant::now();
                    let undo = set_links(nodes, &links, rule)?;
                    (
                        vec![id],
                        None,
                        format!("{rule} every link of node {id} ({how})"),
                        undo,
                    )
                }
                PartitionKind::MajorityMinority => {
                    let (minority, majority) = self.halves(nodes).await;
                    let mut links = Vec::new();
                    for &a in &minority {
                        for &b in &majority {
                            links.push((a, b));
                            links.push((b, a));
                        }
                    }
                    at = Instant::now();
                    let undo = set_links(nodes, &links, Rule::Drop)?;
                    let detail = format!("split minority {minority:?} from majority {majority:?}");
                    (minority, None, detail, undo)
                }
            },
            Fault::Delay { scope, by, .. } => {
                let all = proxy.nodes();
                let (hit, links, how) = match scope {
                    DelayScope::All => {
                        let links = all
                            .iter()
                            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
                            .filter(|(a, b)| a != b)
                            .collect();
                        (all.clone(), links, "every link".to_owned())
                    }
                    DelayScope::Node(t) => {
                        let (id, how) = self.resolve(nodes, t).await?;
                        (
                            vec![id],
                            node_links(&all, id),
                            format!("every link of node {id} ({how})"),
                        )
                    }
                    DelayScope::Link { from, to } => {
                        let (a, how_a) = self.resolve(nodes, from).await?;
                        let (b, how_b) = self.resolve(nodes, to).await?;
                        if a == b {
                            bail!("the link {from:?} → {to:?} resolved to node {a} both ends");
                        }
                        (
                            vec![a, b],
                            vec![(a, b)],
                            format!("link {a} ({how_a}) → {b} ({how_b})"),
                        )
                    }
                };
                at = Instant::now();
                let undo = set_links(nodes, &links, Rule::Delay(*by))?;
                (hit, None, format!("delay {by:?} on {how}"), undo)
            }
            Fault::KillUpstream => {
                let procs = nodes.fixture_hosts();
                let Some(&(pid, host)) = procs.choose(&mut self.rng) else {
                    bail!("no upstream process of this run is running");
                };
                at = Instant::now();
                nodes.kill_upstream(pid)?;
                let detail = format!(
                    "SIGKILL upstream process {pid} (host {})",
                    host.map_or("none".to_owned(), |h| format!("node {h}"))
                );
                (host.into_iter().collect(), Some(pid), detail, Undo::Nothing)
            }
            Fault::HangUpstream { .. } => {
                let procs = nodes.fixture_hosts();
                let Some(&(pid, host)) = procs.choose(&mut self.rng) else {
                    bail!("no upstream process of this run is running");
                };
                at = Instant::now();
                nodes.pause_upstream(pid)?;
                let detail = format!(
                    "SIGSTOP upstream process {pid} (host {})",
                    host.map_or("none".to_owned(), |h| format!("node {h}"))
                );
                (
                    host.into_iter().collect(),
                    Some(pid),
                    detail,
                    Undo::ResumeUpstream(pid),
                )
            }
            Fault::DiskFull { target, .. } => {
                let (id, how) = self.resolve(nodes, target).await?;
                at = Instant::now();
                let filled = match nodes.fill_disk(id).await {
                    Ok(f) => f,
                    Err(e) => {
                        // Nothing may stay full when the fault failed half-way.
                        let _ = nodes.free_disk(id);
                        return Err(e);
                    }
                };
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let detail = format!(
                    "filled node {id}'s disk ({how}) with {:.0} MiB{}{}",
                    mib(filled.bytes),
                    if filled.full {
                        ": ENOSPC"
                    } else {
                        " (its size; no ENOSPC)"
                    },
                    // (A page's slack per file is no preallocation.)
                    if filled.preallocated >= 1024 * 1024 {
                        format!(
                            "; its write-ahead log holds {:.1} MiB preallocated",
                            mib(filled.preallocated)
                        )
                    } else {
                        String::new()
                    }
                );
                (vec![id], None, detail, Undo::FreeDisk(id))
            }
        };
        Ok(Applied {
            nodes: hit,
            pid,
            detail,
            undo,
            at,
        })
    }

    /// The node `target` names now, and how it was chosen. Nodes that cannot answer
    /// (stopped, paused) are never chosen; when the leader or the host is unknown, a random
    /// node is, and the description says so.
    async fn resolve(&mut self, nodes: &Nodes, target: &Target) -> Result<(NodeId, String)> {
        let up = nodes.responsive();
        if up.is_empty() {
            bail!("no node can answer");
        }
        let leader = match target {
            Target::Leader | Target::Follower => nodes.leader().await.filter(|l| up.contains(l)),
            _ => None,
        };
        let random = |rng: &mut StdRng, among: &[NodeId], why: &str| -> Result<(NodeId, String)> {
            among
                .choose(rng)
                .map(|&id| (id, why.to_owned()))
                .ok_or_else(|| anyhow!("no node to choose from"))
        };
        match target {
            Target::Node(id) if up.contains(id) => Ok((*id, "named".into())),
            Target::Node(id) => bail!("node {id} is not running or paused"),
            Target::Random => random(&mut self.rng, &up, "random"),
            Target::Leader => match leader {
                Some(l) => Ok((l, "leader".into())),
                None => random(&mut self.rng, &up, "random: no leader agreed"),
            },
            Target::Follower => match leader {
                Some(l) => {
                    let followers: Vec<NodeId> = up.into_iter().filter(|&n| n != l).collect();
                    random(&mut self.rng, &followers, &format!("follower of {l}"))
                }
                None => random(&mut self.rng, &up, "random: no leader agreed"),
            },
            Target::HostOfInstance(server) => match nodes.host_of(server, None).await {
                Ok(Some(h)) if up.contains(&h) => Ok((h, format!("host of {server}"))),
                Ok(h) => random(
                    &mut self.rng,
                    &up,
                    &format!("random: {server} is placed on {h:?}"),
                ),
                Err(e) => random(
                    &mut self.rng,
                    &up,
                    &format!("random: host of {server} unknown ({e:#})"),
                ),
            },
        }
    }

    /// A random minority (at least one node, fewer than half) and the majority of all
    /// nodes; the leader is in the minority half the time.
    async fn halves(&mut self, nodes: &Nodes) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut all = nodes.ids();
        all.shuffle(&mut self.rng);
        let size = ((all.len().saturating_sub(1)) / 2).max(1);
        if self.rng.random_bool(0.5)
            && let Some(l) = nodes.leader().await
            && let Some(i) = all.iter().position(|&n| n == l)
        {
            all.swap(0, i);
        }
        let majority = all.split_off(size.min(all.len()));
        all.sort_unstable();
        let mut majority = majority;
        majority.sort_unstable();
        (all, majority)
    }
}

/// Every link between `node` and another of `all`, both directions.
fn node_links(all: &[NodeId], node: NodeId) -> Vec<(NodeId, NodeId)> {
    all.iter()
        .filter(|&&n| n != node)
        .flat_map(|&n| [(node, n), (n, node)])
        .collect()
}

/// Set `rule` on `links`; the undo puts their current rules back.
fn set_links(nodes: &Nodes, links: &[(NodeId, NodeId)], rule: Rule) -> Result<Undo> {
    let proxy = nodes.proxy();
    let mut before = Vec::with_capacity(links.len());
    for &(a, b) in links {
        let old = proxy
            .rule(a, b)
            .ok_or_else(|| anyhow!("no link {a} → {b}"))?;
        before.push((a, b, old));
    }
    for &(a, b) in links {
        proxy.set_link(a, b, rule)?;
    }
    Ok(Undo::Links(before))
}

/// Undo a fault: what happened to its victim (for the record), and whether the undo worked.
async fn undo(nodes: &mut Nodes, undo: &Undo) -> (Option<String>, Result<()>) {
    match undo {
        Undo::ResumeUpstream(pid) => {
            let (outcome, result) = resume_upstream(nodes, *pid);
            (Some(outcome), result)
        }
        Undo::FreeDisk(id) => {
            let (outcome, result) = free_disk(nodes, *id).await;
            (Some(outcome), result)
        }
        other => (None, undo_plain(nodes, other).await),
    }
}

/// Undo a fault that needs no account of what happened.
async fn undo_plain(nodes: &mut Nodes, undo: &Undo) -> Result<()> {
    match undo {
        Undo::Nothing | Undo::ResumeUpstream(_) | Undo::FreeDisk(_) => Ok(()),
        Undo::Restart(ids) => {
            for &id in ids {
                if !nodes.alive().contains(&id) {
                    nodes.restart(id).await?;
                }
            }
            Ok(())
        }
        Undo::Resume(ids) => {
            for &id in ids {
                if nodes.paused().contains(&id) {
                    nodes.resume(id)?;
                }
            }
            Ok(())
        }
        Undo::Links(links) => {
            for &(a, b, rule) in links {
                nodes.proxy().set_link(a, b, rule)?;
            }
            Ok(())
        }
    }
}

/// Heal a hung upstream: note the fixture processes (and which are stopped), SIGCONT `pid`
/// if it is still there.
fn resume_upstream(nodes: &mut Nodes, pid: u32) -> (String, Result<()>) {
    let stopped = nodes.stopped_fixtures();
    let running: Vec<String> = nodes
        .fixture_hosts()
        .into_iter()
        .map(|(p, host)| {
            format!(
                "{p}{} ({})",
                if stopped.contains(&p) { " stopped" } else { "" },
                host.map_or("no node".to_owned(), |h| format!("node {h}"))
            )
        })
        .collect();
    let seen = format!("fixture processes at heal: [{}]", running.join(", "));
    match nodes.resume_upstream(pid) {
        Ok(true) => (
            format!("{seen}; the hung process {pid} still existed: resumed"),
            Ok(()),
        ),
        Ok(false) => (
            format!("{seen}; the hung process {pid} was gone (ended by Hangar)"),
            Ok(()),
        ),
        Err(e) => (format!("{seen}; resuming {pid} failed"), Err(e)),
    }
}

/// Heal a full disk: note how the node fared, delete the filler, start the node again if it
/// exited.
async fn free_disk(nodes: &mut Nodes, id: NodeId) -> (String, Result<()>) {
    let condition = nodes.condition(id).await;
    let mut outcome = format!("node {id}: {condition}");
    if let Err(e) = nodes.free_disk(id) {
        return (
            format!("{outcome}; the filler could not be removed"),
            Err(e),
        );
    }
    outcome.push_str("; filler removed");
    if nodes.alive().contains(&id) {
        return (outcome, Ok(()));
    }
    match nodes.restart(id).await {
        Ok(()) => {
            outcome.push_str("; node started again");
            (outcome, Ok(()))
        }
        Err(e) => {
            outcome.push_str("; the node did not start again");
            (outcome, Err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_schedule_is_reproducible_from_its_seed() {
        let kinds = FaultKind::ALL;
        let a = Schedule::generate(42, &kinds, 60 * SECOND, 4 * SECOND);
        let b = Schedule::generate(42, &kinds, 60 * SECOND, 4 * SECOND);
        let c = Schedule::generate(43, &kinds, 60 * SECOND, 4 * SECOND);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.faults.len(), 15);
        // The same schedule through JSON.
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), a);
    }

    #[test]
    fn scheduled_faults_fit_their_interval_and_never_overlap() {
        let interval = 4 * SECOND;
        let s = Schedule::generate(7, &FaultKind::ALL, 240 * SECOND, interval);
        let mut end = Duration::ZERO;
        for (i, p) in s.faults.iter().enumerate() {
            let slot = interval * i as u32;
            assert!(p.at >= slot && p.at <= slot + interval / 4, "{p:?}");
            assert!(p.at >= end, "overlap at {p:?}");
            let d = p.fault.duration();
            if !matches!(p.fault, Fault::Restart { .. } | Fault::KillUpstream) {
                assert!(d >= interval / 4 && d <= interval / 2, "{p:?}");
            }
            end = p.at + d;
            assert!(end + interval / 4 <= slot + interval, "{p:?}");
        }
        // Every kind shows up in a long schedule.
        for k in FaultKind::ALL {
            assert!(s.faults.iter().any(|p| p.fault.kind() == k), "{k}");
        }
        // Pauses outlast a 500 ms election timeout at this interval.
        assert!(
            s.faults
                .iter()
                .filter(|p| p.fault.kind() == FaultKind::Pause)
                .all(|p| p.fault.duration() > Duration::from_millis(500))
        );
    }

    #[test]
    fn only_the_kinds_asked_for_are_drawn() {
        let s = Schedule::generate(1, &[FaultKind::Pause], 20 * SECOND, 2 * SECOND);
        assert_eq!(s.faults.len(), 10);
        assert!(s.faults.iter().all(|p| p.fault.kind() == FaultKind::Pause));
        assert!(
            Schedule::generate(1, &[], 20 * SECOND, SECOND)
                .faults
                .is_empty()
        );
        assert!(
            Schedule::generate(1, &FaultKind::ALL, SECOND, 2 * SECOND)
                .faults
                .is_empty()
        );
    }

    #[test]
    fn kinds_parse_with_groups_and_aliases() {
        assert_eq!(
            FaultKind::parse_list("kill, pause,partition").unwrap(),
            vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::Isolate,
                FaultKind::MajorityMinority,
                FaultKind::Blackhole
            ]
        );
        // `all`: every kind but disk-full (root only), which must be named.
        let all = FaultKind::parse_list("all").unwrap();
        assert_eq!(all.len(), FaultKind::ALL.len() - 1);
        assert!(all.contains(&FaultKind::HangUpstream));
        assert!(!all.contains(&FaultKind::DiskFull));
        assert_eq!(
            FaultKind::parse_list("all,disk-full").unwrap(),
            FaultKind::ALL.to_vec()
        );
        assert_eq!(
            "hang_upstream".parse::<FaultKind>().unwrap(),
            FaultKind::HangUpstream
        );
        assert_eq!("disk".parse::<FaultKind>().unwrap(), FaultKind::DiskFull);
        assert!(FaultKind::DiskFull.needs_root().unwrap().contains("root"));
        assert!(FaultKind::HangUpstream.needs_root().is_none());
        assert_eq!(
            "kill_upstream".parse::<FaultKind>().unwrap(),
            FaultKind::KillUpstream
        );
        assert_eq!(
            "majority".parse::<FaultKind>().unwrap(),
            FaultKind::MajorityMinority
        );
        let err = FaultKind::parse_list("kill,explode")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("explode") && err.contains("blackhole"),
            "{err}"
        );
    }

    #[test]
    fn faults_and_records_are_json() {
        let f = Fault::Partition {
            kind: PartitionKind::Isolate(Target::Leader),
            duration: Duration::from_millis(1500),
        };
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"partition": {"kind": {"isolate": "leader"}, "duration": 1500}})
        );
        let r = FaultRecord {
            index: 0,
            kind: f.kind(),
            fault: f.clone(),
            nodes: vec![2],
            pid: None,
            detail: "drop every link of node 2 (leader)".into(),
            start_ns: 1,
            heal_ns: 2,
            end_ns: 3,
            outcome: None,
            error: None,
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["kind"], "isolate");
        assert!(j.get("error").is_none());
        assert_eq!(serde_json::from_value::<FaultRecord>(j).unwrap(), r);
        let k = Fault::Kill {
            target: Target::HostOfInstance("counter".into()),
            down_for: SECOND,
        };
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            r#"{"kill":{"target":{"host_of_instance":"counter"},"down_for":1000}}"#
        );
        let h = Fault::HangUpstream { duration: SECOND };
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"hang_upstream":{"duration":1000}}"#
        );
        assert_eq!((h.kind(), h.duration()), (FaultKind::HangUpstream, SECOND));
        let d = Fault::DiskFull {
            target: Target::Follower,
            duration: 2 * SECOND,
        };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"disk_full":{"target":"follower","duration":2000}}"#
        );
        assert_eq!((d.kind(), d.duration()), (FaultKind::DiskFull, 2 * SECOND));
        // A record says what happened to the victim; older records (no outcome) still parse.
        let r = FaultRecord {
            kind: d.kind(),
            fault: d.clone(),
            outcome: Some("node 2: exited on its own (exit status: 1)".into()),
            ..r
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["kind"], "disk-full");
        assert_eq!(j["outcome"], "node 2: exited on its own (exit status: 1)");
        assert_eq!(serde_json::from_value::<FaultRecord>(j).unwrap(), r);
    }

    #[test]
    fn node_links_go_both_ways() {
        assert_eq!(
            node_links(&[1, 2, 3], 2),
            vec![(2, 1), (1, 2), (2, 3), (3, 2)]
        );
    }
}
