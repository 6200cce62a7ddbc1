//! The libp2p mesh: QUIC first, TCP + Noise + Yamux as fallback; identify and ping; mDNS
//! discovery (mdns-sd) on chosen interfaces; static peers; and the federation stream protocol,
//! which carries the Matrix server-server API as HTTP/1.1, one request per stream.
//!
//! The node's libp2p key is its Matrix key: the peer id and the server name name the same key,
//! so the peer at the other end of a connection *is* a server name, without any lookup.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Body, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use libp2p::{
    identify, identity, multiaddr::Protocol, noise, ping, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp, yamux,
    Multiaddr, PeerId, StreamProtocol, Swarm,
};
use ruma::{OwnedServerName, ServerName};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tower::ServiceExt;

use crate::{
    api::ruma_wrapper::AuthenticatedPeer,
    core::{
        federation::{BoxFuture, Transport, TransportError},
        Core,
    },
    identity::{hex, public_key_of_server_name},
};

/// The federation stream protocol.
pub const FEDERATION_PROTOCOL: StreamProtocol = StreamProtocol::new("/outpost/federation/1");
/// The DNS-SD service type nodes advertise.
pub const MDNS_SERVICE: &str = "_outpost._udp.local.";
/// Longest a federation request may take (send_join answers can be large).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest federation response accepted.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Inbound federation requests served at once.
const MAX_INBOUND_STREAMS: usize = 64;
/// Most peers remembered (disconnected ones are forgotten first).
const MAX_PEERS: usize = 1024;
/// Bound of the command queue into the swarm task.
const COMMAND_QUEUE: usize = 256;

/// Mesh settings (from the node config).
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Static peers to dial (with or without `/p2p/<peer id>`).
    pub peers: Vec<Multiaddr>,
    /// Advertise and browse with mDNS.
    pub mdns: bool,
    /// Interfaces for mDNS; empty means every non-loopback interface.
    pub mdns_interfaces: Vec<String>,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Building the swarm failed.
    #[error("mesh: {0}")]
    Build(String),
    /// A listen address could not be used.
    #[error("mesh: cannot listen on {0}: {1}")]
    Listen(Multiaddr, String),
    /// mDNS could not start.
    #[error("mDNS: {0}")]
    Mdns(String),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// The live peer table.
pub type PeerTable = Arc<Mutex<BTreeMap<PeerId, PeerInfo>>>;

/// What the node knows about one peer (for `outpost peers` and `/_outpost/v1/peers`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerInfo {
    /// libp2p peer id.
    pub peer_id: String,
    /// Matrix server name.
    pub server_name: String,
    /// Known addresses.
    pub addresses: BTreeSet<String>,
    /// Connected now.
    pub connected: bool,
    /// Last ping round trip.
    pub rtt_ms: Option<f64>,
    /// How we learned of it: `static`, `mdns`, `inbound`, `identify`.
    pub source: String,
    /// Last time it was seen connected (ms since the epoch).
    pub last_seen_ms: u64,
    /// When it was first discovered (ms).
    #[serde(skip)]
    pub discovered_ms: u64,
    /// Re-dial backoff while disconnected (ms).
    #[serde(skip)]
    dial_backoff_ms: u64,
    /// Not re-dialled before this time (ms).
    #[serde(skip)]
    next_dial_ms: u64,
}

