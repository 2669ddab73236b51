//! The Postgres backend (a region's log).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::sync::watch;

use meridian_events::CURRENT_SCHEMA_VERSION;

use crate::error::{classify, is_unique_violation};
use crate::row::{FoldRow, RawRow, to_i64, to_u64, truncate_micros};
use crate::writer::{CommitError, Head, Outcome, Pending, Plan};
use crate::{
    AuditQuery, ConnectOptions, ExpectedVersion, LogHead, Snapshot, StoreError, StreamInfo,
};

/// How long a lane's connection may sit idle before a commit pings it first.
const IDLE_PING: Duration = Duration::from_secs(1);

/// What `meridian_append` returns: each append's version before it, then the written
/// rows' positions, prev hashes and hashes.
type AppendResult = (Vec<i64>, Vec<i64>, Vec<String>, Vec<String>);

/// A writer lane's own connection, detached from the pool.
pub(crate) struct HeldConn {
    conn: sqlx::PgConnection,
    last_used: Instant,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// NOTIFY channel; the payload is `<schema> <position>`.
const CHANNEL: &str = "meridian_events";

const COLUMNS: &str = "position, stream, sequence, recorded_at, actor, schema_version, \
                       event_type, payload, prev_hash, hash";

#[derive(Clone)]
pub(crate) struct Pg {
    pub pool: PgPool,
}

/// What the LISTEN task needs; it runs for the store's lifetime.
pub(crate) struct ListenerSetup {
    pool: PgPool,
    schema: String,
}

/// Tell other processes' `wait_for_new` about this process's commits: `pg_notify` with
/// the highest committed position, sent after the append transactions committed, in a
/// transaction of its own, one at a time (positions committed meanwhile are coalesced
/// into the next one).
///
/// Not inside the append transaction: a transaction that notifies holds a cluster-wide
/// lock (Postgres serializes notifying commits so the queue stays in commit order) from
/// before its commit until after its WAL flush, so every lane's commit, and every other
/// notifying client of the server, would wait for the others' flushes one by one. This
/// transaction writes nothing that must survive a crash, so its commit does not wait for
/// a WAL flush (`synchronous_commit` off for it alone) and holds that lock only briefly.
/// A lost notification only delays a waiter (it also polls).
pub(crate) async fn notify_commits(pool: PgPool, mut committed: watch::Receiver<u64>) {
    let mut conn: Option<sqlx::PgConnection> = None;
    while committed.changed().await.is_ok() {
        let position = *committed.borrow_and_update();
        if pool.is_closed() {
            return;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match pool.acquire().await {
                Ok(c) => conn.insert(c.detach()),
                Err(e) => {
                    tracing::debug!(error = %e, "event log notify: no connection");
                    continue;
                }
            },
        };
        let sent = sqlx::query(
            "SELECT set_config('synchronous_commit', 'off', true), \
             pg_notify($1, current_schema()::text || ' ' || $2::text)",
        )
        .bind(CHANNEL)
        .bind(i64::try_from(position).unwrap_or(i64::MAX))
        .execute(&mut *c)
        .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "event log notify failed");
            conn = None;
        }
    }
}

impl ListenerSetup {
    /// Listen for appends by other processes and wake `wait_for_new` callers.
    pub async fn run(self, head_tx: Arc<watch::Sender<u64>>) {
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&self.pool).await?;
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            }
            .await;
            let mut listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "event log LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Ok(n) = listener.recv().await {
                let Some((schema, pos)) = n.payload().split_once(' ') else {
                    continue;
                };
                if schema != self.schema {
                    continue;
                }
                if let Ok(pos) = pos.parse::<u64>() {
                    head_tx.send_if_modified(|h| {
                        let moved = pos > *h;
                        if moved {
                            *h = pos;
                        }
                        moved
                    });
                }
            }
        }
    }
}

fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63
}

