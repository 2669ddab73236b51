//! Hardening (issue 17): ways one outsider could take service away from others, each
//! reproduced against a real node on loopback and shown to be bounded.

use std::time::Duration;

use futures_util::SinkExt;
use meridian_protocol::{ClientMessage, ServerMessage};
use meridian_tests::{RawSignal, RawWt, TestNode, start_node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn join_message(t: &TestNode, identity: &str, room: &str) -> String {
    ClientMessage::Join {
        token: t.token(identity, room, true),
        resume: None,
        version: meridian_protocol::PROTOCOL_VERSION,
        auto_subscribe: false,
        client: Some("hardening".into()),
    }
    .encode()
}

const OPEN: &str = "meridian_signaling_connections_open";

/// Item 1: a WebTransport session whose client ends its stream (a tab closing) used to
/// panic in the linger read and leak its connection slot; after `max_connections` such
/// ends the node refused all signaling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_sessions_that_end_release_their_connection_slots() {
    let t = start_node(|c| c.signaling.max_connections = 3).await;
    let ep = t.wt_endpoint().await;
    for i in 0..8 {
        let mut wt = RawWt::connect(&ep).await;
        if i % 2 == 0 {
            wt.send_text(&join_message(&t, &format!("tab-{i}"), "wt-end"))
                .await;
            match wt.recv().await {
                Some(ServerMessage::Joined { .. }) => {}
                other => panic!("session {i}: expected joined, got {other:?}"),
            }
        }
        wt.finish().await;
        assert!(
            wt.closed_within(Duration::from_secs(5)).await,
            "session {i}: the node ends the stream after the client's end"
        );
        drop(wt);
        assert_eq!(
            t.wait_metric(OPEN, 0.0, Duration::from_secs(5)).await,
            0.0,
            "session {i}: its connection slot is released"
        );
    }
    // The node still takes signaling over both transports.
    let mut ws = RawSignal::connect(&t.url).await;
    ws.send_text(&join_message(&t, "after-ws", "wt-end")).await;
    assert!(matches!(
        ws.recv().await,
        Some(ServerMessage::Joined { .. })
    ));
    let mut wt = RawWt::connect(&ep).await;
    wt.send_text(&join_message(&t, "after-wt", "wt-end")).await;
    assert!(matches!(
        wt.recv().await,
        Some(ServerMessage::Joined { .. })
    ));
    t.node.shutdown().await;
}

/// A WebSocket client whose receive buffer is tiny and which never reads.
async fn non_reading_client(
    t: &TestNode,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(t.node.http_addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(&t.url, stream)
        .await
        .expect("ws handshake");
    ws
}

/// Item 2: clients that send big messages and never read used to stay open past the
/// join timeout (the writer waited on them forever, the session waited on the writer,
/// and every unknown `type` was echoed in full); now they are closed within the join
/// timeout plus the write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_closed_within_a_bound() {
    let t = start_node(|c| {
        c.signaling.join_timeout_secs = 2;
        c.signaling.write_timeout_secs = 2;
        // Not the rate limit: the bound under test is the write path's.
        c.signaling.messages_per_second = 100_000;
        c.signaling.message_burst = 100_000;
    })
    .await;
    const CLIENTS: usize = 4;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(non_reading_client(&t).await);
    }
    assert_eq!(
        t.wait_metric(OPEN, CLIENTS as f64, Duration::from_secs(5))
            .await,
        CLIENTS as f64
    );
    let big = format!(r#"{{"type":"{}"}}"#, "x".repeat(60_000));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for mut ws in clients {
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(15);
            while tokio::time::Instant::now() < end {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    ws.send(Message::text(big.clone())),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
            drop(ws);
        }));
    }
    let open = t.wait_metric(OPEN, 0.0, Duration::from_secs(10)).await;
    assert_eq!(
        open,
        0.0,
        "non-reading clients still open {:?} after they started",
        started.elapsed()
    );
    for task in tasks {
        task.abort();
    }
    // A well-behaved client is served meanwhile and afterwards.
    let mut ws = RawSignal::connect(&t.url).await;
    ws.send_text(&join_message(&t, "reader", "slow")).await;
    assert!(matches!(
        ws.recv().await,
        Some(ServerMessage::Joined { .. })
    ));
    t.node.shutdown().await;
}

