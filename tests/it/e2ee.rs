//! End-to-end encryption against a real `outpost` process: two matrix-sdk clients (real Olm and
//! Megolm via vodozemac) in an encrypted room, a third device joining later; and raw-HTTP tests
//! of one-time keys, to-device messages, device deletion with user-interactive auth, and key
//! backup.

use crate::common::{self, send_text, spawn_sync};

use std::collections::BTreeSet;
use std::time::Duration;

use common::{enc, login, poll_until, register, Api, Node};
use matrix_sdk::{
    deserialized_responses::TimelineEventKind,
    encryption::CrossSigningResetAuthType,
    ruma::{
        api::client::{
            room::create_room,
            uiaa::{AuthData, MatrixUserIdentifier, Password, UserIdentifier},
        },
        events::{room::encryption::RoomEncryptionEventContent, InitialStateEvent},
        OwnedEventId, OwnedRoomId, OwnedUserId,
    },
    Client,
};
use serde_json::{json, Value};

/// Generous bound for anything that needs a few sync round trips.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A raw `/sync` as JSON.
async fn raw_sync(api: &Api, since: Option<&str>, timeout_ms: u64) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    api.get(&path).await.ok()
}

/// `POST /keys/query` for `users` (all devices) as JSON.
async fn query_keys(api: &Api, users: &[&str]) -> Value {
    let device_keys: serde_json::Map<String, Value> = users.iter().map(|u| (u.to_string(), json!([]))).collect();
    api.post("/_matrix/client/v3/keys/query", &json!({"device_keys": device_keys})).await.ok()
}

/// Device ids of `user` that have uploaded device keys.
async fn devices_with_keys(api: &Api, user: &str) -> BTreeSet<String> {
    let res = query_keys(api, &[user]).await;
    res["device_keys"][user].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Password auth data for UIAA.
fn password_auth(user: &str, password: &str, session: Option<String>) -> AuthData {
    let mut p = Password::new(UserIdentifier::Matrix(MatrixUserIdentifier::new(user.to_owned())), password.to_owned());
    p.session = session;
    AuthData::Password(p)
}

/// Waits until `client` has the room and can decrypt `event_id` to the text `body`.
async fn assert_decrypts(client: &Client, who: &str, room_id: &OwnedRoomId, event_id: &OwnedEventId, body: &str) {
    poll_until(WAIT, &format!("{who} to decrypt {body:?} ({event_id})"), || async {
        let room = client.get_room(room_id)?;
        let ev = room.event(event_id, None).await.ok()?;
        let TimelineEventKind::Decrypted(_) = &ev.kind else { return None };
        let json: Value = serde_json::from_str(ev.raw().json().get()).ok()?;
        assert_eq!(json["type"], "m.room.message", "{who}: decrypted type of {event_id}: {json}");
        assert_eq!(json["content"]["body"], body, "{who}: decrypted body of {event_id}: {json}");
        Some(())
    })
    .await;
}

/// Registers `user` over raw HTTP; returns (user id, api with the token, device id).
async fn raw_user(node: &Node, user: &str, password: &str) -> (String, Api, String) {
    let (id, token) = Api::new(node).register(user, password).await;
    let api = Api::with_token(node, token);
    let device = api.get("/_matrix/client/v3/account/whoami").await.ok()["device_id"].as_str().unwrap().to_owned();
    (id, api, device)
}

/// Logs `user` in over raw HTTP; returns (api with the new token, device id).
async fn raw_login(node: &Node, user: &str, password: &str) -> (Api, String) {
    let body =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password});
    let res = Api::new(node).post("/_matrix/client/v3/login", &body).await.ok();
    (Api::with_token(node, res["access_token"].as_str().unwrap()), res["device_id"].as_str().unwrap().to_owned())
}

/// A room created by `creator` with `others` joined, over raw HTTP; returns its id.
async fn raw_room(creator: &Api, others: &[&Api]) -> String {
    let res = creator.post("/_matrix/client/v3/createRoom", &json!({"preset": "public_chat"})).await.ok();
    let room = res["room_id"].as_str().unwrap().to_owned();
    for o in others {
        o.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), &json!({})).await.ok();
    }
    room
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

