//! Content repository: upload, download, thumbnails, config, URL previews; the authenticated
//! `/_matrix/client/v1/media/*` endpoints and the legacy `/_matrix/media/{r0,v3}/*` ones.
//!
//! Uploads are binary, so they bypass the JSON extractor (and its `max_request_bytes`): the
//! body is streamed into the media store up to `limits.max_upload_bytes`, made durable, and
//! only then is the metadata committed and 200 sent (see `crate::media`).
//!
//! Media of other servers is fetched from its origin over federation on the first download and
//! cached locally (`api/federation/media.rs`); thumbnails of it are made here from the cached
//! original. URL previews answer an empty preview: a node has no internet to fetch
//! pages from, and fetching LAN addresses on a client's behalf would be a request forgery
//! hole.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Path, Query, Request, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json, Router,
};
use ruma::{
    api::client::{authenticated_media, media},
    http_headers::{ContentDisposition, ContentDispositionType},
    OwnedDeviceId, OwnedUserId,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    api::{
        error::{ApiError, ApiResult},
        ruma_wrapper::{access_token, Ruma},
        AppState,
    },
    core::{media::MediaRecord, Error},
    media::{thumbnail, IngestError},
    ruma_route,
};

/// The longest a download waits for an asynchronous upload (`timeout_ms` is clamped to it).
const DOWNLOAD_WAIT_MS_MAX: u64 = 60_000;
/// `timeout_ms` when the client gives none (the spec's default).
const DOWNLOAD_WAIT_MS_DEFAULT: u64 = 20_000;

/// Types a browser may render inline (the spec's list); everything else is `attachment`.
const INLINE_SAFE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// The sandboxing policy the spec recommends for served media.
const MEDIA_CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                         style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

/// Add every media route to `r`.
#[allow(deprecated)] // the legacy `/_matrix/media/*` endpoints, still used by many clients
pub fn routes(r: Router<AppState>) -> Router<AppState> {
    use authenticated_media as am;
    let r = ruma_route!(r, media::create_content::v3::Request, create_content_route);
    let r = ruma_route!(r, media::create_mxc_uri::v1::Request, create_mxc_uri_route);
    let r = ruma_route!(r, media::create_content_async::v3::Request, create_content_async_route);
    let r = ruma_route!(r, am::get_content::v1::Request, get_content_route);
    let r = ruma_route!(r, am::get_content_as_filename::v1::Request, get_content_as_filename_route);
    let r = ruma_route!(r, am::get_content_thumbnail::v1::Request, get_content_thumbnail_route);
    let r = ruma_route!(r, am::get_media_config::v1::Request, get_media_config_route);
    let r = ruma_route!(r, am::get_media_preview::v1::Request, get_media_preview_route);
    let r = ruma_route!(r, media::get_content::v3::Request, get_content_legacy_route);
    let r = ruma_route!(r, media::get_content_as_filename::v3::Request, get_content_as_filename_legacy_route);
    let r = ruma_route!(r, media::get_content_thumbnail::v3::Request, get_content_thumbnail_legacy_route);
    let r = ruma_route!(r, media::get_media_config::v3::Request, get_media_config_legacy_route);
    ruma_route!(r, media::get_media_preview::v3::Request, get_media_preview_legacy_route)
}

/// The user and device of a request with a required access token.
fn authenticate(s: &AppState, parts: &Parts) -> Result<(OwnedUserId, OwnedDeviceId), ApiError> {
    let token = access_token(parts).ok_or(Error::MissingToken)?;
    Ok(s.core.authenticate(&token)?)
}

/// `filename` query parameter of uploads.
#[derive(Deserialize)]
struct UploadQuery {
    filename: Option<String>,
}

/// The upload's `Content-Type`, if any and valid.
fn upload_content_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?.trim();
    (!ct.is_empty() && ct.len() <= 255).then(|| ct.to_owned())
}

