//! HTTP endpoints: WebSocket signaling, health, the web client (static files from
//! `http.web_root`) and the dev-mode token endpoint on the public listener
//! ([`router`]); metrics and the admin hooks on the internal one ([`internal_router`],
//! served by `internal.rs` over mutual TLS).

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::NodeState;
use crate::limits::IpSlot;
use crate::mailbox::Command;
use crate::signal::{Frame, run_session};

pub(crate) fn router(state: NodeState) -> Router {
    let mut router = Router::new()
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/signal", get(signal))
        .route("/probe", get(crate::regions::probe))
        .route("/regions", get(crate::regions::list))
        .route(
            "/login",
            post(crate::regions::login).layer(DefaultBodyLimit::max(
                meridian_protocol::region::MAX_LOGIN_BODY_BYTES,
            )),
        )
        .route(
            "/webtransport/certificate-hashes",
            get(webtransport_certificate_hashes),
        );
    if state.config.http.dev {
        router = router.route(
            "/dev/token",
            get(dev_info)
                .post(dev_token)
                .layer(DefaultBodyLimit::max(DEV_BODY_BYTES)),
        );
        router = router.route(
            "/dev/cut-media",
            post(dev_cut_media).layer(DefaultBodyLimit::max(DEV_BODY_BYTES)),
        );
        router = router.route(
            "/dev/stall-worker",
            post(dev_stall_worker).layer(DefaultBodyLimit::max(DEV_BODY_BYTES)),
        );
    }
    router.fallback(web_file).with_state(state)
}

/// The internal listener's own routes: `/metrics` and the admin hooks (the audit API
/// and node-to-node routes are merged by `Node::start`).
pub(crate) fn internal_router(state: NodeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/admin/participants/{participant_id}/close-signaling",
            post(close_signaling),
        )
        .route(
            "/admin/participants/{participant_id}/remove",
            post(remove_participant),
        )
        .with_state(state)
}

/// `/metrics` alone, for the optional plain loopback listener (`internal.metrics_listen`).
pub(crate) fn metrics_router(state: NodeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Page served at `/` when the web client is not built.
const NOT_BUILT_PAGE: &str = include_str!("../assets/not-built.html");
/// Largest static file served, in bytes.
const MAX_STATIC_BYTES: u64 = 32 * 1024 * 1024;
/// Longest request path looked up on disk.
const MAX_PATH_BYTES: usize = 512;

/// A relative path under the web root for a request path, or `None` when it could
/// leave the root (`..`, absolute or hidden components, backslashes) or is too long.
fn web_path(request_path: &str) -> Option<PathBuf> {
    if request_path.len() > MAX_PATH_BYTES || request_path.contains('\\') {
        return None;
    }
    let rel = request_path.trim_start_matches('/');
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_string()
    };
    let path = PathBuf::from(&rel);
    let clean = path.components().all(|c| match c {
        Component::Normal(s) => !s.to_string_lossy().starts_with('.'),
        _ => false,
    });
    clean.then_some(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "webp" => "image/webp",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// Serves the built web client; `/` falls back to a page saying how to build it.
async fn web_file(State(state): State<NodeState>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    let not_found = || (StatusCode::NOT_FOUND, "not found\n").into_response();
    let Some(rel) = web_path(uri.path()) else {
        return not_found();
    };
    let is_index = rel == Path::new("index.html");
    let not_built = || {
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            NOT_BUILT_PAGE,
        )
            .into_response()
    };
    let Some(root) = state.web_root.as_deref() else {
        return if is_index { not_built() } else { not_found() };
    };
    let path = root.join(&rel);
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() && m.len() <= MAX_STATIC_BYTES => {}
        _ => return if is_index { not_built() } else { not_found() },
    }
    let Ok(body) = tokio::fs::read(&path).await else {
        return not_found();
    };
    // Vite names assets by content hash: they never change; the page itself may.
    let cache = if rel.starts_with("assets") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [
            (header::CONTENT_TYPE, content_type(&rel)),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}

/// Largest `POST /dev/token` body.
const DEV_BODY_BYTES: usize = 4096;
/// Lifetime of a dev-mode token; the page asks for a fresh one when it reconnects.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest room, identity or name accepted by `/dev/token`.
const DEV_FIELD_BYTES: usize = 128;

/// `GET /dev/token`: present only in dev mode, so the page knows it may mint tokens.
async fn dev_info() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "dev": true, "ttl_secs": DEV_TOKEN_TTL.as_secs() }))
}

