//! Publish/unpublish churn does not grow a subscriber's session: media sections of
//! ended subscriptions are reused for new ones, and media keeps flowing through them.

mod common;

use std::time::Duration;

use common::{Harness, MediaConfig};
use meridian_media::SfuEvent;
use meridian_protocol::TrackKind;
use str0m::change::SdpOffer;

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

/// Answers the subscriber's latest offer by hand (while `auto_answer` is off).
fn answer_by_hand(h: &mut Harness, sub: usize) {
    let id = h.clients[sub].id;
    let (sdp, tracks) = h
        .events
        .iter()
        .rev()
        .find_map(|(_, e)| match e {
            SfuEvent::SubscriberOffer {
                participant,
                sdp,
                tracks,
            } if *participant == id => Some((sdp.clone(), tracks.clone())),
            _ => None,
        })
        .expect("an offer is pending");
    let c = &mut h.clients[sub];
    for t in &tracks {
        c.sub_tracks
            .insert(t.mid.as_str().into(), t.track_id.parse().expect("track id"));
    }
    let offer = SdpOffer::from_sdp_string(&sdp).expect("the node's offer parses");
    let answer = c
        .subscriber
        .rtc
        .sdp_api()
        .accept_offer(offer)
        .expect("the node's offer is acceptable")
        .to_sdp_string();
    let now = h.now;
    h.sfu
        .handle_subscriber_answer(now, id, &answer)
        .expect("the node accepts the answer");
}

/// A track ends and another of the same kinds starts while an offer is outstanding:
/// the next offer stops and reuses the same sections at once, and the new tracks
/// flow through them without a gap.
#[test]
fn a_section_released_and_reused_in_one_offer_carries_the_new_track() {
    let mut h = Harness::new();
    let sub = h.add_subscriber("room", "sub");
    let first = h.add_publisher("room", "first", MediaConfig::default());
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(300));
    let sub_id = h.clients[sub].id;
    let sections_before = last_offer(&h, sub_id)
        .expect("offered")
        .lines()
        .filter(|l| l.starts_with("m="))
        .count();

    h.auto_answer = false;
    // An unanswered offer (for `pending`'s tracks) holds the next changes back.
    let pending = h.add_publisher(
        "room",
        "pending",
        MediaConfig {
            video: false,
            ..MediaConfig::default()
        },
    );
    h.remove(first);
    let second = h.add_publisher("room", "second", MediaConfig::default());
    let offers_before = h.clients[sub].offers.len();
    answer_by_hand(&mut h, sub);
    h.run_for(Duration::from_millis(5));
    assert_eq!(
        h.clients[sub].offers.len(),
        offers_before + 1,
        "the held-back changes are offered once the answer arrives"
    );
    let sections = last_offer(&h, sub_id)
        .expect("offered")
        .lines()
        .filter(|l| l.starts_with("m="))
        .count();
    assert_eq!(
        sections,
        sections_before + 1,
        "only `pending`'s audio adds a section; `second` reuses `first`'s"
    );
    answer_by_hand(&mut h, sub);
    h.auto_answer = true;

    for (publisher, kind) in [
        (second, TrackKind::Video),
        (second, TrackKind::Audio),
        (pending, TrackKind::Audio),
    ] {
        let track = h.clients[publisher].track(kind).expect("published");
        let mark = h.clients[sub].frames.len();
        let flowing = h.run_until(Duration::from_secs(3), |h| {
            h.clients[sub].frames[mark..]
                .iter()
                .filter(|f| f.track == Some(track))
                .count()
                >= 10
        });
        assert!(
            flowing,
            "{kind:?} of participant {publisher} reaches the subscriber"
        );
        let frames: Vec<_> = h.clients[sub].frames[mark..]
            .iter()
            .filter(|f| f.track == Some(track))
            .collect();
        // str0m's VP8 depacketizer may flag the first frame of the new source (a
        // keyframe, so decodable); after it, no frame may be missing.
        assert!(
            frames[0].contiguous || (kind == TrackKind::Video && frames[0].header.keyframe),
            "{kind:?} of participant {publisher} starts cleanly: {:?}",
            frames[0]
        );
        assert!(
            frames[1..].iter().all(|f| f.contiguous),
            "{kind:?} of participant {publisher} arrives without gaps"
        );
    }
}