/// Streams the body of `req` into the media store; errors become Matrix errors.
async fn ingest(s: &AppState, parts: &Parts, body: Body) -> Result<crate::core::media::MediaContent, ApiError> {
    let max = s.media.limits().max_upload_bytes;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Error::TooLarge(format!("media is larger than the limit of {max} bytes")).into());
    }
    let filename = Query::<UploadQuery>::try_from_uri(&parts.uri)
        .map_err(|e| Error::InvalidParam(format!("bad query string: {e}")))?
        .0
        .filename
        .filter(|f| !f.is_empty() && f.len() <= 255);
    let content_type = upload_content_type(&parts.headers);
    s.media.ingest(body.into_data_stream(), content_type, filename).await.map_err(|e| match e {
        IngestError::TooLarge(_) => Error::TooLarge(e.to_string()).into(),
        IngestError::Body(_) => Error::Unknown(e.to_string()).into(),
        IngestError::Store(_) => Error::Internal(e.to_string()).into(),
    })
}

/// # `POST /_matrix/media/v3/upload`
pub async fn create_content_route(State(s): State<AppState>, req: Request) -> ApiResult<Json<Value>> {
    let (parts, body) = req.into_parts();
    let (user, _) = authenticate(&s, &parts)?;
    let content = ingest(&s, &parts, body).await?;
    let media_id = s.core.create_media(&user, content).await?;
    Ok(Json(json!({"content_uri": s.core.mxc_uri(&media_id)})))
}

/// # `POST /_matrix/media/v1/create`
pub async fn create_mxc_uri_route(
    State(s): State<AppState>,
    body: Ruma<media::create_mxc_uri::v1::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let max = s.media.limits().pending_uploads_per_user_max;
    let (media_id, expires_ms) = s.core.reserve_media(user, max).await?;
    Ok(Json(json!({"content_uri": s.core.mxc_uri(&media_id), "unused_expires_at": expires_ms})))
}

