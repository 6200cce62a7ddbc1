//! The driver: builds the nodes and the network, plays the scenario's schedule in virtual
//! time, watches every node, and hands what it saw to the checkers.
//!
//! Determinism: one single-threaded tokio runtime with a paused clock; every random choice
//! from seeded generators; nodes, links and maps iterated in index / key order. The driver
//! decides everything at schedule time or from state it reads, never from wall time.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use outpost::core::{pdu::PduTemplate, rooms::CreateRoomSpec, Core};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use ruma::{events::TimelineEventType, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId};
use serde_json::json;
use tokio::{sync::mpsc, time::Instant};
use tracing::Instrument;

use crate::{
    net::{LinkParams, SimNet},
    node::{mix, Node, VirtualClock},
    scenario::{Action, Scenario},
};

/// Virtual "now" at the start of every run (2025-01-01T00:00:00Z), so event timestamps and
/// hence event ids replay.
pub const EPOCH_MS: u64 = 1_735_689_600_000;

/// What happened to one scheduled message.
#[derive(Clone, Debug)]
pub struct Msg {
    /// Sending node.
    pub origin: usize,
    /// When the send was started (virtual ms).
    pub sent_ms: u64,
    /// Whether the origin acknowledged it (the client got its event id).
    pub acked: bool,
    /// Why it was not sent, if it failed.
    pub error: Option<String>,
    /// Its event id, once acknowledged.
    pub event: Option<OwnedEventId>,
    /// Nodes the origin queued it for: the servers in the room as the origin saw it.
    pub dests: Vec<usize>,
    /// Nodes whose user was joined (by their own account) when it was sent.
    pub members: Vec<usize>,
}

/// One state change attempt.
#[derive(Clone, Debug)]
pub struct Change {
    /// Acting node.
    pub node: usize,
    /// When.
    pub t_ms: u64,
    /// `topic`, `power_levels`, ...
    pub kind: String,
    /// The resulting event, when accepted.
    pub event: Option<OwnedEventId>,
    /// Why it was refused.
    pub error: Option<String>,
    /// Nodes the actor queued it for.
    pub dests: Vec<usize>,
}

/// One look at every node.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When.
    pub t_ms: u64,
    /// Nodes up, with the room, whose user is joined.
    pub in_room: usize,
    /// Distinct resolved states among them.
    pub distinct: usize,
    /// Share of them holding the most common state.
    pub agree: f64,
    /// Every group of mutually reachable nodes agrees.
    pub converged: bool,
}

/// Everything the run recorded.
#[derive(Default)]
pub struct Rec {
    /// Messages by simulation id.
    pub msgs: Vec<Msg>,
    /// `(message, node) → virtual ms` it became visible there first.
    pub delivered: BTreeMap<(usize, usize), u64>,
    /// Whether each node's user is joined, by the node's own account (last seen).
    pub joined: Vec<bool>,
    /// Which nodes are up.
    pub alive: Vec<bool>,
    /// Successful joins (first joins and rejoins).
    pub joins_ok: u64,
    /// Failed join attempts (retried).
    pub join_attempts_failed: u64,
    /// Time from first attempt to success of each first join (ms).
    pub join_ms: Vec<u64>,
    /// State changes.
    pub changes: Vec<Change>,
    /// `(ms, what)` for every fault and repair.
    pub faults: Vec<(u64, String)>,
    /// Convergence samples.
    pub samples: Vec<Sample>,
    /// Something changed since the last sample.
    pub dirty: bool,
    /// Last fault, repair, accepted state change, join or message (ms).
    pub last_disturbance_ms: u64,
    /// Crashes and restarts performed.
    pub crashes: u64,
    /// Restarts performed.
    pub restarts: u64,
}

impl Rec {
    fn disturbed(&mut self, t: u64) {
        self.last_disturbance_ms = self.last_disturbance_ms.max(t);
        self.dirty = true;
    }
}

/// State shared with the tasks the driver spawns.
pub struct Shared {
    /// The record.
    pub rec: Mutex<Rec>,
    /// The network.
    pub net: Arc<SimNet>,
    /// The clock.
    pub clock: Arc<VirtualClock>,
    /// Server name per node.
    pub names: Vec<OwnedServerName>,
    /// User per node.
    pub users: Vec<OwnedUserId>,
    /// The room, once created.
    pub room: OnceLock<OwnedRoomId>,
    followups: mpsc::Sender<(u64, Act)>,
    seed: u64,
}

impl Shared {
    /// Virtual ms since the start.
    pub fn now(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    fn rec(&self) -> std::sync::MutexGuard<'_, Rec> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn room(&self) -> OwnedRoomId {
        self.room.get().cloned().expect("the room exists before any task uses it")
    }

