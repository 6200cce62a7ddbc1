//! Ephemeral and per-user data through a real client library (matrix-sdk) and raw HTTP:
//! typing, receipts, read markers, unread notification counts, tags, presence, user directory,
//! push rules and pushers.

use crate::common;

use std::time::Duration;

use common::{enc, register, Api, Node};
use matrix_sdk::{
    config::SyncSettings,
    room::Receipts,
    ruma::{
        api::client::{
            receipt::create_receipt::v3::ReceiptType as SendReceiptType,
            room::create_room::v3::{Request as CreateRoomRequest, RoomPreset},
        },
        events::{
            receipt::{ReceiptThread, ReceiptType},
            room::message::RoomMessageEventContent,
            tag::{TagInfo, TagName},
            Mentions,
        },
        OwnedEventId, OwnedRoomId,
    },
    Client,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

async fn sync(c: &Client) {
    c.sync_once(SyncSettings::default()).await.expect("sync");
}

/// alice creates a room (public preset), bob joins; both clients have synced it.
async fn two_users(node: &Node) -> (Client, Client, OwnedRoomId) {
    let alice = register(node, "alice", "pw-alice").await;
    let bob = register(node, "bob", "pw-bob").await;
    let mut req = CreateRoomRequest::new();
    req.preset = Some(RoomPreset::PublicChat);
    req.name = Some("ephemeral".into());
    let room = alice.create_room(req).await.expect("create room");
    let room_id = room.room_id().to_owned();
    bob.join_room_by_id(&room_id).await.expect("bob joins");
    sync(&alice).await;
    sync(&bob).await;
    (alice, bob, room_id)
}

async fn send_text(c: &Client, room: &OwnedRoomId, body: &str) -> OwnedEventId {
    let r = c.get_room(room).expect("room known to client");
    r.send(RoomMessageEventContent::text_plain(body)).await.expect("send").response.event_id
}

/// One raw `/sync` (optionally long-polling) as `api`; returns the body.
async fn raw_sync(api: &Api, since: Option<&str>, timeout_ms: u64, filter: Option<&Value>) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(s) = since {
        path.push_str(&format!("&since={}", enc(s)));
    }
    if let Some(f) = filter {
        path.push_str(&format!("&filter={}", enc(&f.to_string())));
    }
    api.get(&path).await.ok()
}

/// Long-poll syncs of `c` until its typing subscription yields a list passing `want`.
async fn next_typing(
    c: &Client,
    rx: &mut tokio::sync::broadcast::Receiver<Vec<matrix_sdk::ruma::OwnedUserId>>,
    want: impl Fn(&[matrix_sdk::ruma::OwnedUserId]) -> bool,
) -> Vec<matrix_sdk::ruma::OwnedUserId> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        while let Ok(u) = rx.try_recv() {
            if want(&u) {
                return u;
            }
        }
        assert!(std::time::Instant::now() < deadline, "typing notification not seen in time");
        c.sync_once(SyncSettings::default().timeout(Duration::from_secs(5))).await.expect("sync");
    }
}