/// # `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
pub async fn create_content_async_route(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Json<Value>> {
    let (parts, body) = req.into_parts();
    let (user, _) = authenticate(&s, &parts)?;
    if server_name != s.core.server_name().as_str() {
        return Err(Error::NotFound("media of other servers cannot be uploaded here".into()).into());
    }
    s.core.check_media_upload(&user, &media_id)?;
    let content = ingest(&s, &parts, body).await?;
    s.core.complete_media(&user, &media_id, content).await?;
    s.media.notify_uploaded();
    Ok(Json(json!({})))
}

/// Query parameters of downloads (`allow_remote` and `allow_redirect` need no handling: remote
/// media is always fetched through this server, never by redirect).
#[derive(Deserialize, Default)]
pub struct DownloadQuery {
    /// How long to wait for an asynchronous upload (ms).
    pub timeout_ms: Option<u64>,
}

/// Query parameters of thumbnails; checked by hand for Matrix errors.
#[derive(Deserialize)]
pub struct ThumbnailQuery {
    /// Desired width (positive integer).
    pub width: Option<String>,
    /// Desired height (positive integer).
    pub height: Option<String>,
    /// `crop` or `scale` (default).
    pub method: Option<String>,
    /// How long to wait for an asynchronous upload (ms).
    pub timeout_ms: Option<u64>,
}

/// The content of `server_name`/`media_id`: local media (waiting up to `timeout_ms` for an
/// asynchronous upload), or another server's, fetched over federation and cached
/// (`api/federation/media.rs`).
pub(crate) async fn uploaded_content(
    s: &AppState,
    server_name: &str,
    media_id: &str,
    timeout_ms: Option<u64>,
) -> Result<crate::core::media::MediaContent, ApiError> {
    if server_name != s.core.server_name().as_str() {
        return crate::api::federation::media::remote_media_content(s, server_name, media_id).await;
    }
    uploaded_media(s, server_name, media_id, timeout_ms).await.map(|(_, c)| c)
}

/// The record of local media `server_name`/`media_id` with its content, waiting up to
/// `timeout_ms` for an asynchronous upload to arrive.
async fn uploaded_media(
    s: &AppState,
    server_name: &str,
    media_id: &str,
    timeout_ms: Option<u64>,
) -> Result<(MediaRecord, crate::core::media::MediaContent), ApiError> {
    if server_name != s.core.server_name().as_str() {
        return Err(Error::NotFound("remote media is not available (no media federation yet)".into()).into());
    }
    let wait = Duration::from_millis(timeout_ms.unwrap_or(DOWNLOAD_WAIT_MS_DEFAULT).min(DOWNLOAD_WAIT_MS_MAX));
    let deadline = tokio::time::Instant::now() + wait;
    let mut uploads = s.media.watch_uploads();
    loop {
        uploads.borrow_and_update();
        let record = s.core.media(media_id)?.filter(|r| !r.lapsed(s.core.now_ms()));
        let Some(record) = record else {
            return Err(Error::NotFound("media not found".into()).into());
        };
        if let Some(content) = record.content.clone() {
            return Ok((record, content));
        }
        match tokio::time::timeout_at(deadline, uploads.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Err(Error::NotYetUploaded("the media has not been uploaded yet".into()).into()),
        }
    }
}

/// The `Content-Type` essence (`type/subtype`, lowercase).
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Headers every media response carries.
fn media_headers(res: &mut Response, authenticated: bool) {
    let h = res.headers_mut();
    h.insert(header::HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static("cross-origin"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(MEDIA_CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Content never changes under an mxc:// URI. Authenticated responses stay out of shared caches.
    let cache = match authenticated {
        true => "private, max-age=86400, immutable",
        false => "public, max-age=86400, immutable",
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
}

/// Serves the content of `server_name`/`media_id`, named `filename` (else its upload name).
async fn download(
    s: &AppState,
    server_name: &str,
    media_id: &str,
    filename: Option<String>,
    query: DownloadQuery,
    authenticated: bool,
) -> ApiResult<Response> {
    let content = uploaded_content(s, server_name, media_id, query.timeout_ms).await?;
    let Some((len, stream)) =
        s.media.store().open(&content.sha256).await.map_err(|e| Error::Internal(e.to_string()))?
    else {
        tracing::warn!(media_id, sha256 = %content.sha256, "media content missing from the media store");
        return Err(Error::NotFound("media content is missing".into()).into());
    };
    let content_type = content
        .content_type
        .as_deref()
        .filter(|ct| HeaderValue::from_str(ct).is_ok())
        .unwrap_or("application/octet-stream");
    let inline = INLINE_SAFE_TYPES.contains(&essence(content_type).as_str());
    let disposition = ContentDisposition::new(match inline {
        true => ContentDispositionType::Inline,
        false => ContentDispositionType::Attachment,
    })
    .with_filename(filename.or(content.filename));
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).map_err(|e| Error::Internal(e.to_string()))?);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&disposition.to_string()) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    media_headers(&mut res, authenticated);
    Ok(res)
}

/// Parses a required positive integer query parameter.
fn dimension(name: &str, v: Option<&str>) -> Result<u32, ApiError> {
    let v = v.ok_or_else(|| Error::MissingParam(format!("missing {name}")))?;
    match v.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidParam(format!("{name} must be a positive integer")).into()),
    }
}

