//! Queries: profiles, room aliases, server version.

use axum::{extract::State, Json};
use ruma::api::federation::query::{get_profile_information, get_room_information};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `GET /_matrix/federation/v1/query/profile`
pub async fn get_profile_information_route(
    State(s): State<AppState>,
    body: Ruma<get_profile_information::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    let user = &body.body.user_id;
    if user.server_name() != s.core.server_name() || s.core.user(user)?.is_none() {
        return Err(Error::NotFound("no such user".into()).into());
    }
    let p = s.core.profile(user)?;
    let mut out = json!({});
    let field = body.body.field.as_ref().map(|f| f.as_str().to_owned());
    if field.as_deref().is_none_or(|f| f == "displayname") {
        if let Some(d) = p.displayname {
            out["displayname"] = json!(d);
        }
    }
    if field.as_deref().is_none_or(|f| f == "avatar_url") {
        if let Some(a) = p.avatar_url {
            out["avatar_url"] = json!(a);
        }
    }
    Ok(Json(out))
}

/// # `GET /_matrix/federation/v1/query/directory`
pub async fn get_room_information_route(
    State(s): State<AppState>,
    body: Ruma<get_room_information::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.origin()?;
    let room =
        s.core.resolve_alias(&body.body.room_alias)?.ok_or_else(|| Error::NotFound("room alias not found".into()))?;
    let mut servers: Vec<String> = s.core.servers_in_room(&room)?.into_iter().map(|s| s.to_string()).collect();
    if !servers.iter().any(|x| x == s.core.server_name().as_str()) {
        servers.insert(0, s.core.server_name().to_string());
    }
    Ok(Json(json!({"room_id": room, "servers": servers})))
}

/// # `GET /_matrix/federation/v1/version`
pub async fn get_server_version_route() -> Json<Value> {
    Json(json!({"server": {"name": "outpost", "version": env!("CARGO_PKG_VERSION")}}))
}
