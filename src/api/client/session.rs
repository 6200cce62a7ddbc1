//! Registration, login, logout, whoami.

use axum::{extract::State, http::StatusCode, Json};
use ruma::api::client::{
    account::{get_username_availability, register, whoami},
    session::{get_login_types, login, logout, logout_all},
    uiaa::AuthData,
};
use serde_json::{json, Value};

use crate::api::{
    error::{ApiError, ApiResult},
    ruma_wrapper::{Ruma, RumaResponse},
    AppState,
};
use crate::core::Error;

/// # `POST /_matrix/client/v3/register`
///
/// Open registration with the `m.login.dummy` user-interactive flow: a request without `auth`
/// gets the 401 that lists the flow; a request with `auth.type = m.login.dummy` registers.
pub async fn register_route(State(s): State<AppState>, body: Ruma<register::v3::Request>) -> ApiResult<Json<Value>> {
    if !s.config.registration_enabled || !s.core.limits().registration_enabled {
        return Err(Error::Forbidden("registration is disabled on this node".into()).into());
    }
    let req = body.body;
    if req.kind == register::RegistrationKind::Guest {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN", "guest access is disabled"));
    }
    let localpart = match &req.username {
        Some(u) => u.to_lowercase(),
        None => format!("user{}", rand::random::<u32>()),
    };
    // Check the name before asking for auth, as Synapse does, so clients learn early.
    if !s.core.username_available(&localpart)? {
        return Err(Error::UserInUse.into());
    }
    match &req.auth {
        Some(AuthData::Dummy(_)) => {}
        Some(_) => return Err(Error::Forbidden("only the m.login.dummy stage is supported".into()).into()),
        None => {
            let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "M_FORBIDDEN", "authentication required");
            let session: String = format!("{:016x}", rand::random::<u64>());
            e.extra = Some(serde_json::Map::from_iter([
                ("flows".into(), json!([{"stages": ["m.login.dummy"]}])),
                ("params".into(), json!({})),
                ("session".into(), json!(session)),
            ]));
            // A UIAA 401 has no errcode in Synapse; clients accept either.
            return Err(e);
        }
    }
    let user = s.core.register(&localpart, req.password.as_deref()).await?;
    if req.inhibit_login {
        return Ok(Json(json!({"user_id": user})));
    }
    let (device, token) =
        s.core.create_device(&user, req.device_id.as_deref(), req.initial_device_display_name.clone()).await?;
    Ok(Json(json!({
        "user_id": user, "access_token": token, "device_id": device,
        "home_server": s.core.server_name(),
    })))
}

/// # `GET /_matrix/client/v3/register/available`
pub async fn get_username_availability_route(
    State(s): State<AppState>,
    body: Ruma<get_username_availability::v3::Request>,
) -> ApiResult<Json<Value>> {
    if s.core.username_available(&body.body.username.to_lowercase())? {
        Ok(Json(json!({"available": true})))
    } else {
        Err(Error::UserInUse.into())
    }
}

/// # `GET /_matrix/client/v3/login`
pub async fn get_login_types_route(_body: Ruma<get_login_types::v3::Request>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"flows": [{"type": "m.login.password"}]})))
}

/// # `POST /_matrix/client/v3/login`
pub async fn login_route(State(s): State<AppState>, body: Ruma<login::v3::Request>) -> ApiResult<Json<Value>> {
    use ruma::api::client::{session::login::v3::LoginInfo, uiaa::UserIdentifier};
    let req = body.body;
    let LoginInfo::Password(p) = &req.login_info else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "unsupported login type"));
    };
    #[allow(deprecated)]
    let name = match (&p.identifier, &p.user) {
        (Some(UserIdentifier::Matrix(m)), _) => m.user.clone(),
        (None, Some(u)) => u.clone(),
        _ => return Err(Error::Forbidden("unsupported identifier type".into()).into()),
    };
    let user = if name.starts_with('@') {
        ruma::UserId::parse(name.as_str()).map_err(|_| Error::Forbidden("invalid username or password".into()))?
    } else {
        s.core.user_id(&name.to_lowercase()).map_err(|_| Error::Forbidden("invalid username or password".into()))?
    };
    if user.server_name() != s.core.server_name() {
        return Err(Error::Forbidden("invalid username or password".into()).into());
    }
    s.core.check_password(&user, &p.password)?;
    let (device, token) =
        s.core.create_device(&user, req.device_id.as_deref(), req.initial_device_display_name.clone()).await?;
    Ok(Json(json!({
        "user_id": user, "access_token": token, "device_id": device,
        "home_server": s.core.server_name(),
    })))
}

/// # `POST /_matrix/client/v3/logout`
pub async fn logout_route(
    State(s): State<AppState>,
    body: Ruma<logout::v3::Request>,
) -> ApiResult<RumaResponse<logout::v3::Response>> {
    let (u, d) = body.sender()?;
    s.core.delete_device(u, d).await?;
    Ok(RumaResponse(logout::v3::Response::new()))
}

/// # `POST /_matrix/client/v3/logout/all`
pub async fn logout_all_route(
    State(s): State<AppState>,
    body: Ruma<logout_all::v3::Request>,
) -> ApiResult<RumaResponse<logout_all::v3::Response>> {
    let (u, _) = body.sender()?;
    s.core.delete_all_devices(u).await?;
    Ok(RumaResponse(logout_all::v3::Response::new()))
}

/// # `GET /_matrix/client/v3/account/whoami`
pub async fn whoami_route(body: Ruma<whoami::v3::Request>) -> ApiResult<Json<Value>> {
    let (u, d) = body.sender()?;
    Ok(Json(json!({"user_id": u, "device_id": d, "is_guest": false})))
}
