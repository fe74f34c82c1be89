//! Supervisor room: the loops that decide, for the instances of this node, when to check
//! health, when to try recovering a DEGRADED server and when to stop an idle one. The
//! decisions run on a timer (never chained on events), so recovery never stalls silently:
//! a DEGRADED server is retried with exponential backoff and jitter until it recovers or is
//! stopped by an operator, and its next attempt time is visible in the REST details. DEAD
//! group members are restarted here too (their group may route nothing to them).
//!
//! In a cluster these loops run on the leader (DESIGN.md §7); on a single node they run here.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::runtime::{Runtime, ServerState};

/// How often the supervisor looks at every instance.
pub const TICK: Duration = Duration::from_millis(250);

/// Run the supervision loop until `shutdown` is cancelled.
pub fn spawn(runtime: Arc<Runtime>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // Group members out of rotation get no calls, so nothing else would restart a
            // member whose process died: revive DEAD members here (failures lead to
            // DEGRADED and its backoff), so failback needs no operator.
            let members: std::collections::HashSet<String> = runtime
                .groups()
                .iter()
                .flat_map(|g| g.spec().members.into_iter().map(|m| m.id))
                .collect();
            for inst in runtime.instances() {
                match inst.state() {
                    ServerState::Dead if members.contains(inst.id()) => {
                        let i = inst.clone();
                        tokio::spawn(async move { i.revive().await });
                    }
                    ServerState::Ready => {
                        if inst.health_due() {
                            let i = inst.clone();
                            tokio::spawn(async move {
                                if let Err(e) = i.health_check().await {
                                    tracing::warn!(mcp_server = i.id(), error = %e, "health_check_failed");
                                }
                            });
                        }
                        let idle = inst
                            .spec()
                            .common()
                            .map(|c| c.idle_ttl_s as f64)
                            .unwrap_or(300.0);
                        if inst.idle_for() >= idle && inst.in_flight() == 0 {
                            let i = inst.clone();
                            tokio::spawn(async move {
                                i.stop_if_idle().await;
                            });
                        }
                    }
                    ServerState::Degraded if inst.recovery_due() => {
                        let i = inst.clone();
                        tokio::spawn(async move {
                            match i.recover().await {
                                Ok(()) => {
                                    tracing::info!(mcp_server = i.id(), "mcp_server_recovered")
                                }
                                Err(e) => {
                                    tracing::warn!(mcp_server = i.id(), error = %e, "mcp_server_recovery_failed")
                                }
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    })
}
