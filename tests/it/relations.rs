//! Relations through matrix-sdk and raw HTTP: reactions and `/relations` (with pagination,
//! filters, recursion), edits and threads as bundled aggregations wherever events are served,
//! `/threads`, references, and redactions that stop counting.

use crate::common;

use common::{enc, event_id, register, Api, Node};
use matrix_sdk::{
    config::SyncSettings,
    room::{IncludeRelations, ListThreadsOptions, RelationsOptions},
    ruma::{
        api::client::{
            room::create_room::v3::{Request as CreateRoomRequest, RoomPreset},
            threads::get_threads::v1::IncludeThreads,
        },
        events::{
            reaction::ReactionEventContent,
            relation::{Annotation, RelationType},
            room::message::{
                AddMentions, ReplacementMetadata, ReplyMetadata, ReplyWithinThread, RoomMessageEventContent,
            },
            AnySyncMessageLikeEvent, AnySyncTimelineEvent, SyncMessageLikeEvent,
        },
        OwnedEventId, OwnedRoomId, UInt,
    },
    Client, Room,
};
use serde_json::{json, Value};

async fn sync(c: &Client) {
    c.sync_once(SyncSettings::default()).await.expect("sync");
}

async fn setup(node: &Node) -> (Client, Client, OwnedRoomId) {
    let alice = register(node, "alice", "pw-alice").await;
    let bob = register(node, "bob", "pw-bob").await;
    let mut req = CreateRoomRequest::new();
    req.preset = Some(RoomPreset::PublicChat);
    let room_id = alice.create_room(req).await.expect("create room").room_id().to_owned();
    bob.join_room_by_id(&room_id).await.expect("join");
    sync(&alice).await;
    sync(&bob).await;
    (alice, bob, room_id)
}

async fn send(room: &Room, content: RoomMessageEventContent) -> OwnedEventId {
    room.send(content).await.expect("send").response.event_id
}

async fn react(room: &Room, target: &OwnedEventId, key: &str) -> OwnedEventId {
    let c = ReactionEventContent::new(Annotation::new(target.clone(), key.to_owned()));
    room.send(c).await.expect("react").response.event_id
}

fn ids(chunk: &Value) -> Vec<String> {
    chunk.as_array().expect("chunk").iter().map(|e| event_id(e).to_owned()).collect()
}

fn relations_path(room: &OwnedRoomId, target: &OwnedEventId, rest: &str) -> String {
    format!("/_matrix/client/v1/rooms/{}/relations/{}{rest}", enc(room.as_str()), enc(target.as_str()))
}

/// The `unsigned["m.relations"]` of the event `id` in a JSON list of events.
fn relations_in<'a>(events: &'a Value, id: &OwnedEventId) -> &'a Value {
    let ev = events
        .as_array()
        .and_then(|a| a.iter().find(|e| e["event_id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not in {events}"));
    &ev["unsigned"]["m.relations"]
}

