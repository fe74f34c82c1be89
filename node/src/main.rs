//! The `hangar` binary: `serve`, `validate`, `auth bootstrap-admin`, `version`.

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
    /// Authentication chores.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
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

#[derive(Subcommand)]
enum AuthCommand {
    /// Create the first admin API key on a running node and print it, once. Run it on the
    /// node's host: the node accepts it only from its own host, and only while the cluster
    /// has no admin key.
    BootstrapAdmin {
        /// The node's API as reached from this host, e.g. http://127.0.0.1:8000 (default:
        /// from --config's `server.listen` and `server.tls`, else http://127.0.0.1:8000).
        #[arg(long)]
        endpoint: Option<String>,
        /// The node's configuration file, for its address.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// The principal of the key (it is given the role `admin`).
        #[arg(long, default_value = "admin")]
        principal: String,
        /// The key's name.
        #[arg(long = "key-name", default_value = "bootstrap-admin")]
        key_name: String,
        /// The CA to trust when the node serves HTTPS (`server.tls`).
        #[arg(long, env = "HANGAR_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Validate { file }) => validate(&file),
        Some(Command::Auth {
            command:
                AuthCommand::BootstrapAdmin {
                    endpoint,
                    config,
                    principal,
                    key_name,
                    ca_file,
                },
        }) => bootstrap_admin(
            endpoint,
            config.as_deref(),
            &principal,
            &key_name,
            ca_file.as_deref(),
        ),
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
                "usage: hangar serve --config FILE | hangar validate FILE | hangar auth bootstrap-admin [--endpoint URL] | hangar version (see --help)"
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

/// `hangar auth bootstrap-admin`: ask the node on this host for the first admin key.
fn bootstrap_admin(
    endpoint: Option<String>,
    config_path: Option<&Path>,
    principal: &str,
    key_name: &str,
    ca_file: Option<&Path>,
) -> ExitCode {
    let endpoint = match (endpoint, config_path) {
        (Some(e), _) => e,
        (None, Some(p)) => match config::load_file(p) {
            Ok(cfg) => match endpoint_of(&cfg.server) {
                Some(e) => e,
                None => {
                    eprintln!(
                        "hangar: server.listen `{}` is not IP:PORT; pass --endpoint",
                        cfg.server.listen
                    );
                    return ExitCode::from(2);
                }
            },
            Err(e) => return report_config_error(p, &e),
        },
        (None, None) => "http://127.0.0.1:8000".to_owned(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangar: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    use hangar_node::api::bootstrap::{ClientError, request};
    match rt.block_on(request(&endpoint, Some(principal), Some(key_name), ca_file)) {
        Ok(k) => {
            println!("api key  : {}", k.raw_key);
            println!("key id   : {}", k.key_id);
            println!("principal: {} (role admin)", k.principal_id);
            println!("name     : {}", k.name);
            println!(
                "Store the key now: it is shown once and never stored, and bootstrap-admin will not work again."
            );
            println!("Try it: HANGAR_API_KEY=<the key> hangarctl --endpoint {endpoint} whoami");
            ExitCode::SUCCESS
        }
        Err(ClientError::Refused(why)) => {
            eprintln!("hangar: bootstrap-admin refused: {why}");
            ExitCode::from(1)
        }
        Err(ClientError::Failed(why)) => {
            eprintln!("hangar: bootstrap-admin failed: {why}");
            ExitCode::from(2)
        }
    }
}

/// The URL this host reaches a node's listener at (a wildcard address: loopback).
fn endpoint_of(server: &config::ServerConfig) -> Option<String> {
    let addr: std::net::SocketAddr = server.listen.parse().ok()?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let scheme = if server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Some(format!(
        "{scheme}://{}",
        std::net::SocketAddr::new(ip, addr.port())
    ))
}

/// Print the literal secrets of a configuration file as `warning:` lines (stderr).
fn warn_literal_secrets(file: &Path) {
    for w in config::literal_secrets_in_file(file) {
        eprintln!("warning: {w}");
    }
}

fn validate(file: &Path) -> ExitCode {
    warn_literal_secrets(file);
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
    if let Some(p) = &config_path {
        for w in config::literal_secrets_in_file(p) {
            tracing::warn!(path = %w.path, problem = %w.message, "config_literal_secret");
        }
    }
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
    if let Some(reason) = node.run_until_shutdown().await {
        anyhow::bail!("the node stopped because its Raft core failed: {reason}");
    }
    Ok(())
}
