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
//! * input: [`Sfu::handle_datagram`], [`Sfu::handle_timeout`] (and
//!   [`Sfu::handle_due`] before sending) and the commands
//!   (`add_participant`, `handle_publisher_offer`, `subscribe`, …), each with `now`;
//! * output: [`Sfu::poll_transmit`] (datagrams to send), [`Sfu::poll_event`]
//!   (things signaling must tell clients) and [`Sfu::poll_timeout`] (when to call
//!   `handle_timeout` next).
//!
//! After any input, drain `poll_transmit` and `poll_event`, then wait until
//! `poll_timeout` or the next input.
#![deny(missing_docs)]

mod alloc;
mod demux;
pub mod fec;
mod forward;
mod id;
mod keyframe;
mod negotiate;
mod pc;
mod rate;
pub mod red;
mod relay;
mod retx;
mod room;
mod rtx;
mod timers;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_protocol::{Layer, SubscribedTrack, TrackInfo, TrackKind};
use str0m::Input;
use str0m::net::{Protocol, Receive};
use tracing::{trace, warn};

pub use demux::{stun_worker, worker_ufrag_prefix};
pub use id::{ParticipantId, TrackId};
pub use keyframe::starts_keyframe;
pub use pc::PcKind;
pub use relay::{
    MAX_RELAY_IDENTITY_BYTES, MAX_RELAY_NAME_BYTES, RelayStats, RelayTrack, RelayTrackState,
};
pub use room::PART_SEPARATOR;

use pc::mark_dirty;
use room::{Participant, Track};
use timers::TimerHeap;

/// The core's hash map: foldhash (fast, randomly seeded) instead of SipHash on the
/// per-packet lookups.
pub(crate) type HashMap<K, V> = foldhash::HashMap<K, V>;

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
    /// The local address of the node's relay socket: the inbound side of a relay link
    /// (see [`Sfu::handle_relay_offer`]) sends and receives there. `None`: this node
    /// takes no inbound relay links.
    pub relay_addr: Option<SocketAddr>,
    /// Most tracks one relay link may carry (each is a media section of its SDP).
    pub max_relay_tracks: usize,
    /// Bandwidth estimate an outbound relay link starts from (links run between nodes,
    /// so it starts far above a client's).
    pub relay_initial_estimate_bps: u64,
    /// The media worker this core runs on: the first two characters of every local
    /// ICE ufrag name it ([`worker_ufrag_prefix`]), so a node whose workers share one
    /// UDP port steers a STUN check to its worker with [`stun_worker`].
    pub worker: u8,
    /// Loss assumed at least for every subscriber's video FEC (0: FEC follows the
    /// loss subscribers report only; see [`fec::group_for_loss`]).
    pub fec_loss_floor: f32,
    /// Measured loss from which every retransmission to a subscriber is sent twice
    /// (see `retx`); 0 turns the copies off.
    pub rtx_copy_loss: f32,
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
            relay_addr: None,
            max_relay_tracks: 512,
            relay_initial_estimate_bps: 50_000_000,
            worker: 0,
            fec_loss_floor: 0.0,
            rtx_copy_loss: 0.01,
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
    /// Send this offer to the downstream node of the outbound relay link to `peer`
    /// (over the nodes' internal control endpoint); hand its answer to
    /// [`Sfu::handle_relay_answer`].
    RelayOffer {
        /// The downstream node.
        peer: String,
        /// The SDP offer.
        sdp: String,
        /// The track each media section carries, with its room.
        tracks: Vec<RelayTrack>,
    },
    /// The local subscribers of a track relayed in from `peer` now want at most
    /// `layer`: ask the upstream node to send that layer
    /// ([`Sfu::set_relay_layer`] there).
    RelayLayerWanted {
        /// The upstream node.
        peer: String,
        /// The relayed track (its id is the same on both nodes).
        track_id: TrackId,
        /// The highest layer any local subscriber wants.
        layer: Layer,
    },
    /// A track relayed in from another node became available in `room`: tell the
    /// room's local clients (it is recorded in the upstream node's log, not here).
    RelayTrackPublished {
        /// Room name.
        room: String,
        /// The track, as its publisher's node announced it.
        track: TrackInfo,
        /// The upstream node.
        peer: String,
        /// The publisher's identity, as its node announced it (empty if it did not).
        identity: String,
        /// The publisher's display name, as its node announced it.
        name: Option<String>,
    },
    /// A relayed track is gone from this node (unpublished upstream, or the link closed).
    RelayTrackUnpublished {
        /// Room name.
        room: String,
        /// The track.
        track_id: TrackId,
        /// The upstream node.
        peer: String,
    },
    /// Upstream: the state of a track relayed to `peer` changed (its publisher muted
    /// or unmuted it, or the layer crossing the link switched): send `state` to the
    /// downstream node ([`Sfu::handle_relay_track_state`] there).
    RelayTrackState {
        /// The downstream node.
        peer: String,
        /// The track's state now.
        state: RelayTrackState,
    },
    /// Downstream: a track relayed in from another node was muted or unmuted there:
    /// tell the room's local clients (it is recorded in the upstream node's log).
    RelayTrackMuted {
        /// Room name (the local part).
        room: String,
        /// The track.
        track_id: TrackId,
        /// New state.
        muted: bool,
    },
    /// A relay link lost connectivity (ICE/DTLS timed out or failed): remove it with
    /// [`Sfu::remove_relay`] and rebuild it if still needed.
    RelayDown {
        /// The other node.
        peer: String,
        /// Whether it was the inbound side (this node received).
        inbound: bool,
    },
}

