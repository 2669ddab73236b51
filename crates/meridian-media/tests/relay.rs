//! Relay links between two cores in memory, under virtual time: a track published on
//! node A reaches subscribers on node B through one relay connection, one copy per
//! track; B's subscribers' layer wishes decide the one layer that crosses, and they are
//! told the layer they actually get; a mute on A reaches B's clients; keyframe
//! requests flow back; a link whose peer vanishes is reported down in bounded time.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Harness, MediaConfig, SFU_ADDR, lossy};
use meridian_media::{SfuConfig, SfuEvent};
use meridian_protocol::{Layer, TrackKind};
use str0m_netem::{Input as NetInput, Netem, Output as NetOutput};

const B_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 5000);
const B_RELAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 5001);

/// Node A (the harness's default address) and node B, in one virtual time, with the
/// control plane (offers, answers, layer wishes) and relay datagrams moved in memory.
struct Pair {
    a: Harness,
    b: Harness,
    a_seen: usize,
    b_seen: usize,
    /// When false the link's datagrams are dropped (B vanished from A's view and back).
    connected: bool,
    /// Impairment of the link's datagrams from A to B.
    a_to_b: Option<Netem<Vec<u8>>>,
    /// Whether A's track states (mute, layer crossing) reach B.
    deliver_states: bool,
    /// When set, A's relay offers are kept here instead of reaching B.
    held_offers: Option<Vec<(String, Vec<meridian_media::RelayTrack>)>>,
}

impl Pair {
    fn new() -> Pair {
        let a = Harness::new();
        let mut b = Harness::with_config(|c| SfuConfig {
            candidate_addr: B_ADDR,
            relay_addr: Some(B_RELAY),
            first_id: 1_000_000,
            ..c
        });
        b.node_addr = B_ADDR;
        b.now = a.now;
        b.start = a.start;
        Pair {
            a,
            b,
            a_seen: 0,
            b_seen: 0,
            connected: true,
            a_to_b: None,
            deliver_states: true,
            held_offers: None,
        }
    }

    /// Moves relay datagrams and control messages until nothing is left.
    fn shuttle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(t) = self.a.foreign.pop_front() {
                moved = true;
                if !self.connected || t.destination != B_RELAY {
                    continue;
                }
                match &mut self.a_to_b {
                    Some(net) => net.handle_input(NetInput::Packet(self.a.now, t.contents)),
                    None => self.b.inject_relay(SFU_ADDR, &t.contents),
                }
            }
            if let Some(net) = &mut self.a_to_b {
                net.handle_input(NetInput::Timeout(self.a.now));
                let mut due = Vec::new();
                while let Some(out) = net.poll_output() {
                    if let NetOutput::Packet(d) = out {
                        due.push(d);
                    }
                }
                for d in due {
                    moved = true;
                    self.b.inject_relay(SFU_ADDR, &d);
                }
            }
            while let Some(t) = self.b.relay_out.pop_front() {
                moved = true;
                if self.connected && t.destination == SFU_ADDR {
                    self.a.inject(B_RELAY, &t.contents);
                }
            }
            while self.a_seen < self.a.events.len() {
                let e = self.a.events[self.a_seen].1.clone();
                self.a_seen += 1;
                match e {
                    SfuEvent::RelayOffer { sdp, tracks, .. } if self.held_offers.is_some() => {
                        if let Some(h) = self.held_offers.as_mut() {
                            h.push((sdp, tracks));
                        }
                    }
                    SfuEvent::RelayOffer { peer, sdp, tracks } => {
                        assert_eq!(peer, "B");
                        moved = true;
                        let answer = self
                            .b
                            .call(|s, now| s.handle_relay_offer(now, "A", SFU_ADDR, &sdp, tracks))
                            .expect("B accepts A's relay offer");
                        self.a
                            .call(|s, now| s.handle_relay_answer(now, "B", &answer))
                            .expect("A accepts B's answer");
                    }
                    SfuEvent::RelayTrackState { peer, state } if self.deliver_states => {
                        assert_eq!(peer, "B");
                        moved = true;
                        self.b
                            .call(|s, now| s.handle_relay_track_state(now, "A", state))
                            .expect("B takes A's track state");
                    }
                    _ => {}
                }
            }
            while self.b_seen < self.b.events.len() {
                let e = self.b.events[self.b_seen].1.clone();
                self.b_seen += 1;
                if let SfuEvent::RelayLayerWanted {
                    peer,
                    track_id,
                    layer,
                } = e
                {
                    assert_eq!(peer, "A");
                    moved = true;
                    self.a
                        .call(|s, now| s.set_relay_layer(now, "B", track_id, layer))
                        .expect("A knows the relayed track");
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the relay shuttle did not settle");
    }

    fn step(&mut self) {
        self.a.step();
        self.b.step();
        assert_eq!(self.a.now, self.b.now);
        self.shuttle();
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.a.now + d;
        while self.a.now < end {
            self.step();
        }
    }

    fn run_until(&mut self, max: Duration, mut cond: impl FnMut(&Pair) -> bool) -> bool {
        let end = self.a.now + max;
        while self.a.now < end {
            if cond(self) {
                return true;
            }
            self.step();
        }
        cond(self)
    }

    fn connected(&self) -> bool {
        self.a.all_connected()
            && self.b.all_connected()
            && self.a.sfu.relay_stats().iter().all(|s| s.connected)
            && self.b.sfu.relay_stats().iter().all(|s| s.connected)
    }
}

#[test]
fn a_track_crosses_once_and_fans_out_on_the_other_node() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher("room", "alice", MediaConfig::default());
    let local = p.a.add_subscriber("room", "ann");
    let remote: Vec<usize> = (0..4)
        .map(|i| p.b.add_subscriber("room", &format!("bob{i}")))
        .collect();
    // B hosts part of the room: it asks A for the room's tracks (over the control plane).
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    p.shuttle();
    assert!(
        p.run_until(Duration::from_secs(5), Pair::connected),
        "clients and the relay link connect"
    );
    p.run_for(Duration::from_secs(2));

