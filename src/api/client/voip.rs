//! VoIP: TURN server credentials.

use axum::Json;
use ruma::api::client::voip::get_turn_server_info;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma};

/// # `GET /_matrix/client/v3/voip/turnServer`
///
/// No TURN server yet (the node's own STUN/TURN comes with calls), so an empty object, as
/// Synapse answers without `turn_uris`; clients then use host candidates only. matrix-js-sdk
/// asks at start-up whenever WebRTC is available.
pub async fn get_turn_server_info_route(body: Ruma<get_turn_server_info::v3::Request>) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(json!({})))
}