/// Counters and gauges of the media core, for metrics.
#[derive(Clone, Debug, Default)]
pub struct SfuStats {
    /// RTP packets received from publishers.
    pub rtp_packets_in: u64,
    /// RTP packets written to subscribers.
    pub rtp_packets_forwarded: u64,
    /// RTP payload bytes written to subscribers (relay links included).
    pub rtp_bytes_forwarded: u64,
    /// The part of `rtp_bytes_forwarded` written to outbound relay links.
    pub rtp_bytes_relayed: u64,
    /// Datagrams dropped because no participant claims them.
    pub datagrams_unrouted: u64,
    /// Datagrams dropped because they were not STUN, DTLS, RTP or RTCP.
    pub datagrams_malformed: u64,
    /// Datagrams a peer connection returned an error for, and ICE checks refused (from
    /// an address another connection holds, or replayed from elsewhere). (str0m drops
    /// SRTP that fails authentication and STUN with a bad MESSAGE-INTEGRITY silently;
    /// those are not counted here.)
    pub datagrams_rejected: u64,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: u64,
    /// Simulcast layer switches made.
    pub layer_switches: u64,
    /// RED (RFC 2198) packets from publishers dropped as malformed (`red::RedError`).
    pub red_malformed: u64,
    /// Audio packets sent to subscribers with RED the node added.
    pub red_added: u64,
    /// Outgoing streams whose RTX cache was resized for a measured RTT.
    pub rtx_cache_resizes: u64,
    /// ULPFEC packets the node sent with subscribers' video ([`fec`]).
    pub fec_packets: u64,
    /// Bytes of those ULPFEC packets' payloads.
    pub fec_bytes: u64,
    /// Retransmissions sent a second time to lossy subscribers (`retx`).
    pub rtx_copies: u64,
}

/// How often every subscriber's layers are reconsidered as layer rates change.
const REALLOCATE_INTERVAL: Duration = Duration::from_millis(500);

