//! Redactions.

use axum::{extract::State, Json};
use ruma::{api::client::redact::redact_event, events::TimelineEventType};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{
    pdu::{rules_for, PduTemplate},
    Error,
};

/// # `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub async fn redact_event_route(
    State(s): State<AppState>,
    body: Ruma<redact_event::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let record = s.core.room(&req.room_id)?.ok_or_else(|| Error::Forbidden("you are not in this room".into()))?;
    let rules = rules_for(&record.version)?;
    let mut content = json!({});
    if let Some(r) = &req.reason {
        content["reason"] = json!(r);
    }
    if rules.redaction.content_field_redacts {
        content["redacts"] = json!(req.event_id);
    }
    let template = PduTemplate {
        kind: TimelineEventType::RoomRedaction,
        content,
        state_key: None,
        redacts: Some(req.event_id.clone()),
    };
    let id = s.core.send_event(user, Some(device), &req.room_id, template, Some(&req.txn_id)).await?;
    Ok(Json(json!({"event_id": id})))
}
