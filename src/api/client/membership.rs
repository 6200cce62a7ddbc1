//! Membership: join, invite, leave, forget, kick, ban, unban, and member lists.

use axum::{extract::State, Json};
use ruma::{
    api::client::membership::{
        ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias,
        joined_members, joined_rooms, kick_user, leave_room, unban_user,
    },
    OwnedRoomId, OwnedServerName, RoomId, UserId,
};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{Core, Error};

/// Join a room (see [`Core::join_room`]).
async fn join(
    core: &Arc<Core>,
    user: &UserId,
    room: &RoomId,
    reason: Option<String>,
    via: Vec<OwnedServerName>,
) -> Result<OwnedRoomId, Error> {
    core.join_room(user, room, reason, via).await
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join_room_by_id_route(
    State(s): State<AppState>,
    body: Ruma<join_room_by_id::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room = join(&s.core, user, &body.body.room_id, body.body.reason.clone(), Vec::new()).await?;
    Ok(Json(json!({"room_id": room})))
}

/// # `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_room_by_id_or_alias_route(
    State(s): State<AppState>,
    body: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let target = &body.body.room_id_or_alias;
    let mut via: Vec<OwnedServerName> = body.body.via.clone();
    let room_id = if target.is_room_id() {
        RoomId::parse(target.as_str()).map_err(|e| Error::InvalidParam(e.to_string()))?
    } else {
        let alias = ruma::RoomAliasId::parse(target.as_str()).map_err(|e| Error::InvalidParam(e.to_string()))?;
        let (room, servers) = s.core.resolve_alias_anywhere(&alias).await?;
        via.extend(servers);
        room
    };
    let room = join(&s.core, user, &room_id, body.body.reason.clone(), via).await?;
    Ok(Json(json!({"room_id": room})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/invite`
pub async fn invite_user_route(
    State(s): State<AppState>,
    body: Ruma<invite_user::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let invite_user::v3::InvitationRecipient::UserId(invitee) = &body.body.recipient else {
        return Err(Error::Unknown("third-party invites are not supported".into()).into());
    };
    s.core.set_membership(user, &body.body.room_id, &invitee.user_id, "invite", invitee.reason.clone(), None).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave_room_route(
    State(s): State<AppState>,
    body: Ruma<leave_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if s.core.room(&body.body.room_id)?.is_none() && s.core.pending_invite(user, &body.body.room_id)?.is_some() {
        s.core.reject_invite(user, &body.body.room_id, body.body.reason.clone()).await?;
        return Ok(Json(json!({})));
    }
    s.core.set_membership(user, &body.body.room_id, user, "leave", body.body.reason.clone(), None).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub async fn forget_room_route(
    State(s): State<AppState>,
    body: Ruma<forget_room::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.forget_room(user, &body.body.room_id).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/kick`
pub async fn kick_user_route(State(s): State<AppState>, body: Ruma<kick_user::v3::Request>) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core
        .set_membership(user, &body.body.room_id, &body.body.user_id, "leave", body.body.reason.clone(), None)
        .await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/ban`
pub async fn ban_user_route(State(s): State<AppState>, body: Ruma<ban_user::v3::Request>) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.set_membership(user, &body.body.room_id, &body.body.user_id, "ban", body.body.reason.clone(), None).await?;
    Ok(Json(json!({})))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/unban`
pub async fn unban_user_route(
    State(s): State<AppState>,
    body: Ruma<unban_user::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if s.core.membership(&body.body.room_id, &body.body.user_id)?.as_deref() != Some("ban") {
        return Err(Error::Forbidden("that user is not banned".into()).into());
    }
    s.core
        .set_membership(user, &body.body.room_id, &body.body.user_id, "leave", body.body.reason.clone(), None)
        .await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/joined_rooms`
pub async fn joined_rooms_route(
    State(s): State<AppState>,
    body: Ruma<joined_rooms::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let rooms: Vec<_> =
        s.core.user_rooms(user)?.into_iter().filter(|(_, r)| r.membership == "join").map(|(id, _)| id).collect();
    Ok(Json(json!({"joined_rooms": rooms})))
}

fn require_member(core: &Core, room: &RoomId, user: &UserId) -> Result<(), Error> {
    match core.membership(room, user)?.as_deref() {
        Some("join") => Ok(()),
        _ => Err(Error::Forbidden("you are not a member of this room".into())),
    }
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn get_member_events_route(
    State(s): State<AppState>,
    body: Ruma<get_member_events::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let room = &body.body.room_id;
    require_member(&s.core, room, user)?;
    let want = body.body.membership.as_ref().map(|m| m.to_string());
    let not = body.body.not_membership.as_ref().map(|m| m.to_string());
    let mut chunk = Vec::new();
    for (_, pdu) in s.core.members(room)? {
        let m = pdu.content_value().get("membership").and_then(Value::as_str).unwrap_or("").to_owned();
        if want.as_ref().is_some_and(|w| *w != m) || not.as_ref().is_some_and(|n| *n == m) {
            continue;
        }
        if let Some(stored) = s.core.stored_pdu(&pdu.event_id)? {
            chunk.push(s.core.client_event_for(Some((user, device)), &pdu, &stored, true)?);
        }
    }
    Ok(Json(json!({"chunk": chunk})))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined_members_route(
    State(s): State<AppState>,
    body: Ruma<joined_members::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let room = &body.body.room_id;
    require_member(&s.core, room, user)?;
    let mut joined = serde_json::Map::new();
    for (u, pdu) in s.core.members(room)? {
        let c = pdu.content_value();
        if c.get("membership").and_then(Value::as_str) == Some("join") {
            joined.insert(
                u.to_string(),
                json!({
                    "display_name": c.get("displayname"), "avatar_url": c.get("avatar_url"),
                }),
            );
        }
    }
    Ok(Json(json!({"joined": joined})))
}