fn changed(sync: &Value) -> BTreeSet<String> {
    sync["device_lists"]["changed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// matrix-sdk: an encrypted conversation
// ---------------------------------------------------------------------------------------------

/// Alice and Bob (matrix-sdk, real crypto) set up cross-signing, talk in an encrypted room and
/// both decrypt every message; then Bob logs in a second client, Alice's client is told (raw
/// `device_lists.changed`, and the SDK's device list), and messages both ways reach the new
/// device too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_room_two_users_and_a_late_device() {
    let node = Node::start().await;
    let alice = register(&node, "alice", "alice-password").await;
    let bob = register(&node, "bob", "bob-password").await;
    let alice_id: OwnedUserId = alice.user_id().unwrap().to_owned();
    let bob_id: OwnedUserId = bob.user_id().unwrap().to_owned();
    let alice_api = Api::as_client(&node, &alice);
    let mut tasks = vec![spawn_sync(&alice), spawn_sync(&bob)];

    // Both clients upload their device keys from their sync loops.
    for (client, id) in [(&alice, &alice_id), (&bob, &bob_id)] {
        let device = client.device_id().unwrap().to_string();
        poll_until(WAIT, &format!("device keys of {id}"), || async {
            devices_with_keys(&alice_api, id.as_str()).await.contains(&device).then_some(())
        })
        .await;
    }

    // Cross-signing: the first upload needs no password (MSC3967); repeating the same keys
    // neither; replacing them does.
    alice.encryption().bootstrap_cross_signing(None).await.expect("first cross-signing upload without auth");
    alice.encryption().bootstrap_cross_signing(None).await.expect("re-uploading the same keys without auth");
    let handle = alice.encryption().reset_cross_signing().await.expect("reset").expect("a reset needs auth");
    let CrossSigningResetAuthType::Uiaa(uiaa) = handle.auth_type() else { panic!("expected UIAA") };
    assert!(uiaa.flows.iter().any(|f| f.stages.iter().any(|s| s.as_str() == "m.login.password")), "{uiaa:?}");
    let wrong = handle.auth(Some(password_auth("alice", "not-the-password", uiaa.session.clone()))).await;
    assert!(wrong.is_err(), "a wrong password must not reset cross-signing");
    let handle = alice.encryption().reset_cross_signing().await.expect("reset").expect("a reset needs auth");
    let CrossSigningResetAuthType::Uiaa(uiaa) = handle.auth_type() else { panic!("expected UIAA") };
    handle
        .auth(Some(password_auth("alice", "alice-password", uiaa.session.clone())))
        .await
        .expect("cross-signing reset with the password");
    bob.encryption().bootstrap_cross_signing(None).await.expect("bob's cross-signing");

    // The server merged the uploaded signatures: the master key is signed by the device, and
    // the device by the self-signing key.
    let keys = query_keys(&alice_api, &[alice_id.as_str()]).await;
    let master = &keys["master_keys"][alice_id.as_str()];
    let ssk = &keys["self_signing_keys"][alice_id.as_str()];
    let alice_device = alice.device_id().unwrap().to_string();
    assert!(
        master["signatures"][alice_id.as_str()].get(format!("ed25519:{alice_device}")).is_some(),
        "master key lacks the device's signature: {master}"
    );
    let ssk_id = ssk["keys"].as_object().and_then(|k| k.keys().next().cloned()).expect("self-signing key id");
    assert!(
        keys["device_keys"][alice_id.as_str()][&alice_device]["signatures"][alice_id.as_str()].get(&ssk_id).is_some(),
        "device keys lack the self-signing signature: {keys}"
    );
    assert!(keys["user_signing_keys"].get(alice_id.as_str()).is_some(), "own user-signing key is returned: {keys}");
    // Bob's client accepts Alice's cross-signing identity (its signatures check out).
    poll_until(WAIT, "bob to see alice's identity", || async {
        bob.encryption().request_user_identity(&alice_id).await.ok().flatten().map(|_| ())
    })
    .await;
    let bob_view = query_keys(&Api::as_client(&node, &bob), &[alice_id.as_str()]).await;
    assert!(bob_view["user_signing_keys"].get(alice_id.as_str()).is_none(), "others' user-signing keys are private");

    // An encrypted room.
    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.invite = vec![bob_id.clone()];
    req.initial_state =
        vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
            .to_raw_any()];
    let alice_room = alice.create_room(req).await.expect("create encrypted room");
    let room_id = alice_room.room_id().to_owned();
    let bob_room = bob.join_room_by_id(&room_id).await.expect("bob joins");
    for (client, who) in [(&alice, "alice"), (&bob, "bob")] {
        poll_until(WAIT, &format!("{who} to see the room encrypted with two members"), || async {
            let room = client.get_room(&room_id)?;
            let encrypted = room.latest_encryption_state().await.ok()?.is_encrypted();
            (encrypted && room.joined_members_count() == 2).then_some(())
        })
        .await;
    }

    // Several messages both ways; both sides decrypt all of them.
    let mut sent = Vec::new();
    for i in 0..3 {
        let body = format!("alice says {i}");
        sent.push((send_text(&alice_room, &body).await, body));
        let body = format!("bob says {i}");
        sent.push((send_text(&bob_room, &body).await, body));
    }
    let raw = alice_api
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id.as_str()), enc(sent[0].0.as_str())))
        .await
        .ok();
    assert_eq!(raw["type"], "m.room.encrypted", "the server only ever sees ciphertext: {raw}");
    for (id, body) in &sent {
        assert_decrypts(&alice, "alice", &room_id, id, body).await;
        assert_decrypts(&bob, "bob", &room_id, id, body).await;
    }

    // A raw observer on a separate device of Alice's, to look at `device_lists` itself.
    let (observer, _) = raw_login(&node, "alice", "alice-password").await;
    let before = next_batch(&raw_sync(&observer, None, 0).await);
    let from_token = before.clone();

    // Bob logs in a third client (his second device).
    let bob2 = login(&node, "bob", "bob-password").await;
    let bob2_device = bob2.device_id().unwrap().to_string();
    tasks.push(spawn_sync(&bob2));
    poll_until(WAIT, "device keys of bob's new device", || async {
        devices_with_keys(&alice_api, bob_id.as_str()).await.contains(&bob2_device).then_some(())
    })
    .await;

    // The raw sync reports Bob's device list as changed...
    let mut since = before;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let res = raw_sync(&observer, Some(&since), 5_000).await;
        since = next_batch(&res);
        if changed(&res).contains(bob_id.as_str()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bob never appeared in alice's device_lists.changed");
    }
    // ... and so does /keys/changes between the same tokens.
    let to_token = since.clone();
    let changes = alice_api
        .get(&format!("/_matrix/client/v3/keys/changes?from={}&to={}", enc(&from_token), enc(&to_token)))
        .await
        .ok();
    assert!(changes["changed"].as_array().unwrap().iter().any(|u| u == bob_id.as_str()), "{changes}");

    // Alice's SDK learns of the new device through its own sync.
    poll_until(WAIT, "alice's client to know bob's new device", || async {
        let devices = alice.encryption().get_user_devices(&bob_id).await.ok()?;
        let known = devices.keys().any(|d| d.as_str() == bob2_device);
        known.then_some(())
    })
    .await;

    // New messages reach the new device too, both ways.
    poll_until(WAIT, "bob's new device to have the room", || async {
        let room = bob2.get_room(&room_id)?;
        room.latest_encryption_state().await.ok()?.is_encrypted().then_some(())
    })
    .await;
    let late = send_text(&alice_room, "hello to all of bob's devices").await;
    assert_decrypts(&bob2, "bob's new device", &room_id, &late, "hello to all of bob's devices").await;
    assert_decrypts(&bob, "bob", &room_id, &late, "hello to all of bob's devices").await;
    let bob2_room = bob2.get_room(&room_id).expect("bob2 has the room");
    let reply = send_text(&bob2_room, "from bob's new device").await;
    assert_decrypts(&alice, "alice", &room_id, &reply, "from bob's new device").await;

    for t in tasks {
        t.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// One-time keys are counted, handed out once each (also under concurrent claims), then the
/// fallback key is handed out and reported used.
#[tokio::test]
async fn one_time_keys_are_claimed_once_then_the_fallback_key() {
    let node = Node::start().await;
    let (alice, alice_api, alice_dev) = raw_user(&node, "alice", "pw-alice").await;
    let (_, bob_api, _) = raw_user(&node, "bob", "pw-bob").await;

    let otk = |n: u32| json!({"key": format!("otk{n}"), "signatures": {}});
    let fallback = json!({"key": "fb1", "fallback": true, "signatures": {}});
    let res = alice_api
        .post(
            "/_matrix/client/v3/keys/upload",
            &json!({
                "one_time_keys": {"signed_curve25519:AAAAAA": otk(1), "signed_curve25519:AAAAAB": otk(2),
                                  "signed_curve25519:AAAAAC": otk(3)},
                "fallback_keys": {"signed_curve25519:FB": fallback},
            }),
        )
        .await
        .ok();
    assert_eq!(res["one_time_key_counts"]["signed_curve25519"], 3, "{res}");
    // Re-uploading the same key is fine; the same id with other content is not.
    let again = alice_api
        .post("/_matrix/client/v3/keys/upload", &json!({"one_time_keys": {"signed_curve25519:AAAAAA": otk(1)}}))
        .await
        .ok();
    assert_eq!(again["one_time_key_counts"]["signed_curve25519"], 3, "{again}");
    let clash = alice_api
        .post("/_matrix/client/v3/keys/upload", &json!({"one_time_keys": {"signed_curve25519:AAAAAA": otk(9)}}))
        .await;
    assert_eq!(clash.status, 400, "{}", clash.text);

    let s = raw_sync(&alice_api, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 3, "{s}");
    assert_eq!(s["device_unused_fallback_key_types"], json!(["signed_curve25519"]), "{s}");

    let claim_body = json!({"one_time_keys": {alice.clone(): {alice_dev.clone(): "signed_curve25519"}}});
    let claim = || async {
        let res = bob_api.post("/_matrix/client/v3/keys/claim", &claim_body).await.ok();
        let keys = res["one_time_keys"][&alice][&alice_dev].as_object().cloned().unwrap_or_default();
        assert_eq!(keys.len(), 1, "one key per device: {res}");
        let (id, key) = keys.into_iter().next().unwrap();
        (id, key["key"].as_str().unwrap().to_owned())
    };
    // One claim, then two at once: three distinct one-time keys.
    let first = claim().await;
    let (second, third) = tokio::join!(claim(), claim());
    let got: BTreeSet<String> = [&first, &second, &third].iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(got, BTreeSet::from(["otk1".into(), "otk2".into(), "otk3".into()]), "each key handed out once");
    let s = raw_sync(&alice_api, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 0, "{s}");

    // None left: the fallback key, every time, and it is marked used.
    for _ in 0..2 {
        let (id, key) = claim().await;
        assert_eq!((id.as_str(), key.as_str()), ("signed_curve25519:FB", "fb1"));
    }
    let s = raw_sync(&alice_api, None, 0).await;
    assert_eq!(s["device_unused_fallback_key_types"], json!([]), "fallback key is used: {s}");
    // A new fallback key is unused again.
    alice_api
        .post(
            "/_matrix/client/v3/keys/upload",
            &json!({"fallback_keys": {"signed_curve25519:FB2": {"key": "fb2", "fallback": true, "signatures": {}}}}),
        )
        .await
        .ok();
    let s = raw_sync(&alice_api, None, 0).await;
    assert_eq!(s["device_unused_fallback_key_types"], json!(["signed_curve25519"]), "{s}");
    // A device that never uploaded keys gets nothing.
    let none = bob_api
        .post(
            "/_matrix/client/v3/keys/claim",
            &json!({"one_time_keys": {alice.clone(): {"NOSUCHDEVICE": "signed_curve25519"}}}),
        )
        .await
        .ok();
    assert_eq!(none["one_time_keys"], json!({}), "{none}");
}

/// To-device messages arrive in order in the next sync, wake a waiting long-poll, and are gone
/// once a later sync acknowledged them.
#[tokio::test]
async fn to_device_messages_are_delivered_once() {
    let node = Node::start().await;
    let (_, alice_api, _) = raw_user(&node, "alice", "pw-alice").await;
    let (bob, bob_api, bob_dev) = raw_user(&node, "bob", "pw-bob").await;
    let since0 = next_batch(&raw_sync(&bob_api, None, 0).await);

    let send = |txn: &str, target: &str, n: u32| {
        let path = format!("/_matrix/client/v3/sendToDevice/org.example.test/{txn}");
        let body = json!({"messages": {bob.clone(): {target: {"n": n}}}});
        let api = alice_api.clone();
        async move { api.put(&path, &body).await.ok() }
    };
    send("t1", &bob_dev, 1).await;
    send("t2", &bob_dev, 2).await;
    send("t3", "*", 3).await;

    let s1 = raw_sync(&bob_api, Some(&since0), 0).await;
    let events = to_device_events(&s1);
    let ns: Vec<u64> = events.iter().map(|e| e["content"]["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, vec![1, 2, 3], "in order: {s1}");
    assert!(events.iter().all(|e| e["type"] == "org.example.test" && e["sender"].as_str().is_some()), "{s1}");

    // Not acknowledged yet: the same `since` sees them again (a lost response loses nothing).
    let retry = raw_sync(&bob_api, Some(&since0), 0).await;
    assert_eq!(to_device_events(&retry).len(), 3, "{retry}");

    // A sync from the later token acknowledges them: gone, even for the old token.
    let s2 = raw_sync(&bob_api, Some(&next_batch(&s1)), 0).await;
    assert!(to_device_events(&s2).is_empty(), "{s2}");
    let old = raw_sync(&bob_api, Some(&since0), 0).await;
    assert!(to_device_events(&old).is_empty(), "acknowledged messages are deleted: {old}");

    // A waiting long-poll wakes up for a new message.
    let waiting = {
        let api = bob_api.clone();
        let since = next_batch(&s2);
        tokio::spawn(async move { raw_sync(&api, Some(&since), 25_000).await })
    };
    // Only send once the long-poll is (very likely) waiting; correctness does not depend on it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    send("t4", &bob_dev, 4).await;
    let woke = waiting.await.unwrap();
    let got: Vec<u64> = to_device_events(&woke).iter().filter_map(|e| e["content"]["n"].as_u64()).collect();
    assert_eq!(got, vec![4], "{woke}");

    // Messages to unknown devices are dropped, not an error.
    send("t5", "NOSUCHDEVICE", 5).await;
}

/// A repeated `sendToDevice` transaction id is delivered once.
#[tokio::test]
async fn send_to_device_is_idempotent_per_transaction_id() {
    let node = Node::start().await;
    let (_, alice_api, _) = raw_user(&node, "alice", "pw-alice").await;
    let (bob, bob_api, bob_dev) = raw_user(&node, "bob", "pw-bob").await;
    let since0 = next_batch(&raw_sync(&bob_api, None, 0).await);
    let body = json!({"messages": {bob.clone(): {bob_dev.clone(): {"hello": "once"}}}});
    for _ in 0..3 {
        alice_api.put("/_matrix/client/v3/sendToDevice/m.test/same-txn", &body).await.ok();
    }
    // The same id from another of Alice's devices is a different transaction.
    let (alice2, _) = raw_login(&node, "alice", "pw-alice").await;
    alice2.put("/_matrix/client/v3/sendToDevice/m.test/same-txn", &body).await.ok();
    let s = raw_sync(&bob_api, Some(&since0), 0).await;
    assert_eq!(to_device_events(&s).len(), 2, "one per sending device: {s}");
}

/// Devices can be listed and renamed; deleting one needs the password (401 with the flow
/// first), and then its token, keys and one-time keys are gone and others see the change.
#[tokio::test]
async fn deleting_a_device_needs_the_password_and_kills_its_token() {
    let node = Node::start().await;
    let (alice, alice_api, alice_dev) = raw_user(&node, "alice", "pw-alice").await;
    let (_, bob_api, _) = raw_user(&node, "bob", "pw-bob").await;
    raw_room(&alice_api, &[&bob_api]).await;
    let (phone, phone_dev) = raw_login(&node, "alice", "pw-alice").await;
    let device_keys = json!({
        "user_id": alice, "device_id": phone_dev, "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {format!("curve25519:{phone_dev}"): "c", format!("ed25519:{phone_dev}"): "e"}, "signatures": {},
    });
    phone
        .post(
            "/_matrix/client/v3/keys/upload",
            &json!({"device_keys": device_keys, "one_time_keys": {"signed_curve25519:A": {"key": "k", "signatures": {}}}}),
        )
        .await
        .ok();
    assert!(devices_with_keys(&bob_api, &alice).await.contains(&phone_dev));

    // Listing and renaming.
    let list = alice_api.get("/_matrix/client/v3/devices").await.ok();
    let ids: BTreeSet<&str> =
        list["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([alice_dev.as_str(), phone_dev.as_str()]), "{list}");
    assert!(list["devices"].as_array().unwrap().iter().all(|d| d["last_seen_ts"].as_u64().unwrap_or(0) > 0), "{list}");
    let path = format!("/_matrix/client/v3/devices/{}", enc(&phone_dev));
    alice_api.put(&path, &json!({"display_name": "Alice's phone"})).await.ok();
    assert_eq!(alice_api.get(&path).await.ok()["display_name"], "Alice's phone");
    let q = query_keys(&bob_api, &[&alice]).await;
    assert_eq!(q["device_keys"][&alice][&phone_dev]["unsigned"]["device_display_name"], "Alice's phone", "{q}");
    alice_api.get("/_matrix/client/v3/devices/NOSUCHDEVICE").await.expect_err(404, "M_NOT_FOUND");

    let bob_since = next_batch(&raw_sync(&bob_api, None, 0).await);

    // Without auth: the challenge. With a wrong password: refused. With the password: done.
    let first = alice_api.request(reqwest::Method::DELETE, &path, Some(&json!({}))).await;
    assert_eq!(first.status, 401, "{}", first.text);
    assert!(first.body["flows"].to_string().contains("m.login.password"), "{}", first.text);
    let session = first.body["session"].as_str().expect("session").to_owned();
    let auth = |password: &str| {
        json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                        "password": password, "session": session}})
    };
    let wrong = alice_api.request(reqwest::Method::DELETE, &path, Some(&auth("nope"))).await;
    wrong.expect_err(401, "M_FORBIDDEN");
    assert!(phone.get("/_matrix/client/v3/account/whoami").await.status == 200, "still alive after a wrong password");
    alice_api.request(reqwest::Method::DELETE, &path, Some(&auth("pw-alice"))).await.ok();

    phone.get("/_matrix/client/v3/account/whoami").await.expect_err(401, "M_UNKNOWN_TOKEN");
    assert!(!devices_with_keys(&bob_api, &alice).await.contains(&phone_dev), "device keys deleted");
    let claim = bob_api
        .post(
            "/_matrix/client/v3/keys/claim",
            &json!({"one_time_keys": {alice.clone(): {phone_dev.clone(): "signed_curve25519"}}}),
        )
        .await
        .ok();
    assert_eq!(claim["one_time_keys"], json!({}), "one-time keys deleted: {claim}");
    let s = raw_sync(&bob_api, Some(&bob_since), 10_000).await;
    assert!(changed(&s).contains(&alice), "bob is told alice's devices changed: {s}");

    // POST /delete_devices, same auth.
    let (tablet, tablet_dev) = raw_login(&node, "alice", "pw-alice").await;
    let body = json!({"devices": [tablet_dev]});
    let challenge = alice_api.post("/_matrix/client/v3/delete_devices", &body).await;
    assert_eq!(challenge.status, 401, "{}", challenge.text);
    let mut body = body;
    body["auth"] = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice},
                          "password": "pw-alice", "session": challenge.body["session"]});
    alice_api.post("/_matrix/client/v3/delete_devices", &body).await.ok();
    tablet.get("/_matrix/client/v3/account/whoami").await.expect_err(401, "M_UNKNOWN_TOKEN");
    let list = alice_api.get("/_matrix/client/v3/devices").await.ok();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");
}

