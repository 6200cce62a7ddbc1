//! Tier-1 tests of the core: no sockets, in-memory store, the same code as production.

use std::sync::Arc;

use ruma::{events::TimelineEventType, OwnedRoomId, OwnedUserId, RoomVersionId};
use serde_json::{json, Value};

use super::{pdu::PduTemplate, rooms::CreateRoomSpec, Core, Error, Limits};
use crate::{clock::SystemClock, identity::Identity, store::MemoryStore};

fn core_with(store: Arc<MemoryStore>, seed: [u8; 32]) -> Arc<Core> {
    Core::open(store, Identity::from_seed(seed), Arc::new(SystemClock), Limits::default()).unwrap()
}

async fn setup(version: RoomVersionId) -> (Arc<Core>, OwnedUserId, OwnedUserId, OwnedRoomId) {
    let core = core_with(Arc::new(MemoryStore::default()), [7; 32]);
    let alice = core.register("alice", Some("pw")).await.unwrap();
    let bob = core.register("bob", Some("pw")).await.unwrap();
    let spec = CreateRoomSpec {
        version: Some(version),
        preset: Some("public_chat".into()),
        topic: Some("original".into()),
        ..Default::default()
    };
    let room = core.create_room(&alice, spec).await.unwrap();
    core.set_membership(&bob, &room, &bob, "join", None, None).await.unwrap();
    (core, alice, bob, room)
}

fn state(kind: &str, key: &str, content: Value) -> PduTemplate {
    PduTemplate { kind: TimelineEventType::from(kind), content, state_key: Some(key.into()), redacts: None }
}

fn msg(body: &str) -> PduTemplate {
    PduTemplate {
        kind: TimelineEventType::RoomMessage,
        content: json!({"msgtype": "m.text", "body": body}),
        state_key: None,
        redacts: None,
    }
}

fn topic(core: &Core, room: &OwnedRoomId) -> String {
    let p = core.state_event(room, "m.room.topic", "").unwrap().unwrap();
    p.content_value()["topic"].as_str().unwrap().to_owned()
}

fn power_levels(core: &Core, room: &OwnedRoomId) -> Value {
    core.state_event(room, "m.room.power_levels", "").unwrap().unwrap().content_value()
}

#[tokio::test]
async fn every_supported_room_version_creates_and_sends() {
    for v in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
        let (core, alice, _bob, room) = setup(v.clone()).await;
        let id = core.send_event(&alice, None, &room, msg("hi"), None).await.unwrap();
        let pdu = core.pdu(&id).unwrap().unwrap();
        assert_eq!(pdu.room, room);
        // Event ids are url-safe reference hashes.
        assert_eq!(id.as_str().len(), 44, "{v}: {id}");
        if v == RoomVersionId::V12 {
            let create = core.room(&room).unwrap().unwrap().create_event;
            assert_eq!(&room.as_str()[1..], &create.as_str()[1..], "v12 room id is the create event hash");
        } else {
            assert!(room.as_str().ends_with(core.server_name().as_str()));
        }
    }
}

#[tokio::test]
async fn unauthorised_state_change_is_refused_and_nothing_is_stored() {
    let (core, alice, bob, room) = setup(RoomVersionId::V12).await;
    let mut pl = power_levels(&core, &room);
    pl["events"]["m.room.topic"] = json!(100);
    core.send_event(&alice, None, &room, state("m.room.power_levels", "", pl), None).await.unwrap();
    let before = core.visible_pos();
    let err = core.send_event(&bob, None, &room, state("m.room.topic", "", json!({"topic": "mine"})), None).await;
    assert!(matches!(err, Err(Error::Forbidden(_))), "{err:?}");
    assert_eq!(core.visible_pos(), before, "a refused event takes no stream position");
    assert_eq!(topic(&core, &room), "original");
    // A user who never joined cannot send at all.
    let carol = core.register("carol", None).await.unwrap();
    assert!(matches!(core.send_event(&carol, None, &room, msg("x"), None).await, Err(Error::Forbidden(_))));
}

