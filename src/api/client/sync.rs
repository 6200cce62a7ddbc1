//! `/sync`.

use axum::{extract::State, Json};
use ruma::api::client::{filter::FilterDefinition, sync::sync_events};
use serde_json::Value;

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{
    sync::{parse_token, SyncRequest},
    Error,
};

/// # `GET /_matrix/client/v3/sync`
///
/// Initial sync without `since`; with `since`, waits up to `timeout` ms (bounded by config) for
/// anything new.
pub async fn sync_events_route(
    State(s): State<AppState>,
    body: Ruma<sync_events::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let req = &body.body;
    let filter = match &req.filter {
        None => FilterDefinition::default(),
        Some(sync_events::v3::Filter::FilterDefinition(f)) => f.clone(),
        Some(sync_events::v3::Filter::FilterId(id)) => match s.core.filter(user, id)? {
            Some(v) => serde_json::from_value(v).map_err(|e| Error::BadJson(format!("stored filter: {e}")))?,
            None => return Err(Error::NotFound(format!("no filter {id}")).into()),
        },
        Some(_) => FilterDefinition::default(),
    };
    let since = req.since.as_deref().map(parse_token).transpose()?;
    let sreq = SyncRequest {
        since,
        full_state: req.full_state,
        filter,
        timeout_ms: req.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
    };
    Ok(Json(s.core.sync(user, device, sreq).await?))
}
