//! Test harness shared by the black-box integration tests: starts the real `outpost` binary on a
//! free loopback port with a temporary data dir, and builds Matrix clients (matrix-sdk) and raw
//! HTTP clients (reqwest) against it.
//!
//! Every test starts its own node(s); nothing is shared between tests except the built binary.
//! Traffic stays on 127.0.0.1, except in [`lab`] (network namespaces on a bridge, root only).
//!
//! When a test panics while a [`Node`] is alive, the node's log (its stderr, kept in a file in
//! the node's temp dir) is printed, which is usually the fastest way to see what went wrong.

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod lab;

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use matrix_sdk::ruma::api::client::{
    account::register::v3::Request as RegisterRequest,
    uiaa::{AuthData, Dummy},
};
use matrix_sdk::Client;
use serde_json::Value;
use tempfile::TempDir;

/// How long a node may take to answer `GET /_matrix/client/versions` after it was spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) `outpost` process with its data dir and port.
pub struct Node {
    child: Option<Child>,
    /// Owns the temp dir (data dir + log) unless the node was started with [`Node::start_in`].
    tmp: Option<TempDir>,
    /// The data dir passed to `--data-dir`; kept across restarts.
    pub data_dir: PathBuf,
    /// The node's stderr, appended to across restarts.
    pub log_path: PathBuf,
    /// The client-API port on 127.0.0.1; kept across restarts.
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    starts: u32,
    /// Extra arguments for `outpost run` (e.g. static peers).
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the node (its log is printed when a wait times out).
    pub log_filter: Option<String>,
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for QUIC listen addresses).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
    s.local_addr().expect("local_addr").port()
}

/// A port on 127.0.0.1 that was free a moment ago (bind to port 0, then drop the listener).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

impl Node {
    /// Starts a node with a fresh temp data dir on a free port, and waits until it is ready.
    pub async fn start() -> Node {
        let tmp = tempfile::Builder::new().prefix("outpost-test-").tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let log_path = tmp.path().join("outpost.log");
        Self::launch(Some(tmp), data_dir, log_path).await
    }

    /// Starts a node on a free port with the data dir `dir` (created if missing, not deleted
    /// afterwards); its log goes to `dir/../<dir name>.outpost.log`.
    pub async fn start_in(dir: impl AsRef<Path>) -> Node {
        let data_dir = dir.as_ref().to_path_buf();
        let name = data_dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let log_name = format!("{}.outpost.log", name.unwrap_or_else(|| "node".into()));
        let log_path = data_dir.parent().unwrap_or(Path::new(".")).join(log_name);
        Self::launch(None, data_dir, log_path).await
    }

    /// Starts a node like [`Node::start`], with extra `outpost run` arguments (e.g. `--listen`,
    /// `--peer`).
    pub async fn start_with_args(args: Vec<String>) -> Node {
        let tmp = tempfile::Builder::new().prefix("outpost-test-").tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let log_path = tmp.path().join("outpost.log");
        Self::launch_with(Some(tmp), data_dir, log_path, args).await
    }

    async fn launch(tmp: Option<TempDir>, data_dir: PathBuf, log_path: PathBuf) -> Node {
        Self::launch_with(tmp, data_dir, log_path, Vec::new()).await
    }

    async fn launch_with(tmp: Option<TempDir>, data_dir: PathBuf, log_path: PathBuf, extra_args: Vec<String>) -> Node {
        Self::launch_logged(tmp, data_dir, log_path, extra_args, None).await
    }

    async fn launch_logged(
        tmp: Option<TempDir>,
        data_dir: PathBuf,
        log_path: PathBuf,
        extra_args: Vec<String>,
        log_filter: Option<String>,
    ) -> Node {
        let port = free_port();
        let mut node = Node {
            child: None,
            tmp,
            data_dir,
            log_path,
            port,
            base_url: format!("http://127.0.0.1:{port}"),
            starts: 0,
            extra_args,
            log_filter,
        };
        node.spawn_and_wait().await;
        node
    }

    /// [`Node::start_with_args`] with the node's log filtered by `filter` (`RUST_LOG` syntax).
    pub async fn start_with_log(args: Vec<String>, filter: &str) -> Node {
        let tmp = tempfile::Builder::new().prefix("outpost-test-").tempdir().expect("temp dir");
        let (data_dir, log_path) = (tmp.path().join("data"), tmp.path().join("outpost.log"));
        Self::launch_logged(Some(tmp), data_dir, log_path, args, Some(filter.to_owned())).await
    }

