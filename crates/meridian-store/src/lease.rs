//! Region membership: node liveness leases and room placements.
//!
//! A lease is a row renewed every lease period; a node that stops renewing is
//! declared expired by a survivor, which deletes the row (only one survivor can) and
//! may then take the node's rooms over. Placements are `RoomPlaced` events in each
//! room's stream; [`crate::Store::placements`] reads the latest one per room.

use chrono::{DateTime, Utc};
use meridian_events::Event;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// One node's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    /// The node's id.
    pub node: String,
    /// The node's region.
    pub region: String,
    /// The node's public signaling URL (WebSocket), where clients are redirected.
    pub url: String,
    /// Random id of the process holding the lease; a restarted node gets a new one.
    pub incarnation: String,
    /// When the lease runs out unless renewed.
    pub expires_at: DateTime<Utc>,
    /// The node is draining: it takes no new rooms.
    pub draining: bool,
}

impl NodeLease {
    /// Whether the lease is still valid at `now` (on the reader's clock).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// The latest placement of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The room's stream (`room:<name>`).
    pub stream: String,
    /// The node the room is placed on.
    pub node: String,
    /// The placement epoch.
    pub epoch: u64,
    /// Sequence of the `RoomPlaced` event in the stream.
    pub sequence: u64,
}

pub(crate) type LeaseRow = (String, String, String, String, i64, bool);

pub(crate) fn lease(row: LeaseRow) -> Result<NodeLease, StoreError> {
    let (node, region, url, incarnation, expires_at_us, draining) = row;
    let expires_at = DateTime::<Utc>::from_timestamp_micros(expires_at_us)
        .ok_or_else(|| StoreError::Database(format!("lease of {node}: bad expiry")))?;
    Ok(NodeLease {
        node,
        region,
        url,
        incarnation,
        expires_at,
        draining,
    })
}

pub(crate) fn placement(stream: String, sequence: i64, payload: &str) -> Option<Placement> {
    match serde_json::from_str::<Event>(payload).ok()? {
        Event::RoomPlaced { node, epoch } => Some(Placement {
            stream,
            node,
            epoch,
            sequence: u64::try_from(sequence).ok()?,
        }),
        _ => None,
    }
}

/// SQL shared by both backends (`$n` parameters bind by position in SQLite too).
pub(crate) mod sql {
    pub const ACQUIRE: &str = "INSERT INTO node_leases \
        (node, region, url, incarnation, expires_at_us, draining) \
        VALUES ($1, $2, $3, $4, $5, false) \
        ON CONFLICT (node) DO UPDATE SET region = excluded.region, url = excluded.url, \
        incarnation = excluded.incarnation, expires_at_us = excluded.expires_at_us, \
        draining = false";
    pub const RENEW: &str = "UPDATE node_leases SET expires_at_us = $1, draining = $2 \
        WHERE node = $3 AND incarnation = $4";
    pub const LIST: &str = "SELECT node, region, url, incarnation, expires_at_us, draining \
        FROM node_leases ORDER BY node";
    pub const EXPIRE: &str = "DELETE FROM node_leases \
        WHERE node = $1 AND incarnation = $2 AND expires_at_us < $3";
    pub const RELEASE: &str = "DELETE FROM node_leases WHERE node = $1 AND incarnation = $2";
    pub const PLACEMENTS_PG: &str = "SELECT DISTINCT ON (stream) stream, sequence, payload \
        FROM events WHERE event_type = 'RoomPlaced' ORDER BY stream, sequence DESC";
    pub const PLACEMENTS_SQLITE: &str = "SELECT stream, max(sequence), payload \
        FROM events WHERE event_type = 'RoomPlaced' GROUP BY stream ORDER BY stream";
}
