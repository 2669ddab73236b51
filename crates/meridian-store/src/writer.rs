//! The writer lanes: group commit of concurrent appends.
//!
//! Every append is validated and serialized by its caller ([`prepare`]) and queued on
//! the lane its stream hashes to (one lane on SQLite, several on Postgres; a stream
//! always uses the same lane, so its appends stay in order). A lane takes the first
//! queued append plus everything else already waiting (up to [`MAX_TX_EVENTS`]) and
//! commits them in one transaction: check each append's expected version against its
//! stream's head, take positions, chain each row to the previous row of its stream,
//! insert the rows, move the streams' heads, commit — then answer every caller. On
//! Postgres all of that is one call of the `meridian_append` function (one round trip,
//! heads locked in the database); on SQLite the lane plans the batch itself ([`plan`],
//! heads remembered in a [`HeadCache`]) under `BEGIN IMMEDIATE`. Lanes share no lock:
//! appends to different streams commit in parallel. A conflicting append is answered
//! with a conflict and does not affect the others in the batch. If the transaction
//! fails, every non-conflicting caller gets the error: nothing is acknowledged that was
//! not committed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use meridian_events::{CURRENT_SCHEMA_VERSION, Event, GENESIS_HASH, RecordedEvent, chain_hash};
use tokio::sync::{mpsc, oneshot, watch};

use crate::row::RawRow;
use crate::{
    Backend, ExpectedVersion, MAX_BATCH_EVENTS, MAX_PAYLOAD_BYTES, NewEvent, Reply, StoreError,
    check_name,
};

/// Most events the writer puts in one transaction.
pub(crate) const MAX_TX_EVENTS: usize = 4000;

/// One event, serialized and ready to insert.
pub(crate) struct Prepared {
    pub actor: String,
    pub event: Event,
    pub event_type: &'static str,
    pub payload: String,
}

/// One queued append.
pub(crate) struct Pending {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<Prepared>,
    pub reply: Reply,
}

type Receiver = oneshot::Receiver<Result<Vec<RecordedEvent>, StoreError>>;

/// Validate and serialize an append; `None` for an empty one.
pub(crate) fn prepare(
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<Option<(Pending, Receiver)>, StoreError> {
    check_name("stream", stream)?;
    if events.is_empty() {
        return Ok(None);
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(StoreError::InvalidInput(format!(
            "{} events in one append; at most {MAX_BATCH_EVENTS}",
            events.len()
        )));
    }
    let mut prepared = Vec::with_capacity(events.len());
    for NewEvent { actor, event } in events {
        check_name("actor", &actor)?;
        let payload = event.to_json();
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(StoreError::InvalidInput(format!(
                "{} payload of {} bytes; at most {MAX_PAYLOAD_BYTES}",
                event.event_type(),
                payload.len()
            )));
        }
        prepared.push(Prepared {
            actor,
            event_type: event.event_type(),
            event,
            payload,
        });
    }
    let (reply, rx) = oneshot::channel();
    Ok(Some((
        Pending {
            stream: stream.to_owned(),
            expected,
            events: prepared,
            reply,
        },
        rx,
    )))
}

/// A stream's last row as the writer knows it: its sequence and hash (the next row's
/// `prev_hash`).
pub(crate) type Head = (u64, String);

/// The writer's memory of each stream's head, so a steady stream of appends needs no
/// head lookup. It may be stale when another process appended to the same stream: a
/// stale entry either makes the insert hit the `(stream, sequence)` unique key (the
/// batch is retried with fresh heads) or looks like a conflict (re-checked against the
/// database before it is reported). Updated only after a commit.
#[derive(Default)]
pub(crate) struct HeadCache {
    map: HashMap<String, Head>,
}

/// Most streams remembered before the cache starts over.
const MAX_CACHED_STREAMS: usize = 100_000;

impl HeadCache {
    /// Split the batch's streams into cached heads and streams to look up.
    pub fn lookup(&self, batch: &[Pending]) -> (HashMap<String, Head>, Vec<String>) {
        let mut known = HashMap::new();
        let mut missing = Vec::new();
        for p in batch {
            if known.contains_key(&p.stream) || missing.contains(&p.stream) {
                continue;
            }
            match self.map.get(&p.stream) {
                Some(v) => {
                    known.insert(p.stream.clone(), v.clone());
                }
                None => missing.push(p.stream.clone()),
            }
        }
        (known, missing)
    }

