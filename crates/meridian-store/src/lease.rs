//! Region membership: node liveness leases and room placements.
//!
//! A lease is a row renewed every lease period; a node that stops renewing is
//! declared expired by a survivor. Lease times are taken from the **database's clock**
//! (Postgres `clock_timestamp()`, SQLite `julianday('now')`), never a node's, so clock
//! skew between nodes cannot expire a live node. A survivor which deletes the row (only one survivor can) and
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
    /// Where other nodes reach the node's internal listener (mutual TLS), as
    /// `host:port`; `None` when the node did not publish one.
    pub internal_addr: Option<String>,
    /// Random id of the process holding the lease; a restarted node gets a new one.
    pub incarnation: String,
    /// When the lease runs out unless renewed, on the database's clock.
    pub expires_at: DateTime<Utc>,
    /// The node is draining: it takes no new rooms.
    pub draining: bool,
    /// The database's clock when the lease was read.
    pub db_now: DateTime<Utc>,
    /// The reader's clock when the lease was read.
    pub read_at: DateTime<Utc>,
}

impl NodeLease {
    /// Whether the lease is still valid at `now` on the reader's clock: the time left
    /// on the database's clock when it was read, minus the time passed since on the
    /// reader's clock (so the two clocks need not agree).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.remaining(now) > chrono::TimeDelta::zero()
    }

    /// Time left on the lease at `now` on the reader's clock (negative once expired).
    pub fn remaining(&self, now: DateTime<Utc>) -> chrono::TimeDelta {
        (self.expires_at - self.db_now) - (now - self.read_at)
    }
}

/// A lease just taken: the incarnation every renewal must present and its expiry
/// (database clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquiredLease {
    /// Random id of this process's lease.
    pub incarnation: String,
    /// When it runs out unless renewed (database clock).
    pub expires_at: DateTime<Utc>,
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

pub(crate) type LeaseRow = (String, String, String, String, i64, bool, i64, String);

pub(crate) fn time(us: i64, what: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::<Utc>::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Database(format!("{what}: time out of range")))
}

pub(crate) fn lease(row: LeaseRow, read_at: DateTime<Utc>) -> Result<NodeLease, StoreError> {
    let (node, region, url, incarnation, expires_at_us, draining, now_us, internal_addr) = row;
    let expires_at = time(expires_at_us, &node)?;
    Ok(NodeLease {
        node,
        region,
        url,
        internal_addr: (!internal_addr.is_empty()).then_some(internal_addr),
        incarnation,
        expires_at,
        draining,
        db_now: time(now_us, "database clock")?,
        read_at,
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

/// Lease SQL, written once with the database clock in microseconds as `NOW_US`
/// (`$n` parameters bind by position in SQLite too).
macro_rules! lease_sql {
    ($name:ident, $now:expr) => {
        /// Lease SQL for one backend.
        pub(crate) mod $name {
            pub const NOW: &str = concat!("SELECT ", $now);
            pub const ACQUIRE: &str = concat!(
                "INSERT INTO node_leases (node, region, url, incarnation, expires_at_us, draining, \
                 internal_addr) VALUES ($1, $2, $3, $4, ", $now, " + $5, false, $6) \
                 ON CONFLICT (node) DO UPDATE SET region = excluded.region, url = excluded.url, \
                 internal_addr = excluded.internal_addr, incarnation = excluded.incarnation, expires_at_us = excluded.expires_at_us, \
                 draining = false RETURNING expires_at_us"
            );
            pub const LIST: &str = concat!(
                "SELECT node, region, url, incarnation, expires_at_us, draining, ", $now,
                ", internal_addr FROM node_leases ORDER BY node"
            );
            pub const EXPIRE: &str = concat!(
                "DELETE FROM node_leases WHERE node = $1 AND incarnation = $2 AND expires_at_us < ",
                $now
            );
        }
    };
}

/// The database clock in microseconds since the epoch, Postgres.
macro_rules! pg_now {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    };
}

/// The database clock in microseconds since the epoch, SQLite.
macro_rules! lite_now {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
    };
}

lease_sql!(pg_sql, pg_now!());
lease_sql!(lite_sql, lite_now!());

/// A renewal and the read of every lease in one statement, so the lease loop costs one
/// round trip per period: `$1` ttl (µs), `$2` draining, `$3` node, `$4` incarnation
/// (sqlx binds `$n` by its number in SQLite too, so a parameter may repeat). Rows are
/// [`RenewRow`]s, the last column saying whether the row is the renewed one; Postgres
/// orders them by node, SQLite's `RETURNING` does not (the caller sorts).
pub(crate) mod renew_list_sql {
    /// Postgres: the renewal in a data-modifying CTE; the outer read takes the renewed
    /// row's new values from the CTE (it does not see the update itself). Only the
    /// node's own row is locked.
    pub const PG: &str = concat!(
        "WITH renewed AS (UPDATE node_leases SET expires_at_us = ",
        pg_now!(),
        " + $1, draining = $2 WHERE node = $3 AND incarnation = $4 \
         RETURNING node, expires_at_us, draining) \
         SELECT l.node, l.region, l.url, l.incarnation, \
         COALESCE(r.expires_at_us, l.expires_at_us), COALESCE(r.draining, l.draining), ",
        pg_now!(),
        ", l.internal_addr, r.node IS NOT NULL \
         FROM node_leases l LEFT JOIN renewed r ON r.node = l.node ORDER BY l.node"
    );
    /// SQLite has no data-modifying CTE: one UPDATE that rewrites only the node's own
    /// row's values and returns every row (SQLite writes under one database lock, so
    /// the other rows keep exactly the values they had).
    pub const SQLITE: &str = concat!(
        "UPDATE node_leases SET \
         expires_at_us = CASE WHEN node = $3 AND incarnation = $4 THEN ",
        lite_now!(),
        " + $1 ELSE expires_at_us END, \
         draining = CASE WHEN node = $3 AND incarnation = $4 THEN $2 ELSE draining END \
         RETURNING node, region, url, incarnation, expires_at_us, draining, ",
        lite_now!(),
        ", internal_addr, node = $3 AND incarnation = $4"
    );
}

/// A [`LeaseRow`] and whether it is the row just renewed.
pub(crate) type RenewRow = (String, String, String, String, i64, bool, i64, String, bool);

/// SQL shared by both backends (`$n` parameters bind by position in SQLite too).
pub(crate) mod sql {
    pub const RELEASE: &str = "DELETE FROM node_leases WHERE node = $1 AND incarnation = $2";
    pub const PLACEMENTS_PG: &str = "SELECT DISTINCT ON (stream) stream, sequence, payload \
        FROM events WHERE event_type = 'RoomPlaced' ORDER BY stream, sequence DESC";
    pub const PLACEMENTS_SQLITE: &str = "SELECT stream, max(sequence), payload \
        FROM events WHERE event_type = 'RoomPlaced' GROUP BY stream ORDER BY stream";
}
