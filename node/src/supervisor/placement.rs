//! Placement: which node runs each single-instance (`replicas: 1`) local-mode server.
//!
//! A pure decision over the replicated state, taken by the leader only (DESIGN §7): keep every
//! placement that is still valid, move only what must move (its node was lost, left, or is no
//! longer allowed, or the instance kept failing there while another node can take it), place
//! what is new on the least-loaded allowed node with room, spreading the members of one group
//! over different nodes. The leader writes the result as Raft commands stamped with its term;
//! nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};

/// One server that needs exactly one instance somewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Instance id (the server id).
    pub id: String,
    /// Nodes allowed to run it (empty = any).
    pub nodes: Vec<u64>,
    /// Labels a node must carry, all of them, to run it (empty = any).
    pub labels: BTreeMap<String, String>,
    /// Groups it is a member of: members of one group go to different nodes when they can.
    pub groups: Vec<String>,
    /// Nodes where it kept failing (its host reported it DEGRADED or DEAD): it moves off
    /// them, and is placed on them, only when no other node can take it.
    pub avoid: BTreeSet<u64>,
}

/// A node as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// Most instances it may run (`None` = no limit).
    pub capacity: Option<u32>,
    /// Reachable: acknowledged the leader within the node-loss timeout.
    pub alive: bool,
    /// Draining (`hangarctl cluster drain`): takes nothing, and what it runs moves away.
    pub draining: bool,
    /// Its labels (`cluster.labels`).
    pub labels: BTreeMap<String, String>,
}

impl NodeView {
    /// Whether instances may run on it.
    fn usable(&self) -> bool {
        self.alive && !self.draining
    }
}

/// A change the leader proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Run `id` on `node` (new, or moved from a lost / disallowed node).
    Place {
        /// Instance id.
        id: String,
        /// Target node.
        node: u64,
    },
    /// `id` is no longer configured: forget its placement.
    Remove {
        /// Instance id.
        id: String,
    },
}

/// The decision: changes to write, and servers that fit nowhere (with why).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changes, in a stable order (removals first, then placements by id).
    pub changes: Vec<Change>,
    /// Servers left unplaced, with the reason.
    pub unplaced: Vec<(String, String)>,
}

/// Decide placements. `current` is the replicated instance → node map.
pub fn plan(
    wants: &[Want],
    nodes: &BTreeMap<u64, NodeView>,
    current: &BTreeMap<String, u64>,
) -> Plan {
    let mut out = Plan::default();
    let wanted: BTreeSet<&str> = wants.iter().map(|w| w.id.as_str()).collect();
    for id in current.keys() {
        if !wanted.contains(id.as_str()) {
            out.changes.push(Change::Remove { id: id.clone() });
        }
    }
    let allowed = |w: &Want, n: u64| {
        (w.nodes.is_empty() || w.nodes.contains(&n))
            && nodes
                .get(&n)
                .is_some_and(|v| w.labels.iter().all(|(k, val)| v.labels.get(k) == Some(val)))
    };
    // Load and group spread of the placements that stay.
    let mut load: BTreeMap<u64, u32> = nodes.keys().map(|n| (*n, 0)).collect();
    let mut group_nodes: BTreeMap<&str, BTreeMap<u64, u32>> = BTreeMap::new();
    let mut to_place: Vec<&Want> = Vec::new();
    let takes = |w: &Want, n: u64, v: &NodeView| v.usable() && allowed(w, n);
    for w in wants {
        // A node it kept failing on is kept only when no other node could take it.
        let elsewhere = |here: u64| {
            nodes.iter().any(|(n, v)| {
                *n != here
                    && !w.avoid.contains(n)
                    && takes(w, *n, v)
                    && v.capacity.is_none_or(|c| c > 0)
            })
        };
        let keep = current.get(&w.id).filter(|n| {
            nodes.get(n).is_some_and(|v| takes(w, **n, v))
                && !(w.avoid.contains(n) && elsewhere(**n))
        });
        match keep {
            Some(n) => {
                *load.entry(*n).or_default() += 1;
                for g in &w.groups {
                    *group_nodes.entry(g).or_default().entry(*n).or_default() += 1;
                }
            }
            None => to_place.push(w),
        }
    }
    for w in to_place {
        let best = nodes
            .iter()
            .filter(|(n, v)| takes(w, **n, v) && v.capacity.is_none_or(|c| load[*n] < c))
            .min_by_key(|(n, _)| {
                let same_group: u32 = w
                    .groups
                    .iter()
                    .map(|g| {
                        group_nodes
                            .get(g.as_str())
                            .and_then(|m| m.get(n))
                            .copied()
                            .unwrap_or(0)
                    })
                    .sum();
                (w.avoid.contains(n), same_group, load[*n], **n)
            })
            .map(|(n, _)| *n);
        match best {
            Some(n) => {
                *load.entry(n).or_default() += 1;
                for g in &w.groups {
                    *group_nodes.entry(g).or_default().entry(n).or_default() += 1;
                }
                if current.get(&w.id) != Some(&n) {
                    out.changes.push(Change::Place {
                        id: w.id.clone(),
                        node: n,
                    });
                }
            }
            None => out.unplaced.push((w.id.clone(), why_unplaced(w, nodes))),
        }
    }
    out
}

