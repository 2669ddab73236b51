//! The auditor's view of the event log, as a library.
//!
//! * [`AuditArgs`] / [`AuditCommand`]: the `meridian audit` command line (clap), run by
//!   [`run`] against a [`Store`](meridian_store::Store) — `rooms`, `history --room R`, `participant
//!   --identity I`, `range --from T --to T`, `export --format jsonl|csv`, `verify`.
//! * [`router`]: the same queries as a read-only HTTP API (axum), paginated with
//!   `?after=<position>&limit=N`, guarded by an [`AdminCheck`] on the bearer token.
//!
//! Both read only; nothing here can append to or change the log.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cli;
mod http;

pub use cli::{AuditArgs, AuditCommand, AuditOutcome, ExportFormat, run, write_csv_header};
pub use http::{AdminCheck, StaticAdminToken, router};

use meridian_store::StoreError;

/// Errors of the audit commands and API.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed (unavailable, bad query, unreadable row).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// The command's arguments are inconsistent (e.g. `--from` after `--to`).
    #[error("invalid arguments: {0}")]
    InvalidInput(String),
    /// Neither `--database-url` nor `--data-dir` was given.
    #[error("give --database-url (postgres://… or sqlite://…) or --data-dir")]
    NoDatabase,
}
