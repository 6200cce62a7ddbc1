//! Real nodes, real QUIC, real crypto: two `outpost` processes on loopback linked by a static
//! peer address, a matrix-sdk client on each, talking in an encrypted room. Keys, one-time key
//! claims, room keys (to-device) and messages all cross the libp2p mesh.

use crate::common::{self, send_text, spawn_sync};

use std::time::Duration;

use common::{enc, poll_until, register, Api, Node};
use matrix_sdk::{
    deserialized_responses::TimelineEventKind,
    ruma::{
        api::client::room::create_room,
        events::{room::encryption::RoomEncryptionEventContent, InitialStateEvent},
        OwnedEventId, OwnedRoomId, OwnedUserId,
    },
    Client,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

async fn assert_decrypts(client: &Client, who: &str, room_id: &OwnedRoomId, event_id: &OwnedEventId, body: &str) {
    poll_until(WAIT, &format!("{who} to decrypt {body:?} ({event_id})"), || async {
        let room = client.get_room(room_id)?;
        let ev = room.event(event_id, None).await.ok()?;
        let TimelineEventKind::Decrypted(_) = &ev.kind else { return None };
        let json: Value = serde_json::from_str(ev.raw().json().get()).ok()?;
        assert_eq!(json["content"]["body"], body, "{who}: decrypted body of {event_id}: {json}");
        Some(())
    })
    .await;
}

/// Waits until `node` has device keys for `client`'s device.
async fn wait_keys_uploaded(node: &Node, client: &Client) {
    let api = Api::as_client(node, client);
    let id = client.user_id().unwrap().to_string();
    let device = client.device_id().unwrap().to_string();
    poll_until(WAIT, &format!("device keys of {id}"), || async {
        let q = api.post("/_matrix/client/v3/keys/query", &json!({"device_keys": {id.clone(): []}})).await.ok();
        q["device_keys"][&id].get(&device).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_conversation_over_quic() {
    let port = common::free_udp_port();
    // This test timed out now and then (a message not decrypted in 60 s) without a cause in the
    // INFO log: federation and E2EE at DEBUG, so that the log printed on a timeout says more.
    let log = "info,ruma_state_res=warn,outpost::core::federation=debug,outpost::core::e2ee=debug";
    // The clients' side of the same: matrix-sdk's olm/megolm decisions, to the test's captured
    // output (printed when it fails; it showed the race described below).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,matrix_sdk_crypto=debug"))
        .with_test_writer()
        .try_init();
    let a = Node::start_with_log(vec!["--listen".into(), format!("/ip4/127.0.0.1/udp/{port}/quic-v1")], log).await;
    let b = Node::start_with_log(vec!["--peer".into(), format!("/ip4/127.0.0.1/udp/{port}/quic-v1")], log).await;
    let alice = register(&a, "alice", "alice-password").await;
    let bob = register(&b, "bob", "bob-password").await;
    let bob_id: OwnedUserId = bob.user_id().unwrap().to_owned();
    let tasks = [spawn_sync(&alice), spawn_sync(&bob)];
    wait_keys_uploaded(&a, &alice).await;
    wait_keys_uploaded(&b, &bob).await;

    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.initial_state =
        vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
            .to_raw_any()];
    let alice_room = alice.create_room(req).await.expect("create encrypted room");
    let room_id = alice_room.room_id().to_owned();
    // The invite reaches B once the nodes are connected.
    let alice_api = Api::as_client(&a, &alice);
    poll_until(WAIT, "the invite delivered over QUIC", || async {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id.as_str()));
        (alice_api.post(&path, &json!({"user_id": bob_id})).await.status == 200).then_some(())
    })
    .await;
    poll_until(WAIT, "bob's client to see the invite", || async { bob.get_room(&room_id).map(|_| ()) }).await;
    let bob_room = bob.join_room_by_id(&room_id).await.expect("bob joins over QUIC");
    for (client, who) in [(&alice, "alice"), (&bob, "bob")] {
        poll_until(WAIT, &format!("{who} to see the room encrypted with two members"), || async {
            let room = client.get_room(&room_id)?;
            let encrypted = room.latest_encryption_state().await.ok()?.is_encrypted();
            (encrypted && room.joined_members_count() == 2).then_some(())
        })
        .await;
    }

    // Alice speaks first and bob reads it before answering: with both first messages sent at
    // once, each client claims a one-time key of the other and opens an Olm session to it; bob's
    // client then shares its room key twice (index 0 over its own session, index 1 over
    // alice's), and matrix-sdk 0.18, given both in one sync batch, keeps the second — its
    // store is looked up before the first is saved — so alice cannot decrypt bob's first
    // message (seen 2 of 10 runs under load; every to-device message reached alice's node).
    // That is the client's race, not the server's; the rest of the conversation interleaves.
    let mut sent = Vec::new();
    let body = "alice over quic 0".to_owned();
    let first = send_text(&alice_room, &body).await;
    assert_decrypts(&bob, "bob", &room_id, &first, &body).await;
    sent.push((first, body));
    for (room, body) in [
        (&bob_room, "bob over quic 0"),
        (&alice_room, "alice over quic 1"),
        (&bob_room, "bob over quic 1"),
        (&alice_room, "alice over quic 2"),
        (&bob_room, "bob over quic 2"),
    ] {
        sent.push((send_text(room, body).await, body.to_owned()));
    }
    for (id, body) in &sent {
        assert_decrypts(&alice, "alice", &room_id, id, body).await;
        assert_decrypts(&bob, "bob", &room_id, id, body).await;
    }
    // The server on B only ever stored ciphertext.
    let raw = Api::as_client(&b, &bob)
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(sent[0].0.as_str())))
        .await
        .ok();
    assert_eq!(raw["type"], "m.room.encrypted", "{raw}");

    for t in tasks {
        t.abort();
    }
}
