//! Black-box tests of the client-server API, driven mostly through matrix-sdk (a real Matrix
//! client library) against a real `outpost` process; raw HTTP where the exact JSON matters.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{enc, event_id, hex_server_name, login, paginate_all, poll_until, register, token, Api, Node};
use matrix_sdk::{
    config::SyncSettings,
    room::MessagesOptions,
    ruma::{
        api::client::{
            filter::FilterDefinition, membership::joined_members, room::create_room, sync::sync_events::v3::Filter,
        },
        events::room::{message::RoomMessageEventContent, topic::RoomTopicEventContent},
        OwnedEventId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomOrAliasId, UInt,
    },
    Client, Room, RoomMemberships, RoomState,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `createRoom` through matrix-sdk.
async fn create_room(
    client: &Client,
    name: Option<&str>,
    topic: Option<&str>,
    preset: Option<create_room::v3::RoomPreset>,
    invite: &[OwnedUserId],
) -> Room {
    let mut req = create_room::v3::Request::new();
    req.name = name.map(str::to_owned);
    req.topic = topic.map(str::to_owned);
    req.preset = preset;
    req.invite = invite.to_vec();
    client.create_room(req).await.unwrap_or_else(|e| panic!("createRoom failed: {e:?}"))
}

/// A room with `alice` (creator) and `bob` (joined), private_chat with bob invited.
async fn room_with_alice_and_bob(alice: &Client, bob: &Client, name: &str) -> (Room, Room) {
    let bob_id = bob.user_id().unwrap().to_owned();
    let room = create_room(alice, Some(name), None, Some(create_room::v3::RoomPreset::PrivateChat), &[bob_id]).await;
    let broom = bob.join_room_by_id(room.room_id()).await.unwrap_or_else(|e| panic!("bob's join failed: {e:?}"));
    (room, broom)
}

/// A sync filter with the given timeline limit.
fn timeline_filter(limit: u32) -> Filter {
    let mut def = FilterDefinition::default();
    def.room.timeline.limit = Some(UInt::from(limit));
    Filter::FilterDefinition(def)
}

/// A raw `/sync` (JSON), with an inline filter.
async fn raw_sync(api: &Api, since: Option<&str>, timeout_ms: u64, filter: &Value) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}&filter={}", enc(&filter.to_string()));
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    api.get(&path).await.ok()
}

/// The JSON of a matrix-sdk timeline event.
fn json_of(ev: &matrix_sdk::deserialized_responses::TimelineEvent) -> Value {
    serde_json::from_str(ev.raw().json().get()).expect("event JSON")
}

/// Body of an `m.room.message` event.
fn body(ev: &Value) -> Option<&str> {
    if ev["type"] == "m.room.message" {
        ev["content"]["body"].as_str()
    } else {
        None
    }
}

/// `GET .../state/{type}/{key}` as JSON content (panics unless 200).
async fn state_content(api: &Api, room: &str, ty: &str, key: &str) -> Value {
    api.get(&format!("/_matrix/client/v3/rooms/{}/state/{}/{}", enc(room), enc(ty), enc(key))).await.ok()
}

/// User ids in `/joined_members`, through matrix-sdk's request type.
async fn joined_member_ids(client: &Client, room_id: &OwnedRoomId) -> BTreeSet<String> {
    let res = client
        .send(joined_members::v3::Request::new(room_id.clone()))
        .await
        .unwrap_or_else(|e| panic!("joined_members failed: {e:?}"));
    res.joined.keys().map(|u| u.to_string()).collect()
}

/// Every event in the room via `/messages` through matrix-sdk, following `end` tokens in `dir`.
async fn sdk_paginate(room: &Room, backward: bool, limit: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from: Option<String> = None;
    for page in 0.. {
        assert!(page < 10_000, "/messages pagination does not terminate");
        let mut opts = if backward { MessagesOptions::backward() } else { MessagesOptions::forward() };
        opts.limit = UInt::from(limit);
        opts.from = from.clone();
        let res = room.messages(opts).await.unwrap_or_else(|e| panic!("/messages failed: {e:?}"));
        assert!(res.chunk.len() <= limit as usize, "page larger than the limit");
        let empty = res.chunk.is_empty();
        out.extend(res.chunk.iter().map(json_of));
        match res.end {
            Some(end) if !empty => {
                assert_ne!(Some(&end), from.as_ref(), "/messages `end` did not advance");
                from = Some(end);
            }
            _ => break,
        }
    }
    out
}

/// The events before a sync's `prev_batch`, paginating backward until an event in `known` (or
/// the start of the room) is reached; oldest first. This is how a client fills a `limited` gap.
async fn events_in_gap(room: &Room, prev_batch: &str, known: &HashSet<String>) -> Vec<Value> {
    let mut missing = Vec::new();
    let mut from = prev_batch.to_owned();
    'fill: for page in 0.. {
        assert!(page < 1_000, "gap pagination does not terminate");
        let mut opts = MessagesOptions::backward().from(from.as_str());
        opts.limit = UInt::from(50u32);
        let res = room.messages(opts).await.unwrap_or_else(|e| panic!("gap /messages failed: {e:?}"));
        for ev in res.chunk.iter().map(json_of) {
            if known.contains(event_id(&ev)) {
                break 'fill;
            }
            missing.push(ev);
        }
        match res.end {
            Some(end) if !res.chunk.is_empty() => from = end,
            _ => break,
        }
    }
    missing.reverse();
    missing
}

/// Asserts the event ids are unique and returns them.
#[track_caller]
fn unique_ids(events: &[Value]) -> Vec<String> {
    let ids: Vec<String> = events.iter().map(|e| event_id(e).to_owned()).collect();
    let set: HashSet<&String> = ids.iter().collect();
    assert_eq!(set.len(), ids.len(), "duplicate events in a timeline");
    ids
}

fn text(body: &str) -> RoomMessageEventContent {
    RoomMessageEventContent::text_plain(body)
}

