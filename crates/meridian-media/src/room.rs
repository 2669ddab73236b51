//! Room bookkeeping: rooms, participants, published tracks and subscriptions, and the
//! commands that change them.

use std::sync::Arc;
use std::time::Instant;

use meridian_protocol::{Layer, TrackAnnouncement, TrackInfo, TrackKind};
use str0m::change::SdpPendingOffer;
use str0m::format::PayloadParams;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::rtp::{ExtensionValues, Ssrc};
use tracing::{debug, warn};

use crate::forward::Forwarder;
use crate::pc::{Pc, mark_dirty};
use crate::rate::LayerRate;
use crate::relay::Relay;
use crate::{HashMap, MediaError, ParticipantId, PcKind, Sfu, SfuEvent, TrackId};

/// Separates a room's name from the node of one of its parts (`room~node`; the same
/// convention as `meridian_events::PART_SEPARATOR`). The parts of one room that a
/// node hosts see each other's tracks; each part keeps its own participants.
pub const PART_SEPARATOR: char = '~';

/// Whether two room names are parts of the same room.
pub(crate) fn same_room(a: &str, b: &str) -> bool {
    a == b || base_room(a) == base_room(b)
}

fn base_room(room: &str) -> &str {
    room.split_once(PART_SEPARATOR)
        .map_or(room, |(base, _)| base)
}

pub(crate) struct Participant {
    pub(crate) room: String,
    pub(crate) identity: String,
    pub(crate) auto_subscribe: bool,
    /// Made at the first publisher offer (`Sfu::handle_publisher_offer`): most participants of
    /// a large room only watch, and an unused `Rtc` costs about 26 KiB.
    pub(crate) publisher: Option<Box<Pc>>,
    pub(crate) subscriber: Pc,
    pub(crate) published: Vec<TrackId>,
    pub(crate) subscriptions: HashMap<TrackId, Subscription>,
    /// Subscriptions made but not yet in a sent offer.
    pub(crate) to_add: Vec<TrackId>,
    /// Media sections of ended subscriptions, to set inactive at the next offer (with
    /// their forwarder, so a reuse continues the stream).
    pub(crate) to_stop: Vec<(Mid, Forwarder)>,
    /// Inactive media sections of the subscriber connection, reused by new
    /// subscriptions of the same kind before any section is added.
    pub(crate) idle: Vec<IdleSection>,
    pub(crate) pending_offer: Option<SdpPendingOffer>,
    pub(crate) estimate_bps: Option<u64>,
    /// Publisher connection tracks announced by the client, by mid.
    pub(crate) announced: HashMap<String, TrackAnnouncement>,
    /// Publisher SSRC → (track, layer) cache.
    pub(crate) ssrc_map: HashMap<Ssrc, (TrackId, usize)>,
    /// Set when this "participant" is one side of a relay link to another node.
    pub(crate) relay: Option<Box<Relay>>,
}

impl Participant {
    /// A participant with its connections (the publisher one, if made yet) and nothing
    /// published, subscribed or negotiated yet.
    pub(crate) fn new(
        room: String,
        identity: String,
        auto_subscribe: bool,
        publisher: Option<Pc>,
        subscriber: Pc,
    ) -> Participant {
        Participant {
            room,
            identity,
            auto_subscribe,
            publisher: publisher.map(Box::new),
            subscriber,
            published: Vec::new(),
            subscriptions: HashMap::default(),
            to_add: Vec::new(),
            to_stop: Vec::new(),
            idle: Vec::new(),
            pending_offer: None,
            estimate_bps: None,
            announced: HashMap::default(),
            ssrc_map: HashMap::default(),
            relay: None,
        }
    }

    /// The connection of `kind`; `None` for a publisher connection not made yet.
    pub(crate) fn pc(&self, kind: PcKind) -> Option<&Pc> {
        match kind {
            PcKind::Publisher => self.publisher.as_deref(),
            PcKind::Subscriber => Some(&self.subscriber),
        }
    }

    /// The connection of `kind`; `None` for a publisher connection not made yet.
    pub(crate) fn pc_mut(&mut self, kind: PcKind) -> Option<&mut Pc> {
        match kind {
            PcKind::Publisher => self.publisher.as_deref_mut(),
            PcKind::Subscriber => Some(&mut self.subscriber),
        }
    }
}

