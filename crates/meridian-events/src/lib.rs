//! Meridian's event vocabulary and room model.
//!
//! Every change of room state is a past-tense [`Event`]. The store wraps each one in
//! a [`RecordedEvent`] envelope (stream, per-stream sequence, region-wide position,
//! time, actor, schema version and the hash chain). Room state is a fold over a
//! room stream ([`RoomState::apply`]); commands are turned into events by
//! [`decide()`](fn@decide), which rejects what the current state does not allow.
//!
//! This crate is pure: no I/O, no clock, no async runtime. Time is passed in.
//!
//! * [`event`]: the vocabulary and the envelope.
//! * [`room`]: the room fold and node lease fold.
//! * [`decide`](mod@decide): commands → events.
//! * [`upcast`]: reading payloads written by older schema versions.
//! * [`chain`]: the canonical bytes and hash of a recorded event.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod chain;
pub mod decide;
pub mod event;
pub mod room;
pub mod upcast;

pub use chain::{GENESIS_HASH, HashInput, chain_hash};
pub use decide::{Command, DomainError, decide};
pub use event::{
    CURRENT_SCHEMA_VERSION, Event, LeaveReason, PART_SEPARATOR, RecordedEvent, RegionLink,
    TrackKind, node_stream, part_name, room_of_part, room_stream,
};
pub use room::{NodeLeaseState, Participant, RoomState, Track};
pub use upcast::{EventError, decode_event};