#[tokio::test]
async fn reactions_are_listed_paginated_filtered_and_unlisted_when_redacted() {
    let node = Node::start().await;
    let (alice, bob, room_id) = setup(&node).await;
    let a_room = alice.get_room(&room_id).unwrap();
    let b_room = bob.get_room(&room_id).unwrap();
    let target = send(&a_room, RoomMessageEventContent::text_plain("react to me")).await;
    let r1 = react(&b_room, &target, "👍").await;
    let r2 = react(&a_room, &target, "🎉").await;
    let r3 = react(&b_room, &target, "❤️").await;
    let reply = send(&b_room, RoomMessageEventContent::text_plain("not a relation")).await;

    // The SDK's /relations: newest first, only relations of the target.
    let opts = RelationsOptions {
        include_relations: IncludeRelations::RelationsOfType(RelationType::Annotation),
        ..Default::default()
    };
    let rel = a_room.relations(target.clone(), opts).await.expect("relations");
    let got: Vec<OwnedEventId> = rel.chunk.iter().filter_map(|e| e.event_id()).collect();
    assert_eq!(got, vec![r3.clone(), r2.clone(), r1.clone()]);
    assert!(!got.contains(&reply));

    // Pages of one, following next_batch, in both directions.
    let api = Api::as_client(&node, &alice);
    for (dir, expect) in [("b", vec![&r3, &r2, &r1]), ("f", vec![&r1, &r2, &r3])] {
        let mut seen = Vec::new();
        let mut from: Option<String> = None;
        for _ in 0..10 {
            let mut p = relations_path(&room_id, &target, &format!("?limit=1&dir={dir}"));
            if let Some(f) = &from {
                p.push_str(&format!("&from={}", enc(f)));
            }
            let page = api.get(&p).await.ok();
            seen.extend(ids(&page["chunk"]));
            match page["next_batch"].as_str() {
                Some(n) => from = Some(n.to_owned()),
                None => break,
            }
        }
        let expect: Vec<String> = expect.iter().map(|e| e.to_string()).collect();
        assert_eq!(seen, expect, "dir={dir}");
    }
    // Event-type filter.
    let by_type = api.get(&relations_path(&room_id, &target, "/m.annotation/m.reaction")).await.ok();
    assert_eq!(ids(&by_type["chunk"]).len(), 3);
    let none = api.get(&relations_path(&room_id, &target, "/m.annotation/m.room.message")).await.ok();
    assert_eq!(ids(&none["chunk"]).len(), 0);
    // Reactions are not bundled (clients count them).
    let ev = api
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(target.as_str())))
        .await
        .ok();
    assert!(ev["unsigned"].get("m.relations").is_none(), "{ev}");

    // A redacted reaction is no longer a relation.
    b_room.redact(&r1, None, None).await.expect("redact");
    let after = api.get(&relations_path(&room_id, &target, "/m.annotation")).await.ok();
    assert_eq!(ids(&after["chunk"]), vec![r3.to_string(), r2.to_string()]);

    // Unknown targets are 404; outsiders are refused.
    api.get(&relations_path(&room_id, &"$nope".parse().unwrap(), "")).await.expect_err(404, "M_NOT_FOUND");
    let outsider = Api::new(&node);
    let (_, t) = outsider.register("carol", "pw").await;
    let carol = Api::with_token(&node, t);
    let denied = carol.get(&relations_path(&room_id, &target, "")).await;
    assert_eq!(denied.status, 403, "{}", denied.text);
}

#[tokio::test]
async fn edits_are_bundled_wherever_events_are_served() {
    let node = Node::start().await;
    let (alice, bob, room_id) = setup(&node).await;
    let a_room = alice.get_room(&room_id).unwrap();
    let b_room = bob.get_room(&room_id).unwrap();
    let orig = send(&a_room, RoomMessageEventContent::text_plain("helo")).await;
    let edit1 = send(
        &a_room,
        RoomMessageEventContent::text_plain("hello").make_replacement(ReplacementMetadata::new(orig.clone(), None)),
    )
    .await;
    let edit2 = send(
        &a_room,
        RoomMessageEventContent::text_plain("hello!").make_replacement(ReplacementMetadata::new(orig.clone(), None)),
    )
    .await;
    // bob may not edit alice's message: ignored in the bundle.
    send(
        &b_room,
        RoomMessageEventContent::text_plain("hijacked").make_replacement(ReplacementMetadata::new(orig.clone(), None)),
    )
    .await;

    // The SDK's /event: ruma parses the bundled replacement (spec v1.7+: the whole event).
    let ev = b_room.event(&orig, None).await.expect("event");
    let parsed: AnySyncTimelineEvent = ev.raw().deserialize().expect("parse");
    let AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(SyncMessageLikeEvent::Original(m))) =
        parsed
    else {
        panic!("not an original room message: {:?}", ev.raw());
    };
    let replace = m.unsigned.relations.replace.expect("m.replace bundled");
    assert_eq!(replace.event_id, edit2);
    assert_eq!(replace.sender, alice.user_id().unwrap());

    // Sync timeline, /messages and /context carry it too.
    let api = Api::as_client(&node, &bob);
    let s = api.get("/_matrix/client/v3/sync").await.ok();
    let tl = &s["rooms"]["join"][room_id.as_str()]["timeline"]["events"];
    assert_eq!(relations_in(tl, &orig)["m.replace"]["event_id"], edit2.as_str());
    assert_eq!(relations_in(tl, &orig)["m.replace"]["content"]["m.new_content"]["body"], "hello!");
    let msgs = common::first_page(&api, room_id.as_str(), "b", 20).await;
    assert_eq!(relations_in(&Value::Array(msgs), &orig)["m.replace"]["event_id"], edit2.as_str());
    let ctx = api
        .get(&format!("/_matrix/client/v3/rooms/{}/context/{}?limit=4", enc(room_id.as_str()), enc(edit1.as_str())))
        .await
        .ok();
    assert_eq!(relations_in(&ctx["events_before"], &orig)["m.replace"]["event_id"], edit2.as_str());

    // Redacting the latest edit falls back to the previous one.
    a_room.redact(&edit2, None, None).await.expect("redact");
    let ev =
        api.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(orig.as_str()))).await.ok();
    assert_eq!(ev["unsigned"]["m.relations"]["m.replace"]["event_id"], edit1.as_str(), "{ev}");
    // A redacted original carries no bundle.
    a_room.redact(&orig, None, None).await.expect("redact");
    let ev =
        api.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(orig.as_str()))).await.ok();
    assert!(ev["unsigned"].get("m.relations").is_none(), "{ev}");
}

