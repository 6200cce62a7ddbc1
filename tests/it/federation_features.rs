//! Two nodes in one process on the in-process network, each with its own clients: typing and
//! receipts (EDUs), profiles, room directories, media, device lists and keys across nodes, and
//! an encrypted conversation between two matrix-sdk clients on different nodes.

use std::{sync::Arc, time::Duration};

use crate::common::{send_text, spawn_sync};

use matrix_sdk::{
    deserialized_responses::TimelineEventKind,
    ruma::{
        api::client::{
            account::register::v3::Request as RegisterRequest,
            room::create_room,
            uiaa::{AuthData, Dummy},
        },
        events::{room::encryption::RoomEncryptionEventContent, InitialStateEvent},
        OwnedEventId, OwnedRoomId, OwnedUserId,
    },
    Client,
};
use outpost::{config::Config, net::local::LocalNetwork, server};
use serde_json::{json, Value};

/// Generous bound for anything that needs a few round trips between nodes.
const WAIT: Duration = Duration::from_secs(60);

async fn node(net: &Arc<LocalNetwork>) -> (server::Node, tempfile::TempDir) {
    node_with(net, |_| {}).await
}

async fn node_with(net: &Arc<LocalNetwork>, tweak: impl FnOnce(&mut Config)) -> (server::Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    tweak(&mut config);
    config.data_dir = dir.path().to_path_buf();
    config.client_addr = "127.0.0.1:0".parse().unwrap();
    config.mesh.enabled = false; // the in-process network carries federation here
    let n = server::start(config).await.unwrap();
    net.attach(n.core.server_name(), n.federation.clone());
    n.core.set_transport(net.transport(n.core.server_name()));
    (n, dir)
}

/// Percent-encodes a path segment.
fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after [`WAIT`].
async fn poll<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A user on one node, over raw HTTP.
#[derive(Clone)]
struct User {
    http: reqwest::Client,
    base: String,
    token: String,
    id: String,
    device: String,
}

impl User {
    async fn register(n: &server::Node, name: &str) -> User {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = n.client_url();
        let r: Value = http
            .post(format!("{base}/_matrix/client/v3/register"))
            .json(&json!({"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        User {
            http,
            base,
            token: r["access_token"].as_str().unwrap().into(),
            id: r["user_id"].as_str().unwrap().into(),
            device: r["device_id"].as_str().unwrap().into(),
        }
    }

    /// Another device of the same user (password login).
    async fn login(&self) -> User {
        let localpart = self.id.trim_start_matches('@').split(':').next().unwrap();
        let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": "pw"});
        let (st, r) = self.call(reqwest::Method::POST, "/_matrix/client/v3/login", body).await;
        assert_eq!(st, 200, "login: {r}");
        User {
            token: r["access_token"].as_str().unwrap().into(),
            device: r["device_id"].as_str().unwrap().into(),
            ..self.clone()
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if !body.is_null() {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Value::Null).await
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let (st, r) = self.call(method.clone(), path, body).await;
        assert_eq!(st, 200, "{method} {path}: {r}");
        r
    }

    async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(s) = since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        self.ok(reqwest::Method::GET, &path, Value::Null).await
    }

    /// Long-polls syncs from `since` until `pred` finds something; returns it.
    async fn sync_until<T>(&self, since: &str, what: &str, pred: impl Fn(&Value) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut since = since.to_owned();
        loop {
            let s = self.sync(Some(&since), 5_000).await;
            if let Some(v) = pred(&s) {
                return v;
            }
            since = s["next_batch"].as_str().unwrap().to_owned();
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        }
    }

    async fn send_text(&self, room: &str, txn: &str, body: &str) -> String {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        let r = self.ok(reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": body})).await;
        r["event_id"].as_str().unwrap().to_owned()
    }

    async fn query_keys(&self, user: &str) -> Value {
        self.ok(reqwest::Method::POST, "/_matrix/client/v3/keys/query", json!({"device_keys": {user: []}})).await
    }
}

fn server_of(user_id: &str) -> &str {
    user_id.split_once(':').unwrap().1
}

/// The ephemeral events of type `kind` of `room` in a sync response.
fn ephemeral(sync: &Value, room: &str, kind: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == kind).cloned().collect())
        .unwrap_or_default()
}

/// Alice (node A) creates a room and invites Bob (node B), who joins; returns once both nodes
/// have both joins.
async fn shared_room(alice: &User, bob: &User, create: Value) -> String {
    let r = alice.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", create).await;
    let room = r["room_id"].as_str().unwrap().to_owned();
    alice
        .ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            json!({"user_id": bob.id}),
        )
        .await;
    poll("the invite", || async { bob.sync(None, 0).await["rooms"]["invite"][&room].is_object().then_some(()) }).await;
    bob.ok(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
    for u in [alice, bob] {
        poll("both joins on both nodes", || async {
            let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room));
            let (st, r) = u.get(&path).await;
            (st == 200 && r["joined"].as_object().is_some_and(|m| m.len() == 2)).then_some(())
        })
        .await;
    }
    room
}

