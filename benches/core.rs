//! Micro-benchmarks of the protocol core (`cargo bench`; `cargo bench -- <filter>` for one).
//!
//! Each group times one thing the node does per event or per request, on the same code paths as
//! production: hashing + signing a new event, verifying a received one, the auth rules, state
//! resolution of two long forks, a durable commit on sled (one event, and concurrent senders
//! sharing group-commit flushes), and an initial `/sync` of 100 rooms. Figures and how to read
//! them: docs/benchmarks.md.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use outpost::{
    clock::SystemClock,
    core::{
        pdu::{build_and_sign, rules_for, DagPosition, Pdu, PduTemplate},
        rooms::CreateRoomSpec,
        state::StateMap,
        sync::SyncRequest,
        Core, Limits,
    },
    identity::Identity,
    store::{KvStore, MemoryStore, SledStore},
};
use ruma::{
    events::TimelineEventType,
    state_res::{self, check_state_dependent_auth_rules, check_state_independent_auth_rules},
    EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId,
};
use serde_json::json;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn memory_core(seed: u8) -> Arc<Core> {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::default());
    Core::open(store, Identity::from_seed([seed; 32]), Arc::new(SystemClock), Limits::default()).expect("core")
}

fn msg(body: &str) -> PduTemplate {
    PduTemplate {
        kind: TimelineEventType::RoomMessage,
        content: json!({"msgtype": "m.text", "body": body}),
        state_key: None,
        redacts: None,
    }
}

fn state(kind: &str, key: &str, content: serde_json::Value) -> PduTemplate {
    PduTemplate { kind: TimelineEventType::from(kind), content, state_key: Some(key.into()), redacts: None }
}

fn public_room() -> CreateRoomSpec {
    CreateRoomSpec { preset: Some("public_chat".into()), name: Some("bench".into()), ..Default::default() }
}

/// A public v12 room with `members` joined users besides the creator.
async fn room_with_members(core: &Core, members: usize) -> (OwnedUserId, OwnedRoomId, Vec<OwnedUserId>) {
    let alice = core.register("alice", None).await.expect("register");
    let room = core.create_room(&alice, public_room()).await.expect("create room");
    let mut users = Vec::new();
    for i in 0..members {
        let u = core.register(&format!("user{i}"), None).await.expect("register");
        core.set_membership(&u, &room, &u, "join", None, None).await.expect("join");
        users.push(u);
    }
    (alice, room, users)
}

