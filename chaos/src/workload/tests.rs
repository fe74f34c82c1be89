//! Tests of the client loop (process renumbering, seeded choices) and one run of every
//! workload against a real single-node Hangar.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hangar_tests::cluster::Cluster;
use serde_json::Value;

use super::*;

/// A workspace binary: `$<NAME>_BIN`, else next to this test's profile directory, else in
/// the shared build directory (`~/.cache/hangar/target/debug`). Fails the test, saying what
/// to build, when it is nowhere.
fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Some(profile) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_owned))
    {
        candidates.push(profile.join(name));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(
            PathBuf::from(home)
                .join(".cache/hangar/target/debug")
                .join(name),
        );
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "the {name} binary is missing (looked at {candidates:?}): build it with \
             `CARGO_TARGET_DIR=$HOME/.cache/hangar/target cargo build -p hangar-node -p hangar-fixture` \
             or point {var} at it"
        ),
    }
}

/// A listener that accepts connections and never answers (a paused node, as a client sees
/// it); dropped with the returned task.
async fn silent_listener() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (format!("http://{addr}"), task)
}

/// A base URL nobody listens on (a killed node).
fn refused_base() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

/// Poll `f` every 20 ms until it holds; panics after `limit`.
async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Jepsen's rule: an `Info` operation is the last operation of its process.
fn assert_info_is_last(ops: &[Op]) {
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for o in ops {
        let l = last.entry(o.process).or_default();
        *l = (*l).max(o.index);
    }
    for o in ops.iter().filter(|o| o.outcome == Outcome::Info) {
        assert_eq!(
            last[&o.process], o.index,
            "process {} invoked an operation after its Info operation {}",
            o.process, o.index
        );
    }
}

#[test]
fn process_changes_after_info_only() {
    let r = Recorder::in_memory(std::time::Instant::now());
    let p = r.new_process();
    assert_eq!(process_after(Outcome::Ok, p, &r), p);
    assert_eq!(process_after(Outcome::Fail, p, &r), p);
    let q = process_after(Outcome::Info, p, &r);
    assert_ne!(q, p);
    let q2 = process_after(Outcome::Info, q, &r);
    assert!(q2 != q && q2 != p);
}

#[test]
fn workload_names_and_config_checks() {
    for w in WorkloadKind::ALL {
        assert_eq!(w.name().parse::<WorkloadKind>().unwrap(), w);
    }
    assert!("bank".parse::<WorkloadKind>().is_err());
    assert_eq!(WorkloadKind::of(OpKind::ReadSet), WorkloadKind::Set);
    assert!(WorkloadKind::Register.covers(OpKind::Write));
    assert!(!WorkloadKind::Register.covers(OpKind::Call));
    Workload::default().validate().unwrap();
    let bad = Workload {
        register_keys: vec!["r 0".into()],
        ..Workload::default()
    };
    assert!(bad.validate().is_err());
    let none = Workload {
        processes: 0,
        ..Workload::default()
    };
    assert!(none.validate().is_err());
    assert_eq!(Workload::limit_id("r1"), "chaos-r1");
    assert_eq!(Workload::element_name(4, 2), "chaos-4-2");
}

