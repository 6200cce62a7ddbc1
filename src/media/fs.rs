//! [`FsMediaStore`]: media as files under one directory (normally `<data-dir>/media`).
//!
//! ```text
//! media/tmp/<random>                       uploads being written (emptied at start)
//! media/<sha[0..2]>/<sha>                  content, named by its SHA-256
//! media/thumbnails/<sha[0..2]>/<sha>/<n>   thumbnails of that content
//! ```

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{valid_blob_name, ByteStream, MediaStore, MediaWriter};

/// Read size for downloads.
const CHUNK_BYTES: usize = 64 * 1024;

/// Media as files; see the module docs for the layout.
pub struct FsMediaStore {
    root: Arc<PathBuf>,
}

impl FsMediaStore {
    /// Opens (creating if needed) the store in `root`, and deletes temp files left by uploads
    /// that were interrupted by a crash.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let tmp = root.join("tmp");
        if !tmp.exists() {
            std::fs::create_dir_all(&tmp)?;
            // Make the new directories durable, so content renamed into them later is too.
            std::fs::File::open(&root)?.sync_all()?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale upload");
            }
        }
        Ok(FsMediaStore { root: Arc::new(root) })
    }

    fn content_path(&self, name: &str) -> io::Result<PathBuf> {
        if !valid_blob_name(name) || name.contains('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad media name {name:?}")));
        }
        Ok(self.root.join(&name[..2]).join(name))
    }

    /// Thumbnails of `of` are named `<of>.<suffix>`; they live in `thumbnails/<of[0..2]>/<of>/`.
    fn derived_dir(&self, of: &str) -> io::Result<PathBuf> {
        if !valid_blob_name(of) || of.contains('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad media name {of:?}")));
        }
        Ok(self.root.join("thumbnails").join(&of[..2]).join(of))
    }

    /// The file holding blob `name`: content, or a thumbnail (`<content>.<suffix>`).
    fn path(&self, name: &str) -> io::Result<PathBuf> {
        match name.split_once('.') {
            None => self.content_path(name),
            Some((of, suffix)) if valid_blob_name(name) && !suffix.is_empty() => Ok(self.derived_dir(of)?.join(suffix)),
            Some(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad media name {name:?}"))),
        }
    }
}

/// fsync a directory, so a rename or create inside it is durable.
async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await.map_err(io::Error::other)?
}

/// Creates `dir` and makes its entry durable in its parent(s) up to `root`.
async fn create_dir_durable(root: &Path, dir: &Path) -> io::Result<()> {
    if tokio::fs::metadata(dir).await.is_ok() {
        return Ok(());
    }
    tokio::fs::create_dir_all(dir).await?;
    let mut cur = dir.parent();
    while let Some(parent) = cur {
        sync_dir(parent).await?;
        if parent == root {
            break;
        }
        cur = parent.parent();
    }
    Ok(())
}

struct FsWriter {
    root: Arc<PathBuf>,
    tmp_path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // Not finished (finish takes the file): discard the partial upload.
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

impl MediaWriter for FsWriter {
    fn write<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            match self.file.as_mut() {
                Some(f) => f.write_all(chunk).await,
                None => Err(io::Error::other("writer already finished")),
            }
        })
    }

    fn finish(mut self: Box<Self>, name: String) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async move {
            let store = FsMediaStore { root: self.root.clone() };
            let dest = store.content_path(&name)?;
            let mut file = self.file.take().ok_or_else(|| io::Error::other("writer already finished"))?;
            let tmp_path = self.tmp_path.clone();
            let result = async {
                file.flush().await?;
                file.sync_all().await?;
                drop(file);
                let dir = dest.parent().ok_or_else(|| io::Error::other("content path has no parent"))?;
                create_dir_durable(&store.root, dir).await?;
                if tokio::fs::metadata(&dest).await.is_ok() {
                    // Same hash, same bytes: keep the stored copy.
                    tokio::fs::remove_file(&tmp_path).await?;
                    return Ok(());
                }
                tokio::fs::rename(&tmp_path, &dest).await?;
                sync_dir(dir).await
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp_path).await;
            }
            result
        })
    }
}

impl MediaStore for FsMediaStore {
    fn begin(&self) -> BoxFuture<'_, io::Result<Box<dyn MediaWriter>>> {
        Box::pin(async move {
            let name: String = (0..20).map(|_| (b'a' + rand::random::<u8>() % 26) as char).collect();
            let tmp_path = self.root.join("tmp").join(name);
            let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp_path).await?;
            Ok(Box::new(FsWriter { root: self.root.clone(), tmp_path, file: Some(file) }) as Box<dyn MediaWriter>)
        })
    }

    fn open(&self, name: &str) -> BoxFuture<'_, io::Result<Option<(u64, ByteStream)>>> {
        let path = self.path(name);
        Box::pin(async move {
            let file = match tokio::fs::File::open(path?).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = file.metadata().await?.len();
            let stream = futures_util::stream::unfold(Some(file), |file| async move {
                let mut file = file?;
                let mut buf = vec![0u8; CHUNK_BYTES];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some(file)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            });
            Ok(Some((len, stream.boxed())))
        })
    }

    fn read(&self, name: &str, max_bytes: u64) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        let path = self.path(name);
        Box::pin(async move {
            let path = path?;
            match tokio::fs::metadata(&path).await {
                Ok(m) if m.len() > max_bytes => return Err(io::ErrorKind::FileTooLarge.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(Bytes::from(b))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn put_derived(&self, of: &str, name: &str, bytes: Bytes) -> BoxFuture<'_, io::Result<()>> {
        let dir = self.derived_dir(of);
        let path = self.path(name);
        Box::pin(async move {
            let (dir, path) = (dir?, path?);
            if path.parent() != Some(dir.as_path()) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "derived blob of another content"));
            }
            tokio::fs::create_dir_all(&dir).await?;
            // Write then rename: readers see the whole thumbnail or none.
            let tmp: String = (0..20).map(|_| (b'a' + rand::random::<u8>() % 26) as char).collect();
            let tmp = self.root.join("tmp").join(tmp);
            let result = async {
                tokio::fs::write(&tmp, &bytes).await?;
                tokio::fs::rename(&tmp, &path).await
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            result
        })
    }

    fn derived_count(&self, of: &str) -> BoxFuture<'_, io::Result<usize>> {
        let dir = self.derived_dir(of);
        Box::pin(async move {
            let mut entries = match tokio::fs::read_dir(dir?).await {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e),
            };
            let mut n = 0;
            while entries.next_entry().await?.is_some() {
                n += 1;
            }
            Ok(n)
        })
    }
}
