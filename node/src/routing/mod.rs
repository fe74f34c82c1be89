//! Routing room: resolve a target id (a server or a group) to a live upstream connection and
//! send one request, failing over to the next group member when the failure happened before
//! the request could have reached the upstream (or when the tool is declared idempotent).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::config::{ServerSpec, Strategy};
use crate::runtime::{Group, Instance, Runtime, StartError};
use crate::upstream::{CallSink, Outcome, Upstream, UpstreamError};

/// Where the upstream that is serving a call can be found while the call runs (used by the
/// gateway to answer server→client requests relayed during the call).
pub type ServingSlot = Arc<Mutex<Option<Arc<Upstream>>>>;

/// Why a routed request failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No server or group has this id.
    #[error("unknown MCP server or group '{0}'")]
    Unknown(String),
    /// Every member of the group failed or none is configured.
    #[error("no available member in group '{group}': {detail}")]
    NoAvailableMember {
        /// Group id.
        group: String,
        /// What happened to the members.
        detail: String,
    },
    /// The server could not be started.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The transport failed during the call.
    #[error("MCP server '{server}' failed: {source}")]
    Upstream {
        /// Server id.
        server: String,
        /// The transport error.
        #[source]
        source: UpstreamError,
    },
}

impl RouteError {
    /// Stable error type for metrics and `error_type` fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            RouteError::Unknown(_) => "McpServerNotFoundError",
            RouteError::NoAvailableMember { .. } => "NoAvailableMemberError",
            RouteError::Start(StartError::CircuitOpen { .. }) => "CircuitBreakerOpen",
            RouteError::Start(_) => "McpServerStartError",
            RouteError::Upstream { source, .. } => match source {
                UpstreamError::Timeout { .. } => "TimeoutError",
                _ => "ToolInvocationError",
            },
        }
    }
}

/// A request to route.
pub struct RouteRequest<'a> {
    /// The JSON-RPC method sent upstream.
    pub method: &'a str,
    /// Raw params (already rewritten for the upstream).
    pub params: Option<Box<RawValue>>,
    /// Where call-scoped notifications and server→client requests go.
    pub sink: Option<CallSink>,
    /// Overall deadline.
    pub timeout: Duration,
    /// Safe to re-send after a failure that may have reached the upstream.
    pub idempotent: bool,
    /// Filled with the upstream serving the call.
    pub slot: Option<ServingSlot>,
}

/// A successful routing: who served it and what they answered.
pub struct Routed {
    /// The instance that answered.
    pub instance: Arc<Instance>,
    /// The upstream's answer (a result or a JSON-RPC error).
    pub outcome: Outcome,
}

/// The router.
pub struct Router {
    runtime: Arc<Runtime>,
}