    let audio = p.a.clients[publisher].track(TrackKind::Audio).unwrap();
    let video = p.a.clients[publisher].track(TrackKind::Video).unwrap();
    let alice = p.a.clients[publisher].id;
    // The track keeps its id and its publisher on B.
    let announced: Vec<_> =
        p.b.events
            .iter()
            .filter_map(|(_, e)| match e {
                SfuEvent::RelayTrackPublished {
                    room, track, peer, ..
                } => {
                    assert_eq!((room.as_str(), peer.as_str()), ("room", "A"));
                    assert_eq!(track.participant_id, alice.to_string());
                    Some(track.track_id.clone())
                }
                _ => None,
            })
            .collect();
    assert_eq!(
        announced.len(),
        2,
        "both tracks published on B: {announced:?}"
    );
    assert!(announced.contains(&audio.to_string()) && announced.contains(&video.to_string()));
    assert!(p.b.sfu.is_relayed(video) && !p.a.sfu.is_relayed(video));
    assert_eq!(
        p.b.sfu.participant_count(),
        4,
        "the link is not a participant"
    );
    assert_eq!(
        p.b.sfu
            .room_tracks("room")
            .iter()
            .find(|t| t.track_id == video.to_string())
            .map(|t| t.layers.clone()),
        Some(Layer::ALL.to_vec()),
        "clients on B see the publisher's layers"
    );
    // B's clients are offered the tracks under their publisher (not the link).
    let offered: Vec<(String, String)> =
        p.b.events
            .iter()
            .filter_map(|(_, e)| match e {
                SfuEvent::SubscriberOffer { tracks, .. } => Some(tracks),
                _ => None,
            })
            .flatten()
            .map(|t| (t.track_id.clone(), t.participant_id.clone()))
            .collect();
    assert!(!offered.is_empty());
    assert!(
        offered.iter().all(|(_, p)| *p == alice.to_string()),
        "offered under alice {alice}: {offered:?}"
    );

    for &c in &remote {
        let client = &p.b.clients[c];
        let v = client.video_frames().count();
        let a = client.audio_frames().count();
        assert!(
            v > 40 && a > 70,
            "B subscriber {c} got {v} video, {a} audio frames"
        );
        assert!(
            client
                .frames
                .iter()
                .all(|f| f.track == Some(audio) || f.track == Some(video))
        );
        assert!(
            client.video_frames().skip(1).all(|f| f.contiguous),
            "no gaps through the relay"
        );
    }
    assert!(p.a.clients[local].video_frames().count() > 40);

