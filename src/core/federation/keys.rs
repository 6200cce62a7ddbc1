//! End-to-end encryption across servers: the resident side of `user/devices`,
//! `user/keys/query` and `user/keys/claim`, and the client side of `/keys/query` and
//! `/keys/claim` for users of other servers, with a cache of remote device lists.
//!
//! # Remote device lists
//! The device list of a remote user who shares a room with a local user is fetched whole with
//! `GET /user/devices/{userId}` and cached ([`Tree::RemoteDeviceLists`], [`Tree::RemoteDevices`])
//! together with the stream id the origin gave it. `m.device_list_update` EDUs then keep it
//! current: an update whose `prev_id`s are all at or below the cached stream id is applied; one
//! that names a later id the cache has not seen means updates were missed, and the cache is
//! marked stale and fetched whole again on the next `/keys/query`. `m.signing_key_update`
//! replaces the cached master and self-signing keys. Every change is recorded as a device-list
//! change of that user, so local clients see it in `device_lists.changed` and query again.
//!
//! The cache is used only while it is known to be complete: some room must have had both the
//! remote user and a local user joined, without a membership change since the list was fetched
//! (otherwise the origin may have stopped sending us updates for a while). When the origin
//! cannot be reached, whatever is cached is served: on a mesh a peer is often away, and clients
//! can still encrypt to the devices they knew.
//!
//! Users who share no room with a local user are not cached: `/keys/query` asks their servers
//! with `user/keys/query`, one request per server.
//!
//! Remote requests run concurrently and are bounded by the client's `timeout` and
//! `limits.federation_query_timeout_ms`; servers that fail are listed in `failures`.

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::join_all;
use ruma::{
    api::federation::{
        device::get_devices,
        keys::{claim_keys, get_keys},
        transactions::edu::{DeviceListUpdateContent, SigningKeyUpdateContent},
    },
    DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName,
    UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as JsonValue};

use super::edu::raw_json;
use crate::{
    core::{e2ee::ClaimedKeys, to_json, u64_from, Core, Error, Result},
    store::{key, prefix, Batch, Tree},
};

/// What is cached about a remote user's device list (the devices are separate rows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteDeviceList {
    /// The origin's stream id of the newest change applied.
    pub stream_id: u64,
    /// Our stream position when the list was last fetched whole.
    pub fetched_pos: u64,
    /// Updates were missed: fetch the list whole before using it.
    pub stale: bool,
    /// The user's master key, if any.
    pub master_key: Option<JsonValue>,
    /// The user's self-signing key, if any.
    pub self_signing_key: Option<JsonValue>,
}

/// One cached device of a remote user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteDevice {
    /// Its signed device keys (absent for a device without keys).
    pub keys: Option<JsonValue>,
    /// Its display name, if the origin shares it.
    pub display_name: Option<String>,
}

/// A `failures` entry for a server that could not answer.
fn failure(e: impl std::fmt::Display) -> JsonValue {
    json!({"status": 503, "message": e.to_string()})
}

/// The keys object of a device, if it names `user` and `device`.
fn checked_device_keys(keys: JsonValue, user: &UserId, device: &DeviceId) -> Option<JsonValue> {
    let ok = keys.get("user_id").and_then(JsonValue::as_str) == Some(user.as_str())
        && keys.get("device_id").and_then(JsonValue::as_str) == Some(device.as_str());
    ok.then_some(keys)
}

/// A cross-signing key, if it belongs to `user`.
fn checked_cross_signing_key(k: JsonValue, user: &UserId) -> Option<JsonValue> {
    (k.get("user_id").and_then(JsonValue::as_str) == Some(user.as_str())).then_some(k)
}

impl Core {
    // ---------------------------------------------------------------------------------------
    // Resident side
    // ---------------------------------------------------------------------------------------

    /// Keys of local `user` as another server may see them: device keys with the owner's own
    /// signatures, master and self-signing keys (never the user-signing key).
    fn keys_for_server(&self, user: &UserId, devices: Vec<OwnedDeviceId>) -> Result<JsonValue> {
        let mut q = self.query_keys(user, &BTreeMap::from([(user.to_owned(), devices)]))?;
        if let Some(o) = q.as_object_mut() {
            o.remove("user_signing_keys");
            o.remove("failures");
        }
        Ok(q)
    }

