//! Storage: a narrow key-value trait, and its implementations.
//!
//! Nothing above this module names sled. The protocol code sees named trees of ordered byte keys,
//! atomic batches that may span trees, and an explicit [`KvStore::flush`] that makes everything
//! written so far durable. [`GroupCommit`] turns many concurrent "make my write durable" requests
//! into one flush.

mod memory;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::SledStore;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// What can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying database reported an error (I/O, corruption).
    #[error("storage error: {0}")]
    Backend(String),
    /// The data directory is already in use by another process.
    #[error("the data directory {0} is already in use by another outpost process")]
    Locked(String),
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Result alias for storage operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// The named trees the node uses. A fixed list, so a typo is a compile error and the key layout
/// is documented in one place (see `docs/storage.md`).
///
/// Prefix ranges by feature area: 1–19 core rooms/users; 20–39 end-to-end encryption and
/// devices; 40–59 receipts, push rules, relations, search and other per-user data; 60–79 media;
/// 80–99 federation and the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tree {
    /// `key → value` node-wide metadata: schema version, counters.
    Meta,
    /// `user_id → UserRecord`.
    Users,
    /// `access_token → (user_id, device_id)`.
    Tokens,
    /// `user_id 0xff device_id → DeviceRecord`.
    Devices,
    /// `user_id 0xff device_id 0xff txn_id → event_id`.
    TxnIds,
    /// `room_id → RoomRecord`.
    Rooms,
    /// `event_id → StoredPdu` (the signed federation-format PDU plus local metadata).
    Pdus,
    /// `room_id 0xff stream_pos(be u64) → event_id`: a room's timeline in arrival order.
    Timeline,
    /// `room_id 0xff event_type 0xff state_key → event_id`: current resolved state.
    RoomState,
    /// `state_group(be u64) → StateGroup` (delta against a parent group).
    StateGroups,
    /// `room_id 0xff event_id → ()`: forward extremities.
    Extremities,
    /// `room_id 0xff event_id → ()`: events some accepted event of the room names among its
    /// `prev_events` — they can never (again) be forward extremities, even if they are stored
    /// after that child (history filled in later).
    Referenced,
    /// `room_id 0xff stream_pos(be u64) → event_id`: soft-failed events no accepted event
    /// builds on yet; the newest are judged again when the room's state changes (see
    /// `Core::recheck_soft_failed`).
    SoftFailed,
    /// `user_id 0xff room_id → Membership` (the user's own view of their rooms).
    UserRooms,
    /// `user_id 0xff room_id-or-empty 0xff type → AccountData`.
    AccountData,
    /// `user_id 0xff filter_id → filter JSON`.
    Filters,
    /// `alias → room_id`.
    Aliases,
    /// `room_id → ()`: rooms published in the local room directory.
    Directory,
    /// `room_id 0xff target_event_id 0xff relation_event_pos(be u64) → relation event id`.
    Relations,
    /// `destination 0xff stream_pos(be u64) → event_id`: the durable outbound federation queue.
    FedQueue,
    /// `origin → last transaction id` received from it (deduplication).
    FedTxns,
    /// `user_id 0xff room_id → PendingInvite`: invites to rooms this node is not in.
    Invites,
    /// `user_id 0xff device_id → signed device keys JSON` (end-to-end encryption).
    DeviceKeys,
    /// `user_id 0xff device_id 0xff algorithm 0xff key_id → one-time key JSON`.
    OneTimeKeys,
    /// `user_id 0xff device_id 0xff algorithm → FallbackKey`.
    FallbackKeys,
    /// `user_id 0xff usage (master, self_signing, user_signing) → cross-signing key JSON`.
    CrossSigningKeys,
    /// `target_user 0xff target_key_id 0xff signer_user 0xff signer_key_id → signature`:
    /// signatures uploaded with `/keys/signatures/upload`, merged into `/keys/query`.
    KeySignatures,
    /// `stream_pos(be u64) user_id → ()`: the latest device-list change of each user.
    DeviceListStream,
    /// `user_id → stream_pos(be u64)`: where the user's entry in `DeviceListStream` is.
    DeviceListPos,
    /// `user_id 0xff device_id 0xff stream_pos(be u64) → to-device event`: a device's inbox.
    ToDevice,
    /// `user_id 0xff device_id 0xff txn_id → stream_pos`: `sendToDevice` transaction ids.
    ToDeviceTxnIds,
    /// `user_id 0xff version(be u64) → BackupVersion` (server-side key backup).
    BackupVersions,
    /// `user_id 0xff version(be u64) 0xff room_id 0xff session_id → KeyBackupData JSON`.
    BackupKeys,
    /// `user_id 0xff device_id → last activity (ms, be u64)`.
    DeviceLastSeen,
    /// `media_id → MediaRecord` (local media: type, name, size, content hash, uploader).
    Media,
    /// `user_id 0xff media_id → expires_ms(be u64)`: `mxc://` URIs reserved with
    /// `/media/v1/create` and not yet uploaded.
    MediaPending,
    /// `room_id 0xff user_id 0xff receipt_type 0xff thread_id-or-empty → ReceiptRecord`: each
    /// user's latest receipt per type and thread.
    Receipts,
    /// `room_id 0xff stream_pos(be u64) → Receipts key`: receipts in the order they changed.
    ReceiptsByPos,
    /// `user_id → PresenceRecord`.
    Presence,
    /// `user_id 0xff app_id 0xff pushkey → pusher JSON`.
    Pushers,
    /// `room_id 0xff target_event_id 0xff rel_type 0xff pos(be u64) → RelationEntry`: live
    /// (unredacted) relations by type, for bundled aggregations and `/relations`.
    RelationsByType,
    /// `room_id 0xff thread_root_id → pos(be u64)` of the latest reply when it was written.
    ThreadRoots,
    /// `destination 0xff stream_pos(be u64) seq(be u32) → QueuedEdu`: the durable outbound EDU
    /// queue (device-list updates, signing-key updates, to-device messages).
    FedEduQueue,
    /// `user_id → RemoteDeviceList`: the cached device list of a user of another server.
    RemoteDeviceLists,
    /// `user_id 0xff device_id → RemoteDevice`: one cached device of a user of another server.
    RemoteDevices,
    /// `server_name 0xff media_id → MediaContent`: media of another server, fetched and cached.
    RemoteMedia,
}

