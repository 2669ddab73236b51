//! Meridian's media core: a Sans-IO selective forwarding unit over [`str0m`].
//!
//! [`Sfu`] holds rooms, participants, published tracks and subscriptions. Each
//! participant has two peer connections (one `str0m::Rtc` each, in RTP mode): the
//! *publisher* connection, where the client offers the media it sends, and the
//! *subscriber* connection, where the node offers the media it forwards. Packets are
//! forwarded one by one as they arrive (no frame assembly), with sequence number,
//! timestamp and VP8 picture id rewritten on simulcast layer switches.
//!
//! Like `str0m::Rtc`, the core never touches a socket or a clock:
//!
//! * input: [`Sfu::handle_datagram`], [`Sfu::handle_timeout`] and the commands
//!   (`add_participant`, `handle_publisher_offer`, `subscribe`, …), each with `now`;
//! * output: [`Sfu::poll_transmit`] (datagrams to send), [`Sfu::poll_event`]
//!   (things signaling must tell clients) and [`Sfu::poll_timeout`] (when to call
//!   `handle_timeout` next).
//!
//! After any input, drain `poll_transmit` and `poll_event`, then wait until
//! `poll_timeout` or the next input.
#![deny(missing_docs)]

mod alloc;
mod forward;
mod keyframe;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use meridian_protocol::{Layer, SubscribedTrack, TrackAnnouncement, TrackInfo, TrackKind};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, PayloadParams};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rids};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo, Ssrc, Vp8Descriptor};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tracing::{debug, trace, warn};

pub use keyframe::starts_keyframe;

use alloc::Demand;
use forward::{Forwarder, InPacket};

/// Errors from commands given to the media core.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The participant does not exist (left, or never joined).
    #[error("unknown participant {0}")]
    UnknownParticipant(ParticipantId),
    /// The track does not exist in the participant's room.
    #[error("unknown track {0}")]
    UnknownTrack(TrackId),
    /// The SDP could not be parsed or negotiated.
    #[error("invalid SDP: {0}")]
    InvalidSdp(String),
    /// An answer arrived with no offer outstanding.
    #[error("no offer is pending on the subscriber connection")]
    NoPendingOffer,
    /// A bound on tracks or subscriptions was reached.
    #[error("limit reached: {0}")]
    Limit(&'static str),
    /// A participant may not subscribe to its own track or publish into another's.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
}

/// Identifies a participant on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

/// Identifies a published track on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PA_{}", self.0)
    }
}

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TR_{}", self.0)
    }
}

impl FromStr for ParticipantId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.strip_prefix("PA_")
            .and_then(|n| n.parse().ok())
            .map(ParticipantId)
            .ok_or(())
    }
}

impl FromStr for TrackId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.strip_prefix("TR_")
            .and_then(|n| n.parse().ok())
            .map(TrackId)
            .ok_or(())
    }
}

/// Which of a participant's two peer connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PcKind {
    /// Carries media from the client to the node; the client offers.
    Publisher,
    /// Carries media from the node to the client; the node offers.
    Subscriber,
}

/// Tunables of the media core.
#[derive(Clone, Debug)]
pub struct SfuConfig {
    /// The address advertised as the ICE host candidate (the node's UDP port, or its
    /// public NAT 1:1 address). Every datagram handed in must be addressed to it.
    pub candidate_addr: SocketAddr,
    /// Minimum interval between keyframe requests sent to a publisher per layer.
    pub keyframe_request_interval: Duration,
    /// Bandwidth estimate a subscriber connection starts from.
    pub initial_estimate_bps: u64,
    /// Most tracks one participant may publish.
    pub max_tracks_per_participant: usize,
    /// Most subscriptions one participant may hold.
    pub max_subscriptions_per_participant: usize,
    /// First participant and track id this core hands out. Nodes of a region seed it
    /// differently so ids stay unique in a room's log across nodes and restarts.
    pub first_id: u64,
}

impl SfuConfig {
    /// Defaults for a node whose media socket is reached at `candidate_addr`.
    pub fn new(candidate_addr: SocketAddr) -> Self {
        SfuConfig {
            candidate_addr,
            keyframe_request_interval: Duration::from_millis(300),
            initial_estimate_bps: 1_000_000,
            max_tracks_per_participant: 8,
            max_subscriptions_per_participant: 256,
            first_id: 1,
        }
    }
}

/// A datagram the node must send.
#[derive(Debug)]
pub struct Transmit {
    /// Where to.
    pub destination: SocketAddr,
    /// The bytes (already encrypted).
    pub contents: Vec<u8>,
}