    fn idx_of(&self, s: &ruma::ServerName) -> Option<usize> {
        self.names.iter().position(|n| n == s)
    }

    /// Ask the driver to run `act` at `t_ms`.
    fn later(&self, t_ms: u64, act: Act) {
        // The channel is bounded; the driver drains it on every turn. A full channel means the
        // workload outran the driver: drop the follow-up (it is a rejoin or an unban).
        let _ = self.followups.try_send((t_ms, act));
    }
}

/// Something the driver does at a point in virtual time.
#[derive(Clone, Debug)]
pub enum Act {
    /// Node `i` joins the room (retrying until it can).
    Join(usize),
    /// Send message `k`.
    Message(usize),
    /// State change number `k`.
    StateChange(usize),
    /// `(actor, target)`: the node that banned lifts the ban, if it still sees it.
    Unban(usize, usize),
    /// A scheduled fault or repair.
    Fault(Action),
    /// Churn: node goes down / comes back.
    ChurnDown(usize, bool),
    /// Churn: node comes back.
    ChurnUp(usize, bool),
    /// Mobility step.
    Move,
    /// Look at every node.
    Sample,
    /// Progress line to stderr.
    Progress(u32),
    /// End of the workload: repair every fault.
    EndWorkload,
    /// End of the run.
    Finish,
}

/// The simulation of one scenario.
pub struct World {
    /// The scenario, with seed and node count resolved.
    pub scn: Scenario,
    /// The seed.
    pub seed: u64,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Shared with tasks.
    pub sh: Arc<Shared>,
    rng: StdRng,
    queue: BTreeMap<(u64, u64), Act>,
    seq: u64,
    followups: mpsc::Receiver<(u64, Act)>,
    positions: Vec<(f64, f64)>,
    /// Cached state fingerprints: `(node, incarnation, state group) → hash`.
    fingerprints: BTreeMap<(usize, u64, u64), u64>,
    components: Option<Vec<usize>>,
    /// When the workload ends (ms).
    pub end_ms: u64,
    /// When the run ends (ms).
    pub finish_ms: u64,
    progress: bool,
    wall: std::time::Instant,
    record_links: bool,
}

fn ms(s: f64) -> u64 {
    (s.max(0.0) * 1000.0).round() as u64
}

impl World {
    /// Build the nodes and the network for `scn` (seed and node count already resolved).
    pub fn new(scn: Scenario, progress: bool) -> Self {
        let seed = scn.seed;
        let n = scn.nodes;
        let nodes: Vec<Node> = (0..n).map(|i| Node::new(i, seed)).collect();
        let names: Vec<OwnedServerName> = nodes.iter().map(|nd| nd.name.clone()).collect();
        let users = nodes.iter().map(|nd| nd.user.clone()).collect();
        let net_spec = &scn.network;
        let params = LinkParams {
            latency_ms: net_spec.latency_ms,
            jitter_ms: net_spec.jitter_ms,
            loss: net_spec.loss,
            bandwidth_bps: net_spec.bandwidth_kbps * 1000.0,
            request_timeout_ms: net_spec.request_timeout_ms,
        };
        let net = SimNet::new(names.clone(), params, mix(seed, 0, 0x6e6574));
        let (tx, rx) = mpsc::channel(4096);
        let clock = Arc::new(VirtualClock::new(EPOCH_MS));
        let rec = Rec { joined: vec![false; n], alive: vec![false; n], ..Default::default() };
        let record_links = scn.mobility.is_some();
        Self {
            seed,
            nodes,
            sh: Arc::new(Shared {
                rec: Mutex::new(rec),
                net,
                clock,
                names,
                users,
                room: OnceLock::new(),
                followups: tx,
                seed,
            }),
            rng: StdRng::seed_from_u64(mix(seed, 0, 0x776f726c64)),
            queue: BTreeMap::new(),
            seq: 0,
            followups: rx,
            positions: Vec::new(),
            fingerprints: BTreeMap::new(),
            components: None,
            end_ms: 0,
            finish_ms: 0,
            progress,
            wall: std::time::Instant::now(),
            record_links,
            scn,
        }
    }

    fn at(&mut self, t_ms: u64, act: Act) {
        self.seq += 1;
        self.queue.insert((t_ms, self.seq), act);
    }

    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn log(&self, msg: String) {
        if self.progress {
            eprintln!("[{:>8.1}s] {msg}", self.sh.now() as f64 / 1000.0);
        }
    }

