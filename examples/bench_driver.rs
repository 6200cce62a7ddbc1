//! Client-side load driver for `scripts/bench-vs-synapse`: the same plain-HTTP Matrix client
//! workload against any homeserver (outpost or Synapse). Each subcommand prints one JSON line.
//!
//! ```text
//! cargo run --release --example bench_driver -- register   --url URL --users a,b,c
//! cargo run --release --example bench_driver -- sequential --url URL --token T --n 100
//! cargo run --release --example bench_driver -- concurrent --url URL --tokens T1,T2,.. --per-sender 50 [--shared-room]
//! cargo run --release --example bench_driver -- rooms      --url URL --token T --rooms 100 --msgs 5
//! cargo run --release --example bench_driver -- initial-sync --url URL --token T --repeats 5
//! ```
//!
//! Only loopback URLs are accepted (benchmarks never leave the machine).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register users (password = user name) with the m.login.dummy flow; prints their tokens.
    Register {
        #[arg(long)]
        url: String,
        /// Comma-separated localparts.
        #[arg(long)]
        users: String,
    },
    /// Create a room, then send `n` messages one after the other, each awaited.
    Sequential {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 100)]
        n: usize,
    },
    /// One sender per token, all at once, `per_sender` messages each (each sender awaits its
    /// own sends): in one shared room, or each in its own room.
    Concurrent {
        #[arg(long)]
        url: String,
        /// Comma-separated access tokens, one per sender.
        #[arg(long)]
        tokens: String,
        #[arg(long, default_value_t = 50)]
        per_sender: usize,
        #[arg(long)]
        shared_room: bool,
    },
    /// Create `rooms` rooms with `msgs` messages each (setup for initial-sync).
    Rooms {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 5)]
        msgs: usize,
    },
    /// Time `GET /sync` without `since` (an initial sync), `repeats` times.
    InitialSync {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

fn check_loopback(url: &str) {
    let ok = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"].iter().any(|p| url.starts_with(p));
    assert!(ok, "benchmarks only talk to loopback; got {url}");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

impl Api {
    fn new(http: &reqwest::Client, url: &str, token: Option<&str>) -> Self {
        check_loopback(url);
        Self { http: http.clone(), url: url.trim_end_matches('/').to_owned(), token: token.map(str::to_owned) }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut attempt = 0;
        loop {
            let mut req = self.http.request(method.clone(), format!("{}{}", self.url, path));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let res = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = res.status().as_u16();
            let v: Value = res.json().await.unwrap_or(Value::Null);
            // A server's rate limiter is a configuration failure of the benchmark: say so.
            if status == 429 {
                attempt += 1;
                assert!(attempt < 50, "{method} {path}: still rate-limited after 50 tries: {v}");
                eprintln!("rate-limited on {path} (check the server's rc_* settings): {v}");
                let wait = v["retry_after_ms"].as_u64().unwrap_or(100);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            return (status, v);
        }
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let (s, v) = self.call(method.clone(), path, body).await;
        assert_eq!(s, 200, "{method} {path}: {v}");
        v
    }

    async fn create_room(&self, public: bool) -> String {
        let preset = if public { "public_chat" } else { "private_chat" };
        let v = self.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&json!({"preset": preset}))).await;
        v["room_id"].as_str().expect("room_id").to_owned()
    }

    async fn send(&self, room: &str, txn: &str, body: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        self.ok(reqwest::Method::PUT, &path, Some(&json!({"msgtype": "m.text", "body": body}))).await;
    }
}

/// Percent-encode a room id for a path segment (`!` and `:` are fine; be strict anyway).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({
        "count": ms.len(),
        "median_ms": percentile(&ms, 0.5),
        "p90_ms": percentile(&ms, 0.9),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
        "total_ms": ms.iter().sum::<f64>(),
    })
}

