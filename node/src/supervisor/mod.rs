//! Supervisor room: decides, for the instances it supervises, when to check health, when to
//! try recovering a DEGRADED server, when to revive a DEAD group member and when to stop an
//! idle one. The decisions are the pure [`lifecycle::Lifecycle`] state machine; this room's
//! loop only ticks it on a timer (never chained on events), so recovery never stalls
//! silently: a DEGRADED server is retried with exponential backoff and jitter until it
//! recovers or is stopped by an operator, and its next attempt time is visible in the REST
//! details. The room that owns the processes (`runtime/`) carries the decisions out; it is
//! reached through the [`Fleet`] port, so the loop can move (to the cluster leader) without
//! taking the processes with it.
//!
//! In a cluster these decisions belong to the leader (DESIGN.md §7); on a single node they
//! run here.

pub mod lifecycle;
pub mod placement;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the supervisor looks at every instance.
pub const TICK: Duration = Duration::from_millis(250);

/// What the supervisor ticks: the instances it supervises.
pub trait Fleet: Send + Sync + 'static {
    /// Let every instance's lifecycle decide what is due now, and carry it out.
    fn tick(&self);
}

/// Run the supervision loop until `shutdown` is cancelled.
pub fn spawn(fleet: Arc<dyn Fleet>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => fleet.tick(),
            }
        }
    })
}
