//! outpost: a Matrix homeserver small enough that every device runs its own.
//!
//! # Layout
//! - `main.rs` — the `outpost` CLI (`run`).
//! - `config.rs` — settings: defaults, TOML file, `OUTPOST_*` environment.
//! - `server.rs` — wires a node together: opens sled, loads the key, serves HTTP, shuts down.
//! - `identity.rs` — the node key; server name = hex of the public key.
//! - `clock.rs` — the clock trait (real or virtual).
//! - `store/` — the key-value trait, sled and in-memory implementations, group commit.
//! - `core/` — the protocol, with no I/O of its own:
//!   `pdu.rs` (build/hash/sign/redact PDUs via ruma), `rooms.rs` (create, append with auth
//!   checks, membership), `state.rs` (state groups, auth chains, state resolution),
//!   `sync.rs` (sync, messages, context), `users.rs` (accounts, devices, profiles, account
//!   data, filters), `devices.rs` (device list/rename/delete, last seen), `e2ee.rs` (device
//!   and one-time keys, cross-signing, device-list changes, to-device inboxes), `backup.rs`
//!   (server-side key backup), `filter.rs`, `status.rs`, `media.rs` (media metadata,
//!   reservations).
//! - `media/` — media bytes behind the `MediaStore` trait (files under `<data-dir>/media`, or
//!   memory), upload streaming, thumbnails (`thumbnail.rs`, with the `image` crate).
//!   data, filters), `filter.rs`, `status.rs`; per-user and ephemeral data: `typing.rs`,
//!   `receipts.rs` (receipts, read markers, the ephemeral block of sync), `push.rs` (push
//!   rules, pushers, unread counts), `relations.rs` (relation index, bundled aggregations,
//!   `/relations`, `/threads`), `search.rs`, `tags.rs`, `presence.rs`, `user_directory.rs`.
//! - `core/federation/` — the server-server protocol: `sender.rs` (durable queues, transactions),
//!   `receive.rs` (PDU receipt checks), `join.rs`, `serve.rs`, `edu.rs` (typing, receipts,
//!   device lists, to-device as EDUs), `keys.rs` (keys across servers, cached remote device
//!   lists), `query.rs` (remote profiles and directories), `media.rs` (remote media cache),
//!   `merge.rs` (dummy events merging forks), `verdicts.rs` (what a server made of events — an
//!   outpost extension a rejoining server asks).
//! - `api/` — HTTP: `ruma_wrapper.rs` (request extractor), `error.rs` (errors → Matrix
//!   errors, in one place), `client/<spec area>.rs` (handlers `*_route`; `uiaa.rs` is the
//!   password stage of user-interactive auth), `server.rs` (server keys), `outpost.rs`
//!   (`/_outpost/v1` status and PDU inspection), `middleware.rs` (CORS on every response, the
//!   request log), `federation/` (the server-server router: transactions, membership, queries,
//!   `keys.rs`, `directory.rs`, `media.rs`).

#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod core;
pub mod identity;
pub mod media;
pub mod net;
pub mod server;
pub mod store;
