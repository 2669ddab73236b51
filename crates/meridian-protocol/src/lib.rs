//! Meridian's signaling protocol: the messages a client and a node exchange.
//!
//! One protocol, carried unchanged by WebTransport and WebSocket: every message is one
//! JSON object with a `"type"` field, framed by the transport (a WebSocket text message,
//! or a length-prefixed frame on a WebTransport stream). The full reference, with a join
//! sequence diagram and every error code, is `docs/protocol.md`.
//!
//! This crate is pure: no I/O, no runtime. It encodes, decodes and bounds messages.
#![deny(missing_docs)]

pub mod region;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks; a `join` with another major version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest encoded message accepted from a client, in bytes (SDP offers dominate).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest number of tracks one `offer` may announce.
pub const MAX_TRACKS_PER_MESSAGE: usize = 16;

/// Largest number of track ids one `subscribe` or `unsubscribe` may name.
pub const MAX_IDS_PER_MESSAGE: usize = 256;

/// Messages a client sends to a node.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on a connection: authenticate and enter the room named by the token.
    Join {
        /// Access token (JWT) naming identity, room, grants and region.
        token: String,
        /// Resume token from an earlier `joined`, to take back a session after a drop.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
        /// Protocol version the client speaks.
        #[serde(default = "default_version")]
        version: u32,
        /// Subscribe to every track in the room without asking (default true).
        #[serde(default = "default_true")]
        auto_subscribe: bool,
        /// Free-form description of the client, for logs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// SDP offer for the publisher connection, announcing the tracks it carries.
    Offer {
        /// The SDP offer.
        sdp: String,
        /// One entry per sending media section of the offer.
        #[serde(default)]
        tracks: Vec<TrackAnnouncement>,
    },
    /// SDP answer to the node's offer on the subscriber connection.
    Answer {
        /// The SDP answer.
        sdp: String,
    },
    /// Stop publishing a track.
    Unpublish {
        /// The track to stop.
        track_id: String,
    },
    /// Subscribe to tracks.
    Subscribe {
        /// Tracks to receive.
        track_ids: Vec<String>,
    },
    /// Stop receiving tracks.
    Unsubscribe {
        /// Tracks to stop receiving.
        track_ids: Vec<String>,
    },
    /// Cap the simulcast layer received for a track (the node may send less).
    SetLayer {
        /// The subscribed track.
        track_id: String,
        /// Highest layer wanted.
        max_layer: Layer,
    },
    /// Mute or unmute one of the client's own tracks.
    Mute {
        /// The published track.
        track_id: String,
        /// New state.
        muted: bool,
    },
    /// Liveness probe; answered by `pong` with the same id.
    Ping {
        /// Echoed back.
        #[cfg_attr(feature = "ts", ts(type = "number"))]
        id: u64,
    },
    /// The client's media path died while signaling stayed up: restart ICE on the
    /// subscriber connection. The node sends an `offer` with new ICE credentials (at
    /// once, or after the outstanding one is answered); tracks, subscriptions and ids
    /// stay. The client restarts its publisher connection itself, with an `offer` that
    /// carries new credentials.
    IceRestart,
    /// Leave the room now; the session ends and cannot be resumed.
    Leave,
    /// A newer access token for the same identity and room: the session, which ends
    /// when its token expires, lives until the new token's expiry. Answered by
    /// `refreshed`, or `error{unauthorized}` (and the session ends) when refused.
    Refresh {
        /// The new access token (JWT).
        token: String,
    },
}

