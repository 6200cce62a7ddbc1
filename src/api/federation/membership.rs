//! Joins and invites across servers.

use axum::{extract::State, Json};
use ruma::api::federation::membership::{
    create_invite, create_join_event, create_leave_event, prepare_join_event, prepare_leave_event,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
pub async fn prepare_join_event_route(
    State(s): State<AppState>,
    body: Ruma<prepare_join_event::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let r = &body.body;
    let (version, event) = s.core.make_join_template(origin, &r.room_id, &r.user_id, &r.ver)?;
    Ok(Json(json!({"room_version": version, "event": event})))
}

/// # `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
pub async fn create_join_event_route(
    State(s): State<AppState>,
    body: Ruma<create_join_event::v2::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?.to_owned();
    let r = &body.body;
    let state = s.core.receive_send_join(&origin, &r.room_id, &r.event_id, &r.pdu).await?;
    Ok(Json(serde_json::to_value(&state).map_err(|e| crate::core::Error::Internal(e.to_string()))?))
}

/// # `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
pub async fn prepare_leave_event_route(
    State(s): State<AppState>,
    body: Ruma<prepare_leave_event::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let r = &body.body;
    let (version, event) = s.core.make_leave_template(origin, &r.room_id, &r.user_id)?;
    Ok(Json(json!({"room_version": version, "event": event})))
}

/// # `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
pub async fn create_leave_event_route(
    State(s): State<AppState>,
    body: Ruma<create_leave_event::v2::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?.to_owned();
    let r = &body.body;
    s.core.receive_send_leave(&origin, &r.room_id, &r.event_id, &r.pdu).await?;
    Ok(Json(json!({})))
}

/// # `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
pub async fn create_invite_route(
    State(s): State<AppState>,
    body: Ruma<create_invite::v2::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?.to_owned();
    let r = &body.body;
    let event = s.core.receive_invite(&origin, &r.room_id, &r.room_version, &r.event, &r.invite_room_state).await?;
    Ok(Json(json!({"event": event})))
}
