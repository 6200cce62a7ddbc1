//! Third-party networks (bridges). A node has no application services, so no protocols.

use axum::Json;
use ruma::api::client::thirdparty::get_protocols;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma};

/// # `GET /_matrix/client/v3/thirdparty/protocols`
///
/// Element asks at start-up; the honest answer is "none".
pub async fn get_protocols_route(body: Ruma<get_protocols::v3::Request>) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(json!({})))
}