/// A subscriber media section no subscription uses.
pub(crate) struct IdleSection {
    pub(crate) mid: Mid,
    pub(crate) kind: MediaKind,
    /// The forwarder of the subscription that used it last.
    pub(crate) forwarder: Forwarder,
}

pub(crate) struct Subscription {
    pub(crate) mid: Option<Mid>,
    pub(crate) out_ssrc: Option<Ssrc>,
    /// The outgoing stream's RTX SSRC, if it has one (its retransmissions: `retx`).
    pub(crate) out_rtx: Option<Ssrc>,
    pub(crate) max_layer: usize,
    pub(crate) forwarder: Forwarder,
    /// Incoming payload type → outgoing payload type, and the subscriber's RED payload
    /// type wrapping it (audio), if it negotiated RED.
    pub(crate) pt_map: Vec<(Pt, Pt, Option<Pt>)>,
    pub(crate) active: bool,
    /// RED added by the node to this subscriber's audio (publisher sends plain Opus).
    pub(crate) red: crate::red::RedAdder,
    /// The history the outgoing stream's RTX cache keeps (see `rtx`).
    pub(crate) rtx_age: std::time::Duration,
    /// ULPFEC for this subscriber's video, when its connection negotiated it
    /// ([`crate::fec`]); the group follows the loss it reports.
    pub(crate) fec: Option<crate::fec::FecEncoder>,
    /// The loss that sets `fec`'s group.
    pub(crate) loss: crate::fec::LossMeter,
    /// The latest loss `loss` measured (whether retransmissions are copied: `retx`).
    pub(crate) path_loss: f32,
    /// The extension blocks a browser's FEC protects, by the values written
    /// (`fec::libwebrtc_extensions_for`; `None`: none can be known). Emptied when a
    /// negotiation may change the extension map.
    pub(crate) fec_ext: Vec<(ExtensionValues, Option<Arc<[u8]>>)>,
}

pub(crate) struct Track {
    pub(crate) owner: ParticipantId,
    pub(crate) room: String,
    pub(crate) mid: Mid,
    pub(crate) kind: TrackKind,
    pub(crate) source: String,
    pub(crate) layers: Vec<Layer>,
    pub(crate) muted: bool,
    pub(crate) subscribers: Vec<ParticipantId>,
    pub(crate) rates: [LayerRate; 3],
    pub(crate) pt_params: Vec<(Pt, PayloadParams)>,
    /// For a track relayed in from another node: its publisher there (shown to
    /// clients instead of the relay link).
    pub(crate) origin: Option<ParticipantId>,
    /// For a track relayed in: the layer last asked of the upstream node.
    pub(crate) relay_wanted: Option<usize>,
    /// For a track relayed in: the layer crossing the link, as the upstream reported
    /// it (what the local subscribers actually get).
    pub(crate) relay_layer: Option<Layer>,
    /// For a track relayed in: the sequence of the last state applied.
    pub(crate) relay_seq: u64,
}

impl Track {
    pub(crate) fn info(&self, id: TrackId) -> TrackInfo {
        TrackInfo {
            track_id: id.to_string(),
            participant_id: self.origin.unwrap_or(self.owner).to_string(),
            mid: self.mid.to_string(),
            kind: self.kind,
            source: self.source.clone(),
            layers: self.layers.clone(),
            muted: self.muted,
        }
    }
}

impl Sfu {
    /// Adds a participant to `room` (created on first use) and returns its id.
    pub fn add_participant(
        &mut self,
        now: Instant,
        room: &str,
        identity: &str,
        auto_subscribe: bool,
    ) -> ParticipantId {
        let id = ParticipantId(self.next_id);
        self.next_id += 1;
        self.insert_participant(now, id, room, identity, auto_subscribe);
        id
    }

    /// Adds a participant under an id it had before (restored from a room's log after a
    /// failover), with new peer connections.
    pub fn restore_participant(
        &mut self,
        now: Instant,
        id: ParticipantId,
        room: &str,
        identity: &str,
        auto_subscribe: bool,
    ) -> Result<(), MediaError> {
        if self.participants.contains_key(&id) {
            return Err(MediaError::NotAllowed("participant id in use"));
        }
        self.insert_participant(now, id, room, identity, auto_subscribe);
        Ok(())
    }

