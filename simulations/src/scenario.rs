//! Scenario files: TOML, one per experiment (see `simulations/README.md` for every field).
//!
//! Node indices in a scenario (`node = 3`, partition groups) are taken modulo the node count, so
//! `--nodes` can scale a scenario without editing it. Times are virtual seconds from the start.

use serde::Deserialize;

/// One experiment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (used in the JSON line and the report).
    pub name: String,
    /// What the scenario tests, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// Default seed (the CLI's `--seed` overrides it).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Number of nodes (the CLI's `--nodes` overrides it).
    pub nodes: usize,
    /// Link model applied to every link.
    #[serde(default)]
    pub network: NetworkSpec,
    /// The shared room and how nodes join it.
    #[serde(default)]
    pub room: RoomSpec,
    /// Messages sent into the room.
    #[serde(default)]
    pub messages: MessagesSpec,
    /// Random conflicting state changes.
    #[serde(default)]
    pub state_changes: StateChangesSpec,
    /// Scheduled faults and repairs.
    #[serde(default)]
    pub events: Vec<EventSpec>,
    /// Nodes going offline and coming back at random.
    #[serde(default)]
    pub churn: Option<ChurnSpec>,
    /// Nodes moving in an area; links exist within radio range.
    #[serde(default)]
    pub mobility: Option<MobilitySpec>,
    /// What the checkers assert.
    #[serde(default)]
    pub checks: ChecksSpec,
    /// Virtual seconds to run after the workload ended and every fault was repaired.
    #[serde(default = "d_settle")]
    pub settle_s: f64,
    /// How often (virtual ms) the convergence sampler looks at the nodes.
    #[serde(default = "d_sample")]
    pub sample_ms: u64,
}

fn d_seed() -> u64 {
    1
}
fn d_settle() -> f64 {
    120.0
}
fn d_sample() -> u64 {
    250
}

/// Link model.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSpec {
    /// One-way delay.
    pub latency_ms: f64,
    /// Extra one-way delay, uniform in `[0, jitter_ms]`, per request and per response.
    pub jitter_ms: f64,
    /// Probability that a request, and independently its response, is lost (the caller sees
    /// a failure after `request_timeout_ms`).
    pub loss: f64,
    /// Link capacity per direction; 0 = unlimited. Transfers on a link queue behind each other.
    pub bandwidth_kbps: f64,
    /// How long a caller waits for a lost request or response.
    pub request_timeout_ms: u64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self { latency_ms: 20.0, jitter_ms: 5.0, loss: 0.0, bandwidth_kbps: 0.0, request_timeout_ms: 10_000 }
    }
}

/// The room every node joins.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomSpec {
    /// When the other nodes start joining (node 0 creates the room at 0 s).
    pub join_at_s: f64,
    /// Joins are spread uniformly over this many seconds (0 = all at once: a join storm).
    pub join_spread_s: f64,
    /// `creator`: only node 0's user has power; `all`: every node's user has power 100 (so
    /// every node can make conflicting state changes).
    pub power: String,
    /// A node that cannot join (no resident node in reach, or an error) retries after this.
    pub join_retry_s: f64,
}

impl Default for RoomSpec {
    fn default() -> Self {
        Self { join_at_s: 1.0, join_spread_s: 5.0, power: "creator".into(), join_retry_s: 5.0 }
    }
}

/// Messages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesSpec {
    /// How many messages are attempted.
    pub count: usize,
    /// First send time.
    pub from_s: f64,
    /// Last send time (sends are spread uniformly at random in between).
    pub until_s: f64,
    /// Send every message from this node (default: a random joined node each time).
    pub sender: Option<usize>,
    /// Message body size in bytes (padding), to load bandwidth-limited links.
    pub body_bytes: usize,
}

impl Default for MessagesSpec {
    fn default() -> Self {
        Self { count: 0, from_s: 10.0, until_s: 60.0, sender: None, body_bytes: 32 }
    }
}