/// The auth events a new event of `template` by `sender` needs in `state` (as the room code
/// picks them).
fn auth_events_for(
    rules: &ruma::room_version_rules::RoomVersionRules,
    state: &StateMap,
    sender: &UserId,
    template: &PduTemplate,
) -> Vec<OwnedEventId> {
    let content = serde_json::value::to_raw_value(&template.content).expect("content");
    let types = state_res::auth_types_for_event(
        &template.kind,
        sender,
        template.state_key.as_deref(),
        &content,
        &rules.authorization,
    )
    .expect("auth types");
    let mut ids: Vec<OwnedEventId> =
        types.iter().filter_map(|(t, k)| state.get(&(t.to_string(), k.clone())).cloned()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Hashing + signing + naming one new message event (`core::pdu::build_and_sign`).
fn bench_sign(c: &mut Criterion) {
    let identity = Identity::from_seed([1; 32]);
    let rules = rules_for(&RoomVersionId::V12).expect("v12");
    let sender = UserId::parse(format!("@alice:{}", identity.server_name())).expect("user id");
    let room: OwnedRoomId = "!2ZsYMCNzKcD6NwGdZ-2kYbAQbmMXiXw3MKlNCKzbkxw".try_into().expect("room id");
    let ids: Vec<OwnedEventId> = (0..4).map(|i| EventId::parse(format!("${:0>43}", i)).expect("event id")).collect();
    let template = msg("Hello, this is a typical short chat message of about sixty bytes.");
    c.bench_function("event/build_and_sign", |b| {
        b.iter(|| {
            build_and_sign(
                &identity,
                &rules,
                &sender,
                &template,
                DagPosition { room_id: Some(&room), prev_events: &ids[..1], auth_events: &ids[1..], depth: 42 },
                1_700_000_000_000,
            )
            .expect("sign")
        })
    });
}

/// Steps 1–3 of the receipt checks for a PDU from another node (`Core::verify_pdu`: format,
/// reference hash, ed25519 signature, content hash, parse).
fn bench_verify(c: &mut Criterion) {
    let remote = Identity::from_seed([2; 32]);
    let core = memory_core(3);
    let rules = rules_for(&RoomVersionId::V12).expect("v12");
    let sender = UserId::parse(format!("@bob:{}", remote.server_name())).expect("user id");
    let room: OwnedRoomId = "!2ZsYMCNzKcD6NwGdZ-2kYbAQbmMXiXw3MKlNCKzbkxw".try_into().expect("room id");
    let ids: Vec<OwnedEventId> = (0..4).map(|i| EventId::parse(format!("${:0>43}", i)).expect("event id")).collect();
    let signed = build_and_sign(
        &remote,
        &rules,
        &sender,
        &msg("Hello, this is a typical short chat message of about sixty bytes."),
        DagPosition { room_id: Some(&room), prev_events: &ids[..1], auth_events: &ids[1..], depth: 42 },
        1_700_000_000_000,
    )
    .expect("sign");
    let raw = serde_json::value::to_raw_value(&signed.object).expect("raw");
    c.bench_function("event/verify_pdu", |b| b.iter(|| core.verify_pdu(&rules, &raw).expect("valid")));
}

/// The auth rules (`ruma::state_res`) for a message and for a join in a room of 200 members:
/// once with the auth events already parsed in memory (the rules alone), once fetching them
/// from the store as the node does.
fn bench_auth(c: &mut Criterion) {
    let rt = runtime();
    let core = memory_core(4);
    let (_alice, room, users) = rt.block_on(room_with_members(&core, 200));
    let newcomer = rt.block_on(core.register("newcomer", None)).expect("register");
    let rules = rules_for(&RoomVersionId::V12).expect("v12");
    let cur = core.current_state(&room).expect("state");
    let ext = core.extremities(&room).expect("extremities");
    let depth = core.room(&room).expect("room").expect("known").max_depth + 1;
    let build = |sender: &UserId, t: PduTemplate| {
        let auth = auth_events_for(&rules, &cur, sender, &t);
        build_and_sign(
            core.identity(),
            &rules,
            sender,
            &t,
            DagPosition { room_id: Some(&room), prev_events: &ext, auth_events: &auth, depth },
            core.now_ms(),
        )
        .expect("sign")
        .pdu
    };
    let message = build(&users[100], msg("hi"));
    let join = build(
        &newcomer,
        state("m.room.member", newcomer.as_str(), json!({"membership": "join", "displayname": "newcomer"})),
    );
    let parsed: BTreeMap<OwnedEventId, Pdu> =
        cur.values().map(|id| (id.clone(), core.pdu(id).expect("read").expect("stored"))).collect();
    let mut g = c.benchmark_group("auth_check_200_members");
    for (name, pdu) in [("message", &message), ("join", &join)] {
        g.bench_function(format!("{name}/rules_only"), |b| {
            b.iter(|| {
                check_state_independent_auth_rules(&rules.authorization, pdu, |id: &EventId| parsed.get(id).cloned())
                    .expect("independent");
                check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
                    cur.get(&(t.to_string(), k.to_owned())).and_then(|id| parsed.get(id).cloned())
                })
                .expect("dependent");
            })
        });
        g.bench_function(format!("{name}/with_store_fetch"), |b| {
            b.iter(|| {
                check_state_independent_auth_rules(&rules.authorization, pdu, |id: &EventId| {
                    core.pdu(id).ok().flatten()
                })
                .expect("independent");
                check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
                    cur.get(&(t.to_string(), k.to_owned())).and_then(|id| core.pdu(id).ok().flatten())
                })
                .expect("dependent");
            })
        });
    }
    g.finish();
}

/// Events per fork in the state-resolution benchmark (each fork also changes power levels and
/// has the same users join, so power events, memberships and plain state all conflict).
const FORK_STATE_EVENTS: usize = 300;
const FORK_JOINS: usize = 50;

/// State resolution (v2.1, room v12) of two forks that each set the same `FORK_STATE_EVENTS`
/// state keys, change power levels and have the same `FORK_JOINS` users join: every one of
/// those keys is conflicted. Built with `Core::send_event_on` on a memory store.
fn bench_state_res(c: &mut Criterion) {
    let rt = runtime();
    let core = memory_core(5);
    let (heads, rules) = rt.block_on(async {
        let alice = core.register("alice", None).await.expect("register");
        let room = core.create_room(&alice, public_room()).await.expect("create");
        let joiners: Vec<OwnedUserId> = {
            let mut v = Vec::new();
            for i in 0..FORK_JOINS {
                v.push(core.register(&format!("j{i}"), None).await.expect("register"));
            }
            v
        };
        let fork_point = core.extremities(&room).expect("extremities");
        let mut heads = Vec::new();
        for side in ["a", "b"] {
            let mut prev = fork_point.clone();
            let mut pl = core.state_event(&room, "m.room.power_levels", "").expect("pl").expect("pl").content_value();
            pl["users_default"] = json!(if side == "a" { 1 } else { 2 });
            prev = vec![core
                .send_event_on(&alice, &room, state("m.room.power_levels", "", pl), prev)
                .await
                .expect("power levels")];
            for u in &joiners {
                let t = state("m.room.member", u.as_str(), json!({"membership": "join", "displayname": side}));
                prev = vec![core.send_event_on(u, &room, t, prev).await.expect("join")];
            }
            for i in 0..FORK_STATE_EVENTS {
                let t = state("org.outpost.bench", &format!("k{i}"), json!({"side": side, "i": i}));
                prev = vec![core.send_event_on(&alice, &room, t, prev).await.expect("state")];
            }
            heads.push(prev[0].clone());
        }
        (heads, rules_for(&RoomVersionId::V12).expect("v12"))
    });
    let forks: Vec<Arc<StateMap>> = heads
        .iter()
        .map(|h| core.state_after(&core.stored_pdu(h).expect("read").expect("stored")).expect("state"))
        .collect();
    let conflicted = forks[0].iter().filter(|(k, v)| forks[1].get(*k) != Some(*v)).count();
    let mut g = c.benchmark_group("state_res");
    g.sample_size(10);
    g.throughput(Throughput::Elements(conflicted as u64));
    g.bench_function(format!("two_forks_{conflicted}_conflicted"), |b| {
        b.iter(|| core.resolve_state(&rules, &forks).expect("resolve"))
    });
    g.finish();
}