fn ephemeral_of<'a>(sync: &'a Value, room: &OwnedRoomId, kind: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room.as_str()]["ephemeral"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn typing_reaches_other_clients_wakes_long_polls_and_times_out() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let bob_api = Api::as_client(&node, &bob);

    // The SDK on bob's side reports alice typing (and stopping) from sync.
    let bob_room = bob.get_room(&room_id).unwrap();
    let (_guard, mut typing_rx) = bob_room.subscribe_to_typing_notifications();
    alice.get_room(&room_id).unwrap().typing_notice(true).await.expect("typing on");
    let typing = next_typing(&bob, &mut typing_rx, |u| !u.is_empty()).await;
    assert_eq!(typing, vec![alice.user_id().unwrap().to_owned()]);
    alice.get_room(&room_id).unwrap().typing_notice(false).await.expect("typing off");
    next_typing(&bob, &mut typing_rx, |u| u.is_empty()).await;

    // A long-polling sync wakes up for a typing notification (no new event at all): the poll
    // would otherwise only return after 30 s, without m.typing.
    let since = raw_sync(&bob_api, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    let poll = {
        let api = bob_api.clone();
        tokio::spawn(async move { raw_sync(&api, Some(&since), 30_000, None).await })
    };
    let alice_api = Api::as_client(&node, &alice);
    let alice_id = alice.user_id().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room_id.as_str()), enc(alice_id.as_str()));
    alice_api.put(&path, &json!({"typing": true, "timeout": 1500})).await.ok();
    let resp = tokio::time::timeout(WAIT, poll).await.expect("long-poll woke up").unwrap();
    let t = ephemeral_of(&resp, &room_id, "m.typing");
    assert_eq!(t.len(), 1, "long-poll returned without m.typing: {resp}");
    assert_eq!(t[0]["content"]["user_ids"], json!([alice_id]));

    // The notification times out by itself, and the waiting sync is woken with the empty list
    // (without expiry the poll would wait its full 25 s and report nothing).
    let since = resp["next_batch"].as_str().unwrap().to_owned();
    let resp = raw_sync(&bob_api, Some(&since), 25_000, None).await;
    let t = ephemeral_of(&resp, &room_id, "m.typing");
    assert_eq!(t.len(), 1, "no typing change after the timeout: {resp}");
    assert_eq!(t[0]["content"]["user_ids"], json!([]));

    // Only joined users may type, and only as themselves.
    let carol = Api::new(&node);
    let (_, carol_token) = carol.register("carol", "pw").await;
    let carol = Api::with_token(&node, carol_token);
    let carol_id = format!("@carol:{}", common::hex_server_name(alice_id.as_str()));
    let carol_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room_id.as_str()), enc(&carol_id));
    carol.put(&carol_path, &json!({"typing": true, "timeout": 1000})).await.expect_err(403, "M_FORBIDDEN");
    bob_api.put(&path, &json!({"typing": true, "timeout": 1000})).await.expect_err(403, "M_FORBIDDEN");
}

#[tokio::test]
async fn receipts_public_private_and_threaded() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let e1 = send_text(&alice, &room_id, "one").await;
    let bob_room = bob.get_room(&room_id).unwrap();
    sync(&bob).await;

    // bob's public read receipt reaches alice's SDK.
    bob_room.send_single_receipt(SendReceiptType::Read, ReceiptThread::Unthreaded, e1.clone()).await.expect("receipt");
    let bob_id = bob.user_id().unwrap().to_owned();
    let alice_room = alice.get_room(&room_id).unwrap();
    let got = common::poll_until(WAIT, "alice to see bob's receipt", || async {
        sync(&alice).await;
        alice_room.load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &bob_id).await.unwrap()
    })
    .await;
    assert_eq!(got.0, e1);

    // A private receipt is seen by bob's own client only.
    let e2 = send_text(&alice, &room_id, "two").await;
    sync(&bob).await;
    let alice_api = Api::as_client(&node, &alice);
    let since = raw_sync(&alice_api, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    bob_room.send_single_receipt(SendReceiptType::ReadPrivate, ReceiptThread::Unthreaded, e2.clone()).await.unwrap();
    let own = common::poll_until(WAIT, "bob's SDK to see his private receipt", || async {
        sync(&bob).await;
        bob_room.load_user_receipt(ReceiptType::ReadPrivate, ReceiptThread::Unthreaded, &bob_id).await.unwrap()
    })
    .await;
    assert_eq!(own.0, e2);
    let initial = raw_sync(&alice_api, None, 0, None).await;
    let incremental = raw_sync(&alice_api, Some(&since), 0, None).await;
    for s in [&initial, &incremental] {
        assert!(!s.to_string().contains("m.read.private"), "alice sees bob's private receipt: {s}");
    }

    // Threaded receipts carry their thread id; a receipt for an event outside the thread fails.
    let bob_api = Api::as_client(&node, &bob);
    let reply = alice_api
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(room_id.as_str())),
            &json!({"msgtype": "m.text", "body": "in thread",
                    "m.relates_to": {"rel_type": "m.thread", "event_id": e1, "is_falling_back": true,
                                     "m.in_reply_to": {"event_id": e1}}}),
        )
        .await
        .ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rpath = |ev: &str| format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room_id.as_str()), enc(ev));
    bob_api.post(&rpath(&reply), &json!({"thread_id": e1})).await.ok();
    bob_api.post(&rpath(&reply), &json!({"thread_id": "main"})).await.expect_err(400, "M_INVALID_PARAM");
    bob_api.post(&rpath(e2.as_str()), &json!({"thread_id": e1})).await.expect_err(400, "M_INVALID_PARAM");
    let s = raw_sync(&alice_api, Some(&since), 0, None).await;
    let receipts = ephemeral_of(&s, &room_id, "m.receipt");
    assert_eq!(receipts.len(), 1, "{s}");
    let r = &receipts[0]["content"][reply.as_str()]["m.read"][bob_id.as_str()];
    assert_eq!(r["thread_id"], json!(e1), "{s}");
    assert!(r["ts"].as_u64().is_some());

    // Receipts for unknown events or by non-members fail.
    bob_api.post(&rpath("$nope"), &json!({})).await.expect_err(404, "M_NOT_FOUND");
}

