//! Media content: where uploaded bytes and thumbnails live, and how uploads reach them.
//!
//! The core keeps only metadata ([`crate::core::media`]). The bytes go through the
//! [`MediaStore`] trait: [`FsMediaStore`] keeps them as files under `<data-dir>/media/`, and
//! [`MemoryMediaStore`] keeps them in memory for the simulator and unit tests.
//!
//! Content is addressed by its SHA-256 (lowercase hex), so the same file uploaded twice is
//! stored once. Thumbnails are derived blobs named after the content hash and the thumbnail
//! size (see [`thumbnail`]); they can be regenerated, so they need no durability, only
//! atomicity (a reader never sees half a file).
//!
//! # Durability
//! [`Media::ingest`] streams an upload into a [`MediaWriter`], which writes a temp file, fsyncs
//! it, renames it into place and fsyncs the directory in [`MediaWriter::finish`]. Only then do
//! callers commit the metadata (which waits for the store's group commit) and answer 200.

mod fs;
pub mod thumbnail;

pub use fs::FsMediaStore;

use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::BoxStream, Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::core::media::MediaContent;

/// The bytes of a stored blob, in chunks.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Where media bytes live. Names are produced by this module (content hashes and thumbnail
/// names, `[0-9a-z._-]`); implementations may reject any other name.
pub trait MediaStore: Send + Sync + 'static {
    /// Starts writing a new content blob.
    fn begin(&self) -> BoxFuture<'_, io::Result<Box<dyn MediaWriter>>>;
    /// Opens blob `name`: its length and its bytes; `None` if there is no such blob.
    fn open(&self, name: &str) -> BoxFuture<'_, io::Result<Option<(u64, ByteStream)>>>;
    /// Reads blob `name` whole, if it exists and is at most `max_bytes` long (else
    /// `ErrorKind::FileTooLarge`).
    fn read(&self, name: &str, max_bytes: u64) -> BoxFuture<'_, io::Result<Option<Bytes>>>;
    /// Stores a derived blob (a thumbnail of content `of`) under `name`, atomically but not
    /// necessarily durably.
    fn put_derived(&self, of: &str, name: &str, bytes: Bytes) -> BoxFuture<'_, io::Result<()>>;
    /// How many derived blobs of content `of` are stored (to bound the thumbnail cache).
    fn derived_count(&self, of: &str) -> BoxFuture<'_, io::Result<usize>>;
}

/// A blob being written; dropping it without [`MediaWriter::finish`] discards the bytes.
pub trait MediaWriter: Send {
    /// Appends `chunk`.
    fn write<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, io::Result<()>>;
    /// Makes everything written durable under `name`. If a blob `name` exists already (same
    /// content, as names are content hashes), the new copy is dropped.
    fn finish(self: Box<Self>, name: String) -> BoxFuture<'static, io::Result<()>>;
}