    // One copy per track crosses the link, however many subscribers B has.
    let out = p.a.sfu.relay_stats();
    let inn = p.b.sfu.relay_stats();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(inn.len(), 1, "{inn:?}");
    assert_eq!(
        (out[0].peer.as_str(), out[0].inbound, out[0].tracks),
        ("B", false, 2)
    );
    assert_eq!(
        (inn[0].peer.as_str(), inn[0].inbound, inn[0].tracks),
        ("A", true, 2)
    );
    assert!(
        out[0].packets.abs_diff(inn[0].packets) <= 5,
        "what A sent B received: {} vs {}",
        out[0].packets,
        inn[0].packets
    );
    let fanned = p.b.sfu.stats().rtp_packets_forwarded;
    assert!(
        fanned >= 4 * inn[0].packets - 40 && fanned <= 4 * inn[0].packets,
        "B fans each relayed packet out to its 4 subscribers: {fanned} from {}",
        inn[0].packets
    );
    // Only the top layer crossed (B's subscribers want high by default).
    assert_eq!(out[0].packets_by_layer[1], 0, "{out:?}");
    assert!(out[0].packets_by_layer[2] > 0, "{out:?}");
    let last = p.b.clients[remote[0]].video_frames().last().unwrap().header;
    assert_eq!(last.layer, 2);

    // The hop adds little virtual time (1 ms ticks; no network delay in memory):
    // B's subscribers get frames within a few ticks of A's own subscriber.
    let p50 = |frames: Vec<Duration>| {
        let mut v = frames;
        v.sort();
        v[v.len() / 2]
    };
    let far = p50(p.b.clients[remote[0]]
        .video_frames()
        .map(|f| f.latency)
        .collect());
    let near = p50(p.a.clients[local]
        .video_frames()
        .map(|f| f.latency)
        .collect());
    println!("virtual latency p50: on A {near:?}, through the relay on B {far:?}");
    assert!(
        far <= near + Duration::from_millis(3),
        "on A {near:?}, on B {far:?}"
    );
}

#[test]
fn subscribers_layer_wishes_decide_the_layer_that_crosses() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..2)
        .map(|i| p.b.add_subscriber("room", &format!("bob{i}")))
        .collect();
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    let video = p.a.clients[publisher].track(TrackKind::Video).unwrap();
    p.run_for(Duration::from_secs(1));

    // Every subscriber on B asks for low only: A sends only low to B.
    for &s in &subs {
        let id = p.b.clients[s].id;
        p.b.call(|sfu, now| sfu.set_max_layer(now, id, video, Layer::Low))
            .unwrap();
    }
    p.shuttle();
    p.run_for(Duration::from_millis(800));
    let before = p.a.sfu.relay_stats()[0].packets_by_layer;
    let marks: Vec<usize> = subs
        .iter()
        .map(|&s| p.b.clients[s].video_frames().count())
        .collect();
    p.run_for(Duration::from_secs(1));
    let after = p.a.sfu.relay_stats()[0].packets_by_layer;
    assert!(
        after[0] > before[0] + 20,
        "low crosses: {before:?} → {after:?}"
    );
    assert_eq!(
        after[2], before[2],
        "high no longer crosses: {before:?} → {after:?}"
    );
    assert_eq!(after[1], before[1]);
    for (&s, &m) in subs.iter().zip(&marks) {
        let seen: Vec<u8> = p.b.clients[s]
            .video_frames()
            .skip(m)
            .map(|f| f.header.layer)
            .collect();
        assert!(!seen.is_empty() && seen.iter().all(|l| *l == 0), "{seen:?}");
    }

    // One subscriber asks for high: the link goes up to high at a keyframe.
    let kf = p.a.clients[publisher].keyframe_requests;
    let mark = p.b.clients[subs[1]].video_frames().count();
    let id = p.b.clients[subs[1]].id;
    p.b.call(|sfu, now| sfu.set_max_layer(now, id, video, Layer::High))
        .unwrap();
    p.shuttle();
    assert!(
        p.run_until(Duration::from_secs(3), |p| p.b.clients[subs[1]]
            .video_frames()
            .skip(mark)
            .any(|f| f.header.layer == 2)),
        "high reaches B"
    );
    p.run_for(Duration::from_millis(300));
    let seen: Vec<(u8, bool)> = p.b.clients[subs[1]]
        .video_frames()
        .skip(mark)
        .map(|f| (f.header.layer, f.header.keyframe))
        .collect();
    let first_high = seen.iter().position(|(l, _)| *l == 2).unwrap();
    assert!(seen[first_high].1, "the switch is at a keyframe: {seen:?}");
    assert!(seen[first_high..].iter().all(|(l, _)| *l == 2), "{seen:?}");
    assert!(
        p.a.clients[publisher].keyframe_requests > kf,
        "A asked its publisher"
    );
    // The downstream gets one layer: both of B's subscribers now see high.
    let other = p.b.clients[subs[0]]
        .video_frames()
        .last()
        .unwrap()
        .header
        .layer;
    assert_eq!(other, 2);
}