async fn send_text(room: &Room, body: &str) -> OwnedEventId {
    room.send(text(body)).await.unwrap_or_else(|e| panic!("send {body:?} failed: {e:?}")).response.event_id
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_login_whoami_logout() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw-alice").await;
    let alice_id = alice.user_id().unwrap().to_owned();
    assert_eq!(alice_id.localpart(), "alice");
    let server = hex_server_name(alice_id.as_str());

    let me = alice.whoami().await.expect("whoami");
    assert_eq!(me.user_id, alice_id);
    assert_eq!(me.device_id.as_deref(), alice.device_id());

    // Password login makes a new device with its own token.
    let alice2 = login(&node, "alice", "pw-alice").await;
    assert_eq!(alice2.user_id(), Some(&*alice_id));
    assert_ne!(alice2.device_id(), alice.device_id());
    assert_ne!(token(&alice2), token(&alice));
    assert_eq!(alice2.whoami().await.expect("whoami").user_id, alice_id);
    // By full user id too.
    let alice3 = login(&node, alice_id.as_str(), "pw-alice").await;
    assert_eq!(alice3.user_id(), Some(&*alice_id));

    // Wrong password, unknown user, taken name.
    let anon = Api::new(&node);
    let bad =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "nope"});
    anon.post("/_matrix/client/v3/login", &bad).await.expect_err(403, "M_FORBIDDEN");
    let bad =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "nobody"}, "password": "x"});
    anon.post("/_matrix/client/v3/login", &bad).await.expect_err(403, "M_FORBIDDEN");
    let again = json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}});
    anon.post("/_matrix/client/v3/register", &again).await.expect_err(400, "M_USER_IN_USE");

    // Logout invalidates exactly that token.
    let t2 = token(&alice2);
    alice2.matrix_auth().logout().await.expect("logout");
    let res = Api::with_token(&node, t2).get("/_matrix/client/v3/account/whoami").await;
    res.expect_err(401, "M_UNKNOWN_TOKEN");
    assert_eq!(alice.whoami().await.expect("first device still logged in").user_id, alice_id);
    assert_eq!(hex_server_name(alice3.whoami().await.unwrap().user_id.as_str()), server);
}

// ---------------------------------------------------------------------------------------------
// Rooms and membership
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_invite_join_leave_forget() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let (alice_id, bob_id) = (alice.user_id().unwrap().to_owned(), bob.user_id().unwrap().to_owned());

    let room = create_room(
        &alice,
        Some("Field ops"),
        Some("Checkpoint at the bridge"),
        Some(create_room::v3::RoomPreset::PrivateChat),
        &[bob_id.clone()],
    )
    .await;
    let room_id = room.room_id().to_owned();
    assert!(!room_id.as_str().contains(':'), "room v12 ids carry no server name: {room_id}");

    // Bob sees the invite, with the room's name in the stripped state.
    let resp = bob.sync_once(SyncSettings::default()).await.expect("bob sync");
    assert!(resp.rooms.invited.contains_key(&room_id), "bob's sync must carry the invite: {:?}", resp.rooms);
    let invited = bob.get_room(&room_id).expect("invited room known to bob");
    assert_eq!(invited.state(), RoomState::Invited);
    assert_eq!(invited.name().as_deref(), Some("Field ops"), "invite_state should carry m.room.name");

    let broom = bob.join_room_by_id(&room_id).await.expect("bob joins");
    let expected: BTreeSet<String> = [alice_id.to_string(), bob_id.to_string()].into();
    assert_eq!(joined_member_ids(&alice, &room_id).await, expected);
    assert_eq!(joined_member_ids(&bob, &room_id).await, expected);

    bob.sync_once(SyncSettings::default()).await.expect("bob sync");
    assert_eq!(broom.state(), RoomState::Joined);
    assert_eq!(broom.name().as_deref(), Some("Field ops"));
    assert_eq!(broom.topic().as_deref(), Some("Checkpoint at the bridge"));
    let members = broom.members(RoomMemberships::JOIN).await.expect("members");
    let names: BTreeSet<String> = members.iter().map(|m| m.user_id().to_string()).collect();
    assert_eq!(names, expected);

    // joined_rooms for both.
    let rooms = Api::as_client(&node, &bob).get("/_matrix/client/v3/joined_rooms").await.ok();
    assert_eq!(rooms["joined_rooms"], json!([room_id.as_str()]));

    // Alice leaves: only bob remains.
    alice.sync_once(SyncSettings::default()).await.expect("alice sync");
    room.leave().await.expect("alice leaves");
    assert_eq!(joined_member_ids(&bob, &room_id).await, BTreeSet::from([bob_id.to_string()]));
    let bob_api = Api::as_client(&node, &bob);
    let m = state_content(&bob_api, room_id.as_str(), "m.room.member", alice_id.as_str()).await;
    assert_eq!(m["membership"], json!("leave"));
    let alice_api = Api::as_client(&node, &alice);
    let rooms = alice_api.get("/_matrix/client/v3/joined_rooms").await.ok();
    assert_eq!(rooms["joined_rooms"], json!([]));

    // Left rooms show up with include_leave until forgotten.
    let include_leave = json!({"room": {"include_leave": true, "timeline": {"limit": 5}}});
    let s = raw_sync(&alice_api, None, 0, &include_leave).await;
    assert!(s["rooms"]["leave"].get(room_id.as_str()).is_some(), "left room missing with include_leave: {s}");
    alice.sync_once(SyncSettings::default()).await.expect("alice sync");
    assert_eq!(room.state(), RoomState::Left);
    room.forget().await.expect("forget");
    let s = raw_sync(&alice_api, None, 0, &include_leave).await;
    assert!(s["rooms"]["leave"].get(room_id.as_str()).is_none(), "forgotten room still in sync: {s}");
    assert!(s["rooms"]["join"].get(room_id.as_str()).is_none());
}

