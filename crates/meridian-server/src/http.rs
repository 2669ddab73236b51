//! HTTP endpoints: WebSocket signaling, metrics, health, and the bundled web page.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};

use crate::NodeState;
use crate::signal::{Frame, run_session};

pub(crate) fn router(state: NodeState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/meridian.js", get(script))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/signal", get(signal))
        .route(
            "/webtransport/certificate-hashes",
            get(webtransport_certificate_hashes),
        )
        .with_state(state)
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../assets/index.html"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/meridian.js"),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
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
    headers: axum::http::HeaderMap,
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

async fn signal(
    State(state): State<NodeState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
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
        .on_upgrade(move |socket| ws_session(state, socket))
}

async fn ws_session(state: NodeState, socket: WebSocket) {
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
    run_session(state, Box::pin(incoming), Box::pin(outgoing)).await;
}
