//! Mesh figures (issue 4): two real `outpost` processes on loopback, linked by a static QUIC
//! peer (mDNS off), driven over plain HTTP.
//!
//! 1. **Latency**: a message sent on node A until it shows in a long-polling `/sync` on node B
//!    (one message at a time; p50 / p99).
//! 2. **Catch-up**: B is killed, A sends `catchup` messages, B restarts; time until B's client
//!    sees the last one.
//! 3. **Partition heal**: B is cut off (restarted without its peer address, so neither side can
//!    reach the other), both sides change room state, then B restarts with the link; time until
//!    `GET /rooms/{id}/state` is identical on both nodes.
//!
//! ```text
//! cargo build --release --bin outpost --example bench_mesh
//! target/release/examples/bench_mesh [--messages 1000] [--catchup 10000] [--state-changes 20] [--bin target/release/outpost]
//! ```
//! Prints human-readable lines and, last, one JSON line with every figure.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Messages for the latency measurement (after 20 warm-up messages).
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Messages sent while B is down.
    #[arg(long, default_value_t = 10_000)]
    catchup: usize,
    /// Concurrent senders on A while B is down (each in the same room).
    #[arg(long, default_value_t = 16)]
    catchup_senders: usize,
    /// State events each side sends while partitioned.
    #[arg(long, default_value_t = 20)]
    state_changes: usize,
    /// The outpost binary (default: `../outpost` next to this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Keep the data dirs and logs (printed) instead of deleting them.
    #[arg(long)]
    keep: bool,
}

struct Node {
    name: &'static str,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    http: reqwest::Client,
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Node {
    fn new(name: &'static str, bin: PathBuf, root: &std::path::Path, args: Vec<String>) -> Node {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(32)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("reqwest");
        Node { name, bin, dir: root.join(name), port: free_tcp_port(), args, child: None, http }
    }

    /// User + system CPU seconds the running process has used so far (Linux `/proc`).
    fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which is in parentheses): utime is the 14th field.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0) // USER_HZ is 100 on Linux
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Spawn and wait for `/versions`; returns (spawn instant, time to ready).
    async fn start(&mut self) -> (Instant, Duration) {
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("log file");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--client-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            // Network rule: loopback only, no mDNS.
            .args(["--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OUTPOST_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_COLOR", "1");
        let t0 = Instant::now();
        self.child = Some(cmd.spawn().expect("spawn outpost"));
        let deadline = t0 + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "node {} exited during start ({st}); see {}",
                    self.name,
                    self.dir.with_extension("log").display()
                );
            }
            if let Ok(r) = self.http.get(self.url("/_matrix/client/versions")).send().await {
                if r.status().is_success() {
                    return (t0, t0.elapsed());
                }
            }
            assert!(Instant::now() < deadline, "node {} not ready in 30 s", self.name);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            for _ in 0..200 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let s = res.status().as_u16();
        (s, res.json().await.unwrap_or(Value::Null))
    }
    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let (s, v) = self.call(method.clone(), path, body).await;
        assert_eq!(s, 200, "{method} {path}: {v}");
        v
    }
    async fn send(&self, room: &str, txn: &str, body: &str) {
        self.ok(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
            Some(&json!({"msgtype": "m.text", "body": body})),
        )
        .await;
    }
    async fn set_state(&self, room: &str, kind: &str, key: &str, content: &Value) {
        self.ok(reqwest::Method::PUT, &format!("/_matrix/client/v3/rooms/{room}/state/{kind}/{key}"), Some(content))
            .await;
    }
    /// The room's current state as `(type, state_key) → event_id`.
    async fn state(&self, room: &str) -> BTreeMap<(String, String), String> {
        let v = self.ok(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{room}/state"), None).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            (
                                e["type"].as_str().unwrap_or("").to_owned(),
                                e["state_key"].as_str().unwrap_or("").to_owned(),
                            ),
                            e["event_id"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(s) = since {
            path.push_str(&format!("&since={s}"));
        }
        self.ok(reqwest::Method::GET, &path, None).await
    }
}