/// The rounds of [`Sfu::handle_due`], for a Sans-IO machine that wraps an [`Sfu`] (the
/// room controller): calls `handle` at each time `clock` gives while that time has
/// reached `timeout`, at most `max_rounds` times; returns the calls made.
pub fn due_rounds<T>(
    machine: &mut T,
    max_rounds: usize,
    mut clock: impl FnMut() -> Instant,
    timeout: impl Fn(&T) -> Instant,
    mut handle: impl FnMut(&mut T, Instant),
) -> usize {
    for round in 0..max_rounds {
        let now = clock();
        if now < timeout(machine) {
            return round;
        }
        handle(machine, now);
    }
    max_rounds
}

/// The Sans-IO SFU: see the crate documentation.
pub struct Sfu {
    config: SfuConfig,
    /// Boxed: a participant holds its subscriber `Rtc` inline (tens of KB), and a
    /// table of them held that much in every empty bucket (up to half the buckets
    /// after a growth).
    participants: HashMap<ParticipantId, Box<Participant>>,
    tracks: HashMap<TrackId, Track>,
    rooms: HashMap<String, Vec<ParticipantId>>,
    by_ufrag: HashMap<String, (ParticipantId, PcKind)>,
    by_addr: HashMap<SocketAddr, (ParticipantId, PcKind)>,
    next_id: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    dirty: Vec<(ParticipantId, PcKind)>,
    /// Every connection's next timeout (see `timers`).
    timers: TimerHeap<(ParticipantId, PcKind)>,
    stats: SfuStats,
    last_now: Instant,
    last_realloc: Instant,
    /// Outbound relay links by downstream node.
    relays_out: HashMap<String, ParticipantId>,
    /// Inbound relay links by upstream node.
    relays_in: HashMap<String, ParticipantId>,
    /// Inbound relay links by the upstream's media address (the relay socket's demux).
    relay_by_addr: HashMap<SocketAddr, ParticipantId>,
    /// Datagrams to send from the relay socket.
    relay_transmits: VecDeque<Transmit>,
    /// Sequence of the [`SfuEvent::RelayTrackState`]s this node sent (the downstream
    /// ignores one older than the last it applied).
    relay_seq: u64,
    /// Copies of retransmissions to lossy subscribers, by send time (`retx`).
    pending_copies: VecDeque<(Instant, Transmit)>,
}

