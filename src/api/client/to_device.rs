//! Send-to-device messaging. Delivery happens in `/sync` (`to_device.events`); the inbox logic
//! is in `core/e2ee.rs`.

use std::collections::BTreeMap;

use axum::{extract::State, Json};
use ruma::{api::client::to_device::send_event_to_device, to_device::DeviceIdOrAllDevices, OwnedUserId};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
///
/// Queues one message per addressed device (`*` = every device of the user). Idempotent per
/// (sending device, transaction id).
pub async fn send_event_to_device_route(
    State(s): State<AppState>,
    body: Ruma<send_event_to_device::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let mut messages: BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Value>> = BTreeMap::new();
    for (u, targets) in &req.messages {
        let mut per = BTreeMap::new();
        for (target, content) in targets {
            let content: Value =
                serde_json::from_str(content.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
            per.insert(target.clone(), content);
        }
        messages.insert(u.clone(), per);
    }
    s.core.send_to_device(user, device, &req.event_type.to_string(), req.txn_id.as_str(), messages).await?;
    Ok(Json(json!({})))
}
