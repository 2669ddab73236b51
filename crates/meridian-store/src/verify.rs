//! Verification of the log and signed checkpoints.
//!
//! 1. Load `legacy_chain` and every stream head **first**: rows appended while the
//!    check runs are past those heads and are not checked, so a log being written is
//!    never reported as tampered.
//! 2. Legacy rows (positions `1..=legacy.position`, written before per-stream chains):
//!    contiguous positions, each `prev_hash` the previous row's hash, each hash
//!    recomputed, the last hash equal to `legacy.hash`.
//! 3. Every row in (stream, sequence) order up to its stream's loaded head: sequences
//!    contiguous from 1, `prev_hash` the stream's previous row's hash (64 zeros for
//!    the first row), hash recomputed, the head's row carrying the head's hash and
//!    position. A stream with rows but no head is a break unless its head appeared
//!    meanwhile (a stream created during the check).
//! 4. Every signed checkpoint (signature checked with the given keys): its legacy end
//!    equals the log's, and each head it signed is a row of the verified chains with
//!    that hash — so history rewritten and re-chained in the database, or truncated
//!    below a signed head, is caught.

use std::collections::HashMap;

use chrono::Utc;
use ed25519_dalek::{SigningKey, VerifyingKey};
use meridian_events::{GENESIS_HASH, chain_hash};

use crate::checkpoint::{Checkpoint, SignedCheckpoint, StreamHead, heads_digest};
use crate::row::{RawRow, sqlite_time, to_i64, to_u64};
use crate::{
    Backend, BreakKind, ChainBreak, LogHead, MAX_QUERY_LIMIT, Store, StoreError, VerifyReport,
};

/// A checkpoint's claim about one row: (checkpoint number, hash).
type Claim = (u64, String);

fn brk(
    position: u64,
    stream: Option<&str>,
    sequence: Option<u64>,
    kind: BreakKind,
    detail: impl Into<String>,
) -> ChainBreak {
    ChainBreak {
        position,
        stream: stream.map(str::to_owned),
        sequence,
        kind,
        detail: detail.into(),
    }
}