/// Messages a node sends to a client.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The join succeeded.
    Joined {
        /// This client's participant id in the room.
        participant_id: String,
        /// Room name.
        room: String,
        /// Everyone else in the room with their tracks.
        participants: Vec<ParticipantInfo>,
        /// Token to present in a later `join` to resume this session.
        resume: String,
        /// Seconds a dropped session is kept for resumption.
        #[cfg_attr(feature = "ts", ts(type = "number"))]
        resume_grace_secs: u64,
        /// Protocol version of the node.
        version: u32,
        /// True when this node rebuilt the participant from the room's event log
        /// (failover or drain): the client must create new peer connections,
        /// re-publish with its earlier track ids and answer the node's new offer.
        #[serde(default)]
        restored: bool,
    },
    /// SDP answer for the publisher connection.
    Answer {
        /// The SDP answer.
        sdp: String,
        /// Track ids assigned to the announced media sections, by mid.
        tracks: Vec<TrackInfo>,
    },
    /// SDP offer on the subscriber connection (the node adds or removes tracks).
    Offer {
        /// The SDP offer.
        sdp: String,
        /// Which track each receiving media section carries, by mid.
        tracks: Vec<SubscribedTrack>,
    },
    /// A participant entered the room.
    ParticipantJoined {
        /// Who.
        participant: ParticipantInfo,
    },
    /// A participant left the room.
    ParticipantLeft {
        /// Who.
        participant_id: String,
    },
    /// A track became available in the room.
    TrackPublished {
        /// The track.
        track: TrackInfo,
    },
    /// A track is gone.
    TrackUnpublished {
        /// The track.
        track_id: String,
    },
    /// A track was muted or unmuted by its publisher.
    TrackMuted {
        /// The track.
        track_id: String,
        /// New state.
        muted: bool,
    },
    /// The simulcast layer forwarded for a subscribed track changed.
    LayerChanged {
        /// The subscribed track.
        track_id: String,
        /// Layer now forwarded, `None` when paused for lack of bandwidth.
        layer: Option<Layer>,
    },
    /// Answer to `ping`.
    Pong {
        /// The ping's id.
        #[cfg_attr(feature = "ts", ts(type = "number"))]
        id: u64,
    },
    /// This node does not serve the client: connect to `url` instead.
    Redirect {
        /// Region that serves the client.
        region: String,
        /// Signaling URL of that region.
        url: String,
    },
    /// The node hands this session over (drain, or it lost the room): reconnect to
    /// `url`, or to another node of the region when absent, and join with the resume
    /// token. The node closes the connection after sending it.
    Migrate {
        /// Signaling URL of the node that now hosts the room, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// Why: `drain` (the node is stopping) or `fenced` (the node lost the room).
        reason: String,
    },
    /// A request failed, or the connection is about to close.
    Error {
        /// Stable machine-readable code (see [`ErrorCode`]).
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// The token sent in `refresh` was accepted.
    Refreshed {
        /// Seconds until the new token expires: refresh again before then.
        #[cfg_attr(feature = "ts", ts(type = "number"))]
        expires_in_secs: u64,
    },
    /// The session ended (after `leave`, a kick, or server shutdown).
    Left {
        /// Why.
        reason: String,
    },
}

/// A simulcast layer, lowest to highest; `rid`s `q`, `h`, `f` as browsers name them.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// Quarter resolution (`rid=q`).
    Low,
    /// Half resolution (`rid=h`).
    Medium,
    /// Full resolution (`rid=f`).
    High,
}

impl Layer {
    /// All layers, lowest first.
    pub const ALL: [Layer; 3] = [Layer::Low, Layer::Medium, Layer::High];

    /// The RTP stream id browsers use for this layer.
    pub fn rid(self) -> &'static str {
        match self {
            Layer::Low => "q",
            Layer::Medium => "h",
            Layer::High => "f",
        }
    }

    /// The layer named by a RTP stream id, if it is one of `q`, `h`, `f`.
    pub fn from_rid(rid: &str) -> Option<Layer> {
        match rid {
            "q" => Some(Layer::Low),
            "h" => Some(Layer::Medium),
            "f" => Some(Layer::High),
            _ => None,
        }
    }

    /// Index 0..3, lowest first.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Kind of media a track carries.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    /// Opus audio.
    Audio,
    /// VP8 or H.264 video.
    Video,
}

