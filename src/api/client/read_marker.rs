//! Read markers.

use axum::{extract::State, Json};
use ruma::api::client::read_marker::set_read_marker;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
///
/// `m.fully_read` becomes room account data; `m.read` / `m.read.private` become receipts.
pub async fn set_read_marker_route(
    State(s): State<AppState>,
    body: Ruma<set_read_marker::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    s.core
        .set_read_markers(
            user,
            &req.room_id,
            req.fully_read.as_deref(),
            req.read_receipt.as_deref(),
            req.private_read_receipt.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}
