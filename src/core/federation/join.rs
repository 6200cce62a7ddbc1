//! Membership across servers: inviting a user of another node (invite v2), joining a room that
//! lives on other nodes (make_join / send_join v2), and the resident side of both.

use std::{collections::BTreeSet, sync::Arc};

use ruma::{
    api::federation::membership::{
        create_invite, create_join_event, create_leave_event, prepare_join_event, prepare_leave_event, RawStrippedState,
    },
    canonical_json::CanonicalJsonObject,
    events::TimelineEventType,
    signatures::sign_event,
    state_res::{self, check_state_dependent_auth_rules},
    EventId, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
};
use serde_json::{json, value::RawValue, Value as JsonValue};

use crate::{
    core::{
        pdu::{self, rules_for, Pdu, SignedPdu, SUPPORTED_ROOM_VERSIONS},
        rooms::UserRoom,
        state::StateMap,
        to_json, Core, Error, Result,
    },
    store::{key, Batch, Tree},
};

fn raw(obj: &CanonicalJsonObject) -> Result<Box<RawValue>> {
    RawValue::from_string(serde_json::to_string(obj).map_err(|e| Error::Internal(e.to_string()))?)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// An invite kept for a room this node is not in: the stripped state clients are shown.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PendingInvite {
    /// Room version.
    pub room_version: RoomVersionId,
    /// Stripped state events (`type`, `state_key`, `content`, `sender`).
    pub invite_state: Vec<JsonValue>,
    /// Servers that can be asked to join through.
    pub via: Vec<OwnedServerName>,
}