/// Things that happened in the media core that signaling must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// A track became available; tell everyone in `room`.
    TrackPublished {
        /// Room name.
        room: String,
        /// The track.
        track: TrackInfo,
        /// The negotiated codec, as str0m names it (`opus`, `VP8`, `H264`, …).
        codec: String,
    },
    /// A track is gone; tell everyone in `room`.
    TrackUnpublished {
        /// Room name.
        room: String,
        /// The track.
        track_id: TrackId,
        /// Its publisher.
        participant: ParticipantId,
    },
    /// A track's publisher muted or unmuted it.
    TrackMuted {
        /// Room name.
        room: String,
        /// The track.
        track_id: TrackId,
        /// New state.
        muted: bool,
    },
    /// Send this offer to the participant for its subscriber connection.
    SubscriberOffer {
        /// Who.
        participant: ParticipantId,
        /// The SDP offer.
        sdp: String,
        /// The track carried by each media section.
        tracks: Vec<SubscribedTrack>,
    },
    /// The layer forwarded to a subscriber changed.
    LayerChanged {
        /// The subscriber.
        participant: ParticipantId,
        /// The track.
        track_id: TrackId,
        /// The layer now forwarded.
        layer: Option<Layer>,
    },
    /// A subscription was made (by request or automatically).
    Subscribed {
        /// The subscriber.
        participant: ParticipantId,
        /// The track.
        track_id: TrackId,
    },
    /// One of the participant's peer connections completed ICE and DTLS.
    Connected {
        /// Who.
        participant: ParticipantId,
        /// Which connection.
        pc: PcKind,
    },
    /// One of the participant's peer connections lost connectivity or closed.
    Disconnected {
        /// Who.
        participant: ParticipantId,
        /// Which connection.
        pc: PcKind,
    },
}

/// Counters and gauges of the media core, for metrics.
#[derive(Clone, Debug, Default)]
pub struct SfuStats {
    /// RTP packets received from publishers.
    pub rtp_packets_in: u64,
    /// RTP packets written to subscribers.
    pub rtp_packets_forwarded: u64,
    /// RTP payload bytes written to subscribers.
    pub rtp_bytes_forwarded: u64,
    /// Datagrams dropped because no participant claims them.
    pub datagrams_unrouted: u64,
    /// Datagrams dropped because they were not STUN, DTLS, RTP or RTCP.
    pub datagrams_malformed: u64,
    /// Datagrams a peer connection returned an error for. (str0m drops SRTP that fails
    /// authentication and STUN with a bad MESSAGE-INTEGRITY silently; those are not
    /// counted here.)
    pub datagrams_rejected: u64,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: u64,
    /// Simulcast layer switches made.
    pub layer_switches: u64,
}

struct Pc {
    rtc: Rtc,
    ufrag: String,
    next_timeout: Instant,
    remote: Option<SocketAddr>,
    connected: bool,
    dirty: bool,
}

impl Pc {
    fn new(config: &SfuConfig, now: Instant, kind: PcKind) -> Pc {
        let mut builder = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true)
            .set_stats_interval(None);
        if kind == PcKind::Subscriber {
            builder = builder.enable_bwe(Some(Bitrate::bps(config.initial_estimate_bps)));
        }
        let mut rtc = builder.build(now);
        let candidate = Candidate::host(config.candidate_addr, "udp")
            .expect("a host candidate from a socket address is always valid");
        rtc.add_local_candidate(candidate);
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        Pc {
            rtc,
            ufrag,
            next_timeout: now,
            remote: None,
            connected: false,
            dirty: false,
        }
    }
}

struct Participant {
    room: String,
    identity: String,
    auto_subscribe: bool,
    publisher: Pc,
    subscriber: Pc,
    published: Vec<TrackId>,
    subscriptions: HashMap<TrackId, Subscription>,
    /// Subscriptions made but not yet in a sent offer.
    to_add: Vec<TrackId>,
    /// Media sections to stop at the next offer.
    to_stop: Vec<Mid>,
    pending_offer: Option<SdpPendingOffer>,
    estimate_bps: Option<u64>,
    /// Publisher connection tracks announced by the client, by mid.
    announced: HashMap<String, TrackAnnouncement>,
    /// Publisher SSRC → (track, layer) cache.
    ssrc_map: HashMap<Ssrc, (TrackId, usize)>,
}

impl Participant {
    fn pc_mut(&mut self, kind: PcKind) -> &mut Pc {
        match kind {
            PcKind::Publisher => &mut self.publisher,
            PcKind::Subscriber => &mut self.subscriber,
        }
    }
}

struct Subscription {
    mid: Option<Mid>,
    out_ssrc: Option<Ssrc>,
    max_layer: usize,
    forwarder: Forwarder,
    pt_map: Vec<(Pt, Pt)>,
    active: bool,
}

#[derive(Default, Clone, Copy)]
struct LayerRate {
    window_start: Option<Instant>,
    window_bytes: u64,
    bps: Option<u64>,
    last_packet: Option<Instant>,
    ssrc: Option<Ssrc>,
    last_keyframe_request: Option<Instant>,
}

struct Track {
    owner: ParticipantId,
    room: String,
    mid: Mid,
    kind: TrackKind,
    source: String,
    layers: Vec<Layer>,
    muted: bool,
    subscribers: Vec<ParticipantId>,
    rates: [LayerRate; 3],
    pt_params: Vec<(Pt, PayloadParams)>,
}

impl Track {
    fn info(&self, id: TrackId) -> TrackInfo {
        TrackInfo {
            track_id: id.to_string(),
            participant_id: self.owner.to_string(),
            mid: self.mid.to_string(),
            kind: self.kind,
            source: self.source.clone(),
            layers: self.layers.clone(),
            muted: self.muted,
        }
    }

    /// Layer bitrates usable for allocation (a layer silent for a second is not sent).
    fn available_rates(&self, now: Instant) -> [Option<u64>; 3] {
        let mut out = [None; 3];
        for (i, r) in self.rates.iter().enumerate() {
            let live = r
                .last_packet
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
            if live {
                out[i] = Some(r.bps.unwrap_or(DEFAULT_LAYER_BPS[i]).max(1));
            }
        }
        out
    }
}