impl Tree {
    /// The on-disk prefix byte of this tree. Never reuse a retired value.
    pub const fn prefix(self) -> u8 {
        match self {
            Tree::Meta => 1,
            Tree::Users => 2,
            Tree::Tokens => 3,
            Tree::Devices => 4,
            Tree::TxnIds => 5,
            Tree::Rooms => 6,
            Tree::Pdus => 7,
            Tree::Timeline => 8,
            Tree::RoomState => 9,
            Tree::StateGroups => 10,
            Tree::Extremities => 11,
            Tree::Referenced => 19,
            Tree::SoftFailed => 18,
            Tree::UserRooms => 12,
            Tree::AccountData => 13,
            Tree::Filters => 14,
            Tree::Aliases => 15,
            Tree::Directory => 16,
            Tree::Relations => 17,
            Tree::FedQueue => 80,
            Tree::FedTxns => 81,
            Tree::Invites => 82,
            Tree::FedEduQueue => 83,
            Tree::RemoteDeviceLists => 84,
            Tree::RemoteDevices => 85,
            Tree::RemoteMedia => 86,
            Tree::DeviceKeys => 20,
            Tree::OneTimeKeys => 21,
            Tree::FallbackKeys => 22,
            Tree::CrossSigningKeys => 23,
            Tree::KeySignatures => 24,
            Tree::DeviceListStream => 25,
            Tree::DeviceListPos => 26,
            Tree::ToDevice => 27,
            Tree::ToDeviceTxnIds => 28,
            Tree::BackupVersions => 29,
            Tree::BackupKeys => 30,
            Tree::DeviceLastSeen => 31,
            Tree::Media => 60,
            Tree::MediaPending => 61,
            Tree::Receipts => 40,
            Tree::ReceiptsByPos => 41,
            Tree::Presence => 42,
            Tree::Pushers => 43,
            Tree::RelationsByType => 44,
            Tree::ThreadRoots => 45,
        }
    }
}

/// One change inside a [`Batch`].
#[derive(Clone, Debug)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Tree, Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Delete(Tree, Vec<u8>),
}