#[tokio::test]
async fn read_markers_set_fully_read_and_receipt() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let e1 = send_text(&alice, &room_id, "hello").await;
    let e2 = send_text(&alice, &room_id, "again").await;
    sync(&bob).await;
    let bob_room = bob.get_room(&room_id).unwrap();
    bob_room
        .send_multiple_receipts(Receipts::new().fully_read_marker(e2.clone()).public_read_receipt(e2.clone()))
        .await
        .expect("read markers");
    sync(&bob).await;
    let fully_read = bob_room
        .account_data_static::<matrix_sdk::ruma::events::fully_read::FullyReadEventContent>()
        .await
        .unwrap()
        .expect("m.fully_read synced")
        .deserialize()
        .unwrap();
    assert_eq!(fully_read.content.event_id, e2);
    let bob_id = bob.user_id().unwrap().to_owned();
    let alice_room = alice.get_room(&room_id).unwrap();
    let got = common::poll_until(WAIT, "alice to see the receipt from read_markers", || async {
        sync(&alice).await;
        alice_room.load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &bob_id).await.unwrap()
    })
    .await;
    assert_eq!(got.0, e2);

    // The marker never moves backwards.
    let bob_api = Api::as_client(&node, &bob);
    let path = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(room_id.as_str()));
    bob_api.post(&path, &json!({"m.fully_read": e1})).await.ok();
    let ad = bob_api
        .get(&format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read",
            enc(bob_id.as_str()),
            enc(room_id.as_str())
        ))
        .await
        .ok();
    assert_eq!(ad["event_id"], json!(e2));
}

