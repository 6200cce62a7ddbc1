//! Local media metadata: the `mxc://` URIs this node handed out, what was uploaded under each
//! (type, name, size, content hash, uploader), and reservations for asynchronous uploads
//! (`POST /_matrix/media/v1/create`).
//!
//! The bytes live outside the core, in a [`crate::media::MediaStore`] keyed by content hash.
//! Callers store the content durably *before* [`Core::create_media`] or
//! [`Core::complete_media`], so a committed record always points at content that is on disk.

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::{to_json, Core, Error, Result};
use crate::store::{key, prefix, Batch, Tree};

/// How long a reserved `mxc://` URI may wait for its content (the spec's `unused_expires_at`):
/// 24 hours, as Synapse.
pub const PENDING_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Length of generated media ids (`[A-Za-z0-9]`, ~143 bits).
const MEDIA_ID_LEN: usize = 24;

/// What is known about one local media item.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaRecord {
    /// The uploader.
    pub uploader: OwnedUserId,
    /// When the URI was created (ms).
    pub created_ms: u64,
    /// The uploaded content; `None` while the URI is reserved but not yet uploaded.
    pub content: Option<MediaContent>,
    /// For a reservation: when it lapses (ms).
    pub expires_ms: Option<u64>,
}

/// Uploaded content, as described by its upload request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaContent {
    /// The `Content-Type` of the upload, if any.
    pub content_type: Option<String>,
    /// The `filename` of the upload, if any.
    pub filename: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes: the key of the content in the media store.
    pub sha256: String,
}

impl MediaRecord {
    /// Whether this is a reservation whose time ran out at `now_ms`.
    pub fn lapsed(&self, now_ms: u64) -> bool {
        self.content.is_none() && self.expires_ms.is_some_and(|e| e <= now_ms)
    }
}

/// Whether `id` can be a media id (the spec's `[A-Za-z0-9_-]+`, bounded).
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

const MEDIA_ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

impl Core {
    /// `mxc://<this server>/<media_id>`.
    pub fn mxc_uri(&self, media_id: &str) -> String {
        format!("mxc://{}/{}", self.server_name(), media_id)
    }

    /// The record of local media `media_id`, if any (lapsed reservations included; check
    /// [`MediaRecord::lapsed`]).
    pub fn media(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        if !valid_media_id(media_id) {
            return Ok(None);
        }
        self.get_json(Tree::Media, media_id.as_bytes())
    }

    /// Records uploaded `content` under a new media id, durably; returns the id. The content
    /// must already be durable in the media store.
    pub async fn create_media(&self, uploader: &UserId, content: MediaContent) -> Result<String> {
        let id = self.random_chars(MEDIA_ID_CHARS, MEDIA_ID_LEN);
        let record = MediaRecord {
            uploader: uploader.to_owned(),
            created_ms: self.now_ms(),
            content: Some(content),
            expires_ms: None,
        };
        let mut batch = Batch::new();
        batch.put(Tree::Media, id.as_bytes(), to_json(&record));
        self.commit(batch, |_, _, _| Ok(())).await?;
        Ok(id)
    }

    /// Reserves a new media id for `uploader` to upload to later (`/media/v1/create`); returns
    /// it and when it lapses. At most `max_pending` reservations per user are open at once;
    /// lapsed ones are dropped here.
    pub async fn reserve_media(&self, uploader: &UserId, max_pending: usize) -> Result<(String, u64)> {
        let id = self.random_chars(MEDIA_ID_CHARS, MEDIA_ID_LEN);
        let now = self.now_ms();
        let expires = now.saturating_add(PENDING_TTL_MS);
        let user_prefix = prefix(&[uploader.as_bytes()]);
        self.commit(Batch::new(), |batch, _, _| {
            // Under the sequencer lock: concurrent reservations cannot both pass the count.
            let mut open = 0;
            for (k, v) in self.store.scan_prefix(Tree::MediaPending, &user_prefix, usize::MAX)? {
                let exp = super::u64_from(&v)?;
                if exp <= now {
                    batch.delete(Tree::MediaPending, k.clone());
                    let media_id = &k[user_prefix.len()..];
                    batch.delete(Tree::Media, media_id.to_vec());
                } else {
                    open += 1;
                }
            }
            if open >= max_pending {
                return Err(Error::LimitExceeded(format!(
                    "too many pending uploads ({open}); upload to or let lapse the mxc:// URIs you hold"
                )));
            }
            let record = MediaRecord {
                uploader: uploader.to_owned(),
                created_ms: now,
                content: None,
                expires_ms: Some(expires),
            };
            batch.put(Tree::Media, id.as_bytes(), to_json(&record));
            batch.put(Tree::MediaPending, key(&[uploader.as_bytes(), id.as_bytes()]), expires.to_be_bytes().to_vec());
            Ok(())
        })
        .await?;
        Ok((id, expires))
    }

