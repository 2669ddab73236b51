//! Meridian's event store: the region log, in Postgres or embedded SQLite.
//!
//! One [`Store`] type, chosen at construction ([`Store::connect`] with a
//! `postgres://` or `sqlite://` URL, or [`Store::open_embedded`] with a data
//! directory), serves both backends through `sqlx` with the same semantics:
//!
//! * **Append** ([`Store::append`]) with optimistic concurrency per stream
//!   ([`ExpectedVersion`]); a mismatch is [`StoreError::Conflict`] and nothing is
//!   written. An append is acknowledged only after its transaction committed
//!   (Postgres default commit; SQLite WAL with `synchronous=FULL`).
//! * **Writer lanes with group commit**: appends go to the writer lane their stream
//!   hashes to (one on SQLite, [`ConnectOptions::writer_lanes`] on Postgres); a lane
//!   takes every append waiting in its queue into one transaction. Lanes share no
//!   lock, so appends to different rooms commit in parallel.
//! * **A hash chain per stream**: each row stores `prev_hash` (the previous row *of
//!   its stream*) and `hash` (see [`meridian_events::chain`]); `stream_heads` holds
//!   each stream's last row. Rows written before per-stream chains keep their global
//!   chain (`legacy_chain`).
//! * **Signed checkpoints** ([`Store::checkpoint`], [`spawn_checkpointer`]) sign every
//!   stream head with an Ed25519 key outside the database;
//!   [`Store::verify_log`] checks the chains, the heads and the checkpoints and names
//!   the first bad row. Rows of `events` cannot be updated or deleted (triggers).
//! * **Tailing**: [`Store::read_all`] from a position and [`Store::wait_for_new`]
//!   (Postgres LISTEN/NOTIFY, in-process wake-ups, polling as a fallback).
//! * **Snapshots** bound replay time ([`Store::save_snapshot`], [`Store::load_room`]).
//! * **Auditor queries** by stream, identity and time range ([`Store::query`]).
//!
//! Migrations live in the top-level `migrations/{postgres,sqlite}` and are embedded and
//! run at connect.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoint;
mod error;
mod lease;
mod pg;
mod row;
mod sqlite;
mod writer;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_events::{Event, RecordedEvent, RoomState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use checkpoint::{
    Checkpoint, KEY_FILE, SIGNING_CONTEXT, SignedCheckpoint, StreamHead, key_path,
    load_or_create_signing_key, parse_public_key, public_key_hex, read_checkpoints,
    spawn_checkpointer,
};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::StoreError;
pub use lease::{AcquiredLease, NodeLease, Placement};

/// Largest event payload (its JSON), in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most events in one append.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Most rows one read or query returns.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// Longest stream name or actor, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// What the caller believes the stream's last sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds (no concurrency check).
    Any,
    /// The stream must be empty.
    NoStream,
    /// The stream's last sequence must be exactly this (0 means empty).
    Exact(u64),
}

impl ExpectedVersion {
    fn accepts(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// An event to append, with who caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Participant identity, node id or admin that caused the event.
    pub actor: String,
    /// The event.
    pub event: Event,
}

impl NewEvent {
    /// An event caused by `actor`.
    pub fn new(actor: impl Into<String>, event: Event) -> Self {
        Self {
            actor: actor.into(),
            event,
        }
    }
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// A regional Postgres.
    Postgres,
    /// The embedded SQLite file.
    Sqlite,
}

/// A position in the region log and the hash of the row there: the highest position
/// ([`Store::head`]), or the end of the legacy global chain ([`Checkpoint::legacy`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    /// Position of the row (0 when empty).
    pub position: u64,
    /// Hash of that row ([`meridian_events::GENESIS_HASH`] when empty).
    pub hash: String,
}

/// A stored snapshot of a stream's folded state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream.
    pub stream: String,
    /// The last sequence folded into `state`.
    pub sequence: u64,
    /// The state as JSON.
    pub state: serde_json::Value,
    /// When it was saved.
    pub saved_at: DateTime<Utc>,
}

/// Summary of one stream, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The stream name.
    pub stream: String,
    /// Its last sequence (= number of events).
    pub last_sequence: u64,
    /// Time of its first event.
    pub first_at: DateTime<Utc>,
    /// Time of its last event.
    pub last_at: DateTime<Utc>,
}

