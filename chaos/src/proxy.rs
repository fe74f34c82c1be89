//! A fault-injecting TCP proxy between the nodes of a cluster.
//!
//! Every node has a *front*: a listener at the Raft address the node advertises, which
//! forwards to the node's real (bound) Raft address. Each node's outgoing connections leave
//! from its own IP (the one its Raft listener is bound to), so the proxy knows which node a
//! connection comes from by its source IP, and which node it goes to by the front it reached.
//!
//! Each *directed link* `from → to` has a [`Rule`]. A link governs the TCP connections that
//! `from` opens to `to`'s front, and both directions of bytes on them (requests and their
//! answers); the connections `to` opens to `from` belong to the link `to → from`. So
//! `set_link(1, 2, Drop)` alone is a one-way partition: node 1 cannot call node 2, node 2 can
//! still call node 1 and hear its answers.
//!
//! Rules change at runtime through [`Proxy`], a cloneable handle, and act on open
//! connections at once:
//!
//! * [`Rule::Pass`] forwards everything.
//! * [`Rule::Drop`] refuses new connections (accepted, then reset) and cuts the open ones
//!   (both sides reset): the classic partition, which the nodes notice immediately.
//! * [`Rule::Delay`] delivers every chunk, in both directions, no earlier than the delay
//!   after it was read, in order: a request/answer round trip takes at least twice the delay.
//! * [`Rule::Blackhole`] accepts and keeps connections but forwards nothing: bytes are read
//!   and discarded, a new connection is not even passed on. Only a timeout (a gRPC keepalive,
//!   a Raft election timer) detects it. A connection that lost bytes to a blackhole cannot go
//!   on (its stream is corrupt), so it is cut when the blackhole ends; one that stayed idle
//!   through it goes on.
//!
//! Memory is bounded: at most [`QUEUE_CHUNKS`] chunks of [`CHUNK`] bytes wait per direction
//! and connection (a slow or delayed receiver pushes back on the sender through TCP).
//!
//! Connections from an IP that is no node's are refused and counted
//! ([`Proxy::unknown_sources`]): they mean a node does not bind its outgoing connections to its
//! Raft IP, and the proxy could not tell nodes apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most bytes read at once from one side of a connection.
pub const CHUNK: usize = 16 * 1024;
/// Most chunks waiting (delayed, or for a slow receiver) per direction of a connection.
pub const QUEUE_CHUNKS: usize = 32;
/// How long the proxy tries to reach a node's real address for a new connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Node id, as in the cluster configuration.
pub type NodeId = u64;

/// What a directed link does to its connections; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Forward everything.
    #[default]
    Pass,
    /// Refuse new connections, cut open ones.
    Drop,
    /// Deliver each chunk, in both directions, this long after it was read (in order).
    Delay(#[serde(with = "millis")] Duration),
    /// Accept and keep connections, forward nothing (discard every byte).
    Blackhole,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Pass => f.write_str("pass"),
            Rule::Drop => f.write_str("drop"),
            Rule::Delay(d) => write!(f, "delay {d:?}"),
            Rule::Blackhole => f.write_str("blackhole"),
        }
    }
}

/// Serde helper: a [`Duration`] as whole milliseconds.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Deserialize from milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The front of one node: the proxy listens at `listen` (what the node advertises) and
/// forwards to `target` (where the node's Raft listener really is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Front {
    /// The node behind this front.
    pub node: NodeId,
    /// Where the proxy listens (port 0: any free port, see [`Proxy::fronts`]).
    pub listen: SocketAddr,
    /// The node's real address.
    pub target: SocketAddr,
}

/// Counters of one directed link since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Connections accepted and served (not refused).
    pub connections: u64,
    /// Connections refused because the link was [`Rule::Drop`].
    pub refused: u64,
    /// Connections accepted, but the node behind the front could not be reached.
    pub unreachable: u64,
    /// Connections open now.
    pub open: u64,
    /// Bytes delivered from `from` to `to`.
    pub bytes_sent: u64,
    /// Bytes delivered from `to` back to `from`.
    pub bytes_received: u64,
    /// Bytes discarded by a blackhole (both directions).
    pub discarded: u64,
    /// Open connections the proxy cut (a drop, the end of a blackhole that lost bytes, the
    /// proxy's end).
    pub cut: u64,
}

