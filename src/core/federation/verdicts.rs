//! What a server made of events: an outpost extension of the server-server API, for a server
//! rejoining a room to line its stale copy up with the room's view.
//!
//! A server that was out of a room (it left, or a partition kept it apart) keeps its copy;
//! when it joins again, its copy's forward extremities the join does not build on are either
//! news to the room (a branch the resident has not seen) or events the room judged and went on
//! without — soft-failed there, typically a stale branch whose state would reset the room's.
//! Only the resident can tell which, and no standard endpoint says so (`/event` and
//! `state_ids` answer for soft-failed events as for any other), hence this one, under an
//! unstable prefix as Matrix extensions are:
//!
//! `POST /_matrix/federation/unstable/org.outpost.verdicts/{roomId}` with
//! `{"event_ids": [...]}` (at most [`MAX_VERDICTS`]) answers
//! `{"verdicts": {"$id": "extremity" | "built_on" | "set_aside" | "soft_failed" | "outlier" |
//! "unknown"}}`,
//! only to a server in the room.

use std::collections::BTreeMap;

use ruma::{
    api::{
        auth_scheme::AuthScheme,
        error::{DeserializationError, FromHttpRequestError, FromHttpResponseError, IntoHttpError},
        federation::authentication::ServerSignatures,
        path_builder::PathBuilder,
        IncomingRequest, IncomingResponse, Metadata, OutgoingRequest, OutgoingResponse,
    },
    OwnedEventId, OwnedRoomId, RoomId, ServerName,
};
use serde::{Deserialize, Serialize};

use crate::core::{Core, Error, Result};

/// Most events one request asks about.
pub const MAX_VERDICTS: usize = 20;

/// What a server made of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Part of the room and one of its forward extremities.
    Extremity,
    /// Part of the room: an accepted event builds on it.
    BuiltOn,
    /// Accepted once, but set aside: neither a forward extremity nor built on (a stale
    /// extremity this server dropped).
    SetAside,
    /// Held, but soft-failed: neither shown nor built on.
    SoftFailed,
    /// Known only as an auth or state event, not judged as part of the room.
    Outlier,
    /// Not held.
    Unknown,
}

impl Verdict {
    /// The server judged the event and went on from it or without it: its present is no
    /// branch that still has to merge the event (it built on it, soft-failed it, or set it
    /// aside).
    pub fn settled(self) -> bool {
        matches!(self, Verdict::BuiltOn | Verdict::SoftFailed | Verdict::SetAside)
    }
}

/// The endpoint as ruma request/response types, so that the federation router and
/// `Core::federation_request` handle it like any other (written out by hand: ruma's
/// `#[request]` macros expect `client`/`server` cargo features of the crate using them).
pub mod v1 {
    use super::*;

    /// The request: the room (in the path) and the events asked about.
    #[derive(Clone, Debug)]
    pub struct Request {
        /// The room.
        pub room_id: OwnedRoomId,
        /// The events asked about.
        pub event_ids: Vec<OwnedEventId>,
    }

    #[derive(Serialize, Deserialize)]
    struct RequestBody {
        event_ids: Vec<OwnedEventId>,
    }

    /// The answer: one verdict per event asked about.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Response {
        /// The verdicts.
        pub verdicts: BTreeMap<OwnedEventId, Verdict>,
    }

    impl Request {
        /// Ask about `event_ids` in `room_id`.
        pub fn new(room_id: OwnedRoomId, event_ids: Vec<OwnedEventId>) -> Self {
            Self { room_id, event_ids }
        }
    }

    ruma::api::metadata! {
        method: POST,
        rate_limited: false,
        authentication: ServerSignatures,
        path: "/_matrix/federation/unstable/org.outpost.verdicts/{room_id}",
    }

    impl OutgoingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        type IncomingResponse = Response;

        fn try_into_http_request<T: Default + bytes::BufMut + AsRef<[u8]>>(
            self,
            base_url: &str,
            authentication_input: <Self::Authentication as AuthScheme>::Input<'_>,
            path_builder_input: <Self::PathBuilder as PathBuilder>::Input<'_>,
        ) -> std::result::Result<http::Request<T>, IntoHttpError> {
            let url = Self::PATH_BUILDER.make_endpoint_url(path_builder_input, base_url, &[&self.room_id], "")?;
            let mut body = T::default();
            serde_json::to_writer(bytes::BufMut::writer(&mut body), &RequestBody { event_ids: self.event_ids })?;
            let mut req = http::Request::builder()
                .method(Self::METHOD)
                .uri(url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)?;
            Self::Authentication::add_authentication(&mut req, authentication_input)
                .map_err(|e| IntoHttpError::Authentication(e.into()))?;
            Ok(req)
        }
    }

    impl IncomingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        type OutgoingResponse = Response;

        fn try_from_http_request<B, S>(
            req: http::Request<B>,
            path_args: &[S],
        ) -> std::result::Result<Self, FromHttpRequestError>
        where
            B: AsRef<[u8]>,
            S: AsRef<str>,
        {
            Self::check_request_method(req.method())?;
            let room = path_args.first().map(|a| a.as_ref()).unwrap_or_default();
            let room_id = RoomId::parse(room)
                .map_err(|e| FromHttpRequestError::Deserialization(DeserializationError::Ident(e)))?;
            let body: RequestBody = serde_json::from_slice(req.body().as_ref())
                .map_err(|e| FromHttpRequestError::Deserialization(e.into()))?;
            Ok(Self { room_id, event_ids: body.event_ids })
        }
    }

    impl IncomingResponse for Response {
        type EndpointError = ruma::api::error::Error;

        fn try_from_http_response<T: AsRef<[u8]>>(
            response: http::Response<T>,
        ) -> std::result::Result<Self, FromHttpResponseError<Self::EndpointError>> {
            if !response.status().is_success() {
                return Err(FromHttpResponseError::Server(
                    <ruma::api::error::Error as ruma::api::EndpointError>::from_http_response(response),
                ));
            }
            serde_json::from_slice(response.body().as_ref())
                .map_err(|e| FromHttpResponseError::Deserialization(e.into()))
        }
    }

    impl OutgoingResponse for Response {
        fn try_into_http_response<T: Default + bytes::BufMut>(
            self,
        ) -> std::result::Result<http::Response<T>, IntoHttpError> {
            let mut body = T::default();
            serde_json::to_writer(bytes::BufMut::writer(&mut body), &self)?;
            Ok(http::Response::builder().header(http::header::CONTENT_TYPE, "application/json").body(body)?)
        }
    }
}

impl Core {
    /// The resident side: what this server made of `ids` in `room`, for `origin` (which must be
    /// in the room).
    pub fn verdicts_for_server(
        &self,
        origin: &ServerName,
        room: &RoomId,
        ids: &[OwnedEventId],
    ) -> Result<BTreeMap<OwnedEventId, Verdict>> {
        if ids.len() > MAX_VERDICTS {
            return Err(Error::TooLarge(format!("at most {MAX_VERDICTS} events per request")));
        }
        self.require_server_in_room(origin, room, None)?;
        let extremities = self.extremities(room)?;
        let mut out = BTreeMap::new();
        for id in ids {
            let v = match self.stored_pdu(id)? {
                None => Verdict::Unknown,
                Some(s) if s.outlier => Verdict::Outlier,
                Some(s) if s.soft_failed => Verdict::SoftFailed,
                Some(_) if extremities.contains(id) => Verdict::Extremity,
                Some(_) if self.is_built_on(room, id)? => Verdict::BuiltOn,
                Some(_) => Verdict::SetAside,
            };
            out.insert(id.clone(), v);
        }
        Ok(out)
    }
}
