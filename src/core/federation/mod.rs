//! Federation: the Matrix server-server API between nodes, independent of how bytes move.
//!
//! The core speaks to other servers through a [`Transport`]: production wires libp2p streams
//! (HTTP/1.1 over a libp2p stream protocol, `src/net/`), the simulator an in-memory network.
//! Requests are ordinary ruma federation requests signed with X-Matrix; server keys are never
//! fetched because every server name *is* its ed25519 key (hex).
//!
//! - `sender.rs`: the durable per-destination queue and transaction sender (backoff in seconds).
//! - `receive.rs`: the checks performed on receipt of a PDU, in the spec's order.
//! - `join.rs`: joining and inviting across servers (make_join / send_join v2, invite v2).
//! - `merge.rs`: merging forks of a quiet room with a dummy event.
//! - `edu.rs`: EDUs in transactions (typing, receipts, device lists, to-device), both ways.
//! - `keys.rs`: end-to-end encryption keys across servers (cached remote device lists,
//!   `user/devices`, `user/keys/query`, `user/keys/claim`).
//! - `query.rs`: remote profiles and room directories.
//! - `media.rs`: media of other servers, fetched and cached.
//! - `verdicts.rs`: what a resident made of events (soft-failed or not), for a rejoining server.

pub mod edu;
pub mod join;
pub mod keys;
pub mod media;
pub mod merge;
pub mod query;
pub mod receive;
pub mod sender;
pub mod serve;
pub mod verdicts;

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use ruma::{
    api::{federation::authentication::ServerSignaturesInput, IncomingResponse, MatrixVersion, OutgoingRequest},
    serde::Base64,
    signatures::PublicKeyMap,
    OwnedServerName, RoomId, ServerName, UserId,
};

use super::{state::StateMap, Core, Error, Result};
use crate::identity::{public_key_of_server_name, KEY_VERSION};

/// Why a request to another server failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No route to the destination right now (not connected, dial failed).
    #[error("{0} is unreachable: {1}")]
    Unreachable(OwnedServerName, String),
    /// The connection broke or timed out mid-request.
    #[error("request to {0} failed: {1}")]
    Failed(OwnedServerName, String),
}

/// A boxed future, as returned by [`Transport::send`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the core reaches other servers. `send` delivers one signed HTTP request to `dest` and
/// returns its response.
pub trait Transport: Send + Sync + 'static {
    /// Send `req` to `dest`.
    fn send(
        &self,
        dest: OwnedServerName,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>>;
}

/// Whether `e`, from handling a federation request or a PDU, is a failure to reach another
/// server (worth retrying) rather than an answer (see [`Core::federation_request`]).
pub(crate) fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Unknown(m) if m.starts_with(TRANSPORT_FAILED))
}

/// Prefix of the error [`Core::federation_request`] returns when the request did not get an
/// answer.
const TRANSPORT_FAILED: &str = "federation: no answer: ";

/// The public key map naming `servers` by their self-certifying names (`ed25519:p2p`).
pub fn key_map_for<'a>(servers: impl IntoIterator<Item = &'a ServerName>) -> Result<PublicKeyMap> {
    let mut map = PublicKeyMap::new();
    for s in servers {
        let key = public_key_of_server_name(s.as_str())
            .ok_or_else(|| Error::Forbidden(format!("{s} is not a self-certifying server name")))?;
        map.insert(s.to_string(), [(format!("ed25519:{KEY_VERSION}"), Base64::new(key.to_vec()))].into());
    }
    Ok(map)
}

/// The error a remote server answered with, as one of ours: "not found" and "forbidden" keep
/// their meaning (a client asking for a remote profile gets 404), anything else is `M_UNKNOWN`.
fn remote_error(dest: &ServerName, res: &http::Response<Bytes>) -> Option<Error> {
    let status = res.status();
    if !status.is_client_error() && !status.is_server_error() {
        return None;
    }
    let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap_or_default();
    let errcode = body.get("errcode").and_then(|v| v.as_str()).unwrap_or("");
    let msg = format!("{dest} answered {status}: {}", body.get("error").and_then(|v| v.as_str()).unwrap_or(errcode));
    Some(match (status.as_u16(), errcode) {
        (404, _) | (_, "M_NOT_FOUND") => Error::NotFound(msg),
        (403, _) | (_, "M_FORBIDDEN") => Error::Forbidden(msg),
        _ => Error::Unknown(format!("federation: {msg}")),
    })
}

impl Core {
    /// Install the transport to other servers (once, at start-up).
    pub fn set_transport(&self, t: Arc<dyn Transport>) {
        let _ = self.transport.set(t);
    }

    /// Send a federation request to `dest` and parse the answer.
    pub async fn federation_request<R>(&self, dest: &ServerName, req: R) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
        for<'a> R::Authentication: ruma::api::auth_scheme::AuthScheme<Input<'a> = ServerSignaturesInput<'a>>,
    {
        let transport =
            self.transport.get().ok_or_else(|| Error::Unknown("this node has no federation transport".into()))?;
        let input =
            ServerSignaturesInput::new(self.server_name().to_owned(), dest.to_owned(), self.identity.key_pair());
        let http_req: http::Request<Vec<u8>> = req
            .try_into_http_request(&format!("http://{dest}"), input, ())
            .map_err(|e| Error::Internal(format!("cannot build federation request: {e}")))?;
        let _ = MatrixVersion::V1_1;
        let http_req = http_req.map(Bytes::from);
        let res = transport
            .send(dest.to_owned(), http_req)
            .await
            .map_err(|e| Error::Unknown(format!("{TRANSPORT_FAILED}{e}")))?;
        if let Some(e) = remote_error(dest, &res) {
            return Err(e);
        }
        R::IncomingResponse::try_from_http_response(res)
            .map_err(|e| Error::Unknown(format!("federation: {dest} answered: {e}")))
    }

    /// Servers with a joined member in `state`.
    pub fn servers_in_state(
        &self,
        state: &StateMap,
        in_batch: &dyn Fn(&ruma::EventId) -> Option<super::pdu::Pdu>,
    ) -> Result<BTreeSet<OwnedServerName>> {
        let mut out = BTreeSet::new();
        for ((t, k), id) in state.iter() {
            if t != "m.room.member" {
                continue;
            }
            let Ok(user) = UserId::parse(k.as_str()) else { continue };
            let pdu = match in_batch(id) {
                Some(p) => Some(p),
                None => self.pdu(id)?,
            };
            if pdu.is_some_and(|p| p.content_value().get("membership").and_then(|m| m.as_str()) == Some("join")) {
                out.insert(user.server_name().to_owned());
            }
        }
        Ok(out)
    }

    /// Servers currently in `room` (with a joined member).
    pub fn servers_in_room(&self, room: &RoomId) -> Result<BTreeSet<OwnedServerName>> {
        let state = self.current_state(room)?;
        self.servers_in_state(&state, &|_| None)
    }
}
