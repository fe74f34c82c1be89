//! The `hangar` binary: `serve`, `validate`, `version`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hangar_node::app::{self, ServeOptions};
use hangar_node::config::{self, ConfigError};

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "Hangar: a clustered gateway and control plane for MCP servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: MCP front door at /mcp, REST at /api, probes and /metrics.
    Serve {
        /// Configuration file (MCP Hangar's YAML format).
        #[arg(long, short = 'c', env = "MCP_CONFIG")]
        config: Option<PathBuf>,
        /// HTTP listen address (overrides `server.listen`), e.g. 127.0.0.1:8000 or 127.0.0.1:0.
        #[arg(long, env = "HANGAR_LISTEN")]
        listen: Option<String>,
        /// Serve MCP on stdin/stdout for a desktop client (no HTTP listener unless --listen).
        #[arg(long)]
        stdio: bool,
        /// Write {"http_addr":…,"pid":…} to this file once the listener is up.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Async runtime worker threads (default: one per CPU core). On a small machine shared
        /// with the MCP servers themselves, 1 can give more calls/s (fewer thread hand-offs).
        #[arg(long, env = "HANGAR_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: Option<u16>,
        #[command(flatten)]
        cluster: config::ClusterOverrides,
        /// Listen on a non-loopback address even with `auth` disabled (only when something in
        /// front of Hangar authenticates every caller).
        #[arg(long, env = "HANGAR_UNSAFE_NO_AUTH")]
        unsafe_no_auth: bool,
    },
    /// Validate a configuration file: exit 0 valid, 1 invalid, 2 unreadable.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the version.
    Version,
    /// Internal: how a node starts an MCP server child. Arms the parent-death signal (SIGKILL
    /// when the node dies, even by SIGKILL) and becomes the server; not for direct use.
    #[command(hide = true)]
    ExecChild {
        /// The node's pid (the child exits at once if its parent already changed).
        #[arg(long)]
        parent: i32,
        /// Run the server under the placement lease read from this fd of the parent: stay
        /// the server's parent and kill it when the lease lapses (see `upstream/lease.rs`).
        #[arg(long)]
        lease_fd: Option<i32>,
        /// The server's argv.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Validate { file }) => validate(&file),
        Some(Command::Version) => {
            println!("hangar {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::Serve {
            config,
            listen,
            stdio,
            ready_file,
            worker_threads,
            cluster,
            unsafe_no_auth,
        }) => serve(
            config,
            listen,
            stdio,
            ready_file,
            worker_threads,
            cluster,
            unsafe_no_auth,
        ),
        Some(Command::ExecChild {
            parent,
            lease_fd,
            argv,
        }) => exec_child(parent, lease_fd, &argv),
        None => {
            eprintln!(
                "usage: hangar serve --config FILE | hangar validate FILE | hangar version (see --help)"
            );
            ExitCode::from(2)
        }
    }
}

/// Become `argv` with the parent-death signal armed: no MCP server outlives its node. Under a
/// placement lease, stay as the server's parent instead and end it when the lease lapses.
fn exec_child(parent: i32, lease_fd: Option<i32>, argv: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        eprintln!("hangar exec-child: cannot arm the parent-death signal: {e}");
        return ExitCode::from(126);
    }
    // The node may have died between the fork and the line above.
    if rustix::process::Pid::as_raw(rustix::process::getppid()) != parent {
        return ExitCode::from(1);
    }
    let Some((program, args)) = argv.split_first() else {
        eprintln!("hangar exec-child: no program given");
        return ExitCode::from(2);
    };
    if let Some(fd) = lease_fd {
        return hangar_node::upstream::lease::supervise(parent, fd, program, args);
    }
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!("hangar exec-child: cannot run '{program}': {err}");
    ExitCode::from(127)
}

fn validate(file: &Path) -> ExitCode {
    match config::load_file(file) {
        Ok(cfg) => {
            println!(
                "{}: valid ({} MCP servers/groups)",
                file.display(),
                cfg.mcp_servers.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => report_config_error(file, &e),
    }
}

fn report_config_error(file: &Path, e: &ConfigError) -> ExitCode {
    match e {
        ConfigError::Unreadable { .. } => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        ConfigError::Invalid { problems } => {
            eprintln!(
                "{}: invalid configuration ({} problem(s)):",
                file.display(),
                problems.len()
            );
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::from(1)
        }
    }
}

fn serve(
    config_path: Option<PathBuf>,
    listen: Option<String>,
    stdio: bool,
    ready_file: Option<PathBuf>,
    worker_threads: Option<u16>,
    cluster: config::ClusterOverrides,
    unsafe_no_auth: bool,
) -> ExitCode {
    let config_path = config_path.or_else(|| {
        let default = PathBuf::from("config.yaml");
        default.exists().then_some(default)
    });
    let cfg = match &config_path {
        Some(p) => match config::load_file(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("hangar: refusing to start: the configuration is not usable");
                return report_config_error(p, &e);
            }
        },
        None => {
            eprintln!(
                "hangar: no --config given and no ./config.yaml; starting with no MCP servers"
            );
            config::Config::empty()
        }
    };
    hangar_node::telemetry::init_logging(cfg.logging.level.as_deref(), cfg.logging.json_format);
    let listen = listen.or_else(env_listen);
    let opts = ServeOptions {
        config: cfg,
        config_path,
        listen,
        stdio,
        ready_file,
        cluster,
        unsafe_no_auth,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(usize::from(n));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangar: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "hangar_failed");
            eprintln!("hangar: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `MCP_HTTP_HOST` / `MCP_HTTP_PORT` (MCP Hangar's variables) as a listen address.
fn env_listen() -> Option<String> {
    let host = std::env::var("MCP_HTTP_HOST").ok();
    let port = std::env::var("MCP_HTTP_PORT").ok();
    match (host, port) {
        (None, None) => None,
        (h, p) => Some(format!(
            "{}:{}",
            h.unwrap_or_else(|| "127.0.0.1".into()),
            p.unwrap_or_else(|| "8000".into())
        )),
    }
}

async fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let node = app::Node::start(opts).await.context("starting the node")?;
    let node = Arc::new(node);
    node.run_until_shutdown().await;
    Ok(())
}
