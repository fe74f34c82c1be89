//! Instance failover (issue 8): on a 3-node cluster of `hangar serve` processes running one
//! single-instance (`replicas: 1`) fixture server, kill -9 the node that hosts it and time the
//! first `tools/call` that succeeds through a surviving node (the leader notices the loss after
//! `cluster.node_loss_timeout_ms`, places the instance on a survivor, which cold-starts it).
//! Each round then restarts the killed node and waits until it caught up.

use std::path::PathBuf;
use std::time::Duration;

use hangar_tests::cluster::Cluster;
use hangar_wait::Wait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::http1::simple_request;
use crate::raft::{MsSummary, NODES, RaftBenchError as Error};
use crate::util::parse_duration;

type Result<T> = std::result::Result<T, Error>;

/// The server's id (its tools are `mover__*`).
const SERVER: &str = "mover";
/// How long a restarted node may take to catch up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// Options of `hangar-bench instance-failover`.
#[derive(clap::Args, Clone, Debug)]
pub struct InstanceFailoverArgs {
    /// The `hangar` binary to run (a release build).
    #[arg(long)]
    pub hangar: PathBuf,
    /// The fixture MCP server binary (`hangar-fixture`).
    #[arg(long)]
    pub fixture: PathBuf,
    /// Host kills (rounds).
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// `cluster.node_loss_timeout_ms` of the nodes (the placement lease is its default, 70 %).
    #[arg(long, default_value_t = 10_000)]
    pub node_loss_ms: u64,
    /// Per-call limit of a probe after a kill (then the next survivor is tried).
    #[arg(long, default_value = "2s")]
    pub probe_timeout: String,
    /// A round fails when no call succeeds within this long after the kill.
    #[arg(long, default_value = "90s")]
    pub deadline: String,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// The result, one JSON line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceFailoverRecord {
    /// Always `instance-failover`.
    pub bench: String,
    /// Rounds.
    pub kills: u64,
    /// The nodes' `cluster.node_loss_timeout_ms`.
    pub node_loss_timeout_ms: u64,
    /// kill -9 of the host → first successful call through a survivor.
    pub first_call: MsSummary,
    /// Every round's time, ms.
    pub first_call_ms: Vec<f64>,
    /// Rounds in which the killed host was also the leader.
    pub host_was_leader: u64,
    /// Calls sent after the kills until one succeeded (all rounds).
    pub probes: u64,
}

/// Run the benchmark.
pub async fn failover(a: &InstanceFailoverArgs) -> Result<InstanceFailoverRecord> {
    let probe_timeout = parse_duration(&a.probe_timeout)?;
    let deadline = parse_duration(&a.deadline)?;
    if !(1..=100).contains(&a.kills) || a.node_loss_ms < 1000 {
        return Err(Error::Range(
            "--kills must be 1 … 100 and --node-loss-ms at least 1000".into(),
        ));
    }
    for (flag, p) in [("--hangar", &a.hangar), ("--fixture", &a.fixture)] {
        if !p.is_file() {
            return Err(Error::Range(format!(
                "{flag} {}: no such file (cargo build --release)",
                p.display()
            )));
        }
    }
    let mut c = Cluster::new(&a.hangar)?;
    for id in 1..=NODES as u64 {
        c.add(id, &[])?;
    }
    let head = format!(
        "logging:\n  level: WARNING\nmcp_servers:\n  {SERVER}:\n    mode: subprocess\n    command: [\"{}\", stdio]\n    idle_ttl_s: 3600\n",
        a.fixture.display()
    );
    let config = c.static_peers_config(
        &head,
        &format!("  node_loss_timeout_ms: {}\n", a.node_loss_ms),
    );
    for id in c.ids() {
        c.write_config(id, &config)?;
    }
    c.start_all().await?;
    let result = rounds(&mut c, a, probe_timeout, deadline).await;
    if result.is_err() {
        eprintln!(
            "hangar-bench: last lines of the node logs:\n{}",
            c.logs_tail(15)
        );
    }
    result
}

