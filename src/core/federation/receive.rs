//! Receiving PDUs from other servers: the spec's "checks performed on receipt of a PDU", in
//! order, with the step numbers of the server-server spec as comments.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ruma::{
    api::federation::event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    canonical_json::CanonicalJsonObject,
    room_version_rules::RoomVersionRules,
    signatures::{required_server_signatures_to_verify_event, verify_event, Verified},
    state_res::{check_pdu_format, check_state_dependent_auth_rules, check_state_independent_auth_rules},
    EventId, OwnedEventId, OwnedRoomId, RoomId, ServerName, UInt,
};
use serde_json::value::RawValue;

use super::{super::state::StateMap, key_map_for};
use crate::core::{
    pdu::{self, event_id_of, rules_for, Pdu, SignedPdu, MAX_PDU_BYTES},
    Core, Error, Result,
};

/// What became of a received PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PduOutcome {
    /// Stored and part of the room.
    Accepted,
    /// Stored, but it fails the auth rules against the current state: not shown to clients and
    /// not built upon (spec: soft failure).
    SoftFailed,
    /// Already known.
    Duplicate,
    /// Dropped; the string says why.
    Rejected(String),
}

/// How far to look for missing history with `get_missing_events`.
const MISSING_EVENTS_LIMIT: u32 = 100;
/// Most events fetched to fill a gap (over every round and server), or one by one for the
/// `state_ids` fallback.
const MAX_FETCH_EVENTS: usize = 500;
/// `get_missing_events` requests to one server for one gap.
const MAX_GAP_ROUNDS: usize = 5;
/// Servers besides the origin asked to fill a gap.
const MAX_GAP_HELPERS: usize = 3;
/// Missing events fetched one by one from a server that does not hold what needs them.
const MAX_GAP_DIRECT: usize = 10;
/// Events of one gap that may still lack prev events once the gap is filled as far as it
/// goes, and get the state before them with `state_ids` (one request each).
const MAX_GAP_STATE_FALLBACKS: usize = 20;

/// What [`Core::handle_pdu`] may ask other servers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fetch {
    /// Missing prev events (`get_missing_events`), missing auth events, and the state before
    /// the event (`state_ids`) when its prev events stay missing.
    All,
    /// Auth events and `state_ids`, but no gap walk (an event found while filling a gap).
    NoGap,
    /// Nothing: an event whose prev events are missing is rejected.
    Nothing,
}

/// A PDU of a received transaction, its steps 1–3 run (`checked`) when its room is known.
struct PendingPdu {
    room: OwnedRoomId,
    raw: Box<RawValue>,
    checked: Option<std::result::Result<SignedPdu, String>>,
}

fn reject(msg: impl Into<String>) -> PduOutcome {
    PduOutcome::Rejected(msg.into())
}

impl Core {
    /// Steps 1–3 of the receipt checks: format, signatures, hashes (redacting on mismatch).
    /// Returns the event id, the (possibly redacted) object and the parsed PDU.
    pub fn verify_pdu(&self, rules: &RoomVersionRules, raw: &RawValue) -> std::result::Result<SignedPdu, String> {
        verify_pdu(rules, raw)
    }

