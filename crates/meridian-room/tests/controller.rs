//! The room controller under virtual time: joins, resume within and after the grace,
//! restore from a room's log with the old track ids, a room lost to another node
//! (fenced or drained), identity replacement, no-op changes, the rule that the log
//! only receives events its fold accepts, and the other parts' participants (relayed
//! tracks, rosters).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meridian_events::{Event, LeaveReason, RoomState};
use meridian_media::{ParticipantId, SfuConfig};
use meridian_protocol::{
    ClientMessage, ErrorCode, Layer, ServerMessage, TrackAnnouncement, TrackKind,
};
use meridian_room::{
    Controller, ControllerConfig, Grants, JoinRequest, Joined, MAX_ROSTER, MAX_ROSTER_SOURCES,
    Output, ROSTER_GRACE, RelayOutput, RosterEntry, RosterError,
};
use str0m::Rtc;
use str0m::media::{Direction, MediaKind, Simulcast, SimulcastLayer};

const NODE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 5000);
const GRACE: Duration = Duration::from_secs(10);
const CHANGES_PER_SECOND: f64 = 2.0;
const CHANGE_BURST: u32 = 20;
const REMOVAL_BAN: Duration = Duration::from_secs(60);

/// A client connection: the controller hands it back in outputs.
type Conn = u32;

/// The controller plus what it produced, split by kind, under a virtual clock.
struct World {
    c: Controller<Conn>,
    now: Instant,
    /// Appended events per room, in order, with their epoch.
    log: BTreeMap<String, Vec<(u64, Event)>>,
    /// Messages per connection, in order.
    inbox: BTreeMap<Conn, Vec<ServerMessage>>,
    closed: Vec<Conn>,
    /// Expiry given to the tokens of the next joins.
    token_expiry: Option<Instant>,
    /// Relay outputs, kept only by worlds made with [`World::with_relay`] (the others
    /// must make none).
    relay: Option<Vec<RelayOutput>>,
}

impl World {
    fn new(seed: u64) -> World {
        World::with_sfu(seed, SfuConfig::new(NODE), None)
    }

    /// A node taking relay links on `relay_addr`; its relay outputs are kept.
    fn with_relay(seed: u64, node: SocketAddr, relay_addr: SocketAddr) -> World {
        let mut sfu = SfuConfig::new(node);
        sfu.relay_addr = Some(relay_addr);
        World::with_sfu(seed, sfu, Some(Vec::new()))
    }

    fn with_sfu(seed: u64, sfu: SfuConfig, relay: Option<Vec<RelayOutput>>) -> World {
        let now = Instant::now();
        let config = ControllerConfig {
            sfu,
            resume_grace: GRACE,
            seed,
            changes_per_second: CHANGES_PER_SECOND,
            change_burst: CHANGE_BURST,
            removal_ban: REMOVAL_BAN,
        };
        World {
            c: Controller::new(config, now),
            now,
            log: BTreeMap::new(),
            inbox: BTreeMap::new(),
            closed: Vec::new(),
            token_expiry: None,
            relay,
        }
    }

    /// Moves every output into the log, the inboxes and the closed list.
    fn collect(&mut self) {
        while let Some(out) = self.c.poll_output() {
            match out {
                Output::Append {
                    room,
                    epoch,
                    events,
                    actor,
                } => {
                    assert!(!actor.is_empty(), "every event has an actor");
                    let stream = self.log.entry(room).or_default();
                    stream.extend(events.into_iter().map(|e| (epoch, e)));
                }
                Output::Deliver { to, msg, .. } => self.inbox.entry(to).or_default().push(msg),
                Output::Close { to, .. } => self.closed.push(to),
                Output::Relay(out) => match &mut self.relay {
                    Some(kept) => kept.push(out),
                    None => panic!("no relay link in this test: {out:?}"),
                },
            }
        }
        while self.c.poll_transmit().is_some() {}
    }

    fn join(
        &mut self,
        room: &str,
        identity: &str,
        conn: Conn,
        resume: Option<String>,
    ) -> Result<Joined, ErrorCode> {
        let req = JoinRequest {
            room: room.into(),
            identity: identity.into(),
            name: Some(identity.to_uppercase()),
            grants: Grants {
                publish: true,
                subscribe: true,
            },
            auto_subscribe: true,
            resume,
            expires_at: self.token_expiry,
            session: conn,
        };
        let r = self.c.handle_join(self.now, req);
        self.collect();
        r.map_err(|e| e.code)
    }

    fn send(&mut self, p: ParticipantId, msg: ClientMessage) {
        self.c.handle_message(self.now, p, msg);
        self.collect();
    }

    /// Advances virtual time in steps, firing every due timeout.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        for _ in 0..100_000 {
            let next = self.c.poll_timeout().min(end);
            self.now = next.max(self.now);
            self.c.handle_timeout(self.now);
            self.collect();
            if self.now >= end {
                return;
            }
        }
        panic!("timeouts did not converge");
    }

    fn events(&self, room: &str) -> Vec<Event> {
        self.log
            .get(room)
            .map(|v| v.iter().map(|(_, e)| e.clone()).collect())
            .unwrap_or_default()
    }

    fn messages(&self, conn: Conn) -> &[ServerMessage] {
        self.inbox.get(&conn).map_or(&[], Vec::as_slice)
    }

    fn resume_token(&self, conn: Conn) -> String {
        self.messages(conn)
            .iter()
            .rev()
            .find_map(|m| match m {
                ServerMessage::Joined { resume, .. } => Some(resume.clone()),
                _ => None,
            })
            .expect("the connection was told it joined")
    }

    /// The room's log folded, checked against the controller's own view.
    fn folded(&self, room: &str) -> RoomState {
        let mut state = RoomState::default();
        for e in self.events(room) {
            state.apply_event(&e);
        }
        state
    }
}

/// A publisher's offer with Opus and VP8 simulcast, as a browser would send it.
fn publisher_offer(
    now: Instant,
    track_ids: [Option<String>; 2],
) -> (String, Vec<TrackAnnouncement>) {
    let mut rtc = Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .build(now);
    let mut api = rtc.sdp_api();
    let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let mut simulcast = Simulcast::new();
    for l in Layer::ALL {
        simulcast.add_send_layer(SimulcastLayer::new(l.rid()));
    }
    let video = api.add_media(
        MediaKind::Video,
        Direction::SendOnly,
        None,
        None,
        Some(simulcast),
    );
    let (offer, _pending) = api.apply().expect("an offer with two sections");
    let [audio_id, video_id] = track_ids;
    let tracks = vec![
        TrackAnnouncement {
            mid: audio.to_string(),
            kind: TrackKind::Audio,
            source: "microphone".into(),
            layers: vec![],
            track_id: audio_id,
        },
        TrackAnnouncement {
            mid: video.to_string(),
            kind: TrackKind::Video,
            source: "camera".into(),
            layers: Layer::ALL.to_vec(),
            track_id: video_id,
        },
    ];
    (offer.to_sdp_string(), tracks)
}

