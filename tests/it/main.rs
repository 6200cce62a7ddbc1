//! All black-box integration tests in one test binary (one link, one ~300 MB executable instead
//! of one per file). Each module is a former `tests/<name>.rs`; select one with
//! `cargo nextest run -E 'test(/^client_api::/)'`.

#![recursion_limit = "256"]

mod client_api;
mod common;
mod discovery;
mod e2ee;
mod ephemeral;
mod errors;
mod federation_features;
mod federation_local;
mod hostile;
mod media;
mod mesh;
mod mesh_e2ee;
mod partition;
mod realstack;
mod relations;
mod spec_vectors;
