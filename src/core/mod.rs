//! The protocol core: rooms, events, users, sync. No sockets, no disk paths, no wall clock:
//! everything outside comes in through [`KvStore`], [`Clock`] and the node [`Identity`].
//!
//! One [`Core`] is one homeserver. Many can live in one process (the simulator runs hundreds).
//!
//! # Driving it
//! Write paths (`create_room`, `send_event`, membership, profile) commit through the store and
//! return only after [`GroupCommit`] reports the data flushed; then they advance the *visible*
//! stream position, which wakes long-polling syncs. Read paths never block on writers.

pub mod backup;
pub mod devices;
pub mod e2ee;
pub mod federation;
pub mod filter;
pub mod media;
pub mod pdu;
pub(crate) mod pdu_cache;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod relations;
pub mod rooms;
pub mod search;
pub mod state;
pub mod status;
pub mod sync;
pub mod tags;
pub mod typing;
pub mod user_directory;
pub mod users;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex as StdMutex},
};

use ruma::OwnedRoomId;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    clock::Clock,
    identity::Identity,
    store::{Batch, GroupCommit, KvStore, StoreError, Tree},
};

tokio::task_local! {
    /// Set, to the core's [`Core::id`], inside [`Core::with_deferred_flush`].
    static DEFERRED_FLUSH: usize;
}

/// Schema version of the key layout (see `docs/storage.md`). Bump on incompatible change.
pub const SCHEMA_VERSION: u64 = 1;

/// Errors of the core, each a Matrix error condition. The HTTP edge maps them to
/// `errcode` + status in one place (`api::error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `M_FORBIDDEN` (403).
    #[error("{0}")]
    Forbidden(String),
    /// `M_NOT_FOUND` (404).
    #[error("{0}")]
    NotFound(String),
    /// `M_BAD_JSON` (400).
    #[error("{0}")]
    BadJson(String),
    /// `M_NOT_JSON` (400).
    #[error("{0}")]
    NotJson(String),
    /// `M_TOO_LARGE` (413).
    #[error("{0}")]
    TooLarge(String),
    /// `M_INVALID_PARAM` (400).
    #[error("{0}")]
    InvalidParam(String),
    /// `M_MISSING_PARAM` (400).
    #[error("{0}")]
    MissingParam(String),
    /// `M_UNKNOWN_TOKEN` (401).
    #[error("unknown or expired access token")]
    UnknownToken,
    /// `M_MISSING_TOKEN` (401).
    #[error("missing access token")]
    MissingToken,
    /// `M_USER_IN_USE` (400).
    #[error("user ID already taken")]
    UserInUse,
    /// `M_INVALID_USERNAME` (400).
    #[error("{0}")]
    InvalidUsername(String),
    /// `M_ROOM_IN_USE` (400).
    #[error("{0}")]
    RoomInUse(String),
    /// 409 Conflict (`M_UNKNOWN`), e.g. a room alias that already exists.
    #[error("{0}")]
    Conflict(String),
    /// `M_UNSUPPORTED_ROOM_VERSION` (400).
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(String),
    /// `M_UNRECOGNIZED` (404 or 405 at the edge).
    #[error("{0}")]
    Unrecognized(String),
    /// `M_UNKNOWN` (400), a generic client error.
    #[error("{0}")]
    Unknown(String),
    /// `M_LIMIT_EXCEEDED` (429).
    #[error("{0}")]
    LimitExceeded(String),
    /// `M_NOT_YET_UPLOADED` (504): reserved media whose content has not arrived in time.
    #[error("{0}")]
    NotYetUploaded(String),
    /// `M_CANNOT_OVERWRITE_MEDIA` (409): content was already uploaded to this media id.
    #[error("{0}")]
    CannotOverwriteMedia(String),
    /// `M_WRONG_ROOM_KEYS_VERSION` (403): a key-backup write to a version that is not the
    /// current one; carries the current version, if any.
    #[error("wrong backup version; the current version is {0:?}")]
    WrongRoomKeysVersion(Option<String>),
    /// Storage failure (500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or an impossible state (500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits the core enforces (a subset of the node config).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Max events per room in one sync / `/messages` page.
    pub timeline_limit_max: usize,
    /// Default events per room in sync when no filter says otherwise.
    pub timeline_limit_default: usize,
    /// Longest long-poll a client may ask for.
    pub sync_timeout_ms_max: u64,
    /// Whether `/register` is open.
    pub registration_enabled: bool,
    /// Longest typing notification (ms).
    pub typing_timeout_ms_max: u64,
    /// Events looked at per room when counting unread notifications.
    pub unread_scan_events_max: usize,
    /// Stored events kept decoded in memory (`pdu_cache.rs`); 0 disables the cache.
    pub pdu_cache_entries: usize,
    /// Events looked at per `/search` request.
    pub search_scan_events_max: usize,
    /// Relations looked at per bundle, `/relations` page or `/threads` page.
    pub relations_scan_max: usize,
    /// Pushers per user.
    pub pushers_per_user_max: usize,
    /// Most results of one user-directory search.
    pub user_directory_limit_max: usize,
    /// To-device messages waiting per device; the oldest is dropped when full.
    pub to_device_inbox_max: usize,
    /// To-device messages per `/sync` response.
    pub to_device_per_sync_max: usize,
    /// One-time keys stored per device.
    pub one_time_keys_per_device_max: usize,
    /// `sendToDevice` transaction ids remembered per device.
    pub txn_ids_per_device_max: usize,
    /// Typing and receipt EDUs waiting in memory per destination (see `federation/edu.rs`).
    pub edu_ephemeral_per_destination_max: usize,
    /// Device-list, signing-key and to-device EDUs waiting in the store per destination.
    pub edu_durable_per_destination_max: usize,
    /// Longest wait for other servers when answering `/keys/query`, `/keys/claim`, remote
    /// profiles and directories (ms).
    pub federation_query_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeline_limit_max: 100,
            timeline_limit_default: 20,
            sync_timeout_ms_max: 30_000,
            registration_enabled: true,
            typing_timeout_ms_max: 120_000,
            unread_scan_events_max: 1000,
            pdu_cache_entries: 1024,
            search_scan_events_max: 10_000,
            relations_scan_max: 1000,
            pushers_per_user_max: 32,
            user_directory_limit_max: 50,
            to_device_inbox_max: 1000,
            to_device_per_sync_max: 100,
            one_time_keys_per_device_max: 200,
            txn_ids_per_device_max: 1000,
            edu_ephemeral_per_destination_max: 500,
            edu_durable_per_destination_max: 10_000,
            federation_query_timeout_ms: 10_000,
        }
    }
}

