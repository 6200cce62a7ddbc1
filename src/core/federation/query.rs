//! Asking other servers on a client's behalf: profiles (`query/profile`) and room directories
//! (`publicRooms`). Each request is bounded by `limits.federation_query_timeout_ms`.

use std::time::Duration;

use ruma::{
    api::federation::{
        directory::{get_public_rooms, get_public_rooms_filtered},
        query::get_profile_information,
    },
    directory::{Filter, RoomNetwork},
    profile::ProfileFieldName,
    ServerName, UInt, UserId,
};
use serde_json::{json, Map, Value as JsonValue};

use crate::core::{Core, Error, Result};

/// What a client asks of another server's room directory.
#[derive(Clone, Debug, Default)]
pub struct PublicRoomsQuery {
    /// Most rooms in the page.
    pub limit: Option<u64>,
    /// Pagination token from a previous page.
    pub since: Option<String>,
    /// Search term (name, topic, alias), if any.
    pub term: Option<String>,
}

impl Core {
    /// Run `fut` (a request to `server`) within the federation query timeout.
    async fn within_timeout<T>(
        &self,
        server: &ServerName,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t = Duration::from_millis(self.limits.federation_query_timeout_ms);
        tokio::time::timeout(t, fut).await.map_err(|_| Error::Unknown(format!("{server} did not answer in time")))?
    }

    /// The profile of `user` of another server (`field`: only that one), as the client API
    /// shows it. A server that says "not found" gives `NotFound`.
    pub async fn remote_profile(&self, user: &UserId, field: Option<&str>) -> Result<JsonValue> {
        let mut req = get_profile_information::v1::Request::new(user.to_owned());
        req.field = field.map(ProfileFieldName::from);
        let server = user.server_name();
        let res = self.within_timeout(server, self.federation_request(server, req)).await?;
        let mut out = Map::new();
        for (k, v) in res.iter() {
            // Only strings for the fields we know; others as given.
            if field.is_none_or(|f| f == k) && !v.is_null() {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(JsonValue::Object(out))
    }

    /// A page of the room directory of `server`.
    pub async fn remote_public_rooms(&self, server: &ServerName, q: PublicRoomsQuery) -> Result<JsonValue> {
        let limit = q.limit.and_then(|l| UInt::new(l.min(500)));
        let (chunk, next, prev, total) = match q.term.filter(|t| !t.is_empty()) {
            None => {
                let mut req = get_public_rooms::v1::Request::new();
                req.limit = limit;
                req.since = q.since;
                req.room_network = RoomNetwork::Matrix;
                let r = self.within_timeout(server, self.federation_request(server, req)).await?;
                (r.chunk, r.next_batch, r.prev_batch, r.total_room_count_estimate)
            }
            Some(term) => {
                let mut req = get_public_rooms_filtered::v1::Request::new();
                req.limit = limit;
                req.since = q.since;
                let mut filter = Filter::new();
                filter.generic_search_term = Some(term);
                req.filter = filter;
                let r = self.within_timeout(server, self.federation_request(server, req)).await?;
                (r.chunk, r.next_batch, r.prev_batch, r.total_room_count_estimate)
            }
        };
        let mut out = json!({
            "chunk": serde_json::to_value(&chunk).map_err(|e| Error::Internal(e.to_string()))?,
        });
        if let Some(n) = next {
            out["next_batch"] = json!(n);
        }
        if let Some(p) = prev {
            out["prev_batch"] = json!(p);
        }
        if let Some(t) = total {
            out["total_room_count_estimate"] = json!(t);
        }
        Ok(out)
    }
}
