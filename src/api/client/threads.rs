//! Thread roots of a room.

use axum::{extract::State, Json};
use ruma::api::client::threads::get_threads::{self, v1::IncludeThreads};
use serde_json::Value;

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::sync::parse_token;

/// # `GET /_matrix/client/v1/rooms/{roomId}/threads`
///
/// Most recently active threads first; `include=participated` keeps threads the caller
/// started or replied to.
pub async fn get_threads_route(
    State(s): State<AppState>,
    body: Ruma<get_threads::v1::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let r = &body.body;
    let from = r.from.as_deref().map(parse_token).transpose()?;
    let limit = r.limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX));
    let participated = r.include == IncludeThreads::Participated;
    Ok(Json(s.core.threads(user, device, &r.room_id, participated, from, limit)?))
}
