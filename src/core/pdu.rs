//! PDUs: the signed, hashed events of the room DAG, as stored and as sent to peers.
//!
//! Building, hashing, signing, event IDs and redaction all go through `ruma::signatures` and
//! `ruma::canonical_json`; this module only arranges the fields.

use std::collections::BTreeSet;

use ruma::{
    canonical_json::{redact, CanonicalJsonObject, CanonicalJsonValue, RedactedBecause},
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
    serde::Raw,
    signatures::{hash_and_sign_event, reference_hash},
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
};
use serde::Deserialize;
use serde_json::{value::RawValue, Value as JsonValue};

use super::Error;
use crate::identity::Identity;

/// The PDU size limit of the spec, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;

/// A parsed PDU with the fields the server needs; implements [`ruma::state_res::Event`].
#[derive(Clone, Debug, Deserialize)]
pub struct Pdu {
    /// Not in the JSON of room v3+: filled from the reference hash.
    #[serde(skip_deserializing, default = "placeholder_event_id")]
    pub event_id: OwnedEventId,
    /// Absent on a room v12 `m.room.create` event.
    pub room_id: Option<OwnedRoomId>,
    /// The sender.
    pub sender: OwnedUserId,
    /// Timestamp at the origin.
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    /// Present on state events.
    pub state_key: Option<String>,
    /// The content.
    pub content: Box<RawValue>,
    /// DAG parents.
    pub prev_events: Vec<OwnedEventId>,
    /// Auth events.
    pub auth_events: Vec<OwnedEventId>,
    /// Top-level `redacts` (room versions before 11).
    pub redacts: Option<OwnedEventId>,
    /// Depth in the DAG.
    #[serde(default)]
    pub depth: u64,
    /// Whether the event was rejected on receipt (never true for stored, accepted events).
    #[serde(skip)]
    pub rejected: bool,
    /// Derived: the room the event belongs to (equal to `room_id`, or derived from the create
    /// event's id in v12).
    #[serde(skip_deserializing, default = "placeholder_room_id")]
    pub room: OwnedRoomId,
    /// Derived: content-level `redacts` (room v11+) or top-level one.
    #[serde(skip)]
    pub redacts_target: Option<OwnedEventId>,
}

fn placeholder_event_id() -> OwnedEventId {
    EventId::parse("$placeholder").expect("valid")
}
fn placeholder_room_id() -> OwnedRoomId {
    RoomId::parse("!placeholder:p").expect("valid")
}

impl Pdu {
    /// Parse canonical JSON of a PDU whose event id is known.
    pub fn from_json(event_id: OwnedEventId, json: &str) -> Result<Self, Error> {
        let mut pdu: Pdu = serde_json::from_str(json).map_err(|e| Error::BadJson(format!("bad PDU: {e}")))?;
        pdu.event_id = event_id;
        pdu.room = match &pdu.room_id {
            Some(r) => r.clone(),
            None if pdu.kind == TimelineEventType::RoomCreate => {
                RoomId::parse(format!("!{}", &pdu.event_id.as_str()[1..]))
                    .map_err(|e| Error::BadJson(format!("bad room id: {e}")))?
            }
            None => return Err(Error::BadJson("PDU without room_id".into())),
        };
        pdu.redacts_target = pdu.redacts.clone().or_else(|| {
            if pdu.kind == TimelineEventType::RoomRedaction {
                #[derive(Deserialize)]
                struct C {
                    redacts: Option<OwnedEventId>,
                }
                serde_json::from_str::<C>(pdu.content.get()).ok().and_then(|c| c.redacts)
            } else {
                None
            }
        });
        Ok(pdu)
    }

    /// Whether this is a state event.
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> JsonValue {
        serde_json::from_str(self.content.get()).unwrap_or(JsonValue::Null)
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;
    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts_target.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// The rules of a room version we support, or an error naming it.
pub fn rules_for(version: &RoomVersionId) -> Result<RoomVersionRules, Error> {
    match version {
        RoomVersionId::V10 | RoomVersionId::V11 | RoomVersionId::V12 => {
            version.rules().ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))
        }
        _ => Err(Error::UnsupportedRoomVersion(version.to_string())),
    }
}

