//! The room controller: the state machine between signaling, the media core and the
//! room event log.
//!
//! A [`Controller`] owns the media core ([`Sfu`]), the signaling sessions of the rooms
//! a node hosts, their resume tokens and, per room, the log's view of it
//! ([`RoomState`]). It is Sans-IO in the manner of `str0m::Rtc` and
//! `quinn_proto::Connection`: the driver hands it time and input
//! ([`Controller::handle_join`], [`Controller::handle_message`],
//! [`Controller::handle_datagram`], [`Controller::handle_timeout`] and, before sending,
//! [`Controller::handle_due`], …) and takes what it produced ([`Controller::poll_output`]
//! for log appends and client messages, [`Controller::poll_transmit`] for datagrams,
//! [`Controller::poll_timeout`] for when to call again). It holds no socket, clock, task
//! or channel, so every rule here is tested with virtual time.
//!
//! Every change of a room is decided against the room's state
//! ([`meridian_events::decide()`]) before it is queued for the log, so the log only ever
//! holds events its fold accepts; a message that acknowledges a change is queued after
//! the change, and the driver delivers it only once the change is stored.
//!
//! `S` is the driver's handle on one signaling connection (a channel sender, or a test's
//! mailbox): the controller stores it and hands it back in [`Output::Deliver`] and
//! [`Output::Close`].
#![deny(missing_docs)]

mod cut;
mod roster;
mod session;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_events::{Command as Decision, DomainError, Event, LeaveReason, RoomState};
use meridian_media::{
    MediaError, ParticipantId, Sfu, SfuConfig, SfuEvent, SfuStats, TrackId, Transmit,
};
use meridian_protocol::{ClientMessage, ErrorCode, Layer, ParticipantInfo, ServerMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::{debug, info, warn};

pub use cut::MAX_CUT;
pub use roster::{MAX_ROSTER, MAX_ROSTER_SOURCES, ROSTER_GRACE, RosterEntry, RosterError};
use session::{Logged, Session};

/// What a session may do, from its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grants {
    /// May publish tracks.
    pub publish: bool,
    /// May subscribe to tracks.
    pub subscribe: bool,
}

/// A client asking to enter a room (its token already verified, the room placed here).
#[derive(Debug)]
pub struct JoinRequest<S> {
    /// Room name.
    pub room: String,
    /// Authenticated identity (the token's subject).
    pub identity: String,
    /// Display name from the token.
    pub name: Option<String>,
    /// What the token allows.
    pub grants: Grants,
    /// Subscribe to every track of the room without asking.
    pub auto_subscribe: bool,
    /// Resume token from an earlier `joined`.
    pub resume: Option<String>,
    /// When the client's token expires: the session ends then unless the client sends
    /// a newer token ([`Controller::handle_refresh`]). `None`: never.
    pub expires_at: Option<Instant>,
    /// The driver's handle on the client's signaling connection.
    pub session: S,
}

/// A join that succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The participant, new or resumed.
    pub participant: ParticipantId,
    /// Tells this attachment of the participant apart from earlier ones (see
    /// [`Controller::handle_detach`]).
    pub generation: u64,
}

/// A refused request: the code and message the client gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Stable code.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Something the driver must do, in the order produced.
#[derive(Debug)]
pub enum Output<S> {
    /// Append these events to the room's stream. Every later output of the same room
    /// waits until they are stored.
    Append {
        /// Room name (the stream is [`meridian_events::room_stream`] of it).
        room: String,
        /// The placement epoch the events were decided under: a driver that hosts the
        /// room under another epoch now must drop them.
        epoch: u64,
        /// Who caused them (an identity, or the node).
        actor: String,
        /// The events, decided against the room's state.
        events: Vec<Event>,
    },
    /// Send a message to one client.
    Deliver {
        /// The room the message belongs to (for ordering behind its appends).
        room: String,
        /// The client's connection.
        to: S,
        /// The message.
        msg: ServerMessage,
    },
    /// Close a client's signaling connection after what was queued for it.
    Close {
        /// The room.
        room: String,
        /// The client's connection.
        to: S,
    },
    /// Something for the node's relay control (another node must be told).
    Relay(RelayOutput),
}

/// What the media core asks of the other nodes of a relay link (the driver carries it
/// over the internal control endpoint, never over clients' signaling).
#[derive(Debug, Clone, PartialEq)]
pub enum RelayOutput {
    /// Send the downstream node `peer` this offer; give its answer to
    /// `Sfu::handle_relay_answer` (through [`Controller::relay`]).
    Offer {
        /// The downstream node.
        peer: String,
        /// The SDP offer.
        sdp: String,
        /// The track each media section carries.
        tracks: Vec<meridian_media::RelayTrack>,
    },
    /// Ask the upstream node `peer` to send `layer` of a relayed track.
    LayerWanted {
        /// The upstream node.
        peer: String,
        /// The track.
        track_id: TrackId,
        /// The highest layer a local subscriber wants.
        layer: Layer,
    },
    /// Tell the downstream node `peer` a relayed track's state (mute, the layer
    /// crossing); it applies it with `Sfu::handle_relay_track_state`.
    TrackState {
        /// The downstream node.
        peer: String,
        /// The track's state.
        state: meridian_media::RelayTrackState,
    },
    /// The link with `peer` lost connectivity.
    Down {
        /// The other node.
        peer: String,
        /// Whether this node was the receiving side.
        inbound: bool,
    },
}

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The media core's settings.
    pub sfu: SfuConfig,
    /// How long a participant whose signaling dropped may come back with its resume
    /// token before it is recorded as gone.
    pub resume_grace: Duration,
    /// Seed of the generator for resume tokens and ids (a random one in production,
    /// fixed in tests).
    pub seed: u64,
    /// Layer preferences and mute toggles one participant may send per second,
    /// sustained; more are refused with `throttled` (each would be a log event).
    pub changes_per_second: f64,
    /// How many such changes may come at once before the rate applies.
    pub change_burst: u32,
    /// How long an identity removed by an admin ([`Controller::handle_remove`]) may
    /// not join that room again; zero: no ban.
    pub removal_ban: Duration,
}

/// Most (room, identity) removal bans kept at once; beyond it expired ones are swept
/// and, if still full, a new removal bans nobody (logged).
const MAX_BANS: usize = 100_000;