/// Body of `POST /dev/token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    room: String,
    identity: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_true")]
    publish: bool,
    #[serde(default = "default_true")]
    subscribe: bool,
}

fn default_true() -> bool {
    true
}

/// `POST /dev/token` (dev mode only): a short-lived token signed with the node's key.
async fn dev_token(
    State(state): State<NodeState>,
    body: Result<axum::Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let bad = |why: String| (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response();
    let axum::Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad(e.body_text()),
    };
    let field_ok = |s: &str| !s.trim().is_empty() && s.len() <= DEV_FIELD_BYTES;
    if !field_ok(&req.room) || req.room == meridian_auth::ANY_ROOM {
        return bad(format!("room must be 1..={DEV_FIELD_BYTES} bytes"));
    }
    if !field_ok(&req.identity) {
        return bad(format!("identity must be 1..={DEV_FIELD_BYTES} bytes"));
    }
    if req
        .name
        .as_deref()
        .is_some_and(|n| n.len() > DEV_FIELD_BYTES)
    {
        return bad(format!("name must be at most {DEV_FIELD_BYTES} bytes"));
    }
    let mut claims = meridian_auth::Claims::new(
        req.identity.trim(),
        req.room.trim(),
        meridian_auth::unix_now(),
        DEV_TOKEN_TTL,
    )
    .with_grants(meridian_auth::Grants {
        publish: req.publish,
        subscribe: req.subscribe || req.publish,
        admin: false,
    })
    .with_region(state.config.node.region.clone());
    if let Some(name) = req.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
        claims = claims.with_name(name);
    }
    if let Err(e) = claims.validate() {
        return bad(e.to_string());
    }
    match state.keys.sign(&claims) {
        Ok(token) => (
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(serde_json::json!({
                "token": token,
                "expires_in_secs": DEV_TOKEN_TTL.as_secs(),
            })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot sign: {e}\n"),
        )
            .into_response(),
    }
}

/// Body of `POST /dev/cut-media`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevCutRequest {
    participant_id: String,
    ms: u64,
}

/// `POST /dev/cut-media` (dev mode only): drops every media datagram from and to one
/// participant for `ms` (at most 60 s) while its signaling stays up, so tests can kill
/// a browser's media path and watch it come back by an ICE restart. 204, or 404 for a
/// participant not on this node.
async fn dev_cut_media(
    State(state): State<NodeState>,
    body: Result<axum::Json<DevCutRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match dev_request(body, |r| r.ms, meridian_room::MAX_CUT) {
        Ok(req) => req,
        Err(refused) => return refused,
    };
    let Ok(participant) = req.participant_id.parse::<meridian_media::ParticipantId>() else {
        return (StatusCode::NOT_FOUND, "no such participant\n").into_response();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let command = Command::CutMedia {
        participant,
        duration: Duration::from_millis(req.ms),
        reply,
    };
    dev_command(&state, command, answer, "no such participant\n").await
}

/// A dev hook's body, whose `ms` must be 1..=`max`; else the 400 to answer.
#[allow(clippy::result_large_err)]
fn dev_request<T>(
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
    ms: impl Fn(&T) -> u64,
    max: Duration,
) -> Result<T, Response> {
    let axum::Json(req) = body
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{}\n", e.body_text())).into_response())?;
    let ms = ms(&req);
    if ms == 0 || u128::from(ms) > max.as_millis() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("ms must be 1..={}\n", max.as_millis()),
        )
            .into_response());
    }
    Ok(req)
}

/// Sends a dev hook's command and answers 204 once it replied `true`, 404 with
/// `missing` for `false`, 503 when the node is stopping.
async fn dev_command(
    state: &NodeState,
    command: Command,
    answer: tokio::sync::oneshot::Receiver<bool>,
    missing: &'static str,
) -> Response {
    if state.commands.send(command).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n").into_response();
    }
    match answer.await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, missing).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n").into_response(),
    }
}

/// Body of `POST /dev/stall-worker`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevStallRequest {
    worker: usize,
    ms: u64,
}

/// Longest stall `POST /dev/stall-worker` takes.
const MAX_STALL: Duration = Duration::from_secs(10);

