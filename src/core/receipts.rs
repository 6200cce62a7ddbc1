//! Receipts (`m.read`, `m.read.private`, threaded or not), the fully-read marker, and the
//! ephemeral block of a synced room (`m.typing` + `m.receipt`).
//!
//! Each user keeps one receipt per (room, type, thread) in [`Tree::Receipts`]; every change
//! takes a stream position and is indexed by it in [`Tree::ReceiptsByPos`], so an incremental
//! sync reads only the receipts that changed in `(since, upto]`. A receipt never moves
//! backwards: a receipt for an event older than the current one is accepted and ignored (as
//! Synapse does), which keeps unread counts monotonic when several devices race.
//! `m.read.private` receipts are only ever shown to their owner.

use std::collections::BTreeMap;

use ruma::{api::client::filter::RoomEventFilter, EventId, OwnedEventId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as JsonValue};

use super::{pdu::Pdu, rooms::StoredPdu, to_json, Core, Error, Result};
use crate::store::{key, prefix, Batch, Tree};

/// Receipt types clients may send.
pub const RECEIPT_TYPES: [&str; 2] = ["m.read", "m.read.private"];

/// Most receipt changes reported per room in one sync.
const SYNC_RECEIPTS_MAX: usize = 10_000;

/// One stored receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReceiptRecord {
    /// The event read up to.
    pub event_id: OwnedEventId,
    /// When the receipt was sent (ms).
    pub ts: u64,
    /// Stream position of this change.
    pub pos: u64,
    /// Stream position of the event (orders receipts against the timeline).
    pub event_pos: u64,
}

/// How far a user has read a room: the unthreaded receipt, and per-thread receipts (`main` or
/// a thread root id), as stream positions of the events they point at.
#[derive(Clone, Debug, Default)]
pub struct ReadPoints {
    /// Position of the latest unthreaded receipt (0 without one).
    pub unthreaded: u64,
    /// Position of the latest receipt per thread id.
    pub threads: BTreeMap<String, u64>,
}

impl ReadPoints {
    /// The read point that applies to an event in `thread` (`None` = main timeline).
    pub fn for_thread(&self, thread: Option<&str>) -> u64 {
        let t = self.threads.get(thread.unwrap_or("main")).copied().unwrap_or(0);
        self.unthreaded.max(t)
    }
}

/// The thread an event belongs to (`m.relates_to.rel_type == m.thread`): the root's id.
pub fn thread_of(content: &JsonValue) -> Option<&str> {
    let rel = content.get("m.relates_to")?;
    if rel.get("rel_type").and_then(JsonValue::as_str) == Some("m.thread") {
        rel.get("event_id").and_then(JsonValue::as_str)
    } else {
        None
    }
}

/// Whether an event type passes the `types` / `not_types` of a filter (`*` wildcards).
pub fn type_allowed(f: &RoomEventFilter, kind: &str) -> bool {
    let m = |p: &String| p.strip_suffix('*').map_or(p == kind, |pre| kind.starts_with(pre));
    !f.not_types.iter().any(m) && f.types.as_ref().is_none_or(|t| t.iter().any(m))
}

impl Core {
    /// An event of `room` that `user` may see, with its stored record.
    pub(crate) fn visible_event(&self, user: &UserId, room: &RoomId, id: &EventId) -> Result<(Pdu, StoredPdu)> {
        let not_found = || Error::NotFound("event not found".into());
        let stored = self.stored_pdu(id)?.ok_or_else(not_found)?;
        let pdu = Pdu::from_json(id.to_owned(), &stored.json)?;
        if pdu.room != room || !self.can_see_event(user, &pdu, &stored)? {
            return Err(not_found());
        }
        Ok((pdu, stored))
    }

