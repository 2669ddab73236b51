//! Relay links: one node forwards the tracks published on it to another node that
//! hosts part of the same room, once per link, and that node fans them out.
//!
//! A link is directional and carries the tracks of every room the two nodes share.
//! Inside the core each side is kept as a participant without a room:
//!
//! * **outbound** (the upstream node, [`Sfu::relay_room`]): its *subscriber*
//!   connection (ICE-lite, the node offers, TWCC estimate) subscribes to every track
//!   published locally in the rooms the downstream asked for. Each subscription is a
//!   normal one with its own [`Forwarder`](crate::forward), so exactly one simulcast
//!   layer crosses per track, capped by [`Sfu::set_relay_layer`] (the highest layer
//!   the downstream's subscribers want) and chosen within the link's estimate. Its
//!   offers go out as [`SfuEvent::RelayOffer`] instead of to a client.
//! * **inbound** (the downstream node, [`Sfu::handle_relay_offer`]): its *publisher*
//!   connection is a full ICE agent on the node's relay socket (`relay_addr`), so it
//!   never shares a source address with a client or with the reverse link; every
//!   media section of the upstream's offer becomes a local track with the same track
//!   id, which the room's local participants auto-subscribe to. Keyframe requests,
//!   NACKs and TWCC feedback flow back over the same connection.
//!
//! Tracks that arrived over a link are never relayed again, so links cannot loop.

use std::net::SocketAddr;
use std::time::Instant;

use meridian_protocol::{Layer, TrackInfo};
use serde::{Deserialize, Serialize};
use str0m::Input;
use str0m::change::SdpOffer;
use str0m::media::Mid;
use str0m::net::{Protocol, Receive};

use crate::pc::{self, Pc, mark_dirty};
use crate::room::{Participant, Subscription, Track};
use crate::{HashMap, MediaError, ParticipantId, PcKind, Sfu, SfuEvent, TrackId, Transmit};

/// One track of a relay link: the media section carrying it and what the
/// downstream node needs to publish it in its part of the room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayTrack {
    /// The media section of the link's connection.
    pub mid: String,
    /// The room the track belongs to.
    pub room: String,
    /// The track as its publisher's node knows it (id, publisher, kind, layers).
    pub track: TrackInfo,
    /// The publisher's identity (its token's subject), so the far part's clients see
    /// who publishes it (at most [`MAX_RELAY_IDENTITY_BYTES`]; empty from a node that
    /// does not send it).
    #[serde(default)]
    pub identity: String,
    /// The publisher's display name, if its token gave one (at most
    /// [`MAX_RELAY_NAME_BYTES`]).
    #[serde(default)]
    pub name: Option<String>,
}

/// Longest publisher identity a relay offer may carry (a token's subject bound).
pub const MAX_RELAY_IDENTITY_BYTES: usize = 128;
/// Longest publisher display name a relay offer may carry (a token's name bound).
pub const MAX_RELAY_NAME_BYTES: usize = 256;

/// What the downstream node of a link is told about a track it receives: its mute
/// state and the layer crossing the link (sent by the upstream on every change,
/// [`SfuEvent::RelayTrackState`]; applied by [`Sfu::handle_relay_track_state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayTrackState {
    /// The track (its id is the same on both nodes).
    pub track_id: String,
    /// Increases with every state the upstream node sends: an older one than the last
    /// applied is ignored (control requests may arrive out of order).
    pub seq: u64,
    /// Whether the track's publisher muted it.
    pub muted: bool,
    /// The layer crossing the link now (`None`: not known yet).
    pub layer: Option<Layer>,
}

/// Counters of one side of a relay link, for metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RelayStats {
    /// The other node.
    pub peer: String,
    /// Whether this node receives over the link (false: it sends).
    pub inbound: bool,
    /// Tracks the link carries.
    pub tracks: usize,
    /// RTP packets sent (outbound) or received (inbound) over the link.
    pub packets: u64,
    /// Outbound: RTP packets sent per simulcast layer (low, medium, high; audio and
    /// single-stream video count as low).
    pub packets_by_layer: [u64; 3],
    /// Outbound: RTP payload bytes sent over the link.
    pub bytes: u64,
    /// Outbound: the tracks the link carries now (one copy each), sorted.
    pub track_ids: Vec<TrackId>,
    /// Whether ICE and DTLS completed.
    pub connected: bool,
}

