//! The simulated network: [`outpost::net::local`]'s idea (a request is handed to the
//! destination's federation router, with the sender authenticated as the libp2p transport
//! does) plus a link model in virtual time: latency, jitter, loss, bandwidth with queueing,
//! links up and down, partitions, nodes offline, crashed nodes.
//!
//! Everything random here comes from one seeded generator, drawn in the (deterministic) order
//! the single-threaded runtime runs the requests.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{body::Body, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use outpost::{
    api::ruma_wrapper::AuthenticatedPeer,
    core::federation::{BoxFuture, Transport, TransportError},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use ruma::{OwnedServerName, ServerName};
use tokio::{task::AbortHandle, time::Instant};
use tower::ServiceExt;

/// Parameters of every link.
#[derive(Clone, Debug)]
pub struct LinkParams {
    /// One-way delay (ms).
    pub latency_ms: f64,
    /// Extra one-way delay, uniform in `[0, jitter_ms]`.
    pub jitter_ms: f64,
    /// Loss probability per request and per response.
    pub loss: f64,
    /// Bits per second per direction; 0 = unlimited.
    pub bandwidth_bps: f64,
    /// How long a caller waits for a lost request or response.
    pub request_timeout_ms: u64,
}

/// Counters of the network.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NetStats {
    /// Requests attempted.
    pub requests: u64,
    /// Requests refused at once: no link, or the destination is down.
    pub unreachable: u64,
    /// Requests lost on the way.
    pub requests_lost: u64,
    /// Responses lost on the way.
    pub responses_lost: u64,
    /// Requests that failed because a link broke or a node crashed mid-request.
    pub broken: u64,
    /// Requests answered.
    pub answered: u64,
    /// Bytes carried (requests and responses, with an estimate of the headers).
    pub bytes: u64,
}

/// A change of an effective link (both ends up, connected, in the same partition).
#[derive(Clone, Copy, Debug)]
pub struct LinkChange {
    /// Virtual ms since the start.
    pub t_ms: u64,
    /// Lower index.
    pub a: usize,
    /// Higher index.
    pub b: usize,
    /// Up or down.
    pub up: bool,
}

struct Inner {
    n: usize,
    names: Vec<OwnedServerName>,
    by_name: BTreeMap<OwnedServerName, usize>,
    /// The router of each attached node and its incarnation.
    routers: Vec<Option<(Router, u64)>>,
    /// Tasks handling requests on each node (aborted when it crashes).
    handlers: Vec<Vec<AbortHandle>>,
    /// Physical links (radio range, explicit cuts), `n × n`, symmetric.
    base_up: Vec<bool>,
    /// Nodes on the network (not disconnected).
    online: Vec<bool>,
    /// Partition group of each node; links between groups are cut.
    group: Vec<u32>,
    /// The effective links, `n × n`, as of the last [`SimNet::refresh`].
    effective: Vec<bool>,
    params: LinkParams,
    /// When each directed link finishes sending what is queued on it.
    busy_until: BTreeMap<(usize, usize), Instant>,
    rng: StdRng,
    stats: NetStats,
    /// Every change of an effective link, when `record` is on.
    log: Vec<LinkChange>,
    start: Instant,
}

impl Inner {
    fn eff(&self, a: usize, b: usize) -> bool {
        a != b
            && self.base_up[a * self.n + b]
            && self.online[a]
            && self.online[b]
            && self.group[a] == self.group[b]
            && self.routers[a].is_some()
            && self.routers[b].is_some()
    }

    /// Delay to carry `bytes` from `a` to `b` now, queueing behind earlier transfers.
    fn transit(&mut self, a: usize, b: usize, bytes: usize) -> Duration {
        let p = &self.params;
        let jitter = if p.jitter_ms > 0.0 { self.rng.gen_range(0.0..p.jitter_ms) } else { 0.0 };
        let prop = Duration::from_secs_f64((p.latency_ms + jitter).max(0.0) / 1000.0);
        if p.bandwidth_bps <= 0.0 {
            return prop;
        }
        let now = Instant::now();
        let tx = Duration::from_secs_f64(bytes as f64 * 8.0 / p.bandwidth_bps);
        let slot = self.busy_until.entry((a, b)).or_insert(now);
        let begin = (*slot).max(now);
        *slot = begin + tx;
        (begin + tx + prop) - now
    }

    fn lost(&mut self) -> bool {
        self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss.min(1.0))
    }
}

/// The network of one simulation. Nodes are numbered `0..n`.
pub struct SimNet {
    inner: Mutex<Inner>,
}