    /// Plan the whole schedule (all random choices of timing are made here, from the seed).
    fn plan(&mut self) {
        let n = self.n();
        let scn = self.scn.clone();
        let mut end = 0u64;
        // Joins.
        let join_at = ms(scn.room.join_at_s);
        for i in 1..n {
            let t = join_at
                + if scn.room.join_spread_s > 0.0 { self.rng.gen_range(0..=ms(scn.room.join_spread_s)) } else { 0 };
            self.at(t, Act::Join(i));
        }
        end = end.max(join_at + ms(scn.room.join_spread_s));
        // Messages.
        let mut msg_times: Vec<u64> = (0..scn.messages.count)
            .map(|_| self.rng.gen_range(ms(scn.messages.from_s)..=ms(scn.messages.until_s.max(scn.messages.from_s))))
            .collect();
        if let Some(m) = &scn.mobility {
            for step in 0..m.steps {
                for _ in 0..m.messages_per_step {
                    let t0 = ms(m.step_s * step as f64);
                    msg_times.push(t0 + self.rng.gen_range(0..ms(m.step_s).max(1)));
                }
            }
        }
        msg_times.sort_unstable();
        for (k, t) in msg_times.iter().enumerate() {
            self.at(*t, Act::Message(k));
            end = end.max(*t);
        }
        self.sh.rec().msgs = msg_times
            .iter()
            .map(|t| Msg {
                origin: usize::MAX,
                sent_ms: *t,
                acked: false,
                error: None,
                event: None,
                dests: Vec::new(),
                members: Vec::new(),
            })
            .collect();
        // State changes.
        for k in 0..scn.state_changes.count {
            let sc = &scn.state_changes;
            let t = self.rng.gen_range(ms(sc.from_s)..=ms(sc.until_s.max(sc.from_s)));
            self.at(t, Act::StateChange(k));
            end = end.max(t);
        }
        // Faults.
        for e in &scn.events {
            self.at(ms(e.at_s), Act::Fault(e.action.clone()));
            end = end.max(ms(e.at_s));
        }
        // Churn.
        if let Some(c) = &scn.churn {
            let mut candidates: Vec<usize> = (1..n).collect();
            candidates.shuffle(&mut self.rng);
            let k = ((n.saturating_sub(1)) as f64 * c.fraction).ceil() as usize;
            let mut churners: Vec<usize> = candidates.into_iter().take(k).collect();
            churners.sort_unstable();
            let exp = |rng: &mut StdRng, mean: f64| -> f64 { -mean.max(0.001) * (1.0 - rng.gen::<f64>()).ln() };
            for i in churners {
                let mut t = c.from_s;
                loop {
                    t += exp(&mut self.rng, c.up_s_mean);
                    if t >= c.until_s {
                        break;
                    }
                    self.at(ms(t), Act::ChurnDown(i, c.crash));
                    t += exp(&mut self.rng, c.down_s_mean);
                    let up = t.min(c.until_s);
                    self.at(ms(up), Act::ChurnUp(i, c.crash));
                }
            }
            end = end.max(ms(c.until_s));
        }
        // Mobility.
        if let Some(m) = &scn.mobility {
            self.positions =
                (0..n).map(|_| (self.rng.gen_range(0.0..=m.area_m), self.rng.gen_range(0.0..=m.area_m))).collect();
            for step in 1..=m.steps {
                self.at(ms(m.step_s * step as f64), Act::Move);
            }
            end = end.max(ms(m.step_s * m.steps as f64));
        }
        self.end_ms = end + 1000;
        self.finish_ms = self.end_ms + ms(scn.settle_s);
        self.at(self.end_ms, Act::EndWorkload);
        self.at(self.finish_ms, Act::Finish);
        self.at(0, Act::Sample);
        for p in 1..10 {
            self.at(self.finish_ms * p / 10, Act::Progress(p as u32 * 10));
        }
    }

