//! Room tags (stored as `m.tag` room account data).

use axum::{extract::State, Json};
use ruma::api::client::tag::{create_tag, delete_tag, get_tags};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

fn own(user: &ruma::UserId, path_user: &ruma::UserId) -> Result<(), Error> {
    if user == path_user {
        Ok(())
    } else {
        Err(Error::Forbidden("you can only access your own tags".into()))
    }
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub async fn get_tags_route(State(s): State<AppState>, body: Ruma<get_tags::v3::Request>) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    Ok(Json(json!({"tags": s.core.tags(user, &body.body.room_id)?})))
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn create_tag_route(
    State(s): State<AppState>,
    body: Ruma<create_tag::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    s.core.set_tag(user, &body.body.room_id, &body.body.tag, body.json.clone()).await?;
    Ok(Json(json!({})))
}

/// # `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn delete_tag_route(
    State(s): State<AppState>,
    body: Ruma<delete_tag::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    s.core.delete_tag(user, &body.body.room_id, &body.body.tag).await?;
    Ok(Json(json!({})))
}