/// A set of changes applied atomically: after a crash either all of them are visible or none.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// The changes, applied in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Queue `key = value` in `tree`.
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(tree, key.into(), value.into()));
    }
    /// Queue the removal of `key` from `tree`.
    pub fn delete(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(tree, key.into()));
    }
    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A key and its value, as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The storage trait. Implementations must be cheap to call from async code (no long blocking
/// except [`KvStore::flush`], which callers run on a blocking thread).
pub trait KvStore: Send + Sync + 'static {
    /// The value of `key` in `tree`.
    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Apply `batch` atomically. The change is visible to readers at once, durable after the
    /// next [`KvStore::flush`].
    fn apply(&self, batch: Batch) -> StoreResult<()>;
    /// Entries of `tree` whose key starts with `prefix` and lies in `[from, to)` (both relative to
    /// the whole key; `None` means unbounded), in key order, or reversed.
    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        from: Option<&[u8]>,
        to: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<Entry>>;
    /// Make every applied batch durable.
    fn flush(&self) -> StoreResult<()>;
    /// Approximate bytes used on disk.
    fn size_on_disk(&self) -> u64;
    /// Whether [`KvStore::flush`] is cheap enough to run inline on the async thread (an
    /// in-memory store). [`GroupCommit`] then skips the blocking pool, which also keeps a
    /// simulation on tokio's paused clock deterministic.
    fn flush_is_instant(&self) -> bool {
        false
    }

    /// Insert one key (convenience for a one-op batch).
    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> StoreResult<()> {
        let mut b = Batch::new();
        b.put(tree, key, value);
        self.apply(b)
    }
    /// All entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan_prefix(&self, tree: Tree, prefix: &[u8], limit: usize) -> StoreResult<Vec<Entry>> {
        self.scan(tree, prefix, None, None, false, limit)
    }
}

/// `key` prefixed with its tree's byte: the key as a backend stores it (every tree lives in one
/// keyspace, so a batch across trees is one atomic backend batch).
pub(crate) fn full_key(tree: Tree, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tree.prefix());
    k.extend_from_slice(key);
    k
}

/// The smallest key greater than every key starting with `p` (p's first byte is a tree byte
/// below 0xff, so there always is one).
pub(crate) fn successor(p: &[u8]) -> Vec<u8> {
    let mut s = p.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return s;
        }
    }
    vec![0xff; p.len() + 1]
}

/// The backend key range `[lo, hi)` of a [`KvStore::scan`], or `None` when it is empty.
pub(crate) fn scan_bounds(
    tree: Tree,
    prefix: &[u8],
    from: Option<&[u8]>,
    to: Option<&[u8]>,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let p = full_key(tree, prefix);
    let lo = match from {
        Some(f) if f > prefix => full_key(tree, f),
        _ => p.clone(),
    };
    let p_end = successor(&p);
    let hi = match to {
        Some(t) => std::cmp::min(full_key(tree, t), p_end),
        None => p_end,
    };
    (lo < hi).then_some((lo, hi))
}

/// Builds composite keys: parts separated by `0xff`, which never occurs in UTF-8 text.
pub fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0xff);
        }
        k.extend_from_slice(p);
    }
    k
}

/// `parts` joined as by [`key`], followed by a trailing separator: the prefix of every key that
/// extends `parts` by one more part.
pub fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0xff);
    k
}

/// Group commit: many writers ask for durability, one flush serves all who wrote before it.
///
/// Call [`GroupCommit::wrote`] after applying a batch, then `.await` [`GroupCommit::durable`] with
/// the ticket before acknowledging. Flushes run on tokio's blocking pool (inline for a store whose
/// flush is instant).
pub struct GroupCommit {
    written: AtomicU64,
    flushed: AtomicU64,
    lock: tokio::sync::Mutex<()>,
    flushes: AtomicU64,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
        }
    }
}