/// Bitrates assumed for a layer before it has been measured.
const DEFAULT_LAYER_BPS: [u64; 3] = [150_000, 500_000, 1_500_000];
const AUDIO_BPS: u64 = 50_000;
const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Packets kept per outgoing stream to answer NACKs.
const RTX_CACHE_PACKETS: usize = 512;
/// How old a packet may be and still be resent.
const RTX_CACHE_AGE: Duration = Duration::from_secs(1);
/// How often every subscriber's layers are reconsidered as layer rates change.
const REALLOCATE_INTERVAL: Duration = Duration::from_millis(500);

/// The Sans-IO SFU: see the crate documentation.
pub struct Sfu {
    config: SfuConfig,
    participants: HashMap<ParticipantId, Participant>,
    tracks: HashMap<TrackId, Track>,
    rooms: HashMap<String, Vec<ParticipantId>>,
    by_ufrag: HashMap<String, (ParticipantId, PcKind)>,
    by_addr: HashMap<SocketAddr, (ParticipantId, PcKind)>,
    next_id: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    dirty: Vec<(ParticipantId, PcKind)>,
    stats: SfuStats,
    last_now: Instant,
    last_realloc: Instant,
}

impl Sfu {
    /// A core with no rooms.
    pub fn new(config: SfuConfig, now: Instant) -> Sfu {
        let first_id = config.first_id.max(1);
        Sfu {
            config,
            participants: HashMap::new(),
            tracks: HashMap::new(),
            rooms: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: first_id,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            stats: SfuStats::default(),
            last_now: now,
            last_realloc: now,
        }
    }

    // ----- getters -----

    /// Counters for metrics.
    pub fn stats(&self) -> &SfuStats {
        &self.stats
    }

    /// Participants on this node.
    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    /// Rooms with at least one participant.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Video subscriptions currently forwarding a layer (the autoscaling metric).
    pub fn outbound_video_tracks(&self) -> usize {
        self.participants
            .values()
            .flat_map(|p| p.subscriptions.iter())
            .filter(|(id, s)| {
                s.forwarder.current().is_some()
                    && self
                        .tracks
                        .get(id)
                        .is_some_and(|t| t.kind == TrackKind::Video)
            })
            .count()
    }

