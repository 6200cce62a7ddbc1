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

use ruma::{events::TimelineEventType, OwnedRoomId, RoomId, UserId};
use serde_json::json;

use crate::{
    core::{pdu::PduTemplate, Core, Result},
    store::Tree,
};

/// Event type of the merging event (Synapse's dummy event; clients ignore it).
pub const DUMMY_EVENT_TYPE: &str = "org.matrix.dummy_event";
/// How long the newest forward extremity must be old before we merge.
pub const MERGE_QUIET_MS: u64 = 5_000;
/// Spread of the extra wait per (server, room), so that one server merges first.
pub const MERGE_STAGGER_MS: u64 = 10_000;
/// How often the sender looks for rooms to merge.
pub const MERGE_CHECK_MS: u64 = 2_000;
/// Most rooms looked at per check.
const ROOMS_SCAN_MAX: usize = 10_000;

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
    /// Send a dummy event in every room that has several forward extremities and has been
    /// quiet long enough (see the module doc). Returns how many rooms were merged.
    pub async fn merge_forward_extremities(&self) -> Result<usize> {
        let rooms: Vec<OwnedRoomId> = self
            .store
            .scan_prefix(Tree::Rooms, b"", ROOMS_SCAN_MAX)?
            .into_iter()
            .filter_map(|(k, _)| RoomId::parse(String::from_utf8_lossy(&k).as_ref()).ok())
            .collect();
        let mut merged = 0;
        for room in rooms {
            match self.merge_room(&room).await {
                Ok(true) => merged += 1,
                Ok(false) => {}
                Err(e) => tracing::debug!(%room, error = %e, "could not merge forward extremities"),
            }
        }
        Ok(merged)
    }

    async fn merge_room(&self, room: &RoomId) -> Result<bool> {
        let extremities = self.extremities(room)?;
        if extremities.len() < 2 {
            return Ok(false);
        }
        let mut newest = 0u64;
        for e in &extremities {
            if let Some(p) = self.pdu(e)? {
                newest = newest.max(u64::from(p.origin_server_ts.get()));
            }
        }
        let stagger = stable_hash(&[self.server_name().as_bytes(), room.as_bytes()]) % MERGE_STAGGER_MS;
        if self.now_ms() < newest.saturating_add(MERGE_QUIET_MS + stagger) {
            return Ok(false);
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
        let Some(sender) = sender else { return Ok(false) };
        let template = PduTemplate {
            kind: TimelineEventType::from(DUMMY_EVENT_TYPE),
            content: json!({}),
            state_key: None,
            redacts: None,
        };
        let id = self.send_event(&sender, None, room, template, None).await?;
        tracing::debug!(%room, event_id = %id, extremities = extremities.len(), "merged forward extremities");
        Ok(true)
    }
}
