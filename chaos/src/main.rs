//! `hangar-chaos run --nodes 3 --faults kill,pause,partition --duration 60s --seed N`
//! `hangar-chaos check --history FILE`
//!
//! See `chaos/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hangar_chaos::checker;
use hangar_chaos::faults::{FaultKind, Schedule};
use hangar_chaos::nodes::find_binary;
use hangar_chaos::run::{RunOptions, parse_duration, parse_mix, run};
use hangar_chaos::workload::{self, WorkloadKind};

/// Fault injection for Hangar clusters: kills, pauses and partitions real nodes under a
/// workload, then checks the history (linearizability, lost writes, event-log prefixes) and
/// the single-instance and orphan invariants.
#[derive(Parser, Debug)]
#[command(name = "hangar-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a cluster, run the workloads under a seeded fault schedule and check everything.
    Run(Box<RunArgs>),
    /// Run the checker on a saved history (`history.jsonl` of a run).
    Check {
        /// The history file.
        #[arg(long)]
        history: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Number of nodes (3 or more).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Fault kinds to draw from, one per interval: kill, restart, pause, isolate,
    /// majority-minority, blackhole, delay, kill-upstream, hang-upstream, disk-full (root
    /// only); `partition` = isolate, majority-minority and blackhole; `all` = every kind but
    /// disk-full.
    #[arg(long, default_value = "kill,pause,partition")]
    faults: String,
    /// Exact fault counts instead: `NAME:N,…`, e.g. `kill-leader:100,pause:50,partition-majority:20`
    /// (N faults of each, spread evenly over the duration; with --interval the N are weights).
    /// Names: a fault kind or `partition`, optionally with a target suffix -leader, -follower,
    /// -random or -host.
    #[arg(long, conflicts_with_all = ["faults", "schedule"])]
    mix: Option<String>,
    /// A schedule to replay (`schedule.json` of an earlier run).
    #[arg(long, conflicts_with = "faults")]
    schedule: Option<PathBuf>,
    /// How long to inject faults (e.g. 60s, 30m, 1h).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    duration: Duration,
    /// One fault per interval (default 6s; with --mix: duration / total count).
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// The seed (default: drawn at random, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory (default: a new directory under $TMPDIR, kept).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Logical clients per workload.
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Workloads: register, set, calls, events.
    #[arg(long, default_value = "register,set,calls,events")]
    workloads: String,
    /// How long the nodes get to be ready again after the faults.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    recovery_limit: Duration,
    /// The hangar binary (default: $HANGAR_BIN, or a target directory).
    #[arg(long)]
    hangar: Option<PathBuf>,
    /// The hangar-fixture binary (default: $HANGAR_FIXTURE_BIN, or a target directory).
    #[arg(long)]
    fixture: Option<PathBuf>,
    /// Print only the summary, not each fault as it happens.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Check { history } => check_command(&history),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("hangar-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn options(args: RunArgs) -> Result<RunOptions> {
    let hangar = match args.hangar {
        Some(p) => p,
        None => find_binary("hangar")?,
    };
    let fixture = match args.fixture {
        Some(p) => p,
        None => find_binary("hangar-fixture")?,
    };
    let mut o = RunOptions::new(&hangar, &fixture);
    o.nodes = args.nodes;
    o.seed = args.seed.unwrap_or_else(rand::random);
    o.duration = args.duration;
    o.interval = args.interval;
    o.faults = FaultKind::parse_list(&args.faults)?;
    if let Some(mix) = &args.mix {
        o.mix = parse_mix(mix)?;
    }
    if let Some(path) = &args.schedule {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let schedule: Schedule = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a schedule", path.display()))?;
        if args.seed.is_none() {
            o.seed = schedule.seed;
        }
        o.schedule = Some(schedule);
    }
    o.out = args.out;
    o.workload.processes = args.processes;
    o.workload.workloads = args
        .workloads
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::parse::<WorkloadKind>)
        .collect::<Result<_>>()?;
    o.recovery_limit = args.recovery_limit;
    o.progress = !args.quiet;
    Ok(o)
}

fn run_command(args: RunArgs) -> Result<bool> {
    let opts = options(args)?;
    let seed = opts.seed;
    eprintln!("hangar-chaos: seed {seed}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    let report = rt.block_on(async {
        tokio::select! {
            r = run(opts) => r.map(Some),
            // Dropping the run drops the cluster, which kills every process of the run.
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    });
    let report = match report {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("hangar-chaos: interrupted (seed {seed}); the cluster was stopped");
            return Ok(false);
        }
        Err(e) => return Err(e.context(format!("seed {seed}"))),
    };
    println!("{}", report.summary());
    if !report.ok {
        println!("{}", report.failure_details());
    }
    Ok(report.ok)
}

fn check_command(history: &std::path::Path) -> Result<bool> {
    let ops = checker::read_history(history)?;
    let report = checker::check_all(&ops);
    println!("{}", workload::stats(&ops));
    println!("{}", report.render(&ops));
    Ok(report.ok())
}