impl Pg {
    pub async fn connect(
        url: &str,
        options: &ConnectOptions,
    ) -> Result<(Pg, Option<ListenerSetup>), StoreError> {
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidInput(format!("bad Postgres URL: {e}")))?;
        if let Some(schema) = &options.schema
            && !valid_schema(schema)
        {
            return Err(StoreError::InvalidInput(format!(
                "schema {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
            )));
        }
        // One direct connection first: a server that is down fails here at once with a
        // clear error, where the pool would keep retrying until its acquire timeout.
        let mut conn = sqlx::PgConnection::connect_with(&connect).await?;
        if let Some(schema) = &options.schema {
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        if let Some(schema) = &options.schema {
            connect = connect
                .options([("search_path", schema.as_str())])
                .application_name(&format!("meridian-{schema}"));
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        MIGRATOR.run(&pool).await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&pool)
            .await?;
        let listener = ListenerSetup {
            pool: pool.clone(),
            schema,
        };
        Ok((Pg { pool }, Some(listener)))
    }

    pub async fn head(&self) -> Result<LogHead, StoreError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        head(row)
    }

    /// Commit one batch in one round trip: a call of `meridian_append` (migration
    /// `20261207000002_append_function`), which locks the streams' heads, checks each
    /// append's expected version, takes positions, chains and inserts the rows, moves the
    /// heads and notifies, as one implicit transaction whose commit (one WAL flush) ends
    /// the same round trip.
    ///
    /// It runs on the lane's own connection (`held`: taken from the pool on first use
    /// and after a failure, then detached so a batch costs no pool liveness ping). A
    /// connection idle for longer than [`IDLE_PING`] is pinged first, so a server
    /// restart while the lane was idle costs one reconnect instead of a failed batch.
    pub async fn commit(
        &self,
        batch: &[Pending],
        held: &mut Option<HeldConn>,
    ) -> Result<Plan, CommitError> {
        if self.pool.is_closed() {
            // `Store::close` closes the pool; the lane's own connection goes with it.
            *held = None;
            return Err(CommitError::Store(StoreError::Closed));
        }
        if let Some(h) = held
            && h.last_used.elapsed() > IDLE_PING
            && h.conn.ping().await.is_err()
        {
            *held = None;
        }
        let h = match held {
            Some(h) => h,
            None => held.insert(HeldConn {
                conn: self.pool.acquire().await?.detach(),
                last_used: Instant::now(),
            }),
        };
        let result = Self::commit_on(&mut h.conn, batch).await;
        h.last_used = Instant::now();
        if matches!(result, Err(CommitError::Store(_))) {
            // The connection's state is unknown after a failure: close it and take a
            // fresh one next time.
            *held = None;
        }
        result
    }

    async fn commit_on(
        conn: &mut sqlx::PgConnection,
        batch: &[Pending],
    ) -> Result<Plan, CommitError> {
        let now = truncate_micros(Utc::now());
        let mut streams = Vec::with_capacity(batch.len());
        let mut expected = Vec::with_capacity(batch.len());
        let mut counts = Vec::with_capacity(batch.len());
        let n: usize = batch.iter().map(|p| p.events.len()).sum();
        let mut actors = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        for p in batch {
            streams.push(p.stream.as_str());
            expected.push(match p.expected {
                ExpectedVersion::Any => -1,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(v) => to_i64(v)?,
            });
            counts.push(i32::try_from(p.events.len()).unwrap_or(i32::MAX));
            for e in &p.events {
                actors.push(e.actor.as_str());
                types.push(e.event_type);
                payloads.push(e.payload.as_str());
            }
        }
        let written: Result<AppendResult, _> = sqlx::query_as(
            "SELECT actual, positions, prev_hashes, hashes FROM meridian_append(\
                 $1::text[], $2::bigint[], $3::int[], $4::text[], $5::text[], $6::text[], \
                 $7::int, $8::timestamptz, $9::bigint, $10::text)",
        )
        .bind(&streams)
        .bind(&expected)
        .bind(&counts)
        .bind(&actors)
        .bind(&types)
        .bind(&payloads)
        .bind(i32::try_from(CURRENT_SCHEMA_VERSION).unwrap_or(i32::MAX))
        .bind(now)
        .bind(now.timestamp_micros())
        .bind(None::<&str>)
        .fetch_one(&mut *conn)
        .await;
        let (actual, positions, prev_hashes, hashes) = match written {
            Ok(w) => w,
            // Two processes created the same stream at once: retry with the heads the
            // other one committed.
            Err(e) if is_unique_violation(&e) => return Err(CommitError::StaleCache),
            // The commit is part of the call: a lost connection leaves the outcome
            // unknown.
            Err(e) => return Err(CommitError::Store(classify(e, true))),
        };
        let corrupt = |reason: &str| {
            CommitError::Store(StoreError::Database(format!("meridian_append: {reason}")))
        };
        if actual.len() != batch.len()
            || positions.len() != prev_hashes.len()
            || positions.len() != hashes.len()
        {
            return Err(corrupt("result arrays of unexpected lengths"));
        }
        let mut rows = Vec::with_capacity(positions.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut heads: Vec<(String, Head)> = Vec::new();
        let mut head_positions = Vec::new();
        let mut results = positions.into_iter().zip(prev_hashes).zip(hashes);
        for (p, actual) in batch.iter().zip(actual) {
            let actual = to_u64(actual, 0, "sequence")?;
            if !p.expected.accepts(actual) {
                outcomes.push(Outcome::Conflict { actual });
                continue;
            }
            let start = rows.len();
            for (k, e) in p.events.iter().enumerate() {
                let ((position, prev_hash), hash) = results
                    .next()
                    .ok_or_else(|| corrupt("fewer rows than events"))?;
                rows.push(RawRow {
                    position: to_u64(position, position, "position")?,
                    stream: p.stream.clone(),
                    sequence: actual + k as u64 + 1,
                    recorded_at: now,
                    actor: e.actor.clone(),
                    schema_version: CURRENT_SCHEMA_VERSION,
                    event_type: e.event_type.to_owned(),
                    payload: e.payload.clone(),
                    prev_hash,
                    hash,
                });
            }
            if let Some(last) = rows.last().filter(|_| rows.len() > start) {
                let head = ((last.sequence, last.hash.clone()), last.position);
                match heads.last_mut() {
                    Some((s, h)) if *s == p.stream => {
                        *h = head.0;
                        if let Some(hp) = head_positions.last_mut() {
                            *hp = head.1;
                        }
                    }
                    _ => {
                        heads.push((p.stream.clone(), head.0));
                        head_positions.push(head.1);
                    }
                }
            }
            outcomes.push(Outcome::Rows(start..rows.len()));
        }
        if results.next().is_some() {
            return Err(corrupt("more rows than events"));
        }
        Ok(Plan {
            rows,
            outcomes,
            heads,
            head_positions,
        })
    }

    pub async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE stream = $1 AND sequence >= $2 \
             ORDER BY sequence LIMIT $3"
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
             WHERE stream = $1 AND sequence >= $2 ORDER BY sequence LIMIT $3",
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
            "SELECT {COLUMNS} FROM events WHERE (stream, sequence) > ($1, $2) \
             ORDER BY stream, sequence LIMIT $3"
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
            "SELECT {COLUMNS} FROM events WHERE position >= $1 ORDER BY position LIMIT $2"
        ))
        .bind(to_i64(from)?)
        .bind(to_i64(limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<RawRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events e WHERE position > $1 \
             AND ($2::text IS NULL OR stream = $2) \
             AND ($3::text IS NULL OR actor = $3 OR (stream, payload::jsonb ->> 'participant_id') IN \
                  (SELECT j.stream, j.payload::jsonb ->> 'participant_id' FROM events j \
                   WHERE j.event_type = 'ParticipantJoined' AND j.payload::jsonb ->> 'identity' = $3)) \
             AND ($4::timestamptz IS NULL OR recorded_at >= $4) \
             AND ($5::timestamptz IS NULL OR recorded_at < $5) \
             AND ($6::text IS NULL OR event_type = $6) \
             ORDER BY position LIMIT $7"
        ))
        .bind(to_i64(q.after_position)?)
        .bind(q.stream.as_deref())
        .bind(q.identity.as_deref())
        .bind(q.from)
        .bind(q.to)
        .bind(q.event_type.as_deref())
        .bind(to_i64(q.limit as u64)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw).collect()
    }

    pub async fn streams(&self, prefix: &str) -> Result<Vec<StreamInfo>, StoreError> {
        let rows: Vec<(String, i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT stream, max(sequence), min(recorded_at), max(recorded_at) FROM events \
             WHERE substr(stream, 1, length($1)) = $1 GROUP BY stream ORDER BY stream",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(stream, seq, first_at, last_at)| {
                Ok(StreamInfo {
                    stream,
                    last_sequence: to_u64(seq, 0, "sequence")?,
                    first_at,
                    last_at,
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
            "INSERT INTO snapshots (stream, sequence, state, saved_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence, \
             state = excluded.state, saved_at = excluded.saved_at \
             WHERE excluded.sequence >= snapshots.sequence",
        )
        .bind(stream)
        .bind(to_i64(sequence)?)
        .bind(state)
        .bind(truncate_micros(Utc::now()))
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
            sqlx::query_as("SELECT sequence, state FROM snapshots WHERE stream = $1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let row: Option<(i64, String, DateTime<Utc>)> =
            sqlx::query_as("SELECT sequence, state, saved_at FROM snapshots WHERE stream = $1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?;
        snapshot(stream, row)
    }
}

/// The log head from the last row (position, hash), or the empty head.
pub(crate) fn head(row: Option<(i64, String)>) -> Result<LogHead, StoreError> {
    match row {
        Some((position, hash)) => Ok(LogHead {
            position: to_u64(position, position, "head position")?,
            hash,
        }),
        None => Ok(LogHead {
            position: 0,
            hash: meridian_events::GENESIS_HASH.to_owned(),
        }),
    }
}

pub(crate) fn snapshot(
    stream: &str,
    row: Option<(i64, String, DateTime<Utc>)>,
) -> Result<Option<Snapshot>, StoreError> {
    let Some((sequence, state, saved_at)) = row else {
        return Ok(None);
    };
    // A snapshot that no longer parses is ignored (replay rebuilds it), not an error.
    let Ok(state) = serde_json::from_str(&state) else {
        return Ok(None);
    };
    Ok(Some(Snapshot {
        stream: stream.to_owned(),
        sequence: to_u64(sequence, 0, "snapshot sequence")?,
        state,
        saved_at,
    }))
}

/// Decode a row selected with [`COLUMNS`] (by index: the hot path of replay).
fn raw(row: &PgRow) -> Result<RawRow, StoreError> {
    let position: i64 = row.try_get(0)?;
    let sequence: i64 = row.try_get(2)?;
    let schema_version: i32 = row.try_get(5)?;
    Ok(RawRow {
        position: to_u64(position, position, "position")?,
        stream: row.try_get(1)?,
        sequence: to_u64(sequence, position, "sequence")?,
        recorded_at: row.try_get(3)?,
        actor: row.try_get(4)?,
        schema_version: u32::try_from(schema_version).map_err(|_| StoreError::Corrupt {
            position: to_u64(position, position, "position").unwrap_or(0),
            reason: "negative schema version".into(),
        })?,
        event_type: row.try_get(6)?,
        payload: row.try_get(7)?,
        prev_hash: row.try_get(8)?,
        hash: row.try_get(9)?,
    })
}