#[test]
fn a_seed_fixes_the_choices_of_a_client() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let targets: Arc<[(u64, String)]> = vec![
        (1, "a".to_owned()),
        (2, "b".to_owned()),
        (3, "c".to_owned()),
    ]
    .into();
    let choices = |seed: u64, slot: usize| {
        let recorder = Recorder::in_memory(std::time::Instant::now());
        let mut c = Client {
            workload: WorkloadKind::Register,
            http: reqwest::Client::new(),
            targets: targets.clone(),
            cfg: Arc::new(Workload::default()),
            process: recorder.new_process(),
            recorder,
            rng: StdRng::seed_from_u64(client_seed(seed, WorkloadKind::Register, slot)),
            sent: 0,
            register_values: Arc::new(AtomicU64::new(1)),
            events_seen: BTreeMap::new(),
        };
        (0..50)
            .map(|_| (c.target().0, c.plan()))
            .collect::<Vec<_>>()
    };
    assert_eq!(choices(7, 0), choices(7, 0));
    assert_ne!(choices(7, 0), choices(7, 1));
    assert_ne!(choices(7, 0), choices(8, 0));
    let picked: BTreeSet<u64> = choices(7, 0).iter().map(|(n, _)| *n).collect();
    assert_eq!(picked.len(), 3, "every node is a target");
    // Written values are unique and increasing.
    let values: Vec<u64> = choices(7, 0)
        .into_iter()
        .filter_map(|(_, p)| match p {
            Plan::Write { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert!(values.len() > 5 && values.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_continues_as_a_new_process_after_info() {
    let (silent, holder) = silent_listener().await;
    let targets = vec![(1, silent), (2, refused_base())];
    let cfg = Workload {
        workloads: vec![WorkloadKind::Register, WorkloadKind::Set],
        processes: 2,
        request_timeout: Duration::from_millis(100),
        fail_backoff: Duration::from_millis(5),
        ..Workload::default()
    };
    let recorder = Recorder::in_memory(std::time::Instant::now());
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(targets, cfg.clone(), recorder.clone(), stopped, 3));
    let enough = |o: Outcome| recorder.ops().iter().filter(|x| x.outcome == o).count() >= 10;
    wait_until(
        "10 Info and 10 Fail operations",
        Duration::from_secs(20),
        || enough(Outcome::Info) && enough(Outcome::Fail),
    )
    .await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the clients stop within a request timeout")
        .unwrap()
        .unwrap();
    holder.abort();
    let ops = recorder.ops();
    assert_info_is_last(&ops);
    // Nothing is Ok; writes to the silent node are Info, reads there and everything sent to
    // the refused node Fail.
    for o in &ops {
        let want = match (o.node, o.kind) {
            (1, OpKind::Write | OpKind::Add) => Outcome::Info,
            _ => Outcome::Fail,
        };
        assert_eq!(o.outcome, want, "{o:?}");
        assert!(o.error.is_some(), "{o:?}");
    }
    // A client keeps its process across Fail operations.
    let mut per_process: BTreeMap<u64, usize> = BTreeMap::new();
    for o in &ops {
        *per_process.entry(o.process).or_default() += 1;
    }
    assert!(per_process.values().any(|n| *n > 1), "{per_process:?}");
    // Set elements are unique.
    let names: Vec<&Value> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Add)
        .map(|o| &o.value)
        .collect();
    let unique: BTreeSet<String> = names.iter().map(|v| v.to_string()).collect();
    assert_eq!(unique.len(), names.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_against_one_real_node() {
    let hangar = workspace_bin("hangar");
    let fixture = workspace_bin("hangar-fixture");
    let mut cl = Cluster::new(&hangar).unwrap_or_else(|e| panic!("cannot run hangar: {e}"));
    cl.add(1, &[]).unwrap();
    cl.write_config(
        1,
        &format!(
            "mcp_servers:\n  {DEFAULT_SERVER}:\n    mode: subprocess\n    command: [\"{}\", stdio, --name, {DEFAULT_SERVER}]\n",
            fixture.display()
        ),
    )
    .unwrap();
    cl.start(1).await.unwrap();
    cl.wait_leader(Duration::from_secs(30)).await.unwrap();
    let targets = vec![(1, cl.member(1).unwrap().base())];

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let recorder = Recorder::create(&path, std::time::Instant::now()).unwrap();
    let cfg = Workload::default();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(
        targets.clone(),
        cfg.clone(),
        recorder.clone(),
        stopped,
        42,
    ));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    tokio::time::timeout(cfg.request_timeout + Duration::from_secs(5), task)
        .await
        .expect("the clients stop within a request timeout of the stop")
        .unwrap()
        .unwrap();
    let wall = started.elapsed();
    let during = recorder.ops();
    let s = stats(&during);
    println!(
        "{} operations in {wall:?} ({:.0} ops/s)\n{s}",
        during.len(),
        during.len() as f64 / wall.as_secs_f64()
    );

    let missing = final_reads(&targets, &cfg, &recorder).await.unwrap();
    assert!(missing.is_empty(), "{missing:?}\n{}", cl.logs_tail(30));
    let ops = recorder.ops();
    assert!(ops.len() > during.len());

    // Every kind was recorded, mostly Ok.
    for kind in [
        OpKind::Write,
        OpKind::Read,
        OpKind::Add,
        OpKind::ReadSet,
        OpKind::Call,
        OpKind::Events,
    ] {
        let mine: Vec<&Op> = during.iter().filter(|o| o.kind == kind).collect();
        let ok = mine.iter().filter(|o| o.outcome == Outcome::Ok).count();
        let errors: BTreeSet<&str> = mine.iter().filter_map(|o| o.error.as_deref()).collect();
        assert!(
            !mine.is_empty() && ok * 10 >= mine.len() * 9,
            "{kind:?}: {ok} of {} Ok; errors {errors:?}",
            mine.len()
        );
    }
    assert_info_is_last(&ops);

    // The history file holds exactly what was recorded.
    let mut back = read_history(&path).unwrap();
    back.sort_by_key(|o| o.index);
    assert_eq!(back, ops);

    // On one healthy node: every acknowledged add is in the final set, every final register
    // value was written, every event read is a prefix of the final log.
    let last = |kind: OpKind, key: &str| {
        ops.iter()
            .rev()
            .find(|o| o.kind == kind && o.key == key && o.outcome == Outcome::Ok)
            .map(|o| o.value.clone())
            .unwrap()
    };
    let final_set: BTreeSet<String> = last(OpKind::ReadSet, &cfg.set_key)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for o in ops
        .iter()
        .filter(|o| o.kind == OpKind::Add && o.outcome == Outcome::Ok)
    {
        assert!(final_set.contains(o.value.as_str().unwrap()), "{o:?} lost");
    }
    let written: BTreeSet<u64> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Write)
        .filter_map(|o| o.value.as_u64())
        .collect();
    for key in &cfg.register_keys {
        let v = last(OpKind::Read, key);
        assert!(
            v.is_null() || written.contains(&v.as_u64().unwrap()),
            "{key} = {v}"
        );
    }
    let log = last(OpKind::Events, EVENTS_KEY);
    let log = log.as_array().unwrap();
    assert!(!log.is_empty(), "adding keys publishes events");
    for o in during
        .iter()
        .filter(|o| o.kind == OpKind::Events && o.outcome == Outcome::Ok)
    {
        let read = o.value.as_array().unwrap();
        assert!(
            read.len() <= log.len() && log[..read.len()] == read[..],
            "{o:?}"
        );
    }
    // Calls echo their message.
    assert!(
        during
            .iter()
            .filter(|o| o.kind == OpKind::Call && o.outcome == Outcome::Ok)
            .all(|o| o.value.as_str().is_some_and(|t| t.starts_with(NAME_PREFIX)))
    );
}