    pub(crate) fn insert_participant(
        &mut self,
        now: Instant,
        id: ParticipantId,
        room: &str,
        identity: &str,
        auto_subscribe: bool,
    ) {
        self.last_now = now;
        let mut subscriber = Pc::new(&self.config, now, PcKind::Subscriber);
        mark_dirty(&mut self.dirty, id, &mut subscriber, PcKind::Subscriber);
        self.by_ufrag
            .insert(subscriber.ufrag.clone(), (id, PcKind::Subscriber));
        self.participants.insert(
            id,
            Box::new(Participant::new(
                room.to_string(),
                identity.to_string(),
                auto_subscribe,
                None,
                subscriber,
            )),
        );
        self.rooms.entry(room.to_string()).or_default().push(id);
        debug!(participant = %id, room, "participant added");
        if auto_subscribe {
            let existing: Vec<TrackId> = self
                .tracks
                .iter()
                .filter(|(_, t)| same_room(&t.room, room))
                .map(|(id, _)| *id)
                .collect();
            for track in existing {
                // Tracks of the same room are always subscribable by a newcomer.
                let _ = self.subscribe_inner(id, track);
            }
            self.negotiate(id);
        }
        self.process(now);
    }

    /// Removes a participant: its tracks are unpublished, its subscriptions and
    /// connections freed, and its room dropped when empty.
    pub fn remove_participant(&mut self, now: Instant, id: ParticipantId) {
        self.last_now = now;
        let Some(mut p) = self.participants.remove(&id) else {
            return;
        };
        if let Some(r) = &p.relay {
            self.forget_relay(id, r);
        }
        let publisher = p.publisher.as_deref_mut();
        for pc in publisher.into_iter().chain([&mut p.subscriber]) {
            self.by_ufrag.remove(&pc.ufrag);
            if let Some(addr) = pc.remote
                && self
                    .by_addr
                    .get(&addr)
                    .is_some_and(|(owner, _)| *owner == id)
            {
                self.by_addr.remove(&addr);
            }
            pc.rtc.disconnect();
        }
        for track in p.subscriptions.keys() {
            if let Some(t) = self.tracks.get_mut(track) {
                t.subscribers.retain(|s| *s != id);
            }
            self.relay_want(*track);
        }
        // A relay link's tracks end as relayed ones (it is no longer a participant).
        let link = p.relay.as_ref().map(|r| r.peer.as_str());
        for track in p.published.clone() {
            self.remove_track_of(track, link);
        }
        if let Some(members) = self.rooms.get_mut(&p.room) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.rooms.remove(&p.room);
            }
        }
        debug!(participant = %id, "participant removed");
        self.process(now);
    }

    /// Subscribes a participant to a track of its room.
    pub fn subscribe(
        &mut self,
        now: Instant,
        id: ParticipantId,
        track: TrackId,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        self.subscribe_inner(id, track)?;
        self.negotiate(id);
        self.process(now);
        Ok(())
    }

    /// Ends a subscription.
    pub fn unsubscribe(
        &mut self,
        now: Instant,
        id: ParticipantId,
        track: TrackId,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let sub = p
            .subscriptions
            .remove(&track)
            .ok_or(MediaError::UnknownTrack(track))?;
        p.to_add.retain(|t| *t != track);
        if let Some(mid) = sub.mid {
            p.to_stop.push((mid, sub.forwarder));
        }
        if let Some(t) = self.tracks.get_mut(&track) {
            t.subscribers.retain(|s| *s != id);
        }
        self.relay_want(track);
        self.negotiate(id);
        self.process(now);
        Ok(())
    }

    /// Caps the layer a subscriber receives for a track.
    pub fn set_max_layer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        track: TrackId,
        layer: Layer,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let sub = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?
            .subscriptions
            .get_mut(&track)
            .ok_or(MediaError::UnknownTrack(track))?;
        sub.max_layer = layer.index();
        self.relay_want(track);
        self.reallocate(id, now);
        self.process(now);
        Ok(())
    }

    /// Mutes or unmutes a participant's own track (muted tracks are not forwarded).
    pub fn set_muted(
        &mut self,
        now: Instant,
        id: ParticipantId,
        track: TrackId,
        muted: bool,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let t = self
            .tracks
            .get_mut(&track)
            .filter(|t| t.owner == id)
            .ok_or(MediaError::UnknownTrack(track))?;
        if t.muted != muted {
            t.muted = muted;
            let room = t.room.clone();
            self.events.push_back(SfuEvent::TrackMuted {
                room,
                track_id: track,
                muted,
            });
            self.relay_state_changed(track);
            if !muted {
                self.request_keyframe_for(track, now, true);
            }
        }
        self.process(now);
        Ok(())
    }

    /// Stops a participant's own track.
    pub fn unpublish(
        &mut self,
        now: Instant,
        id: ParticipantId,
        track: TrackId,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        if self.tracks.get(&track).is_none_or(|t| t.owner != id) {
            return Err(MediaError::UnknownTrack(track));
        }
        self.remove_track(track);
        self.process(now);
        Ok(())
    }

    pub(crate) fn subscribe_inner(
        &mut self,
        id: ParticipantId,
        track: TrackId,
    ) -> Result<(), MediaError> {
        let t = self
            .tracks
            .get_mut(&track)
            .ok_or(MediaError::UnknownTrack(track))?;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let limit = match &p.relay {
            Some(r) => {
                // A relay link carries only tracks published on this node, of the rooms
                // it was asked for: a relayed track is never relayed again (no loops).
                if r.inbound || !r.rooms.contains(&t.room) {
                    return Err(MediaError::UnknownTrack(track));
                }
                if t.origin.is_some() {
                    return Err(MediaError::NotAllowed(
                        "a track relayed in from another node is not relayed again",
                    ));
                }
                self.config.max_relay_tracks
            }
            None if !same_room(&t.room, &p.room) => return Err(MediaError::UnknownTrack(track)),
            None => self.config.max_subscriptions_per_participant,
        };
        if t.owner == id {
            return Err(MediaError::NotAllowed(
                "a participant cannot subscribe to its own track",
            ));
        }
        if p.subscriptions.contains_key(&track) {
            return Ok(());
        }
        if p.subscriptions.len() >= limit {
            return Err(MediaError::Limit("subscriptions per participant"));
        }
        let clock = if t.kind == TrackKind::Audio {
            48_000
        } else {
            90_000
        };
        p.subscriptions.insert(
            track,
            Subscription {
                mid: None,
                out_ssrc: None,
                out_rtx: None,
                max_layer: 2,
                forwarder: Forwarder::new(clock),
                pt_map: Vec::new(),
                active: false,
                red: Default::default(),
                rtx_age: crate::rtx::INITIAL_AGE,
                fec: None,
                loss: Default::default(),
                path_loss: 0.0,
                fec_ext: Vec::new(),
            },
        );
        p.to_add.push(track);
        t.subscribers.push(id);
        if p.relay.is_none() {
            self.events.push_back(SfuEvent::Subscribed {
                participant: id,
                track_id: track,
            });
        }
        self.relay_want(track);
        Ok(())
    }

    pub(crate) fn remove_track(&mut self, track: TrackId) {
        self.remove_track_of(track, None);
    }

    /// Removes a track; `link` names the relay link it came over when that link is
    /// being removed (and so no longer among the participants).
    fn remove_track_of(&mut self, track: TrackId, link: Option<&str>) {
        let Some(t) = self.tracks.remove(&track) else {
            return;
        };
        if let Some(owner) = self.participants.get_mut(&t.owner) {
            owner.published.retain(|x| *x != track);
            owner.ssrc_map.retain(|_, (tr, _)| *tr != track);
        }
        for sub_id in &t.subscribers {
            if let Some(p) = self.participants.get_mut(sub_id)
                && let Some(sub) = p.subscriptions.remove(&track)
            {
                p.to_add.retain(|x| *x != track);
                if let Some(mid) = sub.mid {
                    p.to_stop.push((mid, sub.forwarder));
                }
            }
        }
        let relayed_from = self
            .participants
            .get(&t.owner)
            .and_then(|o| o.relay.as_ref())
            .map(|r| r.peer.clone())
            .or_else(|| link.map(str::to_string));
        self.events.push_back(match relayed_from {
            Some(peer) => SfuEvent::RelayTrackUnpublished {
                room: t.room.clone(),
                track_id: track,
                peer,
            },
            None => SfuEvent::TrackUnpublished {
                room: t.room.clone(),
                track_id: track,
                participant: t.owner,
            },
        });
        for sub_id in t.subscribers {
            self.negotiate(sub_id);
        }
    }

    /// Creates the track for a receiving media section, unless it exists.
    pub(crate) fn add_track(
        &mut self,
        id: ParticipantId,
        mid: Mid,
        kind: MediaKind,
        rids: &[String],
        codec: String,
    ) -> Option<TrackId> {
        let p = self.participants.get_mut(&id)?;
        if p.published
            .iter()
            .any(|t| self.tracks.get(t).is_some_and(|t| t.mid == mid))
        {
            return None;
        }
        let relayed = p.relay.as_ref().and_then(|r| {
            r.sections
                .get(&mid.to_string())
                .map(|s| (s.clone(), r.peer.clone()))
        });
        if p.relay.is_some() && relayed.is_none() {
            // Only the sections the upstream node described carry tracks.
            return None;
        }
        let cap = if relayed.is_some() {
            self.config.max_relay_tracks
        } else {
            self.config.max_tracks_per_participant
        };
        if p.published.len() >= cap {
            warn!(participant = %id, "track limit reached; media section ignored");
            return None;
        }
        let kind = match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        let announced = p.announced.get(&mid.to_string());
        let mut layers: Vec<Layer> = rids.iter().filter_map(|r| Layer::from_rid(r)).collect();
        if let Some((rt, _)) = &relayed {
            // One layer crosses the link at a time; clients see the publisher's layers.
            layers = rt.track.layers.clone();
        }
        layers.sort();
        let source = relayed.as_ref().map(|(rt, _)| rt.track.source.clone());
        let source = source
            .or_else(|| announced.map(|a| a.source.clone()))
            .unwrap_or_else(|| {
                match kind {
                    TrackKind::Audio => "microphone",
                    TrackKind::Video => "camera",
                }
                .to_string()
            });
        // A restored publisher asks for its earlier id (the node checked it is its own).
        let wanted_id = match &relayed {
            // A relayed track keeps its id: the same track on every node of the room.
            Some((rt, _)) => rt.track.track_id.parse::<TrackId>().ok(),
            None => announced
                .and_then(|a| a.track_id.as_deref())
                .and_then(|t| t.parse::<TrackId>().ok()),
        };
        let track = match wanted_id.filter(|t| !self.tracks.contains_key(t)) {
            Some(t) => t,
            None => {
                self.next_id += 1;
                TrackId(self.next_id - 1)
            }
        };
        p.published.push(track);
        let room = match &relayed {
            Some((rt, _)) => rt.room.clone(),
            None => p.room.clone(),
        };
        let origin = relayed
            .as_ref()
            .map(|(rt, _)| rt.track.participant_id.parse().unwrap_or(id));
        let t = Track {
            owner: id,
            room: room.clone(),
            mid,
            kind,
            source,
            layers,
            muted: relayed.as_ref().is_some_and(|(rt, _)| rt.track.muted),
            subscribers: Vec::new(),
            rates: [LayerRate::default(); 3],
            pt_params: Vec::new(),
            origin,
            relay_wanted: None,
            relay_layer: None,
            relay_seq: 0,
        };
        let info = t.info(track);
        self.tracks.insert(track, t);
        if relayed.is_some() {
            // A state the upstream sent before its offer reached this node.
            let pending = self
                .participants
                .get_mut(&id)
                .and_then(|p| p.relay.as_mut())
                .and_then(|r| r.pending.remove(&track.to_string()));
            if let Some(state) = pending {
                self.apply_relay_state(track, state);
            }
        }
        debug!(participant = %id, track = %track, "track published");
        self.events.push_back(match relayed {
            Some((rt, peer)) => SfuEvent::RelayTrackPublished {
                room: room.clone(),
                track: info,
                peer,
                identity: rt.identity,
                name: rt.name,
            },
            None => SfuEvent::TrackPublished {
                room: room.clone(),
                track: info,
                codec,
            },
        });
        // Every part of the room on this node sees the track.
        let mut others: Vec<ParticipantId> = self
            .rooms
            .iter()
            .filter(|(r, _)| same_room(r, &room))
            .flat_map(|(_, m)| m.iter().copied().filter(|o| *o != id))
            .collect();
        // Outbound relay links carrying this room take a local track at once.
        if origin.is_none() {
            others.extend(self.relays_out.values().copied().filter(|r| {
                self.participants
                    .get(r)
                    .and_then(|p| p.relay.as_ref())
                    .is_some_and(|rl| rl.rooms.contains(&room))
            }));
        }
        for other in others {
            if self
                .participants
                .get(&other)
                .is_some_and(|o| o.auto_subscribe || o.relay.is_some())
                && self.subscribe_inner(other, track).is_ok()
            {
                self.negotiate(other);
            }
        }
        Some(track)
    }
}