enum Command {
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
    Discovered(PeerId, Vec<Multiaddr>, &'static str),
}

/// A running mesh.
pub struct Mesh {
    local_peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    peers: Arc<Mutex<BTreeMap<PeerId, PeerInfo>>>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    mdns: Option<mdns_sd::ServiceDaemon>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The peer id of a self-certifying server name.
pub fn peer_id_of_server(name: &ServerName) -> Option<PeerId> {
    let key = public_key_of_server_name(name.as_str())?;
    let pk = identity::ed25519::PublicKey::try_from_bytes(&key).ok()?;
    Some(identity::PublicKey::from(pk).to_peer_id())
}

/// The server name of an ed25519 peer id.
pub fn server_of_peer_id(peer: &PeerId) -> Option<OwnedServerName> {
    let bytes = peer.to_bytes();
    // identity multihash (0x00, len 36) of the protobuf key (type ed25519 = 1, 32 bytes).
    if bytes.len() == 38 && bytes[..6] == [0x00, 36, 0x08, 0x01, 0x12, 0x20] {
        OwnedServerName::try_from(hex(&bytes[6..])).ok()
    } else {
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mesh {
    /// Start the mesh for `core`, serving `federation` to peers.
    pub async fn start(core: Arc<Core>, federation: Router, config: MeshConfig) -> Result<Mesh, MeshError> {
        let boot: u64 = rand::random();
        let key = identity::Keypair::ed25519_from_bytes(core.identity().seed())
            .map_err(|e| MeshError::Build(e.to_string()))?;
        let local_peer_id = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| MeshError::Build(e.to_string()))?
            .with_quic()
            .with_behaviour(|k| Behaviour {
                // The agent version carries a per-start nonce, so a restarted peer can be told
                // apart from a second connection of the same run (see the Identify event).
                identify: identify::Behaviour::new(
                    identify::Config::new("/outpost/1".into(), k.public())
                        .with_agent_version(format!("outpost/{} boot/{boot}", env!("CARGO_PKG_VERSION"))),
                ),
                // A ping every 15 s keeps NAT/firewall state and measures the round trip; idle
                // cost is a few bytes.
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
                stream: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| MeshError::Build(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| MeshError::Listen(addr.clone(), e.to_string()))?;
        }
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control.accept(FEDERATION_PROTOCOL).map_err(|e| MeshError::Build(e.to_string()))?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let peers: Arc<Mutex<BTreeMap<PeerId, PeerInfo>>> = Arc::default();
        let listen_addrs: Arc<Mutex<Vec<Multiaddr>>> = Arc::default();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(serve_incoming(incoming, federation)));
        // Static peers.
        for addr in &config.peers {
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            });
            match peer {
                Some(p) => {
                    let mut bare = addr.clone();
                    bare.pop();
                    lock(&peers).entry(p).or_insert_with(|| new_info(&p, "static")).addresses.insert(bare.to_string());
                    swarm.add_peer_address(p, bare);
                }
                None => {
                    if let Err(e) = swarm.dial(addr.clone()) {
                        tracing::warn!(%addr, error = %e, "cannot dial static peer");
                    }
                }
            }
        }
        let statics: Vec<PeerId> = lock(&peers).keys().copied().collect();
        for p in &statics {
            let _ = dial_known(&mut swarm, &peers, *p);
        }
        let mdns = if config.mdns { Some(start_mdns(&config, local_peer_id, tx.clone())?) } else { None };
        tasks.push(tokio::spawn(run_swarm(
            swarm,
            rx,
            core,
            peers.clone(),
            listen_addrs.clone(),
            mdns.clone(),
            local_peer_id,
        )));
        Ok(Mesh { local_peer_id, control, commands: tx, peers, listen_addrs, mdns, tasks })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Addresses the swarm listens on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.listen_addrs).clone()
    }

    /// Known peers.
    pub fn peers(&self) -> Vec<PeerInfo> {
        lock(&self.peers).values().cloned().collect()
    }

    /// A handle on the live peer table (for the status API).
    pub fn peer_table(&self) -> PeerTable {
        self.peers.clone()
    }

