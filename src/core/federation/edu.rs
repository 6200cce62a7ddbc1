//! EDUs (ephemeral data units) between servers: what goes next to the PDUs of a `/send`
//! transaction, and what is done with the EDUs another server sends.
//!
//! # Two queues per destination
//! - **Ephemeral** (`m.typing`, `m.receipt`), in memory: losing one on a crash costs nothing
//!   that the next notification does not repair. A newer notification for the same (room, user)
//!   replaces the waiting one. The queue holds at most `edu_ephemeral_per_destination_max`
//!   entries; when full, the oldest typing notification is dropped, else the oldest receipt.
//!   `m.presence` is not sent (presence stays off).
//! - **Durable** (`m.device_list_update`, `m.signing_key_update`, `m.direct_to_device`), in the
//!   store ([`Tree::FedEduQueue`]): each entry is written in the same batch as the change that
//!   causes it, and deleted when a transaction carrying it is acknowledged. Device-list and
//!   signing-key entries only name what changed (user, device, stream ids); their content is
//!   read when the transaction is built, so it is always the current one. The queue holds at most
//!   `edu_durable_per_destination_max` entries; when full the oldest is dropped with a warning
//!   (the peer sees a gap in a user's device-list stream and re-fetches the list; a dropped
//!   to-device message is lost).
//!
//! A transaction carries at most 50 PDUs and 100 EDUs: durable EDUs first, in order, then
//! ephemeral ones. A transaction that fails is kept in memory and sent again unchanged (same
//! transaction id, so a receiver that did process it only acknowledges it).
//!
//! # Receiving
//! Every EDU must come from the server of the user it is about (`user_id`, `sender`), and typing
//! and receipts only count for users joined to the room here. Device-list updates and to-device
//! messages are applied durably before the transaction is acknowledged.
//!
//! # Driving it
//! Staging a durable EDU records its destination; [`Core::commit`] wakes the sender for it once
//! the batch is durable. Pushing an ephemeral EDU wakes the sender at once.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex as StdMutex,
    },
};

use ruma::{
    api::federation::transactions::edu::{DirectDeviceContent, Edu, ReceiptContent, TypingContent},
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
    DeviceId, EventId, OwnedDeviceId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, value::RawValue, Value as JsonValue};

use crate::{
    core::{receipts::ReceiptRecord, to_json, u64_from, Core, Error, Result},
    store::{key, prefix, Batch, Tree},
};

/// Most EDUs in one transaction (spec limit).
pub const MAX_EDUS_PER_TXN: usize = 100;

/// How long a remote user counts as typing after a `typing: true` EDU (ms), unless a `false`
/// comes first. Servers send `true` again on every refresh from the typist's client.
pub const REMOTE_TYPING_MS: u64 = 60_000;

/// Remote media downloads running at once (each holds the whole file in memory).
pub const REMOTE_MEDIA_FETCHES_MAX: usize = 4;

/// The device id under which to-device messages of a remote sender are deduplicated (by their
/// `message_id`) in `ToDeviceTxnIds`. Not a valid local device id (those are letters only).
pub const REMOTE_SENDER_DEVICE: &str = "~federation";

/// A durable queue entry (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QueuedEdu {
    /// A complete EDU.
    Ready {
        /// `edu_type`.
        edu_type: String,
        /// `content`.
        content: JsonValue,
    },
    /// `m.device_list_update` for one device of a local user; keys and name are read when sent.
    DeviceList {
        /// The user.
        user_id: OwnedUserId,
        /// The device that changed (absent now = deleted).
        device_id: OwnedDeviceId,
        /// Stream id of this change.
        stream_id: u64,
        /// Stream id of the user's previous change, if any.
        prev_id: Vec<u64>,
    },
    /// `m.signing_key_update` of a local user; the keys are read when sent.
    SigningKeys {
        /// The user.
        user_id: OwnedUserId,
    },
}

