//! `hangar-bench`: MCP load generator. See `bench/README.md`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hangar_bench::cold::{self, ColdRecord};
use hangar_bench::http1::{HttpTarget, RawClient, parse_url};
use hangar_bench::instance::{self, InstanceFailoverArgs, InstanceFailoverRecord};
use hangar_bench::load::{self, Caller, Plan};
use hangar_bench::raft::{
    self, CommitArgs, CommitPlan, FailoverArgs, FailoverPlan, FailoverRecord,
};
use hangar_bench::report::{self, RaftTargets, RunMeta, RunRecord, Targets};
use hangar_bench::rpc::{CallTemplate, ErrorKind};
use hangar_bench::stdio::StdioServer;
use hangar_bench::util::{parse_concurrency, parse_duration, split_command};

#[derive(Parser)]
#[command(
    name = "hangar-bench",
    version,
    about = "Load generator for MCP servers and Hangar: tools/call latency (p50/p90/p99/max) and calls/s",
    after_help = "Human-readable table on stderr; one JSON line per run on stdout (and --json-out)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The cost of one rate-limit decision (the call path's `RateLimits::check`) from C
    /// threads at once, without rules and with two never-refusing rules, in the same run.
    Decide {
        /// Threads deciding at once (comma list).
        #[arg(long, default_value = "1,8")]
        concurrency: String,
        /// Seconds per configuration.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// The cost of authenticating and authorizing one call (the `/mcp` middleware's
    /// `Auth::authenticate` + grants) with auth off, an API key and a JWT, in the same run.
    Authn {
        /// Threads at once (comma list).
        #[arg(long, default_value = "1,8")]
        concurrency: String,
        /// Seconds per configuration.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Spawn an MCP server on stdio, handshake, and drive tools/call from N workers over its pipe.
    Stdio {
        /// The server's command line, e.g. "node .../server-everything/dist/index.js stdio".
        #[arg(long)]
        cmd: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// POST stateless tools/call requests to a Streamable HTTP endpoint (e.g. Hangar's /mcp).
    Http {
        /// The endpoint, e.g. http://127.0.0.1:8000/mcp.
        #[arg(long)]
        url: String,
        /// Extra request header, NAME: VALUE (repeatable), e.g. "X-API-Key: …".
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Process whose CPU use (with its children) is reported as the server's (repeatable).
        #[arg(long = "server-pid", value_name = "PID")]
        server_pids: Vec<u32>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Cold start: time to the answer of the first tools/call, directly (--cmd: spawn,
    /// initialize, call) or through Hangar (--url + --server: stop the server via the API,
    /// then call through /mcp), repeated --reps times.
    Cold {
        /// Direct: the server's command line.
        #[arg(long, conflicts_with_all = ["url", "server"], required_unless_present = "url")]
        cmd: Option<String>,
        /// Through Hangar: its /mcp endpoint, e.g. http://127.0.0.1:8000/mcp.
        #[arg(long, requires = "server")]
        url: Option<String>,
        /// Through Hangar: the id of the subprocess server to make cold before each call.
        #[arg(long)]
        server: Option<String>,
        /// Tool to call (through Hangar: `<server>__<tool>`).
        #[arg(long)]
        tool: String,
        /// Tool arguments, a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Repetitions.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Label in reports (default: `cold-direct` or `cold-hangar`).
        #[arg(long)]
        label: Option<String>,
        /// Extra request header for Hangar, NAME: VALUE (repeatable).
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// MCP protocol version.
        #[arg(long, default_value = "2025-11-25")]
        protocol_version: String,
        /// Limit for one repetition (stop, start, handshake, call).
        #[arg(long, default_value = "60s")]
        timeout: String,
        /// Also append the JSON line to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Raft commit latency and writes/s: start a 3-node cluster of `hangar serve` on
    /// 127.0.0.1 and write API keys (POST /api/auth/keys) to the leader and to a follower.
    RaftCommit(CommitArgs),
    /// Raft leader failover: on a 3-node cluster with a background writer, kill -9 the leader
    /// --kills times; time the first write acknowledged through a survivor.
    RaftFailover(FailoverArgs),
    /// Instance failover: on a 3-node cluster running one single-instance fixture server, kill
    /// -9 its host --kills times; time the first call that succeeds through a survivor.
    InstanceFailover(InstanceFailoverArgs),
    /// Read JSON-line results and print a markdown comparison of two labels with target checks
    /// (and the Raft tables when the files hold raft-commit / raft-failover results).
    Report {
        /// Files of JSON lines written by `stdio`/`http` (stdout or --json-out).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Label of the baseline runs.
        #[arg(long, default_value = "direct")]
        baseline: String,
        /// Label of the candidate runs.
        #[arg(long, default_value = "hangar")]
        candidate: String,
        /// Target: largest added p50 (candidate − baseline) in µs, at every concurrency.
        #[arg(long, default_value_t = 300.0)]
        max_added_p50_us: f64,
        /// Target: smallest candidate calls/s at --at-concurrency.
        #[arg(long, default_value_t = 10_000.0)]
        min_calls_per_s: f64,
        /// Concurrency at which the throughput target applies.
        #[arg(long, default_value_t = 8)]
        at_concurrency: usize,
        /// Target, replacing --min-calls-per-s: the candidate's calls/s at --at-concurrency as
        /// a share of the baseline's, e.g. 0.5.
        #[arg(long)]
        min_calls_ratio: Option<f64>,
        /// Exit with status 1 when a target is missed.
        #[arg(long)]
        check: bool,
    },
}

/// Options shared by the load subcommands.
#[derive(Args, Clone)]
struct LoadArgs {
    /// Tool to call (through Hangar: `<server>__<tool>`).
    #[arg(long)]
    tool: String,
    /// Tool arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Concurrent workers; a comma list runs one measurement per level, e.g. 1,8.
    #[arg(long, default_value = "1")]
    concurrency: String,
    /// Measured window per level, e.g. 10s.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Unmeasured warm-up before each window, e.g. 2s.
    #[arg(long, default_value = "2s")]
    warmup: String,
    /// A call without an answer after this long counts as a timeout error.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// Label for this run in reports (default: the subcommand name).
    #[arg(long)]
    label: Option<String>,
    /// MCP protocol version (initialize over stdio, MCP-Protocol-Version header over HTTP).
    #[arg(long, default_value = "2025-11-25")]
    protocol_version: String,
    /// Runtime threads for the load generator (1 = single-threaded, least CPU).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Do not stop when the first (preflight) call fails, and exit 0 even with errors.
    #[arg(long)]
    allow_errors: bool,
}

struct Prepared {
    template: CallTemplate,
    levels: Vec<usize>,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
}

impl LoadArgs {
    fn prepare(&self) -> anyhow::Result<Prepared> {
        let args: serde_json::Value = serde_json::from_str(&self.args)
            .with_context(|| format!("--args is not valid JSON: {}", self.args))?;
        Ok(Prepared {
            template: CallTemplate::tools_call(&self.tool, &args)?,
            levels: parse_concurrency(&self.concurrency)?,
            warmup: parse_duration(&self.warmup)?,
            duration: parse_duration(&self.duration)?,
            timeout: parse_duration(&self.timeout)?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Stdio { load, .. } | Command::Http { load, .. } => load.threads.max(1),
        Command::Report { .. }
        | Command::Decide { .. }
        | Command::Authn { .. }
        | Command::Cold { .. }
        | Command::RaftCommit(_)
        | Command::RaftFailover(_)
        | Command::InstanceFailover(_) => 1,
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangar-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hangar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Decide { concurrency, secs } => {
            println!("| c | rules | decisions/s | p50 ns | p99 ns |");
            println!("|--:|---|--:|--:|--:|");
            for c in parse_concurrency(&concurrency)? {
                // Off and on alternate, twice, so that neither always runs first.
                for on in [false, true, true, false] {
                    let r = hangar_bench::decide::run(on, c, Duration::from_secs_f64(secs))?;
                    println!(
                        "| {} | {} | {:.0} | {} | {} |",
                        r.concurrency, r.label, r.per_sec, r.p50_ns, r.p99_ns
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Authn { concurrency, secs } => {
            use hangar_bench::authn::{Mode, run};
            println!("| c | auth | calls/s | p50 ns | p99 ns |");
            println!("|--:|---|--:|--:|--:|");
            for c in parse_concurrency(&concurrency)? {
                for mode in [Mode::Off, Mode::ApiKey, Mode::Jwt, Mode::Off] {
                    let r = run(mode, c, Duration::from_secs_f64(secs))?;
                    println!(
                        "| {} | {} | {:.0} | {} | {} |",
                        r.concurrency, r.label, r.per_sec, r.p50_ns, r.p99_ns
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stdio { cmd, load } => run_stdio(&cmd, &load).await,
        Command::Http {
            url,
            headers,
            server_pids,
            load,
        } => run_http(&url, &headers, server_pids, &load).await,
        Command::Cold {
            cmd,
            url,
            server,
            tool,
            args,
            reps,
            label,
            headers,
            protocol_version,
            timeout,
            json_out,
        } => {
            let args: serde_json::Value = serde_json::from_str(&args)
                .with_context(|| format!("--args is not valid JSON: {args}"))?;
            let template = CallTemplate::tools_call(&tool, &args)?;
            let timeout = parse_duration(&timeout)?;
            let (label, target, series) = match (cmd, url, server) {
                (Some(cmd), _, _) => {
                    let argv = split_command(&cmd)?;
                    let series = cold::series(reps, || {
                        cold::direct_once(&argv, &protocol_version, &template, timeout)
                    })
                    .await?;
                    (label.unwrap_or_else(|| "cold-direct".into()), cmd, series)
                }
                (None, Some(url), Some(server)) => {
                    let target = HttpTarget {
                        url: parse_url(&url)?,
                        protocol_version: protocol_version.clone(),
                        headers: headers
                            .iter()
                            .map(|h| parse_header(h))
                            .collect::<anyhow::Result<_>>()?,
                    };
                    let series = cold::series(reps, || {
                        cold::hangar_once(&target, &server, &template, timeout)
                    })
                    .await?;
                    (label.unwrap_or_else(|| "cold-hangar".into()), url, series)
                }
                _ => bail!("give --cmd (direct) or --url and --server (through Hangar)"),
            };
            let (lat, errors, first_error) = series;
            let rec = ColdRecord::new(&label, &target, &tool, &lat, errors, first_error);
            eprintln!(
                "{label}: {} reps, {} errors, p50 {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
                rec.reps, rec.errors, rec.p50_ms, rec.p90_ms, rec.min_ms, rec.max_ms
            );
            if let Some(e) = &rec.first_error {
                eprintln!("    first error: {e}");
            }
            print_line(&serde_json::to_string(&rec)?, json_out.as_ref())?;
            Ok(if rec.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::RaftCommit(a) => {
            let plan = CommitPlan::from_args(&a)?;
            let mut out = Emitter::new(a.json_out.as_ref())?;
            eprintln!(
                "hangar-bench: raft-commit: c={}, {:?} warm-up + {:?} per level, leader then follower",
                a.concurrency, plan.warmup, plan.duration
            );
            let work = raft::commit(&a.hangar, &plan, |r| out.emit(r).map_err(Into::into));
            tokio::select! {
                r = work => r?,
                sig = raft::interrupted() => bail!("interrupted by {sig}; the cluster was stopped"),
            }
            Ok(out.exit_code(false))
        }
        Command::RaftFailover(a) => {
            let plan = FailoverPlan::from_args(&a)?;
            eprintln!(
                "hangar-bench: raft-failover: {} leader kills, probes time out after {:?}",
                plan.kills, plan.probe_timeout
            );
            let rec = tokio::select! {
                r = raft::failover(&a.hangar, &plan) => r?,
                sig = raft::interrupted() => bail!("interrupted by {sig}; the cluster was stopped"),
            };
            let w = &rec.first_write;
            eprintln!(
                "raft-failover: {} kills; kill -9 → first write: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; new leader reported: {}",
                rec.kills,
                w.p50_ms,
                w.p90_ms,
                w.p99_ms,
                w.max_ms,
                rec.new_leader.map_or_else(
                    || "not seen in every round".to_owned(),
                    |l| format!("p50 {:.1} ms, p99 {:.1} ms", l.p50_ms, l.p99_ms)
                )
            );
            print_line(&serde_json::to_string(&rec)?, a.json_out.as_ref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InstanceFailover(a) => {
            let rec = tokio::select! {
                r = instance::failover(&a) => r?,
                sig = raft::interrupted() => bail!("interrupted by {sig}; the cluster was stopped"),
            };
            let f = &rec.first_call;
            eprintln!(
                "instance-failover: {} kills, node_loss_timeout {} ms; kill -9 → first call: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
                rec.kills, rec.node_loss_timeout_ms, f.p50_ms, f.p90_ms, f.max_ms
            );
            print_line(&serde_json::to_string(&rec)?, a.json_out.as_ref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            files,
            baseline,
            candidate,
            max_added_p50_us,
            min_calls_per_s,
            at_concurrency,
            min_calls_ratio,
            check,
        } => {
            let mut records = Vec::new();
            let mut colds: Vec<ColdRecord> = Vec::new();
            let mut raft_commits: Vec<RunRecord> = Vec::new();
            let mut failovers: Vec<FailoverRecord> = Vec::new();
            let mut moves: Vec<InstanceFailoverRecord> = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let where_ =
                        || format!("{}:{}: not a hangar-bench JSON line", f.display(), i + 1);
                    let v: serde_json::Value = serde_json::from_str(line).with_context(where_)?;
                    match v.get("bench").and_then(|b| b.as_str()) {
                        Some("cold") => colds.push(serde_json::from_value(v).with_context(where_)?),
                        Some("raft-commit") => {
                            raft_commits.push(serde_json::from_value(v).with_context(where_)?);
                        }
                        Some("raft-failover") => {
                            failovers.push(serde_json::from_value(v).with_context(where_)?);
                        }
                        Some("instance-failover") => {
                            moves.push(serde_json::from_value(v).with_context(where_)?);
                        }
                        _ => records.push(serde_json::from_value(v).with_context(where_)?),
                    }
                }
            }
            let targets = Targets {
                baseline,
                candidate,
                max_added_p50_us,
                min_calls_per_s,
                min_calls_ratio,
                at_concurrency,
            };
            let mut ok = Some(true);
            if !records.is_empty() {
                let (md, met) = report::markdown(&records, &targets);
                print!("{md}");
                ok = met;
            }
            if !colds.is_empty() {
                print!("{}", report::cold_markdown(&colds));
            }
            if !moves.is_empty() {
                print!("{}", instance::markdown(&moves));
            }
            if !raft_commits.is_empty() || !failovers.is_empty() {
                let (md, met) =
                    report::raft_markdown(&raft_commits, &failovers, &RaftTargets::default());
                print!("{md}");
                if met == Some(false) {
                    ok = Some(false);
                }
            }
            Ok(if check && ok != Some(true) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Print a JSON line on stdout and append it to `json_out`.
fn print_line(line: &str, json_out: Option<&PathBuf>) -> anyhow::Result<()> {
    println!("{line}");
    if let Some(p) = json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("cannot open --json-out {}", p.display()))?;
        writeln!(f, "{line}").context("cannot write --json-out")?;
    }
    Ok(())
}

/// Preflight: one call must succeed before measuring (cold starts happen here, not in the run).
async fn preflight<C: Caller>(caller: &mut C, allow_errors: bool) -> anyhow::Result<()> {
    let r = tokio::time::timeout(Duration::from_secs(60), caller.call()).await;
    let err = match r {
        Ok(r) => match r.outcome {
            Ok(()) => return Ok(()),
            Err(e) => e,
        },
        Err(_) => hangar_bench::rpc::CallError::new(ErrorKind::Timeout, "no answer within 60s"),
    };
    if allow_errors {
        eprintln!("hangar-bench: warning: the preflight call failed ({err}); measuring anyway");
        Ok(())
    } else {
        bail!(
            "the preflight call failed, not measuring ({err}); check --tool/--args (use --allow-errors to measure anyway)"
        )
    }
}

struct Emitter {
    json_out: Option<std::fs::File>,
    header_done: bool,
    errors: u64,
}

impl Emitter {
    fn new(path: Option<&PathBuf>) -> anyhow::Result<Self> {
        let json_out = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open --json-out {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Self {
            json_out,
            header_done: false,
            errors: 0,
        })
    }

    fn emit(&mut self, r: &RunRecord) -> anyhow::Result<()> {
        if !self.header_done {
            eprintln!("{}", report::table_header());
            self.header_done = true;
        }
        eprintln!("{}", report::table_row(r));
        if let Some(e) = &r.first_error {
            eprintln!("    first error: {e}");
        }
        self.errors += r.errors;
        let line = r.to_json_line();
        println!("{line}");
        if let Some(f) = &mut self.json_out {
            writeln!(f, "{line}").context("cannot write --json-out")?;
        }
        Ok(())
    }

    fn exit_code(&self, allow_errors: bool) -> ExitCode {
        if self.errors > 0 && !allow_errors {
            eprintln!(
                "hangar-bench: {} calls failed (see first error above)",
                self.errors
            );
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn meta(
    mode: &str,
    client: &str,
    target: &str,
    load: &LoadArgs,
    p: &Prepared,
    c: usize,
) -> RunMeta {
    RunMeta {
        mode: mode.into(),
        label: load.label.clone().unwrap_or_else(|| mode.into()),
        client: client.into(),
        target: target.into(),
        tool: load.tool.clone(),
        concurrency: c,
        warmup_s: p.warmup.as_secs_f64(),
    }
}

async fn run_stdio(cmd: &str, load: &LoadArgs) -> anyhow::Result<ExitCode> {
    let p = load.prepare()?;
    let argv = split_command(cmd)?;
    let server = StdioServer::start(
        &argv,
        &load.protocol_version,
        p.template.clone(),
        Duration::from_secs(60),
    )
    .await?;
    let result = drive_stdio(&server, cmd, load, &p).await;
    server.shutdown(Duration::from_secs(3)).await;
    result
}

async fn drive_stdio(
    server: &StdioServer,
    cmd: &str,
    load: &LoadArgs,
    p: &Prepared,
) -> anyhow::Result<ExitCode> {
    let mut out = Emitter::new(load.json_out.as_ref())?;
    let mut first = server.caller(0);
    if let Err(e) = preflight(&mut first, load.allow_errors).await {
        bail!("{e:#}; server stderr: {}", server.stderr_tail());
    }
    drop(first);
    let plan = Plan {
        warmup: p.warmup,
        duration: p.duration,
        timeout: p.timeout,
        server_pids: server.pid().into_iter().collect(),
    };
    for &c in &p.levels {
        let callers = (0..c).map(|i| server.caller(i)).collect();
        let (_, stats) = load::run(callers, &plan).await?;
        out.emit(&RunRecord::new(
            meta("stdio", "pipe", cmd, load, p, c),
            &stats,
        ))?;
    }
    Ok(out.exit_code(load.allow_errors))
}

fn parse_header(h: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = h
        .split_once(':')
        .with_context(|| format!("--header '{h}' must look like 'NAME: VALUE'"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty()
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        || v.contains(['\r', '\n'])
    {
        bail!("--header '{h}' must look like 'NAME: VALUE' (token name, one-line value)");
    }
    Ok((k.to_owned(), v.to_owned()))
}

async fn run_http(
    url: &str,
    headers: &[String],
    server_pids: Vec<u32>,
    load: &LoadArgs,
) -> anyhow::Result<ExitCode> {
    let p = load.prepare()?;
    let target = HttpTarget {
        url: parse_url(url)?,
        protocol_version: load.protocol_version.clone(),
        headers: headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<anyhow::Result<_>>()?,
    };
    let plan = Plan {
        warmup: p.warmup,
        duration: p.duration,
        timeout: p.timeout,
        server_pids,
    };
    let mut out = Emitter::new(load.json_out.as_ref())?;
    preflight(
        &mut RawClient::new(&target, p.template.clone(), 1 << 52),
        load.allow_errors,
    )
    .await?;
    for &c in &p.levels {
        // Worker i uses ids i·2^32, i·2^32+1, … (distinct across workers, all below 2^53).
        let callers = (0..c)
            .map(|i| RawClient::new(&target, p.template.clone(), (i as u64) << 32))
            .collect();
        let (_, stats) = load::run(callers, &plan).await?;
        out.emit(&RunRecord::new(
            meta("http", "raw", url, load, &p, c),
            &stats,
        ))?;
    }
    Ok(out.exit_code(load.allow_errors))
}
