//! Room state as a fold over a room stream, and node lease state over a node stream.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Event, RecordedEvent, TrackKind};

/// A participant present in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// Authenticated identity.
    pub identity: String,
    /// Display name.
    pub name: String,
    /// Tracks this participant subscribes to, with the preferred layer if one was set.
    pub subscriptions: BTreeMap<String, Option<String>>,
    /// SHA-256 (hex) of the participant's resume token, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_hash: Option<String>,
}

/// A published track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// The publishing participant.
    pub participant_id: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// Simulcast layers (rids), empty when not simulcast.
    pub layers: Vec<String>,
    /// Codec name.
    pub codec: String,
    /// Whether the publisher muted it.
    pub muted: bool,
}

/// The state of one room, rebuilt by folding its stream with [`RoomState::apply`].
///
/// Maps are ordered so two states built from the same events compare and serialize
/// identically (snapshots rely on it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomState {
    /// Sequence of the last applied event (0 for a room never seen).
    pub version: u64,
    /// Whether the room was opened.
    pub opened: bool,
    /// Whether the room was closed.
    pub closed: bool,
    /// The node hosting the room, if placed.
    pub node: Option<String>,
    /// The placement epoch (0 when never placed).
    pub epoch: u64,
    /// Participants present, by participant id.
    pub participants: BTreeMap<String, Participant>,
    /// Published tracks, by track id.
    pub tracks: BTreeMap<String, Track>,
}

impl RoomState {
    /// Build a state by folding events in order.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Self {
        let mut s = Self::default();
        for e in events {
            s.apply(e);
        }
        s
    }

    /// Apply a recorded event: the fold step, also advancing [`RoomState::version`].
    pub fn apply(&mut self, recorded: &RecordedEvent) {
        self.apply_event(&recorded.event);
        self.version = recorded.sequence;
    }

    /// Apply a bare event (used by decisions and tests; the version is bumped by one).
    ///
    /// `apply` never fails: decisions validated the event before it was stored, and a
    /// replay must reproduce what happened even if rules change later.
    pub fn apply_event(&mut self, event: &Event) {
        self.version += 1;
        match event {
            Event::RoomOpened => {
                self.opened = true;
                self.closed = false;
            }
            Event::RoomClosed => {
                self.closed = true;
                self.participants.clear();
                self.tracks.clear();
            }
            Event::RoomPlaced { node, epoch } => {
                self.node = Some(node.clone());
                self.epoch = *epoch;
            }
            Event::ParticipantJoined {
                participant_id,
                identity,
                name,
                resume_hash,
            } => {
                self.participants.insert(
                    participant_id.clone(),
                    Participant {
                        identity: identity.clone(),
                        name: name.clone(),
                        subscriptions: BTreeMap::new(),
                        resume_hash: resume_hash.clone(),
                    },
                );
            }
            Event::ParticipantLeft { participant_id, .. } => {
                self.participants.remove(participant_id);
                let gone: Vec<String> = self
                    .tracks
                    .iter()
                    .filter(|(_, t)| &t.participant_id == participant_id)
                    .map(|(id, _)| id.clone())
                    .collect();
                for t in gone {
                    self.remove_track(&t);
                }
            }
            Event::TrackPublished {
                track_id,
                participant_id,
                kind,
                layers,
                codec,
            } => {
                self.tracks.insert(
                    track_id.clone(),
                    Track {
                        participant_id: participant_id.clone(),
                        kind: *kind,
                        layers: layers.clone(),
                        codec: codec.clone(),
                        muted: false,
                    },
                );
            }
            Event::TrackUnpublished { track_id, .. } => self.remove_track(track_id),
            Event::Subscribed {
                participant_id,
                track_id,
            } => {
                if let Some(p) = self.participants.get_mut(participant_id) {
                    p.subscriptions.entry(track_id.clone()).or_insert(None);
                }
            }
            Event::Unsubscribed {
                participant_id,
                track_id,
            } => {
                if let Some(p) = self.participants.get_mut(participant_id) {
                    p.subscriptions.remove(track_id);
                }
            }
            Event::PreferredLayerSet {
                participant_id,
                track_id,
                layer,
            } => {
                if let Some(sub) = self
                    .participants
                    .get_mut(participant_id)
                    .and_then(|p| p.subscriptions.get_mut(track_id))
                {
                    *sub = Some(layer.clone());
                }
            }
            Event::TrackMuted { track_id } => {
                if let Some(t) = self.tracks.get_mut(track_id) {
                    t.muted = true;
                }
            }
            Event::TrackUnmuted { track_id } => {
                if let Some(t) = self.tracks.get_mut(track_id) {
                    t.muted = false;
                }
            }
            Event::NodeLeaseAcquired { .. }
            | Event::NodeLeaseRenewed { .. }
            | Event::NodeLeaseExpired { .. }
            | Event::RoomPartPlaced { .. }
            | Event::RelayLinked { .. }
            | Event::RelayUnlinked { .. }
            | Event::RegionRelayLinked { .. }
            | Event::RegionRelayUnlinked { .. } => {}
        }
    }

    fn remove_track(&mut self, track_id: &str) {
        self.tracks.remove(track_id);
        for p in self.participants.values_mut() {
            p.subscriptions.remove(track_id);
        }
    }

    /// Whether participants can join now (never opened rooms open on first join).
    pub fn is_open(&self) -> bool {
        !self.closed
    }
}

/// The liveness lease of one node, folded from its `node:<id>` stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLeaseState {
    /// Sequence of the last applied event.
    pub version: u64,
    /// When the current lease runs out, if the node holds one.
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the last lease was declared expired.
    pub expired: bool,
}

impl NodeLeaseState {
    /// Apply a recorded node event.
    pub fn apply(&mut self, recorded: &RecordedEvent) {
        match &recorded.event {
            Event::NodeLeaseAcquired { expires_at, .. }
            | Event::NodeLeaseRenewed { expires_at, .. } => {
                self.expires_at = Some(*expires_at);
                self.expired = false;
            }
            Event::NodeLeaseExpired { .. } => {
                self.expires_at = None;
                self.expired = true;
            }
            _ => {}
        }
        self.version = recorded.sequence;
    }

    /// Whether the node holds a lease valid at `now` (time is passed in).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        !self.expired && self.expires_at.is_some_and(|t| t > now)
    }
}
