//! Decisions: a command against the current [`RoomState`] yields the events to append,
//! or a [`DomainError`] saying why the command is refused.
//!
//! Decisions are pure; the caller appends the events with the state's version as the
//! expected version, so a concurrent change makes the append conflict instead of
//! silently deciding on stale state.

use crate::event::{Event, LeaveReason, TrackKind};
use crate::room::RoomState;

/// Most simulcast layers a track may announce.
pub const MAX_LAYERS: usize = 3;
/// Longest id, identity, name, codec or layer accepted, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

/// A request to change a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the room explicitly.
    Open,
    /// Close the room; everyone still in it leaves.
    Close,
    /// Place the room on a node (the epoch is the previous one plus one).
    Place {
        /// Node to host the room.
        node: String,
    },
    /// A participant joins (the room opens on first join).
    Join {
        /// Session id in the room.
        participant_id: String,
        /// Authenticated identity.
        identity: String,
        /// Display name.
        name: String,
        /// SHA-256 (hex) of the participant's resume token, recorded so any node of
        /// the region can take the resume after a failover.
        resume_hash: Option<String>,
    },
    /// A participant leaves; its tracks are unpublished first.
    Leave {
        /// Session id in the room.
        participant_id: String,
        /// Why.
        reason: LeaveReason,
    },
    /// A participant publishes a track.
    Publish {
        /// Publisher.
        participant_id: String,
        /// New track id.
        track_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// Simulcast rids (at most [`MAX_LAYERS`], distinct).
        layers: Vec<String>,
        /// Codec name.
        codec: String,
    },
    /// The owner unpublishes a track.
    Unpublish {
        /// Owner.
        participant_id: String,
        /// Track.
        track_id: String,
    },
    /// A participant subscribes to a track.
    Subscribe {
        /// Subscriber.
        participant_id: String,
        /// Track.
        track_id: String,
    },
    /// A participant unsubscribes from a track.
    Unsubscribe {
        /// Subscriber.
        participant_id: String,
        /// Track.
        track_id: String,
    },
    /// A subscriber sets its preferred layer for a track.
    SetPreferredLayer {
        /// Subscriber.
        participant_id: String,
        /// Track.
        track_id: String,
        /// One of the track's layers.
        layer: String,
    },
    /// The owner mutes or unmutes a track.
    SetMuted {
        /// Owner.
        participant_id: String,
        /// Track.
        track_id: String,
        /// Muted or not.
        muted: bool,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The room is closed.
    #[error("room is closed")]
    RoomClosed,
    /// The room is already open.
    #[error("room is already open")]
    AlreadyOpen,
    /// A participant with this id is already in the room.
    #[error("participant {0} is already in the room")]
    DuplicateParticipant(String),
    /// No participant with this id is in the room.
    #[error("participant {0} is not in the room")]
    UnknownParticipant(String),
    /// A track with this id is already published.
    #[error("track {0} is already published")]
    DuplicateTrack(String),
    /// No track with this id is published.
    #[error("track {0} is not published")]
    UnknownTrack(String),
    /// The participant does not own the track.
    #[error("participant {participant_id} does not own track {track_id}")]
    NotTrackOwner {
        /// Who asked.
        participant_id: String,
        /// The track.
        track_id: String,
    },
    /// The participant already subscribes to the track.
    #[error("participant {participant_id} already subscribes to {track_id}")]
    AlreadySubscribed {
        /// Subscriber.
        participant_id: String,
        /// Track.
        track_id: String,
    },
    /// The participant does not subscribe to the track.
    #[error("participant {participant_id} does not subscribe to {track_id}")]
    NotSubscribed {
        /// Subscriber.
        participant_id: String,
        /// Track.
        track_id: String,
    },
    /// The layer is not one of the track's simulcast layers.
    #[error("track {track_id} has no layer {layer}")]
    UnknownLayer {
        /// Track.
        track_id: String,
        /// Requested layer.
        layer: String,
    },
    /// A field is empty, too long, or a list is invalid.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn check(field: &'static str, value: &str) -> Result<(), DomainError> {
    if value.is_empty() {
        return Err(DomainError::Invalid {
            field,
            reason: "empty".into(),
        });
    }
    if value.len() > MAX_FIELD_LEN {
        return Err(DomainError::Invalid {
            field,
            reason: format!("longer than {MAX_FIELD_LEN} bytes"),
        });
    }
    Ok(())
}