/// Serves a thumbnail of `server_name`/`media_id` for the query.
async fn thumbnail(
    s: &AppState,
    server_name: &str,
    media_id: &str,
    query: Result<Query<ThumbnailQuery>, axum::extract::rejection::QueryRejection>,
    authenticated: bool,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| Error::InvalidParam(format!("bad query string: {e}")))?;
    let width = dimension("width", q.width.as_deref())?;
    let height = dimension("height", q.height.as_deref())?;
    let method = match q.method.as_deref() {
        None | Some("scale") => thumbnail::Method::Scale,
        Some("crop") => thumbnail::Method::Crop,
        Some(m) => return Err(Error::InvalidParam(format!("unknown method {m:?}: use crop or scale")).into()),
    };
    let content = uploaded_content(s, server_name, media_id, q.timeout_ms).await?;
    let request = thumbnail::Request { width, height, method };
    let (bytes, content_type) =
        s.media.thumbnail(&content.sha256, content.content_type.as_deref(), request).await.map_err(|e| match e {
            thumbnail::Error::NotAnImage | thumbnail::Error::Failed(_) => ApiError::from(Error::Unknown(e.to_string())),
            thumbnail::Error::TooLarge => Error::TooLarge(e.to_string()).into(),
            thumbnail::Error::Missing => Error::NotFound(e.to_string()).into(),
            thumbnail::Error::Busy | thumbnail::Error::Store(_) => Error::Internal(e.to_string()).into(),
        })?;
    let ext = if content_type == "image/png" { "png" } else { "jpg" };
    let disposition =
        ContentDisposition::new(ContentDispositionType::Inline).with_filename(Some(format!("thumbnail.{ext}")));
    let mut res = (StatusCode::OK, bytes).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&disposition.to_string()) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    media_headers(&mut res, authenticated);
    Ok(res)
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
pub async fn get_content_route(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    query: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> ApiResult<Response> {
    authenticate(&s, &req.into_parts().0)?;
    download(&s, &server_name, &media_id, None, query.map(|q| q.0).unwrap_or_default(), true).await
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}`
pub async fn get_content_as_filename_route(
    State(s): State<AppState>,
    Path((server_name, media_id, filename)): Path<(String, String, String)>,
    query: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> ApiResult<Response> {
    authenticate(&s, &req.into_parts().0)?;
    download(&s, &server_name, &media_id, Some(filename), query.map(|q| q.0).unwrap_or_default(), true).await
}

/// # `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub async fn get_content_thumbnail_route(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    query: Result<Query<ThumbnailQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> ApiResult<Response> {
    authenticate(&s, &req.into_parts().0)?;
    thumbnail(&s, &server_name, &media_id, query, true).await
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}`
///
/// Legacy and unauthenticated (deprecated since Matrix 1.11, still used by older clients).
pub async fn get_content_legacy_route(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    query: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    download(&s, &server_name, &media_id, None, query.map(|q| q.0).unwrap_or_default(), false).await
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}`
pub async fn get_content_as_filename_legacy_route(
    State(s): State<AppState>,
    Path((server_name, media_id, filename)): Path<(String, String, String)>,
    query: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    download(&s, &server_name, &media_id, Some(filename), query.map(|q| q.0).unwrap_or_default(), false).await
}

/// # `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}`
pub async fn get_content_thumbnail_legacy_route(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    query: Result<Query<ThumbnailQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    thumbnail(&s, &server_name, &media_id, query, false).await
}

fn media_config(s: &AppState) -> Json<Value> {
    Json(json!({"m.upload.size": s.media.limits().max_upload_bytes}))
}

/// # `GET /_matrix/client/v1/media/config`
pub async fn get_media_config_route(
    State(s): State<AppState>,
    body: Ruma<authenticated_media::get_media_config::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(media_config(&s))
}

/// # `GET /_matrix/media/v3/config`
#[allow(deprecated)]
pub async fn get_media_config_legacy_route(
    State(s): State<AppState>,
    body: Ruma<media::get_media_config::v3::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(media_config(&s))
}

/// # `GET /_matrix/client/v1/media/preview_url`
///
/// Always an empty preview: see the module docs.
pub async fn get_media_preview_route(
    body: Ruma<authenticated_media::get_media_preview::v1::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/media/v3/preview_url`
#[allow(deprecated)]
pub async fn get_media_preview_legacy_route(
    body: Ruma<media::get_media_preview::v3::Request>,
) -> ApiResult<Json<Value>> {
    body.sender()?;
    Ok(Json(json!({})))
}