fn why_unplaced(w: &Want, nodes: &BTreeMap<u64, NodeView>) -> String {
    let candidates: Vec<u64> = nodes
        .iter()
        .filter(|(n, v)| {
            (w.nodes.is_empty() || w.nodes.contains(n))
                && w.labels.iter().all(|(k, val)| v.labels.get(k) == Some(val))
        })
        .map(|(n, _)| *n)
        .collect();
    if candidates.is_empty() {
        return if w.labels.is_empty() {
            format!(
                "none of its allowed nodes {:?} is a member of the cluster; fix placement.nodes",
                w.nodes
            )
        } else {
            format!(
                "no member of the cluster carries the labels {:?}{}; fix placement.labels or a node's cluster.labels",
                w.labels,
                if w.nodes.is_empty() {
                    String::new()
                } else {
                    format!(" among nodes {:?}", w.nodes)
                }
            )
        };
    }
    if candidates.iter().all(|n| !nodes[n].alive) {
        return format!("every allowed node ({candidates:?}) is unreachable");
    }
    if candidates.iter().all(|n| !nodes[n].usable()) {
        return format!(
            "every allowed node ({candidates:?}) is unreachable or draining; undrain one or add a node"
        );
    }
    format!(
        "every reachable allowed node ({candidates:?}) is at its cluster.capacity; raise it or add a node"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(id: &str) -> Want {
        Want {
            id: id.into(),
            nodes: vec![],
            labels: BTreeMap::new(),
            groups: vec![],
            avoid: BTreeSet::new(),
        }
    }

    fn nodes(spec: &[(u64, Option<u32>, bool)]) -> BTreeMap<u64, NodeView> {
        spec.iter()
            .map(|(n, capacity, alive)| {
                (
                    *n,
                    NodeView {
                        capacity: *capacity,
                        alive: *alive,
                        draining: false,
                        labels: BTreeMap::new(),
                    },
                )
            })
            .collect()
    }

    fn placed(p: &Plan) -> BTreeMap<String, u64> {
        p.changes
            .iter()
            .filter_map(|c| match c {
                Change::Place { id, node } => Some((id.clone(), *node)),
                Change::Remove { .. } => None,
            })
            .collect()
    }

    fn current(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(i, n)| ((*i).to_owned(), *n)).collect()
    }

    #[test]
    fn new_servers_spread_over_the_least_loaded_nodes() {
        let n = nodes(&[(1, None, true), (2, None, true), (3, None, true)]);
        let p = plan(
            &[want("a"), want("b"), want("c"), want("d")],
            &n,
            &current(&[]),
        );
        assert_eq!(
            placed(&p),
            current(&[("a", 1), ("b", 2), ("c", 3), ("d", 1)])
        );
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn valid_placements_stay_and_nothing_moves_when_a_node_joins() {
        let n = nodes(&[(1, None, true), (2, None, true), (3, None, true)]);
        let cur = current(&[("a", 1), ("b", 1), ("c", 1)]);
        let p = plan(&[want("a"), want("b"), want("c")], &n, &cur);
        assert!(p.changes.is_empty(), "{p:?}");
        // A new server goes to an empty node.
        let p = plan(&[want("a"), want("b"), want("c"), want("d")], &n, &cur);
        assert_eq!(placed(&p), current(&[("d", 2)]));
    }

    #[test]
    fn a_lost_nodes_instances_move_and_the_others_stay() {
        let n = nodes(&[(1, None, true), (2, None, false), (3, None, true)]);
        let cur = current(&[("a", 1), ("b", 2), ("c", 3)]);
        let p = plan(&[want("a"), want("b"), want("c")], &n, &cur);
        assert_eq!(placed(&p), current(&[("b", 1)]));
    }

    #[test]
    fn a_draining_node_takes_nothing_and_its_instances_move() {
        let mut n = nodes(&[(1, None, true), (2, None, true), (3, None, true)]);
        if let Some(v) = n.get_mut(&2) {
            v.draining = true;
        }
        let cur = current(&[("a", 1), ("b", 2)]);
        let p = plan(&[want("a"), want("b"), want("c")], &n, &cur);
        // b leaves node 2 for the least-loaded usable node; c does not land on node 2.
        assert_eq!(placed(&p), current(&[("b", 3), ("c", 1)]));
        let mut only2 = want("x");
        only2.nodes = vec![2];
        let p = plan(&[only2], &n, &current(&[]));
        assert!(p.unplaced[0].1.contains("draining"), "{p:?}");
    }

    #[test]
    fn removed_servers_are_forgotten() {
        let n = nodes(&[(1, None, true)]);
        let p = plan(&[want("a")], &n, &current(&[("a", 1), ("gone", 1)]));
        assert_eq!(p.changes, vec![Change::Remove { id: "gone".into() }]);
    }

    #[test]
    fn capacity_and_allowed_nodes_are_respected() {
        let n = nodes(&[(1, Some(1), true), (2, Some(0), true), (3, None, true)]);
        let mut only2 = want("x");
        only2.nodes = vec![2];
        let p = plan(&[want("a"), want("b"), only2], &n, &current(&[]));
        assert_eq!(placed(&p), current(&[("a", 1), ("b", 3)]));
        assert_eq!(p.unplaced.len(), 1);
        assert!(p.unplaced[0].1.contains("capacity"), "{p:?}");
        // A placement on a node that is no longer allowed moves.
        let mut only3 = want("a");
        only3.nodes = vec![3];
        let p = plan(&[only3], &n, &current(&[("a", 1)]));
        assert_eq!(placed(&p), current(&[("a", 3)]));
    }

    #[test]
    fn group_members_go_to_different_nodes() {
        let n = nodes(&[(1, None, true), (2, None, true)]);
        let member = |id: &str| Want {
            id: id.into(),
            nodes: vec![],
            labels: BTreeMap::new(),
            groups: vec!["g".into()],
            avoid: BTreeSet::new(),
        };
        // `solo` loads node 1 first; the group still spreads.
        let cur = current(&[("solo", 1)]);
        let p = plan(&[want("solo"), member("m1"), member("m2")], &n, &cur);
        let got = placed(&p);
        assert_ne!(got["m1"], got["m2"], "{p:?}");
    }

    #[test]
    fn an_instance_that_keeps_failing_moves_to_a_node_it_did_not_fail_on() {
        let n = nodes(&[(1, None, true), (2, None, true), (3, None, true)]);
        let mut a = want("a");
        a.avoid = BTreeSet::from([1]);
        // Moves off node 1, to the least-loaded other node.
        let p = plan(&[a.clone(), want("b")], &n, &current(&[("a", 1), ("b", 2)]));
        assert_eq!(placed(&p), current(&[("a", 3)]));
        // It failed on 1 and 3: node 2 it is, even though it is busier.
        a.avoid = BTreeSet::from([1, 3]);
        let p = plan(&[a.clone(), want("b")], &n, &current(&[("a", 3), ("b", 2)]));
        assert_eq!(placed(&p), current(&[("a", 2)]));
        // Failed everywhere it may run: it stays where it is (no bouncing around).
        a.avoid = BTreeSet::from([1, 2, 3]);
        let p = plan(&[a.clone()], &n, &current(&[("a", 2)]));
        assert!(p.changes.is_empty(), "{p:?}");
        // Only allowed on the node it fails on: it stays.
        let mut only1 = want("x");
        only1.nodes = vec![1];
        only1.avoid = BTreeSet::from([1]);
        let p = plan(&[only1], &n, &current(&[("x", 1)]));
        assert!(p.changes.is_empty(), "{p:?}");
    }

    #[test]
    fn labels_select_the_nodes_that_may_run_a_server() {
        let mut n = nodes(&[(1, None, true), (2, None, true), (3, None, true)]);
        let zone = |z: &str| BTreeMap::from([("zone".to_owned(), z.to_owned())]);
        n.get_mut(&1).unwrap().labels = zone("a");
        n.get_mut(&2).unwrap().labels = zone("b");
        n.get_mut(&3).unwrap().labels = zone("b");
        let mut x = want("x");
        x.labels = zone("b");
        let p = plan(&[want("a"), x.clone()], &n, &current(&[("a", 2)]));
        // Node 2 is busier: the other `zone: b` node takes it.
        assert_eq!(placed(&p), current(&[("x", 3)]));
        // A placement on a node whose labels no longer match moves.
        let p = plan(&[x.clone()], &n, &current(&[("x", 1)]));
        assert_eq!(placed(&p), current(&[("x", 2)]));
        // Nobody carries the labels: unplaced, and the reason names them.
        x.labels = zone("c");
        let p = plan(&[x], &n, &current(&[]));
        assert!(p.unplaced[0].1.contains("labels"), "{p:?}");
    }

    #[test]
    fn nothing_reachable_leaves_servers_unplaced_with_a_reason() {
        let n = nodes(&[(1, None, false)]);
        let p = plan(&[want("a")], &n, &current(&[("a", 1)]));
        assert!(p.changes.is_empty());
        assert!(p.unplaced[0].1.contains("unreachable"), "{p:?}");
        let mut far = want("b");
        far.nodes = vec![9];
        let p = plan(&[far], &nodes(&[(1, None, true)]), &current(&[]));
        assert!(p.unplaced[0].1.contains("placement.nodes"), "{p:?}");
    }
}