    /// Run the scenario to the end.
    pub async fn run(&mut self) -> Result<(), String> {
        let n = self.n();
        self.plan();
        // Every node starts; node 0 creates the room.
        for i in 0..n {
            self.start_node(i)?;
            tracing::info!(node = i, server = %self.sh.names[i], "node's server name");
        }
        if !self.positions.is_empty() {
            self.apply_positions();
        }
        self.net_changed();
        let creator = self.nodes[0].core().cloned().ok_or("node 0 is not up")?;
        let mut spec = CreateRoomSpec {
            preset: Some("public_chat".into()),
            name: Some(format!("sim {}", self.scn.name)),
            ..Default::default()
        };
        if self.scn.room.power == "all" {
            let users: serde_json::Map<String, serde_json::Value> =
                self.sh.users.iter().skip(1).map(|u| (u.to_string(), json!(100))).collect();
            spec.power_level_content_override = Some([("users".to_owned(), json!(users))].into_iter().collect());
        }
        let room = creator.create_room(&self.sh.users[0], spec).await.map_err(|e| format!("createRoom: {e}"))?;
        let _ = self.sh.room.set(room);
        for i in 0..n {
            self.spawn_observer(i);
        }
        self.log(format!(
            "{} nodes, seed {}, workload until {:.0}s, settle until {:.0}s",
            n,
            self.seed,
            self.end_ms as f64 / 1000.0,
            self.finish_ms as f64 / 1000.0
        ));
        let t0 = Instant::now() - Duration::from_millis(self.sh.now());
        loop {
            while let Ok((t, act)) = self.followups.try_recv() {
                self.at(t, act);
            }
            let Some((&(t, _), _)) = self.queue.first_key_value() else { break };
            let wake = t0 + Duration::from_millis(t);
            tokio::select! {
                biased;
                f = self.followups.recv() => {
                    if let Some((t, act)) = f { self.at(t, act); }
                    continue;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            let Some((_, act)) = self.queue.pop_first() else { break };
            if matches!(act, Act::Finish) {
                self.sample();
                break;
            }
            self.exec(act);
        }
        Ok(())
    }

    fn start_node(&mut self, i: usize) -> Result<(), String> {
        let clock: Arc<dyn outpost::clock::Clock> = self.sh.clock.clone();
        self.nodes[i].start(&self.sh.net, clock)?;
        self.sh.rec().alive[i] = true;
        Ok(())
    }

    fn spawn_observer(&mut self, i: usize) {
        let Some(core) = self.nodes[i].core().cloned() else { return };
        let sh = self.sh.clone();
        let task = tokio::spawn(observe(core, i, sh).instrument(node_span(i)));
        self.nodes[i].track(task.abort_handle());
    }

    /// Links changed: recompute them, tell both ends of every link that came up (as mesh
    /// discovery does), note the disturbance.
    fn net_changed(&mut self) {
        let up = self.sh.net.refresh(self.record_links);
        for (a, b) in up {
            if let Some(c) = self.nodes[a].core() {
                c.peer_up(&self.sh.names[b]);
            }
            if let Some(c) = self.nodes[b].core() {
                c.peer_up(&self.sh.names[a]);
            }
        }
        self.components = None;
        let now = self.sh.now();
        self.sh.rec().disturbed(now);
    }

    fn fault_log(&mut self, what: String) {
        let now = self.sh.now();
        self.log(what.clone());
        self.sh.rec().faults.push((now, what));
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].live.is_none() {
            return;
        }
        self.nodes[i].crash(&self.sh.net);
        {
            let mut r = self.sh.rec();
            r.alive[i] = false;
            r.crashes += 1;
        }
        self.fault_log(format!("crash node {i}"));
        self.net_changed();
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].live.is_some() {
            return;
        }
        if let Err(e) = self.start_node(i) {
            self.fault_log(format!("node {i} failed to restart: {e}"));
            return;
        }
        self.sh.rec().restarts += 1;
        self.spawn_observer(i);
        self.fault_log(format!("restart node {i}"));
        self.net_changed();
    }

    fn apply_positions(&mut self) {
        let Some(m) = &self.scn.mobility else { return };
        let r2 = m.range_m * m.range_m;
        let pos = &self.positions;
        self.sh.net.set_base_all(|a, b| {
            let dx = pos[a].0 - pos[b].0;
            let dy = pos[a].1 - pos[b].1;
            dx * dx + dy * dy <= r2
        });
    }

    fn exec(&mut self, act: Act) {
        let n = self.n();
        match act {
            Act::Join(i) => self.spawn_join(i),
            Act::Message(k) => self.spawn_message(k),
            Act::StateChange(k) => self.spawn_state_change(k),
            Act::Unban(actor, target) => self.spawn_unban(actor, target),
            Act::Fault(a) => self.fault(a),
            Act::ChurnDown(i, crash) => {
                if crash {
                    self.crash(i);
                } else {
                    self.sh.net.set_online(i, false);
                    self.fault_log(format!("node {i} goes offline"));
                    self.net_changed();
                }
            }
            Act::ChurnUp(i, crash) => {
                if crash {
                    self.restart(i);
                } else {
                    self.sh.net.set_online(i, true);
                    self.fault_log(format!("node {i} comes back online"));
                    self.net_changed();
                }
            }
            Act::Move => {
                let Some(m) = self.scn.mobility.clone() else { return };
                for p in self.positions.iter_mut() {
                    let d = self.rng.gen_range(0.0..=m.move_m_max);
                    let a = self.rng.gen_range(0.0..std::f64::consts::TAU);
                    p.0 = (p.0 + d * a.cos()).clamp(0.0, m.area_m);
                    p.1 = (p.1 + d * a.sin()).clamp(0.0, m.area_m);
                }
                self.apply_positions();
                self.net_changed();
            }
            Act::Sample => {
                self.sample();
                let next = self.sh.now() + self.scn.sample_ms;
                if next < self.finish_ms {
                    self.at(next, Act::Sample);
                }
            }
            Act::Progress(p) => {
                let (acked, sent, delivered, joined) = {
                    let r = self.sh.rec();
                    (
                        r.msgs.iter().filter(|m| m.acked).count(),
                        r.msgs.iter().filter(|m| m.sent_ms <= self.sh.now()).count(),
                        r.delivered.len(),
                        r.joined.iter().filter(|j| **j).count(),
                    )
                };
                let last = self.sh.rec().samples.last().cloned();
                self.log(format!(
                    "{p}%: {joined}/{n} joined, messages {acked}/{sent} accepted, {delivered} deliveries, states {} (wall {:.1}s)",
                    last.map(|s| s.distinct).unwrap_or(0),
                    self.wall.elapsed().as_secs_f64()
                ));
            }
            Act::EndWorkload => {
                self.fault_log("end of workload: repair every fault".into());
                self.sh.net.set_groups(vec![0; n]);
                for i in 0..n {
                    self.sh.net.set_online(i, true);
                }
                if self.scn.mobility.is_none() {
                    self.sh.net.set_base_all(|_, _| true);
                }
                for i in 0..n {
                    self.restart(i);
                }
                self.net_changed();
                if self.scn.state_changes.count > 0 && self.scn.state_changes.reopen_at_end {
                    self.spawn_reopen();
                }
            }
            Act::Finish => {}
        }
    }

