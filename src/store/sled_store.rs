//! The production store: one sled database; each [`Tree`] is a one-byte key prefix inside sled's
//! default tree, so a [`Batch`] across trees is one atomic sled batch.

use std::path::Path;

use super::{full_key, scan_bounds, Batch, Entry, KvStore, Op, StoreError, StoreResult, Tree};

/// sled-backed [`KvStore`].
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Open (or create) the database in `dir`, with sled's page cache bounded to `cache_bytes`.
    ///
    /// Fails with [`StoreError::Locked`] if another process has it open.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace)
            // We flush explicitly (group commit); no background flusher waking an idle device.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked(dir.display().to_string())
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => StoreError::Locked(dir.display().to_string()),
                other => StoreError::Backend(other.to_string()),
            })?;
        Ok(Self { db })
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl KvStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.db.get(full_key(tree, key)).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: Batch) -> StoreResult<()> {
        let mut b = sled::Batch::default();
        for op in batch.ops {
            match op {
                Op::Put(t, k, v) => b.insert(full_key(t, &k), v),
                Op::Delete(t, k) => b.remove(full_key(t, &k)),
            }
        }
        self.db.apply_batch(b).map_err(backend)
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        from: Option<&[u8]>,
        to: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<Entry>> {
        let Some((lo, hi)) = scan_bounds(tree, prefix, from, to) else { return Ok(Vec::new()) };
        let iter = self.db.range(lo..hi);
        let mut out = Vec::new();
        let mut push = |r: sled::Result<(sled::IVec, sled::IVec)>| -> StoreResult<bool> {
            let (k, v) = r.map_err(backend)?;
            out.push((k[1..].to_vec(), v.to_vec()));
            Ok(out.len() < limit)
        };
        if reverse {
            for r in iter.rev() {
                if !push(r)? {
                    break;
                }
            }
        } else {
            for r in iter {
                if !push(r)? {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> StoreResult<()> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