    /// The federation transport over this mesh.
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(MeshTransport { control: self.control.clone(), commands: self.commands.clone() })
    }

    /// Stop: unregister from mDNS and end the swarm tasks.
    pub fn stop(self) {
        if let Some(d) = &self.mdns {
            let _ = d.shutdown();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

fn new_info(p: &PeerId, source: &str) -> PeerInfo {
    PeerInfo {
        peer_id: p.to_string(),
        server_name: server_of_peer_id(p).map(|s| s.to_string()).unwrap_or_default(),
        source: source.to_owned(),
        discovered_ms: now_ms(),
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
async fn run_swarm(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    core: Arc<Core>,
    peers: Arc<Mutex<BTreeMap<PeerId, PeerInfo>>>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    mdns: Option<mdns_sd::ServiceDaemon>,
    me: PeerId,
) {
    let mut waiting: BTreeMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>> = BTreeMap::new();
    let mut conns: BTreeMap<PeerId, BTreeMap<libp2p::swarm::ConnectionId, Option<String>>> = BTreeMap::new();
    // Re-dial known peers that dropped, at most every 10 s (an idle mesh stays quiet).
    let mut redial = tokio::time::interval(Duration::from_secs(10));
    redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Connect(peer, reply)) => {
                    if swarm.is_connected(&peer) {
                        let _ = reply.send(Ok(()));
                    } else {
                        let first = !waiting.contains_key(&peer);
                        waiting.entry(peer).or_default().push(reply);
                        if first {
                            if let Err(e) = dial_known(&mut swarm, &peers, peer) {
                                for r in waiting.remove(&peer).unwrap_or_default() {
                                    let _ = r.send(Err(e.to_string()));
                                }
                            }
                        }
                    }
                }
                Some(Command::Discovered(peer, addrs, source)) => {
                    if peer == me {
                        continue;
                    }
                    let is_new = {
                        let mut ps = lock(&peers);
                        let e = ps.entry(peer).or_insert_with(|| new_info(&peer, source));
                        let before = e.addresses.len();
                        for a in &addrs {
                            e.addresses.insert(a.to_string());
                        }
                        // Rediscovery: dial again now, whatever the backoff said.
                        e.dial_backoff_ms = 0;
                        e.next_dial_ms = 0;
                        e.addresses.len() != before || !e.connected
                    };
                    for a in addrs {
                        swarm.add_peer_address(peer, a);
                    }
                    // A (re)discovered peer gets its queue flushed without waiting for backoff.
                    if let Some(server) = server_of_peer_id(&peer) {
                        core.peer_up(&server);
                    }
                    if is_new && !swarm.is_connected(&peer) {
                        tracing::info!(%peer, source, "peer discovered");
                        if let Err(e) = dial_known(&mut swarm, &peers, peer) {
                            tracing::debug!(%peer, error = %e, "cannot dial discovered peer");
                        }
                    }
                }
            },
            _ = redial.tick() => {
                // Disconnected peers are re-dialled with a per-peer backoff (10 s doubling to
                // 10 min); peers gone for a day are forgotten, and the table is bounded.
                let now = now_ms();
                let mut due = Vec::new();
                {
                    let mut ps = lock(&peers);
                    ps.retain(|_, i| i.connected || i.source == "static" || now.saturating_sub(i.last_seen_ms.max(i.discovered_ms)) < 24 * 3600 * 1000);
                    while ps.len() > MAX_PEERS {
                        let oldest = ps.iter().filter(|(_, i)| !i.connected).min_by_key(|(_, i)| i.last_seen_ms).map(|(p, _)| *p);
                        match oldest {
                            Some(p) => ps.remove(&p),
                            None => break,
                        };
                    }
                    for (p, i) in ps.iter_mut().filter(|(_, i)| !i.connected && i.next_dial_ms <= now) {
                        i.dial_backoff_ms = (i.dial_backoff_ms * 2).clamp(10_000, 600_000);
                        i.next_dial_ms = now + i.dial_backoff_ms;
                        due.push(*p);
                    }
                }
                for p in due {
                    let _ = dial_known(&mut swarm, &peers, p);
                }
            }
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "mesh listening");
                    lock(&listen_addrs).push(address);
                    if let Some(d) = &mdns {
                        advertise(d, me, &lock(&listen_addrs));
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    conns.entry(peer_id).or_default().insert(connection_id, None);
                    let server = server_of_peer_id(&peer_id);
                    {
                        let mut ps = lock(&peers);
                        let source = if endpoint.is_dialer() { "static" } else { "inbound" };
                        let e = ps.entry(peer_id).or_insert_with(|| new_info(&peer_id, source));
                        e.connected = true;
                        e.last_seen_ms = now_ms();
                        e.dial_backoff_ms = 0;
                        e.next_dial_ms = 0;
                        if endpoint.is_dialer() {
                            e.addresses.insert(endpoint.get_remote_address().to_string());
                        }
                    }
                    for r in waiting.remove(&peer_id).unwrap_or_default() {
                        let _ = r.send(Ok(()));
                    }
                    tracing::info!(
                        peer = %peer_id, server = ?server, address = %endpoint.get_remote_address(),
                        connections = num_established.get(), "peer connected"
                    );
                    // The queue is flushed once identify has run on this connection (below), after
                    // any connection of the peer's previous run is closed.
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    if let Some(cs) = conns.get_mut(&peer_id) {
                        cs.remove(&connection_id);
                        if cs.is_empty() {
                            conns.remove(&peer_id);
                        }
                    }
                    if num_established > 0 {
                        continue;
                    }
                    if let Some(e) = lock(&peers).get_mut(&peer_id) {
                        e.connected = false;
                        e.last_seen_ms = now_ms();
                    }
                    tracing::info!(peer = %peer_id, cause = ?cause, "peer disconnected");
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(p), error, .. } => {
                    if !swarm.is_connected(&p) {
                        for r in waiting.remove(&p).unwrap_or_default() {
                            let _ = r.send(Err(error.to_string()));
                        }
                    }
                    tracing::debug!(peer = %p, error = %error, "dial failed");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, connection_id, info })) => {
                    // A peer that restarted reconnects while its old connection still looks
                    // alive here; that corpse would swallow streams until it times out. The
                    // boot nonce in the agent version tells them apart: close connections of an
                    // earlier run of the peer.
                    let boot = info.agent_version.rsplit_once("boot/").map(|(_, b)| b.to_owned());
                    if let Some(cs) = conns.get_mut(&peer_id) {
                        cs.insert(connection_id, boot.clone());
                        let stale: Vec<_> =
                            cs.iter().filter(|(c, b)| **c != connection_id && b.is_some() && **b != boot).map(|(c, _)| *c).collect();
                        for c in stale {
                            tracing::debug!(peer = %peer_id, "closing a connection from the peer's previous run");
                            swarm.close_connection(c);
                        }
                    }
                    // The link works: reset the destination's backoff and flush its queue.
                    if let Some(s) = server_of_peer_id(&peer_id) {
                        core.peer_up(&s);
                    }
                    let mut ps = lock(&peers);
                    let e = ps.entry(peer_id).or_insert_with(|| new_info(&peer_id, "identify"));
                    // A peer's loopback addresses are only ours to dial if we share its host.
                    let same_host = e.addresses.iter().any(|a| a.contains("/127.0.0.1/") || a.contains("/::1/"));
                    for a in info.listen_addrs.iter().filter(|a| !is_unspecified(a) && (same_host || !is_loopback(a))) {
                        e.addresses.insert(a.to_string());
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                    if let Some(e) = lock(&peers).get_mut(&peer) {
                        e.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                        e.last_seen_ms = now_ms();
                    }
                }
                _ => {}
            }
        }
    }
}

