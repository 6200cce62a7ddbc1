//! Server-side search of room messages (a bounded scan; see `core::search`).

use axum::{extract::State, Json};
use ruma::api::client::search::search_events::{
    self,
    v3::{GroupingKey, OrderBy},
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::search::SearchQuery;

/// # `POST /_matrix/client/v3/search`
///
/// Only the `room_events` category exists.
pub async fn search_events_route(
    State(s): State<AppState>,
    body: Ruma<search_events::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let Some(c) = &body.body.search_categories.room_events else {
        return Ok(Json(json!({"search_categories": {}})));
    };
    // ruma fills in a default context; the spec returns one only when asked for.
    let asked_context = body.json.pointer("/search_categories/room_events/event_context").is_some();
    let lim =
        |u: ruma::UInt| usize::try_from(u64::from(u)).unwrap_or(usize::MAX).min(s.core.limits().timeline_limit_max);
    let q = SearchQuery {
        term: c.search_term.clone(),
        keys: c.keys.iter().flatten().map(|k| k.as_str().to_owned()).collect(),
        filter: c.filter.clone(),
        recent: c.order_by == Some(OrderBy::Recent),
        before_limit: if asked_context { lim(c.event_context.before_limit) } else { 0 },
        after_limit: if asked_context { lim(c.event_context.after_limit) } else { 0 },
        include_profile: asked_context && c.event_context.include_profile,
        include_state: c.include_state.unwrap_or(false),
        group_by_room: c.groupings.group_by.iter().any(|g| g.key == Some(GroupingKey::RoomId)),
        group_by_sender: c.groupings.group_by.iter().any(|g| g.key == Some(GroupingKey::Sender)),
        next_batch: body.body.next_batch.clone(),
    };
    Ok(Json(s.core.search(user, device, &q)?))
}
