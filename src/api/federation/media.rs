//! Media across servers: this server's media served to others (`multipart/mixed`, Matrix 1.11),
//! and the client side's fetch-and-cache of other servers' media (`core/federation/media.rs`).

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use ruma::{
    api::federation::authenticated_media::{
        get_content, get_content_thumbnail, Content, ContentMetadata, FileOrLocation,
    },
    http_headers::{ContentDisposition, ContentDispositionType},
    media::Method,
    ServerName,
};

use crate::{
    api::{
        client::media::uploaded_content,
        error::{ApiError, ApiResult},
        ruma_wrapper::{Ruma, RumaResponse},
        AppState,
    },
    core::{media::MediaContent, Error},
    media::{thumbnail, IngestError},
};

fn file_response(bytes: Vec<u8>, content_type: &str, disposition: ContentDisposition) -> Response {
    let content = Content::new(bytes, content_type.to_owned(), disposition);
    RumaResponse(get_content::v1::Response::new(ContentMetadata::new(), FileOrLocation::File(content))).into_response()
}

/// # `GET /_matrix/federation/v1/media/download/{mediaId}`
pub async fn get_content_route(State(s): State<AppState>, body: Ruma<get_content::v1::Request>) -> ApiResult<Response> {
    body.origin()?;
    let r = &body.body;
    let timeout_ms = u64::try_from(r.timeout_ms.as_millis()).unwrap_or(u64::MAX);
    let content = uploaded_content(&s, s.core.server_name().as_str(), &r.media_id, Some(timeout_ms)).await?;
    let bytes = match s.media.store().read(&content.sha256, s.media.limits().max_upload_bytes).await {
        Ok(Some(b)) => b,
        Ok(None) => return Err(Error::NotFound("media content is missing".into()).into()),
        Err(e) => return Err(Error::Internal(e.to_string()).into()),
    };
    let content_type = content.content_type.as_deref().unwrap_or("application/octet-stream");
    let disposition =
        ContentDisposition::new(ContentDispositionType::Attachment).with_filename(content.filename.clone());
    Ok(file_response(bytes.to_vec(), content_type, disposition))
}

/// # `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
pub async fn get_content_thumbnail_route(
    State(s): State<AppState>,
    body: Ruma<get_content_thumbnail::v1::Request>,
) -> ApiResult<Response> {
    body.origin()?;
    let r = &body.body;
    let dim = |v: ruma::UInt| u32::try_from(u64::from(v)).unwrap_or(u32::MAX).max(1);
    let method = match r.method {
        Some(Method::Crop) => thumbnail::Method::Crop,
        _ => thumbnail::Method::Scale,
    };
    let timeout_ms = u64::try_from(r.timeout_ms.as_millis()).unwrap_or(u64::MAX);
    let content = uploaded_content(&s, s.core.server_name().as_str(), &r.media_id, Some(timeout_ms)).await?;
    let request = thumbnail::Request { width: dim(r.width), height: dim(r.height), method };
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
    Ok(file_response(bytes.to_vec(), content_type, disposition))
}

/// The content of `mxc://server_name/media_id` of another server: from the local cache, or
/// fetched from its origin over federation and cached (bytes in the media store, bounded by
/// `limits.max_upload_bytes`; record in the core).
pub(crate) async fn remote_media_content(
    s: &AppState,
    server_name: &str,
    media_id: &str,
) -> Result<MediaContent, ApiError> {
    let server = <&ServerName>::try_from(server_name).map_err(|_| Error::NotFound("media not found".into()))?;
    if let Some(c) = s.core.remote_media(server, media_id)? {
        match s.media.store().open(&c.sha256).await {
            Ok(Some(_)) => return Ok(c),
            Ok(None) => {
                tracing::warn!(%server, media_id, "cached remote media missing from the media store; fetching again")
            }
            Err(e) => return Err(Error::Internal(e.to_string()).into()),
        }
    }
    let max = s.media.limits().max_upload_bytes;
    let file = s.core.fetch_remote_media(server, media_id, max).await?;
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(file.bytes)) });
    let content = s.media.ingest(body, file.content_type, file.filename).await.map_err(|e| match e {
        IngestError::TooLarge(_) => ApiError::from(Error::TooLarge(e.to_string())),
        IngestError::Body(_) | IngestError::Store(_) => Error::Internal(e.to_string()).into(),
    })?;
    s.core.store_remote_media(server, media_id, &content).await?;
    Ok(content)
}
