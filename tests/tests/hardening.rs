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
    assert!(matches!(ws.recv().await, Some(ServerMessage::Joined { .. })));
    let mut wt = RawWt::connect(&ep).await;
    wt.send_text(&join_message(&t, "after-wt", "wt-end")).await;
    assert!(matches!(wt.recv().await, Some(ServerMessage::Joined { .. })));
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
                match tokio::time::timeout(Duration::from_secs(1), ws.send(Message::text(big.clone())))
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
    assert!(matches!(ws.recv().await, Some(ServerMessage::Joined { .. })));
    t.node.shutdown().await;
}
