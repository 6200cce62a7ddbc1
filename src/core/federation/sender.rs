//! Outbound delivery: a durable queue per destination (written in the same batch as the event,
//! see `Core::stage`), drained by one sender task in transactions of at most 50 PDUs and 100
//! EDUs (the EDU queues are in `edu.rs`).
//!
//! Backoff is for a mesh, not the internet: 1 s doubling to a 30 s cap, with jitter; a peer
//! that (re)connects resets its backoff and is flushed at once ([`Core::peer_up`]).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use ruma::{
    api::federation::transactions::send_transaction_message, MilliSecondsSinceUnixEpoch, OwnedServerName,
    OwnedTransactionId, ServerName, UInt,
};

use super::{
    super::{Core, Result},
    edu::OutTxn,
};
use crate::store::{key, prefix, Batch, Tree};

/// Most PDUs in one transaction (spec limit).
pub const MAX_PDUS_PER_TXN: usize = 50;
/// Transactions on their way to one destination at once (see `Core::drain_queue`).
pub const PIPELINED_TXNS: usize = 2;
/// First retry delay after a failure.
pub const BACKOFF_MS_MIN: u64 = 1_000;
/// Longest retry delay.
pub const BACKOFF_MS_MAX: u64 = 30_000;

/// Per-destination delivery state (in memory; the queue itself is in the store).
#[derive(Clone, Debug, Default)]
pub struct DestState {
    /// Entries may be waiting in the queue.
    pub pending: bool,
    /// A transaction is on its way.
    pub in_flight: bool,
    /// Consecutive failures.
    pub failures: u32,
    /// Not before this time (ms since the epoch).
    pub retry_at_ms: u64,
    /// Last successful delivery (ms).
    pub last_ok_ms: u64,
    /// Bumped each time the peer comes (back) up ([`Core::peer_up`]).
    pub link_gen: u64,
}

/// The sender's shared state.
#[derive(Default)]
pub struct SenderState {
    dests: StdMutex<BTreeMap<OwnedServerName, DestState>>,
    /// Rooms that may have several forward extremities (merge.rs looks only at these; `None`
    /// until the sender has started, which then looks at every room once).
    merge_candidates: StdMutex<Option<BTreeSet<ruma::OwnedRoomId>>>,
    wake: tokio::sync::Notify,
}

impl SenderState {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<OwnedServerName, DestState>) -> T) -> T {
        f(&mut self.dests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `rooms` got a new forward extremity: the sender looks at them for forks.
    pub(crate) fn note_merge_candidates(&self, rooms: BTreeSet<ruma::OwnedRoomId>) {
        if rooms.is_empty() {
            return;
        }
        let mut c = self.merge_candidates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = c.as_mut() {
            let before = set.len();
            set.extend(rooms);
            if set.len() != before {
                self.wake.notify_one();
            }
        }
    }

    /// The rooms noted since the last call (and from now on, note them: until the first call
    /// nothing is tracked, the sender then looks at every room).
    pub(crate) fn take_merge_candidates(&self) -> BTreeSet<ruma::OwnedRoomId> {
        let mut c = self.merge_candidates.lock().unwrap_or_else(|e| e.into_inner());
        c.replace(BTreeSet::new()).unwrap_or_default()
    }
}

impl Core {
    /// Note that new queue entries exist for `dests` and wake the sender.
    pub(crate) fn wake_sender(&self, dests: &BTreeSet<OwnedServerName>) {
        if dests.is_empty() {
            return;
        }
        self.sender.with(|m| {
            for d in dests {
                m.entry(d.clone()).or_default().pending = true;
            }
        });
        self.sender.wake.notify_one();
    }

    /// A peer was (re)discovered or (re)connected: forget its backoff and flush its queue now.
    pub fn peer_up(&self, dest: &ServerName) {
        self.sender.with(|m| {
            let d = m.entry(dest.to_owned()).or_default();
            d.failures = 0;
            d.retry_at_ms = 0;
            d.pending = true;
            d.link_gen = d.link_gen.wrapping_add(1);
        });
        self.sender.wake.notify_one();
    }

    /// Delivery state per destination, with queue depths (for `/_outpost/v1/peers`).
    pub fn destinations(&self) -> Result<Vec<(OwnedServerName, DestState, usize)>> {
        let dests = self.sender.with(|m| m.clone());
        let mut out = Vec::new();
        for (d, st) in dests {
            let depth = self.store.scan_prefix(Tree::FedQueue, &prefix(&[d.as_bytes()]), usize::MAX)?.len();
            out.push((d, st, depth));
        }
        Ok(out)
    }

