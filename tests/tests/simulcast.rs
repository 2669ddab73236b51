//! Simulcast: a subscriber's requested layer and its bandwidth estimate choose what it gets.

use std::time::Duration;

use meridian_client::{Client, ClientConfig, ClientStats};
use meridian_protocol::Layer;
use meridian_tests::start_node;
use str0m_netem::{Bitrate, DataSize, NetemConfig};

fn video_layer(s: &ClientStats) -> Option<u8> {
    s.tracks
        .values()
        .find(|t| t.video)
        .and_then(|t| t.last_layer)
}

fn video_track(s: &ClientStats) -> String {
    s.tracks
        .iter()
        .find(|(_, t)| t.video)
        .map(|(id, _)| id.clone())
        .expect("a video track")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_layer_on_request_then_back_up_at_a_keyframe() {
    let t = start_node(|_| {}).await;
    // Modest layer rates, so the high layer fits the estimate even on a busy machine.
    let mut config = ClientConfig::new(&t.url, t.token("pub", "sim", true));
    config.layer_bitrates = [80_000, 200_000, 450_000];
    let _publisher = Client::join(config).await.expect("publisher joins");
    let sub = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("sub", "sim", false),
    ))
    .await
    .expect("subscriber joins");
    let s = sub
        .wait_for(Duration::from_secs(20), |s| s.video_tracks_with(10) == 1)
        .await
        .expect("video arrives");
    let track = video_track(&s);

    sub.set_max_layer(&track, Layer::Low).await;
    let s = sub
        .wait_for(Duration::from_secs(10), |s| video_layer(s) == Some(0))
        .await
        .unwrap_or_else(|s| panic!("never moved to the low layer: {s:#?}"));
    let keyframes_on_low = s.tracks[&track].keyframes;
    // Stay on the low layer for a while: nothing else is forwarded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(video_layer(&sub.stats()), Some(0));

    sub.set_max_layer(&track, Layer::High).await;
    let s = sub
        .wait_for(Duration::from_secs(20), |s| video_layer(s) == Some(2))
        .await
        .unwrap_or_else(|s| panic!("never switched back up: {s:#?}"));
    let t2 = &s.tracks[&track];
    assert!(
        t2.keyframes > keyframes_on_low,
        "the switch up happened at a keyframe ({} → {})",
        keyframes_on_low,
        t2.keyframes
    );
    let history = &t2.layer_history;
    let low_at = history
        .iter()
        .rposition(|l| *l == 0)
        .expect("low layer seen");
    assert_eq!(history[history.len() - 1], 2);
    assert!(
        low_at < history.len() - 1,
        "high came after low: {history:?}"
    );
    assert!(t.metric("meridian_layer_switches_total").await >= 2.0);
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_estimate_drops_is_moved_down() {
    let t = start_node(|_| {}).await;
    let _publisher = Client::join(ClientConfig::new(&t.url, t.token("pub", "bwe", true)))
        .await
        .expect("publisher joins");
    let sub = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("sub", "bwe", false),
    ))
    .await
    .expect("subscriber joins");
    sub.wait_for(Duration::from_secs(20), |s| {
        video_layer(s).is_some_and(|l| l >= 1)
    })
    .await
    .unwrap_or_else(|s| panic!("never got above the low layer: {s:#?}"));

    // The subscriber's link shrinks to 350 kbit/s: only the low layer (150 kbit/s) fits.
    sub.impair(Some(
        NetemConfig::new()
            .link(Bitrate::kbps(350), DataSize::kbytes(30))
            .seed(7),
    ))
    .await;
    sub.wait_for(Duration::from_secs(30), |s| video_layer(s) == Some(0))
        .await
        .unwrap_or_else(|s| panic!("never moved down: {s:#?}"));
    t.node.shutdown().await;
}