    /// Checks that `uploader` may upload to reserved `media_id` now: it exists, is theirs, has
    /// not lapsed and has no content yet. Call before reading the body; [`Core::complete_media`]
    /// checks again.
    pub fn check_media_upload(&self, uploader: &UserId, media_id: &str) -> Result<()> {
        let record = self.media(media_id)?;
        check_upload(record.as_ref(), uploader, self.now_ms())
    }

    /// Records uploaded `content` for the reserved `media_id`, durably. The content must already
    /// be durable in the media store.
    pub async fn complete_media(&self, uploader: &UserId, media_id: &str, content: MediaContent) -> Result<()> {
        let now = self.now_ms();
        self.commit(Batch::new(), |batch, _, _| {
            let mut record = self.media(media_id)?;
            check_upload(record.as_ref(), uploader, now)?;
            let record = record.as_mut().ok_or_else(|| Error::Internal("checked above".into()))?;
            record.content = Some(content);
            record.expires_ms = None;
            batch.put(Tree::Media, media_id.as_bytes(), to_json(&*record));
            batch.delete(Tree::MediaPending, key(&[uploader.as_bytes(), media_id.as_bytes()]));
            Ok(())
        })
        .await
    }
}

fn check_upload(record: Option<&MediaRecord>, uploader: &UserId, now_ms: u64) -> Result<()> {
    match record {
        None => Err(Error::NotFound("unknown media id".into())),
        Some(r) if r.lapsed(now_ms) => Err(Error::NotFound("the reservation of this media id has lapsed".into())),
        Some(r) if r.uploader != uploader => Err(Error::Forbidden("this media id was reserved by another user".into())),
        Some(r) if r.content.is_some() => Err(Error::CannotOverwriteMedia("media already uploaded".into())),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{clock::Clock, identity::Identity, store::MemoryStore};

    struct FixedClock(std::sync::atomic::AtomicU64);
    impl Clock for FixedClock {
        fn now_ms(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn core() -> (Arc<Core>, Arc<FixedClock>) {
        let clock = Arc::new(FixedClock(1_000.into()));
        let core =
            Core::open(Arc::new(MemoryStore::default()), Identity::generate(), clock.clone(), Default::default())
                .expect("open");
        (core, clock)
    }

    fn content(n: u64) -> MediaContent {
        MediaContent { content_type: Some("text/plain".into()), filename: None, size: n, sha256: "ab".repeat(32) }
    }

    #[tokio::test]
    async fn create_and_read() {
        let (core, _) = core();
        let alice = core.user_id("alice").expect("user id");
        let id = core.create_media(&alice, content(3)).await.expect("create");
        assert!(valid_media_id(&id));
        let r = core.media(&id).expect("read").expect("exists");
        assert_eq!(r.content, Some(content(3)));
        assert!(core.mxc_uri(&id).starts_with("mxc://"));
        assert_eq!(core.media("nope").expect("read"), None);
        assert_eq!(core.media("../etc/passwd").expect("read"), None);
    }

    #[tokio::test]
    async fn reservations_are_bounded_owned_and_lapse() {
        let (core, clock) = core();
        let alice = core.user_id("alice").expect("user id");
        let bob = core.user_id("bob").expect("user id");
        let (a1, exp) = core.reserve_media(&alice, 2).await.expect("first");
        assert_eq!(exp, 1_000 + PENDING_TTL_MS);
        let (a2, _) = core.reserve_media(&alice, 2).await.expect("second");
        assert!(matches!(core.reserve_media(&alice, 2).await, Err(Error::LimitExceeded(_))));
        core.reserve_media(&bob, 2).await.expect("bob has his own budget");

        assert!(matches!(core.check_media_upload(&bob, &a1), Err(Error::Forbidden(_))));
        core.check_media_upload(&alice, &a1).expect("may upload");
        core.complete_media(&alice, &a1, content(5)).await.expect("complete");
        assert!(matches!(core.complete_media(&alice, &a1, content(5)).await, Err(Error::CannotOverwriteMedia(_))));
        // Completing frees a slot.
        let (a3, _) = core.reserve_media(&alice, 2).await.expect("slot freed");

        clock.0.store(1_000 + PENDING_TTL_MS, std::sync::atomic::Ordering::SeqCst);
        assert!(core.media(&a2).expect("read").expect("still stored").lapsed(core.now_ms()));
        assert!(matches!(core.check_media_upload(&alice, &a2), Err(Error::NotFound(_))));
        // Lapsed reservations are dropped and no longer count.
        core.reserve_media(&alice, 2).await.expect("after lapse");
        assert_eq!(core.media(&a2).expect("read"), None);
        assert_eq!(core.media(&a3).expect("read"), None);
        assert_eq!(core.media(&a1).expect("read").and_then(|r| r.content), Some(content(5)));
    }
}
