//! Zero-configuration discovery: two real `outpost` processes, each in its own network
//! namespace, joined by a bridge this test creates — no static peers, only mDNS on the
//! namespaces' own interfaces. They find each other, connect over QUIC and federate.
//!
//! Needs root (network namespaces); CI runs as root. mDNS never touches the host's real
//! interfaces: each node sees only its namespace's veth, and the bridge connects nothing else.

use crate::common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{poll_until, Api};
use serde_json::json;

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().expect("run ip");
    assert!(st.success(), "command failed: {args:?}");
}

fn is_root() -> bool {
    // SAFETY-free check: `id -u`.
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Namespaces, veths and a bridge, removed on drop.
struct Lab {
    tag: String,
    namespaces: Vec<String>,
    bridge: String,
}

impl Lab {
    fn new(n: usize) -> Lab {
        let tag = format!("{}", std::process::id() % 100_000);
        let bridge = format!("obr{tag}");
        let lab = Lab { tag: tag.clone(), namespaces: Vec::new(), bridge: bridge.clone() };
        let mut lab = lab;
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{}/24", lab.ip(254)), "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("opt{tag}n{i}");
            let host = format!("ov{tag}h{i}");
            let peer = format!("ov{tag}p{i}");
            sh(&["ip", "netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer]);
            sh(&["ip", "link", "set", &host, "master", &bridge]);
            sh(&["ip", "link", "set", &host, "up"]);
            sh(&["ip", "link", "set", &peer, "netns", &ns]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "name", "mesh0"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", lab.ip(i as u8 + 1)),
                "dev",
                "mesh0",
            ]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "mesh0", "up"]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Addresses in 10.213.<x>.0/24, x derived from the tag so parallel runs don't clash.
    fn ip(&self, host: u8) -> String {
        let x: u32 = self.tag.parse::<u32>().unwrap_or(0) % 200 + 20;
        format!("10.213.{x}.{host}")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

struct NsNode {
    child: Child,
    api_base: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for NsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- node log {}:\n{}", self.api_base, std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn start_in_ns(ns: &str, ip: &str) -> NsNode {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("outpost.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_outpost"), "run"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--client-addr", &format!("{ip}:8008")])
        .args(["--listen", "/ip4/0.0.0.0/udp/8448/quic-v1", "--listen", "/ip4/0.0.0.0/tcp/8448"])
        .args(["--mdns-interface", "mesh0"])
        .env("RUST_LOG", "info,outpost=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("spawn outpost in namespace");
    NsNode { child, api_base: format!("http://{ip}:8008"), log, _dir: dir }
}

fn api(node: &NsNode, token: Option<String>) -> Api {
    Api { http: reqwest::Client::new(), base_url: node.api_base.clone(), token }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_link_find_each_other_by_mdns_alone() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let lab = Lab::new(2);
    let a = start_in_ns(&lab.namespaces[0], &lab.ip(1));
    let b = start_in_ns(&lab.namespaces[1], &lab.ip(2));
    for n in [&a, &b] {
        poll_until(Duration::from_secs(20), "node ready", || async {
            let r = api(n, None).try_request(reqwest::Method::GET, "/_matrix/client/versions", None).await.ok()?;
            (r.status == 200).then_some(())
        })
        .await;
    }
    let (_, alice_token) = api(&a, None).register("alice", "pw").await;
    let (bob_id, bob_token) = api(&b, None).register("bob", "pw").await;
    let alice = api(&a, Some(alice_token));
    let bob = api(&b, Some(bob_token));
    let room =
        alice.post("/_matrix/client/v3/createRoom", &json!({})).await.ok()["room_id"].as_str().unwrap().to_owned();
    // No static peers: the invite can only reach bob's node once mDNS found it.
    poll_until(Duration::from_secs(30), "invite over the mDNS-discovered link", || async {
        let r = alice.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), &json!({"user_id": bob_id})).await;
        (r.status == 200).then_some(())
    })
    .await;
    let r = bob.post(&format!("/_matrix/client/v3/join/{room}"), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/1"),
            &json!({"msgtype": "m.text", "body": "found you"}),
        )
        .await
        .ok();
    poll_until(Duration::from_secs(20), "message at bob", || async {
        let s = bob.get("/_matrix/client/v3/sync").await.ok();
        s["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()?
            .iter()
            .any(|e| e["content"]["body"] == "found you")
            .then_some(())
    })
    .await;
    // The peer list shows the link (found by mDNS or by the other side's mDNS dial).
    let peers = alice.get("/_outpost/v1/peers").await.ok();
    assert!(peers["peers"].as_array().unwrap().iter().any(|p| p["connected"] == true), "{peers}");
}