    /// [`Core::verify_pdu`] for many PDUs, spread over the runtime's blocking threads when the
    /// runtime has several workers (a transaction of 50 PDUs is ~3 ms of signature and hash
    /// checks). Results come back in the order of `jobs`.
    async fn verify_pdus(
        jobs: Vec<(RoomVersionRules, Box<RawValue>)>,
    ) -> Vec<(Box<RawValue>, std::result::Result<SignedPdu, String>)> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let verify_chunk = |chunk: Vec<(RoomVersionRules, Box<RawValue>)>| {
            chunk
                .into_iter()
                .map(|(rules, raw)| {
                    let v = verify_pdu(&rules, &raw);
                    (raw, v)
                })
                .collect::<Vec<_>>()
        };
        if !multi || threads < 2 || jobs.len() < 8 {
            return verify_chunk(jobs);
        }
        let per = jobs.len().div_ceil(threads);
        let mut jobs = jobs.into_iter();
        let mut handles = Vec::new();
        loop {
            let chunk: Vec<_> = jobs.by_ref().take(per).collect();
            if chunk.is_empty() {
                break;
            }
            handles.push(tokio::task::spawn_blocking(move || verify_chunk(chunk)));
        }
        let mut out = Vec::new();
        for h in handles {
            match h.await {
                Ok(v) => out.extend(v),
                // A panic in a verifier (it should not happen) is not a verdict on the PDU:
                // resume it so the request fails like any other bug would.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        out
    }
}

/// Steps 1–3 of the receipt checks (see [`Core::verify_pdu`]).
fn verify_pdu(rules: &RoomVersionRules, raw: &RawValue) -> std::result::Result<SignedPdu, String> {
    if raw.get().len() > MAX_PDU_BYTES {
        return Err(format!("PDU over {MAX_PDU_BYTES} bytes"));
    }
    let mut object: CanonicalJsonObject =
        serde_json::from_str(raw.get()).map_err(|e| format!("not canonical JSON: {e}"))?;
    // 1. Is a valid event, otherwise it is dropped.
    check_pdu_format(&object, &rules.event_format).map_err(|e| format!("invalid format: {e}"))?;
    let event_id = event_id_of(&object, rules).map_err(|e| e.to_string())?;
    // 2. Passes signature checks, otherwise it is dropped.
    let servers = required_server_signatures_to_verify_event(&object, &rules.signatures)
        .map_err(|e| format!("cannot tell who must sign: {e}"))?;
    let keys = key_map_for(servers.iter().map(|s| s.as_ref())).map_err(|e| e.to_string())?;
    let verified = verify_event(&keys, &object, rules).map_err(|e| format!("bad signature: {e}"))?;
    // 3. Passes hash checks, otherwise it is redacted before being processed further.
    if verified == Verified::Signatures {
        object = pdu::redacted_object(object, rules, None).map_err(|e| e.to_string())?;
    }
    let json = serde_json::to_string(&object).map_err(|e| e.to_string())?;
    let pdu = Pdu::from_json(event_id.clone(), &json).map_err(|e| e.to_string())?;
    Ok(SignedPdu { event_id, object, pdu })
}

impl Core {
    /// Handle a `/send` transaction from `origin` (already authenticated as that peer): its
    /// to-device EDUs, its PDUs, then its other EDUs (`edu.rs`), so that a receipt can name an
    /// event of the same transaction.
    pub async fn receive_transaction(
        self: &Arc<Self>,
        origin: &ServerName,
        txn_id: &str,
        pdus: Vec<Box<RawValue>>,
        edus: Vec<ruma::serde::Raw<ruma::api::federation::transactions::edu::Edu>>,
    ) -> Result<BTreeMap<OwnedEventId, std::result::Result<(), String>>> {
        if pdus.len() > super::sender::MAX_PDUS_PER_TXN {
            return Err(Error::TooLarge("a transaction carries at most 50 PDUs".into()));
        }
        if edus.len() > super::edu::MAX_EDUS_PER_TXN {
            return Err(Error::TooLarge("a transaction carries at most 100 EDUs".into()));
        }
        // One origin's transactions one at a time, in arrival order (it may have two on their
        // way, see `Core::drain_queue`: a later one builds on the earlier one's PDUs). The lock
        // is released before the flush, so the next one is processed while this one is made
        // durable; each is answered only after its flush.
        let origin_lock = self.fed.origin_lock(origin);
        let began_ms = self.now_ms();
        let n = pdus.len();
        let n_edus = edus.len();
        // Steps 1–3 need no lock: while the origin's previous transaction is checked against
        // the room, this one's signatures and hashes are checked beside it.
        let pdus = self.verify_transaction_pdus(pdus).await?;
        // One flush for the whole transaction, before we answer (see `with_deferred_flush`).
        let results = self
            .with_deferred_flush(async {
                let _serial = origin_lock.lock().await;
                if self.last_txn(origin)?.as_deref() == Some(txn_id) {
                    return Ok(BTreeMap::new());
                }
                // To-device messages first: they carry the room keys of encrypted events that
                // come later in the sender's queue and may ride in the same transaction; a
                // client that saw such an event before its key would show it undecryptable.
                let (to_device, other): (Vec<_>, Vec<_>) = edus.into_iter().partition(|e| {
                    e.get_field::<String>("edu_type").ok().flatten().as_deref() == Some("m.direct_to_device")
                });
                self.receive_edus(origin, to_device).await?;
                let results = self.receive_pdus(origin, pdus).await?;
                self.receive_edus(origin, other).await?;
                self.set_last_txn(origin, txn_id).await.map(|()| results)
            })
            .await?;
        if let Ok(r) = &results {
            let rejected = r.values().filter(|v| v.is_err()).count();
            let ms = self.now_ms().saturating_sub(began_ms);
            tracing::debug!(%origin, txn_id, pdus = n, edus = n_edus, rejected, ms, "transaction received");
        }
        results
    }