#[tokio::test]
async fn unread_counts_follow_push_rules_and_receipts() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let alice_room = alice.get_room(&room_id).unwrap();
    let bob_id = bob.user_id().unwrap().to_owned();
    send_text(&alice, &room_id, "first").await;
    send_text(&alice, &room_id, "second").await;
    let mention =
        RoomMessageEventContent::text_plain("hey bob").add_mentions(Mentions::with_user_ids([bob_id.clone()]));
    let last = alice_room.send(mention).await.unwrap().response.event_id;
    // alice's own messages never count for alice.
    sync(&bob).await;
    sync(&alice).await;
    let bob_room = bob.get_room(&room_id).unwrap();
    let c = bob_room.unread_notification_counts();
    assert_eq!((c.notification_count, c.highlight_count), (3, 1), "bob's counts");
    assert_eq!(alice.get_room(&room_id).unwrap().unread_notification_counts().notification_count, 0);

    // /notifications lists the same events, newest first, paginated; `only=highlight`.
    let bob_api = Api::as_client(&node, &bob);
    let n = bob_api.get("/_matrix/client/v3/notifications").await.ok();
    let notes = n["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 3, "{n}");
    assert_eq!(notes[0]["event"]["event_id"], last.as_str());
    assert_eq!((notes[0]["read"].as_bool(), notes[0]["room_id"].as_str()), (Some(false), Some(room_id.as_str())));
    let hl = bob_api.get("/_matrix/client/v3/notifications?only=highlight").await.ok();
    assert_eq!(hl["notifications"].as_array().map(Vec::len), Some(1), "{hl}");
    let p1 = bob_api.get("/_matrix/client/v3/notifications?limit=2").await.ok();
    assert_eq!(p1["notifications"].as_array().map(Vec::len), Some(2));
    let tok = p1["next_token"].as_str().expect("next_token");
    let p2 = bob_api.get(&format!("/_matrix/client/v3/notifications?limit=2&from={tok}")).await.ok();
    assert_eq!(p2["notifications"].as_array().map(Vec::len), Some(1));
    assert!(p2.get("next_token").is_none());

    // Reading up to the mention clears the counts.
    bob_room.send_single_receipt(SendReceiptType::Read, ReceiptThread::Unthreaded, last).await.unwrap();
    sync(&bob).await;
    let c = bob_room.unread_notification_counts();
    assert_eq!((c.notification_count, c.highlight_count), (0, 0));
    let n = bob_api.get("/_matrix/client/v3/notifications").await.ok();
    assert!(n["notifications"].as_array().unwrap().iter().all(|x| x["read"] == true), "{n}");

    // A user rule that silences the room (through the push rules API) stops counting.
    bob_api
        .put(&format!("/_matrix/client/v3/pushrules/global/room/{}", enc(room_id.as_str())), &json!({"actions": []}))
        .await
        .ok();
    send_text(&alice, &room_id, "quiet").await;
    sync(&bob).await;
    assert_eq!(bob_room.unread_notification_counts().notification_count, 0);
    bob_api.delete(&format!("/_matrix/client/v3/pushrules/global/room/{}", enc(room_id.as_str()))).await.ok();
    // Disabling the default rules for messages (in a two-person room) does the same.
    let toggle = |rule: &'static str, on: bool| {
        let api = bob_api.clone();
        async move {
            let path = format!("/_matrix/client/v3/pushrules/global/underride/{rule}/enabled");
            api.put(&path, &json!({"enabled": on})).await.ok();
        }
    };
    toggle(".m.rule.message", false).await;
    toggle(".m.rule.room_one_to_one", false).await;
    send_text(&alice, &room_id, "still quiet").await;
    sync(&bob).await;
    assert_eq!(bob_room.unread_notification_counts().notification_count, 0);
    toggle(".m.rule.message", true).await;
    toggle(".m.rule.room_one_to_one", true).await;
    send_text(&alice, &room_id, "loud").await;
    sync(&bob).await;
    // The two quiet messages stay quiet under the new rules only because counts are computed
    // from the rules now: all three unread messages notify again.
    assert_eq!(bob_room.unread_notification_counts().notification_count, 3);
}