    /// `POST /rooms/{room}/receipt/{type}/{event}`: `kind` is `m.read`, `m.read.private` or
    /// `m.fully_read`; `thread` is `None` (unthreaded), `main`, or a thread root id.
    pub async fn set_receipt(
        &self,
        user: &UserId,
        room: &RoomId,
        kind: &str,
        event: &EventId,
        thread: Option<&str>,
    ) -> Result<()> {
        if kind == "m.fully_read" {
            if thread.is_some() {
                return Err(Error::InvalidParam("m.fully_read cannot be threaded".into()));
            }
            return self.set_fully_read(user, room, event).await;
        }
        if !RECEIPT_TYPES.contains(&kind) {
            return Err(Error::InvalidParam(format!("unknown receipt type {kind}")));
        }
        if self.membership(room, user)?.as_deref() != Some("join") {
            return Err(Error::Forbidden("you are not joined to this room".into()));
        }
        let (pdu, stored) = self.visible_event(user, room, event)?;
        if let Some(t) = thread {
            let content = pdu.content_value();
            let in_thread = thread_of(&content);
            let ok = match t {
                "main" => in_thread.is_none(),
                root => {
                    EventId::parse(root).map_err(|_| Error::InvalidParam(format!("invalid thread_id {root}")))?;
                    in_thread == Some(root) || event.as_str() == root
                }
            };
            if !ok {
                return Err(Error::InvalidParam(format!("event {event} is not in thread {t}")));
            }
        }
        let rk = key(&[room.as_bytes(), user.as_bytes(), kind.as_bytes(), thread.unwrap_or("").as_bytes()]);
        let _guard = self.user_data_lock.lock().await;
        let old: Option<ReceiptRecord> = self.get_json(Tree::Receipts, &rk)?;
        if old.as_ref().is_some_and(|o| o.event_pos >= stored.pos) {
            return Ok(()); // receipts only move forward
        }
        let ts = self.now_ms();
        self.commit(Batch::new(), |b, pos, _| {
            let p = pos();
            if let Some(o) = &old {
                b.delete(Tree::ReceiptsByPos, key(&[room.as_bytes(), &o.pos.to_be_bytes()]));
            }
            let rec = ReceiptRecord { event_id: event.to_owned(), ts, pos: p, event_pos: stored.pos };
            b.put(Tree::Receipts, rk.clone(), to_json(&rec));
            b.put(Tree::ReceiptsByPos, key(&[room.as_bytes(), &p.to_be_bytes()]), rk.clone());
            Ok(())
        })
        .await?;
        // Public receipts go to the other servers in the room (federation/edu.rs).
        if kind == "m.read" {
            self.queue_receipt_edu(room, user, event, thread, ts);
        }
        Ok(())
    }

    /// Move the fully-read marker (`m.fully_read` room account data) to `event`; never back.
    pub async fn set_fully_read(&self, user: &UserId, room: &RoomId, event: &EventId) -> Result<()> {
        if self.membership(room, user)?.as_deref() != Some("join") {
            return Err(Error::Forbidden("you are not joined to this room".into()));
        }
        let (_, stored) = self.visible_event(user, room, event)?;
        let _guard = self.user_data_lock.lock().await;
        if let Some(cur) = self.account_data(user, Some(room), "m.fully_read")? {
            let cur_pos = cur
                .content
                .get("event_id")
                .and_then(JsonValue::as_str)
                .and_then(|e| EventId::parse(e).ok())
                .and_then(|e| self.stored_pdu(&e).ok().flatten())
                .map(|s| s.pos);
            if cur_pos.is_some_and(|p| p >= stored.pos) {
                return Ok(());
            }
        }
        self.set_account_data(user, Some(room), "m.fully_read", json!({"event_id": event})).await
    }

    /// `POST /rooms/{room}/read_markers`.
    pub async fn set_read_markers(
        &self,
        user: &UserId,
        room: &RoomId,
        fully_read: Option<&EventId>,
        read: Option<&EventId>,
        read_private: Option<&EventId>,
    ) -> Result<()> {
        if let Some(e) = fully_read {
            self.set_fully_read(user, room, e).await?;
        }
        if let Some(e) = read {
            self.set_receipt(user, room, "m.read", e, None).await?;
        }
        if let Some(e) = read_private {
            self.set_receipt(user, room, "m.read.private", e, None).await?;
        }
        Ok(())
    }