/// `POST /dev/stall-worker` (dev mode only): keeps one media worker busy for `ms` (at
/// most 10 s), as a worker past its capacity is, so tests can watch the node refuse
/// fresh joins and report not ready while it is overloaded (`crate::overload`). 204
/// once the stall is over, 404 for a worker that does not exist.
async fn dev_stall_worker(
    State(state): State<NodeState>,
    body: Result<axum::Json<DevStallRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match dev_request(body, |r| r.ms, MAX_STALL) {
        Ok(req) => req,
        Err(refused) => return refused,
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let command = Command::Stall {
        worker: req.worker,
        duration: Duration::from_millis(req.ms),
        reply,
    };
    dev_command(&state, command, answer, "no such worker\n").await
}

/// The bearer token of an admin request, verified with the `admin` grant; its room
/// scope is `None` for an every-room (`*`) token, else the one room it administers.
#[allow(clippy::result_large_err)]
fn admin_scope(
    state: &NodeState,
    headers: &HeaderMap,
    no_grant: StatusCode,
) -> Result<Option<String>, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    let claims = state
        .verify(token)
        .map_err(|e| (StatusCode::UNAUTHORIZED, format!("{}\n", e.code())).into_response())?;
    claims
        .require(meridian_auth::Grant::Admin)
        .map_err(|e| (no_grant, format!("{}\n", e.code())).into_response())?;
    Ok((claims.room != meridian_auth::ANY_ROOM).then_some(claims.room))
}

/// Percent-decodes a path segment; `None` when it is not valid UTF-8 after decoding.
fn percent_decode(segment: &str) -> Option<String> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The room of an audit path `/audit/rooms/{room}/history`, decoded.
fn audit_room(path: &str) -> Option<String> {
    let room = path
        .strip_prefix("/audit/rooms/")?
        .strip_suffix("/history")?;
    (!room.contains('/'))
        .then(|| percent_decode(room))
        .flatten()
}

/// Scopes the audit API: a token for every room (`*`) reads everything; an admin
/// token for one room reads only that room's history (`/audit/rooms/{room}/history`).
pub(crate) async fn audit_scope(
    State(state): State<NodeState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match admin_scope(&state, req.headers(), StatusCode::FORBIDDEN) {
        Err(refused) => refused,
        Ok(None) => next.run(req).await,
        Ok(Some(room)) if audit_room(req.uri().path()).as_deref() == Some(room.as_str()) => {
            next.run(req).await
        }
        Ok(Some(_)) => (
            StatusCode::FORBIDDEN,
            "forbidden: a token scoped to one room reads only /audit/rooms/{its room}/history\n",
        )
            .into_response(),
    }
}

