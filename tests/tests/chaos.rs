//! Node-side impairment (`--impair`, issue 15): the node delays and drops its own media
//! datagrams with a seeded emulator, and a client measures it; a node without dev mode
//! refuses the setting.

use std::time::Duration;

use meridian_client::{Client, ClientConfig};
use meridian_server::{Config, ConfigError, Node, NodeError};
use meridian_tests::start_node;

/// The tests that read latencies run one at a time: two nodes and their clients on
/// two cores would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impaired_node_delays_and_drops_what_it_sends() {
    let _serial = SERIAL.lock().await;
    let t = start_node(|c| {
        c.http.dev = true;
        c.media.impair = Some("delay=150ms,loss=10%".into());
        c.media.impair_seed = 42;
    })
    .await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let sub = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("bob", "r1", false),
    ))
    .await
    .expect("subscriber joins");
    let stats = sub
        .wait_for(Duration::from_secs(30), |st| {
            st.audio_tracks_with(150) == 1 && st.video_tracks_with(30) == 1
        })
        .await
        .unwrap_or_else(|st| panic!("no media through the impaired node: {st:#?}"));
    let audio = stats.tracks.values().find(|t| !t.video).expect("audio");
    let latency = median(&audio.latency_ms);
    assert!(
        (140.0..400.0).contains(&latency),
        "audio latency median {latency} ms through a 150 ms egress delay"
    );
    // Audio is one packet per frame and not retransmitted: its loss is the node's.
    let loss = audio.frames_missing as f64 / (audio.frames + audio.frames_missing) as f64;
    assert!(
        (0.03..0.25).contains(&loss),
        "audio loss {loss} through 10 % egress loss ({} frames, {} missing)",
        audio.frames,
        audio.frames_missing
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unimpaired_node_measures_no_delay_and_no_loss() {
    let _serial = SERIAL.lock().await;
    // The control for the test above: the same clients without `impair`.
    let t = start_node(|c| c.http.dev = true).await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let sub = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("bob", "r1", false),
    ))
    .await
    .expect("subscriber joins");
    let stats = sub
        .wait_for(Duration::from_secs(30), |st| st.audio_tracks_with(150) == 1)
        .await
        .unwrap_or_else(|st| panic!("no media: {st:#?}"));
    let audio = stats.tracks.values().find(|t| !t.video).expect("audio");
    let latency = median(&audio.latency_ms);
    assert!(
        latency < 100.0,
        "loopback audio latency median {latency} ms"
    );
    assert!(
        audio.frames_missing * 100 < audio.frames,
        "loopback audio lost {} of {}",
        audio.frames_missing,
        audio.frames
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}

