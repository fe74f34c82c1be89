//! One chaos run, end to end: the library entry point shared by `hangar-chaos run` and the
//! scenario tests.
//!
//! [`run`] starts a [`Nodes`] cluster, drives the [`workload`]s against every node's API (dead
//! ones included), injects a seeded [`Schedule`] of faults, samples the single-instance
//! invariant every [`SAMPLE_EVERY`], then heals everything, waits until every node is ready
//! again, stops the workloads, makes the final reads, stops the nodes, checks that no upstream
//! process is left, runs the [`checker`] and writes `history.jsonl`, `faults.jsonl`,
//! `schedule.json`, `report.json` and the node logs (`logs/`) into the output directory. The
//! [`RunReport`] it returns says what happened ([`RunReport::summary`]) and what went wrong
//! ([`RunReport::problems`]; empty for a passing run).
//!
//! # Schedules
//!
//! Three ways to say which faults to inject ([`RunOptions::plan`]):
//!
//! * an explicit [`Schedule`] ([`RunOptions::schedule`]);
//! * a **mix** ([`RunOptions::mix`], `--mix kill-leader:100,pause:50,partition-majority:20`):
//!   each entry `NAME:N` asks for exactly `N` faults of that kind, in a seeded random order,
//!   one per slot of `duration / ΣN` (without `--interval`). With `--interval`, the run has
//!   `duration / interval` slots and the `N`s are weights, apportioned exactly over the
//!   slots (largest remainder);
//! * fault **kinds** ([`RunOptions::faults`], `--faults kill,pause,partition`): one fault per
//!   `interval`, its kind drawn uniformly ([`Schedule::generate`]).
//!
//! In every case a fault starts in the first quarter of its slot and lasts a quarter to a half
//! of it, so faults never overlap and the cluster has at least a quarter of a slot to recover.
//! A pause always lasts at least twice the election timeout (the others elect anew if it
//! led), so pauses need slots of at least four election timeouts (2 s by default).
//!
//! Two kinds change how the cluster is set up when they are planned: `disk-full` puts every
//! node's data directory on a tmpfs of [`SMALL_DISK_MIB`] (root only: the plan is refused
//! otherwise, never silently skipped), and `hang-upstream` sets the nodes' call timeout to
//! [`HANG_REQUEST_TIMEOUT`] so that Hangar's own timeout fails the calls to a hung upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::checker::{self, Check, Report};
use crate::faults::{
    DelayScope, Fault, FaultKind, FaultRecord, Injector, PartitionKind, Planned, Schedule, Target,
    between, draw_target,
};
use crate::history::{Op, Outcome};
use crate::nodes::{self, Nodes, SERVER_ID};
use crate::workload::{self, Recorder, Workload, WorkloadKind};

/// How often the single-instance invariant is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long an upstream process may outlive its node before it counts as an orphan (the
/// parent-death signal and the lease shim act within milliseconds).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);
/// How long the run waits, before the faults, for every workload's first acknowledged
/// operation.
pub const WARMUP_LIMIT: Duration = Duration::from_secs(30);
/// How long a fault aimed at the leader waits for a majority to agree on one.
pub const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Interval between faults when neither an interval nor a mix says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(6);
/// A new set every 15 s ([`Workload::set_period`]), and event-log reads from 50 events before
/// the last one a client saw ([`Workload::events_tail`]): each read records a bounded value,
/// so the history grows linearly with the run rather than with its square.
pub const SET_PERIOD: Duration = Duration::from_secs(15);
/// See [`SET_PERIOD`].
pub const EVENTS_TAIL: u64 = 50;
/// The size of every node's data directory (a tmpfs) when `disk-full` is planned.
pub const SMALL_DISK_MIB: u64 = 256;
/// The nodes' call timeout (`server.request_timeout_s`) when `hang-upstream` is planned:
/// shorter than the clients' 2 s, so that Hangar's own timeout fails the calls to a hung
/// upstream (its default, 60 s, would leave them to the clients).
pub const HANG_REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// What to run; [`RunOptions::new`] gives the defaults of `hangar-chaos run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Number of nodes (at least 3).
    pub nodes: u64,
    /// The `hangar` binary.
    pub hangar: PathBuf,
    /// The `hangar-fixture` binary.
    pub fixture: PathBuf,
    /// Seed of the schedule, the injector's choices and the workload's clients.
    pub seed: u64,
    /// How long faults are injected (the workloads run a warm-up before and the recovery
    /// after).
    pub duration: Duration,
    /// The slot of one fault; `None`: [`DEFAULT_INTERVAL`], or `duration / ΣN` with a mix.
    pub interval: Option<Duration>,
    /// Kinds to draw from (when there is no mix and no schedule).
    pub faults: Vec<FaultKind>,
    /// A weighted mix (see the module documentation); overrides `faults`.
    pub mix: Vec<MixEntry>,
    /// An explicit schedule; overrides `mix` and `faults`.
    pub schedule: Option<Schedule>,
    /// The workloads (`call_tool` is set to the cluster's [`SERVER_ID`]`__echo` by [`run`]).
    pub workload: Workload,
    /// Where to write the outputs; `None`: a new directory under `$TMPDIR`, kept.
    pub out: Option<PathBuf>,
    /// How long every node gets to be ready again after the faults stopped.
    pub recovery_limit: Duration,
    /// Print what happens to stderr as it happens.
    pub progress: bool,
}

impl RunOptions {
    /// Defaults: 3 nodes, 60 s of `kill,pause,partition` every 6 s, seed 0, the default
    /// workloads.
    pub fn new(hangar: &Path, fixture: &Path) -> RunOptions {
        RunOptions {
            nodes: 3,
            hangar: hangar.to_owned(),
            fixture: fixture.to_owned(),
            seed: 0,
            duration: Duration::from_secs(60),
            interval: None,
            faults: vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::Isolate,
                FaultKind::MajorityMinority,
                FaultKind::Blackhole,
            ],
            mix: Vec::new(),
            schedule: None,
            workload: Workload {
                set_period: Some(SET_PERIOD),
                events_tail: Some(EVENTS_TAIL),
                ..Workload::default()
            },
            out: None,
            recovery_limit: Duration::from_secs(60),
            progress: false,
        }
    }

    /// The faults this run injects, and the slot length, for a cluster whose longest
    /// election timeout is `election`. Fails when pauses cannot outlast twice the election
    /// timeout inside their slot, and when a fault needs root (`disk-full`) and this process
    /// is not root.
    pub fn plan(&self, election: Duration) -> Result<(Schedule, Duration)> {
        let planned = self.plan_unchecked(election)?;
        refuse_unprivileged(&planned.0, nodes::is_root())?;
        Ok(planned)
    }

    fn plan_unchecked(&self, election: Duration) -> Result<(Schedule, Duration)> {
        let min_pause = election * 2;
        let (mut schedule, interval) = if let Some(s) = &self.schedule {
            // The shortest time between two faults (the whole run for one fault).
            let gaps = s.faults.windows(2).map(|w| w[1].at.saturating_sub(w[0].at));
            let interval = self
                .interval
                .or_else(|| gaps.min())
                .unwrap_or(self.duration);
            (s.clone(), interval)
        } else if !self.mix.is_empty() {
            mix_schedule(
                self.seed,
                &self.mix,
                self.duration,
                self.interval,
                min_pause,
            )?
        } else {
            let interval = self.interval.unwrap_or(DEFAULT_INTERVAL);
            ensure!(!interval.is_zero(), "the interval must be positive");
            (
                Schedule::generate(self.seed, &self.faults, self.duration, interval),
                interval,
            )
        };
        if self.schedule.is_none() {
            let pauses = schedule
                .faults
                .iter()
                .any(|p| p.fault.kind() == FaultKind::Pause);
            ensure!(
                !pauses || interval >= min_pause * 2,
                "slots of {interval:?} are too short for pauses of at least {min_pause:?} (twice the election timeout): use --interval {:?} or more",
                min_pause * 2
            );
            for p in &mut schedule.faults {
                if let Fault::Pause { duration, .. } = &mut p.fault {
                    *duration = (*duration).max(min_pause);
                }
            }
        }
        Ok((schedule, interval))
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            (3..=254).contains(&self.nodes),
            "a chaos run needs 3 to 254 nodes, not {}",
            self.nodes
        );
        ensure!(!self.duration.is_zero(), "the duration must be positive");
        ensure!(
            self.hangar.is_file(),
            "{}: no such file (the hangar binary; set --hangar or HANGAR_BIN)",
            self.hangar.display()
        );
        ensure!(
            self.fixture.is_file(),
            "{}: no such file (the hangar-fixture binary; set --fixture or HANGAR_FIXTURE_BIN)",
            self.fixture.display()
        );
        self.workload.validate()
    }
}

