//! Media of other servers: fetched from the origin with the federation media endpoints
//! (`GET /_matrix/federation/v1/media/download/{mediaId}`, a `multipart/mixed` answer, Matrix
//! 1.11) and cached: the bytes in the media store like an upload, the metadata in
//! [`Tree::RemoteMedia`], so a second download is served locally.
//!
//! The core only speaks to the origin and keeps the records; the caller (the HTTP layer) puts
//! the bytes in the media store between [`Core::fetch_remote_media`] and
//! [`Core::store_remote_media`]. At most `REMOTE_MEDIA_FETCHES_MAX` downloads run at once, and
//! a file over the caller's size bound is refused.

use std::time::Duration;

use ruma::{
    api::federation::authenticated_media::{get_content, FileOrLocation},
    ServerName,
};

use crate::{
    core::{media::valid_media_id, media::MediaContent, to_json, Core, Error, Result},
    store::{key, Batch, Tree},
};

/// Longest wait for a remote media download.
pub const REMOTE_MEDIA_TIMEOUT: Duration = Duration::from_secs(60);

/// A file fetched from its origin.
#[derive(Debug)]
pub struct RemoteFile {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Its `Content-Type`, if given.
    pub content_type: Option<String>,
    /// Its file name, if given.
    pub filename: Option<String>,
}

impl Core {
    /// The cached content of `mxc://server/media_id`, if it was fetched before.
    pub fn remote_media(&self, server: &ServerName, media_id: &str) -> Result<Option<MediaContent>> {
        if !valid_media_id(media_id) {
            return Ok(None);
        }
        self.get_json(Tree::RemoteMedia, &key(&[server.as_bytes(), media_id.as_bytes()]))
    }

    /// Record that `mxc://server/media_id` is cached as `content` (already durable in the media
    /// store).
    pub async fn store_remote_media(&self, server: &ServerName, media_id: &str, content: &MediaContent) -> Result<()> {
        let mut b = Batch::new();
        b.put(Tree::RemoteMedia, key(&[server.as_bytes(), media_id.as_bytes()]), to_json(content));
        self.commit(b, |_, _, _| Ok(())).await
    }

    /// Download `mxc://server/media_id` from its origin; refuses files over `max_bytes`.
    pub async fn fetch_remote_media(&self, server: &ServerName, media_id: &str, max_bytes: u64) -> Result<RemoteFile> {
        if server == self.server_name() {
            return Err(Error::NotFound("media not found".into()));
        }
        if !valid_media_id(media_id) {
            return Err(Error::NotFound("media not found".into()));
        }
        let _slot = self
            .fed
            .media_fetches
            .acquire()
            .await
            .map_err(|_| Error::Internal("remote media downloads are shut down".into()))?;
        let req = get_content::v1::Request::new(media_id.to_owned());
        // For a client, media that cannot be fetched now is media that is not found (as for an
        // unknown id); the message says why.
        let res = match tokio::time::timeout(REMOTE_MEDIA_TIMEOUT, self.federation_request(server, req)).await {
            Ok(Ok(res)) => res,
            Ok(Err(e @ (Error::NotFound(_) | Error::Store(_) | Error::Internal(_)))) => return Err(e),
            Ok(Err(e)) => return Err(Error::NotFound(format!("media not available: {e}"))),
            Err(_) => return Err(Error::NotFound(format!("media not available: {server} did not send it in time"))),
        };
        match res.content {
            FileOrLocation::File(c) => {
                if c.file.len() as u64 > max_bytes {
                    return Err(Error::TooLarge(format!("remote media is larger than the limit of {max_bytes} bytes")));
                }
                let filename =
                    c.content_disposition.and_then(|d| d.filename).filter(|f| !f.is_empty() && f.len() <= 255);
                let content_type = c.content_type.filter(|t| !t.is_empty() && t.len() <= 255);
                Ok(RemoteFile { bytes: c.file, content_type, filename })
            }
            // A redirect would lead off the mesh: not followed.
            FileOrLocation::Location(_) => Err(Error::NotFound("the origin redirects this media elsewhere".into())),
            _ => Err(Error::NotFound("the origin answered with no content".into())),
        }
    }
}