/// The room versions this server supports, and the default.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];
/// The default room version.
pub const DEFAULT_ROOM_VERSION: RoomVersionId = RoomVersionId::V12;

/// The unsigned, unhashed skeleton of a new event.
#[derive(Clone, Debug)]
pub struct PduTemplate {
    /// Event type.
    pub kind: TimelineEventType,
    /// Content.
    pub content: JsonValue,
    /// State key, for state events.
    pub state_key: Option<String>,
    /// Target of a redaction.
    pub redacts: Option<OwnedEventId>,
}

/// Everything about the DAG position of a new event, chosen by the room logic.
pub struct DagPosition<'a> {
    /// The room (None only for a v12 create event).
    pub room_id: Option<&'a RoomId>,
    /// Parents.
    pub prev_events: &'a [OwnedEventId],
    /// Auth events.
    pub auth_events: &'a [OwnedEventId],
    /// Depth.
    pub depth: u64,
}

/// A finished PDU: its id, its canonical JSON object, and the parsed view.
#[derive(Clone, Debug)]
pub struct SignedPdu {
    /// Event id (reference hash).
    pub event_id: OwnedEventId,
    /// The full signed object.
    pub object: CanonicalJsonObject,
    /// Parsed view.
    pub pdu: Pdu,
}

/// Hash, sign and name a new local event.
pub fn build_and_sign(
    identity: &Identity,
    rules: &RoomVersionRules,
    sender: &UserId,
    template: &PduTemplate,
    pos: DagPosition<'_>,
    origin_server_ts: u64,
) -> Result<SignedPdu, Error> {
    let mut obj = serde_json::Map::new();
    obj.insert("type".into(), JsonValue::String(template.kind.to_string()));
    obj.insert("content".into(), template.content.clone());
    obj.insert("sender".into(), JsonValue::String(sender.to_string()));
    if let Some(room_id) = pos.room_id {
        obj.insert("room_id".into(), JsonValue::String(room_id.to_string()));
    }
    if let Some(sk) = &template.state_key {
        obj.insert("state_key".into(), JsonValue::String(sk.clone()));
    }
    obj.insert("origin_server_ts".into(), JsonValue::from(origin_server_ts));
    obj.insert("depth".into(), JsonValue::from(pos.depth));
    obj.insert("prev_events".into(), serde_json::to_value(pos.prev_events).unwrap_or_default());
    obj.insert("auth_events".into(), serde_json::to_value(pos.auth_events).unwrap_or_default());
    if let Some(r) = &template.redacts {
        // Room v11 moved `redacts` into content; keep the top-level copy for older versions.
        if !rules.redaction.content_field_redacts {
            obj.insert("redacts".into(), JsonValue::String(r.to_string()));
        }
    }
    let mut object = ruma::canonical_json::try_from_json_map(obj)
        .map_err(|e| Error::BadJson(format!("event is not canonical JSON: {e}")))?;
    hash_and_sign(identity.server_name().as_str(), identity.key_pair(), &mut object, rules)?;
    let len = serde_json::to_vec(&object).map(|v| v.len()).unwrap_or(usize::MAX);
    if len > MAX_PDU_BYTES {
        return Err(Error::TooLarge(format!("event is {len} bytes; the limit is {MAX_PDU_BYTES}")));
    }
    let event_id = event_id_of(&object, rules)?;
    let json = serde_json::to_string(&object).map_err(|e| Error::Internal(e.to_string()))?;
    let pdu = Pdu::from_json(event_id.clone(), &json)?;
    Ok(SignedPdu { event_id, object, pdu })
}

/// Canonical JSON text of `value` (spec appendix "Canonical JSON"). Integral numbers written
/// with an exponent or as `-0` are normalised to integers; other floats are rejected.
pub fn canonical_json(value: &JsonValue) -> Result<String, Error> {
    fn normalise(v: &JsonValue) -> Result<JsonValue, Error> {
        Ok(match v {
            JsonValue::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_991.0 {
                    JsonValue::from(f as i64)
                } else {
                    return Err(Error::BadJson(format!("{n} is not an integer in the canonical range")));
                }
            }
            JsonValue::Array(a) => JsonValue::Array(a.iter().map(normalise).collect::<Result<_, _>>()?),
            JsonValue::Object(o) => {
                JsonValue::Object(o.iter().map(|(k, v)| Ok((k.clone(), normalise(v)?))).collect::<Result<_, Error>>()?)
            }
            other => other.clone(),
        })
    }
    let cj: CanonicalJsonValue =
        normalise(value)?.try_into().map_err(|e| Error::BadJson(format!("not canonical JSON: {e}")))?;
    Ok(cj.to_string())
}