    /// Steps 1–3 (format, signatures, hashes) of a transaction's PDUs: they need nothing from
    /// the store but the room version, so they run for the whole transaction first, in
    /// parallel. A PDU of a room we are not in (yet) is checked on its own later
    /// (`checked` is `None`); one without a room is dropped (nothing to check it against).
    async fn verify_transaction_pdus(&self, pdus: Vec<Box<RawValue>>) -> Result<Vec<PendingPdu>> {
        #[derive(serde::Deserialize)]
        struct RoomOf {
            room_id: Option<OwnedRoomId>,
        }
        let mut rooms = Vec::new();
        let mut jobs = Vec::new();
        let mut unverified = Vec::new();
        for raw in pdus {
            let Some(room) = serde_json::from_str::<RoomOf>(raw.get()).ok().and_then(|r| r.room_id) else {
                continue;
            };
            match self.room(&room)?.map(|r| rules_for(&r.version)).transpose()? {
                Some(rules) => {
                    rooms.push(room);
                    jobs.push((rules, raw));
                }
                None => unverified.push((room, raw)),
            }
        }
        let verified = Self::verify_pdus(jobs).await.into_iter().map(|(raw, v)| (raw, Some(v)));
        Ok(rooms
            .into_iter()
            .zip(verified)
            .chain(unverified.into_iter().map(|(room, raw)| (room, (raw, None))))
            .map(|(room, (raw, checked))| PendingPdu { room, raw, checked })
            .collect())
    }

    async fn receive_pdus(
        self: &Arc<Self>,
        origin: &ServerName,
        pdus: Vec<PendingPdu>,
    ) -> Result<BTreeMap<OwnedEventId, std::result::Result<(), String>>> {
        let mut results = BTreeMap::new();
        let mut retry = false;
        for PendingPdu { room, raw, checked } in pdus {
            match self.handle_pdu(origin, &room, &raw, checked, Fetch::All).await {
                Ok((id, PduOutcome::Rejected(why))) => {
                    tracing::info!(%origin, event_id = %id, reason = %why, "rejected PDU");
                    results.insert(id, Err(why));
                }
                Ok((id, _)) => {
                    results.insert(id, Ok(()));
                }
                // Our join is still on its way (the resident passed us events before its
                // send_join answer reached us): have the transaction sent again.
                Err(Error::NotFound(_)) if self.room(&room)?.is_none() && self.is_joining(&room) => {
                    tracing::debug!(%origin, %room, "PDU for a room we are still joining; retry later");
                    retry = true;
                }
                Err(e) if super::is_transient(&e) => {
                    tracing::info!(%origin, %room, error = %e, "PDU not processed; the transaction will be retried");
                    retry = true;
                }
                Err(e) => tracing::info!(%origin, %room, error = %e, "PDU not processed"),
            }
        }
        if retry {
            // Answering 200 would drop the PDU for good: the sender deletes what we
            // acknowledge. Fail the transaction instead; the sender's durable queue sends it
            // again (what we did accept is then a duplicate).
            return Err(Error::Unknown("could not fetch what some PDUs depend on; retry the transaction".into()));
        }
        Ok(results)
    }

