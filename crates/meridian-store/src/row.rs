//! A stored row, as read from either backend, before decoding.

use chrono::{DateTime, SecondsFormat, Utc};
use meridian_events::{HashInput, RecordedEvent, decode_event};

use crate::StoreError;

/// One `events` row with its columns as stored.
#[derive(Debug, Clone)]
pub(crate) struct RawRow {
    pub position: u64,
    pub stream: String,
    pub sequence: u64,
    pub recorded_at: DateTime<Utc>,
    pub actor: String,
    pub schema_version: u32,
    pub event_type: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The columns a replay reads: position, sequence, schema version, payload.
pub(crate) type FoldRow = (i64, i64, i32, String);

/// Decode a [`FoldRow`] into its sequence and event (upcasting old versions).
pub(crate) fn decode_fold(row: &FoldRow) -> Result<(u64, meridian_events::Event), StoreError> {
    let (position, sequence, schema_version, payload) = row;
    let position = to_u64(*position, *position, "position")?;
    let corrupt = |reason: String| StoreError::Corrupt { position, reason };
    let sequence = u64::try_from(*sequence).map_err(|_| corrupt("negative sequence".into()))?;
    let version =
        u32::try_from(*schema_version).map_err(|_| corrupt("negative schema version".into()))?;
    let event = decode_event(version, payload).map_err(|e| corrupt(e.to_string()))?;
    Ok((sequence, event))
}

impl RawRow {
    /// The fields the hash covers.
    pub fn hash_input(&self) -> HashInput<'_> {
        HashInput {
            stream: &self.stream,
            sequence: self.sequence,
            position: self.position,
            recorded_at: self.recorded_at,
            actor: &self.actor,
            schema_version: self.schema_version,
            event_type: &self.event_type,
            payload: &self.payload,
        }
    }

    /// Decode the payload (upcasting old versions) into a [`RecordedEvent`].
    pub fn into_recorded(self) -> Result<RecordedEvent, StoreError> {
        let event =
            decode_event(self.schema_version, &self.payload).map_err(|e| StoreError::Corrupt {
                position: self.position,
                reason: e.to_string(),
            })?;
        Ok(RecordedEvent {
            stream: self.stream,
            sequence: self.sequence,
            position: self.position,
            recorded_at: self.recorded_at,
            actor: self.actor,
            schema_version: self.schema_version,
            event,
            hash: self.hash,
            prev_hash: self.prev_hash,
        })
    }
}

/// Convert a stored integer column to `u64`, naming the row if it is negative.
pub(crate) fn to_u64(value: i64, position: i64, column: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        position: u64::try_from(position).unwrap_or(0),
        reason: format!("negative {column}"),
    })
}

/// Convert a `u64` to the `i64` both databases store.
pub(crate) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::InvalidInput(format!("{value} is out of range")))
}

/// Format a time the way the SQLite backend stores it (RFC 3339, UTC, microseconds).
pub(crate) fn sqlite_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parse a time stored by the SQLite backend.
pub(crate) fn parse_sqlite_time(s: &str, position: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt {
            position: u64::try_from(position).unwrap_or(0),
            reason: format!("bad time {s:?}: {e}"),
        })
}

/// Truncate a time to microseconds, the precision both databases keep.
pub(crate) fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}