/// One homeserver's protocol state. Cheap to share behind an `Arc`.
pub struct Core {
    pub(crate) store: Arc<dyn KvStore>,
    pub(crate) commit: GroupCommit,
    pub(crate) identity: Identity,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) limits: Limits,
    /// Allocation of stream positions and state-group ids, and the apply of the batch that uses
    /// them, happen under this lock so readers never see position N+1 before N.
    sequencer: StdMutex<Counters>,
    /// One lock per room while an event is built, authorised and appended.
    room_locks: StdMutex<BTreeMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// The highest stream position that is durable; syncs wait on it.
    visible: tokio::sync::watch::Sender<u64>,
    /// How to reach other servers (set once at start-up; absent on a node without a mesh).
    pub(crate) transport: std::sync::OnceLock<Arc<dyn federation::Transport>>,
    /// Outbound delivery state per destination.
    pub(crate) sender: federation::sender::SenderState,
    /// EDU queues, retried transactions and remote-data locks (`federation/edu.rs`).
    pub(crate) fed: federation::edu::FedState,
    /// The operator token (`outpost status` / `outpost peers`), if set.
    operator_token: std::sync::OnceLock<String>,
    /// Decoded state maps by group id (bounded, see `state.rs`).
    state_cache: StdMutex<BTreeMap<u64, Arc<state::StateMap>>>,
    /// Decoded stored PDUs (bounded, see `pdu_cache.rs`).
    pub(crate) pdu_cache: pdu_cache::PduCache,
    started_ms: u64,
    /// Who is typing where (in memory only; see `typing.rs`).
    typing: typing::TypingState,
    /// Serialises read-modify-write updates of per-user data (receipts, tags, push rules).
    user_data_lock: tokio::sync::Mutex<()>,
    /// Every random choice of the protocol (ids, tokens, salts, backoff jitter) comes from here,
    /// so a simulation replays from its seed; production seeds it from the OS.
    rng: StdMutex<rand::rngs::StdRng>,
    /// Unread-count contributions already evaluated (see `push.rs`).
    pub(crate) unread_memo: push::UnreadMemo,
    /// Rooms this node is joining through another server right now: PDUs for them may arrive
    /// before the send_join answer (see `federation::receive`).
    pub(crate) joining: StdMutex<BTreeMap<OwnedRoomId, usize>>,
    /// Joins sent with `send_join` whose answer never came (see `federation::join`).
    pub(crate) unanswered_joins: StdMutex<BTreeMap<OwnedRoomId, federation::join::UnansweredJoin>>,
    /// Servers a resolution of this node's forward extremities let out of a room, until when
    /// they may still read its history (see `federation::serve`).
    pub(crate) let_out: StdMutex<BTreeMap<(OwnedRoomId, ruma::OwnedServerName), u64>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    stream_pos: u64,
    state_group: u64,
}

