//! The event vocabulary and the recorded-event envelope.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Schema version written with every new event. Older versions are upcast on read
/// (see [`crate::upcast`]).
pub const CURRENT_SCHEMA_VERSION: u32 = 2;

/// The stream name of a room: `room:<name>`.
pub fn room_stream(room: &str) -> String {
    format!("room:{room}")
}

/// Separates a room's name from the node that placed one of its further parts.
pub const PART_SEPARATOR: char = '~';

/// The name of the part of `room` that `node` placed (its stream is
/// `room:<room>~<node>`). A room's first part has the room's own name.
pub fn part_name(room: &str, node: &str) -> String {
    format!("{room}{PART_SEPARATOR}{node}")
}

/// The room a part belongs to: the name before [`PART_SEPARATOR`].
pub fn room_of_part(part: &str) -> &str {
    part.split_once(PART_SEPARATOR)
        .map_or(part, |(room, _)| room)
}

/// The stream name of a media node: `node:<id>`.
pub fn node_stream(node: &str) -> String {
    format!("node:{node}")
}

/// Kind of media a track carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    /// An audio track.
    Audio,
    /// A video track.
    Video,
}

/// Why a participant left a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The participant asked to leave.
    Left,
    /// The participant's connection timed out and was not resumed.
    Timeout,
    /// An admin removed the participant.
    Kicked,
    /// The room was closed while the participant was in it.
    RoomClosed,
    /// The participant moved to another node (drain or failover) and will rejoin there.
    Migrated,
    /// The same identity joined the room again; the newer session replaced this one.
    Replaced,
    /// Any other reason, in words.
    Other(String),
}

/// A change of room or node state, named in the past tense.
///
/// Serialized as a flat JSON object tagged by `"type"`, e.g.
/// `{"type":"ParticipantJoined","participant_id":"p1","identity":"alice","name":"Alice"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// The room was opened (first join or an explicit create).
    RoomOpened,
    /// The room was closed; no one can join it any more.
    RoomClosed,
    /// The room was placed on a media node; `epoch` increases with every placement so a
    /// node that lost the room can tell its ownership is stale.
    RoomPlaced {
        /// The node now hosting the room.
        node: String,
        /// Placement epoch, starting at 1.
        epoch: u64,
    },
    /// A participant joined the room.
    ParticipantJoined {
        /// Id of the participant's session in this room.
        participant_id: String,
        /// Authenticated identity (the token's subject).
        identity: String,
        /// Display name.
        name: String,
        /// SHA-256 (hex) of the participant's resume token, so any node of the region
        /// can take a resume after a failover; the token itself is never stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_hash: Option<String>,
    },
    /// A participant left the room.
    ParticipantLeft {
        /// Id of the participant's session in this room.
        participant_id: String,
        /// Why they left.
        reason: LeaveReason,
    },
    /// A participant published a track.
    TrackPublished {
        /// Id of the track.
        track_id: String,
        /// The publishing participant.
        participant_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// Simulcast layers by RTP stream id (rid), empty when not simulcast.
        layers: Vec<String>,
        /// Codec name, e.g. `VP8`, `H264`, `opus`.
        codec: String,
    },
    /// A track was unpublished by its owner (or because its owner left).
    TrackUnpublished {
        /// Id of the track.
        track_id: String,
        /// The participant that had published it.
        participant_id: String,
    },
    /// A participant subscribed to a track.
    Subscribed {
        /// The subscribing participant.
        participant_id: String,
        /// The track subscribed to.
        track_id: String,
    },
    /// A participant unsubscribed from a track.
    Unsubscribed {
        /// The subscribing participant.
        participant_id: String,
        /// The track.
        track_id: String,
    },
    /// A subscriber chose a preferred simulcast layer for a track.
    PreferredLayerSet {
        /// The subscribing participant.
        participant_id: String,
        /// The track.
        track_id: String,
        /// The preferred layer (a rid of the track).
        layer: String,
    },
    /// A publisher muted a track.
    TrackMuted {
        /// The track.
        track_id: String,
    },
    /// A publisher unmuted a track.
    TrackUnmuted {
        /// The track.
        track_id: String,
    },
    /// A node acquired its liveness lease.
    NodeLeaseAcquired {
        /// The node.
        node: String,
        /// When the lease runs out unless renewed.
        expires_at: DateTime<Utc>,
    },
    /// A node renewed its liveness lease.
    NodeLeaseRenewed {
        /// The node.
        node: String,
        /// When the renewed lease runs out.
        expires_at: DateTime<Utc>,
    },
    /// A node's lease ran out; its rooms may be taken over.
    NodeLeaseExpired {
        /// The node.
        node: String,
        /// When the lease had run out.
        expires_at: DateTime<Utc>,
    },
    /// A new part of a room was placed (recorded first in the part's own stream,
    /// `room:<room>~<node>`, before its `RoomPlaced`): the room's first part is full,
    /// so this node hosts some of its participants and relays tracks with the others.
    RoomPartPlaced {
        /// The room the part belongs to (the name in clients' tokens).
        room: String,
        /// The part's name (its stream is `room:<part>`).
        part: String,
        /// The node that placed it.
        node: String,
    },
    /// This node (the stream's node) started relaying the tracks of one of its room
    /// parts to another node, over the relay link between them.
    RelayLinked {
        /// The node receiving the tracks.
        peer: String,
        /// The room part whose tracks are relayed.
        part: String,
    },
    /// This node stopped relaying to `peer` (the link went down or was closed).
    RelayUnlinked {
        /// The node that was receiving.
        peer: String,
        /// Why, in words (`down`, `peer_gone`, …).
        reason: String,
    },
    /// A room part's tracks started crossing a region boundary over a relay link:
    /// recorded by both ends (on each one's `node:<id>` stream, in its own region's
    /// log), so an auditor of either region sees where its users' media went.
    RegionRelayLinked {
        /// Who sends what to whom.
        #[serde(flatten)]
        link: RegionLink,
    },
    /// The tracks of a part stopped crossing (recorded by both ends, as
    /// [`Event::RegionRelayLinked`]).
    RegionRelayUnlinked {
        /// The link that ended.
        #[serde(flatten)]
        link: RegionLink,
        /// Why, in words (`left`: the part is no longer relayed, `down`: the link
        /// went down, `peer_gone`: the other region stopped naming the node).
        reason: String,
    },
}

