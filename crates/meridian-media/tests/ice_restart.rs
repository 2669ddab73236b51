//! Issue 15 item 4: a media path that dies while signaling stays up is repaired by an
//! ICE restart on the same participant: the client offers new ICE credentials on its
//! publisher connection and asks the node to restart its subscriber connection; the
//! node answers with new credentials, keeps ids, tracks and subscriptions, and media
//! flows again, from the client's new address.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Harness, MediaConfig};
use meridian_media::{PcKind, SfuEvent, TrackId};
use meridian_protocol::TrackKind;

/// Video frames of `track` a subscriber received after its `mark`-th frame.
fn frames_of(h: &Harness, sub: usize, track: TrackId, mark: usize) -> usize {
    h.clients[sub]
        .frames
        .iter()
        .skip(mark)
        .filter(|f| f.video && f.track == Some(track))
        .count()
}

/// Whether the node reported an event `want` accepts after event index `from`.
fn reported(h: &Harness, from: usize, want: impl Fn(&SfuEvent) -> bool) -> bool {
    h.events.iter().skip(from).any(|(_, e)| want(e))
}

#[test]
fn an_ice_restart_after_the_path_is_cut_brings_media_back_on_the_same_participant() {
    // A core that is media worker 3: restarted credentials must keep its ufrag prefix,
    // or the receiving worker would steer the new path's STUN elsewhere.
    let mut h = Harness::with_config(|mut c| {
        c.worker = 3;
        c
    });
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let sub = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(1));
    let track = h.clients[publisher]
        .track(TrackKind::Video)
        .expect("alice publishes video");
    let (pub_id, sub_id) = (h.clients[publisher].id, h.clients[sub].id);
    let ufrags_before = (
        h.sfu.ice_ufrags(pub_id).expect("alice is on the node"),
        h.sfu.ice_ufrags(sub_id).expect("bob is on the node"),
    );
    assert!(
        frames_of(&h, sub, track, 0) > 0,
        "video flows before the cut"
    );

    // Both media paths die; signaling (the harness's direct calls) stays up.
    h.cut(publisher, true, true);
    h.cut(sub, false, true);
    let events_at_cut = h.events.len();
    h.run_for(Duration::from_secs(1));
    let mark = h.clients[sub].frames.len();
    // The node's ICE-lite side gives a path up after 15 s without a check.
    h.run_for(Duration::from_secs(19));
    assert_eq!(
        frames_of(&h, sub, track, mark),
        0,
        "nothing arrives while cut"
    );
    for (id, pc) in [(pub_id, PcKind::Publisher), (sub_id, PcKind::Subscriber)] {
        assert!(
            reported(&h, events_at_cut, |e| *e
                == SfuEvent::Disconnected {
                    participant: id,
                    pc
                }),
            "the node noticed {id}'s {pc:?} connection died"
        );
    }

    // The clients come back on new addresses (a new network) and restart ICE.
    let new_pub: SocketAddr = "10.9.0.1:10000".parse().unwrap();
    let new_sub: SocketAddr = "10.9.0.2:20000".parse().unwrap();
    h.move_peer(publisher, true, new_pub);
    h.move_peer(sub, false, new_sub);
    h.cut(publisher, true, false);
    h.cut(sub, false, false);
    let events_at_restart = h.events.len();
    let offers_before = h.clients[sub].offers.len();
    h.restart_publisher_ice(publisher);
    h.restart_subscriber_ice(sub);
    assert_eq!(
        h.clients[sub].offers.len(),
        offers_before + 1,
        "the node re-offered the subscriber connection"
    );
    let mark = h.clients[sub].frames.len();
    let back = h.run_until(Duration::from_secs(5), |h| {
        frames_of(h, sub, track, mark) >= 30
    });
    assert!(back, "video came back within 5 s of the restart");

    // The same participants, tracks and subscriptions; new credentials.
    assert_eq!(h.sfu.identity(pub_id), Some("alice"));
    assert_eq!(h.sfu.identity(sub_id), Some("bob"));
    assert!(h.sfu.subscriptions_of(sub_id).contains(&track));
    assert_eq!(
        h.sfu.room_tracks("room").len(),
        2,
        "alice's two tracks stay"
    );
    let ufrags_after = (
        h.sfu.ice_ufrags(pub_id).expect("alice is on the node"),
        h.sfu.ice_ufrags(sub_id).expect("bob is on the node"),
    );
    assert_ne!(
        ufrags_after.0.0, ufrags_before.0.0,
        "alice's publisher ufrag"
    );
    assert_eq!(
        ufrags_after.0.1, ufrags_before.0.1,
        "alice's subscriber untouched"
    );
    assert_ne!(
        ufrags_after.1.1, ufrags_before.1.1,
        "bob's subscriber ufrag"
    );
    let prefix = meridian_media::worker_ufrag_prefix(3);
    let alice_publisher = ufrags_after.0.0.as_ref().expect("alice published");
    for ufrag in [alice_publisher, &ufrags_after.1.1] {
        assert!(
            ufrag.starts_with(&prefix),
            "a restarted ufrag {ufrag} keeps worker 3's prefix {prefix}"
        );
    }
    for (id, pc) in [(pub_id, PcKind::Publisher), (sub_id, PcKind::Subscriber)] {
        assert!(
            reported(&h, events_at_restart, |e| *e
                == SfuEvent::Connected {
                    participant: id,
                    pc
                }),
            "{id}'s {pc:?} connection is reported connected again"
        );
    }
    // The node asked alice for a keyframe when the paths came back (periodic
    // keyframes are off), so the video decodes again.
    let keyframes = h.clients[sub]
        .frames
        .iter()
        .skip(mark)
        .filter(|f| f.video && f.track == Some(track) && f.header.keyframe)
        .count();
    assert!(keyframes >= 1, "a keyframe arrived after the restart");
}

