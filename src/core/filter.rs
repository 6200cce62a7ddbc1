//! Event filters (the spec's `RoomEventFilter`), applied to stored PDUs.

use ruma::api::client::filter::{RoomEventFilter, UrlFilter};

use super::pdu::Pdu;

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(p) => kind.starts_with(p),
        None => pattern == kind,
    }
}

/// Whether `pdu` passes `f` (types, senders, rooms, `contains_url`).
pub fn matches(f: &RoomEventFilter, pdu: &Pdu) -> bool {
    let kind = pdu.kind.to_string();
    if f.not_types.iter().any(|t| type_matches(t, &kind)) {
        return false;
    }
    if let Some(types) = &f.types {
        if !types.iter().any(|t| type_matches(t, &kind)) {
            return false;
        }
    }
    if f.not_senders.contains(&pdu.sender) {
        return false;
    }
    if let Some(senders) = &f.senders {
        if !senders.contains(&pdu.sender) {
            return false;
        }
    }
    if f.not_rooms.contains(&pdu.room) {
        return false;
    }
    if let Some(rooms) = &f.rooms {
        if !rooms.contains(&pdu.room) {
            return false;
        }
    }
    if let Some(url) = &f.url_filter {
        let has_url = pdu.content_value().get("url").is_some();
        match url {
            UrlFilter::EventsWithUrl if !has_url => return false,
            UrlFilter::EventsWithoutUrl if has_url => return false,
            _ => {}
        }
    }
    true
}

/// Whether a room passes the `rooms` / `not_rooms` of a room filter.
pub fn room_allowed(
    rooms: &Option<Vec<ruma::OwnedRoomId>>,
    not_rooms: &[ruma::OwnedRoomId],
    room: &ruma::RoomId,
) -> bool {
    if not_rooms.iter().any(|r| r == room) {
        return false;
    }
    rooms.as_ref().is_none_or(|rs| rs.iter().any(|r| r == room))
}
