//! How federation requests travel between nodes.
//!
//! - `local.rs`: an in-process network (nodes in one process call each other's federation
//!   router directly) — for tests, examples and the simulator, with links that can be cut.
//! - The libp2p mesh (QUIC, TCP fallback, mDNS discovery) is `mesh.rs`.

pub mod local;
pub mod mesh;