// ---------------------------------------------------------------------------------------------
// Messages: ordering through sync and /messages
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_arrive_in_order_via_sync_and_messages() {
    const N: usize = 200;
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let alice_id = alice.user_id().unwrap().to_owned();
    let (room, broom) = room_with_alice_and_bob(&alice, &bob, "chatter").await;
    let room_id = room.room_id().to_owned();

    let filter = timeline_filter(50);
    let first = bob.sync_once(SyncSettings::default().filter(filter.clone())).await.expect("bob sync");
    let first_since = first.next_batch.clone();
    let mut since = first.next_batch;

    let mut sender = tokio::spawn({
        let room = room.clone();
        async move {
            let mut ids = Vec::with_capacity(N);
            for i in 0..N {
                ids.push(send_text(&room, &format!("msg {i:03}")).await);
            }
            ids
        }
    });

    // Bob follows with incremental syncs. A `limited` timeline is legal; bob then fills the gap
    // from `prev_batch` as a client would, and the result must still be complete and in order.
    let mut known: HashSet<String> = first
        .rooms
        .joined
        .get(&room_id)
        .map(|j| j.timeline.events.iter().map(|e| event_id(&json_of(e)).to_owned()).collect())
        .unwrap_or_default();
    let known_at_start = known.clone();
    let mut received: Vec<(String, String)> = Vec::new();
    let (mut syncs, mut gaps) = (0, 0);
    let mut sent: Option<Vec<OwnedEventId>> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < N {
        assert!(Instant::now() < deadline, "bob got only {} of {N} messages: {:?}", received.len(), received.last());
        if sent.is_none() && sender.is_finished() {
            sent = Some((&mut sender).await.expect("sender task panicked"));
        }
        let settings =
            SyncSettings::default().token(since.clone()).timeout(Duration::from_secs(5)).filter(filter.clone());
        let resp = bob.sync_once(settings).await.expect("incremental sync");
        syncs += 1;
        if let Some(joined) = resp.rooms.joined.get(&room_id) {
            let mut events: Vec<Value> = joined.timeline.events.iter().map(json_of).collect();
            if joined.timeline.limited {
                gaps += 1;
                let prev_batch = joined.timeline.prev_batch.as_deref().expect("a limited timeline needs prev_batch");
                let mut missing = events_in_gap(&broom, prev_batch, &known).await;
                missing.extend(events);
                events = missing;
            }
            for ev in events {
                let id = event_id(&ev).to_owned();
                assert!(known.insert(id.clone()), "event {id} delivered twice to bob");
                if ev["sender"] == alice_id.as_str() {
                    if let Some(b) = body(&ev) {
                        received.push((id, b.to_owned()));
                    }
                }
            }
        }
        since = resp.next_batch;
    }
    let sent = match sent {
        Some(sent) => sent,
        None => sender.await.expect("sender task panicked"),
    };
    let expected_bodies: Vec<String> = (0..N).map(|i| format!("msg {i:03}")).collect();
    let got_bodies: Vec<&String> = received.iter().map(|(_, b)| b).collect();
    assert_eq!(got_bodies, expected_bodies.iter().collect::<Vec<_>>(), "sync order ({syncs} syncs, {gaps} gaps)");
    let got_ids: Vec<&str> = received.iter().map(|(id, _)| id.as_str()).collect();
    let sent_ids: Vec<&str> = sent.iter().map(|id| id.as_str()).collect();
    assert_eq!(got_ids, sent_ids, "event ids seen by bob differ from those alice got back");

    // Catching up from the first token in one go (raw, to see exactly what the server sends):
    // the timeline is `limited` to the newest events, and `prev_batch` leads back through the
    // rest without loss.
    let b = Api::as_client(&node, &bob);
    let s = raw_sync(&b, Some(&first_since), 0, &json!({"room": {"timeline": {"limit": 50}}})).await;
    let timeline = &s["rooms"]["join"][room_id.as_str()]["timeline"];
    let tail = timeline["events"].as_array().cloned().unwrap_or_else(|| panic!("room missing from catch-up sync: {s}"));
    assert_eq!(timeline["limited"], json!(true), "200 new events with limit 50 must give a limited timeline");
    assert!(!tail.is_empty() && tail.len() <= 50, "timeline of {} events for limit 50", tail.len());
    let mut from = timeline["prev_batch"].as_str().expect("a limited timeline needs prev_batch").to_owned();
    let mut all = Vec::new();
    'fill: for page in 0.. {
        assert!(page < 1_000, "gap pagination does not terminate");
        let path =
            format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=40&from={}", enc(room_id.as_str()), enc(&from));
        let res = b.get(&path).await.ok();
        let chunk = res["chunk"].as_array().cloned().unwrap_or_default();
        for ev in &chunk {
            if known_at_start.contains(event_id(ev)) {
                break 'fill;
            }
            all.push(ev.clone());
        }
        match res["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = end.to_owned(),
            _ => break,
        }
    }
    all.reverse();
    all.extend(tail);
    unique_ids(&all);
    let caught_up: Vec<&str> = all.iter().filter(|e| body(e).is_some()).map(event_id).collect();
    assert_eq!(caught_up, sent_ids, "limited sync + prev_batch pagination order");

    // Backward pagination, several pages, newest first.
    let backward = sdk_paginate(&broom, true, 30).await;
    let back_ids = unique_ids(&backward);
    let mut from_back: Vec<&str> = backward.iter().filter(|e| body(e).is_some()).map(event_id).collect();
    from_back.reverse();
    assert_eq!(from_back, sent_ids, "backward /messages order");
    assert_eq!(backward.last().unwrap()["type"], json!("m.room.create"), "backward pagination must reach the start");

    // Forward pagination, oldest first.
    let forward = sdk_paginate(&broom, false, 30).await;
    let fwd_ids = unique_ids(&forward);
    let from_fwd: Vec<&str> = forward.iter().filter(|e| body(e).is_some()).map(event_id).collect();
    assert_eq!(from_fwd, sent_ids, "forward /messages order");
    assert_eq!(forward[0]["type"], json!("m.room.create"));
    let mut reversed = back_ids.clone();
    reversed.reverse();
    assert_eq!(fwd_ids, reversed, "forward and backward pagination disagree on the room's order");
}