impl GroupCommit {
    /// Record that a batch was applied; returns the ticket to wait on.
    pub fn wrote(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Wait until the write with `ticket` (and every earlier one) is on disk.
    pub async fn durable(&self, store: &Arc<dyn KvStore>, ticket: u64) -> StoreResult<()> {
        if self.flushed.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        let _guard = self.lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        if store.flush_is_instant() {
            store.flush()?;
        } else {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.flush())
                .await
                .map_err(|e| StoreError::Backend(format!("flush task failed: {e}")))??;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flushed.store(target, Ordering::SeqCst);
        Ok(())
    }

    /// How many flushes have run (for status and benchmarks).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn KvStore) {
        let mut b = Batch::new();
        b.put(Tree::Timeline, key(&[b"!a", &1u64.to_be_bytes()]), b"e1".to_vec());
        b.put(Tree::Timeline, key(&[b"!a", &2u64.to_be_bytes()]), b"e2".to_vec());
        b.put(Tree::Timeline, key(&[b"!b", &1u64.to_be_bytes()]), b"x".to_vec());
        b.put(Tree::Pdus, b"!a".to_vec(), b"other tree".to_vec());
        store.apply(b).unwrap();
        let all = store.scan_prefix(Tree::Timeline, &prefix(&[b"!a"]), 10).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1, b"e1");
        let rev = store.scan(Tree::Timeline, &prefix(&[b"!a"]), None, None, true, 1).unwrap();
        assert_eq!(rev[0].1, b"e2");
        let from = key(&[b"!a", &2u64.to_be_bytes()]);
        let after = store.scan(Tree::Timeline, &prefix(&[b"!a"]), Some(&from), None, false, 10).unwrap();
        assert_eq!(after.len(), 1);
        let before = store.scan(Tree::Timeline, &prefix(&[b"!a"]), None, Some(&from), true, 10).unwrap();
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].1, b"e1");
        assert_eq!(store.get(Tree::Pdus, b"!a").unwrap().unwrap(), b"other tree");
        let mut d = Batch::new();
        d.delete(Tree::Pdus, b"!a".to_vec());
        store.apply(d).unwrap();
        assert!(store.get(Tree::Pdus, b"!a").unwrap().is_none());
        store.flush().unwrap();
    }

    #[test]
    fn memory_store_semantics() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn sled_store_semantics() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&SledStore::open(dir.path(), 1 << 20).unwrap());
        let dir = tempfile::tempdir().unwrap();
        exercise(&SledStore::open(dir.path(), 1 << 20).unwrap().with_pending_max(0));
    }

    /// The sled store's write buffer (merged over sled by `get` and `scan`, drained at flushes
    /// and when full) answers exactly like the memory store, over random batches, deletions,
    /// flushes and scans in both directions with bounds and limits.
    #[test]
    fn sled_write_buffer_matches_the_memory_store() {
        use rand::{Rng, SeedableRng};
        for (seed, pending_max) in [(1u64, 0usize), (2, 64), (3, 1 << 10), (4, usize::MAX)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let sled = SledStore::open(dir.path(), 1 << 20).unwrap().with_pending_max(pending_max);
            let mem = MemoryStore::default();
            let trees = [Tree::Timeline, Tree::Pdus, Tree::FedQueue];
            let k = |rng: &mut rand::rngs::StdRng| key(&[&[b'a' + rng.gen_range(0..3u8)], &[rng.gen_range(0..40u8)]]);
            for step in 0..3000 {
                match rng.gen_range(0..10) {
                    0..=4 => {
                        let mut b = Batch::new();
                        for _ in 0..rng.gen_range(1..6) {
                            let t = trees[rng.gen_range(0..trees.len())];
                            if rng.gen_bool(0.3) {
                                b.delete(t, k(&mut rng));
                            } else {
                                b.put(t, k(&mut rng), format!("v{step}").into_bytes());
                            }
                        }
                        sled.apply(b.clone()).unwrap();
                        mem.apply(b).unwrap();
                    }
                    5 => sled.flush().unwrap(),
                    6 => {
                        let (t, key) = (trees[rng.gen_range(0..trees.len())], k(&mut rng));
                        assert_eq!(sled.get(t, &key).unwrap(), mem.get(t, &key).unwrap(), "get at step {step}");
                    }
                    _ => {
                        let t = trees[rng.gen_range(0..trees.len())];
                        let pre =
                            if rng.gen_bool(0.5) { prefix(&[&[b'a' + rng.gen_range(0..3u8)]]) } else { Vec::new() };
                        let from = rng.gen_bool(0.4).then(|| k(&mut rng));
                        let to = rng.gen_bool(0.4).then(|| k(&mut rng));
                        let (rev, limit) = (rng.gen_bool(0.5), rng.gen_range(0..30));
                        let a = sled.scan(t, &pre, from.as_deref(), to.as_deref(), rev, limit).unwrap();
                        let b = mem.scan(t, &pre, from.as_deref(), to.as_deref(), rev, limit).unwrap();
                        assert_eq!(a, b, "scan at step {step} (seed {seed}, buffer {pending_max})");
                    }
                }
            }
        }
    }
}
