//! The messages between the node's tasks: signaling sessions, the media loop, the
//! outbox and the cluster. A leaf module: it imports none of them, so they depend on it
//! and not on each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meridian_events::RoomState;
use meridian_media::ParticipantId;
use meridian_protocol::{ErrorCode, ServerMessage};
use meridian_room::{Controller, JoinRequest, Joined, Refusal, RosterEntry};
use meridian_store::NewEvent;
use tokio::sync::{Notify, mpsc, oneshot};

pub(crate) use meridian_room::Grants;

/// Messages queued towards one client; a client that lets more pile up is too slow and
/// is disconnected.
pub(crate) const SESSION_QUEUE: usize = 256;

/// A message for one client, encoded, and whether the session ends after it.
#[derive(Debug)]
pub(crate) struct Queued {
    /// The encoded message.
    pub text: String,
    /// The transport closes once this message is written.
    pub last: bool,
}

/// Why a message could not be queued for a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The queue holds its most messages or bytes: the client does not keep up.
    Full,
    /// The session is gone.
    Closed,
}

/// The node's handle on one signaling connection.
#[derive(Clone, Debug)]
pub(crate) struct SessionSink {
    /// Messages for the client, written by the session's writer task.
    tx: mpsc::Sender<Queued>,
    /// Bytes queued and not yet taken by the writer.
    bytes: Arc<AtomicUsize>,
    /// Most bytes the queue may hold.
    max_bytes: usize,
    /// Wakes the session to close its transport.
    pub close: Arc<Notify>,
}

/// The writer's side of a session queue.
pub(crate) struct SessionQueue {
    rx: mpsc::Receiver<Queued>,
    bytes: Arc<AtomicUsize>,
}

/// A session queue bounded by `max_count` messages and `max_bytes` encoded bytes.
pub(crate) fn session_queue(max_count: usize, max_bytes: usize) -> (SessionSink, SessionQueue) {
    let (tx, rx) = mpsc::channel(max_count.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        SessionSink {
            tx,
            bytes: bytes.clone(),
            max_bytes,
            close: Arc::new(Notify::new()),
        },
        SessionQueue { rx, bytes },
    )
}

impl SessionSink {
    /// Queues a message without waiting. A message alone larger than the byte bound is
    /// still queued when the queue is empty, so no message is undeliverable by size.
    pub(crate) fn try_send(&self, msg: ServerMessage) -> Result<(), QueueError> {
        let last = matches!(
            msg,
            ServerMessage::Left { .. }
                | ServerMessage::Redirect { .. }
                | ServerMessage::Migrate { .. }
        ) || matches!(
            msg,
            ServerMessage::Error {
                code: ErrorCode::Unauthorized
                    | ErrorCode::Timeout
                    | ErrorCode::RateLimited
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::ResumeFailed
                    | ErrorCode::Unavailable,
                ..
            }
        );
        let text = msg.encode();
        let len = text.len();
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(QueueError::Full);
        }
        match self.tx.try_send(Queued { text, last }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.bytes.fetch_sub(len, Ordering::AcqRel);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => QueueError::Full,
                    mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
                })
            }
        }
    }

    /// Bytes queued and not yet taken by the writer.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl SessionQueue {
    /// The next message for the client; `None` once every sink is gone.
    pub(crate) async fn recv(&mut self) -> Option<Queued> {
        let q = self.rx.recv().await?;
        self.bytes.fetch_sub(q.text.len(), Ordering::AcqRel);
        Some(q)
    }
}

