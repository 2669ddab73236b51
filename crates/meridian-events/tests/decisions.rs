//! Given / when / then tests of room decisions, and of the fold they feed.

use meridian_events::{Command, DomainError, Event, LeaveReason, RoomState, TrackKind, decide};

/// Given these past events, when this command, then these events or this error.
struct Scenario {
    state: RoomState,
}

fn given(events: &[Event]) -> Scenario {
    let mut state = RoomState::default();
    for e in events {
        state.apply_event(e);
    }
    Scenario { state }
}

impl Scenario {
    fn when(self, command: Command) -> Outcome {
        let result = decide(&self.state, &command);
        Outcome {
            state: self.state,
            result,
        }
    }
}

struct Outcome {
    state: RoomState,
    result: Result<Vec<Event>, DomainError>,
}

impl Outcome {
    fn then(self, expected: &[Event]) -> RoomState {
        let events = self.result.expect("command accepted");
        assert_eq!(events, expected);
        let mut state = self.state;
        for e in &events {
            state.apply_event(e);
        }
        state
    }

    fn then_error(self, expected: DomainError) {
        assert_eq!(self.result.expect_err("command refused"), expected);
    }
}

fn joined(p: &str, identity: &str) -> Event {
    Event::ParticipantJoined {
        participant_id: p.into(),
        identity: identity.into(),
        name: identity.to_uppercase(),
        resume_hash: None,
    }
}

fn published(t: &str, p: &str) -> Event {
    Event::TrackPublished {
        track_id: t.into(),
        participant_id: p.into(),
        kind: TrackKind::Video,
        layers: vec!["q".into(), "h".into(), "f".into()],
        codec: "VP8".into(),
    }
}

fn join(p: &str, identity: &str) -> Command {
    Command::Join {
        participant_id: p.into(),
        identity: identity.into(),
        name: identity.to_uppercase(),
        resume_hash: None,
    }
}

#[test]
fn first_join_opens_the_room() {
    let state = given(&[])
        .when(join("p1", "alice"))
        .then(&[Event::RoomOpened, joined("p1", "alice")]);
    assert!(state.opened);
    assert_eq!(state.participants["p1"].identity, "alice");
}

#[test]
fn second_join_does_not_reopen() {
    given(&[Event::RoomOpened, joined("p1", "alice")])
        .when(join("p2", "bob"))
        .then(&[joined("p2", "bob")]);
}

#[test]
fn duplicate_participant_is_refused() {
    given(&[Event::RoomOpened, joined("p1", "alice")])
        .when(join("p1", "alice"))
        .then_error(DomainError::DuplicateParticipant("p1".into()));
}

#[test]
fn join_of_closed_room_opens_it_again() {
    let state = given(&[Event::RoomOpened, Event::RoomClosed])
        .when(join("p1", "alice"))
        .then(&[Event::RoomOpened, joined("p1", "alice")]);
    assert!(state.is_open());
}

#[test]
fn join_records_the_resume_hash() {
    given(&[])
        .when(Command::Join {
            participant_id: "p1".into(),
            identity: "alice".into(),
            name: String::new(),
            resume_hash: Some("ab12".into()),
        })
        .then(&[
            Event::RoomOpened,
            Event::ParticipantJoined {
                participant_id: "p1".into(),
                identity: "alice".into(),
                name: String::new(),
                resume_hash: Some("ab12".into()),
            },
        ]);
}

#[test]
fn empty_identity_is_refused() {
    given(&[])
        .when(join("p1", ""))
        .then_error(DomainError::Invalid {
            field: "identity",
            reason: "empty".into(),
        });
}

#[test]
fn publish_by_absent_participant_is_refused() {
    given(&[Event::RoomOpened])
        .when(Command::Publish {
            participant_id: "ghost".into(),
            track_id: "t1".into(),
            kind: TrackKind::Audio,
            layers: vec![],
            codec: "opus".into(),
        })
        .then_error(DomainError::UnknownParticipant("ghost".into()));
}

#[test]
fn publish_with_duplicate_rids_is_refused() {
    given(&[Event::RoomOpened, joined("p1", "alice")])
        .when(Command::Publish {
            participant_id: "p1".into(),
            track_id: "t1".into(),
            kind: TrackKind::Video,
            layers: vec!["q".into(), "q".into()],
            codec: "VP8".into(),
        })
        .then_error(DomainError::Invalid {
            field: "layers",
            reason: "duplicate rid q".into(),
        });
}

#[test]
fn publish_subscribe_and_pick_layer() {
    let state = given(&[
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
    ])
    .when(Command::Publish {
        participant_id: "p1".into(),
        track_id: "t1".into(),
        kind: TrackKind::Video,
        layers: vec!["q".into(), "h".into(), "f".into()],
        codec: "VP8".into(),
    })
    .then(&[published("t1", "p1")]);
    let state = Scenario { state }
        .when(Command::Subscribe {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        })
        .then(&[Event::Subscribed {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        }]);
    let state = Scenario { state }
        .when(Command::SetPreferredLayer {
            participant_id: "p2".into(),
            track_id: "t1".into(),
            layer: "h".into(),
        })
        .then(&[Event::PreferredLayerSet {
            participant_id: "p2".into(),
            track_id: "t1".into(),
            layer: "h".into(),
        }]);
    assert_eq!(
        state.participants["p2"].subscriptions["t1"].as_deref(),
        Some("h")
    );
    // Setting the same layer again changes nothing.
    Scenario { state }
        .when(Command::SetPreferredLayer {
            participant_id: "p2".into(),
            track_id: "t1".into(),
            layer: "h".into(),
        })
        .then(&[]);
}