    fn fault(&mut self, a: Action) {
        let n = self.n();
        match a {
            Action::Split { fraction } => {
                let k = ((n as f64) * fraction).ceil() as usize;
                self.sh.net.set_groups((0..n).map(|i| if i < k { 1 } else { 2 }).collect());
                self.fault_log(format!("split: nodes 0..{k} | {k}..{n}"));
            }
            Action::Partition { groups } => {
                let mut g = vec![0u32; n];
                for (gi, members) in groups.iter().enumerate() {
                    for m in members {
                        g[m % n] = gi as u32 + 1;
                    }
                }
                self.sh.net.set_groups(g);
                self.fault_log(format!("partition {groups:?}"));
            }
            Action::Heal => {
                self.sh.net.set_groups(vec![0; n]);
                self.fault_log("heal".into());
            }
            Action::Crash { node } => return self.crash(node % n),
            Action::Restart { node } => return self.restart(node % n),
            Action::Disconnect { node } => {
                self.sh.net.set_online(node % n, false);
                self.fault_log(format!("node {} goes offline", node % n));
            }
            Action::Reconnect { node } => {
                self.sh.net.set_online(node % n, true);
                self.fault_log(format!("node {} comes back online", node % n));
            }
            Action::LinkDown { a, b } => {
                self.sh.net.set_base(a % n, b % n, false);
                self.fault_log(format!("link {}–{} down", a % n, b % n));
            }
            Action::LinkUp { a, b } => {
                self.sh.net.set_base(a % n, b % n, true);
                self.fault_log(format!("link {}–{} up", a % n, b % n));
            }
            Action::SetLoss { loss } => {
                self.sh.net.set_loss(loss);
                self.fault_log(format!("loss set to {loss}"));
            }
        }
        self.net_changed();
    }

    /// Up, joined nodes in index order.
    fn joined_nodes(&self) -> Vec<usize> {
        let r = self.sh.rec();
        (0..self.n()).filter(|&i| r.alive[i] && r.joined[i] && self.nodes[i].live.is_some()).collect()
    }

    fn spawn_join(&mut self, i: usize) {
        let Some(core) = self.nodes[i].core().cloned() else {
            // Down: try again later.
            let t = self.sh.now() + ms(self.scn.room.join_retry_s);
            if t < self.finish_ms {
                self.at(t, Act::Join(i));
            }
            return;
        };
        let sh = self.sh.clone();
        let retry = Duration::from_millis(ms(self.scn.room.join_retry_s).max(1));
        let rng = StdRng::seed_from_u64(mix(self.seed, i as u64, 0x6a6f696e ^ self.seq));
        let task = tokio::spawn(join_task(core, i, sh, retry, rng).instrument(node_span(i)));
        self.nodes[i].track(task.abort_handle());
    }