impl SimNet {
    /// A network of `names.len()` nodes, fully linked, none attached yet. `record` keeps the
    /// log of link changes (needed for reachability analysis; costs memory on large runs).
    pub fn new(names: Vec<OwnedServerName>, params: LinkParams, seed: u64) -> Arc<Self> {
        let n = names.len();
        let by_name = names.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect();
        let mut base_up = vec![true; n * n];
        for i in 0..n {
            base_up[i * n + i] = false;
        }
        Arc::new(Self {
            inner: Mutex::new(Inner {
                n,
                names,
                by_name,
                routers: vec![None; n],
                handlers: (0..n).map(|_| Vec::new()).collect(),
                base_up,
                online: vec![true; n],
                group: vec![0; n],
                effective: vec![false; n * n],
                params,
                busy_until: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                stats: NetStats::default(),
                log: Vec::new(),
                start: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attach node `i`'s federation router (a new incarnation of the node).
    pub fn attach(&self, i: usize, router: Router, incarnation: u64) {
        self.lock().routers[i] = Some((router, incarnation));
    }

    /// Detach node `i` (it crashed): abort every request it is handling.
    pub fn detach(&self, i: usize) {
        let mut g = self.lock();
        g.routers[i] = None;
        for h in std::mem::take(&mut g.handlers[i]) {
            h.abort();
        }
    }

    /// Set the physical link between `a` and `b`.
    pub fn set_base(&self, a: usize, b: usize, up: bool) {
        let mut g = self.lock();
        let n = g.n;
        if a != b {
            g.base_up[a * n + b] = up;
            g.base_up[b * n + a] = up;
        }
    }

    /// Set every physical link at once from `up(a, b)` (mobility).
    pub fn set_base_all(&self, up: impl Fn(usize, usize) -> bool) {
        let mut g = self.lock();
        let n = g.n;
        for a in 0..n {
            for b in (a + 1)..n {
                let u = up(a, b);
                g.base_up[a * n + b] = u;
                g.base_up[b * n + a] = u;
            }
        }
    }

    /// Take node `i` off the network or put it back.
    pub fn set_online(&self, i: usize, online: bool) {
        self.lock().online[i] = online;
    }

    /// Assign partition groups (equal groups are connected).
    pub fn set_groups(&self, group: Vec<u32>) {
        let mut g = self.lock();
        if group.len() == g.n {
            g.group = group;
        }
    }

    /// Change the loss probability.
    pub fn set_loss(&self, loss: f64) {
        self.lock().params.loss = loss.clamp(0.0, 1.0);
    }

    /// Recompute the effective links; returns the pairs `(a, b)`, `a < b`, that came up.
    pub fn refresh(&self, record: bool) -> Vec<(usize, usize)> {
        let mut g = self.lock();
        let n = g.n;
        let t_ms = g.start.elapsed().as_millis() as u64;
        let mut came_up = Vec::new();
        for a in 0..n {
            for b in (a + 1)..n {
                let now = g.eff(a, b);
                if now != g.effective[a * n + b] {
                    g.effective[a * n + b] = now;
                    g.effective[b * n + a] = now;
                    if now {
                        came_up.push((a, b));
                    }
                    if record {
                        g.log.push(LinkChange { t_ms, a, b, up: now });
                    }
                }
            }
        }
        came_up
    }

    /// Whether `a` and `b` are linked now (as of the last refresh).
    pub fn linked(&self, a: usize, b: usize) -> bool {
        let g = self.lock();
        a != b && g.effective[a * g.n + b]
    }

    /// The neighbours of `a` now, in index order.
    pub fn neighbours(&self, a: usize) -> Vec<usize> {
        let g = self.lock();
        (0..g.n).filter(|&b| b != a && g.effective[a * g.n + b]).collect()
    }

    /// Connected components of the effective links: a component id per node.
    pub fn components(&self) -> Vec<usize> {
        let g = self.lock();
        let n = g.n;
        let mut comp = vec![usize::MAX; n];
        for s in 0..n {
            if comp[s] != usize::MAX {
                continue;
            }
            comp[s] = s;
            let mut stack = vec![s];
            while let Some(a) = stack.pop() {
                for (b, c) in comp.iter_mut().enumerate() {
                    if *c == usize::MAX && g.effective[a * n + b] {
                        *c = s;
                        stack.push(b);
                    }
                }
            }
        }
        comp
    }

    /// The log of link changes so far.
    pub fn link_log(&self) -> Vec<LinkChange> {
        self.lock().log.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.lock().stats.clone()
    }

    /// The transport node `me` uses while `alive` holds (one per incarnation of the node).
    pub fn transport(self: &Arc<Self>, me: usize, alive: Arc<AtomicBool>) -> Arc<dyn Transport> {
        let name = self.lock().names[me].clone();
        Arc::new(SimTransport { net: self.clone(), me, name, alive })
    }
}

struct SimTransport {
    net: Arc<SimNet>,
    me: usize,
    name: OwnedServerName,
    alive: Arc<AtomicBool>,
}

fn request_size(req: &http::Request<Bytes>) -> usize {
    let headers: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    req.body().len() + headers + req.uri().to_string().len() + 16
}

fn response_size(res: &http::Response<Bytes>) -> usize {
    let headers: usize = res.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    res.body().len() + headers + 16
}

enum Leg {
    Arrives(Duration),
    Lost(Duration),
}

impl SimTransport {
    fn unreachable(&self, dest: &ServerName, why: &str) -> TransportError {
        TransportError::Unreachable(dest.to_owned(), why.into())
    }

    /// Plan one leg `from → to` of `bytes`: refused now (no link), lost, or arriving after a
    /// delay.
    fn leg(&self, from: usize, to: usize, bytes: usize, first: bool) -> Result<Leg, ()> {
        let mut g = self.net.lock();
        if first {
            g.stats.requests += 1;
        }
        if !g.eff(from, to) {
            if first {
                g.stats.unreachable += 1;
            } else {
                g.stats.broken += 1;
            }
            return Err(());
        }
        g.stats.bytes += bytes as u64;
        let timeout = Duration::from_millis(g.params.request_timeout_ms);
        if g.lost() {
            if first {
                g.stats.requests_lost += 1;
            } else {
                g.stats.responses_lost += 1;
            }
            return Ok(Leg::Lost(timeout));
        }
        Ok(Leg::Arrives(g.transit(from, to, bytes).min(timeout)))
    }
}

impl Transport for SimTransport {
    fn send(
        &self,
        dest: OwnedServerName,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>> {
        let this =
            SimTransport { net: self.net.clone(), me: self.me, name: self.name.clone(), alive: self.alive.clone() };
        Box::pin(async move {
            let started = Instant::now();
            if !this.alive.load(Ordering::SeqCst) {
                return Err(this.unreachable(&dest, "this node is down"));
            }
            let Some(to) = this.net.lock().by_name.get(&dest).copied() else {
                return Err(this.unreachable(&dest, "no such node"));
            };
            let broken = |why: &str| TransportError::Failed(dest.clone(), why.into());
            // The request travels.
            match this.leg(this.me, to, request_size(&req), true) {
                Err(()) => return Err(this.unreachable(&dest, "no link")),
                Ok(Leg::Lost(t)) => {
                    tokio::time::sleep(t).await;
                    return Err(broken("request lost (timed out)"));
                }
                Ok(Leg::Arrives(d)) => tokio::time::sleep(d).await,
            }
            // It arrives: the destination's router handles it in a task of the destination
            // (so that a crash of the destination aborts it).
            let handler = {
                let mut g = this.net.lock();
                if !this.alive.load(Ordering::SeqCst) || !g.eff(this.me, to) {
                    g.stats.broken += 1;
                    return Err(broken("link broke"));
                }
                let Some((router, _)) = g.routers[to].clone() else {
                    g.stats.broken += 1;
                    return Err(broken("destination went down"));
                };
                let mut req = req.map(Body::from);
                req.extensions_mut().insert(AuthenticatedPeer(this.name.clone()));
                let handler = tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let res = router.oneshot(req).await.map_err(|e| e.to_string())?;
                        let (parts, body) = res.into_parts();
                        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                        Ok::<_, String>(http::Response::from_parts(parts, bytes))
                    },
                    crate::world::node_span(to),
                ));
                let hs = &mut g.handlers[to];
                hs.retain(|h| !h.is_finished());
                hs.push(handler.abort_handle());
                handler
            };
            let res = match handler.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(broken(&e)),
                Err(_) => {
                    this.net.lock().stats.broken += 1;
                    return Err(broken("destination went down while handling the request"));
                }
            };
            // The response travels back.
            match this.leg(to, this.me, response_size(&res), false) {
                Err(()) => return Err(broken("link broke")),
                Ok(Leg::Lost(t)) => {
                    tokio::time::sleep_until(started + t).await;
                    return Err(broken("response lost (timed out)"));
                }
                Ok(Leg::Arrives(d)) => tokio::time::sleep(d).await,
            }
            let mut g = this.net.lock();
            if !this.alive.load(Ordering::SeqCst) || !g.eff(this.me, to) {
                g.stats.broken += 1;
                return Err(broken("link broke"));
            }
            g.stats.answered += 1;
            Ok(res)
        })
    }
}