/// What the core keeps about a participant that is a relay link.
pub(crate) struct Relay {
    pub(crate) peer: String,
    pub(crate) inbound: bool,
    /// Outbound: the rooms whose local tracks the link carries.
    pub(crate) rooms: std::collections::BTreeSet<String>,
    /// Inbound: the track each media section carries (from the upstream's offer).
    pub(crate) sections: HashMap<String, RelayTrack>,
    /// Inbound: the upstream node's media address.
    pub(crate) remote: Option<SocketAddr>,
    /// Inbound: the ICE ufrag of the upstream's offers; another one means the upstream
    /// rebuilt its side (relay links are never ICE-restarted), so this side starts over
    /// too. Not the DTLS fingerprint: one certificate serves every connection of a
    /// process, so a link rebuilt by the same process keeps it.
    pub(crate) upstream_ufrag: Option<String>,
    pub(crate) packets: u64,
    pub(crate) packets_by_layer: [u64; 3],
    /// Outbound: RTP payload bytes sent.
    pub(crate) bytes: u64,
    /// Inbound: states of tracks not (yet) published here, by track id; applied when
    /// the upstream's offer brings the track. At most `max_relay_tracks`.
    pub(crate) pending: HashMap<String, RelayTrackState>,
}

impl Relay {
    fn new(peer: &str, inbound: bool) -> Box<Relay> {
        Box::new(Relay {
            peer: peer.to_string(),
            inbound,
            rooms: Default::default(),
            sections: HashMap::default(),
            remote: None,
            upstream_ufrag: None,
            packets: 0,
            packets_by_layer: [0; 3],
            bytes: 0,
            pending: HashMap::default(),
        })
    }
}

/// The tracks of an outbound link's offer, one per negotiated section.
pub(crate) fn offer_tracks(
    tracks: &HashMap<TrackId, Track>,
    subscriptions: &HashMap<TrackId, Subscription>,
) -> Vec<RelayTrack> {
    let mut out: Vec<RelayTrack> = subscriptions
        .iter()
        .filter_map(|(id, sub)| {
            let t = tracks.get(id)?;
            Some(RelayTrack {
                mid: sub.mid?.to_string(),
                room: t.room.clone(),
                track: t.info(*id),
                identity: String::new(),
                name: None,
            })
        })
        .collect();
    out.sort_by(|a, b| a.mid.cmp(&b.mid));
    out
}

impl Sfu {
    fn insert_relay(
        &mut self,
        now: Instant,
        peer: &str,
        inbound: bool,
        mut pc: Pc,
    ) -> ParticipantId {
        let id = ParticipantId(self.next_id);
        self.next_id += 1;
        let kind = if inbound {
            PcKind::Publisher
        } else {
            PcKind::Subscriber
        };
        mark_dirty(&mut self.dirty, id, &mut pc, kind);
        // The unused subscriber connection of an inbound link is never offered, so
        // nobody can reach it; an outbound link has no publisher connection.
        let (publisher, subscriber) = if inbound {
            (Some(pc), Pc::new(&self.config, now, PcKind::Subscriber))
        } else {
            // The downstream checks this connection's ICE-lite candidate by ufrag.
            self.by_ufrag.insert(pc.ufrag.clone(), (id, kind));
            (None, pc)
        };
        let mut participant = Box::new(Participant::new(
            String::new(),
            format!("relay:{peer}"),
            false,
            publisher,
            subscriber,
        ));
        participant.relay = Some(Relay::new(peer, inbound));
        self.participants.insert(id, participant);
        if inbound {
            self.relays_in.insert(peer.to_string(), id);
        } else {
            self.relays_out.insert(peer.to_string(), id);
        }
        id
    }