fn answer_tracks(msgs: &[ServerMessage]) -> Vec<String> {
    msgs.iter()
        .rev()
        .find_map(|m| match m {
            ServerMessage::Answer { tracks, .. } => {
                Some(tracks.iter().map(|t| t.track_id.clone()).collect())
            }
            _ => None,
        })
        .expect("an answer")
}

fn publish(w: &mut World, p: ParticipantId, conn: Conn, ids: [Option<String>; 2]) -> Vec<String> {
    let (sdp, tracks) = publisher_offer(w.now, ids);
    w.send(p, ClientMessage::Offer { sdp, tracks });
    answer_tracks(w.messages(conn))
}

/// A room as the log holds it after a node hosted alice (publishing two tracks) and
/// bob (subscribed to both, preferring the low layer of the video), then died.
fn logged_room(seed: u64) -> (RoomState, String, String, Vec<String>) {
    let mut w = World::new(seed);
    let alice = w
        .join("r", "alice", 1, None)
        .expect("alice joins")
        .participant;
    let bob = w.join("r", "bob", 2, None).expect("bob joins").participant;
    let tracks = publish(&mut w, alice, 1, [None, None]);
    w.send(
        bob,
        ClientMessage::SetLayer {
            track_id: tracks[1].clone(),
            max_layer: Layer::Low,
        },
    );
    let mut state = w.folded("r");
    state.apply_event(&Event::RoomPlaced {
        node: "b".into(),
        epoch: 2,
    });
    (state, w.resume_token(1), w.resume_token(2), tracks)
}

#[test]
fn join_records_before_acknowledging_and_tells_the_room() {
    let mut w = World::new(1);
    let a = w.join("r", "alice", 1, None).expect("joins");
    assert_eq!(a.generation, 1);
    let events = w.events("r");
    assert!(matches!(events[0], Event::RoomOpened));
    let Event::ParticipantJoined {
        identity,
        resume_hash,
        ..
    } = &events[1]
    else {
        panic!("joined event, got {events:?}");
    };
    assert_eq!(identity, "alice");
    assert_eq!(
        resume_hash.as_deref(),
        Some(meridian_room::sha256_hex(&w.resume_token(1)).as_str()),
        "the log holds the hash of the resume token, never the token"
    );
    let b = w.join("r", "bob", 2, None).expect("joins");
    assert!(
        w.messages(1)
            .iter()
            .any(|m| matches!(m, ServerMessage::ParticipantJoined { participant } if participant.participant_id == b.participant.to_string()))
    );
    // Bob's `joined` lists alice.
    let ServerMessage::Joined { participants, .. } = &w.messages(2)[0] else {
        panic!("joined first");
    };
    assert_eq!(participants.len(), 1);
}

#[test]
fn resume_within_the_grace_keeps_the_participant_and_rotates_the_token() {
    let mut w = World::new(2);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let token = w.resume_token(1);
    w.c.handle_detach(w.now, a.participant, a.generation);
    w.advance(GRACE - Duration::from_millis(100));
    let again = w
        .join("r", "alice", 7, Some(token.clone()))
        .expect("resumes");
    assert_eq!(again.participant, a.participant);
    assert!(again.generation > a.generation);
    let ServerMessage::Joined {
        restored, resume, ..
    } = &w.messages(7)[0]
    else {
        panic!("joined");
    };
    assert!(!restored);
    assert_ne!(*resume, token, "a resume token is spent once used");
    // Past the old grace deadline nothing happens: the participant is attached.
    w.advance(GRACE);
    assert_eq!(
        w.events("r").len(),
        2,
        "no leave recorded: {:?}",
        w.events("r")
    );
    // The spent token no longer works.
    w.c.handle_detach(w.now, again.participant, again.generation);
    assert_eq!(
        w.join("r", "alice", 8, Some(token)),
        Err(ErrorCode::ResumeFailed)
    );
}

#[test]
fn a_stale_detach_does_not_start_the_grace() {
    let mut w = World::new(3);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let token = w.resume_token(1);
    w.c.handle_detach(w.now, a.participant, a.generation);
    let again = w.join("r", "alice", 2, Some(token)).expect("resumes");
    // The first connection's detach arrives late.
    w.c.handle_detach(w.now, a.participant, a.generation);
    w.advance(GRACE * 2);
    assert_eq!(w.c.session_count(), 1);
    assert_eq!(again.participant, a.participant);
}

#[test]
fn handle_due_handles_what_is_due_and_nothing_before() {
    let mut w = World::new(41);
    let a = w.join("r", "alice", 1, None).expect("joins");
    w.c.handle_detach(w.now, a.participant, a.generation);
    w.collect();
    // Before the grace runs out nothing of it is due.
    let early = w.now + GRACE / 2;
    w.c.handle_due(8, || early);
    w.collect();
    assert_eq!(w.c.session_count(), 1);
    // After it, one call removes the participant.
    let late = w.now + GRACE + Duration::from_millis(1);
    let rounds = w.c.handle_due(8, || late);
    w.collect();
    assert!(rounds >= 1, "{rounds}");
    assert_eq!(w.c.session_count(), 0);
    assert!(w.events("r").contains(&Event::ParticipantLeft {
        participant_id: a.participant.to_string(),
        reason: LeaveReason::Timeout,
    }));
}

#[test]
fn after_the_grace_the_participant_has_left_and_cannot_resume() {
    let mut w = World::new(4);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let b = w.join("r", "bob", 2, None).expect("joins");
    let token = w.resume_token(1);
    w.c.handle_detach(w.now, a.participant, a.generation);
    w.advance(GRACE + Duration::from_millis(1));
    assert!(w.events("r").contains(&Event::ParticipantLeft {
        participant_id: a.participant.to_string(),
        reason: LeaveReason::Timeout,
    }));
    assert!(
        w.messages(2)
            .iter()
            .any(|m| matches!(m, ServerMessage::ParticipantLeft { participant_id } if *participant_id == a.participant.to_string()))
    );
    assert_eq!(
        w.join("r", "alice", 3, Some(token)),
        Err(ErrorCode::ResumeFailed)
    );
    // The last one out closes the room.
    w.c.handle_detach(w.now, b.participant, b.generation);
    w.advance(GRACE + Duration::from_millis(1));
    assert_eq!(w.events("r").last(), Some(&Event::RoomClosed));
    assert_eq!(w.c.session_count(), 0);
}

