//! The embedded SQLite backend (one machine, no database server).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use chrono::Utc;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use crate::error::is_unique_violation;
use crate::row::{
    FoldRow, RawRow, parse_sqlite_time, sqlite_time, to_i64, to_u64, truncate_micros,
};
use crate::writer::{
    CommitError, Head, HeadCache, Pending, Plan, cached_conflicts, plan, rows_needed,
};
use crate::{AuditQuery, ConnectOptions, LogHead, Snapshot, StoreError, StreamInfo};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

const COLUMNS: &str = "position, stream, sequence, recorded_at, actor, schema_version, \
                       event_type, payload, prev_hash, hash";

#[derive(Clone)]
pub(crate) struct Lite {
    pub pool: SqlitePool,
    /// One connection with `synchronous=NORMAL` for the lease loop (renewals, on a
    /// connection taken from here and kept, and the list of leases, off the event log's
    /// connections): a renewal every
    /// `lease_period_ms` need not reach the disk (after a power cut the node restarts
    /// with a new lease anyway), and a synced commit ten times a second was most of an
    /// idle node's CPU. The WAL is synced by the next event-log commit or checkpoint.
    pub lease_pool: SqlitePool,
}

impl Lite {
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Lite, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidInput(format!("bad SQLite URL: {e}")))?;
        Self::open(connect, options).await
    }

    pub async fn open_path(path: &Path, options: &ConnectOptions) -> Result<Lite, StoreError> {
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::open(connect, options).await
    }

    async fn open(
        connect: SqliteConnectOptions,
        options: &ConnectOptions,
    ) -> Result<Lite, StoreError> {
        // WAL + synchronous=FULL: a commit is on disk when it returns, readers never
        // block the writer. The busy timeout covers other processes (audit CLI).
        let connect = connect
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.clamp(1, 8))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let lease_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.synchronous(SqliteSynchronous::Normal))
            .await?;
        Ok(Lite { pool, lease_pool })
    }

    pub async fn head(&self) -> Result<LogHead, StoreError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        crate::pg::head(row)
    }

    /// Heads of `streams` (call holding the write lock).
    async fn heads(
        tx: &mut sqlx::SqliteConnection,
        streams: &[String],
        into: &mut HashMap<String, Head>,
    ) -> Result<(), StoreError> {
        for s in streams {
            let v: Option<(i64, String)> =
                sqlx::query_as("SELECT sequence, hash FROM stream_heads WHERE stream = ?1")
                    .bind(s)
                    .fetch_optional(&mut *tx)
                    .await?;
            match v {
                Some((v, h)) => {
                    into.insert(s.clone(), (to_u64(v, 0, "sequence")?, h));
                }
                None => {
                    into.remove(s);
                }
            }
        }
        Ok(())
    }

    pub async fn commit(
        &self,
        batch: &[Pending],
        cache: &mut HeadCache,
    ) -> Result<Plan, CommitError> {
        // BEGIN IMMEDIATE takes SQLite's write lock first: no other writer (another
        // process on the same file) can slip in between reading heads and inserting.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (mut heads, missing) = cache.lookup(batch);
        Self::heads(&mut tx, &missing, &mut heads).await?;
        let now = truncate_micros(Utc::now());
        let probe = plan(&heads, batch, now, &[]);
        let recheck = cached_conflicts(batch, &probe, &missing);
        if !recheck.is_empty() {
            Self::heads(&mut tx, &recheck, &mut heads).await?;
        }
        let n = rows_needed(&heads, batch);
        if n == 0 {
            tx.rollback().await?;
            return Ok(plan(&heads, batch, now, &[]));
        }
        // One writer at a time: positions stay contiguous on SQLite.
        let last: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        let first = to_u64(last, last, "position")? + 1;
        let positions: Vec<u64> = (first..first + n as u64).collect();
        let plan = plan(&heads, batch, now, &positions);
        // Multi-row statements (SQLite binds at most 32,766 parameters per statement):
        // one statement per 1,000 rows and one for all heads, instead of one per row.
        for chunk in plan.rows.chunks(1000) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO events (position, stream, sequence, recorded_at, actor, \
                 schema_version, event_type, payload, prev_hash, hash) ",
            );
            let mut bad = None;
            q.push_values(chunk, |mut b, r| {
                let (pos, seq) = match (to_i64(r.position), to_i64(r.sequence)) {
                    (Ok(p), Ok(q)) => (p, q),
                    (Err(e), _) | (_, Err(e)) => {
                        bad = Some(e);
                        (0, 0)
                    }
                };
                b.push_bind(pos)
                    .push_bind(&r.stream)
                    .push_bind(seq)
                    .push_bind(sqlite_time(r.recorded_at))
                    .push_bind(&r.actor)
                    .push_bind(i64::from(r.schema_version))
                    .push_bind(&r.event_type)
                    .push_bind(&r.payload)
                    .push_bind(&r.prev_hash)
                    .push_bind(&r.hash);
            });
            if let Some(e) = bad {
                return Err(e.into());
            }
            if let Err(e) = q.build().execute(&mut *tx).await {
                // Under the write lock a duplicate means a stale cached head.
                if is_unique_violation(&e) {
                    return Err(CommitError::StaleCache);
                }
                return Err(e.into());
            }
        }
        let heads: Vec<(&String, i64, i64, &String)> = plan
            .heads
            .iter()
            .zip(&plan.head_positions)
            .map(|((stream, (sequence, hash)), position)| {
                Ok((stream, to_i64(*sequence)?, to_i64(*position)?, hash))
            })
            .collect::<Result<_, StoreError>>()?;
        for chunk in heads.chunks(1000) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO stream_heads (stream, sequence, position, hash) ",
            );
            q.push_values(chunk, |mut b, (stream, sequence, position, hash)| {
                b.push_bind(*stream)
                    .push_bind(*sequence)
                    .push_bind(*position)
                    .push_bind(*hash);
            });
            q.push(
                " ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence, \
                 position = excluded.position, hash = excluded.hash",
            );
            q.build().execute(&mut *tx).await?;
        }
        tx.commit()
            .await
            .map_err(|e| CommitError::Store(crate::error::classify(e, true)))?;
        Ok(plan)
    }

    pub async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE stream = ?1 AND sequence >= ?2 \
             ORDER BY sequence LIMIT ?3"
        ))
        .bind(stream)
        .bind(to_i64(from)?)
        .bind(to_i64(limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    /// What a replay needs of each row (position, sequence, schema version, payload),
    /// without the hashes and metadata a fold never reads.
    pub async fn read_fold(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<FoldRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT position, sequence, schema_version, payload FROM events \
             WHERE stream = ?1 AND sequence >= ?2 ORDER BY sequence LIMIT ?3",
        )
        .bind(stream)
        .bind(to_i64(from)?)
        .bind(to_i64(limit as u64)?)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Rows in (stream, sequence) order after `(stream, sequence)` (keyset paging).
    pub async fn read_by_stream(
        &self,
        stream: &str,
        sequence: u64,
        limit: usize,
    ) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE (stream, sequence) > (?1, ?2) \
             ORDER BY stream, sequence LIMIT ?3"
        ))
        .bind(stream)
        .bind(to_i64(sequence)?)
        .bind(to_i64(limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    pub async fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE position >= ?1 ORDER BY position LIMIT ?2"
        ))
        .bind(to_i64(from)?)
        .bind(to_i64(limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE position > ?1 \
             AND (?2 IS NULL OR stream = ?2) \
             AND (?3 IS NULL OR actor = ?3 OR (stream, json_extract(payload, '$.participant_id')) IN \
                  (SELECT j.stream, json_extract(j.payload, '$.participant_id') FROM events j \
                   WHERE j.event_type = 'ParticipantJoined' \
                   AND json_extract(j.payload, '$.identity') = ?3)) \
             AND (?4 IS NULL OR recorded_at >= ?4) \
             AND (?5 IS NULL OR recorded_at < ?5) \
             AND (?6 IS NULL OR event_type = ?6) \
             ORDER BY position LIMIT ?7"
        ))
        .bind(to_i64(q.after_position)?)
        .bind(q.stream.as_deref())
        .bind(q.identity.as_deref())
        .bind(q.from.map(sqlite_time))
        .bind(q.to.map(sqlite_time))
        .bind(q.event_type.as_deref())
        .bind(to_i64(q.limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    pub async fn streams(&self, prefix: &str) -> Result<Vec<StreamInfo>, StoreError> {
        let rows: Vec<(String, i64, String, String)> = sqlx::query_as(
            "SELECT stream, max(sequence), min(recorded_at), max(recorded_at) FROM events \
             WHERE substr(stream, 1, length(?1)) = ?1 GROUP BY stream ORDER BY stream",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(stream, seq, first_at, last_at)| {
                Ok(StreamInfo {
                    stream,
                    last_sequence: to_u64(seq, 0, "sequence")?,
                    first_at: parse_sqlite_time(&first_at, 0)?,
                    last_at: parse_sqlite_time(&last_at, 0)?,
                })
            })
            .collect()
    }

    pub async fn save_snapshot(
        &self,
        stream: &str,
        sequence: u64,
        state: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (stream, sequence, state, saved_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence, \
             state = excluded.state, saved_at = excluded.saved_at \
             WHERE excluded.sequence >= snapshots.sequence",
        )
        .bind(stream)
        .bind(to_i64(sequence)?)
        .bind(state)
        .bind(sqlite_time(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The snapshot's sequence and JSON text, unparsed.
    pub async fn load_snapshot_text(
        &self,
        stream: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT sequence, state FROM snapshots WHERE stream = ?1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let row: Option<(i64, String, String)> =
            sqlx::query_as("SELECT sequence, state, saved_at FROM snapshots WHERE stream = ?1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?;
        let row = match row {
            Some((seq, state, saved_at)) => Some((seq, state, parse_sqlite_time(&saved_at, 0)?)),
            None => None,
        };
        crate::pg::snapshot(stream, row)
    }
}

/// Decode a row selected with [`COLUMNS`] (by index: the hot path of replay).
fn raw(row: &SqliteRow) -> Result<RawRow, StoreError> {
    let position: i64 = row.try_get(0)?;
    let sequence: i64 = row.try_get(2)?;
    let schema_version: i64 = row.try_get(5)?;
    let recorded_at: String = row.try_get(3)?;
    Ok(RawRow {
        position: to_u64(position, position, "position")?,
        stream: row.try_get(1)?,
        sequence: to_u64(sequence, position, "sequence")?,
        recorded_at: parse_sqlite_time(&recorded_at, position)?,
        actor: row.try_get(4)?,
        schema_version: u32::try_from(schema_version).map_err(|_| StoreError::Corrupt {
            position: to_u64(position, position, "position").unwrap_or(0),
            reason: "schema version out of range".into(),
        })?,
        event_type: row.try_get(6)?,
        payload: row.try_get(7)?,
        prev_hash: row.try_get(8)?,
        hash: row.try_get(9)?,
    })
}