/// What changed in a local user's device list (for [`Core::stage_device_list_edus`]).
#[derive(Clone, Copy, Debug)]
pub enum DeviceListEdu<'a> {
    /// A device was added, renamed, deleted, or its keys changed.
    Device(&'a DeviceId),
    /// The master or self-signing key changed (or got a new signature).
    SigningKeys,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum EphemeralKey {
    Typing(OwnedRoomId, OwnedUserId),
    Receipt(OwnedRoomId, OwnedUserId, String),
}

#[derive(Clone, Debug)]
struct Ephemeral {
    key: EphemeralKey,
    edu: JsonValue,
}

/// One outbound transaction, kept until it is acknowledged.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutTxn {
    /// The transaction id.
    pub id: String,
    /// `FedQueue` keys of the PDUs it carries (deleted when acknowledged).
    pub pdu_keys: Vec<Vec<u8>>,
    /// The PDUs.
    pub pdus: Vec<Box<RawValue>>,
    /// `FedEduQueue` keys of the durable EDUs it carries (deleted when acknowledged).
    pub edu_keys: Vec<Vec<u8>>,
    /// The EDUs (durable first).
    pub edus: Vec<Raw<Edu>>,
    /// A queue was cut at the per-transaction limit: more is waiting.
    pub full: bool,
}

impl OutTxn {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.pdus.is_empty() && self.edus.is_empty()
    }
}

/// Federation state beyond the PDU queue: EDU queues, transactions to retry, per-user locks for
/// cached remote device lists, the bound on remote media downloads.
pub struct FedState {
    ephemeral: StdMutex<BTreeMap<OwnedServerName, VecDeque<Ephemeral>>>,
    /// Destinations whose durable queue a batch wrote to; taken under the sequencer lock.
    staged_wakes: StdMutex<BTreeSet<OwnedServerName>>,
    /// Entries in each destination's durable queue (counted once, then kept up to date).
    durable_counts: StdMutex<BTreeMap<OwnedServerName, usize>>,
    /// A failed transaction per destination, sent again as it was.
    retry: StdMutex<BTreeMap<OwnedServerName, OutTxn>>,
    txn_seq: AtomicU64,
    remote_user_locks: StdMutex<BTreeMap<OwnedUserId, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per origin: its transactions are processed one at a time, in arrival order.
    origin_locks: StdMutex<BTreeMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
    /// Remote media downloads in progress.
    pub(crate) media_fetches: tokio::sync::Semaphore,
}

impl Default for FedState {
    fn default() -> Self {
        Self {
            ephemeral: Default::default(),
            staged_wakes: Default::default(),
            durable_counts: Default::default(),
            retry: Default::default(),
            txn_seq: AtomicU64::new(0),
            remote_user_locks: Default::default(),
            origin_locks: Default::default(),
            media_fetches: tokio::sync::Semaphore::new(REMOTE_MEDIA_FETCHES_MAX),
        }
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FedState {
    /// The destinations staged since the last call (see [`Core::commit`]).
    pub(crate) fn take_staged_wakes(&self) -> BTreeSet<OwnedServerName> {
        std::mem::take(&mut *lock(&self.staged_wakes))
    }

    /// The transaction to send again to `dest`, if one failed.
    pub(crate) fn take_retry(&self, dest: &ServerName) -> Option<OutTxn> {
        lock(&self.retry).remove(dest)
    }

    /// Keep `txn` to send again to `dest` after a failure.
    pub(crate) fn keep_retry(&self, dest: &ServerName, txn: OutTxn) {
        lock(&self.retry).insert(dest.to_owned(), txn);
    }

    /// A new transaction id: unique for this process run (`started_ms` keeps runs apart).
    pub(crate) fn next_txn_id(&self, started_ms: u64) -> String {
        format!("{started_ms}.{}", self.txn_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether ephemeral EDUs wait for `dest`.
    pub(crate) fn has_ephemeral(&self, dest: &ServerName) -> bool {
        lock(&self.ephemeral).get(dest).is_some_and(|q| !q.is_empty())
    }

    /// Take up to `n` ephemeral EDUs for `dest`, oldest first.
    fn take_ephemeral(&self, dest: &ServerName, n: usize) -> Vec<JsonValue> {
        let mut all = lock(&self.ephemeral);
        let Some(q) = all.get_mut(dest) else { return Vec::new() };
        let out: Vec<JsonValue> = q.drain(..n.min(q.len())).map(|e| e.edu).collect();
        if q.is_empty() {
            all.remove(dest);
        }
        out
    }

    /// Queue `edu` for each of `dests`, replacing a waiting one with the same key.
    fn push_ephemeral(&self, dests: &BTreeSet<OwnedServerName>, k: EphemeralKey, edu: JsonValue, max: usize) {
        let mut all = lock(&self.ephemeral);
        for d in dests {
            let q = all.entry(d.clone()).or_default();
            q.retain(|e| e.key != k);
            while q.len() >= max.max(1) {
                let i = q.iter().position(|e| matches!(e.key, EphemeralKey::Typing(..))).unwrap_or(0);
                q.remove(i);
                tracing::debug!(dest = %d, "ephemeral EDU queue full; dropped the oldest");
            }
            q.push_back(Ephemeral { key: k.clone(), edu: edu.clone() });
        }
    }

    /// The lock serialising changes to the cached device list of remote `user`.
    pub(crate) fn remote_user_lock(&self, user: &UserId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.remote_user_locks);
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(user.to_owned()).or_default().clone()
    }

    /// The lock serialising the transactions of `origin` (see `receive_transaction`).
    pub(crate) fn origin_lock(&self, origin: &ServerName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.origin_locks);
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(origin.to_owned()).or_default().clone()
    }
}

/// `FedEduQueue` key: destination ‖ position ‖ index within the batch.
fn queue_key(dest: &ServerName, pos: u64, seq: u32) -> Vec<u8> {
    let mut pos_seq = pos.to_be_bytes().to_vec();
    pos_seq.extend_from_slice(&seq.to_be_bytes());
    key(&[dest.as_bytes(), &pos_seq])
}

fn raw_edu(edu: &JsonValue) -> Result<Raw<Edu>> {
    let raw = serde_json::value::to_raw_value(edu).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Raw::from_json(raw))
}

/// A ruma `Raw` value as plain JSON.
pub(crate) fn raw_json<T>(raw: &Raw<T>) -> Result<JsonValue> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::BadJson(e.to_string()))
}

