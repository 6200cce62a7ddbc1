//! VoIP: TURN server credentials and MatrixRTC transports. A node has neither yet (its own
//! STUN/TURN comes with calls), and says so in the form clients expect.

use axum::{extract::State, http::request::Parts, Json, Router};
use ruma::api::client::voip::get_turn_server_info;
use serde_json::{json, Value};

use crate::api::{
    error::ApiResult,
    ruma_wrapper::{access_token, Ruma},
    AppState,
};
use crate::{core::Error, ruma_route};

/// Add the VoIP routes to `r`.
pub fn routes(r: Router<AppState>) -> Router<AppState> {
    let r = ruma_route!(r, get_turn_server_info::v3::Request, get_turn_server_info_route);
    // MSC4143 has no ruma type yet; matrix-js-sdk probes the unstable path at start-up.
    r.route("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", axum::routing::get(get_rtc_transports_route))
        .route("/_matrix/client/v1/rtc/transports", axum::routing::get(get_rtc_transports_route))
}

/// # `GET /_matrix/client/v3/voip/turnServer`
///
/// No TURN server yet, so an empty object, as Synapse answers without `turn_uris`; clients
/// then use host candidates only. matrix-js-sdk asks at start-up whenever WebRTC is available.
pub async fn get_turn_server_info_route(body: Ruma<get_turn_server_info::v3::Request>) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v1/rtc/transports` (MSC4143, also under `unstable/org.matrix.msc4143`)
///
/// No MatrixRTC focus (SFU) is configured: an empty list.
pub async fn get_rtc_transports_route(State(s): State<AppState>, parts: Parts) -> ApiResult<Json<Value>> {
    let token = access_token(&parts).ok_or(Error::MissingToken)?;
    s.core.authenticate(&token)?;
    Ok(Json(json!({"rtc_transports": []})))
}
