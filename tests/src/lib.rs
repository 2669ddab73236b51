//! Shared helpers for Meridian's workspace-level integration tests: a node on
//! loopback with ephemeral ports, and tokens signed by its key.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meridian_auth::{Claims, Grants, KeySet, SigningKey};
use meridian_protocol::ServerMessage;
use meridian_server::{Config, Node};
use tokio_tungstenite::tungstenite::Message;

/// A node under test and the key its tokens are signed with.
pub struct TestNode {
    /// The running node.
    pub node: Node,
    /// Keys the node accepts.
    pub keys: KeySet,
    /// Its signaling URL.
    pub url: String,
    /// Its data directory (keys, embedded event log).
    pub data_dir: std::path::PathBuf,
}

/// Starts a node on loopback with ephemeral ports; `tune` adjusts the config first.
pub async fn start_node(tune: impl FnOnce(&mut Config)) -> TestNode {
    let mut config = Config::default();
    config.http.addr = "127.0.0.1:0".parse().expect("literal");
    config.media.addr = "127.0.0.1:0".parse().expect("literal");
    config.webtransport.addr = "127.0.0.1:0".parse().expect("literal");
    config.internal.listen = "127.0.0.1:0".parse().expect("literal");
    config.node.region = "local".into();
    config.node.data_dir = std::env::temp_dir().join(format!(
        "meridian-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    tune(&mut config);
    let data_dir = config.node.data_dir.clone();
    let key = SigningKey::generate(meridian_auth::Algorithm::Es256, "test-1").expect("keygen");
    let keys = KeySet::new(Some(key), vec![]);
    let node = Node::start_with_keys(config, keys.clone())
        .await
        .expect("node starts");
    let url = format!("ws://{}/signal", node.http_addr);
    TestNode {
        node,
        keys,
        url,
        data_dir,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

impl TestNode {
    /// A token for `identity` in `room`.
    pub fn token(&self, identity: &str, room: &str, publish: bool) -> String {
        let grants = if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        };
        let claims = Claims::new(
            identity,
            room,
            meridian_auth::unix_now(),
            Duration::from_secs(600),
        )
        .with_grants(grants);
        self.keys.sign(&claims).expect("signing")
    }

    /// The node's WebTransport endpoint, as its HTTP listener publishes it.
    pub async fn wt_endpoint(&self) -> meridian_client::WebTransportEndpoint {
        meridian_client::webtransport_endpoint(&self.node.http_addr.to_string())
            .await
            .expect("certificate hashes published")
    }

    /// A request to the node's internal listener (mutual TLS) with the node's own
    /// client certificate: (status, body).
    pub async fn internal(&self, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
        let addr = self.node.internal_addr;
        let client = self.node.internal_client();
        let r = client
            .request(addr, "127.0.0.1", method, path, bearer, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on the internal listener: {e}"));
        (r.status, r.body)
    }

    /// The node's `/metrics` text, scraped from its internal listener.
    pub async fn metrics_text(&self) -> String {
        let (status, body) = self.internal("GET", "/metrics", None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Scrapes `/metrics` and returns the value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> f64 {
        let body = self.metrics_text().await;
        body.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
    }

    /// Waits until `name` equals `value` (metrics refresh every 250 ms).
    pub async fn wait_metric(&self, name: &str, value: f64, timeout: Duration) -> f64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.metric(name).await;
            if v == value || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A JSON `POST` to a dev-mode route (`path`) on the host of the signaling `url`
/// (`ws://…`): the status code. Waits up to 15 s (a worker stall takes up to 10).
pub async fn dev_post(url: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .expect("a ws:// signaling url");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line")
}

/// A plain HTTP/1.1 GET over TCP (tests need no HTTP client dependency).
pub async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A raw signaling connection for protocol-level tests.
pub struct RawSignal {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl RawSignal {
    /// Opens a WebSocket to the node.
    pub async fn connect(url: &str) -> RawSignal {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        RawSignal { ws }
    }

    /// Opens a WebSocket to the node at `http` from the local address `from` (another
    /// loopback address stands for another client host).
    pub async fn connect_from(http: std::net::SocketAddr, from: std::net::IpAddr) -> RawSignal {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::new(from, 0))
            .expect("bind to the source address");
        let stream = socket.connect(http).await.expect("tcp connect");
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{http}/signal"),
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("ws connect");
        RawSignal { ws }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("ws send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.expect("ws send");
    }

    /// Next server message, or `None` when the connection closed or 5 s passed.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => {
                    return Some(
                        ServerMessage::decode(t.as_bytes()).expect("server speaks protocol"),
                    );
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Next `error` message's code, skipping other messages.
    pub async fn next_error(&mut self) -> Option<meridian_protocol::ErrorCode> {
        loop {
            match self.recv().await? {
                ServerMessage::Error { code, .. } => return Some(code),
                _ => continue,
            }
        }
    }
}

/// A raw WebTransport signaling connection for protocol-level tests.
pub struct RawWt {
    /// The WebTransport session.
    pub connection: wtransport::Connection,
    stream: Option<(wtransport::SendStream, wtransport::RecvStream)>,
    _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
}

impl RawWt {
    /// Opens a WebTransport session to the node without opening a stream.
    pub async fn session(ep: &meridian_client::WebTransportEndpoint) -> RawWt {
        let config = wtransport::ClientConfig::builder()
            .with_bind_address("127.0.0.1:0".parse().expect("literal"))
            .with_server_certificate_hashes(
                ep.certificate_hashes
                    .iter()
                    .map(|h| wtransport::tls::Sha256Digest::new(*h)),
            )
            .build();
        let endpoint = wtransport::Endpoint::client(config).expect("client endpoint");
        let connection = tokio::time::timeout(Duration::from_secs(5), endpoint.connect(&ep.url))
            .await
            .expect("connect in time")
            .expect("wt connect");
        RawWt {
            connection,
            stream: None,
            _endpoint: endpoint,
        }
    }

    /// Opens a session and its one bidirectional signaling stream.
    pub async fn connect(ep: &meridian_client::WebTransportEndpoint) -> RawWt {
        let mut wt = RawWt::session(ep).await;
        let stream = wt
            .connection
            .open_bi()
            .await
            .expect("open bi")
            .await
            .expect("bi opened");
        wt.stream = Some(stream);
        wt
    }

    fn stream(&mut self) -> &mut (wtransport::SendStream, wtransport::RecvStream) {
        self.stream.as_mut().expect("stream opened")
    }

    /// Writes raw bytes on the stream (no framing added).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream().0.write_all(bytes).await.expect("wt write");
    }

    /// Ends the client's sending side of the stream (as a closing tab does).
    pub async fn finish(&mut self) {
        let _ = self.stream().0.finish().await;
    }

    /// Writes one length-prefixed message.
    pub async fn send_text(&mut self, text: &str) {
        let mut frame = (text.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(text.as_bytes());
        self.send_raw(&frame).await;
    }

    /// Next server message, or `None` when the stream ended or 5 s passed.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        let recv = &mut self.stream().1;
        let read = async {
            let mut prefix = [0u8; 4];
            recv.read_exact(&mut prefix).await.ok()?;
            let len = u32::from_be_bytes(prefix) as usize;
            assert!(len <= 1024 * 1024, "server frame of {len} bytes");
            let mut body = vec![0u8; len];
            recv.read_exact(&mut body).await.ok()?;
            Some(ServerMessage::decode(&body).expect("server speaks protocol"))
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
            .flatten()
    }

    /// Next `error` message's code, skipping other messages.
    pub async fn next_error(&mut self) -> Option<meridian_protocol::ErrorCode> {
        loop {
            match self.recv().await? {
                ServerMessage::Error { code, .. } => return Some(code),
                _ => continue,
            }
        }
    }

    /// Whether the node ends the stream (or the session) within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut buf = [0u8; 1024];
            let step = async {
                match self.stream.as_mut() {
                    Some((_, recv)) => !matches!(recv.read(&mut buf).await, Ok(Some(_))),
                    None => {
                        self.connection.closed().await;
                        true
                    }
                }
            };
            match tokio::time::timeout(left, step).await {
                Ok(true) => return true,
                Ok(false) => continue,
                Err(_) => return false,
            }
        }
    }
}