#[test]
fn a_late_subscriber_on_the_far_node_gets_a_keyframe_from_the_publisher() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher(
        "room",
        "alice",
        MediaConfig {
            keyframe_interval: 1_000_000,
            ..MediaConfig::default()
        },
    );
    let first = p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    p.run_for(Duration::from_secs(1));
    assert!(p.b.clients[first].video_frames().count() > 20);
    let kf = p.a.clients[publisher].keyframe_requests;
    let late = p.b.add_subscriber("room", "carol");
    p.shuttle();
    assert!(p.run_until(
        Duration::from_secs(3),
        |p| p.b.clients[late].video_frames().count() > 10
    ));
    let frames: Vec<_> = p.b.clients[late].video_frames().collect();
    assert!(frames[0].header.keyframe, "starts at a keyframe");
    assert!(
        p.a.clients[publisher].keyframe_requests > kf,
        "the keyframe request crossed the link back to the publisher"
    );
}

#[test]
fn relayed_tracks_are_not_relayed_again_and_unpublish_crosses() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher("room", "alice", MediaConfig::default());
    let sub = p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    // B relaying the same room onward to a third node carries nothing of A's.
    p.b.call(|s, now| s.relay_room(now, "C", "room"));
    let c =
        p.b.sfu
            .relay_stats()
            .into_iter()
            .find(|s| s.peer == "C")
            .unwrap();
    assert_eq!(c.tracks, 0, "relayed tracks stay put: {c:?}");
    p.b.call(|s, now| s.remove_relay(now, "C"));

    let video = p.a.clients[publisher].track(TrackKind::Video).unwrap();
    let alice = p.a.clients[publisher].id;
    p.a.call(|s, now| s.unpublish(now, alice, video)).unwrap();
    p.shuttle();
    p.run_for(Duration::from_millis(100));
    assert!(
        !p.b.sfu
            .room_tracks("room")
            .iter()
            .any(|t| t.track_id == video.to_string())
    );
    assert!(p.b.events.iter().any(|(_, e)| matches!(e,
        SfuEvent::RelayTrackUnpublished { track_id, peer, .. } if *track_id == video && peer == "A")));
    assert!(p.b.sfu.subscriptions_of(p.b.clients[sub].id).len() == 1);
}

#[test]
fn a_relay_peer_that_stops_answering_is_reported_down_in_bounded_time() {
    let mut p = Pair::new();
    p.a.add_publisher("room", "alice", MediaConfig::default());
    p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    p.run_for(Duration::from_secs(1));
    // The network between the nodes goes silent.
    p.connected = false;
    let cut = p.a.now;
    let down = |h: &Harness, inbound: bool| {
        h.events
            .iter()
            .find(|(_, e)| matches!(e, SfuEvent::RelayDown { inbound: i, .. } if *i == inbound))
            .map(|(t, _)| *t)
    };
    assert!(
        p.run_until(Duration::from_secs(40), |p| down(&p.a, false).is_some()
            && down(&p.b, true).is_some()),
        "both sides notice: A {:?}, B {:?}",
        down(&p.a, false),
        down(&p.b, true)
    );
    let a_after = down(&p.a, false).unwrap() - cut;
    let b_after = down(&p.b, true).unwrap() - cut;
    println!("relay down noticed after: upstream {a_after:?}, downstream {b_after:?}");
    p.a.call(|s, now| s.remove_relay(now, "B"));
    p.b.call(|s, now| s.remove_relay(now, "A"));
    assert!(p.a.sfu.relay_stats().is_empty() && p.b.sfu.relay_stats().is_empty());
    assert!(
        p.b.sfu.room_tracks("room").is_empty(),
        "relayed tracks left with the link"
    );
}

