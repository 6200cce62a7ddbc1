//! Reading the timeline: `/sync` (initial, incremental, long-poll), `/messages`, `/context`,
//! and the client format of events.
//!
//! Tokens: every sync-visible change has a position in one node-wide stream. A token `s<N>` is
//! the boundary just after position N: `/sync?since=s<N>` returns changes after N; `/messages`
//! backwards from `s<N>` returns events at positions ≤ N, forwards returns events after N.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use ruma::{
    api::client::filter::{FilterDefinition, RoomEventFilter},
    DeviceId, EventId, OwnedEventId, RoomId, UserId,
};
use serde_json::{json, Map, Value as JsonValue};

use super::{
    filter,
    pdu::{client_event, Pdu},
    rooms::StoredPdu,
    state::StateMap,
    Core, Error, Result,
};
use crate::store::{key, prefix, Tree};

/// Parse a stream token (`s123`, or a bare number).
pub fn parse_token(t: &str) -> Result<u64> {
    t.strip_prefix('s').unwrap_or(t).parse().map_err(|_| Error::InvalidParam(format!("invalid pagination token {t:?}")))
}

/// Format a stream token.
pub fn token(pos: u64) -> String {
    format!("s{pos}")
}

/// What a `/sync` call asks for.
#[derive(Clone, Debug, Default)]
pub struct SyncRequest {
    /// Position of the previous `next_batch`.
    pub since: Option<u64>,
    /// Send full state for every room.
    pub full_state: bool,
    /// The resolved filter.
    pub filter: FilterDefinition,
    /// Long-poll time.
    pub timeout_ms: u64,
}

/// Direction of `/messages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Older events first.
    Backward,
    /// Newer events first.
    Forward,
}

/// A page of `/messages`.
#[derive(Debug)]
pub struct MessagesPage {
    /// The events, in the order asked for.
    pub chunk: Vec<JsonValue>,
    /// The `from` token echoed.
    pub start: String,
    /// Token to continue from; `None` when there is nothing more.
    pub end: Option<String>,
    /// Member events of the senders in `chunk` (when lazy-loading members).
    pub state: Vec<JsonValue>,
}

/// The state events shown (stripped) to invitees, here and over federation with an invite.
pub(crate) const STRIPPED_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

impl Core {
    /// A stored event in client format, as `viewer` (a user on a device) sees it.
    pub fn client_event_for(
        &self,
        viewer: Option<(&UserId, &DeviceId)>,
        pdu: &Pdu,
        stored: &StoredPdu,
        with_room_id: bool,
    ) -> Result<JsonValue> {
        let mut unsigned = Map::new();
        if let (Some((_, d)), Some((sd, txn))) = (viewer, &stored.txn) {
            if d.as_str() == sd {
                unsigned.insert("transaction_id".into(), json!(txn));
            }
        }
        if let Some(by) = &stored.redacted_by {
            if let (Some(rp), Some(rs)) = (self.pdu(by)?, self.stored_pdu(by)?) {
                unsigned.insert("redacted_because".into(), client_event(&rp, self.now_ms(), Map::new(), with_room_id));
                let _ = rs;
            }
        }
        if let Some(sk) = &pdu.state_key {
            let before = self.state_of_group(stored.state_before)?;
            if let Some(prev_id) = before.get(&(pdu.kind.to_string(), sk.clone())) {
                if let Some(prev) = self.pdu(prev_id)? {
                    unsigned.insert("prev_content".into(), prev.content_value());
                    unsigned.insert("replaces_state".into(), json!(prev_id));
                }
            }
        }
        if let Some(r) = self.bundled_relations(viewer, pdu, stored, with_room_id)? {
            unsigned.insert("m.relations".into(), r);
        }
        Ok(client_event(pdu, self.now_ms(), unsigned, with_room_id))
    }

    fn load(&self, id: &EventId) -> Result<Option<(Pdu, StoredPdu)>> {
        match self.stored_pdu(id)? {
            None => Ok(None),
            Some(s) => Ok(Some((Pdu::from_json(id.to_owned(), &s.json)?, s))),
        }
    }

