//! Merging forks: a room whose DAG this server sees with several forward extremities, once it
//! has gone quiet, gets a dummy event (`org.matrix.dummy_event`, as Synapse sends) built on
//! all of them.
//!
//! Servers may disagree about forward extremities for good: which events become extremities
//! depends on soft failure, which depends on each server's current state when the event
//! arrived — after a partition heals, an event one server soft-failed (its sender had been
//! banned or had left on that server's side) is an extremity on the servers of the other
//! side, and their resolved states differ until some event builds on both. In a busy room the
//! next message does that; a room that goes quiet stays split. The dummy event is that next
//! event: every server resolves the state after it from the same prev events, so they agree
//! again. The quiet period keeps it off busy rooms (a local message merges there anyway), and
//! a per-server stagger lets the first merge reach the others before they send their own.

use std::collections::BTreeSet;

use ruma::{events::TimelineEventType, OwnedRoomId, RoomId, UserId};
use serde_json::json;

use crate::{
    core::{pdu::PduTemplate, Core, Result},
    store::{Batch, Op, Tree},
};

/// Event type of the merging event (Synapse's dummy event; clients ignore it).
pub const DUMMY_EVENT_TYPE: &str = "org.matrix.dummy_event";
/// How long the newest forward extremity must be old before we merge.
pub const MERGE_QUIET_MS: u64 = 5_000;
/// Spread of the extra wait per (server, room), so that one server merges first.
pub const MERGE_STAGGER_MS: u64 = 10_000;
/// Most rooms looked at when the sender starts.
const ROOMS_SCAN_MAX: usize = 10_000;

/// The rooms to which `batch` adds a forward extremity (keys `room_id 0xff event_id`).
pub(crate) fn rooms_with_new_extremities(batch: &Batch) -> BTreeSet<OwnedRoomId> {
    let mut rooms = BTreeSet::new();
    for op in &batch.ops {
        if let Op::Put(Tree::Extremities, k, _) = op {
            let end = k.iter().position(|b| *b == 0xff).unwrap_or(k.len());
            if let Ok(r) = RoomId::parse(String::from_utf8_lossy(&k[..end]).as_ref()) {
                rooms.insert(r);
            }
        }
    }
    rooms
}

/// What the merge check made of a room.
enum Merge {
    /// One forward extremity.
    Nothing,
    /// Forked, but nobody here could send the merging event.
    NoSender,
    /// Merged now.
    Merged,
    /// Forked, but not quiet long enough: look again at this time (ms).
    NotBefore(u64),
}

/// FNV-1a: a stable per-(server, room) number for the stagger.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Core {
    /// Every room this server holds (at most [`ROOMS_SCAN_MAX`]).
    pub(crate) fn all_room_ids(&self) -> Result<BTreeSet<OwnedRoomId>> {
        Ok(self
            .store
            .scan_prefix(Tree::Rooms, b"", ROOMS_SCAN_MAX)?
            .into_iter()
            .filter_map(|(k, _)| RoomId::parse(String::from_utf8_lossy(&k).as_ref()).ok())
            .collect())
    }

    /// Send a dummy event in each of `rooms` that has several forward extremities and has been
    /// quiet long enough (see the module doc). Returns the rooms still forked and when the
    /// first of them will have been quiet long enough.
    pub async fn merge_forward_extremities(
        &self,
        rooms: BTreeSet<OwnedRoomId>,
    ) -> (BTreeSet<OwnedRoomId>, Option<u64>) {
        let mut waiting = BTreeSet::new();
        let mut next: Option<u64> = None;
        for room in rooms {
            match self.merge_room(&room).await {
                Ok(Merge::NotBefore(t)) => {
                    next = Some(next.map_or(t, |n| n.min(t)));
                    waiting.insert(room);
                }
                Ok(Merge::Merged | Merge::Nothing) => {}
                Ok(Merge::NoSender) => tracing::debug!(%room, "forked, but no local member can merge it"),
                // Looked at again when the room gets a new forward extremity.
                Err(e) => tracing::debug!(%room, error = %e, "could not merge forward extremities"),
            }
        }
        (waiting, next)
    }

    async fn merge_room(&self, room: &RoomId) -> Result<Merge> {
        let extremities = self.extremities(room)?;
        if extremities.len() < 2 {
            return Ok(Merge::Nothing);
        }
        let mut newest = 0u64;
        for e in &extremities {
            if let Some(p) = self.pdu(e)? {
                newest = newest.max(u64::from(p.origin_server_ts.get()));
            }
        }
        let stagger = stable_hash(&[self.server_name().as_bytes(), room.as_bytes()]) % MERGE_STAGGER_MS;
        let due = newest.saturating_add(MERGE_QUIET_MS + stagger);
        if self.now_ms() < due {
            return Ok(Merge::NotBefore(due));
        }
        // A local user who is joined sends it (as any other event, authorised against the
        // room's current state).
        let state = self.current_state(room)?;
        let mut sender = None;
        for ((t, k), _) in state.range(("m.room.member".to_owned(), String::new())..) {
            if t != "m.room.member" {
                break;
            }
            let Ok(user) = UserId::parse(k.as_str()) else { continue };
            if user.server_name() == self.server_name() && self.membership_in(&state, &user)?.as_deref() == Some("join")
            {
                sender = Some(user);
                break;
            }
        }
        let Some(sender) = sender else { return Ok(Merge::NoSender) };
        let template = PduTemplate {
            kind: TimelineEventType::from(DUMMY_EVENT_TYPE),
            content: json!({}),
            state_key: None,
            redacts: None,
        };
        let id = self.send_event(&sender, None, room, template, None).await?;
        tracing::debug!(%room, event_id = %id, extremities = extremities.len(), "merged forward extremities");
        Ok(Merge::Merged)
    }
}