#[test]
fn restore_from_the_log_then_republish_under_the_old_track_ids_records_nothing_new() {
    let (state, alice_token, bob_token, tracks) = logged_room(5);
    let mut w = World::new(6);
    w.c.handle_restore(w.now, "r", state.clone());
    assert_eq!(w.c.session_count(), 2, "both wait as dormant sessions");
    let alice: ParticipantId = state
        .participants
        .iter()
        .find(|(_, p)| p.identity == "alice")
        .map(|(id, _)| id.parse().expect("id"))
        .expect("alice in the log");
    let bob: ParticipantId = state
        .participants
        .iter()
        .find(|(_, p)| p.identity == "bob")
        .map(|(id, _)| id.parse().expect("id"))
        .expect("bob in the log");
    let a = w
        .join("r", "alice", 11, Some(alice_token))
        .expect("alice resumes");
    assert_eq!(
        a.participant, alice,
        "same participant id as before the failover"
    );
    assert!(matches!(
        w.messages(11)[0],
        ServerMessage::Joined { restored: true, .. }
    ));
    let b = w
        .join("r", "bob", 12, Some(bob_token))
        .expect("bob resumes");
    assert_eq!(b.participant, bob);
    let again = publish(
        &mut w,
        alice,
        11,
        [Some(tracks[0].clone()), Some(tracks[1].clone())],
    );
    assert_eq!(again, tracks, "the old track ids are kept");
    assert!(
        w.events("r").is_empty(),
        "restoring records nothing: {:?}",
        w.events("r")
    );
    // Bob is subscribed again, and his preferred layer came back with the track.
    let subs = w.c.sfu().subscriptions_of(bob);
    assert_eq!(subs.len(), 2, "bob's subscriptions are restored");
    let view = w.c.room_state("r").expect("room hosted");
    assert_eq!(view.participants, state.participants);
    assert_eq!(view.tracks, state.tracks);
}

#[test]
fn track_ids_of_other_participants_are_not_honoured() {
    let (state, _alice_token, bob_token, tracks) = logged_room(7);
    let mut w = World::new(8);
    w.c.handle_restore(w.now, "r", state);
    let b = w
        .join("r", "bob", 12, Some(bob_token))
        .expect("bob resumes");
    let got = publish(
        &mut w,
        b.participant,
        12,
        [Some(tracks[0].clone()), Some(tracks[1].clone())],
    );
    assert!(
        got.iter().all(|t| !tracks.contains(t)),
        "bob cannot take alice's ids"
    );
    let published = w
        .events("r")
        .iter()
        .filter(|e| matches!(e, Event::TrackPublished { .. }))
        .count();
    assert_eq!(published, 2, "bob's new tracks are recorded");
}

#[test]
fn restored_participants_that_never_return_leave_after_the_grace() {
    let (state, _, bob_token, _) = logged_room(9);
    let mut w = World::new(10);
    w.c.handle_restore(w.now, "r", state);
    w.join("r", "bob", 12, Some(bob_token))
        .expect("bob resumes");
    w.advance(GRACE + Duration::from_millis(1));
    let events = w.events("r");
    // Alice's tracks go first, then alice; bob stays, so the room stays open.
    assert!(matches!(
        events.last(),
        Some(Event::ParticipantLeft {
            reason: LeaveReason::Timeout,
            ..
        })
    ));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::TrackUnpublished { .. }))
            .count(),
        2
    );
    assert_eq!(w.c.session_count(), 1);
}

#[test]
fn a_fenced_room_is_dropped_and_its_clients_migrate_without_recording() {
    let mut w = World::new(11);
    let a = w.join("r", "alice", 1, None).expect("joins");
    w.join("r", "bob", 2, None).expect("joins");
    w.join("other", "carol", 3, None).expect("joins");
    publish(&mut w, a.participant, 1, [None, None]);
    let before: usize = w.log.values().map(Vec::len).sum();
    w.c.handle_room_lost(w.now, "r", None, "fenced");
    w.collect();
    let after: usize = w.log.values().map(Vec::len).sum();
    assert_eq!(before, after, "nothing recorded for a room this node lost");
    for conn in [1, 2] {
        assert_eq!(
            w.messages(conn).last(),
            Some(&ServerMessage::Migrate {
                url: None,
                reason: "fenced".into()
            })
        );
    }
    assert!(!matches!(
        w.messages(3).last(),
        Some(ServerMessage::Migrate { .. })
    ));
    assert_eq!(
        w.c.session_count(),
        1,
        "only the other room's session is left"
    );
    assert!(w.c.room_state("r").is_none());
    // Timers of the dropped participants fire nothing later.
    w.advance(GRACE * 2);
    assert_eq!(w.log.values().map(Vec::len).sum::<usize>(), after);
}

#[test]
fn drain_hands_the_room_over_and_the_target_restores_it() {
    let mut a_node = World::new(12);
    let alice = a_node.join("r", "alice", 1, None).expect("joins");
    let token = a_node.resume_token(1);
    a_node
        .c
        .handle_room_lost(a_node.now, "r", Some("ws://b/signal".into()), "drain");
    a_node.collect();
    assert_eq!(
        a_node.messages(1).last(),
        Some(&ServerMessage::Migrate {
            url: Some("ws://b/signal".into()),
            reason: "drain".into()
        })
    );
    assert_eq!(a_node.c.session_count(), 0);
    // The target adopts the room from the log (as `place` does) and alice comes back.
    let mut state = a_node.folded("r");
    state.apply_event(&Event::RoomPlaced {
        node: "b".into(),
        epoch: 2,
    });
    let mut b_node = World::new(13);
    b_node.c.handle_restore(b_node.now, "r", state);
    let back = b_node
        .join("r", "alice", 5, Some(token))
        .expect("resumes on b");
    assert_eq!(back.participant, alice.participant);
    assert!(matches!(
        b_node.messages(5)[0],
        ServerMessage::Joined { restored: true, .. }
    ));
    // Events the target records carry the epoch it hosts the room under.
    b_node.send(back.participant, ClientMessage::Leave);
    assert!(b_node.log["r"].iter().all(|(epoch, _)| *epoch == 2));
}

#[test]
fn the_same_identity_joining_again_replaces_the_older_session() {
    let mut w = World::new(14);
    let first = w.join("r", "alice", 1, None).expect("joins");
    w.join("r", "bob", 2, None).expect("joins");
    let second = w.join("r", "alice", 3, None).expect("joins again");
    assert_ne!(first.participant, second.participant);
    assert_eq!(
        w.messages(1).last(),
        Some(&ServerMessage::Left {
            reason: "replaced".into()
        })
    );
    assert_eq!(w.closed, vec![1], "the older connection is closed");
    assert!(w.events("r").contains(&Event::ParticipantLeft {
        participant_id: first.participant.to_string(),
        reason: LeaveReason::Replaced,
    }));
    assert_eq!(w.c.stats().sessions_replaced, 1);
    // Bob sees one alice, not two.
    let alices =
        w.c.room_state("r")
            .expect("hosted")
            .participants
            .values()
            .filter(|p| p.identity == "alice")
            .count();
    assert_eq!(alices, 1);
    // Same identity in another room is another session.
    w.join("elsewhere", "alice", 4, None)
        .expect("joins another room");
    assert_eq!(w.c.stats().sessions_replaced, 1);
}