#[tokio::test]
async fn unread_thread_counts_when_the_filter_asks() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let alice_api = Api::as_client(&node, &alice);
    let bob_api = Api::as_client(&node, &bob);
    let root = send_text(&alice, &room_id, "root").await;
    let mut thread_events = Vec::new();
    for i in 0..2 {
        let r = alice_api
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/th{i}", enc(room_id.as_str())),
                &json!({"msgtype": "m.text", "body": format!("reply {i}"),
                        "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
            )
            .await
            .ok();
        thread_events.push(r["event_id"].as_str().unwrap().to_owned());
    }
    let threaded = json!({"room": {"timeline": {"unread_thread_notifications": true}}});
    let s = raw_sync(&bob_api, None, 0, Some(&threaded)).await;
    let room = &s["rooms"]["join"][room_id.as_str()];
    assert_eq!(room["unread_notifications"]["notification_count"], 1, "{room}");
    assert_eq!(room["unread_thread_notifications"][root.as_str()]["notification_count"], 2, "{room}");
    // Without the flag, everything counts in the room.
    let s = raw_sync(&bob_api, None, 0, None).await;
    let room = &s["rooms"]["join"][room_id.as_str()];
    assert_eq!(room["unread_notifications"]["notification_count"], 3, "{room}");
    assert!(room.get("unread_thread_notifications").is_none());
    // A threaded receipt clears that thread only.
    bob_api
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room_id.as_str()), enc(&thread_events[1])),
            &json!({"thread_id": root}),
        )
        .await
        .ok();
    let s = raw_sync(&bob_api, None, 0, Some(&threaded)).await;
    let room = &s["rooms"]["join"][room_id.as_str()];
    assert_eq!(room["unread_notifications"]["notification_count"], 1, "{room}");
    assert!(room["unread_thread_notifications"].get(root.as_str()).is_none(), "{room}");
}

#[tokio::test]
async fn tags_sync_as_account_data() {
    let node = Node::start().await;
    let (_alice, bob, room_id) = two_users(&node).await;
    let room = bob.get_room(&room_id).unwrap();
    let mut info = TagInfo::new();
    info.order = Some(0.25);
    room.set_tag(TagName::Favorite, info).await.expect("set tag");
    room.set_tag(TagName::User("u.work".parse().unwrap()), TagInfo::new()).await.expect("set user tag");
    sync(&bob).await;
    let tags = room.tags().await.unwrap().expect("tags synced");
    assert_eq!(tags.get(&TagName::Favorite).and_then(|t| t.order), Some(0.25));
    assert!(room.is_favourite());
    assert_eq!(tags.len(), 2);
    room.remove_tag(TagName::Favorite).await.expect("remove tag");
    sync(&bob).await;
    assert!(!room.is_favourite());
    let api = Api::as_client(&node, &bob);
    let uid = bob.user_id().unwrap();
    let got = api
        .get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(uid.as_str()), enc(room_id.as_str())))
        .await
        .ok();
    assert_eq!(got, json!({"tags": {"u.work": {}}}));
    // Someone else's tags are off limits.
    let alice_api = Api::as_client(&node, &_alice);
    alice_api
        .get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(uid.as_str()), enc(room_id.as_str())))
        .await
        .expect_err(403, "M_FORBIDDEN");
}

#[tokio::test]
async fn presence_is_stored() {
    let node = Node::start().await;
    let api = Api::new(&node);
    let (uid, token) = api.register("dora", "pw").await;
    let me = Api::with_token(&node, token);
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&uid));
    assert_eq!(me.get(&path).await.ok()["presence"], "offline");
    me.put(&path, &json!({"presence": "unavailable", "status_msg": "in the field"})).await.ok();
    let got = me.get(&path).await.ok();
    assert_eq!(got["presence"], "unavailable");
    assert_eq!(got["status_msg"], "in the field");
    assert!(got["last_active_ago"].as_u64().is_some());
    me.put(&path, &json!({"presence": "sleepy"})).await.expect_err(400, "M_INVALID_PARAM");
    let (other, _) = api.register("erin", "pw").await;
    me.put(&format!("/_matrix/client/v3/presence/{}/status", enc(&other)), &json!({"presence": "online"}))
        .await
        .expect_err(403, "M_FORBIDDEN");
    let server = common::hex_server_name(&uid);
    me.get(&format!("/_matrix/client/v3/presence/{}/status", enc(&format!("@nobody:{server}"))))
        .await
        .expect_err(404, "M_NOT_FOUND");
}

