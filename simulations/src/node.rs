//! One simulated node: an `outpost` [`Core`] over a [`MemoryStore`], its federation router on
//! the simulated network, its sender task; crash and restart.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use outpost::{
    api::{self, AppState},
    clock::Clock,
    config::Config,
    core::{Core, Limits},
    identity::Identity,
    media::{Media, MediaLimits, MemoryMediaStore},
    store::{Batch, Entry, KvStore, MemoryStore, StoreError, StoreResult, Tree},
};
use rand::{rngs::StdRng, SeedableRng};
use ruma::{OwnedServerName, OwnedUserId};
use tokio::task::AbortHandle;

use crate::net::SimNet;

thread_local! {
    /// Start of the run on this thread (for log timestamps).
    static RUN_START: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Virtual ms since the start of the run on this thread, if one started (log timestamps).
pub fn virtual_ms() -> Option<u64> {
    RUN_START.with(|s| s.get()).map(|start| start.elapsed().as_millis() as u64)
}

/// Wall time as the nodes see it: a fixed epoch plus tokio's (paused, virtual) clock.
pub struct VirtualClock {
    start: tokio::time::Instant,
    epoch_ms: u64,
}

impl VirtualClock {
    /// A clock reading `epoch_ms` now.
    pub fn new(epoch_ms: u64) -> Self {
        let start = tokio::time::Instant::now();
        RUN_START.with(|s| s.set(Some(start)));
        Self { start, epoch_ms }
    }

    /// Virtual ms since the clock was made.
    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.epoch_ms + self.elapsed_ms()
    }
}

/// The store one incarnation of a node sees: the node's [`MemoryStore`], refusing everything
/// once that incarnation has crashed (tasks of a dead process must not write to the disk its
/// successor uses).
struct FencedStore {
    mem: Arc<MemoryStore>,
    alive: Arc<AtomicBool>,
}

impl FencedStore {
    fn check(&self) -> StoreResult<()> {
        if self.alive.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(StoreError::Backend("the node crashed".into()))
        }
    }
}

impl KvStore for FencedStore {
    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.check()?;
        self.mem.get(tree, key)
    }
    fn apply(&self, batch: Batch) -> StoreResult<()> {
        self.check()?;
        self.mem.apply(batch)
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
        self.check()?;
        self.mem.scan(tree, prefix, from, to, reverse, limit)
    }
    fn flush(&self) -> StoreResult<()> {
        self.check()?;
        self.mem.flush()
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
    fn flush_is_instant(&self) -> bool {
        true
    }
}

/// What runs while a node is up.
pub struct Live {
    /// The protocol core of this incarnation.
    pub core: Arc<Core>,
    alive: Arc<AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<AbortHandle>,
}

/// A node across its incarnations.
pub struct Node {
    /// Index in the simulation.
    pub idx: usize,
    /// Its server name.
    pub name: OwnedServerName,
    /// Its one user.
    pub user: OwnedUserId,
    key_seed: [u8; 32],
    rng_seed: u64,
    mem: Arc<MemoryStore>,
    /// The running incarnation, or `None` while crashed.
    pub live: Option<Live>,
    /// Incarnations started so far.
    pub incarnation: u64,
}

impl Node {
    /// A node whose key and random choices derive from `seed`; not started.
    pub fn new(idx: usize, seed: u64) -> Self {
        let mut key_seed = [0u8; 32];
        key_seed[..8].copy_from_slice(&mix(seed, idx as u64, 0x006b_6579).to_le_bytes());
        key_seed[8..16].copy_from_slice(&mix(seed, idx as u64, 0x006b_657a).to_le_bytes());
        key_seed[16..24].copy_from_slice(&(idx as u64).to_le_bytes());
        key_seed[24..].copy_from_slice(&seed.to_le_bytes());
        let identity = Identity::from_seed(key_seed);
        let name = identity.server_name().clone();
        let user = OwnedUserId::try_from(format!("@u{idx}:{name}")).expect("valid user id");
        Self {
            idx,
            name,
            user,
            key_seed,
            rng_seed: mix(seed, idx as u64, 0x0072_6e67),
            mem: Arc::new(MemoryStore::default()),
            live: None,
            incarnation: 0,
        }
    }

    /// The core, when up.
    pub fn core(&self) -> Option<&Arc<Core>> {
        self.live.as_ref().map(|l| &l.core)
    }

    /// Start a new incarnation over the node's store: open the core, attach its federation
    /// router to `net`, spawn its sender.
    pub fn start(&mut self, net: &Arc<SimNet>, clock: Arc<dyn Clock>) -> Result<Arc<Core>, String> {
        self.incarnation += 1;
        let alive = Arc::new(AtomicBool::new(true));
        let store: Arc<dyn KvStore> = Arc::new(FencedStore { mem: self.mem.clone(), alive: alive.clone() });
        let rng = StdRng::seed_from_u64(mix(self.rng_seed, self.incarnation, 0x0069_6e63));
        let core = Core::open_with_rng(store, Identity::from_seed(self.key_seed), clock, Limits::default(), rng)
            .map_err(|e| format!("node {} cannot open: {e}", self.idx))?;
        core.set_transport(net.transport(self.idx, alive.clone()));
        let media = Media::new(
            Arc::new(MemoryMediaStore::default()),
            MediaLimits {
                max_upload_bytes: 1 << 20,
                thumbnail_source_pixels_max: 1 << 20,
                pending_uploads_per_user_max: 1,
            },
        );
        let mut config = Config::default();
        config.mesh.enabled = false;
        let state = AppState {
            core: core.clone(),
            config: Arc::new(config),
            media: Arc::new(media),
            mesh_peers: Default::default(),
        };
        net.attach(self.idx, api::federation::router(state), self.incarnation);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let sender = tokio::spawn(tracing::Instrument::instrument(
            core.clone().run_sender(stop_rx),
            crate::world::node_span(self.idx),
        ));
        self.live = Some(Live { core: core.clone(), alive, stop, tasks: vec![sender.abort_handle()] });
        Ok(core)
    }

    /// Keep `task` with this incarnation: a crash aborts it.
    pub fn track(&mut self, task: AbortHandle) {
        if let Some(l) = &mut self.live {
            l.tasks.retain(|t| !t.is_finished());
            l.tasks.push(task);
        } else {
            task.abort();
        }
    }

    /// Power cut: this incarnation's tasks die, its store and transport refuse further use,
    /// the network forgets it, and the store loses every write since its last flush.
    pub fn crash(&mut self, net: &SimNet) {
        if let Some(l) = self.live.take() {
            l.alive.store(false, Ordering::SeqCst);
            let _ = l.stop.send(true);
            for t in l.tasks {
                t.abort();
            }
        }
        net.detach(self.idx);
        self.mem.crash();
    }

    /// Orderly stop at the end of a run.
    pub fn stop(&mut self, net: &SimNet) {
        if let Some(l) = self.live.take() {
            let _ = l.stop.send(true);
            for t in l.tasks {
                t.abort();
            }
            l.alive.store(false, Ordering::SeqCst);
        }
        net.detach(self.idx);
    }
}

/// A well-mixed 64-bit value from three (splitmix64 of their combination).
pub fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.rotate_left(21) ^ c.rotate_left(42) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}
