//! Push rules, pushers, and unread notification counts.
//!
//! A user's rules are the spec's defaults ([`Ruleset::server_default`]) until they change one;
//! then the whole rule set is stored as the `m.push_rules` global account data (as Synapse
//! does), so every client sees the change in `/sync`. On read, stored rules are merged with the
//! defaults of this build: server-default rules take this build's definition and keep the
//! user's `enabled` and `actions`; defaults the user has never seen are appended.
//!
//! Notification counts are computed when a room is synced: the events after the user's read
//! receipts (unthreaded, `main`, or per thread) are evaluated with ruma's push rule evaluation
//! ([`Ruleset::get_actions`] with a [`PushConditionRoomCtx`] built from the room's state). At
//! most `limits.unread_scan_events_max` events are looked at per room (newest first), so a
//! room with more unread events reports at least that many. Redacted events and events from
//! before the user joined do not count. What each event adds to a user's counts is evaluated
//! once and memoised ([`UnreadMemo`], bounded), as Synapse stores push actions once per event:
//! a long-polling client that wakes for every new event does not re-evaluate the rules for every
//! older unread event each time. The memo is cleared when push rules change or an event is
//! redacted. The newest window of a room (at most the scan limit of events after the user's
//! unthreaded read point, with their contributions) is kept too, for a bounded number of
//! `(user, room)` pairs: the next count reads only the timeline entries added since, instead of
//! scanning the whole window again. Stream positions only grow and a timeline entry is never
//! removed, so the window read on earlier positions stays the window of the room; a receipt
//! moves its start, and an invalidation of the memo drops every window.
//!
//! Pushers are stored and listed; nothing is delivered to push gateways (there is no internet
//! on a mesh; a gateway on the local network could be added later).

use std::collections::{BTreeMap, VecDeque};

use futures_util::FutureExt;
use ruma::{
    events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource},
    push::{Action, NewPushRule, PushConditionRoomCtx, RuleKind, Ruleset},
    EventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
};
use serde_json::{json, Value as JsonValue};

use super::{
    pdu::{client_event, raw, rules_for, Pdu},
    receipts::thread_of,
    to_json, Core, Error, Result,
};
use crate::store::{key, prefix, Batch, Tree};

/// Most `(user, event)` entries the unread memo keeps; when full it starts again empty.
const UNREAD_MEMO_MAX: usize = 50_000;

/// Most `(user, room)` windows the unread memo keeps (each at most
/// `limits.unread_scan_events_max` entries); when full it starts again empty.
const UNREAD_WINDOWS_MAX: usize = 64;

/// What one event adds to a user's unread counts (before read receipts apply).
#[derive(Clone, Debug)]
struct Contribution {
    thread: Option<String>,
    notify: bool,
    highlight: bool,
}

/// Memoised unread contributions by user and stream position (`None`: the event never counts).
#[derive(Default)]
pub struct UnreadMemo {
    inner: std::sync::Mutex<MemoInner>,
}

#[derive(Default)]
struct MemoInner {
    /// Bumped on every invalidation: an evaluation that started before one is not stored.
    generation: u64,
    len: usize,
    map: BTreeMap<OwnedUserId, BTreeMap<u64, Option<Contribution>>>,
    windows: BTreeMap<(OwnedUserId, OwnedRoomId), UnreadWindow>,
}

/// The newest timeline entries of a room after a user's unthreaded read point, as the last
/// count read them.
struct UnreadWindow {
    /// The memo's generation when it was read.
    generation: u64,
    /// The unthreaded read point it starts after.
    after: u64,
    /// The stream position it was read up to (inclusive).
    upto: u64,
    /// `(stream position, contribution)`, oldest first; at most the scan limit.
    events: VecDeque<(u64, Option<Contribution>)>,
}