/// One link's rule and counters, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// Connecting node.
    pub from: NodeId,
    /// Node behind the front.
    pub to: NodeId,
    /// Current rule.
    pub rule: Rule,
    /// Counters so far.
    pub stats: LinkStats,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    unreachable: AtomicU64,
    open: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    discarded: AtomicU64,
    cut: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LinkStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            connections: get(&self.connections),
            refused: get(&self.refused),
            unreachable: get(&self.unreachable),
            open: get(&self.open),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            discarded: get(&self.discarded),
            cut: get(&self.cut),
        }
    }
}

fn bump(a: &AtomicU64, n: usize) {
    a.fetch_add(n as u64, Ordering::Relaxed);
}

/// A directed link: its rule (watched by its open connections) and counters.
struct Link {
    rule: watch::Sender<Rule>,
    stats: Counters,
}

/// What the handles share with the tasks.
struct Shared {
    links: BTreeMap<(NodeId, NodeId), Arc<Link>>,
    sources: HashMap<IpAddr, NodeId>,
    fronts: Vec<Front>,
    unknown: Mutex<BTreeMap<IpAddr, u64>>,
}

/// Stops the proxy when the last handle is dropped.
struct Guard {
    /// Dropping it tells every connection task to cut its connection.
    _shutdown: watch::Sender<()>,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

/// A running proxy; cloning gives another handle to the same proxy. It stops (listeners
/// closed, every connection cut) when the last handle is dropped.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("fronts", &self.shared.fronts)
            .field("sources", &self.shared.sources)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Listen at every front and start forwarding; `sources` maps each node's source IP to
    /// its id. Every link between the nodes named in `fronts` and `sources` starts as
    /// [`Rule::Pass`]. Must run inside a Tokio runtime.
    pub async fn start(
        fronts: &[Front],
        sources: impl IntoIterator<Item = (IpAddr, NodeId)>,
    ) -> Result<Proxy> {
        let sources: HashMap<IpAddr, NodeId> = sources.into_iter().collect();
        let mut ids: BTreeSet<NodeId> = sources.values().copied().collect();
        ids.extend(fronts.iter().map(|f| f.node));
        let mut links = BTreeMap::new();
        for &from in &ids {
            for f in fronts {
                let link = Link {
                    rule: watch::Sender::new(Rule::Pass),
                    stats: Counters::default(),
                };
                links.insert((from, f.node), Arc::new(link));
            }
        }
        let mut listeners = Vec::with_capacity(fronts.len());
        let mut bound = Vec::with_capacity(fronts.len());
        for f in fronts {
            let l = TcpListener::bind(f.listen).await.with_context(|| {
                format!("proxy: listen at {} (front of node {})", f.listen, f.node)
            })?;
            let listen = l.local_addr().context("proxy: read a bound address")?;
            bound.push(Front { listen, ..*f });
            listeners.push((l, *f));
        }
        let shared = Arc::new(Shared {
            links,
            sources,
            fronts: bound,
            unknown: Mutex::new(BTreeMap::new()),
        });
        let (shutdown, stop) = watch::channel(());
        let tasks = listeners
            .into_iter()
            .map(|(l, f)| tokio::spawn(accept_loop(l, f, shared.clone(), stop.clone())))
            .collect();
        Ok(Proxy {
            shared,
            _guard: Arc::new(Guard {
                _shutdown: shutdown,
                listeners: tasks,
            }),
        })
    }

    /// The fronts, with the addresses actually listened at.
    pub fn fronts(&self) -> &[Front] {
        &self.shared.fronts
    }

    /// Where node `node`'s front listens.
    pub fn front(&self, node: NodeId) -> Option<SocketAddr> {
        self.shared
            .fronts
            .iter()
            .find(|f| f.node == node)
            .map(|f| f.listen)
    }

    /// Every node the proxy knows (as a source or behind a front).
    pub fn nodes(&self) -> Vec<NodeId> {
        let ids: BTreeSet<NodeId> = self.shared.links.keys().map(|&(f, _)| f).collect();
        ids.into_iter().collect()
    }

