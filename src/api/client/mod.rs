//! The client-server API, one module per spec area. Handlers are named `*_route` and headed by
//! their endpoint.

pub mod account_data;
pub mod alias;
pub mod backup;
pub mod device;
pub mod directory;
pub mod discovery;
pub mod filter;
pub mod keys;
pub mod media;
pub mod membership;
pub mod message;
pub mod presence;
pub mod profile;
pub mod push;
pub mod read_marker;
pub mod receipt;
pub mod redact;
pub mod relations;
pub mod room;
pub mod search;
pub mod session;
pub mod state;
pub mod sync;
pub mod tag;
pub mod thirdparty;
pub mod threads;
pub mod to_device;
pub mod typing;
pub mod uiaa;
pub mod user_directory;
pub mod voip;

use axum::Router;

use super::AppState;
use crate::ruma_route;

/// Add every client-server route to `r`.
pub fn routes(r: Router<AppState>) -> Router<AppState> {
    use ruma::api::client as c;
    let r = media::routes(r);
    let r = ruma_route!(r, c::discovery::discover_homeserver::Request, discovery::discover_homeserver_route);
    let r = ruma_route!(r, c::thirdparty::get_protocols::v3::Request, thirdparty::get_protocols_route);
    let r = voip::routes(r);
    let r = ruma_route!(r, c::discovery::get_supported_versions::Request, discovery::get_supported_versions_route);
    let r = ruma_route!(r, c::discovery::get_capabilities::v3::Request, discovery::get_capabilities_route);
    let r = ruma_route!(r, c::account::register::v3::Request, session::register_route);
    let r =
        ruma_route!(r, c::account::get_username_availability::v3::Request, session::get_username_availability_route);
    let r = ruma_route!(r, c::session::get_login_types::v3::Request, session::get_login_types_route);
    let r = ruma_route!(r, c::session::login::v3::Request, session::login_route);
    let r = ruma_route!(r, c::session::logout::v3::Request, session::logout_route);
    let r = ruma_route!(r, c::session::logout_all::v3::Request, session::logout_all_route);
    let r = ruma_route!(r, c::account::whoami::v3::Request, session::whoami_route);
    let r = ruma_route!(r, c::room::create_room::v3::Request, room::create_room_route);
    let r = ruma_route!(r, c::room::get_room_event::v3::Request, room::get_room_event_route);
    let r = ruma_route!(r, c::context::get_context::v3::Request, room::get_context_route);
    let r = ruma_route!(r, c::membership::join_room_by_id::v3::Request, membership::join_room_by_id_route);
    let r = ruma_route!(
        r,
        c::membership::join_room_by_id_or_alias::v3::Request,
        membership::join_room_by_id_or_alias_route
    );
    let r = ruma_route!(r, c::membership::invite_user::v3::Request, membership::invite_user_route);
    let r = ruma_route!(r, c::membership::leave_room::v3::Request, membership::leave_room_route);
    let r = ruma_route!(r, c::membership::forget_room::v3::Request, membership::forget_room_route);
    let r = ruma_route!(r, c::membership::kick_user::v3::Request, membership::kick_user_route);
    let r = ruma_route!(r, c::membership::ban_user::v3::Request, membership::ban_user_route);
    let r = ruma_route!(r, c::membership::unban_user::v3::Request, membership::unban_user_route);
    let r = ruma_route!(r, c::membership::joined_rooms::v3::Request, membership::joined_rooms_route);
    let r = ruma_route!(r, c::membership::get_member_events::v3::Request, membership::get_member_events_route);
    let r = ruma_route!(r, c::membership::joined_members::v3::Request, membership::joined_members_route);
    let r = ruma_route!(r, c::message::send_message_event::v3::Request, message::send_message_event_route);
    let r = ruma_route!(r, c::message::get_message_events::v3::Request, message::get_message_events_route);
    let r = ruma_route!(r, c::redact::redact_event::v3::Request, redact::redact_event_route);
    let r = ruma_route!(r, c::state::get_state_events::v3::Request, state::get_state_events_route);
    let r = ruma_route!(r, c::state::get_state_event_for_key::v3::Request, state::get_state_event_for_key_route);
    let r = ruma_route!(r, c::state::send_state_event::v3::Request, state::send_state_event_route);
    let r = ruma_route!(r, c::sync::sync_events::v3::Request, sync::sync_events_route);
    let r = ruma_route!(r, c::filter::create_filter::v3::Request, filter::create_filter_route);
    let r = ruma_route!(r, c::filter::get_filter::v3::Request, filter::get_filter_route);
    let r = ruma_route!(r, c::profile::get_profile::v3::Request, profile::get_profile_route);
    let r = ruma_route!(r, c::profile::get_profile_field::v3::Request, profile::get_profile_field_route);
    let r = ruma_route!(r, c::profile::set_profile_field::v3::Request, profile::set_profile_field_route);
    let r = ruma_route!(r, c::alias::create_alias::v3::Request, alias::create_alias_route);
    let r = ruma_route!(r, c::alias::get_alias::v3::Request, alias::get_alias_route);
    let r = ruma_route!(r, c::alias::delete_alias::v3::Request, alias::delete_alias_route);
    let r = ruma_route!(r, c::room::aliases::v3::Request, alias::get_room_aliases_route);
    let r = ruma_route!(r, c::directory::get_room_visibility::v3::Request, directory::get_room_visibility_route);
    let r = ruma_route!(r, c::directory::set_room_visibility::v3::Request, directory::set_room_visibility_route);
    let r = ruma_route!(r, c::directory::get_public_rooms::v3::Request, directory::get_public_rooms_route);
    let r = ruma_route!(
        r,
        c::directory::get_public_rooms_filtered::v3::Request,
        directory::get_public_rooms_filtered_route
    );
    let r =
        ruma_route!(r, c::config::set_global_account_data::v3::Request, account_data::set_global_account_data_route);
    let r =
        ruma_route!(r, c::config::get_global_account_data::v3::Request, account_data::get_global_account_data_route);
    let r = ruma_route!(r, c::config::set_room_account_data::v3::Request, account_data::set_room_account_data_route);
    let r = ruma_route!(r, c::config::get_room_account_data::v3::Request, account_data::get_room_account_data_route);
    let r = ephemeral_routes(r);
    e2ee_routes(r)
}

