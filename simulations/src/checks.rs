//! The checkers, run once the scenario has settled, and the figures.
//!
//! - **Durability** (safety): every message and state change a node acknowledged is still
//!   there at the end, and every event a node had made visible to its clients is still there,
//!   across crashes and restarts.
//! - **Delivery** (liveness): every accepted message reached every server its origin queued it
//!   for (the servers in the room as the origin saw it) that was connected to the origin
//!   through the scenario's links after it was sent: at the end of the workload every fault is
//!   repaired, so that is every server — except with mobility, where links are physics: there
//!   "connected" means a time-respecting path (which only store-and-forward could use) or, for
//!   `checks.delivery = "direct"`, a direct link lasting [`CONTACT_MS_MIN`] plus one request
//!   timeout after the send.
//! - **Convergence** (liveness): all nodes in the room that can reach each other hold the same
//!   resolved state (`Core::current_state`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::{
    net::LinkChange,
    scenario::Scenario,
    world::{Sample, World},
};

/// A direct contact must last this long after a send, on top of one request timeout (a lost
/// request costs that much), for the checker to expect delivery over it: a transaction,
/// perhaps preceded by `get_missing_events`, takes a few round trips.
pub const CONTACT_MS_MIN: u64 = 5_000;

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The one-line JSON summary (`wall_s` included).
    pub summary: Map<String, Value>,
    /// What the checkers found wrong (empty = the run passed).
    pub failures: Vec<String>,
    /// `(virtual s, delivered share of the pairs expected so far)`.
    pub delivery_curve: Vec<(f64, f64)>,
    /// `(delivery ms, cumulative share)`.
    pub latency_cdf: Vec<(f64, f64)>,
    /// Convergence samples.
    pub samples: Vec<Sample>,
    /// `(virtual s, what)` faults and repairs.
    pub faults: Vec<(f64, String)>,
    /// The scenario as run.
    pub scenario: Scenario,
}

impl Outcome {
    /// Whether every checker passed.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The JSON line without `wall_s` (identical for identical seeds).
    pub fn figures(&self) -> Map<String, Value> {
        let mut m = self.summary.clone();
        m.remove("wall_s");
        m
    }
}

fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

fn ratio(a: usize, b: usize) -> Value {
    if b == 0 {
        Value::Null
    } else {
        json!(((a as f64 / b as f64) * 1e6).round() / 1e6)
    }
}

/// Contact intervals per pair `(a < b)`, `[start, end)`, `end = u64::MAX` while still up.
fn intervals(log: &[LinkChange]) -> BTreeMap<(usize, usize), Vec<(u64, u64)>> {
    let mut out: BTreeMap<(usize, usize), Vec<(u64, u64)>> = BTreeMap::new();
    for c in log {
        let v = out.entry((c.a, c.b)).or_default();
        if c.up {
            v.push((c.t_ms, u64::MAX));
        } else if let Some(last) = v.last_mut() {
            if last.1 == u64::MAX {
                last.1 = c.t_ms;
            }
        }
    }
    out
}