#[test]
fn unknown_layer_is_refused() {
    given(&[
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
        published("t1", "p1"),
        Event::Subscribed {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        },
    ])
    .when(Command::SetPreferredLayer {
        participant_id: "p2".into(),
        track_id: "t1".into(),
        layer: "x".into(),
    })
    .then_error(DomainError::UnknownLayer {
        track_id: "t1".into(),
        layer: "x".into(),
    });
}

#[test]
fn unsubscribe_of_unknown_track_is_refused() {
    given(&[Event::RoomOpened, joined("p2", "bob")])
        .when(Command::Unsubscribe {
            participant_id: "p2".into(),
            track_id: "nope".into(),
        })
        .then_error(DomainError::UnknownTrack("nope".into()));
}

#[test]
fn unsubscribe_without_subscription_is_refused() {
    given(&[
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
        published("t1", "p1"),
    ])
    .when(Command::Unsubscribe {
        participant_id: "p2".into(),
        track_id: "t1".into(),
    })
    .then_error(DomainError::NotSubscribed {
        participant_id: "p2".into(),
        track_id: "t1".into(),
    });
}

#[test]
fn double_subscribe_is_refused() {
    given(&[
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
        published("t1", "p1"),
        Event::Subscribed {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        },
    ])
    .when(Command::Subscribe {
        participant_id: "p2".into(),
        track_id: "t1".into(),
    })
    .then_error(DomainError::AlreadySubscribed {
        participant_id: "p2".into(),
        track_id: "t1".into(),
    });
}

#[test]
fn only_the_owner_mutes_and_muting_twice_is_a_no_op() {
    let base = [
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
        published("t1", "p1"),
    ];
    given(&base)
        .when(Command::SetMuted {
            participant_id: "p2".into(),
            track_id: "t1".into(),
            muted: true,
        })
        .then_error(DomainError::NotTrackOwner {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        });
    let state = given(&base)
        .when(Command::SetMuted {
            participant_id: "p1".into(),
            track_id: "t1".into(),
            muted: true,
        })
        .then(&[Event::TrackMuted {
            track_id: "t1".into(),
        }]);
    assert!(state.tracks["t1"].muted);
    Scenario { state }
        .when(Command::SetMuted {
            participant_id: "p1".into(),
            track_id: "t1".into(),
            muted: true,
        })
        .then(&[]);
}

#[test]
fn leave_unpublishes_tracks_and_drops_subscriptions_to_them() {
    let state = given(&[
        Event::RoomOpened,
        joined("p1", "alice"),
        joined("p2", "bob"),
        published("t1", "p1"),
        Event::Subscribed {
            participant_id: "p2".into(),
            track_id: "t1".into(),
        },
    ])
    .when(Command::Leave {
        participant_id: "p1".into(),
        reason: LeaveReason::Timeout,
    })
    .then(&[
        Event::TrackUnpublished {
            track_id: "t1".into(),
            participant_id: "p1".into(),
        },
        Event::ParticipantLeft {
            participant_id: "p1".into(),
            reason: LeaveReason::Timeout,
        },
    ]);
    assert!(state.tracks.is_empty());
    assert!(state.participants["p2"].subscriptions.is_empty());
    assert!(!state.participants.contains_key("p1"));
}

#[test]
fn leave_of_absent_participant_is_refused() {
    given(&[Event::RoomOpened])
        .when(Command::Leave {
            participant_id: "p9".into(),
            reason: LeaveReason::Left,
        })
        .then_error(DomainError::UnknownParticipant("p9".into()));
}

#[test]
fn placement_epoch_increases() {
    let state = given(&[
        Event::RoomOpened,
        Event::RoomPlaced {
            node: "n1".into(),
            epoch: 1,
        },
    ])
    .when(Command::Place { node: "n2".into() })
    .then(&[Event::RoomPlaced {
        node: "n2".into(),
        epoch: 2,
    }]);
    assert_eq!(state.node.as_deref(), Some("n2"));
    assert_eq!(state.epoch, 2);
}

#[test]
fn close_makes_everyone_leave() {
    let state = given(&[Event::RoomOpened, joined("p1", "alice")])
        .when(Command::Close)
        .then(&[
            Event::ParticipantLeft {
                participant_id: "p1".into(),
                reason: LeaveReason::RoomClosed,
            },
            Event::RoomClosed,
        ]);
    assert!(state.closed && state.participants.is_empty());
}

#[test]
fn events_serialize_as_flat_tagged_json() {
    let json = joined("p1", "alice").to_json();
    assert_eq!(
        json,
        r#"{"type":"ParticipantJoined","participant_id":"p1","identity":"alice","name":"ALICE"}"#
    );
    let state_json = serde_json::to_string(&given(&[Event::RoomOpened]).state).expect("json");
    let back: RoomState = serde_json::from_str(&state_json).expect("round trip");
    assert!(back.opened);
}