/// Refuse a schedule with a fault that needs root (`disk-full`) unless `root`: never skip it
/// silently.
fn refuse_unprivileged(schedule: &Schedule, root: bool) -> Result<()> {
    if root {
        return Ok(());
    }
    match schedule
        .faults
        .iter()
        .find_map(|p| p.fault.kind().needs_root())
    {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

/// One entry of a fault mix: `NAME:N`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MixEntry {
    /// As written (`kill-leader`, `pause`, `partition-majority`…).
    pub name: String,
    /// The kinds it draws from (one per fault, uniformly).
    pub kinds: Vec<FaultKind>,
    /// The victim, when the name says (`-leader`, `-follower`, `-random`, `-host`); else
    /// drawn like [`Schedule::generate`] does.
    pub target: Option<Target>,
    /// The count (or weight, with an explicit interval).
    pub weight: u32,
}

/// Parse a mix: `NAME:N,…` (or `NAME=N`). A name is a fault kind (`kill`, `restart`,
/// `pause`, `isolate`, `majority-minority` alias `partition-majority`, `blackhole`, `delay`,
/// `kill-upstream`), `partition` (any of isolate, majority-minority and blackhole) or `all`,
/// optionally followed by a target: `-leader`, `-follower`, `-random` or `-host` (the node
/// running the fixture's single instance), e.g. `kill-leader`, `pause-host`,
/// `isolate-leader`.
pub fn parse_mix(s: &str) -> Result<Vec<MixEntry>> {
    let mut mix = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once([':', '='])
            .ok_or_else(|| anyhow!("mix entry {part:?}: expected NAME:COUNT"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .with_context(|| format!("mix entry {part:?}: bad count"))?;
        let name = name.trim().to_ascii_lowercase().replace('_', "-");
        let (kinds, target) =
            parse_mix_name(&name).with_context(|| format!("mix entry {part:?}"))?;
        if weight > 0 {
            mix.push(MixEntry {
                name,
                kinds,
                target,
                weight,
            });
        }
    }
    ensure!(!mix.is_empty(), "the mix {s:?} asks for no fault");
    Ok(mix)
}

fn parse_mix_name(name: &str) -> Result<(Vec<FaultKind>, Option<Target>)> {
    let alias = match name {
        "partition-majority" | "partition-minority" | "partition-split" => "majority-minority",
        other => other,
    };
    if let Ok(kinds) = FaultKind::parse_list(alias) {
        return Ok((kinds, None));
    }
    let (base, suffix) = alias
        .rsplit_once('-')
        .ok_or_else(|| anyhow!("unknown fault {name:?}"))?;
    let target = match suffix {
        "leader" => Target::Leader,
        "follower" => Target::Follower,
        "random" | "any" => Target::Random,
        "host" => Target::HostOfInstance(SERVER_ID.to_owned()),
        _ => {
            return Err(FaultKind::parse_list(alias)
                .err()
                .unwrap_or_else(|| anyhow!("unknown fault {name:?}")));
        }
    };
    let kinds = FaultKind::parse_list(base)?;
    if let Some(k) = kinds.iter().find(|k| {
        matches!(
            k,
            FaultKind::MajorityMinority | FaultKind::KillUpstream | FaultKind::HangUpstream
        )
    }) {
        bail!("{k} takes no target (-{suffix})");
    }
    Ok((kinds, Some(target)))
}

/// Split `slots` among `weights` in proportion, exactly (largest remainder, ties to the
/// first).
fn apportion(weights: &[u32], slots: u64) -> Vec<u64> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut counts: Vec<u64> = weights
        .iter()
        .map(|&w| u64::from(w) * slots / total)
        .collect();
    let mut left = slots - counts.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(u64::from(weights[i]) * slots % total));
    for &i in by_remainder.iter().cycle().take(weights.len() * 2) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// The schedule of a mix; see the module documentation.
fn mix_schedule(
    seed: u64,
    mix: &[MixEntry],
    duration: Duration,
    interval: Option<Duration>,
    min_pause: Duration,
) -> Result<(Schedule, Duration)> {
    let weights: Vec<u32> = mix.iter().map(|e| e.weight).collect();
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    ensure!(total > 0, "the mix asks for no fault");
    let (slots, interval) = match interval {
        Some(i) => {
            ensure!(!i.is_zero(), "the interval must be positive");
            ((duration.as_nanos() / i.as_nanos()) as u64, i)
        }
        None => {
            let slots = u32::try_from(total).context("too many faults in the mix")?;
            (total, duration / slots)
        }
    };
    let counts = apportion(&weights, slots);
    let mut order: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i, n as usize))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let mut faults = Vec::with_capacity(order.len());
    for (slot, &e) in order.iter().enumerate() {
        let entry = &mix[e];
        let start = interval * u32::try_from(slot).context("too many slots")?;
        let at = start + between(&mut rng, Duration::ZERO, interval / 4);
        let kind = *entry.kinds.choose(&mut rng).unwrap_or(&FaultKind::Kill);
        faults.push(Planned {
            at,
            fault: draw_fault(&mut rng, kind, entry.target.as_ref(), interval, min_pause),
        });
    }
    Ok((Schedule { seed, faults }, interval))
}

/// A fault of `kind` at `target` (drawn when `None`), lasting a quarter to a half of
/// `interval` (a pause at least `min_pause`).
fn draw_fault(
    rng: &mut StdRng,
    kind: FaultKind,
    target: Option<&Target>,
    interval: Duration,
    min_pause: Duration,
) -> Fault {
    let duration = between(rng, interval / 4, interval / 2);
    let pick = |rng: &mut StdRng, host: bool| match target {
        Some(t) => t.clone(),
        None => draw_target(rng, host),
    };
    match kind {
        FaultKind::Kill => Fault::Kill {
            target: pick(rng, true),
            down_for: duration,
        },
        FaultKind::Restart => Fault::Restart {
            node: pick(rng, false),
        },
        FaultKind::Pause => Fault::Pause {
            target: pick(rng, false),
            duration: duration.max(min_pause),
        },
        FaultKind::Isolate => Fault::Partition {
            kind: PartitionKind::Isolate(pick(rng, false)),
            duration,
        },
        FaultKind::MajorityMinority => Fault::Partition {
            kind: PartitionKind::MajorityMinority,
            duration,
        },
        FaultKind::Blackhole => Fault::Partition {
            kind: PartitionKind::Blackhole(pick(rng, false)),
            duration,
        },
        FaultKind::Delay => {
            let scope = match target {
                Some(t) => DelayScope::Node(t.clone()),
                None if rng.random_bool(0.25) => DelayScope::All,
                None => DelayScope::Node(draw_target(rng, false)),
            };
            Fault::Delay {
                scope,
                by: between(rng, Duration::from_millis(10), Duration::from_millis(150)),
                duration,
            }
        }
        FaultKind::KillUpstream => Fault::KillUpstream,
        FaultKind::HangUpstream => Fault::HangUpstream { duration },
        FaultKind::DiskFull => Fault::DiskFull {
            target: pick(rng, false),
            duration,
        },
    }
}