/// An auditor's filter over the log; all set filters must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Only this stream.
    pub stream: Option<String>,
    /// Only events whose actor is this identity, or that concern a participant who
    /// joined with this identity (same stream and participant id).
    pub identity: Option<String>,
    /// Only events recorded at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub to: Option<DateTime<Utc>>,
    /// Only events of this type (e.g. `ParticipantJoined`).
    pub event_type: Option<String>,
    /// Only events after this position (pagination cursor; 0 = from the start).
    pub after_position: u64,
    /// Most rows to return (at most [`MAX_QUERY_LIMIT`]).
    pub limit: usize,
}

/// Why a chain check failed at a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakKind {
    /// A row is missing (deleted or renumbered): a gap in a stream's sequences or in
    /// the legacy chain's positions, or a stream shorter than its head says.
    Missing,
    /// The row's fields do not hash to its stored hash (it was edited).
    HashMismatch,
    /// The row's `prev_hash` is not the previous row's hash (reordered or replaced).
    PrevHashMismatch,
    /// `stream_heads` (or `legacy_chain`) disagrees with the stream's last row, or a
    /// stream has rows but no head (tail rows deleted or a head edited).
    HeadMismatch,
    /// The log disagrees with a signed checkpoint (history rewritten and re-chained,
    /// or truncated below a signed head).
    CheckpointMismatch,
    /// A checkpoint's signature does not verify with the given public keys.
    BadSignature,
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakKind::Missing => "missing row",
            BreakKind::HashMismatch => "hash does not match contents",
            BreakKind::PrevHashMismatch => "prev_hash does not match previous row",
            BreakKind::HeadMismatch => "stream head does not match the stream's last row",
            BreakKind::CheckpointMismatch => "log does not match a signed checkpoint",
            BreakKind::BadSignature => "checkpoint signature does not verify",
        })
    }
}

/// The first place where the log is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainBreak {
    /// The bad row's position; for a missing row of a stream, the position of the
    /// next row found (0 when none: the stream was cut at its end).
    pub position: u64,
    /// The stream of the bad row (`None` in the legacy global chain).
    pub stream: Option<String>,
    /// The bad (or missing) sequence in that stream.
    pub sequence: Option<u64>,
    /// What is wrong there.
    pub kind: BreakKind,
    /// Details (which checkpoint, which head).
    pub detail: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.stream, self.sequence) {
            (Some(s), Some(q)) => write!(f, "{s}#{q} (position {})", self.position)?,
            (Some(s), None) => write!(f, "{s} (position {})", self.position)?,
            _ => write!(f, "position {}", self.position)?,
        }
        write!(f, ": {}", self.kind)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Result of [`Store::verify_chain`] and [`Store::verify_log`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Rows checked before stopping.
    pub checked: u64,
    /// Streams whose heads were loaded (and checked).
    pub streams: u64,
    /// Signed checkpoints checked against the log.
    pub checkpoints: u64,
    /// The highest position seen when verification started; rows appended after the
    /// heads were loaded are not checked.
    pub head: LogHead,
    /// The first break, or `None` when the whole chain verifies.
    pub first_break: Option<ChainBreak>,
}

impl VerifyReport {
    /// Whether the chain verified end to end.
    pub fn is_ok(&self) -> bool {
        self.first_break.is_none()
    }
}

#[derive(Clone)]
pub(crate) enum Backend {
    Postgres(pg::Pg),
    Sqlite(sqlite::Lite),
}

/// Runs one sqlx expression, written once, on the store's pool (`$pool` is bound to
/// the Postgres or the SQLite pool): for SQL both backends share. With a field name
/// first, SQLite's pool is that field of `Lite` (`lease_pool` for the lease loop).
macro_rules! on_pool {
    ($store:expr, $lite:ident, $pool:ident => $body:expr) => {
        match &$store.inner.backend {
            Backend::Postgres(p) => {
                let $pool = &p.pool;
                $body
            }
            Backend::Sqlite(s) => {
                let $pool = &s.$lite;
                $body
            }
        }
    };
    ($store:expr, $pool:ident => $body:expr) => {
        on_pool!($store, pool, $pool => $body)
    };
}

// After `on_pool!`, which it uses.
mod verify;

