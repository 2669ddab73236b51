//! The media run loop: owns the Sans-IO [`Sfu`], the UDP socket and the room's
//! signaling sessions, and moves time, datagrams and commands between them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_media::{MediaError, ParticipantId, Sfu, SfuConfig, SfuEvent, TrackId};
use meridian_protocol::{ClientMessage, ErrorCode, ParticipantInfo, ServerMessage};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::outbox::Outbound;
use meridian_events::{Event, LeaveReason, RoomState};
use meridian_protocol::TrackKind;
use meridian_store::NewEvent;

/// Largest datagram read; anything longer is truncated and then refused by the core.
const MAX_DATAGRAM: usize = 2048;
/// Datagrams handled per wake-up before timers and commands get a turn.
const RECV_BATCH: usize = 256;
/// Messages queued towards one client before it counts as too slow.
pub(crate) const SESSION_QUEUE: usize = 256;

/// What a session is allowed to do (from its token).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grants {
    pub publish: bool,
    pub subscribe: bool,
}

/// Requests from signaling sessions to the loop.
pub(crate) enum Command {
    Join {
        room: String,
        identity: String,
        name: Option<String>,
        grants: Grants,
        auto_subscribe: bool,
        resume: Option<String>,
        tx: mpsc::Sender<ServerMessage>,
        /// Notified to make the session close its signaling transport (admin hook).
        close: Arc<tokio::sync::Notify>,
        reply: oneshot::Sender<Result<(ParticipantId, u64), (ErrorCode, String)>>,
    },
    Message {
        participant: ParticipantId,
        msg: ClientMessage,
    },
    /// The node is shutting down.
    Shutdown,
    /// Close a participant's signaling transport (admin hook); the participant stays
    /// for the resume grace like after any drop. Replies whether it had one open.
    CloseSignaling {
        participant: ParticipantId,
        reply: oneshot::Sender<bool>,
    },
    /// The session's transport closed; `generation` tells stale detaches apart.
    Detach {
        participant: ParticipantId,
        generation: u64,
    },
    /// This node now hosts `room`, whose log says `state`: its participants wait
    /// (for the resume grace) to come back with their resume tokens.
    Restore { room: String, state: RoomState },
    /// Another node hosts `room` now: tell its clients to move (to `url` if known) and
    /// forget it without recording anything.
    RoomLost {
        room: String,
        url: Option<String>,
        reason: String,
    },
    /// How many sessions the node holds.
    Count { reply: oneshot::Sender<usize> },
}

/// What the room's log says a participant had, before it came back to this node.
#[derive(Default)]
struct Logged {
    /// Its tracks recorded as published (it may re-publish them under these ids).
    tracks: HashSet<String>,
    /// Its recorded subscriptions, with preferred layers, restored as tracks reappear.
    subscriptions: BTreeMap<String, Option<String>>,
}

struct Session {
    room: String,
    identity: String,
    name: Option<String>,
    grants: Grants,
    /// The resume token (empty for a restored session until it resumes).
    resume: String,
    /// SHA-256 (hex) of the resume token, as recorded in the log.
    resume_hash: String,
    tx: Option<mpsc::Sender<ServerMessage>>,
    /// Wakes the attached signaling session to close its transport.
    close: Arc<tokio::sync::Notify>,
    generation: u64,
    detached_at: Option<Instant>,
    /// Restored from the log and not resumed yet: no media connections exist.
    dormant: bool,
    /// Resumed as restored, but no media connection came up since: a client that
    /// resumes again (it never saw `joined`) is told `restored` again.
    restored_pending: bool,
    /// State taken from the log: re-creating it records nothing new.
    logged: Logged,
}

pub(crate) struct MediaLoop {
    sfu: Sfu,
    socket: Arc<UdpSocket>,
    sessions: HashMap<ParticipantId, Session>,
    resume_index: HashMap<String, ParticipantId>,
    metrics: Metrics,
    grace: Duration,
    next_generation: u64,
    /// Datagrams the socket refused for now (send buffer full).
    blocked: VecDeque<meridian_media::Transmit>,
    /// Messages and room events leaving the node, in order (see `outbox`).
    outbox: mpsc::UnboundedSender<Outbound>,
    /// Set while core events are being handled, so handling one does not recurse.
    draining: bool,
    /// A room being forgotten (lost to another node): its events are not recorded.
    forgetting: Option<String>,
}