#[tokio::test]
async fn transaction_ids_make_sends_idempotent() {
    let (core, alice, _bob, room) = setup(RoomVersionId::V12).await;
    let dev = ruma::OwnedDeviceId::from("DEV");
    let txn = ruma::OwnedTransactionId::from("t1");
    let a = core.send_event(&alice, Some(&dev), &room, msg("once"), Some(&txn)).await.unwrap();
    let b = core.send_event(&alice, Some(&dev), &room, msg("once"), Some(&txn)).await.unwrap();
    assert_eq!(a, b);
}

#[tokio::test]
async fn redaction_strips_content_and_needs_power() {
    let (core, alice, bob, room) = setup(RoomVersionId::V11).await;
    let target = core.send_event(&alice, None, &room, msg("secret"), None).await.unwrap();
    let redact = |sender: OwnedUserId| {
        let core = core.clone();
        let room = room.clone();
        let target = target.clone();
        async move {
            let t = PduTemplate {
                kind: TimelineEventType::RoomRedaction,
                content: json!({"redacts": target}),
                state_key: None,
                redacts: Some(target.clone()),
            };
            core.send_event(&sender, None, &room, t, None).await
        }
    };
    assert!(matches!(redact(bob.clone()).await, Err(Error::Forbidden(_))), "bob (power 0) may not redact alice");
    let by = redact(alice.clone()).await.unwrap();
    let stored = core.stored_pdu(&target).unwrap().unwrap();
    assert_eq!(stored.redacted_by.as_ref(), Some(&by));
    let pdu = core.pdu(&target).unwrap().unwrap();
    assert_eq!(pdu.content_value(), json!({}), "redacted content is gone");
}

/// Two branches fork from the same event: on one, alice demotes bob; on the other, bob (still
/// a moderator there) changes the topic. Resolution applies the power change first and then
/// re-checks bob's topic against it, so the topic change loses — whatever order the forks come in.
#[tokio::test]
async fn state_resolution_prefers_power_events_and_reauthorises() {
    for v in [RoomVersionId::V10, RoomVersionId::V12] {
        let (core, alice, bob, room) = setup(v.clone()).await;
        let mut pl = power_levels(&core, &room);
        pl["users"][bob.as_str()] = json!(50);
        let base =
            core.send_event(&alice, None, &room, state("m.room.power_levels", "", pl.clone()), None).await.unwrap();

        pl["users"][bob.as_str()] = json!(0);
        let demote =
            core.send_event_on(&alice, &room, state("m.room.power_levels", "", pl), vec![base.clone()]).await.unwrap();
        let bobs_topic = core
            .send_event_on(&bob, &room, state("m.room.topic", "", json!({"topic": "bob was here"})), vec![base.clone()])
            .await
            .unwrap();
        // Two forward extremities now; the room state is their resolution.
        assert_eq!(topic(&core, &room), "original", "{v}: bob's topic must not survive his demotion");
        assert_eq!(power_levels(&core, &room)["users"][bob.as_str()], json!(0));

        // Resolution does not depend on the order of the forks.
        let rules = super::pdu::rules_for(&v).unwrap();
        let s1 = core.state_after(&core.stored_pdu(&demote).unwrap().unwrap()).unwrap();
        let s2 = core.state_after(&core.stored_pdu(&bobs_topic).unwrap().unwrap()).unwrap();
        let ab = core.resolve_state(&rules, &[s1.clone(), s2.clone()]).unwrap();
        let ba = core.resolve_state(&rules, &[s2, s1]).unwrap();
        assert_eq!(ab, ba);

        // A merge event references both branches and builds on the resolved state.
        let merge = core.send_event(&alice, None, &room, msg("merged"), None).await.unwrap();
        let merged = core.pdu(&merge).unwrap().unwrap();
        assert_eq!(merged.prev_events.len(), 2, "{v}: local events merge every extremity");
        assert_eq!(topic(&core, &room), "original");
    }
}