/// The region event log. Cheap to clone; all clones share one pool and one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    lanes: Vec<mpsc::Sender<writer::Pending>>,
    head_rx: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Snapshot policy: a room's state is saved every this many events (0: never).
    snapshot_every: std::sync::atomic::AtomicU64,
    /// The lease loop's connection (see [`LeaseConn`]); `None` until the first
    /// renewal and after a failed one.
    lease_conn: tokio::sync::Mutex<Option<LeaseConn>>,
}

/// The lease loop's own connection, taken from the pool once and detached: a renewal
/// is then one round trip. Through the pool it was three, since sqlx pings a pooled
/// connection when it is checked out and again when it comes back (on SQLite each ping
/// a hand-over to the connection's worker thread and back, most of an idle node's CPU).
enum LeaseConn {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

/// Default snapshot policy: a room's state is saved every this many events (and at
/// each placement), so a takeover replays at most this many events after a snapshot.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 256;

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

/// Options of a connection; see [`Store::connect_with_options`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Postgres schema to use (created if missing); `None` uses the URL's search path.
    pub schema: Option<String>,
    /// Most pooled connections. On Postgres each writer lane, the commit notifier, the
    /// `LISTEN` task and the lease loop keep a connection of their own besides the
    /// pool, so a store opens up to `max_connections + writer_lanes + 3`.
    pub max_connections: u32,
    /// How long to wait for a connection before failing with
    /// [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Postgres writer lanes: appends are sharded by stream over this many group-commit
    /// writers, each committing its batches on a connection of its own in one round
    /// trip (SQLite always uses one: it has a single write lock).
    pub writer_lanes: usize,
}

/// Default number of Postgres writer lanes.
pub const DEFAULT_WRITER_LANES: usize = 4;

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            schema: None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            writer_lanes: DEFAULT_WRITER_LANES,
        }
    }
}

