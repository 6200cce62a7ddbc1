//! The user directory.

use axum::{extract::State, Json};
use ruma::api::client::user_directory::search_users;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `POST /_matrix/client/v3/user_directory/search`
///
/// Users sharing a room with the caller or in public rooms, by display name or user id.
pub async fn search_users_route(
    State(s): State<AppState>,
    body: Ruma<search_users::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let limit = usize::try_from(u64::from(body.body.limit)).unwrap_or(usize::MAX);
    let (results, limited) = s.core.search_user_directory(user, &body.body.search_term, limit)?;
    Ok(Json(json!({"results": results, "limited": limited})))
}
