//! One signaling session, independent of its transport.
//!
//! A transport (WebSocket today) hands the session a stream of incoming frames and
//! a sink for outgoing text; everything above that — join, auth, limits, routing to
//! the media loop — is the same for every transport.

use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use meridian_auth::AuthError;
use meridian_protocol::{ClientMessage, DecodeError, ErrorCode, ServerMessage};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use crate::NodeState;
use crate::cluster::Placement;
use crate::mailbox::{Command, Grants, SESSION_QUEUE, SessionSink};

/// An incoming transport frame.
pub(crate) enum Frame {
    /// A message's bytes.
    Data(Vec<u8>),
    /// A frame that is not a message (binary where text is expected, …).
    Invalid(&'static str),
    /// A message announced (by a length prefix) as this many bytes, over the limit;
    /// the transport did not read it.
    TooLarge(usize),
}

/// Token bucket bounding messages per connection.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    violations: u32,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.violations += 1;
            false
        }
    }
}

/// How long, and for how many frames, a closing session keeps reading its client.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_FRAMES: usize = 1024;

/// Violations of the rate limit after which the connection is closed.
const MAX_RATE_VIOLATIONS: u32 = 50;

/// Runs a session until the client leaves or the transport closes.
pub(crate) async fn run_session<I, O>(state: NodeState, mut incoming: I, outgoing: O)
where
    I: Stream<Item = Frame> + Unpin,
    O: Sink<String> + Unpin + Send + 'static,
{
    let cfg = state.config.signaling.clone();
    state.metrics.signaling_connections.inc();
    state.metrics.signaling_connections_open.inc();
    let (tx, mut rx) = mpsc::channel::<ServerMessage>(SESSION_QUEUE);
    let writer = tokio::spawn(async move {
        let mut outgoing = outgoing;
        while let Some(msg) = rx.recv().await {
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
            if outgoing.send(msg.encode()).await.is_err() || last {
                break;
            }
        }
        let _ = outgoing.close().await;
    });

    let mut limit = RateLimit {
        tokens: cfg.message_burst as f64,
        rate: cfg.messages_per_second as f64,
        burst: cfg.message_burst as f64,
        last: Instant::now(),
        violations: 0,
    };
    let join_deadline = Instant::now() + Duration::from_secs(cfg.join_timeout_secs);
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let mut joined: Option<(meridian_media::ParticipantId, u64)> = None;
    let close = std::sync::Arc::new(tokio::sync::Notify::new());
    let error = |code: ErrorCode, message: String| ServerMessage::error(code, message);

    loop {
        let deadline = match joined {
            None => join_deadline,
            Some(_) => Instant::now() + idle,
        };
        let frame = tokio::select! {
            f = incoming.next() => f,
            _ = close.notified() => {
                debug!("signaling closed by the node");
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let what = if joined.is_none() { "no join within the join timeout" } else { "connection idle too long" };
                let _ = tx.send(error(ErrorCode::Timeout, what.into())).await;
                break;
            }
        };
        let Some(frame) = frame else {
            break;
        };
        if !limit.allow(Instant::now()) {
            let fatal = limit.violations >= MAX_RATE_VIOLATIONS;
            if fatal || limit.violations == 1 {
                let _ = tx.try_send(error(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} messages per second{}",
                        cfg.messages_per_second,
                        if fatal { "; closing" } else { "" }
                    ),
                ));
            }
            if fatal {
                break;
            }
            continue;
        }
        let bytes = match frame {
            Frame::Data(b) => b,
            Frame::Invalid(why) => {
                let _ = tx.try_send(error(ErrorCode::MalformedMessage, why.into()));
                continue;
            }
            Frame::TooLarge(len) => {
                let e = DecodeError::TooLarge(len);
                let _ = tx.try_send(error(e.code(), e.to_string()));
                continue;
            }
        };
        let msg = if bytes.len() > cfg.max_message_bytes {
            Err(DecodeError::TooLarge(bytes.len()))
        } else {
            ClientMessage::decode(&bytes)
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                let _ = tx.try_send(error(e.code(), e.to_string()));
                continue;
            }
        };
        match (joined, msg) {
            (
                None,
                ClientMessage::Join {
                    token,
                    resume,
                    version,
                    auto_subscribe,
                    client,
                },
            ) => {
                debug!(?client, "join");
                if version != meridian_protocol::PROTOCOL_VERSION {
                    let _ = tx
                        .send(error(
                            ErrorCode::UnsupportedVersion,
                            format!(
                                "protocol version {version} is not supported; this node speaks {}",
                                meridian_protocol::PROTOCOL_VERSION
                            ),
                        ))
                        .await;
                    break;
                }
                match join(
                    &state,
                    token,
                    resume,
                    auto_subscribe,
                    tx.clone(),
                    close.clone(),
                )
                .await
                {
                    Ok(j) => joined = Some(j),
                    Err(msg) => {
                        let _ = tx.send(msg).await;
                        break;
                    }
                }
            }
            (None, _) => {
                let _ = tx.try_send(error(ErrorCode::NotJoined, "send join first".into()));
            }
            // Answered here, not through the outbox: a pong proves the node is alive even
            // while the log is unreachable and acknowledgements wait.
            (Some(_), ClientMessage::Ping { id }) => {
                let _ = tx.try_send(ServerMessage::Pong { id });
            }
            (Some((participant, _)), msg) => {
                let leave = matches!(msg, ClientMessage::Leave);
                if state
                    .commands
                    .send(Command::Message { participant, msg })
                    .await
                    .is_err()
                {
                    break;
                }
                if leave {
                    joined = None;
                    break;
                }
            }
        }
    }
    if let Some((participant, generation)) = joined {
        let _ = state
            .commands
            .send(Command::Detach {
                participant,
                generation,
            })
            .await;
    }
    drop(tx);
    let _ = writer.await;
    // Read (and drop) what the client still sends for a moment before the transport is
    // dropped: closing a TCP socket with unread input resets it, and the reset can
    // destroy the last message (an error saying why) before the client reads it.
    let _ = tokio::time::timeout(LINGER, async {
        for _ in 0..LINGER_FRAMES {
            if incoming.next().await.is_none() {
                break;
            }
        }
    })
    .await;
    state.metrics.signaling_connections_open.dec();
}