    /// Number of queued PDUs for `dest`.
    pub fn queue_depth(&self, dest: &ServerName) -> Result<usize> {
        Ok(self.store.scan_prefix(Tree::FedQueue, &prefix(&[dest.as_bytes()]), usize::MAX)?.len())
    }

    /// Every destination with something queued in `tree` (one scan step per destination).
    fn queued_destinations(&self, tree: Tree) -> Result<Vec<OwnedServerName>> {
        let mut out = Vec::new();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let e = self.store.scan(tree, b"", from.as_deref(), None, false, 1)?;
            let Some((k, _)) = e.first() else { break };
            let end = k.iter().position(|b| *b == 0xff).unwrap_or(k.len());
            let name = String::from_utf8_lossy(&k[..end]).into_owned();
            let mut next = k[..end].to_vec();
            next.push(0xff);
            next.push(0xff);
            from = Some(next);
            if let Ok(n) = OwnedServerName::try_from(name) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// The sender task: runs until `shutdown` flips to true. Spawn it once per node.
    pub async fn run_sender(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let queued = self.queued_destinations(Tree::FedQueue).and_then(|mut d| {
            d.extend(self.queued_destinations(Tree::FedEduQueue)?);
            Ok(d)
        });
        match queued {
            Ok(ds) => self.wake_sender(&ds.into_iter().collect()),
            Err(e) => tracing::error!(error = %e, "cannot read the federation queue"),
        }
        // Merging forks (merge.rs) is the sender's too: it exists so that other servers
        // converge. It looks at rooms that got a new forward extremity since (every room once
        // at start), and wakes again only when a forked room will have been quiet long enough:
        // an idle node without forks never wakes for it.
        let mut forked: BTreeSet<ruma::OwnedRoomId> = BTreeSet::new();
        let mut next_merge: Option<u64> = None;
        let mut first = true;
        loop {
            let fresh = self.sender.take_merge_candidates();
            if first || !fresh.is_empty() || next_merge.is_some_and(|t| self.now_ms() >= t) {
                let mut rooms = fresh;
                if first {
                    first = false;
                    match self.all_room_ids() {
                        Ok(all) => rooms.extend(all),
                        Err(e) => tracing::error!(error = %e, "cannot list rooms"),
                    }
                }
                rooms.append(&mut forked);
                (forked, next_merge) = self.merge_forward_extremities(rooms).await;
            }
            let now = self.now_ms();
            let mut next_wake: Option<u64> = next_merge;
            let ready: Vec<OwnedServerName> = self.sender.with(|m| {
                let mut r = Vec::new();
                for (d, st) in m.iter_mut() {
                    if !st.pending || st.in_flight {
                        continue;
                    }
                    if st.retry_at_ms > now {
                        next_wake = Some(next_wake.map_or(st.retry_at_ms, |w: u64| w.min(st.retry_at_ms)));
                        continue;
                    }
                    st.in_flight = true;
                    r.push(d.clone());
                }
                r
            });
            for dest in ready {
                let core = self.clone();
                // In the caller's span (the simulator names the node that way).
                tokio::spawn(tracing::Instrument::in_current_span(async move { core.deliver(dest).await }));
            }
            let sleep = next_wake.map(|w| Duration::from_millis(w.saturating_sub(self.now_ms()).max(10)));
            // `biased`: poll in a fixed order, so a simulation replays the same from its seed.
            tokio::select! {
                biased;
                _ = self.sender.wake.notified() => {}
                _ = async { match sleep { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
                _ = shutdown.changed() => { if *shutdown.borrow() { return; } }
            }
        }
    }

    /// Send queued PDUs to `dest` until its queue is empty or a request fails.
    async fn deliver(self: Arc<Self>, dest: OwnedServerName) {
        // Removing delivered PDUs from the queue need not be durable before the next
        // transaction (after a crash they are sent again, and peers ignore duplicates): one
        // flush when the queue is drained or delivery fails.
        let link_gen = self.sender.with(|m| m.entry(dest.clone()).or_default().link_gen);
        let result = self.with_deferred_flush(self.clone().drain_queue(dest.clone())).await.and_then(|r| r);
        let now = self.now_ms();
        self.sender.with(|m| {
            let st = m.entry(dest.clone()).or_default();
            st.in_flight = false;
            match &result {
                Ok(()) => {
                    st.failures = 0;
                    st.retry_at_ms = 0;
                    st.last_ok_ms = now;
                }
                // The peer came back while this attempt was on its way — typically over the
                // connection of its previous run, closed once the new one was identified: try
                // again at once on the new one instead of backing off.
                Err(_) if st.link_gen != link_gen => {
                    st.retry_at_ms = 0;
                    st.pending = true;
                }
                Err(_) => {
                    st.failures = st.failures.saturating_add(1);
                    let exp = BACKOFF_MS_MIN.saturating_mul(1 << st.failures.min(16).saturating_sub(1));
                    let jitter = self.random::<u64>() % (exp / 4 + 1);
                    st.retry_at_ms = now + exp.min(BACKOFF_MS_MAX) + jitter;
                    st.pending = true;
                }
            }
        });
        if let Err(e) = result {
            tracing::debug!(%dest, error = %e, "delivery failed; will retry");
        }
        self.sender.wake.notify_one();
    }

    /// Send transactions to `dest` until nothing is left, keeping up to [`PIPELINED_TXNS`] on
    /// their way: while the peer processes one, the next is built and sent, so neither side
    /// waits for the other (a long queue — a peer back after an hour — drains at the speed of
    /// the slower side). The peer processes one origin's transactions one at a time, in the
    /// order they arrive; if a later one overtakes, its gap is filled from us as any gap is.
    /// A failed transaction is kept and sent again unchanged next time; those behind it are
    /// dropped (their PDUs stay queued).
    async fn drain_queue(self: Arc<Self>, dest: OwnedServerName) -> Result<()> {
        let mut in_flight: VecDeque<(OutTxn, tokio::task::JoinHandle<Result<()>>)> = VecDeque::new();
        let mut more = true;
        loop {
            while more && in_flight.len() < PIPELINED_TXNS {
                let (txn, retried) = match in_flight.back() {
                    None => {
                        // Mark the queue as drained before reading it: an enqueue racing with
                        // us sets it again.
                        self.sender.with(|m| m.entry(dest.clone()).or_default().pending = false);
                        match self.fed.take_retry(&dest) {
                            Some(t) => (t, true),
                            None => (self.build_transaction(&dest)?, false),
                        }
                    }
                    // What was queued after the transactions on their way (a transaction sent
                    // again is as it was: what came since is in the next one).
                    Some(_) => {
                        let ahead: Vec<&OutTxn> = in_flight.iter().map(|(t, _)| t).collect();
                        (self.build_transaction_after(&dest, &ahead)?, false)
                    }
                };
                more = retried || txn.full || self.fed.has_ephemeral(&dest);
                if txn.is_empty() {
                    // Nothing left to send (e.g. PDUs that are gone): just drop the entries.
                    self.transaction_done(&dest, &txn).await?;
                    more |= in_flight.is_empty() && (!txn.pdu_keys.is_empty() || !txn.edu_keys.is_empty());
                    if in_flight.is_empty() {
                        continue;
                    }
                    break;
                }
                let core = self.clone();
                let (d, t) = (dest.clone(), txn.clone());
                let send = async move { core.post_transaction(&d, &t).await };
                // In the caller's span (the simulator names the node that way).
                in_flight.push_back((txn, tokio::spawn(tracing::Instrument::in_current_span(send))));
            }
            let Some((txn, handle)) = in_flight.pop_front() else { return Ok(()) };
            let outcome = handle.await.unwrap_or_else(|e| Err(crate::core::Error::Internal(e.to_string())));
            if let Err(e) = outcome {
                for (_, h) in in_flight.drain(..) {
                    h.abort();
                }
                self.fed.keep_retry(&dest, txn);
                return Err(e);
            }
            self.transaction_done(&dest, &txn).await?;
        }
    }

    /// Post one transaction to `dest`; Ok once the peer acknowledged it.
    async fn post_transaction(&self, dest: &ServerName, txn: &OutTxn) -> Result<()> {
        let ts = MilliSecondsSinceUnixEpoch(UInt::new(self.now_ms()).unwrap_or_default());
        let mut req = send_transaction_message::v1::Request::new(
            OwnedTransactionId::from(txn.id.clone()),
            self.server_name().to_owned(),
            ts,
        );
        req.pdus = txn.pdus.clone();
        req.edus = txn.edus.clone();
        let res = self.federation_request(dest, req).await?;
        for (id, r) in &res.pdus {
            if let Err(e) = r {
                tracing::info!(%dest, event_id = %id, error = %e, "peer refused a PDU");
            }
        }
        Ok(())
    }

    /// Queue `event_id` (at stream position `pos`) for each of `dests` into `batch`.
    pub(crate) fn enqueue_pdu(
        &self,
        batch: &mut Batch,
        dests: &BTreeSet<OwnedServerName>,
        pos: u64,
        event_id: &ruma::EventId,
    ) {
        for d in dests {
            batch.put(Tree::FedQueue, key(&[d.as_bytes(), &pos.to_be_bytes()]), event_id.as_bytes().to_vec());
        }
    }
}