const META_SCHEMA: &[u8] = b"schema_version";
const META_STREAM: &[u8] = b"stream_pos";
const META_STATE_GROUP: &[u8] = b"state_group";

impl Core {
    /// Open the core over `store`. Checks (or records) the schema version. Random choices are
    /// seeded from the operating system.
    pub fn open(
        store: Arc<dyn KvStore>,
        identity: Identity,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Result<Arc<Self>> {
        Self::open_with_rng(store, identity, clock, limits, rand::SeedableRng::from_entropy())
    }

    /// [`Core::open`] with the source of every random choice given: the simulator passes a
    /// seeded one so that a run replays exactly.
    pub fn open_with_rng(
        store: Arc<dyn KvStore>,
        identity: Identity,
        clock: Arc<dyn Clock>,
        limits: Limits,
        rng: rand::rngs::StdRng,
    ) -> Result<Arc<Self>> {
        match store.get(Tree::Meta, META_SCHEMA)? {
            None => {
                store.put(Tree::Meta, META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                store.flush()?;
            }
            Some(v) => {
                let v = u64_from(&v)?;
                if v != SCHEMA_VERSION {
                    return Err(Error::Internal(format!(
                        "data was written with schema version {v}; this build reads version {SCHEMA_VERSION}"
                    )));
                }
            }
        }
        let read = |k: &[u8]| -> Result<u64> {
            Ok(match store.get(Tree::Meta, k)? {
                Some(v) => u64_from(&v)?,
                None => 0,
            })
        };
        let counters = Counters { stream_pos: read(META_STREAM)?, state_group: read(META_STATE_GROUP)? };
        let started_ms = clock.now_ms();
        let (visible, _) = tokio::sync::watch::channel(counters.stream_pos);
        let pdu_cache = pdu_cache::PduCache::new(limits.pdu_cache_entries);
        Ok(Arc::new(Self {
            store,
            commit: GroupCommit::default(),
            identity,
            clock,
            limits,
            sequencer: StdMutex::new(counters),
            room_locks: StdMutex::new(BTreeMap::new()),
            visible,
            state_cache: StdMutex::new(BTreeMap::new()),
            pdu_cache,
            transport: std::sync::OnceLock::new(),
            operator_token: std::sync::OnceLock::new(),
            sender: Default::default(),
            fed: Default::default(),
            started_ms,
            typing: typing::TypingState::default(),
            user_data_lock: tokio::sync::Mutex::new(()),
            rng: StdMutex::new(rng),
            unread_memo: Default::default(),
            joining: StdMutex::new(BTreeMap::new()),
            unanswered_joins: StdMutex::new(BTreeMap::new()),
            let_out: StdMutex::new(BTreeMap::new()),
        }))
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The server name (hex of the public key).
    pub fn server_name(&self) -> &ruma::ServerName {
        self.identity.server_name()
    }

    /// Milliseconds since the epoch, from the injected clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// When this core was opened (ms since the epoch).
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The newest durable stream position.
    pub fn visible_pos(&self) -> u64 {
        *self.visible.borrow()
    }

    /// Subscribe to advances of the visible stream position.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.visible.subscribe()
    }

    /// Flushes performed so far (group commit efficiency).
    pub fn flush_count(&self) -> u64 {
        self.commit.flush_count()
    }

    /// Bytes used by the store on disk.
    pub fn store_size(&self) -> u64 {
        self.store.size_on_disk()
    }

    /// The lock serialising appends to `room`.
    pub(crate) fn room_lock(&self, room: &OwnedRoomId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.room_locks.lock().unwrap_or_else(|e| e.into_inner());
        // Bound the map: drop locks nobody holds.
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(room.clone()).or_default().clone()
    }

    /// Apply `batch` after letting `fill` add the ops that need fresh stream positions or state
    /// group ids, then wait until it is durable and publish it to syncs. Returns what `fill`
    /// returned.
    pub(crate) async fn commit<T>(
        &self,
        batch: Batch,
        fill: impl FnOnce(&mut Batch, &mut dyn FnMut() -> u64, &mut dyn FnMut() -> u64) -> Result<T>,
    ) -> Result<T> {
        let (out, ticket, pos, wake) = {
            let mut batch = batch;
            let mut c = self.sequencer.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = *c;
            let out = {
                let mut alloc_pos = || {
                    next.stream_pos += 1;
                    next.stream_pos
                };
                let mut alloc_sg = || {
                    next.state_group += 1;
                    next.state_group
                };
                fill(&mut batch, &mut alloc_pos, &mut alloc_sg)?
            };
            if next.stream_pos != c.stream_pos {
                batch.put(Tree::Meta, META_STREAM.to_vec(), next.stream_pos.to_be_bytes().to_vec());
            }
            if next.state_group != c.state_group {
                batch.put(Tree::Meta, META_STATE_GROUP.to_vec(), next.state_group.to_be_bytes().to_vec());
            }
            // Rooms that got a new forward extremity: candidates for merging forks (merge.rs).
            let forks = federation::merge::rooms_with_new_extremities(&batch);
            self.apply_batch(batch)?;
            *c = next;
            self.sender.note_merge_candidates(forks);
            // Destinations whose durable EDU queue this batch (or an earlier failed one) wrote to.
            let wake = self.fed.take_staged_wakes();
            (out, self.commit.wrote(), next.stream_pos, wake)
        };
        if DEFERRED_FLUSH.try_with(|core| *core == self.id()).unwrap_or(false) {
            // Inside `with_deferred_flush`: the flush at its end makes this durable and visible.
            return Ok(out);
        }
        self.commit.durable(&self.store, ticket).await?;
        self.wake_sender(&wake);
        self.visible.send_if_modified(|v| {
            if pos > *v {
                *v = pos;
                true
            } else {
                false
            }
        });
        Ok(out)
    }

    /// A random value from the core's generator (see [`Core::open_with_rng`]).
    pub(crate) fn random<T>(&self) -> T
    where
        rand::distributions::Standard: rand::distributions::Distribution<T>,
    {
        rand::Rng::gen(&mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `n` random characters from `chars`.
    pub(crate) fn random_chars(&self, chars: &[u8], n: usize) -> String {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        (0..n).map(|_| chars[rand::Rng::gen_range(&mut *rng, 0..chars.len())] as char).collect()
    }

    /// Run `work` with this core's commits applied but neither flushed nor published to syncs,
    /// then make all of them durable and visible with one flush. Used for the PDUs of one
    /// incoming transaction: one flush (and one wake-up of syncing clients) per transaction
    /// instead of one per PDU; the peer still gets its answer only after the flush. Tasks that
    /// `work` spawns, and other cores, commit as usual.
    pub(crate) async fn with_deferred_flush<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T> {
        let out = DEFERRED_FLUSH.scope(self.id(), work).await;
        self.commit(Batch::new(), |_, _, _| Ok(())).await?;
        Ok(out)
    }

    /// Identifies this core among the cores of the process (for `DEFERRED_FLUSH`).
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// Read a JSON record.
    pub(crate) fn get_json<T: DeserializeOwned>(&self, tree: Tree, key: &[u8]) -> Result<Option<T>> {
        match self.store.get(tree, key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Store(StoreError::Corrupt(format!("{tree:?}: {e}")))),
        }
    }
}

/// Encode a record for storage.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

pub(crate) fn u64_from(v: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = v.try_into().map_err(|_| Error::Store(StoreError::Corrupt("bad counter".into())))?;
    Ok(u64::from_be_bytes(arr))
}

impl Core {
    /// Flush everything to disk (shutdown).
    pub fn flush(&self) -> Result<()> {
        Ok(self.store.flush()?)
    }
}

#[cfg(test)]
mod tests;

impl Core {
    /// Set the operator token (once, at start-up).
    pub fn set_operator_token(&self, token: String) {
        let _ = self.operator_token.set(token);
    }

    /// Whether `token` is the operator token.
    pub fn is_operator_token(&self, token: &str) -> bool {
        self.operator_token.get().is_some_and(|t| !t.is_empty() && t == token)
    }
}
