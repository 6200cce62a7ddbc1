//! Relations of an event (reactions, edits, references, thread replies).

use axum::{extract::State, Json};
use ruma::{
    api::{
        client::relations::{
            get_relating_events, get_relating_events_with_rel_type, get_relating_events_with_rel_type_and_event_type,
        },
        Direction as RumaDir,
    },
    UInt,
};
use serde_json::Value;

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{
    relations::RelationsQuery,
    sync::{parse_token, Direction},
};

#[allow(clippy::too_many_arguments)]
fn query(
    rel_type: Option<String>,
    event_type: Option<String>,
    from: Option<&str>,
    to: Option<&str>,
    limit: Option<UInt>,
    dir: RumaDir,
    recurse: bool,
) -> Result<RelationsQuery, crate::core::Error> {
    Ok(RelationsQuery {
        rel_type,
        event_type,
        from: from.map(parse_token).transpose()?,
        to: to.map(parse_token).transpose()?,
        limit: limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX)),
        dir: match dir {
            RumaDir::Backward => Direction::Backward,
            RumaDir::Forward => Direction::Forward,
        },
        recurse,
    })
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
pub async fn get_relating_events_route(
    State(s): State<AppState>,
    body: Ruma<get_relating_events::v1::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let r = &body.body;
    let q = query(None, None, r.from.as_deref(), r.to.as_deref(), r.limit, r.dir, r.recurse)?;
    Ok(Json(s.core.relations(user, device, &r.room_id, &r.event_id, &q)?))
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
pub async fn get_relating_events_with_rel_type_route(
    State(s): State<AppState>,
    body: Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let r = &body.body;
    let q = query(Some(r.rel_type.to_string()), None, r.from.as_deref(), r.to.as_deref(), r.limit, r.dir, r.recurse)?;
    Ok(Json(s.core.relations(user, device, &r.room_id, &r.event_id, &q)?))
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}`
pub async fn get_relating_events_with_rel_type_and_event_type_route(
    State(s): State<AppState>,
    body: Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let r = &body.body;
    let q = query(
        Some(r.rel_type.to_string()),
        Some(r.event_type.to_string()),
        r.from.as_deref(),
        r.to.as_deref(),
        r.limit,
        r.dir,
        r.recurse,
    )?;
    Ok(Json(s.core.relations(user, device, &r.room_id, &r.event_id, &q)?))
}
