//! Thread roots of a room.

use axum::{
    extract::{FromRequest, Request, State},
    Json,
};
use ruma::api::client::threads::get_threads::{self, v1::IncludeThreads};
use serde_json::Value;

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::sync::parse_token;

/// # `GET /_matrix/client/v1/rooms/{roomId}/threads`
///
/// Most recently active threads first; `include=participated` keeps threads the caller
/// started or replied to. `include` is optional in the spec (default `all`), but ruma's server
/// side requires it, so it is filled in before parsing.
pub async fn get_threads_route(State(s): State<AppState>, req: Request) -> ApiResult<Json<Value>> {
    let req = with_default_include(req);
    let body = Ruma::<get_threads::v1::Request>::from_request(req, &s).await?;
    let (user, device) = body.sender()?;
    let r = &body.body;
    let from = r.from.as_deref().map(parse_token).transpose()?;
    let limit = r.limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX));
    let participated = r.include == IncludeThreads::Participated;
    Ok(Json(s.core.threads(user, device, &r.room_id, participated, from, limit)?))
}

fn with_default_include(mut req: Request) -> Request {
    let uri = req.uri();
    let query = uri.query().unwrap_or("");
    if query.split('&').any(|kv| kv == "include" || kv.starts_with("include=")) {
        return req;
    }
    let q = if query.is_empty() { "include=all".to_owned() } else { format!("{query}&include=all") };
    if let Ok(new) = format!("{}?{q}", uri.path()).parse() {
        *req.uri_mut() = new;
    }
    req
}