impl UnreadMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn get(&self, user: &UserId, pos: u64) -> Option<Option<Contribution>> {
        self.lock().map.get(user).and_then(|m| m.get(&pos)).cloned()
    }

    fn put(&self, generation: u64, user: &UserId, pos: u64, c: Option<Contribution>) {
        let mut m = self.lock();
        if m.generation != generation {
            return;
        }
        if m.len >= UNREAD_MEMO_MAX {
            m.map.clear();
            m.len = 0;
        }
        if m.map.entry(user.to_owned()).or_default().insert(pos, c).is_none() {
            m.len += 1;
        }
    }

    /// Take out the window kept for `(user, room)` (put back with [`UnreadMemo::put_window`]).
    fn take_window(&self, user: &UserId, room: &RoomId) -> Option<UnreadWindow> {
        self.lock().windows.remove(&(user.to_owned(), room.to_owned()))
    }

    fn put_window(&self, user: &UserId, room: &RoomId, w: UnreadWindow) {
        let mut m = self.lock();
        if m.generation != w.generation {
            return;
        }
        if m.windows.len() >= UNREAD_WINDOWS_MAX {
            m.windows.clear();
        }
        m.windows.insert((user.to_owned(), room.to_owned()), w);
    }

    /// Forget everything (push rules changed, or an event was redacted).
    pub fn invalidate(&self) {
        let mut m = self.lock();
        m.generation += 1;
        m.map.clear();
        m.len = 0;
        m.windows.clear();
    }
}

/// The account-data type holding a user's push rules.
pub const PUSH_RULES: &str = "m.push_rules";

/// Notification counts of one room (or thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events whose actions include `notify`.
    pub notification_count: u64,
    /// Events whose actions set the `highlight` tweak.
    pub highlight_count: u64,
}

impl Counts {
    fn json(self) -> JsonValue {
        json!({"notification_count": self.notification_count, "highlight_count": self.highlight_count})
    }
}

/// Unread counts of a room: the main timeline (or everything, when the client does not ask
/// for per-thread counts) and each thread with something unread.
#[derive(Clone, Debug, Default)]
pub struct UnreadCounts {
    /// `unread_notifications`.
    pub room: Counts,
    /// `unread_thread_notifications` by thread root (only threads with a non-zero count).
    pub threads: BTreeMap<String, Counts>,
}

impl UnreadCounts {
    /// Set `unread_notifications` (and `unread_thread_notifications` when `threaded`) of a
    /// synced room.
    pub fn fill(&self, room_json: &mut JsonValue, threaded: bool) {
        room_json["unread_notifications"] = self.room.json();
        if threaded {
            let t: serde_json::Map<String, JsonValue> =
                self.threads.iter().map(|(k, c)| (k.clone(), c.json())).collect();
            room_json["unread_thread_notifications"] = JsonValue::Object(t);
        }
    }
}

/// Replace server-default rules of `stored` with this build's definitions (keeping the user's
/// `enabled` and `actions`), drop defaults this build no longer has, and append missing ones.
macro_rules! merge_kind {
    ($stored:expr, $defaults:expr) => {{
        let defaults = std::mem::take(&mut $defaults);
        let old = std::mem::take(&mut $stored);
        for r in old.into_iter() {
            let r = if r.rule_id.as_str().starts_with('.') {
                match defaults.get(r.rule_id.as_str()) {
                    Some(d) => {
                        let mut d = d.clone();
                        d.enabled = r.enabled;
                        d.actions = r.actions;
                        d
                    }
                    None => continue,
                }
            } else {
                r
            };
            $stored.insert(r);
        }
        for d in defaults.into_iter() {
            if $stored.get(d.rule_id.as_str()).is_none() {
                $stored.insert(d);
            }
        }
    }};
}

fn merge_defaults(mut stored: Ruleset, mut defaults: Ruleset) -> Ruleset {
    merge_kind!(stored.override_, defaults.override_);
    merge_kind!(stored.content, defaults.content);
    merge_kind!(stored.room, defaults.room);
    merge_kind!(stored.sender, defaults.sender);
    merge_kind!(stored.underride, defaults.underride);
    stored
}

