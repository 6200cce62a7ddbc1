//! `/search` over room messages: a bounded scan, no full-text index.
//!
//! A device holds little history, so search walks the timelines of the user's joined rooms
//! newest first (merged across rooms by stream position) and looks at no more than
//! `limits.search_scan_events_max` events per request. Matching is case-insensitive on words:
//! the search term and the searched keys (`content.body`, `content.name`, `content.topic` by
//! default) are split at every character that is not a letter or digit, and an event matches
//! when every word of the term is a prefix of some word of the event. The rank is the number of
//! matching words. History visibility applies (`Core::can_see_event`); encrypted events never
//! match (the server cannot read them).
//!
//! Pagination tokens are `<upper>.<offset>`: events below stream position `upper`, skipping
//! `offset` results (`order_by=rank` keeps `upper` fixed and moves `offset`; `recent` moves
//! `upper` past the last result).

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use ruma::{api::client::filter::RoomEventFilter, DeviceId, EventId, OwnedEventId, OwnedRoomId, RoomId, UserId};
use serde_json::{json, Map, Value as JsonValue};

use super::{filter, pdu::Pdu, rooms::StoredPdu, sync::Direction, Core, Error, Result};
use crate::store::{key, prefix, Tree};

/// The keys searched when the request names none.
pub const DEFAULT_KEYS: [&str; 3] = ["content.body", "content.name", "content.topic"];

/// What a `room_events` search asks for (validated at the edge).
#[derive(Clone, Debug, Default)]
pub struct SearchQuery {
    /// The words to look for.
    pub term: String,
    /// Dotted keys to search (`content.body`, ...).
    pub keys: Vec<String>,
    /// Event filter (rooms, types, senders, limit).
    pub filter: RoomEventFilter,
    /// `order_by=recent` (otherwise rank).
    pub recent: bool,
    /// Context events before each result.
    pub before_limit: usize,
    /// Context events after each result.
    pub after_limit: usize,
    /// Add `profile_info` to contexts.
    pub include_profile: bool,
    /// Add the current state of rooms with results.
    pub include_state: bool,
    /// Group results by room.
    pub group_by_room: bool,
    /// Group results by sender.
    pub group_by_sender: bool,
    /// `next_batch` of the previous page.
    pub next_batch: Option<String>,
}

/// Lower-cased words of `s`.
pub fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// The number of words of `text` matched by `terms`, and the matched words; `None` unless
/// every term matches.
fn score(terms: &[String], text: &[String]) -> Option<(usize, BTreeSet<String>)> {
    let mut hits = BTreeSet::new();
    let mut n = 0;
    for t in terms {
        let m: Vec<&String> = text.iter().filter(|w| w.starts_with(t.as_str())).collect();
        if m.is_empty() {
            return None;
        }
        n += m.len();
        hits.extend(m.into_iter().cloned());
    }
    Some((n, hits))
}

/// The text of `pdu` at a dotted key.
fn text_at(content: &JsonValue, key: &str) -> Option<String> {
    let path = key.strip_prefix("content.")?;
    content.get(path).and_then(JsonValue::as_str).map(str::to_owned)
}

struct Hit {
    pos: u64,
    rank: usize,
    pdu: Pdu,
    stored: StoredPdu,
}

fn parse_batch(t: &str) -> Result<(u64, usize)> {
    let bad = || Error::InvalidParam(format!("invalid next_batch {t:?}"));
    let (u, o) = t.split_once('.').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
}

