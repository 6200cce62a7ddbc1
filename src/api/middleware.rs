//! Middleware around every HTTP route: CORS (so browser clients work) and the request log.

use std::time::Instant;

use axum::{
    extract::Request,
    http::{header, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The `errcode` of an error response, left in the response extensions by
/// `ApiError::into_response` for the request log.
#[derive(Clone, Copy, Debug)]
pub struct ErrCode(pub &'static str);

/// CORS as the client-server spec recommends: every response, errors and unknown paths
/// included, carries the three `Access-Control-Allow-*` headers, and any `OPTIONS` request
/// (a browser's preflight) is answered 204 at once, without authentication.
pub async fn cors(req: Request, next: Next) -> Response {
    let mut res =
        if req.method() == Method::OPTIONS { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Accept"),
    );
    res
}

/// Logs every request once it is answered, on target `outpost::http`: method, path (never
/// the query, which may hold an access token), status, `errcode` of errors, and duration.
/// Successes log at DEBUG, client errors at INFO, server errors at WARN; run with
/// `RUST_LOG=info,outpost::http=debug` to see every request.
pub async fn request_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16();
    let errcode = res.extensions().get::<ErrCode>().map_or("", |e| e.0);
    let ms = started.elapsed().as_millis() as u64;
    if status >= 500 {
        tracing::warn!(target: "outpost::http", %method, path, status, errcode, ms, "request");
    } else if status >= 400 {
        tracing::info!(target: "outpost::http", %method, path, status, errcode, ms, "request");
    } else {
        tracing::debug!(target: "outpost::http", %method, path, status, ms, "request");
    }
    res
}
