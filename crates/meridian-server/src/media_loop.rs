//! The media loop: the I/O driver of the room controller. One runs per media worker
//! (`crate::workers`); each moves time, datagrams and commands into its Sans-IO
//! [`Controller`], then sends its datagrams on its own descriptor of the media socket
//! and hands its log appends and client messages to the outbox. Worker 0 also reads
//! the socket and hands other workers their datagrams. Every rule about sessions,
//! rooms and the log lives in `meridian_room`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_protocol::{ErrorCode, ServerMessage};
use meridian_room::{Controller, ControllerConfig, ControllerStats, Output, Refusal};
use meridian_store::NewEvent;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::datapath::DataPath;
use crate::impair::Impairer;
use crate::mailbox::{Command, Outbound, OutboxTx, SessionSink};
use crate::metrics::Metrics;
use crate::overload::LoadMeter;
use crate::udp::MediaSocket;
use crate::workers::{Handoff, Inbox, WorkerRoutes};

/// Items the outbox may hold before new joins are refused (the log is far behind).
const OUTBOX_LIMIT: usize = 100_000;
/// Least time between two metric updates (taken only after something happened).
const OBSERVE_EVERY: Duration = Duration::from_millis(250);

/// Most rounds of already-due timeouts one wake-up handles before it sends
/// (`Controller::handle_due`: a burst of packets to one connection leaves in them).
const MAX_DUE_ROUNDS: usize = 64;

/// What woke a media loop.
enum Wake {
    Command(Option<Command>),
    Timer,
    Observe,
    Socket(std::io::Result<()>),
    Handed(Option<crate::workers::Batch>),
    Relay(std::io::Result<()>),
}

/// Where a worker's datagrams come from.
pub(crate) enum Intake {
    /// It reads the media socket (worker 0), handing other workers theirs.
    Socket(Box<Handoff>),
    /// The receiving worker hands them over.
    Handoff(Inbox),
}

pub(crate) struct MediaLoop {
    controller: Controller<SessionSink>,
    path: DataPath,
    metrics: Metrics,
    outbox: OutboxTx,
    /// Controller counters already added to the metrics.
    counted: ControllerStats,
    /// The relay socket and what the relay driver must carry to other nodes.
    relay: Option<crate::relay::RelayIo>,
    /// This worker's routes (which rooms and participants it holds, its load).
    routes: WorkerRoutes,
    /// Where its datagrams come from.
    intake: Option<Intake>,
    /// Time spent handling wake-ups since the last metric update.
    busy: Duration,
    /// Whether this worker is past its capacity (it then refuses fresh joins).
    meter: LoadMeter,
    /// The meter's verdict as last reported to the routes.
    reported_overloaded: bool,
}

