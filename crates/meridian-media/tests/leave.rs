//! Removing the publisher unpublishes its tracks and renegotiates every subscriber
//! without them; removing everyone leaves an empty node.

mod common;

use std::time::Duration;

use common::{Harness, MediaConfig};
use meridian_media::SfuEvent;
use meridian_protocol::TrackKind;

#[test]
fn removing_the_publisher_renegotiates_subscribers_and_empties_the_node() {
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..3)
        .map(|i| h.add_subscriber("room", &format!("sub{i}")))
        .collect();
    // A participant of another room must not be disturbed.
    let elsewhere = h.add_publisher("lobby", "dave", MediaConfig::default());
    let watcher = h.add_subscriber("lobby", "erin");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    assert_eq!(h.sfu.participant_count(), 6);
    assert_eq!(h.sfu.room_count(), 2);

    let pub_id = h.clients[publisher].id;
    let tracks: Vec<_> = h.clients[publisher]
        .published
        .iter()
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(tracks.len(), 2);
    let offers_before: Vec<usize> = subs.iter().map(|&s| h.clients[s].offers.len()).collect();
    let events_before = h.events.len();
    let watcher_frames = h.clients[watcher].video_frames().count();

    h.remove(publisher);
    h.run_for(Duration::from_millis(200));

    let new_events = &h.events[events_before..];
    for t in &tracks {
        assert!(
            new_events.iter().any(|(_, e)| matches!(e,
                SfuEvent::TrackUnpublished { room, track_id, participant }
                    if room == "room" && track_id == t && *participant == pub_id)),
            "TrackUnpublished for {t}: {new_events:?}"
        );
    }
    for (&s, before) in subs.iter().zip(offers_before) {
        let c = &h.clients[s];
        assert!(c.offers.len() > before, "subscriber {s} got a new offer");
        let last = c.offers.last().unwrap();
        assert!(
            tracks.iter().all(|t| !last.contains(t)),
            "the new offer no longer carries the publisher's tracks: {last:?}"
        );
        assert!(
            new_events.iter().any(|(_, e)| matches!(e,
                SfuEvent::SubscriberOffer { participant, .. } if *participant == c.id)),
            "a SubscriberOffer event for subscriber {s}"
        );
    }
    assert_eq!(h.sfu.participant_count(), 5);
    assert_eq!(h.sfu.room_count(), 2, "the room keeps its subscribers");
    assert!(h.sfu.room_tracks("room").is_empty());
    // The other room still flows.
    h.run_for(Duration::from_millis(500));
    assert!(
        h.clients[watcher].video_frames().count() >= watcher_frames + 10,
        "the other room keeps forwarding"
    );
    assert_eq!(h.sfu.room_tracks("lobby").len(), 2);
    assert!(h.clients[elsewhere].track(TrackKind::Video).is_some());

    for s in subs {
        h.remove(s);
    }
    assert_eq!(h.sfu.room_count(), 1);
    h.remove(watcher);
    h.remove(elsewhere);
    h.run_for(Duration::from_millis(100));
    assert_eq!(h.sfu.participant_count(), 0);
    assert_eq!(h.sfu.room_count(), 0);
    assert_eq!(h.sfu.outbound_video_tracks(), 0);
    assert!(h.sfu.room_tracks("lobby").is_empty());
    // An empty node still answers its timeout without work piling up.
    let t = h.sfu.poll_timeout();
    assert!(t > h.now, "idle timeout lies in the future");
    h.run_for(Duration::from_secs(1));
    assert!(h.sfu.poll_transmit().is_none());
}
