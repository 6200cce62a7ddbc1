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
    r.route("/_outpost/v1/status", get(get_status_route))
        .route("/_outpost/v1/peers", get(get_peers_route))
        .route("/_outpost/v1/pdu/{event_id}", get(get_pdu_route))
}

fn auth(s: &AppState, parts: &Parts) -> Result<(ruma::OwnedUserId, ruma::OwnedDeviceId), Error> {
    let t = access_token(parts).ok_or(Error::MissingToken)?;
    s.core.authenticate(&t)
}

/// A user's token, or the operator token from the data directory (`outpost status/peers`).
fn operator_or_user(s: &AppState, parts: &Parts) -> Result<(), Error> {
    let t = access_token(parts).ok_or(Error::MissingToken)?;
    if s.core.is_operator_token(&t) {
        return Ok(());
    }
    s.core.authenticate(&t).map(|_| ())
}

/// # `GET /_outpost/v1/peers`
///
/// Every peer the mesh knows or the federation queue holds: peer id, server name, addresses,
/// connection state, round trip, queue depth and delivery state.
pub async fn get_peers_route(State(s): State<AppState>, parts: Parts) -> ApiResult<Json<Value>> {
    operator_or_user(&s, &parts)?;
    let mut out: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
    if let Some(table) = s.mesh_peers.get() {
        let peers: Vec<_> = table.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for p in peers {
            let v = serde_json::to_value(&p).map_err(|e| Error::Internal(e.to_string()))?;
            out.insert(p.server_name.clone(), v);
        }
    }
    for (dest, st, depth) in s.core.destinations()? {
        let e = out
            .entry(dest.to_string())
            .or_insert_with(|| serde_json::json!({"server_name": dest, "connected": false, "addresses": []}));
        e["queue_depth"] = serde_json::json!(depth);
        e["edu_queue_depth"] = serde_json::json!(s.core.edu_queue_depth(&dest)?);
        e["delivery_failures"] = serde_json::json!(st.failures);
        e["retry_at_ms"] = serde_json::json!(st.retry_at_ms);
        e["last_delivery_ms"] = serde_json::json!(st.last_ok_ms);
    }
    for v in out.values_mut() {
        if v.get("queue_depth").is_none() {
            v["queue_depth"] = serde_json::json!(0);
        }
    }
    Ok(Json(serde_json::json!({"peers": out.into_values().collect::<Vec<_>>()})))
}

/// # `GET /_outpost/v1/status`
pub async fn get_status_route(State(s): State<AppState>, parts: Parts) -> ApiResult<Json<Value>> {
    operator_or_user(&s, &parts)?;
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
