//! Server-side key backup (`/room_keys`): versions with an algorithm and opaque `auth_data`,
//! and per-session encrypted room keys in the current version.
//!
//! Versions are decimal numbers that only grow: deleting the newest version leaves a tombstone
//! so its number is never reused. Every change to a version's keys bumps its `etag`; `count` is
//! the number of sessions stored. Writes go only to the current (newest) version; anything else
//! is `M_WRONG_ROOM_KEYS_VERSION`. A session already stored is replaced only by a better copy
//! (verified beats unverified, then lower `first_message_index`, then lower `forwarded_count`),
//! as the spec says.

use std::collections::BTreeMap;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as JsonValue};

use super::{to_json, Core, Error, Result};
use crate::store::{key, prefix, Batch, Tree};

/// One backup version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupVersion {
    /// The backup algorithm, e.g. `m.megolm_backup.v1.curve25519-aes-sha2`.
    pub algorithm: String,
    /// Algorithm-specific data (public key, signatures), opaque to the server.
    pub auth_data: JsonValue,
    /// Bumped on every change to the keys.
    pub etag: u64,
    /// Sessions stored.
    pub count: u64,
    /// A deleted version kept only so its number is not reused.
    #[serde(default)]
    pub deleted: bool,
}

/// Keys of a backup: `room → session → KeyBackupData`.
pub type BackupKeys = BTreeMap<OwnedRoomId, BTreeMap<String, JsonValue>>;

fn parse_version(v: &str) -> Result<u64> {
    v.parse().map_err(|_| Error::NotFound(format!("unknown backup version {v:?}")))
}

fn version_key(user: &UserId, v: u64) -> Vec<u8> {
    key(&[user.as_bytes(), &v.to_be_bytes()])
}

fn keys_prefix(user: &UserId, v: u64) -> Vec<u8> {
    prefix(&[user.as_bytes(), &v.to_be_bytes()])
}

/// Whether `new` should replace `old` (spec: "Storing keys").
fn better(new: &JsonValue, old: &JsonValue) -> bool {
    let verified = |k: &JsonValue| k.get("is_verified").and_then(JsonValue::as_bool).unwrap_or(false);
    let num = |k: &JsonValue, f: &str| k.get(f).and_then(JsonValue::as_u64).unwrap_or(u64::MAX);
    (!verified(new), num(new, "first_message_index"), num(new, "forwarded_count"))
        < (!verified(old), num(old, "first_message_index"), num(old, "forwarded_count"))
}

fn validate_session(data: &JsonValue) -> Result<()> {
    let ok = data.get("first_message_index").is_some_and(JsonValue::is_u64)
        && data.get("forwarded_count").is_some_and(JsonValue::is_u64)
        && data.get("is_verified").is_some_and(JsonValue::is_boolean)
        && data.get("session_data").is_some_and(JsonValue::is_object);
    if ok {
        Ok(())
    } else {
        Err(Error::BadJson(
            "key backup data needs first_message_index, forwarded_count, is_verified and session_data".into(),
        ))
    }
}

impl Core {
    /// The newest version number ever created (deleted or not).
    fn newest_backup_version(&self, user: &UserId) -> Result<Option<(u64, BackupVersion)>> {
        let p = prefix(&[user.as_bytes()]);
        match self.store.scan(Tree::BackupVersions, &p, None, None, true, 1)?.into_iter().next() {
            None => Ok(None),
            Some((k, v)) => {
                let n = super::u64_from(&k[p.len()..])?;
                let rec = serde_json::from_slice(&v).map_err(|e| Error::Internal(format!("backup version: {e}")))?;
                Ok(Some((n, rec)))
            }
        }
    }

    /// The current backup version: the newest that is not deleted.
    fn current_backup(&self, user: &UserId) -> Result<Option<(u64, BackupVersion)>> {
        // Only the newest version can be a tombstone (older ones are removed on delete).
        let p = prefix(&[user.as_bytes()]);
        for (k, v) in self.store.scan(Tree::BackupVersions, &p, None, None, true, 2)? {
            let rec: BackupVersion =
                serde_json::from_slice(&v).map_err(|e| Error::Internal(format!("backup version: {e}")))?;
            if !rec.deleted {
                return Ok(Some((super::u64_from(&k[p.len()..])?, rec)));
            }
        }
        Ok(None)
    }