#[test]
fn repeated_layer_preferences_and_mutes_record_once() {
    let mut w = World::new(15);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let b = w.join("r", "bob", 2, None).expect("joins");
    let tracks = publish(&mut w, a.participant, 1, [None, None]);
    let before = w.events("r").len();
    for _ in 0..20 {
        w.send(
            b.participant,
            ClientMessage::SetLayer {
                track_id: tracks[1].clone(),
                max_layer: Layer::Medium,
            },
        );
        w.send(
            a.participant,
            ClientMessage::Mute {
                track_id: tracks[0].clone(),
                muted: true,
            },
        );
    }
    let new: Vec<Event> = w.events("r")[before..].to_vec();
    assert_eq!(
        new,
        vec![
            Event::PreferredLayerSet {
                participant_id: b.participant.to_string(),
                track_id: tracks[1].clone(),
                layer: "h".into(),
            },
            Event::TrackMuted {
                track_id: tracks[0].clone()
            },
        ],
        "the layer is recorded as a rid, and repeats are not recorded"
    );
    let mutes = w
        .messages(2)
        .iter()
        .filter(|m| matches!(m, ServerMessage::TrackMuted { .. }))
        .count();
    assert_eq!(mutes, 1, "a repeated mute is not announced again");
}

#[test]
fn every_event_written_folds_to_the_controllers_view() {
    // A busy room: joins, publications with codecs, subscriptions, layers, mutes,
    // unpublish, leave, a timeout, a replacement, and the room closing and reopening.
    let mut w = World::new(16);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let b = w.join("r", "bob", 2, None).expect("joins");
    let tracks = publish(&mut w, a.participant, 1, [None, None]);
    w.send(
        b.participant,
        ClientMessage::SetLayer {
            track_id: tracks[1].clone(),
            max_layer: Layer::High,
        },
    );
    w.send(
        a.participant,
        ClientMessage::Mute {
            track_id: tracks[1].clone(),
            muted: true,
        },
    );
    w.send(
        b.participant,
        ClientMessage::Unsubscribe {
            track_ids: vec![tracks[0].clone()],
        },
    );
    w.send(
        a.participant,
        ClientMessage::Unpublish {
            track_id: tracks[0].clone(),
        },
    );
    w.join("r", "bob", 3, None).expect("bob again");
    w.send(a.participant, ClientMessage::Leave);
    let codecs: Vec<String> = w
        .events("r")
        .iter()
        .filter_map(|e| match e {
            Event::TrackPublished { codec, .. } => Some(codec.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(codecs, vec!["opus", "VP8"], "real codec names are recorded");
    assert_eq!(
        &w.folded("r"),
        w.c.room_state("r").expect("hosted"),
        "the log's fold equals what the controller decided on"
    );
    // Every event kind the controller writes replays through decisions too: each
    // event, decided from the fold so far, is one the rules accept.
    let kinds: std::collections::BTreeSet<&str> =
        w.events("r").iter().map(|e| e.event_type()).collect();
    for k in [
        "RoomOpened",
        "ParticipantJoined",
        "TrackPublished",
        "Subscribed",
        "Unsubscribed",
        "PreferredLayerSet",
        "TrackMuted",
        "TrackUnpublished",
        "ParticipantLeft",
    ] {
        assert!(kinds.contains(k), "{k} written in this run: {kinds:?}");
    }
}

#[test]
fn a_closed_room_opens_again_on_the_next_join() {
    let mut w = World::new(17);
    let a = w.join("r", "alice", 1, None).expect("joins");
    w.send(a.participant, ClientMessage::Leave);
    assert_eq!(w.events("r").last(), Some(&Event::RoomClosed));
    assert_eq!(
        w.messages(1).last(),
        Some(&ServerMessage::Left {
            reason: "left".into()
        })
    );
    w.join("r", "bob", 2, None).expect("joins the closed room");
    let events = w.events("r");
    assert!(matches!(events[events.len() - 2], Event::RoomOpened));
    assert!(w.folded("r").is_open());
}

#[test]
fn refused_requests_get_an_error_with_a_code() {
    let mut w = World::new(18);
    let a = w.join("r", "alice", 1, None).expect("joins");
    w.send(
        a.participant,
        ClientMessage::Unpublish {
            track_id: "not-a-track".into(),
        },
    );
    assert!(matches!(
        w.messages(1).last(),
        Some(ServerMessage::Error {
            code: ErrorCode::NotFound,
            ..
        })
    ));
    w.send(
        a.participant,
        ClientMessage::Offer {
            sdp: "v=0 garbage".into(),
            tracks: vec![],
        },
    );
    assert!(matches!(
        w.messages(1).last(),
        Some(ServerMessage::Error {
            code: ErrorCode::InvalidSdp,
            ..
        })
    ));
    // Unknown participants (a message racing a leave) get `not_joined`, nothing panics.
    w.c.handle_message(w.now, ParticipantId(999), ClientMessage::Leave);
    w.collect();
}

#[test]
fn layer_and_mute_changes_are_rate_limited_per_participant() {
    let mut w = World::new(31);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let b = w.join("r", "bob", 2, None).expect("joins");
    let tracks = publish(&mut w, a.participant, 1, [None, None]);
    let throttled = |w: &World, conn: Conn| {
        w.messages(conn)
            .iter()
            .filter(|m| {
                matches!(
                    m,
                    ServerMessage::Error {
                        code: ErrorCode::Throttled,
                        ..
                    }
                )
            })
            .count()
    };
    let before = w.events("r").len();
    // Alternating layers: every one a change, so only the bucket stops them.
    for i in 0..100 {
        let max_layer = if i % 2 == 0 { Layer::Low } else { Layer::High };
        w.send(
            b.participant,
            ClientMessage::SetLayer {
                track_id: tracks[1].clone(),
                max_layer,
            },
        );
    }
    assert_eq!(throttled(&w, 2), 100 - CHANGE_BURST as usize);
    let recorded = w.events("r").len() - before;
    assert!(
        recorded <= CHANGE_BURST as usize,
        "{recorded} events for 100 layer requests"
    );
    // Another participant's allowance is its own.
    for i in 0..10 {
        w.send(
            a.participant,
            ClientMessage::Mute {
                track_id: tracks[0].clone(),
                muted: i % 2 == 0,
            },
        );
    }
    assert_eq!(throttled(&w, 1), 0);
    // The allowance refills with (virtual) time.
    w.advance(Duration::from_secs(1));
    w.send(
        b.participant,
        ClientMessage::SetLayer {
            track_id: tracks[1].clone(),
            max_layer: Layer::Medium,
        },
    );
    assert_eq!(
        throttled(&w, 2),
        100 - CHANGE_BURST as usize,
        "refilled after a second"
    );
    assert_eq!(w.c.stats().changes_throttled, 80);
}

#[test]
fn sessions_end_when_their_token_expires_unless_refreshed() {
    let mut w = World::new(41);
    w.token_expiry = Some(w.now + Duration::from_secs(60));
    let a = w.join("r", "alice", 1, None).expect("joins");
    let b = w.join("r", "bob", 2, None).expect("joins");
    // Alice refreshes with a token valid for another 10 minutes; Bob does not.
    w.advance(Duration::from_secs(30));
    w.c.handle_refresh(a.participant, Some(w.now + Duration::from_secs(600)))
        .expect("refreshes");
    w.advance(Duration::from_secs(31));
    assert!(
        w.messages(2).iter().any(|m| matches!(
            m,
            ServerMessage::Error {
                code: ErrorCode::Unauthorized,
                ..
            }
        )),
        "bob is told his token expired: {:?}",
        w.messages(2)
    );
    assert!(w.closed.contains(&2), "bob's connection is closed");
    assert!(!w.closed.contains(&1), "alice stays");
    assert!(w.events("r").iter().any(|e| matches!(
        e,
        Event::ParticipantLeft { participant_id, reason: LeaveReason::Timeout }
            if *participant_id == b.participant.to_string()
    )));
    // Bob's resume token died with the session.
    let token = w.resume_token(2);
    assert_eq!(
        w.join("r", "bob", 3, Some(token)),
        Err(ErrorCode::ResumeFailed)
    );
    // Alice's refreshed session ends at the new expiry.
    w.advance(Duration::from_secs(600));
    assert!(w.closed.contains(&1));
    assert_eq!(w.c.session_count(), 0);
    let _ = a;
}

#[test]
fn an_admin_removal_cannot_be_undone_by_resuming() {
    let mut w = World::new(43);
    let a = w.join("r", "alice", 1, None).expect("joins");
    let _b = w.join("r", "bob", 2, None).expect("joins");
    let token = w.resume_token(1);
    assert!(
        !w.c.handle_remove(w.now, a.participant, Some("other-room")),
        "an admin of another room cannot remove her"
    );
    assert!(w.c.handle_remove(w.now, a.participant, Some("r")));
    w.collect();
    assert!(
        w.messages(1)
            .iter()
            .any(|m| matches!(m, ServerMessage::Left { reason } if reason == "removed"))
    );
    assert!(w.closed.contains(&1));
    assert!(w.events("r").iter().any(|e| matches!(
        e,
        Event::ParticipantLeft {
            reason: LeaveReason::Kicked,
            ..
        }
    )));
    assert!(w.messages(2).iter().any(|m| matches!(
        m,
        ServerMessage::ParticipantLeft { participant_id } if *participant_id == a.participant.to_string()
    )));
    assert_eq!(
        w.join("r", "alice", 3, Some(token)),
        Err(ErrorCode::ResumeFailed),
        "the resume token is revoked"
    );
    assert!(!w.c.close_signaling(a.participant, None));
}

#[test]
fn a_removed_identity_may_not_join_the_room_again_for_the_ban() {
    let mut w = World::new(44);
    let a = w.join("r", "alice", 1, None).expect("joins");
    assert!(w.c.handle_remove(w.now, a.participant, None));
    w.collect();
    assert_eq!(
        w.join("r", "alice", 2, None),
        Err(ErrorCode::Forbidden),
        "banned from the room"
    );
    let refusal = w.c.handle_join(
        w.now,
        JoinRequest {
            room: "r".into(),
            identity: "alice".into(),
            name: None,
            grants: Grants {
                publish: true,
                subscribe: true,
            },
            auto_subscribe: true,
            resume: None,
            expires_at: None,
            session: 3,
        },
    );
    let message = refusal.expect_err("banned").message;
    assert!(
        message.contains("removed") && message.contains("60 s"),
        "{message}"
    );
    // Only that identity, only that room.
    assert!(w.join("r", "bob", 4, None).is_ok());
    assert!(w.join("elsewhere", "alice", 5, None).is_ok());
    w.advance(REMOVAL_BAN - Duration::from_secs(1));
    assert_eq!(w.join("r", "alice", 6, None), Err(ErrorCode::Forbidden));
    w.advance(Duration::from_secs(2));
    assert!(w.join("r", "alice", 7, None).is_ok(), "the ban is over");
}

#[test]
fn close_signaling_is_scoped_to_the_admin_s_room() {
    let mut w = World::new(47);
    let a = w.join("r", "alice", 1, None).expect("joins");
    assert!(!w.c.close_signaling(a.participant, Some("elsewhere")));
    w.collect();
    assert!(w.closed.is_empty());
    assert!(w.c.close_signaling(a.participant, Some("r")));
    w.collect();
    assert_eq!(w.closed, vec![1]);
}

/// The `a=ice-ufrag` of an SDP.
fn ufrag(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .expect("the SDP has an ICE ufrag")
        .to_string()
}

/// Issue 15 item 4: `ice_restart` gets the participant a subscriber offer with new ICE
/// credentials on the same participant; nothing is recorded in the room's log.
#[test]
fn ice_restart_reoffers_the_subscriber_connection_with_new_credentials() {
    let mut w = World::new(21);
    let alice = w
        .join("r", "alice", 1, None)
        .expect("alice joins")
        .participant;
    let bob = w.join("r", "bob", 2, None).expect("bob joins").participant;
    publish(&mut w, alice, 1, [None, None]);
    let offers = |w: &World| -> Vec<String> {
        w.messages(2)
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Offer { sdp, .. } => Some(sdp.clone()),
                _ => None,
            })
            .collect()
    };
    let mut client = Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .build(w.now);
    // Answers bob's offers from the `seen`-th on (each answer may release the next).
    let mut answer_all = |w: &mut World, seen: &mut usize| {
        while let Some(sdp) = offers(w).get(*seen).cloned() {
            *seen += 1;
            let answer = client
                .sdp_api()
                .accept_offer(str0m::change::SdpOffer::from_sdp_string(&sdp).unwrap())
                .expect("the node's offer is acceptable");
            w.send(
                bob,
                ClientMessage::Answer {
                    sdp: answer.to_sdp_string(),
                },
            );
        }
    };
    let mut seen = 0;
    answer_all(&mut w, &mut seen);
    let first = offers(&w).pop().expect("bob was offered alice's tracks");
    let logged = w.events("r").len();

    w.send(bob, ClientMessage::IceRestart);
    assert_eq!(offers(&w).len(), seen + 1, "one more offer for bob");
    let restart = offers(&w).pop().expect("the restart offer");
    assert_ne!(ufrag(&restart), ufrag(&first), "new ICE credentials");
    answer_all(&mut w, &mut seen);
    assert!(
        !w.messages(2)
            .iter()
            .any(|m| matches!(m, ServerMessage::Error { .. })),
        "no error: {:?}",
        w.messages(2)
    );
    assert_eq!(
        w.events("r").len(),
        logged,
        "an ICE restart is not a room event"
    );
    assert_eq!(w.c.sfu().identity(bob), Some("bob"), "the same participant");
}

/// Dev mode's cut: every datagram of the participant is dropped and counted until the
/// cut ends; an unknown participant cannot be cut.
#[test]
fn a_cut_drops_the_participants_datagrams_until_it_ends() {
    let mut w = World::new(22);
    let alice = w
        .join("r", "alice", 1, None)
        .expect("alice joins")
        .participant;
    // Alice's client offers and takes the answer; its first ICE check is a datagram
    // of alice's publisher connection (routed by its USERNAME).
    let from: SocketAddr = "10.0.9.9:4000".parse().unwrap();
    let mut client = Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .build(w.now);
    client.add_local_candidate(str0m::Candidate::host(from, "udp").unwrap());
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, pending) = api.apply().expect("an offer");
    w.send(
        alice,
        ClientMessage::Offer {
            sdp: offer.to_sdp_string(),
            tracks: vec![],
        },
    );
    let answer = w
        .messages(1)
        .iter()
        .find_map(|m| match m {
            ServerMessage::Answer { sdp, .. } => Some(sdp.clone()),
            _ => None,
        })
        .expect("the node answered");
    client
        .sdp_api()
        .accept_answer(
            pending,
            str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap(),
        )
        .unwrap();
    let check = loop {
        match client.poll_output().expect("the client runs") {
            str0m::Output::Transmit(t) => break Vec::from(t.contents),
            str0m::Output::Timeout(_) => client
                .handle_input(str0m::Input::Timeout(w.now + Duration::from_millis(100)))
                .unwrap(),
            str0m::Output::Event(_) => {}
        }
    };
    assert!(!w.c.cut_media(w.now, ParticipantId(999), Duration::from_secs(1)));
    assert!(w.c.cut_media(w.now, alice, Duration::from_secs(2)));
    w.c.handle_datagram(w.now, from, &check);
    assert_eq!(w.c.stats().datagrams_cut, 1, "dropped while cut");
    assert!(w.c.poll_transmit().is_none(), "no answer while cut");
    w.advance(Duration::from_secs(3));
    w.c.handle_datagram(w.now, from, &check);
    assert_eq!(w.c.stats().datagrams_cut, 1, "not dropped after the cut");
    let answered = std::iter::from_fn(|| w.c.poll_transmit()).any(|t| t.destination == from);
    assert!(answered, "the check is answered once the cut is over");
}