/// A `/sync` long-poll that is waiting when an event is sent returns that event (rather than
/// an empty response at the end of its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_sync_returns_new_event() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let (room, _broom) = room_with_alice_and_bob(&alice, &bob, "long poll").await;
    let rid = room.room_id().as_str().to_owned();
    let b = Api::as_client(&node, &bob);
    let filter = json!({"room": {"timeline": {"limit": 10}}});
    let since = raw_sync(&b, None, 0, &filter).await["next_batch"].as_str().unwrap().to_owned();

    let poll = tokio::spawn({
        let (b, since, filter) = (b.clone(), since.clone(), filter.clone());
        async move { raw_sync(&b, Some(&since), 25_000, &filter).await }
    });
    // Give the request time to be parked on the server; if it is not yet, the event is simply
    // returned at once, which is correct too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = send_text(&room, "wake up").await;
    let res = poll.await.expect("long-poll task");
    let events = res["rooms"]["join"][&rid]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = events.iter().map(event_id).collect();
    assert_eq!(ids, vec![sent.as_str()], "the long-poll must return exactly the new event: {res}");
    assert_ne!(res["next_batch"].as_str(), Some(since.as_str()), "next_batch must advance");

    // Polling again from the new token with a short timeout returns no new timeline events.
    let again = raw_sync(&b, res["next_batch"].as_str(), 500, &filter).await;
    let more = again["rooms"]["join"][&rid]["timeline"]["events"].as_array().map_or(0, Vec::len);
    assert_eq!(more, 0, "no new events expected: {again}");
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn state_changes_topic_name_and_custom_state() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let alice_id = alice.user_id().unwrap().to_owned();
    let room = create_room(&alice, Some("N1"), Some("T1"), None, &[]).await;
    let rid = room.room_id().as_str().to_owned();
    let api = Api::as_client(&node, &alice);

    assert_eq!(state_content(&api, &rid, "m.room.name", "").await["name"], json!("N1"));
    assert_eq!(state_content(&api, &rid, "m.room.topic", "").await["topic"], json!("T1"));

    room.set_room_topic("T2").await.expect("set topic");
    room.set_name("N2".to_owned()).await.expect("set name");
    assert_eq!(state_content(&api, &rid, "m.room.name", "").await["name"], json!("N2"));
    assert_eq!(state_content(&api, &rid, "m.room.topic", "").await["topic"], json!("T2"));

    // Custom state: put, overwrite, second key, get one, get all.
    let r1 = room.send_state_event_raw("org.example.custom", "k1", json!({"value": 1})).await.expect("put k1");
    assert_eq!(state_content(&api, &rid, "org.example.custom", "k1").await, json!({"value": 1}));
    let r2 = room.send_state_event_raw("org.example.custom", "k1", json!({"value": 2})).await.expect("overwrite k1");
    assert_ne!(r1.event_id, r2.event_id);
    room.send_state_event_raw("org.example.custom", "k2", json!({"value": 3})).await.expect("put k2");
    assert_eq!(state_content(&api, &rid, "org.example.custom", "k1").await, json!({"value": 2}));
    assert_eq!(state_content(&api, &rid, "org.example.custom", "k2").await, json!({"value": 3}));
    let path = format!("/_matrix/client/v3/rooms/{}/state/org.example.custom/nope", enc(&rid));
    api.get(&path).await.expect_err(404, "M_NOT_FOUND");

    let all = api.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&rid))).await.ok();
    let all = all.as_array().expect("state is a JSON array");
    let mut by_key: BTreeMap<(String, String), Value> = BTreeMap::new();
    for ev in all {
        let key = (ev["type"].as_str().unwrap().to_owned(), ev["state_key"].as_str().expect("state_key").to_owned());
        assert!(by_key.insert(key.clone(), ev["content"].clone()).is_none(), "duplicate state entry {key:?}");
        assert!(ev["event_id"].is_string() && ev["sender"].is_string(), "state events are full events: {ev}");
    }
    let get = |t: &str, k: &str| by_key.get(&(t.to_owned(), k.to_owned())).cloned();
    assert!(get("m.room.create", "").is_some(), "no m.room.create in {by_key:?}");
    assert!(get("m.room.power_levels", "").is_some());
    assert!(get("m.room.join_rules", "").is_some());
    assert_eq!(get("m.room.member", alice_id.as_str()).unwrap()["membership"], json!("join"));
    assert_eq!(get("m.room.name", ""), Some(json!({"name": "N2"})));
    assert_eq!(get("m.room.topic", "").unwrap()["topic"], json!("T2"));
    assert_eq!(get("org.example.custom", "k1"), Some(json!({"value": 2})));
    assert_eq!(get("org.example.custom", "k2"), Some(json!({"value": 3})));

    // The client's view after a sync agrees.
    alice.sync_once(SyncSettings::default()).await.expect("sync");
    assert_eq!(room.name().as_deref(), Some("N2"));
    assert_eq!(room.topic().as_deref(), Some("T2"));
    let topic = room.get_state_event_static::<RoomTopicEventContent>().await.expect("store").expect("topic event");
    let topic = match topic {
        matrix_sdk::deserialized_responses::RawSyncOrStrippedState::Sync(raw) => raw.deserialize().expect("topic"),
        other => panic!("unexpected stripped state {other:?}"),
    };
    assert_eq!(topic.as_original().expect("not redacted").content.topic, "T2");
}

/// Bob (power 0) may not change a topic that needs power 100: 403, and nothing is stored.
#[tokio::test]
async fn auth_rules_reject_unprivileged_state_change() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let bob_id = bob.user_id().unwrap().to_owned();
    let room =
        create_room(&alice, None, Some("Original"), Some(create_room::v3::RoomPreset::PrivateChat), &[bob_id.clone()])
            .await;
    let rid = room.room_id().as_str().to_owned();
    bob.join_room_by_id(room.room_id()).await.expect("bob joins");
    let (a, b) = (Api::as_client(&node, &alice), Api::as_client(&node, &bob));

    let mut pl = state_content(&a, &rid, "m.room.power_levels", "").await;
    pl["events"]["m.room.topic"] = json!(100);
    assert!(pl["users"].get(bob_id.as_str()).is_none(), "bob has no power: {pl}");
    room.send_state_event_raw("m.room.power_levels", "", pl.clone()).await.expect("alice sets power levels");
    assert_eq!(state_content(&a, &rid, "m.room.power_levels", "").await["events"]["m.room.topic"], json!(100));

    let before = paginate_all(&a, &rid, "b", None, 100).await.len();
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&rid));
    b.put(&path, &json!({"topic": "hacked"})).await.expect_err(403, "M_FORBIDDEN");
    // Nor may bob raise his own power.
    let mut pl2 = pl.clone();
    pl2["users"][bob_id.as_str()] = json!(100);
    let path_pl = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&rid));
    b.put(&path_pl, &pl2).await.expect_err(403, "M_FORBIDDEN");

    assert_eq!(state_content(&a, &rid, "m.room.topic", "").await["topic"], json!("Original"));
    assert!(state_content(&b, &rid, "m.room.power_levels", "").await["users"].get(bob_id.as_str()).is_none());
    let events = paginate_all(&a, &rid, "b", None, 100).await;
    assert_eq!(events.len(), before, "a rejected event was stored");
    assert!(events.iter().all(|e| e["content"]["topic"] != "hacked"));

    // Messages are still fine for bob; alice can still change the topic.
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/b1", enc(&rid));
    b.put(&path, &json!({"msgtype": "m.text", "body": "hi"})).await.ok();
    room.set_room_topic("Updated").await.expect("alice sets topic");
    assert_eq!(state_content(&b, &rid, "m.room.topic", "").await["topic"], json!("Updated"));
}