/// Parse a duration: one or more `<number><unit>` with units `ms`, `s`, `m`, `h` (`500ms`,
/// `60s`, `30m`, `1h30m`, `1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let text = s.trim();
    ensure!(!text.is_empty(), "empty duration");
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        ensure!(
            n > 0,
            "bad duration {s:?}: expected a number at {rest:?} (e.g. 500ms, 60s, 30m, 1h)"
        );
        let number: f64 = rest[..n]
            .parse()
            .with_context(|| format!("bad duration {s:?}"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..u] {
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => bail!("bad duration {s:?}: a unit is needed (ms, s, m or h)"),
            other => bail!("bad duration {s:?}: unknown unit {other:?} (ms, s, m or h)"),
        };
        rest = &rest[u..];
        total += Duration::try_from_secs_f64(number * seconds)
            .with_context(|| format!("bad duration {s:?}"))?;
    }
    Ok(total)
}

/// Two or more of the run's fixture processes alive at the same time, over consecutive
/// samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceViolation {
    /// First sample that saw it (ns on the run's clock).
    pub from_ns: u64,
    /// Last sample that saw it.
    pub to_ns: u64,
    /// Samples that saw it.
    pub samples: u64,
    /// The most processes seen at once.
    pub processes: usize,
    /// Every process involved, with the node it runs under (`None`: none).
    pub pids: BTreeMap<u32, Option<u64>>,
}

/// The single-instance invariant over the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InstanceReport {
    /// Samples taken.
    pub samples: u64,
    /// Samples that saw exactly one process.
    pub samples_running: u64,
    /// The most fixture processes seen at once.
    pub max_processes: usize,
    /// Every time more than one ran.
    pub violations: Vec<InstanceViolation>,
}

/// An upstream process without a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Orphan {
    /// Its pid.
    pub pid: u32,
    /// Since when it ran under no node (ns on the run's clock).
    pub since_ns: u64,
    /// Its command line.
    pub argv: String,
}

/// How the cluster came back after the faults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// Every node ready and caught up in time.
    pub ready: bool,
    /// How long that took after the faults stopped (ms).
    pub after_ms: u64,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nodes that had exited on their own (they were started again).
    pub exited: Vec<u64>,
}

/// Numbers about one workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadFigures {
    /// `register`, `set`, `calls` or `events`.
    pub workload: String,
    /// Operations recorded.
    pub ops: u64,
    /// Acknowledged.
    pub ok: u64,
    /// Definitely without effect.
    pub fail: u64,
    /// Unknown outcome.
    pub info: u64,
    /// Operations per second, first invocation to last completion.
    pub ops_per_sec: f64,
    /// Acknowledged operations per second, same span.
    pub ok_per_sec: f64,
    /// Median latency of `Ok` operations (ms).
    pub p50_ms: f64,
    /// 99th percentile latency of `Ok` operations (ms).
    pub p99_ms: f64,
    /// Longest time without an `Ok` completion (ms).
    pub max_gap_ms: f64,
}

/// Numbers about one kind of fault.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultFigures {
    /// Its name.
    pub kind: String,
    /// Faults of this kind in the schedule.
    pub planned: usize,
    /// Injected (and healed, or not: see `heal_failed`).
    pub injected: usize,
    /// Could not be injected (no node to hit…).
    pub inject_failed: usize,
    /// Injected but could not be healed.
    pub heal_failed: usize,
    /// Injected faults that hit the node that led when it was resolved.
    pub hit_leader: usize,
    /// Total time under faults of this kind (ms, start to end of healing).
    pub total_ms: f64,
    /// 99th percentile latency of `Ok` operations in flight during faults of this kind.
    pub p99_ms: f64,
    /// Per workload: the longest gap between two `Ok` completions that overlaps a fault of
    /// this kind (ms).
    pub unavailability_ms: BTreeMap<String, f64>,
    /// The largest of `unavailability_ms`, over the register, set and calls workloads.
    pub max_unavailability_ms: f64,
}

/// Latency of acknowledged operations during faults and outside.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencyFigures {
    /// All `Ok` operations, p50 (ms).
    pub p50_ms: f64,
    /// All `Ok` operations, p99 (ms).
    pub p99_ms: f64,
    /// `Ok` operations in flight during a fault, p50 (ms).
    pub during_faults_p50_ms: f64,
    /// `Ok` operations in flight during a fault, p99 (ms).
    pub during_faults_p99_ms: f64,
    /// `Ok` operations in flight outside faults, p50 (ms).
    pub outside_faults_p50_ms: f64,
    /// `Ok` operations in flight outside faults, p99 (ms).
    pub outside_faults_p99_ms: f64,
}

/// Everything a run found; `report.json` is this, serialized.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Passed: no problem at all.
    pub ok: bool,
    /// The seed.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: u64,
    /// Where the outputs are.
    pub out_dir: PathBuf,
    /// Wall-clock time of the run clock's zero (ms since the Unix epoch), to line the
    /// history up with the node logs.
    pub started_unix_ms: u64,
    /// When the faults began (ns on the run's clock; after the warm-up).
    pub faults_start_ns: u64,
    /// When the last fault's slot ended.
    pub faults_end_ns: u64,
    /// When the run ended (nodes stopped).
    pub end_ns: u64,
    /// The fault slot.
    pub interval_ms: u64,
    /// The faults planned.
    pub schedule: Schedule,
    /// The faults as injected and healed.
    pub faults: Vec<FaultRecord>,
    /// Per fault kind.
    pub fault_figures: Vec<FaultFigures>,
    /// Per workload.
    pub workloads: Vec<WorkloadFigures>,
    /// Latency during faults and outside.
    pub latency: LatencyFigures,
    /// The single-instance invariant.
    pub single_instance: InstanceReport,
    /// Upstream processes that outlived their node during the run.
    pub orphans_during: Vec<Orphan>,
    /// Processes of the run left after every node was stopped.
    pub orphans_after: Vec<Orphan>,
    /// How the cluster came back.
    pub recovery: Recovery,
    /// Final reads that never succeeded.
    pub final_reads_missing: Vec<String>,
    /// The history checker's report.
    pub checker: Report,
    /// Everything that went wrong, in words (empty: the run passed).
    pub problems: Vec<String>,
    /// The history (not in `report.json`: see `history.jsonl`).
    #[serde(skip)]
    pub ops: Vec<Op>,
    /// Node log lines around the violations (empty when there is none).
    #[serde(skip)]
    pub log_excerpt: String,
}