/// Takes the last relay offer node `w` made (its SDP and tracks).
fn last_relay_offer(w: &mut World) -> (String, Vec<meridian_media::RelayTrack>) {
    w.relay
        .as_mut()
        .expect("a relay world")
        .drain(..)
        .rev()
        .find_map(|o| match o {
            RelayOutput::Offer { sdp, tracks, .. } => Some((sdp, tracks)),
            _ => None,
        })
        .expect("a relay offer")
}

/// Hands A's relay offers to B and B's answers back to A until A has none left.
fn shuttle_offer(a: &mut World, b: &mut World) {
    for _ in 0..8 {
        let offered = a
            .relay
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| matches!(o, RelayOutput::Offer { .. })));
        if !offered {
            return;
        }
        let (sdp, tracks) = last_relay_offer(a);
        let now = b.now;
        let answer =
            b.c.relay(now, |sfu, now| {
                sfu.handle_relay_offer(now, "A", RELAY_A, &sdp, tracks)
            })
            .expect("B takes A's offer");
        b.collect();
        let now = a.now;
        a.c.relay(now, |sfu, now| sfu.handle_relay_answer(now, "B", &answer))
            .expect("A takes B's answer");
        a.collect();
    }
    panic!("A's relay offers did not settle");
}

/// The comings (`+`) and goings (`-`) of `who` announced to `conn`, in order.
fn comings_and_goings(w: &World, conn: Conn, who: impl ToString) -> String {
    let who = who.to_string();
    w.messages(conn)
        .iter()
        .filter_map(|m| match m {
            ServerMessage::ParticipantJoined { participant }
                if participant.participant_id == who =>
            {
                Some('+')
            }
            ServerMessage::ParticipantLeft { participant_id } if *participant_id == who => {
                Some('-')
            }
            _ => None,
        })
        .collect()
}

