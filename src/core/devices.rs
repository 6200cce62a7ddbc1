//! Device management: listing, renaming, deleting devices (with everything that hangs off
//! them), and last-seen times.
//!
//! Creating devices and access tokens is in `users.rs` (login). Every change here that others can
//! observe (a rename shows in `/keys/query`, a deletion removes keys) marks the user's device
//! list as changed, so users sharing a room learn of it through `device_lists.changed`.

use ruma::{DeviceId, OwnedDeviceId, UserId};
use serde_json::{json, Value as JsonValue};

use super::{federation::edu::DeviceListEdu, to_json, u64_from, users::DeviceRecord, Core, Error, Result};
use crate::store::{key, Batch, Tree};

/// Last-seen times are written at most this often per device (each write is a flush).
pub const LAST_SEEN_GRANULARITY_MS: u64 = 60_000;

impl Core {
    fn last_seen_ms(&self, user: &UserId, device: &DeviceId, rec: &DeviceRecord) -> Result<u64> {
        let stored = match self.store.get(Tree::DeviceLastSeen, &key(&[user.as_bytes(), device.as_bytes()]))? {
            Some(v) => u64_from(&v)?,
            None => 0,
        };
        Ok(stored.max(rec.last_seen_ms))
    }

    fn device_json(&self, user: &UserId, device: &DeviceId, rec: &DeviceRecord) -> Result<JsonValue> {
        let mut d = json!({"device_id": device, "last_seen_ts": self.last_seen_ms(user, device, rec)?});
        if let Some(n) = &rec.display_name {
            d["display_name"] = json!(n);
        }
        Ok(d)
    }

    /// `/devices`: every device of `user` as the client API shows it.
    pub fn device_list(&self, user: &UserId) -> Result<Vec<JsonValue>> {
        self.devices(user)?.iter().map(|(d, rec)| self.device_json(user, d, rec)).collect()
    }

    /// One device record.
    pub fn device(&self, user: &UserId, device: &DeviceId) -> Result<Option<DeviceRecord>> {
        self.get_json(Tree::Devices, &key(&[user.as_bytes(), device.as_bytes()]))
    }

    /// `/devices/{deviceId}`: one device as the client API shows it.
    pub fn device_info(&self, user: &UserId, device: &DeviceId) -> Result<JsonValue> {
        let rec = self.device(user, device)?.ok_or_else(|| Error::NotFound("unknown device".into()))?;
        self.device_json(user, device, &rec)
    }

    /// Set (or, with `None`, keep) a device's display name. Marks the device list changed.
    pub async fn rename_device(&self, user: &UserId, device: &DeviceId, name: Option<String>) -> Result<()> {
        let Some(name) = name else {
            self.device_info(user, device)?;
            return Ok(());
        };
        let dk = key(&[user.as_bytes(), device.as_bytes()]);
        self.commit(Batch::new(), |b, pos, _| {
            // Read under the commit lock, so a concurrent login's token is not overwritten.
            let mut rec: DeviceRecord =
                self.get_json(Tree::Devices, &dk)?.ok_or_else(|| Error::NotFound("unknown device".into()))?;
            rec.display_name = Some(name);
            b.put(Tree::Devices, dk.clone(), to_json(&rec));
            let p = pos();
            self.stage_device_list_edus(b, user, &[DeviceListEdu::Device(device)], p)?;
            self.stage_device_list_change(b, user, p)
        })
        .await
    }

    /// Note that `device` was just used. Written at most every [`LAST_SEEN_GRANULARITY_MS`].
    pub async fn touch_device(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let k = key(&[user.as_bytes(), device.as_bytes()]);
        let now = self.now_ms();
        let last = match self.store.get(Tree::DeviceLastSeen, &k)? {
            Some(v) => u64_from(&v)?,
            None => 0,
        };
        if now.saturating_sub(last) < LAST_SEEN_GRANULARITY_MS {
            return Ok(());
        }
        let mut b = Batch::new();
        b.put(Tree::DeviceLastSeen, k, now.to_be_bytes().to_vec());
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Delete devices of `user` (unknown ids are skipped): their access tokens stop working and
    /// their keys, one-time keys, to-device inbox and last-seen record go. Marks the device list
    /// changed when anything was deleted. Returns how many devices were deleted.
    pub async fn remove_devices(&self, user: &UserId, devices: &[OwnedDeviceId]) -> Result<usize> {
        self.commit(Batch::new(), |b, pos, _| {
            let mut n = 0;
            let unique: std::collections::BTreeSet<&OwnedDeviceId> = devices.iter().collect();
            let mut removed = Vec::new();
            for d in unique {
                let dk = key(&[user.as_bytes(), d.as_bytes()]);
                let Some(rec): Option<DeviceRecord> = self.get_json(Tree::Devices, &dk)? else { continue };
                b.delete(Tree::Tokens, rec.access_token.as_bytes().to_vec());
                b.delete(Tree::Devices, dk.clone());
                b.delete(Tree::DeviceLastSeen, dk);
                self.stage_device_keys_removal(b, user, d)?;
                removed.push(DeviceListEdu::Device(d));
                n += 1;
            }
            if n > 0 {
                let p = pos();
                self.stage_device_list_edus(b, user, &removed, p)?;
                self.stage_device_list_change(b, user, p)?;
            }
            Ok(n)
        })
        .await
    }
}