    fn link(&self, from: NodeId, to: NodeId) -> Result<&Arc<Link>> {
        self.shared
            .links
            .get(&(from, to))
            .ok_or_else(|| anyhow!("proxy: no link {from} → {to}"))
    }

    /// Set the rule of the link `from → to`; it acts on the open connections at once.
    pub fn set_link(&self, from: NodeId, to: NodeId, rule: Rule) -> Result<()> {
        self.link(from, to)?.rule.send_replace(rule);
        Ok(())
    }

    /// The rule of the link `from → to`.
    pub fn rule(&self, from: NodeId, to: NodeId) -> Option<Rule> {
        self.shared.links.get(&(from, to)).map(|l| *l.rule.borrow())
    }

    /// Set `rule` on every link from and to `node` (not its link to itself).
    pub fn set_node(&self, node: NodeId, rule: Rule) -> Result<()> {
        let mut any = false;
        for (&(from, to), link) in &self.shared.links {
            if (from == node) != (to == node) {
                link.rule.send_replace(rule);
                any = true;
            }
        }
        if any {
            Ok(())
        } else {
            Err(anyhow!("proxy: no node {node}"))
        }
    }

    /// Cut `node` off from every other node (both directions, [`Rule::Drop`]).
    pub fn isolate(&self, node: NodeId) -> Result<()> {
        self.set_node(node, Rule::Drop)
    }

    /// Silently cut `node` off from every other node ([`Rule::Blackhole`], both directions).
    pub fn blackhole(&self, node: NodeId) -> Result<()> {
        self.set_node(node, Rule::Blackhole)
    }

    /// Set `rule` on every link between a node of `a` and a node of `b`, both directions;
    /// links inside a group are unchanged.
    pub fn split_with(&self, a: &[NodeId], b: &[NodeId], rule: Rule) -> Result<()> {
        for &x in a {
            for &y in b {
                if x != y {
                    self.set_link(x, y, rule)?;
                    self.set_link(y, x, rule)?;
                }
            }
        }
        Ok(())
    }

    /// Partition `a` from `b` ([`Rule::Drop`] between the groups, both directions).
    pub fn split(&self, a: &[NodeId], b: &[NodeId]) -> Result<()> {
        self.split_with(a, b, Rule::Drop)
    }

    /// Every link back to [`Rule::Pass`].
    pub fn heal(&self) {
        for link in self.shared.links.values() {
            link.rule.send_replace(Rule::Pass);
        }
    }

    /// Counters of the link `from → to`.
    pub fn stats(&self, from: NodeId, to: NodeId) -> Option<LinkStats> {
        self.shared
            .links
            .get(&(from, to))
            .map(|l| l.stats.snapshot())
    }

    /// Rule and counters of every link.
    pub fn report(&self) -> Vec<LinkReport> {
        self.shared
            .links
            .iter()
            .map(|(&(from, to), l)| LinkReport {
                from,
                to,
                rule: *l.rule.borrow(),
                stats: l.stats.snapshot(),
            })
            .collect()
    }

    /// Source IPs of refused connections that came from no known node, with their counts.
    pub fn unknown_sources(&self) -> Vec<(IpAddr, u64)> {
        self.shared
            .unknown
            .lock()
            .map(|m| m.iter().map(|(ip, n)| (*ip, *n)).collect())
            .unwrap_or_default()
    }
}

/// Accept connections at one front, forever (aborted when the proxy stops).
async fn accept_loop(
    listener: TcpListener,
    front: Front,
    shared: Arc<Shared>,
    stop: watch::Receiver<()>,
) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Out of file descriptors or a connection reset before it was accepted:
                // back off a little and go on.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let link = shared
            .sources
            .get(&peer.ip())
            .and_then(|from| shared.links.get(&(*from, front.node)));
        match link {
            Some(link) => {
                tokio::spawn(serve(link.clone(), sock, front.target, stop.clone()));
            }
            None => {
                if let Ok(mut m) = shared.unknown.lock() {
                    *m.entry(peer.ip()).or_default() += 1;
                }
                reset(&sock);
            }
        }
    }
}

