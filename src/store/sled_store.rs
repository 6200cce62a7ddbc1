//! The production store: one sled database; each [`Tree`] is a one-byte key prefix inside sled's
//! default tree, so a [`Batch`] across trees is one atomic sled batch.
//!
//! Batches are not handed to sled one by one: sled 0.34 starts every batch by writing out its
//! log buffer (`pin_log` → `roll_iobuf`: a `pwrite` and a waiting `sync_file_range` on its IO
//! threads), so a node receiving a transaction of 50 events paid ~150 synchronous writes for
//! what one flush makes durable anyway (10,000 events: 31,444 `pwrite`+`sync_file_range` pairs,
//! a third of the CPU of a catch-up). Applied batches collect in a write buffer that readers see
//! (get and scan merge it over sled), and go to sled as one batch at the next flush, or when the
//! buffer holds [`PENDING_MAX_BYTES`]. Crash semantics are unchanged: what was applied but not
//! flushed may be lost either way (and nothing is acknowledged before its flush), and one sled
//! batch made of several whole batches is still all-or-nothing.

use std::{collections::BTreeMap, path::Path, sync::RwLock};

use super::{full_key, scan_bounds, Batch, Entry, KvStore, Op, StoreError, StoreResult, Tree};

/// Default of the most bytes (keys + values) held in the write buffer before it goes to sled
/// unflushed (`limits.store_write_buffer_bytes`).
pub const PENDING_MAX_BYTES: usize = 4 << 20;

/// sled-backed [`KvStore`].
pub struct SledStore {
    db: sled::Db,
    /// Applied, not yet in sled: full key → value (`None`: deleted).
    pending: RwLock<Pending>,
    pending_max: usize,
}

#[derive(Default)]
struct Pending {
    ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
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
        Ok(Self { db, pending: RwLock::new(Pending::default()), pending_max: PENDING_MAX_BYTES })
    }

    /// A write buffer of at most `bytes` instead of [`PENDING_MAX_BYTES`] (0: every batch goes
    /// to sled at once).
    pub fn with_pending_max(mut self, bytes: usize) -> Self {
        self.pending_max = bytes;
        self
    }

    fn pending(&self) -> std::sync::RwLockWriteGuard<'_, Pending> {
        self.pending.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Readers share the buffer; a drain (under the write lock) waits for them.
    fn pending_read(&self) -> std::sync::RwLockReadGuard<'_, Pending> {
        self.pending.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand the write buffer to sled as one batch (the caller holds the buffer's lock, so no
    /// reader sees the data in neither place).
    fn drain(&self, p: &mut Pending) -> StoreResult<()> {
        if p.ops.is_empty() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for (k, v) in &p.ops {
            match v {
                Some(v) => b.insert(k.as_slice(), v.as_slice()),
                None => b.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(b).map_err(backend)?;
        p.ops.clear();
        p.bytes = 0;
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // What was applied reaches sled (which flushes on drop) even without a last flush.
        if let Err(e) = self.drain(&mut self.pending()) {
            tracing::error!(error = %e, "could not write the last batches to sled");
        }
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl KvStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let k = full_key(tree, key);
        let p = self.pending_read();
        if let Some(v) = p.ops.get(&k) {
            return Ok(v.clone());
        }
        // Under the buffer's lock: a drain cannot move the key to sled between the two looks.
        Ok(self.db.get(k).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: Batch) -> StoreResult<()> {
        let mut p = self.pending();
        for op in batch.ops {
            let (k, v) = match op {
                Op::Put(t, k, v) => (full_key(t, &k), Some(v)),
                Op::Delete(t, k) => (full_key(t, &k), None),
            };
            p.bytes += k.len() + v.as_ref().map_or(0, |v| v.len());
            p.ops.insert(k, v);
        }
        if p.bytes > self.pending_max {
            self.drain(&mut p)?;
        }
        Ok(())
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
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let p = self.pending_read();
        // The buffer's entries in range, merged over sled's (the buffer wins on equal keys; its
        // deletions hide sled's entries).
        let over: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = if reverse {
            p.ops.range(lo.clone()..hi.clone()).rev().collect()
        } else {
            p.ops.range(lo.clone()..hi.clone()).collect()
        };
        let mut over = over.into_iter().peekable();
        let iter = self.db.range(lo..hi);
        let mut base: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if reverse { Box::new(iter.rev()) } else { Box::new(iter) };
        // `a` comes before `b` in the scan's order.
        let before = |a: &[u8], b: &[u8]| if reverse { a > b } else { a < b };
        let mut next_base = base.next().transpose().map_err(backend)?;
        while out.len() < limit {
            let take_over = match (over.peek(), &next_base) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((ok, _)), Some((bk, _))) => !before(bk, ok),
            };
            if take_over {
                let (k, v) = over.next().expect("peeked");
                if next_base.as_ref().is_some_and(|(bk, _)| bk.as_ref() == k.as_slice()) {
                    next_base = base.next().transpose().map_err(backend)?;
                }
                if let Some(v) = v {
                    out.push((k[1..].to_vec(), v.clone()));
                }
            } else {
                let (k, v) = next_base.take().expect("checked");
                out.push((k[1..].to_vec(), v.to_vec()));
                next_base = base.next().transpose().map_err(backend)?;
            }
        }
        Ok(out)
    }

    fn flush(&self) -> StoreResult<()> {
        self.drain(&mut self.pending())?;
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
