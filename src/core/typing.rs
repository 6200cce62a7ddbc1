//! Typing notifications (`m.typing`): in memory only, as the spec allows for ephemeral data.
//!
//! Who is typing is kept per room with an expiry time from the injected clock. Every change of a
//! room's list (someone starts, stops, or times out) takes a position in the node-wide stream
//! through [`Core::commit`] with an empty batch, so `/sync` reports it with the same
//! `since < pos <= upto` rule as everything else and long-polls wake up at once. A refresh that
//! leaves the list unchanged only moves the expiry and takes no position.
//!
//! # Driving it
//! Expiry needs no timer task: [`Core::expire_typing`] runs at the start of every `/sync`
//! iteration, and a long-polling `/sync` also wakes at [`Core::typing_wake_at`] (the earliest
//! expiry), so a timed-out typist disappears from every waiting client.
//!
//! Bounds: a user can only type in rooms they are joined to, the timeout is clamped to
//! `limits.typing_timeout_ms_max`, and at most [`ROOMS_MAX`] rooms keep an (empty) record of
//! their last change.

use std::{collections::BTreeMap, sync::Mutex as StdMutex, time::Duration};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value as JsonValue};

use super::{Core, Error, Result};
use crate::store::Batch;

/// Rooms whose typing record is kept once nobody types in them any more.
pub const ROOMS_MAX: usize = 4096;

/// Typing state of one node.
#[derive(Debug, Default)]
pub struct TypingState {
    rooms: StdMutex<BTreeMap<OwnedRoomId, RoomTyping>>,
}

#[derive(Debug, Default, Clone)]
struct RoomTyping {
    /// Stream position of the last change of `users`.
    pos: u64,
    /// Typing users and when their notification expires (ms since the epoch).
    users: BTreeMap<OwnedUserId, u64>,
}

impl TypingState {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<OwnedRoomId, RoomTyping>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Core {
    /// `PUT /rooms/{room}/typing/{user}`: `timeout_ms = Some(t)` marks `user` as typing for `t`
    /// ms (clamped), `None` stops it. The user must be joined to the room.
    pub async fn set_typing(&self, user: &UserId, room: &RoomId, timeout_ms: Option<u64>) -> Result<()> {
        if self.membership(room, user)?.as_deref() != Some("join") {
            return Err(Error::Forbidden("you are not joined to this room".into()));
        }
        let now = self.now_ms();
        let expires = timeout_ms.map(|t| now.saturating_add(t.min(self.limits.typing_timeout_ms_max)));
        self.apply_typing(user, room, expires).await?;
        // Other servers in the room hear of every start, refresh and stop (federation/edu.rs).
        self.queue_typing_edu(room, user, expires.is_some());
        Ok(())
    }

    /// Mark `user` as typing in `room` until `expires` (ms since the epoch), or stop it
    /// (`None`); used for local users and, from `m.typing` EDUs, remote ones.
    pub(crate) async fn apply_typing(&self, user: &UserId, room: &RoomId, expires: Option<u64>) -> Result<()> {
        let now = self.now_ms();
        {
            let mut rooms = self.typing.lock();
            let was_typing = rooms.get(room).and_then(|r| r.users.get(user)).is_some_and(|&e| e > now);
            match expires {
                // Still typing: only the expiry moves; the list clients see is unchanged.
                Some(exp) if was_typing => {
                    if let Some(r) = rooms.get_mut(room) {
                        r.users.insert(user.to_owned(), exp);
                    }
                    return Ok(());
                }
                // Not typing (or already timed out): nothing clients see changes.
                None if !was_typing => {
                    if let Some(r) = rooms.get_mut(room) {
                        r.users.remove(user);
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
        self.commit(Batch::new(), |_, pos, _| {
            let p = pos();
            let mut rooms = self.typing.lock();
            if rooms.len() >= ROOMS_MAX && !rooms.contains_key(room) {
                prune(&mut rooms);
            }
            let r = rooms.entry(room.to_owned()).or_default();
            match expires {
                Some(exp) => r.users.insert(user.to_owned(), exp),
                None => r.users.remove(user),
            };
            r.users.retain(|_, &mut e| e > now);
            r.pos = p;
            Ok(())
        })
        .await
    }

    /// Drop typing notifications that have timed out; each room whose list changed gets a new
    /// stream position (which wakes long-polling syncs). Cheap when nothing expired.
    pub async fn expire_typing(&self) -> Result<()> {
        let now = self.now_ms();
        let any = self.typing.lock().values().any(|r| r.users.values().any(|&e| e <= now));
        if !any {
            return Ok(());
        }
        let expired = self
            .commit(Batch::new(), |_, pos, _| {
                let mut rooms = self.typing.lock();
                let mut p = None;
                let mut expired = Vec::new();
                for (room, r) in rooms.iter_mut() {
                    let before = r.users.len();
                    r.users.retain(|u, &mut e| {
                        if e <= now {
                            expired.push((room.clone(), u.clone()));
                        }
                        e > now
                    });
                    if r.users.len() != before {
                        r.pos = *p.get_or_insert_with(&mut *pos);
                    }
                }
                Ok(expired)
            })
            .await?;
        // Local typists who timed out stop typing on other servers too.
        for (room, user) in expired {
            self.queue_typing_edu(&room, &user, false);
        }
        Ok(())
    }

    /// When a `/sync` waiting until `deadline` must wake to expire a typing notification: the
    /// earlier of `deadline` and the next expiry.
    pub fn typing_wake_at(&self, deadline: tokio::time::Instant) -> tokio::time::Instant {
        let now = self.now_ms();
        let next = self.typing.lock().values().flat_map(|r| r.users.values().copied()).min();
        match next {
            Some(e) => {
                // Wake a little after the expiry so that `expire_typing` sees it as past.
                let at = tokio::time::Instant::now() + Duration::from_millis(e.saturating_sub(now) + 1);
                at.min(deadline)
            }
            None => deadline,
        }
    }

    /// The `m.typing` event of `room` for a sync covering `(since, upto]`: `Some` when the list
    /// changed in that range, or (`initial`) when someone is typing now.
    pub fn typing_event(&self, room: &RoomId, since: u64, upto: u64, initial: bool) -> Option<JsonValue> {
        let now = self.now_ms();
        let rooms = self.typing.lock();
        let r = rooms.get(room)?;
        let live: Vec<&OwnedUserId> = r.users.iter().filter(|(_, &e)| e > now).map(|(u, _)| u).collect();
        let changed = r.pos > since && r.pos <= upto;
        if changed || (initial && !live.is_empty()) {
            Some(json!({"type": "m.typing", "content": {"user_ids": live}}))
        } else {
            None
        }
    }

    /// Users typing in `room` now.
    pub fn typing_users(&self, room: &RoomId) -> Vec<OwnedUserId> {
        let now = self.now_ms();
        let rooms = self.typing.lock();
        rooms
            .get(room)
            .map(|r| r.users.iter().filter(|(_, &e)| e > now).map(|(u, _)| u.clone()).collect())
            .unwrap_or_default()
    }
}

/// Forget the oldest changes of rooms where nobody types (keeps the map bounded).
fn prune(rooms: &mut BTreeMap<OwnedRoomId, RoomTyping>) {
    let mut idle: Vec<(u64, OwnedRoomId)> =
        rooms.iter().filter(|(_, r)| r.users.is_empty()).map(|(k, r)| (r.pos, k.clone())).collect();
    idle.sort();
    for (_, k) in idle.into_iter().take(ROOMS_MAX / 4) {
        rooms.remove(&k);
    }
}