impl Store {
    /// Connect to `postgres://…` or `sqlite://path?mode=rwc` and run the migrations.
    ///
    /// A database that cannot be reached gives [`StoreError::Unavailable`] at once;
    /// see [`Store::connect_with_retry`] to wait for it.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_with_options(url, ConnectOptions::default()).await
    }

    /// Connect to Postgres with `schema` as search path (created if missing), so tests
    /// and tenants can isolate their log. For SQLite URLs the schema is ignored.
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Store, StoreError> {
        Self::connect_with_options(
            url,
            ConnectOptions {
                schema: Some(schema.to_owned()),
                ..ConnectOptions::default()
            },
        )
        .await
    }

    /// Connect, retrying up to `attempts` times with `backoff` doubling between
    /// attempts (capped at 30 s) while the database is unavailable. Other errors (bad
    /// URL, failed migration) return at once.
    pub async fn connect_with_retry(
        url: &str,
        attempts: u32,
        backoff: Duration,
    ) -> Result<Store, StoreError> {
        let mut delay = backoff;
        let mut attempt = 1;
        loop {
            match Self::connect(url).await {
                Err(e) if e.is_retryable() && attempt < attempts => {
                    tracing::warn!(attempt, error = %e, "event store unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Connect with explicit [`ConnectOptions`].
    pub async fn connect_with_options(
        url: &str,
        options: ConnectOptions,
    ) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (pg, listener) = pg::Pg::connect(url, &options).await?;
            Self::start(Backend::Postgres(pg), listener, options.writer_lanes).await
        } else if url.starts_with("sqlite:") {
            let lite = sqlite::Lite::connect(url, &options).await?;
            Self::start(Backend::Sqlite(lite), None, 1).await
        } else {
            Err(StoreError::InvalidInput(
                "database URL must start with postgres://, postgresql:// or sqlite:".into(),
            ))
        }
    }

    /// Open (creating if needed) the embedded SQLite log `events.db` in `data_dir`.
    pub async fn open_embedded(data_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = data_dir.as_ref();
        // The data dir also holds the token signing keys: owner-only (0700).
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| {
            StoreError::InvalidInput(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("events.db");
        let lite = sqlite::Lite::open_path(&path, &ConnectOptions::default()).await?;
        Self::start(Backend::Sqlite(lite), None, 1).await
    }

    async fn start(
        backend: Backend,
        listener: Option<pg::ListenerSetup>,
        lanes: usize,
    ) -> Result<Store, StoreError> {
        let head = match &backend {
            Backend::Postgres(p) => p.head().await?,
            Backend::Sqlite(s) => s.head().await?,
        };
        let (head_tx, head_rx) = watch::channel(head.position);
        let head_tx = Arc::new(head_tx);
        // This process's commits only (head_tx also moves on other processes'
        // notifications), for the Postgres notifier.
        let (committed_tx, committed_rx) = watch::channel(head.position);
        let committed_tx = Arc::new(committed_tx);
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..lanes.clamp(1, 64) {
            let (tx, rx) = mpsc::channel(4096);
            senders.push(tx);
            tasks.push(tokio::spawn(writer::run(
                backend.clone(),
                rx,
                Arc::clone(&head_tx),
                Arc::clone(&committed_tx),
            )));
        }
        if let Backend::Postgres(p) = &backend {
            tasks.push(tokio::spawn(pg::notify_commits(
                p.pool.clone(),
                committed_rx,
            )));
        }
        if let Some(l) = listener {
            tasks.push(tokio::spawn(l.run(head_tx)));
        }
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                lanes: senders,
                head_rx,
                tasks,
                snapshot_every: std::sync::atomic::AtomicU64::new(DEFAULT_SNAPSHOT_EVERY),
                lease_conn: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> BackendKind {
        match self.inner.backend {
            Backend::Postgres(_) => BackendKind::Postgres,
            Backend::Sqlite(_) => BackendKind::Sqlite,
        }
    }

    /// Close the pool; later calls fail with [`StoreError::Closed`] or
    /// [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.inner.lease_conn.lock().await.take();
        match &self.inner.backend {
            Backend::Postgres(p) => p.pool.close().await,
            Backend::Sqlite(s) => {
                s.lease_pool.close().await;
                s.pool.close().await
            }
        }
    }

    /// Append `events` to `stream` atomically if the stream is at `expected`.
    ///
    /// Returns the recorded events (sequence, position, time, hashes) once they are
    /// durable. On [`StoreError::Conflict`] nothing was written. Limits: at most
    /// [`MAX_BATCH_EVENTS`] events, payloads of at most [`MAX_PAYLOAD_BYTES`].
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let pending = writer::prepare(stream, expected, events)?;
        let Some((pending, rx)) = pending else {
            return Ok(Vec::new());
        };
        self.inner.lanes[lane_of(stream, self.inner.lanes.len())]
            .send(pending)
            .await
            .map_err(|_| StoreError::Closed)?;
        let recorded = rx.await.map_err(|_| StoreError::Closed)??;
        self.snapshot_policy(stream, &recorded);
        Ok(recorded)
    }

    /// Set the snapshot policy: save a room's state every `every` events (and at each
    /// `RoomPlaced`); 0 turns it off. Default [`DEFAULT_SNAPSHOT_EVERY`].
    pub fn set_snapshot_every(&self, every: u64) {
        self.inner
            .snapshot_every
            .store(every, std::sync::atomic::Ordering::Relaxed);
    }

    /// After an append to a room: when its sequence crossed a multiple of the policy's
    /// N, or it placed the room (placement, takeover, handover), save a snapshot in the
    /// background, so replay after a takeover reads a snapshot and at most N events.
    fn snapshot_policy(&self, stream: &str, recorded: &[RecordedEvent]) {
        let every = self
            .inner
            .snapshot_every
            .load(std::sync::atomic::Ordering::Relaxed);
        let (Some(first), Some(last)) = (recorded.first(), recorded.last()) else {
            return;
        };
        if every == 0 || !stream.starts_with("room:") {
            return;
        }
        let crossed = (first.sequence - 1) / every < last.sequence / every;
        let placed = recorded
            .iter()
            .any(|e| matches!(e.event, Event::RoomPlaced { .. }));
        if crossed || placed {
            let store = self.clone();
            let stream = stream.to_owned();
            tokio::spawn(async move {
                if let Err(e) = store.snapshot_room(&stream).await {
                    tracing::debug!(%stream, error = %e, "snapshot failed; replay stays longer");
                }
            });
        }
    }

    /// Read up to `limit` events of `stream` with sequence ≥ `from_sequence`, in order.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        check_limit(limit)?;
        let rows = match &self.inner.backend {
            Backend::Postgres(p) => p.read_stream(stream, from_sequence, limit).await?,
            Backend::Sqlite(s) => s.read_stream(stream, from_sequence, limit).await?,
        };
        rows.into_iter().map(row::RawRow::into_recorded).collect()
    }

    /// Read up to `limit` events of the whole log with position ≥ `from_position`.
    pub async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        check_limit(limit)?;
        let rows = self.raw_page(from_position, limit).await?;
        rows.into_iter().map(row::RawRow::into_recorded).collect()
    }

    async fn raw_page(&self, from: u64, limit: usize) -> Result<Vec<row::RawRow>, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(p) => p.read_all(from, limit).await,
            Backend::Sqlite(s) => s.read_all(from, limit).await,
        }
    }

    /// The highest position in the log and the hash of its row. On Postgres, lanes
    /// commit in parallel, so a lower position of another stream may still become
    /// visible after this one (see `docs/event-log.md`, tailing).
    pub async fn head(&self) -> Result<LogHead, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(p) => p.head().await,
            Backend::Sqlite(s) => s.head().await,
        }
    }

    /// Wait until the log holds an event after `position`, or `timeout` passes.
    /// Returns the head position seen last (equal to `position` or lower on timeout).
    ///
    /// Wakes on appends by this process at once, on other Postgres writers through
    /// LISTEN/NOTIFY, and otherwise polls (250 ms), so a lost notification only delays.
    pub async fn wait_for_new(&self, position: u64, timeout: Duration) -> Result<u64, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.head_rx.clone();
        rx.mark_unchanged();
        loop {
            let head = self.head().await?.position;
            if head > position {
                return Ok(head);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(head);
            }
            let step = (deadline - now).min(Duration::from_millis(250));
            // A timeout just means "poll again"; a closed channel means the writer
            // stopped.
            if let Ok(Err(_)) = tokio::time::timeout(step, rx.changed()).await {
                return Err(StoreError::Closed);
            }
        }
    }

    /// Save (or replace with a newer one) the snapshot of `stream` at `sequence`.
    pub async fn save_snapshot(
        &self,
        stream: &str,
        sequence: u64,
        state: &serde_json::Value,
    ) -> Result<(), StoreError> {
        check_name("stream", stream)?;
        let state = state.to_string();
        match &self.inner.backend {
            Backend::Postgres(p) => p.save_snapshot(stream, sequence, &state).await,
            Backend::Sqlite(s) => s.save_snapshot(stream, sequence, &state).await,
        }
    }

    /// The latest snapshot of `stream`, if any.
    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(p) => p.load_snapshot(stream).await,
            Backend::Sqlite(s) => s.load_snapshot(stream).await,
        }
    }

    /// Rebuild a room's state by full replay of its stream.
    pub async fn replay_room(&self, stream: &str) -> Result<RoomState, StoreError> {
        self.fold_from(stream, RoomState::default()).await
    }

    /// Rebuild a room's state from its latest snapshot plus the events after it (full
    /// replay when there is no usable snapshot).
    pub async fn load_room(&self, stream: &str) -> Result<RoomState, StoreError> {
        let started = std::time::Instant::now();
        let snapshot = match &self.inner.backend {
            Backend::Postgres(p) => p.load_snapshot_text(stream).await?,
            Backend::Sqlite(s) => s.load_snapshot_text(stream).await?,
        };
        // Parsed straight into the state (no intermediate JSON value); a snapshot that
        // does not parse or disagrees with its sequence is ignored, not an error.
        let start = snapshot
            .and_then(|(sequence, text)| {
                serde_json::from_str::<RoomState>(&text)
                    .ok()
                    .filter(|st| i64::try_from(st.version).ok() == Some(sequence))
            })
            .unwrap_or_default();
        let from = start.version;
        let state = self.fold_from(stream, start).await?;
        tracing::debug!(
            %stream,
            snapshot_at = from,
            events = state.version - from,
            replay_us = started.elapsed().as_micros() as u64,
            "room replayed from the log"
        );
        Ok(state)
    }

    /// Fold a room's state and save it as the stream's snapshot; returns the state.
    pub async fn snapshot_room(&self, stream: &str) -> Result<RoomState, StoreError> {
        let state = self.load_room(stream).await?;
        let json = serde_json::to_value(&state)
            .map_err(|e| StoreError::InvalidInput(format!("state does not serialize: {e}")))?;
        self.save_snapshot(stream, state.version, &json).await?;
        Ok(state)
    }

    async fn fold_from(&self, stream: &str, mut state: RoomState) -> Result<RoomState, StoreError> {
        // Pages of MAX_QUERY_LIMIT rows: measured faster than streaming row by row
        // (sqlx-sqlite hands streamed rows over one at a time from its worker thread).
        // Only the columns the fold needs are read (no hashes, times or actors).
        loop {
            let page = match &self.inner.backend {
                Backend::Postgres(p) => {
                    p.read_fold(stream, state.version + 1, MAX_QUERY_LIMIT)
                        .await?
                }
                Backend::Sqlite(s) => {
                    s.read_fold(stream, state.version + 1, MAX_QUERY_LIMIT)
                        .await?
                }
            };
            let done = page.len() < MAX_QUERY_LIMIT;
            for r in &page {
                let (sequence, event) = row::decode_fold(r)?;
                state.apply_event(&event);
                state.version = sequence;
            }
            if done {
                return Ok(state);
            }
        }
    }

    /// All streams whose name starts with `prefix` (e.g. `"room:"`; `""` for all).
    pub async fn streams(&self, prefix: &str) -> Result<Vec<StreamInfo>, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(p) => p.streams(prefix).await,
            Backend::Sqlite(s) => s.streams(prefix).await,
        }
    }

    /// Events matching an auditor's [`AuditQuery`], in position order.
    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<RecordedEvent>, StoreError> {
        check_limit(q.limit)?;
        let rows = match &self.inner.backend {
            Backend::Postgres(p) => p.query(q).await?,
            Backend::Sqlite(s) => s.query(q).await?,
        };
        rows.into_iter().map(row::RawRow::into_recorded).collect()
    }

    /// Verify the log without checkpoints: every stream's chain up to the head loaded
    /// at the start, the heads, and the legacy global chain. See [`Store::verify_log`].
    pub async fn verify_chain(&self) -> Result<VerifyReport, StoreError> {
        self.verify_log(&[], &[]).await
    }

    /// Take (or take back) `node`'s lease for `ttl` from now on the database's clock,
    /// publishing its signaling `url` and the `host:port` of its internal listener
    /// (`""` for none); returns the new incarnation, which every renewal must present,
    /// and the expiry.
    pub async fn acquire_lease(
        &self,
        node: &str,
        region: &str,
        url: &str,
        internal_addr: &str,
        ttl: Duration,
    ) -> Result<AcquiredLease, StoreError> {
        check_name("node", node)?;
        check_name("region", region)?;
        check_name("url", url)?;
        if !internal_addr.is_empty() {
            check_name("internal_addr", internal_addr)?;
        }
        // Unique per process start: the time in nanoseconds and the process id.
        let incarnation = format!(
            "{:x}-{:x}",
            Utc::now().timestamp_nanos_opt().unwrap_or_default(),
            std::process::id()
        );
        let sql = self.lease_sql(lease::pg_sql::ACQUIRE, lease::lite_sql::ACQUIRE);
        let expires_at_us: i64 = on_pool!(self, pool => sqlx::query_scalar(sql)
            .bind(node)
            .bind(region)
            .bind(url)
            .bind(&incarnation)
            .bind(ttl_us(ttl))
            .bind(internal_addr)
            .fetch_one(pool)
            .await?);
        Ok(AcquiredLease {
            incarnation,
            expires_at: lease::time(expires_at_us, node)?,
        })
    }

    /// Extend `node`'s lease to `ttl` from now on the database's clock (and set its
    /// draining flag), and read every lease on record, in one round trip (the lease
    /// loop's whole work per period). The flag is false when the lease is no longer
    /// this incarnation's: it was declared expired (and the node's rooms may have been
    /// taken over) or another process took the node id; nothing was changed then.
    /// The leases are as [`Store::leases`] returns them (the renewed one with its new
    /// expiry).
    pub async fn renew_lease(
        &self,
        node: &str,
        incarnation: &str,
        ttl: Duration,
        draining: bool,
    ) -> Result<(bool, Vec<NodeLease>), StoreError> {
        let sql = self.lease_sql(lease::renew_list_sql::PG, lease::renew_list_sql::SQLITE);
        let read_at = Utc::now();
        macro_rules! renew {
            ($c:expr) => {
                sqlx::query_as(sql)
                    .bind(ttl_us(ttl))
                    .bind(draining)
                    .bind(node)
                    .bind(incarnation)
                    .fetch_all($c)
                    .await
            };
        }
        let mut slot = self.inner.lease_conn.lock().await;
        // A held Postgres connection may have been cut since the last period (a server
        // restart): then once more on a fresh one, as the pool's checkout ping would
        // have made it. (A local SQLite connection is not cut; a busy database was
        // already waited for.)
        let mut rows: Vec<lease::RenewRow> = loop {
            let fresh = slot.is_none();
            let conn = match &mut *slot {
                Some(c) => c,
                None => slot.insert(match &self.inner.backend {
                    Backend::Postgres(p) => LeaseConn::Postgres(p.pool.acquire().await?.detach()),
                    Backend::Sqlite(s) => LeaseConn::Sqlite(s.lease_pool.acquire().await?.detach()),
                }),
            };
            let (fetched, remote) = match conn {
                LeaseConn::Postgres(c) => (renew!(c), true),
                LeaseConn::Sqlite(c) => (renew!(c), false),
            };
            match fetched {
                Ok(rows) => break rows,
                Err(e) => {
                    // The connection's state is unknown after a failure.
                    *slot = None;
                    let e = StoreError::from(e);
                    if fresh || !remote || !e.is_retryable() {
                        return Err(e);
                    }
                }
            }
        };
        drop(slot);
        // SQLite's RETURNING has no order.
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let renewed = rows.iter().any(|r| r.8);
        let leases = rows
            .into_iter()
            .map(|(node, region, url, inc, exp, draining, now, addr, _)| {
                lease::lease((node, region, url, inc, exp, draining, now, addr), read_at)
            })
            .collect::<Result<_, _>>()?;
        Ok((renewed, leases))
    }

    /// Every lease on record, live or not, by node id, with the database's clock at
    /// the read (see [`NodeLease::is_live`]).
    pub async fn leases(&self) -> Result<Vec<NodeLease>, StoreError> {
        let sql = self.lease_sql(lease::pg_sql::LIST, lease::lite_sql::LIST);
        let read_at = Utc::now();
        let rows: Vec<lease::LeaseRow> =
            on_pool!(self, lease_pool, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter().map(|r| lease::lease(r, read_at)).collect()
    }

    /// The database's clock (leases are timed by it).
    pub async fn db_now(&self) -> Result<DateTime<Utc>, StoreError> {
        let sql = self.lease_sql(lease::pg_sql::NOW, lease::lite_sql::NOW);
        let us: i64 = on_pool!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await?);
        lease::time(us, "database clock")
    }

    /// Declare `node`'s lease (that incarnation) expired if it ran out on the
    /// database's clock: deletes it and returns true for exactly one caller, which may
    /// then take the node's rooms over.
    pub async fn expire_lease(&self, node: &str, incarnation: &str) -> Result<bool, StoreError> {
        let sql = self.lease_sql(lease::pg_sql::EXPIRE, lease::lite_sql::EXPIRE);
        let rows = on_pool!(self, pool => sqlx::query(sql)
            .bind(node)
            .bind(incarnation)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(rows == 1)
    }

    fn lease_sql(&self, pg: &'static str, lite: &'static str) -> &'static str {
        match self.backend() {
            BackendKind::Postgres => pg,
            BackendKind::Sqlite => lite,
        }
    }

    /// Give the lease up (clean shutdown).
    pub async fn release_lease(&self, node: &str, incarnation: &str) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(lease::sql::RELEASE)
                .bind(node)
                .bind(incarnation)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The latest placement of every room ever placed.
    pub async fn placements(&self) -> Result<Vec<Placement>, StoreError> {
        let sql = match self.backend() {
            BackendKind::Postgres => lease::sql::PLACEMENTS_PG,
            BackendKind::Sqlite => lease::sql::PLACEMENTS_SQLITE,
        };
        let rows: Vec<(String, i64, String)> =
            on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .filter_map(|(stream, seq, payload)| lease::placement(stream, seq, &payload))
            .collect())
    }
}

fn ttl_us(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 2)
}

fn check_limit(limit: usize) -> Result<(), StoreError> {
    if limit > MAX_QUERY_LIMIT {
        return Err(StoreError::InvalidInput(format!(
            "limit {limit} is above {MAX_QUERY_LIMIT}"
        )));
    }
    Ok(())
}

pub(crate) fn check_name(what: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(format!(
            "{what} must be 1..={MAX_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// The writer lane of `stream` among `lanes` (FNV-1a: stable across processes).
fn lane_of(stream: &str, lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes as u64) as usize
}

/// A reply channel for one append (used by the writer).
pub(crate) type Reply = oneshot::Sender<Result<Vec<RecordedEvent>, StoreError>>;