    /// Spawns the binary (same dir, same port) and waits for readiness. If the process exits
    /// early because its port is taken (a rare race with another test between [`free_port`]
    /// and the bind), tries again: with a new port on a first start, after a pause on a restart.
    async fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "node is already running");
        for attempt in 1.. {
            let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len()) as usize;
            self.spawn();
            match self.wait_ready().await {
                Ok(()) => return,
                Err(why) => {
                    let log = self.log();
                    let this_start = log.get(log_offset..).unwrap_or(&log);
                    let port_taken = this_start.contains("in use") || this_start.contains("AddrInUse");
                    if !port_taken || attempt >= 5 {
                        panic!("{why}; log:\n{log}");
                    }
                    if self.starts == 1 {
                        self.port = free_port();
                        self.base_url = format!("http://127.0.0.1:{}", self.port);
                    } else {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    self.starts -= 1;
                }
            }
        }
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("open node log");
        let _ = writeln!(log, "===== test harness: start #{} on port {} =====", self.starts, self.port);
        let stderr = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--client-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            // Network rule: the mesh stays on loopback and mDNS stays off in these tests.
            .args(["--no-mdns", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(self.extra_args.iter())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        // Settings of the developer's shell must not leak into the node under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTPOST_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1");
        if let Some(f) = &self.log_filter {
            cmd.env("RUST_LOG", f);
        }
        self.child = Some(cmd.spawn().expect("spawn outpost binary"));
    }

    /// Polls `GET /_matrix/client/versions` until 200 while the process is alive; `Err` if it
    /// exits first, panics (printing the log) on timeout.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().expect("reqwest");
        let url = format!("{}/_matrix/client/versions", self.base_url);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("outpost exited before becoming ready ({status})"));
            }
            if let Ok(res) = http.get(&url).send().await {
                // Still alive after answering: the answer came from this process.
                if res.status() == reqwest::StatusCode::OK && self.is_running() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                panic!("outpost not ready after {READY_TIMEOUT:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the process (no chance to flush anything) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process gracefully (SIGTERM, then SIGKILL after 10 s) and reaps it.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("outpost did not exit within 10 s of SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Restarts the node with the same data dir and port: a graceful stop if it is running (use
    /// [`Node::kill`] first for a crash), then a start, waiting for readiness.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn_and_wait().await;
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "----- outpost log ({}, last {} of {} lines) -----\n{}\n----- end of outpost log -----",
                self.log_path.display(),
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
        let _ = &self.tmp; // dropped (deleted) after this
    }
}

// ---------------------------------------------------------------------------------------------
// matrix-sdk clients
// ---------------------------------------------------------------------------------------------

/// A matrix-sdk client for `node`, not logged in (in-memory stores).
pub async fn new_client(node: &Node) -> Client {
    Client::builder().homeserver_url(&node.base_url).build().await.expect("build matrix-sdk client")
}

/// Registers `user` with `password` through the `m.login.dummy` UIAA flow and returns a
/// logged-in client.
pub async fn register(node: &Node, user: &str, password: &str) -> Client {
    let client = new_client(node).await;
    let mut request = RegisterRequest::new();
    request.username = Some(user.to_owned());
    request.password = Some(password.to_owned());
    request.initial_device_display_name = Some(format!("{user}'s test device"));
    let err = client
        .matrix_auth()
        .register(request.clone())
        .await
        .expect_err("the first /register (without auth) must answer 401 with a UIAA session");
    let info = err.as_uiaa_response().unwrap_or_else(|| panic!("first /register: expected a UIAA 401, got {err:?}"));
    assert!(
        info.flows.iter().any(|f| f.stages.iter().any(|s| s.as_str() == "m.login.dummy")),
        "UIAA flows must offer m.login.dummy: {:?}",
        info.flows
    );
    let mut dummy = Dummy::new();
    dummy.session = info.session.clone();
    request.auth = Some(AuthData::Dummy(dummy));
    let response = client
        .matrix_auth()
        .register(request)
        .await
        .unwrap_or_else(|e| panic!("/register with m.login.dummy failed: {e:?}"));
    assert_eq!(response.user_id.localpart(), user);
    assert!(client.user_id().is_some(), "client must be logged in after registering");
    client
}

/// Logs `user` in with `password` and returns the logged-in client.
pub async fn login(node: &Node, user: &str, password: &str) -> Client {
    let client = new_client(node).await;
    client
        .matrix_auth()
        .login_username(user, password)
        .initial_device_display_name("test login")
        .send()
        .await
        .unwrap_or_else(|e| panic!("login of {user} failed: {e:?}"));
    client
}

/// The access token of a logged-in client.
pub fn token(client: &Client) -> String {
    client.access_token().expect("client is logged in")
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// A plain reqwest client (no proxy, loopback only) for error-case tests.
pub fn http(_node: &Node) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("reqwest client")
}

/// A response as status + JSON body (`Value::Null` if the body is not JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// `body.errcode` as a string ("" if absent).
    pub fn errcode(&self) -> &str {
        self.body.get("errcode").and_then(Value::as_str).unwrap_or("")
    }

    /// Panics with the whole response unless the status is 200.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert_eq!(self.status, 200, "expected 200, got {} {}", self.status, self.text);
        self.body
    }

    /// Panics unless status and errcode are as given.
    #[track_caller]
    pub fn expect_err(&self, status: u16, errcode: &str) {
        assert_eq!(
            (self.status, self.errcode()),
            (status, errcode),
            "expected {status} {errcode}, got {} {}",
            self.status,
            self.text
        );
    }
}

