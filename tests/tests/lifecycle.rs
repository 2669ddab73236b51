//! Leaving and disconnecting free everything a participant held.

use std::time::Duration;

use meridian_client::{Client, ClientConfig};
use meridian_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_frees_the_participant_and_tells_the_room() {
    let t = start_node(|_| {}).await;
    let a = Client::join(ClientConfig::new(&t.url, t.token("a", "life", true)))
        .await
        .expect("a joins");
    let b = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("b", "life", false),
    ))
    .await
    .expect("b joins");
    let a_id = a.stats().participant_id;
    let b_id = b.stats().participant_id;
    a.wait_for(Duration::from_secs(5), |s| {
        s.participants_joined.contains(&b_id)
    })
    .await
    .expect("a hears that b joined");
    b.wait_for(Duration::from_secs(20), |s| s.video_tracks_with(5) == 1)
        .await
        .expect("b receives a's video");
    assert_eq!(
        t.wait_metric("meridian_participants", 2.0, Duration::from_secs(3))
            .await,
        2.0
    );

    a.leave().await.expect("a leaves");
    b.wait_for(Duration::from_secs(5), |s| {
        s.participants_left.contains(&a_id)
    })
    .await
    .expect("b hears that a left");
    assert_eq!(
        t.wait_metric("meridian_participants", 1.0, Duration::from_secs(3))
            .await,
        1.0
    );
    assert_eq!(
        t.wait_metric(
            "meridian_outbound_video_tracks",
            0.0,
            Duration::from_secs(3)
        )
        .await,
        0.0
    );
    b.leave().await.expect("b leaves");
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(3))
            .await,
        0.0
    );
    assert_eq!(t.metric("meridian_rooms").await, 0.0);
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_is_removed_after_the_resume_grace() {
    let t = start_node(|c| c.signaling.resume_grace_secs = 1).await;
    let a = Client::join(ClientConfig::new(&t.url, t.token("a", "drop", true)))
        .await
        .expect("a joins");
    let b = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("b", "drop", false),
    ))
    .await
    .expect("b joins");
    b.wait_for(Duration::from_secs(20), |s| s.video_tracks_with(5) == 1)
        .await
        .expect("b receives video");
    let a_id = a.stats().participant_id;
    assert_eq!(
        t.wait_metric("meridian_participants", 2.0, Duration::from_secs(3))
            .await,
        2.0
    );
    a.disconnect().await;
    // Still there during the grace period (it could resume) …
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.metric("meridian_participants").await, 2.0);
    // … and gone after it, with its tracks.
    b.wait_for(Duration::from_secs(5), |s| {
        s.participants_left.contains(&a_id)
    })
    .await
    .expect("b hears that a is gone");
    assert_eq!(
        t.wait_metric("meridian_participants", 1.0, Duration::from_secs(3))
            .await,
        1.0
    );
    b.disconnect().await;
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(4))
            .await,
        0.0
    );
    assert_eq!(t.metric("meridian_rooms").await, 0.0);
    t.node.shutdown().await;
}
