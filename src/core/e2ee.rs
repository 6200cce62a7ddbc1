//! End-to-end encryption, server side: device keys, one-time and fallback keys, cross-signing
//! keys and signatures, device-list change tracking, and to-device messages.
//!
//! The server never sees plaintext: it stores and hands out public keys, checks the
//! cross-signing signatures it is given, and queues opaque to-device payloads.
//!
//! # Device lists
//! Every change to a user's devices or keys (a new or deleted device, a rename, new device keys,
//! cross-signing keys, signatures) takes a stream position. `DeviceListStream` keeps only each
//! user's newest change, so it holds at most one entry per user. `/sync` and `/keys/changes`
//! report as `changed` the users who share a room with the caller and whose entry lies in
//! `(since, upto]` (the caller included, for its other devices), plus users who came to share a
//! room in that window; as `left`, users who stopped sharing any room.
//!
//! # To-device inbox
//! A message takes a stream position when it is sent (which wakes long-polling syncs) and waits
//! in the recipient device's inbox. A sync delivers the waiting messages, oldest first; the next
//! sync with a `since` at or after their position acknowledges them and they are deleted. A
//! response carries at most `to_device_per_sync_max` messages: when more wait, the whole response
//! is cut at the position of the last message delivered (its `next_batch` stops there), so a
//! client never acknowledges a message it has not seen. An inbox holds at most
//! `to_device_inbox_max` messages; when it is full the oldest is dropped for the new one.
//!
//! # Driving it
//! Writes (`upload_keys`, `claim_keys`, `send_to_device`, ...) return once durable. A syncing
//! client must call [`Core::ack_to_device`] with its `since` before reading (`Core::sync` does).

use std::collections::{BTreeMap, BTreeSet};

use base64::{
    alphabet,
    engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig},
    Engine as _,
};
use ruma::{to_device::DeviceIdOrAllDevices, DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as JsonValue};

use super::{federation::edu::DeviceListEdu, pdu, to_json, Core, Error, Result};
use crate::store::{key, prefix, Batch, Tree};

/// Cross-signing key usages, as stored.
pub const USAGES: [&str; 3] = ["master", "self_signing", "user_signing"];

/// Most new timeline events of one room that a sync inspects for membership changes before it
/// falls back to comparing the room's whole member list.
const MEMBER_SCAN_MAX: usize = 100;

/// A device's fallback key for one algorithm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FallbackKey {
    /// The key id (after `algorithm:`).
    pub key_id: String,
    /// The key object as uploaded.
    pub key: JsonValue,
    /// Whether `/keys/claim` has handed it out.
    pub used: bool,
}

/// The keys of one `/keys/upload` request.
#[derive(Clone, Debug, Default)]
pub struct KeyUpload {
    /// The device's identity keys, signed.
    pub device_keys: Option<JsonValue>,
    /// `algorithm:key_id → key`.
    pub one_time_keys: BTreeMap<String, JsonValue>,
    /// `algorithm:key_id → key`.
    pub fallback_keys: BTreeMap<String, JsonValue>,
}

/// `user → device → algorithm:key_id → key`, as `/keys/claim` returns it.
pub type ClaimedKeys = BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<String, JsonValue>>>;

/// The end-to-end encryption part of one `/sync` response.
#[derive(Debug)]
pub(crate) struct SyncE2ee {
    /// The position the whole response must stop at (lower than asked when to-device messages
    /// had to be cut).
    pub upto: u64,
    to_device: Vec<JsonValue>,
    changed: BTreeSet<OwnedUserId>,
    left: BTreeSet<OwnedUserId>,
    otk_counts: BTreeMap<String, u64>,
    unused_fallback: Vec<String>,
}

impl SyncE2ee {
    /// Whether this part alone makes the response worth returning early from a long-poll.
    pub fn has_content(&self) -> bool {
        !self.to_device.is_empty() || !self.changed.is_empty() || !self.left.is_empty()
    }

    /// Write `to_device`, `device_lists`, `device_one_time_keys_count` and
    /// `device_unused_fallback_key_types` into a sync response.
    pub fn fill(self, resp: &mut JsonValue) {
        resp["to_device"] = json!({"events": self.to_device});
        resp["device_lists"] = json!({"changed": self.changed, "left": self.left});
        resp["device_one_time_keys_count"] = json!(self.otk_counts);
        resp["device_unused_fallback_key_types"] = json!(self.unused_fallback);
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("stored {what} is corrupt: {e}"))
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| corrupt(what, e))
}

/// `algorithm:key_id` split in two; both parts non-empty.
fn split_key_id(id: &str) -> Result<(&str, &str)> {
    match id.split_once(':') {
        Some((a, k)) if !a.is_empty() && !k.is_empty() => Ok((a, k)),
        _ => Err(Error::InvalidParam(format!("key id {id:?} is not of the form algorithm:id"))),
    }
}

fn pos_key(pos: u64) -> [u8; 8] {
    pos.to_be_bytes()
}

fn pos_from(v: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = v.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt("position", "short"))?;
    Ok(u64::from_be_bytes(arr))
}