/// Requests to the media loop.
pub(crate) enum Command {
    /// A client with a verified token enters its room (placed on this node).
    Join {
        request: JoinRequest<SessionSink>,
        reply: oneshot::Sender<Result<Joined, Refusal>>,
    },
    /// A message from a joined client.
    Message {
        participant: ParticipantId,
        msg: meridian_protocol::ClientMessage,
    },
    /// The node is shutting down.
    Shutdown,
    /// Close a participant's signaling transport (admin hook); replies whether it had
    /// one open. `room`: the admin token's room, `None` for every room.
    CloseSignaling {
        participant: ParticipantId,
        room: Option<String>,
        reply: oneshot::Sender<bool>,
    },
    /// Remove a participant for good (admin); replies whether it was removed. `room`:
    /// the admin token's room, `None` for every room.
    Remove {
        participant: ParticipantId,
        room: Option<String>,
        reply: oneshot::Sender<bool>,
    },
    /// A joined client presented a newer token, valid until `expires_at`.
    Refresh {
        participant: ParticipantId,
        expires_at: std::time::Instant,
    },
    /// The session's transport closed; `generation` tells stale detaches apart.
    Detach {
        participant: ParticipantId,
        generation: u64,
    },
    /// This node now hosts `room`, whose log says `state`.
    Restore { room: String, state: RoomState },
    /// Another node hosts `room` now: move its clients (to `url` if known), forget it.
    RoomLost {
        room: String,
        url: Option<String>,
        reason: String,
    },
    /// How many sessions the node holds.
    Count { reply: oneshot::Sender<usize> },
    /// Dev mode: cut a participant's media path for `duration` (`POST /dev/cut-media`);
    /// replies whether the participant is on this node.
    CutMedia {
        participant: ParticipantId,
        duration: std::time::Duration,
        reply: oneshot::Sender<bool>,
    },
    /// Dev mode: keep media worker `worker` busy for `duration`, as a worker past its
    /// capacity is (`POST /dev/stall-worker`); replies once it is done, `false` for a
    /// worker that does not exist.
    Stall {
        worker: usize,
        duration: std::time::Duration,
        reply: oneshot::Sender<bool>,
    },
    /// A relay-control operation on the media core (from `relay.rs`).
    Relay {
        op: RelayOp,
        reply: oneshot::Sender<Result<RelayReply, String>>,
    },
}

/// Relay operations the media loop runs on the core (see `meridian_media::relay`).
#[derive(Debug)]
pub(crate) enum RelayOp {
    /// Upstream: relay the local tracks of each part to `peer` (after closing the old
    /// outbound link when `fresh`), and stop relaying the parts not listed.
    Relay {
        peer: String,
        parts: Vec<String>,
        fresh: bool,
    },
    /// Downstream: accept the upstream's offer.
    Offer {
        peer: String,
        peer_addr: std::net::SocketAddr,
        sdp: String,
        tracks: Vec<meridian_media::RelayTrack>,
    },
    /// Upstream: the downstream's answer to the last offer.
    Answer { peer: String, sdp: String },
    /// Upstream: the layer the downstream wants of a track.
    Layer {
        peer: String,
        track: meridian_media::TrackId,
        layer: meridian_protocol::Layer,
    },
    /// Downstream: the upstream's state of a track it relays here (mute, layer).
    TrackState {
        peer: String,
        state: meridian_media::RelayTrackState,
    },
    /// Close both directions of the links with `peer`.
    Remove { peer: String },
    /// Close the link on which `peer` sends to this node.
    RemoveIn { peer: String },
    /// Close the link on which this node sends to `peer`.
    RemoveOut { peer: String },
    /// Counters of every link.
    Stats,
    /// Upstream: the participants of these parts hosted here, for another node.
    Roster { parts: Vec<String> },
    /// Downstream: rosters of other parts, each as `(local part, source, roster)`
    /// (`source` names the other part with its node).
    RemoteRosters {
        rosters: Vec<(String, String, Vec<RosterEntry>)>,
    },
    /// The parts of one room among these (all hosted here) see each other's people.
    ShareLocalRosters { parts: Vec<String> },
}

