//! The client's signaling connection, over WebSocket or WebTransport.
//!
//! Both carry the same JSON messages: a WebSocket text frame per message, or on
//! WebTransport one bidirectional stream with each message prefixed by its length
//! (4 bytes, big endian). [`Signal`] hides which; the session loop above it only sends
//! [`ClientMessage`]s and receives [`ServerMessage`]s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meridian_protocol::{ClientMessage, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{ClientConfig, ClientError, Transport};

/// Largest server message the client accepts, in bytes.
const MAX_SERVER_MESSAGE: usize = 1024 * 1024;

/// Largest HTTP response read when asking for the WebTransport endpoint.
const MAX_HTTP_RESPONSE: u64 = 64 * 1024;

/// Where a node's WebTransport signaling listens, and how to trust its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebTransportEndpoint {
    /// Session URL, e.g. `https://127.0.0.1:7881/signal`.
    pub url: String,
    /// SHA-256 digests of the node's self-signed certificate (empty: the node has a
    /// certificate that the system's roots verify).
    pub certificate_hashes: Vec<[u8; 32]>,
}

/// Asks a node's HTTP listener (`host:port`, or an `http://`/`ws://` URL on it) for its
/// WebTransport endpoint: `GET /webtransport/certificate-hashes`.
pub async fn webtransport_endpoint(http: &str) -> Result<WebTransportEndpoint, ClientError> {
    let fail = |what: String| ClientError::Signaling(format!("WebTransport discovery: {what}"));
    let host = http
        .split_once("://")
        .map_or(http, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let response = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(host).await?;
        s.write_all(
            format!(
                "GET /webtransport/certificate-hashes HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.take(MAX_HTTP_RESPONSE).read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    })
    .await
    .map_err(|_| ClientError::Timeout("WebTransport discovery"))?
    .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(fail(head.lines().next().unwrap_or_default().to_string()));
    }
    parse_endpoint(body).map_err(fail)
}

fn parse_endpoint(body: &str) -> Result<WebTransportEndpoint, String> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let url = v["url"].as_str().ok_or("no url")?.to_string();
    let mut certificate_hashes = Vec::new();
    for h in v["hashes"].as_array().ok_or("no hashes")? {
        if h["algorithm"] != "sha-256" {
            continue;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h["value"].as_str().ok_or("hash without value")?)
            .map_err(|e| e.to_string())?;
        certificate_hashes
            .push(<[u8; 32]>::try_from(raw.as_slice()).map_err(|_| "hash is not 32 bytes")?);
    }
    Ok(WebTransportEndpoint {
        url,
        certificate_hashes,
    })
}

/// An open signaling connection.
pub(crate) enum Signal {
    WebSocket(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    WebTransport(Box<WtSignal>),
}

pub(crate) struct WtSignal {
    send: wtransport::SendStream,
    recv: wtransport::RecvStream,
    /// Bytes read and not yet returned as messages.
    buf: Vec<u8>,
    connection: wtransport::Connection,
    _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
}

fn signaling<E: std::fmt::Display>(e: E) -> ClientError {
    ClientError::Signaling(e.to_string())
}

/// Where and how to open one signaling connection (owned, so a reconnection attempt
/// can run as a `'static` future next to the media loop).
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) transport: Transport,
    pub(crate) certificate_hashes: Vec<[u8; 32]>,
    pub(crate) bind_ip: IpAddr,
}

impl Target {
    /// `url` with the transport its scheme names (`https://` is WebTransport, `ws://`
    /// and `wss://` WebSocket), else the config's transport; the config's certificate
    /// hashes (every node's, for WebTransport).
    pub(crate) fn new(config: &ClientConfig, url: &str) -> Target {
        Target {
            url: url.to_string(),
            transport: transport_for(url).unwrap_or(config.transport),
            certificate_hashes: config.server_certificate_hashes.clone(),
            bind_ip: config.bind_ip,
        }
    }
}

/// The transport a signaling URL's scheme implies, if it implies one.
pub(crate) fn transport_for(url: &str) -> Option<Transport> {
    let scheme = url.split_once("://")?.0.to_ascii_lowercase();
    match scheme.as_str() {
        "ws" | "wss" => Some(Transport::WebSocket),
        "https" => Some(Transport::WebTransport),
        _ => None,
    }
}

