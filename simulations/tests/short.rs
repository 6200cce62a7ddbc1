//! The short form of the simulation suite, run by `cargo test`: every scenario with a few
//! nodes and a fixed seed (seconds each in a debug build), and the determinism check. The
//! long forms are documented in `simulations/README.md`.

mod common;

use common::sim_ok;

#[test]
fn two_nodes() {
    let o = sim_ok("two-nodes.toml", 1, 2, &[]);
    assert_eq!(o.summary["messages_sent"], 40);
    assert_eq!(o.summary["delivered_ratio"], 1.0);
}

#[test]
fn partition_heal() {
    let o = sim_ok("partition-heal.toml", 1, 4, &["messages.count=40", "state_changes.count=12"]);
    assert!(o.summary["state_changes_accepted"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn crash_during_sending() {
    let o = sim_ok("crash-during-sending.toml", 1, 3, &["messages.count=80"]);
    assert_eq!(o.summary["crashes"], 2);
}

#[test]
fn churn() {
    sim_ok("churn.toml", 1, 6, &["messages.count=40", "churn.until_s=80", "messages.until_s=80"]);
}

#[test]
fn join_storm() {
    let o = sim_ok("join-storm.toml", 1, 12, &["messages.count=20"]);
    assert_eq!(o.summary["nodes_joined_end"], 12);
}

#[test]
fn mobility() {
    let o = sim_ok("mobility.toml", 1, 12, &["mobility.steps=30", "mobility.range_m=400"]);
    assert!(o.summary["pairs_direct"].as_u64().unwrap_or(0) > 0);
}

/// Same scenario and seed → the same figures (everything but the wall time).
#[test]
fn same_seed_same_figures() {
    let args = ["messages.count=30", "state_changes.count=8"];
    let a = common::sim("partition-heal.toml", 3, 4, &args);
    let b = common::sim("partition-heal.toml", 3, 4, &args);
    assert_eq!(a.figures(), b.figures());
    let c = common::sim("partition-heal.toml", 4, 4, &args);
    assert_ne!(a.figures(), c.figures(), "a different seed should change something");
}

/// Partition-heal with membership churn (bans, unbans, leaves, rejoins) on both sides, over
/// many seeds: which seeds would fail moves with every change in arrival order, so one pinned
/// seed says little. Seeds 1–20 here (split in three to run in parallel; the seeds that fail
/// today are pinned in `regressions.rs::open_*`); the long form sweeps 1–100 in release
/// (`simulations/README.md`).
fn partition_heal_seeds(seeds: std::ops::RangeInclusive<u64>) {
    for seed in seeds {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

#[test]
fn partition_heal_sweep_1() {
    partition_heal_seeds(1..=7);
}

#[test]
fn partition_heal_sweep_2() {
    partition_heal_seeds(8..=14);
}

#[test]
fn partition_heal_sweep_3() {
    partition_heal_seeds(15..=20);
}
