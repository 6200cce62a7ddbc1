//! `Ruma<T>`: an axum extractor that turns an HTTP request into a ruma request type `T`, after
//! bounding the body, authenticating the access token, and checking the body is JSON. Errors
//! come out as Matrix errors (`M_NOT_JSON`, `M_BAD_JSON`, `M_MISSING_TOKEN`, ...).

use std::any::TypeId;

use axum::{
    body::Body,
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use ruma::{
    api::{
        auth_scheme::{AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional},
        error::FromHttpRequestError,
        federation::authentication::{ServerSignatures, XMatrix},
        IncomingRequest, Metadata, OutgoingResponse,
    },
    OwnedDeviceId, OwnedUserId,
};

use super::{error::ApiError, AppState};
use crate::core::Error;

/// A parsed, authenticated client request.
pub struct Ruma<T> {
    /// The ruma request.
    pub body: T,
    /// The authenticated user (for endpoints with access tokens).
    pub user: Option<OwnedUserId>,
    /// The authenticated device.
    pub device: Option<OwnedDeviceId>,
    /// The request body as JSON (for fields ruma does not model), or `Null`.
    pub json: serde_json::Value,
    /// For server-server requests: the verified origin server (X-Matrix signature checked,
    /// and equal to the peer the transport authenticated).
    pub origin: Option<ruma::OwnedServerName>,
}

/// Set by the federation transport on each request: the server name of the peer at the other
/// end of the (libp2p-authenticated) connection.
#[derive(Clone, Debug)]
pub struct AuthenticatedPeer(pub ruma::OwnedServerName);

impl<T> Ruma<T> {
    /// The verified origin of a federation request.
    pub fn origin(&self) -> Result<&ruma::ServerName, ApiError> {
        self.origin.as_deref().ok_or_else(|| Error::Forbidden("not a federation request".into()).into())
    }
}

impl<T> Ruma<T> {
    /// The authenticated user; only call on endpoints that require a token.
    pub fn sender(&self) -> Result<(&ruma::UserId, &ruma::DeviceId), ApiError> {
        match (&self.user, &self.device) {
            (Some(u), Some(d)) => Ok((u, d)),
            _ => Err(Error::MissingToken.into()),
        }
    }
}

/// The access token of a request: `Authorization: Bearer` or the `access_token` query parameter.
pub fn access_token(parts: &axum::http::request::Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        if let Some(t) = h.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")) {
            return Some(t.trim().to_owned());
        }
    }
    parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")).map(percent_decode))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn from_http_error(e: FromHttpRequestError) -> ApiError {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Unrecognized request")
        }
        other => Error::BadJson(other.to_string()).into(),
    }
}

impl<T> FromRequest<AppState> for Ruma<T>
where
    T: IncomingRequest + Send + 'static,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let mut path_args: Vec<String> = match RawPathParams::from_request_parts(&mut parts, state).await {
            Ok(p) => p.iter().map(|(_, v)| v.to_owned()).collect(),
            Err(_) => Vec::new(),
        };
        // `.../state/{type}/` (see `paths`): the empty state key is the last path argument.
        if parts.uri.path().ends_with('/') && path_args.len() >= 2 {
            path_args.push(String::new());
        }
        let limit = state.config.limits.max_request_bytes;
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::from(Error::TooLarge(format!("request body over {limit} bytes"))))?;

        let auth = TypeId::of::<T::Authentication>();
        let required = auth == TypeId::of::<AccessToken>() || auth == TypeId::of::<AppserviceToken>();
        let optional = auth == TypeId::of::<AccessTokenOptional>() || auth == TypeId::of::<AppserviceTokenOptional>();
        let (user, device) = match access_token(&parts) {
            Some(t) if required || optional => {
                let (u, d) = state.core.authenticate(&t)?;
                // Last-seen time for `/devices` (written at most once a minute per device).
                if let Err(e) = state.core.touch_device(&u, &d).await {
                    tracing::warn!(error = %e, "could not record device last-seen time");
                }
                (Some(u), Some(d))
            }
            None if required => return Err(Error::MissingToken.into()),
            _ => (None, None),
        };

        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => v,
                Err(e) if T::METHOD != axum::http::Method::GET => {
                    return Err(Error::NotJson(format!("request body is not JSON: {e}")).into())
                }
                Err(_) => serde_json::Value::Null,
            }
        };
        // ruma's deserializers want an object body for POST/PUT even when every field is optional.
        let bytes = if bytes.is_empty() && T::METHOD != axum::http::Method::GET {
            bytes::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        let http_req = axum::http::Request::from_parts(parts, bytes);
        let origin = if auth == TypeId::of::<ServerSignatures>() {
            Some(verify_server_request(&http_req, state.core.server_name())?)
        } else {
            None
        };
        let body = T::try_from_http_request(http_req, &path_args).map_err(from_http_error)?;
        Ok(Self { body, user, device, json, origin })
    }
}

/// Check the X-Matrix signature of a server-server request, and that its origin is the peer
/// the transport authenticated. The origin's key comes from its name: nothing is fetched.
fn verify_server_request(
    req: &axum::http::Request<bytes::Bytes>,
    me: &ruma::ServerName,
) -> Result<ruma::OwnedServerName, ApiError> {
    let peer = req.extensions().get::<AuthenticatedPeer>().cloned().ok_or_else(|| {
        ApiError::from(Error::Forbidden("federation requests are only accepted over the mesh".into()))
    })?;
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "missing X-Matrix authorization"))?;
    let x = XMatrix::try_from(header)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", format!("bad X-Matrix header: {e}")))?;
    if x.origin != peer.0 {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            format!("origin {} is not the connected peer {}", x.origin, peer.0),
        ));
    }
    let keys = crate::core::federation::key_map_for([x.origin.as_ref()]).map_err(ApiError::from)?;
    x.verify_request(req, me, &keys).map_err(|e| {
        ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", format!("bad request signature: {e}"))
    })?;
    Ok(x.origin)
}

/// A ruma response, serialised the way ruma defines it.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(res) => res.map(|b| Body::from(b.freeze())).into_response(),
            Err(e) => ApiError::from(Error::Internal(format!("response serialisation: {e}"))).into_response(),
        }
    }
}

/// `Metadata` paths of `T` (all versions, `r0` included), for the router.
pub fn paths<T: Metadata>() -> Vec<String>
where
    T::PathBuilder: ruma::api::path_builder::PathBuilder,
{
    use ruma::api::path_builder::PathBuilder;
    let mut out = Vec::new();
    for p in T::PATH_BUILDER.all_paths() {
        out.push(p.to_owned());
        // An empty state key leaves the last segment empty, which a `{state_key}` capture never
        // matches: route `.../state/{event_type}` and `.../state/{event_type}/` too (ruma reads
        // the missing argument as the empty string).
        if let Some(base) = p.strip_suffix("/{state_key}") {
            out.push(base.to_owned());
            out.push(format!("{base}/"));
        }
    }
    out
}
