//! User-interactive authentication for sensitive endpoints (deleting devices, replacing
//! cross-signing keys): one stage, `m.login.password`.
//!
//! The flow is stateless: the only stage proves the password, so the `session` handed out in
//! the 401 is echoed back but need not be remembered, and a password stage sent without a
//! session (as matrix-sdk does right after login) is accepted too.

use axum::http::StatusCode;
use ruma::{
    api::client::uiaa::{AuthData, UserIdentifier},
    UserId,
};
use serde_json::json;

use crate::api::error::ApiError;
use crate::core::{Core, Error};

/// The 401 that asks for the password stage; `failure` is the reason a given stage failed.
fn challenge(session: Option<&str>, failure: Option<(&'static str, String)>) -> ApiError {
    let session = session.map(str::to_owned).unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let (errcode, message) = failure.unwrap_or(("", String::new()));
    let mut e = ApiError::new(StatusCode::UNAUTHORIZED, errcode, message);
    e.extra = Some(serde_json::Map::from_iter([
        ("flows".into(), json!([{"stages": ["m.login.password"]}])),
        ("params".into(), json!({})),
        ("session".into(), json!(session)),
    ]));
    if errcode.is_empty() {
        e.message.clear();
    }
    e
}

/// Succeed only if `auth` is an `m.login.password` stage with `user`'s password; otherwise the
/// 401 challenge (with `M_FORBIDDEN` when a password was given and is wrong).
pub fn require_password(core: &Core, user: &UserId, auth: Option<&AuthData>) -> Result<(), ApiError> {
    match auth {
        None => Err(challenge(None, None)),
        Some(AuthData::Password(p)) => {
            let named = match &p.identifier {
                UserIdentifier::Matrix(m) => {
                    if m.user.starts_with('@') {
                        m.user == user.as_str()
                    } else {
                        m.user.to_lowercase() == user.localpart()
                    }
                }
                _ => false,
            };
            let session = p.session.as_deref();
            if !named {
                return Err(challenge(session, Some(("M_FORBIDDEN", "the identifier must be your own user".into()))));
            }
            match core.check_password(user, &p.password) {
                Ok(()) => Ok(()),
                Err(Error::Forbidden(m)) => Err(challenge(session, Some(("M_FORBIDDEN", m)))),
                Err(e) => Err(e.into()),
            }
        }
        Some(other) => Err(challenge(
            other.session(),
            Some((
                "M_FORBIDDEN",
                format!(
                    "unsupported auth type {}; use m.login.password",
                    other.auth_type().map(|t| t.to_string()).unwrap_or_default()
                ),
            )),
        )),
    }
}