/// Raw JSON access to one node, optionally as one user (access token).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base_url: String,
    pub token: Option<String>,
}

impl Api {
    /// Unauthenticated raw access to `node`.
    pub fn new(node: &Node) -> Api {
        Api { http: http(node), base_url: node.base_url.clone(), token: None }
    }

    /// Raw access as the user holding `token`.
    pub fn with_token(node: &Node, token: impl Into<String>) -> Api {
        Api { token: Some(token.into()), ..Api::new(node) }
    }

    /// Raw access as the user of a logged-in matrix-sdk client.
    pub fn as_client(node: &Node, client: &Client) -> Api {
        Api::with_token(node, token(client))
    }

    /// Sends `method path` with an optional JSON body; errors only on transport failure.
    pub async fn try_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<Resp> {
        let mut req = self.http.request(method, format!("{}{}", self.base_url, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp { status, body, text })
    }

    /// Like [`Api::try_request`], panicking on transport failure.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Resp {
        self.try_request(method.clone(), path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: transport error {e}"))
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Resp {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Registers `user` through the raw `m.login.dummy` flow; returns (user_id, access_token).
    pub async fn register(&self, user: &str, password: &str) -> (String, String) {
        let body = serde_json::json!({"username": user, "password": password});
        let first = self.post("/_matrix/client/v3/register", &body).await;
        assert_eq!(first.status, 401, "first /register must be a UIAA 401: {}", first.text);
        let session = first.body.get("session").cloned().unwrap_or(Value::Null);
        let mut body = body;
        body["auth"] = serde_json::json!({"type": "m.login.dummy", "session": session});
        let res = self.post("/_matrix/client/v3/register", &body).await.ok();
        let user_id = res["user_id"].as_str().expect("user_id").to_owned();
        let token = res["access_token"].as_str().expect("access_token").to_owned();
        (user_id, token)
    }
}

/// Percent-encodes a path segment (room ids, event ids, user ids, aliases, txn ids).
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() * 3);
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The server name (part after the first ':') of a user id, checked to be 64 lowercase hex chars.
#[track_caller]
pub fn hex_server_name(user_id: &str) -> String {
    let (_, server) = user_id.split_once(':').unwrap_or_else(|| panic!("no ':' in {user_id}"));
    assert_eq!(server.len(), 64, "server name must be 64 hex chars: {server}");
    assert!(
        server.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "server name must be lowercase hex: {server}"
    );
    server.to_owned()
}

/// Decodes lowercase hex.
pub fn from_hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex {s}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows `/messages` pagination in direction `dir` ("b" or "f") from `from` (or the room's
/// end/start) until the server stops returning an `end` token or returns an empty chunk.
/// Returns every event of every page, in the order the server returned them.
pub async fn paginate_all(api: &Api, room_id: &str, dir: &str, from: Option<&str>, limit: u32) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = from.map(str::to_owned);
    for page in 0.. {
        assert!(page < 10_000, "/messages pagination does not terminate");
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir={dir}&limit={limit}", enc(room_id));
        if let Some(f) = &from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        let res = api.get(&path).await.ok();
        let chunk = res["chunk"].as_array().cloned().unwrap_or_default();
        assert!(chunk.len() <= limit as usize, "page larger than limit {limit}: {}", chunk.len());
        let empty = chunk.is_empty();
        events.extend(chunk);
        match res.get("end").and_then(Value::as_str) {
            Some(end) if !empty => {
                assert_ne!(Some(end), from.as_deref(), "/messages `end` token did not advance");
                from = Some(end.to_owned());
            }
            _ => break,
        }
    }
    events
}

/// `event_id` of a JSON event.
pub fn event_id(ev: &Value) -> &str {
    ev["event_id"].as_str().unwrap_or_else(|| panic!("event without event_id: {ev}"))
}

/// The first `/messages` page in direction `dir` from the room's end ("b") or start ("f").
pub async fn first_page(api: &Api, room_id: &str, dir: &str, limit: u32) -> Vec<Value> {
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir={dir}&limit={limit}", enc(room_id));
    let res = api.get(&path).await.ok();
    res["chunk"].as_array().cloned().unwrap_or_else(|| panic!("no chunk in /messages: {res}"))
}

/// A node in this process on the in-process network `net` (federation without sockets), with
/// real sled in a temp dir and its client API on a free loopback port; the mesh is off.
pub async fn inproc_node(net: &std::sync::Arc<outpost::net::local::LocalNetwork>) -> (outpost::server::Node, TempDir) {
    inproc_node_with(net, |t| t).await
}

/// [`inproc_node`] whose federation requests go through `wrap(transport)` (to lose some).
pub async fn inproc_node_with(
    net: &std::sync::Arc<outpost::net::local::LocalNetwork>,
    wrap: impl FnOnce(
        std::sync::Arc<dyn outpost::core::federation::Transport>,
    ) -> std::sync::Arc<dyn outpost::core::federation::Transport>,
) -> (outpost::server::Node, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = outpost::config::Config {
        data_dir: dir.path().to_path_buf(),
        client_addr: "127.0.0.1:0".parse().expect("address"),
        ..Default::default()
    };
    config.mesh.enabled = false; // the in-process network carries federation here
    let n = outpost::server::start(config).await.expect("node starts");
    net.attach(n.core.server_name(), n.federation.clone());
    net.attach_core(&n.core);
    n.core.set_transport(wrap(net.transport(n.core.server_name())));
    (n, dir)
}

/// Runs matrix-sdk's `client.sync()` in the background (it also sends the client's key uploads,
/// key queries, key claims and to-device messages). Abort the handle to stop it.
pub fn spawn_sync(client: &Client) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        let settings = matrix_sdk::config::SyncSettings::default().timeout(Duration::from_secs(5));
        if let Err(e) = client.sync(settings).await {
            eprintln!("sync loop of {:?} ended: {e:?}", client.user_id());
        }
    })
}

