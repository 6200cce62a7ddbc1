//! Room state: state groups (state as deltas against a parent snapshot), state at an event,
//! auth chains, and state resolution through `ruma::state_res`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ruma::{
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    state_res::{self, utils::event_id_set::EventIdSet},
    EventId, OwnedEventId,
};
use serde::{Deserialize, Serialize};

use super::{pdu::Pdu, to_json, Core, Error, Result};
use crate::store::{Batch, Tree};

/// Looks up an event by id (the store, possibly overlaid with events not stored yet).
pub type Fetch<'a> = &'a dyn Fn(&EventId) -> Result<Option<Pdu>>;

/// `(event type, state key) → event id`, in a deterministic order.
pub type StateMap = BTreeMap<(String, String), OwnedEventId>;

/// A stored state group: a delta against `parent`, or a full snapshot when `parent` is `None`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateGroup {
    /// The group this one extends.
    pub parent: Option<u64>,
    /// Length of the delta chain down to a full snapshot.
    pub depth: u32,
    /// `(type, state_key, event_id)` set in this group.
    pub delta: Vec<(String, String, OwnedEventId)>,
}

/// Longest delta chain before a full snapshot is written.
const MAX_CHAIN: u32 = 32;
/// State maps kept decoded in memory.
const STATE_CACHE_MAX: usize = 64;

impl Core {
    /// The full state of group `sg` (0 is the empty state).
    pub fn state_of_group(&self, sg: u64) -> Result<Arc<StateMap>> {
        if sg == 0 {
            return Ok(Arc::new(StateMap::new()));
        }
        if let Some(m) = self.state_cache_get(sg) {
            return Ok(m);
        }
        let mut chain = Vec::new();
        let mut cur = Some(sg);
        while let Some(g) = cur {
            let group: StateGroup = self
                .get_json(Tree::StateGroups, &g.to_be_bytes())?
                .ok_or_else(|| Error::Internal(format!("missing state group {g}")))?;
            cur = group.parent;
            chain.push(group);
        }
        let mut map = StateMap::new();
        for group in chain.into_iter().rev() {
            for (t, k, e) in group.delta {
                map.insert((t, k), e);
            }
        }
        let map = Arc::new(map);
        self.state_cache_put(sg, map.clone());
        Ok(map)
    }

