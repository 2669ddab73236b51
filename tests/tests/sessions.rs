//! Session behaviour over both signaling transports: room updates, resume, redirect,
//! grants and refused tokens. Every test runs once over WebSocket and once over
//! WebTransport against the same node.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meridian_auth::{Algorithm, Claims, Grants, KeySet, SigningKey};
use meridian_protocol::{ClientMessage, ErrorCode, ServerMessage};
use meridian_tests::{RawSignal, RawWt, TestNode, start_node};

enum Conn {
    Ws(RawSignal),
    Wt(RawWt),
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Ws,
    Wt,
}

const BOTH: [Transport; 2] = [Transport::Ws, Transport::Wt];

impl Conn {
    async fn open(t: &TestNode, transport: Transport) -> Conn {
        match transport {
            Transport::Ws => Conn::Ws(RawSignal::connect(&t.url).await),
            Transport::Wt => Conn::Wt(RawWt::connect(&t.wt_endpoint().await).await),
        }
    }

    async fn send(&mut self, msg: &ClientMessage) {
        match self {
            Conn::Ws(c) => c.send_text(&msg.encode()).await,
            Conn::Wt(c) => c.send_text(&msg.encode()).await,
        }
    }

    async fn recv(&mut self) -> Option<ServerMessage> {
        match self {
            Conn::Ws(c) => c.recv().await,
            Conn::Wt(c) => c.recv().await,
        }
    }

    /// The next message `pick` accepts, skipping others (bounded by `recv`'s timeout).
    async fn next<T>(&mut self, mut pick: impl FnMut(ServerMessage) -> Option<T>) -> Option<T> {
        for _ in 0..100 {
            if let Some(v) = pick(self.recv().await?) {
                return Some(v);
            }
        }
        None
    }

    async fn join(&mut self, token: String, resume: Option<String>) -> ServerMessage {
        self.send(&ClientMessage::Join {
            token,
            resume,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: true,
            client: None,
        })
        .await;
        self.recv().await.expect("an answer to join")
    }
}