/// For each message `(origin, sent_ms)`, the nodes a time-respecting path from the origin
/// reaches (hops within one stretch of constant links count as instantaneous).
fn reachable(n: usize, log: &[LinkChange], msgs: &[(usize, u64)], end_ms: u64) -> Vec<Vec<bool>> {
    let mut times: Vec<u64> = log.iter().map(|c| c.t_ms).collect();
    times.dedup();
    let mut order: Vec<usize> = (0..msgs.len()).collect();
    order.sort_by_key(|&k| msgs[k].1);
    let mut reached: Vec<Vec<bool>> = msgs
        .iter()
        .map(|(o, _)| {
            let mut r = vec![false; n];
            if *o < n {
                r[*o] = true;
            }
            r
        })
        .collect();
    let mut up: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut li = 0;
    let mut next_msg = 0;
    let mut active: Vec<usize> = Vec::new();
    let mut epoch_starts: Vec<u64> = times.clone();
    epoch_starts.push(end_ms.max(times.last().copied().unwrap_or(0)) + 1);
    for w in 0..epoch_starts.len() {
        let t = epoch_starts[w];
        while li < log.len() && log[li].t_ms <= t {
            let c = log[li];
            if c.up {
                up.insert((c.a, c.b));
            } else {
                up.remove(&(c.a, c.b));
            }
            li += 1;
        }
        let epoch_end = epoch_starts.get(w + 1).copied().unwrap_or(u64::MAX);
        while next_msg < order.len() && msgs[order[next_msg]].1 < epoch_end {
            active.push(order[next_msg]);
            next_msg += 1;
        }
        if active.is_empty() {
            continue;
        }
        // Components of this stretch.
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while p[r] != r {
                r = p[r];
            }
            let mut x = x;
            while p[x] != r {
                let nx = p[x];
                p[x] = r;
                x = nx;
            }
            r
        }
        for &(a, b) in &up {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            if ra != rb {
                parent[ra] = rb;
            }
        }
        let roots: Vec<usize> = (0..n).map(|x| find(&mut parent, x)).collect();
        for &k in &active {
            let r = &mut reached[k];
            let hit: BTreeSet<usize> = (0..n).filter(|&x| r[x]).map(|x| roots[x]).collect();
            for x in 0..n {
                if hit.contains(&roots[x]) {
                    r[x] = true;
                }
            }
        }
    }
    reached
}