/// Sends `request` as is on a new TCP connection; returns the status code and the
/// body (everything the node sends until it closes, within 5 s).
async fn raw_http(addr: std::net::SocketAddr, request: String) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn request(method: &str, path: &str, host: &str, bearer: Option<&str>) -> String {
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// A labelled counter from `/metrics`, 0 when absent.
async fn labelled(t: &TestNode, series: &str) -> f64 {
    let body = t.metrics_text().await;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether the node closes `s` within `within` (EOF or reset), reading what it sends.
async fn closed_by_node(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Item 5: half-sent requests and idle connections used to stay open for good
/// (250 of them still open after 65 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_idle_http_connections_are_closed() {
    let t = start_node(|c| {
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 2;
    })
    .await;
    let addr = t.node.http_addr;
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for (what, s) in [
        ("half-sent headers", &mut half),
        ("no request at all", &mut silent),
        ("idle keep-alive", &mut kept),
    ] {
        assert!(
            closed_by_node(s, Duration::from_secs(6)).await,
            "{what}: still open after {:?}",
            started.elapsed()
        );
    }
    assert!(t.metric("meridian_http_timeouts_total").await >= 2.0);
    // The node still answers.
    assert_eq!(
        raw_http(addr, request("GET", "/healthz", "127.0.0.1", None))
            .await
            .0,
        200
    );
    t.node.shutdown().await;
}

/// Item 5: one source address may hold only so many connections and attempt only so
/// many joins (configurable, counted in `meridian_limit_refusals_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_joins_per_address_are_capped() {
    let t = start_node(|c| {
        c.http.max_connections_per_ip = 4;
        c.signaling.joins_per_ip_per_minute = 3;
    })
    .await;
    let addr = t.node.http_addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_node(&mut fifth, Duration::from_secs(2)).await,
        "a fifth connection from the same address is closed at once"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        labelled(
            &t,
            "meridian_limit_refusals_total{reason=\"connections_per_ip\"}"
        )
        .await,
        1.0
    );
    let mut sessions = Vec::new();
    for i in 0..3 {
        let mut ws = RawSignal::connect(&t.url).await;
        ws.send_text(&join_message(&t, &format!("j{i}"), "capped"))
            .await;
        assert!(matches!(
            ws.recv().await,
            Some(ServerMessage::Joined { .. })
        ));
        sessions.push(ws);
    }
    let mut ws = RawSignal::connect(&t.url).await;
    ws.send_text(&join_message(&t, "j3", "capped")).await;
    assert_eq!(
        ws.next_error().await,
        Some(meridian_protocol::ErrorCode::RateLimited),
        "the fourth join within a minute is refused"
    );
    // Free the address's connection slots before scraping the metrics.
    drop(sessions);
    drop(ws);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        labelled(&t, "meridian_limit_refusals_total{reason=\"joins_per_ip\"}").await,
        1.0
    );
    t.node.shutdown().await;
}

/// The node's join budget is shared fairly between source addresses: past it, an
/// address that has had its share of the second is refused (`rate_limited`) and an
/// address joining for the first time is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_node_join_budget_only_addresses_over_their_share_are_refused() {
    let t = start_node(|c| c.signaling.node_joins_per_second = 1).await;
    let addr = t.node.http_addr;
    let from = |n: u8| std::net::IpAddr::from([127, 0, 0, n]);
    let mut sessions = Vec::new();
    let mut refused = 0;
    // The budget counts per 1 s window: a round whose joins straddle two windows
    // refuses nothing, so a few rounds are tried.
    for round in 0..5u8 {
        // Another address joins, then 127.0.0.2 twice: its second join is past the
        // budget and over its share (1 ÷ 2 addresses, at least 1).
        let mut other = RawSignal::connect_from(addr, from(3)).await;
        other
            .send_text(&join_message(&t, &format!("o{round}"), "budget"))
            .await;
        let _ = other.recv().await;
        sessions.push(other);
        let mut outcome = None;
        for i in 0..2 {
            let mut ws = RawSignal::connect_from(addr, from(2)).await;
            ws.send_text(&join_message(&t, &format!("f{round}-{i}"), "budget"))
                .await;
            outcome = ws.recv().await;
            sessions.push(ws);
        }
        if let Some(ServerMessage::Error { code, .. }) = outcome {
            assert_eq!(code, meridian_protocol::ErrorCode::RateLimited);
            refused += 1;
            // A newcomer has a share of its own, in this window or the next.
            let mut newcomer = RawSignal::connect_from(addr, from(10 + round)).await;
            newcomer
                .send_text(&join_message(&t, &format!("n{round}"), "budget"))
                .await;
            assert!(
                matches!(newcomer.recv().await, Some(ServerMessage::Joined { .. })),
                "an address that has not joined is admitted past the budget"
            );
            sessions.push(newcomer);
            break;
        }
    }
    assert!(refused > 0, "an address over its share was refused");
    drop(sessions);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        labelled(
            &t,
            "meridian_limit_refusals_total{reason=\"node_join_share\"}"
        )
        .await
            >= 1.0
    );
    t.node.shutdown().await;
}

