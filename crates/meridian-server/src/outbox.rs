//! The node's outbox: every message to a client and every room event leave through it,
//! in order, so that a change is in the event log before any message acknowledges it.
//!
//! The media loop never waits for the database: it queues [`Outbound`] items and goes
//! on forwarding media. This task appends queued events (consecutive ones for the same
//! room in one append), then delivers the messages queued after them. While the log is
//! unreachable it retries with backoff and holds every later message back: the node
//! never acknowledges a change it did not store.

use std::time::Duration;

use meridian_events::Event;
use meridian_protocol::ServerMessage;
use meridian_store::{ExpectedVersion, NewEvent, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::cluster::{Fence, Fences};
use crate::media_loop::Command;

/// One item leaving the node, in order.
pub(crate) enum Outbound {
    /// Events of one room stream to append.
    Append {
        stream: String,
        events: Vec<NewEvent>,
    },
    /// A message for one session.
    Deliver {
        tx: mpsc::Sender<ServerMessage>,
        msg: ServerMessage,
    },
    /// Place a hosted room on `node` (drain), after the room's queued events; replies
    /// whether the placement was stored.
    Handover {
        stream: String,
        node: String,
        reply: oneshot::Sender<bool>,
    },
}

/// What the outbox needs besides the store.
pub(crate) struct Context {
    /// This node's id (the actor of handovers).
    pub node: String,
    pub store: Store,
    pub metrics: crate::Metrics,
    pub fences: Fences,
    /// Tells the media loop when a room was lost to another node.
    pub commands: mpsc::Sender<Command>,
}

/// Most events merged into one append.
const MAX_BATCH: usize = 500;
/// How long a delivery waits for a slow session before the message is dropped (the
/// session's idle timeout then closes it).
const DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// Runs until every sender is gone.
pub(crate) async fn run(cx: Context, mut rx: mpsc::UnboundedReceiver<Outbound>) {
    let mut queue = Vec::new();
    while rx.recv_many(&mut queue, 1024).await > 0 {
        let mut items = queue.drain(..).peekable();
        while let Some(item) = items.next() {
            match item {
                Outbound::Append { stream, mut events } => {
                    // Merge the appends to the same room that follow directly.
                    while let Some(Outbound::Append { stream: next, .. }) = items.peek() {
                        if *next != stream || events.len() >= MAX_BATCH {
                            break;
                        }
                        if let Some(Outbound::Append { events: more, .. }) = items.next() {
                            events.extend(more);
                        }
                    }
                    append(&cx, &stream, events).await;
                }
                Outbound::Handover {
                    stream,
                    node,
                    reply,
                } => {
                    let _ = reply.send(handover(&cx, &stream, node).await);
                }
                Outbound::Deliver { tx, msg } => {
                    if tx.try_send(msg.clone()).is_err()
                        && tokio::time::timeout(DELIVERY_WAIT, tx.send(msg))
                            .await
                            .is_err()
                    {
                        debug!("session did not take a message in time; dropped");
                    }
                }
            }
        }
    }
}

/// Appends a room's events with the version this node expects (its fence); a
/// conflict means another node placed the room since: the events are refused and the
/// media loop lets the room go.
async fn append(cx: &Context, stream: &str, events: Vec<NewEvent>) {
    let expected = match cx.fences.get(stream) {
        Some(Fence::Held { version, .. }) => ExpectedVersion::Exact(version),
        Some(Fence::Released) => {
            cx.metrics.events_fenced.inc_by(events.len() as u64);
            debug!(stream, "room hosted elsewhere now; events dropped");
            return;
        }
        None => ExpectedVersion::Any,
    };
    if let Err(actual) = write(cx, stream, expected, &events).await {
        cx.metrics.events_fenced.inc_by(events.len() as u64);
        lost(cx, stream, actual).await;
    }
}

/// Appends `RoomPlaced { node }` with the next epoch: the room moves to `node`.
async fn handover(cx: &Context, stream: &str, node: String) -> bool {
    let Some(Fence::Held { epoch, version }) = cx.fences.get(stream) else {
        return false;
    };
    let event = NewEvent::new(
        cx.node.clone(),
        Event::RoomPlaced {
            node,
            epoch: epoch + 1,
        },
    );
    let ok = write(cx, stream, ExpectedVersion::Exact(version), &[event])
        .await
        .is_ok();
    cx.fences.set(stream, Fence::Released);
    ok
}

async fn lost(cx: &Context, stream: &str, actual: u64) {
    warn!(
        stream,
        actual, "another node placed this room; this node's writes are refused"
    );
    cx.fences.set(stream, Fence::Released);
    cx.metrics.rooms_released.inc();
    let room = stream.strip_prefix("room:").unwrap_or(stream).to_string();
    let _ = cx
        .commands
        .send(Command::RoomLost {
            room,
            url: None,
            reason: "fenced".into(),
        })
        .await;
}

/// Appends until stored, retrying while the log is unreachable. On a conflict with an
/// exact version: `Ok` if this very batch landed already (the connection dropped
/// during an earlier COMMIT), else `Err(actual version)`.
async fn write(
    cx: &Context,
    stream: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<(), u64> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let error = match cx.store.append(stream, expected, events.to_vec()).await {
            Ok(recorded) => {
                cx.metrics.events_appended.inc_by(recorded.len() as u64);
                advance(cx, stream, expected, events.len());
                return Ok(());
            }
            Err(StoreError::Conflict { actual, .. }) => {
                let ExpectedVersion::Exact(version) = expected else {
                    return Err(actual);
                };
                match landed(&cx.store, stream, version, events).await {
                    Ok(true) => {
                        advance(cx, stream, expected, events.len());
                        return Ok(());
                    }
                    Ok(false) => return Err(actual),
                    Err(e) => e,
                }
            }
            // A batch the store refuses as such (a bug, not an outage) would block every
            // later message if retried: it is dropped, loudly.
            Err(StoreError::InvalidInput(why)) => {
                cx.metrics.event_log_errors.inc();
                tracing::error!(stream, "event log refused a batch; dropped: {why}");
                return Ok(());
            }
            Err(e) => e,
        };
        cx.metrics.event_log_errors.inc();
        warn!(
            stream,
            "event log append failed, retrying in {backoff:?}: {error}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn advance(cx: &Context, stream: &str, expected: ExpectedVersion, appended: usize) {
    if let (ExpectedVersion::Exact(version), Some(Fence::Held { epoch, .. })) =
        (expected, cx.fences.get(stream))
    {
        cx.fences.set(
            stream,
            Fence::Held {
                version: version + appended as u64,
                epoch,
            },
        );
    }
}

/// Whether the events right after `version` are exactly `events` (same actor and
/// event), i.e. an earlier attempt whose outcome was unknown did commit.
async fn landed(
    store: &Store,
    stream: &str,
    version: u64,
    events: &[NewEvent],
) -> Result<bool, StoreError> {
    let stored = store.read_stream(stream, version + 1, events.len()).await?;
    Ok(stored.len() == events.len()
        && stored
            .iter()
            .zip(events)
            .all(|(r, e)| r.actor == e.actor && r.event == e.event))
}