    /// How far `user` has read `room`.
    pub fn read_points(&self, user: &UserId, room: &RoomId) -> Result<ReadPoints> {
        let p = prefix(&[room.as_bytes(), user.as_bytes()]);
        let mut out = ReadPoints::default();
        for (k, v) in self.store.scan_prefix(Tree::Receipts, &p, usize::MAX)? {
            let rest = &k[p.len()..];
            let Some(sep) = rest.iter().position(|&b| b == 0xff) else { continue };
            let thread = String::from_utf8_lossy(&rest[sep + 1..]).into_owned();
            let rec: ReceiptRecord = serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?;
            if thread.is_empty() {
                out.unthreaded = out.unthreaded.max(rec.event_pos);
            } else {
                let t = out.threads.entry(thread).or_default();
                *t = (*t).max(rec.event_pos);
            }
        }
        Ok(out)
    }

    /// The `m.receipt` event of `room` with the receipts that changed in `(since, upto]`, as
    /// `viewer` may see them (`None` when there is none).
    pub fn receipt_event(&self, viewer: &UserId, room: &RoomId, since: u64, upto: u64) -> Result<Option<JsonValue>> {
        let p = prefix(&[room.as_bytes()]);
        let lo = key(&[room.as_bytes(), &(since + 1).to_be_bytes()]);
        let hi = key(&[room.as_bytes(), &upto.saturating_add(1).to_be_bytes()]);
        let mut content: BTreeMap<String, BTreeMap<String, BTreeMap<String, JsonValue>>> = BTreeMap::new();
        for (_, rk) in self.store.scan(Tree::ReceiptsByPos, &p, Some(&lo), Some(&hi), false, SYNC_RECEIPTS_MAX)? {
            let Some(rec) = self.get_json::<ReceiptRecord>(Tree::Receipts, &rk)? else { continue };
            let parts: Vec<&[u8]> = rk.splitn(4, |&b| b == 0xff).collect();
            let [_, user, kind, thread] = parts.as_slice() else { continue };
            let (user, kind, thread) = (
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(kind).into_owned(),
                String::from_utf8_lossy(thread).into_owned(),
            );
            if kind == "m.read.private" && user != viewer.as_str() {
                continue;
            }
            let mut r = Map::new();
            r.insert("ts".into(), json!(rec.ts));
            if !thread.is_empty() {
                r.insert("thread_id".into(), json!(thread));
            }
            content
                .entry(rec.event_id.to_string())
                .or_default()
                .entry(kind)
                .or_default()
                .insert(user, JsonValue::Object(r));
        }
        if content.is_empty() {
            return Ok(None);
        }
        Ok(Some(json!({"type": "m.receipt", "content": content})))
    }

    /// The `ephemeral.events` of a joined room in a sync covering `(since, upto]` (typing and
    /// receipts, as the filter allows). `initial` (a first sync of the room) reports every
    /// receipt and whoever is typing now.
    pub fn room_ephemeral(
        &self,
        user: &UserId,
        room: &RoomId,
        since: u64,
        upto: u64,
        initial: bool,
        f: &RoomEventFilter,
    ) -> Result<Vec<JsonValue>> {
        let since = if initial { 0 } else { since };
        let mut out = Vec::new();
        if type_allowed(f, "m.typing") {
            out.extend(self.typing_event(room, since, upto, initial));
        }
        if type_allowed(f, "m.receipt") {
            out.extend(self.receipt_event(user, room, since, upto)?);
        }
        if let Some(l) = f.limit {
            out.truncate(u64::from(l) as usize);
        }
        Ok(out)
    }
}