    fn state_cache_get(&self, sg: u64) -> Option<Arc<StateMap>> {
        self.state_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&sg).cloned()
    }

    fn state_cache_put(&self, sg: u64, map: Arc<StateMap>) {
        let mut c = self.state_cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= STATE_CACHE_MAX {
            // Evict the oldest group: newer groups are the ones in use.
            if let Some(first) = c.keys().next().copied() {
                c.remove(&first);
            }
        }
        c.insert(sg, map);
    }

    /// Queue state group `sg` = `parent` (of chain depth `parent_depth`) + `delta`, whose full
    /// map is `full`, into `batch`. Returns the new group's chain depth.
    pub(crate) fn write_state_group(
        &self,
        batch: &mut Batch,
        sg: u64,
        parent: u64,
        parent_depth: u32,
        delta: &StateMap,
        full: Arc<StateMap>,
    ) -> Result<u32> {
        let group = if parent != 0 && parent_depth < MAX_CHAIN {
            StateGroup {
                parent: Some(parent),
                depth: parent_depth + 1,
                delta: delta.iter().map(|((t, k), e)| (t.clone(), k.clone(), e.clone())).collect(),
            }
        } else {
            StateGroup {
                parent: None,
                depth: 0,
                delta: full.iter().map(|((t, k), e)| (t.clone(), k.clone(), e.clone())).collect(),
            }
        };
        let depth = group.depth;
        batch.put(Tree::StateGroups, sg.to_be_bytes().to_vec(), to_json(&group));
        self.state_cache_put(sg, full);
        Ok(depth)
    }

    /// Every event reachable from `ids` through `auth_events` (excluding `ids` themselves
    /// unless reachable).
    pub fn auth_chain(&self, ids: impl IntoIterator<Item = OwnedEventId>) -> Result<BTreeSet<OwnedEventId>> {
        self.auth_chain_with(ids, &|id| self.pdu(id))
    }

    /// [`Core::auth_chain`] with a custom event lookup (for events not stored yet).
    pub fn auth_chain_with(
        &self,
        ids: impl IntoIterator<Item = OwnedEventId>,
        fetch: Fetch<'_>,
    ) -> Result<BTreeSet<OwnedEventId>> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<OwnedEventId> = Vec::new();
        for id in ids {
            if let Some(p) = fetch(&id)? {
                todo.extend(p.auth_events.iter().cloned());
            }
        }
        while let Some(id) = todo.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(p) = fetch(&id)? {
                todo.extend(p.auth_events.iter().filter(|a| !seen.contains(*a)).cloned());
            }
        }
        Ok(seen)
    }

    /// Resolve `forks` (state maps of the prev events) with the room version's algorithm
    /// (v2, or v2.1 for room v12).
    pub fn resolve_state(&self, rules: &RoomVersionRules, forks: &[Arc<StateMap>]) -> Result<StateMap> {
        self.resolve_state_with(rules, forks, &|id| self.pdu(id))
    }

    /// [`Core::resolve_state`] with a custom event lookup (for events not stored yet).
    pub fn resolve_state_with(
        &self,
        rules: &RoomVersionRules,
        forks: &[Arc<StateMap>],
        fetch: Fetch<'_>,
    ) -> Result<StateMap> {
        match forks {
            [] => return Ok(StateMap::new()),
            [one] => return Ok((**one).clone()),
            _ => {}
        }
        if forks.iter().all(|f| f == &forks[0]) {
            return Ok((*forks[0]).clone());
        }
        let v2 =
            rules.state_res.v2_rules().ok_or_else(|| Error::Internal("room version without state res v2".into()))?;
        let maps: Vec<state_res::StateMap<OwnedEventId>> = forks
            .iter()
            .map(|f| f.iter().map(|((t, k), e)| ((StateEventType::from(t.as_str()), k.clone()), e.clone())).collect())
            .collect();
        let mut auth_chains = Vec::with_capacity(forks.len());
        for f in forks {
            let chain = self.auth_chain_with(f.values().cloned(), fetch)?;
            auth_chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
        }
        let fetch_event = |id: &EventId| fetch(id).ok().flatten();
        let subgraph = |conflicted: &state_res::StateMap<Vec<OwnedEventId>>| {
            self.conflicted_subgraph(conflicted.values().flatten().cloned().collect(), fetch).ok()
        };
        let resolved = state_res::resolve(&rules.authorization, v2, maps.iter(), auth_chains, fetch_event, subgraph)
            .map_err(|e| Error::Internal(format!("state resolution failed: {e}")))?;
        Ok(resolved.into_iter().map(|((t, k), e)| ((t.to_string(), k), e)).collect())
    }

    /// The conflicted state subgraph of state resolution v2.1: events on an `auth_events`
    /// path from one conflicted event to another (the conflicted events included).
    fn conflicted_subgraph(
        &self,
        conflicted: BTreeSet<OwnedEventId>,
        fetch: Fetch<'_>,
    ) -> Result<EventIdSet<OwnedEventId>> {
        // Collect the auth DAG below the conflicted set.
        let mut parents: BTreeMap<OwnedEventId, Vec<OwnedEventId>> = BTreeMap::new();
        let mut todo: Vec<OwnedEventId> = conflicted.iter().cloned().collect();
        while let Some(id) = todo.pop() {
            if parents.contains_key(&id) {
                continue;
            }
            let ps = fetch(&id)?.map(|p| p.auth_events).unwrap_or_default();
            todo.extend(ps.iter().cloned());
            parents.insert(id, ps);
        }
        // reaches[x]: x is conflicted or one of its auth ancestors is.
        fn reaches(
            x: &OwnedEventId,
            parents: &BTreeMap<OwnedEventId, Vec<OwnedEventId>>,
            conflicted: &BTreeSet<OwnedEventId>,
            memo: &mut BTreeMap<OwnedEventId, bool>,
        ) -> bool {
            if let Some(r) = memo.get(x) {
                return *r;
            }
            memo.insert(x.clone(), false); // DAG, but guard against malformed cycles
            let r = conflicted.contains(x)
                || parents.get(x).is_some_and(|ps| ps.iter().any(|p| reaches(p, parents, conflicted, memo)));
            memo.insert(x.clone(), r);
            r
        }
        let mut memo = BTreeMap::new();
        let mut out = EventIdSet::new();
        for id in parents.keys() {
            if reaches(id, &parents, &conflicted, &mut memo) {
                out.insert(id.clone());
            }
        }
        Ok(out)
    }

    /// The state before `pdu`: the resolved state after each of its prev events.
    pub fn state_before(&self, rules: &RoomVersionRules, pdu: &Pdu) -> Result<StateMap> {
        let mut forks = Vec::new();
        for prev in &pdu.prev_events {
            let Some(stored) = self.stored_pdu(prev)? else {
                return Err(Error::NotFound(format!("missing prev event {prev}")));
            };
            forks.push(self.state_after(&stored)?);
        }
        self.resolve_state(rules, &forks)
    }
}