/// Whether `name` is a blob name this module could have produced.
pub fn valid_blob_name(name: &str) -> bool {
    name.len() >= 3
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is longer than the limit.
    #[error("media is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// Reading the request body failed (client went away, ...).
    #[error("reading the upload failed: {0}")]
    Body(String),
    /// The media store failed.
    #[error("storing the upload failed: {0}")]
    Store(#[from] io::Error),
}

/// Limits of the media service (from `config::Limits`).
#[derive(Clone, Debug)]
pub struct MediaLimits {
    /// Largest upload in bytes.
    pub max_upload_bytes: u64,
    /// Largest image (width × height) decoded for thumbnails.
    pub thumbnail_source_pixels_max: u64,
    /// Reserved-but-not-uploaded `mxc://` URIs per user.
    pub pending_uploads_per_user_max: usize,
}

/// The media service the HTTP layer uses: a [`MediaStore`], limits, a bound on concurrent
/// thumbnailing, and a signal for downloads waiting on asynchronous uploads.
pub struct Media {
    store: Arc<dyn MediaStore>,
    limits: MediaLimits,
    /// One thumbnail decode at a time: decoding is the memory-hungry part.
    thumbnail_slots: tokio::sync::Semaphore,
    /// Bumped whenever an asynchronous upload completes; downloads waiting for one watch it.
    uploads: tokio::sync::watch::Sender<u64>,
}

impl Media {
    /// A media service over `store`.
    pub fn new(store: Arc<dyn MediaStore>, limits: MediaLimits) -> Self {
        Media {
            store,
            limits,
            thumbnail_slots: tokio::sync::Semaphore::new(1),
            uploads: tokio::sync::watch::channel(0).0,
        }
    }

    /// The blob store.
    pub fn store(&self) -> &Arc<dyn MediaStore> {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> &MediaLimits {
        &self.limits
    }

    /// Streams `body` into the store, hashing it and enforcing the size limit, and makes it
    /// durable. Returns the description to record in the core.
    pub async fn ingest<S, E>(
        &self,
        body: S,
        content_type: Option<String>,
        filename: Option<String>,
    ) -> Result<MediaContent, IngestError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let max = self.limits.max_upload_bytes;
        let mut writer = self.store.begin().await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| IngestError::Body(e.to_string()))?;
            size = size.saturating_add(chunk.len() as u64);
            if size > max {
                return Err(IngestError::TooLarge(max));
            }
            hasher.update(&chunk);
            writer.write(&chunk).await?;
        }
        let sha256 = crate::identity::hex(&hasher.finalize());
        writer.finish(sha256.clone()).await?;
        Ok(MediaContent { content_type, filename, size, sha256 })
    }

    /// Tells downloads waiting for asynchronous uploads that one completed.
    pub fn notify_uploaded(&self) {
        self.uploads.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever an asynchronous upload completes.
    pub fn watch_uploads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.uploads.subscribe()
    }

    /// A thumbnail of content `sha256` (declared type `content_type`) for the request, from the
    /// cache or freshly made (and cached while the content has fewer than
    /// [`thumbnail::CACHED_PER_CONTENT_MAX`] thumbnails). Returns the bytes and their type.
    pub async fn thumbnail(
        &self,
        sha256: &str,
        content_type: Option<&str>,
        req: thumbnail::Request,
    ) -> Result<(Bytes, &'static str), thumbnail::Error> {
        if !thumbnail::declared_type_is_thumbnailable(content_type) {
            return Err(thumbnail::Error::NotAnImage);
        }
        let target = req.target();
        // Both outputs are tried: the name says which format a cached thumbnail has.
        for format in [thumbnail::Output::Png, thumbnail::Output::Jpeg] {
            let name = target.blob_name(sha256, format);
            if let Some(bytes) = self.store.read(&name, u64::MAX).await.map_err(thumbnail::Error::Store)? {
                return Ok((bytes, format.content_type()));
            }
        }
        let _slot = self.thumbnail_slots.acquire().await.map_err(|_| thumbnail::Error::Busy)?;
        let source = match self.store.read(sha256, self.limits.max_upload_bytes).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(thumbnail::Error::Missing),
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => return Err(thumbnail::Error::TooLarge),
            Err(e) => return Err(thumbnail::Error::Store(e)),
        };
        let max_pixels = self.limits.thumbnail_source_pixels_max;
        let (bytes, format) = tokio::task::spawn_blocking(move || thumbnail::generate(&source, target, max_pixels))
            .await
            .map_err(|e| thumbnail::Error::Failed(format!("thumbnail task failed: {e}")))??;
        let bytes = Bytes::from(bytes);
        match self.store.derived_count(sha256).await {
            Ok(n) if n < thumbnail::CACHED_PER_CONTENT_MAX => {
                let name = target.blob_name(sha256, format);
                if let Err(e) = self.store.put_derived(sha256, &name, bytes.clone()).await {
                    tracing::warn!(error = %e, %name, "cannot cache thumbnail");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot count cached thumbnails"),
        }
        Ok((bytes, format.content_type()))
    }
}

/// A [`MediaStore`] in memory, for the simulator and unit tests. "Durable" means "stored".
#[derive(Default)]
pub struct MemoryMediaStore {
    blobs: Arc<Mutex<BTreeMap<String, Bytes>>>,
    /// `content name → derived names`.
    derived: Mutex<BTreeMap<String, Vec<String>>>,
}

struct MemoryWriter {
    buf: Vec<u8>,
    blobs: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MediaWriter for MemoryWriter {
    fn write<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        self.buf.extend_from_slice(chunk);
        Box::pin(async { Ok(()) })
    }

    fn finish(self: Box<Self>, name: String) -> BoxFuture<'static, io::Result<()>> {
        let MemoryWriter { buf, blobs } = *self;
        let mut blobs = blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.entry(name).or_insert_with(|| Bytes::from(buf));
        Box::pin(async { Ok(()) })
    }
}