#[test]
fn parts_of_one_room_on_one_node_see_each_others_tracks_and_other_rooms_do_not() {
    // A node that took a dead node's part over hosts two parts of the room.
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let taken_over = h.add_subscriber("room~node-b", "bob");
    let stranger = h.add_subscriber("roomx", "eve");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(1));
    let video = h.clients[publisher].track(TrackKind::Video).unwrap();
    assert!(
        h.clients[taken_over]
            .video_frames()
            .any(|f| f.track == Some(video)),
        "a participant of another part of the room gets the track"
    );
    assert!(
        h.clients[stranger].frames.is_empty(),
        "another room does not"
    );
    let eve = h.clients[stranger].id;
    assert!(h.sfu.subscribe(h.now, eve, video).is_err());
}

#[test]
fn a_link_the_upstream_rebuilds_is_rebuilt_downstream_and_media_resumes() {
    let mut p = Pair::new();
    p.a.add_publisher("room", "alice", MediaConfig::default());
    let sub = p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    p.run_for(Duration::from_secs(1));
    // The upstream drops its side (as after a failed offer) and relays the room again:
    // a new connection with a new DTLS identity reaches B's old side.
    p.a.call(|s, now| s.remove_relay_out(now, "B"));
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    p.shuttle();
    let mark = p.b.clients[sub].video_frames().count();
    assert!(
        p.run_until(Duration::from_secs(5), |p| p.b.clients[sub]
            .video_frames()
            .count()
            > mark + 20),
        "media flows again over the rebuilt link"
    );
    assert_eq!(
        p.b.sfu.relay_stats().len(),
        1,
        "one inbound side, the new one"
    );
}