#[tokio::test]
async fn threads_are_bundled_listed_and_counted() {
    let node = Node::start().await;
    let (alice, bob, room_id) = setup(&node).await;
    let carol = register(&node, "carol", "pw-carol").await;
    carol.join_room_by_id(&room_id).await.expect("carol joins");
    sync(&carol).await;
    let a_room = alice.get_room(&room_id).unwrap();
    let b_room = bob.get_room(&room_id).unwrap();
    let c_room = carol.get_room(&room_id).unwrap();
    let alice_id = alice.user_id().unwrap().to_owned();

    let root1 = send(&a_room, RoomMessageEventContent::text_plain("thread one")).await;
    let root2 = send(&c_room, RoomMessageEventContent::text_plain("thread two")).await;
    let in_thread = |root: &OwnedEventId, text: &str| {
        RoomMessageEventContent::text_plain(text).make_for_thread(
            ReplyMetadata::new(root, &alice_id, None),
            ReplyWithinThread::No,
            AddMentions::No,
        )
    };
    let t1a = send(&b_room, in_thread(&root1, "first reply")).await;
    let t2a = send(&c_room, in_thread(&root2, "carol replies to herself")).await;
    let t1b = send(&b_room, in_thread(&root1, "second reply")).await;

    // The SDK reads the bundled thread summary of the root.
    let ev = c_room.event(&root1, None).await.expect("root");
    let summary = ev.thread_summary.summary().expect("m.thread bundled").clone();
    assert_eq!(summary.num_replies, 2);
    assert_eq!(summary.latest_reply, Some(t1b.clone()));
    let api_for = |c: &Client| Api::as_client(&node, c);
    let get_root = |c: &Client| {
        let api = api_for(c);
        let p = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(root1.as_str()));
        async move { api.get(&p).await.ok() }
    };
    let thread = |v: &Value| v["unsigned"]["m.relations"]["m.thread"].clone();
    assert_eq!(thread(&get_root(&alice).await)["current_user_participated"], true); // root sender
    assert_eq!(thread(&get_root(&bob).await)["current_user_participated"], true); // replied
    assert_eq!(thread(&get_root(&carol).await)["current_user_participated"], false);
    assert_eq!(event_id(&thread(&get_root(&carol).await)["latest_event"]), t1b.as_str());

    // /threads: most recently active first, paginated, and "participated".
    let list = c_room.list_threads(ListThreadsOptions::default()).await.expect("threads");
    let roots: Vec<OwnedEventId> = list.chunk.iter().filter_map(|e| e.event_id()).collect();
    assert_eq!(roots, vec![root1.clone(), root2.clone()]);
    let one = |from: Option<String>| ListThreadsOptions { limit: UInt::new(1), from, ..Default::default() };
    let page1 = c_room.list_threads(one(None)).await.unwrap();
    assert_eq!(page1.chunk.len(), 1);
    assert!(page1.prev_batch_token.is_some(), "no next_batch on a full page");
    let page2 = c_room.list_threads(one(page1.prev_batch_token.clone())).await.unwrap();
    assert_eq!(page2.chunk.iter().filter_map(|e| e.event_id()).collect::<Vec<_>>(), vec![root2.clone()]);
    let part = || ListThreadsOptions { include_threads: IncludeThreads::Participated, ..Default::default() };
    let bobs = b_room.list_threads(part()).await.unwrap();
    assert_eq!(bobs.chunk.iter().filter_map(|e| e.event_id()).collect::<Vec<_>>(), vec![root1.clone()]);
    let carols = c_room.list_threads(part()).await.unwrap();
    assert_eq!(carols.chunk.iter().filter_map(|e| e.event_id()).collect::<Vec<_>>(), vec![root2.clone()]);

    // Sync's timeline carries the bundle too.
    let s = api_for(&carol).get("/_matrix/client/v3/sync").await.ok();
    let tl = &s["rooms"]["join"][room_id.as_str()]["timeline"]["events"];
    assert_eq!(relations_in(tl, &root2)["m.thread"]["count"], 1);
    assert_eq!(event_id(&relations_in(tl, &root2)["m.thread"]["latest_event"]), t2a.as_str());

    // A redacted reply stops counting; the latest falls back.
    b_room.redact(&t1b, None, None).await.expect("redact");
    let t = thread(&get_root(&carol).await);
    assert_eq!(t["count"], 1);
    assert_eq!(event_id(&t["latest_event"]), t1a.as_str());
    // ... and the thread list now orders by the remaining activity.
    let list = c_room.list_threads(ListThreadsOptions::default()).await.unwrap();
    let roots: Vec<OwnedEventId> = list.chunk.iter().filter_map(|e| e.event_id()).collect();
    assert_eq!(roots, vec![root2.clone(), root1.clone()]);
}