/// Random state changes by random joined nodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateChangesSpec {
    /// How many are attempted.
    pub count: usize,
    /// First change.
    pub from_s: f64,
    /// Last change.
    pub until_s: f64,
    /// Kinds to pick from: `topic`, `power_levels`, `join_rules`, `ban`, `membership`.
    pub kinds: Vec<String>,
    /// A node whose user left (`membership`) joins again after this.
    pub rejoin_after_s: f64,
    /// A ban is lifted after this (and the user tries to join again `rejoin_after_s` later).
    pub unban_after_s: f64,
    /// At the end of the workload node 0 (the creator) makes the room public again and lifts
    /// every ban it sees, and every node joins again — so liveness is checked over everyone.
    pub reopen_at_end: bool,
}

impl Default for StateChangesSpec {
    fn default() -> Self {
        Self {
            count: 0,
            from_s: 10.0,
            until_s: 60.0,
            kinds: ["topic", "power_levels", "join_rules", "ban", "membership"].map(String::from).to_vec(),
            rejoin_after_s: 5.0,
            unban_after_s: 10.0,
            reopen_at_end: true,
        }
    }
}

/// A scheduled fault or repair.
#[derive(Clone, Debug, Deserialize)]
pub struct EventSpec {
    /// When.
    pub at_s: f64,
    /// What.
    #[serde(flatten)]
    pub action: Action,
}

/// Faults and repairs.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Two sides: the first `ceil(fraction × nodes)` nodes and the rest.
    Split {
        /// Share of nodes on the first side.
        fraction: f64,
    },
    /// Explicit groups; links between different groups are cut. Unlisted nodes form one more
    /// group.
    Partition {
        /// Node indices per group.
        groups: Vec<Vec<usize>>,
    },
    /// Undo any partition.
    Heal,
    /// Power cut: the node loses what it had not flushed, its tasks die, it leaves the network.
    Crash {
        /// Which node.
        node: usize,
    },
    /// Re-open a crashed node over its store.
    Restart {
        /// Which node.
        node: usize,
    },
    /// Take a node off the network (all its links) without crashing it.
    Disconnect {
        /// Which node.
        node: usize,
    },
    /// Put it back.
    Reconnect {
        /// Which node.
        node: usize,
    },
    /// Cut one link.
    LinkDown {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
    },
    /// Restore one link.
    LinkUp {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
    },
    /// Change the loss probability of every link.
    SetLoss {
        /// New probability.
        loss: f64,
    },
}

/// Churn: nodes (other than node 0) go offline and come back, with exponentially distributed
/// up and down times.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChurnSpec {
    /// Churn starts.
    pub from_s: f64,
    /// Churn stops (every node is back by then).
    pub until_s: f64,
    /// Share of nodes that churn.
    pub fraction: f64,
    /// Mean time online between outages.
    pub up_s_mean: f64,
    /// Mean outage.
    pub down_s_mean: f64,
    /// An outage is a crash (then a restart) instead of a disconnection.
    pub crash: bool,
}

impl Default for ChurnSpec {
    fn default() -> Self {
        Self { from_s: 10.0, until_s: 100.0, fraction: 0.5, up_s_mean: 20.0, down_s_mean: 10.0, crash: false }
    }
}

/// Pinecone-style mobility: nodes placed at random in a square, each moving a random distance
/// in a random direction every step; two nodes are linked when within `range_m`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MobilitySpec {
    /// Side of the square area.
    pub area_m: f64,
    /// Radio range.
    pub range_m: f64,
    /// Time between moves.
    pub step_s: f64,
    /// Number of moves.
    pub steps: usize,
    /// Largest move per step.
    pub move_m_max: f64,
    /// Messages sent per step, each by a random joined node.
    pub messages_per_step: usize,
}

