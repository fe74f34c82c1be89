use std::os::unix::fs::PermissionsExt as _;

use clap::Parser;
use serde_json::json;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    RaftCommit(CommitArgs),
    RaftFailover(FailoverArgs),
}

fn commit_args(args: &[&str]) -> Result<CommitPlan> {
    let cli = Cli::try_parse_from(
        ["t", "raft-commit", "--hangar", "/x/hangar"]
            .iter()
            .chain(args),
    )
    .map_err(|e| RaftBenchError::Range(e.to_string()))?;
    match cli.cmd {
        Sub::RaftCommit(a) => CommitPlan::from_args(&a),
        Sub::RaftFailover(_) => unreachable!(),
    }
}

fn failover_args(args: &[&str]) -> Result<FailoverPlan> {
    let cli = Cli::try_parse_from(
        ["t", "raft-failover", "--hangar", "/x/hangar"]
            .iter()
            .chain(args),
    )
    .map_err(|e| RaftBenchError::Range(e.to_string()))?;
    match cli.cmd {
        Sub::RaftFailover(a) => FailoverPlan::from_args(&a),
        Sub::RaftCommit(_) => unreachable!(),
    }
}

#[test]
fn commit_arguments() {
    assert_eq!(
        commit_args(&[]).unwrap(),
        CommitPlan {
            levels: vec![1, 16],
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    );
    let p = commit_args(&["--concurrency", "4", "--duration", "500ms", "--warmup", "0"]).unwrap();
    assert_eq!(p.levels, vec![4]);
    assert_eq!(p.duration, Duration::from_millis(500));
    assert_eq!(p.warmup, Duration::ZERO);
    assert!(commit_args(&["--concurrency", "0"]).is_err());
    assert!(commit_args(&["--concurrency", "2000"]).is_err());
    assert!(commit_args(&["--duration", "0s"]).is_err());
    assert!(commit_args(&["--timeout", "soon"]).is_err());
    assert!(
        Cli::try_parse_from(["t", "raft-commit"]).is_err(),
        "--hangar is required"
    );
}

#[test]
fn failover_arguments() {
    assert_eq!(
        failover_args(&[]).unwrap(),
        FailoverPlan {
            kills: 20,
            probe_timeout: Duration::from_millis(500),
            deadline: Duration::from_secs(15),
        }
    );
    assert_eq!(failover_args(&["--kills", "3"]).unwrap().kills, 3);
    assert!(failover_args(&["--kills", "0"]).is_err());
    assert!(failover_args(&["--kills", "-1"]).is_err());
    assert!(failover_args(&["--probe-timeout", "1ms"]).is_err());
    assert!(failover_args(&["--probe-timeout", "2s", "--deadline", "1s"]).is_err());
}

#[test]
fn new_leader_after_a_kill() {
    assert_eq!(new_leader(&json!({"leader_id": 2}), 1), Some(2));
    assert_eq!(new_leader(&json!({"leader_id": 1}), 1), None);
    assert_eq!(new_leader(&json!({"leader_id": null}), 1), None);
    assert_eq!(new_leader(&json!({}), 1), None);
}

#[test]
fn failover_percentiles_are_nearest_rank() {
    // 20 rounds of 100, 200, …, 2000 ms.
    let samples: Vec<Duration> = (1..=20).map(|i| Duration::from_millis(100 * i)).collect();
    let s = MsSummary::of(&samples).unwrap();
    assert_eq!(s.count, 20);
    let near = |a: f64, b: f64| (a - b).abs() <= b * 0.001;
    assert!(near(s.p50_ms, 1000.0), "{s:?}");
    assert!(near(s.p90_ms, 1800.0), "{s:?}");
    // With fewer than 100 samples p99 is the largest.
    assert!(near(s.p99_ms, 2000.0), "{s:?}");
    assert!(near(s.max_ms, 2000.0), "{s:?}");
    assert!(near(s.min_ms, 100.0), "{s:?}");
    assert_eq!(MsSummary::of(&[]).unwrap(), MsSummary::default());
}

#[test]
fn failover_record_round_trips() {
    let r = FailoverRecord {
        bench: "raft-failover".into(),
        kills: 2,
        timings: DEFAULT_TIMINGS.into(),
        probe_timeout_ms: 500.0,
        first_write: MsSummary::of(&[Duration::from_millis(700), Duration::from_millis(900)])
            .unwrap(),
        new_leader: None,
        first_write_ms: vec![700.0, 900.0],
        new_leader_ms: vec![650.0],
        probes: 5,
        background_ok: 100,
        background_errors: 7,
    };
    let line = serde_json::to_string(&r).unwrap();
    assert!(!line.contains('\n'));
    assert_eq!(serde_json::from_str::<FailoverRecord>(&line).unwrap(), r);
}

fn gone(pid: u32) -> bool {
    // Reaped children have no /proc entry (a zombie would still have one).
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// A stand-in for `hangar serve`: writes its ready file, then sleeps.
fn fake_hangar(dir: &Path) -> PathBuf {
    let p = dir.join("fake-hangar");
    std::fs::write(
        &p,
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --ready-file ] && : > \"$2\"; shift; done\nexec sleep 300\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn the_cluster_is_three_static_peers_with_default_timings_and_is_killed_on_drop() {
    let bin = tempfile::tempdir().unwrap();
    let c = start_cluster(&fake_hangar(bin.path())).await.unwrap();
    assert_eq!(c.ids(), vec![1, 2, 3]);
    assert_eq!(c.alive(), vec![1, 2, 3]);
    let root = c.root().to_owned();
    let cfg = std::fs::read_to_string(c.member(1).unwrap().config_path()).unwrap();
    assert!(cfg.starts_with(CONFIG_HEAD), "{cfg}");
    assert!(cfg.contains("mcp_servers: {}\n"), "{cfg}");
    assert!(!cfg.contains("election"), "default timings: {cfg}");
    assert_eq!(cfg.matches("node_id:").count(), 3, "{cfg}");
    for id in c.ids() {
        assert!(
            cfg.contains(&format!("api_addr: \"{}\"", c.http(id))),
            "{cfg}"
        );
    }
    let pids = c.pids();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| !gone(p)));
    drop(c);
    assert!(pids.iter().all(|&p| gone(p)), "children left behind");
    assert!(!root.exists(), "temporary directory left behind");
}

#[tokio::test]
async fn a_node_that_exits_at_start_is_reported_with_its_log() {
    let bin = tempfile::tempdir().unwrap();
    let p = bin.path().join("broken-hangar");
    std::fs::write(&p, "#!/bin/sh\necho 'config is broken' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = start_cluster(&p).await.err().unwrap().to_string();
    assert!(
        e.contains("exited") && e.contains("config is broken"),
        "{e}"
    );
    let e = start_cluster(&bin.path().join("missing"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--hangar") && e.contains("no such file"), "{e}");
}
