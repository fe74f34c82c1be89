//! The leader's quota allocator: shares of each cluster-wide limit, leased to the nodes by
//! demand (max-min fair), so that the shares any node may still be using never sum to more
//! than the limit.
//!
//! Pure: time comes in as nanoseconds of the leader's monotonic clock, membership and the
//! limits as arguments. What a node may be using of bucket `b`, as the leader sees it:
//!
//! * a node that reported in this term and whose lease has not run out: the share it says it
//!   holds (its last applied grant; none yet: the provisional `limit / members` every node
//!   may use for a bucket it has no grant for), or the grant sent since if that is larger and
//!   not yet acknowledged;
//! * a node whose lease ran out: its `on_partition` share (`limit / members` for
//!   `safe_share` and, as the best bound there is, for `fail_open`; nothing for
//!   `fail_closed`) until it has been silent for the node-loss timeout, nothing after (it is
//!   dead, or an isolated node whose overshoot is bounded by `limit / members`);
//! * a node this leader has not heard from while the leader is younger than one lease: it may
//!   hold any grant of the previous leader, so until every member reported (or a lease went
//!   by), grants never exceed what the node already holds. The previous leader's grants
//!   summed to at most the limit, and nobody's share grows.

use std::collections::{BTreeSet, HashMap};

/// What a node does with a limit when it lost the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `limit / members`.
    SafeShare,
    /// No limit.
    FailOpen,
    /// Nothing admitted.
    FailClosed,
}

impl Mode {
    /// From the definition's text (unknown texts are refused by validation).
    pub fn parse(s: &str) -> Mode {
        match s {
            "fail_open" => Mode::FailOpen,
            "fail_closed" => Mode::FailClosed,
            _ => Mode::SafeShare,
        }
    }

    /// The definition's text.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::SafeShare => "safe_share",
            Mode::FailOpen => "fail_open",
            Mode::FailClosed => "fail_closed",
        }
    }
}

/// One limit, cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Calls per second.
    pub rps: f64,
    /// Partition mode.
    pub mode: Mode,
}

/// One bucket in a node's report.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketReport {
    /// Bucket key (`<rule id>|<dim>=<value>…`).
    pub key: String,
    /// Calls per second offered there recently (admitted or not).
    pub demand: f64,
    /// The share it holds under a running lease (nothing while starting or past its lease);
    /// `None`: the provisional share (`limit / members`).
    pub holding: Option<f64>,
    /// The rate it admits there now (with its partition share past its lease).
    pub using: f64,
}

/// A node's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The node.
    pub node: u64,
    /// The last grant it applied (`seq`, 0 for none).
    pub acked: u64,
    /// Its buckets.
    pub buckets: Vec<BucketReport>,
}

/// The answer to a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Sequence number (the term in the high 32 bits).
    pub seq: u64,
    /// Share per active bucket; a bucket not listed has the provisional share.
    pub shares: Vec<(String, f64)>,
}

#[derive(Debug, Default)]
struct NodeView {
    /// When its last report arrived.
    last: u64,
    holdings: HashMap<String, f64>,
    using: HashMap<String, f64>,
    demand: HashMap<String, f64>,
    /// The last grant sent and not yet acknowledged.
    pending: Option<(u64, HashMap<String, f64>)>,
}

/// Buckets nobody asked for in this long are dropped (every node goes back to the
/// provisional share there).
const IDLE_NS: u64 = 30_000_000_000;

/// The leader's allocator.
#[derive(Debug)]
pub struct Allocator {
    lease_ns: u64,
    loss_ns: u64,
    term: u64,
    term_start: u64,
    nodes: HashMap<u64, NodeView>,
    /// Bucket → last time some node offered calls there.
    active: HashMap<String, u64>,
    /// Member → when this leader first saw it as a member.
    first_seen: HashMap<u64, u64>,
    counter: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    /// Reported this term, lease running.
    Live,
    /// Not heard from yet while this leader is younger than a lease.
    Unknown,
    /// Lease ran out (or never reported after the first lease of the term).
    Lapsed { silent_since: u64 },
}

/// Max-min fair division of `capacity` by `demands`; what is left over is spread evenly.
pub fn max_min_fair(demands: &[(u64, f64)], capacity: f64) -> HashMap<u64, f64> {
    let mut order: Vec<(u64, f64)> = demands
        .iter()
        .map(|&(n, d)| (n, if d.is_finite() { d.max(0.0) } else { 0.0 }))
        .collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut left = capacity.max(0.0);
    let mut out = HashMap::with_capacity(order.len());
    let k = order.len();
    for (i, (n, d)) in order.iter().enumerate() {
        let fair = left / (k - i) as f64;
        let give = d.min(fair);
        left -= give;
        out.insert(*n, give);
    }
    if k > 0 && left > 0.0 {
        let extra = left / k as f64;
        for v in out.values_mut() {
            *v += extra;
        }
    }
    out
}

