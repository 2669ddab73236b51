//! Bad input on every edge gets a clear error or is dropped and counted, and the node
//! keeps serving everyone else.

use std::time::Duration;

use meridian_auth::{Algorithm, Claims, Grants, KeySet, SigningKey};
use meridian_client::{Client, ClientConfig, ClientError};
use meridian_protocol::{ClientMessage, ErrorCode, ServerMessage};
use meridian_tests::{RawSignal, TestNode, start_node};

/// A STUN binding request whose USERNAME names an ICE ufrag nobody has.
fn stun_with_unknown_ufrag() -> Vec<u8> {
    let username = b"nobody00:client00";
    let mut attr = Vec::new();
    attr.extend_from_slice(&0x0006u16.to_be_bytes());
    attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attr.extend_from_slice(username);
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&0x0001u16.to_be_bytes());
    msg.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    msg.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    msg.extend_from_slice(&[7u8; 12]);
    msg.extend_from_slice(&attr);
    msg
}

async fn joined(t: &TestNode, identity: &str) -> RawSignal {
    let mut s = RawSignal::connect(&t.url).await;
    s.send_text(
        &ClientMessage::Join {
            token: t.token(identity, "bad", true),
            resume: None,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: false,
            client: None,
        }
        .encode(),
    )
    .await;
    assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_edge_leaves_other_sessions_untouched() {
    let t = start_node(|_| {}).await;
    let _publisher = Client::join(ClientConfig::new(&t.url, t.token("pub", "bad", true)))
        .await
        .expect("publisher joins");
    let viewer = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("viewer", "bad", false),
    ))
    .await
    .expect("viewer joins");
    viewer
        .wait_for(Duration::from_secs(20), |s| s.video_tracks_with(10) == 1)
        .await
        .expect("viewer receives video");

    // Media port: garbage, truncated RTP, fake DTLS, STUN for an unknown ufrag.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let media = t.node.media_addr;
    let mut seed = 0x9e37_79b9_u32;
    for i in 0..500 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let len = (seed % 1400) as usize;
        let mut datagram: Vec<u8> = (0..len).map(|j| (seed as usize + j * 31) as u8).collect();
        match i % 5 {
            0 => datagram.truncate(1),
            1 => datagram.splice(0..0, [0x80, 0x60]).for_each(drop),
            2 => datagram.splice(0..0, [22, 254, 253]).for_each(drop),
            3 => datagram = stun_with_unknown_ufrag(),
            _ => datagram.insert(0, 0xff),
        }
        udp.send_to(&datagram, media).await.unwrap();
    }
    let unrouted = r#"meridian_datagrams_dropped_total{reason="unrouted"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while t.metric(unrouted).await < 100.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.metric(unrouted).await >= 100.0, "garbage is counted");
    assert!(
        t.metric(r#"meridian_datagrams_dropped_total{reason="malformed"}"#)
            .await
            >= 1.0
    );

    // Signaling: every kind of bad message gets its code.
    let mut s = RawSignal::connect(&t.url).await;
    s.send_text(r#"{"type":"subscribe","track_ids":[]}"#).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::NotJoined));
    s.send_text("{not json").await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_text(r#"{"type":"teleport"}"#).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_text(r#"{"type":"join""#).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_binary(vec![1, 2, 3]).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MalformedMessage));
    s.send_text(&" ".repeat(meridian_protocol::MAX_MESSAGE_BYTES + 100))
        .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::MessageTooLarge));

    let mut s = joined(&t, "sdp").await;
    s.send_text(
        &ClientMessage::Offer {
            sdp: "v=0 garbage".into(),
            tracks: vec![],
        }
        .encode(),
    )
    .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::InvalidSdp));
    s.send_text(&ClientMessage::Answer { sdp: "v=0".into() }.encode())
        .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::InvalidSdp));
    s.send_text(
        &ClientMessage::Subscribe {
            track_ids: vec!["TR_99999".into()],
        }
        .encode(),
    )
    .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::NotFound));
    s.send_text(
        &ClientMessage::Subscribe {
            track_ids: vec!["nonsense".into()],
        }
        .encode(),
    )
    .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::NotFound));

    // A flood above the rate limit is refused with its code.
    let mut flood = joined(&t, "flood").await;
    for i in 0..200 {
        flood
            .send_text(&ClientMessage::Ping { id: i }.encode())
            .await;
    }
    assert_eq!(flood.next_error().await, Some(ErrorCode::RateLimited));

    // The viewer kept receiving throughout.
    let before = viewer.stats().video_frames();
    viewer
        .wait_for(Duration::from_secs(5), |s| s.video_frames() > before + 20)
        .await
        .expect("media keeps flowing for everyone else");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_unauthorized() {
    let t = start_node(|_| {}).await;
    let now = meridian_auth::unix_now();
    let expired = t
        .keys
        .sign(&Claims::new(
            "late",
            "r",
            now - 7200,
            Duration::from_secs(60),
        ))
        .unwrap();
    let stranger = KeySet::new(
        Some(SigningKey::generate(Algorithm::Es256, "test-1").unwrap()),
        vec![],
    );
    let forged = stranger
        .sign(
            &Claims::new("eve", "r", now, Duration::from_secs(60)).with_grants(Grants::publisher()),
        )
        .unwrap();
    for (what, token) in [
        ("expired", expired),
        ("signed by an unknown key", forged),
        ("garbage", "not.a.token".to_string()),
        ("empty", String::new()),
    ] {
        match Client::join(ClientConfig::new(&t.url, token)).await {
            Err(ClientError::Refused { code, .. }) => {
                assert_eq!(code, ErrorCode::Unauthorized, "{what}");
            }
            other => panic!(
                "{what} token: expected unauthorized, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // A subscriber-only token cannot publish.
    let mut s = RawSignal::connect(&t.url).await;
    s.send_text(
        &ClientMessage::Join {
            token: t.token("viewer", "r", false),
            resume: None,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: true,
            client: None,
        }
        .encode(),
    )
    .await;
    assert!(matches!(s.recv().await, Some(ServerMessage::Joined { .. })));
    s.send_text(
        &ClientMessage::Offer {
            sdp: "v=0".into(),
            tracks: vec![],
        }
        .encode(),
    )
    .await;
    assert_eq!(s.next_error().await, Some(ErrorCode::Forbidden));
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_joins_is_closed() {
    let t = start_node(|c| c.signaling.join_timeout_secs = 1).await;
    let mut s = RawSignal::connect(&t.url).await;
    assert_eq!(s.next_error().await, Some(ErrorCode::Timeout));
    assert!(s.recv().await.is_none(), "closed after the timeout");
    t.node.shutdown().await;
}
