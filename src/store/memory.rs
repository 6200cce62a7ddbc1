//! An in-memory [`KvStore`] for the simulator and unit tests. `flush` marks a durable point:
//! [`MemoryStore::crash`] rolls back to it, which is how the simulator models losing what was
//! not flushed.

use std::{collections::BTreeMap, sync::Mutex};

use super::{full_key, scan_bounds, Batch, Entry, KvStore, Op, StoreResult, Tree};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// A `BTreeMap` store with an undo log back to the last flush.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: Map,
    /// `(key, value before)` for every write since the last flush, oldest first.
    undo: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl MemoryStore {
    /// Forget every write since the last flush (a simulated power cut).
    pub fn crash(&self) {
        let mut inner = self.lock();
        while let Some((k, old)) = inner.undo.pop() {
            match old {
                Some(v) => inner.live.insert(k, v),
                None => inner.live.remove(&k),
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvStore for MemoryStore {
    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.lock().live.get(&full_key(tree, key)).cloned())
    }

    fn apply(&self, batch: Batch) -> StoreResult<()> {
        let mut inner = self.lock();
        for op in batch.ops {
            let (k, old) = match op {
                Op::Put(t, k, v) => {
                    let k = full_key(t, &k);
                    (k.clone(), inner.live.insert(k, v))
                }
                Op::Delete(t, k) => {
                    let k = full_key(t, &k);
                    (k.clone(), inner.live.remove(&k))
                }
            };
            inner.undo.push((k, old));
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
        let inner = self.lock();
        let range = inner.live.range(lo..hi).map(|(k, v)| (k[1..].to_vec(), v.clone()));
        Ok(if reverse { range.rev().take(limit).collect() } else { range.take(limit).collect() })
    }

    fn flush(&self) -> StoreResult<()> {
        self.lock().undo.clear();
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }

    fn flush_is_instant(&self) -> bool {
        true
    }
}