/// `POST /admin/participants/{id}/close-signaling` (bearer token with the `admin`
/// grant, for the participant's room or `*`): closes that participant's signaling
/// transport as a network drop would. The participant stays for the resume grace, so
/// its client can resume; used by tests and operators to exercise reconnects.
async fn close_signaling(
    State(state): State<NodeState>,
    axum::extract::Path(participant_id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    admin_participant(state, participant_id, headers, false).await
}

/// `POST /admin/participants/{id}/remove` (bearer token with the `admin` grant, for
/// the participant's room or `*`): the participant leaves the room (recorded as
/// kicked), its client is told `left{reason:"removed"}`, and its resume token is
/// revoked so resuming cannot undo it.
async fn remove_participant(
    State(state): State<NodeState>,
    axum::extract::Path(participant_id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    admin_participant(state, participant_id, headers, true).await
}

async fn admin_participant(
    state: NodeState,
    participant_id: String,
    headers: HeaderMap,
    remove: bool,
) -> Response {
    let room = match admin_scope(&state, &headers, StatusCode::UNAUTHORIZED) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    let Ok(participant) = participant_id.parse::<meridian_media::ParticipantId>() else {
        return (StatusCode::NOT_FOUND, "no such participant\n").into_response();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let command = if remove {
        Command::Remove {
            participant,
            room,
            reply,
        }
    } else {
        Command::CloseSignaling {
            participant,
            room,
            reply,
        }
    };
    if state.commands.send(command).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n").into_response();
    }
    match answer.await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        // The same answer for another room's participant: a scoped token learns nothing.
        Ok(false) => (
            StatusCode::NOT_FOUND,
            "no such participant (with open signaling) in the token's room\n",
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n").into_response(),
    }
}

/// Liveness: 200 while the process serves HTTP, draining or not (restarting a
/// draining node would cut its calls); the body says which.
async fn healthz(State(state): State<NodeState>) -> (StatusCode, &'static str) {
    if state.cluster.is_draining() {
        (StatusCode::OK, "draining\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// How long readiness stays off after the node was last overloaded.
const READY_HOLD: Duration = Duration::from_secs(5);

/// Readiness: 200 while the node holds its lease in the region's log, does not drain
/// and was not overloaded (`crate::overload`) within [`READY_HOLD`]; 503 otherwise, so
/// a load balancer stops sending it new clients.
async fn readyz(State(state): State<NodeState>) -> (StatusCode, &'static str) {
    if state.cluster.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !state.cluster.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no lease: the event log is unreachable\n",
        )
    } else if state.commands.recently_overloaded(READY_HOLD) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded: the media workers are past [media] overload_busy_share\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(state): State<NodeState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.registry),
    )
}

/// Where the WebTransport listener is and, for a self-signed development
/// certificate, its SHA-256 (base64 of the raw digest) for `serverCertificateHashes`.
async fn webtransport_certificate_hashes(
    State(state): State<NodeState>,
    headers: HeaderMap,
) -> impl IntoResponse {
    use base64::Engine as _;
    let wt = &state.webtransport;
    let host = if wt.addr.ip().is_unspecified() {
        // Bound to every interface: name the host the page itself was loaded from.
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':').map_or(Some(h), |(host, _)| Some(host)))
            .map(str::to_string)
            .unwrap_or_else(|| "127.0.0.1".into())
    } else if wt.addr.is_ipv6() {
        format!("[{}]", wt.addr.ip())
    } else {
        wt.addr.ip().to_string()
    };
    let hashes: Vec<_> = wt
        .hashes()
        .iter()
        .map(|h| {
            serde_json::json!({
                "algorithm": "sha-256",
                "value": base64::engine::general_purpose::STANDARD.encode(h),
            })
        })
        .collect();
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({
            "url": format!("https://{host}:{}{}", wt.addr.port(), crate::webtransport::PATH),
            "hashes": hashes,
        })),
    )
}

/// Bytes a signaling WebSocket reads at a time. tungstenite's default (128 KiB) is
/// zero-filled before every read, so each connection held 128 KiB resident for
/// messages of a few KiB; a larger message still arrives whole (the buffer grows to
/// its announced length, up to the message limit).
const WS_READ_BUFFER: usize = 8 * 1024;

async fn signal(
    State(state): State<NodeState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Browsers always send `Origin`; other clients cannot be driven by a foreign page.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let origin = origin.to_str().unwrap_or("null");
        if !state.hosts.origin_allowed(origin, host) {
            state.metrics.host_refusals.inc();
            return (
                StatusCode::FORBIDDEN,
                format!(
                    "origin {:?} may not open signaling here; add its host to http.public_names\n",
                    meridian_protocol::clip(origin, 128)
                ),
            )
                .into_response();
        }
    }
    let open = state.metrics.signaling_connections_open.get();
    if open >= state.config.signaling.max_connections as i64 {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    }
    tracing::debug!(%peer, "signaling connection");
    let max = state.config.signaling.max_message_bytes;
    // Messages up to twice the limit reach the session and get a typed error;
    // anything larger closes the connection at the WebSocket layer.
    ws.max_message_size(2 * max)
        .max_frame_size(2 * max)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| ws_session(state, peer, socket))
}

async fn ws_session(state: NodeState, peer: SocketAddr, socket: WebSocket) {
    let (sink, stream) = socket.split();
    let incoming = stream
        .take_while(|m| {
            std::future::ready(m.as_ref().is_ok_and(|m| !matches!(m, Message::Close(_))))
        })
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(Message::Text(t)) => Some(Frame::Data(t.as_bytes().to_vec())),
                Ok(Message::Binary(_)) => Some(Frame::Invalid("binary frames are not messages")),
                _ => None,
            })
        });
    let outgoing = sink
        .with(|text: String| std::future::ready(Ok::<_, axum::Error>(Message::Text(text.into()))));
    run_session(state, peer, Box::pin(incoming), Box::pin(outgoing)).await;
}