// ---------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn redaction_strips_content_everywhere() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let (room, _broom) = room_with_alice_and_bob(&alice, &bob, "redactions").await;
    let rid = room.room_id().as_str().to_owned();
    let b = Api::as_client(&node, &bob);
    let filter = json!({"room": {"timeline": {"limit": 50}}});
    let s0 = raw_sync(&b, None, 0, &filter).await;
    let since = s0["next_batch"].as_str().unwrap().to_owned();

    let secret = send_text(&room, "secret plan").await;
    let kept = send_text(&room, "keep me").await;
    let redaction = room.redact(&secret, Some("oops"), None).await.expect("redact").event_id;

    let check_redacted = |ev: &Value, place: &str| {
        assert_eq!(ev["event_id"], json!(secret.as_str()));
        assert!(ev["content"].as_object().is_some_and(|c| c.is_empty()), "{place}: content not stripped: {ev}");
        let because = &ev["unsigned"]["redacted_because"];
        assert_eq!(because["event_id"], json!(redaction.as_str()), "{place}: redacted_because: {ev}");
        assert_eq!(because["type"], json!("m.room.redaction"), "{place}: {ev}");
        assert_eq!(because["content"]["reason"], json!("oops"), "{place}: {ev}");
    };

    // Incremental sync.
    let s1 = raw_sync(&b, Some(&since), 5_000, &filter).await;
    let tl = s1["rooms"]["join"][&rid]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let find = |events: &[Value], id: &str| events.iter().find(|e| e["event_id"] == id).cloned();
    // The sync may have returned before all three events existed; gather up to the redaction.
    let mut events = tl;
    let mut next = s1["next_batch"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while find(&events, redaction.as_str()).is_none() {
        assert!(Instant::now() < deadline, "redaction never arrived by sync");
        let s = raw_sync(&b, Some(&next), 5_000, &filter).await;
        events.extend(s["rooms"]["join"][&rid]["timeline"]["events"].as_array().cloned().unwrap_or_default());
        next = s["next_batch"].as_str().unwrap().to_owned();
    }
    let red_ev = find(&events, redaction.as_str()).unwrap();
    let redacts = red_ev["content"]["redacts"].as_str().or(red_ev["redacts"].as_str());
    assert_eq!(redacts, Some(secret.as_str()), "redaction event must name its target: {red_ev}");
    if let Some(ev) = find(&events, secret.as_str()) {
        check_redacted(&ev, "incremental sync");
    }
    assert_eq!(body(&find(&events, kept.as_str()).expect("kept message in sync")), Some("keep me"));

    // A fresh initial sync serves the redacted form.
    let s2 = raw_sync(&b, None, 0, &filter).await;
    let tl = s2["rooms"]["join"][&rid]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    check_redacted(&find(&tl, secret.as_str()).expect("redacted event in initial sync"), "initial sync");

    // /messages and /event.
    let all = paginate_all(&b, &rid, "b", None, 10).await;
    check_redacted(&find(&all, secret.as_str()).expect("redacted event in /messages"), "/messages");
    assert_eq!(body(&find(&all, kept.as_str()).unwrap()), Some("keep me"));
    assert!(all.iter().all(|e| e["content"]["body"] != "secret plan"), "redacted body still served");
    let ev = b.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&rid), enc(secret.as_str()))).await.ok();
    check_redacted(&ev, "/event");
}

// ---------------------------------------------------------------------------------------------
// Profile
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn displayname_change_updates_member_event() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let bob_id = bob.user_id().unwrap().to_owned();
    let (room, _broom) = room_with_alice_and_bob(&alice, &bob, "profiles").await;
    let rid = room.room_id().as_str().to_owned();
    let first = alice.sync_once(SyncSettings::default()).await.expect("alice sync");

    bob.account().set_display_name(Some("Bobby")).await.expect("set displayname");
    assert_eq!(bob.account().get_display_name().await.expect("get displayname").as_deref(), Some("Bobby"));

    let a = Api::as_client(&node, &alice);
    let p = a.get(&format!("/_matrix/client/v3/profile/{}/displayname", enc(bob_id.as_str()))).await.ok();
    assert_eq!(p["displayname"], json!("Bobby"));
    let p = a.get(&format!("/_matrix/client/v3/profile/{}", enc(bob_id.as_str()))).await.ok();
    assert_eq!(p["displayname"], json!("Bobby"));

    // The room gets a new m.room.member for bob (possibly a moment later).
    poll_until(Duration::from_secs(10), "bob's member event with the new displayname", || {
        let (a, rid, bob_id) = (a.clone(), rid.clone(), bob_id.clone());
        async move {
            let m = state_content(&a, &rid, "m.room.member", bob_id.as_str()).await;
            (m["displayname"] == "Bobby").then_some(())
        }
    })
    .await;
    let m = state_content(&a, &rid, "m.room.member", bob_id.as_str()).await;
    assert_eq!(m["membership"], json!("join"));

    // And alice's client sees it through sync.
    let mut since = first.next_batch;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = alice
            .sync_once(SyncSettings::default().token(since.clone()).timeout(Duration::from_secs(5)))
            .await
            .expect("sync");
        since = resp.next_batch.clone();
        let member_events: Vec<Value> = resp
            .rooms
            .joined
            .get(room.room_id())
            .map(|j| j.timeline.events.iter().map(json_of).filter(|e| e["type"] == "m.room.member").collect())
            .unwrap_or_default();
        if member_events.iter().any(|e| e["state_key"] == bob_id.as_str() && e["content"]["displayname"] == "Bobby") {
            break;
        }
        assert!(Instant::now() < deadline, "alice never saw bob's new displayname in sync");
    }
    let member = room.get_member_no_sync(&bob_id).await.expect("store").expect("bob is a member");
    assert_eq!(member.display_name(), Some("Bobby"));
}

