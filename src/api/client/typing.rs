//! Typing notifications.

use axum::{extract::State, Json};
use ruma::api::client::typing::create_typing_event::{self, v3::Typing};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
///
/// The timeout is clamped to `limits.typing_timeout_ms_max`.
pub async fn create_typing_event_route(
    State(s): State<AppState>,
    body: Ruma<create_typing_event::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if body.body.user_id != user {
        return Err(Error::Forbidden("you can only set your own typing state".into()).into());
    }
    let timeout = match body.body.state {
        Typing::Yes(info) => Some(u64::try_from(info.timeout.as_millis()).unwrap_or(u64::MAX)),
        Typing::No => None,
    };
    s.core.set_typing(user, &body.body.room_id, timeout).await?;
    Ok(Json(json!({})))
}
