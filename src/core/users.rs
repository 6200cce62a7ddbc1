//! Local users: accounts, passwords, devices and access tokens, profiles, account data, filters.

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use ruma::{events::TimelineEventType, DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as JsonValue};

use super::{pdu::PduTemplate, to_json, Core, Error, Result};
use crate::store::{key, prefix, Batch, Tree};

/// An account.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserRecord {
    /// Argon2 PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    /// Display name.
    pub displayname: Option<String>,
    /// Avatar `mxc://` URI.
    pub avatar_url: Option<String>,
    /// Creation time (ms).
    pub created_ms: u64,
    /// Whether the account is deactivated.
    #[serde(default)]
    pub deactivated: bool,
}

/// A device of a user.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Human-readable name.
    pub display_name: Option<String>,
    /// The device's current access token.
    pub access_token: String,
    /// Last activity (ms).
    pub last_seen_ms: u64,
}

/// A user's profile.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Profile {
    /// Display name.
    pub displayname: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
}

/// An account-data entry with the stream position of its last change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountDataEntry {
    /// Stream position of the last change.
    pub pos: u64,
    /// The content.
    pub content: JsonValue,
}

const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Localparts allowed by the spec's user-ID grammar (lowercase historical set, we are strict).
pub fn valid_localpart(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 200
        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
}

impl Core {
    /// The full user id for a localpart on this server.
    pub fn user_id(&self, localpart: &str) -> Result<OwnedUserId> {
        UserId::parse(format!("@{localpart}:{}", self.server_name()))
            .map_err(|e| Error::InvalidUsername(format!("invalid user id: {e}")))
    }

    /// The account record.
    pub fn user(&self, user: &UserId) -> Result<Option<UserRecord>> {
        self.get_json(Tree::Users, user.as_bytes())
    }

    /// Whether `localpart` is free for registration.
    pub fn username_available(&self, localpart: &str) -> Result<bool> {
        if !valid_localpart(localpart) {
            return Err(Error::InvalidUsername("user names may contain only a-z, 0-9, and ._=-/+".into()));
        }
        Ok(self.user(&self.user_id(localpart)?)?.is_none())
    }

    /// Create an account. The password is hashed with Argon2id.
    pub async fn register(&self, localpart: &str, password: Option<&str>) -> Result<OwnedUserId> {
        if !self.username_available(localpart)? {
            return Err(Error::UserInUse);
        }
        let user = self.user_id(localpart)?;
        let password_hash = match password {
            Some(p) => Some(hash_password(p, self.random())?),
            None => None,
        };
        let rec = UserRecord { password_hash, created_ms: self.now_ms(), ..Default::default() };
        let mut b = Batch::new();
        b.put(Tree::Users, user.as_bytes().to_vec(), to_json(&rec));
        self.commit(b, |_, _, _| Ok(())).await?;
        Ok(user)
    }

    /// Check a password; `Forbidden` when wrong or unknown.
    pub fn check_password(&self, user: &UserId, password: &str) -> Result<()> {
        let rec = self.user(user)?.ok_or_else(|| Error::Forbidden("invalid username or password".into()))?;
        if rec.deactivated {
            return Err(Error::Forbidden("this account is deactivated".into()));
        }
        let hash = rec.password_hash.ok_or_else(|| Error::Forbidden("invalid username or password".into()))?;
        let parsed = PasswordHash::new(&hash).map_err(|e| Error::Internal(e.to_string()))?;
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .map_err(|_| Error::Forbidden("invalid username or password".into()))
    }

    /// Create (or replace the token of) a device and return its access token.
    pub async fn create_device(
        &self,
        user: &UserId,
        device: Option<&DeviceId>,
        display_name: Option<String>,
    ) -> Result<(OwnedDeviceId, String)> {
        let device: OwnedDeviceId = match device {
            Some(d) => d.to_owned(),
            None => OwnedDeviceId::from(self.random_chars(ALPHANUMERIC, 10).to_uppercase()),
        };
        let token = format!("opt_{}", self.random_chars(ALPHANUMERIC, 32));
        let dk = key(&[user.as_bytes(), device.as_bytes()]);
        let mut b = Batch::new();
        let existing: Option<DeviceRecord> = self.get_json(Tree::Devices, &dk)?;
        let is_new = existing.is_none();
        let mut rec = existing.unwrap_or_default();
        if !rec.access_token.is_empty() {
            b.delete(Tree::Tokens, rec.access_token.as_bytes().to_vec());
        }
        rec.access_token = token.clone();
        rec.last_seen_ms = self.now_ms();
        if display_name.is_some() {
            rec.display_name = display_name;
        }
        b.put(Tree::Devices, dk, to_json(&rec));
        b.put(Tree::Tokens, token.as_bytes().to_vec(), to_json(&(user, &device)));
        // A new device is a device-list change others must hear about (e2ee.rs).
        self.commit(b, |b, pos, _| {
            if !is_new {
                return Ok(());
            }
            let p = pos();
            self.stage_device_list_edus(b, user, &[super::federation::edu::DeviceListEdu::Device(&device)], p)?;
            self.stage_device_list_change(b, user, p)
        })
        .await?;
        Ok((device, token))
    }

