//! Failing seeds the simulator found, pinned after the fix, each with a one-line postmortem.
//! (A run prints its replay command; reproduce any of these with it.)

mod common;

use common::sim_ok;

/// Soft-failed PDUs were stored as outliers, so events built on them could not be connected:
/// gap filling rejected them ("prev events unknown"), messages were lost and states diverged.
#[test]
fn soft_failed_events_stay_in_the_dag() {
    sim_ok("partition-heal.toml", 1, 5, &[r#"state_changes.kinds=["topic","power_levels","join_rules"]"#]);
}

/// A banned server asked the banning server for the history leading to its own ban and got
/// 403 (not in the room), so it never processed the ban, nor the unban after it.
#[test]
fn banned_server_may_fetch_its_own_ban() {
    sim_ok("partition-heal.toml", 1, 5, &[r#"state_changes.kinds=["ban"]"#]);
}

/// Rejoining stored the send_join answer as outliers over events the node already had in its
/// DAG (its own acknowledged leave among them): acknowledged events vanished.
#[test]
fn rejoin_never_downgrades_stored_events() {
    sim_ok("partition-heal.toml", 1, 5, &[r#"state_changes.kinds=["membership"]"#]);
}

/// Gap filling grafted the history from before a node's join (held as outliers) into its DAG,
/// where the oldest event became a forward extremity and dragged old state into resolution.
#[test]
fn old_history_never_becomes_a_forward_extremity() {
    sim_ok("partition-heal.toml", 6, 5, &[]);
    sim_ok("partition-heal.toml", 8, 5, &[]);
}

/// Open: with bans, unbans, leaves and rejoins on both sides of a partition, some seeds still
/// end with a node whose own membership disagrees with the others' (e.g. it never stores the
/// unban sent to it). Kept here so the fix has its test; see simulations/README.md.
#[test]
#[ignore = "open bug: membership churn across a partition (see simulations/README.md)"]
fn membership_churn_across_a_partition_converges() {
    for seed in [2, 3, 4, 9] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}