/// Item 9: a page on a foreign site (cross-site WebSocket) or a DNS-rebinding name
/// cannot reach the node; its own names and addresses can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_origins_are_refused() {
    let t = start_node(|c| c.http.public_names = vec!["meridian.example.com".into()]).await;
    let addr = t.node.http_addr;
    let (status, body) = raw_http(
        addr,
        request("GET", "/healthz", "rebound.evil.example", None),
    )
    .await;
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("http.public_names"), "{body}");
    for host in ["meridian.example.com", "127.0.0.1", "localhost:80"] {
        assert_eq!(
            raw_http(addr, request("GET", "/healthz", host, None))
                .await
                .0,
            200,
            "{host}"
        );
    }
    let ws_with_origin = |origin: &str| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = t.url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let refused = ws_with_origin("https://evil.example").await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
        }
        other => panic!(
            "a foreign origin must be refused, got {:?}",
            other.map(|_| ())
        ),
    }
    for origin in [
        "https://meridian.example.com".to_string(),
        format!("http://{addr}"),
    ] {
        assert!(ws_with_origin(&origin).await.is_ok(), "{origin}");
    }
    t.node.shutdown().await;
}

/// Item 9: dev mode mints tokens for anyone; on a non-loopback address the node does
/// not start unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_on_a_public_address_needs_to_be_forced() {
    let mut config = meridian_server::Config::default();
    config.http.addr = "0.0.0.0:0".parse().unwrap();
    config.http.dev = true;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("--dev-allow-remote"), "{err}");
    let t = start_node(|c| {
        c.http.addr = "0.0.0.0:0".parse().unwrap();
        c.http.dev = true;
        c.http.dev_allow_remote = true;
    })
    .await;
    assert!(t.node.dev);
    t.node.shutdown().await;
}

fn admin_token(t: &TestNode, room: &str) -> String {
    let claims = meridian_auth::Claims::new(
        "operator",
        room,
        meridian_auth::unix_now(),
        Duration::from_secs(600),
    )
    .with_grants(meridian_auth::Grants::admin());
    t.keys.sign(&claims).unwrap()
}