/// What the client says about one sending media section of its offer.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackAnnouncement {
    /// Media section id in the offer.
    pub mid: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// Source label, e.g. `camera`, `microphone`, `screen`.
    #[serde(default)]
    pub source: String,
    /// Simulcast layers sent, by rid; empty for a single stream.
    #[serde(default)]
    pub layers: Vec<Layer>,
    /// The track id this section had before a failover (from the earlier `answer`), so
    /// a restored publisher keeps its track ids; honoured only for the participant's
    /// own tracks recorded in the room's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_id: Option<String>,
}

/// A published track as the room sees it.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Room-unique track id.
    pub track_id: String,
    /// Publisher's participant id.
    pub participant_id: String,
    /// Media section id on the publisher connection.
    pub mid: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// Source label.
    pub source: String,
    /// Simulcast layers published.
    pub layers: Vec<Layer>,
    /// Whether the publisher muted it.
    pub muted: bool,
}

/// Which track a media section of the subscriber connection carries.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscribedTrack {
    /// Media section id on the subscriber connection.
    pub mid: String,
    /// Track id.
    pub track_id: String,
    /// Publisher's participant id.
    pub participant_id: String,
}

/// A participant as the room sees it.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    /// Room-unique participant id.
    pub participant_id: String,
    /// Identity from the token.
    pub identity: String,
    /// Display name, if the token gave one.
    #[serde(default)]
    pub name: Option<String>,
    /// Tracks the participant publishes.
    pub tracks: Vec<TrackInfo>,
}

/// Stable error codes carried by `error` messages.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was not valid JSON or not a known message.
    MalformedMessage,
    /// The message exceeded [`MAX_MESSAGE_BYTES`] or a count bound.
    MessageTooLarge,
    /// The client sent messages faster than its allowance.
    RateLimited,
    /// The client spoke an unsupported protocol version.
    UnsupportedVersion,
    /// A message other than `join` came before `join`, or `join` came twice.
    NotJoined,
    /// The token was missing, malformed, badly signed, expired or used a refused algorithm.
    Unauthorized,
    /// The token is valid but lacks the grant this message needs.
    Forbidden,
    /// The resume token is unknown or its grace period is over.
    ResumeFailed,
    /// The SDP could not be parsed or negotiated.
    InvalidSdp,
    /// A named track or participant does not exist.
    NotFound,
    /// The room or node is full.
    CapacityExceeded,
    /// The client did not join within the allowed time, or went silent.
    Timeout,
    /// The node failed internally; the client may retry.
    Internal,
    /// The node cannot take the session now (it drains, or the region's log is
    /// unreachable); try another node of the region.
    Unavailable,
    /// One request was refused because the client repeats it faster than allowed
    /// (layer preferences, mute toggles); the session goes on.
    Throttled,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedMessage => "malformed_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::InvalidSdp => "invalid_sdp",
            ErrorCode::NotFound => "not_found",
            ErrorCode::CapacityExceeded => "capacity_exceeded",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Throttled => "throttled",
        }
    }
}

/// Why a client message was refused before it reached the room.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    /// Not JSON, or not a known message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Valid JSON, but a list or string in it exceeds its bound.
    #[error("{0}")]
    OverLimit(&'static str),
}

impl DecodeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge(_) | DecodeError::OverLimit(_) => ErrorCode::MessageTooLarge,
            DecodeError::Malformed(_) => ErrorCode::MalformedMessage,
        }
    }
}

/// Longest explanation the node puts in an `error` about a client's own input, in
/// bytes: whatever a client sends, the reply stays small.
pub const MAX_ERROR_DETAIL_BYTES: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Largest track or participant id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