impl Default for MobilitySpec {
    fn default() -> Self {
        Self { area_m: 1000.0, range_m: 200.0, step_s: 10.0, steps: 360, move_m_max: 20.0, messages_per_step: 1 }
    }
}

/// What the checkers assert (they always measure everything).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksSpec {
    /// `reachable`: every accepted message reaches every member that was connected to its
    /// origin through the links (time-respecting paths); `direct`: only members that had a
    /// direct link to the origin after it was sent (what today's protocol promises in a
    /// partial mesh); `none`.
    pub delivery: String,
    /// All nodes in the room that can reach each other end with identical resolved state.
    pub convergence: bool,
    /// Nothing acknowledged is lost (across crashes).
    pub durability: bool,
}

impl Default for ChecksSpec {
    fn default() -> Self {
        Self { delivery: "reachable".into(), convergence: true, durability: true }
    }
}

/// Errors reading a scenario.
#[derive(Debug)]
pub struct ScenarioError(pub String);

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Parse a scenario from TOML text, after applying `overrides` (`dotted.key=value`, the
    /// value in TOML syntax, e.g. `mobility.range_m=300`).
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self, ScenarioError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ScenarioError(format!("invalid scenario: {e}")))?;
        for o in overrides {
            let (path, value) =
                o.split_once('=').ok_or_else(|| ScenarioError(format!("override {o:?} is not key=value")))?;
            let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
                Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.into())),
                Err(_) => toml::Value::String(value.into()),
            };
            let mut table = &mut doc;
            let parts: Vec<&str> = path.trim().split('.').collect();
            for p in &parts[..parts.len() - 1] {
                let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
                table = entry.as_table_mut().ok_or_else(|| ScenarioError(format!("{path}: {p} is not a table")))?;
            }
            table.insert(parts[parts.len() - 1].to_owned(), value);
        }
        let s: Scenario = doc.try_into().map_err(|e| ScenarioError(format!("invalid scenario: {e}")))?;
        s.validate()?;
        Ok(s)
    }

    /// Read and parse a scenario file.
    pub fn load(path: &std::path::Path, overrides: &[String]) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError(format!("{}: {e}", path.display())))?;
        Self::parse(&text, overrides)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(ScenarioError(m.to_owned()));
        if self.nodes == 0 {
            return bad("nodes must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.network.loss) {
            return bad("network.loss must be in [0, 1]");
        }
        if !["creator", "all"].contains(&self.room.power.as_str()) {
            return bad("room.power is `creator` or `all`");
        }
        if !["reachable", "direct", "none"].contains(&self.checks.delivery.as_str()) {
            return bad("checks.delivery is `reachable`, `direct` or `none`");
        }
        for k in &self.state_changes.kinds {
            if !["topic", "power_levels", "join_rules", "ban", "membership"].contains(&k.as_str()) {
                return bad(&format!("unknown state change kind {k:?}"));
            }
        }
        if self.state_changes.count > 0 && self.state_changes.kinds.is_empty() {
            return bad("state_changes.kinds is empty");
        }
        if self.sample_ms == 0 {
            return bad("sample_ms must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply() {
        let s = Scenario::parse(
            "name = \"x\"\nnodes = 3\n[mobility]\nrange_m = 100.0\n",
            &["mobility.range_m=300.0".into(), "nodes=7".into()],
        )
        .unwrap();
        assert_eq!(s.nodes, 7);
        assert_eq!(s.mobility.unwrap().range_m, 300.0);
    }

    #[test]
    fn events_parse() {
        let s = Scenario::parse(
            "name = \"x\"\nnodes = 3\n[[events]]\nat_s = 5\naction = \"crash\"\nnode = 1\n[[events]]\nat_s = 6\naction = \"heal\"\n",
            &[],
        )
        .unwrap();
        assert!(matches!(s.events[0].action, Action::Crash { node: 1 }));
        assert!(matches!(s.events[1].action, Action::Heal));
    }
}