impl MediaLoop {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        config: ControllerConfig,
        metrics: Metrics,
        outbox: OutboxTx,
        routes: WorkerRoutes,
        intake: Intake,
    ) -> MediaLoop {
        let socket = match &intake {
            Intake::Socket(_) => MediaSocket::new(socket),
            Intake::Handoff(_) => MediaSocket::send_only(socket),
        };
        MediaLoop {
            routes,
            intake: Some(intake),
            busy: Duration::ZERO,
            meter: LoadMeter::new(Instant::now(), 0.0),
            reported_overloaded: false,
            controller: Controller::new(config, Instant::now()),
            path: DataPath::new(socket.expect("a bound UDP socket takes its options")),
            metrics,
            outbox,
            counted: ControllerStats::default(),
            relay: None,
        }
    }

    /// Passes the socket's datagrams through `impair` (`--impair`, dev mode).
    pub(crate) fn impaired(mut self, impair: Impairer) -> MediaLoop {
        self.path.set_impairment(impair);
        self
    }

    /// Refuses fresh joins while the worker's busy share is past `threshold`
    /// (`[media] overload_busy_share`; 0: never).
    pub(crate) fn refusing_when_busy(mut self, threshold: f64) -> MediaLoop {
        self.meter = LoadMeter::new(Instant::now(), threshold);
        self
    }

    /// Adds the relay socket (inbound relay links) and the relay driver's queue.
    pub(crate) fn with_relay(mut self, relay: crate::relay::RelayIo) -> MediaLoop {
        self.relay = Some(relay);
        self
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let (mut handoff, mut inbox) = match self.intake.take() {
            Some(Intake::Socket(h)) => (Some(*h), None),
            Some(Intake::Handoff(i)) => (None, Some(i)),
            None => (None, None),
        };
        // Metrics are updated at most every `OBSERVE_EVERY`, and only after something
        // happened: an idle worker does not wake up.
        let mut observe_at: Option<tokio::time::Instant> = None;
        self.observe();
        loop {
            let next = self.controller.poll_timeout();
            let next = self.path.poll_timeout().map_or(next, |i| i.min(next));
            let deadline = tokio::time::Instant::from_std(next);
            let overdue = next <= Instant::now();
            let wake = tokio::select! {
                biased;
                cmd = commands.recv() => Wake::Command(cmd),
                // Before the timer: at saturation the controller's timer is due on every
                // turn, and the metrics must still move.
                _ = sleep_until_some(observe_at) => Wake::Observe,
                _ = tokio::time::sleep_until(deadline) => Wake::Timer,
                // Last: a socket that is always readable (saturation) must not starve
                // commands (joins timed out at 474 subscribers) or the metrics tick.
                ready = self.path.readable(), if handoff.is_some() => Wake::Socket(ready),
                batch = recv_some(&mut inbox) => Wake::Handed(batch),
                ready = crate::relay::readable(&self.relay) => Wake::Relay(ready),
            };
            let woke = Instant::now();
            self.meter.idle_until(woke);
            match wake {
                Wake::Command(cmd) => {
                    let Some(cmd) = cmd.filter(|c| !matches!(c, Command::Shutdown)) else {
                        info!("media loop stopping");
                        return;
                    };
                    self.handle_command(cmd);
                }
                // The controller's due timeouts are handled by `flush`. A timer that was
                // due before the wait (saturation: due on every turn) reads the socket
                // too, else it would starve and the kernel drop what waits there.
                Wake::Timer => {
                    self.path.release_impaired(&mut self.controller, woke);
                    if overdue && handoff.is_some() {
                        self.receive(handoff.as_mut());
                    }
                }
                Wake::Observe => {
                    self.report_overload();
                    self.observe();
                    // An overloaded worker that went quiet must still see its load fall.
                    observe_at = self
                        .meter
                        .overloaded()
                        .then(|| tokio::time::Instant::now() + OBSERVE_EVERY);
                    continue;
                }
                Wake::Socket(ready) => {
                    if let Err(e) = ready {
                        warn!("media socket failed: {e}");
                        return;
                    }
                    self.receive(handoff.as_mut());
                }
                Wake::Handed(batch) => {
                    let Some(batch) = batch else {
                        info!("media loop stopping: the receiving worker is gone");
                        return;
                    };
                    self.path
                        .receive_handed(&mut self.controller, &self.metrics, batch);
                }
                Wake::Relay(ready) => {
                    if let Some(relay) = &mut self.relay {
                        if let Err(e) = ready {
                            warn!("relay socket failed: {e}");
                            self.relay = None;
                        } else {
                            relay.receive(&mut self.controller);
                        }
                    }
                }
            }
            self.flush().await;
            let done = Instant::now();
            self.busy += done - woke;
            self.meter.busy_until(done);
            self.report_overload();
            if observe_at.is_none() {
                observe_at = Some(tokio::time::Instant::now() + OBSERVE_EVERY);
            }
        }
    }

    /// Reads a batch from the media socket, then the relay socket: behind the
    /// always-busy media socket of a loaded node, the relay's own branch would rarely
    /// get a turn (relayed packets waited hundreds of ms).
    fn receive(&mut self, handoff: Option<&mut Handoff>) {
        let me = self.routes.index;
        self.path
            .receive_batch(&mut self.controller, &self.metrics, handoff, me);
        if let Some(relay) = &mut self.relay {
            relay.receive(&mut self.controller);
        }
    }

    /// Sends queued datagrams and hands the controller's outputs to the outbox.
    async fn flush(&mut self) {
        self.controller.handle_due(MAX_DUE_ROUNDS, Instant::now);
        self.path.send_all(&mut self.controller).await;
        if let Some(relay) = &mut self.relay {
            relay.send(&mut self.controller).await;
        }
        while let Some(output) = self.controller.poll_output() {
            let item = match output {
                Output::Relay(out) => {
                    if let Some(relay) = &self.relay {
                        relay.output(out);
                    }
                    continue;
                }
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

    /// Tells the routes (placement, readiness) when the meter's verdict changed.
    fn report_overload(&mut self) {
        let overloaded = self.meter.overloaded();
        if overloaded == self.reported_overloaded {
            return;
        }
        self.reported_overloaded = overloaded;
        self.routes.set_overloaded(overloaded);
        let level = self.meter.level();
        if overloaded {
            warn!(
                worker = self.routes.index,
                level, "media worker overloaded: refusing fresh joins"
            );
        } else {
            info!(
                worker = self.routes.index,
                level, "media worker no longer overloaded"
            );
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
        self.metrics
            .media_panics
            .inc_by(stats.panics_contained - self.counted.panics_contained);
        self.counted = stats;
        self.metrics
            .outbox_queue
            .set(i64::try_from(self.outbox.depth()).unwrap_or(i64::MAX));
        let sfu = self.controller.sfu();
        let worker = self.routes.index;
        if self.relay.is_some() {
            self.metrics
                .relay
                .observe(&sfu.relay_stats(), &sfu.room_sizes());
        }
        let label = crate::metrics::WorkerLabel {
            worker: worker.to_string(),
        };
        self.metrics
            .workers
            .busy_seconds
            .get_or_create(&label)
            .inc_by(std::mem::take(&mut self.busy).as_secs_f64());
        self.metrics
            .workers
            .load
            .get_or_create(&label)
            .set(self.meter.level());
        self.metrics
            .workers
            .overloaded
            .get_or_create(&label)
            .set(i64::from(self.meter.overloaded()));
        let controller = &self.controller;
        self.routes.refresh(
            sfu.participant_count(),
            |room| controller.room_state(room).is_some(),
            |p| controller.has_session(p),
        );
        self.metrics.observe(
            worker,
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
                let room = request.room.clone();
                let result = if self.outbox.depth() > OUTBOX_LIMIT {
                    Err(Refusal {
                        code: ErrorCode::Unavailable,
                        message: "the node's event log is behind; try again shortly".into(),
                    })
                } else if request.resume.is_none() && self.meter.overloaded() {
                    self.metrics
                        .workers
                        .joins_refused
                        .get_or_create(&crate::metrics::WorkerLabel {
                            worker: self.routes.index.to_string(),
                        })
                        .inc();
                    Err(Refusal {
                        code: ErrorCode::Unavailable,
                        message: format!(
                            "the node's media worker is overloaded (busy {:.0} % of the time); \
                             try again shortly or another node",
                            self.meter.level() * 100.0
                        ),
                    })
                } else {
                    self.controller.handle_join(now, request)
                };
                self.routes
                    .handled(&room, result.as_ref().ok().map(|j| j.participant));
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
            Command::Restore { room, state } => {
                self.controller.handle_restore(now, &room, state);
                self.routes.handled(&room, None);
            }
            Command::RoomLost { room, url, reason } => {
                self.controller.handle_room_lost(now, &room, url, &reason)
            }
            Command::Count { reply } => {
                let _ = reply.send(self.controller.session_count());
            }
            Command::CutMedia {
                participant,
                duration,
                reply,
            } => {
                let _ = reply.send(self.controller.cut_media(now, participant, duration));
            }
            Command::Stall {
                duration, reply, ..
            } => {
                std::thread::sleep(duration);
                let _ = reply.send(true);
            }
            Command::Relay { op, reply } => {
                let _ = reply.send(op.apply(&mut self.controller, now));
            }
        }
    }
}

/// Waits until `at`, forever when `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next handed-over batch, never when this worker reads the socket itself.
async fn recv_some(inbox: &mut Option<Inbox>) -> Option<crate::workers::Batch> {
    match inbox {
        Some(i) => i.recv().await,
        None => std::future::pending().await,
    }
}
