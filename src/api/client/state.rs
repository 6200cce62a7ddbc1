//! Room state: read all, read one, set one.

use axum::{extract::State, Json};
use ruma::{
    api::client::state::{get_state_event_for_key, get_state_events, send_state_event},
    events::TimelineEventType,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{pdu::PduTemplate, Error};

/// # `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn get_state_events_route(
    State(s): State<AppState>,
    body: Ruma<get_state_events::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let room = &body.body.room_id;
    let state = visible_state(&s, user, room)?;
    let mut out = Vec::new();
    for id in state.values() {
        if let (Some(p), Some(st)) = (s.core.pdu(id)?, s.core.stored_pdu(id)?) {
            out.push(s.core.client_event_for(Some((user, device)), &p, &st, true)?);
        }
    }
    Ok(Json(Value::Array(out)))
}

/// The state a user may read: the current state while joined, else the state when they left.
fn visible_state(
    s: &AppState,
    user: &ruma::UserId,
    room: &ruma::RoomId,
) -> Result<std::sync::Arc<crate::core::state::StateMap>, Error> {
    if s.core.room(room)?.is_none() {
        return Err(Error::Forbidden("you are not in this room".into()));
    }
    match s.core.membership(room, user)?.as_deref() {
        Some("join") => s.core.current_state(room),
        Some("leave") | Some("ban") => {
            let ur = s.core.user_rooms(user)?.into_iter().find(|(r, _)| r == room).map(|(_, ur)| ur);
            match ur.and_then(|ur| s.core.stored_pdu(&ur.event_id).ok().flatten()) {
                Some(st) => s.core.state_of_group(st.state_before),
                None => Err(Error::Forbidden("you are not in this room".into())),
            }
        }
        _ => {
            s.core.require_visible_room(user, room)?;
            s.core.current_state(room)
        }
    }
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn get_state_event_for_key_route(
    State(s): State<AppState>,
    body: Ruma<get_state_event_for_key::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let state = visible_state(&s, user, &req.room_id)?;
    let id = state
        .get(&(req.event_type.to_string(), req.state_key.clone()))
        .ok_or_else(|| Error::NotFound("no such state event".into()))?;
    let p = s.core.pdu(id)?.ok_or_else(|| Error::NotFound("no such state event".into()))?;
    let format_event = body.json.get("format").is_some()
        || matches!(body.body.format, get_state_event_for_key::v3::StateEventFormat::Event);
    if format_event {
        let st = s.core.stored_pdu(id)?.ok_or_else(|| Error::NotFound("no such state event".into()))?;
        return Ok(Json(s.core.client_event_for(Some((user, device)), &p, &st, true)?));
    }
    Ok(Json(p.content_value()))
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn send_state_event_route(
    State(s): State<AppState>,
    body: Ruma<send_state_event::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let content: Value = serde_json::from_str(req.body.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
    let template = PduTemplate {
        kind: TimelineEventType::from(req.event_type.to_string()),
        content,
        state_key: Some(req.state_key.clone()),
        redacts: None,
    };
    let id = s.core.send_event(user, Some(device), &req.room_id, template, None).await?;
    Ok(Json(json!({"event_id": id})))
}
