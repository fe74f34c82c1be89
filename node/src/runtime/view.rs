//! The server and group view shown by REST (`/api/mcp_servers/`, `/api/groups/`) and by the
//! `hangar_*` management tools: one computation of a server's health status and of a group's
//! state, with MCP Hangar's semantics (inventory §5.7):
//!
//! * server `health_status`: `healthy` (ready), `degraded`, `unhealthy` (dead), `unknown`
//!   (cold or starting: nothing is known yet);
//! * group `state`: `degraded` while its circuit breaker is open, else `inactive` with no
//!   healthy member, `partial` below `min_healthy`, `healthy` from `min_healthy` on — where a
//!   healthy member is one that is ready **and** in rotation.
//!
//! Pure: routing's view of the members (rotation, failures, breaker) comes in as data.

use serde::Serialize;

use super::{InstanceStatus, ServerState};
use crate::config::{GroupSpec, Strategy};

/// A server's health as reported next to its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Ready.
    Healthy,
    /// Too many consecutive failures; recovering.
    Degraded,
    /// Dead.
    Unhealthy,
    /// Cold or starting.
    Unknown,
}

impl HealthStatus {
    /// The health of a server in `state`.
    pub fn of(state: ServerState) -> HealthStatus {
        match state {
            ServerState::Ready => HealthStatus::Healthy,
            ServerState::Degraded => HealthStatus::Degraded,
            ServerState::Dead => HealthStatus::Unhealthy,
            ServerState::Cold | ServerState::Initializing => HealthStatus::Unknown,
        }
    }
}

/// One server in a list (`GET /api/mcp_servers/`, `hangar_list`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerRow {
    /// Id.
    pub mcp_server: String,
    /// `cold`, `initializing`, `ready`, `degraded`, `dead`.
    pub state: &'static str,
    /// `subprocess`, `remote`, ….
    pub mode: &'static str,
    /// The cluster node that runs it (`null`: not placed yet; every node for `replicas: all`
    /// and remote servers, shown as this node).
    pub node: Option<u64>,
    /// Whether a connection is up.
    pub alive: bool,
    /// Tools known.
    pub tools_count: usize,
    /// Health derived from the state.
    pub health_status: HealthStatus,
    /// Whether the tools come from the config.
    pub tools_predefined: bool,
    /// Free text.
    pub description: Option<String>,
}

impl ServerRow {
    /// The row of a server.
    pub fn of(s: &InstanceStatus) -> ServerRow {
        ServerRow {
            mcp_server: s.id.clone(),
            state: s.state.as_str(),
            mode: s.mode,
            node: s.node,
            alive: s.alive,
            tools_count: s.tools_count,
            health_status: HealthStatus::of(s.state),
            tools_predefined: s.tools_predefined,
            description: s.description.clone(),
        }
    }
}

/// A group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    /// No healthy member.
    Inactive,
    /// Fewer healthy members than `min_healthy` (still serves).
    Partial,
    /// At least `min_healthy` healthy members.
    Healthy,
    /// The group's circuit breaker is open.
    Degraded,
}

impl GroupState {
    /// The state of a group with `healthy` healthy members.
    pub fn of(healthy: usize, min_healthy: u32, breaker_open: bool) -> GroupState {
        if breaker_open {
            GroupState::Degraded
        } else if healthy == 0 {
            GroupState::Inactive
        } else if healthy < min_healthy as usize {
            GroupState::Partial
        } else {
            GroupState::Healthy
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Inactive => "inactive",
            GroupState::Partial => "partial",
            GroupState::Healthy => "healthy",
            GroupState::Degraded => "degraded",
        }
    }

    /// The group's health in a server list: `healthy`, `degraded` (partial or breaker
    /// open) or `unknown` (no healthy member: cold or failed alike).
    pub fn health(self) -> HealthStatus {
        match self {
            GroupState::Healthy => HealthStatus::Healthy,
            GroupState::Partial | GroupState::Degraded => HealthStatus::Degraded,
            GroupState::Inactive => HealthStatus::Unknown,
        }
    }
}

/// One member of a group as routing and the runtime see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberRow {
    /// Member server id.
    pub id: String,
    /// Its state (`unknown` when the server is not defined here).
    pub state: &'static str,
    /// Whether routing sends calls to it.
    pub in_rotation: bool,
    /// Weight.
    pub weight: u32,
    /// Priority.
    pub priority: u32,
    /// Consecutive failures seen by routing.
    pub consecutive_failures: u32,
    #[serde(skip)]
    ready: bool,
}

impl MemberRow {
    /// A member row; `state` is `None` when the server is not defined on this node.
    pub fn new(
        id: String,
        state: Option<ServerState>,
        in_rotation: bool,
        weight: u32,
        priority: u32,
        consecutive_failures: u32,
    ) -> MemberRow {
        MemberRow {
            id,
            state: state.map_or("unknown", ServerState::as_str),
            in_rotation,
            weight,
            priority,
            consecutive_failures,
            ready: state == Some(ServerState::Ready),
        }
    }

    /// Ready and in rotation.
    pub fn healthy(&self) -> bool {
        self.ready && self.in_rotation
    }
}

/// A group (`GET /api/groups/{id}`, `hangar_group_list`, `hangar_details`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupView {
    /// Id.
    pub group_id: String,
    /// Free text.
    pub description: Option<String>,
    /// State.
    pub state: GroupState,
    /// Load-balancing strategy.
    pub strategy: Strategy,
    /// Healthy members needed for `healthy`.
    pub min_healthy: u32,
    /// Members ready and in rotation.
    pub healthy_count: usize,
    /// Members.
    pub total_members: usize,
    /// `closed`, `open`, `half_open`.
    pub circuit_breaker_state: &'static str,
    /// Whether the breaker is open.
    pub circuit_open: bool,
    /// Whether a call can be routed now (a healthy member and the breaker not open).
    pub is_available: bool,
    /// Members.
    pub members: Vec<MemberRow>,
}

