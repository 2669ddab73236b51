//! Participant and track ids: what the node hands out and how they read in signaling
//! (`PA_7`, `TR_12`).

use std::fmt;
use std::str::FromStr;

/// Identifies a participant on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

/// Identifies a published track on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PA_{}", self.0)
    }
}

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TR_{}", self.0)
    }
}

impl FromStr for ParticipantId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.strip_prefix("PA_")
            .and_then(|n| n.parse().ok())
            .map(ParticipantId)
            .ok_or(())
    }
}

impl FromStr for TrackId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        s.strip_prefix("TR_")
            .and_then(|n| n.parse().ok())
            .map(TrackId)
            .ok_or(())
    }
}
