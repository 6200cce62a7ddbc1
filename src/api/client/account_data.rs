//! Global and per-room account data.

use axum::{extract::State, Json};
use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

fn own(user: &ruma::UserId, path_user: &ruma::UserId) -> Result<(), Error> {
    if user == path_user {
        Ok(())
    } else {
        Err(Error::Forbidden("you can only access your own account data".into()))
    }
}

/// # `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn set_global_account_data_route(
    State(s): State<AppState>,
    body: Ruma<set_global_account_data::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    s.core.set_account_data(user, None, &body.body.event_type.to_string(), body.json.clone()).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_global_account_data_route(
    State(s): State<AppState>,
    body: Ruma<get_global_account_data::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    let e = s.core.account_data(user, None, &body.body.event_type.to_string())?;
    Ok(Json(e.ok_or_else(|| Error::NotFound("account data not found".into()))?.content))
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn set_room_account_data_route(
    State(s): State<AppState>,
    body: Ruma<set_room_account_data::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    s.core
        .set_account_data(user, Some(&body.body.room_id), &body.body.event_type.to_string(), body.json.clone())
        .await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room_account_data_route(
    State(s): State<AppState>,
    body: Ruma<get_room_account_data::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    own(user, &body.body.user_id)?;
    let e = s.core.account_data(user, Some(&body.body.room_id), &body.body.event_type.to_string())?;
    Ok(Json(e.ok_or_else(|| Error::NotFound("account data not found".into()))?.content))
}
