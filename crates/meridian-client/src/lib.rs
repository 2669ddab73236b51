//! A Rust client for Meridian, built on `str0m`.
//!
//! [`Client::join`] connects to a node's signaling endpoint, joins the room named by
//! its token, publishes synthetic Opus audio and VP8 video (three simulcast layers by
//! default) and receives every track the node offers. Synthetic frames carry a
//! sequence number and their send time, so the receiver measures frame loss, freezes,
//! latency and jitter ([`ClientStats`]). Keyframe bits are valid, so the node's
//! keyframe logic is exercised.
//!
//! Each client runs as one tokio task with two UDP sockets (publisher and subscriber
//! connections). An optional seeded network emulator ([`str0m_netem`]) impairs the
//! client's own traffic in both directions.
//!
//! The client rides out the loss of its node ([`ReconnectPolicy`], on by default): when
//! signaling closes or fails without `left`, the node sends `migrate`, or the node goes
//! silent, it reconnects (to the `migrate` URL, else to the next of the region's nodes
//! in [`ClientConfig::node_urls`]) with backoff and jitter, and joins with its resume
//! token; see [`Client`] for what each answer leads to.
#![deny(missing_docs)]

mod count;
pub mod jitter;
mod media;
mod reconnect;
pub mod region;
mod restart;
mod signal;
mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_protocol::{
    ClientMessage, ErrorCode, Layer, ServerMessage, TrackAnnouncement, TrackInfo, TrackKind,
};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{
    Direction, KeyframeRequest, KeyframeRequestKind, MediaKind, Mid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Ssrc;
use str0m::{Candidate, Event, Input, Output, Rtc};
use str0m_netem::{Netem, NetemConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use count::CountStats;
pub use media::{FrameHeader, now_micros};
pub use reconnect::{
    AttemptFailure, AttemptPlan, ReconnectPolicy, Reconnected, Reconnector, Step, refusal_is_final,
};
pub use region::{ProbeConfig, RegionLogin};
pub use restart::{IceRestartPolicy, PathWatch};
pub use signal::{WebTransportEndpoint, webtransport_endpoint};
pub use stats::{
    ClientStats, LossReason, MAX_RECONNECT_RECORDS, ReconnectRecord, RejoinKind, TrackStats,
};

use reconnect::UrlRotation;
use signal::{Signal, Target};

/// Most messages waited through for `joined` on one connection.
const MAX_MESSAGES_BEFORE_JOINED: usize = 64;

/// Most client messages held while the client is reconnecting.
const MAX_HELD_MESSAGES: usize = 256;

/// How a client reaches the node's signaling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket text frames; [`ClientConfig::url`] is `ws://HOST:PORT/signal`.
    #[default]
    WebSocket,
    /// One WebTransport bidirectional stream of length-prefixed messages;
    /// [`ClientConfig::url`] is `https://HOST:PORT/signal`.
    WebTransport,
}

/// Errors of a client session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The signaling connection failed.
    #[error("signaling: {0}")]
    Signaling(String),
    /// The node refused a request.
    #[error("node error {code:?}: {message}")]
    Refused {
        /// Wire code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The node redirected the client to another region (returned by
    /// [`Client::join`] when reconnection is disabled or too many redirects followed).
    #[error("redirected to region {region} at {url}")]
    Redirected {
        /// Region.
        region: String,
        /// Its signaling URL.
        url: String,
    },
    /// Local sockets failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// WebRTC negotiation failed.
    #[error("webrtc: {0}")]
    Rtc(String),
    /// No `joined` within the join timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// `POST /login` was refused; `code` is the node's (`token_expired`,
    /// `token_bad_signature`, `login_disabled`, `rate_limited`, …).
    #[error("login refused: {code}: {message}")]
    Login {
        /// The stable error code.
        code: String,
        /// The node's detail.
        message: String,
    },
    /// The client lost its node and could not join again within the
    /// [`ReconnectPolicy`]'s attempts or time; the client's task ends with it.
    #[error("gave up reconnecting after {attempts} attempts in {elapsed:?}: {last_error}")]
    ReconnectFailed {
        /// Connection attempts made since the loss.
        attempts: u32,
        /// Time since the loss.
        elapsed: Duration,
        /// What the last attempt failed with.
        last_error: String,
    },
}

/// What a client publishes and how it behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Signaling URL, e.g. `ws://127.0.0.1:7880/signal` (WebSocket) or
    /// `https://127.0.0.1:7881/signal` (WebTransport). The first join goes here; it is
    /// also the first of [`node_urls`](Self::node_urls).
    pub url: String,
    /// The signaling transport of [`url`](Self::url). Reconnections pick the transport
    /// from each URL's scheme (`ws://`, `wss://`: WebSocket; `https://`: WebTransport)
    /// and fall back to this one.
    pub transport: Transport,
    /// WebTransport only: SHA-256 digests of the node's self-signed certificate
    /// (empty: verify it against the system's roots). With several nodes, put every
    /// node's digests here (a certificate matching any one is accepted), e.g. with
    /// [`over_webtransport_nodes`](Self::over_webtransport_nodes).
    pub server_certificate_hashes: Vec<[u8; 32]>,
    /// The region's other signaling URLs, tried after [`url`](Self::url) when the
    /// client loses its node (round robin, starting after the node lost). May contain
    /// `url` itself and duplicates; both are ignored.
    pub fallback_urls: Vec<String>,
    /// When and how to reconnect after losing the node.
    pub reconnect: ReconnectPolicy,
    /// When to restart ICE on a media connection whose path died while signaling
    /// stayed up (same participant; no reconnection).
    pub ice_restart: IceRestartPolicy,
    /// Access token.
    pub token: String,
    /// Publish a synthetic Opus track.
    pub publish_audio: bool,
    /// Publish a synthetic VP8 track.
    pub publish_video: bool,
    /// Simulcast layers of the video track (empty: a single stream).
    pub layers: Vec<Layer>,
    /// Bitrate of each layer, lowest first, in bit/s.
    pub layer_bitrates: [u64; 3],
    /// Video frames per second.
    pub fps: u32,
    /// Frames between periodic keyframes.
    pub keyframe_interval: u32,
    /// Subscribe to every track automatically.
    pub auto_subscribe: bool,
    /// Local IP to bind the media sockets to.
    pub bind_ip: std::net::IpAddr,
    /// Impairment applied to the client's traffic in both directions.
    pub impairment: Option<NetemConfig>,
    /// Receive like a browser: a jitter buffer plays each received frame as soon as it
    /// is complete, and one still incomplete this long after its loss became visible
    /// is skipped (later frames are not held; for video a keyframe is asked for).
    /// `None`: str0m's frame assembly, which holds later frames until every NACK repair
    /// has been tried.
    pub playout_deadline: Option<Duration>,
    /// Negotiate audio RED (RFC 2198, `red/48000/2`): the publisher sends each Opus
    /// packet again inside the next one, and the receiver recovers a lost packet from
    /// it without a retransmission (str0m does it in frame mode, the jitter buffer with
    /// `playout_deadline`).
    pub red: bool,
    /// Negotiate video FEC with the node (`meridian_media::fec`: VP8 in RED with
    /// ULPFEC, rebuilt here without a retransmission). Needs `playout_deadline` (RTP
    /// mode); ignored without it.
    pub fec: bool,
    /// How long to wait for `joined` on the first join.
    pub join_timeout: Duration,
    /// Benchmark receiver: once the subscriber connection is up, count its SRTP
    /// packets in batches without decrypting them ([`ClientStats::counted`]; no frames,
    /// latency or loss in [`ClientStats::tracks`]). It still sends receiver reports
    /// (the node learns its round trip), but no TWCC feedback.
    pub count_only: bool,
    /// The regions the client may be served by, in fallback order, each with its own
    /// token (from a login: [`with_login`](Self::with_login)). Empty: one region,
    /// [`token`](Self::token) and [`node_urls`](Self::node_urls). When every node of
    /// the current region is gone the client joins the next region afresh.
    pub regions: Vec<RegionTarget>,
}

/// One region a client may be served by: its nodes and the token pinned to it.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionTarget {
    /// The region's id.
    pub region: String,
    /// Access token pinned to the region.
    pub token: String,
    /// Signaling URLs of the region's nodes.
    pub urls: Vec<String>,
}