impl Signal {
    /// Connects to the target.
    pub(crate) async fn connect(target: &Target) -> Result<Signal, ClientError> {
        match target.transport {
            Transport::WebSocket => {
                let (ws, _) = tokio_tungstenite::connect_async(target.url.as_str())
                    .await
                    .map_err(signaling)?;
                Ok(Signal::WebSocket(Box::new(ws)))
            }
            Transport::WebTransport => {
                let any = match target.bind_ip {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let builder =
                    wtransport::ClientConfig::builder().with_bind_address(SocketAddr::new(any, 0));
                let wt_config = if target.certificate_hashes.is_empty() {
                    builder.with_native_certs().build()
                } else {
                    builder
                        .with_server_certificate_hashes(
                            target
                                .certificate_hashes
                                .iter()
                                .map(|h| wtransport::tls::Sha256Digest::new(*h)),
                        )
                        .build()
                };
                let endpoint = wtransport::Endpoint::client(wt_config)?;
                let connection = endpoint
                    .connect(target.url.as_str())
                    .await
                    .map_err(signaling)?;
                let (send, recv) = connection
                    .open_bi()
                    .await
                    .map_err(signaling)?
                    .await
                    .map_err(signaling)?;
                Ok(Signal::WebTransport(Box::new(WtSignal {
                    send,
                    recv,
                    buf: Vec::new(),
                    connection,
                    _endpoint: endpoint,
                })))
            }
        }
    }

    /// Sends one message.
    pub(crate) async fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        let text = msg.encode();
        match self {
            Signal::WebSocket(ws) => ws.send(Message::text(text)).await.map_err(signaling),
            Signal::WebTransport(wt) => {
                let mut frame = Vec::with_capacity(4 + text.len());
                let len = u32::try_from(text.len()).map_err(signaling)?;
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend_from_slice(text.as_bytes());
                wt.send.write_all(&frame).await.map_err(signaling)
            }
        }
    }

    /// The next message; `Ok(None)` when the node closed the connection.
    ///
    /// Cancel-safe: a partly read WebTransport frame stays buffered.
    pub(crate) async fn recv(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        match self {
            Signal::WebSocket(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return ServerMessage::decode(text.as_bytes())
                            .map(Some)
                            .map_err(signaling);
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(signaling(e)),
                }
            },
            Signal::WebTransport(wt) => loop {
                if wt.buf.len() >= 4 {
                    let len =
                        u32::from_be_bytes([wt.buf[0], wt.buf[1], wt.buf[2], wt.buf[3]]) as usize;
                    if len > MAX_SERVER_MESSAGE {
                        return Err(ClientError::Signaling(format!(
                            "server message of {len} bytes is too large"
                        )));
                    }
                    if wt.buf.len() >= 4 + len {
                        let msg = ServerMessage::decode(&wt.buf[4..4 + len]).map_err(signaling);
                        wt.buf.drain(..4 + len);
                        return msg.map(Some);
                    }
                }
                let mut chunk = [0u8; 4096];
                match wt.recv.read(&mut chunk).await {
                    Ok(Some(n)) => wt.buf.extend_from_slice(&chunk[..n]),
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(signaling(e)),
                }
            },
        }
    }

    /// Closes the connection politely (best effort).
    pub(crate) async fn close(self) {
        match self {
            Signal::WebSocket(mut ws) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            }
            Signal::WebTransport(mut wt) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), wt.send.finish()).await;
                wt.connection.close(wtransport::VarInt::from_u32(0), b"bye");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_certificate_hashes_document() {
        let ep = parse_endpoint(
            r#"{"url":"https://127.0.0.1:7881/signal","hashes":[{"algorithm":"sha-256","value":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}]}"#,
        )
        .unwrap();
        assert_eq!(ep.url, "https://127.0.0.1:7881/signal");
        assert_eq!(ep.certificate_hashes.len(), 1);
        assert_eq!(ep.certificate_hashes[0][0], 1);
        assert_eq!(ep.certificate_hashes[0][31], 32);
        assert!(
            parse_endpoint(r#"{"url":"x","hashes":[{"algorithm":"sha-256","value":"AQI="}]}"#)
                .is_err()
        );
    }

    #[test]
    fn the_scheme_names_the_transport() {
        assert_eq!(
            transport_for("ws://127.0.0.1:7880/signal"),
            Some(Transport::WebSocket)
        );
        assert_eq!(transport_for("WSS://h/signal"), Some(Transport::WebSocket));
        assert_eq!(
            transport_for("https://127.0.0.1:7881/signal"),
            Some(Transport::WebTransport)
        );
        assert_eq!(transport_for("http://h/"), None);
        assert_eq!(transport_for("garbage"), None);
    }
}