// ---------------------------------------------------------------------------------------------
// Kick, ban, unban
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn kick_ban_unban() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let (alice_id, bob_id) = (alice.user_id().unwrap().to_owned(), bob.user_id().unwrap().to_owned());
    let room = create_room(&alice, Some("moderated"), None, Some(create_room::v3::RoomPreset::PublicChat), &[]).await;
    let room_id = room.room_id().to_owned();
    let rid = room_id.as_str().to_owned();
    let (a, b) = (Api::as_client(&node, &alice), Api::as_client(&node, &bob));
    let member = |api: Api, user: OwnedUserId| {
        let rid = rid.clone();
        async move { state_content(&api, &rid, "m.room.member", user.as_str()).await }
    };

    bob.join_room_by_id(&room_id).await.expect("bob joins a public room");
    assert_eq!(member(a.clone(), bob_id.clone()).await["membership"], json!("join"));

    // Bob (power 0) cannot kick alice.
    let path = format!("/_matrix/client/v3/rooms/{}/kick", enc(&rid));
    b.post(&path, &json!({"user_id": alice_id.as_str()})).await.expect_err(403, "M_FORBIDDEN");
    assert_eq!(member(a.clone(), alice_id.clone()).await["membership"], json!("join"));

    room.kick_user(&bob_id, Some("be nice")).await.expect("kick");
    let m = member(a.clone(), bob_id.clone()).await;
    assert_eq!((m["membership"].as_str(), m["reason"].as_str()), (Some("leave"), Some("be nice")), "{m}");
    assert_eq!(joined_member_ids(&alice, &room_id).await, BTreeSet::from([alice_id.to_string()]));
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/k1", enc(&rid));
    b.put(&path, &json!({"msgtype": "m.text", "body": "kicked"})).await.expect_err(403, "M_FORBIDDEN");

    bob.join_room_by_id(&room_id).await.expect("a kicked user may rejoin a public room");
    assert_eq!(member(a.clone(), bob_id.clone()).await["membership"], json!("join"));

    room.ban_user(&bob_id, Some("spam")).await.expect("ban");
    let m = member(a.clone(), bob_id.clone()).await;
    assert_eq!((m["membership"].as_str(), m["reason"].as_str()), (Some("ban"), Some("spam")), "{m}");
    let join = format!("/_matrix/client/v3/rooms/{}/join", enc(&rid));
    b.post(&join, &json!({})).await.expect_err(403, "M_FORBIDDEN");
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/k2", enc(&rid));
    b.put(&path, &json!({"msgtype": "m.text", "body": "banned"})).await.expect_err(403, "M_FORBIDDEN");
    assert_eq!(member(a.clone(), bob_id.clone()).await["membership"], json!("ban"));

    room.unban_user(&bob_id, None).await.expect("unban");
    assert_eq!(member(a.clone(), bob_id.clone()).await["membership"], json!("leave"));
    bob.join_room_by_id(&room_id).await.expect("join after unban");
    let expected: BTreeSet<String> = [alice_id.to_string(), bob_id.to_string()].into();
    assert_eq!(joined_member_ids(&alice, &room_id).await, expected);
    let all = paginate_all(&a, &rid, "b", None, 100).await;
    assert!(all.iter().all(|e| e["content"]["body"] != "kicked" && e["content"]["body"] != "banned"));
}

// ---------------------------------------------------------------------------------------------
// Aliases and the room directory
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn alias_join_by_alias_and_directory() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let bob = register(&node, "bob", "pw").await;
    let server = hex_server_name(alice.user_id().unwrap().as_str());
    let room =
        create_room(&alice, Some("Public square"), None, Some(create_room::v3::RoomPreset::PublicChat), &[]).await;
    let room_id = room.room_id().to_owned();
    let rid = room_id.as_str().to_owned();
    let a = Api::as_client(&node, &alice);

    let alias = RoomAliasId::parse(format!("#square:{server}")).expect("alias");
    alice.create_room_alias(&alias, &room_id).await.expect("create alias");
    let resolved = alice.resolve_room_alias(&alias).await.expect("resolve alias");
    assert_eq!(resolved.room_id, room_id);
    assert!(resolved.servers.iter().any(|s| s.as_str() == server), "servers: {:?}", resolved.servers);
    // Taken.
    let path = format!("/_matrix/client/v3/directory/room/{}", enc(alias.as_str()));
    let res = a.put(&path, &json!({"room_id": rid})).await;
    assert_eq!(res.status, 409, "duplicate alias must be 409: {}", res.text);

    let joined = bob.join_room_by_id_or_alias(<&RoomOrAliasId>::from(&*alias), &[]).await.expect("join by alias");
    assert_eq!(joined.room_id(), room_id);
    assert!(joined_member_ids(&alice, &room_id).await.contains(bob.user_id().unwrap().as_str()));
    let aliases = a.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&rid))).await.ok();
    assert_eq!(aliases["aliases"], json!([alias.as_str()]));

    // Directory visibility.
    let vis_path = format!("/_matrix/client/v3/directory/list/room/{}", enc(&rid));
    assert_eq!(a.get(&vis_path).await.ok()["visibility"], json!("private"));
    let public_ids = |res: Value| -> Vec<String> {
        res["chunk"].as_array().unwrap().iter().map(|c| c["room_id"].as_str().unwrap().to_owned()).collect()
    };
    assert!(!public_ids(a.get("/_matrix/client/v3/publicRooms").await.ok()).contains(&rid));

    a.put(&vis_path, &json!({"visibility": "public"})).await.ok();
    assert_eq!(a.get(&vis_path).await.ok()["visibility"], json!("public"));
    let list = a.get("/_matrix/client/v3/publicRooms").await.ok();
    let entry = list["chunk"].as_array().unwrap().iter().find(|c| c["room_id"] == rid.as_str()).cloned();
    let entry = entry.unwrap_or_else(|| panic!("public room not listed: {list}"));
    assert_eq!(entry["name"], json!("Public square"));
    assert_eq!(entry["num_joined_members"], json!(2));
    // Through matrix-sdk, and with a search filter.
    let sdk_list = bob.public_rooms(None, None, None).await.expect("publicRooms");
    assert!(sdk_list.chunk.iter().any(|c| c.room_id == room_id));
    let hit =
        a.post("/_matrix/client/v3/publicRooms", &json!({"filter": {"generic_search_term": "square"}})).await.ok();
    assert!(public_ids(hit).contains(&rid));
    let miss = a
        .post("/_matrix/client/v3/publicRooms", &json!({"filter": {"generic_search_term": "zzzz-no-match"}}))
        .await
        .ok();
    assert!(!public_ids(miss).contains(&rid));

    a.put(&vis_path, &json!({"visibility": "private"})).await.ok();
    assert!(!public_ids(a.get("/_matrix/client/v3/publicRooms").await.ok()).contains(&rid));

    // Delete the alias.
    a.delete(&path).await.ok();
    a.get(&path).await.expect_err(404, "M_NOT_FOUND");
}

