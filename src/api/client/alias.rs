//! Local room aliases.

use axum::{extract::State, Json};
use ruma::api::client::{
    alias::{create_alias, delete_alias, get_alias},
    room::aliases,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn create_alias_route(
    State(s): State<AppState>,
    body: Ruma<create_alias::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if s.core.membership(&body.body.room_id, user)?.as_deref() != Some("join") {
        return Err(Error::Forbidden("you are not in this room".into()).into());
    }
    s.core.set_alias(&body.body.room_alias, &body.body.room_id).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn get_alias_route(State(s): State<AppState>, body: Ruma<get_alias::v3::Request>) -> ApiResult<Json<Value>> {
    let room =
        s.core.resolve_alias(&body.body.room_alias)?.ok_or_else(|| Error::NotFound("room alias not found".into()))?;
    Ok(Json(json!({"room_id": room, "servers": [s.core.server_name()]})))
}

/// # `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn delete_alias_route(
    State(s): State<AppState>,
    body: Ruma<delete_alias::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room =
        s.core.resolve_alias(&body.body.room_alias)?.ok_or_else(|| Error::NotFound("room alias not found".into()))?;
    if s.core.membership(&room, user)?.as_deref() != Some("join") {
        return Err(Error::Forbidden("you are not in the room of this alias".into()).into());
    }
    s.core.delete_alias(&body.body.room_alias).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub async fn get_room_aliases_route(
    State(s): State<AppState>,
    body: Ruma<aliases::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.require_visible_room(user, &body.body.room_id)?;
    Ok(Json(json!({"aliases": s.core.room_aliases(&body.body.room_id)?})))
}
