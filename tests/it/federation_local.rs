//! Two nodes in one process on the in-process network: invite, join and messages both ways
//! through the real federation code (signed requests, receipt checks, durable queues).

use crate::common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use outpost::{net::local::LocalNetwork, server};
use serde_json::{json, Value};

async fn node(net: &Arc<LocalNetwork>) -> (server::Node, tempfile::TempDir) {
    common::inproc_node(net).await
}

struct User {
    http: reqwest::Client,
    base: String,
    token: String,
    id: String,
}

impl User {
    async fn register(n: &server::Node, name: &str) -> User {
        let http = reqwest::Client::new();
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
        }
    }
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    async fn sync(&self, since: Option<&str>) -> Value {
        let q = since.map(|s| format!("?since={s}&timeout=0")).unwrap_or_default();
        self.call(reqwest::Method::GET, &format!("/_matrix/client/v3/sync{q}"), Value::Null).await.1
    }
    /// Poll sync until `pred` holds (bounded).
    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.sync(None).await;
            if pred(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A room alice creates, invites bob to, and bob joins; returned once alice's node has the join.
async fn alice_invites_bob(alice: &User, bob: &User) -> String {
    let (_, r) = alice.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", json!({})).await;
    let room = r["room_id"].as_str().unwrap().to_owned();
    let (st, r) = alice
        .call(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{room}/invite"), json!({"user_id": bob.id}))
        .await;
    assert_eq!(st, 200, "invite: {r}");
    bob.wait_for("the invite", |s| s["rooms"]["invite"][&room].is_object()).await;
    let (st, r) = bob.call(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{room}"), json!({})).await;
    assert_eq!(st, 200, "join: {r}");
    alice.wait_for("bob's join", |s| s["rooms"]["join"][&room]["timeline"].is_object()).await;
    room
}

fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["content"]["body"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_join_and_talk_across_two_nodes() {
    let net = LocalNetwork::new();
    let (a, _da) = node(&net).await;
    let (b, _db) = node(&net).await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;

    let (st, r) = alice.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", json!({"name": "mesh"})).await;
    assert_eq!(st, 200, "{r}");
    let room = r["room_id"].as_str().unwrap().to_owned();
    let (st, r) = alice
        .call(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{room}/invite"), json!({"user_id": bob.id}))
        .await;
    assert_eq!(st, 200, "invite: {r}");

    bob.wait_for("the invite", |s| s["rooms"]["invite"][&room].is_object()).await;
    let (st, r) = bob.call(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{room}"), json!({})).await;
    assert_eq!(st, 200, "join: {r}");

    // Alice's node learns of the join (send_join) and both see each other.
    alice
        .wait_for("bob's join", |s| {
            s["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .is_some_and(|evs| evs.iter().any(|e| e["state_key"] == bob.id && e["content"]["membership"] == "join"))
        })
        .await;

    for i in 0..5 {
        let (st, r) = alice
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/a{i}"),
                json!({"msgtype": "m.text", "body": format!("from alice {i}")}),
            )
            .await;
        assert_eq!(st, 200, "{r}");
    }
    let s = bob.wait_for("alice's messages", |s| timeline_bodies(s, &room).len() >= 5).await;
    let bodies = timeline_bodies(&s, &room);
    assert_eq!(bodies, (0..5).map(|i| format!("from alice {i}")).collect::<Vec<_>>());

    let (st, _) = bob
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/b1"),
            json!({"msgtype": "m.text", "body": "hi alice"}),
        )
        .await;
    assert_eq!(st, 200);
    alice.wait_for("bob's reply", |s| timeline_bodies(s, &room).contains(&"hi alice".to_owned())).await;

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A transaction that failed is sent again as it was; what was queued while it waited — here
/// a to-device message between two room messages — must follow it. (The second transaction in
/// flight used to carry only PDUs and the to-device message stayed queued until something
/// else was sent: a room key lost this way left a message undecryptable.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_device_message_queued_behind_a_failed_transaction_arrives() {
    let net = LocalNetwork::new();
    let (lose, lost) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (l1, l2) = (lose.clone(), lost.clone());
    let (a, _da) = common::inproc_node_with(&net, move |inner| {
        Arc::new(common::LosesRequests { inner, path: "/_matrix/federation/v1/send/", lose: l1, lost: l2 })
    })
    .await;
    let (b, _db) = node(&net).await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    let room = alice_invites_bob(&alice, &bob).await;
    let send = |i: u32| {
        let (alice, path) = (&alice, format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/m{i}"));
        async move {
            alice.call(reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": format!("message {i}")})).await
        }
    };

    // The transaction carrying message 0 is lost: A backs off (at least a second).
    lose.store(1, Ordering::SeqCst);
    assert_eq!(send(0).await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while lost.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the transaction was never sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // While A waits: a to-device message for bob, then another room message.
    let body = json!({"messages": {bob.id.clone(): {"*": {"note": "to-device while waiting"}}}});
    let (st, r) = alice.call(reqwest::Method::PUT, "/_matrix/client/v3/sendToDevice/org.example.note/t1", body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(send(1).await.0, 200);

    let s = bob.wait_for("both messages", |s| timeline_bodies(s, &room).len() >= 2).await;
    assert_eq!(timeline_bodies(&s, &room), ["message 0", "message 1"]);
    bob.wait_for("the to-device message", |s| {
        s["to_device"]["events"]
            .as_array()
            .is_some_and(|evs| evs.iter().any(|e| e["content"]["note"] == "to-device while waiting"))
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Holds the first `/send` once armed until the test releases it, then fails it; on the next
/// `/send` it notes A's failure count for that destination.
struct HoldsFirstTransaction {
    inner: Arc<dyn outpost::core::federation::Transport>,
    core: Arc<std::sync::OnceLock<Arc<outpost::core::Core>>>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    attempts: AtomicUsize,
    held: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    failures_at_retry: Arc<std::sync::Mutex<Option<u32>>>,
}

impl outpost::core::federation::Transport for HoldsFirstTransaction {
    fn send(
        &self,
        dest: ruma::OwnedServerName,
        req: http::Request<bytes::Bytes>,
    ) -> outpost::core::federation::BoxFuture<
        'static,
        Result<http::Response<bytes::Bytes>, outpost::core::federation::TransportError>,
    > {
        if !self.armed.load(Ordering::SeqCst) || !req.uri().path().starts_with("/_matrix/federation/v1/send/") {
            return self.inner.send(dest, req);
        }
        if self.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
            let (held, release) = (self.held.clone(), self.release.clone());
            return Box::pin(async move {
                held.notify_one();
                release.notified().await;
                Err(outpost::core::federation::TransportError::Failed(dest, "old connection closed".into()))
            });
        }
        let mut seen = self.failures_at_retry.lock().unwrap();
        if seen.is_none() {
            let core = self.core.get().expect("core set");
            *seen = core.destinations().unwrap().into_iter().find(|(d, _, _)| *d == dest).map(|(_, st, _)| st.failures);
        }
        drop(seen);
        self.inner.send(dest, req)
    }
}

/// A transaction that fails because the peer came back meanwhile (it was on the connection of
/// the peer's previous run, closed once the new one is identified) is sent again at once: the
/// peer's return reset the backoff, and the failure must not undo that (it cost every
/// reconnection a 1 s wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_failing_while_the_peer_comes_back_is_retried_without_backoff() {
    let net = LocalNetwork::new();
    let core_cell = Arc::new(std::sync::OnceLock::new());
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (held, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let failures_at_retry = Arc::new(std::sync::Mutex::new(None));
    let (c, arm, h, rel, seen) =
        (core_cell.clone(), armed.clone(), held.clone(), release.clone(), failures_at_retry.clone());
    let (a, _da) = common::inproc_node_with(&net, move |inner| {
        Arc::new(HoldsFirstTransaction {
            inner,
            core: c,
            armed: arm,
            attempts: AtomicUsize::new(0),
            held: h,
            release: rel,
            failures_at_retry: seen,
        })
    })
    .await;
    core_cell.set(a.core.clone()).ok();
    let (b, _db) = node(&net).await;
    let alice = User::register(&a, "alice").await;
    let bob = User::register(&b, "bob").await;
    let room = alice_invites_bob(&alice, &bob).await;
    // The resident also queues bob's join to B (in case its send_join answer was lost): let
    // that go first, so the transaction held is the message's.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while a.core.queue_depth(b.core.server_name()).unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "A's queue to B never drained");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    armed.store(true, Ordering::SeqCst);
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/m0");
    let (st, _) = alice.call(reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": "across"})).await;
    assert_eq!(st, 200);
    tokio::time::timeout(Duration::from_secs(20), held.notified()).await.expect("the transaction was sent");
    // B comes back (a new connection, identified) while the transaction is on its way; then the
    // transaction fails.
    a.core.peer_up(b.core.server_name());
    release.notify_one();
    bob.wait_for("the message", |s| timeline_bodies(s, &room).contains(&"across".to_owned())).await;
    assert_eq!(*failures_at_retry.lock().unwrap(), Some(0), "A backed off before sending it again");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
