//! In-process cluster tests: real RaftHandles on 127.0.0.1 (port 0), RocksDB in temp dirs,
//! real gRPC. Every wait polls with a deadline.

// Test helpers outside `#[test]` functions; panicking on a broken fixture is intended.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use anyhow::Result;
use hangar_raft::Command;
use hangar_raft::NodeInfo;
use hangar_raft::RaftConfig;
use hangar_raft::RaftHandle;
use hangar_raft::RejectCode;
use hangar_raft::Response;
use hangar_raft::Role;
use hangar_raft::state::ConfigSourceKind;
use hangar_raft::state::EventRecord;
use hangar_wait::Wait;
use serde_json::json;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(15);

fn config(id: u64, addr: SocketAddr, dir: &Path) -> RaftConfig {
    let mut cfg = RaftConfig::new(id, addr, dir);
    cfg.api_addr = format!("127.0.0.1:{}", 8000 + id);
    cfg.snapshot_logs_since_last = 0; // snapshots only when the test asks
    cfg
}

async fn start(id: u64, addr: SocketAddr, dir: &Path) -> Result<RaftHandle> {
    Ok(RaftHandle::start(config(id, addr, dir)).await?)
}

/// Logs for debugging: `RUST_LOG=hangar_raft=debug,openraft=info cargo test -p hangar-raft`.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Poll `check` until it returns `Some`, failing after `WAIT`.
async fn eventually<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> Result<T> {
    Ok(Wait::new(what, WAIT).poll_async(check).await?)
}

/// Wait until every node in `nodes` names the same leader, and that leader is one of them.
async fn agreed_leader(nodes: &[&RaftHandle]) -> Result<u64> {
    eventually("a leader all nodes agree on", || async {
        let first = nodes[0].status().leader_id?;
        let all_agree = nodes.iter().all(|n| n.status().leader_id == Some(first));
        let leader_is_live = nodes
            .iter()
            .any(|n| n.node_id() == first && n.status().role == Role::Leader);
        (all_agree && leader_is_live).then_some(first)
    })
    .await
}

fn event(kind: &str) -> Command {
    Command::AppendEvents {
        events: vec![EventRecord {
            kind: kind.to_string(),
            at_ms: 1,
            node_id: 0,
            subject: String::new(),
            data: json!(null),
        }],
    }
}

fn put_server(id: &str) -> Command {
    let cmd = json!({"type": "put_server", "id": id, "spec": {"command": "x"}, "source": "api", "create_only": true});
    serde_json::from_value(cmd).expect("valid command")
}

async fn wait_event_count(node: &RaftHandle, n: u64) -> Result<()> {
    eventually(
        &format!("node {} to apply {n} events", node.node_id()),
        || async { (node.read(|s| s.events.last_seq()) >= n).then_some(()) },
    )
    .await
}

struct Node {
    dir: TempDir,
    addr: SocketAddr,
    handle: Option<RaftHandle>,
}

impl Node {
    async fn new(id: u64) -> Result<Node> {
        let dir = tempfile::tempdir()?;
        let handle = start(id, any_port(), dir.path()).await?;
        Ok(Node {
            addr: handle.local_addr(),
            dir,
            handle: Some(handle),
        })
    }

    fn h(&self) -> &RaftHandle {
        self.handle.as_ref().expect("node is running")
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }

    async fn restart(&mut self, id: u64) -> Result<()> {
        self.handle = Some(start(id, self.addr, self.dir.path()).await?);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_node_cluster_lifecycle() -> Result<()> {
    init_logs();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, Node::new(id).await?);
    }
    let members: BTreeMap<u64, NodeInfo> = nodes
        .iter()
        .map(|(id, n)| (*id, n.h().local_node_info()))
        .collect();
    assert!(!nodes[&1].h().is_initialized());
    nodes[&1].h().initialize(members).await?;
    let leader = agreed_leader(&nodes.values().map(Node::h).collect::<Vec<_>>()).await?;
    let follower = *nodes
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;

    // A write on a follower is forwarded to the leader and applied everywhere.
    let resp = nodes[&follower].h().propose(put_server("math")).await?;
    assert!(matches!(resp, Response::ServerChanged { .. }), "{resp:?}");
    for n in nodes.values() {
        eventually("math on every node", || async {
            n.h().read(|s| s.servers.contains_key("math")).then_some(())
        })
        .await?;
    }
    // Rejections travel back as values.
    let resp = nodes[&follower].h().propose(put_server("math")).await?;
    assert!(
        matches!(
            resp,
            Response::Rejected {
                code: RejectCode::ServerExists,
                ..
            }
        ),
        "{resp:?}"
    );
    // Linearizable read on a follower sees the write.
    let has = nodes[&follower]
        .h()
        .linearizable_read(|s| s.servers["math"].source.to_string())
        .await?;
    assert_eq!(has, "api");
    let status = nodes[&leader].h().status();
    assert_eq!(status.role, Role::Leader);
    assert_eq!(status.voters.len(), 3);
    assert_eq!(status.replication.as_ref().map(BTreeMap::len), Some(3));

    // Leader failure: a new leader is elected and writes continue.
    nodes.get_mut(&leader).context("leader")?.stop().await?;
    let rest: Vec<&RaftHandle> = nodes.values().filter_map(|n| n.handle.as_ref()).collect();
    let new_leader = agreed_leader(&rest).await?;
    assert_ne!(new_leader, leader);
    for i in 0..5 {
        rest[i % 2]
            .propose(event(&format!("after-failover-{i}")))
            .await?;
    }
    for n in &rest {
        wait_event_count(n, 5).await?;
    }