/// Close `sock` with a reset rather than an orderly FIN when it is dropped.
fn reset(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

/// Why a connection ended.
#[derive(Debug)]
enum Stop {
    /// The proxy cut it.
    Cut,
    /// A side failed (reset, broken pipe).
    Io,
}

/// Keeps a link's `open` gauge while a connection is served.
struct OpenGauge<'a>(&'a AtomicU64);

impl<'a> OpenGauge<'a> {
    fn new(a: &'a AtomicU64) -> Self {
        a.fetch_add(1, Ordering::Relaxed);
        OpenGauge(a)
    }
}

impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one accepted connection on `link` until it ends or is cut.
async fn serve(
    link: Arc<Link>,
    mut inbound: TcpStream,
    target: SocketAddr,
    mut stop: watch::Receiver<()>,
) {
    let mut rules = link.rule.subscribe();
    let rule = *rules.borrow_and_update();
    let stats = &link.stats;
    if rule == Rule::Drop {
        bump(&stats.refused, 1);
        reset(&inbound);
        return;
    }
    bump(&stats.connections, 1);
    let _open = OpenGauge::new(&stats.open);
    let _ = inbound.set_nodelay(true);
    let ended = if rule == Rule::Blackhole {
        sink(stats, &mut inbound, &mut rules, &mut stop).await
    } else {
        let outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
        let Ok(Ok(mut outbound)) = outbound else {
            bump(&stats.unreachable, 1);
            reset(&inbound);
            return;
        };
        let _ = outbound.set_nodelay(true);
        let ended = relay(stats, &mut inbound, &mut outbound, &mut rules, &mut stop).await;
        if ended.is_err() {
            reset(&outbound);
        }
        ended
    };
    match ended {
        Ok(()) => {}
        Err(Stop::Cut) => {
            bump(&stats.cut, 1);
            reset(&inbound);
        }
        Err(Stop::Io) => reset(&inbound),
    }
}

/// A connection accepted while its link was a blackhole: read and discard until the link
/// changes (then cut: the sender lost bytes, or at least its connection never reached the
/// node) or the proxy stops. Its end of stream is not passed on either.
async fn sink(
    stats: &Counters,
    inbound: &mut TcpStream,
    rules: &mut watch::Receiver<Rule>,
    stop: &mut watch::Receiver<()>,
) -> Result<(), Stop> {
    let discard = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match inbound.read(&mut buf).await {
                Ok(0) => std::future::pending::<()>().await,
                Ok(n) => bump(&stats.discarded, n),
                Err(_) => return Err(Stop::Io),
            }
        }
    };
    let changed = async {
        loop {
            if rules.changed().await.is_err() {
                return;
            }
            if *rules.borrow_and_update() != Rule::Blackhole {
                return;
            }
        }
    };
    tokio::select! {
        r = discard => r,
        () = changed => Err(Stop::Cut),
        _ = stop.changed() => Err(Stop::Cut),
    }
}

