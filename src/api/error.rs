//! The one place where errors become Matrix error responses (`errcode`, `error`, HTTP status).

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::core::Error;

/// An error response for the client or federation API.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The Matrix `errcode`; empty for a bare user-interactive-auth challenge (no
    /// `errcode`/`error` in the body).
    pub errcode: &'static str,
    /// Human-readable text.
    pub message: String,
    /// Extra top-level fields (`soft_logout`, UIAA flows, ...).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    /// A bare error.
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self { status, errcode, message: message.into(), extra: None }
    }

    /// 404 `M_UNRECOGNIZED`.
    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            Error::Forbidden(_) => (S::FORBIDDEN, "M_FORBIDDEN"),
            Error::NotFound(_) => (S::NOT_FOUND, "M_NOT_FOUND"),
            Error::BadJson(_) => (S::BAD_REQUEST, "M_BAD_JSON"),
            Error::NotJson(_) => (S::BAD_REQUEST, "M_NOT_JSON"),
            Error::TooLarge(_) => (S::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Error::InvalidParam(_) => (S::BAD_REQUEST, "M_INVALID_PARAM"),
            Error::MissingParam(_) => (S::BAD_REQUEST, "M_MISSING_PARAM"),
            Error::UnknownToken => (S::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            Error::MissingToken => (S::UNAUTHORIZED, "M_MISSING_TOKEN"),
            Error::UserInUse => (S::BAD_REQUEST, "M_USER_IN_USE"),
            Error::InvalidUsername(_) => (S::BAD_REQUEST, "M_INVALID_USERNAME"),
            Error::RoomInUse(_) => (S::BAD_REQUEST, "M_ROOM_IN_USE"),
            Error::Conflict(_) => (S::CONFLICT, "M_UNKNOWN"),
            Error::UnsupportedRoomVersion(_) => (S::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            Error::Unrecognized(_) => (S::NOT_FOUND, "M_UNRECOGNIZED"),
            Error::Unknown(_) => (S::BAD_REQUEST, "M_UNKNOWN"),
            Error::LimitExceeded(_) => (S::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            Error::NotYetUploaded(_) => (S::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED"),
            Error::CannotOverwriteMedia(_) => (S::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA"),
            Error::WrongRoomKeysVersion(_) => (S::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION"),
            Error::Store(_) | Error::Internal(_) => (S::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        };
        if status == S::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
        }
        let mut err = Self::new(status, code, e.to_string());
        if matches!(e, Error::UnknownToken) {
            err.extra = Some(serde_json::Map::from_iter([("soft_logout".into(), json!(false))]));
        }
        if let Error::WrongRoomKeysVersion(Some(v)) = &e {
            err.extra = Some(serde_json::Map::from_iter([("current_version".into(), json!(v))]));
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra.unwrap_or_default();
        // An empty errcode is a bare user-interactive-auth challenge (flows and session only).
        if !self.errcode.is_empty() {
            body.insert("errcode".into(), json!(self.errcode));
            body.insert("error".into(), json!(self.message));
        }
        let mut res = (self.status, Json(serde_json::Value::Object(body))).into_response();
        res.extensions_mut().insert(super::middleware::ErrCode(self.errcode));
        res
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