impl Core {
    /// Stripped-state PDUs of `room` to send along with an invite.
    fn invite_room_state(&self, room: &RoomId) -> Result<Vec<RawStrippedState>> {
        let state = self.current_state(room)?;
        let mut out = Vec::new();
        for t in crate::core::sync::STRIPPED_TYPES {
            if let Some(id) = state.get(&(t.to_owned(), String::new())) {
                if let Some(s) = self.stored_pdu(id)? {
                    out.push(RawStrippedState::Pdu(
                        RawValue::from_string(s.json).map_err(|e| Error::Internal(e.to_string()))?,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Ask the invitee's server to countersign an invite we built (invite v2); returns the
    /// event with both signatures.
    pub(crate) async fn exchange_invite(
        &self,
        room: &RoomId,
        version: &RoomVersionId,
        signed: SignedPdu,
    ) -> Result<SignedPdu> {
        let target = signed
            .pdu
            .state_key
            .as_deref()
            .and_then(|k| UserId::parse(k).ok())
            .ok_or_else(|| Error::BadJson("invite without a target".into()))?;
        let dest = target.server_name().to_owned();
        let req = create_invite::v2::Request::new(
            room.to_owned(),
            signed.event_id.clone(),
            version.clone(),
            raw(&signed.object)?,
            self.invite_room_state(room)?,
        );
        let res = self
            .federation_request(&dest, req)
            .await
            .map_err(|e| Error::Forbidden(format!("the invitee's server could not be reached: {e}")))?;
        let rules = rules_for(version)?;
        let theirs =
            self.verify_pdu(&rules, &res.event).map_err(|e| Error::Forbidden(format!("bad invite answer: {e}")))?;
        if theirs.event_id != signed.event_id {
            return Err(Error::Forbidden("the invitee's server changed the invite".into()));
        }
        // The invitee's server must have signed it too.
        let keys = super::key_map_for([dest.as_ref(), self.server_name()])?;
        ruma::signatures::verify_json(&keys, &pdu::redacted_object(theirs.object.clone(), &rules, None)?)
            .map_err(|e| Error::Forbidden(format!("invite not countersigned: {e}")))?;
        Ok(theirs)
    }

    /// Resident side of invite v2 is on the invitee's node: check, countersign and keep the
    /// invite for the local user. Returns the countersigned event.
    pub async fn receive_invite(
        &self,
        origin: &ServerName,
        room: &RoomId,
        version: &RoomVersionId,
        event: &RawValue,
        invite_room_state: &[RawStrippedState],
    ) -> Result<Box<RawValue>> {
        if !SUPPORTED_ROOM_VERSIONS.contains(version) {
            return Err(Error::UnsupportedRoomVersion(version.to_string()));
        }
        let rules = rules_for(version)?;
        let mut signed = self.verify_pdu(&rules, event).map_err(Error::BadJson)?;
        let p = &signed.pdu;
        let target = p.state_key.as_deref().and_then(|k| UserId::parse(k).ok());
        let is_invite = p.kind == TimelineEventType::RoomMember
            && p.content_value().get("membership").and_then(|m| m.as_str()) == Some("invite");
        let Some(target) = target.filter(|_| is_invite) else {
            return Err(Error::BadJson("not an invite".into()));
        };
        if target.server_name() != self.server_name() || p.sender.server_name() != origin || p.room != room {
            return Err(Error::Forbidden("invite does not match the request".into()));
        }
        if self.user(&target)?.is_none() {
            return Err(Error::NotFound("no such user here".into()));
        }
        sign_event(self.server_name().as_str(), self.identity.key_pair(), &mut signed.object, &rules.redaction)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut invite_state = Vec::new();
        for s in invite_room_state {
            #[allow(deprecated)]
            let v: Option<JsonValue> = match s {
                RawStrippedState::Stripped(r) => serde_json::from_str(r.json().get()).ok(),
                RawStrippedState::Pdu(r) => serde_json::from_str::<JsonValue>(r.get()).ok().map(|v| {
                    json!({"type": v["type"], "state_key": v["state_key"], "content": v["content"], "sender": v["sender"]})
                }),
                _ => None,
            };
            invite_state.extend(v);
        }
        invite_state.push(json!({
            "type": "m.room.member", "state_key": target, "content": p.content_value(), "sender": p.sender,
        }));
        let pending = PendingInvite { room_version: version.clone(), invite_state, via: vec![origin.to_owned()] };
        let event_id = signed.event_id.clone();
        let stored = crate::core::rooms::StoredPdu {
            json: serde_json::to_string(&signed.object).map_err(|e| Error::Internal(e.to_string()))?,
            pos: 0,
            state_before: 0,
            state_after: 0,
            txn: None,
            redacted_by: None,
            outlier: true,
            soft_failed: false,
        };
        let already_member = self.room(room)?.is_some();
        self.commit(Batch::new(), |b, pos, _| {
            b.put(Tree::Pdus, event_id.as_bytes().to_vec(), to_json(&stored));
            if !already_member {
                b.put(Tree::Invites, key(&[target.as_bytes(), room.as_bytes()]), to_json(&pending));
                let ur =
                    UserRoom { membership: "invite".into(), pos: pos(), event_id: event_id.clone(), forgotten: false };
                b.put(Tree::UserRooms, key(&[target.as_bytes(), room.as_bytes()]), to_json(&ur));
            }
            Ok(())
        })
        .await?;
        raw(&signed.object)
    }

    /// The invite kept for `user` to a room this node is not in.
    pub fn pending_invite(&self, user: &UserId, room: &RoomId) -> Result<Option<PendingInvite>> {
        self.get_json(Tree::Invites, &key(&[user.as_bytes(), room.as_bytes()]))
    }

    /// Resident side of `make_join`: a join template for `user` (of `origin`).
    pub fn make_join_template(
        &self,
        origin: &ServerName,
        room: &RoomId,
        user: &UserId,
        versions: &[RoomVersionId],
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.membership_template(origin, room, user, "join", Some(versions))
    }

    /// Resident side of `make_leave`: a leave template for `user` (of `origin`), who may only
    /// be invited (declining an invite from a room its server is not in).
    pub fn make_leave_template(
        &self,
        origin: &ServerName,
        room: &RoomId,
        user: &UserId,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.membership_template(origin, room, user, "leave", None)
    }

    /// A `membership` event template for `user` (of `origin`) built on our forward
    /// extremities, refused early when the auth rules would refuse it.
    fn membership_template(
        &self,
        origin: &ServerName,
        room: &RoomId,
        user: &UserId,
        membership: &str,
        versions: Option<&[RoomVersionId]>,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        if user.server_name() != origin {
            return Err(Error::Forbidden(format!("you may only make {membership} events for your own users")));
        }
        let record = self.room(room)?.ok_or_else(|| Error::NotFound("this node is not in that room".into()))?;
        if versions.is_some_and(|v| !v.contains(&record.version)) {
            return Err(Error::UnsupportedRoomVersion(record.version.to_string()));
        }
        let rules = rules_for(&record.version)?;
        let state = self.current_state(room)?;
        let content = json!({"membership": membership});
        let auth_types = state_res::auth_types_for_event(
            &TimelineEventType::RoomMember,
            user,
            Some(user.as_str()),
            &serde_json::value::to_raw_value(&content).map_err(|e| Error::Internal(e.to_string()))?,
            &rules.authorization,
        )
        .map_err(Error::BadJson)?;
        let mut auth_events: Vec<OwnedEventId> =
            auth_types.iter().filter_map(|(t, k)| state.get(&(t.to_string(), k.clone())).cloned()).collect();
        auth_events.sort();
        auth_events.dedup();
        let mut prev = self.extremities(room)?;
        prev.sort();
        prev.truncate(20);
        let template = json!({
            "type": "m.room.member", "room_id": room, "sender": user, "state_key": user,
            "content": content, "origin_server_ts": self.now_ms(), "depth": record.max_depth + 1,
            "prev_events": prev, "auth_events": auth_events,
        });
        // Refuse early what the auth rules would refuse (e.g. invite-only without an invite).
        let probe: Pdu = {
            let mut p: Pdu = serde_json::from_value(template.clone()).map_err(|e| Error::Internal(e.to_string()))?;
            p.room = room.to_owned();
            p
        };
        check_state_dependent_auth_rules(&rules.authorization, &probe, |t, k| {
            state.get(&(t.to_string(), k.to_owned())).and_then(|id| self.pdu(id).ok().flatten())
        })
        .map_err(Error::Forbidden)?;
        let raw = serde_json::value::to_raw_value(&template).map_err(|e| Error::Internal(e.to_string()))?;
        Ok((record.version, raw))
    }

    /// Resident side of `send_join` v2: accept the join (all receipt checks), then answer with
    /// the room state before it and the auth chain, and pass the join on to the other servers.
    pub async fn receive_send_join(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        event_id: &EventId,
        pdu: &RawValue,
    ) -> Result<create_join_event::v2::RoomState> {
        let (stored, _) = self.accept_membership_from(origin, room, event_id, pdu, "join").await?;
        let state = self.state_of_group(stored.state_before)?;
        let mut state_pdus = Vec::new();
        for id in state.values() {
            if let Some(s) = self.stored_pdu(id)? {
                state_pdus.push(RawValue::from_string(s.json).map_err(|e| Error::Internal(e.to_string()))?);
            }
        }
        let chain = self.auth_chain(state.values().cloned().chain(std::iter::once(event_id.to_owned())))?;
        let mut auth_chain = Vec::new();
        for id in chain {
            if let Some(s) = self.stored_pdu(&id)? {
                auth_chain.push(RawValue::from_string(s.json).map_err(|e| Error::Internal(e.to_string()))?);
            }
        }
        // The joining server cannot reach the rest of the room yet: pass its join on.
        let dests = self.servers_to_pass_on(room, origin)?;
        let pos = stored.pos;
        let id = event_id.to_owned();
        // The joining server gets the state *before* its join, so it knows nothing of what grew
        // beside it (concurrent joins, messages): send it our other forward extremities, which
        // link it to all of that (it pulls the gaps with get_missing_events).
        let mut beside = Vec::new();
        for e in self.extremities(room)?.into_iter().filter(|e| e != event_id) {
            if let Some(s) = self.stored_pdu(&e)? {
                beside.push((s.pos, e));
            }
        }
        // The join itself goes to the joining server too: if this answer is lost, the join
        // stands here all the same, and the joiner may have stopped asking (another join of
        // its user landed meanwhile); it would otherwise never hold the room's newest event.
        let joiner: BTreeSet<OwnedServerName> = [origin.to_owned()].into();
        self.commit(Batch::new(), |b, _, _| {
            self.enqueue_pdu(b, &dests, pos, &id);
            self.enqueue_pdu(b, &joiner, pos, &id);
            for (p, e) in &beside {
                self.enqueue_pdu(b, &joiner, *p, e);
            }
            Ok(())
        })
        .await?;
        self.wake_sender(&dests);
        self.wake_sender(&joiner);
        let mut rs = create_join_event::v2::RoomState::new();
        rs.auth_chain = auth_chain;
        rs.state = state_pdus;
        rs.servers_in_room = Some(self.servers_in_room(room)?.into_iter().map(|s| s.to_string()).collect());
        Ok(rs)
    }

    /// Accept `origin`'s own `membership` event for one of its users, handed to us directly
    /// (send_join, send_leave): all receipt checks; refused if soft-failed. Returns it as
    /// stored, and whether we had it already.
    async fn accept_membership_from(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        event_id: &EventId,
        pdu: &RawValue,
        membership: &str,
    ) -> Result<(crate::core::rooms::StoredPdu, bool)> {
        let record = self.room(room)?.ok_or_else(|| Error::NotFound("this node is not in that room".into()))?;
        let rules = rules_for(&record.version)?;
        let signed = self.verify_pdu(&rules, pdu).map_err(Error::BadJson)?;
        let p = &signed.pdu;
        let is_it = p.kind == TimelineEventType::RoomMember
            && p.content_value().get("membership").and_then(|m| m.as_str()) == Some(membership);
        if signed.event_id != event_id
            || !is_it
            || p.sender.server_name() != origin
            || p.state_key.as_deref() != Some(p.sender.as_str())
        {
            return Err(Error::BadJson(format!("not a {membership} for a user of the requesting server")));
        }
        let (_, outcome) = self.handle_incoming_pdu(origin, room, pdu, true).await?;
        use super::receive::PduOutcome;
        let duplicate = match outcome {
            PduOutcome::Accepted => false,
            PduOutcome::Duplicate => true,
            PduOutcome::SoftFailed => {
                return Err(Error::Forbidden(format!("the {membership} fails against the current state")))
            }
            PduOutcome::Rejected(why) => return Err(Error::Forbidden(why)),
        };
        let stored = self.stored_pdu(event_id)?.ok_or_else(|| Error::Internal(format!("{membership} vanished")))?;
        // A join sent again (its first answer was lost) that we soft-failed the first time is
        // a duplicate, but no more accepted than then.
        if stored.soft_failed {
            return Err(Error::Forbidden(format!("the {membership} fails against the current state")));
        }
        // Accepted, but lost in the resolution of the room's state (it merged with a branch
        // where the user may not join): answering 200 would have the joiner believe it is in
        // the room while everyone else counts it out — and, counted out, it would hear from
        // nobody. It tries again instead, on the room's present.
        if membership == "join" && self.membership(room, &p.sender)?.as_deref() != Some("join") {
            return Err(Error::Forbidden("the join does not stand in the room's current state".into()));
        }
        Ok((stored, duplicate))
    }

    /// The other servers of `room`, to which an event `origin` gave us directly (send_join,
    /// send_leave) is passed on: `origin` may not be able to reach them.
    fn servers_to_pass_on(&self, room: &RoomId, origin: &ServerName) -> Result<BTreeSet<OwnedServerName>> {
        let mut dests: BTreeSet<OwnedServerName> = self.servers_in_room(room)?;
        dests.remove(origin);
        dests.remove(self.server_name());
        Ok(dests)
    }

    /// Resident side of `send_leave` v2: accept the leave (all receipt checks) and pass it on
    /// to the other servers of the room.
    pub async fn receive_send_leave(
        self: &Arc<Self>,
        origin: &ServerName,
        room: &RoomId,
        event_id: &EventId,
        pdu: &RawValue,
    ) -> Result<()> {
        let (stored, duplicate) = self.accept_membership_from(origin, room, event_id, pdu, "leave").await?;
        if duplicate {
            return Ok(());
        }
        let dests = self.servers_to_pass_on(room, origin)?;
        let id = event_id.to_owned();
        self.commit(Batch::new(), |b, _, _| {
            self.enqueue_pdu(b, &dests, stored.pos, &id);
            Ok(())
        })
        .await?;
        self.wake_sender(&dests);
        Ok(())
    }

    /// Join `user` to `room`, as `/join` does. While this node is in the room (one of its users
    /// is joined) the join is built on its own copy of the room. Otherwise it goes through
    /// another server — `via`, the server that invited us, the room id's server part, then the
    /// servers of our last known state of the room — even when this node kept a copy from
    /// before it left: that copy is stale (nobody sends events to a server that left), and a
    /// join built on it could fail against the current state and be soft-failed everywhere
    /// but here.
    pub async fn join_room(
        self: &Arc<Self>,
        user: &UserId,
        room: &RoomId,
        reason: Option<String>,
        mut via: Vec<OwnedServerName>,
    ) -> Result<OwnedRoomId> {
        let resident = self.room(room)?.is_some() && self.servers_in_room(room)?.contains(self.server_name());
        if resident {
            self.set_membership(user, room, user, "join", reason, None).await?;
            return Ok(room.to_owned());
        }
        if let Some(inv) = self.pending_invite(user, room)? {
            via.extend(inv.via);
        }
        if let Some(s) = room.server_name() {
            via.push(s.to_owned());
        }
        if self.room(room)?.is_some() {
            via.extend(self.servers_in_room(room)?);
        }
        let mut seen = BTreeSet::new();
        via.retain(|s| s.as_str() != self.server_name().as_str() && seen.insert(s.clone()));
        if via.is_empty() {
            return Err(Error::NotFound("this node is not in that room and knows no server to join through".into()));
        }
        self.join_remote(user, room, &via).await
    }

    /// Join `user` to a room this node is not in, through one of `via` (make_join, then
    /// send_join v2). Returns the room id once the join and the room state are stored.
    pub async fn join_remote(
        self: &Arc<Self>,
        user: &UserId,
        room: &RoomId,
        via: &[OwnedServerName],
    ) -> Result<OwnedRoomId> {
        let mut last_err = Error::NotFound("no server to join through".into());
        let _joining = JoiningGuard::new(self, room);
        let joined = || -> Result<bool> {
            Ok(self.room(room)?.is_some() && self.membership(room, user)?.as_deref() == Some("join"))
        };
        // A stale copy may count the user in already (the room counted it out): that is what
        // this join is to mend, so only a join that lands while this one runs ends it.
        let joined_at_start = joined()?;
        for server in via.iter().filter(|s| s.as_str() != self.server_name().as_str()) {
            // Another join of this user (a client's retry, a second device) may have landed
            // while this one waited on a server that did not answer: then it is done — a new
            // join through the next server would be a second join event, which that server
            // accepts and, if its answer is lost too, we would never hold.
            if !joined_at_start && joined()? {
                return Ok(room.to_owned());
            }
            match self.join_via(user, room, server).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::info!(%room, via = %server, error = %e, "remote join failed");
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    async fn join_via(self: &Arc<Self>, user: &UserId, room: &RoomId, server: &ServerName) -> Result<OwnedRoomId> {
        // Whether we keep a copy of the room from before we left it, which the join is to
        // replace (see `adopt_room`): decided now, before catching up on it changes its state;
        // not while another local user's join of the room is under way (theirs may land
        // first, and ours must then join it rather than replace it).
        let stale_copy = self.room(room)?.is_some()
            && !self.servers_in_room(room)?.contains(self.server_name())
            && self.joining.lock().unwrap_or_else(|e| e.into_inner()).get(room).copied() == Some(1);
        // A join we sent before whose answer never came may have been accepted: the room then
        // already has it (and sends us what follows it). Send that same join again instead of
        // a new one, so that we join at it and the events built on it reach us (the resident
        // answers a join it holds with the state before it, and passes us its extremities).
        let unanswered = self.take_unanswered_join(room, user);
        let reused = unanswered.is_some();
        let (version, rules, event_id, object) = match unanswered {
            Some(u) => {
                let rules = rules_for(&u.version)?;
                (u.version, rules, u.event_id, u.object)
            }
            None => self.make_join(user, room, server).await?,
        };
        let req = create_join_event::v2::Request::new(room.to_owned(), event_id.clone(), raw(&object)?);
        let res = match self.federation_request(server, req).await {
            Ok(r) => r,
            Err(e) => {
                // It may have arrived (no answer), or this server could not take it (not in the
                // room) while another may hold it: keep it to send again (see above). A join
                // the room refuses is not kept.
                let refused = matches!(e, Error::Forbidden(_) | Error::BadJson(_));
                if super::is_transient(&e) || (reused && !refused) {
                    self.keep_unanswered_join(
                        room,
                        UnansweredJoin { user: user.to_owned(), version, event_id, object, at_ms: self.now_ms() },
                    );
                }
                return Err(e);
            }
        };
        self.finish_join(room, server, stale_copy, version, rules, event_id, object, res).await
    }

    /// make_join through `server`, and the signed join event built from its template.
    async fn make_join(
        &self,
        user: &UserId,
        room: &RoomId,
        server: &ServerName,
    ) -> Result<(RoomVersionId, ruma::room_version_rules::RoomVersionRules, OwnedEventId, CanonicalJsonObject)> {
        let mut req = prepare_join_event::v1::Request::new(room.to_owned(), user.to_owned());
        req.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
        let res = self.federation_request(server, req).await?;
        let profile = self.profile(user)?;
        let mut content = json!({"membership": "join"});
        if let Some(d) = profile.displayname {
            content["displayname"] = json!(d);
        }
        if let Some(a) = profile.avatar_url {
            content["avatar_url"] = json!(a);
        }
        self.sign_membership_template(user, res.room_version, &res.event, content)
    }

    /// Our signed event from a resident's membership template (`make_join`, `make_leave`),
    /// with `content` as ours: the room version, its rules, the event id and the object.
    fn sign_membership_template(
        &self,
        user: &UserId,
        version: Option<RoomVersionId>,
        event: &RawValue,
        content: JsonValue,
    ) -> Result<(RoomVersionId, ruma::room_version_rules::RoomVersionRules, OwnedEventId, CanonicalJsonObject)> {
        let version = version.unwrap_or(RoomVersionId::V10);
        let rules = rules_for(&version)?;
        let mut template: serde_json::Map<String, JsonValue> =
            serde_json::from_str(event.get()).map_err(|e| Error::BadJson(format!("bad membership template: {e}")))?;
        // Keep only the fields a PDU has; fill in what is ours to fill.
        template.retain(|k, _| {
            ["type", "room_id", "sender", "state_key", "content", "prev_events", "auth_events", "depth"]
                .contains(&k.as_str())
        });
        if template.get("sender").and_then(|s| s.as_str()) != Some(user.as_str())
            || template.get("state_key").and_then(|s| s.as_str()) != Some(user.as_str())
            || template.get("type").and_then(|s| s.as_str()) != Some("m.room.member")
        {
            return Err(Error::BadJson("membership template is not for this user".into()));
        }
        template.insert("content".into(), content);
        template.insert("origin_server_ts".into(), json!(self.now_ms()));
        let mut object =
            ruma::canonical_json::try_from_json_map(template).map_err(|e| Error::BadJson(e.to_string()))?;
        pdu::hash_and_sign(self.server_name().as_str(), self.identity.key_pair(), &mut object, &rules)?;
        let event_id = pdu::event_id_of(&object, &rules)?;
        Ok((version, rules, event_id, object))
    }

    /// Store what a send_join answer gave and adopt the room at our join.
    #[allow(clippy::too_many_arguments)]
    async fn finish_join(
        self: &Arc<Self>,
        room: &RoomId,
        server: &ServerName,
        stale_copy: bool,
        version: RoomVersionId,
        rules: ruma::room_version_rules::RoomVersionRules,
        event_id: OwnedEventId,
        object: CanonicalJsonObject,
        res: create_join_event::v2::Response,
    ) -> Result<OwnedRoomId> {
        // Check every event we were given (steps 1–3), then store the auth chain and state as
        // outliers in depth order (each is checked against its own auth events).
        let mut events: Vec<SignedPdu> = Vec::new();
        for r in res.room_state.auth_chain.iter().chain(res.room_state.state.iter()) {
            match self.verify_pdu(&rules, r) {
                Ok(s) if s.pdu.room == room => {
                    if !events.iter().any(|e| e.event_id == s.event_id) {
                        events.push(s);
                    }
                }
                Ok(_) => {}
                Err(why) => tracing::info!(%room, reason = %why, "invalid event in send_join answer"),
            }
        }
        let mut state = StateMap::new();
        for r in &res.room_state.state {
            if let Some(s) = events.iter().find(|e| {
                serde_json::to_string(&e.object).ok().as_deref() == Some(r.get())
                    || serde_json::from_str::<JsonValue>(r.get()).ok() == serde_json::to_value(&e.object).ok()
            }) {
                if let Some(k) = &s.pdu.state_key {
                    state.insert((s.pdu.kind.to_string(), k.clone()), s.event_id.clone());
                }
            }
        }
        events.sort_by_key(|s| s.pdu.depth);
        self.store_outliers(&rules, events).await?;
        let create = state
            .get(&("m.room.create".to_owned(), String::new()))
            .cloned()
            .ok_or_else(|| Error::BadJson("send_join answer has no create event".into()))?;
        let join_json = serde_json::to_string(&object).map_err(|e| Error::Internal(e.to_string()))?;
        let join = SignedPdu { event_id: event_id.clone(), pdu: Pdu::from_json(event_id.clone(), &join_json)?, object };
        if self.room(room)?.is_some() {
            // We kept a copy from before we left: pull what happened since (up to the join),
            // so that our old forward extremities the resident already built on stop being
            // extremities; what is left are branches the resident has not seen.
            if let Err(e) = self.fetch_missing_prev_events(server, room, &rules, &join.pdu).await {
                // As before: the join goes on with whatever came; the gap stays open.
                if !super::is_transient(&e) {
                    return Err(e);
                }
            }
        }
        // Our copy's forward extremities the join does not build on: either news to the room
        // (a branch it has not seen), or events it judged and went on from or without — built
        // on (through history our copy lacks or soft-failed), soft-failed or set aside there,
        // typically a stale branch whose state would reset the room's (a join or message made
        // on a resident's extremities just after a partition healed, which the room then went
        // on from without it). Kept, the latter would hold our state apart from the room's for
        // good, often with our user out of the room again. The resident and a few other
        // servers of the room say which (verdicts.rs): one that some settled and none holds as
        // a forward extremity stops being one here too.
        let mut resident_rejected = Vec::new();
        if stale_copy {
            let superseded = self.superseded_by(&join.pdu.prev_events)?;
            let ours: Vec<OwnedEventId> = self
                .extremities(room)?
                .into_iter()
                .filter(|e| !superseded.contains(e))
                .take(super::verdicts::MAX_VERDICTS)
                .collect();
            if !ours.is_empty() {
                let mut asked: Vec<OwnedServerName> = vec![server.to_owned()];
                let in_state = self.servers_in_state(&state, &|_| None)?;
                asked.extend(
                    in_state
                        .into_iter()
                        .filter(|s| s != server && s != self.server_name())
                        .take(MAX_VERDICT_SERVERS - 1),
                );
                let mut settled: BTreeSet<OwnedEventId> = BTreeSet::new();
                let mut open: BTreeSet<OwnedEventId> = BTreeSet::new();
                for s in &asked {
                    let req = super::verdicts::v1::Request::new(room.to_owned(), ours.clone());
                    match self.federation_request(s, req).await {
                        Ok(res) => {
                            for (e, v) in res.verdicts {
                                if v.settled() {
                                    settled.insert(e);
                                } else if v == super::verdicts::Verdict::Extremity {
                                    open.insert(e);
                                }
                            }
                        }
                        // An older node without the extension, or an answer lost.
                        Err(e) => tracing::debug!(%room, via = %s, error = %e, "no verdicts on our extremities"),
                    }
                }
                resident_rejected.extend(settled.into_iter().filter(|e| !open.contains(e)));
            }
        }
        let user = join.pdu.sender.clone();
        self.adopt_room(room, &version, create, state, join, stale_copy, resident_rejected).await?;
        // The resident took the join, but our copy may count it out (it reached us through the
        // room first and lost in the resolution of our state): the user is not in the room
        // here, and a 200 would say they are. The caller tries again (next server, or later),
        // on the room's present.
        if self.membership(room, &user)?.as_deref() != Some("join") {
            return Err(Error::Forbidden("the join was lost in the resolution of the room's state; try again".into()));
        }
        Ok(room.to_owned())
    }
}

/// Servers asked what they made of a stale copy's forward extremities when rejoining (the
/// resident first; see `finish_join`).
const MAX_VERDICT_SERVERS: usize = 4;
/// Most unanswered joins remembered (one per room).
const UNANSWERED_JOINS_MAX: usize = 64;
/// How long an unanswered join is worth sending again.
const UNANSWERED_JOIN_TTL_MS: u64 = 10 * 60 * 1000;

/// A join sent with `send_join` that got no answer: it may have been accepted.
pub(crate) struct UnansweredJoin {
    user: ruma::OwnedUserId,
    version: RoomVersionId,
    event_id: OwnedEventId,
    object: CanonicalJsonObject,
    at_ms: u64,
}

impl Core {
    fn keep_unanswered_join(&self, room: &RoomId, join: UnansweredJoin) {
        let mut m = self.unanswered_joins.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= UNANSWERED_JOINS_MAX && !m.contains_key(room) {
            if let Some(oldest) = m.iter().min_by_key(|(_, j)| j.at_ms).map(|(r, _)| r.clone()) {
                m.remove(&oldest);
            }
        }
        m.insert(room.to_owned(), join);
    }

    /// The unanswered join of `user` in `room`, if recent enough (taken: it is kept again if
    /// it goes unanswered again).
    fn take_unanswered_join(&self, room: &RoomId, user: &UserId) -> Option<UnansweredJoin> {
        let mut m = self.unanswered_joins.lock().unwrap_or_else(|e| e.into_inner());
        let j = m.remove(room)?;
        if j.user != user || self.now_ms().saturating_sub(j.at_ms) > UNANSWERED_JOIN_TTL_MS {
            if j.user != user {
                m.insert(room.to_owned(), j);
            }
            return None;
        }
        Some(j)
    }
}

/// Marks a room as being joined (see `Core::joining`) while it lives.
struct JoiningGuard<'a> {
    core: &'a Core,
    room: OwnedRoomId,
}

impl<'a> JoiningGuard<'a> {
    fn new(core: &'a Core, room: &RoomId) -> Self {
        *core.joining.lock().unwrap_or_else(|e| e.into_inner()).entry(room.to_owned()).or_default() += 1;
        Self { core, room: room.to_owned() }
    }
}

impl Drop for JoiningGuard<'_> {
    fn drop(&mut self) {
        let mut j = self.core.joining.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = j.get_mut(&self.room) {
            *n -= 1;
            if *n == 0 {
                j.remove(&self.room);
            }
        }
    }
}

impl Core {
    /// Whether a join of `room` through another server is under way.
    pub(crate) fn is_joining(&self, room: &RoomId) -> bool {
        self.joining.lock().unwrap_or_else(|e| e.into_inner()).contains_key(room)
    }

    /// Delete a pending invite record (after joining or leaving).
    pub(crate) fn forget_invite(&self, b: &mut Batch, user: &UserId, room: &RoomId) {
        b.delete(Tree::Invites, key(&[user.as_bytes(), room.as_bytes()]));
    }

    /// Decline an invite to a room this node is not in: a leave through the inviting server
    /// (`make_leave`, `send_leave` v2; then the room's own server), so the room sees it. When
    /// none of them can be reached the invite is declined here only — the user asked to be
    /// rid of it, and a device on a mesh may never meet the inviter again (Synapse falls back
    /// the same way).
    pub async fn reject_invite(&self, user: &UserId, room: &RoomId, reason: Option<String>) -> Result<()> {
        let inv = self.pending_invite(user, room)?.ok_or_else(|| Error::NotFound("no invite to that room".into()))?;
        let mut via = inv.via.clone();
        via.extend(room.server_name().map(ToOwned::to_owned));
        let mut seen = BTreeSet::new();
        via.retain(|s| s.as_str() != self.server_name().as_str() && seen.insert(s.clone()));
        let mut told = false;
        for server in &via {
            match self.leave_via(user, room, server, reason.clone()).await {
                Ok(()) => {
                    told = true;
                    break;
                }
                Err(e) => tracing::info!(%room, via = %server, error = %e, "remote invite rejection failed"),
            }
        }
        if !told && !via.is_empty() {
            tracing::info!(%room, %user, "no server of the room could be told; invite declined here only");
        }
        self.reject_invite_locally(user, room).await
    }

    /// make_leave and send_leave v2 through `server`.
    async fn leave_via(&self, user: &UserId, room: &RoomId, server: &ServerName, reason: Option<String>) -> Result<()> {
        let res = self
            .federation_request(server, prepare_leave_event::v1::Request::new(room.to_owned(), user.to_owned()))
            .await?;
        let mut content = json!({"membership": "leave"});
        if let Some(r) = reason {
            content["reason"] = json!(r);
        }
        let (_, _, event_id, object) = self.sign_membership_template(user, res.room_version, &res.event, content)?;
        let req = create_leave_event::v2::Request::new(room.to_owned(), event_id, raw(&object)?);
        self.federation_request(server, req).await?;
        Ok(())
    }

    /// Forget an invite to a room this node is not in, here only.
    async fn reject_invite_locally(&self, user: &UserId, room: &RoomId) -> Result<()> {
        let k = key(&[user.as_bytes(), room.as_bytes()]);
        let old: Option<UserRoom> = self.get_json(Tree::UserRooms, &k)?;
        self.commit(Batch::new(), |b, pos, _| {
            self.forget_invite(b, user, room);
            if let Some(old) = old {
                let ur = UserRoom { membership: "leave".into(), pos: pos(), event_id: old.event_id, forgotten: false };
                b.put(Tree::UserRooms, k, to_json(&ur));
            }
            Ok(())
        })
        .await
    }

    /// Resolve a room alias here or, for another server's alias, by asking that server.
    pub async fn resolve_alias_anywhere(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() == self.server_name() {
            let room = self.resolve_alias(alias)?.ok_or_else(|| Error::NotFound("room alias not found".into()))?;
            return Ok((room, vec![self.server_name().to_owned()]));
        }
        let req = ruma::api::federation::query::get_room_information::v1::Request::new(alias.to_owned());
        let res = self
            .federation_request(alias.server_name(), req)
            .await
            .map_err(|e| Error::NotFound(format!("room alias not found: {e}")))?;
        Ok((res.room_id, res.servers))
    }
}
