//! A hostile peer: a real node ("H") whose user joined a room on node A legitimately, and which
//! then sends crafted federation requests to A — forged signatures, bad hashes, auth
//! violations, an origin that isn't the connected peer, oversized events, absurd `prev_events`
//! lists, oversized transactions. Every one is refused, and A keeps serving its users.

use crate::common;

use std::sync::Arc;

use bytes::Bytes;
use outpost::{
    api::ruma_wrapper::AuthenticatedPeer,
    core::{
        pdu::{build_and_sign, rules_for, DagPosition, PduTemplate},
        rooms::CreateRoomSpec,
    },
    identity::Identity,
    net::local::LocalNetwork,
    server,
};
use ruma::{
    api::{
        federation::{authentication::ServerSignaturesInput, transactions::send_transaction_message},
        OutgoingRequest,
    },
    events::TimelineEventType,
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedServerName, OwnedTransactionId, UInt,
};
use serde_json::{json, value::RawValue, Value};
use tower::ServiceExt;

async fn node(net: &Arc<LocalNetwork>) -> (server::Node, tempfile::TempDir) {
    common::inproc_node(net).await
}

/// Send a transaction to `victim`, signed with `signer` claiming `origin`, over a connection
/// authenticated as `peer`. Returns (status, body).
async fn send_txn(
    victim: &server::Node,
    signer: &Identity,
    origin: &OwnedServerName,
    peer: &OwnedServerName,
    pdus: Vec<Box<RawValue>>,
) -> (u16, Value) {
    let txn = OwnedTransactionId::from(format!("t{}", rand::random::<u64>()));
    let ts = MilliSecondsSinceUnixEpoch(UInt::new(1).unwrap());
    let mut req = send_transaction_message::v1::Request::new(txn, origin.clone(), ts);
    req.pdus = pdus;
    let input = ServerSignaturesInput::new(origin.clone(), victim.core.server_name().to_owned(), signer.key_pair());
    let http: http::Request<Vec<u8>> =
        req.try_into_http_request(&format!("http://{}", victim.core.server_name()), input, ()).unwrap();
    let mut http = http.map(|b| axum::body::Body::from(Bytes::from(b)));
    http.extensions_mut().insert(AuthenticatedPeer(peer.clone()));
    let res = victim.federation.clone().oneshot(http).await.unwrap();
    let status = res.status().as_u16();
    let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn raw(v: &impl serde::Serialize) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(v).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_is_refused_and_the_node_keeps_serving() {
    let net = LocalNetwork::new();
    let (a, _da) = node(&net).await;
    let (h, _dh) = node(&net).await;
    let alice = a.core.register("alice", None).await.unwrap();
    let eve = h.core.register("eve", None).await.unwrap();
    let room = a
        .core
        .create_room(&alice, CreateRoomSpec { preset: Some("public_chat".into()), ..Default::default() })
        .await
        .unwrap();
    h.core.join_remote(&eve, &room, &[a.core.server_name().to_owned()]).await.unwrap();
    let h_name = h.core.server_name().to_owned();
    let rules = rules_for(&a.core.room(&room).unwrap().unwrap().version).unwrap();

    // What a well-formed event from eve would reference, from H's own copy of the room.
    let st = h.core.current_state(&room).unwrap();
    let get = |t: &str, k: &str| st.get(&(t.to_owned(), k.to_owned())).cloned();
    let mut auth: Vec<OwnedEventId> =
        [get("m.room.power_levels", ""), get("m.room.member", eve.as_str())].into_iter().flatten().collect();
    if !rules.authorization.room_create_event_id_as_room_id {
        auth.extend(get("m.room.create", ""));
    }
    let prev = h.core.extremities(&room).unwrap();
    let depth = 1000;
    let build = |identity: &Identity, kind: &str, content: Value, state_key: Option<&str>, prev: &[OwnedEventId]| {
        let t = PduTemplate {
            kind: TimelineEventType::from(kind),
            content,
            state_key: state_key.map(String::from),
            redacts: None,
        };
        build_and_sign(
            identity,
            &rules,
            &eve,
            &t,
            DagPosition { room_id: Some(&room), prev_events: prev, auth_events: &auth, depth },
            1,
        )
        .unwrap()
    };
    let h_identity = h.core.identity();

    // 1. Forged signature: eve's event signed with a key that isn't H's.
    let impostor = Identity::from_seed([66; 32]);
    let mut forged = build(&impostor, "m.room.message", json!({"msgtype": "m.text", "body": "forged"}), None, &prev);
    // Claim it comes from H: move the impostor's signature under H's name.
    let sigs = forged.object.remove("signatures").unwrap();
    let sig = sigs.as_object().unwrap().values().next().unwrap().clone();
    forged.object.insert("signatures".into(), json!({ h_name.as_str(): sig }).try_into().unwrap());
    let (st1, r1) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&forged.object)]).await;
    assert_eq!(st1, 200, "{r1}");
    assert!(r1["pdus"].to_string().contains("signature"), "forged signature must be refused: {r1}");

    // 2. Bad hash: a valid signature but content changed afterwards → stored redacted.
    let mut tampered =
        build(h_identity, "m.room.message", json!({"msgtype": "m.text", "body": "original"}), None, &prev);
    tampered.object.insert("content".into(), json!({"msgtype": "m.text", "body": "tampered"}).try_into().unwrap());
    let (st2, r2) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&tampered.object)]).await;
    assert_eq!(st2, 200, "{r2}");
    let p = a.core.pdu(&tampered.event_id).unwrap().expect("a validly signed event with a bad hash is kept, redacted");
    assert_eq!(p.content_value(), json!({}), "a hash mismatch must be redacted, never shown");

    // 3. Auth violation: eve (power 0) rewrites the power levels.
    let evil_pl = build(h_identity, "m.room.power_levels", json!({"users": {eve.as_str(): 100}}), Some(""), &prev);
    let (_, r3) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&evil_pl.object)]).await;
    assert!(r3["pdus"][evil_pl.event_id.as_str()]["error"].is_string(), "auth violation must be refused: {r3}");
    assert!(a.core.pdu(&evil_pl.event_id).unwrap().is_none());
    assert_ne!(
        a.core.state_event(&room, "m.room.power_levels", "").unwrap().unwrap().content_value()["users"][eve.as_str()],
        json!(100)
    );

    // 4. Origin is not the connected peer (H signs, but the connection is someone else's).
    let honest = build(h_identity, "m.room.message", json!({"msgtype": "m.text", "body": "hi"}), None, &prev);
    let other: OwnedServerName = Identity::from_seed([77; 32]).server_name().clone();
    let (st4, r4) = send_txn(&a, h_identity, &h_name, &other, vec![raw(&honest.object)]).await;
    assert_eq!(st4, 403, "{r4}");
    // ... and a request signed by a key that is not the origin's.
    let (st4b, r4b) = send_txn(&a, &impostor, &h_name, &h_name, vec![raw(&honest.object)]).await;
    assert_eq!(st4b, 401, "{r4b}");
    assert!(a.core.pdu(&honest.event_id).unwrap().is_none());

    // 5. Oversized event.
    let big = json!({
        "type": "m.room.message", "room_id": room, "sender": eve, "origin_server_ts": 1, "depth": depth,
        "prev_events": prev, "auth_events": auth, "content": {"body": "x".repeat(70_000)},
        "hashes": {"sha256": "AAAA"}, "signatures": {}
    });
    let (_, r5) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&big)]).await;
    assert!(r5["pdus"].to_string().contains("65536") || r5["pdus"].to_string().contains("large"), "{r5}");

    // 6. Absurd prev_events list.
    let fake_prevs: Vec<OwnedEventId> =
        (0..500).map(|i| OwnedEventId::try_from(format!("${i:043}")).unwrap()).collect();
    let absurd = build(h_identity, "m.room.message", json!({"msgtype": "m.text", "body": "absurd"}), None, &fake_prevs);
    let (_, r6) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&absurd.object)]).await;
    assert!(r6["pdus"][absurd.event_id.as_str()]["error"].is_string(), "{r6}");
    assert!(a.core.pdu(&absurd.event_id).unwrap().is_none());

    // 7. Oversized transaction.
    let many: Vec<Box<RawValue>> = (0..51).map(|_| raw(&honest.object)).collect();
    let (st7, r7) = send_txn(&a, h_identity, &h_name, &h_name, many).await;
    assert_eq!(st7, 413, "{r7}");

    // A well-behaved event from H still gets in, and A keeps serving its own user.
    let fine = build(h_identity, "m.room.message", json!({"msgtype": "m.text", "body": "legit"}), None, &prev);
    let (_, r8) = send_txn(&a, h_identity, &h_name, &h_name, vec![raw(&fine.object)]).await;
    assert_eq!(r8["pdus"][fine.event_id.as_str()], json!({}), "{r8}");
    let t = PduTemplate {
        kind: TimelineEventType::RoomMessage,
        content: json!({"msgtype": "m.text", "body": "still here"}),
        state_key: None,
        redacts: None,
    };
    let id = a.core.send_event(&alice, None, &room, t, None).await.unwrap();
    assert!(a.core.pdu(&id).unwrap().is_some());
    a.stop().await.unwrap();
    h.stop().await.unwrap();
}