/// A ban on one branch beats a message-less join race on another: after resolution the banned
/// user is banned, and the node's own membership view (used by sync) agrees.
#[tokio::test]
async fn concurrent_ban_and_profile_change_resolve_to_ban() {
    let (core, alice, bob, room) = setup(RoomVersionId::V12).await;
    let base = core.send_event(&alice, None, &room, msg("base"), None).await.unwrap();
    core.send_event_on(
        &alice,
        &room,
        state("m.room.member", bob.as_str(), json!({"membership": "ban"})),
        vec![base.clone()],
    )
    .await
    .unwrap();
    core.send_event_on(
        &bob,
        &room,
        state("m.room.member", bob.as_str(), json!({"membership": "join", "displayname": "Bobby"})),
        vec![base],
    )
    .await
    .unwrap();
    assert_eq!(core.membership(&room, &bob).unwrap().as_deref(), Some("ban"));
    let all = core.user_rooms(&bob).unwrap();
    let ur = all.into_iter().find(|(r, _)| *r == room).unwrap().1;
    assert_eq!(ur.membership, "ban");
}

/// Everything acknowledged survives a crash that loses unflushed writes.
#[tokio::test]
async fn acknowledged_events_survive_a_crash() {
    let store = Arc::new(MemoryStore::default());
    let core = core_with(store.clone(), [9; 32]);
    let alice = core.register("alice", None).await.unwrap();
    let room = core.create_room(&alice, CreateRoomSpec::default()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(core.send_event(&alice, None, &room, msg(&format!("m{i}")), None).await.unwrap());
    }
    drop(core);
    store.crash();
    let core = core_with(store, [9; 32]);
    for id in &ids {
        assert!(core.pdu(id).unwrap().is_some(), "{id} lost");
    }
    // And the room keeps working from where it was.
    let next = core.send_event(&alice, None, &room, msg("after"), None).await.unwrap();
    assert_eq!(core.pdu(&next).unwrap().unwrap().prev_events, vec![ids.last().unwrap().clone()]);
}

/// Commits inside `with_deferred_flush` are neither visible to syncs nor flushed until it ends;
/// then one flush makes all of them durable and visible, and they survive a crash.
#[tokio::test]
async fn deferred_commits_share_one_flush_and_become_visible_together() {
    let store = Arc::new(MemoryStore::default());
    let core = core_with(store.clone(), [11; 32]);
    let alice = core.register("alice", None).await.unwrap();
    let (pos, flushes) = (core.visible_pos(), core.flush_count());
    core.with_deferred_flush(async {
        for i in 0..5 {
            core.set_account_data(&alice, None, &format!("org.example.k{i}"), json!({"i": i})).await.unwrap();
            assert_eq!(core.visible_pos(), pos, "not visible before the flush");
        }
    })
    .await
    .unwrap();
    assert_eq!(core.visible_pos(), pos + 5);
    assert_eq!(core.flush_count(), flushes + 1, "one flush for the five commits");
    drop(core);
    store.crash();
    let core = core_with(store, [11; 32]);
    assert!(core.account_data(&alice, None, "org.example.k4").unwrap().is_some());
}

/// Unread counts are memoised per event; a redaction still takes the event out of the count.
#[tokio::test]
async fn unread_count_drops_a_redacted_event() {
    let (core, alice, bob, room) = setup(RoomVersionId::V12).await;
    let first = core.send_event(&alice, None, &room, msg("one"), None).await.unwrap();
    core.send_event(&alice, None, &room, msg("two"), None).await.unwrap();
    let count = |core: &Core| core.room_unread(&bob, &room, core.visible_pos(), false).unwrap().room.notification_count;
    assert_eq!(count(&core), 2);
    assert_eq!(count(&core), 2, "the same from the memo");
    let t = PduTemplate {
        kind: TimelineEventType::RoomRedaction,
        content: json!({"redacts": first}),
        state_key: None,
        redacts: Some(first.clone()),
    };
    core.send_event(&alice, None, &room, t, None).await.unwrap();
    assert_eq!(count(&core), 1, "the redacted message no longer counts (the redaction itself does not notify)");
}

