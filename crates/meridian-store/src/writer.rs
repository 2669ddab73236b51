//! The writer task: group commit of concurrent appends.
//!
//! Every append is validated and serialized by its caller ([`prepare`]) and queued.
//! The writer takes the first queued append plus everything else already waiting (up
//! to [`MAX_TX_EVENTS`]) and commits them in one transaction: lock the head, read the
//! streams' versions, check each append's expected version ([`plan`]), insert the rows,
//! move the head, commit — then answer every caller. A conflicting append is answered
//! with a conflict and does not affect the others in the batch. If the transaction
//! fails, every non-conflicting caller gets the error: nothing is acknowledged that was
//! not committed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use meridian_events::{CURRENT_SCHEMA_VERSION, Event, RecordedEvent, chain_hash};
use tokio::sync::{mpsc, oneshot, watch};

use crate::row::RawRow;
use crate::{
    Backend, ExpectedVersion, LogHead, MAX_BATCH_EVENTS, MAX_PAYLOAD_BYTES, NewEvent, Reply,
    StoreError, check_name,
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

/// The writer's memory of each stream's last sequence, so a steady stream of appends
/// needs no version lookup. It may be stale when another process appended to the same
/// stream: a stale entry either makes the insert hit the `(stream, sequence)` unique
/// key (the batch is retried with fresh versions) or looks like a conflict (re-checked
/// against the database before it is reported). Updated only after a commit.
#[derive(Default)]
pub(crate) struct VersionCache {
    map: HashMap<String, u64>,
}

/// Most streams remembered before the cache starts over.
const MAX_CACHED_STREAMS: usize = 100_000;

impl VersionCache {
    /// Split the batch's streams into cached versions and streams to look up.
    pub fn lookup(&self, batch: &[Pending]) -> (HashMap<String, u64>, Vec<String>) {
        let mut known = HashMap::new();
        let mut missing = Vec::new();
        for p in batch {
            if known.contains_key(&p.stream) || missing.contains(&p.stream) {
                continue;
            }
            match self.map.get(&p.stream) {
                Some(v) => {
                    known.insert(p.stream.clone(), *v);
                }
                None => missing.push(p.stream.clone()),
            }
        }
        (known, missing)
    }

    /// Remember the versions a committed plan left.
    pub fn committed(&mut self, batch: &[Pending], plan: &Plan) {
        if self.map.len() > MAX_CACHED_STREAMS {
            self.map.clear();
        }
        for (p, o) in batch.iter().zip(&plan.outcomes) {
            match o {
                Outcome::Rows(r) => {
                    if let Some(last) = r.end.checked_sub(1).and_then(|i| plan.rows.get(i)) {
                        self.map.insert(p.stream.clone(), last.sequence);
                    }
                }
                Outcome::Conflict { actual } => {
                    self.map.insert(p.stream.clone(), *actual);
                }
            }
        }
    }

    /// Forget everything (after a failed or ambiguous commit, or a stale entry).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Streams of a plan's conflicts whose version came from the cache, to re-check.
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
    /// A cached version was stale (unique violation); retry with fresh versions.
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

/// The rows a batch inserts, given the locked head and the streams' versions.
pub(crate) struct Plan {
    pub rows: Vec<RawRow>,
    pub outcomes: Vec<Outcome>,
    pub head: LogHead,
}

/// Assign sequences, positions and hashes to a batch.
pub(crate) fn plan(
    head: LogHead,
    versions: &HashMap<String, u64>,
    batch: &[Pending],
    now: DateTime<Utc>,
) -> Plan {
    let mut versions = versions.clone();
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut position = head.position;
    let mut prev_hash = head.hash;
    for p in batch {
        let actual = versions.get(&p.stream).copied().unwrap_or(0);
        if !p.expected.accepts(actual) {
            outcomes.push(Outcome::Conflict { actual });
            continue;
        }
        let start = rows.len();
        let mut sequence = actual;
        for e in &p.events {
            sequence += 1;
            position += 1;
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
        versions.insert(p.stream.clone(), sequence);
        outcomes.push(Outcome::Rows(start..rows.len()));
    }
    Plan {
        rows,
        outcomes,
        head: LogHead {
            position,
            hash: prev_hash,
        },
    }
}

/// The writer loop; ends when every [`crate::Store`] clone is dropped.
pub(crate) async fn run(
    backend: Backend,
    mut rx: mpsc::Receiver<Pending>,
    head_tx: Arc<watch::Sender<u64>>,
) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut cache = VersionCache::default();
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
        let mut result = commit(&backend, &batch, &mut cache).await;
        if matches!(result, Err(CommitError::StaleCache)) {
            cache.clear();
            result = commit(&backend, &batch, &mut cache).await;
        }
        let result = match result {
            Ok(plan) => {
                cache.committed(&batch, &plan);
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
                let head = plan.head.position;
                head_tx.send_if_modified(|h| {
                    let moved = head > *h;
                    if moved {
                        *h = head;
                    }
                    moved
                });
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
    cache: &mut VersionCache,
) -> Result<Plan, CommitError> {
    match backend {
        Backend::Postgres(p) => p.commit(batch, cache).await,
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
