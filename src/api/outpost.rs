//! `/_outpost/v1`: local operator endpoints (access token required).

use axum::{
    extract::{Path, State},
    http::request::Parts,
    routing::get,
    Json, Router,
};
use ruma::EventId;
use serde_json::Value;

use super::{error::ApiResult, ruma_wrapper::access_token, AppState};
use crate::core::Error;

/// Add the routes.
pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/_outpost/v1/status", get(get_status_route)).route("/_outpost/v1/pdu/{event_id}", get(get_pdu_route))
}

fn auth(s: &AppState, parts: &Parts) -> Result<(ruma::OwnedUserId, ruma::OwnedDeviceId), Error> {
    let t = access_token(parts).ok_or(Error::MissingToken)?;
    s.core.authenticate(&t)
}

/// # `GET /_outpost/v1/status`
pub async fn get_status_route(State(s): State<AppState>, parts: Parts) -> ApiResult<Json<Value>> {
    auth(&s, &parts)?;
    Ok(Json(s.core.status()?))
}

/// # `GET /_outpost/v1/pdu/{eventId}`
///
/// The stored PDU exactly as it would be sent to a peer (signed federation format).
pub async fn get_pdu_route(
    State(s): State<AppState>,
    Path(event_id): Path<String>,
    parts: Parts,
) -> ApiResult<Json<Value>> {
    let (user, _) = auth(&s, &parts)?;
    let id = EventId::parse(event_id).map_err(|e| Error::InvalidParam(format!("invalid event id: {e}")))?;
    let stored = s.core.stored_pdu(&id)?.ok_or_else(|| Error::NotFound("event not found".into()))?;
    let pdu = s.core.pdu(&id)?.ok_or_else(|| Error::NotFound("event not found".into()))?;
    s.core.require_visible_room(&user, &pdu.room)?;
    if !s.core.can_see_event(&user, &pdu, &stored)? {
        return Err(Error::NotFound("event not found".into()).into());
    }
    let v: Value = serde_json::from_str(&stored.json).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Json(v))
}
