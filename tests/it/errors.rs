//! Black-box tests of error responses and of the non-client endpoints (server keys, the local
//! `/_outpost/v1` API), with raw HTTP (reqwest) against a real `outpost` process.

use crate::common;

use std::collections::BTreeMap;

use base64::Engine as _;
use common::{enc, from_hex, hex_server_name, Api, Node};
use ruma::{serde::Base64, signatures, CanonicalJsonObject, RoomVersionId};
use serde_json::{json, Value};

/// Registers `user` and returns raw API access as that user, with the user id.
async fn user(node: &Node, name: &str) -> (Api, String) {
    let (user_id, token) = Api::new(node).register(name, &format!("pw-{name}")).await;
    (Api::with_token(node, token), user_id)
}

/// Creates a room as `api`'s user; returns the room id.
async fn create_room(api: &Api, body: Value) -> String {
    let res = api.post("/_matrix/client/v3/createRoom", &body).await.ok();
    res["room_id"].as_str().expect("room_id").to_owned()
}

#[tokio::test]
async fn unknown_endpoint_is_404_m_unrecognized() {
    let node = Node::start().await;
    let anon = Api::new(&node);
    let (alice, _) = user(&node, "alice").await;
    for api in [&anon, &alice] {
        for path in [
            "/_matrix/client/v3/this/does/not/exist",
            "/_matrix/client/v3/rooms/!x/definitely_not_an_endpoint",
            "/not/matrix/at/all",
        ] {
            let res = api.get(path).await;
            res.expect_err(404, "M_UNRECOGNIZED");
        }
        let res = api.post("/_matrix/client/v3/no_such_thing", &json!({})).await;
        res.expect_err(404, "M_UNRECOGNIZED");
    }
}

#[tokio::test]
async fn wrong_method_on_known_path_is_405_m_unrecognized() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    let res = alice.delete("/_matrix/client/v3/sync").await;
    res.expect_err(405, "M_UNRECOGNIZED");
    let res = alice.post("/_matrix/client/v3/account/whoami", &json!({})).await;
    res.expect_err(405, "M_UNRECOGNIZED");
    let res = Api::new(&node).delete("/_matrix/client/versions").await;
    res.expect_err(405, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn body_that_is_not_json_is_400_m_not_json() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    for body in ["this is not json", "{\"name\": "] {
        let res = alice
            .http
            .post(node.url("/_matrix/client/v3/createRoom"))
            .bearer_auth(alice.token.as_deref().unwrap())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("transport");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        let errcode = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["errcode"].as_str().map(str::to_owned));
        assert_eq!((status, errcode.as_deref()), (400, Some("M_NOT_JSON")), "body {body:?}: got {status} {text}");
    }
    let rooms = alice.get("/_matrix/client/v3/joined_rooms").await.ok();
    assert_eq!(rooms["joined_rooms"], json!([]), "a rejected createRoom must not create a room");
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_400_m_bad_json() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    for body in [json!({"name": 5}), json!({"invite": "not-a-list"}), json!([1, 2, 3])] {
        let res = alice.post("/_matrix/client/v3/createRoom", &body).await;
        res.expect_err(400, "M_BAD_JSON");
    }
    let rooms = alice.get("/_matrix/client/v3/joined_rooms").await.ok();
    assert_eq!(rooms["joined_rooms"], json!([]), "a rejected createRoom must not create a room");

    // The same for an event content that is not an object.
    let room = create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room));
    let res = alice.put(&path, &json!("just a string")).await;
    res.expect_err(400, "M_BAD_JSON");
}

#[tokio::test]
async fn event_over_64_kib_is_413_m_too_large_and_not_stored() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    let room = create_room(&alice, json!({"name": "big"})).await;

    let big = "x".repeat(70_000);
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/big1", enc(&room));
    let res = alice.put(&path, &json!({"msgtype": "m.text", "body": big})).await;
    res.expect_err(413, "M_TOO_LARGE");

    // A state event too.
    let path = format!("/_matrix/client/v3/rooms/{}/state/org.example.big/", enc(&room));
    let res = alice.put(&path, &json!({"data": big})).await;
    res.expect_err(413, "M_TOO_LARGE");

    // Just under the limit (the PDU envelope adds roughly a kilobyte) is accepted.
    let fits = "y".repeat(60_000);
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/fits1", enc(&room));
    let ok = alice.put(&path, &json!({"msgtype": "m.text", "body": fits})).await.ok();
    let fits_id = ok["event_id"].as_str().expect("event_id").to_owned();

    let events = common::paginate_all(&alice, &room, "b", None, 50).await;
    assert_eq!(events[0]["event_id"], json!(fits_id), "newest event must be the one that fit");
    for ev in &events {
        let body = ev["content"]["body"].as_str().unwrap_or("");
        assert!(!body.starts_with("xxxx"), "the rejected event was stored: {}", &ev["event_id"]);
        assert_ne!(ev["type"], json!("org.example.big"), "the rejected state event was stored");
    }
}