impl Sfu {
    /// A core with no rooms.
    pub fn new(config: SfuConfig, now: Instant) -> Sfu {
        let first_id = config.first_id.max(1);
        Sfu {
            config,
            participants: HashMap::default(),
            tracks: HashMap::default(),
            rooms: HashMap::default(),
            by_ufrag: HashMap::default(),
            by_addr: HashMap::default(),
            next_id: first_id,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            timers: TimerHeap::new(),
            stats: SfuStats::default(),
            last_now: now,
            last_realloc: now,
            relays_out: HashMap::default(),
            relays_in: HashMap::default(),
            relay_by_addr: HashMap::default(),
            relay_transmits: VecDeque::new(),
            relay_seq: 0,
            pending_copies: VecDeque::new(),
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &SfuStats {
        &self.stats
    }

    /// Participants on this node.
    pub fn participant_count(&self) -> usize {
        // Relay links are kept as participants internally; they are not people.
        self.participants.len() - self.relays_in.len() - self.relays_out.len()
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

    /// The ICE username fragments of a participant's connections (publisher, made at
    /// its first offer; subscriber).
    pub fn ice_ufrags(&self, participant: ParticipantId) -> Option<(Option<String>, String)> {
        let p = self.participants.get(&participant)?;
        Some((
            p.publisher.as_ref().map(|pc| pc.ufrag.clone()),
            p.subscriber.ufrag.clone(),
        ))
    }

    /// The participant a datagram would be routed to (by STUN ufrag or source
    /// address), without handling it: how a driver finds whose input failed.
    pub fn participant_of(&self, source: SocketAddr, contents: &[u8]) -> Option<ParticipantId> {
        self.route(source, contents).map(|(id, _, _)| id)
    }

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
        let Some((id, kind, check)) = self.route(source, contents) else {
            self.stats.datagrams_unrouted += 1;
            trace!(%source, "unrouted datagram");
            return;
        };
        if let Some(trans_id) = check
            && self.refuses_check(now, id, kind, trans_id, source)
        {
            self.stats.datagrams_rejected += 1;
            trace!(participant = %id, ?kind, %source, "check refused (address held, or replayed)");
            return;
        }
        if kind == PcKind::Subscriber {
            self.arm_rtx_copies(now, id, contents);
        }
        let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) else {
            self.stats.datagrams_unrouted += 1;
            return;
        };
        if pc.rtc.handle_input(Input::Receive(now, receive)).is_err() {
            self.stats.datagrams_rejected += 1;
        }
        mark_dirty(&mut self.dirty, id, pc, kind);
        let queued = self.transmits.len();
        self.process(now);
        // str0m answers only checks whose MESSAGE-INTEGRITY matches the connection's ICE
        // password: its answer to `source` (same transaction) proves the sender knows it,
        // so media may come from there (see `demux` for why that alone is not enough).
        // A forged check gets no answer and moves nothing.
        if let Some(trans_id) = check
            && self
                .transmits
                .iter()
                .skip(queued)
                .any(|t| t.destination == source && demux::answers(&t.contents, trans_id))
        {
            self.bind_address(now, id, kind, trans_id, source);
        }
    }

    /// Advances time: call at (or after) [`Sfu::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        self.release_copies(now);
        // Only the connections that are due: O(due · log n), not O(participants).
        while let Some((at, (id, kind))) = self.timers.pop_due(now) {
            let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) else {
                continue; // left since
            };
            if pc.scheduled != Some(at) {
                continue; // stale: the deadline moved earlier since
            }
            pc.scheduled = None;
            if pc.next_timeout > now {
                // The deadline moved later since: wait for it.
                self.timers
                    .update((id, kind), pc.next_timeout, now, &mut pc.scheduled);
                continue;
            }
            if let Err(e) = pc.rtc.handle_input(Input::Timeout(now)) {
                warn!(participant = %id, "timeout handling failed: {e}");
            }
            // Draining it (`process`) sets its next deadline.
            mark_dirty(&mut self.dirty, id, pc, kind);
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

    /// Handles timeouts that are already due, round after round, until none is or
    /// `max_rounds` were taken; returns the rounds taken. For drivers, before they
    /// send: a connection with a bandwidth estimate (subscribers, a relay link's
    /// sending side) releases one written packet per timeout, unpaced streams too
    /// (str0m's pacer), then asks for a timeout 1 µs later, so a burst (a relayed
    /// frame, a keyframe) would otherwise leave at one driver wake-up per packet.
    /// `clock` gives each round's time and must advance as the driver's does: at a
    /// frozen time each connection releases one packet. Connections with nothing
    /// queued are not due. (Not part of `handle_datagram`: every packet would pay.)
    pub fn handle_due(&mut self, max_rounds: usize, clock: impl FnMut() -> Instant) -> usize {
        due_rounds(
            self,
            max_rounds,
            clock,
            Sfu::poll_timeout,
            Sfu::handle_timeout,
        )
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event for signaling.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    /// When to call [`Sfu::handle_timeout`] next. O(1): the head of the timer heap
    /// (which may be a little early, never late).
    pub fn poll_timeout(&self) -> Instant {
        if !self.dirty.is_empty() {
            // Connections left undrained by the processing bound: at once.
            return self.last_now;
        }
        // Nothing scheduled: with participants, the next layer reallocation is due;
        // without, nothing is (an idle node does not wake up).
        let idle = if self.participants.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(100)
        };
        let next = self.timers.peek().unwrap_or(self.last_now + idle);
        match self.pending_copies.front() {
            Some((at, _)) => next.min(*at),
            None => next,
        }
    }
}