    /// `GET /_matrix/federation/v1/user/devices/{userId}`: every device of local `user` with
    /// keys, the stream id of the user's newest device-list change, and the cross-signing keys.
    pub fn devices_for_server(&self, user: &UserId) -> Result<JsonValue> {
        if user.server_name() != self.server_name() || self.user(user)?.is_none() {
            return Err(Error::NotFound("no such user".into()));
        }
        let q = self.keys_for_server(user, Vec::new())?;
        let stream_id = match self.store.get(Tree::DeviceListPos, user.as_bytes())? {
            Some(v) => u64_from(&v)?,
            None => 0,
        };
        let mut devices = Vec::new();
        for (d, rec) in self.devices(user)? {
            let mut keys = q["device_keys"][user.as_str()][d.as_str()].clone();
            let Some(o) = keys.as_object_mut() else { continue };
            o.remove("unsigned");
            let mut dev = json!({"device_id": d, "keys": keys});
            if let Some(n) = rec.display_name {
                dev["device_display_name"] = json!(n);
            }
            devices.push(dev);
        }
        let mut out = json!({"user_id": user, "stream_id": stream_id, "devices": devices});
        for (field, from) in [("master_key", "master_keys"), ("self_signing_key", "self_signing_keys")] {
            let k = &q[from][user.as_str()];
            if k.is_object() {
                out[field] = k.clone();
            }
        }
        Ok(out)
    }

