//! Rooms: creating them, appending local events (auth-checked against the room's current
//! state), membership, redaction, and reading events back.

use std::{collections::BTreeSet, sync::Arc};

use ruma::{
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
    state_res::{self, check_state_dependent_auth_rules, check_state_independent_auth_rules},
    DeviceId, EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, TransactionId, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as JsonValue};

use super::{
    pdu::{self, build_and_sign, rules_for, DagPosition, Pdu, PduTemplate, SignedPdu},
    state::StateMap,
    to_json, Core, Error, Result,
};
use crate::store::{key, prefix, Batch, Tree};

/// Most prev events a new local event references.
const MAX_PREV_EVENTS: usize = 20;
/// Soft-failed events judged again when a room's state changes (the most recent ones).
const MAX_SOFT_FAILED_RECHECKED: usize = 64;
/// Most soft-failed events accepted after one change of a room's state.
const MAX_UNSOFTFAIL_PER_CHANGE: usize = 64;
/// Most events one new event supersedes as forward extremities (its prev events, and theirs
/// through chains of soft-failed events).
const MAX_SUPERSEDED: usize = 1000;

/// What the node keeps per room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRecord {
    /// The room version.
    pub version: RoomVersionId,
    /// The `m.room.create` event.
    pub create_event: OwnedEventId,
    /// State group of the current resolved state.
    pub state_group: u64,
    /// Greatest `depth` of any event in the room.
    pub max_depth: u64,
}

/// A stored PDU and what the node knows about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredPdu {
    /// Canonical JSON of the signed PDU (redacted in place once a redaction applies).
    pub json: String,
    /// Stream position (order of arrival on this node).
    pub pos: u64,
    /// State group before the event.
    pub state_before: u64,
    /// State group after the event (equal to `state_before` for non-state events).
    pub state_after: u64,
    /// `(device_id, txn_id)` for events sent by a local device.
    #[serde(default)]
    pub txn: Option<(String, String)>,
    /// The redaction that applied to this event, if any.
    #[serde(default)]
    pub redacted_by: Option<OwnedEventId>,
    /// Known (checked against its auth events) but not part of the timeline or state: fetched
    /// as an auth event or as state at some point, or soft-failed.
    #[serde(default)]
    pub outlier: bool,
    /// Soft-failed (spec: fails the auth rules against the room's current state): part of the
    /// DAG — its state is recorded, so later events can build on it — but not in the timeline,
    /// not a forward extremity, and no part of the room's current state.
    #[serde(default)]
    pub soft_failed: bool,
}

/// A local user's membership of a room, as sync and `joined_rooms` see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRoom {
    /// `join`, `invite`, `leave`, `ban`, `knock`.
    pub membership: String,
    /// Stream position of the membership event.
    pub pos: u64,
    /// The membership event.
    pub event_id: OwnedEventId,
    /// Set by `/forget`: the room no longer appears in sync.
    #[serde(default)]
    pub forgotten: bool,
}

/// Where the state before a prepared event lives.
#[derive(Clone, Debug)]
enum BeforeGroup {
    /// The room's current state as it stands while the batch is staged (linear appends).
    Current,
    /// An existing state group.
    Known(u64),
    /// A resolved state that needs a new group (the event merges forks).
    New,
}

/// An event built and authorised, not yet stored.
struct Prepared {
    signed: SignedPdu,
    /// State before the event.
    before: Arc<StateMap>,
    before_group: BeforeGroup,
    /// State after the event, when it is a state event.
    state_after: Option<Arc<StateMap>>,
    /// The room's current state after this event, when it differs from the event's own state
    /// after (an event on a side branch of the DAG).
    room_state: Option<Arc<StateMap>>,
    txn: Option<(String, String)>,
    /// Store it soft-failed (see [`StoredPdu::soft_failed`]).
    soft_failed: bool,
}

/// The working view of a room while events are appended.
struct RoomCtx {
    room_id: OwnedRoomId,
    rules: RoomVersionRules,
    record: RoomRecord,
    state: Arc<StateMap>,
    extremities: Vec<OwnedEventId>,
    /// Events prepared in this batch but not yet stored (createRoom builds several at once).
    pending: std::collections::BTreeMap<OwnedEventId, Pdu>,
}

impl RoomCtx {
    fn fetch(&self, core: &Core, id: &EventId) -> Option<Pdu> {
        self.pending.get(id).cloned().or_else(|| core.pdu(id).ok().flatten())
    }
}

/// What `createRoom` asks for, already validated at the edge.
#[derive(Clone, Debug, Default)]
pub struct CreateRoomSpec {
    /// Room version (default 12).
    pub version: Option<RoomVersionId>,
    /// `public_chat`, `private_chat`, `trusted_private_chat`.
    pub preset: Option<String>,
    /// `public` publishes the room in the local directory.
    pub visibility_public: bool,
    /// `m.room.name`.
    pub name: Option<String>,
    /// `m.room.topic`.
    pub topic: Option<String>,
    /// Local alias part (`#alias:server`).
    pub alias_localpart: Option<String>,
    /// Users to invite.
    pub invite: Vec<OwnedUserId>,
    /// `is_direct` on invites.
    pub is_direct: bool,
    /// Extra `m.room.create` content.
    pub creation_content: Option<serde_json::Map<String, JsonValue>>,
    /// Initial state events: `(type, state_key, content)`.
    pub initial_state: Vec<(String, String, JsonValue)>,
    /// Merged over the default power levels.
    pub power_level_content_override: Option<serde_json::Map<String, JsonValue>>,
}

fn state_key_of(t: &TimelineEventType, k: &str) -> (String, String) {
    (t.to_string(), k.to_owned())
}

impl Core {
    /// The stored record of `event_id`.
    pub fn stored_pdu(&self, event_id: &EventId) -> Result<Option<StoredPdu>> {
        Ok(self.pdu_entry(event_id)?.map(|e| e.stored.clone()))
    }

    /// The parsed PDU `event_id`.
    pub fn pdu(&self, event_id: &EventId) -> Result<Option<Pdu>> {
        match self.pdu_entry(event_id)? {
            None => Ok(None),
            Some(e) => e.pdu(event_id).map(Some),
        }
    }

    /// The state after a stored event.
    pub fn state_after(&self, stored: &StoredPdu) -> Result<Arc<StateMap>> {
        self.state_of_group(stored.state_after)
    }

    /// The room record, if this node knows the room.
    pub fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>> {
        self.get_json(Tree::Rooms, room_id.as_bytes())
    }

    /// The current state of a room.
    pub fn current_state(&self, room_id: &RoomId) -> Result<Arc<StateMap>> {
        let record = self.room(room_id)?.ok_or_else(|| Error::NotFound("unknown room".into()))?;
        self.state_of_group(record.state_group)
    }

    /// One current state event of a room.
    pub fn state_event(&self, room_id: &RoomId, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        let state = self.current_state(room_id)?;
        match state.get(&(kind.to_owned(), state_key.to_owned())) {
            Some(id) => self.pdu(id),
            None => Ok(None),
        }
    }

    /// The membership of `user` in the current state of `room` (`None` if never a member).
    pub fn membership(&self, room_id: &RoomId, user: &UserId) -> Result<Option<String>> {
        let state = match self.current_state(room_id) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.membership_in(&state, user)
    }

    /// The membership of `user` in `state`.
    pub fn membership_in(&self, state: &StateMap, user: &UserId) -> Result<Option<String>> {
        match state.get(&("m.room.member".to_owned(), user.to_string())) {
            None => Ok(None),
            Some(id) => Ok(self
                .pdu(id)?
                .and_then(|p| p.content_value().get("membership").and_then(|m| m.as_str()).map(str::to_owned))),
        }
    }

    /// The power level of `user` in `state` (creators of v12 rooms rank above every integer).
    pub fn power_level(&self, rules: &RoomVersionRules, state: &StateMap, user: &UserId) -> Result<i64> {
        let create = match state.get(&("m.room.create".to_owned(), String::new())) {
            Some(id) => self.pdu(id)?,
            None => None,
        };
        let mut creators = BTreeSet::new();
        if let Some(c) = &create {
            let content = c.content_value();
            if rules.authorization.use_room_create_sender {
                creators.insert(c.sender.to_string());
            } else if let Some(cr) = content.get("creator").and_then(|v| v.as_str()) {
                creators.insert(cr.to_owned());
            }
            if rules.authorization.additional_room_creators {
                if let Some(extra) = content.get("additional_creators").and_then(|v| v.as_array()) {
                    creators.extend(extra.iter().filter_map(|v| v.as_str()).map(str::to_owned));
                }
            }
        }
        let is_creator = creators.contains(user.as_str());
        if rules.authorization.explicitly_privilege_room_creators && is_creator {
            return Ok(i64::MAX);
        }
        let pl = match state.get(&("m.room.power_levels".to_owned(), String::new())) {
            Some(id) => self.pdu(id)?,
            None => None,
        };
        Ok(match pl {
            None => {
                if is_creator {
                    100
                } else {
                    0
                }
            }
            Some(pl) => {
                let c = pl.content_value();
                c.get("users")
                    .and_then(|u| u.get(user.as_str()))
                    .and_then(JsonValue::as_i64)
                    .or_else(|| c.get("users_default").and_then(JsonValue::as_i64))
                    .unwrap_or(0)
            }
        })
    }