    // The stopped node restarts from its data dir and catches up.
    nodes
        .get_mut(&leader)
        .context("old leader")?
        .restart(leader)
        .await?;
    let old = nodes[&leader].h();
    assert!(old.is_initialized());
    old.initialize_single().await?; // no-op on restart
    wait_event_count(old, 5).await?;
    assert!(old.read(|s| s.servers.contains_key("math")));

    // A node that lags past a purge catches up by snapshot.
    let current = agreed_leader(&nodes.values().map(Node::h).collect::<Vec<_>>()).await?;
    let lagger = *nodes.keys().find(|id| **id != current).context("lagger")?;
    nodes.get_mut(&lagger).context("lagger")?.stop().await?;
    let live: Vec<&RaftHandle> = nodes.values().filter_map(|n| n.handle.as_ref()).collect();
    for i in 0..30 {
        live[i % 2]
            .propose(event(&format!("while-down-{i}")))
            .await?;
    }
    let leader_h = nodes[&current].h().clone();
    // Snapshot and purge on every live node, so whichever node leads must send a snapshot.
    let mut purged = u64::MAX;
    for h in &live {
        wait_event_count(h, 35).await?;
        h.trigger_snapshot().await?;
        let applied = h.status().applied_index.context("applied")?;
        h.purge_log(applied).await?;
        let p = h.status().purged_index.context("purged")?;
        assert!(p + 1 >= applied, "purged {p}, applied {applied}");
        purged = purged.min(p);
    }
    nodes
        .get_mut(&lagger)
        .context("lagger")?
        .restart(lagger)
        .await?;
    let lag_h = nodes[&lagger].h();
    wait_event_count(lag_h, 35).await?;
    let snap = eventually("the lagger to report its installed snapshot", || async {
        lag_h.status().snapshot_index
    })
    .await?;
    assert!(snap >= purged, "snapshot {snap} < purged {purged}");
    assert_eq!(
        lag_h.read(|s| s.clone()),
        leader_h.read(|s| s.clone()),
        "lagger state equals leader state"
    );

    // Grow: add node 4 as a learner (through a follower), then promote it.
    let n4 = Node::new(4).await?;
    let via = nodes
        .keys()
        .find(|id| **id != current)
        .copied()
        .context("follower")?;
    nodes[&via]
        .h()
        .add_learner(4, n4.h().local_node_info(), true)
        .await?;
    wait_event_count(n4.h(), 35).await?;
    assert_eq!(n4.h().status().role, Role::Learner);
    nodes[&via]
        .h()
        .change_voters(BTreeSet::from([1, 2, 3, 4]))
        .await?;
    eventually("node 4 to be a voter", || async {
        let s = nodes[&current].h().status();
        (s.voters.contains_key(&4) && !s.joint).then_some(())
    })
    .await?;
    nodes.insert(4, n4);
    let resp = nodes[&4].h().propose(event("from-4")).await?;
    assert!(matches!(resp, Response::EventsAppended { .. }));

    // Shrink: remove node 4.
    nodes[&via].h().remove_node(4).await?;
    eventually("node 4 to leave the membership", || async {
        let s = nodes[&current].h().status();
        (!s.voters.contains_key(&4) && !s.learners.contains_key(&4)).then_some(())
    })
    .await?;
    nodes.get_mut(&4).context("node 4")?.stop().await?;
    let resp = nodes[&current].h().propose(event("after-remove")).await?;
    assert!(matches!(resp, Response::EventsAppended { .. }));

    for n in nodes.values_mut() {
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restart_recovers_state() -> Result<()> {
    init_logs();
    let mut node = Node::new(1).await?;
    node.h().initialize_single().await?;
    eventually("single node leader", || async {
        (node.h().status().role == Role::Leader).then_some(())
    })
    .await?;
    let cmd = Command::SetDesiredConfig {
        servers: BTreeMap::from([("math".to_string(), json!({"command": "m"}))]),
        source: ConfigSourceKind::File,
        file_hash: Some("ab".repeat(32)),
    };
    let resp = node.h().propose(cmd).await?;
    assert!(
        matches!(
            resp,
            Response::ConfigApplied {
                config_version: 1,
                ..
            }
        ),
        "{resp:?}"
    );
    for i in 0..10 {
        node.h().propose(event(&format!("e{i}"))).await?;
    }
    node.h().trigger_snapshot().await?;
    node.h().propose(event("after-snapshot")).await?;
    let before = node.h().read(|s| s.clone());
    node.stop().await?;

    node.restart(1).await?;
    assert!(node.h().is_initialized());
    node.h().initialize_single().await?;
    // Recovered before `start` returned: snapshot + re-applied committed entries.
    assert_eq!(node.h().read(|s| s.clone()), before);
    eventually("leader again", || async {
        (node.h().status().role == Role::Leader).then_some(())
    })
    .await?;
    let resp = node.h().propose(event("after-restart")).await?;
    assert!(
        matches!(
            resp,
            Response::EventsAppended {
                first_seq: Some(12),
                ..
            }
        ),
        "{resp:?}"
    );
    let seen = node.h().linearizable_read(|s| s.events.last_seq()).await?;
    assert_eq!(seen, 12);
    node.stop().await?;
    Ok(())
}
