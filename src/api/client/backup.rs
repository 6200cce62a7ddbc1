//! Server-side key backup (`/room_keys`). The logic is in `core/backup.rs`.

use axum::{extract::State, Json};
use ruma::{
    api::client::backup::{
        add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version,
        delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
        get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session,
        get_latest_backup_info, update_backup_version,
    },
    OwnedRoomId, RoomId,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{backup::BackupKeys, Error};

/// `{session_id: KeyBackupData}` from a JSON object.
fn sessions(v: &Value) -> Result<std::collections::BTreeMap<String, Value>, Error> {
    match v {
        Value::Object(o) => Ok(o.clone().into_iter().collect()),
        _ => Err(Error::BadJson("sessions must be an object".into())),
    }
}

fn etag_count((etag, count): (String, u64)) -> Json<Value> {
    Json(json!({"etag": etag, "count": count}))
}

/// # `POST /_matrix/client/v3/room_keys/version`
pub async fn create_backup_version_route(
    State(s): State<AppState>,
    body: Ruma<create_backup_version::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let version = s.core.create_backup_version(user, &body.json).await?;
    Ok(Json(json!({"version": version})))
}

/// # `GET /_matrix/client/v3/room_keys/version`
///
/// The current backup version; 404 `M_NOT_FOUND` when there is none.
pub async fn get_latest_backup_info_route(
    State(s): State<AppState>,
    body: Ruma<get_latest_backup_info::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(s.core.backup_version(user, None)?))
}

/// # `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn get_backup_info_route(
    State(s): State<AppState>,
    body: Ruma<get_backup_info::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(s.core.backup_version(user, Some(&body.body.version))?))
}

/// # `PUT /_matrix/client/v3/room_keys/version/{version}`
pub async fn update_backup_version_route(
    State(s): State<AppState>,
    body: Ruma<update_backup_version::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.update_backup_version(user, &body.body.version, &body.json).await?;
    Ok(Json(json!({})))
}

/// # `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn delete_backup_version_route(
    State(s): State<AppState>,
    body: Ruma<delete_backup_version::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.delete_backup_version(user, &body.body.version).await?;
    Ok(Json(json!({})))
}

/// # `PUT /_matrix/client/v3/room_keys/keys`
pub async fn add_backup_keys_route(
    State(s): State<AppState>,
    body: Ruma<add_backup_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let mut keys = BackupKeys::new();
    if let Some(rooms) = body.json.get("rooms").and_then(Value::as_object) {
        for (room, r) in rooms {
            let room = OwnedRoomId::try_from(room.as_str()).map_err(|e| Error::InvalidParam(format!("{room}: {e}")))?;
            keys.insert(room, sessions(r.get("sessions").unwrap_or(&Value::Null))?);
        }
    }
    Ok(etag_count(s.core.put_backup_keys(user, &body.body.version, keys).await?))
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn add_backup_keys_for_room_route(
    State(s): State<AppState>,
    body: Ruma<add_backup_keys_for_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let mut keys = BackupKeys::new();
    keys.insert(body.body.room_id.clone(), sessions(body.json.get("sessions").unwrap_or(&Value::Null))?);
    Ok(etag_count(s.core.put_backup_keys(user, &body.body.version, keys).await?))
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn add_backup_keys_for_session_route(
    State(s): State<AppState>,
    body: Ruma<add_backup_keys_for_session::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let mut keys = BackupKeys::new();
    keys.entry(body.body.room_id.clone()).or_default().insert(body.body.session_id.clone(), body.json.clone());
    Ok(etag_count(s.core.put_backup_keys(user, &body.body.version, keys).await?))
}

/// # `GET /_matrix/client/v3/room_keys/keys`
pub async fn get_backup_keys_route(
    State(s): State<AppState>,
    body: Ruma<get_backup_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let keys = s.core.get_backup_keys(user, &body.body.version, None, None)?;
    let rooms: serde_json::Map<String, Value> =
        keys.into_iter().map(|(r, ss)| (r.to_string(), json!({"sessions": ss}))).collect();
    Ok(Json(json!({"rooms": rooms})))
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn get_backup_keys_for_room_route(
    State(s): State<AppState>,
    body: Ruma<get_backup_keys_for_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room: &RoomId = &body.body.room_id;
    let mut keys = s.core.get_backup_keys(user, &body.body.version, Some(room), None)?;
    Ok(Json(json!({"sessions": keys.remove(room).unwrap_or_default()})))
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn get_backup_keys_for_session_route(
    State(s): State<AppState>,
    body: Ruma<get_backup_keys_for_session::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room: &RoomId = &body.body.room_id;
    let session = body.body.session_id.as_str();
    let mut keys = s.core.get_backup_keys(user, &body.body.version, Some(room), Some(session))?;
    let data = keys.remove(room).and_then(|mut ss| ss.remove(session));
    Ok(Json(data.ok_or_else(|| Error::NotFound("no such session in the backup".into()))?))
}

/// # `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn delete_backup_keys_route(
    State(s): State<AppState>,
    body: Ruma<delete_backup_keys::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(etag_count(s.core.delete_backup_keys(user, &body.body.version, None, None).await?))
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn delete_backup_keys_for_room_route(
    State(s): State<AppState>,
    body: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(etag_count(s.core.delete_backup_keys(user, &body.body.version, Some(&body.body.room_id), None).await?))
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn delete_backup_keys_for_session_route(
    State(s): State<AppState>,
    body: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let b = &body.body;
    Ok(etag_count(s.core.delete_backup_keys(user, &b.version, Some(&b.room_id), Some(&b.session_id)).await?))
}
