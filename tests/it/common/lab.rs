//! A network lab for real-stack tests: real `outpost` processes, each in its own network
//! namespace, joined by a Linux bridge this module creates. Each node's mesh interface is
//! `mesh0` (IPv4 only, on the bridge); it finds the others by mDNS alone (no static peers).
//!
//! Faults, all applied *inside the node's namespace* with one nftables table (`inet
//! outpost_lab`, rewritten atomically on every change) or on the node's mesh veth with `tc`:
//! - [`Lab::cut`] / [`Lab::restore`]: the node's link goes down — every packet on `mesh0` is
//!   dropped both ways (QUIC, TCP, mDNS);
//! - [`Lab::partition`] / [`Lab::heal`]: groups; a node drops packets from and to nodes outside
//!   its group (mDNS multicast is dropped by the receivers, by source address);
//! - [`Lab::set_loss`]: random loss, `numgen random mod 100 < P drop`, each way;
//! - [`Lab::set_rate`]: bandwidth, a `tbf` qdisc on both ends of the node's mesh veth.
//!
//! There is no delay: this kernel has no `sch_netem`. `tbf` with a queue bound (`latency`)
//! delays packets only while a link is saturated.
//!
//! The test process reaches each node's client API over a second, fault-free link: a veth pair
//! of its own (`api0` in the namespace, a /30 with the host), as an app on the device itself
//! would reach it over loopback. That link carries nothing but TCP to and from the client port
//! (nftables drops the rest), and the namespaces have no routes beyond their own links, so
//! mesh traffic cannot take it. Processes, namespaces and the bridge are removed on drop, also
//! when a test panics (a panicking test prints the tail of every node's log and keeps the whole
//! log as `$TMPDIR/olb<pid>-node<i>.log`; `OUTPOST_LAB_KEEP_LOGS=1` keeps them after a pass
//! too). Labs of test processes that were killed (no drop) are removed by the next
//! [`Lab::new`]. Needs root: [`Lab::new`] returns `None` (and says so) otherwise.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Api;

