//! The user directory (`POST /user_directory/search`): users who share a room with the
//! searcher or are joined to a public room, matched case-insensitively on display name and
//! user id (every word of the term must start a word of either). Users sharing a room with the
//! searcher come first. Only this node's rooms are consulted (there is no mesh-wide directory
//! yet), and at most [`ROOMS_SCAN_MAX`] public rooms are looked at.

use std::collections::BTreeMap;

use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::{json, Value as JsonValue};

use super::{search::words, Core, Result};
use crate::store::Tree;

/// Rooms looked at when collecting members of public rooms.
pub const ROOMS_SCAN_MAX: usize = 10_000;

#[derive(Default)]
struct Candidate {
    display_name: Option<String>,
    avatar_url: Option<String>,
    shares_room: bool,
}

impl Core {
    fn collect_members(&self, room: &RoomId, shares: bool, out: &mut BTreeMap<OwnedUserId, Candidate>) -> Result<()> {
        for (u, p) in self.members(room)? {
            let c = p.content_value();
            if c.get("membership").and_then(JsonValue::as_str) != Some("join") {
                continue;
            }
            let e = out.entry(u).or_default();
            e.shares_room |= shares;
            if e.display_name.is_none() {
                e.display_name = c.get("displayname").and_then(JsonValue::as_str).map(str::to_owned);
            }
            if e.avatar_url.is_none() {
                e.avatar_url = c.get("avatar_url").and_then(JsonValue::as_str).map(str::to_owned);
            }
        }
        Ok(())
    }

    /// Search the user directory as `searcher`; returns the results and whether there were more
    /// than `limit` (clamped to `limits.user_directory_limit_max`).
    pub fn search_user_directory(&self, searcher: &UserId, term: &str, limit: usize) -> Result<(Vec<JsonValue>, bool)> {
        let limit = limit.clamp(1, self.limits.user_directory_limit_max);
        let terms = words(term);
        let mut cands = BTreeMap::new();
        for (room, ur) in self.user_rooms(searcher)? {
            if ur.membership == "join" {
                self.collect_members(&room, true, &mut cands)?;
            }
        }
        for (k, _) in self.store.scan_prefix(Tree::Rooms, b"", ROOMS_SCAN_MAX)? {
            let Ok(room) = RoomId::parse(String::from_utf8_lossy(&k).as_ref()) else { continue };
            let public = self
                .state_event(&room, "m.room.join_rules", "")?
                .is_some_and(|p| p.content_value().get("join_rule").and_then(JsonValue::as_str) == Some("public"));
            if public {
                self.collect_members(&room, false, &mut cands)?;
            }
        }
        let mut hits: Vec<(bool, OwnedUserId, Candidate)> = cands
            .into_iter()
            .filter(|(u, c)| {
                let mut w = words(u.as_str());
                w.extend(c.display_name.as_deref().map(words).unwrap_or_default());
                !terms.is_empty() && terms.iter().all(|t| w.iter().any(|x| x.starts_with(t.as_str())))
            })
            .map(|(u, c)| (!c.shares_room, u, c))
            .collect();
        hits.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let limited = hits.len() > limit;
        let results = hits
            .into_iter()
            .take(limit)
            .map(|(_, u, c)| {
                let mut r = json!({"user_id": u});
                if let Some(d) = c.display_name {
                    r["display_name"] = json!(d);
                }
                if let Some(a) = c.avatar_url {
                    r["avatar_url"] = json!(a);
                }
                r
            })
            .collect();
        Ok((results, limited))
    }
}
