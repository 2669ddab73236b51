//! One signaling session, independent of its transport.
//!
//! A transport (WebSocket today) hands the session a stream of incoming frames and
//! a sink for outgoing text; everything above that — join, auth, limits, routing to
//! the media loop — is the same for every transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use meridian_auth::AuthError;
use meridian_protocol::{ClientMessage, DecodeError, ErrorCode, ServerMessage};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::NodeState;
use crate::cluster::Placement;
use crate::mailbox::{
    Command, Grants, QueueError, Queued, SESSION_QUEUE, SessionQueue, SessionSink, session_queue,
};

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

/// Bytes of a message that cost one more token: a full-size (64 KiB) message costs
/// 9 tokens, a ping 1, so the bucket bounds bytes as well as messages.
const BYTES_PER_TOKEN: usize = 8192;

/// Token bucket bounding messages (and, through their cost, bytes) per connection.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    violations: u32,
}

impl RateLimit {
    /// Takes the cost of a message of `bytes`; false (a violation) when the bucket
    /// does not hold it.
    fn allow(&mut self, now: Instant, bytes: usize) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let cost = self.cost(bytes);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            self.violations += 1;
            false
        }
    }

    /// One token, one more per [`BYTES_PER_TOKEN`], never more than the burst (so any
    /// message within the size limit can pass).
    fn cost(&self, bytes: usize) -> f64 {
        (1.0 + (bytes / BYTES_PER_TOKEN) as f64).min(self.burst)
    }

    /// How long until the bucket holds a message of `bytes` again (at most the time
    /// to fill it from empty): a flooding client is not read meanwhile.
    fn wait(&self, bytes: usize) -> Duration {
        let missing = (self.cost(bytes) - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.rate)
    }
}

/// How long, and for how many frames, a closing session keeps reading its client.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_FRAMES: usize = 1024;
/// And for how many bytes: a client that floods while it is being closed (a refused
/// join followed by 60 KB messages, reconnecting at once) must not make the node read
/// 1024 full-size frames per connection.
const LINGER_BYTES: usize = 64 * 1024;

/// Violations of the rate limit after which the connection is closed.
const MAX_RATE_VIOLATIONS: u32 = 50;

/// Tracing target of the per-join stage timestamps (`debug`): where a join's time goes
/// (the soak reads them; `RUST_LOG=meridian::join_timing=debug` shows them).
pub(crate) const JOIN_TIMING: &str = "meridian::join_timing";

/// Wall-clock microseconds since the Unix epoch: stage timestamps that a client on the
/// same host can line up with its own.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// When a join went through each stage (Unix microseconds, 0 for a stage not reached).
#[derive(Debug, Default)]
struct JoinStages {
    /// The session started (the transport was accepted and upgraded).
    session: u64,
    /// The join message was read.
    received: u64,
    /// The per-address and node-wide join allowances were checked.
    admitted: u64,
    /// The token was verified.
    verified: u64,
    /// The room was placed on this node.
    placed: u64,
    /// The join command was queued to the media loop.
    queued: u64,
    /// The controller answered (the `joined` message then waits for the log append).
    answered: u64,
}

impl JoinStages {
    fn log(&self, identity: &str, outcome: &str) {
        tracing::debug!(
            target: JOIN_TIMING,
            identity,
            outcome,
            session = self.session,
            received = self.received,
            admitted = self.admitted,
            verified = self.verified,
            placed = self.placed,
            queued = self.queued,
            answered = self.answered,
            "join stages"
        );
    }
}

/// Counts an open signaling connection for as long as it lives: the gauge goes down
/// when the guard is dropped, whether the session returns, is cancelled or panics.
pub(crate) struct OpenConnection(crate::Metrics);

impl OpenConnection {
    pub(crate) fn new(metrics: &crate::Metrics) -> OpenConnection {
        metrics.signaling_connections.inc();
        metrics.signaling_connections_open.inc();
        OpenConnection(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.signaling_connections_open.dec();
    }
}

/// Writes the session's queue to the transport. Each write (and the final close) must
/// finish within `timeout`: a client that does not read is closed, not waited for.
async fn write_queue<O>(
    mut queue: SessionQueue,
    mut outgoing: O,
    timeout: Duration,
    close: Arc<tokio::sync::Notify>,
    metrics: crate::Metrics,
) where
    O: Sink<String> + Unpin,
{
    while let Some(Queued { text, last }) = queue.recv().await {
        match tokio::time::timeout(timeout, outgoing.send(text)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                debug!("write to the client timed out; closing the session");
                metrics.sessions_too_slow.inc();
                close.notify_one();
                return;
            }
        }
        if last {
            break;
        }
    }
    close.notify_one();
    let _ = tokio::time::timeout(timeout, outgoing.close()).await;
}

