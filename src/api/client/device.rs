//! Device management. Deleting devices needs user-interactive auth with the password; the
//! logic is in `core/devices.rs`.

use axum::{extract::State, Json};
use ruma::api::client::device::{delete_device, delete_devices, get_device, get_devices, update_device};
use serde_json::{json, Value};

use super::uiaa::require_password;
use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};

/// # `GET /_matrix/client/v3/devices`
pub async fn get_devices_route(
    State(s): State<AppState>,
    body: Ruma<get_devices::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(json!({"devices": s.core.device_list(user)?})))
}

/// # `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get_device_route(
    State(s): State<AppState>,
    body: Ruma<get_device::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(s.core.device_info(user, &body.body.device_id)?))
}

/// # `PUT /_matrix/client/v3/devices/{deviceId}`
///
/// Renames a device (others see the new name in `/keys/query`).
pub async fn update_device_route(
    State(s): State<AppState>,
    body: Ruma<update_device::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.rename_device(user, &body.body.device_id, body.body.display_name.clone()).await?;
    Ok(Json(json!({})))
}

/// # `DELETE /_matrix/client/v3/devices/{deviceId}`
///
/// After the password stage: the device's token stops working and its keys, one-time keys and
/// to-device inbox are deleted. Deleting an unknown device succeeds (nothing to do).
pub async fn delete_device_route(
    State(s): State<AppState>,
    body: Ruma<delete_device::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    require_password(&s.core, user, body.body.auth.as_ref())?;
    s.core.remove_devices(user, std::slice::from_ref(&body.body.device_id)).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/delete_devices`
///
/// Like `DELETE /devices/{deviceId}` for several devices at once.
pub async fn delete_devices_route(
    State(s): State<AppState>,
    body: Ruma<delete_devices::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    require_password(&s.core, user, body.body.auth.as_ref())?;
    s.core.remove_devices(user, &body.body.devices).await?;
    Ok(Json(json!({})))
}
