//! Two outpost nodes in one process, federating over real QUIC on loopback: node B knows node
//! A's address (a static peer), Bob on B is invited by Alice on A, joins, and they talk.
//!
//! ```sh
//! cargo run --example two_nodes
//! ```
//! Both nodes also serve the client API on loopback (printed), so a Matrix client can watch.

use std::time::Duration;

use outpost::{
    config::Config,
    core::{pdu::PduTemplate, rooms::CreateRoomSpec},
    server,
};
use ruma::events::TimelineEventType;
use serde_json::json;

fn config(dir: &std::path::Path, listen: &str, peers: Vec<String>) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.client_addr = "127.0.0.1:0".parse().expect("address");
    c.mesh.listen = vec![listen.to_owned()];
    c.mesh.peers = peers;
    c.mesh.mdns = false; // loopback only: no multicast on this machine's networks
    c
}

fn text(body: &str) -> PduTemplate {
    PduTemplate {
        kind: TimelineEventType::RoomMessage,
        content: json!({"msgtype": "m.text", "body": body}),
        state_key: None,
        redacts: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (da, db) = (tempfile_dir("a")?, tempfile_dir("b")?);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let a = server::start(config(&da, &format!("/ip4/127.0.0.1/udp/{port}/quic-v1"), vec![])).await?;
    let b =
        server::start(config(&db, "/ip4/127.0.0.1/udp/0/quic-v1", vec![format!("/ip4/127.0.0.1/udp/{port}/quic-v1")]))
            .await?;
    println!("node A: {} (clients: {})", a.core.server_name(), a.client_url());
    println!("node B: {} (clients: {})", b.core.server_name(), b.client_url());

    let alice = a.core.register("alice", Some("secret")).await?;
    let bob = b.core.register("bob", Some("secret")).await?;
    let room =
        a.core.create_room(&alice, CreateRoomSpec { name: Some("two nodes".into()), ..Default::default() }).await?;
    // The invite needs the QUIC link; B dials A at start, so retry briefly.
    let mut tries = 0;
    while let Err(e) = a.core.set_membership(&alice, &room, &bob, "invite", None, None).await {
        tries += 1;
        if tries > 100 {
            return Err(format!("invite failed: {e}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.core.join_remote(&bob, &room, &[a.core.server_name().to_owned()]).await?;
    println!("{bob} joined {room} over QUIC");

    a.core.send_event(&alice, None, &room, text("Hello from node A"), None).await?;
    b.core.send_event(&bob, None, &room, text("Hello back from node B"), None).await?;

    // Wait until each side has both messages, then print B's view.
    let want = ["Hello from node A", "Hello back from node B"];
    for _ in 0..200 {
        let seen = |core: &outpost::core::Core, user: &ruma::UserId| -> Vec<String> {
            let dev = ruma::OwnedDeviceId::from("EXAMPLE");
            let f = ruma::api::client::filter::RoomEventFilter::default();
            core.messages(user, &dev, &room, None, None, outpost::core::sync::Direction::Backward, 50, &f)
                .map(|p| p.chunk.iter().rev().filter_map(|e| e["content"]["body"].as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let (sa, sb) = (seen(&a.core, &alice), seen(&b.core, &bob));
        if want.iter().all(|w| sa.iter().any(|s| s == w) && sb.iter().any(|s| s == w)) {
            println!("B's timeline: {sb:?}");
            a.stop().await?;
            b.stop().await?;
            let _ = std::fs::remove_dir_all(&da);
            let _ = std::fs::remove_dir_all(&db);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("messages did not cross within 10 s".into())
}

fn tempfile_dir(tag: &str) -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("outpost-example-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