/// Run the checkers over a finished world and compute the figures.
pub fn analyze(w: &mut World) -> Outcome {
    let n = w.nodes.len();
    let scn = w.scn.clone();
    let mobility = scn.mobility.is_some();
    let sh = w.sh.clone();
    let room = sh.room.get().cloned();
    let log = sh.net.link_log();
    let (msgs, delivered, samples, faults, changes, joined, alive, joins_ok, join_fail, mut join_ms, crashes, restarts) = {
        let r = sh.rec.lock().unwrap_or_else(|e| e.into_inner());
        (
            r.msgs.clone(),
            r.delivered.clone(),
            r.samples.clone(),
            r.faults.clone(),
            r.changes.clone(),
            r.joined.clone(),
            r.alive.clone(),
            r.joins_ok,
            r.join_attempts_failed,
            r.join_ms.clone(),
            r.crashes,
            r.restarts,
        )
    };
    let last_disturbance = sh.rec.lock().unwrap_or_else(|e| e.into_inner()).last_disturbance_ms;
    let end_ms = w.finish_ms;
    let mut failures: Vec<String> = Vec::new();

    // --- Delivery ---
    let acked: Vec<usize> = (0..msgs.len()).filter(|&k| msgs[k].acked).collect();
    let reach = if mobility {
        let ms: Vec<(usize, u64)> = acked.iter().map(|&k| (msgs[k].origin, msgs[k].sent_ms)).collect();
        Some(reachable(n, &log, &ms, end_ms))
    } else {
        None
    };
    let contacts = intervals(&log);
    let contact_ms_min = CONTACT_MS_MIN + scn.network.request_timeout_ms;
    let direct = |o: usize, d: usize, t: u64| -> bool {
        if !mobility {
            return true;
        }
        let key = (o.min(d), o.max(d));
        contacts
            .get(&key)
            .is_some_and(|iv| iv.iter().any(|&(s, e)| e.min(end_ms).saturating_sub(s.max(t)) >= contact_ms_min))
    };
    let soft_failed_at = |d: usize, id: Option<&ruma::EventId>| -> bool {
        let (Some(core), Some(id)) = (w.core(d), id) else { return false };
        matches!(core.stored_pdu(id), Ok(Some(s)) if s.soft_failed)
    };
    let mut hidden = 0usize;
    let mut expected = 0usize;
    let mut got = 0usize;
    let mut direct_expected = 0usize;
    let mut direct_got = 0usize;
    let mut queued_expected = 0usize;
    let mut queued_got = 0usize;
    let mut member_expected = 0usize;
    let mut member_got = 0usize;
    let mut latencies: Vec<u64> = Vec::new();
    let mut deliveries: Vec<(u64, u64)> = Vec::new(); // (sent, delivered or MAX) of expected pairs
    let mut missing: Vec<String> = Vec::new();
    let mut missing_direct: Vec<String> = Vec::new();
    for (ai, &k) in acked.iter().enumerate() {
        let m = &msgs[k];
        for &d in &m.dests {
            if d >= n || !alive[d] {
                continue;
            }
            let reachable = reach.as_ref().is_none_or(|r| r[ai][d]);
            let at = delivered.get(&(k, d)).copied();
            queued_expected += 1;
            queued_got += usize::from(at.is_some());
            if direct(m.origin, d, m.sent_ms) {
                direct_expected += 1;
                if at.is_some() || soft_failed_at(d, m.event.as_deref()) {
                    direct_got += 1;
                } else if missing_direct.len() < 5 {
                    missing_direct.push(format!("message {k} from node {} to node {d}", m.origin));
                }
            }
            if !reachable {
                continue;
            }
            expected += 1;
            deliveries.push((m.sent_ms, at.unwrap_or(u64::MAX)));
            match at {
                Some(t) => {
                    got += 1;
                    latencies.push(t.saturating_sub(m.sent_ms));
                }
                // Received but soft-failed (its sender had lost the right to send by the time
                // it arrived): the protocol hides it on purpose.
                None if soft_failed_at(d, m.event.as_deref()) => {
                    got += 1;
                    hidden += 1;
                    if std::env::var_os("OUTPOST_SIM_DUMP").is_some() {
                        let core = w.core(d);
                        let id = m.event.clone();
                        let info = core.zip(id).and_then(|(c, id)| {
                            let st = c.stored_pdu(&id).ok().flatten()?;
                            let before = c.state_of_group(st.state_before).ok()?;
                            let p = c.pdu(&id).ok().flatten()?;
                            let mem = before.get(&("m.room.member".to_owned(), p.sender.to_string())).cloned();
                            Some(format!("prevs {} sender member before {:?}", p.prev_events.len(), mem))
                        });
                        eprintln!(
                            "soft-failed: message {k} from node {} at node {d} sent {} ms: {info:?}",
                            m.origin, m.sent_ms
                        );
                    }
                }
                None if missing.len() < 5 => missing.push(format!("message {k} from node {} to node {d}", m.origin)),
                None => {}
            }
        }
        for &d in &m.members {
            if d < n && alive[d] {
                member_expected += 1;
                if delivered.contains_key(&(k, d)) {
                    member_got += 1;
                }
            }
        }
    }
    // State changes: checked at the end (stored in the DAG — in the timeline or soft-failed —
    // at every server the actor queued them for).
    let mut state_expected = 0usize;
    let mut state_got = 0usize;
    for c in &changes {
        let Some(id) = &c.event else { continue };
        for &d in &c.dests {
            if d >= n || !alive[d] || !direct(c.node, d, c.t_ms) {
                continue;
            }
            state_expected += 1;
            match w.core(d).map(|core| core.stored_pdu(id)) {
                Some(Ok(Some(s))) if !s.outlier => state_got += 1,
                _ if missing.len() < 5 => {
                    missing.push(format!("{} change {id} from node {} to node {d}", c.kind, c.node))
                }
                _ => {}
            }
        }
    }
    // Without state changes nobody loses the right to send: in a network that ends fully
    // connected, a soft-failed (hidden) message is a wrong verdict, not the protocol doing its
    // job. (In a partial mesh a node can lack a sender's join — it is only reported there.)
    let visibility_ok = scn.state_changes.count > 0 || scn.checks.delivery != "reachable" || mobility || hidden == 0;
    if !visibility_ok {
        failures.push(format!(
            "visibility: {hidden} deliveries were soft-failed (hidden from the recipients) although no membership \
             changed but joins"
        ));
    }
    let delivery_ok = match scn.checks.delivery.as_str() {
        "reachable" => got == expected && state_got == state_expected,
        "direct" => direct_got == direct_expected,
        _ => true,
    };
    if !delivery_ok {
        let (a, b, ex) = if scn.checks.delivery == "direct" {
            (direct_got, direct_expected, &missing_direct)
        } else {
            (got, expected, &missing)
        };
        failures.push(format!(
            "delivery: {a} of {b} expected message deliveries and {state_got} of {state_expected} state event \
             deliveries happened; missing e.g. {}",
            ex.join(", ")
        ));
    }
    latencies.sort_unstable();

    // --- Durability ---
    let mut lost: Vec<String> = Vec::new();
    let has = |i: usize, id: &ruma::EventId| -> Option<bool> {
        let core = w.core(i)?;
        Some(matches!(core.stored_pdu(id), Ok(Some(s)) if !s.outlier))
    };
    for &k in &acked {
        let m = &msgs[k];
        if let Some(id) = &m.event {
            if has(m.origin, id) == Some(false) {
                lost.push(format!("node {} lost its acknowledged message {k}", m.origin));
            }
            for (&(mk, node), _) in delivered.range((k, 0)..(k + 1, 0)) {
                debug_assert_eq!(mk, k);
                if has(node, id) == Some(false) {
                    lost.push(format!("node {node} lost message {k} it had shown to its clients"));
                }
            }
        }
    }
    for c in &changes {
        if let Some(id) = &c.event {
            if has(c.node, id) == Some(false) {
                lost.push(format!("node {} lost its acknowledged {} change {id}", c.node, c.kind));
            }
        }
    }
    let durability_ok = lost.is_empty();
    if !durability_ok && scn.checks.durability {
        failures.push(format!("durability: {} losses, e.g. {}", lost.len(), lost[..lost.len().min(5)].join("; ")));
    }

    // --- Convergence ---
    let fps = w.fingerprints();
    let comps = w.final_components();
    let mut per_comp: BTreeMap<usize, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, fp) in &fps {
        per_comp.entry(comps[*i]).or_default().entry(*fp).or_default().push(*i);
    }
    let mut converged = per_comp.values().all(|m| m.len() <= 1);
    // Nodes that think they are out of the room are not compared; but the others must agree.
    let mut outcasts = Vec::new();
    if let Some(room) = &room {
        for groups in per_comp.values() {
            let Some((_, holders)) = groups.iter().max_by_key(|(_, v)| v.len()) else { continue };
            let Some(core) = w.core(holders[0]) else { continue };
            let Ok(consensus) = core.current_state(room) else { continue };
            let comp = comps[holders[0]];
            for i in (0..n).filter(|i| comps[*i] == comp && !fps.contains_key(i) && w.core(*i).is_some()) {
                let joined_there = consensus
                    .get(&("m.room.member".to_owned(), sh.users[i].to_string()))
                    .and_then(|id| core.pdu(id).ok().flatten())
                    .is_some_and(|p| p.content_value().get("membership").and_then(|m| m.as_str()) == Some("join"));
                if joined_there {
                    outcasts.push(i);
                }
            }
        }
    }
    if !outcasts.is_empty() {
        converged = false;
    }
    if std::env::var_os("OUTPOST_SIM_DUMP").is_some() {
        dump(w, room.as_ref());
    }
    let distinct_end: BTreeSet<u64> = fps.values().copied().collect();
    if !converged && scn.checks.convergence {
        let mut detail = Vec::new();
        for groups in per_comp.values().filter(|m| m.len() > 1) {
            let mut sides: Vec<&Vec<usize>> = groups.values().collect();
            sides.sort_by_key(|v| std::cmp::Reverse(v.len()));
            detail.push(format!("nodes split into states {:?}", sides));
            if let (Some(room), Some(a), Some(b)) = (&room, sides.first(), sides.get(1)) {
                if let (Some(ca), Some(cb)) = (w.core(a[0]), w.core(b[0])) {
                    if let (Ok(sa), Ok(sb)) = (ca.current_state(room), cb.current_state(room)) {
                        let keys: BTreeSet<_> = sa.keys().chain(sb.keys()).collect();
                        let diff: Vec<String> = keys
                            .into_iter()
                            .filter(|k| sa.get(*k) != sb.get(*k))
                            .take(4)
                            .map(|k| format!("{}/{}", k.0, k.1))
                            .collect();
                        detail.push(format!("node {} vs node {} differ at {}", a[0], b[0], diff.join(", ")));
                        if std::env::var_os("OUTPOST_SIM_DUMP").is_some() {
                            for k in sa.keys().chain(sb.keys()).filter(|k| sa.get(*k) != sb.get(*k)).take(4) {
                                let status = |c: &outpost::core::Core, id: Option<&ruma::OwnedEventId>| match id {
                                    None => "-".to_owned(),
                                    Some(id) => match c.stored_pdu(id) {
                                        Ok(Some(s)) => format!(
                                            "{id} (outlier {}, soft_failed {}, depth {})",
                                            s.outlier,
                                            s.soft_failed,
                                            c.pdu(id).ok().flatten().map(|p| p.depth).unwrap_or(0)
                                        ),
                                        _ => format!("{id} (missing)"),
                                    },
                                };
                                eprintln!(
                                    "  {k:?}: node {} has {}; node {} has {}; node {} knows the first as {}",
                                    a[0],
                                    status(&ca, sa.get(k)),
                                    b[0],
                                    status(&cb, sb.get(k)),
                                    b[0],
                                    status(&cb, sa.get(k))
                                );
                            }
                        }
                    }
                }
            }
        }
        if !outcasts.is_empty() {
            detail.push(format!("nodes {outcasts:?} think their user is out of the room; the others say joined"));
        }
        failures.push(format!("convergence: {}", detail.join("; ")));
    }
    let convergence_ms = if converged {
        // First sample at or after the last disturbance from which every later sample agreed.
        let mut from: Option<u64> = None;
        for s in samples.iter().filter(|s| s.t_ms >= last_disturbance) {
            if s.converged {
                from.get_or_insert(s.t_ms);
            } else {
                from = None;
            }
        }
        from.map(|t| t - last_disturbance)
    } else {
        None
    };

    // --- Curves ---
    let mut delivery_curve = Vec::new();
    let points = 200u64;
    for p in 0..=points {
        let t = end_ms * p / points;
        let due = deliveries.iter().filter(|(s, _)| *s <= t).count();
        let done = deliveries.iter().filter(|(s, d)| *s <= t && *d <= t).count();
        if due > 0 {
            delivery_curve.push((t as f64 / 1000.0, done as f64 / due as f64));
        }
    }
    let mut latency_cdf = Vec::new();
    let step = (latencies.len() / 400).max(1);
    for (i, l) in latencies.iter().enumerate() {
        if i % step == 0 || i + 1 == latencies.len() {
            latency_cdf.push((*l as f64, (i + 1) as f64 / latencies.len() as f64));
        }
    }

    // --- Summary ---
    join_ms.sort_unstable();
    let accepted_changes = changes.iter().filter(|c| c.event.is_some()).count();
    let unacked_delivered =
        (0..msgs.len()).filter(|&k| !msgs[k].acked && delivered.range((k, 0)..(k + 1, 0)).next().is_some()).count();
    let stats = sh.net.stats();
    let mut s = Map::new();
    s.insert("scenario".into(), json!(scn.name));
    s.insert("seed".into(), json!(scn.seed));
    s.insert("nodes".into(), json!(n));
    s.insert("messages_attempted".into(), json!(msgs.len()));
    s.insert("messages_sent".into(), json!(acked.len()));
    s.insert("messages_unacknowledged_but_delivered".into(), json!(unacked_delivered));
    s.insert("pairs_expected".into(), json!(expected));
    s.insert("pairs_delivered".into(), json!(got));
    s.insert("pairs_soft_failed".into(), json!(hidden));
    s.insert("state_pairs_expected".into(), json!(state_expected));
    s.insert("state_pairs_delivered".into(), json!(state_got));
    s.insert("delivered_ratio".into(), ratio(got, expected));
    s.insert("delivered_ratio_members".into(), ratio(member_got, member_expected));
    if mobility {
        s.insert("pairs_direct".into(), json!(direct_expected));
        s.insert("delivered_ratio_direct".into(), ratio(direct_got, direct_expected));
        s.insert("pairs_queued".into(), json!(queued_expected));
        s.insert("delivered_ratio_queued".into(), ratio(queued_got, queued_expected));
    }
    s.insert("delivery_ms_p50".into(), json!(pct(&latencies, 0.5)));
    s.insert("delivery_ms_p99".into(), json!(pct(&latencies, 0.99)));
    s.insert("delivery_ms_max".into(), json!(latencies.last()));
    s.insert("converged".into(), json!(converged));
    s.insert("convergence_ms".into(), json!(convergence_ms));
    s.insert("states_distinct_end".into(), json!(distinct_end.len()));
    s.insert("nodes_in_room_end".into(), json!(fps.len()));
    s.insert("nodes_joined_end".into(), json!(joined.iter().filter(|j| **j).count()));
    s.insert("joins_ok".into(), json!(joins_ok));
    s.insert("join_attempts_failed".into(), json!(join_fail));
    s.insert("join_ms_p50".into(), json!(pct(&join_ms, 0.5)));
    s.insert("join_ms_max".into(), json!(join_ms.last()));
    s.insert("state_changes_attempted".into(), json!(changes.len()));
    s.insert("state_changes_accepted".into(), json!(accepted_changes));
    s.insert("crashes".into(), json!(crashes));
    s.insert("restarts".into(), json!(restarts));
    s.insert("net".into(), serde_json::to_value(&stats).unwrap_or(Value::Null));
    s.insert("check_delivery".into(), json!(delivery_ok));
    s.insert("check_durability".into(), json!(durability_ok));
    s.insert("check_visibility".into(), json!(visibility_ok));
    s.insert("check_convergence".into(), json!(converged));
    s.insert("ok".into(), json!(failures.is_empty()));
    s.insert("virtual_s".into(), json!(end_ms as f64 / 1000.0));

    Outcome {
        summary: s,
        failures,
        delivery_curve,
        latency_cdf,
        samples,
        faults: faults.into_iter().map(|(t, f)| (t as f64 / 1000.0, f)).collect(),
        scenario: scn,
    }
}

