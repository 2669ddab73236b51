//! The media loop: the I/O driver of the room controller. It owns the UDP socket and
//! moves time, datagrams and commands into the Sans-IO [`Controller`], then sends its
//! datagrams and hands its log appends and client messages to the outbox. Every rule
//! about sessions, rooms and the log lives in `meridian_room`.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_protocol::{ErrorCode, ServerMessage};
use meridian_room::{Controller, ControllerConfig, ControllerStats, Output, Refusal};
use meridian_store::NewEvent;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::mailbox::{Command, Outbound, OutboxTx, SessionSink};
use crate::metrics::Metrics;

/// Largest datagram read; anything longer is truncated and then refused by the core.
const MAX_DATAGRAM: usize = 2048;
/// Datagrams handled per wake-up before timers and commands get a turn.
const RECV_BATCH: usize = 256;
/// Items the outbox may hold before new joins are refused (the log is far behind).
const OUTBOX_LIMIT: usize = 100_000;

pub(crate) struct MediaLoop {
    controller: Controller<SessionSink>,
    socket: Arc<UdpSocket>,
    metrics: Metrics,
    /// Datagrams the socket refused for now (send buffer full).
    blocked: VecDeque<meridian_media::Transmit>,
    outbox: OutboxTx,
    /// Controller counters already added to the metrics.
    counted: ControllerStats,
}

impl MediaLoop {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        config: ControllerConfig,
        metrics: Metrics,
        outbox: OutboxTx,
    ) -> MediaLoop {
        MediaLoop {
            controller: Controller::new(config, Instant::now()),
            socket,
            metrics,
            blocked: VecDeque::new(),
            outbox,
            counted: ControllerStats::default(),
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        loop {
            let deadline = tokio::time::Instant::from_std(self.controller.poll_timeout());
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
                    self.controller.handle_timeout(Instant::now());
                }
                _ = housekeeping.tick() => self.observe(),
            }
            self.flush().await;
        }
    }

    fn receive_batch(&mut self, buf: &mut [u8]) {
        for _ in 0..RECV_BATCH {
            match self.socket.try_recv_from(buf) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    let forwarded = self.controller.sfu_stats().rtp_packets_forwarded;
                    self.controller.handle_datagram(now, source, &buf[..n]);
                    // Send what this datagram caused at once: a packet waits for no other.
                    self.send_ready();
                    if self.controller.sfu_stats().rtp_packets_forwarded > forwarded {
                        self.metrics
                            .forward_latency
                            .observe(now.elapsed().as_secs_f64());
                    }
                    if now >= self.controller.poll_timeout() {
                        self.controller.handle_timeout(now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // ICMP errors for earlier sends surface here on Linux: ignore.
                Err(e) => debug!("media recv: {e}"),
            }
        }
    }

    /// Sends the controller's datagrams without waiting; what the socket cannot take
    /// now waits in `blocked` for [`MediaLoop::flush`].
    fn send_ready(&mut self) {
        while self.blocked.is_empty() {
            let Some(t) = self.controller.poll_transmit() else {
                return;
            };
            match self.socket.try_send_to(&t.contents, t.destination) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.blocked.push_back(t),
                Err(e) => debug!("media send to {}: {e}", t.destination),
            }
        }
    }

    /// Sends queued datagrams and hands the controller's outputs to the outbox.
    async fn flush(&mut self) {
        while let Some(t) = self.blocked.pop_front() {
            if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                debug!("media send: {e}");
            }
        }
        self.send_ready();
        while let Some(t) = self.controller.poll_transmit() {
            if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                debug!("media send: {e}");
            }
        }
        while let Some(output) = self.controller.poll_output() {
            let item = match output {
                Output::Append {
                    room,
                    epoch,
                    actor,
                    events,
                } => Outbound::Append {
                    stream: meridian_events::room_stream(&room),
                    epoch,
                    events: events
                        .into_iter()
                        .map(|e| NewEvent::new(actor.as_str(), e))
                        .collect(),
                },
                Output::Deliver { room, to, msg } => {
                    if let ServerMessage::Error { code, .. } = &msg {
                        self.metrics
                            .signaling_errors
                            .get_or_create(&crate::metrics::CodeLabel {
                                code: code.as_str(),
                            })
                            .inc();
                    }
                    Outbound::Deliver {
                        stream: meridian_events::room_stream(&room),
                        to,
                        msg,
                    }
                }
                Output::Close { room, to } => Outbound::Close {
                    stream: meridian_events::room_stream(&room),
                    to,
                },
            };
            self.outbox.send(item);
        }
    }

    fn observe(&mut self) {
        let stats = self.controller.stats().clone();
        self.metrics.joins.inc_by(stats.joins - self.counted.joins);
        self.metrics
            .participants_restored
            .inc_by(stats.participants_restored - self.counted.participants_restored);
        self.metrics
            .sessions_replaced
            .inc_by(stats.sessions_replaced - self.counted.sessions_replaced);
        self.counted = stats;
        self.metrics
            .outbox_queue
            .set(i64::try_from(self.outbox.depth()).unwrap_or(i64::MAX));
        let sfu = self.controller.sfu();
        self.metrics.observe(
            sfu.stats(),
            sfu.participant_count(),
            sfu.room_count(),
            sfu.outbound_video_tracks(),
        );
    }

    fn handle_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Join { request, reply } => {
                let result = if self.outbox.depth() > OUTBOX_LIMIT {
                    Err(Refusal {
                        code: ErrorCode::Unavailable,
                        message: "the node's event log is behind; try again shortly".into(),
                    })
                } else {
                    self.controller.handle_join(now, request)
                };
                let _ = reply.send(result);
            }
            Command::Message { participant, msg } => {
                self.controller.handle_message(now, participant, msg)
            }
            Command::Shutdown => {}
            Command::CloseSignaling {
                participant,
                room,
                reply,
            } => {
                let _ = reply.send(
                    self.controller
                        .close_signaling(participant, room.as_deref()),
                );
            }
            Command::Remove {
                participant,
                room,
                reply,
            } => {
                let _ = reply.send(self.controller.handle_remove(
                    now,
                    participant,
                    room.as_deref(),
                ));
            }
            Command::Refresh {
                participant,
                expires_at,
            } => {
                let _ = self
                    .controller
                    .handle_refresh(participant, Some(expires_at));
            }
            Command::Detach {
                participant,
                generation,
            } => self.controller.handle_detach(now, participant, generation),
            Command::Restore { room, state } => self.controller.handle_restore(now, &room, state),
            Command::RoomLost { room, url, reason } => {
                self.controller.handle_room_lost(now, &room, url, &reason)
            }
            Command::Count { reply } => {
                let _ = reply.send(self.controller.session_count());
            }
        }
    }
}