#[tokio::test]
async fn user_directory_finds_room_mates_and_public_room_members() {
    let node = Node::start().await;
    let (alice, bob, _room) = two_users(&node).await;
    bob.account().set_display_name(Some("Bobby Tables")).await.unwrap();
    // frank is in no room: not findable. gina is alone in a public room: findable.
    let api = Api::new(&node);
    api.register("frank", "pw").await;
    let (_, gina_token) = api.register("gina", "pw").await;
    let gina = Api::with_token(&node, gina_token);
    gina.post("/_matrix/client/v3/createRoom", &json!({"preset": "public_chat"})).await.ok();

    let res = alice.search_users("bobby", 10).await.expect("search");
    assert_eq!(res.results.len(), 1);
    assert_eq!(res.results[0].user_id, bob.user_id().unwrap());
    assert_eq!(res.results[0].display_name.as_deref(), Some("Bobby Tables"));
    assert!(!res.limited);
    assert!(alice.search_users("frank", 10).await.unwrap().results.is_empty());
    let g = alice.search_users("GIN", 10).await.unwrap();
    assert_eq!(g.results.len(), 1, "{:?}", g.results);
    // Search by user id, with a limit.
    let all = alice
        .search_users(common::hex_server_name(alice.user_id().unwrap().as_str()).get(..8).unwrap(), 1)
        .await
        .unwrap();
    assert_eq!(all.results.len(), 1);
    assert!(all.limited);
}