impl Core {
    /// Events of `rooms` below `upper`, newest first across rooms, at most `budget`; `f` sees
    /// each and returns whether to stop.
    pub(crate) fn scan_rooms_newest_first(
        &self,
        rooms: &[OwnedRoomId],
        upper: u64,
        budget: usize,
        mut f: impl FnMut(u64, OwnedEventId) -> Result<bool>,
    ) -> Result<()> {
        let mut his: Vec<Vec<u8>> = rooms.iter().map(|r| key(&[r.as_bytes(), &upper.to_be_bytes()])).collect();
        let mut bufs: Vec<Vec<(u64, OwnedEventId)>> = vec![Vec::new(); rooms.len()];
        let mut heap = BinaryHeap::new();
        let fill = |i: usize, his: &mut Vec<Vec<u8>>, bufs: &mut Vec<Vec<(u64, OwnedEventId)>>| -> Result<()> {
            let p = prefix(&[rooms[i].as_bytes()]);
            let rows = self.store.scan(Tree::Timeline, &p, None, Some(&his[i]), true, 64)?;
            if let Some((k, _)) = rows.last() {
                his[i] = k.clone();
            }
            // Kept oldest first so `pop` yields the newest.
            for (k, v) in rows.into_iter().rev() {
                let pos = k.len().checked_sub(8).and_then(|s| k[s..].try_into().ok()).map(u64::from_be_bytes);
                if let (Some(pos), Ok(id)) = (pos, EventId::parse(String::from_utf8_lossy(&v).as_ref())) {
                    bufs[i].push((pos, id));
                }
            }
            Ok(())
        };
        for i in 0..rooms.len() {
            fill(i, &mut his, &mut bufs)?;
            if let Some((pos, _)) = bufs[i].last() {
                heap.push((*pos, i));
            }
        }
        let mut seen = 0;
        while let Some((_, i)) = heap.pop() {
            if seen >= budget {
                break;
            }
            let Some((pos, id)) = bufs[i].pop() else { continue };
            seen += 1;
            if f(pos, id)? {
                break;
            }
            if bufs[i].is_empty() {
                fill(i, &mut his, &mut bufs)?;
            }
            if let Some((p, _)) = bufs[i].last() {
                heap.push((*p, i));
            }
        }
        Ok(())
    }

    /// `POST /search` (`room_events`).
    pub fn search(&self, user: &UserId, device: &DeviceId, q: &SearchQuery) -> Result<JsonValue> {
        let terms = words(&q.term);
        let keys: Vec<String> =
            if q.keys.is_empty() { DEFAULT_KEYS.iter().map(|k| (*k).to_owned()).collect() } else { q.keys.clone() };
        let limit =
            q.filter.limit.map(|l| u64::from(l) as usize).unwrap_or(10).clamp(1, self.limits.timeline_limit_max);
        let (upper, offset) = match &q.next_batch {
            Some(t) => parse_batch(t)?,
            None => (self.visible_pos().saturating_add(1), 0),
        };
        let rooms: Vec<OwnedRoomId> = self
            .user_rooms(user)?
            .into_iter()
            .filter(|(r, ur)| ur.membership == "join" && filter::room_allowed(&q.filter.rooms, &q.filter.not_rooms, r))
            .map(|(r, _)| r)
            .collect();
        let mut hits: Vec<Hit> = Vec::new();
        let mut highlights = BTreeSet::new();
        let want = offset + limit + 1;
        if !terms.is_empty() {
            self.scan_rooms_newest_first(&rooms, upper, self.limits.search_scan_events_max, |pos, id| {
                let Some(stored) = self.stored_pdu(&id)? else { return Ok(false) };
                let pdu = Pdu::from_json(id, &stored.json)?;
                if !filter::matches(&q.filter, &pdu) {
                    return Ok(false);
                }
                let content = pdu.content_value();
                let mut text = Vec::new();
                for k in &keys {
                    if let Some(t) = text_at(&content, k) {
                        text.extend(words(&t));
                    }
                }
                let Some((rank, hl)) = score(&terms, &text) else { return Ok(false) };
                if !self.can_see_event(user, &pdu, &stored)? {
                    return Ok(false);
                }
                highlights.extend(hl);
                hits.push(Hit { pos, rank, pdu, stored });
                Ok(q.recent && hits.len() >= want)
            })?;
        }
        let count = hits.len();
        if !q.recent {
            hits.sort_by(|a, b| b.rank.cmp(&a.rank).then(b.pos.cmp(&a.pos)));
        }
        let more = hits.len() > offset + limit;
        let page: Vec<Hit> = hits.into_iter().skip(offset).take(limit).collect();
        let next_batch = match (more, page.last()) {
            (true, Some(last)) if q.recent => Some(format!("{}.0", last.pos)),
            (true, Some(_)) => Some(format!("{upper}.{}", offset + limit)),
            _ => None,
        };
        let mut results = Vec::with_capacity(page.len());
        let mut by_room: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut by_sender: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for h in &page {
            let mut r = json!({
                "rank": h.rank as f64,
                "result": self.client_event_for(Some((user, device)), &h.pdu, &h.stored, true)?,
            });
            if q.before_limit > 0 || q.after_limit > 0 || q.include_profile {
                r["context"] = self.search_context(user, device, &h.pdu, h.pos, q)?;
            }
            by_room.entry(h.pdu.room.to_string()).or_default().push(h.pdu.event_id.to_string());
            by_sender.entry(h.pdu.sender.to_string()).or_default().push(h.pdu.event_id.to_string());
            results.push(r);
        }
        let mut out = json!({
            "count": count,
            "highlights": highlights,
            "results": results,
        });
        if let Some(n) = &next_batch {
            out["next_batch"] = json!(n);
        }
        if q.include_state {
            let mut state = Map::new();
            for room in by_room.keys() {
                let Ok(room) = RoomId::parse(room.as_str()) else { continue };
                let mut evs = Vec::new();
                for id in self.current_state(&room)?.values() {
                    if let Some(s) = self.stored_pdu(id)? {
                        let p = Pdu::from_json(id.clone(), &s.json)?;
                        evs.push(self.client_event_for(Some((user, device)), &p, &s, true)?);
                    }
                }
                state.insert(room.to_string(), JsonValue::Array(evs));
            }
            out["state"] = JsonValue::Object(state);
        }
        let group = |m: &BTreeMap<String, Vec<String>>| -> JsonValue {
            let g: Map<String, JsonValue> =
                m.iter().enumerate().map(|(i, (k, ids))| (k.clone(), json!({"results": ids, "order": i}))).collect();
            JsonValue::Object(g)
        };
        let mut groups = Map::new();
        if q.group_by_room {
            groups.insert("room_id".into(), group(&by_room));
        }
        if q.group_by_sender {
            groups.insert("sender".into(), group(&by_sender));
        }
        if !groups.is_empty() {
            out["groups"] = JsonValue::Object(groups);
        }
        Ok(json!({"search_categories": {"room_events": out}}))
    }

