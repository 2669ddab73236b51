//! Publish/unpublish churn does not grow a subscriber's session: media sections of
//! ended subscriptions are reused for new ones, and media keeps flowing through them.

mod common;

use std::time::Duration;

use common::{Harness, MediaConfig};
use meridian_media::SfuEvent;
use meridian_protocol::TrackKind;

/// Publish/unpublish cycles the subscriber lives through (issue 17 item 6 saw its
/// answers pass 64 KB after 22).
const CYCLES: usize = 50;
/// A subscriber offer with a few audio and video sections is about 1–2 KB each;
/// 50 cycles of dead sections used to make it ~150 KB.
const MAX_OFFER_BYTES: usize = 12_000;

/// The latest subscriber offer the node sent to `participant`.
fn last_offer(h: &Harness, participant: meridian_media::ParticipantId) -> Option<String> {
    h.events.iter().rev().find_map(|(_, e)| match e {
        SfuEvent::SubscriberOffer {
            participant: p,
            sdp,
            ..
        } if *p == participant => Some(sdp.clone()),
        _ => None,
    })
}

/// Issue 17 item 6 (media): each cycle a publisher joins with audio and video, the
/// subscriber receives both, and the publisher leaves. The subscriber's offers stay
/// small and its media sections few, and media flows through reused sections.
#[test]
fn publish_unpublish_churn_reuses_media_sections() {
    let mut h = Harness::new();
    let sub = h.add_subscriber("room", "sub");
    let sub_id = h.clients[sub].id;
    let mut largest = 0;
    let mut sections = 0;
    for cycle in 0..CYCLES {
        let publisher = h.add_publisher("room", &format!("pub{cycle}"), MediaConfig::default());
        let video = h.clients[publisher]
            .track(TrackKind::Video)
            .expect("the publisher has video");
        let audio = h.clients[publisher]
            .track(TrackKind::Audio)
            .expect("the publisher has audio");
        let mark = h.clients[sub].frames.len();
        let flowing = h.run_until(Duration::from_secs(3), |h| {
            let new = &h.clients[sub].frames[mark..];
            new.iter().filter(|f| f.track == Some(video)).count() >= 5
                && new.iter().filter(|f| f.track == Some(audio)).count() >= 5
        });
        assert!(
            flowing,
            "cycle {cycle}: the subscriber receives the new publisher's audio and video"
        );
        let gaps = h.clients[sub].frames[mark..]
            .iter()
            .filter(|f| f.track == Some(video) && !f.contiguous)
            .count();
        assert_eq!(
            gaps, 0,
            "cycle {cycle}: the new video continues the reused section's stream"
        );
        let offer = last_offer(&h, sub_id).expect("the subscriber was offered the tracks");
        largest = largest.max(offer.len());
        sections = offer.lines().filter(|l| l.starts_with("m=")).count();
        h.remove(publisher);
        h.run_for(Duration::from_millis(50));
    }
    eprintln!("largest subscriber offer {largest} bytes; {sections} media sections at the end");
    assert!(
        largest <= MAX_OFFER_BYTES,
        "the subscriber's offer stays small over {CYCLES} cycles: largest {largest} bytes, \
         {sections} media sections in the last"
    );
    assert!(
        sections <= 4,
        "media sections are reused: {sections} after {CYCLES} cycles"
    );
}