/// Unpadded (or padded) standard base64, as Matrix keys and signatures use.
fn b64() -> GeneralPurpose {
    GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Canonical JSON of a signed object without `signatures` and `unsigned` (what is signed).
fn signed_part(object: &JsonValue) -> Result<String> {
    let mut o = object.as_object().cloned().ok_or_else(|| Error::BadJson("a key must be a JSON object".into()))?;
    o.remove("signatures");
    o.remove("unsigned");
    pdu::canonical_json(&JsonValue::Object(o))
}

/// Check `object.signatures[signer][key_id]` against the ed25519 `public_key` (base64).
fn verify_signature(object: &JsonValue, signer: &str, key_id: &str, public_key: &str) -> Result<()> {
    let bad = |why: &str| Error::Forbidden(format!("invalid signature {signer} {key_id}: {why}"));
    let sig = object
        .get("signatures")
        .and_then(|s| s.get(signer))
        .and_then(|s| s.get(key_id))
        .and_then(JsonValue::as_str)
        .ok_or_else(|| bad("missing"))?;
    let sig = b64().decode(sig).map_err(|_| bad("not base64"))?;
    let pk = b64().decode(public_key).map_err(|_| bad("public key is not base64"))?;
    let canonical = signed_part(object)?;
    ruma::signatures::verify_canonical_json_bytes(&ruma::SigningKeyAlgorithm::Ed25519, &pk, &sig, canonical.as_bytes())
        .map_err(|_| bad("does not verify"))
}

/// The single ed25519 public key of a cross-signing key, after checking its owner and usage.
fn cross_signing_public_key(object: &JsonValue, user: &UserId, usage: &str) -> Result<String> {
    let bad = |why: String| Error::InvalidParam(format!("{usage} key: {why}"));
    if object.get("user_id").and_then(JsonValue::as_str) != Some(user.as_str()) {
        return Err(bad(format!("user_id must be {user}")));
    }
    let usages = object.get("usage").and_then(JsonValue::as_array).ok_or_else(|| bad("no usage".into()))?;
    if !usages.iter().any(|u| u.as_str() == Some(usage)) {
        return Err(bad(format!("usage must include {usage}")));
    }
    let keys = object.get("keys").and_then(JsonValue::as_object).ok_or_else(|| bad("no keys".into()))?;
    let mut it = keys.iter();
    match (it.next(), it.next()) {
        (Some((id, JsonValue::String(k))), None) if id.strip_prefix("ed25519:") == Some(k.as_str()) => Ok(k.clone()),
        _ => Err(bad("keys must hold exactly one ed25519:<public key> entry".into())),
    }
}

/// The public key of a stored cross-signing key (already validated on upload).
fn stored_public_key(object: &JsonValue) -> Option<String> {
    object
        .get("keys")?
        .as_object()?
        .iter()
        .find_map(|(id, k)| id.strip_prefix("ed25519:").and(k.as_str()).map(str::to_owned))
}

impl Core {
    // ---------------------------------------------------------------------------------------
    // Device lists
    // ---------------------------------------------------------------------------------------

    /// Queue "the device list of `user` changed at `pos`" into `b`. Call at most once per user
    /// per batch, from inside a [`Core::commit`] closure (it reads the entry it replaces).
    pub(crate) fn stage_device_list_change(&self, b: &mut Batch, user: &UserId, pos: u64) -> Result<()> {
        if let Some(old) = self.store.get(Tree::DeviceListPos, user.as_bytes())? {
            let mut k = old;
            k.extend_from_slice(user.as_bytes());
            b.delete(Tree::DeviceListStream, k);
        }
        let mut k = pos_key(pos).to_vec();
        k.extend_from_slice(user.as_bytes());
        b.put(Tree::DeviceListStream, k, Vec::new());
        b.put(Tree::DeviceListPos, user.as_bytes().to_vec(), pos_key(pos).to_vec());
        Ok(())
    }

    /// Record a change to `user`'s devices or keys (for device-list tracking).
    pub async fn mark_device_list_changed(&self, user: &UserId) -> Result<()> {
        self.commit(Batch::new(), |b, pos, _| self.stage_device_list_change(b, user, pos())).await
    }

    /// Users whose devices or keys changed in `(since, upto]`.
    fn device_list_stream(&self, since: u64, upto: u64) -> Result<BTreeSet<OwnedUserId>> {
        let from = pos_key(since.saturating_add(1));
        let to = pos_key(upto.saturating_add(1));
        let mut out = BTreeSet::new();
        for (k, _) in self.store.scan(Tree::DeviceListStream, &[], Some(&from), Some(&to), false, usize::MAX)? {
            if let Ok(u) = UserId::parse(&*String::from_utf8_lossy(&k[8..])) {
                out.insert(u);
            }
        }
        Ok(out)
    }

    /// Users joined to `room` (current state).
    fn joined_members(&self, room: &RoomId) -> Result<Vec<OwnedUserId>> {
        Ok(self
            .members(room)?
            .into_iter()
            .filter(|(_, p)| p.content_value().get("membership").and_then(JsonValue::as_str) == Some("join"))
            .map(|(u, _)| u)
            .collect())
    }

    /// Users sharing a joined room with `user`, `user` included.
    pub fn users_sharing_rooms(&self, user: &UserId) -> Result<BTreeSet<OwnedUserId>> {
        let mut out = BTreeSet::from([user.to_owned()]);
        for (room, ur) in self.user_rooms(user)? {
            if ur.membership == "join" {
                out.extend(self.joined_members(&room)?);
            }
        }
        Ok(out)
    }

    /// Membership changes of other users in `room` within `(since, upto]`: (joined, left).
    fn member_changes(
        &self,
        room: &RoomId,
        since: u64,
        upto: u64,
        joined: &mut BTreeSet<OwnedUserId>,
        left: &mut BTreeSet<OwnedUserId>,
    ) -> Result<()> {
        let p = prefix(&[room.as_bytes()]);
        let lo = key(&[room.as_bytes(), &pos_key(since.saturating_add(1))]);
        let hi = key(&[room.as_bytes(), &pos_key(upto.saturating_add(1))]);
        let window = self.store.scan(Tree::Timeline, &p, Some(&lo), Some(&hi), false, MEMBER_SCAN_MAX + 1)?;
        let mut note = |target: &str, membership: &str| {
            if let Ok(u) = UserId::parse(target) {
                match membership {
                    "join" => {
                        joined.insert(u);
                    }
                    "leave" | "ban" => {
                        left.insert(u);
                    }
                    _ => {}
                }
            }
        };
        if window.len() <= MEMBER_SCAN_MAX {
            for (_, id) in window {
                let Ok(id) = ruma::EventId::parse(&*String::from_utf8_lossy(&id)) else { continue };
                let Some(p) = self.pdu(&id)? else { continue };
                if p.kind.to_string() == "m.room.member" {
                    if let Some(sk) = &p.state_key {
                        let c = p.content_value();
                        note(sk, c.get("membership").and_then(JsonValue::as_str).unwrap_or(""));
                    }
                }
            }
        } else {
            // Too many new events: compare the current member events' positions instead.
            for (u, p) in self.members(room)? {
                let Some(s) = self.stored_pdu(&p.event_id)? else { continue };
                if s.pos > since && s.pos <= upto {
                    let c = p.content_value();
                    note(u.as_str(), c.get("membership").and_then(JsonValue::as_str).unwrap_or(""));
                }
            }
        }
        Ok(())
    }

    /// `device_lists` for `user` between two stream positions: (changed, left).
    pub fn device_list_changes(
        &self,
        user: &UserId,
        since: u64,
        upto: u64,
    ) -> Result<(BTreeSet<OwnedUserId>, BTreeSet<OwnedUserId>)> {
        if upto <= since {
            return Ok(Default::default());
        }
        let stream = self.device_list_stream(since, upto)?;
        let mut joined = BTreeSet::new();
        let mut left = BTreeSet::new();
        for (room, ur) in self.user_rooms(user)? {
            if ur.pos > since && ur.pos <= upto {
                // My own membership changed: everyone there is new to me, or gone.
                match ur.membership.as_str() {
                    "join" => joined.extend(self.joined_members(&room)?),
                    "leave" | "ban" => left.extend(self.joined_members(&room)?),
                    _ => {}
                }
            } else if ur.membership == "join" {
                self.member_changes(&room, since, upto, &mut joined, &mut left)?;
            }
        }
        if stream.is_empty() && joined.is_empty() && left.is_empty() {
            return Ok(Default::default());
        }
        let shared = self.users_sharing_rooms(user)?;
        let mut changed: BTreeSet<OwnedUserId> = stream.into_iter().filter(|u| shared.contains(u)).collect();
        changed.extend(joined.into_iter().filter(|u| shared.contains(u) && u != user));
        let left: BTreeSet<OwnedUserId> = left.into_iter().filter(|u| !shared.contains(u)).collect();
        Ok((changed, left))
    }

    // ---------------------------------------------------------------------------------------
    // Device keys, one-time keys, fallback keys
    // ---------------------------------------------------------------------------------------

    /// `/keys/upload`: store what the device sent; returns its one-time key counts.
    pub async fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        upload: KeyUpload,
    ) -> Result<BTreeMap<String, u64>> {
        if let Some(dk) = &upload.device_keys {
            if dk.get("user_id").and_then(JsonValue::as_str) != Some(user.as_str())
                || dk.get("device_id").and_then(JsonValue::as_str) != Some(device.as_str())
            {
                return Err(Error::InvalidParam("device_keys must name your own user and device".into()));
            }
            if !dk.get("keys").is_some_and(JsonValue::is_object) {
                return Err(Error::BadJson("device_keys.keys must be an object".into()));
            }
        }
        for id in upload.one_time_keys.keys().chain(upload.fallback_keys.keys()) {
            split_key_id(id)?;
        }
        if upload.device_keys.is_some() || !upload.one_time_keys.is_empty() || !upload.fallback_keys.is_empty() {
            let max = self.limits.one_time_keys_per_device_max;
            self.commit(Batch::new(), |b, pos, _| {
                if let Some(mut dk) = upload.device_keys {
                    if let Some(o) = dk.as_object_mut() {
                        o.remove("unsigned");
                    }
                    let k = key(&[user.as_bytes(), device.as_bytes()]);
                    let old: Option<JsonValue> = self.get_json(Tree::DeviceKeys, &k)?;
                    if old.as_ref() != Some(&dk) {
                        b.put(Tree::DeviceKeys, k, to_json(&dk));
                        let p = pos();
                        self.stage_device_list_edus(b, user, &[DeviceListEdu::Device(device)], p)?;
                        self.stage_device_list_change(b, user, p)?;
                    }
                }
                let mut count = self
                    .store
                    .scan_prefix(Tree::OneTimeKeys, &prefix(&[user.as_bytes(), device.as_bytes()]), max + 1)?
                    .len();
                for (id, v) in upload.one_time_keys {
                    let (alg, kid) = split_key_id(&id)?;
                    let k = key(&[user.as_bytes(), device.as_bytes(), alg.as_bytes(), kid.as_bytes()]);
                    match self.get_json::<JsonValue>(Tree::OneTimeKeys, &k)? {
                        Some(old) if old == v => continue,
                        Some(_) => {
                            return Err(Error::InvalidParam(format!(
                                "one-time key {id} already exists with other content"
                            )))
                        }
                        None => {}
                    }
                    count += 1;
                    if count > max {
                        return Err(Error::InvalidParam(format!(
                            "one_time_keys: a device may hold at most {max} one-time keys; claim or upload fewer"
                        )));
                    }
                    b.put(Tree::OneTimeKeys, k, to_json(&v));
                }
                for (id, v) in upload.fallback_keys {
                    let (alg, kid) = split_key_id(&id)?;
                    let k = key(&[user.as_bytes(), device.as_bytes(), alg.as_bytes()]);
                    let old: Option<FallbackKey> = self.get_json(Tree::FallbackKeys, &k)?;
                    let used = old.filter(|o| o.key_id == kid && o.key == v).is_some_and(|o| o.used);
                    b.put(Tree::FallbackKeys, k, to_json(&FallbackKey { key_id: kid.to_owned(), key: v, used }));
                }
                Ok(())
            })
            .await?;
        }
        self.one_time_key_counts(user, device)
    }

    /// Unclaimed one-time keys of a device, by algorithm (`signed_curve25519` always present).
    pub fn one_time_key_counts(&self, user: &UserId, device: &DeviceId) -> Result<BTreeMap<String, u64>> {
        let p = prefix(&[user.as_bytes(), device.as_bytes()]);
        let mut out = BTreeMap::from([("signed_curve25519".to_owned(), 0)]);
        for (k, _) in self.store.scan_prefix(Tree::OneTimeKeys, &p, usize::MAX)? {
            let rest = &k[p.len()..];
            let alg = rest.split(|b| *b == 0xff).next().unwrap_or_default();
            *out.entry(String::from_utf8_lossy(alg).into_owned()).or_default() += 1;
        }
        Ok(out)
    }

    /// Algorithms for which the device has a fallback key that was not handed out yet.
    pub fn unused_fallback_key_types(&self, user: &UserId, device: &DeviceId) -> Result<Vec<String>> {
        let p = prefix(&[user.as_bytes(), device.as_bytes()]);
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(Tree::FallbackKeys, &p, usize::MAX)? {
            let fb: FallbackKey = parse("fallback key", &v)?;
            if !fb.used {
                out.push(String::from_utf8_lossy(&k[p.len()..]).into_owned());
            }
        }
        Ok(out)
    }

    /// `/keys/claim`: for each device, take one one-time key of the algorithm (it is deleted, so
    /// nobody else gets it); when none is left, hand out the fallback key and mark it used.
    /// Devices with neither, and users of other servers, are absent from the answer.
    pub async fn claim_keys(
        &self,
        claims: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
    ) -> Result<ClaimedKeys> {
        // Reading inside the commit closure serialises claims: no key is handed out twice.
        self.commit(Batch::new(), |b, _, _| {
            let mut out = ClaimedKeys::new();
            for (u, devices) in claims {
                if u.server_name() != self.server_name() {
                    continue;
                }
                for (d, alg) in devices {
                    let p = prefix(&[u.as_bytes(), d.as_bytes(), alg.as_bytes()]);
                    let claimed = match self.store.scan_prefix(Tree::OneTimeKeys, &p, 1)?.into_iter().next() {
                        Some((k, v)) => {
                            let kid = String::from_utf8_lossy(&k[p.len()..]).into_owned();
                            b.delete(Tree::OneTimeKeys, k);
                            Some((kid, parse::<JsonValue>("one-time key", &v)?))
                        }
                        None => {
                            let k = key(&[u.as_bytes(), d.as_bytes(), alg.as_bytes()]);
                            match self.get_json::<FallbackKey>(Tree::FallbackKeys, &k)? {
                                Some(mut fb) => {
                                    let out = (fb.key_id.clone(), fb.key.clone());
                                    if !fb.used {
                                        fb.used = true;
                                        b.put(Tree::FallbackKeys, k, to_json(&fb));
                                    }
                                    Some(out)
                                }
                                None => None,
                            }
                        }
                    };
                    if let Some((kid, v)) = claimed {
                        out.entry(u.clone())
                            .or_default()
                            .entry(d.clone())
                            .or_default()
                            .insert(format!("{alg}:{kid}"), v);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The stored device keys of one device (as uploaded).
    pub fn device_keys(&self, user: &UserId, device: &DeviceId) -> Result<Option<JsonValue>> {
        self.get_json(Tree::DeviceKeys, &key(&[user.as_bytes(), device.as_bytes()]))
    }

    /// Add the uploaded signatures on `target_key_id` of `target` that `viewer` may see: the
    /// owner's own, and `viewer`'s (signatures by other users' user-signing keys are private).
    fn merge_signatures(
        &self,
        object: &mut JsonValue,
        target: &UserId,
        target_key_id: &str,
        viewer: &UserId,
    ) -> Result<()> {
        let p = prefix(&[target.as_bytes(), target_key_id.as_bytes()]);
        for (k, v) in self.store.scan_prefix(Tree::KeySignatures, &p, usize::MAX)? {
            let rest = &k[p.len()..];
            let Some(i) = rest.iter().position(|b| *b == 0xff) else { continue };
            let (signer, signer_key) = (String::from_utf8_lossy(&rest[..i]), String::from_utf8_lossy(&rest[i + 1..]));
            let (signer, signer_key) = (signer.as_ref(), signer_key.as_ref());
            if signer != target.as_str() && signer != viewer.as_str() {
                continue;
            }
            let sig: String = parse("signature", &v)?;
            if !object.get("signatures").is_some_and(JsonValue::is_object) {
                object["signatures"] = json!({});
            }
            let sigs = &mut object["signatures"];
            if !sigs.get(signer).is_some_and(JsonValue::is_object) {
                sigs[signer] = json!({});
            }
            sigs[signer][signer_key] = json!(sig);
        }
        Ok(())
    }

    /// `/keys/query` as `viewer`: device keys (all devices when the list is empty) and
    /// cross-signing keys of local users, with the signatures `viewer` may see merged in.
    pub fn query_keys(&self, viewer: &UserId, users: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>) -> Result<JsonValue> {
        let mut device_keys = Map::new();
        let mut master = Map::new();
        let mut self_signing = Map::new();
        let mut user_signing = Map::new();
        for (u, wanted) in users {
            if u.server_name() != self.server_name() {
                continue; // Remote users' keys arrive with federation.
            }
            let mut devices = Map::new();
            for (d, rec) in self.devices(u)? {
                if !wanted.is_empty() && !wanted.contains(&d) {
                    continue;
                }
                let Some(mut keys) = self.device_keys(u, &d)? else { continue };
                self.merge_signatures(&mut keys, u, d.as_str(), viewer)?;
                if let Some(name) = rec.display_name {
                    keys["unsigned"] = json!({"device_display_name": name});
                }
                devices.insert(d.to_string(), keys);
            }
            device_keys.insert(u.to_string(), JsonValue::Object(devices));
            for (usage, out) in
                [("master", &mut master), ("self_signing", &mut self_signing), ("user_signing", &mut user_signing)]
            {
                if usage == "user_signing" && u != viewer {
                    continue;
                }
                if let Some(mut k) = self.cross_signing_key(u, usage)? {
                    if let Some(pk) = stored_public_key(&k) {
                        self.merge_signatures(&mut k, u, &pk, viewer)?;
                    }
                    out.insert(u.to_string(), k);
                }
            }
        }
        Ok(json!({
            "device_keys": device_keys,
            "master_keys": master,
            "self_signing_keys": self_signing,
            "user_signing_keys": user_signing,
            "failures": {},
        }))
    }

    // ---------------------------------------------------------------------------------------
    // Cross-signing
    // ---------------------------------------------------------------------------------------

    /// A stored cross-signing key (`usage` is one of [`USAGES`]).
    pub fn cross_signing_key(&self, user: &UserId, usage: &str) -> Result<Option<JsonValue>> {
        self.get_json(Tree::CrossSigningKeys, &key(&[user.as_bytes(), usage.as_bytes()]))
    }

    /// Whether `/keys/device_signing/upload` needs user-interactive auth: yes once the user has a
    /// master key, unless the request only repeats the stored keys (MSC3967, as Synapse does:
    /// the first upload right after login needs no password).
    pub fn device_signing_needs_auth(&self, user: &UserId, keys: &[(&str, Option<&JsonValue>)]) -> Result<bool> {
        if self.cross_signing_key(user, "master")?.is_none() {
            return Ok(false);
        }
        for (usage, k) in keys {
            if let Some(k) = k {
                if self.cross_signing_key(user, usage)?.as_ref() != Some(*k) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// `/keys/device_signing/upload` (after auth): store the cross-signing keys. The
    /// self-signing and user-signing keys must carry a valid signature of the master key (the
    /// one uploaded with them, or the stored one).
    pub async fn upload_cross_signing_keys(
        &self,
        user: &UserId,
        master: Option<JsonValue>,
        self_signing: Option<JsonValue>,
        user_signing: Option<JsonValue>,
    ) -> Result<()> {
        let master_pk = match &master {
            Some(m) => Some(cross_signing_public_key(m, user, "master")?),
            None => self.cross_signing_key(user, "master")?.as_ref().and_then(stored_public_key),
        };
        for (usage, k) in [("self_signing", &self_signing), ("user_signing", &user_signing)] {
            if let Some(k) = k {
                cross_signing_public_key(k, user, usage)?;
                let Some(mpk) = &master_pk else {
                    return Err(Error::InvalidParam(format!("{usage} key uploaded without a master key")));
                };
                verify_signature(k, user.as_str(), &format!("ed25519:{mpk}"), mpk)
                    .map_err(|e| Error::InvalidParam(format!("{usage} key is not signed by the master key: {e}")))?;
            }
        }
        let keys = [("master", master), ("self_signing", self_signing), ("user_signing", user_signing)];
        if keys.iter().all(|(_, k)| k.is_none()) {
            return Ok(());
        }
        self.commit(Batch::new(), |b, pos, _| {
            for (usage, k) in keys {
                if let Some(k) = k {
                    b.put(Tree::CrossSigningKeys, key(&[user.as_bytes(), usage.as_bytes()]), to_json(&k));
                }
            }
            let p = pos();
            self.stage_device_list_edus(b, user, &[DeviceListEdu::SigningKeys], p)?;
            self.stage_device_list_change(b, user, p)
        })
        .await
    }

    /// `/keys/signatures/upload` by `sender`: `user → key id → signed object`. Accepted: the
    /// sender's self-signing key over the sender's devices, the sender's devices over the
    /// sender's master key, the sender's user-signing key over another user's master key.
    /// Returns the failures, `user → key id → {errcode, error}`.
    pub async fn upload_signatures(
        &self,
        sender: &UserId,
        signed: BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>>,
    ) -> Result<BTreeMap<String, BTreeMap<String, JsonValue>>> {
        let mut failures: BTreeMap<String, BTreeMap<String, JsonValue>> = BTreeMap::new();
        let mut accepted: Vec<(OwnedUserId, String, String, String)> = Vec::new();
        for (target, objects) in signed {
            for (key_id, object) in objects {
                match self.check_signature_upload(sender, &target, &key_id, &object) {
                    Ok(sigs) => {
                        accepted.extend(sigs.into_iter().map(|(sk, sig)| (target.clone(), key_id.clone(), sk, sig)))
                    }
                    Err(e) => {
                        let code = match &e {
                            Error::NotFound(_) => "M_NOT_FOUND",
                            Error::Forbidden(_) => "M_INVALID_SIGNATURE",
                            Error::Internal(_) | Error::Store(_) => return Err(e),
                            _ => "M_INVALID_PARAM",
                        };
                        failures
                            .entry(target.to_string())
                            .or_default()
                            .insert(key_id.clone(), json!({"errcode": code, "error": e.to_string()}));
                    }
                }
            }
        }
        if !accepted.is_empty() {
            // Other servers see the user's own signatures: on a device (its keys change) or on the
            // master key (a signing-key update). Signatures of other users' keys stay here.
            let mut own_devices: BTreeSet<OwnedDeviceId> = BTreeSet::new();
            let mut own_master = false;
            for (target, key_id, _, _) in &accepted {
                if target != sender {
                    continue;
                }
                if self.device(sender, key_id.as_str().into())?.is_some() {
                    own_devices.insert(OwnedDeviceId::from(key_id.as_str()));
                } else {
                    own_master = true;
                }
            }
            self.commit(Batch::new(), |b, pos, _| {
                for (target, key_id, signer_key, sig) in accepted {
                    b.put(
                        Tree::KeySignatures,
                        key(&[target.as_bytes(), key_id.as_bytes(), sender.as_bytes(), signer_key.as_bytes()]),
                        to_json(&sig),
                    );
                }
                let p = pos();
                let mut changes: Vec<DeviceListEdu<'_>> =
                    own_devices.iter().map(|d| DeviceListEdu::Device(d)).collect();
                if own_master {
                    changes.push(DeviceListEdu::SigningKeys);
                }
                self.stage_device_list_edus(b, sender, &changes, p)?;
                self.stage_device_list_change(b, sender, p)
            })
            .await?;
        }
        Ok(failures)
    }

    /// The new signatures `(signer key id, signature)` in one uploaded object, verified.
    fn check_signature_upload(
        &self,
        sender: &UserId,
        target: &UserId,
        key_id: &str,
        object: &JsonValue,
    ) -> Result<Vec<(String, String)>> {
        if target.server_name() != self.server_name() {
            return Err(Error::NotFound("keys of users on other servers are not known here".into()));
        }
        let master = self.cross_signing_key(target, "master")?;
        let master_pk = master.as_ref().and_then(stored_public_key);
        // (the stored object, the signer key ids allowed with their public keys)
        let (stored, signers): (JsonValue, Vec<(String, String)>) =
            if target == sender && master_pk.as_deref() != Some(key_id) {
                let stored = self
                    .device_keys(target, key_id.into())?
                    .ok_or_else(|| Error::NotFound(format!("unknown key {key_id}")))?;
                let ssk = self
                    .cross_signing_key(sender, "self_signing")?
                    .as_ref()
                    .and_then(stored_public_key)
                    .ok_or_else(|| Error::InvalidParam("upload a self-signing key first".into()))?;
                (stored, vec![(format!("ed25519:{ssk}"), ssk)])
            } else if master_pk.as_deref() == Some(key_id) {
                let stored = master.unwrap_or_default();
                if target == sender {
                    let mut signers = Vec::new();
                    for (d, _) in self.devices(sender)? {
                        let ed = self
                            .device_keys(sender, &d)?
                            .and_then(|k| k.get("keys")?.get(format!("ed25519:{d}"))?.as_str().map(str::to_owned));
                        if let Some(ed) = ed {
                            signers.push((format!("ed25519:{d}"), ed));
                        }
                    }
                    (stored, signers)
                } else {
                    let usk = self
                        .cross_signing_key(sender, "user_signing")?
                        .as_ref()
                        .and_then(stored_public_key)
                        .ok_or_else(|| Error::InvalidParam("upload a user-signing key first".into()))?;
                    (stored, vec![(format!("ed25519:{usk}"), usk)])
                }
            } else {
                return Err(Error::NotFound(format!("unknown key {key_id} of {target}")));
            };
        if signed_part(&stored)? != signed_part(object)? {
            return Err(Error::Forbidden("the signed object does not match the stored key".into()));
        }
        let mut out = Vec::new();
        let given = object.get("signatures").and_then(|s| s.get(sender.as_str())).and_then(JsonValue::as_object);
        for (signer_key, _) in given.into_iter().flatten() {
            let Some((_, pk)) = signers.iter().find(|(id, _)| id == signer_key) else { continue };
            let existing =
                stored.get("signatures").and_then(|s| s.get(sender.as_str())).and_then(|s| s.get(signer_key));
            if existing.is_some() && existing == object["signatures"][sender.as_str()].get(signer_key) {
                continue; // already part of the stored key
            }
            verify_signature(object, sender.as_str(), signer_key, pk)?;
            let sig = object["signatures"][sender.as_str()][signer_key].as_str().unwrap_or_default().to_owned();
            out.push((signer_key.clone(), sig));
        }
        if out.is_empty() {
            return Err(Error::Forbidden("no new signature by a key allowed to sign this key".into()));
        }
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // To-device messages
    // ---------------------------------------------------------------------------------------

    /// `sendToDevice`: queue `content` of type `kind` from `sender` for every addressed local
    /// device (`*` = all of a user's devices; unknown devices are skipped). A repeated
    /// `(sender_device, txn_id)` does nothing. Returns once durable; wakes the recipients' syncs.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        kind: &str,
        txn_id: &str,
        messages: BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, JsonValue>>,
    ) -> Result<()> {
        let inbox_max = self.limits.to_device_inbox_max.max(1);
        let txn_max = self.limits.txn_ids_per_device_max.max(1);
        let txn_key = key(&[sender.as_bytes(), sender_device.as_bytes(), txn_id.as_bytes()]);
        self.commit(Batch::new(), |b, pos, _| {
            if self.store.get(Tree::ToDeviceTxnIds, &txn_key)?.is_some() {
                return Ok(()); // already sent
            }
            let mut last = None;
            // Users of other servers: one `m.direct_to_device` EDU per server (federation/edu.rs).
            let mut remote: BTreeMap<ruma::OwnedServerName, BTreeMap<OwnedUserId, _>> = BTreeMap::new();
            for (user, targets) in messages {
                if user.server_name() != self.server_name() {
                    if sender.server_name() == self.server_name() {
                        remote.entry(user.server_name().to_owned()).or_default().insert(user, targets);
                    }
                    continue;
                }
                let known: BTreeSet<OwnedDeviceId> = self.devices(&user)?.into_iter().map(|(d, _)| d).collect();
                // Each device gets one message per request (`*` and its own id may both appear).
                let mut per_device: BTreeMap<OwnedDeviceId, JsonValue> = BTreeMap::new();
                for (target, content) in targets {
                    match target {
                        DeviceIdOrAllDevices::AllDevices => {
                            for d in &known {
                                per_device.entry(d.clone()).or_insert_with(|| content.clone());
                            }
                        }
                        DeviceIdOrAllDevices::DeviceId(d) if known.contains(&d) => {
                            per_device.insert(d, content);
                        }
                        _ => {}
                    }
                }
                for (d, content) in per_device {
                    let p = prefix(&[user.as_bytes(), d.as_bytes()]);
                    let waiting = self.store.scan_prefix(Tree::ToDevice, &p, inbox_max)?;
                    if waiting.len() >= inbox_max {
                        let drop = waiting.len() + 1 - inbox_max;
                        tracing::warn!(%user, device = %d, dropped = drop, "to-device inbox full; dropping the oldest");
                        for (k, _) in waiting.into_iter().take(drop) {
                            b.delete(Tree::ToDevice, k);
                        }
                    }
                    let at = pos();
                    last = Some(at);
                    let event = json!({"type": kind, "sender": sender, "content": content});
                    b.put(Tree::ToDevice, key(&[user.as_bytes(), d.as_bytes(), &pos_key(at)]), to_json(&event));
                }
            }
            if !remote.is_empty() {
                let at = pos();
                last = Some(at);
                let message_id = format!("{sender_device}.{txn_id}");
                self.stage_remote_to_device(b, at, sender, kind, &message_id, remote)?;
            }
            // Remember the transaction id; forget the oldest beyond the bound.
            let tp = prefix(&[sender.as_bytes(), sender_device.as_bytes()]);
            let txns = self.store.scan_prefix(Tree::ToDeviceTxnIds, &tp, usize::MAX)?;
            if txns.len() >= txn_max {
                let txns_len = txns.len();
                let mut by_pos: Vec<(u64, Vec<u8>)> =
                    txns.into_iter().map(|(k, v)| Ok((parse::<u64>("txn", &v)?, k))).collect::<Result<_>>()?;
                by_pos.sort();
                for (_, k) in by_pos.into_iter().take(txns_len + 1 - txn_max + txn_max / 10) {
                    b.delete(Tree::ToDeviceTxnIds, k);
                }
            }
            let at = match last {
                Some(p) => p,
                None => self.visible_pos(),
            };
            b.put(Tree::ToDeviceTxnIds, txn_key, to_json(&at));
            Ok(())
        })
        .await
    }

    /// Delete the messages a device has acknowledged by syncing with `since`.
    pub async fn ack_to_device(&self, user: &UserId, device: &DeviceId, since: u64) -> Result<()> {
        let p = prefix(&[user.as_bytes(), device.as_bytes()]);
        let to = key(&[user.as_bytes(), device.as_bytes(), &pos_key(since.saturating_add(1))]);
        let done = self.store.scan(Tree::ToDevice, &p, None, Some(&to), false, usize::MAX)?;
        if done.is_empty() {
            return Ok(());
        }
        let mut b = Batch::new();
        for (k, _) in done {
            b.delete(Tree::ToDevice, k);
        }
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// The end-to-end encryption part of a sync of `device` over `(since, upto]`; its `upto` may
    /// be lower than asked (see the module docs) and the rest of the response must use it.
    pub(crate) fn sync_e2ee(
        &self,
        user: &UserId,
        device: &DeviceId,
        since: Option<u64>,
        upto: u64,
    ) -> Result<SyncE2ee> {
        let max = self.limits.to_device_per_sync_max.max(1);
        let p = prefix(&[user.as_bytes(), device.as_bytes()]);
        let to = key(&[user.as_bytes(), device.as_bytes(), &pos_key(upto.saturating_add(1))]);
        let mut waiting = self.store.scan(Tree::ToDevice, &p, None, Some(&to), false, max + 1)?;
        let mut upto = upto;
        if waiting.len() > max {
            waiting.truncate(max);
            let last = pos_from(&waiting[max - 1].0[p.len()..])?;
            if since.is_none_or(|s| last > s) {
                upto = last;
            }
        }
        let mut to_device = Vec::with_capacity(waiting.len());
        for (_, v) in waiting {
            to_device.push(parse::<JsonValue>("to-device message", &v)?);
        }
        let (changed, left) = match since {
            Some(s) => self.device_list_changes(user, s, upto)?,
            None => Default::default(),
        };
        Ok(SyncE2ee {
            upto,
            to_device,
            changed,
            left,
            otk_counts: self.one_time_key_counts(user, device)?,
            unused_fallback: self.unused_fallback_key_types(user, device)?,
        })
    }

    /// Queue into `b` the removal of everything end-to-end encryption keeps for a device: keys,
    /// one-time and fallback keys, signatures on its keys, inbox, transaction ids.
    pub(crate) fn stage_device_keys_removal(&self, b: &mut Batch, user: &UserId, device: &DeviceId) -> Result<()> {
        b.delete(Tree::DeviceKeys, key(&[user.as_bytes(), device.as_bytes()]));
        let ud = prefix(&[user.as_bytes(), device.as_bytes()]);
        for tree in [Tree::OneTimeKeys, Tree::FallbackKeys, Tree::ToDevice, Tree::ToDeviceTxnIds, Tree::KeySignatures] {
            for (k, _) in self.store.scan_prefix(tree, &ud, usize::MAX)? {
                b.delete(tree, k);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ed25519_dalek::{Signer, SigningKey};

    use super::*;
    use crate::{
        clock::SystemClock,
        core::{rooms::CreateRoomSpec, sync::SyncRequest, Limits},
        identity::Identity,
        store::MemoryStore,
    };

    fn core(limits: Limits) -> Arc<Core> {
        Core::open(Arc::new(MemoryStore::default()), Identity::from_seed([3; 32]), Arc::new(SystemClock), limits)
            .unwrap()
    }

    async fn user(core: &Core, name: &str) -> (OwnedUserId, OwnedDeviceId) {
        let u = core.register(name, Some("pw")).await.unwrap();
        let (d, _) = core.create_device(&u, None, None).await.unwrap();
        (u, d)
    }

    async fn sync(core: &Core, u: &UserId, d: &DeviceId, since: Option<u64>) -> (Vec<u64>, u64) {
        let resp = core.sync(u, d, SyncRequest { since, ..Default::default() }).await.unwrap();
        let ns = resp["to_device"]["events"].as_array().unwrap().iter().map(|e| e["content"]["n"].as_u64().unwrap());
        let next = super::super::sync::parse_token(resp["next_batch"].as_str().unwrap()).unwrap();
        (ns.collect(), next)
    }

    #[tokio::test]
    async fn to_device_is_cut_per_sync_and_the_inbox_is_bounded() {
        let core = core(Limits { to_device_per_sync_max: 2, to_device_inbox_max: 4, ..Limits::default() });
        let (alice, alice_dev) = user(&core, "alice").await;
        let (bob, bob_dev) = user(&core, "bob").await;
        for n in 1..=5u64 {
            let msgs = BTreeMap::from([(
                bob.clone(),
                BTreeMap::from([(DeviceIdOrAllDevices::DeviceId(bob_dev.clone()), json!({"n": n}))]),
            )]);
            core.send_to_device(&alice, &alice_dev, "m.test", &format!("t{n}"), msgs).await.unwrap();
        }
        // The inbox holds 4: message 1 was dropped. Each sync carries 2 and stops its token at
        // the last one delivered, so acknowledging it never loses the rest.
        let (got, t1) = sync(&core, &bob, &bob_dev, None).await;
        assert_eq!(got, vec![2, 3]);
        assert!(t1 < core.visible_pos(), "the response is cut at the last message delivered");
        let (got, t2) = sync(&core, &bob, &bob_dev, Some(t1)).await;
        assert_eq!(got, vec![4, 5]);
        let (got, _) = sync(&core, &bob, &bob_dev, Some(t2)).await;
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn device_lists_follow_shared_rooms() {
        let core = core(Limits::default());
        let (alice, _) = user(&core, "alice").await;
        let (bob, _) = user(&core, "bob").await;
        let (carol, _) = user(&core, "carol").await;
        let room = core
            .create_room(&alice, CreateRoomSpec { preset: Some("public_chat".into()), ..Default::default() })
            .await
            .unwrap();
        core.set_membership(&bob, &room, &bob, "join", None, None).await.unwrap();
        let t0 = core.visible_pos();
        // Carol shares no room with Alice: her new device is none of Alice's business.
        core.create_device(&carol, None, None).await.unwrap();
        let (changed, left) = core.device_list_changes(&alice, t0, core.visible_pos()).unwrap();
        assert!(changed.is_empty() && left.is_empty(), "{changed:?} {left:?}");
        // Bob's new device is.
        core.create_device(&bob, None, None).await.unwrap();
        let (changed, _) = core.device_list_changes(&alice, t0, core.visible_pos()).unwrap();
        assert_eq!(changed, BTreeSet::from([bob.clone()]));
        // Carol joining makes her a user to track; Bob leaving, one to forget.
        let t1 = core.visible_pos();
        core.set_membership(&carol, &room, &carol, "join", None, None).await.unwrap();
        core.set_membership(&bob, &room, &bob, "leave", None, None).await.unwrap();
        let (changed, left) = core.device_list_changes(&alice, t1, core.visible_pos()).unwrap();
        assert_eq!(changed, BTreeSet::from([carol.clone()]));
        assert_eq!(left, BTreeSet::from([bob.clone()]));
        // Alice's own device changes are reported to her other devices.
        let t2 = core.visible_pos();
        core.create_device(&alice, None, None).await.unwrap();
        let (changed, _) = core.device_list_changes(&alice, t2, core.visible_pos()).unwrap();
        assert_eq!(changed, BTreeSet::from([alice.clone()]));
    }

    fn cross_signing_key(user: &UserId, usage: &str, key: &SigningKey, signer: Option<&SigningKey>) -> JsonValue {
        let pk = b64().encode(key.verifying_key().to_bytes());
        let mut k = json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{pk}"): pk}});
        if let Some(s) = signer {
            let spk = b64().encode(s.verifying_key().to_bytes());
            let sig = s.sign(signed_part(&k).unwrap().as_bytes());
            k["signatures"] = json!({user.as_str(): {format!("ed25519:{spk}"): b64().encode(sig.to_bytes())}});
        }
        k
    }

    #[tokio::test]
    async fn cross_signing_keys_must_be_signed_by_the_master_key() {
        let core = core(Limits::default());
        let (alice, _) = user(&core, "alice").await;
        let (master, ssk, other) =
            (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]), SigningKey::from_bytes(&[9; 32]));
        let m = cross_signing_key(&alice, "master", &master, None);
        let forged = cross_signing_key(&alice, "self_signing", &ssk, Some(&other));
        let err = core.upload_cross_signing_keys(&alice, Some(m.clone()), Some(forged), None).await.unwrap_err();
        assert!(matches!(err, Error::InvalidParam(_)), "{err:?}");
        assert!(core.cross_signing_key(&alice, "master").unwrap().is_none(), "nothing stored on error");
        let good = cross_signing_key(&alice, "self_signing", &ssk, Some(&master));
        assert!(!core.device_signing_needs_auth(&alice, &[("master", Some(&m))]).unwrap(), "first upload");
        core.upload_cross_signing_keys(&alice, Some(m.clone()), Some(good.clone()), None).await.unwrap();
        assert!(!core
            .device_signing_needs_auth(&alice, &[("master", Some(&m)), ("self_signing", Some(&good))])
            .unwrap());
        let m2 = cross_signing_key(&alice, "master", &other, None);
        assert!(core.device_signing_needs_auth(&alice, &[("master", Some(&m2))]).unwrap(), "replacing needs auth");
        // A wrong usage or owner is refused.
        let bad = cross_signing_key(&alice, "user_signing", &ssk, Some(&master));
        assert!(core.upload_cross_signing_keys(&alice, None, Some(bad), None).await.is_err());
    }
}
