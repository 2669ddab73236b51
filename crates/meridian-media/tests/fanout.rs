//! One publisher, three subscribers: every subscriber gets audio and video, and the
//! first video frame each one decodes is a keyframe.

mod common;

use std::time::Duration;

use common::{Harness, MediaConfig};
use meridian_media::SfuEvent;

#[test]
fn every_subscriber_gets_audio_and_video_starting_at_a_keyframe() {
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..3)
        .map(|i| h.add_subscriber("room", &format!("sub{i}")))
        .collect();
    assert_eq!(h.sfu.participant_count(), 4);
    assert_eq!(h.sfu.room_count(), 1);
    h.connect(Duration::from_secs(5));
    let connected_at = h.elapsed();
    h.run_for(Duration::from_secs(2));

    let sent = h.clients[publisher].sent;
    assert!(sent[3] >= 90, "publisher sent audio: {sent:?}");
    for &s in &subs {
        let c = &h.clients[s];
        let video: Vec<_> = c.video_frames().collect();
        let audio: Vec<_> = c.audio_frames().collect();
        assert!(
            video.len() >= 50,
            "subscriber {s} got {} video frames (connected at {connected_at:?})",
            video.len()
        );
        assert!(
            audio.len() >= 80,
            "subscriber {s} got {} audio frames",
            audio.len()
        );
        assert!(
            video[0].header.keyframe,
            "first video frame of subscriber {s} is a keyframe: {:?}",
            video[0].header
        );
        // Frames arrive in order, without gaps. At an upward layer switch the old
        // layer's copy of a picture may precede the new layer's keyframe of the same
        // picture (the forwarder keeps the old layer until the switch point).
        for w in video.windows(2) {
            let (a, b) = (w[0].header, w[1].header);
            let switch = b.seq == a.seq && b.layer != a.layer && b.keyframe;
            assert!(
                b.seq > a.seq || switch,
                "video frames in order: {a:?} then {b:?}"
            );
            assert!(w[1].contiguous, "no gap in video: {b:?}");
        }
        // Every subscriber was offered both tracks.
        assert_eq!(c.sub_tracks.len(), 2, "two media sections");
    }
    let connected = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, SfuEvent::Connected { .. }))
        .count();
    assert_eq!(connected, 4, "publisher + 3 subscriber connections");
    let st = h.sfu.stats();
    assert!(st.rtp_packets_forwarded > 0);
    assert_eq!(
        st.datagrams_unrouted + st.datagrams_malformed + st.datagrams_rejected,
        0,
        "{st:?}"
    );
}

/// A participant that only watches never gets a publisher connection (an unused
/// `Rtc` is about 26 KiB, most of a large room only watches); one that publishes gets
/// it at its first offer, with this worker's ufrag prefix, and an offer that does not
/// parse makes none.
#[test]
fn the_publisher_connection_is_made_at_the_first_offer() {
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let viewer = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(1));
    let (pub_id, viewer_id) = (h.clients[publisher].id, h.clients[viewer].id);
    assert!(
        h.clients[viewer].video_frames().count() > 0,
        "the viewer gets video"
    );
    let (viewer_publisher, _) = h.sfu.ice_ufrags(viewer_id).expect("bob is on the node");
    assert_eq!(
        viewer_publisher, None,
        "a viewer has no publisher connection"
    );
    let now = h.now;
    assert!(
        h.sfu
            .handle_publisher_offer(now, viewer_id, "v=0 not an offer", Vec::new())
            .is_err()
    );
    assert_eq!(
        h.sfu.ice_ufrags(viewer_id).expect("bob is on the node").0,
        None,
        "an offer that does not parse makes no connection"
    );
    let (alice_publisher, _) = h.sfu.ice_ufrags(pub_id).expect("alice is on the node");
    let alice_publisher =
        alice_publisher.expect("alice's first offer made her publisher connection");
    let prefix = meridian_media::worker_ufrag_prefix(0);
    assert!(
        alice_publisher.starts_with(&prefix),
        "{alice_publisher} has worker 0's prefix {prefix}"
    );
}