impl Allocator {
    /// Leases last `lease_ns`; a silent node counts as gone after `loss_ns` (> lease).
    pub fn new(lease_ns: u64, loss_ns: u64) -> Allocator {
        Allocator {
            lease_ns,
            loss_ns: loss_ns.max(lease_ns),
            term: 0,
            term_start: 0,
            nodes: HashMap::new(),
            active: HashMap::new(),
            first_seen: HashMap::new(),
            counter: 0,
        }
    }

    /// Buckets with a recent demand.
    pub fn active_buckets(&self) -> usize {
        self.active.len()
    }

    fn seen(&self, node: u64, now: u64) -> Seen {
        match self.nodes.get(&node) {
            Some(v) if now < v.last.saturating_add(self.lease_ns) => Seen::Live,
            Some(v) => Seen::Lapsed {
                silent_since: v.last,
            },
            None if now < self.term_start.saturating_add(self.lease_ns) => Seen::Unknown,
            // A node that joined later may start (with nothing, then its partition share)
            // later than the term.
            None => Seen::Lapsed {
                silent_since: self
                    .first_seen
                    .get(&node)
                    .copied()
                    .unwrap_or(now)
                    .max(self.term_start),
            },
        }
    }

    /// Answer `report` as the leader of `term` at `now`, `members` being the cluster's
    /// members and `limit_of` the limit of a bucket (`None`: no such rule any more).
    pub fn report(
        &mut self,
        term: u64,
        now: u64,
        members: &BTreeSet<u64>,
        report: Report,
        limit_of: impl Fn(&str) -> Option<Limit>,
    ) -> Grant {
        if term != self.term {
            // A new leader knows nothing of the previous one's grants.
            self.term = term;
            self.term_start = now;
            self.nodes.clear();
            self.active.clear();
            self.first_seen.clear();
            self.counter = 0;
        }
        self.nodes.retain(|n, _| members.contains(n));
        self.first_seen.retain(|n, _| members.contains(n));
        for m in members {
            self.first_seen.entry(*m).or_insert(now);
        }
        let me = report.node;
        {
            let view = self.nodes.entry(me).or_default();
            view.last = now;
            view.holdings.clear();
            view.using.clear();
            view.demand.clear();
            for b in &report.buckets {
                if let Some(h) = b.holding {
                    view.holdings.insert(b.key.clone(), h);
                }
                view.using.insert(b.key.clone(), b.using);
                view.demand.insert(b.key.clone(), b.demand);
            }
            if view
                .pending
                .as_ref()
                .is_some_and(|(s, _)| *s <= report.acked)
            {
                view.pending = None;
            }
        }
        for b in &report.buckets {
            if b.demand > 0.0 || !self.active.contains_key(&b.key) {
                self.active.insert(b.key.clone(), now);
            }
        }
        self.active
            .retain(|k, at| now.saturating_sub(*at) < IDLE_NS && limit_of(k).is_some());
        let n_members = members.len().max(1) as f64;
        let seen: Vec<(u64, Seen)> = members.iter().map(|&m| (m, self.seen(m, now))).collect();
        let warmup = seen.iter().any(|&(m, s)| m != me && s == Seen::Unknown);
        let mut shares = Vec::with_capacity(self.active.len());
        for key in self.active.keys() {
            let Some(limit) = limit_of(key) else { continue };
            let provisional = limit.rps / n_members;
            let mut reserved = 0.0;
            let mut others = 0.0;
            let mut demands = Vec::new();
            for &(m, s) in &seen {
                match s {
                    Seen::Live => {
                        let v = &self.nodes[&m];
                        demands.push((m, v.demand.get(key).copied().unwrap_or(0.0)));
                        if m != me {
                            let held = v
                                .using
                                .get(key)
                                .copied()
                                .unwrap_or(provisional)
                                .max(v.holdings.get(key).copied().unwrap_or(provisional));
                            let sent = v
                                .pending
                                .as_ref()
                                .map_or(0.0, |(_, p)| p.get(key).copied().unwrap_or(provisional));
                            others += held.max(sent);
                        }
                    }
                    Seen::Unknown => {}
                    Seen::Lapsed { silent_since } => {
                        let r = if now < silent_since.saturating_add(self.loss_ns)
                            && limit.mode != Mode::FailClosed
                        {
                            provisional
                        } else {
                            0.0
                        };
                        reserved += r;
                        others += r;
                    }
                }
            }
            let fair = max_min_fair(&demands, limit.rps - reserved);
            let mut share = fair
                .get(&me)
                .copied()
                .unwrap_or(0.0)
                .min(limit.rps - others)
                .max(0.0);
            if warmup {
                let held = self.nodes[&me]
                    .holdings
                    .get(key)
                    .copied()
                    .unwrap_or(provisional);
                share = share.min(held);
            }
            shares.push((key.clone(), share));
        }
        self.counter += 1;
        let seq = (term << 32) | (self.counter & 0xffff_ffff);
        let sent: HashMap<String, f64> = shares.iter().cloned().collect();
        if let Some(v) = self.nodes.get_mut(&me) {
            v.pending = Some((seq, sent));
        }
        Grant { seq, shares }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const LEASE: u64 = 2_000 * MS;
    const LOSS: u64 = 10_000 * MS;

    fn limit(_: &str) -> Option<Limit> {
        Some(Limit {
            rps: 100.0,
            mode: Mode::SafeShare,
        })
    }

    fn rep(node: u64, acked: u64, demand: f64, holding: Option<f64>) -> Report {
        Report {
            node,
            acked,
            buckets: vec![BucketReport {
                key: "r".into(),
                demand,
                holding,
                using: holding.unwrap_or(100.0 / 3.0),
            }],
        }
    }

    #[test]
    fn max_min_fair_gives_small_demands_in_full_and_splits_the_rest() {
        let f = max_min_fair(&[(1, 240.0), (2, 30.0), (3, 30.0)], 100.0);
        assert_eq!((f[&1], f[&2], f[&3]), (40.0, 30.0, 30.0));
        let f = max_min_fair(&[(1, 10.0), (2, 0.0)], 100.0);
        assert_eq!((f[&1], f[&2]), (55.0, 45.0));
        let f = max_min_fair(&[(1, 500.0), (2, 500.0)], 100.0);
        assert_eq!((f[&1], f[&2]), (50.0, 50.0));
    }

    #[test]
    fn shares_follow_demand_once_every_node_applied_its_grant() {
        let members = BTreeSet::from([1, 2, 3]);
        let mut a = Allocator::new(LEASE, LOSS);
        let mut t = 10 * LEASE;
        let mut held: HashMap<u64, (u64, Option<f64>)> = HashMap::new();
        let demand = |n: u64| if n == 1 { 240.0 } else { 30.0 };
        // The first lease of the term is a warm-up (nobody's share grows).
        for _ in 0..40 {
            for n in 1..=3 {
                let (acked, h) = held.get(&n).copied().unwrap_or((0, None));
                let g = a.report(7, t, &members, rep(n, acked, demand(n), h), limit);
                held.insert(n, (g.seq, Some(g.shares[0].1)));
                t += 80 * MS;
            }
        }
        let s = |n| held[&n].1.unwrap();
        assert!((s(1) - 40.0).abs() < 1e-6, "{}", s(1));
        assert!((s(2) - 30.0).abs() < 1e-6);
        assert!((s(3) - 30.0).abs() < 1e-6);
    }

    #[test]
    fn a_new_leader_grows_no_share_before_it_heard_from_everyone() {
        let members = BTreeSet::from([1, 2, 3]);
        let mut a = Allocator::new(LEASE, LOSS);
        let t = 100 * LEASE;
        // Node 2 holds 10 from the old leader and asks for much more; node 3 (maybe holding
        // 80) is silent.
        let g = a.report(9, t, &members, rep(2, 0, 500.0, Some(10.0)), limit);
        assert_eq!(g.shares[0].1, 10.0);
        // After a lease, node 3's old grant has run out: it gets its safe-share reserve.
        let g = a.report(
            9,
            t + LEASE + MS,
            &members,
            rep(2, g.seq, 500.0, Some(10.0)),
            limit,
        );
        let expected = 100.0 - 100.0 / 3.0 - 100.0 / 3.0;
        assert!((g.shares[0].1 - expected).abs() < 1e-6, "{}", g.shares[0].1);
        // Node 1 reports (little demand); after the node-loss timeout node 3 counts as gone:
        // node 2 gets what node 1 leaves.
        let t2 = t + LOSS + MS;
        let g1 = a.report(9, t2, &members, rep(1, 0, 5.0, None), limit);
        let g = a.report(
            9,
            t2 + MS,
            &members,
            rep(2, g.seq, 500.0, Some(10.0)),
            limit,
        );
        // Node 1 may use the larger share it was just sent (it was alone then).
        assert!(
            (g.shares[0].1 + g1.shares[0].1 - 100.0).abs() < 1e-6,
            "{g:?} {g1:?}"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Node reports with a demand; the reply is delivered or lost.
        Report {
            node: usize,
            demand: f64,
            delivered: bool,
        },
        /// Time passes.
        Wait { ms: u64 },
        /// A new leader (another term).
        NewLeader,
        /// A node joins or leaves the membership.
        Toggle { node: usize },
        /// A node dies for good.
        Die { node: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0usize..4, 0.0f64..400.0, proptest::bool::weighted(0.9))
                .prop_map(|(node, demand, delivered)| Step::Report { node, demand, delivered }),
            3 => (1u64..700).prop_map(|ms| Step::Wait { ms }),
            1 => Just(Step::NewLeader),
            1 => (0usize..4).prop_map(|node| Step::Toggle { node }),
            1 => (0usize..4).prop_map(|node| Step::Die { node }),
        ]
    }

    #[derive(Debug, Clone, Default)]
    struct Node {
        /// When it became a member (it starts with nothing until a first grant, and uses its
        /// partition share if none comes within a lease).
        joined_at: u64,
        dead: bool,
        member: bool,
        acked: u64,
        share: Option<f64>,
        /// Lease end (node clock = leader clock here; the node counts from before sending).
        until: u64,
        /// Last time it reached a leader.
        last_ok: u64,
    }

    /// The rate a node admits: nothing until a first grant (its partition share if none
    /// comes within a lease), its grant while the lease runs, its partition share after.
    fn usage(n: &Node, t: u64, rps: f64, members: f64) -> f64 {
        if n.last_ok == 0 {
            if t < n.joined_at + LEASE {
                0.0
            } else {
                rps / members
            }
        } else if t < n.until {
            n.share.unwrap_or(rps / members)
        } else {
            rps / members
        }
    }

    /// The share a node holds under a running lease (nothing while starting or past it).
    fn held(n: &Node, t: u64) -> f64 {
        if n.last_ok > 0 && t < n.until {
            n.share.unwrap_or(0.0)
        } else {
            0.0
        }
    }

    proptest! {
        /// Whatever the demands, lost replies, leader changes, joins and leaves: the
        /// outstanding shares (grants whose lease still runs on a node) never sum to more than
        /// the limit. (A node past its lease applies its partition mode instead: the issue's
        /// declared overshoot of at most `limit / members` per cut-off node.)
        #[test]
        fn outstanding_shares_never_exceed_the_limit(steps in proptest::collection::vec(step(), 1..250)) {
            let rps = 100.0;
            let mut nodes = vec![Node { member: true, ..Node::default() }; 4];
            nodes[3].member = false;
            let start = 50 * LEASE;
            let mut t = start;
            for n in nodes.iter_mut() { n.joined_at = start; }
            let mut term = 1u64;
            let mut alloc = Allocator::new(LEASE, LOSS);
            for s in steps {
                let members: BTreeSet<u64> = nodes.iter().enumerate()
                    .filter(|(_, n)| n.member).map(|(i, _)| i as u64).collect();
                let members_now = nodes.iter().filter(|n| n.member).count().max(1) as f64;
                match s {
                    Step::Report { node, demand, delivered } => {
                        let n = &nodes[node];
                        if n.dead || !n.member { continue; }
                        let mut r = rep(node as u64, n.acked, demand, Some(held(n, t)));
                        r.buckets[0].using = usage(n, t, rps, members_now);
                        let g = alloc.report(term, t, &members, r, |_| Some(Limit { rps, mode: Mode::SafeShare }));
                        if delivered {
                            let n = &mut nodes[node];
                            n.acked = g.seq;
                            n.share = g.shares.iter().find(|(k, _)| k == "r").map(|(_, v)| *v);
                            n.until = t + LEASE;
                            n.last_ok = t;
                        }
                    }
                    Step::Wait { ms } => t += ms * MS,
                    Step::NewLeader => {
                        term += 1;
                        alloc = Allocator::new(LEASE, LOSS);
                    }
                    Step::Toggle { node } => {
                        let n = &mut nodes[node];
                        n.member = !n.member;
                        n.joined_at = t;
                        if !n.member {
                            // A removed node stops serving.
                            n.dead = true;
                        }
                    }
                    Step::Die { node } => nodes[node].dead = true,
                }
                let members_now = nodes.iter().filter(|n| n.member).count().max(1) as f64;
                // An isolated node past the loss timeout is declared gone by the leader; the
                // property covers nodes the leader still counts (the issue bounds the rest by
                // limit × (1 + 1/N)).
                for n in nodes.iter_mut() {
                    if !n.dead && t >= n.last_ok.max(n.joined_at) + LOSS { n.dead = true; }
                }
                let outstanding: f64 = nodes.iter()
                    .filter(|n| !n.dead && n.member && n.last_ok > 0 && t < n.until)
                    .map(|n| usage(n, t, rps, members_now)).sum();
                prop_assert!(outstanding <= rps + 1e-6, "outstanding shares sum to {outstanding} > {rps}");
            }
        }
    }
}