/// Counters of the controller, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// New participants admitted.
    pub joins: u64,
    /// Participants rebuilt from the log that came back.
    pub participants_restored: u64,
    /// Older sessions replaced by a new join of the same identity.
    pub sessions_replaced: u64,
    /// Changes the room's state refused (not recorded).
    pub decisions_refused: u64,
    /// Layer or mute changes refused for coming faster than allowed.
    pub changes_throttled: u64,
    /// Panics while handling one participant's message or datagram, contained: that
    /// participant was removed, the others carried on.
    pub panics_contained: u64,
    /// Media datagrams dropped because their participant's path was cut
    /// ([`Controller::cut_media`], dev mode).
    pub datagrams_cut: u64,
}

/// The room controller (see the crate docs).
pub struct Controller<S> {
    sfu: Sfu,
    sessions: HashMap<ParticipantId, Session<S>>,
    /// Resume token hash → participant.
    resume_index: HashMap<String, ParticipantId>,
    /// The log's view of each room with sessions here.
    rooms: HashMap<String, RoomState>,
    /// When detached participants' grace runs out.
    expiries: BTreeSet<(Instant, ParticipantId)>,
    /// When participants' tokens expire.
    token_expiries: BTreeSet<(Instant, ParticipantId)>,
    grace: Duration,
    /// Sustained rate and burst of layer/mute changes per participant.
    change_rate: (f64, f64),
    next_generation: u64,
    rng: StdRng,
    outputs: VecDeque<Output<S>>,
    /// A room being forgotten (lost to another node): nothing of it is recorded.
    forgetting: Option<String>,
    /// Set while core events are handled, so handling one does not recurse.
    in_events: bool,
    stats: ControllerStats,
    /// (room, identity) removed by an admin → until when it may not join again.
    bans: HashMap<(String, String), Instant>,
    removal_ban: Duration,
    /// Participants whose media path is cut, until when (dev mode, `cut`).
    cuts: HashMap<ParticipantId, Instant>,
    /// The latest time handed in, for expiring cuts.
    cut_clock: Instant,
    /// Participants of other parts of a room (on other nodes or regions) whose tracks
    /// are relayed in, by local part and participant id. Bounded by the relayed
    /// tracks (each has at least one); never recorded here (they are in their own
    /// part's log).
    remote: HashMap<String, BTreeMap<String, roster::RemoteParticipant>>,
    /// The other parts' rosters, by local part and source (`roster.rs`); bounded by
    /// [`MAX_ROSTER_SOURCES`] × [`MAX_ROSTER`] per part.
    rosters: roster::Rosters,
    /// The far participants each part's clients were told of.
    shown: HashMap<String, roster::Shown>,
    /// When the next far roster runs out of its grace.
    roster_expiry: Option<Instant>,
    /// The controller's creation: far participants' join times are kept relative to it.
    origin: Instant,
}

impl<S: Clone> Controller<S> {
    /// A controller with an empty media core, at `now`.
    pub fn new(config: ControllerConfig, now: Instant) -> Controller<S> {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut sfu = config.sfu;
        // Ids stay unique within a room's log across nodes and restarts: each controller
        // starts at a random multiple of 2^20.
        sfu.first_id = (u64::from(rng.random::<u32>()) << 20) | 1;
        Controller {
            sfu: Sfu::new(sfu, now),
            sessions: HashMap::new(),
            resume_index: HashMap::new(),
            rooms: HashMap::new(),
            expiries: BTreeSet::new(),
            token_expiries: BTreeSet::new(),
            grace: config.resume_grace,
            change_rate: (
                config.changes_per_second.max(0.0),
                f64::from(config.change_burst.max(1)),
            ),
            next_generation: 1,
            rng,
            outputs: VecDeque::new(),
            forgetting: None,
            in_events: false,
            stats: ControllerStats::default(),
            bans: HashMap::new(),
            removal_ban: config.removal_ban,
            cuts: HashMap::new(),
            cut_clock: now,
            remote: HashMap::new(),
            rosters: HashMap::new(),
            shown: HashMap::new(),
            roster_expiry: None,
            origin: now,
        }
    }

    /// The media core, for statistics.
    pub fn sfu(&self) -> &Sfu {
        &self.sfu
    }

    /// The controller's counters.
    pub fn stats(&self) -> &ControllerStats {
        &self.stats
    }

    /// The media core's counters.
    pub fn sfu_stats(&self) -> &SfuStats {
        self.sfu.stats()
    }

    /// Sessions held, attached, detached or waiting to be resumed.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether a session (attached, detached or dormant) of `participant` is held.
    pub fn has_session(&self, participant: ParticipantId) -> bool {
        self.sessions.contains_key(&participant)
    }

    /// The log's view of a room hosted here.
    pub fn room_state(&self, room: &str) -> Option<&RoomState> {
        self.rooms.get(room)
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output<S>> {
        self.outputs.pop_front()
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.next_uncut_transmit()
    }

    /// When [`Controller::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let media = self.sfu.poll_timeout();
        [self.expiries.first(), self.token_expiries.first()]
            .into_iter()
            .flatten()
            .map(|(at, _)| *at)
            .chain(self.roster_expiry)
            .fold(media, Instant::min)
    }

