//! Server-server endpoints served on the client listener: the server key.
//! (Federation proper runs over the libp2p mesh; see DESIGN.md.)

use axum::{extract::State, routing::get, Json, Router};
use serde_json::Value;

use super::AppState;

/// Add the routes.
pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/_matrix/key/v2/server", get(get_server_keys_route))
        .route("/_matrix/key/v2/server/{key_id}", get(get_server_keys_route))
}

/// # `GET /_matrix/key/v2/server`
///
/// The node's single key, self-signed. The server name *is* the hex of this key, so any peer
/// can check this answer from the name alone.
pub async fn get_server_keys_route(State(s): State<AppState>) -> Json<Value> {
    Json(s.core.server_keys())
}
