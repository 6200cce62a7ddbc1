//! Failing seeds the simulator found, pinned after the fix, each with a one-line postmortem.
//! (A run prints its replay command; reproduce any of these with it.)

mod common;

use common::sim_ok;

/// Soft-failed PDUs were stored as outliers, so events built on them could not be connected:
/// gap filling rejected them ("prev events unknown"), messages were lost and states diverged.
#[test]
fn soft_failed_events_stay_in_the_dag() {
    sim_ok(
        "partition-heal.toml",
        1,
        5,
        &[r#"state_changes.kinds=["topic","power_levels","join_rules"]"#, "state_changes.reopen_at_end=false"],
    );
}

/// A banned server asked the banning server for the history leading to its own ban and got
/// 403 (not in the room), so it never processed the ban, nor the unban after it.
#[test]
fn banned_server_may_fetch_its_own_ban() {
    sim_ok("partition-heal.toml", 1, 5, &[r#"state_changes.kinds=["ban"]"#, "state_changes.reopen_at_end=false"]);
}

/// Rejoining stored the send_join answer as outliers over events the node already had in its
/// DAG (its own acknowledged leave among them): acknowledged events vanished.
#[test]
fn rejoin_never_downgrades_stored_events() {
    sim_ok(
        "partition-heal.toml",
        1,
        5,
        &[r#"state_changes.kinds=["membership"]"#, "state_changes.reopen_at_end=false"],
    );
}

/// Gap filling grafted the history from before a node's join (held as outliers) into its DAG,
/// where the oldest event became a forward extremity and dragged old state into resolution;
/// and a node rejoining with a stale copy resolved its old extremities as if they were
/// concurrent with the room's present (fixed: Tree::Referenced, gap filling leaves outliers
/// alone, rejoin pulls the gap first).
#[test]
fn old_history_never_becomes_a_forward_extremity() {
    for seed in [6, 7, 8, 12] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// Join storm: joins passed on by the resident reached joiners before their send_join answer
/// and were dropped ("not in room"); joiners never heard of the joins beside theirs; events
/// naming only 20 of 100 extremities were authorised against state they did not name. Members
/// saw each other's messages hidden as soft-failed.
#[test]
fn join_storm_everyone_sees_everyone() {
    let o = sim_ok("join-storm.toml", 1, 24, &["messages.count=30"]);
    assert_eq!(o.summary["pairs_soft_failed"], 0);
}

/// Bans, unbans, leaves and rejoins on both sides of a partition left nodes whose state
/// disagreed with everyone else's, or that never stored the unban sent to them: a rejoining
/// node resolved its stale copy against the present (an old join rule beat the creator's
/// newer one); a banned node could not fetch the auth events of its unban (403) and dropped
/// it; gaps longer than one `get_missing_events` answer, or only partly served by a server
/// that had just joined, never closed; soft-fail verdicts depended on which branch a server
/// saw first, and quiet rooms stayed forked. (Split in three so that they run in parallel.)
#[test]
fn membership_churn_across_a_partition_converges() {
    for seed in [2, 3] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// See `membership_churn_across_a_partition_converges`.
#[test]
fn membership_churn_across_a_partition_converges_2() {
    for seed in [4, 9] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// See `membership_churn_across_a_partition_converges`; seed 1 with bans only.
#[test]
fn membership_churn_across_a_partition_converges_3() {
    for seed in [10, 11] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
    sim_ok("partition-heal.toml", 1, 5, &[r#"state_changes.kinds=["ban"]"#]);
}

/// A join whose `send_join` answer was lost had been accepted: the room sent the joiner what
/// followed, which it dropped (not in the room yet), and its next attempt made a new join, so
/// the messages in between never reached it. The unanswered join is now sent again instead.
#[test]
fn a_join_whose_answer_was_lost_is_sent_again() {
    sim_ok("churn.toml", 17, 20, &[]);
}

/// Events sent beside a join (on history from before it) reached the joiner through gap
/// filling, could not connect and were rejected; they now get the state before them with
/// `state_ids`, as the event that needed them does.
#[test]
fn events_sent_beside_a_join_reach_the_joiner() {
    for seed in [28, 77] {
        sim_ok("churn.toml", seed, 20, &[]);
    }
}

/// A rejoin reached the rejoining node through the room before the `send_join` answer and was
/// soft-failed against its stale copy; the answer left it so. It is now adopted.
#[test]
fn a_rejoin_soft_failed_by_the_stale_copy_is_adopted() {
    sim_ok("partition-heal.toml", 21, 5, &[]);
}

/// A join kept after its answer was lost was sent again to a server that lacked its prev
/// events; that server asked the joiner (which holds nothing of the room) for the state before
/// it, got 404, and answered 404 — again and again. `state_ids` now falls back to the room's
/// other servers.
#[test]
fn state_ids_falls_back_to_other_servers() {
    sim_ok("churn.toml", 39, 20, &[]);
}

/// A node rejoining with a stale copy kept forward extremities the room had soft-failed or
/// gone on from without them (a join made on a resident's extremities right after the heal,
/// delivered late): resolved against the present they reset its state — an older join rule
/// beats the creator's newer one in v12's power ordering — so its user was out again and could
/// never send the event that would merge the branches (bug 13). The rejoining node now asks
/// the resident and three other servers what they made of them (verdicts.rs) and drops those
/// some settled and none holds as an extremity. Seed 50 also needs the other servers' verdicts
/// (the resident never got the event).
#[test]
fn a_rejoin_drops_the_extremities_the_room_went_on_without() {
    for seed in [50, 165] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// A resident answered 200 to a `send_join` whose join it soft-failed (a join sent again after
/// a lost answer) or lost in the resolution of its state; the joiner believed it was in while
/// every other server counted it out and sent it nothing (bug 14). Answered 403 now; the joiner
/// tries again on the room's present.
#[test]
fn a_join_that_does_not_stand_is_refused() {
    for seed in [576, 661] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// A join taken by the resident that the joiner's own copy counted out (it reached the copy
/// through the room first and lost in the resolution) was reported as joined; and the server
/// of a rejoin that a merge of branches then counted out was never told, because the event
/// that did it was its own (bug 15). `join_room` now fails such a join, and a server let out
/// by a resolution is told unless its own leave did it.
#[test]
fn a_join_counted_out_is_not_reported_as_joined() {
    for seed in [982, 1098] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// A server that a merge of branches put out of the room was sent the merge's extremities,
/// but every server answered its gap filling 403 (not in the room), so it never learnt it was
/// out and went on sending events everyone soft-failed (bug 16). It may read the room's
/// history for 10 minutes after a resolution lets it out.
#[test]
fn a_server_a_resolution_lets_out_may_catch_up() {
    sim_ok("partition-heal.toml", 413, 5, &[]);
}

/// A server a resolution let out was sent the room's extremities at that moment and nothing
/// after: one that fetched them while the room moved on (or whose fetch came back short)
/// kept a stale state where its user was in, soft-failing the room's events while the room
/// soft-failed its own (996, 1179), or kept a branch that reset the state for those it
/// reached (1250, 2007) (bug 17). While its read grant lasts it is now sent our events too.
#[test]
fn a_server_let_out_is_sent_what_follows() {
    for seed in [996, 1179, 1250, 2007] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// Two joins of one user were under way; the first landed, the second went on to the next
/// server, which made and accepted a second join event and lost its answer: every server but
/// the joiner's held that join as the room's head (1841, 2172) (bug 18). The join is now also
/// queued to the joiner, and a join stops once its user is in.
#[test]
fn an_accepted_join_reaches_the_joiner_even_if_its_answer_is_lost() {
    for seed in [1841, 2172] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}

/// Open (simulations/README.md, "Open"): seeds that do not converge today, about 1 in 325
/// partition-heal seeds. The shape of most: a node whose user rejoined on a stale copy while the
/// others count it out (its join soft-failed against their join rules or a ban they resolved
/// back in); it soft-fails nothing of theirs but is sent nothing more, and keeps its own state
/// (219, 1840). Which seeds fail moves with any change of timing; these are today's.
#[test]
#[ignore = "open bug: see simulations/README.md, Open"]
fn open_partition_heal_seeds() {
    for seed in [219, 725, 1125, 1433, 1461, 1840, 1981, 2141] {
        sim_ok("partition-heal.toml", seed, 5, &[]);
    }
}