/// Item 8: an admin token for one room reads only that room's audit trail and acts
/// only on that room's participants; removal cannot be undone by resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_scoped_admins_and_removal() {
    let t = start_node(|_| {}).await;
    let addr = t.node.http_addr;
    let mut alice = RawSignal::connect(&t.url).await;
    alice.send_text(&join_message(&t, "alice", "a")).await;
    let (pid, resume) = match alice.recv().await {
        Some(ServerMessage::Joined {
            participant_id,
            resume,
            ..
        }) => (participant_id, resume),
        other => panic!("expected joined, got {other:?}"),
    };
    let other = admin_token(&t, "b");
    let tn = &t;
    let post =
        |path: String, token: String| async move { tn.internal("POST", &path, Some(&token)).await };
    let close = format!("/admin/participants/{pid}/close-signaling");
    let remove = format!("/admin/participants/{pid}/remove");
    assert_eq!(post(close.clone(), other.clone()).await.0, 404);
    assert_eq!(post(remove.clone(), other.clone()).await.0, 404);
    let get = |path: &'static str, token: &str| {
        let token = token.to_string();
        async move { tn.internal("GET", path, Some(&token)).await }
    };
    // Not on the public listener any more.
    for (method, path) in [
        ("POST", close.as_str()),
        ("GET", "/audit/rooms"),
        ("GET", "/metrics"),
    ] {
        assert_eq!(
            raw_http(addr, request(method, path, "127.0.0.1", Some(&other)))
                .await
                .0,
            404,
            "{method} {path} on the public listener"
        );
    }
    assert_eq!(get("/audit/rooms/a/history", &other).await.0, 403);
    assert_eq!(get("/audit/rooms", &other).await.0, 403);
    assert_eq!(get("/audit/verify", &other).await.0, 403);
    let (status, body) = get("/audit/rooms/b/history", &other).await;
    assert_eq!(status, 200, "{body}");
    let own = admin_token(&t, "a");
    let (status, body) = get("/audit/rooms/a/history", &own).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice"), "{body}");
    // Removed by the room's admin: told so, closed, and the resume token is dead.
    assert_eq!(post(remove, own).await.0, 204);
    let mut removed = false;
    while let Some(m) = alice.recv().await {
        if matches!(&m, ServerMessage::Left { reason } if reason == "removed") {
            removed = true;
        }
    }
    assert!(removed, "alice is told she was removed");
    let mut again = RawSignal::connect(&t.url).await;
    again
        .send_text(
            &ClientMessage::Join {
                token: t.token("alice", "a", true),
                resume: Some(resume),
                version: meridian_protocol::PROTOCOL_VERSION,
                auto_subscribe: false,
                client: None,
            }
            .encode(),
        )
        .await;
    assert_eq!(
        again.next_error().await,
        Some(meridian_protocol::ErrorCode::ResumeFailed)
    );
    // Nor by joining afresh with a still-valid token: the identity is banned from the
    // room for `signaling.removal_ban_secs`; other rooms and identities are not.
    let mut fresh = RawSignal::connect(&t.url).await;
    fresh.send_text(&join_message(&t, "alice", "a")).await;
    match fresh.recv().await {
        Some(ServerMessage::Error { code, message }) => {
            assert_eq!(code, meridian_protocol::ErrorCode::Forbidden);
            assert!(message.contains("removed"), "{message}");
        }
        other => panic!("a banned identity must be refused, got {other:?}"),
    }
    for (who, room) in [("alice", "b"), ("carol", "a")] {
        let mut ok = RawSignal::connect(&t.url).await;
        ok.send_text(&join_message(&t, who, room)).await;
        assert!(
            matches!(ok.recv().await, Some(ServerMessage::Joined { .. })),
            "{who} in {room}"
        );
    }
    t.node.shutdown().await;
}