    /// Remember the heads a committed plan left.
    pub fn committed(&mut self, plan: &Plan) {
        if self.map.len() > MAX_CACHED_STREAMS {
            self.map.clear();
        }
        for (stream, head) in &plan.heads {
            self.map.insert(stream.clone(), head.clone());
        }
    }

    /// Forget everything (after a failed or ambiguous commit, or a stale entry).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Streams of a plan's conflicts whose head came from the cache, to re-check.
pub(crate) fn cached_conflicts(batch: &[Pending], plan: &Plan, fresh: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (p, o) in batch.iter().zip(&plan.outcomes) {
        if matches!(o, Outcome::Conflict { .. })
            && !fresh.contains(&p.stream)
            && !out.contains(&p.stream)
        {
            out.push(p.stream.clone());
        }
    }
    out
}

/// Why a backend's commit did not go through.
pub(crate) enum CommitError {
    /// A cached head was stale (unique violation); retry with fresh heads.
    StaleCache,
    /// A real failure.
    Store(StoreError),
}

impl<E: Into<StoreError>> From<E> for CommitError {
    fn from(e: E) -> Self {
        CommitError::Store(e.into())
    }
}

/// What happens to one append of a batch.
pub(crate) enum Outcome {
    /// Its rows are `rows[range]`.
    Rows(Range<usize>),
    /// Its expected version did not match.
    Conflict { actual: u64 },
}

/// The rows a batch inserts, given the streams' heads.
pub(crate) struct Plan {
    pub rows: Vec<RawRow>,
    pub outcomes: Vec<Outcome>,
    /// The new head of every stream the plan appends to: sequence and hash, and the
    /// position of that row.
    pub heads: Vec<(String, Head)>,
    /// The new head rows' positions, parallel to `heads`.
    pub head_positions: Vec<u64>,
}

impl Plan {
    /// Highest position the plan writes (0 when it writes nothing).
    pub fn max_position(&self) -> u64 {
        self.rows.iter().map(|r| r.position).max().unwrap_or(0)
    }
}

/// How many rows `batch` will insert given `heads` (the conflicts write none).
pub(crate) fn rows_needed(heads: &HashMap<String, Head>, batch: &[Pending]) -> usize {
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut n = 0;
    for p in batch {
        let actual = versions
            .get(p.stream.as_str())
            .copied()
            .unwrap_or_else(|| heads.get(&p.stream).map_or(0, |h| h.0));
        if p.expected.accepts(actual) {
            n += p.events.len();
            versions.insert(&p.stream, actual + p.events.len() as u64);
        } else {
            versions.insert(&p.stream, actual);
        }
    }
    n
}

/// Assign sequences, positions (taken in order from `positions`) and per-stream chain
/// hashes to a batch. `positions` must hold at least [`rows_needed`] values.
pub(crate) fn plan(
    heads: &HashMap<String, Head>,
    batch: &[Pending],
    now: DateTime<Utc>,
    positions: &[u64],
) -> Plan {
    let mut heads = heads.clone();
    let mut touched: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut next = positions.iter().copied();
    for p in batch {
        let (actual, mut prev_hash) = heads
            .get(&p.stream)
            .cloned()
            .unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        if !p.expected.accepts(actual) {
            outcomes.push(Outcome::Conflict { actual });
            continue;
        }
        let start = rows.len();
        let mut sequence = actual;
        for e in &p.events {
            sequence += 1;
            let position = next.next().unwrap_or(0);
            let mut row = RawRow {
                position,
                stream: p.stream.clone(),
                sequence,
                recorded_at: now,
                actor: e.actor.clone(),
                schema_version: CURRENT_SCHEMA_VERSION,
                event_type: e.event_type.to_owned(),
                payload: e.payload.clone(),
                prev_hash: prev_hash.clone(),
                hash: String::new(),
            };
            row.hash = chain_hash(&prev_hash, &row.hash_input());
            prev_hash.clone_from(&row.hash);
            rows.push(row);
        }
        if !touched.contains(&p.stream) {
            touched.push(p.stream.clone());
        }
        heads.insert(p.stream.clone(), (sequence, prev_hash));
        outcomes.push(Outcome::Rows(start..rows.len()));
    }
    let mut out_heads = Vec::with_capacity(touched.len());
    let mut head_positions = Vec::with_capacity(touched.len());
    for s in touched {
        let h = heads
            .remove(&s)
            .unwrap_or_else(|| (0, GENESIS_HASH.to_owned()));
        let pos = rows
            .iter()
            .rev()
            .find(|r| r.stream == s)
            .map_or(0, |r| r.position);
        head_positions.push(pos);
        out_heads.push((s, h));
    }
    Plan {
        rows,
        outcomes,
        heads: out_heads,
        head_positions,
    }
}

/// The writer loop; ends when every [`crate::Store`] clone is dropped.
pub(crate) async fn run(
    backend: Backend,
    mut rx: mpsc::Receiver<Pending>,
    head_tx: Arc<watch::Sender<u64>>,
    committed_tx: Arc<watch::Sender<u64>>,
) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut cache = HeadCache::default();
    let mut held = None;
    while let Some(first) = rx.recv().await {
        let mut n = first.events.len();
        batch.push(first);
        while n < MAX_TX_EVENTS {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.events.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // Streams in a fixed order inside every transaction, so two writers (lanes of
        // other processes) touching the same streams wait for each other instead of
        // deadlocking. Each append keeps its own reply, so the order is free.
        batch.sort_by(|a, b| a.stream.cmp(&b.stream));
        let mut result = commit(&backend, &batch, &mut cache, &mut held).await;
        if matches!(result, Err(CommitError::StaleCache)) {
            cache.clear();
            result = commit(&backend, &batch, &mut cache, &mut held).await;
        }
        let result = match result {
            Ok(plan) => {
                cache.committed(&plan);
                Ok(plan)
            }
            Err(CommitError::StaleCache) => Err(StoreError::Database(
                "unique violation on (stream, sequence) with fresh versions".into(),
            )),
            Err(CommitError::Store(e)) => {
                cache.clear();
                Err(e)
            }
        };
        match result {
            Ok(plan) => {
                let head = plan.max_position();
                for tx in [&head_tx, &committed_tx] {
                    tx.send_if_modified(|h| {
                        let moved = head > *h;
                        if moved {
                            *h = head;
                        }
                        moved
                    });
                }
                answer(batch.drain(..), plan);
            }
            Err(e) => {
                tracing::warn!(error = %e, appends = batch.len(), "event log append failed");
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn commit(
    backend: &Backend,
    batch: &[Pending],
    cache: &mut HeadCache,
    held: &mut Option<crate::pg::HeldConn>,
) -> Result<Plan, CommitError> {
    match backend {
        Backend::Postgres(p) => p.commit(batch, held).await,
        Backend::Sqlite(s) => s.commit(batch, cache).await,
    }
}

fn answer(batch: impl Iterator<Item = Pending>, plan: Plan) {
    let mut rows: Vec<Option<RawRow>> = plan.rows.into_iter().map(Some).collect();
    for (p, outcome) in batch.zip(plan.outcomes) {
        let result = match outcome {
            Outcome::Conflict { actual } => Err(StoreError::Conflict {
                stream: p.stream,
                expected: p.expected,
                actual,
            }),
            Outcome::Rows(range) => Ok(rows[range]
                .iter_mut()
                .zip(p.events)
                .filter_map(|(slot, e)| {
                    let r = slot.take()?;
                    Some(RecordedEvent {
                        stream: r.stream,
                        sequence: r.sequence,
                        position: r.position,
                        recorded_at: r.recorded_at,
                        actor: r.actor,
                        schema_version: r.schema_version,
                        event: e.event,
                        hash: r.hash,
                        prev_hash: r.prev_hash,
                    })
                })
                .collect()),
        };
        // The caller may have gone away (cancelled); the events are stored regardless.
        let _ = p.reply.send(result);
    }
}
