//! Stored filters.

use axum::{extract::State, Json};
use ruma::api::client::filter::{create_filter, get_filter};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create_filter_route(
    State(s): State<AppState>,
    body: Ruma<create_filter::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if body.body.user_id != user {
        return Err(Error::Forbidden("you can only create filters for yourself".into()).into());
    }
    let id = s.core.create_filter(user, body.json.clone()).await?;
    Ok(Json(json!({"filter_id": id})))
}

/// # `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get_filter_route(
    State(s): State<AppState>,
    body: Ruma<get_filter::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if body.body.user_id != user {
        return Err(Error::Forbidden("you can only read your own filters".into()).into());
    }
    let f = s.core.filter(user, &body.body.filter_id)?.ok_or_else(|| Error::NotFound("no such filter".into()))?;
    Ok(Json(f))
}
