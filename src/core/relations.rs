//! Relations: the index of live relations by type, bundled aggregations, `/relations` and
//! `/threads`.
//!
//! Every event with `m.relates_to.{rel_type, event_id}` is indexed when it is stored
//! ([`stage_relation`], called from `rooms.rs`) in [`Tree::RelationsByType`] as
//! `room ‖ target ‖ rel_type ‖ pos → {event_id, sender, type}`; thread replies also record
//! their root in [`Tree::ThreadRoots`]. A redaction removes the redacted event from both
//! relation indexes ([`stage_unrelation`]), so redacted relations stop counting at once.
//!
//! Bundled aggregations (`unsigned["m.relations"]`) follow the spec (v1.7+): `m.thread`
//! (latest event, count, whether the viewer took part), `m.replace` (the most recent valid
//! edit, as a whole event) and `m.reference` (a chunk of event ids). Reactions (`m.annotation`)
//! are not bundled; clients count them from `/relations`. At most `limits.relations_scan_max`
//! relations of each kind are looked at per event.

use ruma::{DeviceId, EventId, OwnedEventId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as JsonValue};

use super::{
    pdu::{client_event, Pdu},
    rooms::StoredPdu,
    sync::{token, Direction},
    to_json, Core, Error, Result,
};
use crate::store::{key, prefix, Batch, Entry, Tree};

/// How deep `recurse=true` follows relations of relations.
pub const RECURSION_DEPTH: usize = 3;

/// One indexed relation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelationEntry {
    /// The relating event.
    pub event_id: OwnedEventId,
    /// Its sender.
    pub sender: OwnedUserId,
    /// Its event type.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `(target, rel_type)` of an event's `m.relates_to`, when it has both.
fn relation_of(content: &JsonValue) -> Option<(&str, &str)> {
    let rel = content.get("m.relates_to")?;
    Some((rel.get("event_id")?.as_str()?, rel.get("rel_type")?.as_str()?))
}