impl RelayOp {
    /// Carries the operation out on the worker's media core.
    pub(crate) fn apply(
        self,
        c: &mut Controller<SessionSink>,
        now: Instant,
    ) -> Result<RelayReply, String> {
        match self {
            Self::Relay { peer, parts, fresh } => {
                let linked = c.relay(now, |sfu, now| {
                    if fresh {
                        sfu.remove_relay_out(now, &peer);
                    }
                    let before = sfu.relayed_rooms(&peer);
                    for part in &parts {
                        sfu.relay_room(now, &peer, part);
                    }
                    for part in &before {
                        if !parts.contains(part) {
                            sfu.unrelay_room(now, &peer, part);
                        }
                    }
                    parts
                        .iter()
                        .filter(|p| !before.contains(p))
                        .cloned()
                        .collect()
                });
                Ok(RelayReply::Linked(linked))
            }
            Self::Offer {
                peer,
                peer_addr,
                sdp,
                tracks,
            } => c
                .relay(now, |sfu, now| {
                    sfu.handle_relay_offer(now, &peer, peer_addr, &sdp, tracks)
                })
                .map(RelayReply::Answer)
                .map_err(|e| e.to_string()),
            Self::Answer { peer, sdp } => c
                .relay(now, |sfu, now| sfu.handle_relay_answer(now, &peer, &sdp))
                .map(|_| RelayReply::Done)
                .map_err(|e| e.to_string()),
            Self::Layer { peer, track, layer } => c
                .relay(now, |sfu, now| {
                    sfu.set_relay_layer(now, &peer, track, layer)
                })
                .map(|_| RelayReply::Done)
                .map_err(|e| e.to_string()),
            Self::TrackState { peer, state } => c
                .relay(now, |sfu, now| {
                    sfu.handle_relay_track_state(now, &peer, state)
                })
                .map(|_| RelayReply::Done)
                .map_err(|e| e.to_string()),
            Self::Remove { peer } => {
                c.relay(now, |sfu, now| sfu.remove_relay(now, &peer));
                Ok(RelayReply::Done)
            }
            Self::RemoveIn { peer } => {
                c.relay(now, |sfu, now| sfu.remove_relay_in(now, &peer));
                Ok(RelayReply::Done)
            }
            Self::RemoveOut { peer } => {
                c.relay(now, |sfu, now| sfu.remove_relay_out(now, &peer));
                Ok(RelayReply::Done)
            }
            Self::Stats => Ok(RelayReply::Stats(c.sfu().relay_stats())),
            Self::Roster { parts } => {
                // One answer lists at most MAX_ROSTER people in all (its body stays
                // within the relay-control bound); parts past it wait for the next ask.
                let mut total = 0;
                let mut out = Vec::new();
                for part in parts {
                    let roster = c.roster(now, &part);
                    total += roster.len();
                    if total > meridian_room::MAX_ROSTER && !out.is_empty() {
                        break;
                    }
                    out.push((part, roster));
                }
                Ok(RelayReply::Rosters(out))
            }
            Self::RemoteRosters { rosters } => {
                let mut refused = None;
                for (part, source, roster) in rosters {
                    if let Err(e) = c.handle_remote_roster(now, &part, &source, roster) {
                        refused = Some(format!("roster of {source}: {e}"));
                    }
                }
                refused.map_or(Ok(RelayReply::Done), Err)
            }
            Self::ShareLocalRosters { parts } => {
                c.share_local_rosters(now, &parts);
                Ok(RelayReply::Done)
            }
        }
    }
}

/// What a [`RelayOp`] returns.
#[derive(Debug)]
pub(crate) enum RelayReply {
    /// Done.
    Done,
    /// Parts now relayed that were not before.
    Linked(Vec<String>),
    /// The SDP answer to an offer.
    Answer(String),
    /// Link counters.
    Stats(Vec<meridian_media::RelayStats>),
    /// The participants of each part asked for.
    Rosters(Vec<(String, Vec<RosterEntry>)>),
}