// ---------------------------------------------------------------------------------------------
// Transaction ids, /context, /event
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn send_is_idempotent_per_transaction_id() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let room = create_room(&alice, Some("txns"), None, None, &[]).await;
    let rid = room.room_id().as_str().to_owned();
    let a = Api::as_client(&node, &alice);
    let path = |txn: &str| format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&rid));
    let content = json!({"msgtype": "m.text", "body": "once"});

    let e1 = a.put(&path("txn-1"), &content).await.ok()["event_id"].clone();
    let e1b = a.put(&path("txn-1"), &content).await.ok()["event_id"].clone();
    assert!(e1.is_string());
    assert_eq!(e1, e1b, "the same txn id must return the same event");
    let e2 = a.put(&path("txn-2"), &content).await.ok()["event_id"].clone();
    assert_ne!(e1, e2, "a new txn id is a new event");
    // Another device of the same user has its own transaction scope.
    let alice2 = login(&node, "alice", "pw").await;
    let e3 = Api::as_client(&node, &alice2).put(&path("txn-1"), &content).await.ok()["event_id"].clone();
    assert_ne!(e3, e1, "transaction ids are scoped per device");

    let all = paginate_all(&a, &rid, "b", None, 50).await;
    let once: Vec<&Value> = all.iter().filter(|e| e["content"]["body"] == "once").map(|e| &e["event_id"]).collect();
    assert_eq!(once, vec![&e3, &e2, &e1], "exactly three events, newest first");
}

#[tokio::test]
async fn context_and_event_by_id() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let outsider = register(&node, "eve", "pw").await;
    let alice_id = alice.user_id().unwrap().to_owned();
    let room = create_room(&alice, Some("context"), None, Some(create_room::v3::RoomPreset::PrivateChat), &[]).await;
    let rid = room.room_id().as_str().to_owned();
    let a = Api::as_client(&node, &alice);
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(send_text(&room, &format!("m{i}")).await.to_string());
    }

    let ctx_path =
        |limit: u32| format!("/_matrix/client/v3/rooms/{}/context/{}?limit={limit}", enc(&rid), enc(&ids[3]));
    let ctx = a.get(&ctx_path(20)).await.ok();
    assert_eq!(ctx["event"]["event_id"], json!(ids[3]));
    assert_eq!(ctx["event"]["content"]["body"], json!("m3"));
    let before: Vec<&str> = ctx["events_before"].as_array().unwrap().iter().map(event_id).collect();
    let after: Vec<&str> = ctx["events_after"].as_array().unwrap().iter().map(event_id).collect();
    assert!(
        before.starts_with(&[&ids[2], &ids[1], &ids[0]].map(String::as_str)),
        "events_before (newest first): {before:?}"
    );
    assert_eq!(after, [&ids[4], &ids[5], &ids[6]].map(String::as_str), "events_after (oldest first)");
    assert!(ctx["start"].is_string() && ctx["end"].is_string(), "start/end tokens: {ctx}");
    // Nothing after the newest event.
    let end = ctx["end"].as_str().unwrap();
    let more = a.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=f&from={}", enc(&rid), enc(end))).await.ok();
    assert_eq!(more["chunk"], json!([]), "forward from /context's end: {more}");
    // From /context's start backward: what precedes the events_before.
    let start = ctx["start"].as_str().unwrap();
    let older = a
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100&from={}", enc(&rid), enc(start)))
        .await
        .ok();
    let older_ids: Vec<&str> = older["chunk"].as_array().unwrap().iter().map(event_id).collect();
    assert!(
        older_ids.iter().all(|id| !before.contains(id) && !ids.contains(&id.to_string())),
        "overlap: {older_ids:?}"
    );

    // A small limit is split between before and after, never more than asked.
    let ctx = a.get(&ctx_path(4)).await.ok();
    assert_eq!(ctx["event"]["event_id"], json!(ids[3]));
    let nb = ctx["events_before"].as_array().map_or(0, Vec::len);
    let na = ctx["events_after"].as_array().map_or(0, Vec::len);
    assert!(nb + na <= 4, "limit 4 returned {nb} + {na}");

    // /event by id.
    let ev = a.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&rid), enc(&ids[3]))).await.ok();
    assert_eq!(ev["event_id"], json!(ids[3]));
    assert_eq!(ev["content"]["body"], json!("m3"));
    assert_eq!(ev["sender"], json!(alice_id.as_str()));
    assert_eq!(ev["room_id"], json!(rid));
    assert_eq!(ev["type"], json!("m.room.message"));
    assert!(ev["origin_server_ts"].as_u64().is_some());
    let missing = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&rid), enc("$doesnotexist"));
    a.get(&missing).await.expect_err(404, "M_NOT_FOUND");
    // Not visible to a non-member.
    let res = Api::as_client(&node, &outsider)
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&rid), enc(&ids[3])))
        .await;
    assert!(matches!(res.status, 403 | 404), "non-member read the event: {} {}", res.status, res.text);
    assert!(res.body.get("content").is_none());
}

