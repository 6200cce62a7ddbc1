//! Server discovery: versions and capabilities.

use axum::{extract::State, Json};
use ruma::api::client::discovery::{get_capabilities, get_supported_versions};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::pdu::{DEFAULT_ROOM_VERSION, SUPPORTED_ROOM_VERSIONS};

/// # `GET /_matrix/client/versions`
pub async fn get_supported_versions_route(_body: Ruma<get_supported_versions::Request>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({
        "versions": ["r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6",
                     "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12"],
        "unstable_features": {},
        "server": {"name": "outpost", "version": env!("CARGO_PKG_VERSION")},
    })))
}

/// # `GET /_matrix/client/v3/capabilities`
pub async fn get_capabilities_route(
    State(_s): State<AppState>,
    _body: Ruma<get_capabilities::v3::Request>,
) -> ApiResult<Json<Value>> {
    let available: serde_json::Map<String, Value> =
        SUPPORTED_ROOM_VERSIONS.iter().map(|v| (v.to_string(), json!("stable"))).collect();
    Ok(Json(json!({
        "capabilities": {
            "m.room_versions": {"default": DEFAULT_ROOM_VERSION.to_string(), "available": available},
            "m.change_password": {"enabled": false},
            "m.set_displayname": {"enabled": true},
            "m.set_avatar_url": {"enabled": true},
            "m.3pid_changes": {"enabled": false},
            "m.get_login_token": {"enabled": false},
        }
    })))
}

/// # `GET /.well-known/matrix/client`
///
/// Points clients at the address they reached us on: a node serves its clients itself, with
/// no reverse proxy or other host in front (plain HTTP, on loopback by default).
pub async fn discover_homeserver_route(
    headers: axum::http::HeaderMap,
    _body: Ruma<ruma::api::client::discovery::discover_homeserver::Request>,
) -> ApiResult<Json<Value>> {
    let host = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok());
    let host = host.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@'));
    let Some(host) = host else {
        return Err(crate::core::Error::NotFound("no Host header to derive the base URL from".into()).into());
    };
    Ok(Json(json!({"m.homeserver": {"base_url": format!("http://{host}")}})))
}