#[tokio::test]
async fn bad_or_missing_token_is_401() {
    let node = Node::start().await;
    let (alice, alice_id) = user(&node, "alice").await;
    let whoami = "/_matrix/client/v3/account/whoami";

    let res = Api::with_token(&node, "not-a-real-token").get(whoami).await;
    res.expect_err(401, "M_UNKNOWN_TOKEN");
    let res = Api::new(&node).get(whoami).await;
    res.expect_err(401, "M_MISSING_TOKEN");
    let res = Api::new(&node).post("/_matrix/client/v3/createRoom", &json!({})).await;
    res.expect_err(401, "M_MISSING_TOKEN");
    let res = Api::with_token(&node, "x").get("/_matrix/client/v3/sync").await;
    res.expect_err(401, "M_UNKNOWN_TOKEN");

    // The real token works, in the header and (deprecated but still specified) in the query.
    let me = alice.get(whoami).await.ok();
    assert_eq!(me["user_id"], json!(alice_id));
    let token = alice.token.clone().unwrap();
    let res = Api::new(&node).get(&format!("{whoami}?access_token={}", enc(&token))).await.ok();
    assert_eq!(res["user_id"], json!(alice_id));
}

#[tokio::test]
async fn unknown_query_parameters_are_ignored() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    let res = alice.get("/_matrix/client/v3/sync?foo=bar&timeout=0").await.ok();
    assert!(res["next_batch"].is_string(), "sync must answer with next_batch: {res}");
    let res = Api::new(&node).get("/_matrix/client/versions?foo=bar").await.ok();
    assert!(res["versions"].is_array());
    let res = alice.get("/_matrix/client/v3/account/whoami?x=1&y=").await.ok();
    assert!(res["user_id"].is_string());
}

#[tokio::test]
async fn r0_paths_are_aliases_of_v3() {
    let node = Node::start().await;
    let (alice, alice_id) = user(&node, "alice").await;
    let res = alice.get("/_matrix/client/r0/account/whoami").await.ok();
    assert_eq!(res["user_id"], json!(alice_id));
    let res = alice.post("/_matrix/client/r0/createRoom", &json!({"name": "old client"})).await.ok();
    let room = res["room_id"].as_str().expect("room_id");
    let path = format!("/_matrix/client/r0/rooms/{}/send/m.room.message/r0txn", enc(room));
    let sent = alice.put(&path, &json!({"msgtype": "m.text", "body": "via r0"})).await.ok();
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(sent["event_id"].as_str().unwrap()));
    let ev = alice.get(&path).await.ok();
    assert_eq!(ev["content"]["body"], json!("via r0"));
}

/// The server signing key, as published, must be the server name itself.
#[tokio::test]
async fn server_key_is_the_server_name() {
    let node = Node::start().await;
    let (_, alice_id) = user(&node, "alice").await;
    let server = hex_server_name(&alice_id);

    let keys = Api::new(&node).get("/_matrix/key/v2/server").await.ok();
    assert_eq!(keys["server_name"], json!(server), "key response: {keys}");
    let key = keys["verify_keys"]["ed25519:p2p"]["key"]
        .as_str()
        .unwrap_or_else(|| panic!("verify_keys.ed25519:p2p.key missing: {keys}"));
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(key)
        .unwrap_or_else(|e| panic!("key {key:?} is not unpadded base64: {e}"));
    assert_eq!(bytes, from_hex(&server), "the ed25519 key must be the 32 bytes of the server name");
    assert!(keys["valid_until_ts"].as_u64().is_some(), "valid_until_ts missing: {keys}");

    // The response is signed by that very key.
    let object: CanonicalJsonObject = serde_json::from_value(keys.clone()).expect("canonical JSON");
    let key_map = BTreeMap::from([(
        server.clone(),
        BTreeMap::from([("ed25519:p2p".to_owned(), Base64::parse(key).expect("base64"))]),
    )]);
    signatures::verify_json(&key_map, &object).expect("key response must carry a valid self-signature");
}

#[tokio::test]
async fn outpost_status_requires_a_token() {
    let node = Node::start().await;
    let (alice, alice_id) = user(&node, "alice").await;
    Api::new(&node).get("/_outpost/v1/status").await.expect_err(401, "M_MISSING_TOKEN");
    Api::with_token(&node, "bogus").get("/_outpost/v1/status").await.expect_err(401, "M_UNKNOWN_TOKEN");
    let status = alice.get("/_outpost/v1/status").await.ok();
    assert_eq!(status["server_name"], json!(hex_server_name(&alice_id)), "status: {status}");
}