impl RunReport {
    /// The figures for people: faults, workloads, latency, unavailability, invariants,
    /// checker.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let ms = |ns: u64| ns as f64 / 1e6;
        let _ = writeln!(
            s,
            "hangar-chaos run: seed {}, {} nodes, faults for {:.1} s (slot {} ms), output {}",
            self.seed,
            self.nodes,
            ms(self.faults_end_ns.saturating_sub(self.faults_start_ns)) / 1000.0,
            self.interval_ms,
            self.out_dir.display()
        );
        let planned = self.schedule.faults.len();
        let injected: usize = self.fault_figures.iter().map(|f| f.injected).sum();
        let _ = writeln!(s, "\nfaults: {planned} planned, {injected} injected");
        let _ = writeln!(
            s,
            "  {:<18} {:>7} {:>8} {:>6} {:>8} {:>9} {:>9}  max unavailability (ms) register/set/calls/events",
            "kind", "planned", "injected", "failed", "leader", "total s", "p99 ms"
        );
        for f in &self.fault_figures {
            let u = |w: &str| {
                f.unavailability_ms
                    .get(w)
                    .map_or("-".to_owned(), |v| format!("{v:.0}"))
            };
            let _ = writeln!(
                s,
                "  {:<18} {:>7} {:>8} {:>6} {:>8} {:>9.1} {:>9.1}  {} / {} / {} / {}",
                f.kind,
                f.planned,
                f.injected,
                f.inject_failed + f.heal_failed,
                f.hit_leader,
                f.total_ms / 1000.0,
                f.p99_ms,
                u("register"),
                u("set"),
                u("calls"),
                u("events"),
            );
        }
        let told: Vec<&FaultRecord> = self.faults.iter().filter(|r| r.outcome.is_some()).collect();
        if !told.is_empty() {
            let _ = writeln!(s, "  what the victims did (faults.jsonl has all):");
            for r in told.iter().take(10) {
                let _ = writeln!(
                    s,
                    "    {} {}: {}",
                    r.index + 1,
                    r.kind,
                    r.outcome.as_deref().unwrap_or("")
                );
            }
            if told.len() > 10 {
                let _ = writeln!(s, "    … and {} more", told.len() - 10);
            }
        }
        let _ = writeln!(s, "\nworkloads:");
        for w in &self.workloads {
            let _ = writeln!(
                s,
                "  {:<8} {:>7} ops {:>7.1}/s (ok {:>6.1}/s)  ok {:>6} fail {:>6} info {:>5}  p50 {:>7.1} ms  p99 {:>7.1} ms  max gap {:>7.0} ms",
                w.workload,
                w.ops,
                w.ops_per_sec,
                w.ok_per_sec,
                w.ok,
                w.fail,
                w.info,
                w.p50_ms,
                w.p99_ms,
                w.max_gap_ms
            );
        }
        let l = &self.latency;
        let _ = writeln!(
            s,
            "latency of ok ops: all p50 {:.1} / p99 {:.1} ms; during faults p50 {:.1} / p99 {:.1} ms; outside p50 {:.1} / p99 {:.1} ms",
            l.p50_ms,
            l.p99_ms,
            l.during_faults_p50_ms,
            l.during_faults_p99_ms,
            l.outside_faults_p50_ms,
            l.outside_faults_p99_ms
        );
        let i = &self.single_instance;
        let _ = writeln!(
            s,
            "\nsingle instance: {} samples ({} with the instance running), at most {} process(es) at once, {} violation(s)",
            i.samples,
            i.samples_running,
            i.max_processes,
            i.violations.len()
        );
        let _ = writeln!(
            s,
            "orphans: {} during the run, {} after the nodes stopped",
            self.orphans_during.len(),
            self.orphans_after.len()
        );
        let r = &self.recovery;
        if r.ready {
            let _ = writeln!(
                s,
                "recovery: every node ready {} ms after the faults stopped",
                r.after_ms
            );
        } else {
            let _ = writeln!(s, "recovery: FAILED: {}", r.error.as_deref().unwrap_or("?"));
        }
        let _ = writeln!(
            s,
            "final reads: {}",
            if self.final_reads_missing.is_empty() {
                "all succeeded".to_owned()
            } else {
                format!("{} never succeeded", self.final_reads_missing.len())
            }
        );
        let c = &self.checker;
        let lost = c
            .violations
            .iter()
            .filter(|v| v.check == Check::LostWrites)
            .count();
        let _ = writeln!(
            s,
            "checker: {} ops; {} registers, {} sets, {} event-log reads: {} violation(s) ({} lost acknowledged write(s)), {} undecided",
            c.ops,
            c.register_keys,
            c.set_keys,
            c.event_reads,
            c.violations.len(),
            lost,
            c.unknown.len()
        );
        if self.problems.is_empty() {
            let _ = writeln!(s, "\nPASS: 0 violations");
        } else {
            let _ = writeln!(s, "\nFAIL: {} problem(s):", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }

    /// For a failing run: the seed and how to run it again, the checker's minimal violating
    /// windows, and the node logs around the violations.
    pub fn failure_details(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "seed {} (again: hangar-chaos run --nodes {} --seed {} --duration {}ms --schedule {})",
            self.seed,
            self.nodes,
            self.seed,
            (self.faults_end_ns.saturating_sub(self.faults_start_ns)) / 1_000_000,
            self.out_dir.join("schedule.json").display()
        );
        if !self.checker.ok() {
            let _ = writeln!(s, "\n{}", self.checker.render(&self.ops));
        }
        for v in &self.single_instance.violations {
            let _ = writeln!(
                s,
                "single instance violated at {:.3}..{:.3} s: {} processes {:?}",
                v.from_ns as f64 / 1e9,
                v.to_ns as f64 / 1e9,
                v.processes,
                v.pids
            );
        }
        if !self.log_excerpt.is_empty() {
            let _ = writeln!(
                s,
                "\nnode logs around the violations (all logs: {}):\n{}",
                self.out_dir.join("logs").display(),
                self.log_excerpt
            );
        }
        s
    }
}

/// The process tree, as far as the run needs it: read from `/proc`.
mod procfs {
    /// The parent of `pid`.
    pub fn parent(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(1)?.parse().ok()
    }

