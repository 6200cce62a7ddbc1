//! Presence: `PUT/GET /presence/{userId}/status`. The state is stored per local user; it is not
//! broadcast (sync's `presence.events` stays empty), which saves every device the traffic and
//! wake-ups that presence costs. Clients that show presence see everyone as last set here.

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as JsonValue};

use super::{to_json, Core, Error, Result};
use crate::store::{Batch, Tree};

/// Longest status message accepted (bytes).
pub const STATUS_MSG_BYTES_MAX: usize = 1024;

/// A user's presence as they last set it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// `online`, `offline` or `unavailable`.
    pub presence: String,
    /// The status message.
    pub status_msg: Option<String>,
    /// When it was set (ms).
    pub last_active_ms: u64,
}

impl Core {
    /// Set the presence of `user`.
    pub async fn set_presence(&self, user: &UserId, presence: &str, status_msg: Option<String>) -> Result<()> {
        if !matches!(presence, "online" | "offline" | "unavailable") {
            return Err(Error::InvalidParam(format!("unknown presence {presence}")));
        }
        if status_msg.as_ref().is_some_and(|m| m.len() > STATUS_MSG_BYTES_MAX) {
            return Err(Error::InvalidParam(format!("status_msg is at most {STATUS_MSG_BYTES_MAX} bytes")));
        }
        let rec = PresenceRecord { presence: presence.to_owned(), status_msg, last_active_ms: self.now_ms() };
        let mut b = Batch::new();
        b.put(Tree::Presence, user.as_bytes().to_vec(), to_json(&rec));
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// The presence of `user` in the client format (`offline` if never set).
    pub fn presence(&self, user: &UserId) -> Result<JsonValue> {
        if user.server_name() == self.server_name() && self.user(user)?.is_none() {
            return Err(Error::NotFound("unknown user".into()));
        }
        let Some(rec): Option<PresenceRecord> = self.get_json(Tree::Presence, user.as_bytes())? else {
            return Ok(json!({"presence": "offline"}));
        };
        let mut out = json!({
            "presence": rec.presence,
            "last_active_ago": self.now_ms().saturating_sub(rec.last_active_ms),
            "currently_active": rec.presence == "online",
        });
        if let Some(m) = rec.status_msg {
            out["status_msg"] = json!(m);
        }
        Ok(out)
    }
}
