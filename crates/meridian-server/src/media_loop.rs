//! The media run loop: owns the Sans-IO [`Sfu`], the UDP socket and the room's
//! signaling sessions, and moves time, datagrams and commands between them.

use std::collections::{HashMap, VecDeque};
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
use meridian_events::{Event, LeaveReason};
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
}

struct Session {
    room: String,
    identity: String,
    name: Option<String>,
    grants: Grants,
    resume: String,
    tx: Option<mpsc::Sender<ServerMessage>>,
    /// Wakes the attached signaling session to close its transport.
    close: Arc<tokio::sync::Notify>,
    generation: u64,
    detached_at: Option<Instant>,
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
}

impl MediaLoop {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        candidate: SocketAddr,
        metrics: Metrics,
        grace: Duration,
        outbox: mpsc::UnboundedSender<Outbound>,
    ) -> MediaLoop {
        MediaLoop {
            sfu: Sfu::new(SfuConfig::new(candidate), Instant::now()),
            socket,
            sessions: HashMap::new(),
            resume_index: HashMap::new(),
            metrics,
            grace,
            next_generation: 1,
            blocked: VecDeque::new(),
            outbox,
            draining: false,
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
        if room.is_empty() {
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

    /// Removes a participant, records why, and tells its room; returns its session.
    fn remove(&mut self, id: ParticipantId, now: Instant, reason: LeaveReason) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        self.resume_index.remove(&s.resume);
        self.sfu.remove_participant(now, id);
        self.drain_sfu_events();
        let mut events = vec![Event::ParticipantLeft {
            participant_id: id.to_string(),
            reason,
        }];
        if self.sfu.room_participants(&s.room).is_empty() {
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
                    let found = self.resume_index.get(&token).copied().filter(|id| {
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
                    let s = self.sessions.get_mut(&id).expect("found above");
                    s.tx = Some(tx);
                    s.close = close;
                    s.generation = generation;
                    s.detached_at = None;
                    info!(participant = %id, "session resumed");
                    let _ = reply.send(Ok((id, generation)));
                    self.send_joined(id);
                    return;
                }
                let new_room = self.sfu.room_participants(&room).is_empty();
                let id = self.sfu.add_participant(
                    now,
                    &room,
                    &identity,
                    auto_subscribe && grants.subscribe,
                );
                let resume = random_token();
                self.resume_index.insert(resume.clone(), id);
                self.sessions.insert(
                    id,
                    Session {
                        room: room.clone(),
                        identity,
                        name,
                        grants,
                        resume,
                        tx: Some(tx),
                        close,
                        generation,
                        detached_at: None,
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
                });
                self.record(&room, &identity, events);
                let _ = reply.send(Ok((id, generation)));
                self.send_joined(id);
                if let Some(info) = self.participant_info(id) {
                    self.broadcast(
                        &room,
                        Some(id),
                        ServerMessage::ParticipantJoined { participant: info },
                    );
                }
            }
            Command::Shutdown => {}
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

    fn send_joined(&mut self, id: ParticipantId) {
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
            ClientMessage::Offer { sdp, tracks } => {
                if !grants.publish {
                    return Err((ErrorCode::Forbidden, "token lacks the publish grant".into()));
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
            ClientMessage::Ping { id: ping } => self.send(id, ServerMessage::Pong { id: ping }),
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
            SfuEvent::Connected { .. } => {}
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

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
