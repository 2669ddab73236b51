//! WebTransport signaling: the same sessions as WebSocket, over HTTP/3 (`wtransport`,
//! on quinn and rustls).
//!
//! A client opens a WebTransport session at `https://HOST:PORT/signal`, then ONE
//! bidirectional stream. Each message on that stream, in both directions, is a 4-byte
//! big-endian length followed by that many bytes of JSON (the same messages as the
//! WebSocket text frames). A length above `signaling.max_message_bytes` is answered
//! with `error{code:"message_too_large"}` without reading the body, and the stream is
//! closed. Everything above the framing is [`run_session`], shared with WebSocket.
//!
//! Certificates: with `webtransport.tls_cert`/`tls_key` the node serves those (PEM),
//! and re-reads them every `internal.reload_interval_secs`: a renewed pair (a
//! cert-manager rotation) is used for new connections without a restart; a pair that
//! does not load is logged and counted (`meridian_certificate_reloads_total`) and the
//! old one stays.
//! Without them it generates at start a self-signed ECDSA P-256 certificate for
//! `127.0.0.1`, `localhost` and `::1`, valid for less than 14 days (the most browsers
//! accept for `serverCertificateHashes`), renews it before it expires, and publishes its
//! SHA-256 at `GET /webtransport/certificate-hashes` (see `http.rs`).
//!
//! Bounds: at most `signaling.max_connections` WebTransport connections (handshakes
//! included) and at most that many signaling sessions across both transports; QUIC
//! flow-control windows sized to the message limit, four concurrent bidirectional
//! streams; the handshake and the first stream must each arrive within the join
//! timeout, then the session's own join and idle timeouts apply. A client that
//! vanishes is noticed by QUIC within 8 s (idle timeout, keep-alive every 2 s), about
//! as fast as a WebSocket client.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::debug;
use wtransport::endpoint::IncomingSession;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::quinn::{IdleTimeout, TransportConfig, VarInt as QuicVarInt};
use wtransport::{Endpoint, Identity, RecvStream, SendStream, ServerConfig, VarInt};

use crate::config::{Config, WebTransportConfig};
use crate::signal::{Frame, run_session};
use crate::{NodeError, NodeState};

/// The path WebTransport sessions are opened on.
pub(crate) const PATH: &str = "/signal";

/// Validity of a generated development certificate (browsers accept at most 14 days).
const SELF_SIGNED_VALIDITY_DAYS: u32 = 13;

/// A generated certificate is replaced this long after it was made.
const SELF_SIGNED_RENEW_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);

/// Application close code: the session ended normally.
const CLOSE_OK: u32 = 0;
/// Application close code: no stream (or no session request) within the join timeout.
const CLOSE_TIMEOUT: u32 = 1;

/// How long a finished stream may wait for the peer to acknowledge its last bytes.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Outgoing messages queued between the session and the stream writer.
const OUT_QUEUE: usize = 16;

/// What the HTTP listener publishes about the WebTransport listener.
#[derive(Clone)]
pub(crate) struct Advert {
    /// The bound UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of the served self-signed certificate; empty with real certificates.
    hashes: Arc<RwLock<Vec<[u8; 32]>>>,
}

impl Advert {
    /// The current certificate hashes.
    pub fn hashes(&self) -> Vec<[u8; 32]> {
        self.hashes
            .read()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn set_hashes(&self, hashes: Vec<[u8; 32]>) {
        match self.hashes.write() {
            Ok(mut h) => *h = hashes,
            Err(e) => *e.into_inner() = hashes,
        }
    }
}

/// A bound, not yet serving, WebTransport listener.
pub(crate) struct Listener {
    endpoint: Endpoint<Server>,
    advert: Advert,
    self_signed: bool,
    /// When the served certificate expires (Unix seconds).
    not_after: Option<i64>,
}

impl Listener {
    /// What to publish over HTTP.
    pub fn advert(&self) -> Advert {
        self.advert.clone()
    }