    fn spawn_message(&mut self, k: usize) {
        let sender = match self.scn.messages.sender {
            Some(s) if self.scn.mobility.is_none() => Some(s % self.n()).filter(|s| {
                let r = self.sh.rec();
                r.alive[*s] && r.joined[*s]
            }),
            _ => self.joined_nodes().choose(&mut self.rng).copied(),
        };
        let Some(origin) = sender else {
            let mut r = self.sh.rec();
            r.msgs[k].error = Some("no joined node is up".into());
            return;
        };
        let Some(core) = self.nodes[origin].core().cloned() else { return };
        {
            let mut r = self.sh.rec();
            r.msgs[k].origin = origin;
            r.msgs[k].sent_ms = self.sh.now();
        }
        let pad = "x".repeat(self.scn.messages.body_bytes);
        let sh = self.sh.clone();
        let task = tokio::spawn(
            async move {
                let room = sh.room();
                let t = PduTemplate {
                    kind: TimelineEventType::RoomMessage,
                    content: json!({"msgtype": "m.text", "body": format!("message {k} {pad}"), "sim_id": k}),
                    state_key: None,
                    redacts: None,
                };
                let res = core.send_event(&sh.users[origin], None, &room, t, None).await;
                let dests = core.servers_in_room(&room).unwrap_or_default();
                let now = sh.now();
                let mut r = sh.rec();
                match res {
                    Ok(id) => {
                        let members: Vec<usize> = (0..r.joined.len()).filter(|&j| j != origin && r.joined[j]).collect();
                        let m = &mut r.msgs[k];
                        m.acked = true;
                        m.event = Some(id);
                        m.dests = dests.iter().filter_map(|d| sh.idx_of(d)).filter(|&d| d != origin).collect();
                        m.members = members;
                        r.disturbed(now);
                    }
                    Err(e) => r.msgs[k].error = Some(e.to_string()),
                }
            }
            .instrument(node_span(origin)),
        );
        self.nodes[origin].track(task.abort_handle());
    }