    /// Drops the core's indexes of a relay link being removed.
    pub(crate) fn forget_relay(&mut self, id: ParticipantId, r: &Relay) {
        let map = if r.inbound {
            &mut self.relays_in
        } else {
            &mut self.relays_out
        };
        if map.get(&r.peer) == Some(&id) {
            map.remove(&r.peer);
        }
        if let Some(addr) = r.remote
            && self.relay_by_addr.get(&addr) == Some(&id)
        {
            self.relay_by_addr.remove(&addr);
        }
    }

    /// Upstream side: relays every track published on this node in `room` (now and
    /// later) to the node `peer`, over the outbound link to it (created on first use).
    /// The link's offers come out as [`SfuEvent::RelayOffer`].
    pub fn relay_room(&mut self, now: Instant, peer: &str, room: &str) -> ParticipantId {
        self.last_now = now;
        let id = match self.relays_out.get(peer) {
            Some(id) => *id,
            None => {
                let pc = Pc::new_relay_out(&self.config, now);
                self.insert_relay(now, peer, false, pc)
            }
        };
        if let Some(r) = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.relay.as_mut())
        {
            r.rooms.insert(room.to_string());
        }
        let local: Vec<TrackId> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.room == room && t.origin.is_none())
            .map(|(id, _)| *id)
            .collect();
        for track in local {
            // Only the link's track bound can refuse; the rest stay unrelayed.
            let _ = self.subscribe_inner(id, track);
        }
        self.negotiate(id);
        self.process(now);
        id
    }

    /// Upstream side: stops relaying `room` to `peer`; the link closes with its last room.
    pub fn unrelay_room(&mut self, now: Instant, peer: &str, room: &str) {
        self.last_now = now;
        let Some(&id) = self.relays_out.get(peer) else {
            return;
        };
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if let Some(r) = p.relay.as_mut() {
            r.rooms.remove(room);
            if r.rooms.is_empty() {
                self.remove_participant(now, id);
                return;
            }
        }
        let tracks: Vec<TrackId> = p
            .subscriptions
            .keys()
            .copied()
            .filter(|t| self.tracks.get(t).is_some_and(|t| t.room == room))
            .collect();
        for t in tracks {
            let _ = self.unsubscribe(now, id, t);
        }
    }

    /// Upstream side: applies the downstream's answer to the last [`SfuEvent::RelayOffer`].
    pub fn handle_relay_answer(
        &mut self,
        now: Instant,
        peer: &str,
        sdp: &str,
    ) -> Result<(), MediaError> {
        let id = *self
            .relays_out
            .get(peer)
            .ok_or(MediaError::NotAllowed("no relay link to that node"))?;
        self.handle_subscriber_answer(now, id, sdp)
    }

    /// Upstream side: caps the layer sent to `peer` for `track` (the highest layer the
    /// downstream's subscribers want; the switch happens at the layer's next keyframe).
    pub fn set_relay_layer(
        &mut self,
        now: Instant,
        peer: &str,
        track: TrackId,
        layer: Layer,
    ) -> Result<(), MediaError> {
        let id = *self
            .relays_out
            .get(peer)
            .ok_or(MediaError::NotAllowed("no relay link to that node"))?;
        self.set_max_layer(now, id, track, layer)
    }

    /// Downstream side: accepts the upstream node's offer for the link from `peer`
    /// (whose media socket is `peer_addr`), publishes its tracks in their rooms and
    /// returns the SDP answer. Sections whose track changed or went inactive end
    /// their old track.
    pub fn handle_relay_offer(
        &mut self,
        now: Instant,
        peer: &str,
        peer_addr: SocketAddr,
        sdp: &str,
        tracks: Vec<RelayTrack>,
    ) -> Result<String, MediaError> {
        self.last_now = now;
        let relay_addr = self
            .config
            .relay_addr
            .ok_or(MediaError::NotAllowed("this node takes no relay links"))?;
        if tracks.len() > self.config.max_relay_tracks {
            return Err(MediaError::Limit("tracks per relay link"));
        }
        if tracks.iter().any(|t| {
            t.identity.len() > MAX_RELAY_IDENTITY_BYTES
                || t.name
                    .as_ref()
                    .is_some_and(|n| n.len() > MAX_RELAY_NAME_BYTES)
        }) {
            return Err(MediaError::Limit(
                "publisher identity or name of a relayed track",
            ));
        }
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let upstream_ufrag = sdp
            .lines()
            .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
            .map(str::to_string);
        let rebuilt = self
            .relays_in
            .get(peer)
            .and_then(|id| self.participants.get(id))
            .and_then(|p| p.relay.as_ref())
            .is_some_and(|r| r.upstream_ufrag != upstream_ufrag);
        if rebuilt {
            // The upstream's side is new (it restarted or rebuilt the link): so is ours.
            self.remove_relay_in(now, peer);
        }
        let id = match self.relays_in.get(peer) {
            Some(id) => *id,
            None => {
                let pc = Pc::new_relay_in(now, relay_addr);
                self.insert_relay(now, peer, true, pc)
            }
        };
        // The link's datagrams are told apart by the upstream's address.
        if let Some(r) = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.relay.as_mut())
            && r.remote != Some(peer_addr)
        {
            if let Some(old) = r.remote.replace(peer_addr) {
                self.relay_by_addr.remove(&old);
            }
            self.relay_by_addr.insert(peer_addr, id);
        }
        let sections: HashMap<String, RelayTrack> =
            tracks.into_iter().map(|t| (t.mid.clone(), t)).collect();
        // Tracks whose section now carries another track, or none, end here.
        let ended: Vec<TrackId> = self
            .participants
            .get(&id)
            .map(|p| {
                p.published
                    .iter()
                    .copied()
                    .filter(|t| {
                        self.tracks.get(t).is_none_or(|tr| {
                            sections
                                .get(&tr.mid.to_string())
                                .is_none_or(|s| s.track.track_id != t.to_string())
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        for t in ended {
            self.remove_track(t);
        }
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let publisher = p.publisher.as_deref_mut().ok_or(MediaError::NotAllowed(
            "not the inbound side of a relay link",
        ))?;
        let answer = publisher
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        mark_dirty(&mut self.dirty, id, publisher, PcKind::Publisher);
        let mids: Vec<String> = sections.keys().cloned().collect();
        if let Some(r) = p.relay.as_mut() {
            r.sections = sections;
            r.upstream_ufrag = upstream_ufrag;
        }
        for mid in mids {
            let Some(publisher) = self
                .participants
                .get(&id)
                .and_then(|p| p.publisher.as_deref())
            else {
                break;
            };
            let mid = Mid::from(mid.as_str());
            let Some(media) = publisher.rtc.media(mid) else {
                continue;
            };
            if !media.direction().is_receiving() {
                continue;
            }
            let kind = media.kind();
            let codec = pc::primary_codec(&publisher.rtc, media.remote_pts());
            self.add_track(id, mid, kind, &[], codec);
        }
        self.process(now);
        Ok(answer.to_sdp_string())
    }

    /// Handles one datagram that arrived at the node's relay socket (the inbound
    /// sides of relay links). Datagrams from an address no link expects are dropped
    /// and counted as unrouted.
    pub fn handle_relay_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        self.last_now = now;
        let Some(local) = self.config.relay_addr else {
            self.stats.datagrams_unrouted += 1;
            return;
        };
        let Ok(receive) = Receive::new(Protocol::Udp, source, local, contents) else {
            self.stats.datagrams_malformed += 1;
            return;
        };
        let Some(&id) = self.relay_by_addr.get(&source) else {
            self.stats.datagrams_unrouted += 1;
            return;
        };
        let Some(pc) = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.publisher.as_deref_mut())
        else {
            self.stats.datagrams_unrouted += 1;
            return;
        };
        if pc.rtc.handle_input(Input::Receive(now, receive)).is_err() {
            self.stats.datagrams_rejected += 1;
        }
        mark_dirty(&mut self.dirty, id, pc, PcKind::Publisher);
        self.process(now);
    }

    /// Downstream side: applies the upstream node's state of a track it relays here
    /// (mute, the layer crossing): the room's clients are told of a mute change
    /// ([`SfuEvent::RelayTrackMuted`]) and each local subscriber of the track gets a
    /// [`SfuEvent::LayerChanged`] naming the layer it now gets. A state older than
    /// the last applied is ignored; one for a track the link has not offered yet is
    /// kept until it does.
    pub fn handle_relay_track_state(
        &mut self,
        now: Instant,
        peer: &str,
        state: RelayTrackState,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let id = *self
            .relays_in
            .get(peer)
            .ok_or(MediaError::NotAllowed("no relay link from that node"))?;
        let track: TrackId = state
            .track_id
            .parse()
            .map_err(|_| MediaError::NotAllowed("not a track id"))?;
        if self.tracks.get(&track).is_some_and(|t| t.owner == id) {
            self.apply_relay_state(track, state);
            return Ok(());
        }
        let max = self.config.max_relay_tracks;
        let r = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.relay.as_mut())
            .ok_or(MediaError::UnknownParticipant(id))?;
        if r.pending.len() >= max && !r.pending.contains_key(&state.track_id) {
            return Err(MediaError::Limit("tracks per relay link"));
        }
        match r.pending.get(&state.track_id) {
            Some(old) if old.seq >= state.seq => {}
            _ => {
                r.pending.insert(state.track_id.clone(), state);
            }
        }
        Ok(())
    }

    /// Applies a relayed track's state (see [`Sfu::handle_relay_track_state`]).
    pub(crate) fn apply_relay_state(&mut self, track: TrackId, state: RelayTrackState) {
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        if state.seq <= t.relay_seq {
            return;
        }
        t.relay_seq = state.seq;
        if t.muted != state.muted {
            t.muted = state.muted;
            self.events.push_back(SfuEvent::RelayTrackMuted {
                room: t.room.clone(),
                track_id: track,
                muted: state.muted,
            });
        }
        if let Some(layer) = state.layer
            && t.relay_layer != Some(layer)
        {
            t.relay_layer = Some(layer);
            for s in &t.subscribers {
                let receiving = self
                    .participants
                    .get(s)
                    .and_then(|p| p.subscriptions.get(&track))
                    .is_some_and(|sub| sub.active && sub.forwarder.current().is_some());
                if receiving {
                    self.events.push_back(SfuEvent::LayerChanged {
                        participant: *s,
                        track_id: track,
                        layer: Some(layer),
                    });
                }
            }
        }
    }

    /// Upstream side: after a local track's mute state changed, tells every downstream
    /// node it is relayed to (with the layer crossing each link).
    pub(crate) fn relay_state_changed(&mut self, track: TrackId) {
        let Some(t) = self.tracks.get(&track) else {
            return;
        };
        if t.origin.is_some() {
            return;
        }
        for s in &t.subscribers {
            let Some(p) = self.participants.get(s) else {
                continue;
            };
            let Some(r) = p.relay.as_ref().filter(|r| !r.inbound) else {
                continue;
            };
            let crossing = p
                .subscriptions
                .get(&track)
                .and_then(|sub| sub.forwarder.current())
                .map(|l| Layer::ALL[l.min(2)]);
            self.relay_seq += 1;
            self.events.push_back(SfuEvent::RelayTrackState {
                peer: r.peer.clone(),
                state: RelayTrackState {
                    track_id: track.to_string(),
                    seq: self.relay_seq,
                    muted: t.muted,
                    layer: crossing,
                },
            });
        }
    }

    /// Next datagram to send from the relay socket.
    pub fn poll_relay_transmit(&mut self) -> Option<Transmit> {
        self.relay_transmits.pop_front()
    }

    /// Closes both directions of the links with `peer` (it died, or stopped
    /// answering). Tracks relayed in from it are unpublished here.
    pub fn remove_relay(&mut self, now: Instant, peer: &str) {
        for id in [self.relays_out.get(peer), self.relays_in.get(peer)]
            .into_iter()
            .flatten()
            .copied()
            .collect::<Vec<_>>()
        {
            self.remove_participant(now, id);
        }
    }

    /// Closes only the outbound link to `peer` (the downstream lost its side and asks
    /// for a fresh one); its rooms must be relayed again with [`Sfu::relay_room`].
    pub fn remove_relay_out(&mut self, now: Instant, peer: &str) {
        if let Some(id) = self.relays_out.get(peer).copied() {
            self.remove_participant(now, id);
        }
    }

    /// Closes only the inbound link from `peer` (its tracks are unpublished here).
    pub fn remove_relay_in(&mut self, now: Instant, peer: &str) {
        if let Some(id) = self.relays_in.get(peer).copied() {
            self.remove_participant(now, id);
        }
    }

    /// The rooms the outbound link to `peer` carries.
    pub fn relayed_rooms(&self, peer: &str) -> Vec<String> {
        self.relays_out
            .get(peer)
            .and_then(|id| self.participants.get(id))
            .and_then(|p| p.relay.as_ref())
            .map(|r| r.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The nodes this node has relay links with (outbound, inbound).
    pub fn relay_peers(&self) -> (Vec<String>, Vec<String>) {
        let mut out: Vec<String> = self.relays_out.keys().cloned().collect();
        let mut inb: Vec<String> = self.relays_in.keys().cloned().collect();
        out.sort();
        inb.sort();
        (out, inb)
    }

    /// Counters of every relay link side on this node.
    pub fn relay_stats(&self) -> Vec<RelayStats> {
        let mut out: Vec<RelayStats> = self
            .relays_out
            .values()
            .chain(self.relays_in.values())
            .filter_map(|id| {
                let p = self.participants.get(id)?;
                let r = p.relay.as_ref()?;
                let (tracks, connected) = if r.inbound {
                    (
                        p.published.len(),
                        p.publisher.as_ref().is_some_and(|pc| pc.connected),
                    )
                } else {
                    (p.subscriptions.len(), p.subscriber.connected)
                };
                let mut track_ids: Vec<TrackId> = if r.inbound {
                    Vec::new()
                } else {
                    p.subscriptions.keys().copied().collect()
                };
                track_ids.sort();
                Some(RelayStats {
                    peer: r.peer.clone(),
                    inbound: r.inbound,
                    tracks,
                    packets: r.packets,
                    packets_by_layer: r.packets_by_layer,
                    bytes: r.bytes,
                    track_ids,
                    connected,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.peer, a.inbound).cmp(&(&b.peer, b.inbound)));
        out
    }

    /// Participants in each room on this node (relay links not counted).
    pub fn room_sizes(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .rooms
            .iter()
            .map(|(r, m)| (r.clone(), m.len()))
            .collect();
        out.sort();
        out
    }

    /// Whether `track` arrived over a relay link (it is recorded in its publisher's
    /// node's log, not this node's).
    pub fn is_relayed(&self, track: TrackId) -> bool {
        self.tracks.get(&track).is_some_and(|t| t.origin.is_some())
    }

    /// Downstream side: re-derives the layer to ask of the upstream node for a
    /// relayed track (the highest any local subscriber wants) and announces a change.
    pub(crate) fn relay_want(&mut self, track: TrackId) {
        let Some(t) = self.tracks.get(&track) else {
            return;
        };
        if t.origin.is_none() || t.kind != meridian_protocol::TrackKind::Video {
            return;
        }
        let wanted = t
            .subscribers
            .iter()
            .filter_map(|s| {
                Some(
                    self.participants
                        .get(s)?
                        .subscriptions
                        .get(&track)?
                        .max_layer,
                )
            })
            .max();
        let Some(wanted) = wanted else {
            return;
        };
        let Some(peer) = self
            .participants
            .get(&t.owner)
            .and_then(|p| p.relay.as_ref())
            .map(|r| r.peer.clone())
        else {
            return;
        };
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        if t.relay_wanted != Some(wanted) {
            t.relay_wanted = Some(wanted);
            self.events.push_back(SfuEvent::RelayLayerWanted {
                peer,
                track_id: track,
                layer: Layer::ALL[wanted.min(2)],
            });
        }
    }

    /// The event for a lost connection: a relay link's own, or a participant's.
    pub(crate) fn disconnected_event(&self, id: ParticipantId, kind: PcKind) -> SfuEvent {
        match self.participants.get(&id).and_then(|p| p.relay.as_ref()) {
            Some(r) => SfuEvent::RelayDown {
                peer: r.peer.clone(),
                inbound: r.inbound,
            },
            None => SfuEvent::Disconnected {
                participant: id,
                pc: kind,
            },
        }
    }
}