/// Key backup: versions, keys per session with the spec's replacement rule, etag and count,
/// wrong-version writes, deletion.
#[tokio::test]
async fn key_backup_roundtrip() {
    let node = Node::start().await;
    let (_, api, _) = raw_user(&node, "alice", "pw-alice").await;
    api.get("/_matrix/client/v3/room_keys/version").await.expect_err(404, "M_NOT_FOUND");

    let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
    let create = json!({"algorithm": algorithm, "auth_data": {"public_key": "pk1", "signatures": {}}});
    let v1 =
        api.post("/_matrix/client/v3/room_keys/version", &create).await.ok()["version"].as_str().unwrap().to_owned();
    let info = api.get("/_matrix/client/v3/room_keys/version").await.ok();
    assert_eq!(
        (info["version"].as_str(), info["count"].as_u64(), info["algorithm"].as_str()),
        (Some(v1.as_str()), Some(0), Some(algorithm))
    );
    let etag0 = info["etag"].as_str().unwrap().to_owned();

    let room = "!room:example.org";
    let key = |index: u64, verified: bool, marker: &str| {
        json!({"first_message_index": index, "forwarded_count": 0, "is_verified": verified,
               "session_data": {"ephemeral": marker, "ciphertext": "c", "mac": "m"}})
    };
    let session_path = |v: &str, s: &str| format!("/_matrix/client/v3/room_keys/keys/{}/{s}?version={v}", enc(room));
    let put = api.put(&session_path(&v1, "sess1"), &key(5, false, "first")).await.ok();
    assert_eq!(put["count"], 1, "{put}");
    assert_ne!(put["etag"].as_str().unwrap(), etag0, "etag changes with the keys");
    let all = json!({"rooms": {room: {"sessions": {"sess2": key(0, false, "s2")}}}});
    let put = api.put(&format!("/_matrix/client/v3/room_keys/keys?version={v1}"), &all).await.ok();
    assert_eq!(put["count"], 2, "{put}");

    // A worse copy does not replace the stored one; a better one does.
    let etag = put["etag"].as_str().unwrap().to_owned();
    let put = api.put(&session_path(&v1, "sess1"), &key(9, false, "worse")).await.ok();
    assert_eq!(put["etag"].as_str().unwrap(), etag, "nothing changed: {put}");
    let got = api.get(&session_path(&v1, "sess1")).await.ok();
    assert_eq!(got["session_data"]["ephemeral"], "first", "{got}");
    api.put(&session_path(&v1, "sess1"), &key(9, true, "verified")).await.ok();
    let got = api.get(&session_path(&v1, "sess1")).await.ok();
    assert_eq!(got["session_data"]["ephemeral"], "verified", "verified beats unverified: {got}");

    let everything = api.get(&format!("/_matrix/client/v3/room_keys/keys?version={v1}")).await.ok();
    let sessions = everything["rooms"][room]["sessions"].as_object().unwrap();
    assert_eq!(sessions.keys().collect::<Vec<_>>(), vec!["sess1", "sess2"], "{everything}");
    let in_room = api.get(&format!("/_matrix/client/v3/room_keys/keys/{}?version={v1}", enc(room))).await.ok();
    assert_eq!(in_room["sessions"].as_object().unwrap().len(), 2, "{in_room}");
    api.get(&session_path(&v1, "nope")).await.expect_err(404, "M_NOT_FOUND");

    // Update auth_data; the algorithm cannot change.
    let upd =
        json!({"algorithm": algorithm, "auth_data": {"public_key": "pk1", "signatures": {"x": {}}}, "version": v1});
    api.put(&format!("/_matrix/client/v3/room_keys/version/{v1}"), &upd).await.ok();
    let info = api.get(&format!("/_matrix/client/v3/room_keys/version/{v1}")).await.ok();
    assert_eq!(info["auth_data"]["signatures"], json!({"x": {}}), "{info}");
    assert_eq!(info["count"], 2, "{info}");
    let bad = json!({"algorithm": "other", "auth_data": {}});
    api.put(&format!("/_matrix/client/v3/room_keys/version/{v1}"), &bad).await.expect_err(400, "M_INVALID_PARAM");

    // A new version becomes current; writes to the old one are refused with the current one.
    let v2 =
        api.post("/_matrix/client/v3/room_keys/version", &create).await.ok()["version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    let wrong = api.put(&session_path(&v1, "sess3"), &key(0, false, "x")).await;
    wrong.expect_err(403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong.body["current_version"], v2.as_str(), "{}", wrong.text);
    // Old versions stay readable.
    assert_eq!(api.get(&session_path(&v1, "sess1")).await.ok()["session_data"]["ephemeral"], "verified");

    // Deleting keys and versions.
    let del = api.delete(&session_path(&v1, "sess2")).await.ok();
    assert_eq!(del["count"], 1, "{del}");
    let del = api.delete(&format!("/_matrix/client/v3/room_keys/keys?version={v1}")).await.ok();
    assert_eq!(del["count"], 0, "{del}");
    api.delete(&format!("/_matrix/client/v3/room_keys/version/{v2}")).await.ok();
    api.get(&format!("/_matrix/client/v3/room_keys/version/{v2}")).await.expect_err(404, "M_NOT_FOUND");
    assert_eq!(api.get("/_matrix/client/v3/room_keys/version").await.ok()["version"], v1.as_str(), "back to v1");
    let v3 =
        api.post("/_matrix/client/v3/room_keys/version", &create).await.ok()["version"].as_str().unwrap().to_owned();
    assert!(v3 != v1 && v3 != v2, "version numbers are never reused: {v1} {v2} {v3}");
}