    fn spawn_state_change(&mut self, k: usize) {
        let kinds = self.scn.state_changes.kinds.clone();
        let kind = kinds.choose(&mut self.rng).cloned().unwrap_or_else(|| "topic".into());
        let joined = self.joined_nodes();
        let Some(&actor) = joined.choose(&mut self.rng) else { return };
        let n = self.n();
        // A target: another node (never node 0, whose user created the room and cannot be
        // banned or demoted in room version 12).
        let others: Vec<usize> = (1..n).filter(|&j| j != actor).collect();
        let target = others.choose(&mut self.rng).copied();
        let level = *[0i64, 50, 100].choose(&mut self.rng).unwrap_or(&0);
        let Some(core) = self.nodes[actor].core().cloned() else { return };
        let sh = self.sh.clone();
        let rejoin_ms = ms(self.scn.state_changes.rejoin_after_s);
        let unban_ms = ms(self.scn.state_changes.unban_after_s);
        let task = tokio::spawn(
            async move {
                let room = sh.room();
                let me = sh.users[actor].clone();
                let now = sh.now();
                let st = |kind: &str, content: serde_json::Value| PduTemplate {
                    kind: TimelineEventType::from(kind),
                    content,
                    state_key: Some(String::new()),
                    redacts: None,
                };
                let mut follow: Option<(u64, Act)> = None;
                let res: Result<OwnedEventId, String> = async {
                    match kind.as_str() {
                        "topic" => core
                            .send_event(
                                &me,
                                None,
                                &room,
                                st("m.room.topic", json!({"topic": format!("topic {k} by node {actor}")})),
                                None,
                            )
                            .await
                            .map_err(|e| e.to_string()),
                        "power_levels" => {
                            let t = target.ok_or("no target")?;
                            let mut content = core
                                .state_event(&room, "m.room.power_levels", "")
                                .map_err(|e| e.to_string())?
                                .map(|p| p.content_value())
                                .ok_or("no power levels")?;
                            content["users"][sh.users[t].as_str()] = json!(level);
                            core.send_event(&me, None, &room, st("m.room.power_levels", content), None)
                                .await
                                .map_err(|e| e.to_string())
                        }
                        "join_rules" => {
                            let current =
                                core.state_event(&room, "m.room.join_rules", "").map_err(|e| e.to_string())?.and_then(
                                    |p| p.content_value().get("join_rule").and_then(|j| j.as_str()).map(String::from),
                                );
                            let next = if current.as_deref() == Some("public") { "invite" } else { "public" };
                            core.send_event(&me, None, &room, st("m.room.join_rules", json!({"join_rule": next})), None)
                                .await
                                .map_err(|e| e.to_string())
                        }
                        "ban" => {
                            let t = target.ok_or("no target")?;
                            let r = core
                                .set_membership(&me, &room, &sh.users[t], "ban", Some("simulated".into()), None)
                                .await
                                .map_err(|e| e.to_string());
                            if r.is_ok() {
                                follow = Some((now + unban_ms, Act::Unban(actor, t)));
                            }
                            r
                        }
                        _ => {
                            // membership: leave, and join again later.
                            if actor == 0 {
                                return Err("node 0 stays".to_owned());
                            }
                            let r = core
                                .set_membership(&me, &room, &me, "leave", None, None)
                                .await
                                .map_err(|e| e.to_string());
                            if r.is_ok() {
                                follow = Some((now + rejoin_ms, Act::Join(actor)));
                            }
                            r
                        }
                    }
                }
                .await;
                if let Some((t, a)) = follow {
                    sh.later(t, a);
                }
                let done = sh.now();
                let dests: Vec<usize> = core
                    .servers_in_room(&room)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|d| sh.idx_of(d))
                    .filter(|&d| d != actor)
                    .chain(target.filter(|_| kind == "ban"))
                    .collect::<BTreeSet<usize>>()
                    .into_iter()
                    .collect();
                let mut r = sh.rec();
                let (event, error) = match res {
                    Ok(id) => {
                        r.disturbed(done);
                        (Some(id), None)
                    }
                    Err(e) => (None, Some(e)),
                };
                tracing::info!(%kind, ?target, ?event, ?error, "state change");
                r.changes.push(Change { node: actor, t_ms: now, kind, event, error, dests });
            }
            .instrument(node_span(actor)),
        );
        self.nodes[actor].track(task.abort_handle());
    }

    /// After the workload: the creator (node 0, all-powerful in room version 12) makes the
    /// room public and lifts every ban it sees; then every node whose user is out joins again.
    /// Liveness is then checked over everyone.
    fn spawn_reopen(&mut self) {
        let Some(core) = self.nodes[0].core().cloned() else { return };
        let sh = self.sh.clone();
        let n = self.n();
        let task = tokio::spawn(
            async move {
                let room = sh.room();
                let me = sh.users[0].clone();
                let public = PduTemplate {
                    kind: TimelineEventType::RoomJoinRules,
                    content: json!({"join_rule": "public"}),
                    state_key: Some(String::new()),
                    redacts: None,
                };
                let _ = core.send_event(&me, None, &room, public, None).await;
                for t in 1..n {
                    if matches!(core.membership(&room, &sh.users[t]), Ok(Some(m)) if m == "ban") {
                        let _ = core.set_membership(&me, &room, &sh.users[t], "leave", None, None).await;
                    }
                }
                let now = sh.now();
                sh.rec().disturbed(now);
                for t in 1..n {
                    sh.later(now + 5_000 + 100 * t as u64, Act::Join(t));
                }
            }
            .instrument(node_span(0)),
        );
        self.nodes[0].track(task.abort_handle());
    }

    fn spawn_unban(&mut self, actor: usize, target: usize) {
        let Some(core) = self.nodes[actor].core().cloned() else { return };
        let sh = self.sh.clone();
        let rejoin_ms = ms(self.scn.state_changes.rejoin_after_s);
        let task = tokio::spawn(
            async move {
                let room = sh.room();
                let now = sh.now();
                // Only what a moderator would do: lift a ban they can see.
                if !matches!(core.membership(&room, &sh.users[target]), Ok(Some(m)) if m == "ban") {
                    return;
                }
                let res = core.set_membership(&sh.users[actor], &room, &sh.users[target], "leave", None, None).await;
                let mut dests: Vec<usize> =
                    core.servers_in_room(&room).unwrap_or_default().iter().filter_map(|d| sh.idx_of(d)).collect();
                dests.push(target);
                dests.retain(|&d| d != actor);
                dests.sort_unstable();
                dests.dedup();
                tracing::info!(target, result = ?res, "unban");
                let mut r = sh.rec();
                match res {
                    Ok(id) => {
                        r.disturbed(now);
                        r.changes.push(Change {
                            node: actor,
                            t_ms: now,
                            kind: "unban".into(),
                            event: Some(id),
                            error: None,
                            dests,
                        });
                        drop(r);
                        sh.later(now + rejoin_ms, Act::Join(target));
                    }
                    Err(e) => r.changes.push(Change {
                        node: actor,
                        t_ms: now,
                        kind: "unban".into(),
                        event: None,
                        error: Some(e.to_string()),
                        dests: Vec::new(),
                    }),
                }
            }
            .instrument(node_span(actor)),
        );
        self.nodes[actor].track(task.abort_handle());
    }

    /// Fingerprint of each up node's resolved room state, for nodes whose user is joined.
    pub fn fingerprints(&mut self) -> BTreeMap<usize, u64> {
        let mut out = BTreeMap::new();
        let Some(room) = self.sh.room.get().cloned() else { return out };
        let joined = self.sh.rec().joined.clone();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(core) = node.core() else { continue };
            if !joined[i] {
                continue;
            }
            let Ok(Some(record)) = core.room(&room) else { continue };
            let key = (i, node.incarnation, record.state_group);
            let fp = match self.fingerprints.get(&key) {
                Some(fp) => *fp,
                None => {
                    let Ok(state) = core.current_state(&room) else { continue };
                    let fp = fingerprint(&state);
                    self.fingerprints.insert(key, fp);
                    fp
                }
            };
            out.insert(i, fp);
        }
        out
    }

    /// Look at every node: how many distinct resolved states, and whether every group of
    /// mutually reachable nodes agrees.
    fn sample(&mut self) {
        let now = self.sh.now();
        {
            let mut r = self.sh.rec();
            if !r.dirty {
                if let Some(last) = r.samples.last().cloned() {
                    r.samples.push(Sample { t_ms: now, ..last });
                    return;
                }
            }
            r.dirty = false;
        }
        let fps = self.fingerprints();
        if self.components.is_none() {
            self.components = Some(self.sh.net.components());
        }
        let comps = self.components.as_ref().expect("just set");
        let mut per_comp: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, fp) in &fps {
            per_comp.entry(comps[*i]).or_default().insert(*fp);
            *counts.entry(*fp).or_default() += 1;
        }
        let in_room = fps.len();
        let top = counts.values().copied().max().unwrap_or(0);
        let s = Sample {
            t_ms: now,
            in_room,
            distinct: counts.len(),
            agree: if in_room == 0 { 1.0 } else { top as f64 / in_room as f64 },
            converged: per_comp.values().all(|s| s.len() <= 1),
        };
        self.sh.rec().samples.push(s);
    }

    /// Stop every node.
    pub fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.nodes[i].stop(&self.sh.net);
        }
    }

    /// The current core of node `i`, if up.
    pub fn core(&self, i: usize) -> Option<Arc<Core>> {
        self.nodes[i].core().cloned()
    }

    /// Connected components now.
    pub fn final_components(&self) -> Vec<usize> {
        self.sh.net.components()
    }
}

