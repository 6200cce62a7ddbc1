//! Rooms: create, fetch one event, event context.

use axum::{extract::State, Json};
use ruma::api::client::{
    context::get_context,
    room::{create_room, get_room_event},
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{rooms::CreateRoomSpec, Error};

fn object(v: Option<&Value>) -> Option<serde_json::Map<String, Value>> {
    v.and_then(|v| v.as_object()).cloned()
}

/// # `POST /_matrix/client/v3/createRoom`
pub async fn create_room_route(
    State(s): State<AppState>,
    body: Ruma<create_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    let mut initial_state = Vec::new();
    for raw in &req.initial_state {
        let v: Value = serde_json::from_str(raw.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadJson("initial_state event without type".into()))?;
        let key = v.get("state_key").and_then(Value::as_str).unwrap_or("");
        let content = v.get("content").cloned().unwrap_or_else(|| json!({}));
        initial_state.push((kind.to_owned(), key.to_owned(), content));
    }
    let preset = req.preset.as_ref().map(|p| p.as_str().to_owned());
    let spec = CreateRoomSpec {
        version: req.room_version.clone(),
        preset,
        visibility_public: req.visibility == ruma::api::client::room::Visibility::Public,
        name: req.name.clone(),
        topic: req.topic.clone(),
        alias_localpart: req.room_alias_name.clone(),
        invite: req.invite.clone(),
        is_direct: req.is_direct,
        creation_content: object(body.json.get("creation_content")),
        initial_state,
        power_level_content_override: object(body.json.get("power_level_content_override")),
    };
    let room_id = s.core.create_room(user, spec).await?;
    Ok(Json(json!({"room_id": room_id})))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub async fn get_room_event_route(
    State(s): State<AppState>,
    body: Ruma<get_room_event::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    Ok(Json(s.core.event_for_user(user, device, &body.body.room_id, &body.body.event_id)?))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub async fn get_context_route(
    State(s): State<AppState>,
    body: Ruma<get_context::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let limit = u64::from(body.body.limit) as usize;
    Ok(Json(s.core.context(user, device, &body.body.room_id, &body.body.event_id, limit, &body.body.filter)?))
}