/// The unread window a count keeps is read on from where it ended; it gives what a fresh scan
/// gives, as events arrive past the scan limit, as a receipt moves the read point, and for an
/// older position than the window's.
#[tokio::test]
async fn unread_counts_read_on_from_the_kept_window_as_a_fresh_scan_would() {
    let limits = Limits { unread_scan_events_max: 5, ..Limits::default() };
    let core =
        Core::open(Arc::new(MemoryStore::default()), Identity::from_seed([9; 32]), Arc::new(SystemClock), limits)
            .unwrap();
    let alice = core.register("alice", None).await.unwrap();
    let bob = core.register("bob", None).await.unwrap();
    let room = core.create_room(&alice, CreateRoomSpec::default()).await.unwrap();
    core.set_membership(&alice, &room, &bob, "invite", None, None).await.unwrap();
    core.set_membership(&bob, &room, &bob, "join", None, None).await.unwrap();
    let kept = |core: &Core, upto: u64| core.room_unread(&bob, &room, upto, false).unwrap().room.notification_count;
    let fresh = |core: &Core, upto: u64| {
        core.unread_memo.invalidate();
        kept(core, upto)
    };
    let mut ids = Vec::new();
    for (n, want) in [(3, 3), (1, 4), (4, 5)] {
        for _ in 0..n {
            ids.push(core.send_event(&alice, None, &room, msg("m"), None).await.unwrap());
        }
        let upto = core.visible_pos();
        assert_eq!(kept(&core, upto), want, "after {} messages", ids.len());
        assert_eq!(fresh(&core, upto), want);
        assert_eq!(kept(&core, upto), want, "from the window just rebuilt");
    }
    // Read up to the sixth of eight: two are left.
    core.set_receipt(&bob, &room, "m.read", &ids[5], None).await.unwrap();
    let upto = core.visible_pos();
    assert_eq!(kept(&core, upto), 2);
    assert_eq!(fresh(&core, upto), 2);
    // Bob's own message does not count, alice's two after it do; then an older position.
    core.send_event(&bob, None, &room, msg("mine"), None).await.unwrap();
    let mid = core.visible_pos();
    for _ in 0..2 {
        core.send_event(&alice, None, &room, msg("m"), None).await.unwrap();
    }
    let upto = core.visible_pos();
    assert_eq!(kept(&core, upto), 4);
    assert_eq!(kept(&core, mid), 2, "an older position than the window's");
    assert_eq!(fresh(&core, mid), 2);
    assert_eq!(kept(&core, upto), 4);
    assert_eq!(fresh(&core, upto), 4);
}

/// A server a resolution let out may read the room's history for a while, and is sent what our
/// users send meanwhile; a server that was never in the room reads nothing.
#[tokio::test]
async fn let_out_servers_may_read_and_are_sent_our_events_strangers_not() {
    let (core, alice, _bob, room) = setup(RoomVersionId::V12).await;
    let id = core.send_event(&alice, None, &room, msg("plan"), None).await.unwrap();
    let stranger = ruma::server_name!("stranger.example");
    assert!(matches!(core.event_for_server(stranger, &id), Err(Error::Forbidden(_))));
    assert!(matches!(
        core.missing_events_for_server(stranger, &room, &[], &[id.clone()], 10, 0),
        Err(Error::Forbidden(_))
    ));
    assert!(core.let_out_servers(&room).is_empty());

    let let_out = ruma::server_name!("letout.example");
    core.note_let_out(&room, let_out);
    let raw = core.event_for_server(let_out, &id).unwrap();
    assert_eq!(serde_json::from_str::<Value>(raw.get()).unwrap()["content"]["body"], "plan");
    assert_eq!(core.let_out_servers(&room), vec![let_out.to_owned()]);
    // What alice sends now is queued to it (it is in no room state, so only the grant does it).
    core.send_event(&alice, None, &room, msg("later"), None).await.unwrap();
    assert!(core.queue_depth(let_out).unwrap() > 0, "the let-out server is sent our new event");
    assert_eq!(core.queue_depth(stranger).unwrap(), 0);
}