async fn register(node: &Node, user: &str) -> Api {
    let anon = Api { http: node.http.clone(), base: node.url(""), token: String::new() };
    let mut body = json!({"username": user, "password": user});
    let (s, v) = anon.call(reqwest::Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
    let v = if s == 401 {
        body["auth"] = json!({"type": "m.login.dummy", "session": v["session"]});
        anon.ok(reqwest::Method::POST, "/_matrix/client/v3/register", Some(&body)).await
    } else {
        v
    };
    Api { token: v["access_token"].as_str().expect("token").to_owned(), ..anon }
}

fn bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let bin = args.bin.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current exe");
        exe.parent().and_then(|p| p.parent()).expect("target dir").join("outpost")
    });
    assert!(bin.exists(), "outpost binary not found at {} (build it, or pass --bin)", bin.display());
    let tmp = tempfile::Builder::new().prefix("outpost-bench-mesh-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    let quic = free_udp_port();
    let a_addr = format!("/ip4/127.0.0.1/udp/{quic}/quic-v1");
    let mut a = Node::new("a", bin.clone(), &root, vec!["--listen".into(), a_addr.clone()]);
    let linked_b = vec!["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into(), "--peer".into(), a_addr.clone()];
    let mut b = Node::new("b", bin, &root, linked_b.clone());
    a.start().await;
    b.start().await;
    let alice = register(&a, "alice").await;
    let bob = register(&b, "bob").await;
    let bob_id = bob.ok(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None).await["user_id"]
        .as_str()
        .expect("user_id")
        .to_owned();
    let room = alice.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&json!({"name": "bench"}))).await
        ["room_id"]
        .as_str()
        .expect("room id")
        .to_owned();
    poll("invite over QUIC", Duration::from_secs(30), || async {
        let (s, _) = alice
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/rooms/{room}/invite"),
                Some(&json!({"user_id": bob_id})),
            )
            .await;
        (s == 200).then_some(())
    })
    .await;
    poll("bob joins", Duration::from_secs(30), || async {
        let (s, _) =
            bob.call(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{room}"), Some(&json!({}))).await;
        (s == 200).then_some(())
    })
    .await;
    // Bob may change state too (for the partition test).
    let mut pl = alice
        .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), None)
        .await;
    pl["users"][&bob_id] = json!(100);
    alice.set_state(&room, "m.room.power_levels", "", &pl).await;
    poll("bob's power level reaches B", Duration::from_secs(30), || async {
        let v = bob
            .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), None)
            .await;
        (v["users"][&bob_id] == json!(100)).then_some(())
    })
    .await;
    println!("two nodes linked over QUIC on 127.0.0.1; room {room}");

    // 1. Latency A → long-polling /sync on B.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let syncer = {
        let bob = bob.clone();
        let room = room.clone();
        tokio::spawn(async move {
            let mut since = bob.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();
            loop {
                let s = bob.sync(Some(&since), 30_000).await;
                let now = Instant::now();
                for body in bodies(&s, &room) {
                    if tx.send((body, now)).is_err() {
                        return;
                    }
                }
                since = s["next_batch"].as_str().expect("next_batch").to_owned();
            }
        })
    };
    let warmup = 20;
    let mut lat = Vec::new();
    let mut ack = Vec::new();
    for i in 0..warmup + args.messages {
        let body = format!("lat {i}");
        let t0 = Instant::now();
        alice.send(&room, &format!("lat{i}"), &body).await;
        let acked = t0.elapsed();
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (b, at) = rx.recv().await.expect("syncer alive");
                if b == body {
                    return at;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("message {i} not seen on B within 30 s"));
        if i >= warmup {
            lat.push(ms(seen.duration_since(t0)));
            ack.push(ms(acked));
        }
    }
    syncer.abort();
    lat.sort_by(|x, y| x.total_cmp(y));
    ack.sort_by(|x, y| x.total_cmp(y));
    let latency = json!({
        "messages": lat.len(),
        "p50_ms": pct(&lat, 0.5), "p90_ms": pct(&lat, 0.9), "p99_ms": pct(&lat, 0.99), "max_ms": pct(&lat, 1.0),
        "send_ack_p50_ms": pct(&ack, 0.5), "send_ack_p99_ms": pct(&ack, 0.99),
    });
    println!("latency A send → B sync over {} messages: {latency}", lat.len());

    // 2. Catch-up after B was down.
    let since = bob.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();
    b.kill();
    let t_send = Instant::now();
    let per = args.catchup.div_ceil(args.catchup_senders);
    let mut tasks = Vec::new();
    for s in 0..args.catchup_senders {
        let (alice, room) = (alice.clone(), room.clone());
        let n = per.min(args.catchup.saturating_sub(s * per));
        tasks.push(tokio::spawn(async move {
            for j in 0..n {
                alice.send(&room, &format!("up{s}-{j}"), &format!("catch-up {s} {j}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let last = "catch-up last";
    alice.send(&room, "up-last", last).await;
    let send_s = t_send.elapsed().as_secs_f64();
    println!("sent {} messages on A while B was down in {send_s:.1} s", args.catchup + 1);
    let (spawned, ready) = b.start().await;
    let mut since = since;
    loop {
        let s = bob.sync(Some(&since), 30_000).await;
        if bodies(&s, &room).iter().any(|x| x == last) {
            break;
        }
        since = s["next_batch"].as_str().expect("next_batch").to_owned();
        assert!(spawned.elapsed() < Duration::from_secs(600), "B did not catch up in 10 minutes");
    }
    let caught = spawned.elapsed();
    // CPU time is what the machine's load cannot inflate: B's and A's, for the whole catch-up.
    let (b_cpu, a_cpu) = (b.cpu_seconds(), a.cpu_seconds());
    // Everything arrived, not just the last one.
    let count = {
        let mut n = 0;
        let mut from: Option<String> = None;
        loop {
            let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1000");
            if let Some(f) = &from {
                path.push_str(&format!("&from={f}"));
            }
            let v = bob.ok(reqwest::Method::GET, &path, None).await;
            n += v["chunk"].as_array().map_or(0, |c| {
                c.iter().filter(|e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with("catch-up"))).count()
            });
            match v["end"].as_str() {
                Some(e) if v["chunk"].as_array().is_some_and(|c| !c.is_empty()) => from = Some(e.to_owned()),
                _ => break,
            }
        }
        n
    };
    let catchup = json!({
        "events": args.catchup + 1,
        "from_spawn_ms": ms(caught), "b_start_ms": ms(ready), "after_ready_ms": ms(caught - ready),
        "events_on_b": count,
        "b_cpu_s": b_cpu, "a_cpu_s_total": a_cpu,
    });
    println!("catch-up: {catchup}");

    // 3. Partition and heal.
    b.stop().await;
    for i in 0..args.state_changes {
        alice.set_state(&room, "org.outpost.bench", &format!("k{i}"), &json!({"side": "a", "i": i})).await;
    }
    alice.set_state(&room, "m.room.topic", "", &json!({"topic": "set on A during the partition"})).await;
    // B alone: no peer address, a fresh QUIC port: neither side can dial the other.
    b.args = vec!["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()];
    b.start().await;
    for i in 0..args.state_changes {
        bob.set_state(&room, "org.outpost.bench", &format!("k{i}"), &json!({"side": "b", "i": i})).await;
    }
    bob.set_state(&room, "m.room.topic", "", &json!({"topic": "set on B during the partition"})).await;
    let (sa, sb) = (alice.state(&room).await, bob.state(&room).await);
    assert_ne!(sa, sb, "the partition did not hold: states already identical");
    b.stop().await;
    b.args = linked_b;
    let (spawned, ready) = b.start().await;
    let converged = poll("identical state on both nodes", Duration::from_secs(120), || async {
        let (sa, sb) = (alice.state(&room).await, bob.state(&room).await);
        (sa == sb).then(|| (spawned.elapsed(), sa))
    })
    .await;
    let (t_conv, state) = converged;
    let topic_from = state.get(&("m.room.topic".to_owned(), String::new())).cloned().unwrap_or_default();
    let heal = json!({
        "state_changes_per_side": args.state_changes + 1,
        "from_spawn_ms": ms(t_conv), "b_start_ms": ms(ready), "after_ready_ms": ms(t_conv - ready),
        "state_entries": state.len(), "topic_event": topic_from,
    });
    println!("partition heal: {heal}");
    a.stop().await;
    b.stop().await;
    if args.keep {
        let kept = tmp.keep();
        println!("data and logs kept in {}", kept.display());
    }
    println!("{}", json!({"latency": latency, "catchup": catchup, "heal": heal}));
}