    /// Events of `room` with positions in `(after, upto]`, newest first, that pass `f` and the
    /// visibility rules for `user`; at most `limit`, plus whether more exist.
    fn timeline_window(
        &self,
        user: &UserId,
        room: &RoomId,
        after: u64,
        upto: u64,
        limit: usize,
        f: &RoomEventFilter,
    ) -> Result<(Vec<(Pdu, StoredPdu)>, bool)> {
        let p = prefix(&[room.as_bytes()]);
        let lo = key(&[room.as_bytes(), &(after + 1).to_be_bytes()]);
        let mut hi = key(&[room.as_bytes(), &upto.saturating_add(1).to_be_bytes()]);
        let mut out = Vec::new();
        loop {
            let chunk = self.store.scan(Tree::Timeline, &p, Some(&lo), Some(&hi), true, 64)?;
            if chunk.is_empty() {
                return Ok((out, false));
            }
            for (k, v) in &chunk {
                let id = EventId::parse(String::from_utf8_lossy(v)).map_err(|e| Error::Internal(e.to_string()))?;
                let Some((pdu, stored)) = self.load(&id)? else { continue };
                if !filter::matches(f, &pdu) || !self.can_see_event(user, &pdu, &stored)? {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push((pdu, stored));
                hi = k.clone();
            }
            if let Some((k, _)) = chunk.last() {
                hi = k.clone();
            }
        }
    }

    /// `/sync`: wait up to `timeout_ms` for something new after `since`, then answer.
    pub async fn sync(&self, user: &UserId, device: &DeviceId, req: SyncRequest) -> Result<JsonValue> {
        let timeout = Duration::from_millis(req.timeout_ms.min(self.limits.sync_timeout_ms_max));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.subscribe();
        if let Some(since) = req.since {
            // The client has seen everything up to `since`: drop the to-device messages it got.
            self.ack_to_device(user, device, since).await?;
        }
        loop {
            self.expire_typing().await?;
            let upto = *rx.borrow_and_update();
            let (resp, has_content) = self.sync_once(user, device, &req, upto)?;
            if has_content || req.since.is_none() || req.full_state || tokio::time::Instant::now() >= deadline {
                return Ok(resp);
            }
            // Also wake when a typing notification times out (that is a change to report).
            let wake = self.typing_wake_at(deadline);
            match tokio::time::timeout_at(wake, rx.changed()).await {
                Ok(Ok(())) => continue,
                Err(_) if wake < deadline => continue,
                // Timed out (or the core is shutting down): answer with nothing new.
                _ => return Ok(resp),
            }
        }
    }

    fn sync_once(&self, user: &UserId, device: &DeviceId, req: &SyncRequest, upto: u64) -> Result<(JsonValue, bool)> {
        let since = req.since.unwrap_or(0);
        // To-device, device lists, key counts (e2ee.rs); may lower `upto` for the whole response.
        let e2ee = self.sync_e2ee(user, device, req.since, upto)?;
        let upto = e2ee.upto;
        let rf = &req.filter.room;
        let tl_limit = rf
            .timeline
            .limit
            .map(|l| u64::from(l) as usize)
            .unwrap_or(self.limits.timeline_limit_default)
            .min(self.limits.timeline_limit_max);
        let mut join = Map::new();
        let mut invite = Map::new();
        let mut leave = Map::new();
        for (room, ur) in self.user_rooms(user)? {
            if ur.forgotten || ur.pos > upto || !filter::room_allowed(&rf.rooms, &rf.not_rooms, &room) {
                continue;
            }
            let changed_membership = req.since.is_none() || ur.pos > since;
            match ur.membership.as_str() {
                "join" => {
                    let newly = changed_membership || req.full_state;
                    let from = if changed_membership { 0 } else { since };
                    if let Some(r) = self.sync_room(user, device, &room, from, upto, newly, tl_limit, req)? {
                        join.insert(room.to_string(), r);
                    }
                }
                "invite" if changed_membership => {
                    let events = match self.pending_invite(user, &room)? {
                        Some(p) if self.room(&room)?.is_none() => p.invite_state,
                        _ => self.stripped_state(&room, Some(&ur.event_id))?,
                    };
                    invite.insert(room.to_string(), json!({"invite_state": {"events": events}}));
                }
                "leave" | "ban" if changed_membership && (req.since.is_some() || rf.include_leave) => {
                    let (events, limited) = self.timeline_window(user, &room, since, ur.pos, tl_limit, &rf.timeline)?;
                    let prev_batch = events.last().map(|(_, s)| s.pos.saturating_sub(1)).unwrap_or(since);
                    let mut tl = Vec::new();
                    for (p, s) in events.iter().rev() {
                        tl.push(self.client_event_for(Some((user, device)), p, s, false)?);
                    }
                    leave.insert(
                        room.to_string(),
                        json!({
                            "timeline": {"events": tl, "limited": limited, "prev_batch": token(prev_batch)},
                            "state": {"events": []},
                            "account_data": {"events": []},
                        }),
                    );
                }
                _ => {}
            }
        }
        let mut global = Vec::new();
        if !is_excluded(&req.filter.account_data.types, &req.filter.account_data.not_types, Some("m.push_rules")) {
            global.extend(self.default_push_rules_event(user, req.since)?);
        }
        if !is_excluded(&req.filter.account_data.types, &req.filter.account_data.not_types, None) {
            for (kind, e) in self.account_data_since(user, None, since)? {
                if e.pos <= upto
                    && !is_excluded(&req.filter.account_data.types, &req.filter.account_data.not_types, Some(&kind))
                {
                    global.push(json!({"type": kind, "content": e.content}));
                }
            }
        }
        let has_content =
            !join.is_empty() || !invite.is_empty() || !leave.is_empty() || !global.is_empty() || e2ee.has_content();
        let mut resp = json!({
            "next_batch": token(upto),
            "rooms": {"join": join, "invite": invite, "leave": leave, "knock": {}},
            "account_data": {"events": global},
            "presence": {"events": []},
            "to_device": {"events": []},
            "device_lists": {"changed": [], "left": []},
            "device_one_time_keys_count": {},
        });
        e2ee.fill(&mut resp);
        Ok((resp, has_content))
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_room(
        &self,
        user: &UserId,
        device: &DeviceId,
        room: &RoomId,
        from: u64,
        upto: u64,
        newly: bool,
        limit: usize,
        req: &SyncRequest,
    ) -> Result<Option<JsonValue>> {
        let rf = &req.filter.room;
        let (events, limited) = self.timeline_window(user, room, from, upto, limit, &rf.timeline)?;
        let in_timeline: BTreeSet<OwnedEventId> = events.iter().map(|(p, _)| p.event_id.clone()).collect();
        let first_pos = events.last().map(|(_, s)| s.pos).unwrap_or(upto + 1);
        // State: everything at the start of the timeline for a new room; otherwise the state
        // changes that the (limited) timeline skipped.
        let mut state_events = Vec::new();
        if newly || limited {
            let current = self.current_state(room)?;
            for id in current.values() {
                if in_timeline.contains(id) {
                    continue;
                }
                let Some((p, s)) = self.load(id)? else { continue };
                if s.pos > upto || s.pos >= first_pos || (!newly && s.pos <= from) {
                    continue;
                }
                if !filter::matches(&rf.state, &p) {
                    continue;
                }
                state_events.push(self.client_event_for(Some((user, device)), &p, &s, false)?);
            }
        }
        let mut account_data = Vec::new();
        for (kind, e) in self.account_data_since(user, Some(room), if newly { 0 } else { from })? {
            if e.pos <= upto {
                account_data.push(json!({"type": kind, "content": e.content}));
            }
        }
        let ephemeral = self.room_ephemeral(user, room, from, upto, newly, &rf.ephemeral)?;
        if !newly && events.is_empty() && state_events.is_empty() && account_data.is_empty() && ephemeral.is_empty() {
            return Ok(None);
        }
        let mut tl = Vec::with_capacity(events.len());
        for (p, s) in events.iter().rev() {
            tl.push(self.client_event_for(Some((user, device)), p, s, false)?);
        }
        let prev_batch = events.last().map(|(_, s)| s.pos.saturating_sub(1)).unwrap_or(upto);
        let membership_changed = newly || events.iter().any(|(p, _)| p.kind.to_string() == "m.room.member");
        let mut room_json = json!({
            "timeline": {"events": tl, "limited": limited, "prev_batch": token(prev_batch)},
            "state": {"events": state_events},
            "account_data": {"events": account_data},
            "ephemeral": {"events": ephemeral},
            "unread_notifications": {},
        });
        let threaded = rf.timeline.unread_thread_notifications;
        self.room_unread(user, room, upto, threaded)?.fill(&mut room_json, threaded);
        if membership_changed {
            room_json["summary"] = self.room_summary(room, user)?;
        }
        Ok(Some(room_json))
    }

    /// The `summary` block of a joined room.
    pub fn room_summary(&self, room: &RoomId, user: &UserId) -> Result<JsonValue> {
        let mut joined = 0u64;
        let mut invited = 0u64;
        let mut heroes = Vec::new();
        for (u, p) in self.members(room)? {
            let m = p.content_value().get("membership").and_then(|m| m.as_str()).unwrap_or("").to_owned();
            match m.as_str() {
                "join" => joined += 1,
                "invite" => invited += 1,
                _ => continue,
            }
            if u != user && heroes.len() < 5 {
                heroes.push(u.to_string());
            }
        }
        Ok(json!({"m.heroes": heroes, "m.joined_member_count": joined, "m.invited_member_count": invited}))
    }

    /// Stripped state for invites (and the invite event itself).
    pub fn stripped_state(&self, room: &RoomId, invite_event: Option<&EventId>) -> Result<Vec<JsonValue>> {
        let state = self.current_state(room)?;
        let mut out = Vec::new();
        let mut ids: Vec<OwnedEventId> =
            STRIPPED_TYPES.iter().filter_map(|t| state.get(&((*t).to_owned(), String::new())).cloned()).collect();
        ids.extend(invite_event.map(ToOwned::to_owned));
        for id in ids {
            if let Some(p) = self.pdu(&id)? {
                out.push(json!({
                    "type": p.kind.to_string(), "state_key": p.state_key, "content": p.content_value(), "sender": p.sender,
                }));
            }
        }
        Ok(out)
    }

    /// `/messages`.
    #[allow(clippy::too_many_arguments)]
    pub fn messages(
        &self,
        user: &UserId,
        device: &DeviceId,
        room: &RoomId,
        from: Option<u64>,
        to: Option<u64>,
        dir: Direction,
        limit: usize,
        f: &RoomEventFilter,
    ) -> Result<MessagesPage> {
        self.require_visible_room(user, room)?;
        let limit = limit.clamp(1, self.limits.timeline_limit_max);
        let head = self.visible_pos();
        let (events, more) = match dir {
            Direction::Backward => {
                let from = from.unwrap_or(head);
                let after = to.unwrap_or(0);
                let (ev, more) = self.timeline_window(user, room, after, from, limit, f)?;
                (ev, more)
            }
            Direction::Forward => {
                let from = from.unwrap_or(0);
                let upto = to.unwrap_or(head).min(head);
                let (ev, _) = self.timeline_window(user, room, from, upto, usize::MAX >> 1, f)?;
                let mut ev: Vec<_> = ev.into_iter().rev().collect();
                let more = ev.len() > limit;
                ev.truncate(limit);
                (ev, more)
            }
        };
        let start = token(from.unwrap_or(if dir == Direction::Backward { head } else { 0 }));
        let end = events.last().map(|(_, s)| match dir {
            Direction::Backward => token(s.pos.saturating_sub(1)),
            Direction::Forward => token(s.pos),
        });
        let mut chunk = Vec::with_capacity(events.len());
        let mut senders = BTreeSet::new();
        for (p, s) in &events {
            senders.insert(p.sender.clone());
            chunk.push(self.client_event_for(Some((user, device)), p, s, true)?);
        }
        let mut state = Vec::new();
        if !f.lazy_load_options.is_disabled() {
            let current = self.current_state(room)?;
            for u in senders {
                if let Some(id) = current.get(&("m.room.member".to_owned(), u.to_string())) {
                    if let Some((p, s)) = self.load(id)? {
                        state.push(self.client_event_for(Some((user, device)), &p, &s, true)?);
                    }
                }
            }
        }
        Ok(MessagesPage { chunk, start, end: if more { end } else { None }, state })
    }

    /// Fail unless `user` is or was in `room` (so it may read some of its history).
    pub fn require_visible_room(&self, user: &UserId, room: &RoomId) -> Result<()> {
        if self.room(room)?.is_none() {
            return Err(Error::Forbidden("you are not in this room".into()));
        }
        let ur: Option<super::rooms::UserRoom> =
            self.get_json(Tree::UserRooms, &key(&[user.as_bytes(), room.as_bytes()]))?;
        match ur {
            Some(_) => Ok(()),
            None => {
                // World-readable rooms may be read by anyone.
                let hv = self.state_event(room, "m.room.history_visibility", "")?.and_then(|p| {
                    p.content_value().get("history_visibility").and_then(|v| v.as_str()).map(str::to_owned)
                });
                if hv.as_deref() == Some("world_readable") {
                    Ok(())
                } else {
                    Err(Error::Forbidden("you are not in this room".into()))
                }
            }
        }
    }

    /// One event, if `user` may see it.
    pub fn event_for_user(&self, user: &UserId, device: &DeviceId, room: &RoomId, id: &EventId) -> Result<JsonValue> {
        self.require_visible_room(user, room)?;
        let Some((p, s)) = self.load(id)? else {
            return Err(Error::NotFound("event not found".into()));
        };
        if p.room != room || !self.can_see_event(user, &p, &s)? {
            return Err(Error::NotFound("event not found".into()));
        }
        self.client_event_for(Some((user, device)), &p, &s, true)
    }

    /// `/context`: the event, `limit/2` events before and after, and the state at the event.
    pub fn context(
        &self,
        user: &UserId,
        device: &DeviceId,
        room: &RoomId,
        id: &EventId,
        limit: usize,
        f: &RoomEventFilter,
    ) -> Result<JsonValue> {
        let event = self.event_for_user(user, device, room, id)?;
        let Some((_, s)) = self.load(id)? else { return Err(Error::NotFound("event not found".into())) };
        let limit = limit.min(self.limits.timeline_limit_max);
        let before_n = limit / 2;
        let after_n = limit - before_n;
        let (before, _) = self.timeline_window(user, room, 0, s.pos.saturating_sub(1), before_n, f)?;
        let head = self.visible_pos();
        let (after_all, _) = self.timeline_window(user, room, s.pos, head, usize::MAX >> 1, f)?;
        let after: Vec<_> = after_all.into_iter().rev().take(after_n).collect();
        let mut eb = Vec::new();
        for (p, st) in &before {
            eb.push(self.client_event_for(Some((user, device)), p, st, true)?);
        }
        let mut ea = Vec::new();
        for (p, st) in &after {
            ea.push(self.client_event_for(Some((user, device)), p, st, true)?);
        }
        let start = before.last().map(|(_, st)| st.pos.saturating_sub(1)).unwrap_or(s.pos.saturating_sub(1));
        let end = after.last().map(|(_, st)| st.pos).unwrap_or(s.pos);
        let state_map: Arc<StateMap> = self.state_of_group(s.state_after)?;
        let mut state = Vec::new();
        for sid in state_map.values() {
            if let Some((p, st)) = self.load(sid)? {
                state.push(self.client_event_for(Some((user, device)), &p, &st, true)?);
            }
        }
        Ok(json!({
            "event": event, "events_before": eb, "events_after": ea,
            "start": token(start), "end": token(end), "state": state,
        }))
    }
}

fn is_excluded(types: &Option<Vec<String>>, not_types: &[String], kind: Option<&str>) -> bool {
    let matches = |p: &String, k: &str| p.strip_suffix('*').map_or(p == k, |pre| k.starts_with(pre));
    match kind {
        None => types.as_ref().is_some_and(|t| t.is_empty()),
        Some(k) => {
            not_types.iter().any(|p| matches(p, k)) || types.as_ref().is_some_and(|t| !t.iter().any(|p| matches(p, k)))
        }
    }
}