/// A TCP stream that notes when it last carried bytes and holds its per-address slot
/// for as long as it lives (through a WebSocket upgrade too).
struct Tracked {
    inner: tokio::net::TcpStream,
    base: std::time::Instant,
    /// Milliseconds after `base` of the last read or write.
    activity: Arc<AtomicU64>,
    _slot: IpSlot,
}

impl Tracked {
    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` turns true: at most
/// `http.max_connections_per_ip` connections per source address, request headers
/// within `http.header_read_timeout_secs`, and connections without traffic for
/// `http.idle_timeout_secs` closed (an upgraded WebSocket leaves this loop and is
/// bounded by the session's own timeouts).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    state: NodeState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let http = &state.config.http;
    let header_timeout = Duration::from_secs(http.header_read_timeout_secs);
    let idle = Duration::from_secs(http.idle_timeout_secs);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("HTTP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let Some(slot) = state.limits.connect(peer.ip()) else {
            state.metrics.limit_refused("connections_per_ip");
            tracing::debug!(%peer, "HTTP connection refused: too many from this address");
            drop(stream);
            continue;
        };
        if !state
            .connection_budget
            .allow(peer.ip(), std::time::Instant::now())
        {
            state.metrics.limit_refused("node_connection_share");
            tracing::debug!(%peer, "HTTP connection refused: the node is busy and this address had its share");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            Tracked {
                inner: stream,
                base: std::time::Instant::now(),
                activity: Arc::new(AtomicU64::new(0)),
                _slot: slot,
            },
            peer,
            app.clone(),
            state.metrics.clone(),
            (header_timeout, idle),
            shutdown.clone(),
        ));
    }
}

async fn connection(
    io: Tracked,
    peer: SocketAddr,
    app: Router,
    metrics: crate::Metrics,
    (header_timeout, idle): (Duration, Duration),
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use tower_service::Service as _;
    let (base, activity) = (io.base, io.activity.clone());
    let service = hyper::service::service_fn(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move { app.call(req).await }
        },
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let wait = idle.saturating_sub(base.elapsed().saturating_sub(last));
        if wait.is_zero() {
            tracing::debug!(%peer, "closing an idle HTTP connection");
            metrics.http_timeouts.inc();
            return;
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        metrics.http_timeouts.inc();
                    }
                    tracing::debug!(%peer, "HTTP connection: {e}");
                }
                return;
            }
            _ = tokio::time::sleep(wait) => {}
            // The guard `wait_for` returns is not `Send`: drop it inside.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                return;
            }
        }
    }
}

/// Refuses requests whose `Host` is not the node's (see [`HostPolicy`]) with 421 and
/// a body naming the setting.
pub(crate) async fn check_host(
    State(state): State<NodeState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if state.hosts.host_allowed(&h) => next.run(req).await,
        h => {
            state.metrics.host_refusals.inc();
            (
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "host {:?} is not one of this node's names; add it to http.public_names\n",
                    meridian_protocol::clip(&h.unwrap_or_default(), 128)
                ),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_paths_stay_under_the_root() {
        assert_eq!(web_path("/"), Some(PathBuf::from("index.html")));
        assert_eq!(
            web_path("/assets/index-1.js"),
            Some(PathBuf::from("assets/index-1.js"))
        );
        assert_eq!(
            web_path("/assets/"),
            Some(PathBuf::from("assets/index.html"))
        );
        for bad in [
            "/../secret",
            "/assets/../../x",
            "/.env",
            "/a/.git/config",
            "/a\\..\\b",
        ] {
            assert_eq!(web_path(bad), None, "{bad}");
        }
        assert_eq!(web_path(&format!("/{}", "a".repeat(MAX_PATH_BYTES))), None);
    }

    #[test]
    fn content_types_follow_extensions() {
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("a/b.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }

    #[test]
    fn audit_rooms_are_read_from_the_path_decoded() {
        assert_eq!(
            audit_room("/audit/rooms/demo/history").as_deref(),
            Some("demo")
        );
        assert_eq!(
            audit_room("/audit/rooms/a%20b/history").as_deref(),
            Some("a b")
        );
        assert_eq!(audit_room("/audit/rooms/a/b/history"), None);
        assert_eq!(audit_room("/audit/rooms"), None);
        assert_eq!(audit_room("/audit/range"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), Some("%4".into()));
    }
}
