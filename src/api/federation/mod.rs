//! The Matrix server-server API, served to other nodes over the mesh (never on the client
//! listener). Requests are authenticated twice: the libp2p connection names the peer, and the
//! X-Matrix signature must come from that same server (see `ruma_wrapper`).

pub mod directory;
pub mod keys;
pub mod media;
pub mod membership;
pub mod query;
pub mod transactions;

use axum::{routing::get, Router};

use super::AppState;
use crate::ruma_route;

/// The federation router (served by the mesh transport).
pub fn router(state: AppState) -> Router {
    use ruma::api::federation as f;
    let r: Router<AppState> = Router::new();
    let r = ruma_route!(
        r,
        f::transactions::send_transaction_message::v1::Request,
        transactions::send_transaction_message_route
    );
    let r = ruma_route!(r, f::event::get_event::v1::Request, transactions::get_event_route);
    let r = ruma_route!(r, f::event::get_missing_events::v1::Request, transactions::get_missing_events_route);
    let r = ruma_route!(r, f::backfill::get_backfill::v1::Request, transactions::get_backfill_route);
    let r = ruma_route!(r, f::event::get_room_state_ids::v1::Request, transactions::get_room_state_ids_route);
    let r = ruma_route!(r, f::event::get_room_state::v1::Request, transactions::get_room_state_route);
    let r = ruma_route!(r, crate::core::federation::verdicts::v1::Request, transactions::get_verdicts_route);
    let r = ruma_route!(r, f::membership::prepare_join_event::v1::Request, membership::prepare_join_event_route);
    let r = ruma_route!(r, f::membership::create_join_event::v2::Request, membership::create_join_event_route);
    let r = ruma_route!(r, f::membership::prepare_leave_event::v1::Request, membership::prepare_leave_event_route);
    let r = ruma_route!(r, f::membership::create_leave_event::v2::Request, membership::create_leave_event_route);
    let r = ruma_route!(r, f::membership::create_invite::v2::Request, membership::create_invite_route);
    let r = ruma_route!(r, f::query::get_profile_information::v1::Request, query::get_profile_information_route);
    let r = ruma_route!(r, f::query::get_room_information::v1::Request, query::get_room_information_route);
    let r = ruma_route!(r, f::device::get_devices::v1::Request, keys::get_devices_route);
    let r = ruma_route!(r, f::keys::get_keys::v1::Request, keys::get_keys_route);
    let r = ruma_route!(r, f::keys::claim_keys::v1::Request, keys::claim_keys_route);
    let r = ruma_route!(r, f::directory::get_public_rooms::v1::Request, directory::get_public_rooms_route);
    let r = ruma_route!(
        r,
        f::directory::get_public_rooms_filtered::v1::Request,
        directory::get_public_rooms_filtered_route
    );
    let r = ruma_route!(r, f::authenticated_media::get_content::v1::Request, media::get_content_route);
    let r =
        ruma_route!(r, f::authenticated_media::get_content_thumbnail::v1::Request, media::get_content_thumbnail_route);
    let r = r.route("/_matrix/federation/v1/version", get(query::get_server_version_route));
    let r = r.route("/_matrix/key/v2/server", get(super::server::get_server_keys_route));
    r.fallback(|| async { super::error::ApiError::unrecognized() }).with_state(state)
}
