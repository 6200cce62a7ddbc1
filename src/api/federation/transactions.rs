//! Transactions and reading the room DAG.

use axum::{extract::State, Json};
use ruma::api::federation::{
    backfill::get_backfill,
    event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    transactions::send_transaction_message,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `PUT /_matrix/federation/v1/send/{txnId}`
pub async fn send_transaction_message_route(
    State(s): State<AppState>,
    body: Ruma<send_transaction_message::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?.to_owned();
    let req = body.body;
    if req.origin != origin {
        return Err(crate::core::Error::Forbidden("transaction origin is not the sender".into()).into());
    }
    let results = s.core.receive_transaction(&origin, req.transaction_id.as_str(), req.pdus, req.edus).await?;
    let pdus: serde_json::Map<String, Value> = results
        .into_iter()
        .map(|(id, r)| {
            (
                id.to_string(),
                match r {
                    Ok(()) => json!({}),
                    Err(e) => json!({"error": e}),
                },
            )
        })
        .collect();
    Ok(Json(json!({"pdus": pdus})))
}

/// # `GET /_matrix/federation/v1/event/{eventId}`
pub async fn get_event_route(State(s): State<AppState>, body: Ruma<get_event::v1::Request>) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let pdu = s.core.event_for_server(origin, &body.body.event_id)?;
    Ok(Json(json!({"origin": s.core.server_name(), "origin_server_ts": s.core.now_ms(), "pdus": [pdu]})))
}

/// # `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn get_missing_events_route(
    State(s): State<AppState>,
    body: Ruma<get_missing_events::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let r = &body.body;
    let events = s.core.missing_events_for_server(
        origin,
        &r.room_id,
        &r.earliest_events,
        &r.latest_events,
        u64::from(r.limit) as usize,
        u64::from(r.min_depth),
    )?;
    Ok(Json(json!({"events": events})))
}

/// # `GET /_matrix/federation/v1/backfill/{roomId}`
pub async fn get_backfill_route(
    State(s): State<AppState>,
    body: Ruma<get_backfill::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let r = &body.body;
    let pdus = s.core.backfill_for_server(origin, &r.room_id, &r.v, u64::from(r.limit) as usize)?;
    Ok(Json(json!({"origin": s.core.server_name(), "origin_server_ts": s.core.now_ms(), "pdus": pdus})))
}

/// # `GET /_matrix/federation/v1/state_ids/{roomId}`
pub async fn get_room_state_ids_route(
    State(s): State<AppState>,
    body: Ruma<get_room_state_ids::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let (pdu_ids, auth_chain_ids) = s.core.state_ids_for_server(origin, &body.body.room_id, &body.body.event_id)?;
    Ok(Json(json!({"pdu_ids": pdu_ids, "auth_chain_ids": auth_chain_ids})))
}

/// # `GET /_matrix/federation/v1/state/{roomId}`
pub async fn get_room_state_route(
    State(s): State<AppState>,
    body: Ruma<get_room_state::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let (pdus, auth_chain) = s.core.state_for_server(origin, &body.body.room_id, &body.body.event_id)?;
    Ok(Json(json!({"pdus": pdus, "auth_chain": auth_chain})))
}

/// # `POST /_matrix/federation/unstable/org.outpost.verdicts/{roomId}`
///
/// What this server made of some events (an outpost extension, see `core::federation::verdicts`).
pub async fn get_verdicts_route(
    State(s): State<AppState>,
    body: Ruma<crate::core::federation::verdicts::v1::Request>,
) -> ApiResult<Json<Value>> {
    let origin = body.origin()?;
    let verdicts = s.core.verdicts_for_server(origin, &body.body.room_id, &body.body.event_ids)?;
    Ok(Json(json!({ "verdicts": verdicts })))
}