    fn last_txn(&self, origin: &ServerName) -> Result<Option<String>> {
        Ok(self
            .store
            .get(crate::store::Tree::FedTxns, origin.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    async fn set_last_txn(&self, origin: &ServerName, txn: &str) -> Result<()> {
        let mut b = crate::store::Batch::new();
        b.put(crate::store::Tree::FedTxns, origin.as_bytes().to_vec(), txn.as_bytes().to_vec());
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Run every receipt check on one PDU of a room we are in, fetching what is missing from
    /// `origin` when `fetch` is true, and store it. Returns the event id and the outcome.
    pub async fn handle_incoming_pdu(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        raw: &RawValue,
        fetch: bool,
    ) -> Result<(OwnedEventId, PduOutcome)> {
        self.handle_pdu(origin, room, raw, None, if fetch { Fetch::All } else { Fetch::Nothing }).await
    }

    /// [`Core::handle_incoming_pdu`], with steps 1–3 already run (`checked`) under the rules of
    /// the room's version.
    async fn handle_pdu(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        raw: &RawValue,
        checked: Option<std::result::Result<SignedPdu, String>>,
        fetch: Fetch,
    ) -> Result<(OwnedEventId, PduOutcome)> {
        let record = self.room(room)?.ok_or_else(|| Error::NotFound(format!("not in room {room}")))?;
        let rules = rules_for(&record.version)?;
        let signed = match checked.unwrap_or_else(|| self.verify_pdu(&rules, raw)) {
            Ok(s) => s,
            Err(why) => {
                let id = serde_json::from_str::<CanonicalJsonObject>(raw.get())
                    .ok()
                    .and_then(|o| event_id_of(&o, &rules).ok())
                    .unwrap_or_else(|| EventId::parse("$invalid").expect("valid"));
                return Ok((id, reject(why)));
            }
        };
        let id = signed.event_id.clone();
        if signed.pdu.room != room {
            return Ok((id, reject("room_id does not match")));
        }
        if let Some(stored) = self.stored_pdu(&id)? {
            if !stored.outlier {
                return Ok((id, PduOutcome::Duplicate));
            }
        }
        // Missing prev events: ask the origin for the gap (get_missing_events) first — the
        // event's auth events are usually in it, and so become part of the DAG rather than
        // outliers the gap could then not be connected through.
        let mut missing: Vec<OwnedEventId> =
            signed.pdu.prev_events.iter().filter(|p| self.is_missing(p)).cloned().collect();
        if !missing.is_empty() && fetch == Fetch::All {
            self.fetch_missing_prev_events(origin, room, &rules, &signed.pdu).await?;
            missing.retain(|p| self.is_missing(p));
        }
        // 4. Passes authorization rules based on the event's auth events, otherwise it is
        //    rejected. (Missing auth events are fetched and checked first.)
        if fetch != Fetch::Nothing {
            self.fetch_missing_auth_events(origin, room, &rules, &signed.pdu).await?;
        }
        if let Err(e) = check_state_independent_auth_rules(&rules.authorization, &signed.pdu, |id: &EventId| {
            self.pdu(id).ok().flatten()
        }) {
            return Ok((id, reject(format!("auth events: {e}"))));
        }
        let mut auth_state: StateMap = self.auth_event_state(&signed.pdu)?;
        // Room v12 leaves the create event out of auth_events (the room id names it).
        auth_state.entry(("m.room.create".to_owned(), String::new())).or_insert_with(|| record.create_event.clone());
        if let Err(e) = check_state_dependent_auth_rules(&rules.authorization, &signed.pdu, |t, k| {
            auth_state.get(&(t.to_string(), k.to_owned())).and_then(|id| self.pdu(id).ok().flatten())
        }) {
            return Ok((id, reject(format!("auth events: {e}"))));
        }
        // Prev events the gap did not connect: ask the origin for the state at the event
        // (state_ids).
        let before_override = if missing.is_empty() {
            None
        } else if fetch != Fetch::Nothing {
            Some(self.fetch_state_at_anywhere(origin, room, &rules, &id).await?)
        } else {
            return Ok((id, reject("prev events unknown")));
        };
        // 5.–6. Auth against the state before the event, otherwise rejected; then against the
        //    current state, otherwise soft-failed (both in `store_remote_pdu`).
        let outcome = self.store_remote_pdu(room, &rules, signed, before_override).await?;
        Ok((id, outcome))
    }

    /// Whether `id` is NOT stored as a non-outlier (i.e. it is missing from the DAG).
    fn is_missing(&self, id: &EventId) -> bool {
        !matches!(self.stored_pdu(id), Ok(Some(s)) if !s.outlier)
    }

    /// The state formed by an event's auth events.
    fn auth_event_state(&self, pdu: &Pdu) -> Result<StateMap> {
        let mut m = StateMap::new();
        for a in &pdu.auth_events {
            if let Some(p) = self.pdu(a)? {
                if let Some(k) = &p.state_key {
                    m.insert((p.kind.to_string(), k.clone()), a.clone());
                }
            }
        }
        Ok(m)
    }

    /// Fetch (from `origin`) and store as outliers the auth events of `pdu` we lack, checking
    /// each in turn.
    async fn fetch_missing_auth_events(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        rules: &RoomVersionRules,
        pdu: &Pdu,
    ) -> Result<()> {
        let mut todo: Vec<OwnedEventId> =
            pdu.auth_events.iter().filter(|a| matches!(self.stored_pdu(a), Ok(None))).cloned().collect();
        let mut fetched: Vec<SignedPdu> = Vec::new();
        while let Some(id) = todo.pop() {
            if fetched.len() >= MAX_FETCH_EVENTS {
                break;
            }
            if fetched.iter().any(|f| f.event_id == id) || !matches!(self.stored_pdu(&id), Ok(None)) {
                continue;
            }
            let s = match self.fetch_event(origin, rules, &id).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                // `origin` will not show us that event on its own — we are not in the room —
                // but it sent us `pdu` (a membership event about one of our users): the state
                // at `pdu` with its auth chain holds every auth event of `pdu`.
                Err(Error::Forbidden(_)) => {
                    fetched = self.fetch_state_events(origin, room, rules, &pdu.event_id).await?;
                    break;
                }
                Err(e) => return Err(e),
            };
            todo.extend(s.pdu.auth_events.iter().filter(|a| matches!(self.stored_pdu(a), Ok(None))).cloned());
            fetched.push(s);
        }
        fetched.sort_by_key(|s| s.pdu.depth);
        self.store_outliers(rules, fetched).await
    }

    /// The state before `at` and its auth chain, as full events (`/state`), verified; only
    /// the ones we do not hold at all. For a server that may not fetch those events one by one
    /// (`/event`): `origin` grants the state at a membership event about one of our users.
    async fn fetch_state_events(
        &self,
        origin: &ServerName,
        room: &RoomId,
        rules: &RoomVersionRules,
        at: &EventId,
    ) -> Result<Vec<SignedPdu>> {
        let res =
            self.federation_request(origin, get_room_state::v1::Request::new(at.to_owned(), room.to_owned())).await?;
        let mut out: Vec<SignedPdu> = Vec::new();
        for raw in res.auth_chain.iter().chain(res.pdus.iter()) {
            match self.verify_pdu(rules, raw) {
                Ok(s) if s.pdu.room == room => {
                    if matches!(self.stored_pdu(&s.event_id), Ok(None)) && !out.iter().any(|o| o.event_id == s.event_id)
                    {
                        out.push(s);
                    }
                }
                Ok(_) => {}
                Err(why) => tracing::info!(%origin, reason = %why, "invalid event in a state answer"),
            }
        }
        Ok(out)
    }

    /// One event from `origin`, verified (steps 1–3).
    async fn fetch_event(
        &self,
        origin: &ServerName,
        rules: &RoomVersionRules,
        id: &EventId,
    ) -> Result<Option<SignedPdu>> {
        let res = self.federation_request(origin, get_event::v1::Request::new(id.to_owned())).await?;
        match self.verify_pdu(rules, &res.pdu) {
            Ok(s) if s.event_id == id => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(why) => {
                tracing::info!(%origin, event_id = %id, reason = %why, "fetched event is invalid");
                Ok(None)
            }
        }
    }

    /// Store verified events as outliers (known, checked against their auth events, but not
    /// placed in the timeline).
    pub(crate) async fn store_outliers(&self, rules: &RoomVersionRules, events: Vec<SignedPdu>) -> Result<()> {
        for s in events {
            // Never downgrade what we already have (an event of the DAG stays in it).
            if self.stored_pdu(&s.event_id)?.is_some() {
                continue;
            }
            if check_state_independent_auth_rules(&rules.authorization, &s.pdu, |id: &EventId| {
                self.pdu(id).ok().flatten()
            })
            .is_err()
            {
                tracing::info!(event_id = %s.event_id, "fetched auth event fails its auth rules; dropped");
                continue;
            }
            let stored = crate::core::rooms::StoredPdu {
                json: serde_json::to_string(&s.object).map_err(|e| Error::Internal(e.to_string()))?,
                pos: 0,
                state_before: 0,
                state_after: 0,
                txn: None,
                redacted_by: None,
                outlier: true,
                soft_failed: false,
            };
            // Each is applied at once so later ones can find it as an auth event; the commit
            // below makes them durable together.
            let mut one = crate::store::Batch::new();
            one.put(crate::store::Tree::Pdus, s.event_id.as_bytes().to_vec(), crate::core::to_json(&stored));
            self.apply_batch(one)?;
        }
        self.commit(crate::store::Batch::new(), |_, _, _| Ok(())).await
    }

    /// Fetch the events `pdu` builds on that are not in our DAG, walking back until they
    /// connect to events we hold, and process them oldest first (each must connect; none
    /// fetches further). `origin` is asked first (`get_missing_events` between our forward
    /// extremities and `pdu`, then again before the oldest events it gave while some of those
    /// still lack their prev events: one answer carries at most 100). When it cannot close the
    /// gap — a server that joined recently holds the room's state, not its history — the
    /// other servers in the room are asked for what is still missing.
    pub(crate) async fn fetch_missing_prev_events(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        rules: &RoomVersionRules,
        pdu: &Pdu,
    ) -> Result<()> {
        let earliest = self.extremities(room)?;
        // No event below the oldest of our DAG can connect to it (an event is deeper than
        // every event it builds on): the history from before we joined is not walked.
        let min_depth = self.dag_min_depth(room)?;
        let mut got: BTreeMap<OwnedEventId, SignedPdu> = BTreeMap::new();
        let mut unreachable = None;
        let mut servers = vec![origin.to_owned()];
        servers.extend(self.helper_servers(room, origin));
        'servers: for server in &servers {
            for _round in 0..MAX_GAP_ROUNDS {
                let want = self.gap_wanted(room, pdu, &got, min_depth)?;
                if want.is_empty() {
                    break 'servers;
                }
                if got.len() >= MAX_FETCH_EVENTS {
                    tracing::info!(%room, event_id = %pdu.event_id, "gap too long to fill");
                    break 'servers;
                }
                // Ask for what lies before the events that need the missing ones.
                let tips: Vec<OwnedEventId> = std::iter::once(pdu)
                    .chain(got.values().map(|s| &s.pdu))
                    .filter(|e| e.prev_events.iter().any(|p| want.contains(p)))
                    .map(|e| e.event_id.clone())
                    .collect();
                let mut req = get_missing_events::v1::Request::new(room.to_owned(), earliest.clone(), tips);
                req.limit = UInt::from(MISSING_EVENTS_LIMIT);
                req.min_depth = UInt::new(min_depth).unwrap_or_default();
                let res = match self.federation_request(server, req).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(%server, %room, error = %e, "get_missing_events failed");
                        if server == origin && super::is_transient(&e) {
                            unreachable = Some(e);
                        }
                        continue 'servers;
                    }
                };
                let before = got.len();
                for raw in &res.events {
                    if let Ok(s) = self.verify_pdu(rules, raw) {
                        if s.pdu.room == room && !got.contains_key(&s.event_id) && self.in_gap(room, &s.event_id)? {
                            got.insert(s.event_id.clone(), s);
                        }
                    }
                }
                if got.len() == before {
                    // It does not hold the events we asked about (they reached us from
                    // elsewhere): ask it for the missing events themselves.
                    for id in want.iter().take(MAX_GAP_DIRECT) {
                        if let Ok(Some(s)) = self.fetch_event(server, rules, id).await {
                            got.insert(s.event_id.clone(), s);
                        }
                    }
                    if got.len() == before {
                        continue 'servers;
                    }
                }
            }
        }
        // Only what `pdu` builds on (an answer may carry other branches of the history).
        let reached = self.gap_reached(pdu, &got);
        let mut events: Vec<SignedPdu> = got.into_values().filter(|s| reached.contains(&s.event_id)).collect();
        events.sort_by_key(|s| s.pdu.depth);
        let mut fallbacks = 0;
        for s in events {
            let raw =
                RawValue::from_string(serde_json::to_string(&s.object).map_err(|e| Error::Internal(e.to_string()))?)
                    .map_err(|e| Error::Internal(e.to_string()))?;
            // Each missing event is processed oldest first, so it connects to what we have or
            // to the ones before it. One that still does not — it was sent beside our join and
            // builds on history from before it, which we do not walk — gets the state before
            // it from the origin (`state_ids`), like the event that needed it: rejecting it
            // would lose a message everyone else has.
            let fetch = if s.pdu.prev_events.iter().any(|p| self.is_missing(p)) {
                fallbacks += 1;
                if fallbacks <= MAX_GAP_STATE_FALLBACKS {
                    Fetch::NoGap
                } else {
                    Fetch::Nothing
                }
            } else {
                Fetch::NoGap
            };
            match Box::pin(self.handle_pdu(origin, room, &raw, None, fetch)).await {
                Ok((id, PduOutcome::Rejected(why))) => {
                    tracing::info!(%origin, event_id = %id, reason = %why, "missing event rejected");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::info!(%origin, event_id = %s.event_id, error = %e, "missing event not processed");
                    if super::is_transient(&e) {
                        unreachable = Some(e);
                    }
                }
            }
        }
        // The origin did not answer and the gap is still open (others may not hold it: their
        // silence proves nothing): the caller must not go on as if it could not be filled
        // (state_ids, then a soft-fail against a current state that lacks the gap would be for
        // good); a transaction is retried instead.
        match unreachable {
            Some(e) if pdu.prev_events.iter().any(|p| self.is_missing(p)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `id` belongs in a gap of our DAG: not in it, and not history it already builds
    /// on (an event our DAG references but does not hold — the history before our join, whose
    /// state the join's brought along — is left alone: grafting it in would set old events
    /// against the present).
    fn in_gap(&self, room: &RoomId, id: &EventId) -> Result<bool> {
        Ok(self.is_missing(id)
            && self
                .store
                .get(crate::store::Tree::Referenced, &crate::store::key(&[room.as_bytes(), id.as_bytes()]))?
                .is_none())
    }

    /// The fetched events `pdu` builds on through fetched events.
    fn gap_reached(&self, pdu: &Pdu, got: &BTreeMap<OwnedEventId, SignedPdu>) -> BTreeSet<OwnedEventId> {
        let mut reached = BTreeSet::new();
        let mut todo: Vec<&OwnedEventId> = pdu.prev_events.iter().collect();
        while let Some(id) = todo.pop() {
            if let Some(s) = got.get(id) {
                if reached.insert(id.clone()) {
                    todo.extend(s.pdu.prev_events.iter());
                }
            }
        }
        reached
    }

    /// The events a gap fill for `pdu` still needs: prev events of `pdu` or of the fetched
    /// events it builds on that are in the gap (see [`Core::in_gap`]), not fetched yet, and
    /// could connect to our DAG.
    fn gap_wanted(
        &self,
        room: &RoomId,
        pdu: &Pdu,
        got: &BTreeMap<OwnedEventId, SignedPdu>,
        min_depth: u64,
    ) -> Result<BTreeSet<OwnedEventId>> {
        let reached = self.gap_reached(pdu, got);
        let mut want = BTreeSet::new();
        let events = std::iter::once(pdu).chain(got.values().filter(|s| reached.contains(&s.event_id)).map(|s| &s.pdu));
        // The prev events of an event at `min_depth` or above it by one are at most at
        // `min_depth`: in our DAG already, or never connecting to it.
        for e in events.filter(|e| e.depth > min_depth.saturating_add(1) || e.event_id == pdu.event_id) {
            for p in &e.prev_events {
                if !got.contains_key(p) && self.in_gap(room, p)? {
                    want.insert(p.clone());
                }
            }
        }
        Ok(want)
    }

    /// Depth of the oldest event of our DAG of `room` (the first one this node stored: the
    /// create event, or its join).
    fn dag_min_depth(&self, room: &RoomId) -> Result<u64> {
        let p = crate::store::prefix(&[room.as_bytes()]);
        let first = self.store.scan(crate::store::Tree::Timeline, &p, None, None, false, 1)?;
        Ok(match first.first().and_then(|(_, v)| EventId::parse(&*String::from_utf8_lossy(v)).ok()) {
            Some(id) => self.pdu(&id)?.map_or(0, |p| p.depth),
            None => 0,
        })
    }

    /// Servers of `room` besides `origin` and us that are asked for what `origin` could not
    /// give (at most [`MAX_GAP_HELPERS`]).
    fn helper_servers(&self, room: &RoomId, origin: &ServerName) -> Vec<ruma::OwnedServerName> {
        self.servers_in_room(room)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s != origin && s != self.server_name())
            .take(MAX_GAP_HELPERS)
            .collect()
    }

    /// [`Core::fetch_state_at`] from `origin`, or when it cannot tell (a server joining through
    /// us holds nothing of the room yet; a server gone) from other servers of the room.
    async fn fetch_state_at_anywhere(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        rules: &RoomVersionRules,
        id: &EventId,
    ) -> Result<StateMap> {
        let first = match self.fetch_state_at(origin, room, rules, id).await {
            Ok(state) => return Ok(state),
            Err(e) => e,
        };
        for server in self.helper_servers(room, origin) {
            match self.fetch_state_at(&server, room, rules, id).await {
                Ok(state) => return Ok(state),
                Err(e) => tracing::info!(%server, %room, event_id = %id, error = %e, "state_ids failed"),
            }
        }
        Err(first)
    }

    /// The state before event `id` according to `origin` (`state_ids`), with every event in it
    /// fetched and stored as an outlier.
    async fn fetch_state_at(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        rules: &RoomVersionRules,
        id: &EventId,
    ) -> Result<StateMap> {
        let res = self
            .federation_request(origin, get_room_state_ids::v1::Request::new(id.to_owned(), room.to_owned()))
            .await?;
        let mut want: Vec<OwnedEventId> = res.auth_chain_ids.into_iter().chain(res.pdu_ids.iter().cloned()).collect();
        want.retain(|e| matches!(self.stored_pdu(e), Ok(None)));
        want.truncate(MAX_FETCH_EVENTS);
        let mut fetched = Vec::new();
        for e in want {
            match self.fetch_event(origin, rules, &e).await {
                Ok(Some(s)) => fetched.push(s),
                Ok(None) => {}
                // Not ours to fetch one by one (see `fetch_missing_auth_events`): all at once.
                Err(Error::Forbidden(_)) => {
                    fetched = self.fetch_state_events(origin, room, rules, id).await?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        fetched.sort_by_key(|s| s.pdu.depth);
        self.store_outliers(rules, fetched).await?;
        let mut state = StateMap::new();
        for e in res.pdu_ids {
            if let Some(p) = self.pdu(&e)? {
                if let Some(k) = &p.state_key {
                    state.insert((p.kind.to_string(), k.clone()), e);
                }
            }
        }
        Ok(state)
    }
}