// ---------------------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn restart_keeps_data() {
    let mut node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    let alice_id = alice.user_id().unwrap().to_owned();
    let room = create_room(&alice, Some("Persist"), Some("Before restart"), None, &[]).await;
    let rid = room.room_id().as_str().to_owned();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(send_text(&room, &format!("p{i}")).await.to_string());
    }
    room.send_state_event_raw("org.example.custom", "k", json!({"kept": true})).await.expect("custom state");
    let a = Api::as_client(&node, &alice);
    let filter = json!({"room": {"timeline": {"limit": 50}}});
    let since = raw_sync(&a, None, 0, &filter).await["next_batch"].as_str().unwrap().to_owned();
    let newest_before = event_id(&common::first_page(&a, &rid, "b", 1).await[0]).to_owned();
    assert_eq!(state_content(&a, &rid, "org.example.custom", "k").await, json!({"kept": true}));

    node.restart().await;

    // The old token still works.
    assert_eq!(alice.whoami().await.expect("whoami after restart").user_id, alice_id);
    let rooms = a.get("/_matrix/client/v3/joined_rooms").await.ok();
    assert_eq!(rooms["joined_rooms"], json!([rid]));
    let all = paginate_all(&a, &rid, "b", None, 7).await;
    let mut msgs: Vec<&str> = all.iter().filter(|e| body(e).is_some()).map(event_id).collect();
    msgs.reverse();
    assert_eq!(msgs, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(all.last().unwrap()["type"], json!("m.room.create"));
    assert_eq!(state_content(&a, &rid, "m.room.name", "").await["name"], json!("Persist"));
    assert_eq!(state_content(&a, &rid, "m.room.topic", "").await["topic"], json!("Before restart"));
    assert_eq!(state_content(&a, &rid, "org.example.custom", "k").await, json!({"kept": true}));

    // The room goes on: a new message lands after the old ones, and a pre-restart sync token
    // yields exactly the new message.
    let new_id = send_text(&room, "after restart").await.to_string();
    let s = raw_sync(&a, Some(&since), 5_000, &filter).await;
    let tl: Vec<&str> = s["rooms"]["join"][&rid]["timeline"]["events"]
        .as_array()
        .map(|v| v.iter().map(event_id).collect())
        .unwrap_or_default();
    assert_eq!(tl, vec![new_id.as_str()], "sync from a pre-restart token: {s}");
    let newest = common::first_page(&a, &rid, "b", 1).await;
    assert_eq!(event_id(&newest[0]), new_id);
    let ctx = a.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&rid), enc(&new_id))).await.ok();
    assert_eq!(event_id(&ctx["events_before"][0]), newest_before, "the new event must follow the old ones");

    // Password login still works.
    let again = login(&node, "alice", "pw").await;
    assert_eq!(again.whoami().await.unwrap().user_id, alice_id);
}

/// Every event acknowledged with a 200 survives a SIGKILL, and the room's timeline afterwards
/// is one consistent, gap-free order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event() {
    const WRITERS: usize = 4;
    let mut node = Node::start().await;
    let anon = Api::new(&node);
    let (alice_id, tok) = anon.register("alice", "pw").await;
    let a = Api::with_token(&node, tok.clone());
    let rid = a.post("/_matrix/client/v3/createRoom", &json!({"name": "crash"})).await.ok()["room_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Each writer sends sequentially and records what was acknowledged, in its own order.
    let acked: Arc<Mutex<Vec<Vec<(String, String)>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS]));
    let stop_at = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (a, rid, acked) = (a.clone(), rid.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                // Keep going past `stop_at` until the kill cuts us off (bounded, in case it doesn't).
                if Instant::now() > stop_at + Duration::from_secs(30) {
                    break;
                }
                let body = format!("w{w}-{i:05}");
                let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{body}", enc(&rid));
                let content = json!({"msgtype": "m.text", "body": body});
                match a.try_request(reqwest::Method::PUT, &path, Some(&content)).await {
                    Ok(res) if res.status == 200 => {
                        let id = res.body["event_id"].as_str().expect("event_id").to_owned();
                        acked.lock().unwrap()[w].push((id, body));
                    }
                    Ok(res) => panic!("writer {w}: {} {}", res.status, res.text),
                    Err(_) => break, // the node is gone
                }
            }
        }));
    }
    tokio::time::sleep_until(stop_at.into()).await;
    node.kill();
    for t in tasks {
        t.await.expect("writer task");
    }
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(
        acked.iter().all(|w| !w.is_empty()),
        "every writer must have had some 200s: {:?}",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    eprintln!(
        "acknowledged before SIGKILL: {total} events ({:?} per writer)",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );

    node.restart().await;
    let a = Api::with_token(&node, tok);

    // 1. Every acknowledged event is retrievable by id, with its content.
    for (id, body) in acked.iter().flatten() {
        let ev = a.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&rid), enc(id))).await;
        assert_eq!(ev.status, 200, "acknowledged event {id} ({body}) lost after SIGKILL: {}", ev.text);
        assert_eq!(ev.body["content"]["body"], json!(body));
    }

    // 2. Backward pagination covers the whole room once, reaches the create event, and contains
    //    every acknowledged event, each writer's in its sending order.
    let mut timeline = paginate_all(&a, &rid, "b", None, 100).await;
    timeline.reverse();
    let ids = unique_ids(&timeline);
    assert_eq!(timeline[0]["type"], json!("m.room.create"), "pagination must reach the room's start");
    let pos: BTreeMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    for (w, events) in acked.iter().enumerate() {
        let mut last = None;
        for (id, body) in events {
            let p =
                *pos.get(id.as_str()).unwrap_or_else(|| panic!("acknowledged {id} ({body}) missing from /messages"));
            assert!(last < Some(p), "writer {w}: {body} out of order in /messages");
            last = Some(p);
        }
    }
    // Forward pagination gives the same order.
    let forward = paginate_all(&a, &rid, "f", None, 100).await;
    assert_eq!(unique_ids(&forward), ids, "forward and backward pagination disagree");

    // 3. Gap-free as a DAG: each event's prev_events are earlier events of this timeline, and
    //    every event but the newest is referenced by a later one.
    let mut referenced: HashSet<String> = HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        let res = a.get(&format!("/_outpost/v1/pdu/{}", enc(id))).await.ok();
        let pdu = if res.get("prev_events").is_some() { res } else { res["pdu"].clone() };
        let prev = pdu["prev_events"].as_array().unwrap_or_else(|| panic!("no prev_events in PDU of {id}: {pdu}"));
        if i == 0 {
            assert!(prev.is_empty(), "the create event has no prev_events");
        } else {
            assert!(!prev.is_empty(), "{id} has no prev_events");
        }
        for p in prev {
            let p = p.as_str().expect("prev event id");
            assert!(pos.get(p).is_some_and(|&pp| pp < i), "{id}'s prev event {p} is not earlier in the timeline");
            referenced.insert(p.to_owned());
        }
    }
    for id in &ids[..ids.len() - 1] {
        assert!(referenced.contains(id), "{id} is a dangling extremity: the timeline has a fork or gap");
    }

    // 4. The room still works: a new event extends the timeline.
    let res = a
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/after-crash", enc(&rid)),
            &json!({"msgtype": "m.text", "body": "after crash"}),
        )
        .await
        .ok();
    let newest = common::first_page(&a, &rid, "b", 1).await;
    assert_eq!(newest[0]["event_id"], res["event_id"]);
    assert_eq!(newest[0]["sender"], json!(alice_id));
}