impl Store {
    /// Every stream's head as committed now, ordered by stream.
    pub async fn stream_heads(&self) -> Result<Vec<StreamHead>, StoreError> {
        let rows: Vec<(String, i64, i64, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT stream, sequence, position, hash FROM stream_heads ORDER BY stream"
        )
        .fetch_all(pool)
        .await?);
        rows.into_iter()
            .map(|(stream, seq, pos, hash)| {
                Ok(StreamHead {
                    sequence: to_u64(seq, pos, "head sequence")?,
                    position: to_u64(pos, pos, "head position")?,
                    stream,
                    hash,
                })
            })
            .collect()
    }

    async fn has_stream_head(&self, stream: &str) -> Result<bool, StoreError> {
        let n: i64 = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT count(*) FROM stream_heads WHERE stream = $1"
        )
        .bind(stream)
        .fetch_one(pool)
        .await?);
        Ok(n > 0)
    }

    /// Where the global chain of rows written before per-stream chains ends.
    pub async fn legacy_chain(&self) -> Result<LogHead, StoreError> {
        let (position, hash): (i64, String) = on_pool!(self, pool => sqlx::query_as(
            "SELECT position, hash FROM legacy_chain WHERE id = 1"
        )
        .fetch_one(pool)
        .await?);
        Ok(LogHead {
            position: to_u64(position, position, "legacy position")?,
            hash,
        })
    }

    /// Every signed checkpoint stored in the log, by number.
    pub async fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, StoreError> {
        let rows: Vec<(i64, String, String, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT number, body, public_key, signature FROM log_checkpoints ORDER BY number"
        )
        .fetch_all(pool)
        .await?);
        rows.into_iter()
            .map(|(number, body, public_key, signature)| {
                Ok(SignedCheckpoint {
                    number: to_u64(number, 0, "checkpoint number")?,
                    body,
                    public_key,
                    signature,
                })
            })
            .collect()
    }

    /// Sign every stream head with `key` and store the checkpoint (numbered after the
    /// last one). Returns `None` when nothing changed since the last checkpoint.
    pub async fn checkpoint(
        &self,
        key: &SigningKey,
    ) -> Result<Option<SignedCheckpoint>, StoreError> {
        let last: Option<(i64, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT number, body FROM log_checkpoints ORDER BY number DESC LIMIT 1"
        )
        .fetch_optional(pool)
        .await?);
        let legacy = self.legacy_chain().await?;
        let heads = self.stream_heads().await?;
        let digest = heads_digest(&legacy, &heads);
        let (number, prev) = match &last {
            Some((n, body)) => {
                if let Ok(cp) = serde_json::from_str::<Checkpoint>(body)
                    && heads_digest(&cp.legacy, &cp.heads) == digest
                {
                    return Ok(None);
                }
                let prev = SignedCheckpoint {
                    number: 0,
                    body: body.clone(),
                    public_key: String::new(),
                    signature: String::new(),
                }
                .digest();
                (to_u64(*n, 0, "checkpoint number")? + 1, prev)
            }
            None => (1, GENESIS_HASH.to_owned()),
        };
        let created_at = crate::row::truncate_micros(Utc::now());
        let cp = Checkpoint {
            number,
            created_at,
            legacy,
            prev,
            heads,
        };
        let signed = SignedCheckpoint::sign(&cp, key)?;
        let sql = "INSERT INTO log_checkpoints (number, created_at, body, public_key, signature) \
                   VALUES ($1, $2, $3, $4, $5)";
        match &self.inner.backend {
            Backend::Postgres(p) => {
                sqlx::query(sql)
                    .bind(to_i64(number)?)
                    .bind(created_at)
                    .bind(&signed.body)
                    .bind(&signed.public_key)
                    .bind(&signed.signature)
                    .execute(&p.pool)
                    .await?;
            }
            Backend::Sqlite(s) => {
                sqlx::query(sql)
                    .bind(to_i64(number)?)
                    .bind(sqlite_time(created_at))
                    .bind(&signed.body)
                    .bind(&signed.public_key)
                    .bind(&signed.signature)
                    .execute(&s.pool)
                    .await?;
            }
        }
        Ok(Some(signed))
    }

    async fn stream_page(&self, stream: &str, sequence: u64) -> Result<Vec<RawRow>, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(p) => p.read_by_stream(stream, sequence, MAX_QUERY_LIMIT).await,
            Backend::Sqlite(s) => s.read_by_stream(stream, sequence, MAX_QUERY_LIMIT).await,
        }
    }

    /// Verify the log (see the module docs of `verify`): the legacy chain, every
    /// stream's chain up to the head loaded at the start, the heads, and each of
    /// `checkpoints` — whose signatures must verify with one of `keys` — against the
    /// log. Reports the first break found.
    pub async fn verify_log(
        &self,
        checkpoints: &[SignedCheckpoint],
        keys: &[VerifyingKey],
    ) -> Result<VerifyReport, StoreError> {
        // 1. Heads first: everything after them is newer and not checked.
        let legacy = self.legacy_chain().await?;
        let heads_list = self.stream_heads().await?;
        let top = self.head().await?;
        let head = LogHead {
            position: top
                .position
                .max(heads_list.iter().map(|h| h.position).max().unwrap_or(0)),
            hash: top.hash,
        };
        let mut report = VerifyReport {
            checked: 0,
            streams: heads_list.len() as u64,
            checkpoints: 0,
            head,
            first_break: None,
        };
        let heads: HashMap<String, StreamHead> = heads_list
            .into_iter()
            .map(|h| (h.stream.clone(), h))
            .collect();

        // Checkpoints: signatures, links, legacy end; collect their claims.
        let mut claims: HashMap<String, Vec<(u64, Claim)>> = HashMap::new();
        let mut prev: Option<&SignedCheckpoint> = None;
        for sc in checkpoints {
            let cp = match sc.open(keys) {
                Ok(cp) => cp,
                Err(why) => {
                    report.first_break = Some(brk(0, None, None, BreakKind::BadSignature, why));
                    return Ok(report);
                }
            };
            if let Some(p) = prev
                && p.number + 1 == sc.number
                && cp.prev != p.digest()
            {
                report.first_break = Some(brk(
                    0,
                    None,
                    None,
                    BreakKind::CheckpointMismatch,
                    format!(
                        "checkpoint {} does not link to checkpoint {}",
                        sc.number, p.number
                    ),
                ));
                return Ok(report);
            }
            prev = Some(sc);
            if cp.legacy != legacy {
                report.first_break = Some(brk(
                    legacy.position,
                    None,
                    None,
                    BreakKind::CheckpointMismatch,
                    format!(
                        "checkpoint {} signed the legacy chain's end at position {}",
                        cp.number, cp.legacy.position
                    ),
                ));
                return Ok(report);
            }
            for h in cp.heads {
                claims
                    .entry(h.stream)
                    .or_default()
                    .push((h.sequence, (cp.number, h.hash)));
            }
            report.checkpoints += 1;
        }

        // 2. The legacy global chain.
        if let Some(b) = self.verify_legacy(&legacy, &mut report.checked).await? {
            report.first_break = Some(b);
            return Ok(report);
        }

        // 3. Every stream's chain, in (stream, sequence) order.
        let mut walk = StreamWalk {
            legacy_end: legacy.position,
            heads: &heads,
            claims: &mut claims,
            current: None,
            unknown: Vec::new(),
            seen: HashMap::new(),
            counted: false,
        };
        let (mut after_stream, mut after_seq) = (String::new(), 0u64);
        loop {
            let page = self.stream_page(&after_stream, after_seq).await?;
            let done = page.len() < MAX_QUERY_LIMIT;
            for r in &page {
                if let Some(b) = walk.row(r) {
                    report.first_break = Some(b);
                    return Ok(report);
                }
                if walk.counted {
                    report.checked += r_counted(r, legacy.position);
                }
            }
            match page.last() {
                Some(last) if !done => {
                    after_stream.clone_from(&last.stream);
                    after_seq = last.sequence;
                }
                _ => break,
            }
        }
        if let Some(b) = walk.finish_stream() {
            report.first_break = Some(b);
            return Ok(report);
        }
        // Streams with heads but no rows at all.
        for h in heads.values() {
            if !walk.seen.contains_key(&h.stream) {
                report.first_break = Some(brk(
                    h.position,
                    Some(&h.stream),
                    Some(1),
                    BreakKind::Missing,
                    "the stream's head exists but none of its rows",
                ));
                return Ok(report);
            }
        }
        // Streams with rows but no head: created during the check, or head deleted.
        for (stream, position) in std::mem::take(&mut walk.unknown) {
            if !self.has_stream_head(&stream).await? {
                report.first_break = Some(brk(
                    position,
                    Some(&stream),
                    None,
                    BreakKind::HeadMismatch,
                    "the stream has rows but no head in stream_heads",
                ));
                return Ok(report);
            }
        }
        // 4. Every signed head must have been met as a verified row.
        let mut left: Vec<(String, u64, Claim)> = walk
            .claims
            .drain()
            .flat_map(|(s, v)| v.into_iter().map(move |(q, c)| (s.clone(), q, c)))
            .collect();
        left.sort();
        if let Some((stream, seq, (number, _))) = left.into_iter().next() {
            report.first_break = Some(brk(
                heads.get(&stream).map_or(0, |h| h.position),
                Some(&stream),
                Some(seq),
                BreakKind::CheckpointMismatch,
                format!(
                    "checkpoint {number} signed {stream}#{seq}, which the log no longer holds \
                     up to its head"
                ),
            ));
        }
        Ok(report)
    }

    async fn verify_legacy(
        &self,
        legacy: &LogHead,
        checked: &mut u64,
    ) -> Result<Option<ChainBreak>, StoreError> {
        let mut prev_hash = GENESIS_HASH.to_owned();
        let mut expected = 1u64;
        while expected <= legacy.position {
            let page = self.raw_page(expected, MAX_QUERY_LIMIT).await?;
            if page.is_empty() {
                break;
            }
            for r in page.iter().take_while(|r| r.position <= legacy.position) {
                let at = |kind, d: &str| Some(brk(expected, None, None, kind, d));
                if r.position != expected {
                    return Ok(at(BreakKind::Missing, "gap in the legacy chain"));
                }
                if r.prev_hash != prev_hash {
                    return Ok(at(BreakKind::PrevHashMismatch, ""));
                }
                let computed = chain_hash(&prev_hash, &r.hash_input());
                if computed != r.hash {
                    return Ok(at(BreakKind::HashMismatch, ""));
                }
                prev_hash = computed;
                expected += 1;
                *checked += 1;
            }
            if page.last().is_some_and(|r| r.position >= legacy.position) {
                break;
            }
        }
        if expected <= legacy.position {
            return Ok(Some(brk(
                expected,
                None,
                None,
                BreakKind::Missing,
                "the legacy chain ends early",
            )));
        }
        if prev_hash != legacy.hash {
            return Ok(Some(brk(
                legacy.position,
                None,
                None,
                BreakKind::HeadMismatch,
                "legacy_chain does not match the legacy chain's last row",
            )));
        }
        Ok(None)
    }
}