    fn backup_version_record(&self, user: &UserId, version: &str) -> Result<(u64, BackupVersion)> {
        let n = parse_version(version)?;
        match self.get_json::<BackupVersion>(Tree::BackupVersions, &version_key(user, n))? {
            Some(rec) if !rec.deleted => Ok((n, rec)),
            _ => Err(Error::NotFound(format!("unknown backup version {version}"))),
        }
    }

    /// `POST /room_keys/version`: create a version from `{algorithm, auth_data}`; returns it.
    pub async fn create_backup_version(&self, user: &UserId, body: &JsonValue) -> Result<String> {
        let algorithm = body
            .get("algorithm")
            .and_then(JsonValue::as_str)
            .ok_or_else(|| Error::BadJson("algorithm must be a string".into()))?
            .to_owned();
        let auth_data = body
            .get("auth_data")
            .filter(|a| a.is_object())
            .cloned()
            .ok_or_else(|| Error::BadJson("auth_data must be an object".into()))?;
        self.commit(Batch::new(), |b, _, _| {
            let next = self.newest_backup_version(user)?.map_or(1, |(n, _)| n + 1);
            let rec = BackupVersion { algorithm, auth_data, etag: 0, count: 0, deleted: false };
            b.put(Tree::BackupVersions, version_key(user, next), to_json(&rec));
            Ok(next.to_string())
        })
        .await
    }

    /// `GET /room_keys/version[/{version}]` (`None` = the current one).
    pub fn backup_version(&self, user: &UserId, version: Option<&str>) -> Result<JsonValue> {
        let (n, rec) = match version {
            Some(v) => self.backup_version_record(user, v)?,
            None => self.current_backup(user)?.ok_or_else(|| Error::NotFound("no current backup version".into()))?,
        };
        Ok(json!({
            "algorithm": rec.algorithm, "auth_data": rec.auth_data,
            "count": rec.count, "etag": rec.etag.to_string(), "version": n.to_string(),
        }))
    }

    /// `PUT /room_keys/version/{version}`: replace `auth_data` (the algorithm cannot change).
    pub async fn update_backup_version(&self, user: &UserId, version: &str, body: &JsonValue) -> Result<()> {
        if let Some(v) = body.get("version") {
            if v.as_str() != Some(version) {
                return Err(Error::InvalidParam("version in the body does not match the path".into()));
            }
        }
        let auth_data = body
            .get("auth_data")
            .filter(|a| a.is_object())
            .cloned()
            .ok_or_else(|| Error::BadJson("auth_data must be an object".into()))?;
        let algorithm = body.get("algorithm").and_then(JsonValue::as_str).map(str::to_owned);
        self.commit(Batch::new(), |b, _, _| {
            let (n, mut rec) = self.backup_version_record(user, version)?;
            if algorithm.as_deref().is_some_and(|a| a != rec.algorithm) {
                return Err(Error::InvalidParam("the algorithm of a backup version cannot change".into()));
            }
            rec.auth_data = auth_data;
            b.put(Tree::BackupVersions, version_key(user, n), to_json(&rec));
            Ok(())
        })
        .await
    }

    /// `DELETE /room_keys/version/{version}`: delete the version and its keys.
    pub async fn delete_backup_version(&self, user: &UserId, version: &str) -> Result<()> {
        self.commit(Batch::new(), |b, _, _| {
            let (n, mut rec) = self.backup_version_record(user, version)?;
            for (k, _) in self.store.scan_prefix(Tree::BackupKeys, &keys_prefix(user, n), usize::MAX)? {
                b.delete(Tree::BackupKeys, k);
            }
            let newest = self.newest_backup_version(user)?.map(|(m, _)| m);
            // Only the newest number may stay as a tombstone; drop any older one.
            let p = prefix(&[user.as_bytes()]);
            for (k, v) in self.store.scan_prefix(Tree::BackupVersions, &p, usize::MAX)? {
                let old: BackupVersion =
                    serde_json::from_slice(&v).map_err(|e| Error::Internal(format!("backup version: {e}")))?;
                if old.deleted && Some(super::u64_from(&k[p.len()..])?) != newest {
                    b.delete(Tree::BackupVersions, k);
                }
            }
            if newest == Some(n) {
                rec.deleted = true;
                rec.count = 0;
                rec.auth_data = json!({});
                b.put(Tree::BackupVersions, version_key(user, n), to_json(&rec));
            } else {
                b.delete(Tree::BackupVersions, version_key(user, n));
            }
            Ok(())
        })
        .await
    }