impl MemoryMediaStore {
    fn get(&self, name: &str) -> Option<Bytes> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

impl MediaStore for MemoryMediaStore {
    fn begin(&self) -> BoxFuture<'_, io::Result<Box<dyn MediaWriter>>> {
        let writer = MemoryWriter { buf: Vec::new(), blobs: self.blobs.clone() };
        Box::pin(async move { Ok(Box::new(writer) as Box<dyn MediaWriter>) })
    }

    fn open(&self, name: &str) -> BoxFuture<'_, io::Result<Option<(u64, ByteStream)>>> {
        let found = self.get(name);
        Box::pin(async move {
            Ok(found.map(|b| {
                let len = b.len() as u64;
                let stream: ByteStream = futures_util::stream::once(async move { Ok(b) }).boxed();
                (len, stream)
            }))
        })
    }

    fn read(&self, name: &str, max_bytes: u64) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        let found = self.get(name);
        Box::pin(async move {
            match found {
                Some(b) if b.len() as u64 > max_bytes => Err(io::ErrorKind::FileTooLarge.into()),
                other => Ok(other),
            }
        })
    }

    fn put_derived(&self, of: &str, name: &str, bytes: Bytes) -> BoxFuture<'_, io::Result<()>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), bytes);
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        let names = derived.entry(of.to_owned()).or_default();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
        Box::pin(async { Ok(()) })
    }

    fn derived_count(&self, of: &str) -> BoxFuture<'_, io::Result<usize>> {
        let n = self.derived.lock().unwrap_or_else(|e| e.into_inner()).get(of).map_or(0, Vec::len);
        Box::pin(async move { Ok(n) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u64) -> MediaLimits {
        MediaLimits { max_upload_bytes: max, thumbnail_source_pixels_max: 1_000_000, pending_uploads_per_user_max: 4 }
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    async fn roundtrip(store: Arc<dyn MediaStore>) {
        let media = Media::new(store.clone(), limits(10));
        let c = media.ingest(chunks(&[b"hello ", b"you"]), Some("text/plain".into()), None).await.expect("ingest");
        assert_eq!(c.size, 9);
        assert_eq!(c.sha256, crate::identity::hex(&Sha256::digest(b"hello you")));
        let (len, stream) = store.open(&c.sha256).await.expect("open").expect("exists");
        assert_eq!(len, 9);
        let parts: Vec<Bytes> = stream.map(|r| r.expect("chunk")).collect().await;
        assert_eq!(parts.concat(), b"hello you");
        assert_eq!(store.read(&c.sha256, 9).await.expect("read").as_deref(), Some(&b"hello you"[..]));
        let err = store.read(&c.sha256, 8).await.expect_err("over max");
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        // Same content again: same name, still readable.
        let again = media.ingest(chunks(&[b"hello you"]), None, None).await.expect("ingest again");
        assert_eq!(again.sha256, c.sha256);
        assert!(matches!(
            media.ingest(chunks(&[b"0123456789", b"x"]), None, None).await,
            Err(IngestError::TooLarge(10))
        ));
        assert!(store.open("0000").await.expect("open").is_none());

        store.put_derived(&c.sha256, &format!("{}.t1", c.sha256), Bytes::from_static(b"t")).await.expect("derived");
        store.put_derived(&c.sha256, &format!("{}.t1", c.sha256), Bytes::from_static(b"t")).await.expect("derived");
        assert_eq!(store.derived_count(&c.sha256).await.expect("count"), 1);
        assert_eq!(store.derived_count("ffff").await.expect("count"), 0);
    }

    #[tokio::test]
    async fn memory_store_roundtrip() {
        roundtrip(Arc::new(MemoryMediaStore::default())).await;
    }

    #[tokio::test]
    async fn fs_store_roundtrip_and_no_temp_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FsMediaStore::open(dir.path().join("media")).expect("open"));
        roundtrip(store.clone()).await;
        // An abandoned upload leaves no temp file behind.
        let mut w = store.begin().await.expect("begin");
        w.write(b"abandoned").await.expect("write");
        drop(w);
        let tmp = std::fs::read_dir(dir.path().join("media").join("tmp")).expect("tmp dir");
        assert_eq!(tmp.count(), 0);
        assert!(!valid_blob_name("../x") && !valid_blob_name("a/b") && !valid_blob_name(".ab"));
        assert!(store.open("../../etc").await.is_err());
    }
}