impl ClientMessage {
    /// Decodes and bounds a client message.
    pub fn decode(bytes: &[u8]) -> Result<ClientMessage, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let msg: ClientMessage = serde_json::from_slice(bytes)
            .map_err(|e| DecodeError::Malformed(clip(&e.to_string(), MAX_ERROR_DETAIL_BYTES)))?;
        msg.check_bounds()?;
        Ok(msg)
    }

    fn check_bounds(&self) -> Result<(), DecodeError> {
        let id_ok = |id: &String| id.len() <= MAX_ID_BYTES;
        match self {
            ClientMessage::Offer { tracks, .. } => {
                if tracks.len() > MAX_TRACKS_PER_MESSAGE {
                    return Err(DecodeError::OverLimit("too many tracks in one offer"));
                }
                if !tracks.iter().all(|t| id_ok(&t.mid) && id_ok(&t.source)) {
                    return Err(DecodeError::OverLimit("mid or source too long"));
                }
            }
            ClientMessage::Subscribe { track_ids } | ClientMessage::Unsubscribe { track_ids } => {
                if track_ids.len() > MAX_IDS_PER_MESSAGE {
                    return Err(DecodeError::OverLimit("too many track ids in one message"));
                }
                if !track_ids.iter().all(id_ok) {
                    return Err(DecodeError::OverLimit("track id too long"));
                }
            }
            ClientMessage::Unpublish { track_id }
            | ClientMessage::SetLayer { track_id, .. }
            | ClientMessage::Mute { track_id, .. } => {
                if !id_ok(track_id) {
                    return Err(DecodeError::OverLimit("track id too long"));
                }
            }
            ClientMessage::Join { .. }
            | ClientMessage::Refresh { .. }
            | ClientMessage::Answer { .. }
            | ClientMessage::Ping { .. }
            | ClientMessage::IceRestart
            | ClientMessage::Leave => {}
        }
        Ok(())
    }

    /// Encodes the message as JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("protocol messages always serialize")
    }
}

impl ServerMessage {
    /// Encodes the message as JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("protocol messages always serialize")
    }

    /// Decodes a server message (used by clients).
    pub fn decode(bytes: &[u8]) -> Result<ServerMessage, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
    }

    /// Shorthand for an `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_round_trips_with_defaults() {
        let msg = ClientMessage::decode(br#"{"type":"join","token":"t"}"#).unwrap();
        assert_eq!(
            msg,
            ClientMessage::Join {
                token: "t".into(),
                resume: None,
                version: PROTOCOL_VERSION,
                auto_subscribe: true,
                client: None
            }
        );
        assert_eq!(ClientMessage::decode(msg.encode().as_bytes()).unwrap(), msg);
    }

    #[test]
    fn unknown_and_truncated_messages_are_malformed() {
        for bad in [
            &br#"{"type":"fly"}"#[..],
            br#"{"type":"join""#,
            b"\xff\xfe",
            b"",
            br#"{"type":"subscribe","track_ids":"x"}"#,
        ] {
            let err = ClientMessage::decode(bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::MalformedMessage, "{bad:?}");
        }
    }

    #[test]
    fn oversized_messages_are_refused_before_parsing() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            ClientMessage::decode(&big).unwrap_err().code(),
            ErrorCode::MessageTooLarge
        );
        let ids: Vec<String> = (0..MAX_IDS_PER_MESSAGE + 1)
            .map(|i| i.to_string())
            .collect();
        let msg = ClientMessage::Subscribe { track_ids: ids }.encode();
        assert_eq!(
            ClientMessage::decode(msg.as_bytes()).unwrap_err().code(),
            ErrorCode::MessageTooLarge
        );
    }

    #[test]
    fn unknown_types_are_not_echoed_in_full() {
        let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(30_000));
        let err = ClientMessage::decode(long.as_bytes()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedMessage);
        let text = err.to_string();
        assert!(
            text.len() <= MAX_ERROR_DETAIL_BYTES + 64,
            "error of {} bytes",
            text.len()
        );
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 4), "…", "cut on a character boundary");
    }

    #[test]
    fn error_codes_serialize_as_their_wire_names() {
        for code in [
            ErrorCode::Unauthorized,
            ErrorCode::RateLimited,
            ErrorCode::InvalidSdp,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn layers_map_to_browser_rids() {
        for layer in Layer::ALL {
            assert_eq!(Layer::from_rid(layer.rid()), Some(layer));
        }
        assert_eq!(Layer::from_rid("x"), None);
    }
}