#[test]
fn packets_lost_on_the_link_are_recovered_by_nack_across_it() {
    let mut p = Pair::new();
    p.a.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..2)
        .map(|i| p.b.add_subscriber("room", &format!("bob{i}")))
        .collect();
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    p.run_for(Duration::from_millis(500));
    // 5 % seeded loss, 10 ms delay on the link from A to B.
    p.a_to_b = Some(Netem::new(lossy(0.05, Duration::from_millis(10), 11)));
    let marks: Vec<(usize, usize)> = subs
        .iter()
        .map(|&s| {
            (
                p.b.clients[s].video_frames().count(),
                p.b.clients[s].audio_frames().count(),
            )
        })
        .collect();
    p.run_for(Duration::from_secs(4));
    for (&s, &(vmark, amark)) in subs.iter().zip(&marks) {
        let c = &p.b.clients[s];
        let video: std::collections::BTreeSet<u64> =
            c.video_frames().skip(vmark).map(|f| f.header.seq).collect();
        let audio: std::collections::BTreeSet<u64> =
            c.audio_frames().skip(amark).map(|f| f.header.seq).collect();
        let span =
            |set: &std::collections::BTreeSet<u64>| set.last().unwrap() - set.first().unwrap() + 1;
        let vloss = 1.0 - video.len() as f64 / span(&video) as f64;
        let aloss = 1.0 - audio.len() as f64 / span(&audio) as f64;
        eprintln!(
            "B subscriber {s}: video loss {:.1} %, audio loss {:.1} %",
            vloss * 100.0,
            aloss * 100.0
        );
        assert!(span(&video) >= 100);
        assert!(
            vloss <= 0.02,
            "video recovered across the link: {:.1} % lost",
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
}

/// B's `LayerChanged` events for subscriber `id` and `track` from event `from` on.
fn layers_told(
    p: &Pair,
    from: usize,
    id: meridian_media::ParticipantId,
    track: meridian_media::TrackId,
) -> Vec<Layer> {
    p.b.events[from..]
        .iter()
        .filter_map(|(_, e)| match e {
            SfuEvent::LayerChanged {
                participant,
                track_id,
                layer: Some(l),
            } if *participant == id && *track_id == track => Some(*l),
            _ => None,
        })
        .collect()
}

#[test]
fn far_subscribers_are_told_the_layer_that_crosses_not_their_own_wish() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..2)
        .map(|i| p.b.add_subscriber("room", &format!("bob{i}")))
        .collect();
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    let video = p.a.clients[publisher].track(TrackKind::Video).unwrap();
    let ids: Vec<_> = subs.iter().map(|&s| p.b.clients[s].id).collect();
    // Both want low: low crosses, and both are told "low".
    for &id in &ids {
        p.b.call(|sfu, now| sfu.set_max_layer(now, id, video, Layer::Low))
            .unwrap();
    }
    p.shuttle();
    p.run_for(Duration::from_secs(2));
    for &id in &ids {
        let told = layers_told(&p, 0, id, video);
        assert_eq!(told.last(), Some(&Layer::Low), "{id}: {told:?}");
    }
    // bob1 asks for high: high crosses at a keyframe, and bob0, who still asks for
    // low, is told the truth: it gets high too (one layer crosses per link).
    let mark = p.b.events.len();
    let frames = p.b.clients[subs[0]].video_frames().count();
    p.b.call(|sfu, now| sfu.set_max_layer(now, ids[1], video, Layer::High))
        .unwrap();
    p.shuttle();
    assert!(
        p.run_until(Duration::from_secs(3), |p| ids.iter().all(
            |&id| layers_told(p, mark, id, video).last() == Some(&Layer::High)
        )),
        "both far subscribers are told high: {:?} / {:?}",
        layers_told(&p, mark, ids[0], video),
        layers_told(&p, mark, ids[1], video)
    );
    p.run_for(Duration::from_millis(500));
    let got = p.b.clients[subs[0]]
        .video_frames()
        .skip(frames)
        .last()
        .unwrap()
        .header
        .layer;
    assert_eq!(got, 2, "bob0 receives what it was told");
    // Without the upstream's states B could only say "low" (its one incoming stream).
    let mut q = Pair::new();
    q.deliver_states = false;
    let publisher = q.a.add_publisher("room", "alice", MediaConfig::default());
    let sub = q.b.add_subscriber("room", "carol");
    q.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(q.run_until(Duration::from_secs(5), Pair::connected));
    q.run_for(Duration::from_secs(2));
    let video = q.a.clients[publisher].track(TrackKind::Video).unwrap();
    let id = q.b.clients[sub].id;
    let frame = q.b.clients[sub].video_frames().last().unwrap().header.layer;
    assert_eq!(frame, 2, "high crosses by default");
    assert_eq!(
        layers_told(&q, 0, id, video).last(),
        Some(&Layer::Low),
        "the untold fallback"
    );
}