const RELAY_A: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 5001);
const NODE_B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 5000);
const RELAY_B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 5001);

#[test]
fn a_relayed_publisher_is_a_participant_of_the_far_part_until_its_last_track_goes() {
    let mut a = World::with_relay(51, NODE, RELAY_A);
    let mut b = World::with_relay(52, NODE_B, RELAY_B);
    let alice = a.join("r", "alice", 1, None).expect("joins A").participant;
    let tracks = publish(&mut a, alice, 1, [None, None]);
    let bob = b.join("r", "bob", 2, None).expect("joins B").participant;
    let now = a.now;
    a.c.relay(now, |sfu, now| sfu.relay_room(now, "B", "r"));
    a.collect();

    // A's offer names the publisher of each track; B's clients learn it once, before
    // its tracks, and nothing of it is recorded in B's log.
    let (sdp, offered) = last_relay_offer(&mut a);
    assert_eq!(offered.len(), 2);
    for t in &offered {
        assert_eq!(
            (t.identity.as_str(), t.name.as_deref()),
            ("alice", Some("ALICE"))
        );
    }
    // A hostile offer (a name over the bound) is refused with a typed error.
    let mut hostile = offered.clone();
    hostile[0].name = Some("x".repeat(meridian_media::MAX_RELAY_NAME_BYTES + 1));
    let now = b.now;
    let refused = b.c.relay(now, |sfu, now| {
        sfu.handle_relay_offer(now, "A", RELAY_A, &sdp, hostile)
    });
    assert!(
        matches!(refused, Err(meridian_media::MediaError::Limit(_))),
        "{refused:?}"
    );
    b.collect();
    a.relay
        .as_mut()
        .expect("relay world")
        .push(RelayOutput::Offer {
            peer: "B".into(),
            sdp,
            tracks: offered,
        });
    shuttle_offer(&mut a, &mut b);
    assert_eq!(comings_and_goings(&b, 2, alice), "+");
    let joined_at = b
        .messages(2)
        .iter()
        .position(|m| matches!(m, ServerMessage::ParticipantJoined { .. }))
        .expect("joined");
    let Some(ServerMessage::ParticipantJoined { participant }) = b.messages(2).get(joined_at)
    else {
        unreachable!()
    };
    assert_eq!(participant.identity, "alice");
    assert_eq!(participant.name.as_deref(), Some("ALICE"));
    let published_at: Vec<usize> = b
        .messages(2)
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m, ServerMessage::TrackPublished { track } if track.participant_id == alice.to_string()))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(published_at.len(), 2, "both tracks announced");
    assert!(published_at.iter().all(|i| *i > joined_at));
    assert!(
        !b.events("r").iter().any(|e| matches!(
            e,
            Event::ParticipantJoined { identity, .. } if identity == "alice"
        )),
        "alice is in A's log, not B's: {:?}",
        b.events("r")
    );

    // A late joiner on B finds alice, with her tracks, in `joined`.
    b.join("r", "carol", 3, None).expect("joins B");
    let ServerMessage::Joined { participants, .. } = &b.messages(3)[0] else {
        panic!("joined first");
    };
    let listed = participants
        .iter()
        .find(|p| p.participant_id == alice.to_string())
        .expect("alice listed for a late joiner");
    assert_eq!(listed.name.as_deref(), Some("ALICE"));
    let mut listed_tracks: Vec<String> = listed.tracks.iter().map(|t| t.track_id.clone()).collect();
    listed_tracks.sort();
    let mut want = tracks.clone();
    want.sort();
    assert_eq!(listed_tracks, want);
    assert!(
        participants
            .iter()
            .any(|p| p.participant_id == bob.to_string())
    );

    // The link drops: alice leaves B's clients; it comes back: she is back.
    let now = b.now;
    b.c.relay(now, |sfu, now| sfu.remove_relay(now, "A"));
    b.collect();
    assert_eq!(comings_and_goings(&b, 2, alice), "+-");
    assert_eq!(
        b.c.stats().decisions_refused,
        0,
        "the link's tracks end as relayed ones: nothing is decided about them here"
    );
    let now = a.now;
    a.c.relay(now, |sfu, now| {
        sfu.remove_relay_out(now, "B");
        sfu.relay_room(now, "B", "r");
    });
    a.collect();
    shuttle_offer(&mut a, &mut b);
    assert_eq!(comings_and_goings(&b, 2, alice), "+-+");

    // Alice leaves A: her tracks go from the link and, with the last, she leaves B.
    a.send(alice, ClientMessage::Leave);
    shuttle_offer(&mut a, &mut b);
    assert_eq!(comings_and_goings(&b, 2, alice), "+-+-");
    assert_eq!(
        comings_and_goings(&b, 3, alice),
        "-+-",
        "carol saw her in `joined`, then the link drop, its return and her leave"
    );
    let ServerMessage::Joined { participants, .. } = b
        .join("r", "dave", 4, None)
        .map(|_| b.messages(4)[0].clone())
        .expect("joins B")
    else {
        panic!("joined first");
    };
    assert!(
        participants
            .iter()
            .all(|p| p.participant_id != alice.to_string()),
        "alice is gone for later joiners"
    );
}