/// A relay link of one room part across a region boundary (fields of
/// [`Event::RegionRelayLinked`] and [`Event::RegionRelayUnlinked`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLink {
    /// The room (the name in clients' tokens).
    pub room: String,
    /// The sending part (its stream in the sending region's log).
    pub part: String,
    /// The sending region.
    pub from_region: String,
    /// The node publishing the tracks.
    pub from_node: String,
    /// The receiving region.
    pub to_region: String,
    /// The node receiving the tracks.
    pub to_node: String,
}

impl Event {
    /// The event's type name, as stored in the `event_type` column and the `"type"` tag.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::RoomOpened => "RoomOpened",
            Event::RoomClosed => "RoomClosed",
            Event::RoomPlaced { .. } => "RoomPlaced",
            Event::ParticipantJoined { .. } => "ParticipantJoined",
            Event::ParticipantLeft { .. } => "ParticipantLeft",
            Event::TrackPublished { .. } => "TrackPublished",
            Event::TrackUnpublished { .. } => "TrackUnpublished",
            Event::Subscribed { .. } => "Subscribed",
            Event::Unsubscribed { .. } => "Unsubscribed",
            Event::PreferredLayerSet { .. } => "PreferredLayerSet",
            Event::TrackMuted { .. } => "TrackMuted",
            Event::TrackUnmuted { .. } => "TrackUnmuted",
            Event::NodeLeaseAcquired { .. } => "NodeLeaseAcquired",
            Event::NodeLeaseRenewed { .. } => "NodeLeaseRenewed",
            Event::NodeLeaseExpired { .. } => "NodeLeaseExpired",
            Event::RoomPartPlaced { .. } => "RoomPartPlaced",
            Event::RelayLinked { .. } => "RelayLinked",
            Event::RelayUnlinked { .. } => "RelayUnlinked",
            Event::RegionRelayLinked { .. } => "RegionRelayLinked",
            Event::RegionRelayUnlinked { .. } => "RegionRelayUnlinked",
        }
    }

    /// The participant the event is about, if any.
    pub fn participant_id(&self) -> Option<&str> {
        match self {
            Event::ParticipantJoined { participant_id, .. }
            | Event::ParticipantLeft { participant_id, .. }
            | Event::TrackPublished { participant_id, .. }
            | Event::TrackUnpublished { participant_id, .. }
            | Event::Subscribed { participant_id, .. }
            | Event::Unsubscribed { participant_id, .. }
            | Event::PreferredLayerSet { participant_id, .. } => Some(participant_id),
            _ => None,
        }
    }

    /// The JSON payload as stored (and hashed).
    pub fn to_json(&self) -> String {
        // Serializing this enum cannot fail: every field is a string, number, list or
        // timestamp, and there are no maps with non-string keys.
        serde_json::to_string(self).expect("Event serializes to JSON")
    }
}

/// An event as recorded in the region log: the envelope around an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The stream, e.g. `room:<name>` or `node:<id>`.
    pub stream: String,
    /// Sequence within the stream, starting at 1, without gaps.
    pub sequence: u64,
    /// Region-wide position, starting at 1, without gaps; the order of the hash chain.
    pub position: u64,
    /// When the store recorded the event (microsecond precision).
    pub recorded_at: DateTime<Utc>,
    /// Who caused it: a participant identity, a node id or an admin.
    pub actor: String,
    /// Schema version the payload was written with.
    pub schema_version: u32,
    /// The event itself, upcast to the current schema.
    pub event: Event,
    /// This record's hash (hex SHA-256), see [`crate::chain`].
    pub hash: String,
    /// The previous record's hash in the region log (hex), or [`crate::GENESIS_HASH`].
    pub prev_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_links_are_flat_json_and_round_trip() {
        let link = RegionLink {
            room: "x3".into(),
            part: "x3".into(),
            from_region: "eu".into(),
            from_node: "eu-2".into(),
            to_region: "us".into(),
            to_node: "us-3".into(),
        };
        let event = Event::RegionRelayUnlinked {
            link,
            reason: "peer_gone".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "RegionRelayUnlinked");
        assert_eq!(json["from_region"], "eu");
        assert_eq!(json["to_node"], "us-3");
        assert_eq!(json["reason"], "peer_gone");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.event_type(), "RegionRelayUnlinked");
    }
}