/// Sends a plain-text message through matrix-sdk; returns its event id.
pub async fn send_text(room: &matrix_sdk::Room, body: &str) -> matrix_sdk::ruma::OwnedEventId {
    room.send(matrix_sdk::ruma::events::room::message::RoomMessageEventContent::text_plain(body))
        .await
        .unwrap_or_else(|e| panic!("sending {body:?} failed: {e:?}"))
        .response
        .event_id
}

/// A federation transport that loses (no answer, as over a lossy link) the next `lose` requests
/// whose path contains `path`, counting them in `lost`, and passes everything else on.
pub struct LosesRequests {
    pub inner: std::sync::Arc<dyn outpost::core::federation::Transport>,
    pub path: &'static str,
    pub lose: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub lost: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LosesRequests {
    /// Wraps `inner`, losing the next `lose` requests to `path`.
    pub fn new(
        inner: std::sync::Arc<dyn outpost::core::federation::Transport>,
        path: &'static str,
        lose: usize,
    ) -> Self {
        LosesRequests { inner, path, lose: std::sync::Arc::new(lose.into()), lost: Default::default() }
    }
}

impl outpost::core::federation::Transport for LosesRequests {
    fn send(
        &self,
        dest: ruma::OwnedServerName,
        req: http::Request<bytes::Bytes>,
    ) -> outpost::core::federation::BoxFuture<
        'static,
        Result<http::Response<bytes::Bytes>, outpost::core::federation::TransportError>,
    > {
        use std::sync::atomic::Ordering;
        let lost = req.uri().path().contains(self.path)
            && self.lose.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if lost {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Box::pin(
                async move { Err(outpost::core::federation::TransportError::Failed(dest, "lost".into())) },
            );
        }
        self.inner.send(dest, req)
    }
}