/// Every node's view of the room, on stderr (set `OUTPOST_SIM_DUMP=1`), for postmortems.
fn dump(w: &World, room: Option<&ruma::OwnedRoomId>) {
    let Some(room) = room else { return };
    for i in 0..w.nodes.len() {
        let Some(core) = w.core(i) else {
            eprintln!("node {i}: down");
            continue;
        };
        let Ok(state) = core.current_state(room) else { continue };
        let mut members = Vec::new();
        for ((t, k), id) in state.iter() {
            if t == "m.room.member" {
                let m = core.pdu(id).ok().flatten().map(|p| p.content_value()["membership"].to_string());
                let who = w.sh.users.iter().position(|u| u.as_str() == k).map(|x| x.to_string()).unwrap_or(k.clone());
                members.push(format!("{who}:{}", m.unwrap_or_default().trim_matches('"')));
            }
        }
        let jr = core
            .state_event(room, "m.room.join_rules", "")
            .ok()
            .flatten()
            .map(|p| p.content_value()["join_rule"].to_string());
        let exts = core.extremities(room).unwrap_or_default();
        let exts_all = exts.clone();
        let exts_len = exts.len();
        eprintln!("node {i}: join_rule {jr:?} extremities {} members {}", exts.len(), members.join(" "));
        for e in exts {
            let Ok(Some(st)) = core.stored_pdu(&e) else { continue };
            let p = core.pdu(&e).ok().flatten();
            let after = core.state_after(&st).ok();
            let m = |u: &str| {
                after
                    .as_ref()
                    .and_then(|a| a.get(&("m.room.member".to_owned(), u.to_owned())).cloned())
                    .map(|id| id.to_string())
                    .unwrap_or_default()
            };
            let own = m(w.sh.users[i].as_str());
            let elsewhere: Vec<String> = (0..w.nodes.len())
                .filter(|j| *j != i)
                .map(|j| {
                    let Some(c) = w.core(j) else { return format!("{j}:down") };
                    let referenced = c.is_built_on(room, &e).unwrap_or(false);
                    match c.stored_pdu(&e).ok().flatten() {
                        None => format!("{j}:missing"),
                        Some(s) if s.outlier => format!("{j}:outlier"),
                        Some(s) if s.soft_failed => format!("{j}:soft-failed"),
                        Some(_) if referenced => format!("{j}:built-on"),
                        Some(_) => format!("{j}:extremity"),
                    }
                })
                .collect();
            eprintln!(
                "    ext {e} depth {} {} by {}; own member after: {own}; elsewhere {}",
                p.as_ref().map(|p| p.depth).unwrap_or(0),
                p.as_ref().map(|p| p.kind.to_string()).unwrap_or_default(),
                p.as_ref().map(|p| p.sender.to_string()).unwrap_or_default().chars().take(6).collect::<String>(),
                elsewhere.join(" ")
            );
        }
        if exts_len > 1 {
            dump_conflicts(w, &core, &state, &exts_all);
        }
    }
}