/// A rule set as clients expect it: every kind present, even when empty.
pub fn ruleset_json(rules: &Ruleset) -> JsonValue {
    let mut v = serde_json::to_value(rules).unwrap_or_else(|_| json!({}));
    for k in ["override", "content", "room", "sender", "underride"] {
        if v.get(k).is_none() {
            v[k] = json!([]);
        }
    }
    v
}

fn rule_not_found() -> Error {
    Error::NotFound("push rule not found".into())
}

impl Core {
    /// The push rules of `user` (stored ones merged with the defaults, or the defaults).
    pub fn push_rules(&self, user: &UserId) -> Result<Ruleset> {
        let defaults = Ruleset::server_default(user);
        let stored = self
            .account_data(user, None, PUSH_RULES)?
            .and_then(|e| e.content.get("global").cloned())
            .and_then(|g| serde_json::from_value::<Ruleset>(g).ok());
        Ok(match stored {
            Some(s) => merge_defaults(s, defaults),
            None => defaults,
        })
    }

    /// The `m.push_rules` account-data event for an initial sync when the user has never
    /// changed their rules (clients read the rules from there).
    pub fn default_push_rules_event(&self, user: &UserId, since: Option<u64>) -> Result<Option<JsonValue>> {
        if since.is_some() || self.account_data(user, None, PUSH_RULES)?.is_some() {
            return Ok(None);
        }
        let rules = Ruleset::server_default(user);
        Ok(Some(json!({"type": PUSH_RULES, "content": {"global": ruleset_json(&rules)}})))
    }

    async fn update_push_rules<T>(&self, user: &UserId, f: impl FnOnce(&mut Ruleset) -> Result<T>) -> Result<T> {
        let _guard = self.user_data_lock.lock().await;
        let mut rules = self.push_rules(user)?;
        let out = f(&mut rules)?;
        self.set_account_data(user, None, PUSH_RULES, json!({"global": ruleset_json(&rules)})).await?;
        Ok(out)
    }