    /// Advances time: the media core's timers and resume-grace expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.cut_clock = now;
        if now >= self.sfu.poll_timeout() {
            self.sfu.handle_timeout(now);
        }
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            info!(participant = %id, "resume grace over; removing participant");
            self.remove(id, now, LeaveReason::Timeout);
        }
        while let Some(&(at, id)) = self.token_expiries.first() {
            if at > now {
                break;
            }
            self.token_expiries.pop_first();
            info!(participant = %id, "token expired without refresh; removing participant");
            self.end_session(
                id,
                now,
                LeaveReason::Timeout,
                ServerMessage::error(
                    ErrorCode::Unauthorized,
                    "token expired (token_expired); join again with a new token, or send \
                     refresh before it expires",
                ),
            );
        }
        self.expire_rosters(now);
        self.drain_sfu_events(now);
    }

    /// Handles already-due timeouts (the media core's and expiries), at most
    /// `max_rounds` rounds, each at the time `clock` gives; returns the rounds taken.
    /// Drivers call it before they send: see [`Sfu::handle_due`] for why.
    pub fn handle_due(&mut self, max_rounds: usize, clock: impl FnMut() -> Instant) -> usize {
        meridian_media::due_rounds(
            self,
            max_rounds,
            clock,
            Controller::poll_timeout,
            Controller::handle_timeout,
        )
    }

    /// A media datagram arrived on the node's socket. A panic while the media core
    /// handles it is contained to the participant the datagram belongs to (see
    /// [`Controller::handle_message`]); one that belongs to nobody is re-raised.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        self.cut_clock = now;
        if self.cut_off(source, contents) {
            return;
        }
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.sfu.handle_datagram(now, source, contents)
        }));
        if let Err(payload) = handled {
            match self.sfu.participant_of(source, contents) {
                Some(id) => self.contain_panic(now, id, payload),
                None => std::panic::resume_unwind(payload),
            }
            return;
        }
        self.drain_sfu_events(now);
    }

    /// After a panic while handling `id`'s input: removes `id` (recorded as left for
    /// `internal_error`, its client told `error{code:"internal"}` and closed, its resume
    /// token revoked) and counts it in [`ControllerStats::panics_contained`]. The
    /// participant's own state is what the unwinding may have left half-updated, and
    /// it is dropped; if removing it panics too, the panic is re-raised (the driver
    /// then stops the node).
    fn contain_panic(
        &mut self,
        now: Instant,
        id: ParticipantId,
        payload: Box<dyn std::any::Any + Send>,
    ) {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        self.stats.panics_contained += 1;
        tracing::error!(participant = %id, panic = %what, "panic handling a participant's input; removing the participant");
        let removed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.end_session(
                id,
                now,
                LeaveReason::Other("internal_error".into()),
                ServerMessage::error(
                    ErrorCode::Internal,
                    "the node failed while handling this session and removed it; join again",
                ),
            );
            self.drain_sfu_events(now);
        }));
        if let Err(again) = removed {
            std::panic::resume_unwind(again);
        }
    }

    /// A datagram arrived on the node's relay socket (an inbound relay link).
    pub fn handle_relay_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        self.sfu.handle_relay_datagram(now, source, contents);
        self.drain_sfu_events(now);
    }

    /// The next datagram to send from the relay socket, if any.
    pub fn poll_relay_transmit(&mut self) -> Option<Transmit> {
        self.sfu.poll_relay_transmit()
    }

    /// Runs a relay command on the media core (`relay_room`, `handle_relay_offer`,
    /// `handle_relay_answer`, `set_relay_layer`, `remove_relay`, …) and handles what it
    /// caused. Relay links carry media between nodes; nothing about them is a client's
    /// change, so nothing here is recorded in a room's log.
    pub fn relay<R>(&mut self, now: Instant, f: impl FnOnce(&mut Sfu, Instant) -> R) -> R {
        let r = f(&mut self.sfu, now);
        self.drain_sfu_events(now);
        r
    }

    /// A client asks to enter its room, or to resume a session with its resume token.
    pub fn handle_join(&mut self, now: Instant, req: JoinRequest<S>) -> Result<Joined, Refusal> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let result = match req.resume.clone() {
            Some(token) => self.resume(now, req, token, generation),
            None => self.join(now, req, generation),
        };
        self.drain_sfu_events(now);
        result
    }

    /// A message from a joined client. A refusal is sent to the client as an `error`.
    ///
    /// A panic while handling it (a bug reached by this client's input) is contained
    /// to this participant: it is removed with `error{code:"internal"}` and the room
    /// and the node's other participants carry on.
    pub fn handle_message(&mut self, now: Instant, participant: ParticipantId, msg: ClientMessage) {
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.message(now, participant, msg)
        }));
        match handled {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => self.send(
                participant,
                ServerMessage::error(refusal.code, refusal.message),
            ),
            Err(payload) => return self.contain_panic(now, participant, payload),
        }
        self.drain_sfu_events(now);
    }

    /// The signaling connection of `generation` closed: the participant may resume
    /// within the grace. A stale generation (the client already came back) is ignored.
    pub fn handle_detach(&mut self, now: Instant, participant: ParticipantId, generation: u64) {
        if self
            .sessions
            .get(&participant)
            .is_some_and(|s| s.generation == generation && s.session.is_some())
        {
            debug!(%participant, "signaling detached; grace period starts");
            if let Some(s) = self.sessions.get_mut(&participant) {
                s.session = None;
            }
            self.start_grace(participant, now);
        }
    }

    /// The client sent a newer token, valid until `expires_at` (its identity and room
    /// already checked by the driver): the session lives on until then.
    pub fn handle_refresh(
        &mut self,
        participant: ParticipantId,
        expires_at: Option<Instant>,
    ) -> Result<(), Refusal> {
        let Some(s) = self.sessions.get_mut(&participant) else {
            return Err(Refusal::new(ErrorCode::NotJoined, "session is gone"));
        };
        let old = std::mem::replace(&mut s.token_expires, expires_at);
        if let Some(at) = old {
            self.token_expiries.remove(&(at, participant));
        }
        if let Some(at) = expires_at {
            self.token_expiries.insert((at, participant));
        }
        Ok(())
    }

    /// Removes a participant on an admin's request: it leaves the room (recorded as
    /// kicked), its client is told `left{reason:"removed"}` and closed, and its resume
    /// token is revoked, so resuming cannot undo it. `room`, when given (an admin token
    /// scoped to one room), must be the participant's room. Returns whether it was
    /// removed.
    pub fn handle_remove(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        room: Option<&str>,
    ) -> bool {
        if self
            .sessions
            .get(&participant)
            .is_none_or(|s| room.is_some_and(|r| r != s.room))
        {
            return false;
        }
        info!(%participant, "removed by an admin");
        if let Some(s) = self.sessions.get(&participant)
            && !self.removal_ban.is_zero()
        {
            let key = (s.room.clone(), s.identity.clone());
            if self.bans.len() >= MAX_BANS {
                self.bans.retain(|_, until| *until > now);
            }
            if self.bans.len() < MAX_BANS {
                self.bans.insert(key, now + self.removal_ban);
            } else {
                warn!("removal ban table full; the removed identity is not banned");
            }
        }
        self.end_session(
            participant,
            now,
            LeaveReason::Kicked,
            ServerMessage::Left {
                reason: "removed".into(),
            },
        );
        self.drain_sfu_events(now);
        true
    }

    /// Removes a participant for `reason`, tells its client `msg` and closes it.
    fn end_session(
        &mut self,
        id: ParticipantId,
        now: Instant,
        reason: LeaveReason,
        msg: ServerMessage,
    ) {
        if let Some(Session {
            room,
            session: Some(to),
            ..
        }) = self.remove(id, now, reason)
        {
            self.outputs.push_back(Output::Deliver {
                room: room.clone(),
                to: to.clone(),
                msg,
            });
            self.outputs.push_back(Output::Close { room, to });
        }
    }

    /// Closes a participant's signaling connection (an admin request); it stays for the
    /// grace like after any drop. `room`, when given (an admin token scoped to one
    /// room), must be the participant's room. Returns whether it had one open.
    pub fn close_signaling(&mut self, participant: ParticipantId, room: Option<&str>) -> bool {
        let Some(s) = self
            .sessions
            .get(&participant)
            .filter(|s| room.is_none_or(|r| r == s.room))
        else {
            return false;
        };
        let Some(to) = s.session.clone() else {
            return false;
        };
        info!(%participant, "closing signaling on request");
        self.outputs.push_back(Output::Close {
            room: s.room.clone(),
            to,
        });
        true
    }

    /// This node now hosts `room`, whose log says `state` (a takeover, a handover or a
    /// first placement): its participants wait, for the grace, to come back with their
    /// resume tokens.
    pub fn handle_restore(&mut self, now: Instant, room: &str, state: RoomState) {
        let mut restored = 0;
        for (pid, p) in &state.participants {
            let Ok(id) = pid.parse::<ParticipantId>() else {
                warn!(participant = %pid, "participant id from the log does not parse; skipped");
                continue;
            };
            if self.sessions.contains_key(&id) {
                continue;
            }
            let tracks = state
                .tracks
                .iter()
                .filter(|(_, t)| &t.participant_id == pid)
                .map(|(t, _)| t.clone())
                .collect();
            let resume_hash = p.resume_hash.clone().unwrap_or_default();
            if !resume_hash.is_empty() {
                self.resume_index.insert(resume_hash.clone(), id);
            }
            let mut s = Session::dormant(room, &p.identity, &p.name, resume_hash);
            s.since = Some(now);
            s.logged = Logged {
                tracks,
                subscriptions: p.subscriptions.clone(),
            };
            self.sessions.insert(id, s);
            self.start_grace(id, now);
            restored += 1;
        }
        if restored > 0 {
            info!(%room, participants = restored, epoch = state.epoch, "room restored from the log");
        } else {
            debug!(%room, epoch = state.epoch, "room placed here");
        }
        self.rooms.insert(room.to_string(), state);
    }

    /// Another node hosts `room` now: its clients are told to move (to `url` when
    /// known) and the room is forgotten here without recording anything.
    pub fn handle_room_lost(
        &mut self,
        now: Instant,
        room: &str,
        url: Option<String>,
        reason: &str,
    ) {
        self.forgetting = Some(room.to_string());
        let gone: Vec<ParticipantId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.room == room)
            .map(|(id, _)| *id)
            .collect();
        info!(%room, participants = gone.len(), %reason, "room moved to another node");
        for id in gone {
            let Some(s) = self.drop_session(id, now) else {
                continue;
            };
            if let Some(to) = s.session {
                let msg = ServerMessage::Migrate {
                    url: url.clone(),
                    reason: reason.to_string(),
                };
                self.outputs.push_back(Output::Deliver {
                    room: room.to_string(),
                    to,
                    msg,
                });
            }
        }
        self.rooms.remove(room);
        self.forget_remote(room);
        self.forgetting = None;
    }

    fn start_grace(&mut self, id: ParticipantId, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&id)
            && s.detached_at.is_none()
        {
            s.detached_at = Some(now);
            self.expiries.insert((now + self.grace, id));
        }
    }

    fn end_grace(&mut self, id: ParticipantId) {
        if let Some(s) = self.sessions.get_mut(&id)
            && let Some(at) = s.detached_at.take()
        {
            self.expiries.remove(&(at + self.grace, id));
        }
    }

    fn join(
        &mut self,
        now: Instant,
        req: JoinRequest<S>,
        generation: u64,
    ) -> Result<Joined, Refusal> {
        let JoinRequest {
            room,
            identity,
            name,
            grants,
            auto_subscribe,
            session,
            expires_at,
            ..
        } = req;
        let key = (room, identity);
        match self.bans.get(&key) {
            Some(until) if *until > now => {
                let secs = until.saturating_duration_since(now).as_secs().max(1);
                return Err(Refusal::new(
                    ErrorCode::Forbidden,
                    format!("removed from this room by an admin; may join again in {secs} s"),
                ));
            }
            Some(_) => {
                self.bans.remove(&key);
            }
            None => {}
        }
        let (room, identity) = key;
        self.replace_identity(now, &room, &identity);
        let id =
            self.sfu
                .add_participant(now, &room, &identity, auto_subscribe && grants.subscribe);
        let resume = self.random_token();
        let resume_hash = sha256_hex(&resume);
        let decision = Decision::Join {
            participant_id: id.to_string(),
            identity: identity.clone(),
            name: name.clone().unwrap_or_default(),
            resume_hash: Some(resume_hash.clone()),
        };
        if let Err(e) = self.decide(&room, &identity, decision) {
            self.sfu.remove_participant(now, id);
            return Err(Refusal::new(ErrorCode::Forbidden, e.to_string()));
        }
        self.resume_index.insert(resume_hash.clone(), id);
        let s = Session {
            name,
            grants,
            resume,
            session: Some(session),
            generation,
            dormant: false,
            since: Some(now),
            ..Session::dormant(&room, &identity, "", resume_hash)
        };
        self.sessions.insert(id, s);
        let _ = self.handle_refresh(id, expires_at);
        self.stats.joins += 1;
        self.send_joined(id, false);
        self.announce_joined(id);
        Ok(Joined {
            participant: id,
            generation,
        })
    }

    /// The same identity joining a room again replaces its older session there: the
    /// older client is told why and its participant leaves.
    fn replace_identity(&mut self, now: Instant, room: &str, identity: &str) {
        let older: Vec<ParticipantId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.room == room && s.identity == identity)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            info!(participant = %id, %identity, "replaced by a new session of the same identity");
            self.stats.sessions_replaced += 1;
            if let Some(Session {
                session: Some(to), ..
            }) = self.remove(id, now, LeaveReason::Replaced)
            {
                let msg = ServerMessage::Left {
                    reason: "replaced".into(),
                };
                self.outputs.push_back(Output::Deliver {
                    room: room.to_string(),
                    to: to.clone(),
                    msg,
                });
                self.outputs.push_back(Output::Close {
                    room: room.to_string(),
                    to,
                });
            }
        }
    }

    fn resume(
        &mut self,
        now: Instant,
        req: JoinRequest<S>,
        token: String,
        generation: u64,
    ) -> Result<Joined, Refusal> {
        let found = self
            .resume_index
            .get(&sha256_hex(&token))
            .copied()
            .filter(|id| {
                // Any part of the same room: a resumed session stays in its own part.
                self.sessions.get(id).is_some_and(|s| {
                    s.identity == req.identity
                        && meridian_events::room_of_part(&s.room)
                            == meridian_events::room_of_part(&req.room)
                })
            });
        let Some(id) = found else {
            return Err(Refusal::new(
                ErrorCode::ResumeFailed,
                "unknown or expired resume token",
            ));
        };
        let room = self.sessions.get(&id).map_or(req.room, |s| s.room.clone());
        // Restored here but the client never connected its media (it gave up waiting
        // for `joined`): start its media over, as restored again.
        let redo = self.sessions.get(&id).is_some_and(|s| s.restored_pending)
            && !self
                .sfu
                .room_tracks(&room)
                .iter()
                .any(|t| t.participant_id == id.to_string());
        if redo {
            let subscribed = self.sfu.subscriptions_of(id);
            if let Some(s) = self.sessions.get_mut(&id) {
                for t in subscribed {
                    s.logged.subscriptions.entry(t.to_string()).or_insert(None);
                }
                s.dormant = true;
            }
            self.forgetting = Some(room.clone());
            self.sfu.remove_participant(now, id);
            self.drain_sfu_events(now);
            self.forgetting = None;
        }
        self.end_grace(id);
        // The token presented with the resume is the session's token from now on.
        self.handle_refresh(id, req.expires_at)
            .map_err(|_| Refusal::new(ErrorCode::ResumeFailed, "session is gone"))?;
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(Refusal::new(ErrorCode::ResumeFailed, "session is gone"));
        };
        // The resume token rotates: the one just used is spent.
        let old_hash = std::mem::take(&mut s.resume_hash);
        let restored = std::mem::take(&mut s.dormant);
        s.session = Some(req.session);
        s.generation = generation;
        s.restored_pending = restored;
        s.grants = if restored { req.grants } else { s.grants };
        self.resume_index.remove(&old_hash);
        let token = self.random_token();
        let hash = sha256_hex(&token);
        self.resume_index.insert(hash.clone(), id);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.resume = token;
            s.resume_hash = hash;
        }
        if restored {
            // Rebuilt from the log on this node: new media connections.
            let subscribe = req.auto_subscribe && req.grants.subscribe;
            if let Err(e) = self
                .sfu
                .restore_participant(now, id, &room, &req.identity, subscribe)
            {
                return Err(Refusal::new(ErrorCode::Internal, e.to_string()));
            }
            self.stats.participants_restored += 1;
        }
        info!(participant = %id, restored, "session resumed");
        self.send_joined(id, restored);
        if restored {
            self.resubscribe(now, id, None);
            self.announce_joined(id);
        }
        Ok(Joined {
            participant: id,
            generation,
        })
    }

    fn random_token(&mut self) -> String {
        let bytes: [u8; 24] = self.rng.random();
        hex(&bytes)
    }

    /// Decides `decision` against the room's state; the resulting events (possibly
    /// none, for a change that changes nothing) are applied and queued for the log.
    fn decide(
        &mut self,
        room: &str,
        actor: &str,
        decision: Decision,
    ) -> Result<usize, DomainError> {
        if self.forgetting.as_deref() == Some(room) {
            return Ok(0);
        }
        let state = self.rooms.entry(room.to_string()).or_default();
        let events = match meridian_events::decide(state, &decision) {
            Ok(events) => events,
            Err(e) => {
                self.stats.decisions_refused += 1;
                return Err(e);
            }
        };
        for e in &events {
            state.apply_event(e);
        }
        let n = events.len();
        if n > 0 {
            self.outputs.push_back(Output::Append {
                room: room.to_string(),
                epoch: state.epoch,
                actor: if actor.is_empty() { "node" } else { actor }.to_string(),
                events,
            });
        }
        Ok(n)
    }

    /// Decides a change the media core already made; a refusal means the log knew it
    /// already (a restored participant re-creating its state) and is only logged.
    fn record(&mut self, room: &str, actor: &str, decision: Decision) -> bool {
        match self.decide(room, actor, decision) {
            Ok(n) => n > 0,
            Err(e) => {
                debug!(%room, "not recorded: {e}");
                false
            }
        }
    }

    fn identity_of(&self, id: ParticipantId) -> String {
        self.sessions
            .get(&id)
            .map_or_else(|| id.to_string(), |s| s.identity.clone())
    }

    fn send(&mut self, id: ParticipantId, msg: ServerMessage) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let Some(to) = s.session.clone() else {
            return;
        };
        self.outputs.push_back(Output::Deliver {
            room: s.room.clone(),
            to,
            msg,
        });
    }

    fn broadcast(&mut self, room: &str, except: Option<ParticipantId>, msg: ServerMessage) {
        for id in self.sfu.room_participants(room) {
            if Some(id) != except {
                self.send(id, msg.clone());
            }
        }
    }

    fn participant_info(&self, id: ParticipantId) -> Option<ParticipantInfo> {
        let s = self.sessions.get(&id)?;
        let pid = id.to_string();
        Some(ParticipantInfo {
            participant_id: pid.clone(),
            identity: s.identity.clone(),
            name: s.name.clone(),
            tracks: self
                .sfu
                .room_tracks(&s.room)
                .into_iter()
                .filter(|t| t.participant_id == pid)
                .collect(),
        })
    }

    fn announce_joined(&mut self, id: ParticipantId) {
        if let Some(info) = self.participant_info(id) {
            let room = self.sessions[&id].room.clone();
            self.broadcast(
                &room,
                Some(id),
                ServerMessage::ParticipantJoined { participant: info },
            );
        }
    }

    fn send_joined(&mut self, id: ParticipantId, restored: bool) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let room = s.room.clone();
        let resume = s.resume.clone();
        let participants = self
            .sfu
            .room_participants(&room)
            .into_iter()
            .filter(|p| *p != id)
            .filter_map(|p| self.participant_info(p))
            .chain(self.remote_infos(&room))
            .collect();
        self.send(
            id,
            ServerMessage::Joined {
                participant_id: id.to_string(),
                // A part of a room is the room, as far as its clients know.
                room: meridian_events::room_of_part(&room).to_string(),
                participants,
                resume,
                resume_grace_secs: self.grace.as_secs(),
                version: meridian_protocol::PROTOCOL_VERSION,
                restored,
            },
        );
    }

    /// Drops a participant's session, resume index entry and media state; records
    /// nothing by itself (the core's events are handled as usual).
    fn drop_session(&mut self, id: ParticipantId, now: Instant) -> Option<Session<S>> {
        self.end_grace(id);
        let s = self.sessions.remove(&id)?;
        if let Some(at) = s.token_expires {
            self.token_expiries.remove(&(at, id));
        }
        self.resume_index.remove(&s.resume_hash);
        self.sfu.remove_participant(now, id);
        self.drain_sfu_events(now);
        Some(s)
    }

    /// Removes a participant, records why, and tells its room; returns its session.
    fn remove(
        &mut self,
        id: ParticipantId,
        now: Instant,
        reason: LeaveReason,
    ) -> Option<Session<S>> {
        let s = self.drop_session(id, now)?;
        let leave = Decision::Leave {
            participant_id: id.to_string(),
            reason,
        };
        self.record(&s.room, &s.identity, leave);
        if !self.sessions.values().any(|o| o.room == s.room) {
            self.record(&s.room, &s.identity, Decision::Close);
        }
        self.broadcast(
            &s.room,
            Some(id),
            ServerMessage::ParticipantLeft {
                participant_id: id.to_string(),
            },
        );
        Some(s)
    }

    /// Subscribes a restored participant again to its logged subscriptions whose
    /// tracks exist (only to `only` when given), with its preferred layers.
    fn resubscribe(&mut self, now: Instant, id: ParticipantId, only: Option<&str>) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        if s.dormant {
            return;
        }
        let wanted: Vec<(String, Option<String>)> = s
            .logged
            .subscriptions
            .iter()
            .filter(|(t, _)| only.is_none_or(|o| o == t.as_str()))
            .map(|(t, l)| (t.clone(), l.clone()))
            .collect();
        let present: HashSet<String> = self
            .sfu
            .room_tracks(&s.room)
            .into_iter()
            .map(|t| t.track_id)
            .collect();
        for (track, layer) in wanted {
            if !present.contains(&track) {
                continue;
            }
            let Ok(t) = track.parse::<TrackId>() else {
                continue;
            };
            // Already subscribed (auto-subscribe) is fine.
            let _ = self.sfu.subscribe(now, id, t);
            if let Some(layer) = layer.as_deref().and_then(Layer::from_rid) {
                let _ = self.sfu.set_max_layer(now, id, t, layer);
            }
        }
    }

    fn message(
        &mut self,
        now: Instant,
        id: ParticipantId,
        msg: ClientMessage,
    ) -> Result<(), Refusal> {
        let (grants, room, actor) = self
            .sessions
            .get(&id)
            .map(|s| (s.grants, s.room.clone(), s.identity.clone()))
            .ok_or(Refusal::new(ErrorCode::NotJoined, "session is gone"))?;
        #[cfg(test)]
        if let ClientMessage::Mute { track_id, .. } = &msg
            && track_id == tests::PANIC_TRACK
        {
            panic!("fault injected by a test");
        }
        let track = |s: &str| {
            s.parse::<TrackId>()
                .map_err(|_| Refusal::new(ErrorCode::NotFound, format!("no track {s}")))
        };
        match msg {
            ClientMessage::Join { .. } => {
                return Err(Refusal::new(ErrorCode::NotJoined, "already joined"));
            }
            ClientMessage::Offer { sdp, mut tracks } => {
                if !grants.publish {
                    return Err(Refusal::new(
                        ErrorCode::Forbidden,
                        "token lacks the publish grant",
                    ));
                }
                // Earlier track ids are honoured only for this participant's own logged
                // tracks.
                let own = self.sessions.get(&id).map(|s| &s.logged.tracks);
                for t in &mut tracks {
                    if t.track_id
                        .as_ref()
                        .is_some_and(|x| !own.is_some_and(|o| o.contains(x)))
                    {
                        t.track_id = None;
                    }
                }
                let (sdp, tracks) = self
                    .sfu
                    .handle_publisher_offer(now, id, &sdp, tracks)
                    .map_err(media_refusal)?;
                // The publications are recorded (and announced) before the answer
                // acknowledges them.
                self.drain_sfu_events(now);
                self.send(id, ServerMessage::Answer { sdp, tracks });
            }
            ClientMessage::Answer { sdp } => {
                self.sfu
                    .handle_subscriber_answer(now, id, &sdp)
                    .map_err(media_refusal)?;
            }
            ClientMessage::IceRestart => {
                self.sfu.restart_ice(now, id).map_err(media_refusal)?;
            }
            ClientMessage::Subscribe { track_ids } => {
                if !grants.subscribe {
                    return Err(Refusal::new(
                        ErrorCode::Forbidden,
                        "token lacks the subscribe grant",
                    ));
                }
                for t in track_ids {
                    self.sfu
                        .subscribe(now, id, track(&t)?)
                        .map_err(media_refusal)?;
                }
            }
            ClientMessage::Unsubscribe { track_ids } => {
                for t in track_ids {
                    self.sfu
                        .unsubscribe(now, id, track(&t)?)
                        .map_err(media_refusal)?;
                    let decision = Decision::Unsubscribe {
                        participant_id: id.to_string(),
                        track_id: t,
                    };
                    self.record(&room, &actor, decision);
                }
            }
            ClientMessage::SetLayer {
                track_id,
                max_layer,
            } => {
                self.allow_change(now, id)?;
                self.sfu
                    .set_max_layer(now, id, track(&track_id)?, max_layer)
                    .map_err(media_refusal)?;
                let decision = Decision::SetPreferredLayer {
                    participant_id: id.to_string(),
                    track_id,
                    layer: max_layer.rid().to_string(),
                };
                self.record(&room, &actor, decision);
            }
            ClientMessage::Mute { track_id, muted } => {
                self.allow_change(now, id)?;
                self.sfu
                    .set_muted(now, id, track(&track_id)?, muted)
                    .map_err(media_refusal)?;
            }
            ClientMessage::Unpublish { track_id } => {
                self.sfu
                    .unpublish(now, id, track(&track_id)?)
                    .map_err(media_refusal)?;
            }
            // Answered by the signaling session itself.
            ClientMessage::Ping { .. } => {}
            // Verified by the driver, which calls `handle_refresh`.
            ClientMessage::Refresh { .. } => {}
            ClientMessage::Leave => {
                if let Some(Session {
                    session: Some(to), ..
                }) = self.remove(id, now, LeaveReason::Left)
                {
                    let msg = ServerMessage::Left {
                        reason: "left".into(),
                    };
                    self.outputs.push_back(Output::Deliver { room, to, msg });
                }
            }
        }
        Ok(())
    }

    /// Takes one layer/mute change from the participant's token bucket, or refuses it
    /// with `throttled`.
    fn allow_change(&mut self, now: Instant, id: ParticipantId) -> Result<(), Refusal> {
        let (rate, burst) = self.change_rate;
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(Refusal::new(ErrorCode::NotJoined, "session is gone"));
        };
        let (tokens, last) = s.changes.get_or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *last = now;
        *tokens = (*tokens + elapsed * rate).min(burst);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            self.stats.changes_throttled += 1;
            Err(Refusal::new(
                ErrorCode::Throttled,
                format!("more than {rate} layer or mute changes per second; this one is ignored"),
            ))
        }
    }

    /// Handles the media core's pending events (each records its room event first).
    fn drain_sfu_events(&mut self, now: Instant) {
        if self.in_events {
            return;
        }
        self.in_events = true;
        while let Some(event) = self.sfu.poll_event() {
            self.handle_sfu_event(now, event);
        }
        self.in_events = false;
    }

    fn handle_sfu_event(&mut self, now: Instant, event: SfuEvent) {
        match event {
            SfuEvent::TrackPublished { room, track, codec } => {
                let owner: Option<ParticipantId> = track.participant_id.parse().ok();
                let actor = owner.map(|o| self.identity_of(o)).unwrap_or_default();
                // Subscriptions recorded before a failover come back with the track.
                let waiting: Vec<ParticipantId> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| {
                        s.room == room && s.logged.subscriptions.contains_key(&track.track_id)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in waiting {
                    self.resubscribe(now, id, Some(&track.track_id));
                }
                // A restored publisher re-publishing under its logged id records nothing.
                let republished = owner
                    .and_then(|o| self.sessions.get_mut(&o))
                    .is_some_and(|s| s.logged.tracks.remove(&track.track_id));
                if !republished {
                    let kind = match track.kind {
                        meridian_protocol::TrackKind::Audio => meridian_events::TrackKind::Audio,
                        meridian_protocol::TrackKind::Video => meridian_events::TrackKind::Video,
                    };
                    let decision = Decision::Publish {
                        participant_id: track.participant_id.clone(),
                        track_id: track.track_id.clone(),
                        kind,
                        layers: track.layers.iter().map(|l| l.rid().to_string()).collect(),
                        codec,
                    };
                    self.record(&room, &actor, decision);
                }
                self.broadcast(&room, owner, ServerMessage::TrackPublished { track });
            }
            SfuEvent::TrackUnpublished {
                room,
                track_id,
                participant,
            } => {
                let actor = self.identity_of(participant);
                let decision = Decision::Unpublish {
                    participant_id: participant.to_string(),
                    track_id: track_id.to_string(),
                };
                self.record(&room, &actor, decision);
                self.broadcast(
                    &room,
                    Some(participant),
                    ServerMessage::TrackUnpublished {
                        track_id: track_id.to_string(),
                    },
                )
            }
            SfuEvent::TrackMuted {
                room,
                track_id,
                muted,
            } => {
                let track = track_id.to_string();
                let owner = self
                    .rooms
                    .get(&room)
                    .and_then(|r| r.tracks.get(&track))
                    .map(|t| t.participant_id.clone())
                    .unwrap_or_default();
                let actor = owner
                    .parse::<ParticipantId>()
                    .map(|p| self.identity_of(p))
                    .unwrap_or_default();
                let decision = Decision::SetMuted {
                    participant_id: owner,
                    track_id: track.clone(),
                    muted,
                };
                // Only a change is recorded and announced (a repeated mute is neither).
                if self.record(&room, &actor, decision) {
                    self.broadcast(
                        &room,
                        None,
                        ServerMessage::TrackMuted {
                            track_id: track,
                            muted,
                        },
                    );
                }
            }
            SfuEvent::SubscriberOffer {
                participant,
                sdp,
                tracks,
            } => self.send(participant, ServerMessage::Offer { sdp, tracks }),
            SfuEvent::LayerChanged {
                participant,
                track_id,
                layer,
            } => self.send(
                participant,
                ServerMessage::LayerChanged {
                    track_id: track_id.to_string(),
                    layer,
                },
            ),
            SfuEvent::Disconnected { participant, pc } => {
                debug!(%participant, ?pc, "media connection lost");
                // Without signaling either, the participant is gone unless it resumes.
                if self
                    .sessions
                    .get(&participant)
                    .is_some_and(|s| s.session.is_none())
                {
                    self.start_grace(participant, now);
                }
            }
            SfuEvent::RelayOffer {
                peer,
                sdp,
                mut tracks,
            } => {
                // The far part's clients are told who publishes each track.
                for t in &mut tracks {
                    let publisher = t.track.participant_id.parse::<ParticipantId>().ok();
                    if let Some(s) = publisher.and_then(|p| self.sessions.get(&p)) {
                        t.identity = s.identity.clone();
                        t.name = s.name.clone();
                    }
                }
                self.outputs
                    .push_back(Output::Relay(RelayOutput::Offer { peer, sdp, tracks }));
            }
            SfuEvent::RelayLayerWanted {
                peer,
                track_id,
                layer,
            } => self
                .outputs
                .push_back(Output::Relay(RelayOutput::LayerWanted {
                    peer,
                    track_id,
                    layer,
                })),
            SfuEvent::RelayDown { peer, inbound } => {
                self.outputs
                    .push_back(Output::Relay(RelayOutput::Down { peer, inbound }));
            }
            SfuEvent::RelayTrackState { peer, state } => {
                self.outputs
                    .push_back(Output::Relay(RelayOutput::TrackState { peer, state }));
            }
            // A track of another part muted there: told like a local one, recorded in
            // the log of the part that has it.
            SfuEvent::RelayTrackMuted {
                room,
                track_id,
                muted,
            } => self.broadcast(
                &room,
                None,
                ServerMessage::TrackMuted {
                    track_id: track_id.to_string(),
                    muted,
                },
            ),
            // A track of another part of the room: the clients here see it (and its
            // publisher) like a local one; both are in the log of the part that has it.
            SfuEvent::RelayTrackPublished {
                room,
                track,
                identity,
                name,
                ..
            } => {
                self.remote_track_published(&room, &track, identity, name);
                self.broadcast(&room, None, ServerMessage::TrackPublished { track })
            }
            SfuEvent::RelayTrackUnpublished { room, track_id, .. } => {
                let track_id = track_id.to_string();
                self.broadcast(
                    &room,
                    None,
                    ServerMessage::TrackUnpublished {
                        track_id: track_id.clone(),
                    },
                );
                self.remote_track_unpublished(&room, &track_id);
            }
            SfuEvent::Subscribed {
                participant,
                track_id,
            } if self.sfu.is_relayed(track_id) => {
                // Not this part's track: its state does not know it (and need not).
                debug!(%participant, track = %track_id, "subscribed to a relayed track");
            }
            SfuEvent::Subscribed {
                participant,
                track_id,
            } => {
                let track = track_id.to_string();
                if let Some(s) = self.sessions.get_mut(&participant) {
                    s.logged.subscriptions.remove(&track);
                }
                let Some((room, actor)) = self
                    .sessions
                    .get(&participant)
                    .map(|s| (s.room.clone(), s.identity.clone()))
                else {
                    return;
                };
                let decision = Decision::Subscribe {
                    participant_id: participant.to_string(),
                    track_id: track,
                };
                self.record(&room, &actor, decision);
            }
            SfuEvent::Connected { participant, .. } => {
                if let Some(s) = self.sessions.get_mut(&participant) {
                    s.restored_pending = false;
                }
            }
        }
    }
}