/// Typing, receipts, read markers, tags, presence, user directory, push, relations, threads,
/// search.
fn ephemeral_routes(r: Router<AppState>) -> Router<AppState> {
    use ruma::api::client as c;
    let r = ruma_route!(r, c::typing::create_typing_event::v3::Request, typing::create_typing_event_route);
    let r = ruma_route!(r, c::receipt::create_receipt::v3::Request, receipt::create_receipt_route);
    let r = ruma_route!(r, c::read_marker::set_read_marker::v3::Request, read_marker::set_read_marker_route);
    let r = ruma_route!(r, c::tag::get_tags::v3::Request, tag::get_tags_route);
    let r = ruma_route!(r, c::tag::create_tag::v3::Request, tag::create_tag_route);
    let r = ruma_route!(r, c::tag::delete_tag::v3::Request, tag::delete_tag_route);
    let r = ruma_route!(r, c::presence::get_presence::v3::Request, presence::get_presence_route);
    let r = ruma_route!(r, c::presence::set_presence::v3::Request, presence::set_presence_route);
    let r = ruma_route!(r, c::user_directory::search_users::v3::Request, user_directory::search_users_route);
    let r = ruma_route!(r, c::push::get_pushrules_all::v3::Request, push::get_pushrules_all_route);
    let r = ruma_route!(r, c::push::get_pushrules_global_scope::v3::Request, push::get_pushrules_global_scope_route);
    let r = ruma_route!(r, c::push::get_pushrule::v3::Request, push::get_pushrule_route);
    let r = ruma_route!(r, c::push::set_pushrule::v3::Request, push::set_pushrule_route);
    let r = ruma_route!(r, c::push::delete_pushrule::v3::Request, push::delete_pushrule_route);
    let r = ruma_route!(r, c::push::get_pushrule_enabled::v3::Request, push::get_pushrule_enabled_route);
    let r = ruma_route!(r, c::push::set_pushrule_enabled::v3::Request, push::set_pushrule_enabled_route);
    let r = ruma_route!(r, c::push::get_pushrule_actions::v3::Request, push::get_pushrule_actions_route);
    let r = ruma_route!(r, c::push::set_pushrule_actions::v3::Request, push::set_pushrule_actions_route);
    let r = ruma_route!(r, c::push::get_notifications::v3::Request, push::get_notifications_route);
    let r = ruma_route!(r, c::push::get_pushers::v3::Request, push::get_pushers_route);
    let r = ruma_route!(r, c::push::set_pusher::v3::Request, push::set_pusher_route);
    let r = ruma_route!(r, c::relations::get_relating_events::v1::Request, relations::get_relating_events_route);
    let r = ruma_route!(
        r,
        c::relations::get_relating_events_with_rel_type::v1::Request,
        relations::get_relating_events_with_rel_type_route
    );
    let r = ruma_route!(
        r,
        c::relations::get_relating_events_with_rel_type_and_event_type::v1::Request,
        relations::get_relating_events_with_rel_type_and_event_type_route
    );
    let r = ruma_route!(r, c::threads::get_threads::v1::Request, threads::get_threads_route);
    ruma_route!(r, c::search::search_events::v3::Request, search::search_events_route)
}

