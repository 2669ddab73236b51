//! The node's outbox: every message to a client and every room event leave through it,
//! in order, so that a change is in the event log before any message acknowledges it.
//!
//! The media loop never waits for the database: it queues [`Outbound`] items and goes
//! on forwarding media. This task appends queued events (consecutive ones for the same
//! room in one append), then delivers the messages queued after them. While the log is
//! unreachable it retries with backoff and holds every later message back: the node
//! never acknowledges a change it did not store.

use std::time::Duration;

use meridian_protocol::ServerMessage;
use meridian_store::{ExpectedVersion, NewEvent, Store};
use tokio::sync::mpsc;
use tracing::{debug, warn};

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
}

/// Most events merged into one append.
const MAX_BATCH: usize = 500;
/// How long a delivery waits for a slow session before the message is dropped (the
/// session's idle timeout then closes it).
const DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// Runs until every sender is gone.
pub(crate) async fn run(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    metrics: crate::Metrics,
) {
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
                    append(&store, &stream, events, &metrics).await;
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

async fn append(store: &Store, stream: &str, events: Vec<NewEvent>, metrics: &crate::Metrics) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store
            .append(stream, ExpectedVersion::Any, events.clone())
            .await
        {
            Ok(recorded) => {
                metrics.events_appended.inc_by(recorded.len() as u64);
                return;
            }
            Err(e) => {
                metrics.event_log_errors.inc();
                warn!(
                    stream,
                    "event log append failed, retrying in {backoff:?}: {e}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