fn media_refusal(e: MediaError) -> Refusal {
    let code = match &e {
        MediaError::UnknownParticipant(_) => ErrorCode::NotJoined,
        MediaError::UnknownTrack(_) => ErrorCode::NotFound,
        MediaError::InvalidSdp(_) | MediaError::NoPendingOffer => ErrorCode::InvalidSdp,
        MediaError::Limit(_) => ErrorCode::CapacityExceeded,
        MediaError::NotAllowed(_) => ErrorCode::Forbidden,
    };
    // Parser errors may quote the client's input: the reply stays small.
    Refusal::new(
        code,
        meridian_protocol::clip(&e.to_string(), meridian_protocol::MAX_ERROR_DETAIL_BYTES),
    )
}

/// SHA-256 of a resume token, hex: what the log records instead of the token.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `mute` of this track id panics inside the controller (test builds only).
    pub(crate) const PANIC_TRACK: &str = "fault-injected-by-a-test";

    fn join(c: &mut Controller<u32>, now: Instant, identity: &str, conn: u32) -> ParticipantId {
        c.handle_join(
            now,
            JoinRequest {
                room: "r".into(),
                identity: identity.into(),
                name: None,
                grants: Grants {
                    publish: true,
                    subscribe: true,
                },
                auto_subscribe: true,
                resume: None,
                expires_at: None,
                session: conn,
            },
        )
        .expect("joins")
        .participant
    }

    #[test]
    fn a_panic_handling_one_participant_removes_only_that_participant() {
        let now = Instant::now();
        let node = SocketAddr::from(([10, 0, 0, 1], 5000));
        let mut c = Controller::new(
            ControllerConfig {
                sfu: meridian_media::SfuConfig::new(node),
                resume_grace: Duration::from_secs(10),
                seed: 7,
                changes_per_second: 5.0,
                change_burst: 20,
                removal_ban: Duration::ZERO,
            },
            now,
        );
        let faulty = join(&mut c, now, "faulty", 1);
        let other = join(&mut c, now, "other", 2);
        while c.poll_output().is_some() {}
        c.handle_message(
            now,
            faulty,
            ClientMessage::Mute {
                track_id: PANIC_TRACK.into(),
                muted: true,
            },
        );
        assert_eq!(c.stats().panics_contained, 1);
        let (mut told, mut closed, mut left, mut others_told) = (None, false, None, false);
        while let Some(out) = c.poll_output() {
            match out {
                Output::Deliver { to: 1, msg, .. } => told = Some(msg),
                Output::Deliver {
                    to: 2,
                    msg: ServerMessage::ParticipantLeft { participant_id },
                    ..
                } => others_told = participant_id == faulty.to_string(),
                Output::Close { to: 1, .. } => closed = true,
                Output::Close { to, .. } => panic!("connection {to} closed"),
                Output::Append { events, .. } => {
                    for e in events {
                        if let Event::ParticipantLeft { reason, .. } = e {
                            left = Some(reason);
                        }
                    }
                }
                Output::Deliver { .. } => {}
                Output::Relay(out) => panic!("no relay link in this test: {out:?}"),
            }
        }
        assert!(
            matches!(
                told,
                Some(ServerMessage::Error {
                    code: ErrorCode::Internal,
                    ..
                })
            ),
            "{told:?}"
        );
        assert!(closed, "the faulty participant's connection is closed");
        assert_eq!(left, Some(LeaveReason::Other("internal_error".into())));
        assert!(others_told, "the room hears that it left");
        // The node carries on: the other participant is served, the faulty one is gone.
        c.handle_message(
            now,
            other,
            ClientMessage::Mute {
                track_id: "no-such-track".into(),
                muted: true,
            },
        );
        let mut answered = false;
        while let Some(out) = c.poll_output() {
            if let Output::Deliver {
                to: 2,
                msg: ServerMessage::Error { .. },
                ..
            } = out
            {
                answered = true;
            }
        }
        assert!(answered, "the other participant is still served");
        assert_eq!(c.sfu().participant_count(), 1);
        c.handle_message(now, faulty, ClientMessage::Ping { id: 1 });
        assert_eq!(c.stats().panics_contained, 1);
    }
}