fn joined_ids(msg: &ServerMessage) -> (String, String) {
    match msg {
        ServerMessage::Joined {
            participant_id,
            resume,
            ..
        } => (participant_id.clone(), resume.clone()),
        other => panic!("expected joined, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_pushed_to_the_room() {
    let t = start_node(|_| {}).await;
    for transport in BOTH {
        let room = format!("push-{transport:?}");
        let mut a = Conn::open(&t, transport).await;
        let (_, _) = joined_ids(&a.join(t.token("a", &room, false), None).await);
        let mut b = Conn::open(&t, transport).await;
        let (b_id, _) = joined_ids(&b.join(t.token("b", &room, false), None).await);
        let seen = a
            .next(|m| match m {
                ServerMessage::ParticipantJoined { participant } => Some(participant),
                _ => None,
            })
            .await
            .expect("participant_joined pushed");
        assert_eq!(
            (seen.participant_id.as_str(), seen.identity.as_str()),
            (b_id.as_str(), "b")
        );
        b.send(&ClientMessage::Leave).await;
        assert!(
            matches!(b.recv().await, Some(ServerMessage::Left { .. })),
            "{transport:?}"
        );
        let left = a
            .next(|m| match m {
                ServerMessage::ParticipantLeft { participant_id } => Some(participant_id),
                _ => None,
            })
            .await
            .expect("participant_left pushed");
        assert_eq!(left, b_id, "{transport:?}");
    }
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_resumes_with_its_participant() {
    let t = start_node(|c| c.signaling.resume_grace_secs = 5).await;
    for transport in BOTH {
        let room = format!("resume-{transport:?}");
        let mut watcher = Conn::open(&t, transport).await;
        joined_ids(&watcher.join(t.token("w", &room, false), None).await);
        let mut a = Conn::open(&t, transport).await;
        let (id, resume) = joined_ids(&a.join(t.token("a", &room, false), None).await);
        drop(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut again = Conn::open(&t, transport).await;
        let (id2, _) = joined_ids(
            &again
                .join(t.token("a", &room, false), Some(resume.clone()))
                .await,
        );
        assert_eq!(id2, id, "{transport:?}: same participant after resume");
        // A wrong resume token is refused with its code.
        let mut stranger = Conn::open(&t, transport).await;
        match stranger
            .join(t.token("a", &room, false), Some("0".repeat(48)))
            .await
        {
            ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::ResumeFailed),
            other => panic!("{transport:?}: expected resume_failed, got {other:?}"),
        }
        // The watcher never saw the resumed participant leave.
        again.send(&ClientMessage::Ping { id: 1 }).await;
        assert!(matches!(
            again.recv().await,
            Some(ServerMessage::Pong { id: 1 })
        ));
        let left = tokio::time::timeout(
            Duration::from_millis(500),
            watcher.next(|m| match m {
                ServerMessage::ParticipantLeft { participant_id } => Some(participant_id),
                _ => None,
            }),
        )
        .await;
        assert!(
            !matches!(left, Ok(Some(ref p)) if *p == id),
            "{transport:?}: {left:?}"
        );
    }
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_region_is_redirected() {
    let t = start_node(|c| {
        c.node.region = "eu".into();
        c.node
            .region_urls
            .insert("us".into(), "wss://us.example.test/signal".into());
    })
    .await;
    for transport in BOTH {
        let claims = Claims::new(
            "traveller",
            "r",
            meridian_auth::unix_now(),
            Duration::from_secs(60),
        )
        .with_region("us");
        let mut c = Conn::open(&t, transport).await;
        match c.join(t.keys.sign(&claims).unwrap(), None).await {
            ServerMessage::Redirect { region, url } => {
                assert_eq!(
                    (region.as_str(), url.as_str()),
                    ("us", "wss://us.example.test/signal")
                );
            }
            other => panic!("{transport:?}: expected redirect, got {other:?}"),
        }
        // A token for this region is served.
        let home = Claims::new(
            "local",
            "r",
            meridian_auth::unix_now(),
            Duration::from_secs(60),
        )
        .with_region("eu");
        let mut c = Conn::open(&t, transport).await;
        joined_ids(&c.join(t.keys.sign(&home).unwrap(), None).await);
    }
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_enforced_on_every_message() {
    let t = start_node(|_| {}).await;
    for transport in BOTH {
        let mut c = Conn::open(&t, transport).await;
        joined_ids(&c.join(t.token("viewer", "g", false), None).await);
        c.send(&ClientMessage::Offer {
            sdp: "v=0".into(),
            tracks: vec![],
        })
        .await;
        let code = c
            .next(|m| match m {
                ServerMessage::Error { code, .. } => Some(code),
                _ => None,
            })
            .await;
        assert_eq!(code, Some(ErrorCode::Forbidden), "{transport:?}");
        let publisher_only =
            Claims::new("p", "g", meridian_auth::unix_now(), Duration::from_secs(60)).with_grants(
                Grants {
                    publish: true,
                    subscribe: false,
                    admin: false,
                },
            );
        let mut p = Conn::open(&t, transport).await;
        joined_ids(&p.join(t.keys.sign(&publisher_only).unwrap(), None).await);
        p.send(&ClientMessage::Subscribe {
            track_ids: vec!["TR_1".into()],
        })
        .await;
        let code = p
            .next(|m| match m {
                ServerMessage::Error { code, .. } => Some(code),
                _ => None,
            })
            .await;
        assert_eq!(code, Some(ErrorCode::Forbidden), "{transport:?}");
    }
    t.node.shutdown().await;
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_name_their_reason() {
    let t = start_node(|_| {}).await;
    let now = meridian_auth::unix_now();
    let claims =
        Claims::new("mallory", "r", now, Duration::from_secs(600)).with_grants(Grants::admin());
    let claims_json = serde_json::to_vec(&claims).unwrap();
    let kid = t.keys.signing_key().unwrap().kid().to_string();

    let alg_none = format!(
        "{}.{}.",
        b64(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#).as_bytes()),
        b64(&claims_json)
    );
    let public_pem = t
        .keys
        .signing_key()
        .unwrap()
        .verifying_key()
        .to_public_pem();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.clone());
    let hs256_with_public_key = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
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
        Some(SigningKey::generate(Algorithm::Es256, kid.clone()).unwrap()),
        vec![],
    );
    let wrongly_signed = stranger.sign(&claims).unwrap();

    for transport in BOTH {
        for (token, reason) in [
            (&alg_none, "token_alg_not_allowed"),
            (&hs256_with_public_key, "token_alg_not_allowed"),
            (&expired, "token_expired"),
            (&wrongly_signed, "token_bad_signature"),
        ] {
            let mut c = Conn::open(&t, transport).await;
            match c.join(token.clone(), None).await {
                ServerMessage::Error { code, message } => {
                    assert_eq!(code, ErrorCode::Unauthorized, "{transport:?} {reason}");
                    assert!(
                        message.contains(reason),
                        "{transport:?}: {message} lacks {reason}"
                    );
                }
                other => panic!("{transport:?} {reason}: expected an error, got {other:?}"),
            }
            assert!(
                c.recv().await.is_none(),
                "{transport:?}: closed after {reason}"
            );
        }
    }
    t.node.shutdown().await;
}