/// Dial `peer` at the addresses we know for it (the swarm keeps no address book of its own):
/// QUIC first, TCP as the fallback. Left to itself libp2p dials every address at once and keeps
/// whichever answers first — TCP as often as not; here the QUIC addresses are dialled together
/// and a TCP address only once one of them has failed.
fn dial_known(swarm: &mut Swarm<Behaviour>, peers: &PeerTable, peer: PeerId) -> Result<(), String> {
    let mut addrs: Vec<Multiaddr> =
        lock(peers).get(&peer).map(|i| i.addresses.iter().filter_map(|a| a.parse().ok()).collect()).unwrap_or_default();
    if addrs.is_empty() {
        return Err("no known address".into());
    }
    addrs.sort_by_key(|a| !is_quic(a));
    let quic = addrs.iter().filter(|a| is_quic(a)).count();
    let factor = std::num::NonZeroU8::new(u8::try_from(quic).unwrap_or(u8::MAX)).unwrap_or(std::num::NonZeroU8::MIN);
    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
        .override_dial_concurrency_factor(factor)
        .addresses(addrs)
        .build();
    swarm.dial(opts).map_err(|e| e.to_string())
}

fn is_quic(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::QuicV1))
}

fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_unspecified(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// Serve federation requests arriving on streams: HTTP/1.1 per stream, the peer authenticated
/// by the connection and passed to the router.
async fn serve_incoming(mut incoming: libp2p_stream::IncomingStreams, router: Router) {
    let limit = Arc::new(Semaphore::new(MAX_INBOUND_STREAMS));
    while let Some((peer, stream)) = incoming.next().await {
        let Some(server) = server_of_peer_id(&peer) else {
            tracing::info!(%peer, "stream from a peer without an ed25519 key; ignored");
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let router = router.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let router = router.clone();
                let server = server.clone();
                async move {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(AuthenticatedPeer(server));
                    router.oneshot(req).await
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream.compat()), svc);
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT * 2, conn).await.unwrap_or(Ok(())) {
                tracing::debug!(%peer, error = %e, "federation stream ended with an error");
            }
            drop(permit);
        });
    }
}

struct MeshTransport {
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
}

impl Transport for MeshTransport {
    fn send(
        &self,
        dest: OwnedServerName,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>> {
        let mut control = self.control.clone();
        let commands = self.commands.clone();
        Box::pin(async move {
            let unreachable = |why: String| TransportError::Unreachable(dest.clone(), why);
            let peer = peer_id_of_server(&dest).ok_or_else(|| unreachable("not a mesh server name".into()))?;
            let (tx, rx) = oneshot::channel();
            commands.send(Command::Connect(peer, tx)).await.map_err(|_| unreachable("mesh stopped".into()))?;
            match tokio::time::timeout(CONNECT_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(unreachable(e)),
                _ => return Err(unreachable("connect timed out".into())),
            }
            let failed = |why: String| TransportError::Failed(dest.clone(), why);
            let work = async {
                let stream = control.open_stream(peer, FEDERATION_PROTOCOL).await.map_err(|e| failed(e.to_string()))?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream.compat()))
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let (mut parts, body) = req.into_parts();
                parts.headers.insert(
                    http::header::HOST,
                    http::HeaderValue::from_str(dest.as_str()).map_err(|e| failed(e.to_string()))?,
                );
                let res = sender
                    .send_request(http::Request::from_parts(parts, Full::new(body)))
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let (parts, body) = res.into_parts();
                let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .to_bytes();
                Ok(http::Response::from_parts(parts, bytes))
            };
            tokio::time::timeout(REQUEST_TIMEOUT, work).await.map_err(|_| failed("timed out".into()))?
        })
    }
}