/// Add the content hash and this server's signature to `object` (spec "Signing Events").
pub fn hash_and_sign(
    entity: &str,
    key_pair: &ruma::signatures::Ed25519KeyPair,
    object: &mut CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<(), Error> {
    hash_and_sign_event(entity, key_pair, object, &rules.redaction).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::TooLarge(format!("event over {MAX_PDU_BYTES} bytes")),
        other => Error::BadJson(format!("cannot sign event: {other}")),
    })
}

/// The event id of a PDU: `$` + the reference hash (room v4+ format).
pub fn event_id_of(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId, Error> {
    let hash = reference_hash(object, rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::TooLarge("event too large".into()),
        other => Error::BadJson(format!("cannot hash event: {other}")),
    })?;
    EventId::parse(format!("${hash}")).map_err(|e| Error::Internal(e.to_string()))
}

/// The redacted form of a stored PDU, with `unsigned.redacted_because` when given.
pub fn redacted_object(
    object: CanonicalJsonObject,
    rules: &RoomVersionRules,
    because: Option<CanonicalJsonObject>,
) -> Result<CanonicalJsonObject, Error> {
    redact(object, &rules.redaction, because.map(RedactedBecause::from_json))
        .map_err(|e| Error::Internal(format!("redaction failed: {e}")))
}

/// Parse stored canonical JSON text into an object.
pub fn parse_object(json: &str) -> Result<CanonicalJsonObject, Error> {
    serde_json::from_str::<CanonicalJsonObject>(json)
        .map_err(|e| Error::Internal(format!("stored PDU is not canonical JSON: {e}")))
}

/// The client-format event (as in `/sync`, `/messages`) for a stored PDU.
///
/// `unsigned` carries `age` (relative to `now_ms`), `transaction_id` for the sending device, and
/// anything the caller adds (e.g. `redacted_because`, `prev_content`).
pub fn client_event(
    pdu: &Pdu,
    now_ms: u64,
    unsigned: serde_json::Map<String, JsonValue>,
    with_room_id: bool,
) -> JsonValue {
    let mut e = serde_json::Map::new();
    e.insert("event_id".into(), JsonValue::String(pdu.event_id.to_string()));
    e.insert("type".into(), JsonValue::String(pdu.kind.to_string()));
    e.insert("sender".into(), JsonValue::String(pdu.sender.to_string()));
    e.insert("origin_server_ts".into(), JsonValue::from(u64::from(pdu.origin_server_ts.0)));
    e.insert("content".into(), pdu.content_value());
    if with_room_id {
        e.insert("room_id".into(), JsonValue::String(pdu.room.to_string()));
    }
    if let Some(sk) = &pdu.state_key {
        e.insert("state_key".into(), JsonValue::String(sk.clone()));
    }
    if let Some(r) = &pdu.redacts_target {
        e.insert("redacts".into(), JsonValue::String(r.to_string()));
    }
    let mut unsigned = unsigned;
    let ts: u64 = pdu.origin_server_ts.0.into();
    unsigned.insert("age".into(), JsonValue::from(now_ms.saturating_sub(ts)));
    e.insert("unsigned".into(), JsonValue::Object(unsigned));
    JsonValue::Object(e)
}

/// Wrap a JSON value as a typed `Raw<T>` for ruma response types.
pub fn raw<T>(v: &JsonValue) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(v).expect("JSON values always serialize"))
}

/// The set of event ids as a sorted set (for auth chains).
pub type EventIdSet = BTreeSet<OwnedEventId>;

/// Canonical JSON value helper.
pub fn cj_string(s: &str) -> CanonicalJsonValue {
    CanonicalJsonValue::String(s.to_owned())
}
