//! `Sfu::handle_due`: the packets of a burst written to a subscriber connection (it has
//! a bandwidth estimate, so str0m's pacer releases one packet per timeout) all leave in
//! one call, while a single timeout releases only the first.

mod common;

use std::time::Duration;

use common::{Harness, MediaConfig, is_rtp};
use str0m::format::Codec;

#[test]
fn a_frame_to_a_subscriber_leaves_in_one_handle_due() {
    let mut h = Harness::new();
    let media = MediaConfig {
        audio: false,
        layers: Vec::new(),
        // Every frame a keyframe (three times the size): several packets each.
        keyframe_interval: 1,
        ..MediaConfig::default()
    };
    h.add_publisher("room", "alice", media);
    let sub = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(1));
    let bob = h.clients[sub].id;
    assert!(
        h.sfu.estimate_bps(bob).is_some(),
        "the subscriber connection has a bandwidth estimate"
    );
    assert!(h.clients[sub].video_frames().count() > 10);

    // Hold what the peers send until a whole frame is there, then hand it all in at one
    // instant, as one batch read from the socket (or a relay link) is.
    h.held = Some(Vec::new());
    let frame_held = h.run_until(Duration::from_millis(100), |h| {
        h.held
            .as_ref()
            .is_some_and(|d| d.iter().filter(|(_, d)| is_rtp(d)).count() >= 4)
    });
    assert!(
        frame_held,
        "the publisher sent a frame of at least 4 packets"
    );
    let held = h.held.take().expect("held");

    let vp8 = h.clients[sub]
        .subscriber
        .rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| *p.pt())
        .expect("bob negotiated VP8");
    let bob_addr = h.clients[sub].subscriber.public_addr();
    // Video packets that left for bob (not padding, not retransmissions).
    let video_to_bob = |h: &mut Harness| {
        let mut n = 0;
        while let Some(t) = h.sfu.poll_transmit() {
            let d = &t.contents;
            if t.destination == bob_addr && is_rtp(d) && d[1] & 0x7f == vp8 && d[0] & 0x20 == 0 {
                n += 1;
            }
        }
        n
    };

    let now = h.now;
    let forwarded = h.sfu.stats().rtp_packets_forwarded;
    for (source, data) in &held {
        h.sfu.handle_datagram(now, *source, data);
    }
    let written = h.sfu.stats().rtp_packets_forwarded - forwarded;
    assert!(
        written >= 4,
        "the frame was written to bob: {written} packets"
    );
    let mut left = video_to_bob(&mut h);

    // At a frozen time only the first packet leaves: the pacer asks to be called again
    // 1 µs after it.
    h.sfu.handle_due(64, || now);
    left += video_to_bob(&mut h);
    assert!(
        left < written,
        "one timeout leaves packets behind ({left} of {written} left)"
    );

    // With a clock that moves (as the driver's does), the rest leaves in one call.
    let mut clock = now;
    let rounds = h.sfu.handle_due(64, || {
        clock += Duration::from_micros(10);
        clock
    });
    left += video_to_bob(&mut h);
    assert_eq!(left, written, "every packet of the frame left");
    assert!(
        rounds < 64,
        "it stopped because nothing was due, not at the bound ({rounds} rounds)"
    );
}

#[test]
fn handle_due_stops_when_nothing_is_due_or_at_the_bound() {
    let mut h = Harness::new();
    h.add_publisher("room", "alice", MediaConfig::default());
    h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    let now = h.now;
    // At a frozen time every connection is handled once, then nothing is due.
    let first = h.sfu.handle_due(1000, || now);
    assert!(first < 1000, "{first} rounds");
    assert_eq!(h.sfu.handle_due(64, || now), 0, "nothing due: no round");
    // A clock 50 ms ahead per round finds something due every time (timers repeat at
    // least every 50 ms): only the bound stops it.
    let mut clock = now;
    let rounds = h.sfu.handle_due(3, || {
        clock += Duration::from_millis(50);
        clock
    });
    assert_eq!(rounds, 3);
}
