//! HTTP APIs: the client-server API (`client/`, one file per spec area), the server key
//! endpoint, and the local `/_outpost/v1` operator endpoints. Everything is built on axum with
//! ruma request/response types (see `ruma_wrapper`).

pub mod client;
pub mod error;
pub mod federation;
pub mod middleware;
pub mod outpost;
pub mod ruma_wrapper;
pub mod server;

use std::sync::Arc;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::IntoResponse,
    Router,
};

use crate::{config::Config, core::Core, media::Media};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// The protocol core.
    pub core: Arc<Core>,
    /// The node configuration.
    pub config: Arc<Config>,
    /// The mesh's peer table, once the mesh runs.
    pub mesh_peers: Arc<std::sync::OnceLock<crate::net::mesh::PeerTable>>,
    /// Media content and thumbnails.
    pub media: Arc<Media>,
}

/// Register `$handler` for every path (r0, v3, unstable) and the method of ruma endpoint `$req`.
#[macro_export]
macro_rules! ruma_route {
    ($router:expr, $req:ty, $handler:expr) => {{
        let mut r = $router;
        let method = <$req as ruma::api::Metadata>::METHOD;
        let filter = axum::routing::MethodFilter::try_from(method).expect("standard HTTP method");
        for path in $crate::api::ruma_wrapper::paths::<$req>() {
            r = r.route(&path, axum::routing::on(filter, $handler));
        }
        r
    }};
}

/// The complete router.
pub fn router(state: AppState) -> Router {
    let r = Router::new();
    let r = client::routes(r);
    let r = server::routes(r);
    let r = outpost::routes(r);
    r.fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        // CORS as the client-server spec requires, so browser clients work.
        .layer(axum::middleware::from_fn(middleware::cors))
        .layer(axum::middleware::map_response(server_header))
        .layer(axum::middleware::from_fn(middleware::request_log))
        .with_state(state)
}

async fn unrecognized() -> impl IntoResponse {
    error::ApiError::unrecognized()
}

async fn method_not_allowed() -> impl IntoResponse {
    error::ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Unrecognized request")
}

async fn server_header(mut res: axum::response::Response) -> axum::response::Response {
    res.headers_mut().insert(header::SERVER, HeaderValue::from_static(concat!("outpost/", env!("CARGO_PKG_VERSION"))));
    res
}
