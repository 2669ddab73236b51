//! The Postgres backend (a region's log).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::sync::watch;

use crate::error::{classify, is_unique_violation};
use crate::row::{FoldRow, RawRow, to_i64, to_u64, truncate_micros};
use crate::writer::{
    CommitError, Head, HeadCache, Pending, Plan, cached_conflicts, plan, rows_needed,
};
use crate::{AuditQuery, ConnectOptions, LogHead, Snapshot, StoreError, StreamInfo};

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

    /// Heads of `streams` as committed now.
    async fn heads(
        tx: &mut sqlx::PgConnection,
        streams: &[String],
        into: &mut HashMap<String, Head>,
    ) -> Result<(), StoreError> {
        if streams.is_empty() {
            return Ok(());
        }
        let found: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT stream, sequence, hash FROM stream_heads WHERE stream = ANY($1::text[])",
        )
        .bind(streams)
        .fetch_all(&mut *tx)
        .await?;
        for s in streams {
            into.remove(s);
        }
        for (s, v, h) in found {
            into.insert(s, (to_u64(v, 0, "sequence")?, h));
        }
        Ok(())
    }

    pub async fn commit(
        &self,
        batch: &[Pending],
        cache: &mut HeadCache,
    ) -> Result<Plan, CommitError> {
        let mut tx = self.pool.begin().await?;
        let (mut heads, missing) = cache.lookup(batch);
        Self::heads(&mut tx, &missing, &mut heads).await?;
        let now = truncate_micros(Utc::now());
        let mut probe = plan(&heads, batch, now, &[]);
        let recheck = cached_conflicts(batch, &probe, &missing);
        if !recheck.is_empty() {
            Self::heads(&mut tx, &recheck, &mut heads).await?;
            probe = plan(&heads, batch, now, &[]);
        }
        let n = rows_needed(&heads, batch);
        if n == 0 {
            tx.rollback().await?;
            return Ok(probe);
        }
        let positions: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval('events_position_seq') FROM generate_series(1, $1::int)",
        )
        .bind(i32::try_from(n).unwrap_or(i32::MAX))
        .fetch_all(&mut *tx)
        .await?;
        let mut positions: Vec<u64> = positions
            .into_iter()
            .map(|p| to_u64(p, p, "position"))
            .collect::<Result<_, _>>()?;
        positions.sort_unstable();
        let plan = plan(&heads, batch, now, &positions);
        let n = plan.rows.len();
        let mut position = Vec::with_capacity(n);
        let mut stream = Vec::with_capacity(n);
        let mut sequence = Vec::with_capacity(n);
        let mut recorded_at = Vec::with_capacity(n);
        let mut actor = Vec::with_capacity(n);
        let mut schema_version = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut payload = Vec::with_capacity(n);
        let mut prev_hash = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        for r in &plan.rows {
            position.push(to_i64(r.position)?);
            stream.push(r.stream.as_str());
            sequence.push(to_i64(r.sequence)?);
            recorded_at.push(r.recorded_at);
            actor.push(r.actor.as_str());
            schema_version.push(i32::try_from(r.schema_version).unwrap_or(i32::MAX));
            event_type.push(r.event_type.as_str());
            payload.push(r.payload.as_str());
            prev_hash.push(r.prev_hash.as_str());
            hash.push(r.hash.as_str());
        }
        let inserted = sqlx::query(
            "INSERT INTO events (position, stream, sequence, recorded_at, actor, schema_version, \
             event_type, payload, prev_hash, hash) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::timestamptz[], \
             $5::text[], $6::int[], $7::text[], $8::text[], $9::text[], $10::text[])",
        )
        .bind(&position)
        .bind(&stream)
        .bind(&sequence)
        .bind(&recorded_at)
        .bind(&actor)
        .bind(&schema_version)
        .bind(&event_type)
        .bind(&payload)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            // A duplicate (stream, sequence) means a cached head was stale (another
            // process appended to the stream): retry with fresh heads.
            if is_unique_violation(&e) {
                return Err(CommitError::StaleCache);
            }
            return Err(e.into());
        }
        let head_stream: Vec<&str> = plan.heads.iter().map(|(s, _)| s.as_str()).collect();
        let head_seq: Vec<i64> = plan
            .heads
            .iter()
            .map(|(_, h)| to_i64(h.0))
            .collect::<Result<_, _>>()?;
        let head_hash: Vec<&str> = plan.heads.iter().map(|(_, h)| h.1.as_str()).collect();
        let head_pos: Vec<i64> = plan
            .head_positions
            .iter()
            .map(|p| to_i64(*p))
            .collect::<Result<_, _>>()?;
        sqlx::query(
            "INSERT INTO stream_heads (stream, sequence, position, hash) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[]) \
             ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence, \
             position = excluded.position, hash = excluded.hash",
        )
        .bind(&head_stream)
        .bind(&head_seq)
        .bind(&head_pos)
        .bind(&head_hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, current_schema()::text || ' ' || $2::text)")
            .bind(CHANNEL)
            .bind(to_i64(plan.max_position())?)
            .execute(&mut *tx)
            .await?;
        tx.commit()
            .await
            .map_err(|e| CommitError::Store(classify(e, true)))?;
        Ok(plan)
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
