//! End-to-end encryption keys: upload, query, claim, changes, cross-signing keys and
//! signatures. The logic is in `core/e2ee.rs`.

use std::collections::BTreeMap;

use axum::{extract::State, Json};
use ruma::{
    api::client::keys::{claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys},
    OwnedDeviceId, OwnedUserId, UserId,
};
use serde_json::{json, Value};

use super::uiaa::require_password;
use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{e2ee::KeyUpload, sync::parse_token, Error};

/// A JSON object field of the request body as `key → value` (absent or `null` = empty).
fn object_field(json: &Value, field: &str) -> Result<BTreeMap<String, Value>, Error> {
    match json.get(field) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(o)) => Ok(o.clone().into_iter().collect()),
        Some(_) => Err(Error::BadJson(format!("{field} must be an object"))),
    }
}

/// A key object field of the request body (absent or `null` = none).
fn key_field(json: &Value, field: &str) -> Option<Value> {
    json.get(field).filter(|v| !v.is_null()).cloned()
}

/// # `POST /_matrix/client/v3/keys/upload`
///
/// Stores device keys, one-time keys and fallback keys; answers the one-time key counts.
pub async fn upload_keys_route(
    State(s): State<AppState>,
    body: Ruma<upload_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let upload = KeyUpload {
        device_keys: key_field(&body.json, "device_keys"),
        one_time_keys: object_field(&body.json, "one_time_keys")?,
        fallback_keys: object_field(&body.json, "fallback_keys")?,
    };
    let counts = s.core.upload_keys(user, device, upload).await?;
    Ok(Json(json!({"one_time_key_counts": counts})))
}

/// # `POST /_matrix/client/v3/keys/query`
///
/// Device keys and cross-signing keys of the given users; users of other servers come from the
/// cache or their servers (`core/federation/keys.rs`), which failed ones name in `failures`.
pub async fn get_keys_route(State(s): State<AppState>, body: Ruma<get_keys::v3::Request>) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(s.core.query_keys_anywhere(user, &body.body.device_keys, body.body.timeout).await?))
}

/// # `POST /_matrix/client/v3/keys/claim`
///
/// One one-time key per requested device (each key is handed out once), or the device's
/// fallback key when none is left; devices of other servers are claimed from their servers.
pub async fn claim_keys_route(
    State(s): State<AppState>,
    body: Ruma<claim_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    let claims: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>> = body
        .body
        .one_time_keys
        .iter()
        .map(|(u, ds)| (u.clone(), ds.iter().map(|(d, a)| (d.clone(), a.to_string())).collect()))
        .collect();
    let timeout = body.json.get("timeout").and_then(Value::as_u64).map(std::time::Duration::from_millis);
    Ok(Json(s.core.claim_keys_anywhere(&claims, timeout).await?))
}

/// # `GET /_matrix/client/v3/keys/changes`
///
/// Users whose device lists changed between two sync tokens (`changed`), and users who no
/// longer share a room (`left`).
pub async fn get_key_changes_route(
    State(s): State<AppState>,
    body: Ruma<get_key_changes::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let from = parse_token(&body.body.from)?;
    let to = parse_token(&body.body.to)?.min(s.core.visible_pos());
    let (changed, left) = s.core.device_list_changes(user, from, to)?;
    Ok(Json(json!({"changed": changed, "left": left})))
}

/// # `POST /_matrix/client/v3/keys/device_signing/upload`
///
/// Cross-signing keys. The first upload needs no user-interactive auth (MSC3967, which
/// matrix-sdk relies on after `/register`); replacing existing keys needs the password stage.
pub async fn upload_signing_keys_route(
    State(s): State<AppState>,
    body: Ruma<upload_signing_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let master = key_field(&body.json, "master_key");
    let self_signing = key_field(&body.json, "self_signing_key");
    let user_signing = key_field(&body.json, "user_signing_key");
    let keys =
        [("master", master.as_ref()), ("self_signing", self_signing.as_ref()), ("user_signing", user_signing.as_ref())];
    if s.core.device_signing_needs_auth(user, &keys)? {
        require_password(&s.core, user, body.body.auth.as_ref())?;
    }
    s.core.upload_cross_signing_keys(user, master, self_signing, user_signing).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/keys/signatures/upload`
///
/// Signatures of devices and cross-signing keys; bad ones are reported in `failures`.
pub async fn upload_signatures_route(
    State(s): State<AppState>,
    body: Ruma<upload_signatures::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let mut signed = BTreeMap::new();
    let all = body.json.as_object().ok_or_else(|| Error::BadJson("the body must be an object".into()))?;
    for (u, objects) in all {
        let u = UserId::parse(u.as_str()).map_err(|e| Error::InvalidParam(format!("{u}: {e}")))?;
        let Value::Object(objects) = objects else {
            return Err(Error::BadJson(format!("signatures for {u} must be an object")).into());
        };
        signed.insert(u, objects.clone().into_iter().collect());
    }
    let failures = s.core.upload_signatures(user, signed).await?;
    Ok(Json(json!({"failures": failures})))
}
