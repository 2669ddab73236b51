//! The store's error type: storage failures translated to what they mean for callers.

use crate::ExpectedVersion;

/// Errors returned by the [`crate::Store`].
///
/// Messages carry the database's own text; the variant says what a caller should do:
/// re-decide on [`StoreError::Conflict`], retry later on [`StoreError::Unavailable`],
/// fix the request on [`StoreError::InvalidInput`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stream's current sequence is not the expected one (optimistic concurrency):
    /// nothing was appended; reload the stream and decide again.
    #[error("stream {stream}: expected version {expected}, found {actual}")]
    Conflict {
        /// The stream appended to.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual last sequence (0 when empty).
        actual: u64,
    },
    /// The database cannot be reached or the connection dropped. The append was not
    /// acknowledged: if `outcome_unknown` the commit may or may not have landed (retry
    /// with the same expected version: a landed commit then shows up as a conflict,
    /// never as a duplicate).
    #[error("database unavailable: {message}")]
    Unavailable {
        /// What the driver said.
        message: String,
        /// True when the connection dropped during COMMIT.
        outcome_unknown: bool,
    },
    /// The request breaks a limit or a rule (payload too large, batch too long, bad
    /// stream name, bad URL …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Any other database error (SQL error, constraint, permission).
    #[error("database error: {0}")]
    Database(String),
    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A stored row could not be read back as an event (tampered or written by a newer
    /// version); `verify_chain` names such rows too.
    #[error("row at position {position} is unreadable: {reason}")]
    Corrupt {
        /// Position of the row.
        position: u64,
        /// Why it could not be decoded.
        reason: String,
    },
    /// The store was closed or its writer task stopped.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Postgres SQLSTATE for unique violations.
const PG_UNIQUE_VIOLATION: &str = "23505";

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        classify(e, false)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => match classify(inner, false) {
                StoreError::Unavailable { .. } => StoreError::Unavailable {
                    message: "connection lost while migrating".into(),
                    outcome_unknown: false,
                },
                other => StoreError::Migration(other.to_string()),
            },
            other => StoreError::Migration(other.to_string()),
        }
    }
}

/// Whether a database error is a unique violation (Postgres 23505, SQLite 2067/1555).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(db.kind(), sqlx::error::ErrorKind::UniqueViolation)
                || db.code().as_deref() == Some(PG_UNIQUE_VIOLATION)
        }
        _ => false,
    }
}

/// Translate a driver error; `during_commit` marks an ambiguous commit outcome.
pub(crate) fn classify(e: sqlx::Error, during_commit: bool) -> StoreError {
    let unavailable = |message: String| StoreError::Unavailable {
        message,
        outcome_unknown: during_commit,
    };
    match e {
        sqlx::Error::Io(io) => unavailable(io.to_string()),
        sqlx::Error::Tls(t) => unavailable(t.to_string()),
        sqlx::Error::PoolTimedOut => unavailable("timed out waiting for a connection".into()),
        sqlx::Error::PoolClosed => StoreError::Closed,
        sqlx::Error::WorkerCrashed => unavailable("database worker crashed".into()),
        sqlx::Error::Protocol(p) => unavailable(format!("protocol: {p}")),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // Postgres class 08 = connection exception, 57P0x = server shutting down,
            // 53 = insufficient resources; SQLite 5/6 = busy/locked.
            if code.starts_with("08")
                || code.starts_with("57P0")
                || code.starts_with("53")
                || code == "5"
                || code == "6"
            {
                unavailable(db.message().to_owned())
            } else {
                StoreError::Database(format!("{} ({code})", db.message()))
            }
        }
        other => StoreError::Database(other.to_string()),
    }
}
