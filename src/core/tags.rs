//! Room tags: stored as the `m.tag` room account data (`{"tags": {tag: {order}}}`), so they
//! reach every client through `/sync` like any other account data.

use ruma::{RoomId, UserId};
use serde_json::{json, Map, Value as JsonValue};

use super::{Core, Error, Result};

/// Longest tag name accepted (bytes).
pub const TAG_BYTES_MAX: usize = 255;

impl Core {
    /// The tags of `room` for `user` (`{tag: {order}}`).
    pub fn tags(&self, user: &UserId, room: &RoomId) -> Result<Map<String, JsonValue>> {
        Ok(self
            .account_data(user, Some(room), "m.tag")?
            .and_then(|e| e.content.get("tags").and_then(JsonValue::as_object).cloned())
            .unwrap_or_default())
    }

    /// Add or replace a tag. `info` is the tag's JSON object (`order`, a number in [0, 1]).
    pub async fn set_tag(&self, user: &UserId, room: &RoomId, tag: &str, info: JsonValue) -> Result<()> {
        if tag.is_empty() || tag.len() > TAG_BYTES_MAX {
            return Err(Error::InvalidParam(format!("a tag is 1 to {TAG_BYTES_MAX} bytes")));
        }
        if !info.is_object() {
            return Err(Error::BadJson("tag info must be an object".into()));
        }
        if info.get("order").is_some_and(|o| !o.is_number()) {
            return Err(Error::BadJson("tag order must be a number".into()));
        }
        let _guard = self.user_data_lock.lock().await;
        let mut tags = self.tags(user, room)?;
        tags.insert(tag.to_owned(), info);
        self.set_account_data(user, Some(room), "m.tag", json!({"tags": tags})).await
    }

    /// Remove a tag (removing an absent tag is not an error, as in Synapse).
    pub async fn delete_tag(&self, user: &UserId, room: &RoomId, tag: &str) -> Result<()> {
        let _guard = self.user_data_lock.lock().await;
        let mut tags = self.tags(user, room)?;
        if tags.remove(tag).is_none() {
            return Ok(());
        }
        self.set_account_data(user, Some(room), "m.tag", json!({"tags": tags})).await
    }
}