impl Router {
    /// A router over the node's runtime.
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Router { runtime }
    }

    /// The runtime this router routes into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Candidate instances for a target, in the order they should be tried.
    pub fn candidates(&self, target: &str) -> Result<Vec<Arc<Instance>>, RouteError> {
        if let Some(inst) = self.runtime.instance(target) {
            return Ok(vec![inst]);
        }
        let group = self
            .runtime
            .group(target)
            .ok_or_else(|| RouteError::Unknown(target.to_owned()))?;
        Ok(self.group_order(&group))
    }

    fn group_order(&self, group: &Arc<Group>) -> Vec<Arc<Instance>> {
        let spec = group.spec();
        let mut members: Vec<(Arc<Instance>, u32)> = spec
            .members
            .iter()
            .filter_map(|m| self.runtime.instance(&m.id).map(|i| (i, m.priority)))
            .collect();
        if members.is_empty() {
            return Vec::new();
        }
        match spec.strategy {
            Strategy::Priority => {
                members.sort_by_key(|(_, p)| *p);
            }
            _ => {
                let start = group.next_cursor() % members.len();
                members.rotate_left(start);
            }
        }
        members.into_iter().map(|(i, _)| i).collect()
    }

    /// Route one request. Tries candidates in order; moves on only when the failure is safe
    /// to retry (the request never reached the upstream, or the call is idempotent).
    pub async fn request(&self, target: &str, req: RouteRequest<'_>) -> Result<Routed, RouteError> {
        let candidates = self.candidates(target)?;
        let is_group = self.runtime.group(target).is_some();
        if candidates.is_empty() {
            return Err(RouteError::NoAvailableMember {
                group: target.to_owned(),
                detail: "the group has no members".to_owned(),
            });
        }
        let mut failures: Vec<String> = Vec::new();
        let last = candidates.len() - 1;
        for (i, inst) in candidates.into_iter().enumerate() {
            let conn = match inst.ensure_ready().await {
                Ok(c) => c,
                Err(e) => {
                    if is_group && i < last {
                        failures.push(e.to_string());
                        continue;
                    }
                    if is_group {
                        failures.push(e.to_string());
                        return Err(RouteError::NoAvailableMember {
                            group: target.to_owned(),
                            detail: failures.join("; "),
                        });
                    }
                    return Err(RouteError::Start(e));
                }
            };
            if let Some(slot) = &req.slot {
                *slot.lock() = Some(conn.clone());
            }
            let res = conn
                .request(req.method, req.params.clone(), req.sink.clone(), Some(req.timeout))
                .await;
            match res {
                Ok(outcome) => {
                    inst.touch();
                    inst.report_success();
                    return Ok(Routed { instance: inst, outcome });
                }
                Err(e) => {
                    inst.report_transport_failure(&conn, &e.to_string());
                    let retryable = e.before_send() || req.idempotent;
                    if is_group && i < last && retryable {
                        tracing::info!(group = target, member = inst.id(), error = %e, "group_member_failed_trying_next");
                        failures.push(format!("{}: {e}", inst.id()));
                        continue;
                    }
                    // A single server whose connection died before the request left: one
                    // transparent restart attempt.
                    if !is_group && e.before_send() {
                        if let Ok(conn2) = inst.ensure_ready().await {
                            if let Some(slot) = &req.slot {
                                *slot.lock() = Some(conn2.clone());
                            }
                            match conn2
                                .request(req.method, req.params.clone(), req.sink.clone(), Some(req.timeout))
                                .await
                            {
                                Ok(outcome) => return Ok(Routed { instance: inst, outcome }),
                                Err(e2) => {
                                    inst.report_transport_failure(&conn2, &e2.to_string());
                                    return Err(RouteError::Upstream {
                                        server: inst.id().to_owned(),
                                        source: e2,
                                    });
                                }
                            }
                        }
                    }
                    return Err(RouteError::Upstream {
                        server: inst.id().to_owned(),
                        source: e,
                    });
                }
            }
        }
        Err(RouteError::NoAvailableMember {
            group: target.to_owned(),
            detail: failures.join("; "),
        })
    }

    /// Whether `tool` is declared idempotent for `target` (config `idempotent_tools` globs on
    /// the server, or on every member for a group).
    pub fn is_idempotent(&self, target: &str, tool: &str) -> bool {
        let check = |spec: &ServerSpec| {
            spec.common()
                .is_some_and(|c| c.idempotent_tools.iter().any(|g| glob_match(g, tool)))
        };
        if let Some(inst) = self.runtime.instance(target) {
            return check(&inst.spec());
        }
        if let Some(group) = self.runtime.group(target) {
            let members = group.spec().members;
            return !members.is_empty()
                && members.iter().all(|m| {
                    self.runtime
                        .instance(&m.id)
                        .is_some_and(|i| check(&i.spec()))
                });
        }
        false
    }
}

/// fnmatch-style glob: `*`, `?`, `[abc]`/`[!abc]`/`[a-z]`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // returns (matched, length of the class including brackets)
        let mut i = 1;
        let negate = p.get(i) == Some(&'!');
        if negate {
            i += 1;
        }
        let mut matched = false;
        let start = i;
        while i < p.len() && (p[i] != ']' || i == start) {
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                if p[i] <= c && c <= p[i + 2] {
                    matched = true;
                }
                i += 3;
            } else {
                if p[i] == c {
                    matched = true;
                }
                i += 1;
            }
        }
        if i >= p.len() {
            return None;
        }
        Some((matched != negate, i + 1))
    }
    fn rec(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|k| rec(&p[1..], &t[k..])),
            Some('?') => !t.is_empty() && rec(&p[1..], &t[1..]),
            Some('[') => match (t.first(), class(p, *t.first().unwrap_or(&'\0'))) {
                (Some(_), Some((true, len))) => rec(&p[len..], &t[1..]),
                (Some(c), None) => *c == '[' && rec(&p[1..], &t[1..]),
                _ => false,
            },
            Some(c) => t.first() == Some(c) && rec(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    rec(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("get_*", "get_time"));
        assert!(!glob_match("get_*", "set_time"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("[ab]x", "bx"));
        assert!(!glob_match("[!ab]x", "bx"));
        assert!(glob_match("[a-c]*", "cat"));
        assert!(glob_match("read_*_file", "read_big_file"));
    }
}