#[tokio::test]
async fn impairment_is_refused_without_dev_mode_and_when_malformed() {
    for (dev, spec) in [
        (false, "delay=200ms"),
        (true, "delay=soon"),
        (true, "loss=200%"),
    ] {
        let mut config = Config::default();
        config.http.addr = "127.0.0.1:0".parse().unwrap();
        config.media.addr = "127.0.0.1:0".parse().unwrap();
        config.webtransport.addr = "127.0.0.1:0".parse().unwrap();
        config.http.dev = dev;
        config.media.impair = Some(spec.into());
        match Node::start(config).await {
            Err(NodeError::Config(ConfigError::Invalid { field, reason })) => {
                assert_eq!(field, "media.impair");
                if !dev {
                    assert!(reason.contains("--dev"), "{reason}");
                }
            }
            Err(e) => panic!("{spec}: wrong error {e}"),
            Ok(_) => panic!("{spec} (dev {dev}) accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_receiver_skips_what_it_cannot_complete_and_asks_for_a_keyframe() {
    let _serial = SERIAL.lock().await;
    let t = start_node(|c| {
        c.http.dev = true;
        c.media.impair = Some("delay=100ms,loss=5%".into());
        c.media.impair_seed = 3;
    })
    .await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let mut config = ClientConfig::subscriber(&t.url, t.token("bob", "r1", false));
    config.playout_deadline = Some(Duration::from_millis(40));
    let sub = Client::join(config).await.expect("subscriber joins");
    let stats = sub
        .wait_for(Duration::from_secs(40), |st| {
            st.tracks
                .values()
                .any(|t| t.video && t.frames >= 150 && t.skips >= 2)
                && st.audio_tracks_with(100) == 1
        })
        .await
        .unwrap_or_else(|st| panic!("no skips or too few frames: {st:#?}"));
    let video = stats.tracks.values().find(|t| t.video).expect("video");
    assert!(video.keyframes_requested >= 1, "{video:#?}");
    // Steady state: the first second of frames (ICE, DTLS, the first keyframe) is
    // left out.
    let mut latency: Vec<f64> = video.latency_ms.iter().skip(30).copied().collect();
    latency.sort_by(|a, b| a.total_cmp(b));
    let p95 = latency[latency.len() * 95 / 100];
    eprintln!(
        "deadline receiver: {} frames, {} missing, {} skips, {} keyframes asked, p95 {p95:.1} ms",
        video.frames, video.frames_missing, video.skips, video.keyframes_requested
    );
    // 100 ms injected + at most the 40 ms deadline of waiting + the frame's own
    // packetisation; a receiver that waited for NACK repairs would show the repair
    // round trip (≥ 100 ms more) in its tail.
    assert!(
        (95.0..260.0).contains(&p95),
        "video latency p95 {p95} ms with a 40 ms deadline"
    );
    let audio = stats.tracks.values().find(|t| !t.video).expect("audio");
    assert!(
        audio.frames > 0 && audio.skips > 0,
        "audio gaps skipped: {audio:#?}"
    );
    assert!(
        publisher.stats().keyframe_requests >= 1,
        "the keyframe request reached the publisher"
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_red_recovers_what_the_impaired_node_drops() {
    let _serial = SERIAL.lock().await;
    let t = start_node(|c| {
        c.http.dev = true;
        c.media.impair = Some("delay=50ms,loss=10%".into());
        c.media.impair_seed = 5;
    })
    .await;
    let mut config = ClientConfig::new(&t.url, t.token("alice", "r1", true));
    config.red = true;
    config.publish_video = false;
    let publisher = Client::join(config).await.expect("publisher joins");
    let mut config = ClientConfig::subscriber(&t.url, t.token("bob", "r1", false));
    config.red = true;
    config.playout_deadline = Some(Duration::from_millis(60));
    let sub = Client::join(config).await.expect("subscriber joins");
    let stats = sub
        .wait_for(Duration::from_secs(30), |st| st.audio_tracks_with(250) == 1)
        .await
        .unwrap_or_else(|st| panic!("no audio: {st:#?}"));
    let audio = stats.tracks.values().find(|t| !t.video).expect("audio");
    let loss = audio.frames_missing as f64 / (audio.frames + audio.frames_missing) as f64;
    eprintln!(
        "RED through 10 % egress loss: {} frames, {} missing, {} recovered from RED",
        audio.frames, audio.frames_missing, audio.red_recovered
    );
    // Without RED this link loses ~10 % of the audio (see the first test); with it
    // only two losses in a row do.
    assert!(loss < 0.04, "audio loss {loss} with RED");
    assert!(
        audio.red_recovered >= 5,
        "losses were recovered from RED, not absent: {audio:#?}"
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_fec_rebuilds_what_the_impaired_node_drops() {
    let _serial = SERIAL.lock().await;
    let t = start_node(|c| {
        c.http.dev = true;
        c.media.impair = Some("delay=50ms,loss=5%".into());
        c.media.impair_seed = 9;
    })
    .await;
    let config = ClientConfig::new(&t.url, t.token("alice", "r1", true));
    let publisher = Client::join(config).await.expect("publisher joins");
    let mut config = ClientConfig::subscriber(&t.url, t.token("bob", "r1", false));
    config.fec = true;
    config.playout_deadline = Some(Duration::from_millis(60));
    let sub = Client::join(config).await.expect("subscriber joins");
    // The group follows the loss the subscriber's NACKs show, from the first second.
    let stats = sub
        .wait_for(Duration::from_secs(30), |st| {
            st.video_tracks_with(150) == 1
                && st.tracks.values().any(|t| t.video && t.fec_recovered >= 10)
        })
        .await
        .unwrap_or_else(|st| panic!("no video rebuilt from FEC: {st:#?}"));
    let video = stats.tracks.values().find(|t| t.video).expect("video");
    eprintln!(
        "FEC through 5 % egress loss: {} frames, {} skips, {} packets rebuilt from FEC",
        video.frames, video.skips, video.fec_recovered
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}