    /// The integer field `field` of the room's power levels (`default` when absent).
    pub fn power_level_field(&self, state: &StateMap, field: &str, default: i64) -> Result<i64> {
        Ok(match state.get(&("m.room.power_levels".to_owned(), String::new())) {
            Some(id) => {
                self.pdu(id)?.and_then(|p| p.content_value().get(field).and_then(JsonValue::as_i64)).unwrap_or(default)
            }
            None => default,
        })
    }

    fn room_ctx(&self, room_id: &RoomId) -> Result<RoomCtx> {
        let record =
            self.room(room_id)?.ok_or_else(|| Error::Forbidden("you are not in this room (unknown room)".into()))?;
        let rules = rules_for(&record.version)?;
        let state = self.state_of_group(record.state_group)?;
        let extremities = self.extremities(room_id)?;
        Ok(RoomCtx { room_id: room_id.to_owned(), rules, record, state, extremities, pending: Default::default() })
    }

    /// Build, sign and authorise the next event of `ctx`, and advance `ctx` past it.
    fn prepare(
        &self,
        ctx: &mut RoomCtx,
        sender: &UserId,
        template: PduTemplate,
        txn: Option<(String, String)>,
    ) -> Result<Prepared> {
        let auth_types = state_res::auth_types_for_event(
            &template.kind,
            sender,
            template.state_key.as_deref(),
            &serde_json::value::to_raw_value(&template.content).map_err(|e| Error::BadJson(e.to_string()))?,
            &ctx.rules.authorization,
        )
        .map_err(|e| Error::BadJson(format!("invalid content: {e}")))?;
        let mut auth_events: Vec<OwnedEventId> =
            auth_types.iter().filter_map(|(t, k)| ctx.state.get(&(t.to_string(), k.clone())).cloned()).collect();
        auth_events.sort();
        auth_events.dedup();
        let mut prev: Vec<OwnedEventId> = ctx.extremities.clone();
        prev.sort();
        prev.truncate(MAX_PREV_EVENTS);
        let signed = build_and_sign(
            &self.identity,
            &ctx.rules,
            sender,
            &template,
            DagPosition {
                room_id: Some(&ctx.room_id),
                prev_events: &prev,
                auth_events: &auth_events,
                depth: ctx.record.max_depth + 1,
            },
            self.clock.now_ms(),
        )?;
        // Auth rules, against the event's auth events and then the current state.
        check_state_independent_auth_rules(&ctx.rules.authorization, &signed.pdu, |id: &EventId| ctx.fetch(self, id))
            .map_err(Error::Forbidden)?;
        check_state_dependent_auth_rules(&ctx.rules.authorization, &signed.pdu, |t, k| {
            ctx.state.get(&(t.to_string(), k.to_owned())).and_then(|id| ctx.fetch(self, id))
        })
        .map_err(Error::Forbidden)?;
        if template.kind == TimelineEventType::RoomRedaction {
            self.check_redaction_allowed(ctx, sender, template.redacts.as_deref())?;
        }
        let before = ctx.state.clone();
        let state_after = match &template.state_key {
            Some(k) => {
                let mut s = (*ctx.state).clone();
                s.insert(state_key_of(&template.kind, k), signed.event_id.clone());
                let s = Arc::new(s);
                ctx.state = s.clone();
                Some(s)
            }
            None => None,
        };
        ctx.extremities = vec![signed.event_id.clone()];
        ctx.record.max_depth += 1;
        ctx.pending.insert(signed.event_id.clone(), signed.pdu.clone());
        Ok(Prepared {
            signed,
            before,
            before_group: BeforeGroup::Current,
            state_after,
            room_state: None,
            txn,
            soft_failed: false,
        })
    }

    fn check_redaction_allowed(&self, ctx: &RoomCtx, sender: &UserId, target: Option<&EventId>) -> Result<()> {
        let target = target.ok_or_else(|| Error::BadJson("redaction without a target".into()))?;
        let Some(t) = self.pdu(target)? else {
            return Err(Error::NotFound("the event to redact is unknown".into()));
        };
        if t.room != ctx.room_id {
            return Err(Error::NotFound("the event to redact is not in this room".into()));
        }
        if t.sender == sender {
            return Ok(());
        }
        let mine = self.power_level(&ctx.rules, &ctx.state, sender)?;
        let needed = self.power_level_field(&ctx.state, "redact", 50)?;
        if mine >= needed {
            Ok(())
        } else {
            Err(Error::Forbidden("you may not redact other users' events in this room".into()))
        }
    }

    /// The delta-chain depth of group `sg` (0 for the empty state or a snapshot).
    fn group_depth(&self, sg: u64, written: &std::collections::BTreeMap<u64, u32>) -> Result<u32> {
        if sg == 0 {
            return Ok(0);
        }
        if let Some(d) = written.get(&sg) {
            return Ok(*d);
        }
        Ok(self
            .get_json::<super::state::StateGroup>(Tree::StateGroups, &sg.to_be_bytes())?
            .map(|g| g.depth)
            .unwrap_or(u32::MAX))
    }

