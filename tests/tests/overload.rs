//! An overloaded media worker (issue 12): past `[media] overload_busy_share` it refuses
//! fresh joins with `unavailable` and the node reports not ready, while the sessions
//! it holds go on; once its load falls it takes joins again. The worker is kept busy
//! with the dev-mode stall (`POST /dev/stall-worker`), its thread blocked as a
//! saturated worker's is.

use std::time::Duration;

use meridian_protocol::{ClientMessage, ErrorCode, ServerMessage};
use meridian_tests::{RawSignal, TestNode, dev_post, http_get, start_node};

fn join_message(t: &TestNode, identity: &str) -> String {
    ClientMessage::Join {
        token: t.token(identity, "busy", true),
        resume: None,
        version: meridian_protocol::PROTOCOL_VERSION,
        auto_subscribe: false,
        client: Some("overload".into()),
    }
    .encode()
}

/// A node in dev mode (for the stall hook) with one media worker.
async fn one_worker_dev_node() -> TestNode {
    start_node(|c| {
        c.http.dev = true;
        c.media.workers = 1;
    })
    .await
}

async fn joined(s: &mut RawSignal) -> bool {
    loop {
        match s.recv().await {
            Some(ServerMessage::Joined { .. }) => return true,
            Some(ServerMessage::Error { .. }) | None => return false,
            Some(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_worker_refuses_fresh_joins_until_its_load_falls() {
    let t = one_worker_dev_node().await;
    let ready = format!("http://{}/readyz", t.node.http_addr);
    let mut a = RawSignal::connect(&t.url).await;
    a.send_text(&join_message(&t, "a")).await;
    assert!(joined(&mut a).await, "a joins an idle node");
    assert_eq!(http_get(&ready).await, "ready\n");

    // Two stalls of 3 s back to back: after the first the worker is overloaded, and
    // during the second nothing can change that.
    let stall = |ms: u64| {
        let url = t.url.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"worker":0,"ms":{ms}}}"#);
            dev_post(&url, "/dev/stall-worker", &body).await
        })
    };
    let first = stall(3000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = stall(3000);
    assert_eq!(first.await.expect("first stall"), 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = http_get(&ready).await;
    assert!(answer.starts_with("overloaded"), "readyz: {answer}");
    // A fresh join waits behind the stall, then is refused.
    let mut b = RawSignal::connect(&t.url).await;
    b.send_text(&join_message(&t, "b")).await;
    assert_eq!(second.await.expect("second stall"), 204);
    assert_eq!(b.next_error().await, Some(ErrorCode::Unavailable));
    assert_eq!(
        t.metric(r#"meridian_media_worker_joins_refused_total{worker="0"}"#)
            .await,
        1.0
    );

    // The session it held goes on.
    a.send_text(&ClientMessage::Ping { id: 7 }.encode()).await;
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match a.recv().await {
                Some(ServerMessage::Pong { id }) => return Some(id),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await;
    assert_eq!(pong, Ok(Some(7)), "a's session answers after the overload");

    // Idle again: fresh joins are taken once the worker's load fell (well under a
    // second), and the node is ready again after the readiness hold (5 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let _c = loop {
        let mut c = RawSignal::connect(&t.url).await;
        c.send_text(&join_message(&t, "c")).await;
        if joined(&mut c).await {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fresh joins taken again within 5 s of the stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let gauge = r#"meridian_media_worker_overloaded{worker="0"}"#;
    assert_eq!(t.wait_metric(gauge, 0.0, Duration::from_secs(2)).await, 0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http_get(&ready).await != "ready\n" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ready again within 10 s of the stall"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The hook's own input.
    let post = |body: &'static str| dev_post(&t.url, "/dev/stall-worker", body);
    assert_eq!(post(r#"{"worker":1,"ms":10}"#).await, 404, "no worker 1");
    assert_eq!(post(r#"{"worker":0,"ms":10001}"#).await, 400, "over 10 s");
    assert_eq!(post(r#"{"worker":0,"ms":0}"#).await, 400, "zero");
    assert_eq!(post("{").await, 400, "malformed");
    t.node.shutdown().await;
}

/// A refused fresh join is tried again by the Rust client within its join timeout, so a
/// worker overloaded for a moment does not fail the client's join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_retries_a_join_refused_as_unavailable() {
    let t = one_worker_dev_node().await;
    let url = t.url.clone();
    let stall = tokio::spawn(async move {
        dev_post(&url, "/dev/stall-worker", r#"{"worker":0,"ms":3000}"#).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut config =
        meridian_client::ClientConfig::subscriber(&t.url, t.token("late", "busy", false));
    config.join_timeout = Duration::from_secs(20);
    let client = meridian_client::Client::join(config)
        .await
        .expect("the join succeeds once the worker takes joins again");
    assert_eq!(stall.await.expect("stall"), 204);
    assert!(
        t.metric(r#"meridian_media_worker_joins_refused_total{worker="0"}"#)
            .await
            >= 1.0,
        "the first attempt was refused"
    );
    client.leave().await.expect("leaves");
    t.node.shutdown().await;
}