    /// The command line of `pid` (empty for a zombie or a process gone).
    pub fn argv(pid: u32) -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Samples the fixture processes: the single-instance invariant and orphans.
struct Sampler {
    marker: String,
    fixture: PathBuf,
    hangar: PathBuf,
    me: u32,
    start: std::time::Instant,
    report: InstanceReport,
    orphans: Vec<Orphan>,
    /// Fixture processes seen without a node, since when.
    unhosted: BTreeMap<u32, u64>,
}

impl Sampler {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The node `pid` runs under: an ancestor that is a `hangar` child of this process (its
    /// `--node-id` read from its command line).
    fn host(&self, pid: u32) -> Option<u64> {
        let mut p = pid;
        for _ in 0..64 {
            let parent = procfs::parent(p)?;
            if parent == self.me {
                let argv = procfs::argv(p);
                if argv.first().map(Path::new) != Some(self.hangar.as_path()) {
                    return None;
                }
                let id = argv
                    .iter()
                    .position(|a| a == "--node-id")
                    .and_then(|i| argv.get(i + 1))
                    .and_then(|v| v.parse().ok());
                return Some(id.unwrap_or(0));
            }
            if parent <= 1 {
                return None;
            }
            p = parent;
        }
        None
    }

    fn sample(&mut self) {
        let now = self.now_ns();
        let fixtures: Vec<nodes::ProcessInfo> = nodes::marked_processes(&self.marker)
            .into_iter()
            .filter(|p| p.argv.first().map(Path::new) == Some(self.fixture.as_path()))
            .collect();
        let hosts: BTreeMap<u32, Option<u64>> =
            fixtures.iter().map(|p| (p.pid, self.host(p.pid))).collect();
        self.report.samples += 1;
        if fixtures.len() == 1 {
            self.report.samples_running += 1;
        }
        self.report.max_processes = self.report.max_processes.max(fixtures.len());
        if fixtures.len() > 1 {
            let prev_violated = self
                .report
                .violations
                .last()
                .is_some_and(|v| v.to_ns + 3 * SAMPLE_EVERY.as_nanos() as u64 >= now);
            match self.report.violations.last_mut() {
                Some(v) if prev_violated => {
                    v.to_ns = now;
                    v.samples += 1;
                    v.processes = v.processes.max(fixtures.len());
                    v.pids.extend(hosts.iter().map(|(&p, &h)| (p, h)));
                }
                _ => self.report.violations.push(InstanceViolation {
                    from_ns: now,
                    to_ns: now,
                    samples: 1,
                    processes: fixtures.len(),
                    pids: hosts.clone(),
                }),
            }
        }
        self.unhosted.retain(|pid, _| hosts.get(pid) == Some(&None));
        for p in &fixtures {
            if hosts.get(&p.pid) != Some(&None) {
                continue;
            }
            let since = *self.unhosted.entry(p.pid).or_insert(now);
            if now.saturating_sub(since) >= ORPHAN_GRACE.as_nanos() as u64
                && !self.orphans.iter().any(|o| o.pid == p.pid)
            {
                self.orphans.push(Orphan {
                    pid: p.pid,
                    since_ns: since,
                    argv: p.argv.join(" "),
                });
            }
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Sampler {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(),
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self
    }
}

/// Prints progress lines, stamped with the run's clock.
#[derive(Clone, Copy)]
struct Say {
    on: bool,
    start: std::time::Instant,
}

impl Say {
    fn line(&self, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{:>8.3}s] {what}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// Whether `fault` is aimed at the leader (then it waits for a majority to agree on one).
fn aims_at_leader(fault: &Fault) -> bool {
    let leader = |t: &Target| matches!(t, Target::Leader | Target::Follower);
    match fault {
        Fault::Kill { target, .. } | Fault::Pause { target, .. } => leader(target),
        Fault::Restart { node } => leader(node),
        Fault::Partition {
            kind: PartitionKind::Isolate(t) | PartitionKind::Blackhole(t),
            ..
        } => leader(t),
        Fault::Delay {
            scope: DelayScope::Node(t),
            ..
        } => leader(t),
        Fault::DiskFull { target, .. } => leader(target),
        _ => false,
    }
}

fn ns_since(start: std::time::Instant, t: std::time::Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX)
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The output directory: `out` (created), or a new one under `$TMPDIR`, kept.
fn output_dir(out: Option<&Path>) -> Result<PathBuf> {
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            Ok(dir.to_owned())
        }
        None => Ok(tempfile::Builder::new()
            .prefix("hangar-chaos-")
            .tempdir()
            .context("create an output directory under $TMPDIR")?
            .keep()),
    }
}

/// What the fault phase did, per planned fault.
#[derive(Default)]
struct FaultTally {
    inject_failed: BTreeMap<FaultKind, usize>,
    heal_failed: BTreeMap<FaultKind, usize>,
    injected: BTreeMap<FaultKind, usize>,
}

/// Run the scenario `opts` describes; see the module documentation. An error means the run
/// could not be carried out (bad options, a cluster that does not start, an output that
/// cannot be written); what Hangar got wrong is in [`RunReport::problems`].
pub async fn run(opts: RunOptions) -> Result<RunReport> {
    opts.validate()?;
    let mut node_opts = nodes::Options::new(opts.nodes, &opts.hangar, &opts.fixture, opts.seed);
    let election = Duration::from_millis(node_opts.election_max_ms);
    let (schedule, interval) = opts.plan(election)?;
    let planned = |k: FaultKind| schedule.faults.iter().any(|p| p.fault.kind() == k);
    if planned(FaultKind::DiskFull) {
        node_opts.small_disks = Some(SMALL_DISK_MIB);
    }
    if planned(FaultKind::HangUpstream) {
        node_opts.upstream_request_timeout = Some(HANG_REQUEST_TIMEOUT);
    }
    let mut cfg = opts.workload.clone();
    cfg.call_tool = format!("{SERVER_ID}__echo");
    let out = output_dir(opts.out.as_deref())?;
    std::fs::write(
        out.join("schedule.json"),
        serde_json::to_string_pretty(&schedule).context("serialize the schedule")?,
    )
    .with_context(|| format!("write {}", out.join("schedule.json").display()))?;
    let boot = std::time::Instant::now();
    let pre = Say {
        on: opts.progress,
        start: boot,
    };
    pre.line(format_args!(
        "seed {}: {} faults planned over {:?} (slots of {:?}); output in {}",
        opts.seed,
        schedule.faults.len(),
        opts.duration,
        interval,
        out.display()
    ));

    let mut nodes = Nodes::start_with(node_opts)
        .await
        .context("start the cluster")?;
    pre.line(format_args!(
        "{} nodes ready in {:.1} s",
        opts.nodes,
        boot.elapsed().as_secs_f64()
    ));

    // The run's clock.
    let start = std::time::Instant::now();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let say = Say {
        on: opts.progress,
        start,
    };
    let mut problems: Vec<String> = Vec::new();
    let targets: Vec<(u64, String)> = nodes
        .ids()
        .into_iter()
        .map(|id| Ok((id, nodes.api_base(id)?)))
        .collect::<Result<_>>()?;
    let recorder = Recorder::create(&out.join("history.jsonl"), start)?;

    // The sampler and the workloads.
    let (stop_sampler, sampler_stop) = watch::channel(false);
    let sampler = Sampler {
        marker: nodes.marker().to_owned(),
        fixture: opts.fixture.clone(),
        hangar: opts.hangar.clone(),
        me: std::process::id(),
        start,
        report: InstanceReport::default(),
        orphans: Vec::new(),
        unhosted: BTreeMap::new(),
    };
    let sampler = tokio::spawn(sampler.run(sampler_stop));
    let (stop_workload, workload_stop) = watch::channel(false);
    let workload = tokio::spawn(workload::run(
        targets.clone(),
        cfg.clone(),
        recorder.clone(),
        workload_stop,
        opts.seed,
    ));

    // Warm-up: every workload acknowledged something before the first fault.
    let warm_deadline = Instant::now() + WARMUP_LIMIT;
    loop {
        let ops = recorder.ops();
        let cold: Vec<WorkloadKind> = cfg
            .workloads
            .iter()
            .copied()
            .filter(|w| {
                !ops.iter()
                    .any(|o| w.covers(o.kind) && o.outcome == Outcome::Ok)
            })
            .collect();
        if cold.is_empty() {
            say.line("every workload acknowledged an operation: faults begin");
            break;
        }
        if Instant::now() >= warm_deadline {
            let names: Vec<&str> = cold.iter().map(|w| w.name()).collect();
            problems.push(format!(
                "warm-up: no acknowledged operation of {} within {WARMUP_LIMIT:?} of a healthy start",
                names.join(", ")
            ));
            say.line(problems.last().map_or("", String::as_str));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The faults.
    let faults_start = Instant::now();
    let faults_start_ns = ns_since(start, faults_start.into_std());
    let mut inj = Injector::new(opts.seed, Instant::from_std(start));
    let mut tally = FaultTally::default();
    for (i, p) in schedule.faults.iter().enumerate() {
        tokio::time::sleep_until(faults_start + p.at).await;
        let kind = p.fault.kind();
        if aims_at_leader(&p.fault) {
            let deadline = Instant::now() + LEADER_WAIT;
            while nodes.leader().await.is_none() && Instant::now() < deadline {
                tokio::time::sleep(nodes::POLL).await;
            }
        }
        match inj.inject(&mut nodes, &p.fault).await {
            Ok(injected) => {
                *tally.injected.entry(kind).or_default() += 1;
                say.line(format_args!(
                    "fault {}/{}: {kind}: {} for {:?}",
                    i + 1,
                    schedule.faults.len(),
                    injected.detail,
                    p.fault.duration()
                ));
                tokio::time::sleep_until(injected.until).await;
                match inj.heal(&mut nodes, injected).await {
                    Ok(rec) => say.line(format_args!(
                        "  healed in {:.0} ms{}",
                        (rec.end_ns - rec.heal_ns) as f64 / 1e6,
                        rec.outcome
                            .as_deref()
                            .map_or(String::new(), |o| format!(": {o}"))
                    )),
                    Err(e) => {
                        *tally.heal_failed.entry(kind).or_default() += 1;
                        problems.push(format!(
                            "fault {} ({kind}) could not be healed: {e:#}",
                            i + 1
                        ));
                        say.line(problems.last().map_or("", String::as_str));
                    }
                }
            }
            Err(e) => {
                *tally.inject_failed.entry(kind).or_default() += 1;
                say.line(format_args!(
                    "fault {}/{}: {kind}: could not be injected: {e:#}",
                    i + 1,
                    schedule.faults.len()
                ));
            }
        }
    }
    tokio::time::sleep_until(faults_start + opts.duration).await;
    let faults_end = Instant::now();
    let faults_end_ns = ns_since(start, faults_end.into_std());

    // Heal everything and wait until every node is ready again.
    say.line("faults stopped: healing; waiting for every node to be ready");
    let recovery = recover(&mut nodes, opts.recovery_limit, faults_end, &say).await;
    for id in &recovery.exited {
        problems.push(format!("node {id} exited on its own during the run"));
    }
    if let Some(e) = &recovery.error {
        problems.push(e.clone());
    }

    // Stop the workloads; the final reads.
    let _ = stop_workload.send(true);
    match tokio::time::timeout(cfg.request_timeout * 4 + Duration::from_secs(10), workload).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => problems.push(format!("the workload failed: {e:#}")),
        Ok(Err(e)) => problems.push(format!("the workload failed: {e}")),
        Err(_) => problems.push("the workload did not stop in time".to_owned()),
    }
    say.line("workloads stopped; final reads");
    let final_reads_missing = match workload::final_reads(&targets, &cfg, &recorder).await {
        Ok(missing) => missing,
        Err(e) => vec![format!("final reads: {e:#}")],
    };
    for m in &final_reads_missing {
        problems.push(format!("final read never succeeded: {m}"));
    }

    // Stop sampling, then the nodes; nothing of the run may be left.
    let _ = stop_sampler.send(true);
    let sampler = sampler.await.context("the invariant sampler")?;
    say.line("stopping the nodes");
    for id in nodes.alive() {
        if let Err(e) = nodes.terminate(id).await {
            say.line(format_args!("stop node {id}: {e:#}"));
        }
    }
    let left_deadline = std::time::Instant::now() + ORPHAN_GRACE;
    let mut left = nodes::marked_processes(nodes.marker());
    while !left.is_empty() && std::time::Instant::now() < left_deadline {
        tokio::time::sleep(nodes::POLL).await;
        left = nodes::marked_processes(nodes.marker());
    }
    let end_ns = ns_since(start, std::time::Instant::now());
    let orphans_after: Vec<Orphan> = left
        .iter()
        .map(|p| Orphan {
            pid: p.pid,
            since_ns: end_ns,
            argv: p.argv.join(" "),
        })
        .collect();
    let logs = copy_logs(&nodes, &out.join("logs"));
    drop(nodes);

    for v in &sampler.report.violations {
        problems.push(format!(
            "single instance violated: {} fixture processes at once {:?} (pid: node) from {:.3} s to {:.3} s ({} samples)",
            v.processes,
            v.pids,
            v.from_ns as f64 / 1e9,
            v.to_ns as f64 / 1e9,
            v.samples
        ));
    }
    for o in &sampler.orphans {
        problems.push(format!(
            "upstream process {} ran under no node from {:.3} s on: {}",
            o.pid,
            o.since_ns as f64 / 1e9,
            o.argv
        ));
    }
    for o in &orphans_after {
        problems.push(format!(
            "process {} left after every node was stopped: {}",
            o.pid, o.argv
        ));
    }

    // The history.
    recorder.flush()?;
    let ops = recorder.ops();
    drop(recorder);
    say.line(format_args!("checking {} operations", ops.len()));
    let (ops, checker) = tokio::task::spawn_blocking(move || {
        let report = checker::check_all(&ops);
        (ops, report)
    })
    .await
    .context("the checker")?;
    for v in &checker.violations {
        problems.push(format!(
            "checker [{}] {}: {}",
            v.check, v.key, v.explanation
        ));
    }
    for u in &checker.unknown {
        problems.push(format!(
            "checker [{}] {}: undecided: {}",
            u.check, u.key, u.reason
        ));
    }

    let records = inj.log().to_vec();
    let (fault_figures, latency) = fault_figures(&ops, &schedule, &records, &tally, &cfg);
    let workloads = workload_figures(&ops);
    let mut times: Vec<u64> = Vec::new();
    for v in &checker.violations {
        let window: Vec<&Op> = ops.iter().filter(|o| v.window.contains(&o.index)).collect();
        times.extend(window.iter().map(|o| o.invoke_ns));
        times.extend(window.iter().map(|o| o.complete_ns).max());
    }
    times.extend(sampler.report.violations.iter().map(|v| v.from_ns));
    times.extend(sampler.orphans.iter().map(|o| o.since_ns));
    if recovery.error.is_some() {
        times.push(faults_end_ns);
    }
    let log_excerpt = if problems.is_empty() {
        String::new()
    } else {
        log_excerpt(&logs, started_unix_ms, &times)
    };
    let report = RunReport {
        ok: problems.is_empty(),
        seed: opts.seed,
        nodes: opts.nodes,
        out_dir: out.clone(),
        started_unix_ms,
        faults_start_ns,
        faults_end_ns,
        end_ns,
        interval_ms: interval.as_millis() as u64,
        schedule,
        faults: records,
        fault_figures,
        workloads,
        latency,
        single_instance: sampler.report,
        orphans_during: sampler.orphans,
        orphans_after,
        recovery,
        final_reads_missing,
        checker,
        problems,
        ops,
        log_excerpt,
    };
    std::fs::write(out.join("faults.jsonl"), inj.log_jsonl()?)
        .with_context(|| format!("write {}", out.join("faults.jsonl").display()))?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report).context("serialize the report")?,
    )
    .with_context(|| format!("write {}", out.join("report.json").display()))?;
    Ok(report)
}

/// Undo every fault still in effect, start nodes that exited on their own again, and wait
/// (at most `limit` after `since`) until every node is ready and caught up.
async fn recover(nodes: &mut Nodes, limit: Duration, since: Instant, say: &Say) -> Recovery {
    let mut recovery = Recovery::default();
    nodes.proxy().heal();
    for id in nodes.paused() {
        if let Err(e) = nodes.resume(id) {
            say.line(format_args!("resume node {id}: {e:#}"));
        }
    }
    for pid in nodes.resume_upstreams() {
        say.line(format_args!(
            "upstream process {pid} was still paused: resumed"
        ));
    }
    for id in nodes.full_disks() {
        if let Err(e) = nodes.free_disk(id) {
            say.line(format_args!("free node {id}'s disk: {e:#}"));
        }
    }
    let deadline = since + limit;
    loop {
        for id in nodes.ids() {
            if !nodes.alive().contains(&id) {
                say.line(format_args!("node {id} is down: starting it again"));
                if let Err(e) = nodes.restart(id).await {
                    say.line(format_args!("restart node {id}: {e:#}"));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match nodes
            .wait_all_ready(left.max(Duration::from_millis(1)))
            .await
        {
            Ok(()) => {
                recovery.ready = true;
                break;
            }
            Err(e) => {
                // A node that exited on its own: note it, start it again, wait on.
                let down: Vec<u64> = nodes
                    .ids()
                    .into_iter()
                    .filter(|id| !nodes.alive().contains(id))
                    .collect();
                let new: Vec<u64> = down
                    .into_iter()
                    .filter(|id| !recovery.exited.contains(id))
                    .collect();
                if !new.is_empty() && Instant::now() < deadline {
                    say.line(format_args!("nodes {new:?} exited on their own: {e:#}"));
                    recovery.exited.extend(new);
                    continue;
                }
                let mut why =
                    format!("not every node was ready {limit:?} after the faults stopped: {e:#}");
                for id in nodes.ids() {
                    let c = nodes.condition(id).await;
                    if !c.ready {
                        why.push_str(&format!("; node {id}: {c}"));
                    }
                }
                recovery.error = Some(why);
                break;
            }
        }
    }
    recovery.after_ms = since.elapsed().as_millis() as u64;
    if recovery.ready {
        say.line(format_args!(
            "every node ready {} ms after the faults stopped",
            recovery.after_ms
        ));
    }
    recovery
}

/// Copy every node's logs to `dir` (`node-<id>.<start>.log`); the copies, per node.
fn copy_logs(nodes: &Nodes, dir: &Path) -> BTreeMap<u64, Vec<PathBuf>> {
    let mut copies = BTreeMap::new();
    if std::fs::create_dir_all(dir).is_err() {
        return copies;
    }
    for id in nodes.ids() {
        for (k, src) in nodes.log_paths(id).into_iter().enumerate() {
            let dst = dir.join(format!("node-{id}.{}.log", k + 1));
            if std::fs::copy(&src, &dst).is_ok() {
                copies.entry(id).or_insert_with(Vec::new).push(dst);
            }
        }
    }
    copies
}

/// Lines of the node logs within 3 s of any of `times` (ns on the run's clock, whose zero is
/// `started_unix_ms`), at most 60 per node; the tail of each node's last log when no line
/// carries a timestamp or no time is given.
fn log_excerpt(logs: &BTreeMap<u64, Vec<PathBuf>>, started_unix_ms: u64, times: &[u64]) -> String {
    const AROUND_MS: u64 = 3000;
    const MAX_LINES: usize = 60;
    let windows: Vec<(u64, u64)> = times
        .iter()
        .map(|&ns| {
            let at = started_unix_ms + ns / 1_000_000;
            (at.saturating_sub(AROUND_MS), at + AROUND_MS)
        })
        .collect();
    let mut s = String::new();
    for (id, files) in logs {
        let mut picked: Vec<String> = Vec::new();
        for f in files {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            picked.extend(
                text.lines()
                    .filter(|l| {
                        log_time_ms(l)
                            .is_some_and(|t| windows.iter().any(|&(a, b)| (a..=b).contains(&t)))
                    })
                    .map(str::to_owned),
            );
        }
        let tail_only = picked.is_empty();
        if tail_only && let Some(last) = files.last() {
            let text = std::fs::read_to_string(last).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            picked = lines[lines.len().saturating_sub(30)..]
                .iter()
                .map(|l| (*l).to_owned())
                .collect();
        }
        let cut = picked.len().saturating_sub(MAX_LINES);
        let _ = writeln!(
            s,
            "--- node {id}{} ---",
            if tail_only { " (tail)" } else { "" }
        );
        for l in &picked[cut..] {
            let _ = writeln!(s, "{l}");
        }
    }
    s
}

/// The time at the start of a log line (`2025-01-02T03:04:05.678901Z …`), in ms since the
/// Unix epoch.
fn log_time_ms(line: &str) -> Option<u64> {
    let t = line.trim_start().get(..19)?;
    let b = t.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { t.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = &line.trim_start()[19..];
    let frac_ms = rest
        .strip_prefix('.')
        .map(|f| {
            let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
            let ms: String = digits.chars().chain("000".chars()).take(3).collect();
            ms.parse::<i64>().unwrap_or(0)
        })
        .unwrap_or(0);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + frac_ms;
    u64::try_from(ms).ok()
}

/// Per workload: throughput, outcomes, latency, longest gap.
fn workload_figures(ops: &[Op]) -> Vec<WorkloadFigures> {
    workload::stats(ops)
        .workloads
        .iter()
        .map(|w| WorkloadFigures {
            workload: w.workload.name().to_owned(),
            ops: w.ops,
            ok: w.ok,
            fail: w.fail,
            info: w.info,
            ops_per_sec: w.ops_per_sec,
            ok_per_sec: if w.ops == 0 {
                0.0
            } else {
                w.ops_per_sec * w.ok as f64 / w.ops as f64
            },
            p50_ms: ms_f(w.p50),
            p99_ms: ms_f(w.p99),
            max_gap_ms: ms_f(w.max_gap),
        })
        .collect()
}

/// The gaps between consecutive `Ok` completions of `workload` (with the workload's first
/// invocation and last completion as ends).
fn ok_gaps(ops: &[Op], workload: WorkloadKind) -> Vec<(u64, u64)> {
    let mine: Vec<&Op> = ops.iter().filter(|o| workload.covers(o.kind)).collect();
    let (Some(first), Some(last)) = (
        mine.iter().map(|o| o.invoke_ns).min(),
        mine.iter().map(|o| o.complete_ns).max(),
    ) else {
        return Vec::new();
    };
    let mut done: Vec<u64> = mine
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.complete_ns)
        .collect();
    done.sort_unstable();
    let mut points = vec![first];
    points.extend(done);
    points.push(last.max(first));
    points.windows(2).map(|w| (w[0], w[1].max(w[0]))).collect()
}

/// The longest of `gaps` overlapping one of `windows` (ns).
fn longest_overlapping(gaps: &[(u64, u64)], windows: &[(u64, u64)]) -> u64 {
    gaps.iter()
        .filter(|&&(a, b)| windows.iter().any(|&(s, e)| a <= e && b >= s))
        .map(|&(a, b)| b - a)
        .max()
        .unwrap_or(0)
}

/// `[0, end]` minus `windows`.
fn complement(windows: &[(u64, u64)], end: u64) -> Vec<(u64, u64)> {
    let mut sorted = windows.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for (s, e) in sorted {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if end > at {
        out.push((at, end));
    }
    out
}

/// Per fault kind: counts, time under fault, latency and unavailability; and the latency
/// during faults and outside.
fn fault_figures(
    ops: &[Op],
    schedule: &Schedule,
    records: &[FaultRecord],
    tally: &FaultTally,
    cfg: &Workload,
) -> (Vec<FaultFigures>, LatencyFigures) {
    let injected: Vec<&FaultRecord> = records.iter().filter(|r| !r.detail.is_empty()).collect();
    let windows_of = |kind: Option<FaultKind>| -> Vec<(u64, u64)> {
        injected
            .iter()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .map(|r| (r.start_ns, r.end_ns.max(r.start_ns)))
            .collect()
    };
    let gaps: Vec<(WorkloadKind, Vec<(u64, u64)>)> = cfg
        .workloads
        .iter()
        .map(|&w| (w, ok_gaps(ops, w)))
        .collect();
    let mut kinds: BTreeSet<FaultKind> = schedule.faults.iter().map(|p| p.fault.kind()).collect();
    kinds.extend(records.iter().map(|r| r.kind));
    let figures = kinds
        .into_iter()
        .map(|kind| {
            let windows = windows_of(Some(kind));
            let unavailability_ms: BTreeMap<String, f64> = gaps
                .iter()
                .map(|(w, g)| {
                    (
                        w.name().to_owned(),
                        longest_overlapping(g, &windows) as f64 / 1e6,
                    )
                })
                .collect();
            let max_unavailability_ms = unavailability_ms
                .iter()
                .filter(|(w, _)| w.as_str() != WorkloadKind::Events.name())
                .map(|(_, &v)| v)
                .fold(0.0, f64::max);
            let of_kind = injected.iter().filter(|r| r.kind == kind);
            FaultFigures {
                kind: kind.name().to_owned(),
                planned: schedule
                    .faults
                    .iter()
                    .filter(|p| p.fault.kind() == kind)
                    .count(),
                injected: tally.injected.get(&kind).copied().unwrap_or(0),
                inject_failed: tally.inject_failed.get(&kind).copied().unwrap_or(0),
                heal_failed: tally.heal_failed.get(&kind).copied().unwrap_or(0),
                hit_leader: of_kind
                    .clone()
                    .filter(|r| r.detail.contains("(leader)"))
                    .count(),
                total_ms: of_kind
                    .map(|r| r.end_ns.saturating_sub(r.start_ns) as f64 / 1e6)
                    .sum(),
                p99_ms: ms_f(workload::latency_during(ops, &windows).1),
                unavailability_ms,
                max_unavailability_ms,
            }
        })
        .collect();
    let all = windows_of(None);
    let end = ops.iter().map(|o| o.complete_ns).max().unwrap_or(0);
    let s = workload::stats(ops);
    let (dp50, dp99) = workload::latency_during(ops, &all);
    let (op50, op99) = workload::latency_during(ops, &complement(&all, end));
    (
        figures,
        LatencyFigures {
            p50_ms: ms_f(s.p50),
            p99_ms: ms_f(s.p99),
            during_faults_p50_ms: ms_f(dp50),
            during_faults_p99_ms: ms_f(dp99),
            outside_faults_p50_ms: ms_f(op50),
            outside_faults_p99_ms: ms_f(op99),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration("10588ms").unwrap(),
            Duration::from_millis(10588)
        );
        for bad in ["", "60", "s", "5 parsecs", "-1s", "1x"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mixes_parse() {
        let m = parse_mix("kill-leader:10, pause=5,partition-majority:2,partition:1").unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].kinds, vec![FaultKind::Kill]);
        assert_eq!(m[0].target, Some(Target::Leader));
        assert_eq!(m[0].weight, 10);
        assert_eq!(
            (m[1].kinds.clone(), m[1].target.clone()),
            (vec![FaultKind::Pause], None)
        );
        assert_eq!(m[2].kinds, vec![FaultKind::MajorityMinority]);
        assert_eq!(m[3].kinds.len(), 3);
        let m = parse_mix("kill-upstream:3,pause-host:1,isolate-follower:1").unwrap();
        assert_eq!(m[0].kinds, vec![FaultKind::KillUpstream]);
        assert_eq!(m[0].target, None);
        assert_eq!(
            m[1].target,
            Some(Target::HostOfInstance(SERVER_ID.to_owned()))
        );
        assert_eq!(m[2].target, Some(Target::Follower));
        for bad in [
            "kill",
            "kill:x",
            "explode:1",
            "kill-upstream-leader:1",
            "majority-minority-leader:1",
            "kill:0",
        ] {
            assert!(parse_mix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_new_kinds_mix_and_plan() {
        let m = parse_mix("hang-upstream:2,disk-full-follower:1,disk-full:1").unwrap();
        assert_eq!(m[0].kinds, vec![FaultKind::HangUpstream]);
        assert_eq!(m[0].target, None);
        assert_eq!(m[1].kinds, vec![FaultKind::DiskFull]);
        assert_eq!(m[1].target, Some(Target::Follower));
        assert!(parse_mix("hang-upstream-leader:1").is_err());
        let (s, _) =
            mix_schedule(3, &m, Duration::from_secs(40), None, Duration::from_secs(1)).unwrap();
        assert_eq!(s.faults.len(), 4);
        for p in &s.faults {
            let d = p.fault.duration();
            assert!(
                d >= Duration::from_millis(2500) && d <= Duration::from_secs(5),
                "{p:?}"
            );
        }
        assert!(s.faults.iter().any(|p| matches!(
            &p.fault,
            Fault::DiskFull {
                target: Target::Follower,
                ..
            }
        )));
        // Without root a disk-full is refused at planning, never skipped.
        let err = refuse_unprivileged(&s, false).unwrap_err().to_string();
        assert_eq!(
            err,
            "disk-full needs root to mount a tmpfs; run as root or leave it out"
        );
        assert!(refuse_unprivileged(&s, true).is_ok());
        let hangs = Schedule {
            seed: 3,
            faults: s
                .faults
                .iter()
                .filter(|p| p.fault.kind() == FaultKind::HangUpstream)
                .cloned()
                .collect(),
        };
        assert!(refuse_unprivileged(&hangs, false).is_ok());
        assert!(aims_at_leader(&Fault::DiskFull {
            target: Target::Leader,
            duration: Duration::from_secs(1)
        }));
    }

    #[test]
    fn apportioning_is_exact() {
        assert_eq!(apportion(&[10, 5, 2], 170), vec![100, 50, 20]);
        assert_eq!(apportion(&[1, 1, 1], 10), vec![4, 3, 3]);
        assert_eq!(apportion(&[3], 7), vec![7]);
        assert_eq!(apportion(&[2, 1], 0), vec![0, 0]);
    }

    #[test]
    fn a_mix_gives_exact_counts_spread_over_the_duration() {
        let mix = parse_mix("kill-leader:100,pause:50,partition-majority:20").unwrap();
        let min_pause = Duration::from_secs(1);
        let (s, interval) =
            mix_schedule(7, &mix, Duration::from_secs(1800), None, min_pause).unwrap();
        assert_eq!(s.faults.len(), 170);
        assert_eq!(interval, Duration::from_secs(1800) / 170);
        let count = |k: FaultKind| s.faults.iter().filter(|p| p.fault.kind() == k).count();
        assert_eq!(count(FaultKind::Kill), 100);
        assert_eq!(count(FaultKind::Pause), 50);
        assert_eq!(count(FaultKind::MajorityMinority), 20);
        let mut end = Duration::ZERO;
        for (i, p) in s.faults.iter().enumerate() {
            let slot = interval * i as u32;
            assert!(p.at >= slot && p.at <= slot + interval / 4, "{p:?}");
            assert!(p.at >= end);
            end = p.at + p.fault.duration();
            assert!(
                end <= slot + interval * 3 / 4 + Duration::from_millis(1),
                "{p:?}"
            );
            match &p.fault {
                Fault::Kill { target, .. } => assert_eq!(target, &Target::Leader),
                Fault::Pause { duration, .. } => assert!(*duration >= min_pause),
                _ => {}
            }
        }
        // Reproducible; another seed, another order.
        let again = mix_schedule(7, &mix, Duration::from_secs(1800), None, min_pause).unwrap();
        assert_eq!(again.0, s);
        let other = mix_schedule(8, &mix, Duration::from_secs(1800), None, min_pause).unwrap();
        assert_ne!(other.0, s);
        // With an interval, the counts are weights.
        let (s, _) = mix_schedule(
            7,
            &parse_mix("kill-leader:10,pause:5,partition:2").unwrap(),
            Duration::from_secs(60),
            Some(Duration::from_secs(6)),
            min_pause,
        )
        .unwrap();
        assert_eq!(s.faults.len(), 10);
        assert_eq!(
            s.faults
                .iter()
                .filter(|p| p.fault.kind() == FaultKind::Kill)
                .count(),
            6
        );
    }

    #[test]
    fn plans_keep_pauses_longer_than_the_election_timeout() {
        let mut o = RunOptions::new(Path::new("/h"), Path::new("/f"));
        o.faults = vec![FaultKind::Pause];
        o.interval = Some(Duration::from_secs(2));
        let (s, _) = o.plan(Duration::from_millis(500)).unwrap();
        assert!(!s.faults.is_empty());
        assert!(
            s.faults
                .iter()
                .all(|p| p.fault.duration() >= Duration::from_secs(1))
        );
        o.interval = Some(Duration::from_millis(1900));
        assert!(o.plan(Duration::from_millis(500)).is_err());
        o.faults = vec![FaultKind::Kill];
        assert!(o.plan(Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn unavailability_counts_gaps_overlapping_the_windows() {
        let ms = 1_000_000;
        let op = |i: u64, inv: u64, done: u64, outcome: Outcome| Op {
            index: i,
            process: 0,
            node: 1,
            kind: crate::history::OpKind::Write,
            key: "r0".into(),
            value: serde_json::Value::Null,
            outcome,
            invoke_ns: inv * ms,
            complete_ns: done * ms,
            error: None,
        };
        let ops = vec![
            op(0, 0, 10, Outcome::Ok),
            op(1, 10, 20, Outcome::Ok),
            op(2, 20, 900, Outcome::Info),
            op(3, 900, 1000, Outcome::Ok),
            op(4, 1000, 1010, Outcome::Ok),
        ];
        let gaps = ok_gaps(&ops, WorkloadKind::Register);
        assert_eq!(
            longest_overlapping(&gaps, &[(100 * ms, 200 * ms)]),
            980 * ms
        );
        assert_eq!(
            longest_overlapping(&gaps, &[(1005 * ms, 1006 * ms)]),
            10 * ms
        );
        assert_eq!(longest_overlapping(&gaps, &[]), 0);
        assert_eq!(
            complement(&[(10, 20), (15, 30), (50, 60)], 100),
            vec![(0, 10), (30, 50), (60, 100)]
        );
    }

    #[test]
    fn runs_bound_what_each_read_records() {
        let w = RunOptions::new(Path::new("/h"), Path::new("/f")).workload;
        assert_eq!(w.set_generation(0), Some(0));
        assert_eq!(w.set_generation(16_000_000_000), Some(1));
        assert_eq!(w.set_key_of(Some(1)), "keys-g1");
        assert_eq!(w.events_tail, Some(EVENTS_TAIL));
        assert_eq!(Workload::default().set_generation(61_000_000_000), None);
        assert_eq!(Workload::default().set_key_of(None), "keys");
    }

    #[test]
    fn log_lines_are_dated() {
        assert_eq!(
            log_time_ms("2024-01-01T00:00:01.250000Z  INFO started"),
            Some(1_704_067_201_250)
        );
        assert_eq!(log_time_ms("1970-01-01T00:00:00Z x"), Some(0));
        assert_eq!(log_time_ms("  INFO no time"), None);
        assert_eq!(log_time_ms(""), None);
    }
}
