//! Requests an upstream sends to the client during a call (sampling, elicitation, roots),
//! relayed to the client with a gateway-chosen id. The id encodes the node that holds the
//! pending upstream request (`hgr/<node>/<seq>`), so an answer that a load balancer delivers
//! to another node can be routed home once there is a cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::jsonrpc::Id;
use crate::upstream::Upstream;

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
    pending: Mutex<HashMap<String, Pending>>,
}

/// Where a relayed id points.
#[derive(Debug, PartialEq, Eq)]
pub enum Home<'a> {
    /// Held by this node.
    Local,
    /// Held by another node (forwarding arrives with the cluster).
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
            pending: Mutex::new(HashMap::new()),
        }
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

    /// Which node holds this id.
    pub fn home<'a>(&self, id: &'a Id) -> Home<'a> {
        let Id::Str(s) = id else { return Home::Foreign };
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Home::Foreign;
        };
        let node = rest.rsplit_once('/').map(|(n, _)| n).unwrap_or_default();
        if node == self.node_id {
            Home::Local
        } else {
            Home::Node(node)
        }
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
    }
}
