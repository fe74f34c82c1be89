use std::os::unix::fs::PermissionsExt as _;

use serde_json::json;

use super::*;

#[test]
fn leader_agreement() {
    let st = |l: Option<u64>| Some(json!({"node_id": 9, "leader_id": l, "role": "follower"}));
    assert_eq!(
        agreed_leader(&[st(Some(2)), st(Some(2)), st(Some(2))], &[1, 2, 3]),
        Some(2)
    );
    // One node still believes in another leader, or knows none, or did not answer.
    assert_eq!(
        agreed_leader(&[st(Some(2)), st(Some(1)), st(Some(2))], &[1, 2, 3]),
        None
    );
    assert_eq!(
        agreed_leader(&[st(Some(2)), st(None), st(Some(2))], &[1, 2, 3]),
        None
    );
    assert_eq!(agreed_leader(&[st(Some(2)), None], &[1, 2]), None);
    // The agreed leader is not running (the survivors have not noticed the kill yet).
    assert_eq!(agreed_leader(&[st(Some(3)), st(Some(3))], &[1, 2]), None);
    assert_eq!(agreed_leader(&[], &[]), None);
}

#[test]
fn catching_up() {
    let m = |id: u64, reachable: bool, applied: Option<u64>| json!({"node_id": id, "reachable": reachable, "applied_index": applied});
    let st = |ms: Vec<Value>| json!({"leader_id": 1, "members": ms});
    let all = st(vec![
        m(1, true, Some(50)),
        m(2, true, Some(50)),
        m(3, true, Some(42)),
    ]);
    assert!(member_caught_up(&all, 2, 3, 50));
    assert!(member_caught_up(&all, 3, 3, 42));
    assert!(!member_caught_up(&all, 3, 3, 43), "applied index behind");
    assert!(!member_caught_up(&all, 4, 3, 0), "not a member");
    assert!(!member_caught_up(&all, 2, 4, 0), "member count differs");
    let down = st(vec![
        m(1, true, Some(50)),
        m(2, true, Some(50)),
        m(3, false, None),
    ]);
    assert!(!member_caught_up(&down, 2, 3, 0), "a member is unreachable");
    assert!(!member_caught_up(&json!({"role": "leader"}), 1, 3, 0));
}

fn gone(pid: u32) -> bool {
    // Reaped children have no /proc entry (a zombie would still have one).
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A stand-in for `hangar serve`: writes its ready file, then idles (exits 0 on SIGTERM; a
/// SIGKILL leaves no long-lived grandchild behind).
fn fake_hangar(dir: &Path) -> PathBuf {
    script(
        dir,
        "fake-hangar",
        "trap 'exit 0' TERM\nwhile [ $# -gt 0 ]; do [ \"$1\" = --ready-file ] && : > \"$2\"; shift; done\nwhile :; do sleep 0.1; done\n",
    )
}

#[test]
fn members_get_distinct_ports_and_a_static_peers_config() {
    let bin = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(&fake_hangar(bin.path())).unwrap();
    for id in 1..=3 {
        c.add(id, &[]).unwrap();
    }
    assert!(matches!(c.add(2, &[]), Err(ClusterError::Duplicate(2))));
    let mut ports: Vec<u16> = c
        .members()
        .iter()
        .flat_map(|m| [port_of(m.api_addr()), port_of(m.raft_addr())])
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 6, "{ports:?}");
    assert!(!ports.contains(&0));
    let cfg = c.static_peers_config("mcp_servers: {}\n", "  keep_logs: 5\n");
    let m = |id: u64| c.member(id).unwrap();
    let want = format!(
        "mcp_servers: {{}}\ncluster:\n  keep_logs: 5\n  peers:\n    - {{node_id: 1, raft_addr: \"{}\", api_addr: \"{}\"}}\n    - {{node_id: 2, raft_addr: \"{}\", api_addr: \"{}\"}}\n    - {{node_id: 3, raft_addr: \"{}\", api_addr: \"{}\"}}\n",
        m(1).raft_addr(),
        m(1).api_addr(),
        m(2).raft_addr(),
        m(2).api_addr(),
        m(3).raft_addr(),
        m(3).api_addr()
    );
    assert_eq!(cfg, want);
    assert_eq!(m(2).url("/x"), format!("http://{}/x", m(2).api_addr()));
}

#[tokio::test]
async fn kill_restart_terminate_and_every_process_is_killed_on_drop() {
    let bin = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(&fake_hangar(bin.path())).unwrap();
    for id in 1..=3 {
        c.add(id, &[]).unwrap();
        c.write_config(id, "mcp_servers: {}\n").unwrap();
    }
    c.start_all().await.unwrap();
    let root = c.root().to_owned();
    assert!(root.join("node1/config.yaml").exists());
    assert_eq!(c.ids(), vec![1, 2, 3]);
    assert_eq!(c.pids().len(), 3);
    // Kill one, restart it on the same address.
    let http2 = c.http(2).to_owned();
    c.kill9(2).unwrap();
    assert_eq!(c.alive(), vec![1, 3]);
    assert!(matches!(c.kill9(2), Err(ClusterError::NotRunning(2))));
    c.restart(2).await.unwrap();
    assert!(matches!(c.start(2).await, Err(ClusterError::Running(2))));
    assert_eq!(c.alive(), vec![1, 2, 3]);
    assert_eq!(c.http(2), http2);
    assert!(c.member(2).unwrap().log_path().ends_with("log.2"));
    // A graceful stop reports the exit code.
    let pid3 = c.member(3).unwrap().pid().unwrap();
    assert_eq!(c.terminate(3).await.unwrap(), Some(0));
    assert!(gone(pid3));
    assert_eq!(c.alive(), vec![1, 2]);
    let pids = c.pids();
    assert!(pids.iter().all(|&p| !gone(p)));
    drop(c);
    assert!(pids.iter().all(|&p| gone(p)), "children left behind");
    assert!(!root.exists(), "temporary directory left behind");
}

#[tokio::test]
async fn a_node_that_exits_at_start_is_reported_with_its_log() {
    let bin = tempfile::tempdir().unwrap();
    let broken = script(
        bin.path(),
        "broken-hangar",
        "echo 'config is broken' >&2\nexit 3\n",
    );
    let mut c = Cluster::new(&broken).unwrap();
    c.add(1, &[]).unwrap();
    let e = c.start(1).await.unwrap_err().to_string();
    assert!(
        e.contains("node 1 exited") && e.contains("config is broken"),
        "{e}"
    );
    let e = Cluster::new(&bin.path().join("missing"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
}

#[tokio::test]
async fn waiting_for_a_leader_times_out_with_what_was_seen() {
    let bin = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(&fake_hangar(bin.path())).unwrap();
    c.add(1, &[]).unwrap();
    c.start(1).await.unwrap();
    // The fake node does not answer HTTP.
    let e = c
        .wait_leader(Duration::from_millis(100))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("the running nodes agree on a running leader: not within 100ms (no answer)"),
        "{e}"
    );
}