    /// The user and device an access token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<(OwnedUserId, OwnedDeviceId)> {
        self.get_json(Tree::Tokens, token.as_bytes())?.ok_or(Error::UnknownToken)
    }

    /// Devices of a user.
    pub fn devices(&self, user: &UserId) -> Result<Vec<(OwnedDeviceId, DeviceRecord)>> {
        let p = prefix(&[user.as_bytes()]);
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(Tree::Devices, &p, usize::MAX)? {
            let d = OwnedDeviceId::from(String::from_utf8_lossy(&k[p.len()..]).into_owned());
            let rec = serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?;
            out.push((d, rec));
        }
        Ok(out)
    }

    /// Delete a device (logout): its token stops working, its keys, one-time keys and
    /// to-device inbox are deleted (see `devices.rs`).
    pub async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        match self.remove_devices(user, &[device.to_owned()]).await? {
            0 => Err(Error::NotFound("unknown device".into())),
            _ => Ok(()),
        }
    }

    /// Delete every device of a user (logout/all).
    pub async fn delete_all_devices(&self, user: &UserId) -> Result<()> {
        let all: Vec<OwnedDeviceId> = self.devices(user)?.into_iter().map(|(d, _)| d).collect();
        self.remove_devices(user, &all).await.map(|_| ())
    }

    /// A user's profile (local users only; empty for unknown ones).
    pub fn profile(&self, user: &UserId) -> Result<Profile> {
        Ok(self
            .user(user)?
            .map(|u| Profile { displayname: u.displayname, avatar_url: u.avatar_url })
            .unwrap_or_default())
    }

    /// Change the display name and/or avatar, and announce it with a new member event in every
    /// joined room.
    pub async fn set_profile(
        &self,
        user: &UserId,
        displayname: Option<Option<String>>,
        avatar_url: Option<Option<String>>,
    ) -> Result<()> {
        let mut rec = self.user(user)?.ok_or_else(|| Error::NotFound("unknown user".into()))?;
        if let Some(d) = displayname {
            rec.displayname = d;
        }
        if let Some(a) = avatar_url {
            rec.avatar_url = a;
        }
        let mut b = Batch::new();
        b.put(Tree::Users, user.as_bytes().to_vec(), to_json(&rec));
        self.commit(b, |_, _, _| Ok(())).await?;
        for (room, ur) in self.user_rooms(user)? {
            if ur.membership != "join" {
                continue;
            }
            let mut content = self
                .state_event(&room, "m.room.member", user.as_str())?
                .map(|p| p.content_value())
                .unwrap_or_else(|| json!({"membership": "join"}));
            content["displayname"] = rec.displayname.clone().map(JsonValue::String).unwrap_or(JsonValue::Null);
            content["avatar_url"] = rec.avatar_url.clone().map(JsonValue::String).unwrap_or(JsonValue::Null);
            if let Some(o) = content.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            let t = PduTemplate {
                kind: TimelineEventType::RoomMember,
                content,
                state_key: Some(user.to_string()),
                redacts: None,
            };
            // A room where the update is refused (e.g. power levels) keeps the old profile.
            if let Err(e) = self.send_event(user, None, &room, t, None).await {
                tracing::warn!(%room, error = %e, "profile update not sent to room");
            }
        }
        Ok(())
    }

    /// Set an account-data entry (global when `room` is `None`).
    pub async fn set_account_data(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
        content: JsonValue,
    ) -> Result<()> {
        let k = key(&[user.as_bytes(), room.map(|r| r.as_bytes()).unwrap_or(b""), kind.as_bytes()]);
        self.commit(Batch::new(), |b, pos, _| {
            b.put(Tree::AccountData, k, to_json(&AccountDataEntry { pos: pos(), content }));
            Ok(())
        })
        .await?;
        if kind == super::push::PUSH_RULES {
            self.unread_memo.invalidate();
        }
        Ok(())
    }

    /// One account-data entry.
    pub fn account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str) -> Result<Option<AccountDataEntry>> {
        let k = key(&[user.as_bytes(), room.map(|r| r.as_bytes()).unwrap_or(b""), kind.as_bytes()]);
        self.get_json(Tree::AccountData, &k)
    }

    /// Account-data entries of a scope (global or one room) changed after `since`.
    pub fn account_data_since(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        since: u64,
    ) -> Result<Vec<(String, AccountDataEntry)>> {
        let p = prefix(&[user.as_bytes(), room.map(|r| r.as_bytes()).unwrap_or(b"")]);
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(Tree::AccountData, &p, usize::MAX)? {
            let rest = &k[p.len()..];
            if rest.contains(&0xff) {
                continue; // a room-scoped entry under the global prefix
            }
            let e: AccountDataEntry = serde_json::from_slice(&v).map_err(|e| Error::Internal(e.to_string()))?;
            if e.pos > since {
                out.push((String::from_utf8_lossy(rest).into_owned(), e));
            }
        }
        Ok(out)
    }

    /// Store a filter and return its id.
    pub async fn create_filter(&self, user: &UserId, filter: JsonValue) -> Result<String> {
        let id = self.random_chars(ALPHANUMERIC, 12);
        let mut b = Batch::new();
        b.put(Tree::Filters, key(&[user.as_bytes(), id.as_bytes()]), to_json(&filter));
        self.commit(b, |_, _, _| Ok(())).await?;
        Ok(id)
    }

    /// A stored filter.
    pub fn filter(&self, user: &UserId, id: &str) -> Result<Option<JsonValue>> {
        self.get_json(Tree::Filters, &key(&[user.as_bytes(), id.as_bytes()]))
    }
}

fn hash_password(p: &str, salt: [u8; 16]) -> Result<String> {
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(p.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("password hashing failed: {e}")))
}
