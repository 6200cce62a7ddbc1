//! Receipts.

use axum::{extract::State, Json};
use ruma::api::client::receipt::create_receipt;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
///
/// `m.read`, `m.read.private` (visible to its owner only) and `m.fully_read`; `thread_id` is
/// `main` or a thread root. Receipts never move backwards.
pub async fn create_receipt_route(
    State(s): State<AppState>,
    body: Ruma<create_receipt::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    s.core.set_receipt(user, &req.room_id, req.receipt_type.as_str(), &req.event_id, req.thread.as_str()).await?;
    Ok(Json(json!({})))
}