/// One participant of another part, as its node lists it.
fn listed(pid: &str, identity: &str, name: Option<&str>, joined_ago_ms: u64) -> RosterEntry {
    RosterEntry {
        participant_id: pid.into(),
        identity: identity.into(),
        name: name.map(str::to_string),
        joined_ago_ms,
    }
}

impl World {
    fn roster(
        &mut self,
        part: &str,
        source: &str,
        roster: Vec<RosterEntry>,
    ) -> Result<(), RosterError> {
        let r = self.c.handle_remote_roster(self.now, part, source, roster);
        self.collect();
        r
    }

    /// The name `conn` was last told for `pid` (by `participant_joined`).
    fn told_name(&self, conn: Conn, pid: &str) -> Option<Option<String>> {
        self.messages(conn).iter().rev().find_map(|m| match m {
            ServerMessage::ParticipantJoined { participant }
                if participant.participant_id == pid =>
            {
                Some(participant.name.clone())
            }
            _ => None,
        })
    }

    /// The other participants `conn` was given in its `joined`.
    fn joined_list(&self, conn: Conn) -> Vec<String> {
        let Some(ServerMessage::Joined { participants, .. }) = self.messages(conn).first() else {
            panic!("joined first");
        };
        participants
            .iter()
            .map(|p| p.participant_id.clone())
            .collect()
    }
}

#[test]
fn far_participants_who_publish_nothing_come_go_and_change_name_from_their_part_s_roster() {
    let mut b = World::new(61);
    let bob = b.join("r", "bob", 2, None).expect("joins").participant;
    let far = vec![
        listed("9000001", "alice", Some("Alice"), 0),
        listed("9000002", "carol", None, 0),
        // Bob himself, as a confused node might list him: not a far participant.
        listed(&bob.to_string(), "bob", Some("BOB"), 0),
    ];
    b.roster("r", "node-a/r", far.clone()).expect("taken");
    assert_eq!(comings_and_goings(&b, 2, "9000001"), "+");
    assert_eq!(comings_and_goings(&b, 2, "9000002"), "+");
    assert_eq!(
        comings_and_goings(&b, 2, bob),
        "",
        "bob is not told of himself"
    );
    assert_eq!(b.told_name(2, "9000001"), Some(Some("Alice".into())));
    // The same roster again tells nobody anything.
    let before = b.messages(2).len();
    b.roster("r", "node-a/r", far).expect("taken");
    assert_eq!(b.messages(2).len(), before);
    // A late joiner finds them in `joined`; nothing of them is in this part's log.
    b.join("r", "dave", 3, None).expect("joins");
    let mut list = b.joined_list(3);
    list.sort();
    let mut want = vec![bob.to_string(), "9000001".into(), "9000002".into()];
    want.sort();
    assert_eq!(list, want);
    assert!(
        !b.events("r").iter().any(|e| matches!(
            e,
            Event::ParticipantJoined { identity, .. } if identity == "alice" || identity == "carol"
        )),
        "{:?}",
        b.events("r")
    );
    // Alice changes her name; carol leaves.
    b.roster(
        "r",
        "node-a/r",
        vec![listed("9000001", "alice", Some("Alice B."), 0)],
    )
    .expect("taken");
    assert_eq!(
        comings_and_goings(&b, 2, "9000001"),
        "++",
        "told again, renamed"
    );
    assert_eq!(b.told_name(2, "9000001"), Some(Some("Alice B.".into())));
    assert_eq!(b.told_name(3, "9000001"), Some(Some("Alice B.".into())));
    assert_eq!(comings_and_goings(&b, 2, "9000002"), "+-");
    assert_eq!(comings_and_goings(&b, 3, "9000002"), "-");
    // Her part empties: she leaves.
    b.roster("r", "node-a/r", Vec::new()).expect("taken");
    assert_eq!(comings_and_goings(&b, 2, "9000001"), "++-");
    assert_eq!(b.c.stats().decisions_refused, 0);
}