impl GroupView {
    /// The view of group `id`; `breaker` is the name of its breaker state, `breaker_open`
    /// whether that state refuses calls.
    pub fn new(
        id: &str,
        spec: &GroupSpec,
        members: Vec<MemberRow>,
        breaker: &'static str,
        breaker_open: bool,
    ) -> GroupView {
        let healthy = members.iter().filter(|m| m.healthy()).count();
        GroupView {
            group_id: id.to_owned(),
            description: spec.description.clone(),
            state: GroupState::of(healthy, spec.min_healthy, breaker_open),
            strategy: spec.strategy,
            min_healthy: spec.min_healthy,
            healthy_count: healthy,
            total_members: members.len(),
            circuit_breaker_state: breaker,
            circuit_open: breaker_open,
            is_available: healthy > 0 && !breaker_open,
            members,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GroupBreaker, GroupHealth};
    use std::time::Duration;

    fn spec(min_healthy: u32, unhealthy_threshold: u32) -> GroupSpec {
        GroupSpec {
            description: None,
            strategy: Strategy::RoundRobin,
            min_healthy,
            auto_start: true,
            health: GroupHealth {
                unhealthy_threshold,
                healthy_threshold: 1,
            },
            circuit_breaker: GroupBreaker {
                failure_threshold: 10,
                reset_timeout: Duration::from_secs(60),
            },
            tools: None,
            members: Vec::new(),
        }
    }

    fn member(id: &str, state: Option<ServerState>, in_rotation: bool, failures: u32) -> MemberRow {
        MemberRow::new(id.into(), state, in_rotation, 1, 1, failures)
    }

    #[test]
    fn server_health_follows_state() {
        use ServerState::*;
        let table = [
            (Ready, HealthStatus::Healthy),
            (Degraded, HealthStatus::Degraded),
            (Dead, HealthStatus::Unhealthy),
            (Cold, HealthStatus::Unknown),
            (Initializing, HealthStatus::Unknown),
        ];
        for (state, want) in table {
            assert_eq!(HealthStatus::of(state), want, "{state:?}");
        }
    }

    #[test]
    fn group_state_table() {
        use GroupState::*;
        // (healthy members, min_healthy, breaker open) → state
        let table = [
            (0, 1, false, Inactive),
            (1, 1, false, Healthy),
            (3, 1, false, Healthy),
            (1, 2, false, Partial),
            (2, 2, false, Healthy),
            (2, 3, false, Partial),
            (0, 3, false, Inactive),
            (3, 1, true, Degraded),
            (0, 1, true, Degraded),
        ];
        for (healthy, min, open, want) in table {
            assert_eq!(
                GroupState::of(healthy, min, open),
                want,
                "{healthy} {min} {open}"
            );
        }
    }

    #[test]
    fn healthy_members_are_ready_and_in_rotation_with_a_non_default_threshold() {
        use ServerState::*;
        // min_healthy 3 and unhealthy_threshold 5 (routing keeps `c` in rotation after 4
        // failures); `d` is ready but out of rotation, `e` in rotation but cold, `f` unknown.
        let s = spec(3, 5);
        let members = vec![
            member("a", Some(Ready), true, 0),
            member("b", Some(Ready), true, 1),
            member("c", Some(Ready), true, 4),
            member("d", Some(Ready), false, 5),
            member("e", Some(Cold), true, 0),
            member("f", None, true, 0),
        ];
        let v = GroupView::new("g", &s, members.clone(), "closed", false);
        assert_eq!(v.healthy_count, 3);
        assert_eq!(v.total_members, 6);
        assert_eq!(v.state, GroupState::Healthy);
        assert!(v.is_available);
        assert_eq!(v.members[5].state, "unknown");

        // One more member leaves rotation: below min_healthy, still available.
        let mut fewer = members.clone();
        fewer[2] = member("c", Some(Ready), false, 5);
        let v = GroupView::new("g", &s, fewer, "closed", false);
        assert_eq!((v.healthy_count, v.state), (2, GroupState::Partial));
        assert!(v.is_available);
        assert_eq!(v.state.health(), HealthStatus::Degraded);

        // The breaker wins over the member count.
        let v = GroupView::new("g", &s, members, "open", true);
        assert_eq!(v.state, GroupState::Degraded);
        assert!(!v.is_available && v.circuit_open);

        // Nothing ready: inactive, unknown health.
        let v = GroupView::new(
            "g",
            &s,
            vec![member("e", Some(Cold), true, 0)],
            "closed",
            false,
        );
        assert_eq!(v.state, GroupState::Inactive);
        assert_eq!(v.state.health(), HealthStatus::Unknown);
        assert!(!v.is_available);
    }

    #[test]
    fn rows_serialise_in_mcp_hangars_shape() {
        let v = serde_json::to_value(GroupView::new(
            "g",
            &spec(1, 2),
            vec![member("a", Some(ServerState::Ready), true, 0)],
            "closed",
            false,
        ))
        .unwrap();
        assert_eq!(v["state"], "healthy");
        assert_eq!(v["strategy"], "round_robin");
        assert_eq!(v["members"][0]["state"], "ready");
        assert!(v["members"][0].get("ready").is_none());
    }
}