    /// `PUT /room_keys/keys[...]`: store sessions in the current version. Returns (etag, count).
    pub async fn put_backup_keys(&self, user: &UserId, version: &str, keys: BackupKeys) -> Result<(String, u64)> {
        for sessions in keys.values() {
            for data in sessions.values() {
                validate_session(data)?;
            }
        }
        self.commit(Batch::new(), |b, _, _| {
            let current = self.current_backup(user)?;
            let Some((n, mut rec)) = current.filter(|(n, _)| version.parse::<u64>().ok() == Some(*n)) else {
                return match self.current_backup(user)? {
                    Some((n, _)) => Err(Error::WrongRoomKeysVersion(Some(n.to_string()))),
                    None => Err(Error::NotFound("no current backup version".into())),
                };
            };
            let mut changed = false;
            for (room, sessions) in keys {
                for (session, data) in sessions {
                    let k = key(&[user.as_bytes(), &n.to_be_bytes(), room.as_bytes(), session.as_bytes()]);
                    match self.get_json::<JsonValue>(Tree::BackupKeys, &k)? {
                        Some(old) if !better(&data, &old) => continue,
                        Some(_) => {}
                        None => rec.count += 1,
                    }
                    b.put(Tree::BackupKeys, k, to_json(&data));
                    changed = true;
                }
            }
            if changed {
                rec.etag += 1;
                b.put(Tree::BackupVersions, version_key(user, n), to_json(&rec));
            }
            Ok((rec.etag.to_string(), rec.count))
        })
        .await
    }

    /// `GET /room_keys/keys[...]`: stored sessions of a version, of one room, or one session.
    pub fn get_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&RoomId>,
        session: Option<&str>,
    ) -> Result<BackupKeys> {
        let (n, _) = self.backup_version_record(user, version)?;
        let mut parts: Vec<&[u8]> = vec![user.as_bytes()];
        let nb = n.to_be_bytes();
        parts.push(&nb);
        if let Some(r) = room {
            parts.push(r.as_bytes());
        }
        let mut out = BackupKeys::new();
        let entries = match (room, session) {
            (Some(r), Some(s)) => {
                let k = key(&[user.as_bytes(), &nb, r.as_bytes(), s.as_bytes()]);
                self.store.get(Tree::BackupKeys, &k)?.map(|v| (k, v)).into_iter().collect()
            }
            _ => self.store.scan_prefix(Tree::BackupKeys, &prefix(&parts), usize::MAX)?,
        };
        let base = keys_prefix(user, n).len();
        for (k, v) in entries {
            let rest = &k[base..];
            let Some(i) = rest.iter().position(|b| *b == 0xff) else { continue };
            let Ok(r) = RoomId::parse(&*String::from_utf8_lossy(&rest[..i])) else { continue };
            let s = String::from_utf8_lossy(&rest[i + 1..]).into_owned();
            let data = serde_json::from_slice(&v).map_err(|e| Error::Internal(format!("backup key: {e}")))?;
            out.entry(r).or_default().insert(s, data);
        }
        Ok(out)
    }

    /// `DELETE /room_keys/keys[...]`: delete sessions of a version. Returns (etag, count).
    pub async fn delete_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&RoomId>,
        session: Option<&str>,
    ) -> Result<(String, u64)> {
        let doomed = self.get_backup_keys(user, version, room, session)?;
        self.commit(Batch::new(), |b, _, _| {
            let (n, mut rec) = self.backup_version_record(user, version)?;
            let mut removed = 0u64;
            for (r, sessions) in &doomed {
                for s in sessions.keys() {
                    let k = key(&[user.as_bytes(), &n.to_be_bytes(), r.as_bytes(), s.as_bytes()]);
                    if self.store.get(Tree::BackupKeys, &k)?.is_some() {
                        b.delete(Tree::BackupKeys, k);
                        removed += 1;
                    }
                }
            }
            if removed > 0 {
                rec.count = rec.count.saturating_sub(removed);
                rec.etag += 1;
                b.put(Tree::BackupVersions, version_key(user, n), to_json(&rec));
            }
            Ok((rec.etag.to_string(), rec.count))
        })
        .await
    }
}