#[test]
fn of_one_identity_in_two_far_parts_the_newest_is_shown() {
    let mut b = World::new(62);
    b.join("r", "bob", 2, None).expect("joins");
    b.roster("r", "node-a/r", vec![listed("1", "alice", None, 60_000)])
        .expect("taken");
    // Alice joins again in a third part while her older session waits out its grace.
    b.now += Duration::from_millis(500);
    b.roster(
        "r",
        "node-c/r~node-c",
        vec![listed("2", "alice", None, 100)],
    )
    .expect("taken");
    assert_eq!(
        comings_and_goings(&b, 2, "1"),
        "+-",
        "the older one is replaced"
    );
    assert_eq!(comings_and_goings(&b, 2, "2"), "+");
    let order: Vec<&ServerMessage> = b.messages(2).iter().rev().take(2).collect();
    assert!(
        matches!(order[1], ServerMessage::ParticipantLeft { .. })
            && matches!(order[0], ServerMessage::ParticipantJoined { .. }),
        "the older one leaves before the newer comes: {order:?}"
    );
    // Renewals of both keep the choice.
    b.now += Duration::from_millis(500);
    b.roster("r", "node-a/r", vec![listed("1", "alice", None, 60_500)])
        .expect("taken");
    b.roster(
        "r",
        "node-c/r~node-c",
        vec![listed("2", "alice", None, 600)],
    )
    .expect("taken");
    assert_eq!(comings_and_goings(&b, 2, "1"), "+-");
    assert_eq!(comings_and_goings(&b, 2, "2"), "+");
    b.join("r", "dave", 3, None).expect("joins");
    assert!(!b.joined_list(3).contains(&"1".to_string()));
    // Her older session's grace ends: nothing to tell.
    b.roster("r", "node-a/r", Vec::new()).expect("taken");
    assert_eq!(comings_and_goings(&b, 2, "1"), "+-");
    assert_eq!(comings_and_goings(&b, 2, "2"), "+");
}

#[test]
fn a_far_part_that_stops_listing_takes_its_people_after_the_grace() {
    let mut b = World::new(63);
    b.join("r", "bob", 2, None).expect("joins");
    b.roster("r", "node-a/r", vec![listed("1", "alice", None, 0)])
        .expect("taken");
    b.roster("r", "node-c/r~node-c", vec![listed("2", "erin", None, 0)])
        .expect("taken");
    // node-c keeps answering, node-a falls silent.
    for _ in 0..((ROSTER_GRACE.as_millis() / 500) - 1) {
        b.advance(Duration::from_millis(500));
        b.roster("r", "node-c/r~node-c", vec![listed("2", "erin", None, 0)])
            .expect("taken");
    }
    assert_eq!(
        comings_and_goings(&b, 2, "1"),
        "+",
        "still within the grace"
    );
    b.advance(Duration::from_millis(600));
    assert_eq!(comings_and_goings(&b, 2, "1"), "+-", "gone with its part");
    assert_eq!(comings_and_goings(&b, 2, "2"), "+");
    // Silence from node-c too: its people go.
    b.advance(ROSTER_GRACE);
    assert_eq!(comings_and_goings(&b, 2, "2"), "+-");
}

#[test]
fn bad_rosters_are_refused_with_a_typed_error_and_change_nothing() {
    let mut b = World::new(64);
    b.join("r", "bob", 2, None).expect("joins");
    let before = b.messages(2).len();
    let many: Vec<RosterEntry> = (0..=MAX_ROSTER)
        .map(|i| listed(&i.to_string(), &format!("u{i}"), None, 0))
        .collect();
    assert_eq!(
        b.roster("r", "node-a/r", many),
        Err(RosterError::TooLarge(MAX_ROSTER + 1))
    );
    let long_name = listed("1", "alice", Some(&"x".repeat(257)), 0);
    assert!(matches!(
        b.roster("r", "node-a/r", vec![long_name]),
        Err(RosterError::BadEntry(_))
    ));
    let long_identity = listed("1", &"x".repeat(129), None, 0);
    assert!(matches!(
        b.roster("r", "node-a/r", vec![long_identity]),
        Err(RosterError::BadEntry(_))
    ));
    let twice = vec![
        listed("1", "alice", None, 0),
        listed("1", "mallory", None, 0),
    ];
    assert!(matches!(
        b.roster("r", "node-a/r", twice),
        Err(RosterError::BadEntry(_))
    ));
    assert!(matches!(
        b.roster("r", "node-a/r", vec![listed("", "alice", None, u64::MAX)]),
        Err(RosterError::BadEntry(_))
    ));
    assert_eq!(b.messages(2).len(), before, "nothing told");
    for i in 0..MAX_ROSTER_SOURCES {
        b.roster("r", &format!("node-{i}/r"), Vec::new())
            .expect("taken");
    }
    assert_eq!(
        b.roster("r", "one-too-many/r", vec![listed("1", "alice", None, 0)]),
        Err(RosterError::TooManySources("r".into()))
    );
    assert_eq!(b.messages(2).len(), before);
    // A join time far in the past is taken (saturating), not a panic.
    b.roster("r", "node-0/r", vec![listed("1", "alice", None, u64::MAX)])
        .expect("taken");
    assert_eq!(comings_and_goings(&b, 2, "1"), "+");
}

#[test]
fn a_node_lists_its_own_participants_and_parts_on_one_node_see_each_other() {
    let mut w = World::new(65);
    let alice = w.join("r", "alice", 1, None).expect("joins").participant;
    w.now += Duration::from_millis(1500);
    let bob = w
        .join("r~node-b", "bob", 2, None)
        .expect("joins")
        .participant;
    let roster = w.c.roster(w.now, "r");
    assert_eq!(
        roster,
        vec![listed(&alice.to_string(), "alice", Some("ALICE"), 1500)]
    );
    assert_eq!(w.c.roster(w.now, "r~node-b").len(), 1);
    assert!(w.c.roster(w.now, "other").is_empty());
    // Neither part knows the other's participant until the rosters are shared.
    assert_eq!(comings_and_goings(&w, 1, bob), "");
    let parts = vec!["r".to_string(), "r~node-b".to_string(), "x".to_string()];
    w.c.share_local_rosters(w.now, &parts);
    w.collect();
    assert_eq!(comings_and_goings(&w, 1, bob), "+");
    assert_eq!(comings_and_goings(&w, 2, alice), "+");
    // A far roster never passes on: r lists only its own.
    w.roster("r", "node-c/r~node-c", vec![listed("7", "carol", None, 0)])
        .expect("taken");
    assert!(w.c.roster(w.now, "r").iter().all(|e| e.identity == "alice"));
    // Bob leaves: alice's part hears it at the next sharing.
    w.send(bob, ClientMessage::Leave);
    w.c.share_local_rosters(w.now, &parts);
    w.collect();
    assert_eq!(comings_and_goings(&w, 1, bob), "+-");
}