    /// Queue the stores for `events` (in order) into `batch`, allocating positions and groups.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        record: &mut RoomRecord,
        events: &[Prepared],
        alloc_pos: &mut dyn FnMut() -> u64,
        alloc_sg: &mut dyn FnMut() -> u64,
    ) -> Result<BTreeSet<ruma::OwnedServerName>> {
        let mut written = std::collections::BTreeMap::new();
        let mut all_dests = BTreeSet::new();
        let mut room_map = self.state_of_group(record.state_group)?;
        for p in events {
            let pdu = &p.signed.pdu;
            let id = &p.signed.event_id;
            let pos = alloc_pos();
            let before_sg = match p.before_group {
                BeforeGroup::Current => record.state_group,
                BeforeGroup::Known(g) => g,
                BeforeGroup::New => {
                    let sg = alloc_sg();
                    let d = self.write_state_group(batch, sg, 0, 0, &StateMap::new(), p.before.clone())?;
                    written.insert(sg, d);
                    sg
                }
            };
            let after_sg = match &p.state_after {
                Some(full) => {
                    let sg = alloc_sg();
                    let delta = StateMap::from([(
                        (pdu.kind.to_string(), pdu.state_key.clone().unwrap_or_default()),
                        id.clone(),
                    )]);
                    let parent_depth = self.group_depth(before_sg, &written)?;
                    let d = self.write_state_group(batch, sg, before_sg, parent_depth, &delta, full.clone())?;
                    written.insert(sg, d);
                    sg
                }
                None => before_sg,
            };
            if p.soft_failed {
                let stored = StoredPdu {
                    json: serde_json::to_string(&p.signed.object).map_err(|e| Error::Internal(e.to_string()))?,
                    pos,
                    state_before: before_sg,
                    state_after: after_sg,
                    txn: None,
                    redacted_by: None,
                    outlier: false,
                    soft_failed: true,
                };
                batch.put(Tree::Pdus, id.as_bytes().to_vec(), to_json(&stored));
                batch.put(Tree::SoftFailed, key(&[room_id.as_bytes(), &pos.to_be_bytes()]), id.as_bytes().to_vec());
                continue;
            }
            // The room's current state after this event.
            let (new_room_sg, new_room_map) = match &p.room_state {
                None => (after_sg, p.state_after.clone().unwrap_or_else(|| p.before.clone())),
                Some(rs) if Some(rs) == p.state_after.as_ref() || (p.state_after.is_none() && *rs == p.before) => {
                    (after_sg, rs.clone())
                }
                Some(rs) => {
                    let sg = alloc_sg();
                    let d = self.write_state_group(batch, sg, 0, 0, &StateMap::new(), rs.clone())?;
                    written.insert(sg, d);
                    (sg, rs.clone())
                }
            };
            let in_batch =
                |id: &EventId| events.iter().find(|e| e.signed.event_id == *id).map(|e| e.signed.pdu.clone());
            self.stage_membership_changes(batch, room_id, &room_map, &new_room_map, pos, &in_batch)?;
            // Local events go to every other server in the room (before or after the event, so
            // a server that is leaving or being invited hears of it), through the durable queue.
            if pdu.sender.server_name() == self.server_name() {
                let mut dests = self.servers_in_state(&room_map, &in_batch)?;
                dests.extend(self.servers_in_state(&new_room_map, &in_batch)?);
                if pdu.kind == TimelineEventType::RoomMember {
                    if let Some(t) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) {
                        dests.insert(t.server_name().to_owned());
                    }
                }
                dests.extend(self.let_out_servers(room_id));
                dests.remove(self.server_name());
                self.enqueue_pdu(batch, &dests, pos, id);
                all_dests.extend(dests);
            }
            // Servers this event lets into or out of the room as we see it (by a membership
            // event, or by a resolution that decides a membership another way) may lack what
            // we know: catch them up by sending them forward extremities — they pull whatever
            // lies behind (get_missing_events).
            // - A server entering did not get what we sent while it was out: as the origin of
            //   our events we owe it our own extremities this event does not build on.
            // - A server leaving may not know it is out (it left by a resolution it has not
            //   seen, e.g. its rejoin on one side of a partition lost to the other side's join
            //   rules): nobody sends it anything any more, so it would go on sending events
            //   everyone soft-fails. Our extremities, this event among them, let it resolve
            //   the same state.
            let (entering, mut leaving) = self.servers_changing(&room_map, &new_room_map, &in_batch)?;
            // The sender's server knows it is out when this event itself takes its user out
            // (a leave); not when the resolution does (its rejoin on a stale copy merged with
            // a branch where the user may not join): then it must be told like any other.
            let own_leave = pdu.kind == TimelineEventType::RoomMember
                && pdu.state_key.as_deref() == Some(pdu.sender.as_str())
                && pdu.content_value().get("membership").and_then(|m| m.as_str()) != Some("join");
            if own_leave {
                leaving.remove(pdu.sender.server_name());
            }
            // Let out by the resolution rather than by this event (a kick, a ban or a leave of
            // one of its users, which reaches it as any membership event does): it may read on
            // and is sent our events for a while, to settle with the room (see
            // `federation::serve`).
            let about = (pdu.kind == TimelineEventType::RoomMember)
                .then(|| pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()))
                .flatten()
                .map(|u| u.server_name().to_owned());
            for s in &leaving {
                if about.as_ref() != Some(s) && !self.has_banned_member(&new_room_map, s, &in_batch)? {
                    self.note_let_out(room_id, s);
                }
            }
            if !entering.is_empty() || !leaving.is_empty() {
                let superseded = self.superseded_by(&pdu.prev_events)?;
                let dropped = |e: &EventId| {
                    let k = key(&[room_id.as_bytes(), e.as_bytes()]);
                    batch.ops.iter().any(|op| matches!(op, crate::store::Op::Delete(Tree::Extremities, d) if *d == k))
                };
                let mut after: Vec<(u64, OwnedEventId, bool)> = Vec::new();
                for e in self.extremities(room_id)? {
                    if e == *id || superseded.contains(&e) || dropped(&e) {
                        continue;
                    }
                    if let Some(st) = self.stored_pdu(&e)? {
                        let own = Pdu::from_json(e.clone(), &st.json)?.sender.server_name() == self.server_name();
                        after.push((st.pos, e, own));
                    }
                }
                if self.store.get(Tree::Referenced, &key(&[room_id.as_bytes(), id.as_bytes()]))?.is_none() {
                    after.push((pos, id.clone(), pdu.sender.server_name() == self.server_name()));
                }
                let mut sent = false;
                for (p, e, own) in &after {
                    if *own && e != id && !entering.is_empty() {
                        self.enqueue_pdu(batch, &entering, *p, e);
                        sent = true;
                    }
                    if !leaving.is_empty() {
                        self.enqueue_pdu(batch, &leaving, *p, e);
                        sent = true;
                    }
                }
                if sent {
                    all_dests.extend(entering);
                    all_dests.extend(leaving);
                }
            }
            record.state_group = new_room_sg;
            room_map = new_room_map;
            let stored = StoredPdu {
                json: serde_json::to_string(&p.signed.object).map_err(|e| Error::Internal(e.to_string()))?,
                pos,
                state_before: before_sg,
                state_after: after_sg,
                txn: p.txn.clone(),
                redacted_by: None,
                outlier: false,
                soft_failed: false,
            };
            batch.put(Tree::Pdus, id.as_bytes().to_vec(), to_json(&stored));
            batch.put(Tree::Timeline, key(&[room_id.as_bytes(), &pos.to_be_bytes()]), id.as_bytes().to_vec());
            // Soft-failed events this one is (accepted again) or builds on leave the index of
            // those to judge again: its state is part of the room's now.
            let mut no_longer_soft_failed = vec![id.clone()];
            for prev in self.superseded_by(&pdu.prev_events)? {
                batch.delete(Tree::Extremities, key(&[room_id.as_bytes(), prev.as_bytes()]));
                batch.put(Tree::Referenced, key(&[room_id.as_bytes(), prev.as_bytes()]), Vec::new());
                no_longer_soft_failed.push(prev);
            }
            for e in &no_longer_soft_failed {
                if let Some(old) = self.stored_pdu(e)?.filter(|s| s.soft_failed) {
                    batch.delete(Tree::SoftFailed, key(&[room_id.as_bytes(), &old.pos.to_be_bytes()]));
                }
            }
            // An event some accepted event already builds on (we got the child first, its
            // history later) is not a forward extremity.
            if self.store.get(Tree::Referenced, &key(&[room_id.as_bytes(), id.as_bytes()]))?.is_none() {
                batch.put(Tree::Extremities, key(&[room_id.as_bytes(), id.as_bytes()]), id.as_bytes().to_vec());
            }
            if let Some((dev, txn)) = &p.txn {
                batch.put(
                    Tree::TxnIds,
                    key(&[pdu.sender.as_bytes(), dev.as_bytes(), txn.as_bytes()]),
                    id.as_bytes().to_vec(),
                );
            }
            let content = pdu.content_value();
            if let Some(target) = content.get("m.relates_to").and_then(|r| r.get("event_id")).and_then(|e| e.as_str()) {
                batch.put(
                    Tree::Relations,
                    key(&[room_id.as_bytes(), target.as_bytes(), &pos.to_be_bytes()]),
                    id.as_bytes().to_vec(),
                );
                super::relations::stage_relation(batch, room_id, pdu, &content, pos);
            }
            if let Some(target) = &pdu.redacts_target {
                self.stage_redaction(batch, rules, target, id)?;
            }
            record.max_depth = record.max_depth.max(pdu.depth);
        }
        batch.put(Tree::Rooms, room_id.as_bytes().to_vec(), to_json(record));
        Ok(all_dests)
    }

    /// Servers (other than this one) with a joined member in `new` and none in `old`
    /// (entering), and the other way round (leaving).
    fn servers_changing(
        &self,
        old: &StateMap,
        new: &StateMap,
        in_batch: &dyn Fn(&EventId) -> Option<Pdu>,
    ) -> Result<(BTreeSet<ruma::OwnedServerName>, BTreeSet<ruma::OwnedServerName>)> {
        let joined = |id: &EventId| -> Result<bool> {
            let p = match in_batch(id) {
                Some(p) => Some(p),
                None => self.pdu(id)?,
            };
            Ok(p.is_some_and(|p| p.content_value().get("membership").and_then(|m| m.as_str()) == Some("join")))
        };
        let members = |m: &StateMap| {
            m.range(("m.room.member".to_owned(), String::new())..)
                .take_while(|((t, _), _)| t == "m.room.member")
                .filter_map(|((_, k), id)| UserId::parse(k.as_str()).ok().map(|u| (u, id.clone())))
                .collect::<Vec<_>>()
        };
        if old == new {
            return Ok((BTreeSet::new(), BTreeSet::new()));
        }
        let (old_members, new_members) = (members(old), members(new));
        // Only servers with a member whose membership event changed can enter or leave.
        let mut touched: BTreeSet<ruma::OwnedServerName> = BTreeSet::new();
        for (u, id) in &new_members {
            if old.get(&("m.room.member".to_owned(), u.to_string())) != Some(id) {
                touched.insert(u.server_name().to_owned());
            }
        }
        for (u, _) in &old_members {
            if !new.contains_key(&("m.room.member".to_owned(), u.to_string())) {
                touched.insert(u.server_name().to_owned());
            }
        }
        touched.remove(self.server_name());
        let (mut entering, mut leaving) = (BTreeSet::new(), BTreeSet::new());
        if touched.is_empty() {
            return Ok((entering, leaving));
        }
        let in_state = |ms: &[(OwnedUserId, OwnedEventId)]| -> Result<BTreeSet<ruma::OwnedServerName>> {
            let mut out = BTreeSet::new();
            for (u, id) in ms {
                if touched.contains(u.server_name()) && !out.contains(u.server_name()) && joined(id)? {
                    out.insert(u.server_name().to_owned());
                }
            }
            Ok(out)
        };
        let (before, after) = (in_state(&old_members)?, in_state(&new_members)?);
        entering.extend(after.difference(&before).cloned());
        leaving.extend(before.difference(&after).cloned());
        Ok((entering, leaving))
    }

    /// Whether some user of `server` is banned in `state`.
    fn has_banned_member(
        &self,
        state: &StateMap,
        server: &ruma::ServerName,
        in_batch: &dyn Fn(&EventId) -> Option<Pdu>,
    ) -> Result<bool> {
        for ((t, k), id) in state.range(("m.room.member".to_owned(), String::new())..) {
            if t != "m.room.member" {
                break;
            }
            if UserId::parse(k.as_str()).ok().is_some_and(|u| u.server_name() == server) {
                let p = match in_batch(id) {
                    Some(p) => Some(p),
                    None => self.pdu(id)?,
                };
                if p.is_some_and(|p| p.content_value().get("membership").and_then(|m| m.as_str()) == Some("ban")) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Record, for local users, every membership that differs between two room states.
    fn stage_membership_changes(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        old: &StateMap,
        new: &StateMap,
        pos: u64,
        in_batch: &dyn Fn(&EventId) -> Option<Pdu>,
    ) -> Result<()> {
        for ((t, k), id) in new.iter() {
            if t != "m.room.member" || old.get(&(t.clone(), k.clone())) == Some(id) {
                continue;
            }
            let Ok(target) = UserId::parse(k.as_str()) else { continue };
            if target.server_name() != self.server_name() {
                continue;
            }
            let membership = match in_batch(id).map_or_else(|| self.pdu(id), |p| Ok(Some(p)))? {
                Some(p) => p.content_value().get("membership").and_then(|m| m.as_str()).unwrap_or("leave").to_owned(),
                None => continue,
            };
            let ur = UserRoom { membership, pos, event_id: id.clone(), forgotten: false };
            batch.put(Tree::UserRooms, key(&[target.as_bytes(), room_id.as_bytes()]), to_json(&ur));
        }
        Ok(())
    }

    fn stage_redaction(
        &self,
        batch: &mut Batch,
        rules: &RoomVersionRules,
        target: &EventId,
        by: &EventId,
    ) -> Result<()> {
        let Some(mut stored) = self.stored_pdu(target)? else { return Ok(()) };
        if stored.redacted_by.is_some() {
            return Ok(());
        }
        super::relations::stage_unrelation(batch, &Pdu::from_json(target.to_owned(), &stored.json)?, stored.pos);
        let object = pdu::parse_object(&stored.json)?;
        let redacted = pdu::redacted_object(object, rules, None)?;
        stored.json = serde_json::to_string(&redacted).map_err(|e| Error::Internal(e.to_string()))?;
        stored.redacted_by = Some(by.to_owned());
        batch.put(Tree::Pdus, target.as_bytes().to_vec(), to_json(&stored));
        Ok(())
    }

    /// Send one event as `sender` (from `device`, with client transaction id `txn`). Returns
    /// once the event is durable. A repeated `(device, txn)` returns the first event's id.
    pub async fn send_event(
        &self,
        sender: &UserId,
        device: Option<&DeviceId>,
        room_id: &RoomId,
        template: PduTemplate,
        txn: Option<&TransactionId>,
    ) -> Result<OwnedEventId> {
        let txn = match (device, txn) {
            (Some(d), Some(t)) => {
                let k = key(&[sender.as_bytes(), d.as_bytes(), t.as_bytes()]);
                if let Some(id) = self.store.get(Tree::TxnIds, &k)? {
                    let id = String::from_utf8(id).map_err(|e| Error::Internal(e.to_string()))?;
                    return EventId::parse(id).map_err(|e| Error::Internal(e.to_string()));
                }
                Some((d.to_string(), t.to_string()))
            }
            _ => None,
        };
        let lock = self.room_lock(&room_id.to_owned());
        let _guard = lock.lock().await;
        let mut ctx = self.room_ctx(room_id)?;
        let depth = ctx.record.max_depth;
        let mut prepared = if ctx.extremities.len() > MAX_PREV_EVENTS {
            // Too many forward extremities to name them all: the event's state is the
            // resolution of the ones it names, so it must be authorised against that (not the
            // room's current state), and it should name the sender's own membership.
            let prevs = self.choose_prev_events(&ctx, sender)?;
            let all = std::mem::replace(&mut ctx.extremities, prevs.clone());
            let (before, before_group, max_depth) = self.before_from_prevs(room_id, &ctx.rules, &prevs)?;
            ctx.state = before;
            ctx.record.max_depth = max_depth;
            let mut p = self.prepare(&mut ctx, sender, template, txn)?;
            p.before_group = before_group;
            ctx.extremities = all;
            p.room_state = Some(self.room_state_with(&ctx, &p)?);
            p
        } else {
            self.prepare(&mut ctx, sender, template, txn)?
        };
        let id = prepared.signed.event_id.clone();
        // Inviting a user of another node: their server countersigns the invite first (and
        // learns of it that way even though it is not in the room yet).
        if self.is_remote_invite(&prepared.signed.pdu) {
            prepared.signed = self.exchange_invite(room_id, &ctx.record.version, prepared.signed).await?;
        }
        if self.commit_prepared(&ctx, prepared, depth).await? {
            self.recheck_soft_failed(room_id).await?;
        }
        Ok(id)
    }

    /// At most [`MAX_PREV_EVENTS`] of the room's forward extremities for a new event of
    /// `sender`: the sender's own membership event if it is one, then the deepest.
    fn choose_prev_events(&self, ctx: &RoomCtx, sender: &UserId) -> Result<Vec<OwnedEventId>> {
        let own = ctx.state.get(&("m.room.member".to_owned(), sender.to_string()));
        let mut by_depth: Vec<(bool, u64, OwnedEventId)> = Vec::with_capacity(ctx.extremities.len());
        for e in &ctx.extremities {
            let depth = self.pdu(e)?.map_or(0, |p| p.depth);
            by_depth.push((Some(e) == own, depth, e.clone()));
        }
        by_depth.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        Ok(by_depth.into_iter().take(MAX_PREV_EVENTS).map(|(_, _, e)| e).collect())
    }

    fn is_remote_invite(&self, pdu: &Pdu) -> bool {
        pdu.kind == TimelineEventType::RoomMember
            && pdu.content_value().get("membership").and_then(|m| m.as_str()) == Some("invite")
            && pdu
                .state_key
                .as_deref()
                .and_then(|k| UserId::parse(k).ok())
                .is_some_and(|t| t.server_name() != self.server_name())
    }

    /// The resolved state before an event with these `prev_events`, the group to record it
    /// under, and the greatest depth among them.
    fn before_from_prevs(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        prev_events: &[OwnedEventId],
    ) -> Result<(Arc<StateMap>, BeforeGroup, u64)> {
        let mut forks = Vec::new();
        let mut max_depth = 0;
        for prev in prev_events {
            let stored = match self.stored_pdu(prev)? {
                Some(s) if !s.outlier => s,
                // An outlier has no known state: it cannot anchor a new event.
                _ => return Err(Error::NotFound(format!("unknown prev event {prev}"))),
            };
            let pdu = Pdu::from_json(prev.clone(), &stored.json)?;
            if pdu.room != room_id {
                return Err(Error::InvalidParam(format!("prev event {prev} is in another room")));
            }
            max_depth = max_depth.max(pdu.depth);
            forks.push((stored.state_after, self.state_after(&stored)?));
        }
        let maps: Vec<Arc<StateMap>> = forks.iter().map(|(_, m)| m.clone()).collect();
        let before = Arc::new(self.resolve_state(rules, &maps)?);
        let group = match forks.iter().find(|(_, m)| **m == *before) {
            Some((g, _)) => BeforeGroup::Known(*g),
            None => BeforeGroup::New,
        };
        Ok((before, group, max_depth))
    }

    /// The events an event with these prev events builds on, directly or through soft-failed
    /// events (which never become forward extremities themselves): none of them is a forward
    /// extremity once it is stored. Without looking through soft-failed events, the event a
    /// soft-failed one was built on would stay an extremity for good, and its (old) state
    /// would be resolved against the present forever after.
    pub(crate) fn superseded_by(&self, prev_events: &[OwnedEventId]) -> Result<BTreeSet<OwnedEventId>> {
        let mut out: BTreeSet<OwnedEventId> = BTreeSet::new();
        let mut todo: Vec<OwnedEventId> = prev_events.to_vec();
        while let Some(id) = todo.pop() {
            if !out.insert(id.clone()) || out.len() > MAX_SUPERSEDED {
                continue;
            }
            if let Some(stored) = self.stored_pdu(&id)? {
                if stored.soft_failed {
                    todo.extend(Pdu::from_json(id, &stored.json)?.prev_events);
                }
            }
        }
        Ok(out)
    }

    /// Our own forward extremities, when our copy of a room we rejoin has caught up, that the
    /// others have rejected: events we sent while the room had us out (on our side of a
    /// partition, say, while the other side banned us), which fail the auth rules against the
    /// state once their branch merges with the rest — as the other servers judged them on
    /// receipt (soft failure), never to build on them. Kept, they would hold our state apart
    /// from everyone else's for good (typically with ourselves out of the room again).
    fn rejected_own_extremities(&self, ctx: &RoomCtx, join: &SignedPdu, after: &StateMap) -> Result<Vec<OwnedEventId>> {
        let superseded = self.superseded_by(&join.pdu.prev_events)?;
        let mut others: Vec<(OwnedEventId, Arc<StateMap>)> = Vec::new();
        for e in ctx.extremities.iter().filter(|e| !superseded.contains(*e)) {
            if let Some(st) = self.stored_pdu(e)? {
                others.push((e.clone(), self.state_after(&st)?));
            }
        }
        let join_state = Arc::new(after.clone());
        let join_id = join.event_id.clone();
        let join_pdu = join.pdu.clone();
        let fetch = |id: &EventId| if *id == *join_id { Ok(Some(join_pdu.clone())) } else { self.pdu(id) };
        let mut rejected = Vec::new();
        for (e, _) in &others {
            let Some(stored) = self.stored_pdu(e)? else { continue };
            let pdu = Pdu::from_json(e.clone(), &stored.json)?;
            if pdu.sender.server_name() != self.server_name() {
                continue;
            }
            let mut forks = vec![self.state_of_group(stored.state_before)?, join_state.clone()];
            forks.extend(others.iter().filter(|(o, _)| o != e).map(|(_, st)| st.clone()));
            let merged = self.resolve_state_with(&ctx.rules, &forks, &fetch)?;
            if check_state_dependent_auth_rules(&ctx.rules.authorization, &pdu, |t, k| {
                merged.get(&(t.to_string(), k.to_owned())).and_then(|id| fetch(id).ok().flatten())
            })
            .is_err()
            {
                tracing::info!(room = %ctx.room_id, event_id = %e, "an event of ours the room rejected; no longer a forward extremity");
                rejected.push(e.clone());
            }
        }
        Ok(rejected)
    }

    /// The state before `pdu` as the room will have it once `pdu`'s branch merges with ours:
    /// the resolution of `before` (the state before `pdu`) with the states after our forward
    /// extremities that `pdu` does not build on.
    fn merged_state_before(&self, ctx: &RoomCtx, pdu: &Pdu, before: &Arc<StateMap>) -> Result<Arc<StateMap>> {
        let superseded = self.superseded_by(&pdu.prev_events)?;
        let mut forks = vec![before.clone()];
        for e in ctx.extremities.iter().filter(|e| !superseded.contains(*e)) {
            if let Some(st) = self.stored_pdu(e)? {
                forks.push(self.state_after(&st)?);
            }
        }
        Ok(Arc::new(self.resolve_state(&ctx.rules, &forks)?))
    }

    /// The room's state once `prepared` is appended: the resolution of the states after every
    /// forward extremity (the event replaces its prev events among them).
    fn room_state_with(&self, ctx: &RoomCtx, prepared: &Prepared) -> Result<Arc<StateMap>> {
        let prevs = self.superseded_by(&prepared.signed.pdu.prev_events)?;
        let mut ext_states = Vec::new();
        // An event something in the room already builds on (it reached us after its child,
        // whose state we got from its origin) is no forward extremity: its state is already
        // part of its child's, and resolving it again against the present would replay
        // conflicts settled since.
        let referenced =
            self.store.get(Tree::Referenced, &key(&[ctx.room_id.as_bytes(), prepared.signed.event_id.as_bytes()]))?;
        if referenced.is_none() {
            ext_states.push(prepared.state_after.clone().unwrap_or_else(|| prepared.before.clone()));
        }
        for e in ctx.extremities.iter().filter(|e| !prevs.contains(*e)) {
            if let Some(st) = self.stored_pdu(e)? {
                ext_states.push(self.state_after(&st)?);
            }
        }
        if ext_states.is_empty() {
            return Ok(ctx.state.clone());
        }
        let new_id = prepared.signed.event_id.clone();
        let new_pdu = prepared.signed.pdu.clone();
        let fetch = |id: &EventId| if *id == *new_id { Ok(Some(new_pdu.clone())) } else { self.pdu(id) };
        Ok(Arc::new(self.resolve_state_with(&ctx.rules, &ext_states, &fetch)?))
    }

    /// Stage and commit one prepared event of `ctx`'s room, then wake the federation sender.
    /// Returns whether the room's current state changed.
    async fn commit_prepared(&self, ctx: &RoomCtx, prepared: Prepared, max_depth_before: u64) -> Result<bool> {
        let mut record = ctx.record.clone();
        record.max_depth = max_depth_before.max(prepared.signed.pdu.depth);
        let rules = ctx.rules.clone();
        let room_id = ctx.room_id.clone();
        let (dests, changed) = self
            .commit(Batch::new(), |batch, pos, sg| {
                let dests =
                    self.stage(batch, &room_id, &rules, &mut record, std::slice::from_ref(&prepared), pos, sg)?;
                Ok((dests, record.state_group != ctx.record.state_group))
            })
            .await?;
        if prepared.signed.pdu.redacts_target.is_some() {
            // A redacted event no longer counts as unread (push.rs memoises the counts).
            self.unread_memo.invalidate();
        }
        self.wake_sender(&dests);
        Ok(changed)
    }

    /// Judge again the soft-failed events of `room_id` no accepted event builds on (the most
    /// recent ones, oldest first) against the room's state as it is now — the same check as
    /// on receipt (`store_remote_pdu`, step 6) — and accept those that pass. The caller holds
    /// the room lock and has just changed the room's state.
    ///
    /// Whether an event is soft-failed depends on the state the receiving server had when it
    /// arrived: after a partition heals, the servers of one side accept a rejoin or a message
    /// of the other side that a server which had not yet caught up soft-failed, and for good
    /// the servers disagree about who is in the room. Judged again once its state has caught
    /// up, the event gets the verdict the others gave it. (Synapse does the same for sticky
    /// events, MSC4354.) Only ever from soft-failed to accepted, so it settles.
    async fn recheck_soft_failed(&self, room_id: &RoomId) -> Result<()> {
        let p = prefix(&[room_id.as_bytes()]);
        for _ in 0..MAX_UNSOFTFAIL_PER_CHANGE {
            let mut candidates: Vec<(u64, OwnedEventId, StoredPdu)> = Vec::new();
            for (_, v) in self.store.scan(Tree::SoftFailed, &p, None, None, true, MAX_SOFT_FAILED_RECHECKED)? {
                let Ok(id) = EventId::parse(&*String::from_utf8_lossy(&v)) else { continue };
                if let Some(stored) = self.stored_pdu(&id)?.filter(|s| s.soft_failed) {
                    candidates.push((stored.pos, id, stored));
                }
            }
            if candidates.is_empty() {
                return Ok(());
            }
            // Oldest first: an event before the ones that build on it.
            candidates.sort_by_key(|(pos, _, _)| *pos);
            let ctx = self.room_ctx(room_id)?;
            let passes_in = |pdu: &Pdu, state: &StateMap| {
                check_state_dependent_auth_rules(&ctx.rules.authorization, pdu, |t, k| {
                    state.get(&(t.to_string(), k.to_owned())).and_then(|id| self.pdu(id).ok().flatten())
                })
                .is_ok()
            };
            // Events of one branch mostly share their state before (messages): one resolution.
            type MergedKey = (u64, Vec<OwnedEventId>);
            let mut merged_cache: std::collections::BTreeMap<MergedKey, Arc<StateMap>> = Default::default();
            let mut passing = None;
            for (_, id, stored) in candidates {
                let pdu = Pdu::from_json(id.clone(), &stored.json)?;
                let before = self.state_of_group(stored.state_before)?;
                let passes = {
                    let superseded = self.superseded_by(&pdu.prev_events)?;
                    let k: MergedKey = (
                        stored.state_before,
                        ctx.extremities.iter().filter(|e| superseded.contains(*e)).cloned().collect(),
                    );
                    let merged = match merged_cache.get(&k) {
                        Some(m) => m.clone(),
                        None => {
                            let m = self.merged_state_before(&ctx, &pdu, &before)?;
                            merged_cache.insert(k, m.clone());
                            m
                        }
                    };
                    passes_in(&pdu, &merged)
                };
                if passes {
                    passing = Some((id, stored, pdu, before));
                    break;
                }
            }
            let Some((id, stored, pdu, before)) = passing else { return Ok(()) };
            tracing::info!(room = %room_id, event_id = %id, "soft-failed event passes against the room's state now; accepted");
            let state_after = match pdu.state_key {
                Some(_) => Some(self.state_of_group(stored.state_after)?),
                None => None,
            };
            let object = pdu::parse_object(&stored.json)?;
            let mut prepared = Prepared {
                signed: SignedPdu { event_id: id, object, pdu },
                before,
                before_group: BeforeGroup::Known(stored.state_before),
                state_after,
                room_state: None,
                txn: None,
                soft_failed: false,
            };
            prepared.room_state = Some(self.room_state_with(&ctx, &prepared)?);
            self.commit_prepared(&ctx, prepared, ctx.record.max_depth).await?;
        }
        Ok(())
    }

    /// Append an event as `sender` on top of `prev_events`, which may be a side branch of the
    /// DAG or several branches to merge. The state before the event is resolved from its
    /// parents (state resolution v2 / v2.1); the room's current state is resolved from the new
    /// forward extremities. Local clients normally use [`Core::send_event`], which builds on all
    /// extremities; this is how the DAG forks and merges (and how the tests make it do so).
    pub async fn send_event_on(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        template: PduTemplate,
        prev_events: Vec<OwnedEventId>,
    ) -> Result<OwnedEventId> {
        if prev_events.is_empty() || prev_events.len() > MAX_PREV_EVENTS {
            return Err(Error::InvalidParam("an event needs 1 to 20 prev events".into()));
        }
        let lock = self.room_lock(&room_id.to_owned());
        let _guard = lock.lock().await;
        let mut ctx = self.room_ctx(room_id)?;
        let old_extremities = ctx.extremities.clone();
        let saved_depth = ctx.record.max_depth;
        let (before, before_group, max_depth) = self.before_from_prevs(room_id, &ctx.rules, &prev_events)?;
        ctx.state = before;
        ctx.extremities = prev_events.clone();
        ctx.record.max_depth = max_depth;
        let mut prepared = self.prepare(&mut ctx, sender, template, None)?;
        prepared.before_group = before_group;
        ctx.extremities = old_extremities;
        prepared.room_state = Some(self.room_state_with(&ctx, &prepared)?);
        let id = prepared.signed.event_id.clone();
        if self.commit_prepared(&ctx, prepared, saved_depth).await? {
            self.recheck_soft_failed(room_id).await?;
        }
        Ok(id)
    }

    /// Store a PDU received from another server that passed steps 1–4 of the receipt checks.
    /// `before_override` is the state before it when its prev events are unknown (fetched with
    /// `state_ids`).
    pub(crate) async fn store_remote_pdu(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        signed: SignedPdu,
        before_override: Option<StateMap>,
    ) -> Result<super::federation::receive::PduOutcome> {
        use super::federation::receive::PduOutcome;
        let lock = self.room_lock(&room_id.to_owned());
        let _guard = lock.lock().await;
        if matches!(self.stored_pdu(&signed.event_id)?, Some(s) if !s.outlier) {
            return Ok(PduOutcome::Duplicate);
        }
        let ctx = self.room_ctx(room_id)?;
        let (before, before_group) = match before_override {
            Some(m) => (Arc::new(m), BeforeGroup::New),
            None => {
                let (b, g, _) = self.before_from_prevs(room_id, rules, &signed.pdu.prev_events)?;
                (b, g)
            }
        };
        let fetch = |id: &EventId| self.pdu(id).ok().flatten();
        // 5. Passes authorization rules based on the state before the event, otherwise it is
        //    rejected.
        if let Err(e) = check_state_dependent_auth_rules(&rules.authorization, &signed.pdu, |t, k| {
            before.get(&(t.to_string(), k.to_owned())).and_then(|id| fetch(id))
        }) {
            return Ok(PduOutcome::Rejected(format!("state before the event: {e}")));
        }
        // 6. Passes authorization rules based on the current state of the room, otherwise it
        //    is "soft failed": kept in the DAG (events that build on it must still connect),
        //    but neither shown to clients nor built upon by us.
        //    An event of a branch our forward extremities do not build on (a partition's other
        //    side) is checked, as Synapse checks one across a gap, against the state the room
        //    has once the branches merge — the resolution of our extremities' states with the
        //    state before the event — not against our side's state alone: otherwise whether
        //    a rejoin or a message of the other side counts would depend on which server saw
        //    which branch first, and servers would keep disagreeing about who is in the room.
        let soft_failed = match check_state_dependent_auth_rules(&rules.authorization, &signed.pdu, |t, k| {
            ctx.state.get(&(t.to_string(), k.to_owned())).and_then(|id| fetch(id))
        }) {
            Ok(()) => false,
            Err(e) => {
                let merged = self.merged_state_before(&ctx, &signed.pdu, &before)?;
                match check_state_dependent_auth_rules(&rules.authorization, &signed.pdu, |t, k| {
                    merged.get(&(t.to_string(), k.to_owned())).and_then(|id| fetch(id))
                }) {
                    Ok(()) => false,
                    Err(_) => {
                        tracing::info!(event_id = %signed.event_id, reason = %e, "soft-failed PDU");
                        true
                    }
                }
            }
        };
        let state_after = signed.pdu.state_key.as_ref().map(|k| {
            let mut s = (*before).clone();
            s.insert((signed.pdu.kind.to_string(), k.clone()), signed.event_id.clone());
            Arc::new(s)
        });
        let mut prepared =
            Prepared { signed, before, before_group, state_after, room_state: None, txn: None, soft_failed };
        if !soft_failed {
            prepared.room_state = Some(self.room_state_with(&ctx, &prepared)?);
        }
        tracing::debug!(
            event_id = %prepared.signed.event_id,
            kind = %prepared.signed.pdu.kind,
            depth = prepared.signed.pdu.depth,
            soft_failed,
            state_from_origin = matches!(prepared.before_group, BeforeGroup::New),
            extremities = ctx.extremities.len(),
            "storing remote PDU"
        );
        if self.commit_prepared(&ctx, prepared, ctx.record.max_depth).await? {
            self.recheck_soft_failed(room_id).await?;
        }
        Ok(if soft_failed { PduOutcome::SoftFailed } else { PduOutcome::Accepted })
    }

    /// Start keeping a room this node just joined through another server: `state` is the
    /// room's state before our `join` (from send_join, its events already stored as outliers).
    ///
    /// `resident_rejected`: forward extremities of our stale copy that the room judged and
    /// went on without (soft-failed or set aside there, see `finish_join`); they stop being
    /// extremities here too.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn adopt_room(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        create_event: OwnedEventId,
        state: StateMap,
        join: SignedPdu,
        stale_copy: bool,
        resident_rejected: Vec<OwnedEventId>,
    ) -> Result<()> {
        let lock = self.room_lock(&room_id.to_owned());
        let _guard = lock.lock().await;
        let rules = rules_for(version)?;
        check_state_dependent_auth_rules(&rules.authorization, &join.pdu, |t, k| {
            state.get(&(t.to_string(), k.to_owned())).and_then(|id| self.pdu(id).ok().flatten())
        })
        .map_err(|e| Error::Forbidden(format!("the join does not pass the room's auth rules: {e}")))?;
        let before = Arc::new(state);
        let mut after = (*before).clone();
        after.insert(("m.room.member".to_owned(), join.pdu.sender.to_string()), join.event_id.clone());
        // A copy we kept from before this server left the room (`stale_copy`: the caller
        // found us out of the room when the join began) is stale: nobody sends events to a
        // server that is not in the room, so our forward extremities stopped where we left,
        // while the room went on. `join_via` pulled the history in between, up to the join;
        // the join is then one more forward extremity, and the room's state is resolved over
        // all of them (branches the resident has not seen may be news to it) — all but those
        // of our own events the room rejected (`rejected_own_extremities`). But when that
        // did not connect our copy to the join (too long a gap, or nobody could serve it),
        // the resident's state before our join (send_join) supersedes the copy: the join
        // becomes the only forward extremity and its state the room's (as Dendrite does for a
        // state-rewriting join). Resolving the old extremities against it would replay
        // conflicts the room settled long ago — e.g. an old join rule overriding a newer one
        // and soft-failing our own join.
        //
        // Not when the join already reached us through the room (the resident passed it on
        // while its send_join answer was on its way, and other events may build on it): it is
        // part of our copy then, which is no longer stale. Unless our stale copy soft-failed it
        // (the room's state there still had us out): the room accepted it (send_join answered),
        // so it is adopted as below, and what builds on it is judged again.
        if matches!(self.stored_pdu(&join.event_id)?, Some(s) if !s.outlier && !s.soft_failed) {
            let user = join.pdu.sender.clone();
            return self.commit(Batch::new(), |batch, _, _| Ok(self.forget_invite(batch, &user, room_id))).await;
        }
        let referenced =
            self.store.get(Tree::Referenced, &key(&[room_id.as_bytes(), join.event_id.as_bytes()]))?.is_some();
        let disconnected =
            join.pdu.prev_events.iter().any(|p| !matches!(self.stored_pdu(p), Ok(Some(s)) if !s.outlier));
        let replace = stale_copy && disconnected && !referenced;
        let (mut record, room_state, dropped_extremities) = match self.room(room_id)? {
            Some(mut record) if replace => {
                record.max_depth = record.max_depth.max(join.pdu.depth);
                (record, None, self.extremities(room_id)?)
            }
            // Our copy, caught up; or a concurrent join by another local user.
            Some(_) => {
                let mut ctx = self.room_ctx(room_id)?;
                let mut dropped = resident_rejected;
                dropped.retain(|e| ctx.extremities.contains(e));
                for d in &dropped {
                    tracing::info!(room = %room_id, event_id = %d, "an extremity of our copy the room went on without; no longer a forward extremity");
                }
                ctx.extremities.retain(|e| !dropped.contains(e));
                if stale_copy {
                    dropped.extend(self.rejected_own_extremities(&ctx, &join, &after)?);
                }
                ctx.extremities.retain(|e| !dropped.contains(e));
                let probe = Prepared {
                    signed: join.clone(),
                    before: before.clone(),
                    before_group: BeforeGroup::New,
                    state_after: Some(Arc::new(after.clone())),
                    room_state: None,
                    txn: None,
                    soft_failed: false,
                };
                let rs = self.room_state_with(&ctx, &probe)?;
                let mut record = ctx.record;
                record.max_depth = record.max_depth.max(join.pdu.depth);
                (record, Some(rs), dropped)
            }
            None => (
                RoomRecord { version: version.clone(), create_event, state_group: 0, max_depth: join.pdu.depth },
                None,
                Vec::new(),
            ),
        };
        let user = join.pdu.sender.clone();
        let prepared = Prepared {
            signed: join,
            before,
            before_group: BeforeGroup::New,
            state_after: Some(Arc::new(after)),
            room_state,
            txn: None,
            soft_failed: false,
        };
        let dests = self
            .commit(Batch::new(), |batch, pos, sg| {
                self.forget_invite(batch, &user, room_id);
                for e in &dropped_extremities {
                    batch.delete(Tree::Extremities, key(&[room_id.as_bytes(), e.as_bytes()]));
                }
                self.stage(batch, room_id, &rules, &mut record, std::slice::from_ref(&prepared), pos, sg)
            })
            .await?;
        tracing::debug!(room = %room_id, stale_copy, dropped = dropped_extremities.len(), "adopted the room");
        self.wake_sender(&dests);
        self.recheck_soft_failed(room_id).await
    }

    /// Up to `limit` events of `room_id`'s timeline after stream position `after`, oldest first,
    /// with their positions (the simulator's delivery observer reads this).
    pub fn timeline_after(&self, room_id: &RoomId, after: u64, limit: usize) -> Result<Vec<(u64, OwnedEventId)>> {
        let p = prefix(&[room_id.as_bytes()]);
        let from = key(&[room_id.as_bytes(), &(after.saturating_add(1)).to_be_bytes()]);
        let mut out = Vec::new();
        for (k, v) in self.store.scan(Tree::Timeline, &p, Some(&from), None, false, limit)? {
            let Ok(pos) = <[u8; 8]>::try_from(&k[k.len().saturating_sub(8)..]) else { continue };
            let Ok(id) = EventId::parse(&*String::from_utf8_lossy(&v)) else { continue };
            out.push((u64::from_be_bytes(pos), id));
        }
        Ok(out)
    }

    /// Whether an accepted event of `room_id` builds on `id` (it lists it among its prev events).
    pub fn is_built_on(&self, room_id: &RoomId, id: &EventId) -> Result<bool> {
        Ok(self.store.get(Tree::Referenced, &key(&[room_id.as_bytes(), id.as_bytes()]))?.is_some())
    }

    /// Forward extremities of a room.
    pub fn extremities(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>> {
        Ok(self
            .store
            .scan_prefix(Tree::Extremities, &prefix(&[room_id.as_bytes()]), usize::MAX)?
            .into_iter()
            .filter_map(|(_, v)| String::from_utf8(v).ok())
            .filter_map(|s| EventId::parse(s).ok())
            .collect())
    }

    /// Create a room as `creator` following `spec`; every initial event is committed in one
    /// atomic batch. Returns the room id.
    pub async fn create_room(&self, creator: &UserId, spec: CreateRoomSpec) -> Result<OwnedRoomId> {
        let version = spec.version.clone().unwrap_or(pdu::DEFAULT_ROOM_VERSION);
        let rules = rules_for(&version)?;
        // m.room.create
        let mut create_content = spec.creation_content.clone().unwrap_or_default();
        create_content.insert("room_version".into(), JsonValue::String(version.to_string()));
        if !rules.authorization.use_room_create_sender {
            create_content.insert("creator".into(), JsonValue::String(creator.to_string()));
        } else {
            create_content.remove("creator");
        }
        let explicit_room_id = if rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            let local = self.random_chars(b"abcdefghijklmnopqrstuvwxyz", 18);
            Some(
                RoomId::parse(format!("!{local}:{}", self.server_name()))
                    .map_err(|e| Error::Internal(e.to_string()))?,
            )
        };
        let create_t = PduTemplate {
            kind: TimelineEventType::RoomCreate,
            content: JsonValue::Object(create_content),
            state_key: Some(String::new()),
            redacts: None,
        };
        let create = build_and_sign(
            &self.identity,
            &rules,
            creator,
            &create_t,
            DagPosition { room_id: explicit_room_id.as_deref(), prev_events: &[], auth_events: &[], depth: 1 },
            self.clock.now_ms(),
        )?;
        check_state_independent_auth_rules(&rules.authorization, &create.pdu, |_: &EventId| None::<Pdu>)
            .map_err(|e| Error::BadJson(format!("invalid creation content: {e}")))?;
        let room_id = create.pdu.room.clone();
        let lock = self.room_lock(&room_id);
        let _guard = lock.lock().await;
        let state = Arc::new(StateMap::from([(("m.room.create".to_owned(), String::new()), create.event_id.clone())]));
        let mut ctx = RoomCtx {
            room_id: room_id.clone(),
            rules: rules.clone(),
            record: RoomRecord {
                version: version.clone(),
                create_event: create.event_id.clone(),
                state_group: 0,
                max_depth: 1,
            },
            state: state.clone(),
            extremities: vec![create.event_id.clone()],
            pending: [(create.event_id.clone(), create.pdu.clone())].into(),
        };
        // The create event is staged first; the rest are built against the growing state.
        let mut events = vec![Prepared {
            signed: create,
            before: Arc::new(StateMap::new()),
            before_group: BeforeGroup::Known(0),
            state_after: Some(state),
            room_state: None,
            txn: None,
            soft_failed: false,
        }];
        let profile = self.profile(creator)?;
        let mut member = json!({"membership": "join"});
        if let Some(d) = &profile.displayname {
            member["displayname"] = json!(d);
        }
        if let Some(a) = &profile.avatar_url {
            member["avatar_url"] = json!(a);
        }
        let st = |kind: &str, key: &str, content: JsonValue| PduTemplate {
            kind: TimelineEventType::from(kind),
            content,
            state_key: Some(key.to_owned()),
            redacts: None,
        };
        events.push(self.prepare(&mut ctx, creator, st("m.room.member", creator.as_str(), member), None)?);

        let preset = spec
            .preset
            .clone()
            .unwrap_or_else(|| if spec.visibility_public { "public_chat" } else { "private_chat" }.to_owned());
        let mut users = serde_json::Map::new();
        if !rules.authorization.explicitly_privilege_room_creators {
            users.insert(creator.to_string(), json!(100));
        }
        if preset == "trusted_private_chat" {
            for u in &spec.invite {
                users.insert(u.to_string(), json!(100));
            }
        }
        let mut pl = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                "m.room.server_acl": 100, "m.room.encryption": 100
            },
            "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50,
            "invite": 0, "notifications": {"room": 50}
        });
        if let Some(over) = &spec.power_level_content_override {
            for (k, v) in over {
                pl[k] = v.clone();
            }
        }
        events.push(self.prepare(&mut ctx, creator, st("m.room.power_levels", "", pl), None)?);
        let alias = match &spec.alias_localpart {
            Some(local) => {
                let alias = ruma::RoomAliasId::parse(format!("#{local}:{}", self.server_name()))
                    .map_err(|e| Error::InvalidParam(format!("invalid alias: {e}")))?;
                if self.store.get(Tree::Aliases, alias.as_bytes())?.is_some() {
                    return Err(Error::RoomInUse("room alias already taken".into()));
                }
                events.push(self.prepare(
                    &mut ctx,
                    creator,
                    st("m.room.canonical_alias", "", json!({"alias": alias})),
                    None,
                )?);
                Some(alias)
            }
            None => None,
        };
        let (join_rule, history, guest) = match preset.as_str() {
            "public_chat" => ("public", "shared", "forbidden"),
            "private_chat" | "trusted_private_chat" => ("invite", "shared", "can_join"),
            other => return Err(Error::InvalidParam(format!("unknown preset {other}"))),
        };
        events.push(self.prepare(
            &mut ctx,
            creator,
            st("m.room.join_rules", "", json!({"join_rule": join_rule})),
            None,
        )?);
        events.push(self.prepare(
            &mut ctx,
            creator,
            st("m.room.history_visibility", "", json!({"history_visibility": history})),
            None,
        )?);
        events.push(self.prepare(
            &mut ctx,
            creator,
            st("m.room.guest_access", "", json!({"guest_access": guest})),
            None,
        )?);
        for (t, k, c) in &spec.initial_state {
            events.push(self.prepare(&mut ctx, creator, st(t, k, c.clone()), None)?);
        }
        if let Some(name) = &spec.name {
            events.push(self.prepare(&mut ctx, creator, st("m.room.name", "", json!({"name": name})), None)?);
        }
        if let Some(topic) = &spec.topic {
            events.push(self.prepare(&mut ctx, creator, st("m.room.topic", "", json!({"topic": topic})), None)?);
        }
        // Users of other servers are invited once the room exists: their server countersigns
        // the invite (invite v2), which needs the room's state.
        let (local_invites, remote_invites): (Vec<&OwnedUserId>, Vec<&OwnedUserId>) =
            spec.invite.iter().partition(|u| u.server_name() == self.server_name());
        for u in local_invites {
            let mut c = json!({"membership": "invite"});
            if spec.is_direct {
                c["is_direct"] = json!(true);
            }
            events.push(self.prepare(&mut ctx, creator, st("m.room.member", u.as_str(), c), None)?);
        }
        let mut record = ctx.record.clone();
        record.max_depth = 1;
        record.state_group = 0;
        self.commit(Batch::new(), |batch, pos, sg| {
            if let Some(a) = &alias {
                batch.put(Tree::Aliases, a.as_bytes().to_vec(), room_id.as_bytes().to_vec());
            }
            if spec.visibility_public {
                batch.put(Tree::Directory, room_id.as_bytes().to_vec(), Vec::new());
            }
            self.stage(batch, &room_id, &rules, &mut record, &events, pos, sg)
        })
        .await
        .map(|d| self.wake_sender(&d))?;
        drop(_guard);
        for u in remote_invites {
            let extra = spec.is_direct.then(|| serde_json::Map::from_iter([("is_direct".to_owned(), json!(true))]));
            if let Err(e) = self.set_membership(creator, &room_id, u, "invite", None, extra).await {
                tracing::warn!(room = %room_id, user = %u, error = %e, "invite of a remote user failed");
            }
        }
        Ok(room_id)
    }

    /// Set a membership (`join`, `invite`, `leave`, `ban`) of `target` in `room`, sent by `sender`.
    pub async fn set_membership(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        membership: &str,
        reason: Option<String>,
        extra: Option<serde_json::Map<String, JsonValue>>,
    ) -> Result<OwnedEventId> {
        let mut content = serde_json::Map::new();
        content.insert("membership".into(), json!(membership));
        if membership == "join" || membership == "invite" {
            let profile = self.profile(target)?;
            if let Some(d) = profile.displayname {
                content.insert("displayname".into(), json!(d));
            }
            if let Some(a) = profile.avatar_url {
                content.insert("avatar_url".into(), json!(a));
            }
        }
        if let Some(r) = reason {
            content.insert("reason".into(), json!(r));
        }
        for (k, v) in extra.unwrap_or_default() {
            content.insert(k, v);
        }
        let t = PduTemplate {
            kind: TimelineEventType::RoomMember,
            content: JsonValue::Object(content),
            state_key: Some(target.to_string()),
            redacts: None,
        };
        self.send_event(sender, None, room_id, t, None).await
    }

    /// Rooms `user` has the given membership in (local users only).
    pub fn user_rooms(&self, user: &UserId) -> Result<Vec<(OwnedRoomId, UserRoom)>> {
        let p = prefix(&[user.as_bytes()]);
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(Tree::UserRooms, &p, usize::MAX)? {
            let room = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            let Ok(room) = RoomId::parse(room) else { continue };
            let ur: UserRoom =
                serde_json::from_slice(&v).map_err(|e| Error::Internal(format!("bad user-room record: {e}")))?;
            out.push((room, ur));
        }
        Ok(out)
    }

    /// Hide a room the user has left from sync (`/forget`).
    pub async fn forget_room(&self, user: &UserId, room_id: &RoomId) -> Result<()> {
        let k = key(&[user.as_bytes(), room_id.as_bytes()]);
        let Some(mut ur): Option<UserRoom> = self.get_json(Tree::UserRooms, &k)? else {
            return Err(Error::NotFound("you were never in this room".into()));
        };
        if ur.membership == "join" || ur.membership == "invite" {
            return Err(Error::Unknown("leave the room before forgetting it".into()));
        }
        ur.forgotten = true;
        let mut b = Batch::new();
        b.put(Tree::UserRooms, k, to_json(&ur));
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Members of a room with their membership (from current state).
    pub fn members(&self, room_id: &RoomId) -> Result<Vec<(OwnedUserId, Pdu)>> {
        let state = self.current_state(room_id)?;
        let mut out = Vec::new();
        for ((t, k), id) in state.iter() {
            if t == "m.room.member" {
                if let (Ok(u), Some(p)) = (UserId::parse(k.as_str()), self.pdu(id)?) {
                    out.push((u, p));
                }
            }
        }
        Ok(out)
    }

    /// The room an alias points to.
    pub fn resolve_alias(&self, alias: &ruma::RoomAliasId) -> Result<Option<OwnedRoomId>> {
        match self.store.get(Tree::Aliases, alias.as_bytes())? {
            None => Ok(None),
            Some(v) => Ok(RoomId::parse(String::from_utf8_lossy(&v)).ok()),
        }
    }

    /// Point `alias` at `room_id` (fails if taken).
    pub async fn set_alias(&self, alias: &ruma::RoomAliasId, room_id: &RoomId) -> Result<()> {
        if alias.server_name() != self.server_name() {
            return Err(Error::InvalidParam("alias must be on this server".into()));
        }
        if self.store.get(Tree::Aliases, alias.as_bytes())?.is_some() {
            return Err(Error::Conflict(format!("room alias {alias} already exists")));
        }
        let mut b = Batch::new();
        b.put(Tree::Aliases, alias.as_bytes().to_vec(), room_id.as_bytes().to_vec());
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Remove an alias.
    pub async fn delete_alias(&self, alias: &ruma::RoomAliasId) -> Result<()> {
        if self.store.get(Tree::Aliases, alias.as_bytes())?.is_none() {
            return Err(Error::NotFound("unknown alias".into()));
        }
        let mut b = Batch::new();
        b.delete(Tree::Aliases, alias.as_bytes().to_vec());
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Publish or unpublish a room in the local directory.
    pub async fn set_directory_visibility(&self, room_id: &RoomId, public: bool) -> Result<()> {
        let mut b = Batch::new();
        if public {
            b.put(Tree::Directory, room_id.as_bytes().to_vec(), Vec::new());
        } else {
            b.delete(Tree::Directory, room_id.as_bytes().to_vec());
        }
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Whether a room is published.
    pub fn is_published(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.store.get(Tree::Directory, room_id.as_bytes())?.is_some())
    }

    /// Published rooms.
    pub fn published_rooms(&self) -> Result<Vec<OwnedRoomId>> {
        Ok(self
            .store
            .scan_prefix(Tree::Directory, b"", usize::MAX)?
            .into_iter()
            .filter_map(|(k, _)| RoomId::parse(String::from_utf8_lossy(&k)).ok())
            .collect())
    }

    /// Local aliases pointing at `room`.
    pub fn room_aliases(&self, room: &RoomId) -> Result<Vec<String>> {
        Ok(self
            .store
            .scan_prefix(Tree::Aliases, b"", usize::MAX)?
            .into_iter()
            .filter(|(_, v)| v.as_slice() == room.as_bytes())
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect())
    }

    /// A `publicRooms` chunk entry for `room`.
    pub fn public_room_entry(&self, room: &RoomId) -> Result<JsonValue> {
        let state = self.current_state(room)?;
        let get = |t: &str, field: &str| -> Result<Option<JsonValue>> {
            Ok(match state.get(&(t.to_owned(), String::new())) {
                Some(id) => self.pdu(id)?.and_then(|p| p.content_value().get(field).cloned()),
                None => None,
            })
        };
        let joined = self
            .members(room)?
            .iter()
            .filter(|(_, p)| p.content_value().get("membership").and_then(|m| m.as_str()) == Some("join"))
            .count();
        let mut e = json!({
            "room_id": room,
            "num_joined_members": joined,
            "world_readable": get("m.room.history_visibility", "history_visibility")?.as_ref().and_then(|v| v.as_str()) == Some("world_readable"),
            "guest_can_join": get("m.room.guest_access", "guest_access")?.as_ref().and_then(|v| v.as_str()) == Some("can_join"),
            "join_rule": get("m.room.join_rules", "join_rule")?.unwrap_or(json!("invite")),
        });
        for (key, t, f) in [
            ("name", "m.room.name", "name"),
            ("topic", "m.room.topic", "topic"),
            ("canonical_alias", "m.room.canonical_alias", "alias"),
            ("avatar_url", "m.room.avatar", "url"),
            ("room_type", "m.room.create", "type"),
        ] {
            if let Some(v) = get(t, f)? {
                e[key] = v;
            }
        }
        Ok(e)
    }

    /// Whether `user` may see `pdu` under the room's history visibility.
    pub fn can_see_event(&self, user: &UserId, pdu: &Pdu, stored: &StoredPdu) -> Result<bool> {
        let state = self.state_of_group(stored.state_before)?;
        let hv = match state.get(&("m.room.history_visibility".to_owned(), String::new())) {
            Some(id) => self
                .pdu(id)?
                .and_then(|p| p.content_value().get("history_visibility").and_then(|v| v.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "shared".into()),
            None => "shared".into(),
        };
        if hv == "world_readable" {
            return Ok(true);
        }
        // The user's own membership event is always visible to them.
        if pdu.state_key.as_deref() == Some(user.as_str()) {
            return Ok(true);
        }
        let at_event = self.membership_in(&state, user)?;
        Ok(match hv.as_str() {
            "joined" => at_event.as_deref() == Some("join"),
            "invited" => matches!(at_event.as_deref(), Some("join") | Some("invite")),
            // shared: visible while joined at the event, or to current members.
            _ => at_event.as_deref() == Some("join") || self.membership(&pdu.room, user)?.as_deref() == Some("join"),
        })
    }
}
