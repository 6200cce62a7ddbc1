//! The room directory: this server's, or (`?server=`) another server's over federation.

use axum::{extract::State, Json};
use ruma::api::client::directory::{
    get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility,
};
use ruma::api::client::room::Visibility;
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{federation::query::PublicRoomsQuery, Error};

/// # `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn get_room_visibility_route(
    State(s): State<AppState>,
    body: Ruma<get_room_visibility::v3::Request>,
) -> ApiResult<Json<Value>> {
    if s.core.room(&body.body.room_id)?.is_none() {
        return Err(Error::NotFound("unknown room".into()).into());
    }
    let v = if s.core.is_published(&body.body.room_id)? { "public" } else { "private" };
    Ok(Json(json!({"visibility": v})))
}

/// # `PUT /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn set_room_visibility_route(
    State(s): State<AppState>,
    body: Ruma<set_room_visibility::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room = &body.body.room_id;
    if s.core.membership(room, user)?.as_deref() != Some("join") {
        return Err(Error::Forbidden("you are not in this room".into()).into());
    }
    let public = body.body.visibility == Visibility::Public;
    s.core.set_directory_visibility(room, public).await?;
    Ok(Json(json!({})))
}

/// A page of this server's room directory (client and federation `publicRooms`).
pub(crate) fn page(
    s: &AppState,
    limit: Option<usize>,
    since: Option<&str>,
    term: Option<&str>,
) -> Result<Value, Error> {
    let mut rooms = Vec::new();
    for room in s.core.published_rooms()? {
        let entry = s.core.public_room_entry(&room)?;
        if let Some(t) = term.map(str::to_lowercase).filter(|t| !t.is_empty()) {
            let hay = format!(
                "{} {} {}",
                entry["name"].as_str().unwrap_or(""),
                entry["topic"].as_str().unwrap_or(""),
                entry["canonical_alias"].as_str().unwrap_or("")
            )
            .to_lowercase();
            if !hay.contains(&t) {
                continue;
            }
        }
        rooms.push(entry);
    }
    rooms.sort_by_key(|r| std::cmp::Reverse(r["num_joined_members"].as_u64().unwrap_or(0)));
    let total = rooms.len();
    let start: usize = since.and_then(|t| t.strip_prefix('p')).and_then(|n| n.parse().ok()).unwrap_or(0);
    let limit = limit.unwrap_or(100).clamp(1, 500);
    let chunk: Vec<Value> = rooms.into_iter().skip(start).take(limit).collect();
    let mut out = json!({"chunk": chunk, "total_room_count_estimate": total});
    if start + limit < total {
        out["next_batch"] = json!(format!("p{}", start + limit));
    }
    if start > 0 {
        out["prev_batch"] = json!(format!("p{}", start.saturating_sub(limit)));
    }
    Ok(out)
}

/// # `GET /_matrix/client/v3/publicRooms`
pub async fn get_public_rooms_route(
    State(s): State<AppState>,
    body: Ruma<get_public_rooms::v3::Request>,
) -> ApiResult<Json<Value>> {
    let limit = body.body.limit.map(|l| u64::from(l) as usize);
    if let Some(server) = body.body.server.as_deref().filter(|x| *x != s.core.server_name()) {
        let q = PublicRoomsQuery { limit: limit.map(|l| l as u64), since: body.body.since.clone(), term: None };
        return Ok(Json(s.core.remote_public_rooms(server, q).await?));
    }
    Ok(Json(page(&s, limit, body.body.since.as_deref(), None)?))
}

/// # `POST /_matrix/client/v3/publicRooms`
pub async fn get_public_rooms_filtered_route(
    State(s): State<AppState>,
    body: Ruma<get_public_rooms_filtered::v3::Request>,
) -> ApiResult<Json<Value>> {
    let limit = body.body.limit.map(|l| u64::from(l) as usize);
    let term = body.body.filter.generic_search_term.as_deref();
    if let Some(server) = body.body.server.as_deref().filter(|x| *x != s.core.server_name()) {
        let q = PublicRoomsQuery {
            limit: limit.map(|l| l as u64),
            since: body.body.since.clone(),
            term: term.map(str::to_owned),
        };
        return Ok(Json(s.core.remote_public_rooms(server, q).await?));
    }
    Ok(Json(page(&s, limit, body.body.since.as_deref(), term)?))
}
