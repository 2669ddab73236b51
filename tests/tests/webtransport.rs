//! Signaling over WebTransport: the same sessions as over WebSocket, against a real
//! node with its self-signed development certificate (trusted by its published hash).

use std::time::Duration;

use meridian_client::{Client, ClientConfig, Transport};
use meridian_protocol::{ClientMessage, ErrorCode, ServerMessage};
use meridian_tests::{RawWt, TestNode, start_node};

fn join_message(t: &TestNode, identity: &str, room: &str) -> String {
    ClientMessage::Join {
        token: t.token(identity, room, true),
        resume: None,
        version: meridian_protocol::PROTOCOL_VERSION,
        auto_subscribe: false,
        client: Some("raw-wt".into()),
    }
    .encode()
}

async fn joined(t: &TestNode, identity: &str) -> RawWt {
    let mut s = RawWt::connect(&t.wt_endpoint().await).await;
    s.send_text(&join_message(t, identity, "bad")).await;
    match s.recv().await {
        Some(ServerMessage::Joined { .. }) => s,
        other => panic!("{identity}: expected joined, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_hashes_are_published() {
    let t = start_node(|_| {}).await;
    let ep = t.wt_endpoint().await;
    assert_eq!(
        ep.url,
        format!("https://127.0.0.1:{}/signal", t.node.wt_addr.port())
    );
    assert_eq!(
        ep.certificate_hashes.len(),
        1,
        "one self-signed certificate"
    );
    let body = meridian_tests::http_get(&format!(
        "http://{}/webtransport/certificate-hashes",
        t.node.http_addr
    ))
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["hashes"][0]["algorithm"], "sha-256");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_publish_subscribe_media_and_leave_over_webtransport() {
    let t = start_node(|_| {}).await;
    let ep = t.wt_endpoint().await;
    let publisher = Client::join(
        ClientConfig::new(&t.url, t.token("alice", "wt", true)).over_webtransport(ep.clone()),
    )
    .await
    .expect("publisher joins over WebTransport");
    let sub_config =
        ClientConfig::subscriber(&t.url, t.token("bob", "wt", false)).over_webtransport(ep.clone());
    assert_eq!(sub_config.transport, Transport::WebTransport);
    let subscriber = Client::join(sub_config)
        .await
        .expect("subscriber joins over WebTransport");
    // A WebSocket subscriber in the same room sees the same media: transports mix.
    let ws_subscriber = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("carol", "wt", false),
    ))
    .await
    .expect("WebSocket subscriber joins");
    for (who, c) in [("wt", &subscriber), ("ws", &ws_subscriber)] {
        let stats = c
            .wait_for(Duration::from_secs(20), |s| {
                s.video_tracks_with(30) == 1 && s.audio_tracks_with(30) == 1
            })
            .await
            .unwrap_or_else(|s| panic!("{who} subscriber received no media: {s:#?}"));
        assert!(stats.join_ms > 0.0);
    }
    assert_eq!(
        publisher.stats().published.len(),
        2,
        "audio and video published"
    );
    assert_eq!(
        t.wait_metric("meridian_participants", 3.0, Duration::from_secs(3))
            .await,
        3.0
    );
    subscriber.leave().await.expect("WebTransport leave");
    publisher.leave().await.expect("WebTransport leave");
    ws_subscriber.leave().await.expect("WebSocket leave");
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(3))
            .await,
        0.0
    );
    assert_eq!(
        t.wait_metric(
            "meridian_signaling_connections_open",
            0.0,
            Duration::from_secs(3)
        )
        .await,
        0.0
    );
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_webtransport_gets_error_codes_and_spares_others() {
    let t = start_node(|c| c.signaling.join_timeout_secs = 1).await;
    let ep = t.wt_endpoint().await;
    let _publisher = Client::join(
        ClientConfig::new(&t.url, t.token("pub", "bad", true)).over_webtransport(ep.clone()),
    )
    .await
    .expect("publisher joins");
    let viewer = Client::join(
        ClientConfig::subscriber(&t.url, t.token("viewer", "bad", false))
            .over_webtransport(ep.clone()),
    )
    .await
    .expect("viewer joins");
    viewer
        .wait_for(Duration::from_secs(20), |s| s.video_tracks_with(10) == 1)
        .await
        .expect("viewer receives video");

    // Before join, then malformed, truncated JSON and an unknown message.
    let mut s = RawWt::connect(&ep).await;
    s.send_text(&ClientMessage::Ping { id: 1 }.encode()).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::NotJoined));
    s.send_text("{not json").await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_text(r#"{"type":"join""#).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_text(r#"{"type":"teleport"}"#).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));

    // An oversized length prefix: refused before any body is read, stream closed.
    let mut big = joined(&t, "big").await;
    big.send_raw(&u32::MAX.to_be_bytes()).await;
    assert_eq!(big.next_error().await, Some(ErrorCode::MessageTooLarge));
    assert!(
        big.closed_within(Duration::from_secs(3)).await,
        "stream closed after an oversized prefix"
    );
    let mut big2 = RawWt::connect(&ep).await;
    let prefix = (meridian_protocol::MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes();
    big2.send_raw(&prefix).await;
    assert_eq!(big2.next_error().await, Some(ErrorCode::MessageTooLarge));

    // A flood above the rate limit.
    let mut flood = joined(&t, "flood").await;
    for i in 0..200 {
        flood
            .send_text(&ClientMessage::Ping { id: i }.encode())
            .await;
    }
    assert_eq!(flood.next_error().await, Some(ErrorCode::RateLimited));

    // A stream opened and never written: closed by the join timeout.
    // (Opening a WebTransport stream sends its stream header, so the node sees it.)
    let mut silent = RawWt::connect(&ep).await;
    assert_eq!(silent.next_error().await, Some(ErrorCode::Timeout));
    assert!(silent.closed_within(Duration::from_secs(3)).await);

    // A session that never opens a stream is closed too.
    let mut no_stream = RawWt::session(&ep).await;
    assert!(
        no_stream.closed_within(Duration::from_secs(4)).await,
        "a session without a stream is closed after the join timeout"
    );

    // The viewer kept receiving throughout.
    let before = viewer.stats().video_frames();
    viewer
        .wait_for(Duration::from_secs(5), |s| s.video_frames() > before + 20)
        .await
        .expect("media keeps flowing for everyone else");
    // And new sessions still join over both transports.
    // A message prefix that never completes is bounded by the same timeouts.
    let mut partial = RawWt::connect(&ep).await;
    partial.send_raw(&[0, 0]).await;
    assert_eq!(partial.next_error().await, Some(ErrorCode::Timeout));
    let mut late = joined(&t, "late").await;
    late.send_text(&ClientMessage::Ping { id: 7 }.encode())
        .await;
    assert!(matches!(
        late.recv().await,
        Some(ServerMessage::Pong { id: 7 })
    ));
    Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("ws-late", "bad", false),
    ))
    .await
    .expect("WebSocket still serves");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_connections_are_bounded() {
    let t = start_node(|c| c.signaling.max_connections = 2).await;
    let ep = t.wt_endpoint().await;
    let _a = joined(&t, "a").await;
    let _b = joined(&t, "b").await;
    let config = wtransport::ClientConfig::builder()
        .with_bind_address("127.0.0.1:0".parse().unwrap())
        .with_server_certificate_hashes(
            ep.certificate_hashes
                .iter()
                .map(|h| wtransport::tls::Sha256Digest::new(*h)),
        )
        .build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), endpoint.connect(&ep.url))
        .await
        .expect("refused in time");
    assert!(third.is_err(), "a third connection is refused");
    t.node.shutdown().await;
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Time from opening the transport to `joined`, per transport (printed; run with
/// `--nocapture` to see it). The bound asserted is loose: CI machines are slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_joined_per_transport() {
    const JOINS: usize = 30;
    let t = start_node(|_| {}).await;
    let ep = t.wt_endpoint().await;
    let mut wt = Vec::new();
    let mut ws = Vec::new();
    for i in 0..JOINS {
        let started = std::time::Instant::now();
        let mut s = RawWt::connect(&ep).await;
        s.send_text(&join_message(&t, &format!("wt{i}"), "timing"))
            .await;
        assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
        wt.push(started.elapsed().as_secs_f64() * 1000.0);
        s.send_text(&ClientMessage::Leave.encode()).await;

        let started = std::time::Instant::now();
        let mut s = meridian_tests::RawSignal::connect(&t.url).await;
        s.send_text(&join_message(&t, &format!("ws{i}"), "timing"))
            .await;
        assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
        ws.push(started.elapsed().as_secs_f64() * 1000.0);
        s.send_text(&ClientMessage::Leave.encode()).await;
    }
    for (name, v) in [("webtransport", &mut wt), ("websocket", &mut ws)] {
        v.sort_by(|a, b| a.total_cmp(b));
        let (p50, p95) = (percentile(v, 0.5), percentile(v, 0.95));
        println!("time to joined over {name}: p50 {p50:.2} ms, p95 {p95:.2} ms ({JOINS} joins)");
        assert!(p95 < 1000.0, "{name} p95 {p95} ms");
    }
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_served_instead_of_a_generated_one() {
    let identity = wtransport::Identity::self_signed(["127.0.0.1", "localhost"]).unwrap();
    let dir = std::env::temp_dir().join(format!("meridian-wt-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    identity
        .certificate_chain()
        .store_pemfile(&cert)
        .await
        .unwrap();
    identity
        .private_key()
        .store_secret_pemfile(&key)
        .await
        .unwrap();
    let hash = *identity.certificate_chain().as_slice()[0].hash().as_ref();

    let mut half = meridian_server::Config::default();
    half.webtransport.tls_cert = Some(cert.clone());
    assert!(half.validate().is_err(), "a certificate needs its key");

    let t = start_node(|c| {
        c.webtransport.tls_cert = Some(cert.clone());
        c.webtransport.tls_key = Some(key.clone());
    })
    .await;
    let mut ep = t.wt_endpoint().await;
    assert!(
        ep.certificate_hashes.is_empty(),
        "no hash is published for configured certificates"
    );
    // No CA signed this one: trust it by its hash to see that it is the one served.
    ep.certificate_hashes = vec![hash];
    let mut s = RawWt::connect(&ep).await;
    s.send_text(&join_message(&t, "prod", "prod")).await;
    assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
    t.node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Forwards UDP between a local port and `target` until `cut` is set, then drops every
/// datagram both ways, as a network that vanished would.
async fn udp_relay(
    target: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    let front = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(target).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client = std::sync::Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
    {
        let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !cut.load(Ordering::Relaxed) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

/// A WebTransport client whose network vanishes (no close, no packets) is noticed by
/// the QUIC idle timeout (8 s, keep-alives every 2 s) about as fast as a WebSocket one,
/// not after the signaling idle timeout plus 5 s (about 38 s before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_webtransport_client_is_noticed_within_ten_seconds() {
    let t = start_node(|_| {}).await;
    let mut ep = t.wt_endpoint().await;
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = udp_relay(t.node.wt_addr, cut.clone()).await;
    ep.url = format!("https://{relay}/signal");
    let mut s = RawWt::connect(&ep).await;
    s.send_text(&join_message(&t, "ghost", "vanish")).await;
    assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
    assert_eq!(
        t.wait_metric(
            "meridian_signaling_connections_open",
            1.0,
            Duration::from_secs(3)
        )
        .await,
        1.0
    );
    // Quiet but alive: keep-alives hold the session open past the idle timeout.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(t.metric("meridian_signaling_connections_open").await, 1.0);
    cut.store(true, std::sync::atomic::Ordering::Relaxed);
    let start = std::time::Instant::now();
    let open = t
        .wait_metric(
            "meridian_signaling_connections_open",
            0.0,
            Duration::from_secs(15),
        )
        .await;
    let took = start.elapsed();
    eprintln!("vanished WebTransport client noticed after {took:?}");
    assert_eq!(open, 0.0, "the session still open after {took:?}");
    assert!(took < Duration::from_secs(11), "noticed after {took:?}");
    drop(s);
}