    fn search_context(
        &self,
        user: &UserId,
        device: &DeviceId,
        pdu: &Pdu,
        pos: u64,
        q: &SearchQuery,
    ) -> Result<JsonValue> {
        let none = RoomEventFilter::default();
        let mut ctx = Map::new();
        let mut senders = BTreeSet::from([pdu.sender.clone()]);
        if q.before_limit > 0 {
            let page = self.messages(
                user,
                device,
                &pdu.room,
                Some(pos.saturating_sub(1)),
                None,
                Direction::Backward,
                q.before_limit,
                &none,
            )?;
            senders
                .extend(page.chunk.iter().filter_map(|e| e["sender"].as_str()).filter_map(|s| UserId::parse(s).ok()));
            ctx.insert("events_before".into(), JsonValue::Array(page.chunk));
            ctx.insert("start".into(), json!(page.end.unwrap_or(page.start)));
        }
        if q.after_limit > 0 {
            let page =
                self.messages(user, device, &pdu.room, Some(pos), None, Direction::Forward, q.after_limit, &none)?;
            senders
                .extend(page.chunk.iter().filter_map(|e| e["sender"].as_str()).filter_map(|s| UserId::parse(s).ok()));
            let end = page.chunk.last().and_then(|e| e["event_id"].as_str()).and_then(|id| {
                EventId::parse(id).ok().and_then(|id| self.stored_pdu(&id).ok().flatten()).map(|s| s.pos)
            });
            ctx.insert("events_after".into(), JsonValue::Array(page.chunk));
            ctx.insert("end".into(), json!(super::sync::token(end.unwrap_or(pos))));
        }
        if q.include_profile {
            let mut info = Map::new();
            for s in senders {
                let member = self.state_event(&pdu.room, "m.room.member", s.as_str())?.map(|p| p.content_value());
                let mut p = Map::new();
                for f in ["displayname", "avatar_url"] {
                    if let Some(v) = member.as_ref().and_then(|m| m.get(f)).filter(|v| v.is_string()) {
                        p.insert(f.into(), v.clone());
                    }
                }
                info.insert(s.to_string(), JsonValue::Object(p));
            }
            ctx.insert("profile_info".into(), JsonValue::Object(info));
        }
        Ok(JsonValue::Object(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::{score, words};

    #[test]
    fn words_match_case_insensitively_by_prefix_and_all_must_match() {
        assert_eq!(words("Hello, WORLD! it's 9am"), ["hello", "world", "it", "s", "9am"]);
        let text = words("Helloooo there, hello!");
        assert_eq!(score(&words("HELLO"), &text).map(|s| s.0), Some(2));
        assert_eq!(score(&words("hello there"), &text).map(|s| s.0), Some(3));
        assert!(score(&words("hello world"), &text).is_none());
        assert!(score(&words("ello"), &text).is_none());
    }
}
