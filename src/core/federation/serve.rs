//! The resident side of read-only federation requests: events, missing events, backfill, state.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{EventId, OwnedEventId, RoomId, ServerName};
use serde_json::value::RawValue;

use crate::core::{pdu::Pdu, Core, Error, Result};

/// Most events one `get_missing_events` or `backfill` answer carries.
pub const MAX_EVENTS_PER_ANSWER: usize = 100;
/// Prev events of an event looked at to tell whether a server was in the room just before it.
const MAX_PREV_EVENTS_CHECKED: usize = 20;
/// How long a server a resolution let out of a room may still read its history.
pub const LET_OUT_READ_MS: u64 = 10 * 60 * 1000;
/// Most such grants kept (the oldest go first).
const LET_OUT_MAX: usize = 1024;

impl Core {
    /// Fail unless `origin` has a joined member in `room`, or had one just before or after
    /// `at` — on any branch `at` merges, i.e. after one of its prev events — or `at` is a
    /// membership event about one of its users (a server that was kicked or banned, or is
    /// being let back in, must be able to fetch the history leading to that; so must one that
    /// a merge of branches put out of the room, which is told so by that merge and cannot
    /// know it otherwise).
    ///
    /// A server that a resolution of our forward extremities let out of the room (not a kick
    /// or ban: see [`Core::note_let_out`]) may read its history for [`LET_OUT_READ_MS`] after:
    /// we send it our extremities so that it learns it is out, and it must be able to fetch
    /// what lies behind them — it holds our old state, in which it was in.
    pub fn require_server_in_room(&self, origin: &ServerName, room: &RoomId, at: Option<&EventId>) -> Result<()> {
        if self.servers_in_room(room)?.contains(origin) {
            return Ok(());
        }
        if self.may_read_after_let_out(room, origin) {
            return Ok(());
        }
        if let Some(e) = at {
            if let Some(stored) = self.stored_pdu(e)? {
                let about_origin = Pdu::from_json(e.to_owned(), &stored.json).ok().is_some_and(|p| {
                    p.kind == ruma::events::TimelineEventType::RoomMember
                        && p.state_key
                            .as_deref()
                            .and_then(|k| ruma::UserId::parse(k).ok())
                            .is_some_and(|u| u.server_name() == origin)
                });
                if about_origin && !stored.outlier {
                    return Ok(());
                }
                for st in [self.state_after(&stored)?, self.state_of_group(stored.state_before)?] {
                    if self.servers_in_state(&st, &|_| None)?.contains(origin) {
                        return Ok(());
                    }
                }
                if !stored.outlier {
                    let prevs = Pdu::from_json(e.to_owned(), &stored.json)?.prev_events;
                    for prev in prevs.iter().take(MAX_PREV_EVENTS_CHECKED) {
                        let Some(ps) = self.stored_pdu(prev)? else { continue };
                        if ps.outlier {
                            continue;
                        }
                        let st = self.state_after(&ps)?;
                        if self.servers_in_state(&st, &|_| None)?.contains(origin) {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err(Error::Forbidden(format!("{origin} is not in room {room}")))
    }

    /// Record that a resolution of our state let `server` out of `room` (it has no joined
    /// member left and none of its users is banned): it may read the room's history for
    /// [`LET_OUT_READ_MS`] (see [`Core::require_server_in_room`]).
    pub(crate) fn note_let_out(&self, room: &RoomId, server: &ServerName) {
        let until = self.now_ms().saturating_add(LET_OUT_READ_MS);
        let mut m = self.let_out.lock().unwrap_or_else(|e| e.into_inner());
        let k = (room.to_owned(), server.to_owned());
        if m.len() >= LET_OUT_MAX && !m.contains_key(&k) {
            if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                m.remove(&oldest);
            }
        }
        m.insert(k, until);
    }

    /// Servers a resolution let out of `room` whose grant is still live: our own events go to
    /// them too while it lasts, so that one which has not yet settled with the room (it holds a
    /// stale state) keeps hearing where the room's head goes.
    pub(crate) fn let_out_servers(&self, room: &RoomId) -> Vec<ruma::OwnedServerName> {
        let now = self.now_ms();
        let m = self.let_out.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().filter(|((r, _), until)| r == room && **until > now).map(|((_, s), _)| s.clone()).collect()
    }

    fn may_read_after_let_out(&self, room: &RoomId, server: &ServerName) -> bool {
        let now = self.now_ms();
        let mut m = self.let_out.lock().unwrap_or_else(|e| e.into_inner());
        let k = (room.to_owned(), server.to_owned());
        match m.get(&k) {
            Some(until) if *until > now => true,
            Some(_) => {
                m.remove(&k);
                false
            }
            None => false,
        }
    }

    fn raw_pdu(&self, id: &EventId) -> Result<Option<(Pdu, Box<RawValue>)>> {
        match self.stored_pdu(id)? {
            None => Ok(None),
            Some(s) => {
                let p = Pdu::from_json(id.to_owned(), &s.json)?;
                Ok(Some((p, RawValue::from_string(s.json).map_err(|e| Error::Internal(e.to_string()))?)))
            }
        }
    }

    /// `GET /event/{eventId}` for `origin`.
    pub fn event_for_server(&self, origin: &ServerName, id: &EventId) -> Result<Box<RawValue>> {
        let (p, raw) = self.raw_pdu(id)?.ok_or_else(|| Error::NotFound("event not found".into()))?;
        self.require_server_in_room(origin, &p.room, Some(id))?;
        Ok(raw)
    }

    /// Walk `prev_events` back from `from`, stopping at `stop`, collecting at most `limit`
    /// events of depth ≥ `min_depth`; `include_start` keeps the starting events themselves.
    fn walk_back(
        &self,
        room: &RoomId,
        from: &[OwnedEventId],
        stop: &BTreeSet<OwnedEventId>,
        limit: usize,
        min_depth: u64,
        include_start: bool,
    ) -> Result<Vec<(Pdu, Box<RawValue>)>> {
        let mut out: BTreeMap<OwnedEventId, (Pdu, Box<RawValue>)> = BTreeMap::new();
        let mut seen: BTreeSet<OwnedEventId> = BTreeSet::new();
        let mut frontier: Vec<OwnedEventId> = Vec::new();
        for id in from {
            if include_start {
                frontier.push(id.clone());
            } else if let Some((p, _)) = self.raw_pdu(id)? {
                frontier.extend(p.prev_events);
            }
        }
        // Breadth first, newest (deepest) first, so a limited answer is the most recent gap.
        while !frontier.is_empty() && out.len() < limit {
            let mut next = Vec::new();
            let mut layer: Vec<(Pdu, Box<RawValue>)> = Vec::new();
            for id in frontier {
                if stop.contains(&id) || !seen.insert(id.clone()) {
                    continue;
                }
                if let Some((p, raw)) = self.raw_pdu(&id)? {
                    if p.room == room && p.depth >= min_depth {
                        layer.push((p, raw));
                    }
                }
            }
            layer.sort_by(|a, b| b.0.depth.cmp(&a.0.depth));
            for (p, raw) in layer {
                if out.len() >= limit {
                    break;
                }
                next.extend(p.prev_events.iter().cloned());
                out.insert(p.event_id.clone(), (p, raw));
            }
            frontier = next;
        }
        let mut v: Vec<_> = out.into_values().collect();
        v.sort_by_key(|(p, _)| p.depth);
        Ok(v)
    }

    /// `POST /get_missing_events/{roomId}`: events before `latest` and after `earliest`,
    /// oldest first.
    pub fn missing_events_for_server(
        &self,
        origin: &ServerName,
        room: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<Box<RawValue>>> {
        self.require_server_in_room(origin, room, latest.first().map(|e| e.as_ref()))?;
        let stop: BTreeSet<OwnedEventId> = earliest.iter().cloned().collect();
        let limit = limit.clamp(1, MAX_EVENTS_PER_ANSWER);
        Ok(self.walk_back(room, latest, &stop, limit, min_depth, false)?.into_iter().map(|(_, r)| r).collect())
    }

    /// `GET /backfill/{roomId}`: `v` and the events before them, newest first.
    pub fn backfill_for_server(
        &self,
        origin: &ServerName,
        room: &RoomId,
        v: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Box<RawValue>>> {
        self.require_server_in_room(origin, room, v.first().map(|e| e.as_ref()))?;
        let limit = limit.clamp(1, MAX_EVENTS_PER_ANSWER);
        let mut evs = self.walk_back(room, v, &BTreeSet::new(), limit, 0, true)?;
        evs.reverse();
        Ok(evs.into_iter().map(|(_, r)| r).collect())
    }

    /// `GET /state_ids/{roomId}?event_id=`: the state before the event and its auth chain.
    pub fn state_ids_for_server(
        &self,
        origin: &ServerName,
        room: &RoomId,
        at: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        self.require_server_in_room(origin, room, Some(at))?;
        let stored = self.stored_pdu(at)?.ok_or_else(|| Error::NotFound("event not found".into()))?;
        if stored.outlier {
            return Err(Error::NotFound("no state known at that event".into()));
        }
        let state = self.state_of_group(stored.state_before)?;
        let pdu_ids: Vec<OwnedEventId> = state.values().cloned().collect();
        let chain = self.auth_chain(pdu_ids.iter().cloned())?;
        Ok((pdu_ids, chain.into_iter().collect()))
    }

    /// `GET /state/{roomId}?event_id=`: like `state_ids`, with the events themselves.
    pub fn state_for_server(
        &self,
        origin: &ServerName,
        room: &RoomId,
        at: &EventId,
    ) -> Result<(Vec<Box<RawValue>>, Vec<Box<RawValue>>)> {
        let (pdus, chain) = self.state_ids_for_server(origin, room, at)?;
        let load = |ids: Vec<OwnedEventId>| -> Result<Vec<Box<RawValue>>> {
            let mut out = Vec::new();
            for id in ids {
                if let Some((_, r)) = self.raw_pdu(&id)? {
                    out.push(r);
                }
            }
            Ok(out)
        };
        Ok((load(pdus)?, load(chain)?))
    }
}