    /// When the served certificate expires (Unix seconds), for
    /// `meridian_certificate_expiry_seconds{cert="webtransport"}`.
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }
}

fn identity_not_after(identity: &Identity) -> Option<i64> {
    let first = identity.certificate_chain().as_slice().first()?;
    crate::internal::not_after(first.der())
}

fn self_signed_identity() -> Result<Identity, NodeError> {
    Identity::self_signed_builder()
        .subject_alt_names(["127.0.0.1", "localhost", "::1"])
        .from_now_utc()
        .validity_days(SELF_SIGNED_VALIDITY_DAYS)
        .build()
        .map_err(|e| NodeError::Certificate(format!("generating a self-signed certificate: {e}")))
}

/// QUIC idle timeout: a peer silent this long is gone (the session ends).
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// QUIC keep-alive interval, well inside [`QUIC_IDLE_TIMEOUT`].
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// QUIC limits sized to signaling: a few streams, windows of about two messages.
fn transport_config(config: &Config) -> TransportConfig {
    let s = &config.signaling;
    let stream_window = 2 * (s.max_message_bytes as u32 + 4);
    let mut t = TransportConfig::default();
    // The HTTP/3 CONNECT stream, the signaling stream, and slack for a reconnect race.
    t.max_concurrent_bidi_streams(QuicVarInt::from_u32(4));
    // HTTP/3 control and QPACK streams.
    t.max_concurrent_uni_streams(QuicVarInt::from_u32(8));
    t.stream_receive_window(QuicVarInt::from_u32(stream_window));
    t.receive_window(QuicVarInt::from_u32(4 * stream_window));
    t.send_window(8 * u64::from(stream_window));
    // A client that vanishes (tab killed, network gone) is noticed by QUIC's idle
    // timeout, as fast as a WebSocket's: keep-alive PINGs every 2 s keep a live but
    // quiet connection open, and 8 s without anything from the peer closes it.
    t.max_idle_timeout(IdleTimeout::try_from(QUIC_IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    t
}

fn server_config(config: &Config, bind: SocketAddr, identity: Identity) -> ServerConfig {
    ServerConfig::builder()
        .with_bind_address(bind)
        .with_custom_transport(identity, transport_config(config))
        .build()
}

/// Loads or generates the certificate and binds the UDP socket.
pub(crate) async fn bind(config: &Config) -> Result<Listener, NodeError> {
    let WebTransportConfig {
        addr,
        tls_cert,
        tls_key,
    } = &config.webtransport;
    let (identity, self_signed) = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => (
            Identity::load_pemfiles(cert, key).await.map_err(|e| {
                NodeError::Certificate(format!(
                    "loading {} and {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?,
            false,
        ),
        _ => (self_signed_identity()?, true),
    };
    let not_after = identity_not_after(&identity);
    let hashes = if self_signed {
        identity_hashes(&identity)
    } else {
        Vec::new()
    };
    let bind_err = |source| NodeError::Bind {
        what: "WebTransport UDP socket",
        addr: *addr,
        source,
    };
    let endpoint = Endpoint::server(server_config(config, *addr, identity)).map_err(bind_err)?;
    let bound = endpoint.local_addr().map_err(bind_err)?;
    Ok(Listener {
        endpoint,
        advert: Advert {
            addr: bound,
            hashes: Arc::new(RwLock::new(hashes)),
        },
        self_signed,
        not_after,
    })
}

fn identity_hashes(identity: &Identity) -> Vec<[u8; 32]> {
    identity
        .certificate_chain()
        .as_slice()
        .first()
        .map(|c| *c.hash().as_ref())
        .into_iter()
        .collect()
}

/// Accepts WebTransport sessions until `shutdown` turns true.
pub(crate) async fn serve(
    listener: Listener,
    state: NodeState,
    mut shutdown: watch::Receiver<bool>,
) {
    let Listener {
        endpoint,
        advert,
        self_signed,
        ..
    } = listener;
    let max = state.config.signaling.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let mut renew_at = tokio::time::Instant::now() + SELF_SIGNED_RENEW_AFTER;
    let files = match (
        &state.config.webtransport.tls_cert,
        &state.config.webtransport.tls_key,
    ) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ => None,
    };
    let mut loaded = match &files {
        Some(f) => read_pair(f).await,
        None => None,
    };
    let mut reload = tokio::time::interval(Duration::from_secs(
        state.config.internal.reload_interval_secs,
    ));
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = reload.tick(), if files.is_some() => {
                if let Some(f) = &files {
                    reload_files(&endpoint, &state, &advert, f, &mut loaded).await;
                }
                continue;
            }
            // The guard `wait_for` returns is not `Send`: drop it inside.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            _ = tokio::time::sleep_until(renew_at), if self_signed => {
                renew_at += SELF_SIGNED_RENEW_AFTER;
                renew(&endpoint, &state, &advert);
                continue;
            }
        };
        let open = state.metrics.signaling_connections_open.get();
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) if open < max as i64 => p,
            _ => {
                debug!(peer = %incoming.remote_address(), "WebTransport connection refused: too many connections");
                incoming.refuse();
                continue;
            }
        };
        // Counted against the source address together with its HTTP connections.
        let Some(slot) = state.limits.connect(incoming.remote_address().ip()) else {
            state.metrics.limit_refused("connections_per_ip");
            incoming.refuse();
            continue;
        };
        if !state
            .connection_budget
            .allow(incoming.remote_address().ip(), std::time::Instant::now())
        {
            state.metrics.limit_refused("node_connection_share");
            incoming.refuse();
            continue;
        }
        tokio::spawn(connection(state.clone(), incoming, (permit, slot)));
    }
    endpoint.close(VarInt::from_u32(CLOSE_OK), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// The bytes of a certificate and key file pair; `None` when either cannot be read.
async fn read_pair(files: &(std::path::PathBuf, std::path::PathBuf)) -> Option<(Vec<u8>, Vec<u8>)> {
    let cert = tokio::fs::read(&files.0).await.ok()?;
    let key = tokio::fs::read(&files.1).await.ok()?;
    Some((cert, key))
}

/// Loads the configured certificate again when its files changed (by content, so a
/// symlink swap counts) and serves it to new connections.
async fn reload_files(
    endpoint: &Endpoint<Server>,
    state: &NodeState,
    advert: &Advert,
    files: &(std::path::PathBuf, std::path::PathBuf),
    loaded: &mut Option<(Vec<u8>, Vec<u8>)>,
) {
    let Some(now) = read_pair(files).await else {
        return;
    };
    if loaded.as_ref() == Some(&now) {
        return;
    }
    let result = match Identity::load_pemfiles(&files.0, &files.1).await {
        Ok(identity) => {
            let at = identity_not_after(&identity);
            endpoint
                .reload_config(server_config(&state.config, advert.addr, identity), false)
                .map(|()| at)
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(at) => {
            if let Some(at) = at {
                state.metrics.set_certificate_expiry("webtransport", at);
            }
            state.metrics.certificate_reloaded("ok");
            tracing::info!(cert = %files.0.display(), "WebTransport certificate reloaded");
            *loaded = Some(now);
        }
        Err(e) => {
            // Counted at each check until the files load (a rotation half written).
            state.metrics.certificate_reloaded("error");
            tracing::warn!("WebTransport certificate not reloaded, keeping the previous one: {e}");
        }
    }
}

fn renew(endpoint: &Endpoint<Server>, state: &NodeState, advert: &Advert) {
    let renewed = self_signed_identity().and_then(|identity| {
        let hashes = identity_hashes(&identity);
        if let Some(at) = identity_not_after(&identity) {
            state.metrics.set_certificate_expiry("webtransport", at);
        }
        let cfg = server_config(&state.config, advert.addr, identity);
        endpoint
            .reload_config(cfg, false)
            .map_err(|e| NodeError::Certificate(format!("reloading: {e}")))?;
        Ok(hashes)
    });
    match renewed {
        Ok(hashes) => {
            advert.set_hashes(hashes);
            tracing::info!("renewed the self-signed WebTransport certificate");
        }
        Err(e) => tracing::error!("cannot renew the WebTransport certificate: {e}"),
    }
}

async fn connection(
    state: NodeState,
    incoming: IncomingSession,
    _permit: (OwnedSemaphorePermit, crate::limits::IpSlot),
) {
    let join_timeout = Duration::from_secs(state.config.signaling.join_timeout_secs);
    let peer = incoming.remote_address();
    let handshake = tokio::time::timeout(join_timeout, async {
        let request = incoming.await.ok()?;
        let path = request.path().split('?').next().unwrap_or_default();
        if path != PATH {
            request.not_found().await;
            return None;
        }
        // Like WebSocket upgrades: a browser page may open a session only from the
        // node's own host or a configured public name (non-browser clients send none).
        if let Some(origin) = request.origin()
            && !state
                .hosts
                .origin_allowed_any_port(origin, request.authority())
        {
            state.metrics.host_refusals.inc();
            debug!(%peer, origin = %meridian_protocol::clip(origin, 128), "WebTransport session refused: foreign origin");
            request.forbidden().await;
            return None;
        }
        request.accept().await.ok()
    })
    .await;
    let Ok(Some(conn)) = handshake else {
        debug!(%peer, "WebTransport handshake failed or timed out");
        return;
    };
    debug!(%peer, "WebTransport signaling connection");
    let (send, recv) = match tokio::time::timeout(join_timeout, conn.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%peer, "WebTransport connection ended before a stream: {e}");
            return;
        }
        Err(_) => {
            conn.close(
                VarInt::from_u32(CLOSE_TIMEOUT),
                b"timeout: no stream opened within the join timeout",
            );
            return;
        }
    };
    let max = state.config.signaling.max_message_bytes;
    let (out_tx, out_rx) = mpsc::channel::<String>(OUT_QUEUE);
    let writer = tokio::spawn(write_frames(send, out_rx));
    let outgoing = futures_util::sink::unfold(out_tx, |tx, text: String| async move {
        tx.send(text).await.map_err(|_| StreamClosed)?;
        Ok::<_, StreamClosed>(tx)
    });
    run_session(
        state,
        peer,
        Box::pin(read_frames(recv, max)),
        Box::pin(outgoing),
    )
    .await;
    // The session dropped its sink: the writer finishes the stream and waits (bounded)
    // for the last bytes to be acknowledged before the connection closes.
    let _ = tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), writer).await;
    conn.close(VarInt::from_u32(CLOSE_OK), b"");
}

/// The outgoing side of a session has gone.
#[derive(Debug)]
struct StreamClosed;

/// Writes each message as a length-prefixed frame; finishes the stream at the end.
async fn write_frames(mut send: SendStream, mut rx: mpsc::Receiver<String>) {
    while let Some(text) = rx.recv().await {
        let Ok(len) = u32::try_from(text.len()) else {
            break;
        };
        let mut frame = Vec::with_capacity(4 + text.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(text.as_bytes());
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.finish()).await;
}

/// Reads length-prefixed frames; ends at the end of the stream, on an error, or after
/// an over-long length prefix (reported as [`Frame::TooLarge`], body never read). Fused:
/// polling it after its end yields `None` again rather than panicking.
fn read_frames(recv: RecvStream, max: usize) -> impl Stream<Item = Frame> + Send {
    futures_util::stream::unfold(Some(recv), move |recv| async move {
        let mut recv = recv?;
        let mut prefix = [0u8; 4];
        recv.read_exact(&mut prefix).await.ok()?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > max {
            recv.stop(VarInt::from_u32(CLOSE_OK));
            return Some((Frame::TooLarge(len), None));
        }
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.ok()?;
        Some((Frame::Data(body), Some(recv)))
    })
    .fuse()
}
