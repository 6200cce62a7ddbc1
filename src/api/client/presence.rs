//! Presence (stored, not broadcast: see `core::presence`).

use axum::{extract::State, Json};
use ruma::api::client::presence::{get_presence, set_presence};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `PUT /_matrix/client/v3/presence/{userId}/status`
pub async fn set_presence_route(
    State(s): State<AppState>,
    body: Ruma<set_presence::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if body.body.user_id != user {
        return Err(Error::Forbidden("you can only set your own presence".into()).into());
    }
    s.core.set_presence(user, body.body.presence.as_str(), body.body.status_msg.clone()).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/presence/{userId}/status`
pub async fn get_presence_route(
    State(s): State<AppState>,
    body: Ruma<get_presence::v3::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(s.core.presence(&body.body.user_id)?))
}