/// The stream position at the end of a relation index key.
fn pos_of(k: &[u8]) -> u64 {
    k.len().checked_sub(8).and_then(|i| k[i..].try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// Queue the relation index entries of a newly stored event.
pub(crate) fn stage_relation(batch: &mut Batch, room: &RoomId, pdu: &Pdu, content: &JsonValue, pos: u64) {
    let Some((target, rel_type)) = relation_of(content) else { return };
    let entry =
        RelationEntry { event_id: pdu.event_id.clone(), sender: pdu.sender.clone(), kind: pdu.kind.to_string() };
    batch.put(
        Tree::RelationsByType,
        key(&[room.as_bytes(), target.as_bytes(), rel_type.as_bytes(), &pos.to_be_bytes()]),
        to_json(&entry),
    );
    if rel_type == "m.thread" {
        batch.put(Tree::ThreadRoots, key(&[room.as_bytes(), target.as_bytes()]), pos.to_be_bytes().to_vec());
    }
}

/// Queue the removal of a redacted event (its original, unredacted form) from the relation
/// indexes.
pub(crate) fn stage_unrelation(batch: &mut Batch, original: &Pdu, pos: u64) {
    let content = original.content_value();
    let Some(target) = content.get("m.relates_to").and_then(|r| r.get("event_id")).and_then(JsonValue::as_str) else {
        return;
    };
    let room = original.room.as_bytes();
    batch.delete(Tree::Relations, key(&[room, target.as_bytes(), &pos.to_be_bytes()]));
    if let Some((_, rel_type)) = relation_of(&content) {
        batch.delete(Tree::RelationsByType, key(&[room, target.as_bytes(), rel_type.as_bytes(), &pos.to_be_bytes()]));
    }
}

/// What `/relations` asks for.
#[derive(Clone, Debug)]
pub struct RelationsQuery {
    /// Only this `rel_type`.
    pub rel_type: Option<String>,
    /// Only this event type (needs `rel_type`).
    pub event_type: Option<String>,
    /// Start token.
    pub from: Option<u64>,
    /// End token.
    pub to: Option<u64>,
    /// Page size.
    pub limit: Option<usize>,
    /// Direction (backward = newest first, the default).
    pub dir: Direction,
    /// Include relations of relations (up to [`RECURSION_DEPTH`] levels).
    pub recurse: bool,
}

impl Core {
    /// Live relations of `target` (of one `rel_type`, or all), oldest first, at most `max`.
    fn relation_entries(
        &self,
        room: &RoomId,
        target: &EventId,
        rel_type: Option<&str>,
        max: usize,
    ) -> Result<Vec<(u64, RelationEntry)>> {
        let p = match rel_type {
            Some(t) => prefix(&[room.as_bytes(), target.as_bytes(), t.as_bytes()]),
            None => prefix(&[room.as_bytes(), target.as_bytes()]),
        };
        let rows: Vec<Entry> = self.store.scan_prefix(Tree::RelationsByType, &p, max)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let e: RelationEntry = serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?;
            out.push((pos_of(&k), e));
        }
        if rel_type.is_none() {
            out.sort_by_key(|(p, _)| *p);
        }
        Ok(out)
    }

    /// The newest live relation of `target` with `rel_type`, if any.
    fn latest_relation(&self, room: &RoomId, target: &EventId, rel_type: &str) -> Result<Option<(u64, RelationEntry)>> {
        let p = prefix(&[room.as_bytes(), target.as_bytes(), rel_type.as_bytes()]);
        let rows = self.store.scan(Tree::RelationsByType, &p, None, None, true, 1)?;
        match rows.into_iter().next() {
            None => Ok(None),
            Some((k, v)) => {
                Ok(Some((pos_of(&k), serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?)))
            }
        }
    }

    fn load_pdu(&self, id: &EventId) -> Result<Option<(Pdu, StoredPdu)>> {
        match self.stored_pdu(id)? {
            None => Ok(None),
            Some(s) => Ok(Some((Pdu::from_json(id.to_owned(), &s.json)?, s))),
        }
    }

    /// The `m.replace` bundle of `pdu`: its most recent valid edit, as a client event.
    fn replace_bundle(&self, pdu: &Pdu, with_room_id: bool) -> Result<Option<JsonValue>> {
        if pdu.state_key.is_some() {
            return Ok(None);
        }
        let mut best: Option<Pdu> = None;
        for (_, e) in
            self.relation_entries(&pdu.room, &pdu.event_id, Some("m.replace"), self.limits.relations_scan_max)?
        {
            // Only the original sender may edit, with an event of the same type.
            if e.sender != pdu.sender || e.kind != pdu.kind.to_string() {
                continue;
            }
            let Some((edit, _)) = self.load_pdu(&e.event_id)? else { continue };
            if edit.state_key.is_some() {
                continue;
            }
            let c = edit.content_value();
            if edit.kind.to_string() != "m.room.encrypted" && c.get("m.new_content").is_none() {
                continue;
            }
            let newer = best
                .as_ref()
                .is_none_or(|b| (edit.origin_server_ts, &edit.event_id) > (b.origin_server_ts, &b.event_id));
            if newer {
                best = Some(edit);
            }
        }
        Ok(best.map(|e| client_event(&e, self.now_ms(), Map::new(), with_room_id)))
    }

    /// The bundled aggregations of `pdu` (`unsigned["m.relations"]`), as `viewer` sees them.
    pub fn bundled_relations(
        &self,
        viewer: Option<(&UserId, &DeviceId)>,
        pdu: &Pdu,
        stored: &StoredPdu,
        with_room_id: bool,
    ) -> Result<Option<JsonValue>> {
        if stored.redacted_by.is_some() {
            return Ok(None);
        }
        let max = self.limits.relations_scan_max;
        let mut out = Map::new();
        // m.thread
        let replies = self.relation_entries(&pdu.room, &pdu.event_id, Some("m.thread"), max)?;
        if !replies.is_empty() {
            let user = viewer.map(|(u, _)| u);
            let participated = user.is_some_and(|u| pdu.sender == u || replies.iter().any(|(_, e)| e.sender == u));
            let mut latest = JsonValue::Null;
            for (_, e) in replies.iter().rev() {
                let Some((lp, ls)) = self.load_pdu(&e.event_id)? else { continue };
                if let Some(u) = user {
                    if !self.can_see_event(u, &lp, &ls)? {
                        continue;
                    }
                }
                latest = self.thread_latest_json(viewer, &lp, &ls, with_room_id)?;
                break;
            }
            out.insert(
                "m.thread".into(),
                json!({"latest_event": latest, "count": replies.len(), "current_user_participated": participated}),
            );
        }
        // m.replace
        if let Some(edit) = self.replace_bundle(pdu, with_room_id)? {
            out.insert("m.replace".into(), edit);
        }
        // m.reference
        let refs = self.relation_entries(&pdu.room, &pdu.event_id, Some("m.reference"), max)?;
        if !refs.is_empty() {
            let chunk: Vec<JsonValue> = refs.iter().map(|(_, e)| json!({"event_id": e.event_id})).collect();
            out.insert("m.reference".into(), json!({"chunk": chunk}));
        }
        Ok(if out.is_empty() { None } else { Some(JsonValue::Object(out)) })
    }

    /// A thread's latest event: the client event with its own edit bundled (not its thread,
    /// which keeps the bundling from recursing).
    fn thread_latest_json(
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
        if stored.redacted_by.is_none() {
            if let Some(edit) = self.replace_bundle(pdu, with_room_id)? {
                unsigned.insert("m.relations".into(), json!({"m.replace": edit}));
            }
        }
        Ok(client_event(pdu, self.now_ms(), unsigned, with_room_id))
    }

    /// `GET /rooms/{room}/relations/{event}[/{relType}[/{eventType}]]`.
    pub fn relations(
        &self,
        user: &UserId,
        device: &DeviceId,
        room: &RoomId,
        target: &EventId,
        q: &RelationsQuery,
    ) -> Result<JsonValue> {
        self.require_visible_room(user, room)?;
        self.visible_event(user, room, target)?;
        let max = self.limits.relations_scan_max;
        let mut found: Vec<(u64, RelationEntry)> = Vec::new();
        if q.recurse {
            let mut frontier = vec![target.to_owned()];
            for _ in 0..RECURSION_DEPTH {
                let mut next = Vec::new();
                for t in &frontier {
                    for (p, e) in self.relation_entries(room, t, None, max.saturating_sub(found.len()))? {
                        next.push(e.event_id.clone());
                        found.push((p, e));
                    }
                }
                if next.is_empty() || found.len() >= max {
                    break;
                }
                frontier = next;
            }
            found.sort_by_key(|(p, _)| *p);
            found.dedup_by_key(|(p, _)| *p);
        } else {
            found = self.relation_entries(room, target, q.rel_type.as_deref(), max)?;
        }
        // Filters apply to every returned event, direct or not.
        if q.recurse {
            if let Some(rt) = &q.rel_type {
                let mut keep = Vec::new();
                for (p, e) in found {
                    let Some((rp, _)) = self.load_pdu(&e.event_id)? else { continue };
                    if relation_of(&rp.content_value()).map(|(_, t)| t) == Some(rt.as_str()) {
                        keep.push((p, e));
                    }
                }
                found = keep;
            }
        }
        if let Some(et) = &q.event_type {
            found.retain(|(_, e)| e.kind == *et);
        }
        let in_range = |p: u64| match q.dir {
            Direction::Backward => q.from.is_none_or(|f| p <= f) && q.to.is_none_or(|t| p > t),
            Direction::Forward => q.from.is_none_or(|f| p > f) && q.to.is_none_or(|t| p <= t),
        };
        found.retain(|(p, _)| in_range(*p));
        if q.dir == Direction::Backward {
            found.reverse();
        }
        let limit = q.limit.unwrap_or(self.limits.timeline_limit_default).clamp(1, self.limits.timeline_limit_max);
        let mut chunk = Vec::new();
        let mut last = None;
        let mut more = false;
        for (p, e) in &found {
            if chunk.len() == limit {
                more = true;
                break;
            }
            last = Some(*p);
            let Some((rp, rs)) = self.load_pdu(&e.event_id)? else { continue };
            if !self.can_see_event(user, &rp, &rs)? {
                continue;
            }
            chunk.push(self.client_event_for(Some((user, device)), &rp, &rs, true)?);
        }
        let mut out = json!({"chunk": chunk});
        if let (true, Some(p)) = (more, last) {
            out["next_batch"] = json!(match q.dir {
                Direction::Backward => token(p.saturating_sub(1)),
                Direction::Forward => token(p),
            });
        }
        if let Some(f) = q.from {
            out["prev_batch"] = json!(token(f));
        }
        if q.recurse {
            out["recursion_depth"] = json!(RECURSION_DEPTH);
        }
        Ok(out)
    }

    /// `GET /rooms/{room}/threads`: thread roots, most recently active first. `from` is the
    /// `next_batch` of the previous page (threads whose latest reply is older than it).
    pub fn threads(
        &self,
        user: &UserId,
        device: &DeviceId,
        room: &RoomId,
        participated_only: bool,
        from: Option<u64>,
        limit: Option<usize>,
    ) -> Result<JsonValue> {
        self.require_visible_room(user, room)?;
        let max = self.limits.relations_scan_max;
        let mut roots: Vec<(u64, OwnedEventId)> = Vec::new();
        let p = prefix(&[room.as_bytes()]);
        for (k, _) in self.store.scan_prefix(Tree::ThreadRoots, &p, max)? {
            let Ok(root) = EventId::parse(String::from_utf8_lossy(&k[p.len()..]).as_ref()) else { continue };
            let Some((latest, _)) = self.latest_relation(room, &root, "m.thread")? else { continue };
            if from.is_some_and(|f| latest >= f) {
                continue;
            }
            roots.push((latest, root));
        }
        roots.sort_by(|a, b| b.cmp(a));
        let limit = limit.unwrap_or(self.limits.timeline_limit_default).clamp(1, self.limits.timeline_limit_max);
        let mut chunk = Vec::new();
        let mut next = None;
        for (latest, root) in roots {
            if chunk.len() == limit {
                next = Some(token(latest + 1));
                break;
            }
            let Ok((rp, rs)) = self.visible_event(user, room, &root) else { continue };
            if participated_only
                && rp.sender != user
                && !self.relation_entries(room, &root, Some("m.thread"), max)?.iter().any(|(_, e)| e.sender == user)
            {
                continue;
            }
            chunk.push(self.client_event_for(Some((user, device)), &rp, &rs, true)?);
        }
        let mut out = json!({"chunk": chunk});
        if let Some(n) = next {
            out["next_batch"] = json!(n);
        }
        Ok(out)
    }
}