impl Core {
    // ---------------------------------------------------------------------------------------
    // Where EDUs go
    // ---------------------------------------------------------------------------------------

    /// Other servers with a member joined to `room`.
    pub(crate) fn remote_servers_in_room(&self, room: &RoomId) -> Result<BTreeSet<OwnedServerName>> {
        let mut s = self.servers_in_room(room)?;
        s.remove(self.server_name());
        Ok(s)
    }

    /// Other servers sharing a joined room with local `user`.
    pub(crate) fn remote_servers_sharing_rooms(&self, user: &UserId) -> Result<BTreeSet<OwnedServerName>> {
        let mut out = BTreeSet::new();
        for (room, ur) in self.user_rooms(user)? {
            if ur.membership == "join" {
                out.extend(self.servers_in_room(&room)?);
            }
        }
        out.remove(self.server_name());
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // Outbound
    // ---------------------------------------------------------------------------------------

    fn push_ephemeral_edu(&self, room: &RoomId, k: EphemeralKey, edu: JsonValue) {
        let dests = match self.remote_servers_in_room(room) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot tell which servers are in the room; EDU not sent");
                return;
            }
        };
        if dests.is_empty() {
            return;
        }
        self.fed.push_ephemeral(&dests, k, edu, self.limits.edu_ephemeral_per_destination_max);
        self.wake_sender(&dests);
    }

    /// Tell the other servers in `room` that local `user` started or stopped typing.
    pub(crate) fn queue_typing_edu(&self, room: &RoomId, user: &UserId, typing: bool) {
        if user.server_name() != self.server_name() {
            return;
        }
        let edu = json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": user, "typing": typing}});
        self.push_ephemeral_edu(room, EphemeralKey::Typing(room.to_owned(), user.to_owned()), edu);
    }

    /// Tell the other servers in `room` about local `user`'s public read receipt.
    pub(crate) fn queue_receipt_edu(
        &self,
        room: &RoomId,
        user: &UserId,
        event: &EventId,
        thread: Option<&str>,
        ts: u64,
    ) {
        if user.server_name() != self.server_name() {
            return;
        }
        let mut data = json!({"ts": ts});
        if let Some(t) = thread {
            data["thread_id"] = json!(t);
        }
        let content = json!({room.as_str(): {"m.read": {user.as_str(): {"data": data, "event_ids": [event]}}}});
        let edu = json!({"edu_type": "m.receipt", "content": content});
        let k = EphemeralKey::Receipt(room.to_owned(), user.to_owned(), thread.unwrap_or("").to_owned());
        self.push_ephemeral_edu(room, k, edu);
    }

    /// Stage durable `edus` for each of `dests` into `b` at stream position `pos` (unique to
    /// this batch), dropping the oldest entries of a full queue. Call inside a commit closure.
    pub(crate) fn stage_durable_edus(
        &self,
        b: &mut Batch,
        dests: &BTreeSet<OwnedServerName>,
        pos: u64,
        edus: &[QueuedEdu],
    ) -> Result<()> {
        if edus.is_empty() {
            return Ok(());
        }
        let max = self.limits.edu_durable_per_destination_max.max(1);
        for d in dests {
            let mut counts = lock(&self.fed.durable_counts);
            let count = match counts.get(d) {
                Some(n) => *n,
                None => self.store.scan_prefix(Tree::FedEduQueue, &prefix(&[d.as_bytes()]), usize::MAX)?.len(),
            };
            let excess = (count + edus.len()).saturating_sub(max);
            if excess > 0 {
                let oldest = self.store.scan_prefix(Tree::FedEduQueue, &prefix(&[d.as_bytes()]), excess)?;
                tracing::warn!(dest = %d, dropped = oldest.len(), "durable EDU queue full; dropping the oldest");
                for (k, _) in oldest {
                    b.delete(Tree::FedEduQueue, k);
                }
            }
            for (i, e) in edus.iter().enumerate() {
                b.put(Tree::FedEduQueue, queue_key(d, pos, i as u32), to_json(e));
            }
            counts.insert(d.clone(), (count + edus.len()).saturating_sub(excess));
            lock(&self.fed.staged_wakes).insert(d.clone());
        }
        Ok(())
    }

    /// Stage device-list EDUs for a change to local `user`'s devices at stream position `pos`
    /// (the position given to `stage_device_list_change` in the same batch), to every server
    /// sharing a room with the user. Call inside the same commit closure.
    pub(crate) fn stage_device_list_edus(
        &self,
        b: &mut Batch,
        user: &UserId,
        changes: &[DeviceListEdu<'_>],
        pos: u64,
    ) -> Result<()> {
        if user.server_name() != self.server_name() || changes.is_empty() {
            return Ok(());
        }
        let dests = self.remote_servers_sharing_rooms(user)?;
        if dests.is_empty() {
            return Ok(());
        }
        // The user's previous change: the batch moving it to `pos` is not applied yet.
        let prev_id = match self.store.get(Tree::DeviceListPos, user.as_bytes())? {
            Some(v) => vec![u64_from(&v)?],
            None => Vec::new(),
        };
        let edus: Vec<QueuedEdu> = changes
            .iter()
            .map(|c| match c {
                DeviceListEdu::Device(d) => QueuedEdu::DeviceList {
                    user_id: user.to_owned(),
                    device_id: (*d).to_owned(),
                    stream_id: pos,
                    prev_id: prev_id.clone(),
                },
                DeviceListEdu::SigningKeys => QueuedEdu::SigningKeys { user_id: user.to_owned() },
            })
            .collect();
        self.stage_durable_edus(b, &dests, pos, &edus)
    }

    /// The EDU a durable queue entry stands for now (`None`: nothing to send any more).
    fn materialize(&self, q: QueuedEdu) -> Result<Option<JsonValue>> {
        Ok(match q {
            QueuedEdu::Ready { edu_type, content } => Some(json!({"edu_type": edu_type, "content": content})),
            QueuedEdu::DeviceList { user_id, device_id, stream_id, prev_id } => {
                let mut content = json!({
                    "user_id": user_id,
                    "device_id": device_id,
                    "stream_id": stream_id,
                    "prev_id": prev_id,
                });
                match self.device(&user_id, &device_id)? {
                    None => content["deleted"] = json!(true),
                    Some(rec) => {
                        let q =
                            self.query_keys(&user_id, &BTreeMap::from([(user_id.clone(), vec![device_id.clone()])]))?;
                        let mut keys = q["device_keys"][user_id.as_str()][device_id.as_str()].clone();
                        if let Some(o) = keys.as_object_mut() {
                            o.remove("unsigned");
                            content["keys"] = keys;
                        }
                        if let Some(n) = rec.display_name {
                            content["device_display_name"] = json!(n);
                        }
                    }
                }
                Some(json!({"edu_type": "m.device_list_update", "content": content}))
            }
            QueuedEdu::SigningKeys { user_id } => {
                let q = self.query_keys(&user_id, &BTreeMap::from([(user_id.clone(), Vec::new())]))?;
                let mut content = json!({"user_id": user_id});
                for (field, from) in [("master_key", "master_keys"), ("self_signing_key", "self_signing_keys")] {
                    let k = &q[from][user_id.as_str()];
                    if k.is_object() {
                        content[field] = k.clone();
                    }
                }
                Some(json!({"edu_type": "m.signing_key_update", "content": content}))
            }
        })
    }

    /// Build the next transaction for `dest` from its queues: up to 50 PDUs, up to 100 EDUs
    /// (durable ones first).
    pub(crate) fn build_transaction(&self, dest: &ServerName) -> Result<OutTxn> {
        self.build_transaction_after(dest, &[])
    }

    /// A transaction for `dest` carrying what the transactions still on their way (`ahead`,
    /// oldest first) do not: the PDUs and durable EDUs queued after the last ones they carry
    /// (queue keys grow with the stream position), and ephemeral EDUs.
    pub(crate) fn build_transaction_after(&self, dest: &ServerName, ahead: &[&OutTxn]) -> Result<OutTxn> {
        let mut txn = OutTxn { id: self.fed.next_txn_id(self.started_ms()), ..Default::default() };
        let max_pdus = super::sender::MAX_PDUS_PER_TXN;
        // Just after a key: the key with a 0 byte appended.
        let after = |last: Option<&Vec<u8>>| last.map(|k| [k.as_slice(), &[0u8][..]].concat());
        let pdus_from = after(ahead.iter().rev().find_map(|t| t.pdu_keys.last()));
        let edus_from = after(ahead.iter().rev().find_map(|t| t.edu_keys.last()));
        let p = prefix(&[dest.as_bytes()]);
        let entries = self.store.scan(Tree::FedQueue, &p, pdus_from.as_deref(), None, false, max_pdus)?;
        for (k, v) in entries {
            let id = EventId::parse(&*String::from_utf8_lossy(&v)).map_err(|e| Error::Internal(e.to_string()))?;
            if let Some(stored) = self.stored_pdu(&id)? {
                txn.pdus.push(RawValue::from_string(stored.json).map_err(|e| Error::Internal(e.to_string()))?);
            }
            txn.pdu_keys.push(k);
        }
        let durable = self.store.scan(Tree::FedEduQueue, &p, edus_from.as_deref(), None, false, MAX_EDUS_PER_TXN)?;
        if durable.is_empty() && ahead.is_empty() {
            lock(&self.fed.durable_counts).insert(dest.to_owned(), 0);
        }
        for (k, v) in durable {
            match serde_json::from_slice::<QueuedEdu>(&v) {
                Ok(q) => {
                    if let Some(edu) = self.materialize(q)? {
                        txn.edus.push(raw_edu(&edu)?);
                    }
                }
                Err(e) => tracing::warn!(%dest, error = %e, "corrupt queued EDU dropped"),
            }
            txn.edu_keys.push(k);
        }
        txn.full = txn.pdu_keys.len() == max_pdus || txn.edu_keys.len() == MAX_EDUS_PER_TXN;
        for edu in self.fed.take_ephemeral(dest, MAX_EDUS_PER_TXN - txn.edus.len()) {
            txn.edus.push(raw_edu(&edu)?);
        }
        Ok(txn)
    }

    /// A transaction to `dest` was acknowledged (or had nothing to send): delete its queue
    /// entries.
    pub(crate) async fn transaction_done(&self, dest: &ServerName, txn: &OutTxn) -> Result<()> {
        if txn.pdu_keys.is_empty() && txn.edu_keys.is_empty() {
            return Ok(());
        }
        let mut b = Batch::new();
        for k in &txn.pdu_keys {
            b.delete(Tree::FedQueue, k.clone());
        }
        for k in &txn.edu_keys {
            b.delete(Tree::FedEduQueue, k.clone());
        }
        self.commit(b, |_, _, _| Ok(())).await?;
        if let Some(n) = lock(&self.fed.durable_counts).get_mut(dest) {
            *n = n.saturating_sub(txn.edu_keys.len());
        }
        Ok(())
    }

    /// Number of durable EDUs waiting for `dest`.
    pub fn edu_queue_depth(&self, dest: &ServerName) -> Result<usize> {
        Ok(self.store.scan_prefix(Tree::FedEduQueue, &prefix(&[dest.as_bytes()]), usize::MAX)?.len())
    }

    /// Queue a to-device message batch for users of other servers into `b` (inside the commit
    /// closure of `send_to_device`): one `m.direct_to_device` EDU per server, at `pos`.
    pub(crate) fn stage_remote_to_device(
        &self,
        b: &mut Batch,
        pos: u64,
        sender: &UserId,
        kind: &str,
        message_id: &str,
        remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, JsonValue>>>,
    ) -> Result<()> {
        for (server, messages) in remote {
            if server == self.server_name() {
                continue;
            }
            tracing::debug!(dest = %server, %sender, kind, message_id, pos, "to-device queued for a server");
            let content = json!({"sender": sender, "type": kind, "message_id": message_id, "messages": messages});
            let edu = QueuedEdu::Ready { edu_type: "m.direct_to_device".into(), content };
            self.stage_durable_edus(b, &BTreeSet::from([server]), pos, &[edu])?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Inbound
    // ---------------------------------------------------------------------------------------

    /// Apply the EDUs of a transaction from `origin`. EDUs that fail their checks are skipped
    /// (and logged); a storage failure fails the whole transaction, so the origin sends it again.
    pub(crate) async fn receive_edus(self: &Arc<Self>, origin: &ServerName, edus: Vec<Raw<Edu>>) -> Result<()> {
        for raw in edus {
            let edu = match raw.deserialize() {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(%origin, error = %e, "malformed EDU skipped");
                    continue;
                }
            };
            let result = match edu {
                Edu::Typing(c) => self.receive_typing(origin, c).await,
                Edu::Receipt(c) => self.receive_receipts(origin, c).await,
                Edu::DeviceListUpdate(c) => self.receive_device_list_update(origin, c).await,
                Edu::SigningKeyUpdate(c) => self.receive_signing_key_update(origin, c).await,
                Edu::DirectToDevice(c) => self.receive_direct_to_device(origin, c).await,
                // Presence is off; unknown EDU types are ignored, as the spec asks.
                _ => Ok(()),
            };
            match result {
                Ok(()) => {}
                Err(e @ (Error::Store(_) | Error::Internal(_))) => return Err(e),
                Err(e) => tracing::info!(%origin, error = %e, "EDU refused"),
            }
        }
        Ok(())
    }

    /// `user` belongs to `origin` and is joined to `room` here.
    fn check_edu_member(&self, origin: &ServerName, user: &UserId, room: &RoomId) -> Result<()> {
        if user.server_name() != origin {
            return Err(Error::Forbidden(format!("{origin} cannot speak for {user}")));
        }
        if self.membership(room, user)?.as_deref() != Some("join") {
            return Err(Error::Forbidden(format!("{user} is not joined to {room}")));
        }
        Ok(())
    }

    async fn receive_typing(&self, origin: &ServerName, c: TypingContent) -> Result<()> {
        self.check_edu_member(origin, &c.user_id, &c.room_id)?;
        let expires = c.typing.then(|| self.now_ms().saturating_add(REMOTE_TYPING_MS));
        self.apply_typing(&c.user_id, &c.room_id, expires).await
    }

    async fn receive_receipts(&self, origin: &ServerName, c: ReceiptContent) -> Result<()> {
        for (room, map) in c.receipts {
            for (user, data) in map.read {
                if let Err(e) = self.check_edu_member(origin, &user, &room) {
                    tracing::info!(%origin, error = %e, "receipt refused");
                    continue;
                }
                // One event per receipt: the spec's list names the newest read event.
                let Some(event) = data.event_ids.last() else { continue };
                let ts = data.data.ts.map_or_else(|| self.now_ms(), |t| u64::from(t.0));
                let thread = data.data.thread.as_str().map(str::to_owned);
                self.store_remote_receipt(&room, &user, event, thread.as_deref(), ts).await?;
            }
        }
        Ok(())
    }

    /// Store a remote user's public receipt like a local one (see `receipts.rs`), so syncs
    /// report it. It never moves back to an older known event.
    async fn store_remote_receipt(
        &self,
        room: &RoomId,
        user: &UserId,
        event: &EventId,
        thread: Option<&str>,
        ts: u64,
    ) -> Result<()> {
        let kind = "m.read";
        let rk = key(&[room.as_bytes(), user.as_bytes(), kind.as_bytes(), thread.unwrap_or("").as_bytes()]);
        let _guard = self.user_data_lock.lock().await;
        let old: Option<ReceiptRecord> = self.get_json(Tree::Receipts, &rk)?;
        // An event not (yet) here sorts nowhere: it is stored with position 0.
        let event_pos = self.stored_pdu(event)?.filter(|s| !s.outlier && s.pos > 0).map(|s| s.pos);
        if let Some(o) = &old {
            if o.event_id == event || event_pos.is_some_and(|p| o.event_pos >= p) {
                return Ok(());
            }
        }
        self.commit(Batch::new(), |b, pos, _| {
            let p = pos();
            if let Some(o) = &old {
                b.delete(Tree::ReceiptsByPos, key(&[room.as_bytes(), &o.pos.to_be_bytes()]));
            }
            let rec = ReceiptRecord { event_id: event.to_owned(), ts, pos: p, event_pos: event_pos.unwrap_or(0) };
            b.put(Tree::Receipts, rk.clone(), to_json(&rec));
            b.put(Tree::ReceiptsByPos, key(&[room.as_bytes(), &p.to_be_bytes()]), rk.clone());
            Ok(())
        })
        .await
    }

    async fn receive_direct_to_device(&self, origin: &ServerName, c: DirectDeviceContent) -> Result<()> {
        if c.sender.server_name() != origin {
            return Err(Error::Forbidden(format!("{origin} cannot send to-device messages for {}", c.sender)));
        }
        let mut messages: BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, JsonValue>> = BTreeMap::new();
        for (user, targets) in c.messages {
            if user.server_name() != self.server_name() {
                continue; // never forwarded
            }
            let mut per = BTreeMap::new();
            for (target, content) in targets {
                per.insert(target, raw_json(&content)?);
            }
            messages.insert(user, per);
        }
        if messages.is_empty() {
            return Ok(());
        }
        tracing::debug!(%origin, sender = %c.sender, kind = %c.ev_type, message_id = %c.message_id, "to-device received");
        let device = OwnedDeviceId::from(REMOTE_SENDER_DEVICE);
        // The message id deduplicates a transaction sent twice.
        self.send_to_device(&c.sender, &device, &c.ev_type.to_string(), c.message_id.as_str(), messages).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typing(room: &str, user: &str) -> EphemeralKey {
        EphemeralKey::Typing(RoomId::parse(room).unwrap(), UserId::parse(user).unwrap())
    }

    fn receipt(room: &str, user: &str) -> EphemeralKey {
        EphemeralKey::Receipt(RoomId::parse(room).unwrap(), UserId::parse(user).unwrap(), String::new())
    }

    #[test]
    fn ephemeral_queue_coalesces_and_drops_the_oldest_typing_first() {
        let fed = FedState::default();
        let dest = OwnedServerName::try_from("example.org").unwrap();
        let dests = BTreeSet::from([dest.clone()]);
        let push = |k: EphemeralKey, n: u32| fed.push_ephemeral(&dests, k, json!({"n": n}), 3);
        push(typing("!a:x", "@u:x"), 1);
        push(receipt("!a:x", "@u:x"), 2);
        push(typing("!b:x", "@u:x"), 3);
        // A newer notification for the same room and user replaces the waiting one.
        push(typing("!a:x", "@u:x"), 4);
        // Full: the oldest typing notification (3) goes, the receipt stays.
        push(receipt("!b:x", "@v:x"), 5);
        assert!(fed.has_ephemeral(&dest));
        let got: Vec<u64> = fed.take_ephemeral(&dest, 10).iter().map(|e| e["n"].as_u64().unwrap()).collect();
        assert_eq!(got, vec![2, 4, 5]);
        assert!(!fed.has_ephemeral(&dest));
        // Only receipts: the oldest one goes.
        for n in 0..4 {
            push(receipt("!a:x", &format!("@u{n}:x")), n);
        }
        let got: Vec<u64> = fed.take_ephemeral(&dest, 2).iter().map(|e| e["n"].as_u64().unwrap()).collect();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(fed.take_ephemeral(&dest, 2).len(), 1);
    }

    #[test]
    fn queue_keys_sort_by_position_then_index() {
        let d = &*ServerName::parse("example.org").unwrap();
        assert!(queue_key(d, 1, 7) < queue_key(d, 2, 0));
        assert!(queue_key(d, 2, 0) < queue_key(d, 2, 1));
        assert!(queue_key(d, 2, 0).starts_with(&prefix(&[d.as_bytes()])));
    }
}
