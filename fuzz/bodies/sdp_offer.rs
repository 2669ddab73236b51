//! SDP offers and answers as the node receives them: a joined participant's publisher
//! offer (with arbitrary track announcements) and subscriber answer go through the
//! media core, which must refuse bad input with an error and never panic.
//!
//! The body of the `sdp_offer` fuzz target, shared by `cargo fuzz` (fuzz/fuzz_targets/) and
//! the stable replay in the test suite (tests/tests/fuzz_replay.rs).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_media::{Sfu, SfuConfig};
use meridian_protocol::{Layer, TrackAnnouncement, TrackKind};

/// One input: must not panic.
pub fn run(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let sdp = String::from_utf8_lossy(rest);
    let now = Instant::now();
    let addr: SocketAddr = "10.0.0.1:5000".parse().expect("literal");
    let mut sfu = Sfu::new(SfuConfig::new(addr), now);
    let id = sfu.add_participant(now, "room", "fuzz", true);
    let announced: Vec<TrackAnnouncement> = (0..head % 4)
        .map(|i| TrackAnnouncement {
            mid: i.to_string(),
            kind: if i % 2 == 0 {
                TrackKind::Audio
            } else {
                TrackKind::Video
            },
            source: "camera".into(),
            layers: if head & 0x10 != 0 {
                Layer::ALL.to_vec()
            } else {
                vec![]
            },
            track_id: None,
        })
        .collect();
    if head & 0x80 != 0 {
        let _ = sfu.handle_subscriber_answer(now, id, &sdp);
    } else {
        let _ = sfu.handle_publisher_offer(now, id, &sdp, announced);
    }
    sfu.handle_timeout(now + Duration::from_millis(10));
    while sfu.poll_transmit().is_some() {}
    while sfu.poll_event().is_some() {}
}
