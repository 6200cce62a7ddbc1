//! Sending and paginating room events.

use axum::{extract::State, Json};
use ruma::{
    api::{
        client::message::{get_message_events, send_message_event},
        Direction as RumaDir,
    },
    events::TimelineEventType,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{
    pdu::PduTemplate,
    sync::{parse_token, Direction},
    Error,
};

/// # `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
///
/// Idempotent per (device, transaction id): a retry returns the first event's id.
pub async fn send_message_event_route(
    State(s): State<AppState>,
    body: Ruma<send_message_event::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let content: Value = serde_json::from_str(req.body.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
    let template = PduTemplate {
        kind: TimelineEventType::from(req.event_type.to_string()),
        content,
        state_key: None,
        redacts: None,
    };
    let id = s.core.send_event(user, Some(device), &req.room_id, template, Some(&req.txn_id)).await?;
    Ok(Json(json!({"event_id": id})))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub async fn get_message_events_route(
    State(s): State<AppState>,
    body: Ruma<get_message_events::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let from = req.from.as_deref().map(parse_token).transpose()?;
    let to = req.to.as_deref().map(parse_token).transpose()?;
    let dir = match req.dir {
        RumaDir::Backward => Direction::Backward,
        RumaDir::Forward => Direction::Forward,
    };
    let page =
        s.core.messages(user, device, &req.room_id, from, to, dir, u64::from(req.limit) as usize, &req.filter)?;
    let mut out = json!({"start": page.start, "chunk": page.chunk, "state": page.state});
    if let Some(end) = page.end {
        out["end"] = json!(end);
    }
    Ok(Json(out))
}