/// End-to-end encryption, devices, to-device messages and key backup.
fn e2ee_routes(r: Router<AppState>) -> Router<AppState> {
    use ruma::api::client as c;
    let r = ruma_route!(r, c::keys::upload_keys::v3::Request, keys::upload_keys_route);
    let r = ruma_route!(r, c::keys::get_keys::v3::Request, keys::get_keys_route);
    let r = ruma_route!(r, c::keys::claim_keys::v3::Request, keys::claim_keys_route);
    let r = ruma_route!(r, c::keys::get_key_changes::v3::Request, keys::get_key_changes_route);
    let r = ruma_route!(r, c::keys::upload_signing_keys::v3::Request, keys::upload_signing_keys_route);
    let r = ruma_route!(r, c::keys::upload_signatures::v3::Request, keys::upload_signatures_route);
    let r = ruma_route!(r, c::to_device::send_event_to_device::v3::Request, to_device::send_event_to_device_route);
    let r = ruma_route!(r, c::device::get_devices::v3::Request, device::get_devices_route);
    let r = ruma_route!(r, c::device::get_device::v3::Request, device::get_device_route);
    let r = ruma_route!(r, c::device::update_device::v3::Request, device::update_device_route);
    let r = ruma_route!(r, c::device::delete_device::v3::Request, device::delete_device_route);
    let r = ruma_route!(r, c::device::delete_devices::v3::Request, device::delete_devices_route);
    let r = ruma_route!(r, c::backup::create_backup_version::v3::Request, backup::create_backup_version_route);
    let r = ruma_route!(r, c::backup::get_latest_backup_info::v3::Request, backup::get_latest_backup_info_route);
    let r = ruma_route!(r, c::backup::get_backup_info::v3::Request, backup::get_backup_info_route);
    let r = ruma_route!(r, c::backup::update_backup_version::v3::Request, backup::update_backup_version_route);
    let r = ruma_route!(r, c::backup::delete_backup_version::v3::Request, backup::delete_backup_version_route);
    let r = ruma_route!(r, c::backup::add_backup_keys::v3::Request, backup::add_backup_keys_route);
    let r = ruma_route!(r, c::backup::add_backup_keys_for_room::v3::Request, backup::add_backup_keys_for_room_route);
    let r =
        ruma_route!(r, c::backup::add_backup_keys_for_session::v3::Request, backup::add_backup_keys_for_session_route);
    let r = ruma_route!(r, c::backup::get_backup_keys::v3::Request, backup::get_backup_keys_route);
    let r = ruma_route!(r, c::backup::get_backup_keys_for_room::v3::Request, backup::get_backup_keys_for_room_route);
    let r =
        ruma_route!(r, c::backup::get_backup_keys_for_session::v3::Request, backup::get_backup_keys_for_session_route);
    let r = ruma_route!(r, c::backup::delete_backup_keys::v3::Request, backup::delete_backup_keys_route);
    let r =
        ruma_route!(r, c::backup::delete_backup_keys_for_room::v3::Request, backup::delete_backup_keys_for_room_route);
    ruma_route!(r, c::backup::delete_backup_keys_for_session::v3::Request, backup::delete_backup_keys_for_session_route)
}