async fn register(http: &reqwest::Client, url: &str, user: &str) -> Value {
    let api = Api::new(http, url, None);
    let mut body = json!({"username": user, "password": user, "initial_device_display_name": "bench"});
    let (s, v) = api.call(reqwest::Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
    let v = if s == 401 {
        body["auth"] = json!({"type": "m.login.dummy", "session": v["session"]});
        api.ok(reqwest::Method::POST, "/_matrix/client/v3/register", Some(&body)).await
    } else {
        assert_eq!(s, 200, "register {user}: {v}");
        v
    };
    json!({"user": user, "user_id": v["user_id"], "access_token": v["access_token"]})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let http = client();
    let out = match Cli::parse().cmd {
        Cmd::Register { url, users } => {
            let mut out = Vec::new();
            for u in users.split(',').filter(|u| !u.is_empty()) {
                out.push(register(&http, &url, u).await);
            }
            json!(out)
        }
        Cmd::Sequential { url, token, n } => {
            let api = Api::new(&http, &url, Some(&token));
            let room = api.create_room(false).await;
            let run = format!("{}", rand_suffix());
            let mut ms = Vec::with_capacity(n);
            for i in 0..n {
                let t0 = Instant::now();
                api.send(&room, &format!("seq{run}-{i}"), &format!("sequential {i}")).await;
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            summary(ms)
        }
        Cmd::Concurrent { url, tokens, per_sender, shared_room } => {
            let apis: Vec<Arc<Api>> =
                tokens.split(',').filter(|t| !t.is_empty()).map(|t| Arc::new(Api::new(&http, &url, Some(t)))).collect();
            let rooms: Vec<String> = if shared_room {
                let room = apis[0].create_room(true).await;
                for a in &apis[1..] {
                    a.ok(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&json!({})))
                        .await;
                }
                vec![room; apis.len()]
            } else {
                let mut v = Vec::new();
                for a in &apis {
                    v.push(a.create_room(false).await);
                }
                v
            };
            let run = rand_suffix();
            let done = Arc::new(AtomicUsize::new(0));
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for (i, (api, room)) in apis.iter().cloned().zip(rooms).enumerate() {
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    let mut ms = Vec::with_capacity(per_sender);
                    for j in 0..per_sender {
                        let t = Instant::now();
                        api.send(&room, &format!("c{run}-{i}-{j}"), &format!("sender {i} message {j}")).await;
                        ms.push(t.elapsed().as_secs_f64() * 1000.0);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    ms
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("sender task"));
            }
            let secs = t0.elapsed().as_secs_f64();
            let events = done.load(Ordering::Relaxed);
            json!({
                "senders": apis.len(),
                "shared_room": shared_room,
                "events": events,
                "seconds": secs,
                "events_per_s": events as f64 / secs,
                "latency": summary(all),
            })
        }
        Cmd::Rooms { url, token, rooms, msgs } => {
            let api = Api::new(&http, &url, Some(&token));
            let t0 = Instant::now();
            let run = rand_suffix();
            for r in 0..rooms {
                let room = api.create_room(false).await;
                for m in 0..msgs {
                    api.send(&room, &format!("r{run}-{r}-{m}"), &format!("room {r} message {m}")).await;
                }
            }
            json!({"rooms": rooms, "msgs": msgs, "seconds": t0.elapsed().as_secs_f64()})
        }
        Cmd::InitialSync { url, token, repeats } => {
            let api = Api::new(&http, &url, Some(&token));
            let mut ms = Vec::new();
            let mut rooms = 0;
            let mut bytes = 0;
            for i in 0..repeats {
                let t0 = Instant::now();
                // A different `timeout` each time (meaningless for an initial sync, which answers
                // at once) keeps Synapse from answering repeats from its sync response cache.
                let res = api
                    .http
                    .get(format!("{}/_matrix/client/v3/sync?timeout={i}", api.url))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("sync");
                assert_eq!(res.status().as_u16(), 200, "sync");
                let body = res.bytes().await.expect("sync body");
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                bytes = body.len();
                let v: Value = serde_json::from_slice(&body).expect("sync JSON");
                rooms = v["rooms"]["join"].as_object().map_or(0, |o| o.len());
            }
            json!({"joined_rooms": rooms, "response_bytes": bytes, "first_ms": ms.first(), "latency": summary(ms)})
        }
    };
    println!("{out}");
}

/// A short random tag so repeated runs never reuse transaction ids.
fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64 % 1_000_000_007).unwrap_or(0)
        ^ std::process::id() as u64
}