impl ClientConfig {
    /// A client that publishes audio and three-layer simulcast video.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            transport: Transport::WebSocket,
            server_certificate_hashes: Vec::new(),
            fallback_urls: Vec::new(),
            reconnect: ReconnectPolicy::default(),
            ice_restart: IceRestartPolicy::default(),
            token: token.into(),
            publish_audio: true,
            publish_video: true,
            layers: Layer::ALL.to_vec(),
            layer_bitrates: [150_000, 500_000, 1_500_000],
            fps: 30,
            keyframe_interval: 300,
            auto_subscribe: true,
            bind_ip: "127.0.0.1".parse().expect("valid literal"),
            impairment: None,
            playout_deadline: None,
            red: false,
            fec: false,
            join_timeout: Duration::from_secs(10),
            count_only: false,
            regions: Vec::new(),
        }
    }

    /// The same client served by the regions of a login answer (WebSocket URLs):
    /// the first join goes to the chosen region's first node (`first_node` picks
    /// another, modulo the region's nodes), the region's other nodes become
    /// [`fallback_urls`](Self::fallback_urls), the token becomes that region's, and
    /// every region with its token goes to [`regions`](Self::regions). Unchanged
    /// when the answer has no routes.
    pub fn with_login(
        self,
        login: &meridian_protocol::region::LoginResponse,
        first_node: usize,
    ) -> Self {
        let regions: Vec<RegionTarget> = login
            .routes
            .iter()
            .filter(|r| !r.signal_urls.is_empty())
            .map(|r| {
                let n = r.signal_urls.len();
                RegionTarget {
                    region: r.region.clone(),
                    token: r.token.clone(),
                    urls: (0..n)
                        .map(|k| r.signal_urls[(first_node + k) % n].clone())
                        .collect(),
                }
            })
            .collect();
        let Some(first) = regions.first() else {
            return self;
        };
        ClientConfig {
            url: first.urls[0].clone(),
            transport: Transport::WebSocket,
            fallback_urls: first.urls[1..].to_vec(),
            token: first.token.clone(),
            regions,
            ..self
        }
    }

    /// The same client over WebTransport to `endpoint`.
    pub fn over_webtransport(self, endpoint: WebTransportEndpoint) -> Self {
        ClientConfig {
            url: endpoint.url,
            transport: Transport::WebTransport,
            server_certificate_hashes: endpoint.certificate_hashes,
            ..self
        }
    }

    /// The same client over WebTransport to a region's nodes: the first join goes to
    /// `endpoints[first % len]`, the others become [`fallback_urls`](Self::fallback_urls)
    /// in order after it, and every node's certificate digests are trusted. Unchanged
    /// when `endpoints` is empty.
    pub fn over_webtransport_nodes(self, endpoints: &[WebTransportEndpoint], first: usize) -> Self {
        if endpoints.is_empty() {
            return self;
        }
        let n = endpoints.len();
        let mut hashes: Vec<[u8; 32]> = Vec::new();
        for h in endpoints.iter().flat_map(|e| &e.certificate_hashes) {
            if !hashes.contains(h) {
                hashes.push(*h);
            }
        }
        ClientConfig {
            url: endpoints[first % n].url.clone(),
            transport: Transport::WebTransport,
            server_certificate_hashes: hashes,
            fallback_urls: (1..n)
                .map(|k| endpoints[(first + k) % n].url.clone())
                .collect(),
            ..self
        }
    }

    /// The same client with the region's other signaling URLs to fail over to.
    pub fn with_fallback_urls<I, S>(self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            fallback_urls: urls.into_iter().map(Into::into).collect(),
            ..self
        }
    }

    /// The same client with reconnection disabled: a loss ends its task with an error.
    pub fn without_reconnect(self) -> Self {
        ClientConfig {
            reconnect: ReconnectPolicy::disabled(),
            ..self
        }
    }

    /// Every signaling URL in trying order: [`url`](Self::url), then
    /// [`fallback_urls`](Self::fallback_urls) without duplicates or empty entries.
    /// After losing the URL at index `i` the client tries `i + 1` (wrapping).
    pub fn node_urls(&self) -> Vec<String> {
        UrlRotation::new(&self.url, &self.fallback_urls)
            .urls()
            .to_vec()
    }

    /// A client that only receives.
    pub fn subscriber(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            publish_audio: false,
            publish_video: false,
            ..ClientConfig::new(url, token)
        }
    }

    fn join_message(&self, resume: Option<String>) -> ClientMessage {
        ClientMessage::Join {
            token: self.token.clone(),
            resume,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: self.auto_subscribe,
            client: Some("meridian-client".into()),
        }
    }
}

enum Command {
    Send(ClientMessage),
    Refresh(String),
    Impair(Option<NetemConfig>),
    CutMedia(Duration),
    Leave,
    Drop,
}