async fn rounds(
    c: &mut Cluster,
    a: &InstanceFailoverArgs,
    probe_timeout: Duration,
    deadline: Duration,
) -> Result<InstanceFailoverRecord> {
    let mut times = Vec::with_capacity(a.kills);
    let mut probes_total = 0;
    let mut host_was_leader = 0;
    for round in 1..=a.kills {
        let leader = c.wait_leader(Duration::from_secs(30)).await?;
        for id in c.ids() {
            c.wait_caught_up(id, CATCH_UP_LIMIT).await?;
        }
        // Serve once (the instance is placed and started), then find its host.
        let any = c.http(leader).to_owned();
        let host = Wait::new(
            "the instance serves and shows its node",
            Duration::from_secs(60),
        )
        .step(Duration::from_millis(50))
        .poll_async(async || {
            call(&any, round, 0, probe_timeout).await.ok()?;
            host_of(&any).await
        })
        .await
        .map_err(|t| Error::Timeout {
            what: format!("round {round}: the instance serves and its node is shown"),
            after: Duration::from_secs(60),
            detail: t.to_string(),
        })?;
        if host == leader {
            host_was_leader += 1;
        }
        let survivors: Vec<String> = c
            .alive()
            .into_iter()
            .filter(|&id| id != host)
            .map(|id| c.http(id).to_owned())
            .collect();
        let killed_at = c.kill9(host)?;
        let mut probes: u64 = 0;
        let took = loop {
            let now = Instant::now();
            if now >= killed_at + deadline {
                return Err(Error::Timeout {
                    what: format!("round {round}: a call succeeds through a survivor"),
                    after: deadline,
                    detail: format!("{probes} probes"),
                });
            }
            let via = &survivors[probes as usize % survivors.len()];
            probes += 1;
            let limit = probe_timeout.min(killed_at + deadline - now);
            if call(via, round, probes, limit).await.is_ok() {
                break killed_at.elapsed();
            }
            if now.elapsed() < Duration::from_millis(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        probes_total += probes;
        eprintln!(
            "round {round:>2}/{}: killed node {host} (the instance's host{}); first successful call after {:.1} ms ({probes} probes)",
            a.kills,
            if host == leader {
                " and the leader"
            } else {
                ""
            },
            took.as_secs_f64() * 1e3
        );
        times.push(took);
        c.restart(host).await?;
        c.wait_caught_up(host, CATCH_UP_LIMIT).await?;
    }
    Ok(InstanceFailoverRecord {
        bench: "instance-failover".into(),
        kills: times.len() as u64,
        node_loss_timeout_ms: a.node_loss_ms,
        first_call: MsSummary::of(&times)?,
        first_call_ms: times
            .iter()
            .map(|d| (d.as_secs_f64() * 1e4).round() / 10.0)
            .collect(),
        host_was_leader,
        probes: probes_total,
    })
}

/// One `tools/call` of `mover__echo` through `addr`, bounded by `limit`; Ok when the answer
/// carries the echoed text.
async fn call(
    addr: &str,
    round: usize,
    probe: u64,
    limit: Duration,
) -> std::result::Result<(), String> {
    let text = format!("r{round}p{probe}");
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": format!("{SERVER}__echo"), "arguments": {"message": text}}})
    .to_string();
    let headers = [
        ("Content-Type".to_owned(), "application/json".to_owned()),
        (
            "Accept".to_owned(),
            "application/json, text/event-stream".to_owned(),
        ),
    ];
    match tokio::time::timeout(
        limit,
        simple_request(addr, "POST", "/mcp", &headers, body.as_bytes()),
    )
    .await
    {
        Ok(Ok((200, b))) => {
            let b = String::from_utf8_lossy(&b);
            if b.contains("\"result\"") && b.contains(&text) && !b.contains("\"isError\":true") {
                Ok(())
            } else {
                Err(b.chars().take(200).collect())
            }
        }
        Ok(Ok((status, _))) => Err(format!("HTTP {status}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// The node that hosts the server, as `addr` shows it.
async fn host_of(addr: &str) -> Option<u64> {
    let (status, body) = simple_request(addr, "GET", "/api/mcp_servers/", &[], b"")
        .await
        .ok()?;
    (status == 200).then_some(())?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["mcp_servers"]
        .as_array()?
        .iter()
        .find(|r| r["mcp_server"] == SERVER)?["node"]
        .as_u64()
}

/// The markdown table of `instance-failover` records.
pub fn markdown(recs: &[InstanceFailoverRecord]) -> String {
    let mut s = String::from(
        "#### Instance failover: kill -9 of the hosting node → first successful call through a survivor\n\n| node_loss_timeout_ms | kills | host was also leader | p50 ms | p90 ms | max ms | min ms | probes |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in recs {
        let f = &r.first_call;
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.node_loss_timeout_ms,
            r.kills,
            r.host_was_leader,
            f.p50_ms,
            f.p90_ms,
            f.max_ms,
            f.min_ms,
            r.probes
        ));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_record() {
        let r = InstanceFailoverRecord {
            bench: "instance-failover".into(),
            kills: 2,
            node_loss_timeout_ms: 3000,
            first_call: MsSummary::of(&[Duration::from_millis(3200), Duration::from_millis(3400)])
                .unwrap(),
            first_call_ms: vec![3200.0, 3400.0],
            host_was_leader: 1,
            probes: 9,
        };
        let md = markdown(&[r]);
        assert!(md.contains("| 3000 | 2 | 1 |"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| 3000")).count(), 1);
    }

    #[test]
    fn missing_binaries_are_refused_before_starting_anything() {
        let a = InstanceFailoverArgs {
            hangar: "/nonexistent/hangar".into(),
            fixture: "/nonexistent/fixture".into(),
            kills: 1,
            node_loss_ms: 3000,
            probe_timeout: "1s".into(),
            deadline: "10s".into(),
            json_out: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(failover(&a)).unwrap_err().to_string();
        assert!(e.contains("--hangar /nonexistent/hangar"), "{e}");
    }
}
