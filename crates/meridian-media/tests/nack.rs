//! NACK/RTX: with seeded 5 % loss between the node and a subscriber, lost video
//! packets are retransmitted from the node's RTX cache, so (nearly) every video frame
//! arrives; audio (not retransmitted) shows the loss was real.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Harness, MediaConfig, lossy};

#[test]
fn lost_video_packets_are_retransmitted_to_subscribers() {
    let mut h = Harness::new();
    let _publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..2)
        .map(|i| h.add_subscriber("room", &format!("sub{i}")))
        .collect();
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    for (i, &s) in subs.iter().enumerate() {
        let seed = 7 + i as u64;
        h.impair(
            s,
            false,
            Some(lossy(0.05, Duration::from_millis(20), seed)),
            Some(lossy(0.05, Duration::from_millis(20), seed + 100)),
        );
    }
    let marks: Vec<(usize, usize)> = subs
        .iter()
        .map(|&s| {
            (
                h.clients[s].video_frames().count(),
                h.clients[s].audio_frames().count(),
            )
        })
        .collect();
    h.run_for(Duration::from_secs(4));

    for (&s, &(vmark, amark)) in subs.iter().zip(&marks) {
        let c = &h.clients[s];
        let video: BTreeSet<u64> = c.video_frames().skip(vmark).map(|f| f.header.seq).collect();
        let audio: BTreeSet<u64> = c.audio_frames().skip(amark).map(|f| f.header.seq).collect();
        let span = |set: &BTreeSet<u64>| set.last().unwrap() - set.first().unwrap() + 1;
        let (vgot, vspan) = (video.len() as u64, span(&video));
        let (agot, aspan) = (audio.len() as u64, span(&audio));
        let vloss = 1.0 - vgot as f64 / vspan as f64;
        let aloss = 1.0 - agot as f64 / aspan as f64;
        eprintln!(
            "subscriber {s}: video {vgot}/{vspan} frames (loss {:.1} %), audio {agot}/{aspan} (loss {:.1} %)",
            vloss * 100.0,
            aloss * 100.0
        );
        assert!(vspan >= 100, "about 4 s of video at 30 fps: {vspan}");
        assert!(
            vloss <= 0.02,
            "video frames lost after RTX: {:.1} %",
            vloss * 100.0
        );
        assert!(
            aloss >= 0.01,
            "the link really loses packets (audio is not retransmitted)"
        );
        let gaps = c
            .video_frames()
            .skip(vmark)
            .filter(|f| !f.contiguous)
            .count();
        assert!(gaps <= 2, "video frames after an unrecovered gap: {gaps}");
    }
    // The repair above ran with caches sized by the measured RTT (1 s before it).
    let resizes = h.sfu.stats().rtx_cache_resizes;
    assert!(
        resizes >= 2,
        "both subscribers' video caches follow their RTT: {resizes}"
    );
}