/// A durable commit on sled (fsync through group commit): one event awaited at a time, and
/// `n` concurrent senders (each in its own room, as separate clients would be) sharing flushes.
fn bench_commit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn KvStore> = Arc::new(SledStore::open(&dir.path().join("db"), 64 << 20).expect("sled"));
    let core = Core::open(store, Identity::from_seed([6; 32]), Arc::new(SystemClock), Limits::default()).expect("core");
    const SENDERS: usize = 16;
    let (alice, rooms) = rt.block_on(async {
        let alice = core.register("alice", None).await.expect("register");
        let mut rooms = Vec::new();
        for _ in 0..SENDERS {
            rooms.push(core.create_room(&alice, public_room()).await.expect("create"));
        }
        (alice, rooms)
    });
    let mut g = c.benchmark_group("durable_commit_sled");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_event", |b| {
        b.iter(|| rt.block_on(core.send_event(&alice, None, &rooms[0], msg("hello"), None)).expect("send"))
    });
    for (label, same_room) in [("rooms", false), ("one_room", true)] {
        g.throughput(Throughput::Elements(SENDERS as u64));
        g.bench_function(format!("{SENDERS}_concurrent_senders_{label}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for i in 0..SENDERS {
                        let (core, alice) = (core.clone(), alice.clone());
                        let room = rooms[if same_room { 0 } else { i }].clone();
                        tasks.push(tokio::spawn(async move {
                            core.send_event(&alice, None, &room, msg("hello"), None).await.expect("send")
                        }));
                    }
                    for t in tasks {
                        t.await.expect("task");
                    }
                })
            })
        });
    }
    g.finish();
}

/// Initial `/sync` (no `since`, default filter: 20 timeline events per room) of a user in 100
/// rooms with 30 messages each.
fn bench_sync(c: &mut Criterion) {
    let rt = runtime();
    let core = memory_core(7);
    let (alice, device) = rt.block_on(async {
        let alice = core.register("alice", None).await.expect("register");
        let (device, _) = core.create_device(&alice, None, None).await.expect("device");
        for r in 0..100 {
            let room = core.create_room(&alice, public_room()).await.expect("create");
            for i in 0..30 {
                core.send_event(&alice, None, &room, msg(&format!("message {i} in room {r}")), None)
                    .await
                    .expect("send");
            }
        }
        (alice, device)
    });
    let mut g = c.benchmark_group("sync");
    g.sample_size(10);
    g.bench_function("initial_100_rooms", |b| {
        b.iter_batched(
            SyncRequest::default,
            |req| rt.block_on(core.sync(&alice, &device, req)).expect("sync"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Incremental `/sync` of a user with 1,000 unread messages in a room, after one more message
/// (what a long-polling client pays on every wake while a peer's backlog arrives): the
/// timeline of one event and the room's unread counts.
fn bench_sync_unread(c: &mut Criterion) {
    let rt = runtime();
    let core = memory_core(8);
    let (bob, device, room, alice) = rt.block_on(async {
        let (alice, room, users) = room_with_members(&core, 1).await;
        let bob = users[0].clone();
        let (device, _) = core.create_device(&bob, None, None).await.expect("device");
        for i in 0..1000 {
            core.send_event(&alice, None, &room, msg(&format!("unread {i}")), None).await.expect("send");
        }
        (bob, device, room, alice)
    });
    let mut g = c.benchmark_group("sync");
    g.bench_function("incremental_1000_unread", |b| {
        b.iter_batched(
            || {
                let since = core.visible_pos();
                rt.block_on(core.send_event(&alice, None, &room, msg("one more"), None)).expect("send");
                SyncRequest { since: Some(since), ..SyncRequest::default() }
            },
            |req| rt.block_on(core.sync(&bob, &device, req)).expect("sync"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_sign,
    bench_verify,
    bench_auth,
    bench_state_res,
    bench_commit,
    bench_sync,
    bench_sync_unread
);
criterion_main!(benches);