impl MediaLoop {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        candidate: SocketAddr,
        metrics: Metrics,
        grace: Duration,
        outbox: mpsc::UnboundedSender<Outbound>,
    ) -> MediaLoop {
        let mut config = SfuConfig::new(candidate);
        // Ids must stay unique within a room's log across nodes and restarts: each
        // process starts at a random multiple of 2^20.
        config.first_id = (u64::from(rand::random::<u32>()) << 20) | 1;
        MediaLoop {
            sfu: Sfu::new(config, Instant::now()),
            socket,
            sessions: HashMap::new(),
            resume_index: HashMap::new(),
            metrics,
            grace,
            next_generation: 1,
            blocked: VecDeque::new(),
            outbox,
            draining: false,
            forgetting: None,
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        loop {
            let deadline = tokio::time::Instant::from_std(self.sfu.poll_timeout());
            tokio::select! {
                biased;
                ready = self.socket.readable() => {
                    if let Err(e) = ready {
                        warn!("media socket failed: {e}");
                        return;
                    }
                    self.receive_batch(&mut buf);
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd.filter(|c| !matches!(c, Command::Shutdown)) else {
                        info!("media loop stopping");
                        return;
                    };
                    self.handle_command(cmd);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.sfu.handle_timeout(Instant::now());
                }
                _ = housekeeping.tick() => {
                    self.housekeeping(Instant::now());
                }
            }
            self.flush().await;
        }
    }

    fn receive_batch(&mut self, buf: &mut [u8]) {
        for _ in 0..RECV_BATCH {
            match self.socket.try_recv_from(buf) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    let forwarded = self.sfu.stats().rtp_packets_forwarded;
                    self.sfu.handle_datagram(now, source, &buf[..n]);
                    // Send what this datagram caused at once: a packet waits for no other.
                    self.send_ready();
                    if self.sfu.stats().rtp_packets_forwarded > forwarded {
                        self.metrics
                            .forward_latency
                            .observe(now.elapsed().as_secs_f64());
                    }
                    if now >= self.sfu.poll_timeout() {
                        self.sfu.handle_timeout(now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // ICMP errors for earlier sends surface here on Linux: ignore.
                Err(e) => debug!("media recv: {e}"),
            }
        }
    }

    /// Sends the core's datagrams without waiting; what the socket cannot take now
    /// waits in `blocked` for [`MediaLoop::flush`].
    fn send_ready(&mut self) {
        while self.blocked.is_empty() {
            let Some(t) = self.sfu.poll_transmit() else {
                return;
            };
            match self.socket.try_send_to(&t.contents, t.destination) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.blocked.push_back(t),
                Err(e) => debug!("media send to {}: {e}", t.destination),
            }
        }
    }

    /// Sends queued datagrams and delivers core events to sessions.
    async fn flush(&mut self) {
        while let Some(t) = self.blocked.pop_front() {
            if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                debug!("media send: {e}");
            }
        }
        self.send_ready();
        while let Some(t) = self.sfu.poll_transmit() {
            if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                debug!("media send: {e}");
            }
        }
        self.drain_sfu_events();
    }

    fn housekeeping(&mut self, now: Instant) {
        let expired: Vec<ParticipantId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.detached_at.is_some_and(|at| now - at >= self.grace))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            info!(participant = %id, "resume grace over; removing participant");
            self.remove(id, now, LeaveReason::Timeout);
        }
        let stats = self.sfu.stats().clone();
        self.metrics.observe(
            &stats,
            self.sfu.participant_count(),
            self.sfu.room_count(),
            self.sfu.outbound_video_tracks(),
        );
    }

    /// Handles the core's pending events (each records its room event first).
    fn drain_sfu_events(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        while let Some(event) = self.sfu.poll_event() {
            self.handle_sfu_event(event);
        }
        self.draining = false;
    }

    /// Queues room events for the log; messages queued later wait until they are stored.
    fn record(&mut self, room: &str, actor: &str, events: Vec<Event>) {
        if room.is_empty() || self.forgetting.as_deref() == Some(room) {
            return;
        }
        let stream = meridian_events::room_stream(room);
        let events = events
            .into_iter()
            .map(|e| NewEvent::new(actor, e))
            .collect();
        let _ = self.outbox.send(Outbound::Append { stream, events });
    }

    fn identity_of(&self, id: ParticipantId) -> String {
        self.sessions
            .get(&id)
            .map_or_else(|| id.to_string(), |s| s.identity.clone())
    }

    fn send(&mut self, id: ParticipantId, msg: ServerMessage) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(tx) = &s.tx else {
            return;
        };
        if let ServerMessage::Error { code, .. } = &msg {
            self.metrics
                .signaling_errors
                .get_or_create(&crate::metrics::CodeLabel {
                    code: code.as_str(),
                })
                .inc();
        }
        if tx.is_closed() {
            s.tx = None;
            s.detached_at.get_or_insert(Instant::now());
            return;
        }
        let _ = self.outbox.send(Outbound::Deliver {
            tx: tx.clone(),
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

    /// Drops a participant's session, resume index entry and media state; records
    /// nothing by itself (the core's events are handled as usual).
    fn drop_session(&mut self, id: ParticipantId, now: Instant) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        self.resume_index.remove(&s.resume_hash);
        self.sfu.remove_participant(now, id);
        self.drain_sfu_events();
        Some(s)
    }

    /// Removes a participant, records why, and tells its room; returns its session.
    fn remove(&mut self, id: ParticipantId, now: Instant, reason: LeaveReason) -> Option<Session> {
        let s = self.drop_session(id, now)?;
        let mut events = vec![Event::ParticipantLeft {
            participant_id: id.to_string(),
            reason,
        }];
        if !self.sessions.values().any(|o| o.room == s.room) {
            events.push(Event::RoomClosed);
        }
        self.record(&s.room, &s.identity, events);
        self.broadcast(
            &s.room,
            Some(id),
            ServerMessage::ParticipantLeft {
                participant_id: id.to_string(),
            },
        );
        Some(s)
    }

    fn handle_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Join {
                room,
                identity,
                name,
                grants,
                auto_subscribe,
                resume,
                tx,
                close,
                reply,
            } => {
                let generation = self.next_generation;
                self.next_generation += 1;
                if let Some(token) = resume {
                    let found = self
                        .resume_index
                        .get(&sha256_hex(&token))
                        .copied()
                        .filter(|id| {
                            self.sessions
                                .get(id)
                                .is_some_and(|s| s.identity == identity && s.room == room)
                        });
                    let Some(id) = found else {
                        let _ = reply.send(Err((
                            ErrorCode::ResumeFailed,
                            "unknown or expired resume token".into(),
                        )));
                        return;
                    };
                    // Restored here but the client never connected its media (it gave up
                    // waiting for `joined`): start its media over, as restored again.
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
                        self.drain_sfu_events();
                        self.forgetting = None;
                    }
                    let s = self.sessions.get_mut(&id).expect("found above");
                    s.tx = Some(tx);
                    s.close = close;
                    s.generation = generation;
                    s.detached_at = None;
                    s.resume = token;
                    let restored = std::mem::take(&mut s.dormant);
                    s.restored_pending = restored;
                    if restored {
                        // Rebuilt from the log on this node: new media connections.
                        s.grants = grants;
                        let subscribe = auto_subscribe && grants.subscribe;
                        if let Err(e) = self
                            .sfu
                            .restore_participant(now, id, &room, &identity, subscribe)
                        {
                            let _ = reply.send(Err((ErrorCode::Internal, e.to_string())));
                            return;
                        }
                        self.metrics.participants_restored.inc();
                    }
                    info!(participant = %id, restored, "session resumed");
                    let _ = reply.send(Ok((id, generation)));
                    self.send_joined(id, restored);
                    if restored {
                        self.resubscribe(now, id, None);
                        if let Some(info) = self.participant_info(id) {
                            self.broadcast(
                                &room,
                                Some(id),
                                ServerMessage::ParticipantJoined { participant: info },
                            );
                        }
                    }
                    return;
                }
                let new_room = !self.sessions.values().any(|s| s.room == room);
                let id = self.sfu.add_participant(
                    now,
                    &room,
                    &identity,
                    auto_subscribe && grants.subscribe,
                );
                let resume = random_token();
                let resume_hash = sha256_hex(&resume);
                self.resume_index.insert(resume_hash.clone(), id);
                self.sessions.insert(
                    id,
                    Session {
                        room: room.clone(),
                        identity,
                        name,
                        grants,
                        resume,
                        resume_hash: resume_hash.clone(),
                        tx: Some(tx),
                        close,
                        generation,
                        detached_at: None,
                        dormant: false,
                        restored_pending: false,
                        logged: Logged::default(),
                    },
                );
                self.metrics.joins.inc();
                let mut events = Vec::new();
                if new_room {
                    events.push(Event::RoomOpened);
                }
                let (identity, name) = {
                    let s = &self.sessions[&id];
                    (s.identity.clone(), s.name.clone().unwrap_or_default())
                };
                events.push(Event::ParticipantJoined {
                    participant_id: id.to_string(),
                    identity: identity.clone(),
                    name,
                    resume_hash: Some(resume_hash),
                });
                self.record(&room, &identity, events);
                let _ = reply.send(Ok((id, generation)));
                self.send_joined(id, false);
                if let Some(info) = self.participant_info(id) {
                    self.broadcast(
                        &room,
                        Some(id),
                        ServerMessage::ParticipantJoined { participant: info },
                    );
                }
            }
            Command::Shutdown => {}
            Command::Restore { room, state } => self.restore(now, &room, state),
            Command::RoomLost { room, url, reason } => {
                self.forgetting = Some(room.clone());
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
                    if let Some(tx) = s.tx {
                        let msg = ServerMessage::Migrate {
                            url: url.clone(),
                            reason: reason.clone(),
                        };
                        let _ = self.outbox.send(Outbound::Deliver { tx, msg });
                    }
                }
                self.forgetting = None;
            }
            Command::Count { reply } => {
                let _ = reply.send(self.sessions.len());
            }
            Command::CloseSignaling { participant, reply } => {
                let open = match self.sessions.get(&participant) {
                    Some(s) if s.tx.is_some() => {
                        info!(%participant, "closing signaling on request");
                        s.close.notify_one();
                        true
                    }
                    _ => false,
                };
                let _ = reply.send(open);
            }
            Command::Detach {
                participant,
                generation,
            } => {
                if let Some(s) = self.sessions.get_mut(&participant)
                    && s.generation == generation
                {
                    debug!(%participant, "signaling detached; grace period starts");
                    s.tx = None;
                    s.detached_at = Some(now);
                }
            }
            Command::Message { participant, msg } => {
                if let Err((code, message)) = self.handle_message(now, participant, msg) {
                    self.send(participant, ServerMessage::error(code, message));
                }
            }
        }
    }

    /// Creates a waiting session for every participant of a room taken over from the
    /// log; each comes back with its resume token within the grace period or is
    /// recorded as timed out.
    fn restore(&mut self, now: Instant, room: &str, state: RoomState) {
        let mut restored = 0;
        for (pid, p) in state.participants {
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
                .filter(|(_, t)| t.participant_id == pid)
                .map(|(t, _)| t.clone())
                .collect();
            let resume_hash = p.resume_hash.unwrap_or_default();
            if !resume_hash.is_empty() {
                self.resume_index.insert(resume_hash.clone(), id);
            }
            self.sessions.insert(
                id,
                Session {
                    room: room.to_string(),
                    identity: p.identity,
                    name: (!p.name.is_empty()).then_some(p.name),
                    grants: Grants {
                        publish: false,
                        subscribe: false,
                    },
                    resume: String::new(),
                    resume_hash,
                    close: Arc::default(),
                    tx: None,
                    generation: 0,
                    detached_at: Some(now),
                    dormant: true,
                    restored_pending: false,
                    logged: Logged {
                        tracks,
                        subscriptions: p.subscriptions,
                    },
                },
            );
            restored += 1;
        }
        info!(%room, participants = restored, epoch = state.epoch, "room restored from the log");
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
            if let Some(layer) =
                layer.and_then(|l| serde_json::from_value(serde_json::Value::String(l)).ok())
            {
                let _ = self.sfu.set_max_layer(now, id, t, layer);
            }
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
            .collect();
        self.send(
            id,
            ServerMessage::Joined {
                participant_id: id.to_string(),
                room,
                participants,
                resume,
                resume_grace_secs: self.grace.as_secs(),
                version: meridian_protocol::PROTOCOL_VERSION,
                restored,
            },
        );
    }

    fn handle_message(
        &mut self,
        now: Instant,
        id: ParticipantId,
        msg: ClientMessage,
    ) -> Result<(), (ErrorCode, String)> {
        let grants = self
            .sessions
            .get(&id)
            .map(|s| s.grants)
            .ok_or((ErrorCode::NotJoined, "session is gone".to_string()))?;
        let track = |s: &str| {
            s.parse::<TrackId>()
                .map_err(|_| (ErrorCode::NotFound, format!("no track {s}")))
        };
        match msg {
            ClientMessage::Join { .. } => {
                return Err((ErrorCode::NotJoined, "already joined".into()));
            }
            ClientMessage::Offer { sdp, mut tracks } => {
                if !grants.publish {
                    return Err((ErrorCode::Forbidden, "token lacks the publish grant".into()));
                }
                // Earlier track ids are honoured only for this participant's own
                // logged tracks.
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
                    .map_err(media_error)?;
                // The publications are recorded (and announced) before the answer
                // acknowledges them.
                self.drain_sfu_events();
                self.send(id, ServerMessage::Answer { sdp, tracks });
            }
            ClientMessage::Answer { sdp } => {
                self.sfu
                    .handle_subscriber_answer(now, id, &sdp)
                    .map_err(media_error)?;
            }
            ClientMessage::Subscribe { track_ids } => {
                if !grants.subscribe {
                    return Err((
                        ErrorCode::Forbidden,
                        "token lacks the subscribe grant".into(),
                    ));
                }
                for t in track_ids {
                    self.sfu
                        .subscribe(now, id, track(&t)?)
                        .map_err(media_error)?;
                }
            }
            ClientMessage::Unsubscribe { track_ids } => {
                for t in track_ids {
                    self.sfu
                        .unsubscribe(now, id, track(&t)?)
                        .map_err(media_error)?;
                    let (room, actor) = self.room_and_identity(id);
                    self.record(
                        &room,
                        &actor,
                        vec![Event::Unsubscribed {
                            participant_id: id.to_string(),
                            track_id: t,
                        }],
                    );
                }
            }
            ClientMessage::SetLayer {
                track_id,
                max_layer,
            } => {
                self.sfu
                    .set_max_layer(now, id, track(&track_id)?, max_layer)
                    .map_err(media_error)?;
                let (room, actor) = self.room_and_identity(id);
                let layer = serde_json::to_value(max_layer)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                self.record(
                    &room,
                    &actor,
                    vec![Event::PreferredLayerSet {
                        participant_id: id.to_string(),
                        track_id,
                        layer,
                    }],
                );
            }
            ClientMessage::Mute { track_id, muted } => {
                self.sfu
                    .set_muted(now, id, track(&track_id)?, muted)
                    .map_err(media_error)?;
            }
            ClientMessage::Unpublish { track_id } => {
                self.sfu
                    .unpublish(now, id, track(&track_id)?)
                    .map_err(media_error)?;
            }
            // Answered by the signaling session itself.
            ClientMessage::Ping { .. } => {}
            ClientMessage::Leave => {
                if let Some(Session { tx: Some(tx), .. }) = self.remove(id, now, LeaveReason::Left)
                {
                    let msg = ServerMessage::Left {
                        reason: "left".into(),
                    };
                    let _ = self.outbox.send(Outbound::Deliver { tx, msg });
                }
            }
        }
        Ok(())
    }

    fn handle_sfu_event(&mut self, event: SfuEvent) {
        match event {
            SfuEvent::TrackPublished { room, track } => {
                let owner: Option<ParticipantId> = track.participant_id.parse().ok();
                let actor = owner.map(|o| self.identity_of(o)).unwrap_or_default();
                let now = Instant::now();
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
                let republished = owner
                    .and_then(|o| self.sessions.get_mut(&o))
                    .is_some_and(|s| s.logged.tracks.remove(&track.track_id));
                if republished {
                    self.broadcast(&room, owner, ServerMessage::TrackPublished { track });
                    return;
                }
                let kind = match track.kind {
                    TrackKind::Audio => meridian_events::TrackKind::Audio,
                    TrackKind::Video => meridian_events::TrackKind::Video,
                };
                let codec = match track.kind {
                    TrackKind::Audio => "opus",
                    TrackKind::Video => "video",
                };
                self.record(
                    &room,
                    &actor,
                    vec![Event::TrackPublished {
                        track_id: track.track_id.clone(),
                        participant_id: track.participant_id.clone(),
                        kind,
                        layers: track.layers.iter().map(|l| l.rid().to_string()).collect(),
                        codec: codec.into(),
                    }],
                );
                self.broadcast(&room, owner, ServerMessage::TrackPublished { track });
            }
            SfuEvent::TrackUnpublished {
                room,
                track_id,
                participant,
            } => {
                let actor = self.identity_of(participant);
                self.record(
                    &room,
                    &actor,
                    vec![Event::TrackUnpublished {
                        track_id: track_id.to_string(),
                        participant_id: participant.to_string(),
                    }],
                );
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
                let event = if muted {
                    Event::TrackMuted { track_id: track }
                } else {
                    Event::TrackUnmuted { track_id: track }
                };
                // The actor is the track's publisher: the log refuses an empty actor
                // (and an outbox retrying a refused append holds back every later message).
                let actor = self
                    .sfu
                    .room_tracks(&room)
                    .into_iter()
                    .find(|t| t.track_id == track_id.to_string())
                    .and_then(|t| t.participant_id.parse::<ParticipantId>().ok())
                    .map(|p| self.identity_of(p))
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| "node".to_string());
                self.record(&room, &actor, vec![event]);
                self.broadcast(
                    &room,
                    None,
                    ServerMessage::TrackMuted {
                        track_id: track_id.to_string(),
                        muted,
                    },
                )
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
                if let Some(s) = self.sessions.get_mut(&participant)
                    && s.tx.is_none()
                {
                    s.detached_at.get_or_insert(Instant::now());
                }
            }
            SfuEvent::Subscribed {
                participant,
                track_id,
            } => {
                let logged = self.sessions.get_mut(&participant).is_some_and(|s| {
                    s.logged
                        .subscriptions
                        .remove(&track_id.to_string())
                        .is_some()
                });
                if logged {
                    return;
                }
                let (room, actor) = self.room_and_identity(participant);
                self.record(
                    &room,
                    &actor,
                    vec![Event::Subscribed {
                        participant_id: participant.to_string(),
                        track_id: track_id.to_string(),
                    }],
                );
            }
            SfuEvent::Connected { participant, .. } => {
                if let Some(s) = self.sessions.get_mut(&participant) {
                    s.restored_pending = false;
                }
            }
        }
    }
}

impl MediaLoop {
    fn room_and_identity(&self, id: ParticipantId) -> (String, String) {
        self.sessions
            .get(&id)
            .map(|s| (s.room.clone(), s.identity.clone()))
            .unwrap_or_default()
    }
}

fn media_error(e: MediaError) -> (ErrorCode, String) {
    let code = match &e {
        MediaError::UnknownParticipant(_) => ErrorCode::NotJoined,
        MediaError::UnknownTrack(_) => ErrorCode::NotFound,
        MediaError::InvalidSdp(_) | MediaError::NoPendingOffer => ErrorCode::InvalidSdp,
        MediaError::Limit(_) => ErrorCode::CapacityExceeded,
        MediaError::NotAllowed(_) => ErrorCode::Forbidden,
    };
    (code, e.to_string())
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