/// A restart asked for while a subscriber offer is outstanding waits for its answer,
/// then goes out in the next offer.
#[test]
fn a_restart_during_an_outstanding_offer_follows_its_answer() {
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let sub = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    let sub_id = h.clients[sub].id;
    let before = h.sfu.ice_ufrags(sub_id).expect("bob is on the node").1;

    // An offer goes out (alice publishes another track) but is not answered yet.
    h.auto_answer = false;
    let _second = h.add_publisher("room", "carol", MediaConfig::default());
    let offers = h.clients[sub].offers.len();
    assert!(offers >= 2, "carol's tracks were offered to bob");
    h.restart_subscriber_ice(sub);
    assert_eq!(
        h.clients[sub].offers.len(),
        offers,
        "no second offer while one is out"
    );
    assert_eq!(h.sfu.ice_ufrags(sub_id).unwrap().1, before);
    let _ = publisher;
    // Answering the outstanding offer lets the restart go out.
    h.auto_answer = true;
    h.answer_last_offer(sub);
    let after = h.clients[sub].offers.len();
    assert_eq!(after, offers + 1, "the restart offer followed the answer");
    assert_ne!(
        h.sfu.ice_ufrags(sub_id).unwrap().1,
        before,
        "new credentials"
    );
    h.run_for(Duration::from_secs(2));
    assert!(h.all_connected(), "bob's connection survives the restart");
}

/// Issue 17's rule holds through a restart: the new address a restarted connection
/// checks from must not be held by another live connection.
#[test]
fn a_restart_cannot_take_an_address_another_connection_holds() {
    let mut h = Harness::new();
    let victim = h.add_publisher("room", "victim", MediaConfig::default());
    let attacker = h.add_publisher(
        "room",
        "mallory",
        MediaConfig {
            video: false,
            ..MediaConfig::default()
        },
    );
    let sub = h.add_subscriber("room", "sub");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    let track = h.clients[victim]
        .track(TrackKind::Video)
        .expect("the victim publishes video");
    let victim_addr = h.clients[victim].publisher.addr;
    let rejected = h.sfu.stats().datagrams_rejected;

    // The attacker restarts and sends its new checks from the victim's address.
    h.clients[attacker].publisher.nat = Some(victim_addr);
    h.restart_publisher_ice(attacker);
    let mark = h.clients[sub].frames.len();
    h.run_for(Duration::from_secs(3));
    assert!(
        h.sfu.stats().datagrams_rejected > rejected,
        "the attacker's checks from the held address were refused"
    );
    let frames = frames_of(&h, sub, track, mark);
    assert!(
        frames >= 85,
        "the victim's video kept flowing: {frames} frames in 3 s"
    );
}