#[test]
fn a_mute_on_the_publishers_node_reaches_the_far_nodes_clients() {
    let mut p = Pair::new();
    let publisher = p.a.add_publisher("room", "alice", MediaConfig::default());
    let sub = p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    p.run_for(Duration::from_secs(1));
    let video = p.a.clients[publisher].track(TrackKind::Video).unwrap();
    let alice = p.a.clients[publisher].id;
    let muted_at_b = |p: &Pair, from: usize| -> Vec<bool> {
        p.b.events[from..]
            .iter()
            .filter_map(|(_, e)| match e {
                SfuEvent::RelayTrackMuted {
                    room,
                    track_id,
                    muted,
                } if *track_id == video && room == "room" => Some(*muted),
                _ => None,
            })
            .collect()
    };
    let mark = p.b.events.len();
    p.a.call(|s, now| s.set_muted(now, alice, video, true))
        .unwrap();
    p.shuttle();
    assert_eq!(
        muted_at_b(&p, mark),
        vec![true],
        "B's clients are told of the mute"
    );
    let info = |p: &Pair| {
        p.b.sfu
            .room_tracks("room")
            .into_iter()
            .find(|t| t.track_id == video.to_string())
            .unwrap()
    };
    assert!(
        info(&p).muted,
        "a client joining B now sees the track muted"
    );
    p.run_for(Duration::from_millis(500));
    let frames = p.b.clients[sub].video_frames().count();
    p.run_for(Duration::from_millis(500));
    assert_eq!(
        p.b.clients[sub].video_frames().count(),
        frames,
        "nothing flows while muted"
    );

    // A repeated mute says nothing; an unmute says so and media comes back.
    let mark = p.b.events.len();
    p.a.call(|s, now| s.set_muted(now, alice, video, true))
        .unwrap();
    p.shuttle();
    assert!(muted_at_b(&p, mark).is_empty());
    p.a.call(|s, now| s.set_muted(now, alice, video, false))
        .unwrap();
    p.shuttle();
    assert_eq!(muted_at_b(&p, mark), vec![false]);
    assert!(!info(&p).muted);
    assert!(
        p.run_until(Duration::from_secs(2), |p| p.b.clients[sub]
            .video_frames()
            .count()
            > frames + 5),
        "media flows again after the unmute"
    );

    // States may arrive out of order: an older one is ignored.
    let mark = p.b.events.len();
    let stale = meridian_media::RelayTrackState {
        track_id: video.to_string(),
        seq: 1,
        muted: true,
        layer: Some(Layer::Low),
    };
    p.b.call(|s, now| s.handle_relay_track_state(now, "A", stale))
        .unwrap();
    assert!(
        muted_at_b(&p, mark).is_empty() && !info(&p).muted,
        "a stale state changes nothing"
    );
    // A state from a node that relays nothing here is refused.
    let from_c = meridian_media::RelayTrackState {
        track_id: video.to_string(),
        seq: u64::MAX,
        muted: true,
        layer: None,
    };
    assert!(
        p.b.call(|s, now| s.handle_relay_track_state(now, "C", from_c))
            .is_err()
    );
}

#[test]
fn a_track_state_that_overtakes_its_offer_is_applied_when_the_track_arrives() {
    let mut p = Pair::new();
    p.a.add_publisher("room", "alice", MediaConfig::default());
    p.b.add_subscriber("room", "bob");
    p.a.call(|s, now| s.relay_room(now, "B", "room"));
    assert!(p.run_until(Duration::from_secs(5), Pair::connected));
    // Dave publishes on A; the offer bringing his tracks to B is held back, and a
    // state of his video (muted) reaches B first, as when control requests overtake
    // each other.
    p.held_offers = Some(Vec::new());
    let dave = p.a.add_publisher("room", "dave", MediaConfig::default());
    assert!(p.run_until(Duration::from_secs(2), |p| {
        p.held_offers.as_ref().is_some_and(|h| !h.is_empty())
    }));
    let video = p.a.clients[dave].track(TrackKind::Video).unwrap();
    let early = meridian_media::RelayTrackState {
        track_id: video.to_string(),
        seq: u64::MAX,
        muted: true,
        layer: Some(Layer::Medium),
    };
    p.b.call(|s, now| s.handle_relay_track_state(now, "A", early))
        .expect("kept until the track arrives");
    let known = |p: &Pair| {
        p.b.sfu
            .room_tracks("room")
            .into_iter()
            .find(|t| t.track_id == video.to_string())
    };
    assert!(known(&p).is_none(), "the track has not reached B yet");
    let mark = p.b.events.len();
    for (sdp, tracks) in p.held_offers.take().unwrap() {
        let answer =
            p.b.call(|s, now| s.handle_relay_offer(now, "A", SFU_ADDR, &sdp, tracks))
                .expect("B accepts A's relay offer");
        p.a.call(|s, now| s.handle_relay_answer(now, "B", &answer))
            .expect("A accepts B's answer");
    }
    p.shuttle();
    let t = known(&p).expect("dave's video is on B");
    assert!(
        t.muted,
        "the early state was applied when the track arrived"
    );
    // B's clients are told: in the publication itself or right after it.
    let told = p.b.events[mark..].iter().any(|(_, e)| match e {
        SfuEvent::RelayTrackMuted {
            track_id,
            muted: true,
            ..
        } => *track_id == video,
        SfuEvent::RelayTrackPublished { track, .. } => {
            track.track_id == video.to_string() && track.muted
        }
        _ => false,
    });
    assert!(told, "B's clients are told the track is muted");
}
