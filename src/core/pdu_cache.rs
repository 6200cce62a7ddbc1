//! A bounded cache of stored PDUs, decoded.
//!
//! Receiving one PDU reads the same few auth events (create, power levels, the sender's
//! membership, join rules) five to ten times: the state-independent and state-dependent auth
//! checks, the state before the event, the current state for soft-failing, push rules. Each read
//! used to decode the stored record and then the PDU's JSON inside it. This cache keeps the
//! decoded record and, once asked for, the parsed PDU.
//!
//! Correctness: every write of the `Pdus` tree goes through [`Core::apply_batch`], which drops
//! the entries it replaces. A reader inserts what it read only if no write of that tree happened
//! between its read and its insert (an epoch counter), so a value read just before a write can
//! never outlive it in the cache.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, OnceLock},
};

use ruma::{EventId, OwnedEventId};

use super::{pdu::Pdu, rooms::StoredPdu, Core, Result};
use crate::store::{Batch, Op, Tree};

/// One cached record: the stored form and, decoded on first use, the PDU.
pub(crate) struct Entry {
    pub(crate) stored: StoredPdu,
    parsed: OnceLock<Pdu>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<OwnedEventId, Arc<Entry>>,
    /// Insertion order, for eviction (first in, first out; may hold keys already removed).
    order: VecDeque<OwnedEventId>,
    /// Bumped by every write of the `Pdus` tree.
    epoch: u64,
}

/// The cache (capacity from `limits.pdu_cache_entries`; 0 disables it).
pub(crate) struct PduCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl PduCache {
    pub(crate) fn new(capacity: usize) -> Self {
        PduCache { inner: Mutex::new(Inner::default()), capacity }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &EventId) -> Option<Arc<Entry>> {
        if self.capacity == 0 {
            return None;
        }
        self.lock().map.get(id).cloned()
    }

    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Insert what was read at `epoch`, unless a write happened since.
    fn insert(&self, id: &EventId, entry: Arc<Entry>, epoch: u64) {
        if self.capacity == 0 {
            return;
        }
        let mut c = self.lock();
        if c.epoch != epoch {
            return;
        }
        while c.map.len() >= self.capacity {
            match c.order.pop_front() {
                Some(old) => {
                    c.map.remove(&old);
                }
                None => break,
            }
        }
        if c.map.insert(id.to_owned(), entry).is_none() {
            c.order.push_back(id.to_owned());
        }
        if c.order.len() > 2 * self.capacity {
            // Removed keys pile up in `order`: rebuild it from the live ones.
            let live: VecDeque<OwnedEventId> = c.order.iter().filter(|k| c.map.contains_key(*k)).cloned().collect();
            c.order = live;
        }
    }

    /// Forget the records `batch` writes (called after it is applied).
    fn invalidate(&self, batch: &Batch) {
        let mut c = self.lock();
        c.epoch += 1;
        if c.map.is_empty() {
            return;
        }
        for op in &batch.ops {
            let key = match op {
                Op::Put(Tree::Pdus, k, _) | Op::Delete(Tree::Pdus, k) => k,
                _ => continue,
            };
            if let Some(id) = std::str::from_utf8(key).ok().and_then(|s| EventId::parse(s).ok()) {
                c.map.remove(&id);
            }
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl Core {
    /// Apply `batch` to the store, keeping the PDU cache coherent. Every write goes through here.
    pub(crate) fn apply_batch(&self, batch: Batch) -> Result<()> {
        let touches_pdus = batch.ops.iter().any(|op| matches!(op, Op::Put(Tree::Pdus, ..) | Op::Delete(Tree::Pdus, _)));
        if !touches_pdus {
            return Ok(self.store.apply(batch)?);
        }
        // Keep the keys: `apply` consumes the batch.
        let keys = Batch {
            ops: batch
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Put(Tree::Pdus, k, _) | Op::Delete(Tree::Pdus, k) => Some(Op::Delete(Tree::Pdus, k.clone())),
                    _ => None,
                })
                .collect(),
        };
        let applied = self.store.apply(batch);
        // Even a failed apply may have written part of the batch: drop the entries either way.
        self.pdu_cache.invalidate(&keys);
        Ok(applied?)
    }

    /// The cached record of `event_id`, reading (and caching) it from the store if needed.
    pub(crate) fn pdu_entry(&self, event_id: &EventId) -> Result<Option<Arc<Entry>>> {
        if let Some(e) = self.pdu_cache.get(event_id) {
            return Ok(Some(e));
        }
        let epoch = self.pdu_cache.epoch();
        let Some(stored) = self.get_json::<StoredPdu>(Tree::Pdus, event_id.as_bytes())? else {
            return Ok(None);
        };
        let entry = Arc::new(Entry { stored, parsed: OnceLock::new() });
        self.pdu_cache.insert(event_id, entry.clone(), epoch);
        Ok(Some(entry))
    }
}

impl Entry {
    /// The parsed PDU (decoded once per cached record).
    pub(crate) fn pdu(&self, event_id: &EventId) -> Result<Pdu> {
        if let Some(p) = self.parsed.get() {
            return Ok(p.clone());
        }
        let p = Pdu::from_json(event_id.to_owned(), &self.stored.json)?;
        Ok(self.parsed.get_or_init(|| p).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Arc<Entry> {
        Arc::new(Entry {
            stored: StoredPdu {
                json: json.into(),
                pos: 0,
                state_before: 0,
                state_after: 0,
                txn: None,
                redacted_by: None,
                outlier: false,
                soft_failed: false,
            },
            parsed: OnceLock::new(),
        })
    }

    fn id(n: usize) -> OwnedEventId {
        EventId::parse(format!("$e{n}")).unwrap()
    }

    #[test]
    fn bounded_first_in_first_out() {
        let c = PduCache::new(3);
        for n in 0..10 {
            c.insert(&id(n), entry("{}"), c.epoch());
            assert!(c.len() <= 3);
        }
        assert!(c.get(&id(9)).is_some() && c.get(&id(7)).is_some());
        assert!(c.get(&id(0)).is_none() && c.get(&id(6)).is_none());
    }

    #[test]
    fn a_read_from_before_a_write_is_not_cached() {
        let c = PduCache::new(8);
        let before = c.epoch();
        let mut b = Batch::new();
        b.put(Tree::Pdus, id(1).as_bytes().to_vec(), b"x".to_vec());
        c.invalidate(&b);
        c.insert(&id(1), entry("old"), before);
        assert!(c.get(&id(1)).is_none(), "a value read before the write must not be cached");
        c.insert(&id(1), entry("new"), c.epoch());
        assert_eq!(c.get(&id(1)).unwrap().stored.json, "new");
        c.invalidate(&b);
        assert!(c.get(&id(1)).is_none(), "a write drops the entry");
    }

    #[test]
    fn disabled_with_zero_capacity() {
        let c = PduCache::new(0);
        c.insert(&id(1), entry("{}"), c.epoch());
        assert!(c.get(&id(1)).is_none());
    }
}