#[tokio::test]
async fn push_rules_api_and_sync() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "pw").await;
    // The SDK reads the spec's default rules.
    sync(&alice).await;
    let rules = alice.account().push_rules().await.expect("push rules");
    assert!(rules.override_.iter().any(|r| r.rule_id == ".m.rule.master"));
    assert!(rules.underride.iter().any(|r| r.rule_id == ".m.rule.message"));
    let api = Api::as_client(&node, &alice);
    let all = api.get("/_matrix/client/v3/pushrules/").await.ok();
    for k in ["override", "content", "room", "sender", "underride"] {
        assert!(all["global"][k].is_array(), "{k} missing: {all}");
    }
    // Initial sync carries m.push_rules.
    let s = raw_sync(&api, None, 0, None).await;
    assert!(s["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));
    let since = s["next_batch"].as_str().unwrap().to_owned();

    // A user rule: create, read, change, and see it in sync.
    let path = "/_matrix/client/v3/pushrules/global/content/cake";
    api.put(path, &json!({"pattern": "cake", "actions": ["notify"]})).await.ok();
    let rule = api.get(path).await.ok();
    assert_eq!(
        (rule["rule_id"].as_str(), rule["pattern"].as_str(), rule["default"].as_bool()),
        (Some("cake"), Some("cake"), Some(false))
    );
    assert_eq!(api.get(&format!("{path}/enabled")).await.ok()["enabled"], true);
    api.put(&format!("{path}/enabled"), &json!({"enabled": false})).await.ok();
    assert_eq!(api.get(&format!("{path}/enabled")).await.ok()["enabled"], false);
    api.put(&format!("{path}/actions"), &json!({"actions": ["notify", {"set_tweak": "highlight"}]})).await.ok();
    assert_eq!(api.get(&format!("{path}/actions")).await.ok()["actions"][1]["set_tweak"], "highlight");
    let s = raw_sync(&api, Some(&since), 0, None).await;
    let pr = s["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.push_rules").cloned();
    let pr = pr.unwrap_or_else(|| panic!("m.push_rules not in incremental sync: {s}"));
    let cake = pr["content"]["global"]["content"].as_array().unwrap().iter().find(|r| r["rule_id"] == "cake").cloned();
    assert_eq!(cake.unwrap()["enabled"], false);
    // The SDK sees it too (from the synced account data).
    sync(&alice).await;
    let rules = alice.account().push_rules().await.unwrap();
    assert!(rules.content.iter().any(|r| r.rule_id == "cake" && !r.enabled));

    // Server-default rules can be toggled but not deleted; unknown rules are 404.
    api.delete("/_matrix/client/v3/pushrules/global/override/.m.rule.master").await.expect_err(400, "M_INVALID_PARAM");
    api.put("/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled", &json!({"enabled": true}))
        .await
        .ok();
    api.get("/_matrix/client/v3/pushrules/global/override/nope").await.expect_err(404, "M_NOT_FOUND");
    api.put("/_matrix/client/v3/pushrules/global/override/.mine", &json!({"actions": [], "conditions": []}))
        .await
        .expect_err(400, "M_INVALID_PARAM");
    api.put(
        "/_matrix/client/v3/pushrules/global/override/second?before=nope",
        &json!({"actions": [], "conditions": []}),
    )
    .await
    .expect_err(404, "M_NOT_FOUND");
    api.delete(path).await.ok();
    api.get(path).await.expect_err(404, "M_NOT_FOUND");
}

#[tokio::test]
async fn pushers_are_stored_listed_and_removed() {
    let node = Node::start().await;
    let api = Api::new(&node);
    let (_, token) = api.register("hank", "pw").await;
    let me = Api::with_token(&node, token);
    assert_eq!(me.get("/_matrix/client/v3/pushers").await.ok()["pushers"], json!([]));
    let pusher = json!({
        "pushkey": "device-token", "kind": "http", "app_id": "org.example.app",
        "app_display_name": "Example", "device_display_name": "phone", "lang": "en",
        "data": {"url": "http://127.0.0.1:9/_matrix/push/v1/notify", "format": "event_id_only"}
    });
    me.post("/_matrix/client/v3/pushers/set", &pusher).await.ok();
    let list = me.get("/_matrix/client/v3/pushers").await.ok();
    assert_eq!(list["pushers"].as_array().unwrap().len(), 1);
    assert_eq!(list["pushers"][0]["data"]["url"], pusher["data"]["url"]);
    assert_eq!(list["pushers"][0]["app_display_name"], "Example");
    // An http pusher needs a URL.
    let mut bad = pusher.clone();
    bad["data"] = json!({});
    me.post("/_matrix/client/v3/pushers/set", &bad).await.expect_err(400, "M_BAD_JSON");
    // kind: null deletes.
    let mut del = pusher.clone();
    del["kind"] = Value::Null;
    me.post("/_matrix/client/v3/pushers/set", &del).await.ok();
    assert_eq!(me.get("/_matrix/client/v3/pushers").await.ok()["pushers"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// Search (matrix-sdk has no search API: raw HTTP)
// ---------------------------------------------------------------------------------------------

async fn search(api: &Api, criteria: Value, next_batch: Option<&str>) -> Value {
    let mut path = "/_matrix/client/v3/search".to_owned();
    if let Some(n) = next_batch {
        path.push_str(&format!("?next_batch={}", enc(n)));
    }
    let res = api.post(&path, &json!({"search_categories": {"room_events": criteria}})).await.ok();
    res["search_categories"]["room_events"].clone()
}

fn result_ids(r: &Value) -> Vec<String> {
    r["results"].as_array().unwrap().iter().map(|x| x["result"]["event_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn search_ranks_paginates_and_gives_context() {
    let node = Node::start().await;
    let (alice, bob, room_id) = two_users(&node).await;
    let e1 = send_text(&alice, &room_id, "Hello world").await;
    let e2 = send_text(&alice, &room_id, "unrelated chatter").await;
    let e3 = send_text(&alice, &room_id, "hello again, HELLO!").await;
    let e4 = send_text(&alice, &room_id, "helloooo there").await;
    let bob_api = Api::as_client(&node, &bob);

    // Rank: most matching words first (prefix, case-insensitive); ties by recency.
    let r = search(&bob_api, json!({"search_term": "HELLO"}), None).await;
    assert_eq!(result_ids(&r), vec![e3.to_string(), e4.to_string(), e1.to_string()]);
    assert_eq!(r["count"], 3);
    assert!(r["highlights"].as_array().unwrap().contains(&json!("hello")));
    // Every word must match.
    let r = search(&bob_api, json!({"search_term": "hello world"}), None).await;
    assert_eq!(result_ids(&r), vec![e1.to_string()]);
    // Recent order, and pagination in both orders without repeats.
    for (order, expect) in [("recent", vec![&e4, &e3, &e1]), ("rank", vec![&e3, &e4, &e1])] {
        let mut seen = Vec::new();
        let mut next: Option<String> = None;
        for _ in 0..10 {
            let crit = json!({"search_term": "hello", "order_by": order, "filter": {"limit": 1}});
            let r = search(&bob_api, crit, next.as_deref()).await;
            seen.extend(result_ids(&r));
            match r["next_batch"].as_str() {
                Some(n) => next = Some(n.to_owned()),
                None => break,
            }
        }
        let expect: Vec<String> = expect.iter().map(|e| e.to_string()).collect();
        assert_eq!(seen, expect, "order_by={order}");
    }
    // Context and profiles, groups.
    let crit = json!({
        "search_term": "world",
        "event_context": {"before_limit": 1, "after_limit": 1, "include_profile": true},
        "groupings": {"group_by": [{"key": "room_id"}]},
    });
    let r = search(&bob_api, crit, None).await;
    let ctx = &r["results"][0]["context"];
    assert_eq!(ctx["events_after"][0]["event_id"], e2.as_str(), "{ctx}");
    assert_eq!(ctx["events_before"].as_array().map(Vec::len), Some(1), "{ctx}");
    assert!(ctx["profile_info"].get(alice.user_id().unwrap().as_str()).is_some(), "{ctx}");
    assert_eq!(r["groups"]["room_id"][room_id.as_str()]["results"], json!([e1]));
    // Other keys: the room name.
    let r = search(&bob_api, json!({"search_term": "ephemeral", "keys": ["content.name"]}), None).await;
    assert_eq!(r["count"], 1);
    assert_eq!(r["results"][0]["result"]["type"], "m.room.name");
}

#[tokio::test]
async fn search_respects_membership_and_history_visibility() {
    let node = Node::start().await;
    let alice_api = Api::new(&node);
    let (_, at) = alice_api.register("alice", "pw").await;
    let alice = Api::with_token(&node, at);
    let (_, bt) = alice_api.register("bob", "pw").await;
    let bob = Api::with_token(&node, bt);
    let room = alice
        .post(
            "/_matrix/client/v3/createRoom",
            &json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}
            ]}),
        )
        .await
        .ok()["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let say = |txn: &'static str, body: &'static str| {
        let alice = alice.clone();
        let room = room.clone();
        async move {
            let p = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
            alice.put(&p, &json!({"msgtype": "m.text", "body": body})).await.ok()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    say("1", "secret plan").await;
    // Not a member: nothing.
    assert_eq!(search(&bob, json!({"search_term": "plan"}), None).await["count"], 0);
    bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), &json!({})).await.ok();
    let public = say("2", "public plan").await;
    let r = search(&bob, json!({"search_term": "plan", "filter": {"rooms": [room]}}), None).await;
    assert_eq!(result_ids(&r), vec![public.clone()], "history from before bob joined must stay hidden");
    // alice sees both.
    assert_eq!(search(&alice, json!({"search_term": "plan"}), None).await["count"], 2);
    // A filter on another room excludes this one.
    let r = search(&bob, json!({"search_term": "plan", "filter": {"not_rooms": [room]}}), None).await;
    assert_eq!(r["count"], 0);
}