/// The client-API port of every node (each has its own address).
pub const CLIENT_PORT: u16 = 8008;
/// Prefixes of everything a lab creates: `<prefix><pid>…`.
const NS_PREFIX: &str = "opl";
const BRIDGE_PREFIX: &str = "olb";
const VETH_PREFIX: &str = "olv";
/// The nftables table each namespace gets.
const TABLE: &str = "outpost_lab";

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs a command, panicking with its stderr if it fails.
#[track_caller]
fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(out.status.success(), "command failed: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `nft -f -` inside namespace `ns` with `script` on stdin.
#[track_caller]
fn nft(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write nft script");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft failed in {ns}: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// What the lab does to one node's link.
#[derive(Clone, Debug, Default)]
struct LinkFaults {
    /// Link down: drop everything on `mesh0`.
    cut: bool,
    /// Addresses of nodes outside this node's partition group.
    blocked: BTreeSet<String>,
    /// Random loss each way, percent.
    loss_pct: u8,
}

/// One node: its namespace, veths, addresses and (when running) its `outpost` process.
struct Slot {
    ns: String,
    /// Host end of the mesh veth (on the bridge).
    host_veth: String,
    /// Address on `mesh0`.
    ip: String,
    /// Address on `api0` (the client API).
    api_ip: String,
    faults: LinkFaults,
    /// Data dir and log, kept across restarts; deleted with the lab.
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
    rate_kbit: Option<u32>,
}

impl Slot {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("outpost.log")
    }
}

/// Namespaces on a bridge, with one `outpost` node per namespace.
pub struct Lab {
    bridge: String,
    /// Mesh addresses are `10.213.<subnet>.<i + 1>`; API links are the /30s of `10.214.<subnet>.0/24`.
    subnet: u8,
    slots: Vec<Slot>,
    http: reqwest::Client,
}

impl Lab {
    /// Creates `n` namespaces on a new bridge (no node started yet), or `None` when not root.
    pub fn new(n: usize) -> Option<Lab> {
        if !is_root() {
            eprintln!("skipped: network namespaces need root (CI runs as root)");
            return None;
        }
        assert!((1..=60).contains(&n), "a lab has 1..=60 nodes");
        remove_stale_labs();
        let pid = std::process::id();
        let bridge = format!("{BRIDGE_PREFIX}{pid}");
        let subnet = free_subnet(pid);
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("reqwest");
        // From here on, whatever was created is removed by Drop, also if a step panics.
        let mut lab = Lab { bridge: bridge.clone(), subnet, slots: Vec::new(), http };
        // The bridge has no address: the host takes no part in the mesh.
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("{NS_PREFIX}{pid}n{i}");
            let host_veth = format!("{VETH_PREFIX}{pid}h{i}");
            let peer_veth = format!("{VETH_PREFIX}{pid}p{i}");
            let api_host = format!("{VETH_PREFIX}{pid}a{i}");
            let api_peer = format!("{VETH_PREFIX}{pid}b{i}");
            let ip = format!("10.213.{subnet}.{}", i + 1);
            let (api_host_ip, api_ip) =
                (format!("10.214.{subnet}.{}", 4 * i + 1), format!("10.214.{subnet}.{}", 4 * i + 2));
            sh(&["ip", "netns", "add", &ns]);
            let dir = tempfile::Builder::new().prefix("outpost-lab-").tempdir().expect("temp dir");
            lab.slots.push(Slot {
                ns: ns.clone(),
                host_veth: host_veth.clone(),
                ip: ip.clone(),
                api_ip: api_ip.clone(),
                faults: LinkFaults::default(),
                dir,
                child: None,
                starts: 0,
                rate_kbit: None,
            });
            let in_ns = |args: &[&str]| sh(&[&["ip", "netns", "exec", ns.as_str()], args].concat());
            // IPv4 only: the partition rules match IPv4 addresses, mDNS must not slip past on v6.
            in_ns(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            in_ns(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
            in_ns(&["ip", "link", "set", "lo", "up"]);
            // The mesh link, on the bridge.
            sh(&["ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &peer_veth]);
            sh(&["ip", "link", "set", &host_veth, "master", &bridge]);
            sh(&["ip", "link", "set", &host_veth, "up"]);
            sh(&["ip", "link", "set", &peer_veth, "netns", &ns]);
            in_ns(&["ip", "link", "set", &peer_veth, "name", "mesh0"]);
            in_ns(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "mesh0"]);
            in_ns(&["ip", "link", "set", "mesh0", "up"]);
            // The client-API link, point to point with the host.
            sh(&["ip", "link", "add", &api_host, "type", "veth", "peer", "name", &api_peer]);
            sh(&["ip", "addr", "add", &format!("{api_host_ip}/30"), "dev", &api_host]);
            sh(&["ip", "link", "set", &api_host, "up"]);
            sh(&["ip", "link", "set", &api_peer, "netns", &ns]);
            in_ns(&["ip", "link", "set", &api_peer, "name", "api0"]);
            in_ns(&["ip", "addr", "add", &format!("{api_ip}/30"), "dev", "api0"]);
            in_ns(&["ip", "link", "set", "api0", "up"]);
            lab.apply_faults(i);
        }
        Some(lab)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Node `i`'s address on `mesh0`.
    pub fn ip(&self, i: usize) -> &str {
        &self.slots[i].ip
    }

    /// Node `i`'s network namespace.
    pub fn namespace(&self, i: usize) -> &str {
        &self.slots[i].ns
    }

    /// `http://<api0 address>:8008` of node `i` (over the fault-free API link).
    pub fn base_url(&self, i: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.slots[i].api_ip)
    }

    /// Raw client-API access to node `i`, optionally as the user holding `token`.
    pub fn api(&self, i: usize, token: Option<&str>) -> Api {
        Api { http: self.http.clone(), base_url: self.base_url(i), token: token.map(str::to_owned) }
    }

    /// Node `i`'s log so far (all its starts).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.slots[i].log_path()).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Starts (or restarts, keeping the data dir) `outpost run` in node `i`'s namespace: mDNS on
    /// `mesh0` only, no static peers. Does not wait; see [`Lab::wait_ready`].
    pub fn spawn(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        assert!(slot.child.is_none(), "node {i} is already running");
        slot.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(slot.log_path()).expect("open node log");
        let _ = writeln!(log, "===== lab: start #{} of node {i} in {} =====", slot.starts, slot.ns);
        let stderr = log.try_clone().expect("clone log handle");
        // `ip netns exec` execs the binary after entering the namespace: the child *is* outpost.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &slot.ns, env!("CARGO_BIN_EXE_outpost"), "run"])
            .arg("--data-dir")
            .arg(slot.dir.path().join("data"))
            .args(["--client-addr", &format!("{}:{CLIENT_PORT}", slot.api_ip)])
            .args(["--listen", "/ip4/0.0.0.0/udp/8448/quic-v1", "--listen", "/ip4/0.0.0.0/tcp/8448"])
            .args(["--mdns-interface", "mesh0"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTPOST_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "info,outpost=debug").env("NO_COLOR", "1");
        slot.child = Some(cmd.spawn().expect("spawn outpost in namespace"));
    }

    /// Waits (up to 30 s) until node `i` answers `GET /_matrix/client/versions`; panics if it
    /// exits or times out.
    pub async fn wait_ready(&mut self, i: usize) {
        let url = format!("{}/_matrix/client/versions", self.base_url(i));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self.slots[i].child.as_mut().map(|c| c.try_wait().ok().flatten());
            match exited {
                None => panic!("node {i} is not running"),
                Some(Some(status)) => panic!("node {i} exited ({status}) before becoming ready"),
                Some(None) => {}
            }
            let ok = self.http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if ok.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return;
            }
            assert!(Instant::now() < deadline, "node {i} not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Lab::spawn`] then [`Lab::wait_ready`].
    pub async fn start(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// SIGKILLs node `i` (no chance to flush anything) and reaps it; its data dir stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.slots[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.slots[i].child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Link down for node `i`: every packet on its `mesh0` is dropped, both ways.
    pub fn cut(&mut self, i: usize) {
        self.slots[i].faults.cut = true;
        self.apply_faults(i);
    }

    /// Link up again for node `i` (partition groups and loss stay as they were).
    pub fn restore(&mut self, i: usize) {
        self.slots[i].faults.cut = false;
        self.apply_faults(i);
    }

    /// Splits the nodes into `groups` (every node in exactly one): traffic between groups is
    /// dropped. Replaces any earlier partition.
    pub fn partition(&mut self, groups: &[&[usize]]) {
        let mut seen: Vec<usize> = groups.iter().flat_map(|g| g.iter().copied()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..self.len()).collect::<Vec<_>>(), "every node in exactly one group");
        for group in groups {
            for &i in *group {
                let blocked =
                    (0..self.len()).filter(|j| !group.contains(j)).map(|j| self.slots[j].ip.clone()).collect();
                self.slots[i].faults.blocked = blocked;
                self.apply_faults(i);
            }
        }
    }

    /// Ends a partition (cuts and loss stay as they were).
    pub fn heal(&mut self) {
        for i in 0..self.len() {
            self.slots[i].faults.blocked.clear();
            self.apply_faults(i);
        }
    }

    /// Random loss of `pct` percent of the packets on node `i`'s link, each way (0 = none).
    pub fn set_loss(&mut self, i: usize, pct: u8) {
        assert!(pct <= 100);
        self.slots[i].faults.loss_pct = pct;
        self.apply_faults(i);
    }

    /// Limits node `i`'s link to `kbit` kbit/s each way with a token bucket (`tbf`) on both ends
    /// of its veth, queueing up to 200 ms beyond the burst; `None` removes the limit.
    pub fn set_rate(&mut self, i: usize, kbit: Option<u32>) {
        let slot = &mut self.slots[i];
        for in_ns in [false, true] {
            // The host end shapes what the node receives; `mesh0` what it sends.
            let mut cmd: Vec<&str> = if in_ns { vec!["ip", "netns", "exec", &slot.ns, "tc"] } else { vec!["tc"] };
            let dev = if in_ns { "mesh0" } else { slot.host_veth.as_str() };
            if slot.rate_kbit.is_some() {
                sh(&[&cmd[..], &["qdisc", "del", "dev", dev, "root"]].concat());
            }
            if let Some(k) = kbit {
                let rate = format!("{k}kbit");
                // The bucket holds at least two full-size packets and ~10 ms at the rate.
                let burst = (k as usize * 1000 / 8 / 100).max(3000).to_string();
                cmd.extend_from_slice(&["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate]);
                cmd.extend_from_slice(&["burst", &burst, "latency", "200ms"]);
                sh(&cmd);
            }
        }
        slot.rate_kbit = kbit;
    }

    /// Rewrites node `i`'s nftables table from its [`LinkFaults`], in one transaction.
    fn apply_faults(&mut self, i: usize) {
        let slot = &self.slots[i];
        let f = &slot.faults;
        let mut mesh_in = Vec::new();
        let mut mesh_out = Vec::new();
        if f.cut {
            mesh_in.push("drop".to_owned());
            mesh_out.push("drop".to_owned());
        }
        if !f.blocked.is_empty() {
            let set = f.blocked.iter().cloned().collect::<Vec<_>>().join(", ");
            mesh_in.push(format!("ip saddr {{ {set} }} drop"));
            mesh_out.push(format!("ip daddr {{ {set} }} drop"));
        }
        if f.loss_pct > 0 {
            mesh_in.push(format!("numgen random mod 100 < {} drop", f.loss_pct));
            mesh_out.push(format!("numgen random mod 100 < {} drop", f.loss_pct));
        }
        let rules = |rules: &[String]| rules.iter().map(|r| format!("    {r}\n")).collect::<String>();
        // `table …` first so that `delete` works on the first call; the whole script is one
        // nftables transaction. `api0` carries the client API only; the `mesh` chains hold the
        // faults of `mesh0`.
        let script = format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
             \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n\
             \x20   iifname \"api0\" tcp dport {CLIENT_PORT} accept\n\
             \x20   iifname \"api0\" drop\n\
             \x20   iifname \"mesh0\" jump mesh_in\n  }}\n\
             \x20 chain output {{\n    type filter hook output priority 0; policy accept;\n\
             \x20   oifname \"api0\" tcp sport {CLIENT_PORT} accept\n\
             \x20   oifname \"api0\" drop\n\
             \x20   oifname \"mesh0\" jump mesh_out\n  }}\n\
             \x20 chain mesh_in {{\n{}  }}\n\
             \x20 chain mesh_out {{\n{}  }}\n}}\n",
            rules(&mesh_in),
            rules(&mesh_out),
        );
        nft(&slot.ns, &script);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for i in 0..self.slots.len() {
            self.kill(i);
            let keep = std::env::var_os("OUTPOST_LAB_KEEP_LOGS").is_some();
            if panicking || keep {
                // The whole log outlives the lab (for a postmortem).
                let log = self.log(i);
                let kept = std::env::temp_dir().join(format!("{}-node{i}.log", self.bridge));
                let _ = std::fs::write(&kept, &log);
                if !panicking {
                    eprintln!("node {i} log kept in {}", kept.display());
                    continue;
                }
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(150)..];
                eprintln!(
                    "----- node {i} log (all {} lines kept in {}; the last {}) -----\n{}\n----- end of node {i} log -----",
                    lines.len(),
                    kept.display(),
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        // Deleting a namespace deletes its end of the veth pair (and so both ends) and its
        // nftables table.
        for slot in &self.slots {
            let _ = Command::new("ip").args(["netns", "del", &slot.ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// A free `x` for this lab's addresses: no interface of the host has an address in
/// `10.214.<x>.0/24` (where the API links' host ends go), starting from a value derived from
/// the pid so that parallel tests rarely race for the same one.
fn free_subnet(pid: u32) -> u8 {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().expect("ip addr");
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = pid % 200;
    (0..200)
        .map(|k| ((start + k) % 200 + 20) as u8)
        .find(|x| !used.contains(&format!(" 10.214.{x}.")))
        .expect("a free 10.214.x.0/24")
}

/// Removes namespaces and bridges left by lab processes that no longer run (a test process
/// killed before its `Lab` was dropped). Only names this module creates, only dead pids.
fn remove_stale_labs() {
    let alive = |pid: &str| pid.parse::<u32>().is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some((pid, _)) = name.strip_prefix(NS_PREFIX).and_then(|r| r.split_once('n')) else { continue };
        if !alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    let out = Command::new("ip").args(["-o", "link", "show", "type", "bridge"]).output().expect("ip link show");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        let Some(pid) = name.strip_prefix(BRIDGE_PREFIX) else { continue };
        if !alive(pid) {
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }
}