    /// One rule, in the client format (`GET /pushrules/global/{kind}/{ruleId}`).
    pub fn push_rule(&self, user: &UserId, kind: RuleKind, rule_id: &str) -> Result<JsonValue> {
        let rules = self.push_rules(user)?;
        let rule = rules.get(kind, rule_id).ok_or_else(rule_not_found)?;
        let rule = ruma::api::client::push::PushRule::from(rule.to_owned());
        serde_json::to_value(rule).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Add or replace a user-defined rule, placed relative to `before` / `after`.
    pub async fn set_push_rule(
        &self,
        user: &UserId,
        rule: NewPushRule,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<()> {
        use ruma::push::InsertPushRuleError as E;
        self.update_push_rules(user, |rules| {
            rules.insert(rule, after, before).map_err(|e| match e {
                E::UnknownRuleId => Error::NotFound(e.to_string()),
                other => Error::InvalidParam(other.to_string()),
            })
        })
        .await
    }

    /// Delete a user-defined rule.
    pub async fn delete_push_rule(&self, user: &UserId, kind: RuleKind, rule_id: &str) -> Result<()> {
        use ruma::push::RemovePushRuleError as E;
        self.update_push_rules(user, |rules| {
            rules.remove(kind, rule_id).map_err(|e| match e {
                E::ServerDefault => Error::InvalidParam("server-default rules cannot be deleted".into()),
                _ => rule_not_found(),
            })
        })
        .await
    }

    /// Enable or disable a rule.
    pub async fn set_push_rule_enabled(&self, user: &UserId, kind: RuleKind, rule_id: &str, on: bool) -> Result<()> {
        self.update_push_rules(user, |rules| rules.set_enabled(kind, rule_id, on).map_err(|_| rule_not_found())).await
    }

    /// Replace the actions of a rule.
    pub async fn set_push_rule_actions(
        &self,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<()> {
        self.update_push_rules(user, |rules| rules.set_actions(kind, rule_id, actions).map_err(|_| rule_not_found()))
            .await
    }

    /// The context ruma's push evaluation needs for `user` in `room`, from current state.
    pub fn push_context(&self, user: &UserId, room: &RoomId) -> Result<PushConditionRoomCtx> {
        let state = self.current_state(room)?;
        let mut joined = 0u64;
        let mut display_name = None;
        for ((t, k), id) in state.iter() {
            if t != "m.room.member" {
                continue;
            }
            let Some(p) = self.pdu(id)? else { continue };
            let c = p.content_value();
            if c.get("membership").and_then(JsonValue::as_str) == Some("join") {
                joined += 1;
            }
            if k == user.as_str() {
                display_name = c.get("displayname").and_then(JsonValue::as_str).map(str::to_owned);
            }
        }
        let display_name = display_name.unwrap_or_else(|| user.localpart().to_owned());
        let mut ctx = PushConditionRoomCtx::new(
            room.to_owned(),
            UInt::new(joined).unwrap_or(UInt::MAX),
            user.to_owned(),
            display_name,
        );
        // Power levels, for `sender_notification_permission` (@room mentions).
        let record = self.room(room)?.ok_or_else(|| Error::NotFound("unknown room".into()))?;
        let rules = rules_for(&record.version)?;
        let mut creators: Vec<OwnedUserId> = Vec::new();
        if let Some(create) = self.pdu(&record.create_event)? {
            creators.push(create.sender.clone());
            if let Some(extra) = create.content_value().get("additional_creators").and_then(JsonValue::as_array) {
                creators.extend(extra.iter().filter_map(|v| v.as_str()).filter_map(|s| UserId::parse(s).ok()));
            }
        }
        let source = match state.get(&("m.room.power_levels".to_owned(), String::new())) {
            Some(id) => match self.pdu(id)? {
                Some(p) => match serde_json::from_str::<RoomPowerLevelsEventContent>(p.content.get()) {
                    Ok(c) => Some(RoomPowerLevelsSource::Original(c)),
                    Err(_) => None,
                },
                None => None,
            },
            None => Some(RoomPowerLevelsSource::None),
        };
        if let Some(source) = source {
            ctx = ctx.with_power_levels(RoomPowerLevels::new(source, &rules.authorization, creators).into());
        }
        Ok(ctx)
    }

    /// The actions `rules` give `pdu` for the user of `ctx`.
    pub fn push_actions(&self, rules: &Ruleset, ctx: &PushConditionRoomCtx, pdu: &Pdu) -> Vec<Action> {
        let ev = client_event(pdu, self.now_ms(), serde_json::Map::new(), true);
        let raw = raw::<JsonValue>(&ev);
        // No condition in use awaits anything (thread subscriptions are not enabled), so the
        // evaluation completes on first poll.
        rules.get_actions(&raw, ctx).now_or_never().map(<[Action]>::to_vec).unwrap_or_default()
    }

    /// Unread notification counts of `room` for `user` at stream position `upto`.
    pub fn unread_counts(&self, user: &UserId, room: &RoomId, upto: u64) -> Result<UnreadCounts> {
        let points = self.read_points(user, room)?;
        let max = self.limits.unread_scan_events_max;
        let generation = self.unread_memo.generation();
        // The window the last count read, if it still is this room's: same generation, a read
        // point at or after its start, and no newer than what is asked.
        let mut window = self
            .unread_memo
            .take_window(user, room)
            .filter(|w| w.generation == generation && w.after <= points.unthreaded && w.upto <= upto)
            .map(|mut w| {
                w.events.retain(|(pos, _)| *pos > points.unthreaded);
                w.after = points.unthreaded;
                w
            })
            .unwrap_or(UnreadWindow {
                generation,
                after: points.unthreaded,
                upto: points.unthreaded,
                events: VecDeque::new(),
            });
        // Read what was added after the window, newest first, at most `max` entries.
        let p = prefix(&[room.as_bytes()]);
        let lo = key(&[room.as_bytes(), &(window.upto.max(points.unthreaded) + 1).to_be_bytes()]);
        let mut hi = key(&[room.as_bytes(), &upto.saturating_add(1).to_be_bytes()]);
        let mut added: Vec<(u64, Option<Contribution>)> = Vec::new();
        let mut rules_ctx: Option<(Ruleset, PushConditionRoomCtx)> = None;
        while added.len() < max {
            let chunk = self.store.scan(Tree::Timeline, &p, Some(&lo), Some(&hi), true, (max - added.len()).min(64))?;
            let Some((last, _)) = chunk.last() else { break };
            hi = last.clone();
            for (k, v) in &chunk {
                // The stream position is the key's last 8 bytes.
                let Some(pos) = k.len().checked_sub(8).and_then(|i| k[i..].try_into().ok()).map(u64::from_be_bytes)
                else {
                    continue;
                };
                let c = match self.unread_memo.get(user, pos) {
                    Some(c) => c,
                    None => {
                        let generation = self.unread_memo.generation();
                        let c = match EventId::parse(String::from_utf8_lossy(v).as_ref()) {
                            Ok(id) => match self.stored_pdu(&id)? {
                                Some(stored) => self.unread_contribution(user, room, &id, &stored, &mut rules_ctx)?,
                                None => None,
                            },
                            Err(_) => None,
                        };
                        self.unread_memo.put(generation, user, pos, c.clone());
                        c
                    }
                };
                added.push((pos, c));
            }
        }
        window.events.extend(added.into_iter().rev());
        // The oldest go first: what is left is the newest `max`, as a fresh scan reads them.
        while window.events.len() > max {
            window.events.pop_front();
        }
        window.upto = upto;
        let mut out = UnreadCounts::default();
        for (pos, c) in &window.events {
            let Some(c) = c else { continue };
            if *pos <= points.for_thread(c.thread.as_deref()) || (!c.notify && !c.highlight) {
                continue;
            }
            let n = match &c.thread {
                Some(t) => out.threads.entry(t.clone()).or_default(),
                None => &mut out.room,
            };
            n.notification_count += u64::from(c.notify);
            n.highlight_count += u64::from(c.highlight);
        }
        self.unread_memo.put_window(user, room, window);
        Ok(out)
    }

    /// What event `id` (stored as `stored`) adds to `user`'s unread counts in `room`, before
    /// read receipts are applied: `None` when it never counts (redacted, sent by the user, or
    /// from before the user joined).
    fn unread_contribution(
        &self,
        user: &UserId,
        room: &RoomId,
        id: &EventId,
        stored: &super::rooms::StoredPdu,
        rules_ctx: &mut Option<(Ruleset, PushConditionRoomCtx)>,
    ) -> Result<Option<Contribution>> {
        if stored.redacted_by.is_some() {
            return Ok(None);
        }
        let pdu = Pdu::from_json(id.to_owned(), &stored.json)?;
        if pdu.sender == user {
            return Ok(None);
        }
        let content = pdu.content_value();
        let thread = thread_of(&content).map(str::to_owned);
        let before = self.state_of_group(stored.state_before)?;
        if self.membership_in(&before, user)?.as_deref() != Some("join") {
            return Ok(None);
        }
        if rules_ctx.is_none() {
            *rules_ctx = Some((self.push_rules(user)?, self.push_context(user, room)?));
        }
        let Some((rules, ctx)) = rules_ctx.as_ref() else { return Ok(None) };
        let actions = self.push_actions(rules, ctx, &pdu);
        Ok(Some(Contribution {
            thread,
            notify: actions.iter().any(Action::should_notify),
            highlight: actions.iter().any(Action::is_highlight),
        }))
    }

    /// The counts to report for a synced room: with `threaded` (the filter's
    /// `unread_thread_notifications`), thread events count per thread; otherwise in the room.
    pub fn room_unread(&self, user: &UserId, room: &RoomId, upto: u64, threaded: bool) -> Result<UnreadCounts> {
        let mut c = self.unread_counts(user, room, upto)?;
        if !threaded {
            for t in std::mem::take(&mut c.threads).into_values() {
                c.room.notification_count += t.notification_count;
                c.room.highlight_count += t.highlight_count;
            }
        }
        Ok(c)
    }

    /// `GET /notifications`: events of the user's joined rooms that notified them, newest
    /// first, below stream position `from` (the previous `next_token`); `only_highlight` keeps
    /// highlights. At most `limits.search_scan_events_max` events are looked at per request.
    pub fn notifications(
        &self,
        user: &UserId,
        device: &ruma::DeviceId,
        from: Option<u64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<JsonValue> {
        let limit = limit.clamp(1, self.limits.timeline_limit_max);
        let rooms: Vec<ruma::OwnedRoomId> =
            self.user_rooms(user)?.into_iter().filter(|(_, ur)| ur.membership == "join").map(|(r, _)| r).collect();
        let rules = self.push_rules(user)?;
        let mut ctxs: BTreeMap<ruma::OwnedRoomId, (PushConditionRoomCtx, super::receipts::ReadPoints)> =
            BTreeMap::new();
        let mut out = Vec::new();
        let mut next = None;
        let upper = from.unwrap_or_else(|| self.visible_pos().saturating_add(1));
        self.scan_rooms_newest_first(&rooms, upper, self.limits.search_scan_events_max, |pos, id| {
            let Some(stored) = self.stored_pdu(&id)? else { return Ok(false) };
            if stored.redacted_by.is_some() {
                return Ok(false);
            }
            let pdu = Pdu::from_json(id, &stored.json)?;
            if pdu.sender == user {
                return Ok(false);
            }
            let before = self.state_of_group(stored.state_before)?;
            if self.membership_in(&before, user)?.as_deref() != Some("join") {
                return Ok(false);
            }
            if !ctxs.contains_key(&pdu.room) {
                let c = (self.push_context(user, &pdu.room)?, self.read_points(user, &pdu.room)?);
                ctxs.insert(pdu.room.clone(), c);
            }
            let Some((ctx, points)) = ctxs.get(&pdu.room) else { return Ok(false) };
            let actions = self.push_actions(&rules, ctx, &pdu);
            let hit = if only_highlight {
                actions.iter().any(Action::is_highlight)
            } else {
                actions.iter().any(Action::should_notify)
            };
            if !hit {
                return Ok(false);
            }
            if out.len() == limit {
                next = Some(out.last().map(|(p, _)| *p).unwrap_or(pos));
                return Ok(true);
            }
            let content = pdu.content_value();
            let read = pos <= points.for_thread(thread_of(&content));
            let event = self.client_event_for(Some((user, device)), &pdu, &stored, true)?;
            out.push((
                pos,
                json!({
                    "actions": actions, "event": event, "read": read,
                    "room_id": pdu.room, "ts": u64::from(pdu.origin_server_ts.0),
                }),
            ));
            Ok(false)
        })?;
        let mut resp = json!({"notifications": out.into_iter().map(|(_, n)| n).collect::<Vec<_>>()});
        if let Some(n) = next {
            resp["next_token"] = json!(n.to_string());
        }
        Ok(resp)
    }

    /// `POST /pushers/set`: add, replace (`kind` set) or delete (`kind: null`) a pusher.
    pub async fn set_pusher(&self, user: &UserId, pusher: &JsonValue) -> Result<()> {
        let field = |k: &str| -> Result<String> {
            pusher
                .get(k)
                .and_then(JsonValue::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Error::MissingParam(format!("pusher without {k}")))
        };
        let app_id = field("app_id")?;
        let pushkey = field("pushkey")?;
        if app_id.len() > 64 || pushkey.len() > 512 {
            return Err(Error::InvalidParam("app_id is at most 64 bytes and pushkey 512".into()));
        }
        let k = key(&[user.as_bytes(), app_id.as_bytes(), pushkey.as_bytes()]);
        let _guard = self.user_data_lock.lock().await;
        let mut b = Batch::new();
        match pusher.get("kind") {
            None | Some(JsonValue::Null) => b.delete(Tree::Pushers, k),
            Some(kind) => {
                if kind.as_str() == Some("http") {
                    let url = pusher.pointer("/data/url").and_then(JsonValue::as_str).unwrap_or("");
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(Error::InvalidParam("an http pusher needs data.url (http or https)".into()));
                    }
                }
                let existing = self.store.scan_prefix(Tree::Pushers, &prefix(&[user.as_bytes()]), usize::MAX)?;
                if existing.len() >= self.limits.pushers_per_user_max && !existing.iter().any(|(ek, _)| *ek == k) {
                    return Err(Error::InvalidParam(format!(
                        "at most {} pushers per user",
                        self.limits.pushers_per_user_max
                    )));
                }
                if !pusher.get("append").and_then(JsonValue::as_bool).unwrap_or(false) {
                    // Other users' pushers with the same app id and pushkey go away.
                    for (ok, ov) in self.store.scan_prefix(Tree::Pushers, b"", 100_000)? {
                        let Ok(other) = serde_json::from_slice::<JsonValue>(&ov) else { continue };
                        if ok != k
                            && !ok.starts_with(&prefix(&[user.as_bytes()]))
                            && other.get("app_id") == pusher.get("app_id")
                            && other.get("pushkey") == pusher.get("pushkey")
                        {
                            b.delete(Tree::Pushers, ok);
                        }
                    }
                }
                let mut stored = serde_json::Map::new();
                for f in [
                    "pushkey",
                    "kind",
                    "app_id",
                    "app_display_name",
                    "device_display_name",
                    "profile_tag",
                    "lang",
                    "data",
                ] {
                    if let Some(v) = pusher.get(f).filter(|v| !v.is_null()) {
                        stored.insert(f.into(), v.clone());
                    }
                }
                b.put(Tree::Pushers, k, to_json(&stored));
            }
        }
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// `GET /pushers`.
    pub fn pushers(&self, user: &UserId) -> Result<Vec<JsonValue>> {
        let mut out = Vec::new();
        for (_, v) in self.store.scan_prefix(Tree::Pushers, &prefix(&[user.as_bytes()]), usize::MAX)? {
            out.push(serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use ruma::{
        push::{NewPushRule, NewSimplePushRule, RuleKind, Ruleset},
        user_id,
    };

    use super::merge_defaults;

    #[test]
    fn stored_rules_keep_user_changes_and_gain_new_defaults() {
        let me = user_id!("@me:example.org");
        let mut stored = Ruleset::server_default(me);
        stored.set_enabled(RuleKind::Underride, ".m.rule.message", false).unwrap();
        stored
            .insert(
                NewPushRule::Sender(NewSimplePushRule::new(user_id!("@loud:example.org").to_owned(), vec![])),
                None,
                None,
            )
            .unwrap();
        // A rule this build no longer knows, and a default the stored set lacks.
        let mut old = stored.clone();
        old.override_.shift_remove(".m.rule.tombstone");
        let merged = merge_defaults(old, Ruleset::server_default(me));
        assert!(!merged.get(RuleKind::Underride, ".m.rule.message").unwrap().enabled());
        assert!(merged.get(RuleKind::Sender, "@loud:example.org").is_some());
        assert!(merged.get(RuleKind::Override, ".m.rule.tombstone").is_some());
        assert_eq!(merged.override_.first().map(|r| r.rule_id.as_str()), Some(".m.rule.master"));
        assert_eq!(merged.iter().count(), stored.iter().count());
    }
}
