//! This server's room directory, for other servers.

use axum::{extract::State, Json};
use ruma::api::federation::directory::{get_public_rooms, get_public_rooms_filtered};
use serde_json::Value;

use crate::api::{client::directory::page, error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `GET /_matrix/federation/v1/publicRooms`
pub async fn get_public_rooms_route(
    State(s): State<AppState>,
    body: Ruma<get_public_rooms::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    let limit = body.body.limit.map(|l| u64::from(l) as usize);
    Ok(Json(page(&s, limit, body.body.since.as_deref(), None)?))
}

/// # `POST /_matrix/federation/v1/publicRooms`
pub async fn get_public_rooms_filtered_route(
    State(s): State<AppState>,
    body: Ruma<get_public_rooms_filtered::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    let limit = body.body.limit.map(|l| u64::from(l) as usize);
    let term = body.body.filter.generic_search_term.as_deref();
    Ok(Json(page(&s, limit, body.body.since.as_deref(), term)?))
}