/// FNV-1a over the state map's entries (in key order).
fn fingerprint(state: &outpost::core::state::StateMap) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= *x as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for ((t, k), id) in state.iter() {
        eat(t.as_bytes());
        eat(k.as_bytes());
        eat(id.as_bytes());
    }
    h
}

/// Watch one incarnation of node `i`: every newly visible timeline event of the room, and its
/// user's membership.
async fn observe(core: Arc<Core>, i: usize, sh: Arc<Shared>) {
    let room = sh.room();
    let user = sh.users[i].clone();
    let mut rx = core.subscribe();
    let mut last = 0u64;
    loop {
        let visible = core.visible_pos();
        'scan: loop {
            let Ok(batch) = core.timeline_after(&room, last, 256) else { return };
            let full = batch.len() == 256;
            for (pos, id) in batch {
                if pos > visible {
                    break 'scan;
                }
                last = pos;
                let Ok(Some(p)) = core.pdu(&id) else { continue };
                if p.kind != TimelineEventType::RoomMessage {
                    continue;
                }
                if let Some(k) = p.content_value().get("sim_id").and_then(|v| v.as_u64()) {
                    let now = sh.now();
                    sh.rec().delivered.entry((k as usize, i)).or_insert(now);
                }
            }
            if !full {
                break;
            }
        }
        let joined = matches!(core.membership(&room, &user), Ok(Some(m)) if m == "join");
        {
            let mut r = sh.rec();
            if r.joined[i] != joined {
                r.joined[i] = joined;
            }
            r.dirty = true;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Join node `i`'s user to the room as a client's `/join` does (`Core::join_room`), offering
/// the resident nodes in reach as `via`; retry until it works (the run's end aborts it).
async fn join_task(core: Arc<Core>, i: usize, sh: Arc<Shared>, retry: Duration, mut rng: StdRng) {
    let room = sh.room();
    let user = sh.users[i].clone();
    let first = sh.now();
    loop {
        if sh.rec().joined[i] {
            return;
        }
        let candidates: Vec<usize> = {
            let r = sh.rec();
            sh.net.neighbours(i).into_iter().filter(|&j| r.joined[j] && r.alive[j]).collect()
        };
        let mut via: Vec<OwnedServerName> = candidates.iter().map(|&j| sh.names[j].clone()).collect();
        via.shuffle(&mut rng);
        via.truncate(3);
        // What a client's `/join` does (locally while this node is in the room, otherwise
        // make_join / send_join through `via`, then servers from the node's last known state).
        let res = core.join_room(&user, &room, None, via).await.map(|_| ()).map_err(|e| e.to_string());
        let now = sh.now();
        match res {
            Ok(()) => {
                let mut r = sh.rec();
                tracing::info!("joined");
                r.joins_ok += 1;
                r.join_ms.push(now - first);
                r.joined[i] = true;
                r.disturbed(now);
                return;
            }
            Err(_) => sh.rec().join_attempts_failed += 1,
        }
        tokio::time::sleep(retry).await;
    }
}

impl World {
    /// The seed used for per-node derivations (for tests).
    pub fn seed(&self) -> u64 {
        self.sh.seed
    }
}

/// A tracing span naming node `i`, so that `RUST_LOG` output says which node logged what.
pub(crate) fn node_span(i: usize) -> tracing::Span {
    tracing::info_span!(parent: None, "node", n = i)
}
