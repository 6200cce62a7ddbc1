//! Push rules and pushers. Rules are evaluated with ruma for unread counts; pushers are stored
//! but nothing is sent to push gateways (see `core::push`).

use axum::{extract::State, Json};
use ruma::api::client::push::{
    delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
    get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule, set_pushrule_actions,
    set_pushrule_enabled,
};
use serde_json::{json, Value};

use crate::api::{error::ApiResult, ruma_wrapper::Ruma, AppState};
use crate::core::{push::ruleset_json, Error};

/// # `GET /_matrix/client/v3/pushrules/`
pub async fn get_pushrules_all_route(
    State(s): State<AppState>,
    body: Ruma<get_pushrules_all::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(json!({"global": ruleset_json(&s.core.push_rules(user)?)})))
}

/// # `GET /_matrix/client/v3/pushrules/global/`
pub async fn get_pushrules_global_scope_route(
    State(s): State<AppState>,
    body: Ruma<get_pushrules_global_scope::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(ruleset_json(&s.core.push_rules(user)?)))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn get_pushrule_route(
    State(s): State<AppState>,
    body: Ruma<get_pushrule::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(s.core.push_rule(user, body.body.kind.clone(), &body.body.rule_id)?))
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn set_pushrule_route(
    State(s): State<AppState>,
    body: Ruma<set_pushrule::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    s.core.set_push_rule(user, req.rule.clone(), req.before.as_deref(), req.after.as_deref()).await?;
    Ok(Json(json!({})))
}

/// # `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn delete_pushrule_route(
    State(s): State<AppState>,
    body: Ruma<delete_pushrule::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    s.core.delete_push_rule(user, body.body.kind.clone(), &body.body.rule_id).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn get_pushrule_enabled_route(
    State(s): State<AppState>,
    body: Ruma<get_pushrule_enabled::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let rule = s.core.push_rule(user, body.body.kind.clone(), &body.body.rule_id)?;
    Ok(Json(json!({"enabled": rule.get("enabled").cloned().unwrap_or(Value::Bool(true))})))
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn set_pushrule_enabled_route(
    State(s): State<AppState>,
    body: Ruma<set_pushrule_enabled::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    s.core.set_push_rule_enabled(user, req.kind.clone(), &req.rule_id, req.enabled).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn get_pushrule_actions_route(
    State(s): State<AppState>,
    body: Ruma<get_pushrule_actions::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let rule = s.core.push_rule(user, body.body.kind.clone(), &body.body.rule_id)?;
    Ok(Json(json!({"actions": rule.get("actions").cloned().unwrap_or_else(|| json!([]))})))
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn set_pushrule_actions_route(
    State(s): State<AppState>,
    body: Ruma<set_pushrule_actions::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    let req = &body.body;
    s.core.set_push_rule_actions(user, req.kind.clone(), &req.rule_id, req.actions.clone()).await?;
    Ok(Json(json!({})))
}

/// # `GET /_matrix/client/v3/notifications`
///
/// `from` is the previous `next_token`; `only=highlight` keeps highlights.
pub async fn get_notifications_route(
    State(s): State<AppState>,
    body: Ruma<get_notifications::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, device) = body.sender()?;
    let r = &body.body;
    let from = match r.from.as_deref() {
        Some(f) => Some(f.parse::<u64>().map_err(|_| Error::InvalidParam(format!("invalid from token {f:?}")))?),
        None => None,
    };
    let limit = r.limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX)).unwrap_or(20);
    let only_highlight = r.only.as_deref() == Some("highlight");
    Ok(Json(s.core.notifications(user, device, from, limit, only_highlight)?))
}

/// # `GET /_matrix/client/v3/pushers`
pub async fn get_pushers_route(
    State(s): State<AppState>,
    body: Ruma<get_pushers::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    Ok(Json(json!({"pushers": s.core.pushers(user)?})))
}

/// # `POST /_matrix/client/v3/pushers/set`
///
/// Stored and listed; no notification is sent to the push gateway (no internet on a mesh).
pub async fn set_pusher_route(
    State(s): State<AppState>,
    body: Ruma<set_pusher::v3::Request>,
) -> ApiResult<Json<Value>> {
    let (user, _) = body.sender()?;
    if !body.json.is_object() {
        return Err(Error::BadJson("pusher must be an object".into()).into());
    }
    s.core.set_pusher(user, &body.json).await?;
    Ok(Json(json!({})))
}