/// Item 9 for WebTransport: a page on a foreign site cannot open a session; the
/// node's own pages (same host, the HTTP port) and clients without `Origin` can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_sessions_from_foreign_origins_are_refused() {
    let t = start_node(|_| {}).await;
    let ep = t.wt_endpoint().await;
    let connect = |origin: Option<String>| {
        let ep = ep.clone();
        async move {
            let config = wtransport::ClientConfig::builder()
                .with_bind_address("127.0.0.1:0".parse().unwrap())
                .with_server_certificate_hashes(
                    ep.certificate_hashes
                        .iter()
                        .map(|h| wtransport::tls::Sha256Digest::new(*h)),
                )
                .build();
            let endpoint = wtransport::Endpoint::client(config).unwrap();
            let mut opts = wtransport::endpoint::ConnectOptions::builder(&ep.url);
            if let Some(o) = origin {
                opts = opts.add_header("origin", o);
            }
            let r = tokio::time::timeout(Duration::from_secs(5), endpoint.connect(opts.build()))
                .await
                .expect("an answer in time");
            r.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    let before = t.metric("meridian_host_refusals_total").await;
    let refused = connect(Some("https://evil.example".into())).await;
    assert!(refused.is_err(), "a foreign origin must be refused");
    assert_eq!(t.metric("meridian_host_refusals_total").await, before + 1.0);
    let own = format!("http://{}", t.node.http_addr);
    connect(Some(own.clone()))
        .await
        .unwrap_or_else(|e| panic!("the node's own page {own}: {e}"));
    connect(None).await.expect("no Origin: not a browser page");
    t.node.shutdown().await;
}

/// Item 8: tokens without this node's audience, or living longer than the cap, are
/// refused; a joined session can refresh its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_lifetime_and_refresh() {
    let t = start_node(|c| c.auth.max_token_lifetime_secs = 3600).await;
    let now = meridian_auth::unix_now();
    let base = meridian_auth::Claims::new("eve", "r", now, Duration::from_secs(600))
        .with_grants(meridian_auth::Grants::publisher());
    let mut no_aud = base.clone();
    no_aud.aud = None;
    let long = meridian_auth::Claims::new("eve", "r", now, Duration::from_secs(7200));
    for (claims, code) in [
        (no_aud, "token_wrong_audience"),
        (
            base.clone().with_audience("elsewhere"),
            "token_wrong_audience",
        ),
        (long, "token_lifetime_too_long"),
        (
            base.clone().with_not_before(now + 600),
            "token_not_yet_valid",
        ),
    ] {
        let mut ws = RawSignal::connect(&t.url).await;
        let join = ClientMessage::Join {
            token: t.keys.sign(&claims).unwrap(),
            resume: None,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: false,
            client: None,
        };
        ws.send_text(&join.encode()).await;
        match ws.recv().await {
            Some(ServerMessage::Error { code: c, message }) => {
                assert_eq!(c, meridian_protocol::ErrorCode::Unauthorized);
                assert!(message.contains(code), "{message} should name {code}");
            }
            other => panic!("expected {code}, got {other:?}"),
        }
    }
    let mut ws = RawSignal::connect(&t.url).await;
    ws.send_text(&join_message(&t, "eve", "r")).await;
    assert!(matches!(
        ws.recv().await,
        Some(ServerMessage::Joined { .. })
    ));
    ws.send_text(
        &ClientMessage::Refresh {
            token: t.token("eve", "r", true),
        }
        .encode(),
    )
    .await;
    match ws.recv().await {
        Some(ServerMessage::Refreshed { expires_in_secs }) => {
            assert!((590..=600).contains(&expires_in_secs))
        }
        other => panic!("expected refreshed, got {other:?}"),
    }
    // A refresh naming someone else ends the session.
    ws.send_text(
        &ClientMessage::Refresh {
            token: t.token("mallory", "r", true),
        }
        .encode(),
    )
    .await;
    assert_eq!(
        ws.next_error().await,
        Some(meridian_protocol::ErrorCode::Unauthorized)
    );
    t.node.shutdown().await;
}

/// Item 8, the Rust client's side: a session whose token is about to expire lives on
/// after `Client::refresh`, and one that is not refreshed is ended by the node (the
/// client cannot rejoin with the expired token, so its task stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_refresh_keeps_the_session_past_its_token() {
    let t = start_node(|_| {}).await;
    let short = |identity: &str| {
        let claims = meridian_auth::Claims::new(
            identity,
            "r",
            meridian_auth::unix_now(),
            Duration::from_secs(2),
        )
        .with_grants(meridian_auth::Grants::subscriber());
        t.keys.sign(&claims).unwrap()
    };
    let kept = meridian_client::Client::join(meridian_client::ClientConfig::subscriber(
        &t.url,
        short("kept"),
    ))
    .await
    .expect("joins");
    let lapsed = meridian_client::Client::join(meridian_client::ClientConfig::subscriber(
        &t.url,
        short("lapsed"),
    ))
    .await
    .expect("joins");
    kept.refresh(t.token("kept", "r", false)).await;
    // 2 s of token plus the node's 5 s leeway, and time for the rejoin to be refused.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        kept.is_running(),
        "the refreshed client is still in the room"
    );
    assert_eq!(kept.stats().losses, 0, "and never lost its node");
    assert!(
        !lapsed.is_running(),
        "the node ended the session whose token expired"
    );
    kept.leave().await.expect("leaves");
    t.node.shutdown().await;
}
