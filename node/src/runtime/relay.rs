//! Requests an upstream sends to the client during a call (sampling, elicitation, roots),
//! relayed to the client with a gateway-chosen id. The id encodes the node that holds the
//! pending upstream request (`hgr/<node>/<seq>`), so an answer that a load balancer delivers
//! to another node is sent home (over `CallService/Answer`).
//!
//! One table per node, shared by the front door (calls served here) and the host side of
//! forwarded calls (calls another node received for an instance hosted here).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::jsonrpc::{INTERNAL_ERROR, Id, Message, RpcError};
use crate::upstream::{Outcome, Upstream, UpstreamError};

/// Prefix of relayed request ids.
pub const PREFIX: &str = "hgr/";

/// A relayed request waiting for the client's answer.
pub struct Pending {
    /// The upstream that asked.
    pub conn: Arc<Upstream>,
    /// The upstream's own id for the request.
    pub upstream_id: Id,
    /// The front-door call it belongs to.
    pub call: u64,
}

/// Table of relayed requests on this node.
pub struct Relays {
    node_id: String,
    seq: AtomicU64,
    calls: AtomicU64,
    pending: Mutex<HashMap<String, Pending>>,
}

/// Where a relayed id points.
#[derive(Debug, PartialEq, Eq)]
pub enum Home<'a> {
    /// Held by this node.
    Local,
    /// Held by another node (the answer is sent there).
    Node(&'a str),
    /// Not an id we issued.
    Foreign,
}

impl Relays {
    /// An empty table for `node_id`.
    pub fn new(node_id: &str) -> Self {
        Relays {
            node_id: node_id.to_owned(),
            seq: AtomicU64::new(1),
            calls: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A number for a new call, unique on this node (the key of [`forget_call`](Self::forget_call)).
    pub fn next_call(&self) -> u64 {
        self.calls.fetch_add(1, Ordering::Relaxed)
    }

    /// Register a relayed request; returns the id to show the client.
    pub fn register(&self, conn: Arc<Upstream>, upstream_id: Id, call: u64) -> Id {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}/{seq}", self.node_id);
        self.pending.lock().insert(
            id.clone(),
            Pending {
                conn,
                upstream_id,
                call,
            },
        );
        Id::Str(id)
    }

    /// Take the pending entry for a client's answer.
    pub fn take(&self, id: &Id) -> Option<Pending> {
        match id {
            Id::Str(s) => self.pending.lock().remove(s),
            Id::Num(_) => None,
        }
    }

    /// Deliver the client's answer (`msg`, a JSON-RPC response) to the upstream that asked.
    /// `Ok(false)`: nothing is pending under this id (the call ended, or the id is not ours).
    pub async fn answer(&self, id: &Id, msg: Message) -> Result<bool, UpstreamError> {
        let Some(p) = self.take(id) else {
            return Ok(false);
        };
        p.conn.respond(p.upstream_id, answer_outcome(msg)).await?;
        Ok(true)
    }

    /// Which node holds this id.
    pub fn home<'a>(&self, id: &'a Id) -> Home<'a> {
        let Id::Str(s) = id else { return Home::Foreign };
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Home::Foreign;
        };
        let Some((node, _)) = rest.rsplit_once('/').filter(|(n, _)| !n.is_empty()) else {
            return Home::Foreign;
        };
        if node == self.node_id {
            Home::Local
        } else {
            Home::Node(node)
        }
    }

    /// A guard that forgets `call`'s relays when dropped (the call ended or its future went away).
    pub fn call_guard(&self, call: u64) -> CallRelays<'_> {
        CallRelays { relays: self, call }
    }

    /// Forget every relay of a finished call.
    pub fn forget_call(&self, call: u64) {
        self.pending.lock().retain(|_, p| p.call != call);
    }

    /// Number of pending relays.
    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forgets one call's pending relays on drop.
pub struct CallRelays<'a> {
    relays: &'a Relays,
    call: u64,
}

impl Drop for CallRelays<'_> {
    fn drop(&mut self) {
        self.relays.forget_call(self.call);
    }
}

/// A client's JSON-RPC response as the outcome handed to the upstream.
pub fn answer_outcome(msg: Message) -> Outcome {
    match (msg.result, msg.error) {
        (Some(r), _) => Outcome::Result(r),
        (None, Some(e)) => Outcome::Error(e),
        (None, None) => Outcome::Error(RpcError::new(INTERNAL_ERROR, "empty answer from client")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_home_node() {
        let r = Relays::new("node-a");
        assert_eq!(r.home(&Id::Str("hgr/node-a/7".into())), Home::Local);
        assert_eq!(
            r.home(&Id::Str("hgr/node-b/7".into())),
            Home::Node("node-b")
        );
        assert_eq!(r.home(&Id::Num(3)), Home::Foreign);
        assert_eq!(r.home(&Id::Str("other".into())), Home::Foreign);
        assert_eq!(r.home(&Id::Str("hgr/".into())), Home::Foreign);
        assert_eq!(r.home(&Id::Str("hgr//3".into())), Home::Foreign);
    }

    #[test]
    fn call_numbers_are_unique() {
        let r = Relays::new("1");
        let a = r.next_call();
        assert_ne!(a, r.next_call());
    }
}