    /// `POST /_matrix/federation/v1/user/keys/query`: keys of the local users asked for.
    pub fn query_keys_for_server(&self, users: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>) -> Result<JsonValue> {
        let mut out = json!({"device_keys": {}, "master_keys": {}, "self_signing_keys": {}});
        for (u, devices) in users {
            if u.server_name() != self.server_name() {
                continue;
            }
            let q = self.keys_for_server(u, devices.clone())?;
            for field in ["device_keys", "master_keys", "self_signing_keys"] {
                if let Some(v) = q[field].get(u.as_str()) {
                    out[field][u.as_str()] = v.clone();
                }
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // The cache
    // ---------------------------------------------------------------------------------------

    /// The cached device list of remote `user`, if any.
    pub fn remote_device_list(&self, user: &UserId) -> Result<Option<RemoteDeviceList>> {
        self.get_json(Tree::RemoteDeviceLists, user.as_bytes())
    }

    /// Every room this node is in.
    fn known_rooms(&self) -> Result<Vec<OwnedRoomId>> {
        let mut out = Vec::new();
        for (k, _) in self.store.scan_prefix(Tree::Rooms, b"", usize::MAX)? {
            if let Ok(r) = RoomId::parse(String::from_utf8_lossy(&k).as_ref()) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Stream position of `user`'s current membership event in `room` if it is a join.
    fn join_pos(&self, room: &RoomId, user: &UserId) -> Result<Option<u64>> {
        let state = self.current_state(room)?;
        let Some(id) = state.get(&("m.room.member".to_owned(), user.to_string())) else { return Ok(None) };
        let (Some(p), Some(s)) = (self.pdu(id)?, self.stored_pdu(id)?) else { return Ok(None) };
        Ok((p.content_value().get("membership").and_then(JsonValue::as_str) == Some("join")).then_some(s.pos))
    }

    /// Whether some room has remote `user` and a local user joined, both since at or before
    /// `since` (`u64::MAX`: now).
    fn shares_room_since(&self, user: &UserId, since: u64) -> Result<bool> {
        for room in self.known_rooms()? {
            if self.join_pos(&room, user)?.is_none_or(|p| p > since) {
                continue;
            }
            for (m, _) in self.members(&room)? {
                if m.server_name() == self.server_name() && self.join_pos(&room, &m)?.is_some_and(|p| p <= since) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Whether the cached list of `user` can be served as complete (see the module docs).
    fn cache_is_current(&self, user: &UserId, rec: &RemoteDeviceList) -> Result<bool> {
        Ok(!rec.stale && self.shares_room_since(user, rec.fetched_pos)?)
    }

    /// Add the cached keys of `user` (the `wanted` devices, or all) to a `/keys/query` answer.
    fn add_cached_keys(
        &self,
        out: &mut JsonValue,
        user: &UserId,
        wanted: &[OwnedDeviceId],
        rec: &RemoteDeviceList,
    ) -> Result<()> {
        let p = prefix(&[user.as_bytes()]);
        let mut devices = Map::new();
        for (k, v) in self.store.scan_prefix(Tree::RemoteDevices, &p, usize::MAX)? {
            let d = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            if !wanted.is_empty() && !wanted.iter().any(|w| w.as_str() == d) {
                continue;
            }
            let dev: RemoteDevice = serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?;
            let Some(mut keys) = dev.keys else { continue };
            if let Some(n) = dev.display_name {
                keys["unsigned"] = json!({"device_display_name": n});
            }
            devices.insert(d, keys);
        }
        out["device_keys"][user.as_str()] = JsonValue::Object(devices);
        if let Some(m) = &rec.master_key {
            out["master_keys"][user.as_str()] = m.clone();
        }
        if let Some(s) = &rec.self_signing_key {
            out["self_signing_keys"][user.as_str()] = s.clone();
        }
        Ok(())
    }

    /// Fetch the whole device list of remote `user` from its server and cache it, unless the
    /// cache became current while we waited for the lock.
    pub async fn resync_remote_devices(&self, user: &UserId) -> Result<()> {
        let lock = self.fed.remote_user_lock(user);
        let _guard = lock.lock().await;
        let old = self.remote_device_list(user)?;
        if let Some(r) = &old {
            if self.cache_is_current(user, r)? {
                return Ok(());
            }
        }
        let fetched_pos = self.visible_pos();
        let res = self.federation_request(user.server_name(), get_devices::v1::Request::new(user.to_owned())).await?;
        if res.user_id != user {
            return Err(Error::Forbidden(format!("{} answered for {} instead", user.server_name(), res.user_id)));
        }
        let mut devices: BTreeMap<OwnedDeviceId, RemoteDevice> = BTreeMap::new();
        for d in res.devices {
            let Some(keys) = checked_device_keys(raw_json(&d.keys)?, user, &d.device_id) else {
                tracing::info!(%user, device = %d.device_id, "device keys name another device; skipped");
                continue;
            };
            devices.insert(d.device_id, RemoteDevice { keys: Some(keys), display_name: d.device_display_name });
        }
        let rec = RemoteDeviceList {
            stream_id: u64::from(res.stream_id),
            fetched_pos,
            stale: false,
            master_key: res
                .master_key
                .as_ref()
                .map(raw_json)
                .transpose()?
                .and_then(|k| checked_cross_signing_key(k, user)),
            self_signing_key: res
                .self_signing_key
                .as_ref()
                .map(raw_json)
                .transpose()?
                .and_then(|k| checked_cross_signing_key(k, user)),
        };
        let p = prefix(&[user.as_bytes()]);
        let old_devices = self.store.scan_prefix(Tree::RemoteDevices, &p, usize::MAX)?;
        let before: BTreeMap<Vec<u8>, &[u8]> =
            old_devices.iter().map(|(k, v)| (k[p.len()..].to_vec(), &v[..])).collect();
        let after: BTreeMap<Vec<u8>, Vec<u8>> =
            devices.iter().map(|(d, r)| (d.as_bytes().to_vec(), to_json(r))).collect();
        let same_devices = before.len() == after.len() && after.iter().all(|(d, v)| before.get(d) == Some(&&v[..]));
        let changed = old.as_ref().is_some_and(|o| {
            !same_devices || o.master_key != rec.master_key || o.self_signing_key != rec.self_signing_key
        });
        self.commit(Batch::new(), |b, pos, _| {
            for (k, _) in old_devices {
                b.delete(Tree::RemoteDevices, k);
            }
            for (d, dev) in &devices {
                b.put(Tree::RemoteDevices, key(&[user.as_bytes(), d.as_bytes()]), to_json(dev));
            }
            b.put(Tree::RemoteDeviceLists, user.as_bytes().to_vec(), to_json(&rec));
            // Clients that queried the old list must query again; a first fetch was asked for
            // by a client already.
            if changed {
                self.stage_device_list_change(b, user, pos())?;
            }
            Ok(())
        })
        .await
    }

    /// Apply an `m.device_list_update` from `origin` (see the module docs).
    pub(crate) async fn receive_device_list_update(
        &self,
        origin: &ServerName,
        c: DeviceListUpdateContent,
    ) -> Result<()> {
        let user = &c.user_id;
        if user.server_name() != origin || origin == self.server_name() {
            return Err(Error::Forbidden(format!("{origin} cannot update the devices of {user}")));
        }
        if !self.shares_room_since(user, u64::MAX)? {
            return Ok(()); // none of our business
        }
        let lock = self.fed.remote_user_lock(user);
        let _guard = lock.lock().await;
        let stream_id = u64::from(c.stream_id);
        let keys = match &c.keys {
            Some(k) => Some(raw_json(k)?),
            None => None,
        };
        self.commit(Batch::new(), |b, pos, _| {
            if let Some(mut rec) = self.remote_device_list(user)?.filter(|r| !r.stale) {
                if stream_id < rec.stream_id {
                    return Ok(()); // older than what we have
                }
                let keys_ok =
                    keys.as_ref().is_none_or(|k| checked_device_keys(k.clone(), user, &c.device_id).is_some());
                if c.prev_id.iter().all(|p| u64::from(*p) <= rec.stream_id) && keys_ok {
                    let k = key(&[user.as_bytes(), c.device_id.as_bytes()]);
                    if c.deleted == Some(true) {
                        b.delete(Tree::RemoteDevices, k);
                    } else {
                        let dev = RemoteDevice { keys: keys.clone(), display_name: c.device_display_name.clone() };
                        b.put(Tree::RemoteDevices, k, to_json(&dev));
                    }
                    rec.stream_id = stream_id;
                } else {
                    tracing::debug!(%user, stream_id, "gap in a remote device list; it will be fetched again");
                    rec.stale = true;
                }
                b.put(Tree::RemoteDeviceLists, user.as_bytes().to_vec(), to_json(&rec));
            }
            // Local clients query again (and an untracked or stale list is then fetched whole).
            self.stage_device_list_change(b, user, pos())
        })
        .await
    }

    /// Apply an `m.signing_key_update` from `origin`.
    pub(crate) async fn receive_signing_key_update(
        &self,
        origin: &ServerName,
        c: SigningKeyUpdateContent,
    ) -> Result<()> {
        let user = &c.user_id;
        if user.server_name() != origin || origin == self.server_name() {
            return Err(Error::Forbidden(format!("{origin} cannot update the keys of {user}")));
        }
        if !self.shares_room_since(user, u64::MAX)? {
            return Ok(());
        }
        let master = c.master_key.as_ref().map(raw_json).transpose()?.and_then(|k| checked_cross_signing_key(k, user));
        let ssk =
            c.self_signing_key.as_ref().map(raw_json).transpose()?.and_then(|k| checked_cross_signing_key(k, user));
        let lock = self.fed.remote_user_lock(user);
        let _guard = lock.lock().await;
        self.commit(Batch::new(), |b, pos, _| {
            if let Some(mut rec) = self.remote_device_list(user)?.filter(|r| !r.stale) {
                if master.is_some() {
                    rec.master_key = master.clone();
                }
                if ssk.is_some() {
                    rec.self_signing_key = ssk.clone();
                }
                b.put(Tree::RemoteDeviceLists, user.as_bytes().to_vec(), to_json(&rec));
            }
            self.stage_device_list_change(b, user, pos())
        })
        .await
    }

    // ---------------------------------------------------------------------------------------
    // Client side
    // ---------------------------------------------------------------------------------------

    fn remote_timeout(&self, client_timeout: Option<Duration>) -> Duration {
        let max = Duration::from_millis(self.limits.federation_query_timeout_ms);
        client_timeout.map_or(max, |t| t.min(max))
    }

    /// `/keys/query` as `viewer` for users of any server: local users from the store, remote
    /// users from the cache or their servers (see the module docs).
    pub async fn query_keys_anywhere(
        &self,
        viewer: &UserId,
        users: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
        timeout: Option<Duration>,
    ) -> Result<JsonValue> {
        let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) =
            users.iter().map(|(u, d)| (u.clone(), d.clone())).partition(|(u, _)| u.server_name() == self.server_name());
        let mut out = self.query_keys(viewer, &local)?;
        if remote.is_empty() {
            return Ok(out);
        }
        let timeout = self.remote_timeout(timeout);
        let mut failures = Map::new();
        let mut resync: Vec<(OwnedUserId, Vec<OwnedDeviceId>)> = Vec::new();
        let mut by_server: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>> = BTreeMap::new();
        for (u, wanted) in remote {
            match self.remote_device_list(&u)? {
                Some(rec) if self.cache_is_current(&u, &rec)? => self.add_cached_keys(&mut out, &u, &wanted, &rec)?,
                _ if self.shares_room_since(&u, u64::MAX)? => resync.push((u, wanted)),
                _ => {
                    by_server.entry(u.server_name().to_owned()).or_default().insert(u, wanted);
                }
            }
        }
        let resyncs =
            join_all(resync.iter().map(|(u, _)| tokio::time::timeout(timeout, self.resync_remote_devices(u))));
        let queries = join_all(by_server.iter().map(|(server, users)| {
            tokio::time::timeout(timeout, self.federation_request(server, get_keys::v1::Request::new(users.clone())))
        }));
        let (resynced, answered) = futures_util::future::join(resyncs, queries).await;
        for ((u, wanted), r) in resync.iter().zip(resynced) {
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("{} did not answer in time", u.server_name())),
            };
            match self.remote_device_list(u)? {
                // Fetched now, or (server away) the best we know.
                Some(rec) => self.add_cached_keys(&mut out, u, wanted, &rec)?,
                None => {
                    let why = err.unwrap_or_else(|| "no device list".into());
                    tracing::info!(user = %u, error = %why, "cannot fetch a remote device list");
                    failures.insert(u.server_name().to_string(), failure(why));
                }
            }
        }
        for ((server, _), r) in by_server.iter().zip(answered) {
            let res = match r {
                Ok(Ok(res)) => res,
                Ok(Err(e)) => {
                    failures.insert(server.to_string(), failure(e));
                    continue;
                }
                Err(_) => {
                    failures.insert(server.to_string(), failure(format!("{server} did not answer in time")));
                    continue;
                }
            };
            // Only what the server may speak for: its own users.
            for (u, devices) in res.device_keys {
                if u.server_name() != server {
                    continue;
                }
                let mut m = Map::new();
                for (d, k) in devices {
                    if let Some(k) = checked_device_keys(raw_json(&k)?, &u, &d) {
                        m.insert(d.to_string(), k);
                    }
                }
                out["device_keys"][u.as_str()] = JsonValue::Object(m);
            }
            for (field, keys) in [("master_keys", res.master_keys), ("self_signing_keys", res.self_signing_keys)] {
                for (u, k) in keys {
                    if u.server_name() == server {
                        if let Some(k) = checked_cross_signing_key(raw_json(&k)?, &u) {
                            out[field][u.as_str()] = k;
                        }
                    }
                }
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (u, d) in out["device_keys"].as_object().into_iter().flatten() {
                if u.split_once(':').is_some_and(|(_, s)| s != self.server_name().as_str()) {
                    let devices = d.as_object().map_or(0, Map::len);
                    tracing::debug!(user = %u, devices, "remote keys answered");
                }
            }
        }
        out["failures"] = JsonValue::Object(failures);
        Ok(out)
    }

    /// `/keys/claim` for devices of any server: local ones here, remote ones from their servers
    /// (one request per server). Returns `{one_time_keys, failures}`.
    pub async fn claim_keys_anywhere(
        &self,
        claims: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
        timeout: Option<Duration>,
    ) -> Result<JsonValue> {
        let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) = claims
            .iter()
            .map(|(u, d)| (u.clone(), d.clone()))
            .partition(|(u, _)| u.server_name() == self.server_name());
        let mut claimed: ClaimedKeys =
            if local.is_empty() { ClaimedKeys::new() } else { self.claim_keys(&local).await? };
        let mut by_server: BTreeMap<OwnedServerName, claim_keys::v1::OneTimeKeyClaims> = BTreeMap::new();
        for (u, devices) in remote {
            let m = devices.into_iter().map(|(d, alg)| (d, OneTimeKeyAlgorithm::from(alg.as_str()))).collect();
            by_server.entry(u.server_name().to_owned()).or_default().insert(u, m);
        }
        let timeout = self.remote_timeout(timeout);
        let answers = join_all(by_server.iter().map(|(server, c)| {
            tokio::time::timeout(timeout, self.federation_request(server, claim_keys::v1::Request::new(c.clone())))
        }))
        .await;
        let mut failures = Map::new();
        for ((server, asked), r) in by_server.iter().zip(answers) {
            let res = match r {
                Ok(Ok(res)) => res,
                Ok(Err(e)) => {
                    failures.insert(server.to_string(), failure(e));
                    continue;
                }
                Err(_) => {
                    failures.insert(server.to_string(), failure(format!("{server} did not answer in time")));
                    continue;
                }
            };
            for (u, devices) in res.one_time_keys {
                // Only keys that were asked for, of the server's own users.
                let Some(asked_devices) = asked.get(&u) else { continue };
                for (d, keys) in devices {
                    if !asked_devices.contains_key(&d) {
                        continue;
                    }
                    for (kid, k) in keys {
                        claimed
                            .entry(u.clone())
                            .or_default()
                            .entry(d.clone())
                            .or_default()
                            .insert(kid.to_string(), raw_json(&k)?);
                    }
                }
            }
        }
        Ok(json!({"one_time_keys": claimed, "failures": failures}))
    }
}