/// Forward between `inbound` (from the connecting node) and `outbound` (to the node behind
/// the front) under the link's rule, until both directions end, a side fails, or the proxy
/// cuts the connection.
async fn relay(
    stats: &Counters,
    inbound: &mut TcpStream,
    outbound: &mut TcpStream,
    rules: &mut watch::Receiver<Rule>,
    stop: &mut watch::Receiver<()>,
) -> Result<(), Stop> {
    // Set once a byte of this connection was discarded: its streams are then corrupt, and it
    // must not carry anything anymore.
    let tainted = AtomicBool::new(false);
    let (mut ir, mut iw) = inbound.split();
    let (mut or, mut ow) = outbound.split();
    let up = pipe(
        &mut ir,
        &mut ow,
        rules.clone(),
        &tainted,
        &stats.bytes_sent,
        stats,
    );
    let down = pipe(
        &mut or,
        &mut iw,
        rules.clone(),
        &tainted,
        &stats.bytes_received,
        stats,
    );
    let watch = async {
        loop {
            if rules.changed().await.is_err() {
                return;
            }
            match *rules.borrow_and_update() {
                Rule::Drop => return,
                Rule::Blackhole => {}
                Rule::Pass | Rule::Delay(_) if tainted.load(Ordering::SeqCst) => return,
                Rule::Pass | Rule::Delay(_) => {}
            }
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        () = watch => Err(Stop::Cut),
        _ = stop.changed() => Err(Stop::Cut),
    }
}

/// One direction of a connection: a reader that stamps each chunk with its due time under
/// the current rule, a bounded queue, and a writer that delivers chunks when due.
async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    rules: watch::Receiver<Rule>,
    tainted: &AtomicBool,
    delivered: &AtomicU64,
    stats: &Counters,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let read_rules = rules.clone();
    let read = async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = reader.read(&mut buf).await.map_err(|_| Stop::Io)?;
            let rule = *read_rules.borrow();
            if n == 0 {
                if rule == Rule::Blackhole {
                    // A blackhole does not pass the end of stream on either; the link's
                    // watcher cuts the connection when it ends.
                    tainted.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                drop(tx);
                return Ok(());
            }
            buf.truncate(n);
            let due = match rule {
                Rule::Drop => return Err(Stop::Cut),
                Rule::Blackhole => {
                    tainted.store(true, Ordering::SeqCst);
                    bump(&stats.discarded, n);
                    continue;
                }
                Rule::Pass => Instant::now(),
                Rule::Delay(d) => Instant::now() + d,
            };
            // Bytes were lost before: the link's blackhole ended while this chunk was read.
            if tainted.load(Ordering::SeqCst) {
                return Err(Stop::Cut);
            }
            if tx.send((due, buf)).await.is_err() {
                // The writer failed; it reports why.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match *rules.borrow() {
                Rule::Drop => return Err(Stop::Cut),
                Rule::Blackhole => {
                    tainted.store(true, Ordering::SeqCst);
                    bump(&stats.discarded, buf.len());
                    continue;
                }
                Rule::Pass | Rule::Delay(_) => {}
            }
            writer.write_all(&buf).await.map_err(|_| Stop::Io)?;
            bump(delivered, buf.len());
        }
        // End of stream: pass the half-close on.
        writer.shutdown().await.map_err(|_| Stop::Io)
    };
    tokio::try_join!(read, write).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;

    const LIMIT: Duration = Duration::from_secs(5);

    /// An echo server on `ip`; returns its address.
    async fn echo_server(ip: &str) -> SocketAddr {
        let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A proxy with one front per `(node, listen ip, echo server ip)` and sources
    /// `127.0.1.<node>` (distinct per test through `net`: `127.<net>.…`).
    async fn proxy(net: u8, nodes: &[NodeId]) -> Proxy {
        let mut fronts = Vec::new();
        let mut sources = Vec::new();
        for &n in nodes {
            let target = echo_server(&format!("127.{net}.3.{n}")).await;
            let listen: SocketAddr = format!("127.{net}.2.{n}:0").parse().unwrap();
            fronts.push(Front {
                node: n,
                listen,
                target,
            });
            sources.push((format!("127.{net}.1.{n}").parse().unwrap(), n));
        }
        Proxy::start(&fronts, sources).await.unwrap()
    }

    /// Connect from node `from`'s source IP to node `to`'s front.
    async fn connect(p: &Proxy, net: u8, from: NodeId, to: NodeId) -> std::io::Result<TcpStream> {
        let s = TcpSocket::new_v4()?;
        let ip: IpAddr = format!("127.{net}.1.{from}").parse().unwrap();
        s.bind(SocketAddr::new(ip, 0))?;
        s.connect(p.front(to).unwrap()).await
    }

    /// Send `msg` and read the echo, within `limit`.
    async fn roundtrip(s: &mut TcpStream, msg: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
        let io = async {
            s.write_all(msg).await?;
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await?;
            Ok(got)
        };
        tokio::time::timeout(limit, io)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    /// Whether the peer closed or reset `s` (read gives EOF or an error) within `limit`.
    async fn closed(s: &mut TcpStream, limit: Duration) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Whether a new connection from `from` to `to` can carry a round trip.
    async fn works(p: &Proxy, net: u8, from: NodeId, to: NodeId) -> bool {
        match connect(p, net, from, to).await {
            Ok(mut s) => roundtrip(&mut s, b"ping", Duration::from_secs(1))
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !f().await {
            assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn passes_bytes_both_ways_and_counts_them() {
        let p = proxy(11, &[1, 2]).await;
        let mut s = connect(&p, 11, 1, 2).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(roundtrip(&mut s, &big, LIMIT).await.unwrap(), big);
        let st = p.stats(1, 2).unwrap();
        assert_eq!(st.connections, 1);
        assert_eq!(st.open, 1);
        assert_eq!(st.bytes_sent, big.len() as u64);
        assert_eq!(st.bytes_received, big.len() as u64);
        assert_eq!(p.stats(2, 1).unwrap().connections, 0);
        // A half-close is passed on: the echo server closes, the client reads EOF.
        s.shutdown().await.unwrap();
        assert!(closed(&mut s, LIMIT).await);
        until("the connection is gone", async || {
            p.stats(1, 2).unwrap().open == 0
        })
        .await;
        assert_eq!(p.stats(1, 2).unwrap().cut, 0);
    }

    #[tokio::test]
    async fn drop_cuts_open_connections_refuses_new_ones_and_heal_restores() {
        let p = proxy(12, &[1, 2]).await;
        let mut s = connect(&p, 12, 1, 2).await.unwrap();
        roundtrip(&mut s, b"before", LIMIT).await.unwrap();
        let mut other = connect(&p, 12, 2, 1).await.unwrap();

        p.set_link(1, 2, Rule::Drop).unwrap();
        assert!(closed(&mut s, LIMIT).await, "an open connection is cut");
        assert_eq!(p.stats(1, 2).unwrap().cut, 1);
        assert!(!works(&p, 12, 1, 2).await, "a new connection is refused");
        assert!(p.stats(1, 2).unwrap().refused >= 1);
        // The other direction is another link.
        roundtrip(&mut other, b"still", LIMIT).await.unwrap();
        assert!(works(&p, 12, 2, 1).await);

        p.heal();
        assert!(works(&p, 12, 1, 2).await, "heal restores the link");
        assert_eq!(p.rule(1, 2), Some(Rule::Pass));
    }

    #[tokio::test]
    async fn isolate_and_split_set_both_directions() {
        let p = proxy(13, &[1, 2, 3]).await;
        p.isolate(1).unwrap();
        for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
            assert_eq!(p.rule(a, b), Some(Rule::Drop), "{a} → {b}");
        }
        assert_eq!(p.rule(2, 3), Some(Rule::Pass));
        assert_eq!(p.rule(1, 1), Some(Rule::Pass));
        assert!(works(&p, 13, 2, 3).await);
        assert!(!works(&p, 13, 3, 1).await);
        p.heal();
        p.split(&[1], &[2, 3]).unwrap();
        assert_eq!(p.rule(3, 1), Some(Rule::Drop));
        assert_eq!(p.rule(2, 3), Some(Rule::Pass));
        assert!(p.isolate(9).is_err());
        assert!(p.set_link(1, 9, Rule::Drop).is_err());
    }

    #[tokio::test]
    async fn delay_adds_at_least_the_delay_each_way_in_order() {
        let p = proxy(14, &[1, 2]).await;
        let mut s = connect(&p, 14, 1, 2).await.unwrap();
        roundtrip(&mut s, b"warm", LIMIT).await.unwrap();
        let d = Duration::from_millis(150);
        p.set_link(1, 2, Rule::Delay(d)).unwrap();
        let t = Instant::now();
        let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&mut s, &msg, LIMIT).await.unwrap(), msg);
        let took = t.elapsed();
        assert!(
            took >= 2 * d,
            "a round trip took {took:?}, less than 2 × {d:?}"
        );
        // A new connection is delayed too; another link is not.
        let mut s2 = connect(&p, 14, 1, 2).await.unwrap();
        let t = Instant::now();
        roundtrip(&mut s2, b"x", LIMIT).await.unwrap();
        assert!(t.elapsed() >= 2 * d);
        let mut s3 = connect(&p, 14, 2, 1).await.unwrap();
        let t = Instant::now();
        roundtrip(&mut s3, b"x", LIMIT).await.unwrap();
        assert!(t.elapsed() < d, "{:?}", t.elapsed());
        p.heal();
        let t = Instant::now();
        roundtrip(&mut s, b"fast", LIMIT).await.unwrap();
        assert!(t.elapsed() < d, "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn blackhole_keeps_connections_silent_and_cuts_them_at_heal() {
        let p = proxy(15, &[1, 2]).await;
        let mut idle = connect(&p, 15, 1, 2).await.unwrap();
        let mut busy = connect(&p, 15, 1, 2).await.unwrap();
        roundtrip(&mut idle, b"a", LIMIT).await.unwrap();
        roundtrip(&mut busy, b"a", LIMIT).await.unwrap();
        p.blackhole(2).unwrap();
        // Nothing comes back, nothing is closed: only a timeout tells.
        let r = roundtrip(&mut busy, b"lost", Duration::from_millis(300)).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        let mut new = connect(&p, 15, 1, 2)
            .await
            .expect("accepted while blackholed");
        let r = roundtrip(&mut new, b"lost", Duration::from_millis(300)).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        let st = p.stats(1, 2).unwrap();
        assert_eq!(st.discarded, 8);
        assert_eq!(st.open, 3);
        p.heal();
        // The connections that lost bytes are cut; the idle one goes on.
        assert!(closed(&mut busy, LIMIT).await);
        assert!(closed(&mut new, LIMIT).await);
        roundtrip(&mut idle, b"after", LIMIT).await.unwrap();
        assert!(works(&p, 15, 1, 2).await);
        assert_eq!(p.stats(1, 2).unwrap().cut, 2);
    }

    #[tokio::test]
    async fn the_source_ip_tells_the_nodes_apart() {
        let p = proxy(16, &[1, 2, 3]).await;
        p.set_link(1, 3, Rule::Drop).unwrap();
        assert!(!works(&p, 16, 1, 3).await, "from 127.16.1.1");
        assert!(works(&p, 16, 2, 3).await, "from 127.16.1.2");
        assert_eq!(p.stats(1, 3).unwrap().refused, 1);
        assert_eq!(p.stats(2, 3).unwrap().connections, 1);
        // An unknown source is refused and reported.
        let s = TcpSocket::new_v4().unwrap();
        s.bind("127.16.1.9:0".parse().unwrap()).unwrap();
        let mut s = s.connect(p.front(3).unwrap()).await.unwrap();
        assert!(closed(&mut s, LIMIT).await);
        let unknown = p.unknown_sources();
        assert_eq!(unknown, vec![("127.16.1.9".parse().unwrap(), 1)]);
    }

    #[tokio::test]
    async fn an_unreachable_node_resets_the_connection() {
        let l = TcpListener::bind("127.17.3.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        drop(l);
        let fronts = [Front {
            node: 1,
            listen: "127.17.2.1:0".parse().unwrap(),
            target,
        }];
        let p = Proxy::start(&fronts, [("127.17.1.2".parse().unwrap(), 2)])
            .await
            .unwrap();
        let mut s = connect(&p, 17, 2, 1).await.unwrap();
        assert!(closed(&mut s, LIMIT).await);
        assert_eq!(p.stats(2, 1).unwrap().unreachable, 1);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_cuts_everything() {
        let p = proxy(18, &[1, 2]).await;
        let front = p.front(2).unwrap();
        let mut s = connect(&p, 18, 1, 2).await.unwrap();
        roundtrip(&mut s, b"x", LIMIT).await.unwrap();
        let q = p.clone();
        drop(p);
        roundtrip(&mut s, b"y", LIMIT).await.unwrap();
        drop(q);
        assert!(closed(&mut s, LIMIT).await);
        until("the front stops listening", async || {
            TcpStream::connect(front).await.is_err()
        })
        .await;
    }

    #[test]
    fn rules_serialize_with_milliseconds() {
        let r = Rule::Delay(Duration::from_millis(250));
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"delay":250}"#);
        assert_eq!(serde_json::from_str::<Rule>(&j).unwrap(), r);
        assert_eq!(serde_json::to_string(&Rule::Drop).unwrap(), r#""drop""#);
    }
}