/// Runs a session until the client leaves or the transport closes.
pub(crate) async fn run_session<I, O>(state: NodeState, peer: SocketAddr, incoming: I, outgoing: O)
where
    I: Stream<Item = Frame> + Unpin,
    O: Sink<String> + Unpin + Send + 'static,
{
    let _open = OpenConnection::new(&state.metrics);
    let session_started = unix_micros();
    // A transport's stream may not be polled after it ended: fuse it, so the linger
    // read below (and any later poll) sees the end again instead of panicking.
    let mut incoming = incoming.fuse();
    let cfg = state.config.signaling.clone();
    let (sink, queue) = session_queue(SESSION_QUEUE, cfg.session_queue_bytes);
    let close = sink.close.clone();
    let write_timeout = Duration::from_secs(cfg.write_timeout_secs);
    let writer = tokio::spawn(write_queue(
        queue,
        outgoing,
        write_timeout,
        close.clone(),
        state.metrics.clone(),
    ));

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
    // The joined token's identity and room: a refresh must name the same.
    let mut who: Option<(String, String)> = None;
    let error = |code: ErrorCode, message: String| ServerMessage::error(code, message);
    // Queues a reply; false when the client does not keep up and the session must end.
    let reply = |msg: ServerMessage| match sink.try_send(msg) {
        Ok(()) => true,
        Err(QueueError::Full) => {
            debug!("session queue full; closing the slow session");
            state.metrics.sessions_too_slow.inc();
            false
        }
        Err(QueueError::Closed) => false,
    };

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
                reply(error(ErrorCode::Timeout, what.into()));
                break;
            }
        };
        let Some(frame) = frame else {
            break;
        };
        let frame_bytes = match &frame {
            Frame::Data(b) => b.len(),
            // Never read: answered with `message_too_large` for one token.
            Frame::TooLarge(_) | Frame::Invalid(_) => 0,
        };
        if !limit.allow(Instant::now(), frame_bytes) {
            let fatal = limit.violations >= MAX_RATE_VIOLATIONS;
            if (fatal || limit.violations == 1)
                && !reply(error(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} messages per second{}",
                        cfg.messages_per_second,
                        if fatal { "; closing" } else { "" }
                    ),
                ))
            {
                break;
            }
            if fatal {
                break;
            }
            // Stop reading this client until its allowance is back (TCP or QUIC flow
            // control then holds it back): a flood costs the node the client's rate,
            // not its link's.
            tokio::select! {
                _ = tokio::time::sleep(limit.wait(frame_bytes)) => {}
                _ = close.notified() => {
                    debug!("signaling closed by the node");
                    break;
                }
            }
            continue;
        }
        let bytes = match frame {
            Frame::Data(b) => b,
            Frame::Invalid(why) => {
                if !reply(error(ErrorCode::MalformedMessage, why.into())) {
                    break;
                }
                continue;
            }
            Frame::TooLarge(len) => {
                let e = DecodeError::TooLarge(len);
                if !reply(error(e.code(), e.to_string())) {
                    break;
                }
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
                if !reply(error(e.code(), e.to_string())) {
                    break;
                }
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
                    reply(error(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "protocol version {version} is not supported; this node speaks {}",
                            meridian_protocol::PROTOCOL_VERSION
                        ),
                    ));
                    break;
                }
                let mut stages = JoinStages {
                    session: session_started,
                    received: unix_micros(),
                    ..JoinStages::default()
                };
                let result = join(
                    &state,
                    peer,
                    JoinArgs {
                        token,
                        resume,
                        auto_subscribe,
                    },
                    sink.clone(),
                    &mut stages,
                )
                .await;
                match result {
                    Ok((j, identity, room)) => {
                        stages.log(&identity, "joined");
                        joined = Some(j);
                        who = Some((identity, room));
                    }
                    Err((msg, identity)) => {
                        stages.log(identity.as_deref().unwrap_or(""), "refused");
                        reply(msg);
                        break;
                    }
                }
            }
            (None, _) => {
                if !reply(error(ErrorCode::NotJoined, "send join first".into())) {
                    break;
                }
            }
            // Answered here, not through the outbox: a pong proves the node is alive even
            // while the log is unreachable and acknowledgements wait.
            (Some(_), ClientMessage::Ping { id }) => {
                if !reply(ServerMessage::Pong { id }) {
                    break;
                }
            }
            (Some((participant, _)), ClientMessage::Refresh { token }) => {
                let checked = match state.verify(&token) {
                    Ok(c)
                        if who.as_ref().is_some_and(|(identity, room)| {
                            *identity == c.sub && *room == c.room
                        }) && c.check_region(&state.config.node.region).is_ok() =>
                    {
                        Ok(c)
                    }
                    Ok(_) => Err(ServerMessage::error(
                        ErrorCode::Unauthorized,
                        "a refresh token must name the same identity, room and region",
                    )),
                    Err(e) => Err(auth_error(e)),
                };
                match checked {
                    Ok(c) => {
                        let left = c.exp.saturating_sub(meridian_auth::unix_now());
                        let expires_at = session_deadline(c.exp);
                        if state
                            .commands
                            .send(Command::Refresh {
                                participant,
                                expires_at,
                            })
                            .await
                            .is_err()
                            || !reply(ServerMessage::Refreshed {
                                expires_in_secs: left,
                            })
                        {
                            break;
                        }
                    }
                    Err(msg) => {
                        reply(msg);
                        break;
                    }
                }
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
    drop(sink);
    // The writer ends once every sink is gone (the media loop drops its copy on detach)
    // or a write times out; either way within the write timeout per message.
    let writer_abort = writer.abort_handle();
    if tokio::time::timeout(write_timeout * 2, writer)
        .await
        .is_err()
    {
        writer_abort.abort();
    }
    // Read (and drop) what the client still sends for a moment before the transport is
    // dropped: closing a TCP socket with unread input resets it, and the reset can
    // destroy the last message (an error saying why) before the client reads it.
    let _ = tokio::time::timeout(LINGER, async {
        let mut bytes = 0;
        for _ in 0..LINGER_FRAMES {
            match incoming.next().await {
                None => break,
                Some(Frame::Data(b)) => {
                    bytes += b.len();
                    if bytes > LINGER_BYTES {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
    })
    .await;
}

/// What a `join` message carries besides its version.
struct JoinArgs {
    token: String,
    resume: Option<String>,
    auto_subscribe: bool,
}

/// A joined participant (id, generation), identity and room.
type Joined = ((meridian_media::ParticipantId, u64), String, String);

/// Admits, verifies and places a join and hands it to the media loop; a refusal comes
/// with the token's identity when it was verified (for the stage log).
async fn join(
    state: &NodeState,
    peer: SocketAddr,
    args: JoinArgs,
    session: SessionSink,
    stages: &mut JoinStages,
) -> Result<Joined, (ServerMessage, Option<String>)> {
    // Before the token is even checked: a flood of joins costs one table look-up each.
    // First the address's own allowance, then its share of the node's join budget
    // (fair queuing: under pressure the addresses joining most are refused first).
    let now = std::time::Instant::now();
    if !state.limits.allow_join(peer.ip(), now) {
        state.metrics.limit_refused("joins_per_ip");
        return Err((
            ServerMessage::error(
                ErrorCode::RateLimited,
                "too many joins from this address; try again in a minute",
            ),
            None,
        ));
    }
    if !state.join_budget.allow(peer.ip(), now) {
        state.metrics.limit_refused("node_join_share");
        return Err((
            ServerMessage::error(
                ErrorCode::RateLimited,
                "the node is busy and this address has had its share of joins; try again shortly",
            ),
            None,
        ));
    }
    stages.admitted = unix_micros();
    let claims = state
        .verify(&args.token)
        .map_err(|e| (auth_error(e), None))?;
    stages.verified = unix_micros();
    let identity = Some(claims.sub.clone());
    join_verified(state, claims, args, session, stages)
        .await
        .map_err(|m| (m, identity))
}

/// [`join`] after its token was verified.
async fn join_verified(
    state: &NodeState,
    claims: meridian_auth::Claims,
    args: JoinArgs,
    session: SessionSink,
    stages: &mut JoinStages,
) -> Result<Joined, ServerMessage> {
    let JoinArgs {
        resume,
        auto_subscribe,
        ..
    } = args;
    if let Err(AuthError::WrongRegion { region }) = claims.check_region(&state.config.node.region) {
        let url = state
            .config
            .node
            .region_urls
            .get(&region)
            .cloned()
            .or_else(|| crate::regions::signal_url(&state.config.regions, &region))
            .unwrap_or_default();
        return Err(ServerMessage::Redirect { region, url });
    }
    if claims.room == meridian_auth::ANY_ROOM {
        return Err(ServerMessage::error(
            ErrorCode::Forbidden,
            "an admin token for every room cannot join a room",
        ));
    }
    if claims.room.contains(meridian_events::PART_SEPARATOR) {
        return Err(ServerMessage::error(
            ErrorCode::Forbidden,
            format!(
                "room names may not contain '{}' (it names the parts of a room)",
                meridian_events::PART_SEPARATOR
            ),
        ));
    }
    // The room lives on one node of the region: place it here or send the client on.
    let part = match crate::relay::place(state, &claims.room, resume.as_deref()).await {
        Ok((Placement::Local, part)) => part,
        Ok((Placement::Elsewhere(url), _)) => {
            return Err(ServerMessage::Redirect {
                region: state.cluster.region().to_string(),
                url,
            });
        }
        Err(e) => return Err(ServerMessage::error(ErrorCode::Unavailable, e.to_string())),
    };
    stages.placed = unix_micros();
    let (reply, answer) = oneshot::channel();
    let request = meridian_room::JoinRequest {
        // The part of the room this node hosts (the room itself unless it spans nodes).
        room: part,
        identity: claims.sub.clone(),
        name: claims.name.clone(),
        grants: Grants {
            publish: claims.grants.publish,
            subscribe: claims.grants.subscribe,
        },
        auto_subscribe,
        resume,
        // The session ends when the token does, unless the client refreshes it.
        expires_at: Some(session_deadline(claims.exp)),
        session,
    };
    let internal = || ServerMessage::error(ErrorCode::Internal, "node is shutting down");
    state
        .commands
        .send(Command::Join { request, reply })
        .await
        .map_err(|_| internal())?;
    stages.queued = unix_micros();
    let joined = answer.await.map_err(|_| internal())?;
    stages.answered = unix_micros();
    let joined = joined.map_err(|r| ServerMessage::error(r.code, r.message))?;
    Ok((
        (joined.participant, joined.generation),
        claims.sub,
        claims.room,
    ))
}

fn auth_error(e: AuthError) -> ServerMessage {
    ServerMessage::error(ErrorCode::Unauthorized, format!("{} ({})", e, e.code()))
}

/// When a session on a token expiring at `exp` (unix seconds) ends: when the node stops
/// accepting that token ([`meridian_auth::EXP_LEEWAY_SECS`] after `exp`), so a token
/// accepted at join never yields a session that ends at once (and rejoins in a loop).
fn session_deadline(exp: u64) -> std::time::Instant {
    let accepted_until = exp.saturating_add(meridian_auth::EXP_LEEWAY_SECS);
    std::time::Instant::now()
        + Duration::from_secs(accepted_until.saturating_sub(meridian_auth::unix_now()))
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn the_message_allowance_bounds_bytes_too() {
        let t0 = Instant::now();
        let mut l = RateLimit {
            tokens: 60.0,
            rate: 20.0,
            burst: 60.0,
            last: t0,
            violations: 0,
        };
        // 60 pings pass at once; 60 KB messages cost 8 tokens each: 7 pass.
        let mut big = 0;
        while l.allow(t0, 60_000) {
            big += 1;
        }
        assert_eq!(big, 7);
        assert_eq!(l.violations, 1);
        // The reader pauses until the refused message's cost is back: 4 tokens
        // missing at 20 tokens/s.
        assert_eq!(l.wait(60_000), Duration::from_millis(200));
        assert!(l.allow(t0 + Duration::from_millis(200), 60_000));
        // A message larger than the burst still passes from a full bucket.
        let mut small = RateLimit {
            tokens: 5.0,
            rate: 1.0,
            burst: 5.0,
            last: t0,
            violations: 0,
        };
        assert!(small.allow(t0, 1 << 20));
    }
}