#[tokio::test]
async fn references_are_bundled_and_recursion_reaches_indirect_relations() {
    let node = Node::start().await;
    let (alice, bob, room_id) = setup(&node).await;
    let a_room = alice.get_room(&room_id).unwrap();
    let b_room = bob.get_room(&room_id).unwrap();
    let root = send(&a_room, RoomMessageEventContent::text_plain("root")).await;
    let api = Api::as_client(&node, &bob);
    let reference = api
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/ref1", enc(room_id.as_str())),
            &json!({"msgtype": "m.text", "body": "see above", "m.relates_to": {"rel_type": "m.reference", "event_id": root}}),
        )
        .await
        .ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ev =
        api.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(root.as_str()))).await.ok();
    assert_eq!(ev["unsigned"]["m.relations"]["m.reference"]["chunk"], json!([{"event_id": reference}]));

    // A reaction to a thread reply relates to the root only indirectly.
    let reply = send(
        &b_room,
        RoomMessageEventContent::text_plain("reply").make_for_thread(
            ReplyMetadata::new(&root, alice.user_id().unwrap(), None),
            ReplyWithinThread::No,
            AddMentions::No,
        ),
    )
    .await;
    let reaction = react(&a_room, &reply, "👀").await;
    let direct = api.get(&relations_path(&room_id, &root, "")).await.ok();
    assert!(!ids(&direct["chunk"]).contains(&reaction.to_string()));
    assert!(direct.get("recursion_depth").is_none());
    let opts = RelationsOptions { recurse: true, ..Default::default() };
    let rec = b_room.relations(root.clone(), opts).await.expect("recursive relations");
    let got: Vec<OwnedEventId> = rec.chunk.iter().filter_map(|e| e.event_id()).collect();
    assert_eq!(got, vec![reaction.clone(), reply.clone(), reference.parse().unwrap()]);
    assert!(rec.recursion_depth.is_some());
    // Filters apply to indirect relations as well.
    let only = api.get(&relations_path(&room_id, &root, "/m.annotation?recurse=true")).await.ok();
    assert_eq!(ids(&only["chunk"]), vec![reaction.to_string()]);
}
