//! End-to-end encryption keys of this server's users, for other servers (the logic is in
//! `core/federation/keys.rs`).

use std::collections::BTreeMap;

use axum::{extract::State, Json};
use ruma::{
    api::federation::{
        device::get_devices,
        keys::{claim_keys, get_keys},
    },
    OwnedDeviceId, OwnedUserId,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `GET /_matrix/federation/v1/user/devices/{userId}`
pub async fn get_devices_route(
    State(s): State<AppState>,
    body: Ruma<get_devices::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    Ok(Json(s.core.devices_for_server(&body.body.user_id)?))
}

/// # `POST /_matrix/federation/v1/user/keys/query`
pub async fn get_keys_route(State(s): State<AppState>, body: Ruma<get_keys::v1::Request>) -> ApiResult<Json<Value>> {
    body.origin()?;
    Ok(Json(s.core.query_keys_for_server(&body.body.device_keys)?))
}

/// # `POST /_matrix/federation/v1/user/keys/claim`
///
/// One one-time key (or the fallback key) per requested device of this server's users.
pub async fn claim_keys_route(
    State(s): State<AppState>,
    body: Ruma<claim_keys::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    let me = s.core.server_name();
    let claims: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>> = body
        .body
        .one_time_keys
        .iter()
        .filter(|(u, _)| u.server_name() == me)
        .map(|(u, ds)| (u.clone(), ds.iter().map(|(d, a)| (d.clone(), a.to_string())).collect()))
        .collect();
    let claimed = s.core.claim_keys(&claims).await?;
    Ok(Json(json!({"one_time_keys": claimed})))
}