/// Start mDNS: advertise this node and browse for others, only on the chosen interfaces.
fn start_mdns(
    config: &MeshConfig,
    me: PeerId,
    commands: mpsc::Sender<Command>,
) -> Result<mdns_sd::ServiceDaemon, MeshError> {
    use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
    let daemon = ServiceDaemon::new().map_err(|e| MeshError::Mdns(e.to_string()))?;
    // Narrow the daemon to the chosen interfaces before it advertises or browses anything.
    if config.mdns_interfaces.is_empty() {
        daemon
            .disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])
            .map_err(|e| MeshError::Mdns(e.to_string()))?;
    } else {
        daemon.disable_interface(IfKind::All).map_err(|e| MeshError::Mdns(e.to_string()))?;
        for name in &config.mdns_interfaces {
            daemon.enable_interface(IfKind::Name(name.clone())).map_err(|e| MeshError::Mdns(e.to_string()))?;
        }
    }
    let events = daemon.browse(MDNS_SERVICE).map_err(|e| MeshError::Mdns(e.to_string()))?;
    tokio::spawn(async move {
        while let Ok(ev) = events.recv_async().await {
            let ServiceEvent::ServiceResolved(info) = ev else { continue };
            let Some(peer) = info.txt_properties.get_property_val_str("p").and_then(|p| p.parse::<PeerId>().ok())
            else {
                continue;
            };
            if peer == me {
                continue;
            }
            let mut addrs = Vec::new();
            let quic_port = info.get_port();
            let tcp_port = info.txt_properties.get_property_val_str("t").and_then(|t| t.parse::<u16>().ok());
            for ip in info.get_addresses_v4() {
                if let Ok(a) = format!("/ip4/{ip}/udp/{quic_port}/quic-v1").parse() {
                    addrs.push(a);
                }
                if let Some(t) = tcp_port {
                    if let Ok(a) = format!("/ip4/{ip}/tcp/{t}").parse() {
                        addrs.push(a);
                    }
                }
            }
            if commands.send(Command::Discovered(peer, addrs, "mdns")).await.is_err() {
                return;
            }
        }
    });
    Ok(daemon)
}

/// (Re-)register this node's DNS-SD record with its current ports.
fn advertise(daemon: &mdns_sd::ServiceDaemon, me: PeerId, addrs: &[Multiaddr]) {
    let port_of = |want_quic: bool| {
        addrs.iter().find_map(|a| {
            let mut it = a.iter();
            let mut port = None;
            let mut quic = false;
            for p in it.by_ref() {
                match p {
                    Protocol::Udp(u) if want_quic => port = Some(u),
                    Protocol::Tcp(t) if !want_quic => port = Some(t),
                    Protocol::QuicV1 => quic = true,
                    _ => {}
                }
            }
            if want_quic == quic {
                port
            } else {
                None
            }
        })
    };
    let (Some(quic), tcp) = (port_of(true), port_of(false)) else { return };
    let id = me.to_string();
    let mut props = vec![("p".to_owned(), id.clone())];
    if let Some(t) = tcp {
        props.push(("t".to_owned(), t.to_string()));
    }
    let host = format!("{}.local.", &id[id.len() - 16..]);
    match mdns_sd::ServiceInfo::new(MDNS_SERVICE, &id, &host, "", quic, &props[..]) {
        Ok(info) => {
            if let Err(e) = daemon.register(info.enable_addr_auto()) {
                tracing::warn!(error = %e, "mDNS registration failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "mDNS record invalid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_and_server_names_name_the_same_key() {
        let id = crate::identity::Identity::from_seed([3; 32]);
        let peer = peer_id_of_server(id.server_name()).unwrap();
        assert_eq!(server_of_peer_id(&peer).unwrap(), *id.server_name());
        let kp = identity::Keypair::ed25519_from_bytes(id.seed()).unwrap();
        assert_eq!(kp.public().to_peer_id(), peer);
        assert_eq!(crate::core::status::peer_id_of(&id.public_key().to_bytes()), peer.to_string());
    }
}