/// A running client; dropping it disconnects abruptly.
///
/// After a loss of its node (see [`ReconnectPolicy`]) the client's task reconnects by
/// itself and joins with its resume token, while its media sockets keep running:
/// - `joined{restored: false}`: the node kept the participant; the peer connections
///   carry on ([`RejoinKind::Resumed`]).
/// - `joined{restored: true}`: a node rebuilt the participant from the event log; the
///   client creates new peer connections on the same sockets, re-publishes with its
///   earlier track ids and answers the node's new offer; same participant id
///   ([`RejoinKind::Restored`]).
/// - `error{resume_failed}`: the client joins again without resume, as a new
///   participant with new peer connections ([`RejoinKind::Fresh`]).
/// - `redirect` or `migrate{url}` while (re)connecting: it connects to that URL next.
///
/// Every reconnection is counted and timed in [`ClientStats`]; frame counts and
/// latency samples go on across them. When the policy's attempts or time run out the
/// task ends with [`ClientError::ReconnectFailed`] ([`Client::is_running`] turns false).
pub struct Client {
    stats: Arc<Mutex<ClientStats>>,
    commands: mpsc::Sender<Command>,
    messages: watch::Receiver<u64>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl Client {
    /// Connects, joins, starts publishing and subscribing; returns once `joined` arrived.
    ///
    /// The first join goes to [`ClientConfig::url`], within
    /// [`ClientConfig::join_timeout`]; with reconnection enabled it follows up to
    /// [`ReconnectPolicy::max_redirects`] `redirect`s (or `migrate{url}`s), and a node
    /// that cannot take the session now (`unavailable`: draining, overloaded, its log
    /// unreachable) is asked again, or the next of [`ClientConfig::node_urls`], after
    /// the policy's backoff.
    pub async fn join(config: ClientConfig) -> Result<Client, ClientError> {
        let started = Instant::now();
        let mut url = config.url.clone();
        let mut redirects = 0u64;
        let mut unavailable = 0u32;
        let mut rotation = UrlRotation::new(&config.url, &config.fallback_urls);
        let mut jitter = reconnect::Jitter::new(now_micros());
        let (signal, joined) = loop {
            let outcome = attempt(
                Target::new(&config, &url),
                config.join_message(None),
                config.join_timeout,
                config.join_timeout,
            )
            .await;
            let next = match outcome {
                Attempt::Joined { signal, joined } => break (signal, joined),
                Attempt::Failed(e) => return Err(e),
                Attempt::Refused {
                    code: ErrorCode::Unavailable,
                    message,
                } if config.reconnect.enabled => {
                    let delay = config.reconnect.backoff(unavailable, jitter.next_u64());
                    if started.elapsed() + delay >= config.join_timeout {
                        return Err(ClientError::Refused {
                            code: ErrorCode::Unavailable,
                            message,
                        });
                    }
                    debug!(%url, "join refused ({message}); trying again");
                    unavailable += 1;
                    tokio::time::sleep(delay).await;
                    url = rotation.next_after(&url);
                    continue;
                }
                Attempt::Refused { code, message } => {
                    return Err(ClientError::Refused { code, message });
                }
                Attempt::ResumeFailed => {
                    return Err(ClientError::Refused {
                        code: ErrorCode::ResumeFailed,
                        message: "resume failed on a join without resume".into(),
                    });
                }
                Attempt::Redirect { region, url } => (region, Some(url)),
                Attempt::Migrate { url } => ("migrate".to_string(), url),
            };
            let (region, Some(next)) = next else {
                return Err(ClientError::Signaling("migrate before joined".into()));
            };
            if !config.reconnect.enabled || redirects >= u64::from(config.reconnect.max_redirects) {
                return Err(ClientError::Redirected { region, url: next });
            }
            if started.elapsed() >= config.join_timeout {
                return Err(ClientError::Timeout("joined"));
            }
            redirects += 1;
            url = next;
        };
        let stats = Arc::new(Mutex::new(ClientStats {
            participant_id: joined.participant_id.clone(),
            join_ms: started.elapsed().as_secs_f64() * 1000.0,
            url: url.clone(),
            redirects,
            ..Default::default()
        }));
        let pub_socket = UdpSocket::bind(SocketAddr::new(config.bind_ip, 0)).await?;
        let sub_socket = UdpSocket::bind(SocketAddr::new(config.bind_ip, 0)).await?;
        let (commands, command_rx) = mpsc::channel(64);
        let (msg_tx, messages) = watch::channel(0);
        let session = Session::new(
            config,
            started,
            url,
            joined,
            pub_socket,
            sub_socket,
            stats.clone(),
            msg_tx,
        )?;
        let task = tokio::spawn(session.run(signal, command_rx));
        Ok(Client {
            stats,
            commands,
            messages,
            task,
        })
    }

    /// A copy of the current statistics.
    pub fn stats(&self) -> ClientStats {
        self.stats
            .lock()
            .expect("stats lock never poisoned")
            .clone()
    }

    /// Whether the client's task still runs: false after `left`, [`leave`](Self::leave),
    /// or an error that ended it (e.g. [`ClientError::ReconnectFailed`]).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Sends a protocol message (subscribe, set_layer, mute, …). While the client is
    /// reconnecting the message is held (up to a bound) and sent once joined again;
    /// offers and answers are dropped when the peer connections are replaced.
    pub async fn send(&self, msg: ClientMessage) {
        let _ = self.commands.send(Command::Send(msg)).await;
    }

    /// Hands the node a newer token (`refresh`) before the current one expires, so the
    /// session outlives the old token; later reconnections join with it too. The node
    /// answers `refreshed`, or ends the session when it refuses the token.
    pub async fn refresh(&self, token: impl Into<String>) {
        let _ = self.commands.send(Command::Refresh(token.into())).await;
    }

    /// Caps the layer received for a track.
    pub async fn set_max_layer(&self, track_id: &str, layer: Layer) {
        self.send(ClientMessage::SetLayer {
            track_id: track_id.to_string(),
            max_layer: layer,
        })
        .await;
    }

    /// Changes the impairment of the client's traffic.
    pub async fn impair(&self, config: Option<NetemConfig>) {
        let _ = self.commands.send(Command::Impair(config)).await;
    }

    /// Waits until `check` holds for the statistics, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&ClientStats) -> bool,
    ) -> Result<ClientStats, ClientStats> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut messages = self.messages.clone();
        loop {
            let s = self.stats();
            if check(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(s);
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), messages.changed()).await;
        }
    }

    /// Cuts the client's media path for `d`: every datagram of both media connections,
    /// in and out, is dropped, while signaling stays up (a dead path, for tests and
    /// chaos runs; the client repairs it by an ICE restart, see [`IceRestartPolicy`]).
    pub async fn cut_media(&self, d: Duration) {
        let _ = self.commands.send(Command::CutMedia(d)).await;
    }

    /// Leaves the room politely and waits for the session to end. While reconnecting
    /// there is no node to tell: the task just ends (the node drops the participant
    /// after its resume grace). Returns the error the task ended with, if it had.
    pub async fn leave(self) -> Result<(), ClientError> {
        let _ = self.commands.send(Command::Leave).await;
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ClientError::Signaling(e.to_string())),
            Err(_) => Err(ClientError::Timeout("leave")),
        }
    }

    /// Drops the signaling connection and media sockets without leaving (no
    /// reconnection follows).
    pub async fn disconnect(self) {
        let _ = self.commands.send(Command::Drop).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// What a `joined` said that the client keeps.
#[derive(Debug)]
struct Joined {
    participant_id: String,
    resume: String,
    restored: bool,
}

/// How one connection attempt ended.
enum Attempt {
    Joined { signal: Signal, joined: Joined },
    Redirect { region: String, url: String },
    Migrate { url: Option<String> },
    ResumeFailed,
    Refused { code: ErrorCode, message: String },
    Failed(ClientError),
}

/// Opens a signaling connection to `target`, sends `join` and waits for the answer.
async fn attempt(
    target: Target,
    join: ClientMessage,
    connect_timeout: Duration,
    join_timeout: Duration,
) -> Attempt {
    let mut signal = match tokio::time::timeout(connect_timeout, Signal::connect(&target)).await {
        Err(_) => return Attempt::Failed(ClientError::Timeout("signaling connection")),
        Ok(Err(e)) => return Attempt::Failed(e),
        Ok(Ok(s)) => s,
    };
    let deadline = tokio::time::Instant::now() + join_timeout;
    match tokio::time::timeout_at(deadline, signal.send(&join)).await {
        Err(_) => return Attempt::Failed(ClientError::Timeout("sending join")),
        Ok(Err(e)) => return Attempt::Failed(e),
        Ok(Ok(())) => {}
    }
    for _ in 0..MAX_MESSAGES_BEFORE_JOINED {
        let msg = match tokio::time::timeout_at(deadline, signal.recv()).await {
            Err(_) => return Attempt::Failed(ClientError::Timeout("joined")),
            Ok(Err(e)) => return Attempt::Failed(e),
            Ok(Ok(None)) => {
                return Attempt::Failed(ClientError::Signaling("closed before joined".into()));
            }
            Ok(Ok(Some(msg))) => msg,
        };
        match msg {
            ServerMessage::Joined {
                participant_id,
                resume,
                restored,
                ..
            } => {
                return Attempt::Joined {
                    signal,
                    joined: Joined {
                        participant_id,
                        resume,
                        restored,
                    },
                };
            }
            ServerMessage::Error {
                code: ErrorCode::ResumeFailed,
                ..
            } => return Attempt::ResumeFailed,
            ServerMessage::Error { code, message } => return Attempt::Refused { code, message },
            ServerMessage::Redirect { region, url } => return Attempt::Redirect { region, url },
            ServerMessage::Migrate { url, .. } => return Attempt::Migrate { url },
            _ => continue,
        }
    }
    Attempt::Failed(ClientError::Signaling(
        "too many messages before joined".into(),
    ))
}

/// A datagram in flight through the emulator.
#[derive(Clone)]
struct Datagram {
    publisher: bool,
    peer: SocketAddr,
    data: Vec<u8>,
}

impl str0m_netem::WithLen for Datagram {
    fn len(&self) -> usize {
        self.data.len()
    }
}

/// A received stream's jitter buffer.
struct Playout {
    mid: Mid,
    video: bool,
    buffer: jitter::JitterBuffer,
    /// Rebuilds lost video packets from the node's ULPFEC (when negotiated).
    fec: meridian_media::fec::FecDecoder,
}

/// A connection's socket: read by the session's task, or (a counting receiver's, once
/// connected) read by the counting thread, when the task only sends on it and the
/// runtime no longer watches it: a datagram then wakes no thread of the runtime (on a
/// veth pair the sender's CPU pays for each such wake-up, which would bill the load
/// generator's wake-ups to the node under test).
enum PcSocket {
    Task(UdpSocket),
    Counted(std::net::UdpSocket),
    /// While the socket changes hands, and after a hand-over that failed (sends fail).
    Moving,
}

impl PcSocket {
    fn try_send_to(&self, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match self {
            PcSocket::Task(s) => s.try_send_to(data, to),
            PcSocket::Counted(s) => s.send_to(data, to),
            PcSocket::Moving => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// The next datagram, if the task reads this socket; never ready otherwise.
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        match self {
            PcSocket::Task(s) => s.recv_from(buf).await,
            _ => std::future::pending().await,
        }
    }
}

struct Pc {
    rtc: Rtc,
    socket: PcSocket,
    local: SocketAddr,
    next_timeout: Instant,
    /// RTP mode: received packets come out as packets (for the client's own jitter
    /// buffer) instead of str0m's frames.
    rtp_mode: bool,
    /// Negotiate audio RED (`red/48000/2`).
    red: bool,
    /// Negotiate video FEC (subscriber side, RTP mode).
    fec: bool,
}

impl Pc {
    /// A new peer connection on the same socket.
    fn renew(&mut self, now: Instant) {
        self.rtc = new_rtc(now, self.local, self.rtp_mode, self.red, self.fec);
        self.next_timeout = now;
    }
}

/// The signaling side of a session: connected, or trying to join again.
enum Link {
    Up(Signal),
    Down(Box<Reconnecting>),
}

/// One reconnection attempt in flight: a delay, then [`attempt`]. Replaced as soon as
/// it resolves (a finished future is never polled again).
struct Reconnecting {
    future: Pin<Box<dyn Future<Output = Attempt> + Send>>,
}

enum LinkEvent {
    Message(Result<Option<ServerMessage>, ClientError>),
    Attempt(Attempt),
}

impl Link {
    /// The next server message, or the outcome of the reconnection attempt in flight.
    /// Cancel-safe: `Signal::recv` is, and the attempt future stays stored.
    async fn next(&mut self) -> LinkEvent {
        match self {
            Link::Up(signal) => LinkEvent::Message(signal.recv().await),
            Link::Down(r) => LinkEvent::Attempt(r.future.as_mut().await),
        }
    }
}

struct Session {
    config: ClientConfig,
    started: Instant,
    publisher: Pc,
    subscriber: Pc,
    pending_pub: Option<SdpPendingOffer>,
    video: Option<media::VideoSource>,
    audio: Option<media::AudioSource>,
    sub_tracks: HashMap<Mid, String>,
    /// Jitter buffers of the received streams (with `playout_deadline`), by SSRC.
    buffers: HashMap<Ssrc, Playout>,
    stats: Arc<Mutex<ClientStats>>,
    notify: watch::Sender<u64>,
    net_in: Option<Netem<Datagram>>,
    net_out: Option<Netem<Datagram>>,
    out_queue: Vec<ClientMessage>,
    /// Which node to try next and when, after a loss; knows the current URL.
    reconnector: Reconnector,
    participant_id: String,
    resume_token: String,
    /// The client's own tracks as the last `answer` named them.
    published: Vec<TrackInfo>,
    /// Last sign of life from the node (a message, or a datagram if the policy says so).
    last_heard: Instant,
    /// The counting receiver, once the subscriber connection is up (`count_only`).
    counter: Option<count::Counted>,
    /// The paths of the publisher (0) and subscriber (1) connections, for ICE restarts.
    paths: [PathWatch; 2],
    /// The outstanding publisher offer is an ICE restart (its answer names no tracks).
    restarting_pub: bool,
    /// Until when the media path is cut ([`Client::cut_media`]).
    cut_until: Option<Instant>,
}

/// Already-due timeouts one [`Session::poll`] handles at once before leaving the rest
/// to the loop's next wake-up.
const MAX_DUE_ROUNDS: usize = 4;

/// A client connection. The publisher side sends unpaced, as a synthetic source with
/// fixed layer rates has nothing to adapt (str0m's pacer would only add latency).
fn new_rtc(now: Instant, local: SocketAddr, rtp_mode: bool, red: bool, fec: bool) -> Rtc {
    let mut builder = Rtc::builder()
        .set_rtp_mode(rtp_mode)
        .clear_codecs()
        .enable_opus(true, red)
        .enable_vp8(true)
        .set_stats_interval(Some(Duration::from_secs(1)));
    if fec && rtp_mode {
        meridian_media::fec::add_codec(builder.codec_config());
    }
    let mut rtc = builder.build(now);
    rtc.add_local_candidate(Candidate::host(local, "udp").expect("valid host candidate"));
    rtc
}

/// The next datagram a counting receiver did not count, for the connection; never
/// ready without one.
async fn next_uncounted(counter: &mut Option<count::Counted>) -> Option<(SocketAddr, Vec<u8>)> {
    match counter {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// Socket errors that a UDP receive may report for an earlier send (ICMP), not a
/// broken socket: the node may be gone, which the signaling side handles.
fn transient_socket_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | HostUnreachable
            | NetworkUnreachable
            | Interrupted
            | WouldBlock
    )
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: ClientConfig,
        started: Instant,
        url: String,
        joined: Joined,
        pub_socket: UdpSocket,
        sub_socket: UdpSocket,
        stats: Arc<Mutex<ClientStats>>,
        notify: watch::Sender<u64>,
    ) -> Result<Session, ClientError> {
        let now = Instant::now();
        let pub_local = pub_socket.local_addr()?;
        let sub_local = sub_socket.local_addr()?;
        let seed = now_micros() ^ (u64::from(pub_local.port()) << 32) ^ u64::from(sub_local.port());
        let reconnector = if config.regions.is_empty() {
            Reconnector::new(
                config.reconnect.clone(),
                &config.url,
                &config.fallback_urls,
                &url,
                seed,
            )
        } else {
            let lists: Vec<Vec<String>> = config.regions.iter().map(|r| r.urls.clone()).collect();
            let at = lists
                .iter()
                .position(|l| l.contains(&url) || l.contains(&config.url))
                .unwrap_or(0);
            stats.lock().expect("stats lock never poisoned").region =
                Some(config.regions[at].region.clone());
            Reconnector::with_regions(config.reconnect.clone(), &lists, at, &url, seed)
        };
        let deadline_mode = config.playout_deadline.is_some() && !config.count_only;
        Ok(Session {
            net_in: config.impairment.map(Netem::new),
            net_out: config.impairment.map(Netem::new),
            publisher: Pc {
                rtc: new_rtc(now, pub_local, false, config.red, false),
                socket: PcSocket::Task(pub_socket),
                local: pub_local,
                next_timeout: now,
                rtp_mode: false,
                red: config.red,
                fec: false,
            },
            subscriber: Pc {
                rtc: new_rtc(now, sub_local, deadline_mode, config.red, config.fec),
                socket: PcSocket::Task(sub_socket),
                local: sub_local,
                next_timeout: now,
                rtp_mode: deadline_mode,
                red: config.red,
                fec: config.fec && deadline_mode,
            },
            buffers: HashMap::new(),
            config,
            started,
            pending_pub: None,
            video: None,
            audio: None,
            sub_tracks: HashMap::new(),
            stats,
            notify,
            out_queue: Vec::new(),
            reconnector,
            participant_id: joined.participant_id,
            resume_token: joined.resume,
            published: Vec::new(),
            last_heard: now,
            counter: None,
            paths: [PathWatch::new(), PathWatch::new()],
            restarting_pub: false,
            cut_until: None,
        })
    }

    fn publishes(&self) -> bool {
        self.config.publish_audio || self.config.publish_video
    }

    async fn run(
        mut self,
        signal: Signal,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<(), ClientError> {
        if self.publishes() {
            self.offer_publications(false)?;
        }
        let mut link = Link::Up(signal);
        let mut buf_pub = vec![0u8; 2048];
        let mut buf_sub = vec![0u8; 2048];
        let mut ping = tokio::time::interval(
            self.config
                .reconnect
                .ping_interval
                .max(Duration::from_millis(10)),
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_id = 0;
        loop {
            if let Link::Up(signal) = &mut link
                && !self.out_queue.is_empty()
            {
                let limit = self
                    .config
                    .reconnect
                    .ping_timeout
                    .max(Duration::from_millis(100));
                let mut failed = None;
                for msg in std::mem::take(&mut self.out_queue) {
                    match tokio::time::timeout(limit, signal.send(&msg)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            failed = Some(e.to_string());
                            break;
                        }
                        Err(_) => {
                            failed = Some("send timed out".to_string());
                            break;
                        }
                    }
                }
                if let Some(why) = failed {
                    link = self.lose(LossReason::Failed, None, &why)?;
                    continue;
                }
            }
            self.drain(Instant::now());
            let deadline = tokio::time::Instant::from_std(self.next_deadline());
            tokio::select! {
                event = link.next() => match event {
                    LinkEvent::Message(Ok(Some(ServerMessage::Left { reason }))) => {
                        debug!("left: {reason}");
                        if let Link::Up(signal) = link {
                            signal.close().await;
                        }
                        return Ok(());
                    }
                    LinkEvent::Message(Ok(Some(ServerMessage::Migrate { url, reason }))) => {
                        info!("node {} migrates the session ({reason}) to {url:?}", self.reconnector.url());
                        link = self.lose(LossReason::Migrate, url, &format!("migrate: {reason}"))?;
                    }
                    LinkEvent::Message(Ok(Some(ServerMessage::Redirect { region, url }))) => {
                        link = self.lose(
                            LossReason::Migrate,
                            Some(url),
                            &format!("redirect to region {region}"),
                        )?;
                    }
                    LinkEvent::Message(Ok(Some(msg))) => {
                        self.last_heard = Instant::now();
                        self.handle_server(msg)?;
                    }
                    LinkEvent::Message(Ok(None)) => {
                        link = self.lose(LossReason::Closed, None, "signaling closed")?;
                    }
                    LinkEvent::Message(Err(e)) => {
                        link = self.lose(LossReason::Failed, None, &e.to_string())?;
                    }
                    LinkEvent::Attempt(outcome) => {
                        link = self.attempted(outcome)?;
                    }
                },
                r = self.publisher.socket.recv_from(&mut buf_pub) => match r {
                    Ok((n, from)) => self.incoming(true, from, buf_pub[..n].to_vec()),
                    Err(e) if transient_socket_error(&e) => debug!("publisher socket: {e}"),
                    Err(e) => return Err(e.into()),
                },
                r = self.subscriber.socket.recv_from(&mut buf_sub) => match r {
                    Ok((n, from)) => self.incoming(false, from, buf_sub[..n].to_vec()),
                    Err(e) if transient_socket_error(&e) => debug!("subscriber socket: {e}"),
                    Err(e) => return Err(e.into()),
                },
                Some((from, data)) = next_uncounted(&mut self.counter) => {
                    self.incoming(false, from, data);
                },
                cmd = commands.recv() => match cmd {
                    Some(Command::Send(m)) => {
                        if self.out_queue.len() < MAX_HELD_MESSAGES {
                            self.out_queue.push(m);
                        } else {
                            warn!("client message dropped: {} held while reconnecting", MAX_HELD_MESSAGES);
                        }
                    }
                    Some(Command::Refresh(token)) => {
                        self.config.token = token.clone();
                        self.out_queue.push(ClientMessage::Refresh { token });
                    }
                    Some(Command::CutMedia(d)) => {
                        self.cut_until = Some(Instant::now() + d);
                    }
                    Some(Command::Impair(c)) => {
                        self.net_in = c.map(Netem::new);
                        self.net_out = c.map(Netem::new);
                    }
                    Some(Command::Leave) => {
                        let Link::Up(mut signal) = link else {
                            return Ok(());
                        };
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            signal.send(&ClientMessage::Leave),
                        )
                        .await;
                        // Wait briefly for `left`.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Ok(Some(m)) = signal.recv().await {
                                if matches!(m, ServerMessage::Left { .. }) {
                                    break;
                                }
                            }
                        }).await;
                        signal.close().await;
                        return Ok(());
                    }
                    Some(Command::Drop) | None => return Ok(()),
                },
                _ = ping.tick() => {
                    if matches!(link, Link::Up(_)) {
                        let silent = self.last_heard.elapsed();
                        if self.config.reconnect.enabled
                            && silent > self.config.reconnect.ping_timeout
                        {
                            let why = format!("nothing from the node for {silent:?}");
                            link = self.lose(LossReason::PingTimeout, None, &why)?;
                        } else {
                            ping_id += 1;
                            self.out_queue.push(ClientMessage::Ping { id: ping_id });
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.tick(Instant::now()).await;
                    if let Link::Up(_) = link {
                        self.restart_dead_paths(Instant::now())?;
                    }
                }
            }
        }
    }

    /// The node is lost: start reconnecting (to `to`, else the next node), or end the
    /// task when the policy says not to.
    fn lose(
        &mut self,
        reason: LossReason,
        to: Option<String>,
        why: &str,
    ) -> Result<Link, ClientError> {
        if !self.config.reconnect.enabled {
            return Err(ClientError::Signaling(why.to_string()));
        }
        warn!("lost node {} ({reason:?}): {why}", self.reconnector.url());
        let now = Instant::now();
        {
            let mut s = self.stats.lock().expect("stats lock never poisoned");
            s.losses += 1;
            if s.reconnect_history.len() < stats::MAX_RECONNECT_RECORDS {
                s.reconnect_history.push(ReconnectRecord {
                    reason,
                    lost_at: now,
                    from_url: self.reconnector.url().to_string(),
                    to_url: None,
                    kind: None,
                    attempts: 0,
                    joined_ms: None,
                    media_ms: None,
                    rehomed_to: None,
                });
            }
        }
        self.notify.send_modify(|n| *n += 1);
        self.out_queue
            .retain(|m| !matches!(m, ClientMessage::Ping { .. }));
        let step = self.reconnector.lost(now, to);
        self.step(step)
    }

    /// Follows the reconnector's `step`: starts the attempt it plans, or ends the task.
    fn step(&mut self, step: Step) -> Result<Link, ClientError> {
        let plan = match step {
            Step::Attempt(plan) => plan,
            Step::GiveUp {
                attempts,
                elapsed,
                last_error,
            } => {
                return Err(ClientError::ReconnectFailed {
                    attempts,
                    elapsed,
                    last_error,
                });
            }
            Step::Refused { code, message } => return Err(ClientError::Refused { code, message }),
        };
        debug!(
            "reconnect attempt {} to {} in {:?} (resume: {})",
            plan.number, plan.url, plan.delay, plan.resume
        );
        let target = Target::new(&self.config, &plan.url);
        let mut join = self
            .config
            .join_message(plan.resume.then(|| self.resume_token.clone()));
        if let (ClientMessage::Join { token, .. }, Some(region)) =
            (&mut join, self.config.regions.get(plan.region))
        {
            token.clone_from(&region.token);
        }
        let future = Box::pin(async move {
            tokio::time::sleep(plan.delay).await;
            attempt(target, join, plan.connect_timeout, plan.join_timeout).await
        });
        let lost_at = self.reconnector.lost_at();
        let mut s = self.stats.lock().expect("stats lock never poisoned");
        s.reconnect_attempts += 1;
        if let Some(rec) = s.reconnect_history.last_mut()
            && Some(rec.lost_at) == lost_at
        {
            rec.attempts = plan.number;
        }
        Ok(Link::Down(Box::new(Reconnecting { future })))
    }

    /// A reconnection attempt ended: up again, or the next attempt, or give up.
    fn attempted(&mut self, outcome: Attempt) -> Result<Link, ClientError> {
        let failure = match outcome {
            Attempt::Joined { signal, joined } => {
                self.rejoined(joined)?;
                return Ok(Link::Up(signal));
            }
            Attempt::Redirect { region, url } => {
                self.stats.lock().expect("stats lock").redirects += 1;
                AttemptFailure::Redirect { region, url }
            }
            Attempt::Migrate { url } => {
                if url.is_some() {
                    self.stats.lock().expect("stats lock").redirects += 1;
                }
                AttemptFailure::Migrate { url }
            }
            Attempt::ResumeFailed => AttemptFailure::ResumeFailed,
            Attempt::Refused { code, message } => AttemptFailure::Refused { code, message },
            Attempt::Failed(e) => AttemptFailure::Failed(e.to_string()),
        };
        debug!("reconnect attempt failed: {failure:?}");
        let step = self.reconnector.failed(Instant::now(), failure);
        self.step(step)
    }

    /// `joined` again after a loss: carry on, or rebuild the peer connections.
    fn rejoined(&mut self, joined: Joined) -> Result<(), ClientError> {
        let now = Instant::now();
        let Some(r) = self.reconnector.joined() else {
            return Err(ClientError::Signaling(
                "joined without a reconnection".into(),
            ));
        };
        let kind = if !r.resumed || joined.participant_id != self.participant_id {
            RejoinKind::Fresh
        } else if joined.restored {
            RejoinKind::Restored
        } else {
            RejoinKind::Resumed
        };
        info!(
            "joined again at {} as {} ({kind:?}) after {:?}",
            r.url,
            joined.participant_id,
            r.lost_at.elapsed()
        );
        self.last_heard = now;
        self.resume_token = joined.resume;
        self.participant_id = joined.participant_id;
        let region = self.config.regions.get(r.region).cloned();
        if let Some(region) = &region {
            // Later reconnections and refreshes in this region use its token.
            self.config.token.clone_from(&region.token);
        }
        match kind {
            RejoinKind::Resumed => {}
            RejoinKind::Restored => {
                self.out_queue.retain(|m| {
                    !matches!(
                        m,
                        ClientMessage::Offer { .. } | ClientMessage::Answer { .. }
                    )
                });
                self.rebuild(true)?;
            }
            RejoinKind::Fresh => {
                self.out_queue.clear();
                self.published.clear();
                self.rebuild(false)?;
            }
        }
        {
            let mut s = self.stats.lock().expect("stats lock never poisoned");
            s.reconnects += 1;
            match kind {
                RejoinKind::Resumed => {}
                RejoinKind::Restored => s.restored_resumes += 1,
                RejoinKind::Fresh => {
                    s.fresh_rejoins += 1;
                    s.published.clear();
                }
            }
            s.participant_id = self.participant_id.clone();
            s.url = r.url.clone();
            if let Some(region) = &region {
                s.region = Some(region.region.clone());
                if r.rehomed {
                    s.rehomes += 1;
                    if let Some(rec) = s.reconnect_history.last_mut()
                        && rec.lost_at == r.lost_at
                    {
                        rec.rehomed_to = Some(region.region.clone());
                    }
                }
            }
            if let Some(rec) = s.reconnect_history.last_mut()
                && rec.lost_at == r.lost_at
            {
                rec.to_url = Some(r.url.clone());
                rec.kind = Some(kind);
                rec.attempts = r.attempts;
                rec.joined_ms =
                    Some(now.saturating_duration_since(r.lost_at).as_secs_f64() * 1000.0);
            }
        }
        self.notify.send_modify(|n| *n += 1);
        Ok(())
    }

    /// New peer connections on the same sockets; re-publishes (with the earlier track
    /// ids when `carry_ids`). The node sends a new subscriber offer by itself.
    fn rebuild(&mut self, carry_ids: bool) -> Result<(), ClientError> {
        let now = Instant::now();
        self.publisher.renew(now);
        self.subscriber.renew(now);
        self.pending_pub = None;
        self.restarting_pub = false;
        self.paths = [PathWatch::new(), PathWatch::new()];
        self.sub_tracks.clear();
        self.buffers.clear();
        {
            let mut s = self.stats.lock().expect("stats lock never poisoned");
            s.publisher_connected = false;
            s.subscriber_connected = false;
        }
        if self.publishes() {
            self.offer_publications(carry_ids)?;
        }
        Ok(())
    }

    fn pc(&mut self, publisher: bool) -> &mut Pc {
        if publisher {
            &mut self.publisher
        } else {
            &mut self.subscriber
        }
    }

    /// Whether the media path is cut at `now` ([`Client::cut_media`]).
    fn cut(&mut self, now: Instant) -> bool {
        if self.cut_until.is_some_and(|t| now >= t) {
            self.cut_until = None;
        }
        self.cut_until.is_some()
    }

    /// Restarts ICE on each connection whose path died (signaling is up).
    fn restart_dead_paths(&mut self, now: Instant) -> Result<(), ClientError> {
        let policy = self.config.ice_restart.clone();
        if self.publishes()
            && self.pending_pub.is_none()
            && self.paths[0].restart_due(now, &policy, true)
        {
            info!("publisher media path dead: ICE restart");
            self.paths[0].restarted(now);
            let mut api = self.publisher.rtc.sdp_api();
            api.ice_restart(true);
            let (offer, pending) = api
                .apply()
                .ok_or_else(|| ClientError::Rtc("an ICE restart is a change".into()))?;
            self.pending_pub = Some(pending);
            self.restarting_pub = true;
            self.out_queue.push(ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                tracks: Vec::new(),
            });
            self.stats.lock().expect("stats lock").ice_restarts += 1;
        }
        if self
            .counter
            .as_ref()
            .is_some_and(count::Counted::media_since_last)
        {
            // Counted media is a live path too (it never reaches `incoming`).
            self.paths[1].on_datagram(now);
        }
        if self.paths[1].restart_due(now, &policy, true) {
            info!("subscriber media path dead: ICE restart");
            self.paths[1].restarted(now);
            self.out_queue.push(ClientMessage::IceRestart);
            self.stats.lock().expect("stats lock").ice_restarts += 1;
        }
        Ok(())
    }

    fn incoming(&mut self, publisher: bool, from: SocketAddr, data: Vec<u8>) {
        let now = Instant::now();
        if self.cut(now) {
            return;
        }
        self.paths[usize::from(!publisher)].on_datagram(now);
        if self.config.reconnect.media_keeps_alive {
            self.last_heard = now;
        }
        match &mut self.net_in {
            Some(net) => net.handle_input(str0m_netem::Input::Packet(
                now,
                Datagram {
                    publisher,
                    peer: from,
                    data,
                },
            )),
            None => self.deliver(now, publisher, from, &data),
        }
    }

    /// Hands the subscriber socket to the counting thread (`count_only`, once connected);
    /// on failure the task keeps reading it.
    fn start_counting(&mut self, video_pts: Vec<u8>) {
        let socket = match std::mem::replace(&mut self.subscriber.socket, PcSocket::Moving) {
            PcSocket::Task(socket) => socket,
            other => {
                self.subscriber.socket = other;
                return;
            }
        };
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                warn!("subscriber socket lost: {e}");
                return;
            }
        };
        match count::register(&socket, video_pts, self.stats.clone()) {
            Ok(c) => {
                self.counter = Some(c);
                self.subscriber.socket = PcSocket::Counted(socket);
            }
            Err(e) => {
                warn!("counting receiver: {e}");
                self.subscriber.socket =
                    UdpSocket::from_std(socket).map_or(PcSocket::Moving, PcSocket::Task);
            }
        }
    }

    fn deliver(&mut self, now: Instant, publisher: bool, from: SocketAddr, data: &[u8]) {
        let pc = self.pc(publisher);
        let Ok(receive) = Receive::new(Protocol::Udp, from, pc.local, data) else {
            return;
        };
        if let Err(e) = pc.rtc.handle_input(Input::Receive(now, receive)) {
            debug!("client input: {e}");
        }
        self.poll(now, publisher);
    }

    fn next_deadline(&self) -> Instant {
        let mut t = self
            .publisher
            .next_timeout
            .min(self.subscriber.next_timeout);
        if let Some(v) = &self.video {
            t = t.min(v.next_frame);
        }
        if let Some(a) = &self.audio {
            t = t.min(a.next_frame);
        }
        if let Some(n) = &self.net_in {
            t = t.min(n.poll_timeout());
        }
        for b in self.buffers.values() {
            if let Some(d) = b.buffer.poll_timeout() {
                t = t.min(d);
            }
        }
        if let Some(n) = &self.net_out {
            t = t.min(n.poll_timeout());
        }
        t.max(Instant::now() + Duration::from_micros(500))
            .min(Instant::now() + Duration::from_millis(100))
    }

    async fn tick(&mut self, now: Instant) {
        for publisher in [true, false] {
            let pc = self.pc(publisher);
            if pc.next_timeout <= now {
                let _ = pc.rtc.handle_input(Input::Timeout(now));
                self.poll(now, publisher);
            }
        }
        self.write_media(now);
        self.drain(now);
        self.play_out(now, None);
    }

    /// Plays out what the jitter buffers have due at `now` (only `ssrc`'s when given).
    fn play_out(&mut self, now: Instant, ssrc: Option<Ssrc>) {
        let ssrcs: Vec<Ssrc> = match ssrc {
            Some(s) => vec![s],
            None => self
                .buffers
                .iter()
                .filter(|(_, b)| b.buffer.poll_timeout().is_some_and(|t| t <= now))
                .map(|(s, _)| *s)
                .collect(),
        };
        let mut played = false;
        for ssrc in ssrcs {
            let Some(b) = self.buffers.get_mut(&ssrc) else {
                continue;
            };
            let track = self.sub_tracks.get(&b.mid).cloned().unwrap_or_default();
            let video = b.video;
            while let Some(out) = b.buffer.poll(now) {
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                match out {
                    jitter::Played::Frame {
                        data,
                        missing_reference,
                        first_arrival,
                        last_arrival,
                        ..
                    } => {
                        let since_start = self.started.elapsed().as_secs_f64() * 1000.0;
                        s.on_frame(
                            &track,
                            video,
                            &data,
                            now,
                            since_start,
                            Some((first_arrival, last_arrival)),
                        );
                        if missing_reference {
                            s.tracks
                                .entry(track.clone())
                                .or_default()
                                .frames_missing_reference += 1;
                        }
                        played = true;
                    }
                    jitter::Played::Skipped {
                        keyframe_wanted, ..
                    } => {
                        let t = s.tracks.entry(track.clone()).or_default();
                        t.skips += 1;
                        if keyframe_wanted {
                            t.keyframes_requested += 1;
                            drop(s);
                            if let Some(rx) = self.subscriber.rtc.direct_api().stream_rx(&ssrc) {
                                rx.request_keyframe(KeyframeRequestKind::Pli);
                            }
                        }
                    }
                }
            }
        }
        if played {
            self.notify.send_modify(|n| *n += 1);
        }
    }

    /// Puts a received RTP packet (RTP mode) into its stream's jitter buffer and plays
    /// out what became due.
    fn on_rtp(&mut self, now: Instant, p: str0m::rtp::RtpPacket) {
        let Some(deadline) = self.config.playout_deadline else {
            return;
        };
        let ssrc = p.header.ssrc;
        if !self.buffers.contains_key(&ssrc) {
            let Some(mid) = self
                .subscriber
                .rtc
                .direct_api()
                .stream_rx(&ssrc)
                .map(|s| s.mid())
            else {
                return;
            };
            let Some(video) = self.subscriber.rtc.media(mid).map(|m| m.kind().is_video()) else {
                return;
            };
            if self.buffers.len() >= 64 {
                return;
            }
            self.buffers.insert(
                ssrc,
                Playout {
                    mid,
                    video,
                    buffer: jitter::JitterBuffer::new(video, deadline),
                    fec: Default::default(),
                },
            );
        }
        let b = self.buffers.get_mut(&ssrc).expect("inserted above");
        if !b.video {
            let red_pt = self
                .subscriber
                .rtc
                .codec_config()
                .find(|c| c.red() == Some(p.header.payload_type))
                .map(|c| c.pt());
            if let Some(opus_pt) = red_pt {
                let Ok(blocks) = str0m::rtp::RedDecoder::decode(&p.payload) else {
                    return;
                };
                let mut recovered = 0;
                for block in blocks.iter().filter(|b| b.pt == *opus_pt) {
                    // Opus frames of 20 ms (960 ticks): a block `offset` ticks older is
                    // about offset / 960 packets back (the synthetic source's clock
                    // follows its timer, so offsets are near, not at, multiples).
                    let back = u64::from((block.timestamp_offset + 480) / 960);
                    if (back == 0 && !block.is_primary) || back > 8 || back > *p.seq_no {
                        continue;
                    }
                    let new = b.buffer.insert(
                        now,
                        jitter::Packet {
                            seq: *p.seq_no - back,
                            timestamp: u64::from(
                                p.header.timestamp.wrapping_sub(block.timestamp_offset),
                            ),
                            marker: true,
                            frame_start: true,
                            keyframe: false,
                            payload: block.payload.to_vec(),
                        },
                    );
                    if new && back > 0 {
                        recovered += 1;
                    }
                }
                if recovered > 0 {
                    let track = self.sub_tracks.get(&b.mid).cloned().unwrap_or_default();
                    let mut s = self.stats.lock().expect("stats lock never poisoned");
                    s.tracks.entry(track).or_default().red_recovered += recovered;
                }
                self.play_out(now, Some(ssrc));
                return;
            }
        }
        if b.video && *p.header.payload_type == meridian_media::fec::RED_PT {
            self.on_fec_rtp(now, ssrc, &p);
            return;
        }
        let (frame_start, keyframe, at) = if b.video {
            match jitter::vp8_descriptor(&p.payload) {
                Some(d) => d,
                None => return,
            }
        } else {
            (true, false, 0)
        };
        b.buffer.insert(
            now,
            jitter::Packet {
                seq: *p.seq_no,
                timestamp: u64::from(p.header.timestamp),
                marker: p.header.marker,
                frame_start,
                keyframe,
                payload: p.payload[at..].to_vec(),
            },
        );
        self.play_out(now, Some(ssrc));
    }

    /// A video packet in RED (`meridian_media::fec`): VP8 goes to the jitter buffer
    /// and the FEC decoder; a ULPFEC packet's sequence number is padding to the jitter
    /// buffer, and whatever it lets the decoder rebuild joins the buffer as received.
    fn on_fec_rtp(&mut self, now: Instant, ssrc: str0m::rtp::Ssrc, p: &str0m::rtp::RtpPacket) {
        use meridian_media::fec::{self, MediaPacket};
        let Some(b) = self.buffers.get_mut(&ssrc) else {
            return;
        };
        let Ok((block_pt, body)) = fec::red_unwrap(&p.payload) else {
            return;
        };
        let ext = *p.seq_no;
        let seq16 = p.header.sequence_number;
        // Extends a rebuilt packet's 16-bit sequence number next to this packet's.
        let extend = |s: u16| ext.wrapping_add_signed(i64::from(s.wrapping_sub(seq16) as i16));
        let mut packets = Vec::new();
        let rebuilt = if block_pt == fec::ULPFEC_PT {
            b.buffer.insert_padding(ext);
            let rebuilt = b.fec.on_fec(body).unwrap_or_default();
            for s in std::mem::take(&mut b.fec.lost_parity) {
                b.buffer.insert_padding(extend(s));
            }
            rebuilt
        } else {
            let media = MediaPacket {
                seq: seq16,
                ts: p.header.timestamp,
                pt: block_pt,
                marker: p.header.marker,
                ext: std::sync::Arc::from(Vec::new()),
                payload: body.to_vec(),
            };
            let rebuilt = b.fec.on_media(media.clone());
            packets.push(media);
            rebuilt
        };
        let recovered = rebuilt.len() as u64;
        packets.extend(rebuilt);
        for m in packets {
            let Some((frame_start, keyframe, at)) = jitter::vp8_descriptor(&m.payload) else {
                continue;
            };
            b.buffer.insert(
                now,
                jitter::Packet {
                    seq: extend(m.seq),
                    timestamp: u64::from(m.ts),
                    marker: m.marker,
                    frame_start,
                    keyframe,
                    payload: m.payload[at..].to_vec(),
                },
            );
        }
        if recovered > 0 {
            let track = self.sub_tracks.get(&b.mid).cloned().unwrap_or_default();
            let mut s = self.stats.lock().expect("stats lock never poisoned");
            s.tracks.entry(track).or_default().fec_recovered += recovered;
        }
        self.play_out(now, Some(ssrc));
    }

    /// Moves datagrams through the emulators and out of the sockets.
    fn drain(&mut self, now: Instant) {
        if let Some(mut net) = self.net_in.take() {
            net.handle_input(str0m_netem::Input::Timeout(now));
            while let Some(out) = net.poll_output() {
                if let str0m_netem::Output::Packet(d) = out {
                    self.deliver(now, d.publisher, d.peer, &d.data);
                }
            }
            self.net_in = Some(net);
        }
        let mut sent = Vec::new();
        if let Some(net) = &mut self.net_out {
            net.handle_input(str0m_netem::Input::Timeout(now));
            while let Some(out) = net.poll_output() {
                if let str0m_netem::Output::Packet(d) = out {
                    let socket = if d.publisher {
                        &self.publisher.socket
                    } else {
                        &self.subscriber.socket
                    };
                    let _ = socket.try_send_to(&d.data, d.peer);
                    if d.publisher {
                        sent.push(d.data);
                    }
                }
            }
        }
        for data in sent {
            self.note_sent(&data);
        }
    }

    /// Publisher: records how long after its write a video frame's last packet left
    /// (`ClientStats::frame_sent_ms`).
    fn note_sent(&self, datagram: &[u8]) {
        if datagram.get(1).is_none_or(|b| b & 0x80 == 0) {
            return; // no RTP marker
        }
        let Some(pt) = self
            .video
            .as_ref()
            .and_then(|_| media::vp8_pt(&self.publisher.rtc))
        else {
            return;
        };
        if let Some(ms) = media::frame_sent_ms(datagram, *pt, Instant::now()) {
            self.stats
                .lock()
                .expect("stats lock never poisoned")
                .on_frame_sent(ms);
        }
    }

    /// Drains a connection's output, then handles its timeouts that are already due
    /// ([`meridian_media::due_rounds`], at most [`MAX_DUE_ROUNDS`]): str0m asks for one
    /// whenever written media waits to be packetized or released by its pacer, and
    /// left to the loop's next wake-up (≥ 1 ms each on tokio's timer) a frame waited
    /// two of them before leaving.
    fn poll(&mut self, now: Instant, publisher: bool) {
        self.drain_pc(now, publisher);
        meridian_media::due_rounds(
            self,
            MAX_DUE_ROUNDS,
            Instant::now,
            |s| {
                if publisher {
                    s.publisher.next_timeout
                } else {
                    s.subscriber.next_timeout
                }
            },
            |s, at| {
                if let Err(e) = s.pc(publisher).rtc.handle_input(Input::Timeout(at)) {
                    debug!("client timeout: {e}");
                }
                s.drain_pc(now, publisher);
            },
        );
    }

    /// Sends, emulates or handles a connection's output until it asks for a timeout.
    fn drain_pc(&mut self, now: Instant, publisher: bool) {
        loop {
            let out = self.pc(publisher).rtc.poll_output();
            match out {
                Ok(Output::Timeout(t)) => {
                    self.pc(publisher).next_timeout = t;
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    if self.cut(now) {
                        continue;
                    }
                    let data: Vec<u8> = t.contents.into();
                    match &mut self.net_out {
                        Some(net) => net.handle_input(str0m_netem::Input::Packet(
                            now,
                            Datagram {
                                publisher,
                                peer: t.destination,
                                data,
                            },
                        )),
                        None => {
                            let _ = self.pc(publisher).socket.try_send_to(&data, t.destination);
                            if publisher {
                                self.note_sent(&data);
                            }
                        }
                    }
                }
                Ok(Output::Event(e)) => self.handle_event(now, publisher, e),
                Err(e) => {
                    warn!("client connection failed: {e}");
                    self.pc(publisher).next_timeout = now + Duration::from_secs(3600);
                    return;
                }
            }
        }
    }

    fn handle_event(&mut self, now: Instant, publisher: bool, e: Event) {
        match e {
            Event::IceConnectionStateChange(state) => {
                let down = state == str0m::IceConnectionState::Disconnected;
                self.paths[usize::from(!publisher)].on_ice(now, down);
            }
            Event::Connected => {
                self.paths[usize::from(!publisher)].on_connected(now);
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                if publisher {
                    s.publisher_connected = true;
                } else {
                    s.subscriber_connected = true;
                }
                drop(s);
                if !publisher && self.config.count_only && self.counter.is_none() {
                    let video_pts = self
                        .subscriber
                        .rtc
                        .codec_config()
                        .iter()
                        .filter(|p| {
                            matches!(
                                p.spec().codec,
                                str0m::format::Codec::Vp8 | str0m::format::Codec::H264
                            )
                        })
                        .map(|p| *p.pt())
                        .collect();
                    self.start_counting(video_pts);
                }
            }
            Event::KeyframeRequest(KeyframeRequest { rid, .. }) => {
                if let Some(v) = &mut self.video {
                    v.request_keyframe(rid.and_then(|r| Layer::from_rid(&r.to_string())));
                }
                self.stats.lock().expect("stats lock").keyframe_requests += 1;
            }
            Event::RtpPacket(p) if !publisher => self.on_rtp(now, p),
            Event::MediaData(data) if !publisher => {
                let track = self.sub_tracks.get(&data.mid).cloned().unwrap_or_default();
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                let first_frame_ms = self.started.elapsed().as_secs_f64() * 1000.0;
                let video = data.params.spec().codec.is_video();
                s.on_frame(&track, video, &data.data, now, first_frame_ms, None);
                drop(s);
                self.notify.send_modify(|n| *n += 1);
            }
            Event::MediaIngressStats(st) if !publisher => {
                let track = self.sub_tracks.get(&st.mid).cloned().unwrap_or_default();
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                let t = s.tracks.entry(track).or_default();
                t.packets = st.packets;
                t.loss = st.loss.map(f64::from);
            }
            _ => {}
        }
    }

    fn write_media(&mut self, now: Instant) {
        if let Some(v) = &mut self.video {
            v.write_due(now, &mut self.publisher.rtc);
        }
        if let Some(a) = &mut self.audio {
            a.write_due(now, &mut self.publisher.rtc);
        }
        self.poll(now, true);
    }

    /// Offers the client's publications on the publisher connection. With
    /// `carry_ids` (a restored session) each announcement names the track id it had
    /// before; existing sources move to the new media sections and go on counting.
    fn offer_publications(&mut self, carry_ids: bool) -> Result<(), ClientError> {
        let mut api = self.publisher.rtc.sdp_api();
        let mut tracks = Vec::new();
        let mut video_mid = None;
        let mut audio_mid = None;
        if self.config.publish_audio {
            let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            audio_mid = Some(mid);
            tracks.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Audio,
                source: "microphone".into(),
                layers: vec![],
                track_id: None,
            });
        }
        if self.config.publish_video {
            let simulcast = (!self.config.layers.is_empty()).then(|| {
                let mut s = Simulcast::new();
                for l in &self.config.layers {
                    s.add_send_layer(SimulcastLayer::new(l.rid()));
                }
                s
            });
            let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast);
            video_mid = Some(mid);
            tracks.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Video,
                source: "camera".into(),
                layers: self.config.layers.clone(),
                track_id: None,
            });
        }
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| ClientError::Rtc("nothing to offer".into()))?;
        if carry_ids {
            reconnect::carry_track_ids(&mut tracks, &self.published);
        }
        self.pending_pub = Some(pending);
        let now = Instant::now();
        if let Some(mid) = video_mid {
            match &mut self.video {
                Some(v) => v.move_to(mid),
                None => {
                    self.video = Some(media::VideoSource::new(
                        mid,
                        self.config.layers.clone(),
                        self.config.layer_bitrates,
                        self.config.fps,
                        self.config.keyframe_interval,
                        now,
                    ))
                }
            }
        }
        if let Some(mid) = audio_mid {
            match &mut self.audio {
                Some(a) => a.move_to(mid),
                None => self.audio = Some(media::AudioSource::new(mid, now)),
            }
        }
        self.out_queue.push(ClientMessage::Offer {
            sdp: offer.to_sdp_string(),
            tracks,
        });
        self.poll(now, true);
        Ok(())
    }

    fn handle_server(&mut self, msg: ServerMessage) -> Result<(), ClientError> {
        let now = Instant::now();
        match msg {
            ServerMessage::Answer { sdp, tracks } => {
                let answer = SdpAnswer::from_sdp_string(&sdp)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                let pending = self
                    .pending_pub
                    .take()
                    .ok_or_else(|| ClientError::Rtc("answer without offer".into()))?;
                self.publisher
                    .rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                // An ICE restart's answer creates no tracks: the published ones stay.
                if !std::mem::take(&mut self.restarting_pub) {
                    self.published = tracks.clone();
                    self.stats.lock().expect("stats lock").published = tracks;
                }
                self.poll(now, true);
            }
            ServerMessage::Offer { sdp, tracks } => {
                let sdp = meridian_media::fec::sdp_from_wire(&sdp);
                let offer =
                    SdpOffer::from_sdp_string(&sdp).map_err(|e| ClientError::Rtc(e.to_string()))?;
                for t in &tracks {
                    self.sub_tracks
                        .insert(Mid::from(t.mid.as_str()), t.track_id.clone());
                }
                let answer = self
                    .subscriber
                    .rtc
                    .sdp_api()
                    .accept_offer(offer)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                self.out_queue.push(ClientMessage::Answer {
                    sdp: meridian_media::fec::sdp_to_wire(&answer.to_sdp_string()),
                });
                self.poll(now, false);
            }
            other => {
                let mut s = self.stats.lock().expect("stats lock");
                s.on_message(&other);
            }
        }
        self.notify.send_modify(|n| *n += 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_start_at_url_and_drop_duplicates() {
        let c = ClientConfig::new("ws://b/signal", "t").with_fallback_urls([
            "ws://a/signal",
            "ws://b/signal",
            "ws://c/signal",
        ]);
        assert_eq!(
            c.node_urls(),
            ["ws://b/signal", "ws://a/signal", "ws://c/signal"]
        );
        assert!(c.reconnect.enabled, "reconnection is on by default");
        assert!(!c.without_reconnect().reconnect.enabled);
    }

    #[test]
    fn webtransport_nodes_trust_every_certificate() {
        let ep = |u: &str, h: u8| WebTransportEndpoint {
            url: u.into(),
            certificate_hashes: vec![[h; 32]],
        };
        let eps = [
            ep("https://a/signal", 1),
            ep("https://b/signal", 2),
            ep("https://c/signal", 1),
        ];
        let c = ClientConfig::new("ws://x/signal", "t").over_webtransport_nodes(&eps, 4);
        assert_eq!(c.url, "https://b/signal");
        assert_eq!(c.transport, Transport::WebTransport);
        assert_eq!(c.fallback_urls, ["https://c/signal", "https://a/signal"]);
        assert_eq!(c.server_certificate_hashes, vec![[1; 32], [2; 32]]);
        let same = ClientConfig::new("ws://x/signal", "t").over_webtransport_nodes(&[], 0);
        assert_eq!(same.url, "ws://x/signal");
    }

    #[test]
    fn final_refusals_end_reconnection() {
        assert!(refusal_is_final(ErrorCode::Unauthorized));
        assert!(refusal_is_final(ErrorCode::Forbidden));
        assert!(!refusal_is_final(ErrorCode::CapacityExceeded));
        assert!(!refusal_is_final(ErrorCode::Internal));
        assert!(!refusal_is_final(ErrorCode::Timeout));
    }

    #[test]
    fn socket_errors_from_a_gone_peer_are_not_fatal() {
        use std::io::{Error, ErrorKind};
        assert!(transient_socket_error(&Error::from(
            ErrorKind::ConnectionRefused
        )));
        assert!(!transient_socket_error(&Error::from(
            ErrorKind::PermissionDenied
        )));
    }
}
