//! One publisher, three subscribers: everyone receives audio and video through a real node.

use std::time::Duration;

use meridian_client::{Client, ClientConfig};
use meridian_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_three_subscribers_receive_audio_and_video() {
    let t = start_node(|_| {}).await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let mut subs = Vec::new();
    for i in 0..3 {
        let c = ClientConfig::subscriber(&t.url, t.token(&format!("sub{i}"), "r1", false));
        subs.push(Client::join(c).await.expect("subscriber joins"));
    }
    for (i, s) in subs.iter().enumerate() {
        let stats = s
            .wait_for(Duration::from_secs(20), |st| {
                st.video_tracks_with(30) == 1 && st.audio_tracks_with(30) == 1
            })
            .await
            .unwrap_or_else(|st| panic!("subscriber {i} did not receive media: {st:#?}"));
        let video = stats
            .tracks
            .values()
            .find(|t| t.video)
            .expect("video track");
        assert!(
            video.keyframes >= 1,
            "the first forwarded video frame is a keyframe"
        );
        let median = {
            let mut l = video.latency_ms.clone();
            l.sort_by(|a, b| a.total_cmp(b));
            l[l.len() / 2]
        };
        assert!(median < 200.0, "loopback latency median {median} ms");
    }
    let p = publisher.stats();
    assert_eq!(
        p.published.len(),
        2,
        "audio and video tracks assigned: {:?}",
        p.published
    );
    assert!(t.metric("meridian_rtp_packets_forwarded_total").await > 0.0);
    assert_eq!(
        t.wait_metric(
            "meridian_outbound_video_tracks",
            3.0,
            Duration::from_secs(3)
        )
        .await,
        3.0
    );
    assert_eq!(
        t.wait_metric("meridian_participants", 4.0, Duration::from_secs(3))
            .await,
        4.0
    );
    assert_eq!(t.metric("meridian_rooms").await, 1.0);
    publisher.leave().await.expect("leave");
    for s in subs {
        s.leave().await.expect("leave");
    }
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(3))
            .await,
        0.0
    );
    t.node.shutdown().await;
}