fn participant<'a>(
    state: &'a RoomState,
    participant_id: &str,
) -> Result<&'a crate::room::Participant, DomainError> {
    state
        .participants
        .get(participant_id)
        .ok_or_else(|| DomainError::UnknownParticipant(participant_id.to_owned()))
}

fn open(state: &RoomState) -> Result<(), DomainError> {
    if state.closed {
        Err(DomainError::RoomClosed)
    } else {
        Ok(())
    }
}

/// Decide which events a command produces against `state`.
///
/// An empty vector means the command changes nothing (e.g. muting a muted track).
pub fn decide(state: &RoomState, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Open => {
            open(state)?;
            if state.opened {
                return Err(DomainError::AlreadyOpen);
            }
            Ok(vec![Event::RoomOpened])
        }
        Command::Close => {
            open(state)?;
            let mut out: Vec<Event> = state
                .participants
                .keys()
                .map(|p| Event::ParticipantLeft {
                    participant_id: p.clone(),
                    reason: LeaveReason::RoomClosed,
                })
                .collect();
            out.push(Event::RoomClosed);
            Ok(out)
        }
        Command::Place { node } => {
            check("node", node)?;
            open(state)?;
            Ok(vec![Event::RoomPlaced {
                node: node.clone(),
                epoch: state.epoch + 1,
            }])
        }
        Command::Join {
            participant_id,
            identity,
            name,
            resume_hash,
        } => {
            check("participant_id", participant_id)?;
            check("identity", identity)?;
            if name.len() > MAX_FIELD_LEN {
                return Err(DomainError::Invalid {
                    field: "name",
                    reason: format!("longer than {MAX_FIELD_LEN} bytes"),
                });
            }
            if let Some(h) = resume_hash {
                check("resume_hash", h)?;
            }
            if state.participants.contains_key(participant_id) {
                return Err(DomainError::DuplicateParticipant(participant_id.clone()));
            }
            let mut out = Vec::with_capacity(2);
            // A room opens on its first join, and a closed room opens again.
            if !state.opened || state.closed {
                out.push(Event::RoomOpened);
            }
            out.push(Event::ParticipantJoined {
                participant_id: participant_id.clone(),
                identity: identity.clone(),
                name: name.clone(),
                resume_hash: resume_hash.clone(),
            });
            Ok(out)
        }
        Command::Leave {
            participant_id,
            reason,
        } => {
            participant(state, participant_id)?;
            let mut out: Vec<Event> = state
                .tracks
                .iter()
                .filter(|(_, t)| &t.participant_id == participant_id)
                .map(|(id, _)| Event::TrackUnpublished {
                    track_id: id.clone(),
                    participant_id: participant_id.clone(),
                })
                .collect();
            out.push(Event::ParticipantLeft {
                participant_id: participant_id.clone(),
                reason: reason.clone(),
            });
            Ok(out)
        }
        Command::Publish {
            participant_id,
            track_id,
            kind,
            layers,
            codec,
        } => {
            check("track_id", track_id)?;
            check("codec", codec)?;
            open(state)?;
            participant(state, participant_id)?;
            if state.tracks.contains_key(track_id) {
                return Err(DomainError::DuplicateTrack(track_id.clone()));
            }
            if layers.len() > MAX_LAYERS {
                return Err(DomainError::Invalid {
                    field: "layers",
                    reason: format!("more than {MAX_LAYERS}"),
                });
            }
            for (i, l) in layers.iter().enumerate() {
                check("layer", l)?;
                if layers[..i].contains(l) {
                    return Err(DomainError::Invalid {
                        field: "layers",
                        reason: format!("duplicate rid {l}"),
                    });
                }
            }
            Ok(vec![Event::TrackPublished {
                track_id: track_id.clone(),
                participant_id: participant_id.clone(),
                kind: *kind,
                layers: layers.clone(),
                codec: codec.clone(),
            }])
        }
        Command::Unpublish {
            participant_id,
            track_id,
        } => {
            owned_track(state, participant_id, track_id)?;
            Ok(vec![Event::TrackUnpublished {
                track_id: track_id.clone(),
                participant_id: participant_id.clone(),
            }])
        }
        Command::Subscribe {
            participant_id,
            track_id,
        } => {
            let p = participant(state, participant_id)?;
            if !state.tracks.contains_key(track_id) {
                return Err(DomainError::UnknownTrack(track_id.clone()));
            }
            if p.subscriptions.contains_key(track_id) {
                return Err(DomainError::AlreadySubscribed {
                    participant_id: participant_id.clone(),
                    track_id: track_id.clone(),
                });
            }
            Ok(vec![Event::Subscribed {
                participant_id: participant_id.clone(),
                track_id: track_id.clone(),
            }])
        }
        Command::Unsubscribe {
            participant_id,
            track_id,
        } => {
            let p = participant(state, participant_id)?;
            if !state.tracks.contains_key(track_id) {
                return Err(DomainError::UnknownTrack(track_id.clone()));
            }
            if !p.subscriptions.contains_key(track_id) {
                return Err(DomainError::NotSubscribed {
                    participant_id: participant_id.clone(),
                    track_id: track_id.clone(),
                });
            }
            Ok(vec![Event::Unsubscribed {
                participant_id: participant_id.clone(),
                track_id: track_id.clone(),
            }])
        }
        Command::SetPreferredLayer {
            participant_id,
            track_id,
            layer,
        } => {
            let p = participant(state, participant_id)?;
            let track = state
                .tracks
                .get(track_id)
                .ok_or_else(|| DomainError::UnknownTrack(track_id.clone()))?;
            let Some(current) = p.subscriptions.get(track_id) else {
                return Err(DomainError::NotSubscribed {
                    participant_id: participant_id.clone(),
                    track_id: track_id.clone(),
                });
            };
            if !track.layers.contains(layer) {
                return Err(DomainError::UnknownLayer {
                    track_id: track_id.clone(),
                    layer: layer.clone(),
                });
            }
            if current.as_deref() == Some(layer.as_str()) {
                return Ok(Vec::new());
            }
            Ok(vec![Event::PreferredLayerSet {
                participant_id: participant_id.clone(),
                track_id: track_id.clone(),
                layer: layer.clone(),
            }])
        }
        Command::SetMuted {
            participant_id,
            track_id,
            muted,
        } => {
            let track = owned_track(state, participant_id, track_id)?;
            if track.muted == *muted {
                return Ok(Vec::new());
            }
            let track_id = track_id.clone();
            Ok(vec![if *muted {
                Event::TrackMuted { track_id }
            } else {
                Event::TrackUnmuted { track_id }
            }])
        }
    }
}

fn owned_track<'a>(
    state: &'a RoomState,
    participant_id: &str,
    track_id: &str,
) -> Result<&'a crate::room::Track, DomainError> {
    participant(state, participant_id)?;
    let track = state
        .tracks
        .get(track_id)
        .ok_or_else(|| DomainError::UnknownTrack(track_id.to_owned()))?;
    if track.participant_id != participant_id {
        return Err(DomainError::NotTrackOwner {
            participant_id: participant_id.to_owned(),
            track_id: track_id.to_owned(),
        });
    }
    Ok(track)
}
