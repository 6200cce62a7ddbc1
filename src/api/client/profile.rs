//! Profiles: display name and avatar, propagated into member events. Profiles of users of other
//! servers are asked of their servers (`query/profile`).

use axum::{extract::State, Json};
use ruma::api::client::profile::{get_profile, get_profile_field, set_profile_field};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::Error;

/// # `GET /_matrix/client/v3/profile/{userId}`
pub async fn get_profile_route(
    State(s): State<AppState>,
    body: Ruma<get_profile::v3::Request>,
) -> ApiResult<Json<Value>> {
    let user = &body.body.user_id;
    if user.server_name() != s.core.server_name() {
        return Ok(Json(s.core.remote_profile(user, None).await?));
    }
    if s.core.user(user)?.is_none() {
        return Err(Error::NotFound("profile not found".into()).into());
    }
    let p = s.core.profile(user)?;
    let mut out = json!({});
    if let Some(d) = p.displayname {
        out["displayname"] = json!(d);
    }
    if let Some(a) = p.avatar_url {
        out["avatar_url"] = json!(a);
    }
    Ok(Json(out))
}

/// # `GET /_matrix/client/v3/profile/{userId}/{field}`
pub async fn get_profile_field_route(
    State(s): State<AppState>,
    body: Ruma<get_profile_field::v3::Request>,
) -> ApiResult<Json<Value>> {
    let user = &body.body.user_id;
    let field = body.body.field.as_str().to_owned();
    if user.server_name() != s.core.server_name() {
        let p = s.core.remote_profile(user, Some(&field)).await?;
        return match p.get(&field) {
            Some(v) => Ok(Json(json!({ field: v }))),
            None => Err(Error::NotFound("profile field not set".into()).into()),
        };
    }
    if s.core.user(user)?.is_none() {
        return Err(Error::NotFound("profile not found".into()).into());
    }
    let p = s.core.profile(user)?;
    let value = match field.as_str() {
        "displayname" => p.displayname.map(|v| json!(v)),
        "avatar_url" => p.avatar_url.map(|v| json!(v)),
        _ => None,
    };
    match value {
        Some(v) => Ok(Json(json!({ field: v }))),
        None => Err(Error::NotFound("profile field not set".into()).into()),
    }
}

/// # `PUT /_matrix/client/v3/profile/{userId}/{field}`
pub async fn set_profile_field_route(
    State(s): State<AppState>,
    body: Ruma<set_profile_field::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if body.body.user_id != user {
        return Err(Error::Forbidden("you can only change your own profile".into()).into());
    }
    let field = body.body.value.field_name().as_str().to_owned();
    let value = body.body.value.value().as_str().map(str::to_owned).filter(|v| !v.is_empty());
    match field.as_str() {
        "displayname" => s.core.set_profile(user, Some(value), None).await?,
        "avatar_url" => s.core.set_profile(user, None, Some(value)).await?,
        other => return Err(Error::Unknown(format!("profile field {other} is not supported")).into()),
    }
    Ok(Json(json!({})))
}
