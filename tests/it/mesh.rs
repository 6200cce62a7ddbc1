//! Real nodes, real QUIC: two `outpost` processes on loopback, linked by a static peer address,
//! federating over libp2p streams. Clients on each node use matrix-sdk and raw HTTP.

use crate::common;

use std::time::Duration;

use common::{poll_until, Api, Node};
use serde_json::{json, Value};

async fn sync_bodies(api: &Api, room: &str) -> Vec<String> {
    let s = api.get("/_matrix/client/v3/sync").await.ok();
    s["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["content"]["body"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Node A listens on a known QUIC port; node B knows only that address.
async fn two_linked_nodes() -> (Node, Node) {
    let port = common::free_udp_port();
    let a = Node::start_with_args(vec!["--listen".into(), format!("/ip4/127.0.0.1/udp/{port}/quic-v1")]).await;
    let b = Node::start_with_args(vec!["--peer".into(), format!("/ip4/127.0.0.1/udp/{port}/quic-v1")]).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_over_quic_invite_join_and_message_both_ways() {
    let (a, b) = two_linked_nodes().await;
    let (alice_id, alice_token) = Api::new(&a).register("alice", "pw").await;
    let (bob_id, bob_token) = Api::new(&b).register("bob", "pw").await;
    let alice = Api::with_token(&a, alice_token);
    let bob = Api::with_token(&b, bob_token);

    let room = alice.post("/_matrix/client/v3/createRoom", &json!({"name": "over quic"})).await.ok()["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The invite goes to bob's node over QUIC (invite v2) once the nodes are connected.
    poll_until(Duration::from_secs(20), "invite delivered", || async {
        let r = alice.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), &json!({"user_id": bob_id})).await;
        (r.status == 200).then_some(())
    })
    .await;
    poll_until(Duration::from_secs(20), "bob sees the invite", || async {
        let s = bob.get("/_matrix/client/v3/sync").await.ok();
        s["rooms"]["invite"][&room].is_object().then_some(())
    })
    .await;
    let r = bob.post(&format!("/_matrix/client/v3/join/{room}"), &json!({})).await;
    assert_eq!(r.status, 200, "join over QUIC: {}", r.text);

    for i in 0..10 {
        alice
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/m{i}"),
                &json!({"msgtype": "m.text", "body": format!("a{i}")}),
            )
            .await
            .ok();
    }
    let got = poll_until(Duration::from_secs(20), "alice's messages at bob", || async {
        let b = sync_bodies(&bob, &room).await;
        (b.len() >= 10).then_some(b)
    })
    .await;
    assert_eq!(got, (0..10).map(|i| format!("a{i}")).collect::<Vec<_>>());
    bob.put(
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/r"),
        &json!({"msgtype": "m.text", "body": "hello alice"}),
    )
    .await
    .ok();
    poll_until(Duration::from_secs(20), "bob's reply at alice", || async {
        sync_bodies(&alice, &room).await.contains(&"hello alice".to_owned()).then_some(())
    })
    .await;

    // Operators see the link: peers list shows the other node connected with a round trip.
    let peers: Value = Api::with_token(&a, alice.token.clone().unwrap()).get("/_outpost/v1/peers").await.ok();
    let bob_server = common::hex_server_name(&bob_id);
    let entry = peers["peers"].as_array().unwrap().iter().find(|p| p["server_name"] == bob_server.as_str()).cloned();
    let entry = entry.unwrap_or_else(|| panic!("bob's node missing from {peers}"));
    assert_eq!(entry["connected"], true, "{entry}");
    assert_eq!(entry["queue_depth"], 0, "{entry}");
    let _ = alice_id;
}

/// A node that was down while messages were sent gets all of them when it comes back (durable
/// queue + reconnect), in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_catches_up_after_restart() {
    let (a, mut b) = two_linked_nodes().await;
    let (_, alice_token) = Api::new(&a).register("alice", "pw").await;
    let (bob_id, bob_token) = Api::new(&b).register("bob", "pw").await;
    let alice = Api::with_token(&a, alice_token);
    let room =
        alice.post("/_matrix/client/v3/createRoom", &json!({})).await.ok()["room_id"].as_str().unwrap().to_owned();
    poll_until(Duration::from_secs(20), "invite delivered", || async {
        let r = alice.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), &json!({"user_id": bob_id})).await;
        (r.status == 200).then_some(())
    })
    .await;
    let bob = Api::with_token(&b, bob_token.clone());
    poll_until(Duration::from_secs(20), "bob joins", || async {
        (bob.post(&format!("/_matrix/client/v3/join/{room}"), &json!({})).await.status == 200).then_some(())
    })
    .await;

    let since = bob.get("/_matrix/client/v3/sync").await.ok()["next_batch"].as_str().unwrap().to_owned();
    b.kill();
    for i in 0..120 {
        alice
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/off{i}"),
                &json!({"msgtype": "m.text", "body": format!("while away {i}")}),
            )
            .await
            .ok();
    }
    b.restart().await;
    let bob = Api::with_token(&b, bob_token);
    let all = poll_until(Duration::from_secs(30), "bob receives all 120", || async {
        let evs = common::paginate_all(&bob, &room, "b", None, 100).await;
        let bodies: Vec<String> =
            evs.iter().rev().filter_map(|e| e["content"]["body"].as_str().map(String::from)).collect();
        (bodies.len() >= 120).then_some(bodies)
    })
    .await;
    assert_eq!(all, (0..120).map(|i| format!("while away {i}")).collect::<Vec<_>>());
    // The client that was syncing before the gap gets a limited timeline it can fill from
    // prev_batch.
    let s = bob.get(&format!("/_matrix/client/v3/sync?since={since}")).await.ok();
    let tl = &s["rooms"]["join"][&room]["timeline"];
    assert_eq!(tl["limited"], true, "{tl}");
    let prev_batch = tl["prev_batch"].as_str().expect("prev_batch").to_owned();
    let newest: Vec<&str> =
        tl["events"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(newest.last().copied(), Some("while away 119"));
    let older = common::paginate_all(&bob, &room, "b", Some(&prev_batch), 50).await;
    let older_bodies: Vec<String> =
        older.iter().rev().filter_map(|e| e["content"]["body"].as_str().map(String::from)).collect();
    let mut joined: Vec<String> = older_bodies.into_iter().filter(|b| b.starts_with("while away")).collect();
    joined.extend(newest.iter().map(|s| s.to_string()));
    assert_eq!(joined, (0..120).map(|i| format!("while away {i}")).collect::<Vec<_>>(), "gap-free through prev_batch");
}