/// For a forked node: every `(type, state_key)` on which the states after its forward
/// extremities differ, each side's event, and what the resolution (the node's current state)
/// chose.
fn dump_conflicts(
    w: &World,
    core: &outpost::core::Core,
    resolved: &outpost::core::state::StateMap,
    exts: &[ruma::OwnedEventId],
) {
    let describe = |id: Option<&ruma::OwnedEventId>| -> String {
        let Some(id) = id else { return "-".to_owned() };
        let Some(p) = core.pdu(id).ok().flatten() else { return format!("{id} (unknown)") };
        let c = p.content_value();
        let what = match p.kind.to_string().as_str() {
            "m.room.member" => c["membership"].to_string(),
            "m.room.join_rules" => c["join_rule"].to_string(),
            "m.room.power_levels" => c["users"].to_string().chars().take(60).collect(),
            _ => String::new(),
        };
        let who = w.sh.users.iter().position(|u| *u == p.sender).map(|x| x.to_string()).unwrap_or_default();
        let st = core.stored_pdu(id).ok().flatten();
        format!(
            "{} {what} by u{who} depth {} ts {}{}",
            &id.as_str()[..8],
            p.depth,
            u64::from(p.origin_server_ts.get()) % 1_000_000,
            st.map(|s| if s.soft_failed {
                " (soft-failed)"
            } else if s.outlier {
                " (outlier)"
            } else {
                ""
            })
            .unwrap_or("")
        )
    };
    let states: Vec<_> =
        exts.iter().filter_map(|e| core.stored_pdu(e).ok().flatten().and_then(|s| core.state_after(&s).ok())).collect();
    let keys: BTreeSet<_> = states.iter().flat_map(|s| s.keys().cloned()).collect();
    for k in keys {
        let vals: Vec<_> = states.iter().map(|s| s.get(&k)).collect();
        if vals.iter().all(|v| *v == vals[0]) {
            continue;
        }
        let key = w.sh.users.iter().position(|u| u.as_str() == k.1).map(|x| format!("u{x}")).unwrap_or(k.1.clone());
        eprintln!("      conflict {} {key}:", k.0);
        for (e, v) in exts.iter().zip(&vals) {
            eprintln!("        after {}: {}", &e.as_str()[..8], describe(*v));
        }
        eprintln!("        resolved: {}", describe(resolved.get(&k)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachability_is_time_respecting() {
        // 0–1 up during [0, 10), 1–2 up during [20, 30): a message from 0 at 5 reaches 2
        // (via 1, later); a message from 2 at 5 reaches nobody before 20, then 1, never 0.
        let log = vec![
            LinkChange { t_ms: 0, a: 0, b: 1, up: true },
            LinkChange { t_ms: 10, a: 0, b: 1, up: false },
            LinkChange { t_ms: 20, a: 1, b: 2, up: true },
            LinkChange { t_ms: 30, a: 1, b: 2, up: false },
        ];
        let r = reachable(3, &log, &[(0, 5), (2, 5)], 40);
        assert_eq!(r[0], vec![true, true, true]);
        assert_eq!(r[1], vec![false, true, true]);
    }

    #[test]
    fn percentiles() {
        assert_eq!(pct(&[], 0.5), None);
        assert_eq!(pct(&[1, 2, 3, 4, 5], 0.5), Some(3));
        assert_eq!(pct(&[1, 2, 3, 4, 5], 0.99), Some(5));
    }
}