    /// Tracks published in `room`, with their state.
    pub fn room_tracks(&self, room: &str) -> Vec<TrackInfo> {
        let mut tracks: Vec<_> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.room == room)
            .map(|(id, t)| t.info(*id))
            .collect();
        tracks.sort_by(|a, b| a.track_id.cmp(&b.track_id));
        tracks
    }

    /// The tracks a participant subscribes to.
    pub fn subscriptions_of(&self, participant: ParticipantId) -> Vec<TrackId> {
        self.participants
            .get(&participant)
            .map(|p| p.subscriptions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Participants in `room`.
    pub fn room_participants(&self, room: &str) -> Vec<ParticipantId> {
        self.rooms.get(room).cloned().unwrap_or_default()
    }

    /// The identity a participant joined with.
    pub fn identity(&self, id: ParticipantId) -> Option<&str> {
        self.participants.get(&id).map(|p| p.identity.as_str())
    }

    /// The layer currently forwarded to `participant` for `track`.
    pub fn forwarded_layer(&self, participant: ParticipantId, track: TrackId) -> Option<Layer> {
        let sub = self
            .participants
            .get(&participant)?
            .subscriptions
            .get(&track)?;
        sub.forwarder.current().map(|l| Layer::ALL[l])
    }

    /// The latest bandwidth estimate for a participant's subscriber connection.
    pub fn estimate_bps(&self, participant: ParticipantId) -> Option<u64> {
        self.participants.get(&participant)?.estimate_bps
    }

    /// The ICE username fragments of a participant's connections (publisher, subscriber).
    pub fn ice_ufrags(&self, participant: ParticipantId) -> Option<(String, String)> {
        let p = self.participants.get(&participant)?;
        Some((p.publisher.ufrag.clone(), p.subscriber.ufrag.clone()))
    }

    // ----- commands -----

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

    fn insert_participant(
        &mut self,
        now: Instant,
        id: ParticipantId,
        room: &str,
        identity: &str,
        auto_subscribe: bool,
    ) {
        self.last_now = now;
        let mut publisher = Pc::new(&self.config, now, PcKind::Publisher);
        let mut subscriber = Pc::new(&self.config, now, PcKind::Subscriber);
        mark_dirty(&mut self.dirty, id, &mut publisher, PcKind::Publisher);
        mark_dirty(&mut self.dirty, id, &mut subscriber, PcKind::Subscriber);
        self.by_ufrag
            .insert(publisher.ufrag.clone(), (id, PcKind::Publisher));
        self.by_ufrag
            .insert(subscriber.ufrag.clone(), (id, PcKind::Subscriber));
        self.participants.insert(
            id,
            Participant {
                room: room.to_string(),
                identity: identity.to_string(),
                auto_subscribe,
                publisher,
                subscriber,
                published: Vec::new(),
                subscriptions: HashMap::new(),
                to_add: Vec::new(),
                to_stop: Vec::new(),
                pending_offer: None,
                estimate_bps: None,
                announced: HashMap::new(),
                ssrc_map: HashMap::new(),
            },
        );
        self.rooms.entry(room.to_string()).or_default().push(id);
        debug!(participant = %id, room, "participant added");
        if auto_subscribe {
            let existing: Vec<TrackId> = self
                .tracks
                .iter()
                .filter(|(_, t)| t.room == room)
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
        for pc in [&mut p.publisher, &mut p.subscriber] {
            self.by_ufrag.remove(&pc.ufrag);
            if let Some(addr) = pc.remote {
                self.by_addr.remove(&addr);
            }
            pc.rtc.disconnect();
        }
        for track in p.subscriptions.keys() {
            if let Some(t) = self.tracks.get_mut(track) {
                t.subscribers.retain(|s| *s != id);
            }
        }
        for track in p.published.clone() {
            self.remove_track(track);
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

    /// Accepts the client's offer on its publisher connection and returns the SDP
    /// answer with the tracks the offer created.
    pub fn handle_publisher_offer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: &str,
        announced: Vec<TrackAnnouncement>,
    ) -> Result<(String, Vec<TrackInfo>), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        for a in announced {
            p.announced.insert(a.mid.clone(), a);
        }
        let answer = p
            .publisher
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        mark_dirty(&mut self.dirty, id, &mut p.publisher, PcKind::Publisher);
        // Every receiving media section of the offer is a track of this participant.
        let mids: Vec<Mid> = sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=mid:"))
            .map(Mid::from)
            .collect();
        let mut infos = Vec::new();
        for mid in mids {
            let p = self
                .participants
                .get(&id)
                .ok_or(MediaError::UnknownParticipant(id))?;
            let Some(media) = p.publisher.rtc.media(mid) else {
                continue;
            };
            if !media.direction().is_receiving() {
                continue;
            }
            let rids: Vec<String> = match media.rids_rx() {
                Rids::Specific(rids) => rids.iter().map(|r| r.to_string()).collect(),
                _ => Vec::new(),
            };
            let kind = media.kind();
            let codec = primary_codec(&p.publisher.rtc, media.remote_pts());
            if let Some(track) = self.add_track(id, mid, kind, &rids, codec) {
                infos.extend(self.tracks.get(&track).map(|t| t.info(track)));
            }
        }
        self.process(now);
        Ok((answer.to_sdp_string(), infos))
    }

    /// Applies the client's answer to the node's last subscriber offer.
    pub fn handle_subscriber_answer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: &str,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let pending = p.pending_offer.take().ok_or(MediaError::NoPendingOffer)?;
        p.subscriber
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        // Bind each negotiated media section to its outgoing stream.
        let mut wanted = Vec::new();
        for (track, sub) in p.subscriptions.iter_mut() {
            if let (Some(mid), None) = (sub.mid, sub.out_ssrc)
                && let Some(tx) = p.subscriber.rtc.direct_api().stream_tx_by_mid(mid, None)
            {
                // 1 s of history answers NACKs on any usable path and keeps a
                // subscriber's memory small (str0m's default keeps 3 s).
                tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, Some(0.15));
                // The publisher already paced these packets; a second pacer here only
                // adds latency. Layer choice keeps the rate within the estimate.
                tx.set_unpaced(true);
                sub.out_ssrc = Some(tx.ssrc());
                sub.active = true;
                wanted.push(*track);
            }
        }
        self.negotiate(id);
        for track in wanted {
            self.reallocate(id, now);
            self.request_keyframe_for(track, now, true);
        }
        self.process(now);
        Ok(())
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
            p.to_stop.push(mid);
        }
        if let Some(t) = self.tracks.get_mut(&track) {
            t.subscribers.retain(|s| *s != id);
        }
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

    // ----- input -----

    /// Handles one UDP datagram that arrived at the node's media socket.
    ///
    /// Datagrams nobody claims, or that are not WebRTC, are dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        self.last_now = now;
        let Ok(receive) = Receive::new(Protocol::Udp, source, self.config.candidate_addr, contents)
        else {
            self.stats.datagrams_malformed += 1;
            return;
        };
        let Some((id, kind, stun)) = self.route(source, contents) else {
            self.stats.datagrams_unrouted += 1;
            trace!(%source, "unrouted datagram");
            return;
        };
        let Some(p) = self.participants.get_mut(&id) else {
            self.stats.datagrams_unrouted += 1;
            return;
        };
        let pc = p.pc_mut(kind);
        if pc.rtc.handle_input(Input::Receive(now, receive)).is_err() {
            self.stats.datagrams_rejected += 1;
        }
        mark_dirty(&mut self.dirty, id, pc, kind);
        let queued = self.transmits.len();
        self.process(now);
        // str0m answers only checks whose MESSAGE-INTEGRITY matches the connection's ICE
        // password: an answer to `source` proves it is the peer, so media may come from
        // there. A forged check gets no answer and moves nothing.
        if stun
            && self
                .transmits
                .iter()
                .skip(queued)
                .any(|t| t.destination == source)
        {
            self.bind_address(id, kind, source);
        }
    }

    /// Advances time: call at (or after) [`Sfu::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        for (id, p) in self.participants.iter_mut() {
            for kind in [PcKind::Publisher, PcKind::Subscriber] {
                let pc = p.pc_mut(kind);
                if pc.next_timeout <= now {
                    if let Err(e) = pc.rtc.handle_input(Input::Timeout(now)) {
                        warn!(participant = %id, "timeout handling failed: {e}");
                    }
                    mark_dirty(&mut self.dirty, *id, pc, kind);
                }
            }
        }
        // Reallocate layers as measured rates change (estimates also trigger it).
        if now.saturating_duration_since(self.last_realloc) >= REALLOCATE_INTERVAL {
            self.last_realloc = now;
            let ids: Vec<ParticipantId> = self.participants.keys().copied().collect();
            for id in ids {
                self.reallocate(id, now);
            }
        }
        self.process(now);
    }

    // ----- output -----

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event for signaling.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    /// When to call [`Sfu::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Instant {
        self.participants
            .values()
            .flat_map(|p| [p.publisher.next_timeout, p.subscriber.next_timeout])
            .min()
            .unwrap_or(self.last_now + Duration::from_millis(100))
    }

    // ----- internals -----

    /// Finds the connection a datagram belongs to. STUN names it by the USERNAME's ufrag
    /// (and reports `true`: the address may move once str0m verifies the check); any
    /// other datagram by its source address.
    fn route(&self, source: SocketAddr, contents: &[u8]) -> Option<(ParticipantId, PcKind, bool)> {
        if contents.first().is_some_and(|b| *b < 2) {
            let msg = str0m::ice::StunMessage::parse(contents).ok()?;
            let (local, _remote) = msg.split_username()?;
            let (id, kind) = *self.by_ufrag.get(local)?;
            return Some((id, kind, true));
        }
        self.by_addr
            .get(&source)
            .map(|(id, kind)| (*id, *kind, false))
    }

    /// Points `source` at a connection whose ICE check from there str0m accepted.
    fn bind_address(&mut self, id: ParticipantId, kind: PcKind, source: SocketAddr) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let pc = p.pc_mut(kind);
        if pc.remote != Some(source) {
            if let Some(old) = pc.remote.replace(source) {
                self.by_addr.remove(&old);
            }
            self.by_addr.insert(source, (id, kind));
        }
    }

    fn subscribe_inner(&mut self, id: ParticipantId, track: TrackId) -> Result<(), MediaError> {
        let t = self
            .tracks
            .get_mut(&track)
            .ok_or(MediaError::UnknownTrack(track))?;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        if t.room != p.room {
            return Err(MediaError::UnknownTrack(track));
        }
        if t.owner == id {
            return Err(MediaError::NotAllowed(
                "a participant cannot subscribe to its own track",
            ));
        }
        if p.subscriptions.contains_key(&track) {
            return Ok(());
        }
        if p.subscriptions.len() >= self.config.max_subscriptions_per_participant {
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
                max_layer: 2,
                forwarder: Forwarder::new(clock),
                pt_map: Vec::new(),
                active: false,
            },
        );
        p.to_add.push(track);
        t.subscribers.push(id);
        self.events.push_back(SfuEvent::Subscribed {
            participant: id,
            track_id: track,
        });
        Ok(())
    }

    /// Sends a subscriber offer if there are changes and none is outstanding.
    fn negotiate(&mut self, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if p.pending_offer.is_some() || (p.to_add.is_empty() && p.to_stop.is_empty()) {
            return;
        }
        let mut api = p.subscriber.rtc.sdp_api();
        for mid in p.to_stop.drain(..) {
            api.stop_media(mid);
        }
        for track in p.to_add.drain(..) {
            let (Some(t), Some(sub)) = (self.tracks.get(&track), p.subscriptions.get_mut(&track))
            else {
                continue;
            };
            let kind = match t.kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            };
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(t.owner.to_string()),
                Some(track.to_string()),
                None,
            );
            sub.mid = Some(mid);
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        p.pending_offer = Some(pending);
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        let mut tracks: Vec<SubscribedTrack> = p
            .subscriptions
            .iter()
            .filter_map(|(track, sub)| {
                let t = self.tracks.get(track)?;
                Some(SubscribedTrack {
                    mid: sub.mid?.to_string(),
                    track_id: track.to_string(),
                    participant_id: t.owner.to_string(),
                })
            })
            .collect();
        tracks.sort_by(|a, b| a.mid.cmp(&b.mid));
        self.events.push_back(SfuEvent::SubscriberOffer {
            participant: id,
            sdp: offer.to_sdp_string(),
            tracks,
        });
    }

    fn remove_track(&mut self, track: TrackId) {
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
                    p.to_stop.push(mid);
                }
            }
        }
        self.events.push_back(SfuEvent::TrackUnpublished {
            room: t.room.clone(),
            track_id: track,
            participant: t.owner,
        });
        for sub_id in t.subscribers {
            self.negotiate(sub_id);
        }
    }

    /// Drains every touched connection until nothing is left to do.
    fn process(&mut self, now: Instant) {
        let mut events = Vec::new();
        // Each round may touch other connections (forwarding, keyframe requests);
        // the bound guards against a feedback loop between them.
        let bound = 8 * (2 * self.participants.len() + 8);
        for _ in 0..bound {
            let Some((id, kind)) = self.dirty.pop() else {
                return;
            };
            let Some(p) = self.participants.get_mut(&id) else {
                continue;
            };
            let pc = p.pc_mut(kind);
            pc.dirty = false;
            loop {
                match pc.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        pc.next_timeout = t;
                        break;
                    }
                    Ok(Output::Transmit(t)) => self.transmits.push_back(Transmit {
                        destination: t.destination,
                        contents: t.contents.into(),
                    }),
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        warn!(participant = %id, ?kind, "connection failed: {e}");
                        pc.next_timeout = now + Duration::from_secs(3600);
                        if pc.connected {
                            pc.connected = false;
                            self.events.push_back(SfuEvent::Disconnected {
                                participant: id,
                                pc: kind,
                            });
                        }
                        break;
                    }
                }
            }
            for e in events.drain(..) {
                self.handle_rtc_event(now, id, kind, e);
            }
        }
        if !self.dirty.is_empty() {
            warn!(left = self.dirty.len(), "processing bound reached");
        }
    }

    fn handle_rtc_event(&mut self, now: Instant, id: ParticipantId, kind: PcKind, e: Event) {
        match e {
            Event::RtpPacket(pkt) => self.forward(now, id, pkt),
            Event::MediaAdded(m) if kind == PcKind::Publisher && m.direction.is_receiving() => {
                let rids: Vec<String> = m
                    .simulcast
                    .iter()
                    .flat_map(|s| s.recv.iter().map(|l| l.rid.to_string()))
                    .collect();
                let codec = self.participants.get(&id).map_or_else(
                    || "unknown".to_string(),
                    |p| {
                        let pts = p
                            .publisher
                            .rtc
                            .media(m.mid)
                            .map(|md| md.remote_pts().to_vec());
                        primary_codec(&p.publisher.rtc, pts.as_deref().unwrap_or(&[]))
                    },
                );
                self.add_track(id, m.mid, m.kind, &rids, codec);
            }
            Event::KeyframeRequest(req) if kind == PcKind::Subscriber => {
                let track = self.participants.get(&id).and_then(|p| {
                    p.subscriptions
                        .iter()
                        .find(|(_, s)| s.mid == Some(req.mid))
                        .map(|(t, _)| *t)
                });
                if let Some(track) = track {
                    self.request_keyframe_for(track, now, false);
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. })
            | Event::EgressBitrateEstimate(BweKind::Remb { estimate, .. }) => {
                if let Some(p) = self.participants.get_mut(&id) {
                    p.estimate_bps = Some(estimate.as_u64());
                }
                self.reallocate(id, now);
            }
            Event::Connected => {
                if let Some(p) = self.participants.get_mut(&id) {
                    p.pc_mut(kind).connected = true;
                }
                self.events.push_back(SfuEvent::Connected {
                    participant: id,
                    pc: kind,
                });
                if kind == PcKind::Subscriber {
                    let tracks: Vec<TrackId> = self
                        .participants
                        .get(&id)
                        .map(|p| p.subscriptions.keys().copied().collect())
                        .unwrap_or_default();
                    for t in tracks {
                        self.request_keyframe_for(t, now, true);
                    }
                }
            }
            Event::IceConnectionStateChange(state) => {
                let Some(p) = self.participants.get_mut(&id) else {
                    return;
                };
                let pc = p.pc_mut(kind);
                if state == IceConnectionState::Disconnected && pc.connected {
                    pc.connected = false;
                    self.events.push_back(SfuEvent::Disconnected {
                        participant: id,
                        pc: kind,
                    });
                }
            }
            Event::Closed => {
                if let Some(p) = self.participants.get_mut(&id) {
                    let pc = p.pc_mut(kind);
                    if pc.connected {
                        pc.connected = false;
                        self.events.push_back(SfuEvent::Disconnected {
                            participant: id,
                            pc: kind,
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// Creates the track for a receiving media section, unless it exists.
    fn add_track(
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
        if p.published.len() >= self.config.max_tracks_per_participant {
            warn!(participant = %id, "track limit reached; media section ignored");
            return None;
        }
        let kind = match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        let announced = p.announced.get(&mid.to_string());
        let mut layers: Vec<Layer> = rids.iter().filter_map(|r| Layer::from_rid(r)).collect();
        layers.sort();
        let source = announced.map(|a| a.source.clone()).unwrap_or_else(|| {
            match kind {
                TrackKind::Audio => "microphone",
                TrackKind::Video => "camera",
            }
            .to_string()
        });
        // A restored publisher asks for its earlier id (the node checked it is its own).
        let track = match announced
            .and_then(|a| a.track_id.as_deref())
            .and_then(|t| t.parse::<TrackId>().ok())
            .filter(|t| !self.tracks.contains_key(t))
        {
            Some(t) => t,
            None => {
                self.next_id += 1;
                TrackId(self.next_id - 1)
            }
        };
        p.published.push(track);
        let room = p.room.clone();
        let t = Track {
            owner: id,
            room: room.clone(),
            mid,
            kind,
            source,
            layers,
            muted: false,
            subscribers: Vec::new(),
            rates: [LayerRate::default(); 3],
            pt_params: Vec::new(),
        };
        let info = t.info(track);
        self.tracks.insert(track, t);
        debug!(participant = %id, track = %track, "track published");
        self.events.push_back(SfuEvent::TrackPublished {
            room: room.clone(),
            track: info,
            codec,
        });
        let others: Vec<ParticipantId> = self
            .rooms
            .get(&room)
            .map(|m| m.iter().copied().filter(|o| *o != id).collect())
            .unwrap_or_default();
        for other in others {
            if self
                .participants
                .get(&other)
                .is_some_and(|o| o.auto_subscribe)
                && self.subscribe_inner(other, track).is_ok()
            {
                self.negotiate(other);
            }
        }
        Some(track)
    }

    fn forward(&mut self, now: Instant, publisher: ParticipantId, pkt: RtpPacket) {
        self.stats.rtp_packets_in += 1;
        let Some(p) = self.participants.get_mut(&publisher) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let (track_id, layer) = match p.ssrc_map.get(&ssrc) {
            Some(x) => *x,
            None => {
                let mut api = p.publisher.rtc.direct_api();
                let Some(rx) = api.stream_rx(&ssrc) else {
                    return;
                };
                let (mid, rid) = (rx.mid(), rx.rid());
                let layer = rid
                    .and_then(|r| Layer::from_rid(&r.to_string()))
                    .map_or(0, Layer::index);
                let Some(track) = p
                    .published
                    .iter()
                    .copied()
                    .find(|t| self.tracks.get(t).is_some_and(|t| t.mid == mid))
                else {
                    return;
                };
                p.ssrc_map.insert(ssrc, (track, layer));
                (track, layer)
            }
        };
        let Some(t) = self.tracks.get_mut(&track_id) else {
            return;
        };
        // Layer rate measurement.
        let rate = &mut t.rates[layer];
        rate.ssrc = Some(ssrc);
        rate.last_packet = Some(now);
        rate.window_bytes += pkt.payload.len() as u64 + 40;
        match rate.window_start {
            Some(start) if now.saturating_duration_since(start) >= RATE_WINDOW => {
                let secs = now.saturating_duration_since(start).as_secs_f64();
                let bps = (rate.window_bytes as f64 * 8.0 / secs) as u64;
                rate.bps = Some(match rate.bps {
                    Some(old) => (old * 3 + bps) / 4,
                    None => bps,
                });
                rate.window_start = Some(now);
                rate.window_bytes = 0;
            }
            None => rate.window_start = Some(now),
            _ => {}
        }
        if t.muted || t.subscribers.is_empty() {
            return;
        }
        let pt = pkt.header.payload_type;
        let params = match t.pt_params.iter().find(|(x, _)| *x == pt) {
            Some((_, params)) => *params,
            None => {
                let Some(params) = p
                    .publisher
                    .rtc
                    .codec_config()
                    .find(|c| c.pt() == pt)
                    .copied()
                else {
                    return;
                };
                t.pt_params.push((pt, params));
                params
            }
        };
        let codec = params.spec().codec;
        let video = t.kind == TrackKind::Video;
        let vp8 = if codec == Codec::Vp8 {
            Vp8Descriptor::parse(&pkt.payload).ok()
        } else {
            None
        };
        let keyframe_start = !video
            || vp8.map_or_else(
                || keyframe::starts_keyframe(codec, &pkt.payload),
                |d| d.starts_keyframe(&pkt.payload),
            );
        let input = InPacket {
            layer,
            seq: *pkt.seq_no,
            ts: pkt.header.timestamp,
            keyframe_start,
            picture_id: vp8.and_then(|d| d.picture_id()),
            tl0: vp8.and_then(|d| d.tl0_pic_idx()),
            arrival: pkt.timestamp,
        };
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            ..Default::default()
        };
        for sub_id in &t.subscribers {
            let Some(sp) = self.participants.get_mut(sub_id) else {
                continue;
            };
            let Some(sub) = sp.subscriptions.get_mut(&track_id) else {
                continue;
            };
            let (true, Some(out_ssrc)) = (sub.active, sub.out_ssrc) else {
                continue;
            };
            let Some(out) = sub.forwarder.handle(&input) else {
                continue;
            };
            if out.switched {
                self.stats.layer_switches += 1;
                self.events.push_back(SfuEvent::LayerChanged {
                    participant: *sub_id,
                    track_id,
                    layer: Some(Layer::ALL[layer]),
                });
            }
            let out_pt = match sub.pt_map.iter().find(|(i, _)| *i == pt) {
                Some((_, o)) => *o,
                None => {
                    let Some(o) = sp.subscriber.rtc.codec_config().match_params(params) else {
                        continue;
                    };
                    let o = o.pt();
                    sub.pt_map.push((pt, o));
                    o
                }
            };
            let mut write = RtpWrite::new(
                out_pt,
                SeqNo::from(out.seq),
                out.ts,
                pkt.timestamp,
                pkt.payload.clone(),
            )
            .marker(pkt.header.marker)
            .ext_vals(ext.clone())
            .nackable(video);
            if let Some(d) = vp8 {
                let mut patch = d.patch();
                if let Some(pic) = out.picture_id {
                    patch = patch.picture_id(pic);
                }
                if let Some(tl0) = out.tl0 {
                    patch = patch.tl0_pic_idx(tl0);
                }
                if let Ok(patch) = patch.build() {
                    write = write.vp8_patch(patch);
                }
            }
            let mut api = sp.subscriber.rtc.direct_api();
            let Some(tx) = api.stream_tx(&out_ssrc) else {
                continue;
            };
            tx.write_rtp(write);
            self.stats.rtp_packets_forwarded += 1;
            self.stats.rtp_bytes_forwarded += pkt.payload.len() as u64;
            mark_dirty(
                &mut self.dirty,
                *sub_id,
                &mut sp.subscriber,
                PcKind::Subscriber,
            );
        }
        // A subscriber waits for a keyframe on some layer: ask once per interval.
        let waiting: Vec<usize> = t
            .subscribers
            .iter()
            .filter_map(|s| {
                self.participants
                    .get(s)?
                    .subscriptions
                    .get(&track_id)?
                    .forwarder
                    .wants_keyframe()
            })
            .collect();
        for layer in waiting {
            self.request_layer_keyframe(track_id, layer, now, false);
        }
    }

    /// Asks the publisher of `track` for a keyframe on every layer some subscriber waits for.
    fn request_keyframe_for(&mut self, track: TrackId, now: Instant, force: bool) {
        let Some(t) = self.tracks.get(&track) else {
            return;
        };
        if t.kind != TrackKind::Video {
            return;
        }
        let mut layers: Vec<usize> = t
            .subscribers
            .iter()
            .filter_map(|s| {
                let f = &self
                    .participants
                    .get(s)?
                    .subscriptions
                    .get(&track)?
                    .forwarder;
                f.wants_keyframe().or(f.current())
            })
            .collect();
        layers.sort();
        layers.dedup();
        for layer in layers {
            self.request_layer_keyframe(track, layer, now, force);
        }
    }

    fn request_layer_keyframe(&mut self, track: TrackId, layer: usize, now: Instant, force: bool) {
        let interval = self.config.keyframe_request_interval;
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        let rate = &mut t.rates[layer];
        let Some(ssrc) = rate.ssrc else {
            return;
        };
        let recent = rate
            .last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < interval);
        if recent && !force {
            return;
        }
        if recent && force && rate.last_keyframe_request == Some(now) {
            return;
        }
        rate.last_keyframe_request = Some(now);
        let Some(p) = self.participants.get_mut(&t.owner) else {
            return;
        };
        if let Some(rx) = p.publisher.rtc.direct_api().stream_rx(&ssrc) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.stats.keyframe_requests += 1;
            mark_dirty(
                &mut self.dirty,
                t.owner,
                &mut p.publisher,
                PcKind::Publisher,
            );
        }
    }

    /// Chooses layers for a subscriber's video subscriptions from its estimate.
    fn reallocate(&mut self, id: ParticipantId, now: Instant) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let estimate = p.estimate_bps.unwrap_or(self.config.initial_estimate_bps);
        let mut ids = Vec::new();
        let mut demands = Vec::new();
        let mut audio = 0;
        for (track, sub) in p.subscriptions.iter() {
            let Some(t) = self.tracks.get(track) else {
                continue;
            };
            if t.kind == TrackKind::Audio {
                audio += AUDIO_BPS;
                continue;
            }
            ids.push(*track);
            demands.push(Demand {
                max_layer: sub.max_layer,
                rates: t.available_rates(now),
            });
        }
        // Audio subscriptions always forward.
        for (track, sub) in p.subscriptions.iter_mut() {
            if self
                .tracks
                .get(track)
                .is_some_and(|t| t.kind == TrackKind::Audio)
                && sub.forwarder.target().is_none()
            {
                sub.forwarder.set_target(Some(0));
            }
        }
        if ids.is_empty() {
            return;
        }
        let chosen = alloc::allocate(estimate.saturating_sub(audio), &demands);
        let desired: u64 = demands.iter().map(Demand::desired).sum::<u64>() + audio;
        // Let the estimator probe towards what the subscriptions could use.
        p.subscriber.rtc.bwe().set_bitrate(
            Bitrate::bps(desired.min(estimate).max(100_000)),
            Bitrate::bps(desired.max(300_000)),
        );
        let mut keyframes = Vec::new();
        for (track, layer) in ids.into_iter().zip(chosen) {
            let Some(sub) = p.subscriptions.get_mut(&track) else {
                continue;
            };
            let layer = match layer {
                Some(l) => Some(l),
                // Nothing is being sent yet: aim at the lowest layer that may come.
                None => sub.forwarder.target().or(Some(0)),
            };
            if sub.forwarder.target() != layer {
                trace!(participant = %id, track = %track, ?layer, "layer target");
                sub.forwarder.set_target(layer);
                if let Some(l) = layer {
                    keyframes.push((track, l));
                }
            }
        }
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        for (track, layer) in keyframes {
            self.request_layer_keyframe(track, layer, now, false);
        }
    }
}

fn mark_dirty(
    dirty: &mut Vec<(ParticipantId, PcKind)>,
    id: ParticipantId,
    pc: &mut Pc,
    kind: PcKind,
) {
    if !pc.dirty {
        pc.dirty = true;
        dirty.push((id, kind));
    }
}

/// The media codec the remote side prefers among the negotiated payload types of a
/// media section (repair and redundancy formats skipped).
fn primary_codec(rtc: &Rtc, remote_pts: &[Pt]) -> String {
    remote_pts
        .iter()
        .filter_map(|pt| rtc.codec_config().iter().find(|p| p.pt() == *pt))
        .map(|p| p.spec().codec)
        .find(|c| !matches!(c, Codec::Rtx | Codec::Red | Codec::Null | Codec::Unknown))
        .map_or_else(|| "unknown".to_string(), |c| c.to_string())
}