/// One item leaving the node through the outbox, in order within its room stream.
pub(crate) enum Outbound {
    /// Events of one room stream to append, decided under placement `epoch`.
    Append {
        stream: String,
        epoch: u64,
        events: Vec<NewEvent>,
    },
    /// A message for one session, sent once the stream's earlier appends are stored.
    Deliver {
        stream: String,
        to: SessionSink,
        msg: ServerMessage,
    },
    /// Close one session's transport after what was queued before.
    Close { stream: String, to: SessionSink },
    /// Place a hosted room on `node` (drain), after the room's queued events; replies
    /// whether the placement was stored.
    Handover {
        stream: String,
        node: String,
        reply: oneshot::Sender<bool>,
    },
}

impl Outbound {
    /// The room stream whose order the item keeps.
    pub(crate) fn stream(&self) -> &str {
        match self {
            Outbound::Append { stream, .. }
            | Outbound::Deliver { stream, .. }
            | Outbound::Close { stream, .. }
            | Outbound::Handover { stream, .. } => stream,
        }
    }
}

/// The sending side of the outbox: never blocks, and counts what is queued so the media
/// loop can refuse new joins while the log is far behind.
#[derive(Clone)]
pub(crate) struct OutboxTx {
    tx: mpsc::UnboundedSender<Outbound>,
    depth: Arc<AtomicUsize>,
}

/// The receiving side of the outbox.
pub(crate) struct OutboxRx {
    rx: mpsc::UnboundedReceiver<Outbound>,
    depth: Arc<AtomicUsize>,
}

/// A new outbox queue.
pub(crate) fn outbox() -> (OutboxTx, OutboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let depth = Arc::new(AtomicUsize::new(0));
    (
        OutboxTx {
            tx,
            depth: depth.clone(),
        },
        OutboxRx { rx, depth },
    )
}

impl OutboxTx {
    /// Queues an item; false when the outbox is gone (the node stops).
    pub(crate) fn send(&self, item: Outbound) -> bool {
        self.depth.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(item).is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Items queued and not yet taken by a room lane.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

impl OutboxRx {
    /// Receives up to `limit` items into `buf`; 0 when every sender is gone.
    pub(crate) async fn recv_many(&mut self, buf: &mut Vec<Outbound>, limit: usize) -> usize {
        let n = self.rx.recv_many(buf, limit).await;
        self.depth.fetch_sub(n, Ordering::Relaxed);
        n
    }
}

/// What this node knows of a room it hosts or hosted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fence {
    /// Hosted here: the room stream is at `version`, placed with `epoch`.
    Held { version: u64, epoch: u64 },
    /// Another node hosts it now; this node's writes to it are dropped.
    Released,
}

/// Per-room fences, shared by the outbox (which advances them) and the cluster.
#[derive(Clone, Default)]
pub(crate) struct Fences(Arc<Mutex<HashMap<String, Fence>>>);

impl Fences {
    pub(crate) fn get(&self, stream: &str) -> Option<Fence> {
        self.lock().get(stream).copied()
    }

    pub(crate) fn set(&self, stream: &str, fence: Fence) {
        self.lock().insert(stream.to_string(), fence);
    }

    /// Streams of the rooms hosted here.
    pub(crate) fn held(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, f)| matches!(f, Fence::Held { .. }))
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fence>> {
        // The map is only read and written in short sections that cannot panic.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_queues_are_bounded_by_bytes_as_well_as_count() {
        let (sink, mut queue) = session_queue(100, 1000);
        let big = ServerMessage::error(ErrorCode::NotFound, "x".repeat(600));
        assert_eq!(
            sink.try_send(big.clone()),
            Ok(()),
            "first message always fits"
        );
        assert_eq!(sink.try_send(big.clone()), Err(QueueError::Full));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let q = rt.block_on(queue.recv()).unwrap();
        assert!(!q.last);
        assert_eq!(sink.queued_bytes(), 0);
        assert_eq!(sink.try_send(big), Ok(()));
        let (sink, _queue) = session_queue(2, 1 << 20);
        let small = ServerMessage::Pong { id: 1 };
        assert_eq!(sink.try_send(small.clone()), Ok(()));
        assert_eq!(sink.try_send(small.clone()), Ok(()));
        assert_eq!(sink.try_send(small), Err(QueueError::Full), "count bound");
    }
}