async fn two_nodes() -> (Arc<LocalNetwork>, (server::Node, tempfile::TempDir), (server::Node, tempfile::TempDir)) {
    let net = LocalNetwork::new();
    let a = node(&net).await;
    let b = node(&net).await;
    (net, a, b)
}

// ---------------------------------------------------------------------------------------------
// Typing and receipts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_receipts_cross_nodes() {
    let (_net, (a, _da), (b, _db)) = two_nodes().await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    let room = shared_room(&alice, &bob, json!({"preset": "private_chat"})).await;

    // Alice types on A; Bob's long-polling sync on B wakes with her in `m.typing`.
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice.id));
    alice.ok(reqwest::Method::PUT, &typing_path, json!({"typing": true, "timeout": 30_000})).await;
    let since = bob
        .sync_until(&since, "alice typing at bob", |s| {
            let t = ephemeral(s, &room, "m.typing");
            let typing = t.first()?["content"]["user_ids"].as_array()?.iter().any(|u| u == alice.id.as_str());
            typing.then(|| s["next_batch"].as_str().unwrap().to_owned())
        })
        .await;
    // ... and without her once she stops.
    alice.ok(reqwest::Method::PUT, &typing_path, json!({"typing": false})).await;
    bob.sync_until(&since, "alice stopping at bob", |s| {
        let t = ephemeral(s, &room, "m.typing");
        t.first()?["content"]["user_ids"].as_array()?.is_empty().then_some(())
    })
    .await;

    // Bob types on B; Alice sees it on A.
    let since_a = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let bob_typing = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.id));
    bob.ok(reqwest::Method::PUT, &bob_typing, json!({"typing": true, "timeout": 30_000})).await;
    alice
        .sync_until(&since_a, "bob typing at alice", |s| {
            let t = ephemeral(s, &room, "m.typing");
            t.first()?["content"]["user_ids"].as_array()?.iter().any(|u| u == bob.id.as_str()).then_some(())
        })
        .await;

    // Receipts: Bob reads Alice's message; a private receipt stays on B, the public one reaches A.
    let ev = alice.send_text(&room, "r1", "read me").await;
    poll("the message at bob", || async {
        let (st, _) = bob.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&ev))).await;
        (st == 200).then_some(())
    })
    .await;
    let since_a = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    for kind in ["m.read.private", "m.read"] {
        let path = format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(&room), enc(&ev));
        bob.ok(reqwest::Method::POST, &path, json!({})).await;
    }
    let content = alice
        .sync_until(&since_a, "bob's receipt at alice", |s| {
            let r = ephemeral(s, &room, "m.receipt");
            let c = r.first()?["content"].clone();
            c[&ev]["m.read"].get(&bob.id).is_some().then_some(c)
        })
        .await;
    assert!(content[&ev]["m.read"][&bob.id]["ts"].is_u64(), "{content}");
    assert!(content[&ev].get("m.read.private").is_none(), "private receipts stay home: {content}");

    // And Alice's receipt reaches Bob's initial sync.
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&ev));
    alice.ok(reqwest::Method::POST, &path, json!({})).await;
    poll("alice's receipt at bob", || async {
        let s = bob.sync(None, 0).await;
        let r = ephemeral(&s, &room, "m.receipt");
        r.first()?["content"][&ev]["m.read"].get(&alice.id).map(|_| ())
    })
    .await;

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Profiles and room directories
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_and_room_directory_of_the_other_node() {
    let (net, (a, _da), (b, _db)) = two_nodes().await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;

    // Profiles: asked of the user's own node.
    bob.ok(
        reqwest::Method::PUT,
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.id)),
        json!({"displayname": "Bob on B"}),
    )
    .await;
    let p = alice.ok(reqwest::Method::GET, &format!("/_matrix/client/v3/profile/{}", enc(&bob.id)), Value::Null).await;
    assert_eq!(p["displayname"], "Bob on B", "{p}");
    let p = alice
        .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.id)), Value::Null)
        .await;
    assert_eq!(p, json!({"displayname": "Bob on B"}));
    let nobody = format!("@nobody:{}", server_of(&bob.id));
    let (st, r) = alice.get(&format!("/_matrix/client/v3/profile/{}", enc(&nobody))).await;
    assert_eq!((st, r["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{r}");
    let (st, r) = alice.get(&format!("/_matrix/client/v3/profile/{}/avatar_url", enc(&bob.id))).await;
    assert_eq!((st, r["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "unset field: {r}");

    // Room directory: Alice publishes two rooms on A; Bob lists and searches A's directory.
    let mut rooms = Vec::new();
    for name in ["Town square", "Workshop"] {
        let r = alice
            .ok(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                json!({"preset": "public_chat", "visibility": "public", "name": name, "topic": format!("about {name}")}),
            )
            .await;
        rooms.push(r["room_id"].as_str().unwrap().to_owned());
    }
    let a_name = server_of(&alice.id).to_owned();
    let list =
        bob.ok(reqwest::Method::GET, &format!("/_matrix/client/v3/publicRooms?server={a_name}"), Value::Null).await;
    let ids: Vec<&str> = list["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(rooms.iter().all(|r| ids.contains(&r.as_str())), "{list}");
    assert_eq!(list["total_room_count_estimate"], 2);
    let page = bob
        .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/publicRooms?server={a_name}&limit=1"), Value::Null)
        .await;
    assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
    let next = page["next_batch"].as_str().expect("a second page");
    let page2 = bob
        .ok(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/publicRooms?server={a_name}&limit=1&since={next}"),
            Value::Null,
        )
        .await;
    assert_ne!(page2["chunk"][0]["room_id"], page["chunk"][0]["room_id"]);
    let found = bob
        .ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/publicRooms?server={a_name}"),
            json!({"filter": {"generic_search_term": "workshop"}}),
        )
        .await;
    assert_eq!(found["chunk"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["chunk"][0]["name"], "Workshop");
    assert_eq!(found["chunk"][0]["room_id"], rooms[1].as_str());
    // B's own directory is empty; asking for it by name is local.
    let own = bob
        .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/publicRooms?server={}", server_of(&bob.id)), Value::Null)
        .await;
    assert_eq!(own["chunk"].as_array().unwrap().len(), 0, "{own}");

    // With the link cut, asking A fails instead of hanging.
    net.set_link(a.core.server_name(), b.core.server_name(), false);
    let (st, _) = bob.get(&format!("/_matrix/client/v3/publicRooms?server={a_name}")).await;
    assert_ne!(st, 200);
    let (st, _) = alice.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.id))).await;
    assert_ne!(st, 200);

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Media
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn upload(u: &User, ct: &str, filename: &str, data: Vec<u8>) -> String {
    let r: Value = u
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename={filename}", u.base))
        .bearer_auth(&u.token)
        .header("Content-Type", ct)
        .body(data)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["content_uri"].as_str().unwrap_or_else(|| panic!("upload failed: {r}")).to_owned()
}

async fn get_bytes(u: &User, path: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let r = u.http.get(format!("{}{path}", u.base)).bearer_auth(&u.token).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_uploaded_on_one_node_downloads_on_the_other() {
    let (net, (a, _da), (b, _db)) = two_nodes().await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;

    let data = noise(300_000, 7);
    let mxc = upload(&alice, "application/octet-stream", "blob.bin", data.clone()).await;
    let path = mxc.strip_prefix("mxc://").unwrap();
    assert_eq!(path.split('/').next(), Some(server_of(&alice.id)));
    let (st, h, got) = get_bytes(&bob, &format!("/_matrix/client/v1/media/download/{path}")).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&got));
    assert!(got == data, "downloaded bytes differ ({} vs {} bytes)", got.len(), data.len());
    assert_eq!(h["content-type"], "application/octet-stream");
    assert!(h["content-disposition"].to_str().unwrap().contains("blob.bin"), "{h:?}");

    // A PNG: its thumbnail on B comes from the original fetched from A.
    let img = image::RgbaImage::from_fn(64, 48, |x, y| image::Rgba([x as u8 * 3, y as u8 * 5, 90, 255]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let png_mxc = upload(&alice, "image/png", "pic.png", png.clone()).await;
    let png_path = png_mxc.strip_prefix("mxc://").unwrap().to_owned();
    let (st, h, thumb) =
        get_bytes(&bob, &format!("/_matrix/client/v1/media/thumbnail/{png_path}?width=16&height=16&method=scale"))
            .await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&thumb));
    assert!(h["content-type"].to_str().unwrap().starts_with("image/"), "{h:?}");
    let t = image::load_from_memory(&thumb).expect("thumbnail decodes");
    assert!(t.width() <= 64 && t.height() <= 48);

    // Unknown media on A is 404 at B.
    let (st, _, body) =
        get_bytes(&bob, &format!("/_matrix/client/v1/media/download/{}/nosuchmedia", server_of(&alice.id))).await;
    assert_eq!(st, 404, "{}", String::from_utf8_lossy(&body));

    // Cached on B: with the link cut, both still download, byte-exact (legacy path too).
    net.set_link(a.core.server_name(), b.core.server_name(), false);
    let (st, _, again) = get_bytes(&bob, &format!("/_matrix/client/v1/media/download/{path}")).await;
    assert_eq!(st, 200);
    assert!(again == data, "cached bytes differ");
    let (st, _, again) = get_bytes(&bob, &format!("/_matrix/media/v3/download/{png_path}")).await;
    assert_eq!(st, 200);
    assert!(again == png, "cached png differs");
    // Not cached and unreachable: an error, not a hang.
    let other = upload(&alice, "text/plain", "x.txt", b"never fetched".to_vec()).await;
    let (st, _, body) =
        get_bytes(&bob, &format!("/_matrix/client/v1/media/download/{}", other.strip_prefix("mxc://").unwrap())).await;
    assert_eq!(st, 404, "{}", String::from_utf8_lossy(&body));
    // Back online, it comes.
    net.set_link(a.core.server_name(), b.core.server_name(), true);
    let (st, _, body) =
        get_bytes(&bob, &format!("/_matrix/client/v1/media/download/{}", other.strip_prefix("mxc://").unwrap())).await;
    assert_eq!((st, body.as_slice()), (200, &b"never fetched"[..]));

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Keys and device lists (raw HTTP)
// ---------------------------------------------------------------------------------------------

fn device_keys(user: &str, device: &str, tag: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{device}"): format!("curve-{tag}"), format!("ed25519:{device}"): format!("ed-{tag}")},
        "signatures": {user: {format!("ed25519:{device}"): format!("sig-{tag}")}},
    })
}

async fn upload_device_keys(u: &User, tag: &str) {
    let body = json!({
        "device_keys": device_keys(&u.id, &u.device, tag),
        "one_time_keys": {"signed_curve25519:AAAAAQ": {"key": format!("otk1-{tag}"), "signatures": {}},
                          "signed_curve25519:AAAAAg": {"key": format!("otk2-{tag}"), "signatures": {}}},
    });
    u.ok(reqwest::Method::POST, "/_matrix/client/v3/keys/upload", body).await;
}

fn devices_of(q: &Value, user: &str) -> Vec<String> {
    q["device_keys"][user].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Keys of a user on another node: fetched and cached (`user/devices`), kept current by
/// `m.device_list_update` and `m.signing_key_update` EDUs (checked with the link cut, so the
/// answer must come from the cache), claimed over federation, and reported in
/// `device_lists.changed`; to-device messages cross too; unreachable servers are `failures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_device_lists_and_to_device_across_nodes() {
    let (net, (a, _da), (b, _db)) = two_nodes().await;
    let (an, bn) = (a.core.server_name().to_owned(), b.core.server_name().to_owned());
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    upload_device_keys(&alice, "a1").await;
    upload_device_keys(&bob, "b1").await;

    // Before sharing a room: keys/query goes to B (user/keys/query), nothing is cached.
    let q = alice.query_keys(&bob.id).await;
    assert_eq!(devices_of(&q, &bob.id), vec![bob.device.clone()], "{q}");
    assert_eq!(q["device_keys"][&bob.id][&bob.device]["keys"][format!("curve25519:{}", bob.device)], "curve-b1");
    assert_eq!(q["failures"], json!({}));

    let room = shared_room(&alice, &bob, json!({"preset": "private_chat"})).await;
    let q = alice.query_keys(&bob.id).await;
    assert_eq!(devices_of(&q, &bob.id), vec![bob.device.clone()], "{q}");
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Bob logs in a second device with keys, and gets cross-signing keys: A hears of it by EDU.
    let bob2 = bob.login().await;
    upload_device_keys(&bob2, "b2").await;
    let master = json!({"user_id": bob.id, "usage": ["master"], "keys": {"ed25519:bobmasterkey": "bobmasterkey"}});
    bob.ok(reqwest::Method::POST, "/_matrix/client/v3/keys/device_signing/upload", json!({"master_key": master})).await;
    alice
        .sync_until(&since, "bob in alice's device_lists.changed", |s| {
            s["device_lists"]["changed"].as_array()?.iter().any(|u| u == bob.id.as_str()).then_some(())
        })
        .await;
    poll("the EDUs applied on A", || async {
        let q = alice.query_keys(&bob.id).await;
        (devices_of(&q, &bob.id).len() == 2 && q["master_keys"][&bob.id].is_object()).then_some(())
    })
    .await;

    // Deleting the first device: gone from A's view too.
    let del = format!("/_matrix/client/v3/devices/{}", enc(&bob2.device));
    let (st, r) = bob.call(reqwest::Method::DELETE, &del, json!({})).await;
    assert_eq!(st, 401, "deleting a device needs the password: {r}");
    let auth = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw", "session": r["session"]}});
    bob.ok(reqwest::Method::DELETE, &del, auth).await;
    poll("the deletion applied on A", || async {
        (devices_of(&alice.query_keys(&bob.id).await, &bob.id) == vec![bob.device.clone()]).then_some(())
    })
    .await;

    // With the link cut, A answers from its cache (updated by the EDUs alone).
    net.set_link(&an, &bn, false);
    let q = alice.query_keys(&bob.id).await;
    assert_eq!(devices_of(&q, &bob.id), vec![bob.device.clone()], "{q}");
    assert_eq!(q["master_keys"][&bob.id]["keys"]["ed25519:bobmasterkey"], "bobmasterkey", "{q}");
    assert_eq!(q["failures"], json!({}), "{q}");
    // A user of B that A knows nothing about: B is reported unreachable.
    let carol = format!("@carol:{bn}");
    let q = alice.query_keys(&carol).await;
    assert!(q["failures"].get(bn.as_str()).is_some(), "{q}");
    let claim = json!({"one_time_keys": {bob.id.clone(): {bob.device.clone(): "signed_curve25519"}}});
    let c = alice.ok(reqwest::Method::POST, "/_matrix/client/v3/keys/claim", claim.clone()).await;
    assert!(c["failures"].get(bn.as_str()).is_some(), "{c}");
    net.set_link(&an, &bn, true);

    // One-time keys of a device on B, claimed through A: each handed out once.
    let mut claimed = Vec::new();
    for _ in 0..2 {
        let c = alice.ok(reqwest::Method::POST, "/_matrix/client/v3/keys/claim", claim.clone()).await;
        assert_eq!(c["failures"], json!({}), "{c}");
        let keys = c["one_time_keys"][&bob.id][&bob.device].as_object().cloned().unwrap_or_default();
        assert_eq!(keys.len(), 1, "{c}");
        claimed.push(keys.values().next().unwrap()["key"].as_str().unwrap().to_owned());
    }
    claimed.sort();
    assert_eq!(claimed, vec!["otk1-b1", "otk2-b1"]);

    // To-device: Alice's device sends to Bob's device over federation, once.
    let since_b = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let msg = json!({"messages": {bob.id.clone(): {bob.device.clone(): {"secret": "hello bob"}}}});
    alice.ok(reqwest::Method::PUT, "/_matrix/client/v3/sendToDevice/m.test/t1", msg.clone()).await;
    alice.ok(reqwest::Method::PUT, "/_matrix/client/v3/sendToDevice/m.test/t1", msg).await; // repeated txn
    let events = bob
        .sync_until(&since_b, "the to-device message", |s| {
            let evs = s["to_device"]["events"].as_array()?.clone();
            (!evs.is_empty()).then_some(evs)
        })
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "m.test");
    assert_eq!(events[0]["sender"], alice.id.as_str());
    assert_eq!(events[0]["content"]["secret"], "hello bob");
    let _ = room;

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// B's durable EDU queue for A holds 2 entries; while the link is down Bob makes 4 device-list
/// changes, so updates are dropped. A sees the gap in Bob's stream ids, marks its cached list
/// stale, and fetches it whole on the next query: the device whose updates were lost shows up
/// with its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_device_list_updates_are_repaired_by_a_refetch() {
    let net = LocalNetwork::new();
    let (a, _da) = node(&net).await;
    let (b, _db) = node_with(&net, |c| c.limits.edu_durable_per_destination_max = 2).await;
    let (an, bn) = (a.core.server_name().to_owned(), b.core.server_name().to_owned());
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    upload_device_keys(&bob, "b1").await;
    shared_room(&alice, &bob, json!({"preset": "private_chat"})).await;
    assert_eq!(devices_of(&alice.query_keys(&bob.id).await, &bob.id), vec![bob.device.clone()]);

    net.set_link(&an, &bn, false);
    let bob2 = bob.login().await; // 1: a new device
    upload_device_keys(&bob2, "b2").await; // 2: its keys
    for name in ["first name", "final name"] {
        // 3, 4: renames of the first device
        let path = format!("/_matrix/client/v3/devices/{}", enc(&bob.device));
        bob.ok(reqwest::Method::PUT, &path, json!({"display_name": name})).await;
    }
    assert!(b.core.edu_queue_depth(&an).unwrap() <= 2, "the durable queue is bounded");
    net.set_link(&an, &bn, true);
    b.core.peer_up(&an); // what the mesh does when a peer reconnects

    let q = poll("A to learn of bob's second device", || async {
        let q = alice.query_keys(&bob.id).await;
        (devices_of(&q, &bob.id).len() == 2).then_some(q)
    })
    .await;
    assert_eq!(
        q["device_keys"][&bob.id][&bob2.device]["keys"][format!("curve25519:{}", bob2.device)],
        "curve-b2",
        "{q}"
    );
    poll("the final name at A", || async {
        let q = alice.query_keys(&bob.id).await;
        (q["device_keys"][&bob.id][&bob.device]["unsigned"]["device_display_name"] == "final name").then_some(())
    })
    .await;

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// matrix-sdk: an encrypted conversation across nodes
// ---------------------------------------------------------------------------------------------

async fn sdk_register(n: &server::Node, user: &str) -> Client {
    let client = Client::builder().homeserver_url(n.client_url()).build().await.expect("build matrix-sdk client");
    let mut request = RegisterRequest::new();
    request.username = Some(user.to_owned());
    request.password = Some(format!("{user}-password"));
    let err = client.matrix_auth().register(request.clone()).await.expect_err("UIAA first");
    let info = err.as_uiaa_response().expect("a UIAA 401");
    let mut dummy = Dummy::new();
    dummy.session = info.session.clone();
    request.auth = Some(AuthData::Dummy(dummy));
    client.matrix_auth().register(request).await.expect("register");
    client
}

async fn sdk_login(n: &server::Node, user: &str) -> Client {
    let client = Client::builder().homeserver_url(n.client_url()).build().await.expect("build matrix-sdk client");
    client.matrix_auth().login_username(user, &format!("{user}-password")).send().await.expect("login");
    client
}

async fn assert_decrypts(client: &Client, who: &str, room_id: &OwnedRoomId, event_id: &OwnedEventId, body: &str) {
    poll(&format!("{who} to decrypt {body:?} ({event_id})"), || async {
        let room = client.get_room(room_id)?;
        let ev = room.event(event_id, None).await.ok()?;
        let TimelineEventKind::Decrypted(_) = &ev.kind else { return None };
        let json: Value = serde_json::from_str(ev.raw().json().get()).ok()?;
        assert_eq!(json["content"]["body"], body, "{who}: decrypted body of {event_id}: {json}");
        Some(())
    })
    .await;
}

/// Waits until the server `api_user`'s node has device keys for `client`'s device.
async fn wait_keys_uploaded(api_user: &User, client: &Client) {
    let id = client.user_id().unwrap().to_string();
    let device = client.device_id().unwrap().to_string();
    poll(&format!("device keys of {id}"), || async {
        devices_of(&api_user.query_keys(&id).await, &id).contains(&device).then_some(())
    })
    .await;
}

/// Alice on node A and Bob on node B (matrix-sdk, real Olm/Megolm) talk in an encrypted room,
/// both ways, and both decrypt everything; Bob then logs in a second device on B, Alice's client
/// learns of it (device-list update over federation), and messages reach it both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_conversation_across_two_nodes() {
    let (_net, (a, _da), (b, _db)) = two_nodes().await;
    let alice = sdk_register(&a, "alice").await;
    let bob = sdk_register(&b, "bob").await;
    let alice_id: OwnedUserId = alice.user_id().unwrap().to_owned();
    let bob_id: OwnedUserId = bob.user_id().unwrap().to_owned();
    let alice_raw = User::register(&a, "alice-observer").await;
    let bob_raw = User::register(&b, "bob-observer").await;
    let mut tasks = vec![spawn_sync(&alice), spawn_sync(&bob)];
    wait_keys_uploaded(&alice_raw, &alice).await;
    wait_keys_uploaded(&bob_raw, &bob).await;

    // Cross-signing on both sides; each client sees the other's identity across nodes.
    alice.encryption().bootstrap_cross_signing(None).await.expect("alice's cross-signing");
    bob.encryption().bootstrap_cross_signing(None).await.expect("bob's cross-signing");
    poll("bob to see alice's identity", || async {
        bob.encryption().request_user_identity(&alice_id).await.ok().flatten().map(|_| ())
    })
    .await;
    poll("alice to see bob's identity", || async {
        alice.encryption().request_user_identity(&bob_id).await.ok().flatten().map(|_| ())
    })
    .await;

    // An encrypted room on A; Bob (on B) is invited and joins through A.
    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.invite = vec![bob_id.clone()];
    req.initial_state =
        vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
            .to_raw_any()];
    let alice_room = alice.create_room(req).await.expect("create encrypted room");
    let room_id = alice_room.room_id().to_owned();
    poll("bob's node to have the invite", || async { bob.get_room(&room_id).map(|_| ()) }).await;
    let bob_room = bob.join_room_by_id(&room_id).await.expect("bob joins over federation");
    for (client, who) in [(&alice, "alice"), (&bob, "bob")] {
        poll(&format!("{who} to see the room encrypted with two members"), || async {
            let room = client.get_room(&room_id)?;
            let encrypted = room.latest_encryption_state().await.ok()?.is_encrypted();
            (encrypted && room.joined_members_count() == 2).then_some(())
        })
        .await;
    }

    // Messages both ways; both sides decrypt all of them.
    let mut sent = Vec::new();
    for i in 0..3 {
        let body = format!("alice says {i}");
        sent.push((send_text(&alice_room, &body).await, body));
        let body = format!("bob says {i}");
        sent.push((send_text(&bob_room, &body).await, body));
    }
    for (id, body) in &sent {
        assert_decrypts(&alice, "alice", &room_id, id, body).await;
        assert_decrypts(&bob, "bob", &room_id, id, body).await;
    }

    // Bob's second device on B: Alice's client learns of it and encrypts to it too.
    let bob2 = sdk_login(&b, "bob").await;
    let bob2_device = bob2.device_id().unwrap().to_string();
    tasks.push(spawn_sync(&bob2));
    wait_keys_uploaded(&bob_raw, &bob2).await;
    poll("alice's client to know bob's new device", || async {
        let devices = alice.encryption().get_user_devices(&bob_id).await.ok()?;
        let known = devices.keys().any(|d| d.as_str() == bob2_device);
        known.then_some(())
    })
    .await;
    poll("bob's new device to have the room", || async {
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
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Declining an invite from another node
// ---------------------------------------------------------------------------------------------

/// Bob (node B, never in the room) declines alice's invite: the leave goes through alice's
/// node (make_leave, send_leave v2), which passes it on to carol's node; both see bob out, and
/// the invite is gone from bob's sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declining_an_invite_from_another_node_tells_the_room() {
    let net = LocalNetwork::new();
    let (a, _da) = node(&net).await;
    let (b, _db) = node(&net).await;
    let (c, _dc) = node(&net).await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    let carol = User::register(&c, "carol").await;
    let room = shared_room(&alice, &carol, json!({"preset": "private_chat"})).await;
    alice
        .ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            json!({"user_id": bob.id}),
        )
        .await;
    poll("the invite at bob", || async { bob.sync(None, 0).await["rooms"]["invite"][&room].is_object().then_some(()) })
        .await;
    bob.ok(
        reqwest::Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        json!({"reason": "not for me"}),
    )
    .await;
    for (u, who) in [(&alice, "alice"), (&carol, "carol")] {
        poll(&format!("bob's leave at {who}'s node"), || async {
            let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.id));
            let (st, r) = u.get(&path).await;
            (st == 200 && r["membership"] == "leave" && r["reason"] == "not for me").then_some(())
        })
        .await;
    }
    let s = bob.sync(None, 0).await;
    assert!(s["rooms"]["invite"][&room].is_null(), "the invite is gone: {s}");
    // Declining what is no longer there: 404, nothing else changes.
    let (st, r) =
        bob.call(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    assert!(st == 404 || st == 403, "{st} {r}");
}