async fn join(
    state: &NodeState,
    token: String,
    resume: Option<String>,
    auto_subscribe: bool,
    tx: mpsc::Sender<ServerMessage>,
    close: std::sync::Arc<tokio::sync::Notify>,
) -> Result<(meridian_media::ParticipantId, u64), ServerMessage> {
    let claims = state
        .keys
        .verify(&token, meridian_auth::unix_now())
        .map_err(auth_error)?;
    if let Err(AuthError::WrongRegion { region }) = claims.check_region(&state.config.node.region) {
        let url = state
            .config
            .node
            .region_urls
            .get(&region)
            .cloned()
            .unwrap_or_default();
        return Err(ServerMessage::Redirect { region, url });
    }
    if claims.room == meridian_auth::ANY_ROOM {
        return Err(ServerMessage::error(
            ErrorCode::Forbidden,
            "an admin token for every room cannot join a room",
        ));
    }
    // The room lives on one node of the region: place it here or send the client on.
    match state.cluster.place(&claims.room, resume.is_some()).await {
        Ok(Placement::Local) => {}
        Ok(Placement::Elsewhere(url)) => {
            return Err(ServerMessage::Redirect {
                region: state.cluster.region().to_string(),
                url,
            });
        }
        Err(e) => return Err(ServerMessage::error(ErrorCode::Unavailable, e.to_string())),
    }
    let (reply, answer) = oneshot::channel();
    let request = meridian_room::JoinRequest {
        room: claims.room.clone(),
        identity: claims.sub.clone(),
        name: claims.name.clone(),
        grants: Grants {
            publish: claims.grants.publish,
            subscribe: claims.grants.subscribe,
        },
        auto_subscribe,
        resume,
        session: SessionSink { tx, close },
    };
    let internal = || ServerMessage::error(ErrorCode::Internal, "node is shutting down");
    state
        .commands
        .send(Command::Join { request, reply })
        .await
        .map_err(|_| internal())?;
    let joined = answer
        .await
        .map_err(|_| internal())?
        .map_err(|r| ServerMessage::error(r.code, r.message))?;
    Ok((joined.participant, joined.generation))
}

fn auth_error(e: AuthError) -> ServerMessage {
    ServerMessage::error(ErrorCode::Unauthorized, format!("{} ({})", e, e.code()))
}