/// Rows of the stream walk counted as checked (legacy rows were counted already).
fn r_counted(r: &RawRow, legacy_end: u64) -> u64 {
    u64::from(r.position > legacy_end)
}

/// The state of the walk over rows in (stream, sequence) order.
struct StreamWalk<'a> {
    legacy_end: u64,
    heads: &'a HashMap<String, StreamHead>,
    claims: &'a mut HashMap<String, Vec<(u64, Claim)>>,
    /// Stream being walked: name, next expected sequence, previous row's hash and
    /// position, its head (None: no head loaded).
    current: Option<Current>,
    /// Streams met without a loaded head, with their first row's position.
    unknown: Vec<(String, u64)>,
    /// Streams met.
    seen: HashMap<String, ()>,
    /// Whether the last row was checked (not skipped).
    counted: bool,
}

struct Current {
    stream: String,
    next: u64,
    prev_hash: String,
    prev_position: u64,
    head: Option<StreamHead>,
}

impl StreamWalk<'_> {
    /// Check one row; `None` when it is fine (or not ours to check).
    fn row(&mut self, r: &RawRow) -> Option<ChainBreak> {
        self.counted = false;
        if self.current.as_ref().is_none_or(|c| c.stream != r.stream) {
            if let Some(b) = self.finish_stream() {
                return Some(b);
            }
            let head = self.heads.get(&r.stream).cloned();
            if head.is_none() {
                self.unknown.push((r.stream.clone(), r.position));
            }
            self.seen.insert(r.stream.clone(), ());
            self.current = Some(Current {
                stream: r.stream.clone(),
                next: 1,
                prev_hash: GENESIS_HASH.to_owned(),
                prev_position: 0,
                head,
            });
        }
        let legacy_end = self.legacy_end;
        let c = self.current.as_mut()?;
        let head = c.head.as_ref()?;
        if r.sequence > head.sequence {
            return None; // appended after the heads were loaded
        }
        let at = |kind, d: &str| Some(brk(r.position, Some(&r.stream), Some(r.sequence), kind, d));
        if r.sequence != c.next {
            return Some(brk(
                r.position,
                Some(&r.stream),
                Some(c.next),
                BreakKind::Missing,
                format!("gap: next row found is #{}", r.sequence),
            ));
        }
        if r.position > legacy_end {
            if r.prev_hash != c.prev_hash {
                return at(BreakKind::PrevHashMismatch, "");
            }
            if chain_hash(&c.prev_hash, &r.hash_input()) != r.hash {
                return at(BreakKind::HashMismatch, "");
            }
            if r.position <= c.prev_position {
                return at(
                    BreakKind::PrevHashMismatch,
                    "positions out of order in the stream",
                );
            }
        }
        if r.sequence == head.sequence && (r.hash != head.hash || r.position != head.position) {
            return at(
                BreakKind::HeadMismatch,
                "stream_heads disagrees with this row",
            );
        }
        if let Some(list) = self.claims.get_mut(&r.stream) {
            let mut bad = None;
            list.retain(|(seq, (number, hash))| {
                if *seq != r.sequence {
                    return true;
                }
                if *hash != r.hash {
                    bad = Some(*number);
                }
                false
            });
            if let Some(number) = bad {
                return at(
                    BreakKind::CheckpointMismatch,
                    &format!("checkpoint {number} signed another hash for this row"),
                );
            }
        }
        c.next += 1;
        c.prev_hash.clone_from(&r.hash);
        c.prev_position = r.position;
        self.counted = true;
        None
    }

    /// The walk left the current stream: it must have reached its head.
    fn finish_stream(&mut self) -> Option<ChainBreak> {
        let c = self.current.take()?;
        let head = c.head?;
        if c.next <= head.sequence {
            return Some(brk(
                head.position,
                Some(&c.stream),
                Some(c.next),
                BreakKind::Missing,
                format!(
                    "stream ends at #{} but its head is #{}",
                    c.next - 1,
                    head.sequence
                ),
            ));
        }
        None
    }
}