/// `GET /_outpost/v1/pdu/{eventId}` returns the full signed PDU to room members only.
#[tokio::test]
async fn outpost_pdu_is_signed_and_only_for_members() {
    let node = Node::start().await;
    let (alice, alice_id) = user(&node, "alice").await;
    let (bob, _) = user(&node, "bob").await;
    let server = hex_server_name(&alice_id);
    let room = create_room(&alice, json!({"name": "pdus"})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/p1", enc(&room));
    let sent = alice.put(&path, &json!({"msgtype": "m.text", "body": "signed"})).await.ok();
    let event_id = sent["event_id"].as_str().unwrap().to_owned();

    let pdu_path = format!("/_outpost/v1/pdu/{}", enc(&event_id));
    let res = alice.get(&pdu_path).await.ok();
    // Accept the PDU itself or wrapped as {"pdu": ...}.
    let pdu = if res.get("signatures").is_some() { res.clone() } else { res["pdu"].clone() };
    let sig = &pdu["signatures"][&server]["ed25519:p2p"];
    assert!(sig.is_string(), "signatures.<server>.ed25519:p2p missing: {res}");
    assert!(pdu["hashes"]["sha256"].is_string(), "hashes.sha256 missing: {res}");
    assert!(pdu["auth_events"].as_array().is_some_and(|a| !a.is_empty()), "auth_events missing: {res}");
    let prev = pdu["prev_events"].as_array().unwrap_or_else(|| panic!("prev_events missing: {res}"));
    assert_eq!(prev.len(), 1, "a single-node room has one forward extremity: {res}");
    assert!(pdu["depth"].as_u64().is_some_and(|d| d > 1), "depth missing: {res}");
    assert_eq!(pdu["content"]["body"], json!("signed"));
    assert_eq!(pdu["room_id"], json!(room));
    assert_eq!(pdu["sender"], json!(alice_id));

    // Signature and content hash verify against the server name, and the reference hash is the
    // event id.
    let mut object: CanonicalJsonObject = serde_json::from_value(pdu.clone()).expect("canonical JSON");
    object.remove("event_id");
    let key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(from_hex(&server));
    let key_map = BTreeMap::from([(
        server.clone(),
        BTreeMap::from([("ed25519:p2p".to_owned(), Base64::parse(key_b64).expect("base64"))]),
    )]);
    let state = alice.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room))).await.ok();
    let create = state.as_array().and_then(|a| a.iter().find(|e| e["type"] == "m.room.create")).expect("create event");
    let version = create["content"]["room_version"].as_str().unwrap_or("1");
    assert_eq!(version, "12", "rooms default to version 12");
    let rules = RoomVersionId::try_from(version).expect("room version").rules().expect("known rules");
    let verified = signatures::verify_event(&key_map, &object, &rules).expect("PDU signature must verify");
    assert_eq!(verified, signatures::Verified::All, "content hash must match");
    let hash = signatures::reference_hash(&object, &rules).expect("reference hash");
    assert_eq!(format!("${hash}"), event_id, "event id must be the reference hash (room v12)");

    // Not for a user outside the room, nor without a token.
    let res = bob.get(&pdu_path).await;
    assert!(
        matches!((res.status, res.errcode()), (403, "M_FORBIDDEN") | (404, "M_NOT_FOUND")),
        "non-member must get 403/404, got {} {}",
        res.status,
        res.text
    );
    assert!(res.body.get("signatures").is_none() && res.body.get("pdu").is_none());
    Api::new(&node).get(&pdu_path).await.expect_err(401, "M_MISSING_TOKEN");
    // Unknown event.
    let res = alice.get("/_outpost/v1/pdu/%24doesnotexist").await;
    res.expect_err(404, "M_NOT_FOUND");
}

/// State events with an empty state key are addressed as `/state/{type}/` (what ruma and
/// matrix-sdk send) or `/state/{type}`; a missing one is 404 `M_NOT_FOUND` (matrix-sdk asks for
/// `m.room.encryption` this way before its first send in every room and fails on anything else).
#[tokio::test]
async fn state_paths_with_empty_state_key() {
    let node = Node::start().await;
    let (alice, _) = user(&node, "alice").await;
    let room = create_room(&alice, json!({"topic": "first"})).await;
    let base = format!("/_matrix/client/v3/rooms/{}/state", enc(&room));

    for suffix in ["/", ""] {
        let res = alice.get(&format!("{base}/m.room.topic{suffix}")).await;
        assert_eq!((res.status, &res.body["topic"]), (200, &json!("first")), "GET m.room.topic{suffix}: {}", res.text);
        let res = alice.get(&format!("{base}/m.room.encryption{suffix}")).await;
        res.expect_err(404, "M_NOT_FOUND");
    }
    let put = alice.put(&format!("{base}/m.room.topic/"), &json!({"topic": "second"})).await.ok();
    assert!(put["event_id"].is_string());
    assert_eq!(alice.get(&format!("{base}/m.room.topic")).await.ok()["topic"], json!("second"));
    let put = alice.put(&format!("{base}/m.room.topic"), &json!({"topic": "third"})).await.ok();
    assert!(put["event_id"].is_string());
    assert_eq!(alice.get(&format!("{base}/m.room.topic/")).await.ok()["topic"], json!("third"));
    // The r0 alias too.
    let r0 = format!("/_matrix/client/r0/rooms/{}/state/m.room.topic/", enc(&room));
    assert_eq!(alice.get(&r0).await.ok()["topic"], json!("third"));
}
