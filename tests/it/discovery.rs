//! Zero-configuration discovery: two real `outpost` processes, each in its own network
//! namespace, joined by a bridge this test creates — no static peers, only mDNS on the
//! namespaces' own interfaces. They find each other, connect over QUIC and federate.
//!
//! Needs root (network namespaces); CI runs as root. mDNS never touches the host's real
//! interfaces: each node sees only its namespace's veth, and the bridge connects nothing else.
//! The namespaces come from [`common::lab`], shared with `realstack.rs`.

use crate::common;

use std::time::Duration;

use common::{lab::Lab, poll_until};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_link_find_each_other_by_mdns_alone() {
    let Some(mut lab) = Lab::new(2) else { return };
    lab.spawn(0);
    lab.spawn(1);
    lab.wait_ready(0).await;
    lab.wait_ready(1).await;
    let (_, alice_token) = lab.api(0, None).register("alice", "pw").await;
    let (bob_id, bob_token) = lab.api(1, None).register("bob", "pw").await;
    let alice = lab.api(0, Some(&alice_token));
    let bob = lab.api(1, Some(&bob_token));
    let room =
        alice.post("/_matrix/client/v3/createRoom", &json!({})).await.ok()["room_id"].as_str().unwrap().to_owned();
    // No static peers: the invite can only reach bob's node once mDNS found it.
    poll_until(Duration::from_secs(30), "invite over the mDNS-discovered link", || async {
        let r = alice.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), &json!({"user_id": bob_id})).await;
        (r.status == 200).then_some(())
    })
    .await;
    let r = bob.post(&format!("/_matrix/client/v3/join/{room}"), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/1"),
            &json!({"msgtype": "m.text", "body": "found you"}),
        )
        .await
        .ok();
    poll_until(Duration::from_secs(20), "message at bob", || async {
        let s = bob.get("/_matrix/client/v3/sync").await.ok();
        s["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()?
            .iter()
            .any(|e| e["content"]["body"] == "found you")
            .then_some(())
    })
    .await;
    // The peer list shows the link (found by mDNS or by the other side's mDNS dial).
    let peers = alice.get("/_outpost/v1/peers").await.ok();
    assert!(peers["peers"].as_array().unwrap().iter().any(|p| p["connected"] == true), "{peers}");
}
