//! `meridian audit …`: the command line and its runner.

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use meridian_events::{RecordedEvent, room_stream};
use meridian_store::{
    AuditQuery, MAX_QUERY_LIMIT, SignedCheckpoint, Store, StoreError, parse_public_key,
    read_checkpoints,
};

use crate::AuditError;

/// `meridian audit [--database-url URL | --data-dir DIR] <command>`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// The region log: `postgres://…` or `sqlite://path?mode=ro`.
    #[arg(long, env = "MERIDIAN_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// The embedded log's data directory (used when no URL is given).
    #[arg(long, env = "MERIDIAN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// What to show.
    #[command(subcommand)]
    pub command: AuditCommand,
}

impl AuditArgs {
    /// Open the store these arguments name.
    pub async fn open_store(&self) -> Result<Store, AuditError> {
        match (&self.database_url, &self.data_dir) {
            (Some(url), _) => Ok(Store::connect(url).await?),
            (None, Some(dir)) => Ok(Store::open_embedded(dir).await?),
            (None, None) => Err(AuditError::NoDatabase),
        }
    }
}

/// Output format of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// One JSON object (a recorded event) per line.
    Jsonl,
    /// Comma-separated values with a header row; the event as a JSON column.
    Csv,
}

/// The auditor's queries.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// List rooms with their event counts and first/last activity.
    Rooms,
    /// Every event of one room, in order.
    History {
        /// Room name (without the `room:` prefix).
        #[arg(long)]
        room: String,
    },
    /// Everything a participant identity did or had done to it, across rooms.
    Participant {
        /// The identity (token subject).
        #[arg(long)]
        identity: String,
    },
    /// Every event recorded in `[from, to)`.
    Range {
        /// Start, RFC 3339 (e.g. `2026-11-25T10:00:00Z`), inclusive.
        #[arg(long, value_parser = parse_time)]
        from: DateTime<Utc>,
        /// End, RFC 3339, exclusive.
        #[arg(long, value_parser = parse_time)]
        to: DateTime<Utc>,
    },
    /// The whole log (or one room) as JSON lines or CSV.
    Export {
        /// `jsonl` or `csv`.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Only this room.
        #[arg(long)]
        room: Option<String>,
    },
    /// Verify every stream's hash chain, the stream heads and signed checkpoints;
    /// exits 2 and names the first bad row. Without `--public-key` only the chains and
    /// heads are checked (a history rewritten together with its heads needs a
    /// checkpoint to be caught).
    Verify {
        /// Ed25519 public key(s) of the checkpoint signers: 64 hex digits or a file
        /// holding them (`<data-dir>/keys/log-checkpoint.ed25519.pub`). Repeatable.
        #[arg(long = "public-key")]
        public_key: Vec<String>,
        /// Exported checkpoints (`checkpoints --export`) to check the log against;
        /// without it the checkpoints stored in the log are used (needs a key).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// List the signed checkpoints stored in the log, or export them (JSON lines) to
    /// keep outside the database.
    Checkpoints {
        /// Write every checkpoint to this file (one JSON object per line).
        #[arg(long)]
        export: Option<PathBuf>,
    },
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}); e.g. 2026-11-25T10:00:00Z"))
}

/// How an audit command ended; the binary turns it into its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// The command ran; for `verify`, the chain verified.
    Ok,
    /// `verify` found the chain broken at this position.
    ChainBroken {
        /// The first bad position.
        position: u64,
    },
}

impl AuditOutcome {
    /// Process exit code: 0 when OK, 2 when the chain is broken.
    pub fn exit_code(self) -> i32 {
        match self {
            AuditOutcome::Ok => 0,
            AuditOutcome::ChainBroken { .. } => 2,
        }
    }
}

/// Run one audit command against `store`, writing human-readable (or export) output
/// to `out`. Results are read page by page, so any log size streams in bounded memory.
pub async fn run<W: Write + Send>(
    command: &AuditCommand,
    store: &Store,
    out: &mut W,
) -> Result<AuditOutcome, AuditError> {
    match command {
        AuditCommand::Rooms => {
            writeln!(
                out,
                "{:<32} {:>8}  {:<27}  last event",
                "room", "events", "first event"
            )?;
            for s in store.streams("room:").await? {
                let room = s.stream.strip_prefix("room:").unwrap_or(&s.stream);
                writeln!(
                    out,
                    "{room:<32} {:>8}  {:<27}  {}",
                    s.last_sequence,
                    time(s.first_at),
                    time(s.last_at)
                )?;
            }
        }
        AuditCommand::History { room } => {
            let q = AuditQuery {
                stream: Some(room_stream(room)),
                ..AuditQuery::default()
            };
            each_page(store, q, |e| line(out, e)).await?;
        }
        AuditCommand::Participant { identity } => {
            let q = AuditQuery {
                identity: Some(identity.clone()),
                ..AuditQuery::default()
            };
            each_page(store, q, |e| line(out, e)).await?;
        }
        AuditCommand::Range { from, to } => {
            if from > to {
                return Err(AuditError::InvalidInput("--from is after --to".into()));
            }
            let q = AuditQuery {
                from: Some(*from),
                to: Some(*to),
                ..AuditQuery::default()
            };
            each_page(store, q, |e| line(out, e)).await?;
        }
        AuditCommand::Export { format, room } => {
            let q = AuditQuery {
                stream: room.as_deref().map(room_stream),
                ..AuditQuery::default()
            };
            match format {
                ExportFormat::Jsonl => {
                    each_page(store, q, |e| {
                        serde_json::to_writer(&mut *out, e).map_err(std::io::Error::other)?;
                        writeln!(out)
                    })
                    .await?
                }
                ExportFormat::Csv => {
                    write_csv_header(out)?;
                    each_page(store, q, |e| write_csv_row(out, e)).await?
                }
            }
        }
        AuditCommand::Verify {
            public_key,
            checkpoints,
        } => {
            let keys = public_key
                .iter()
                .map(|k| parse_public_key(k))
                .collect::<Result<Vec<_>, _>>()?;
            let cps: Vec<SignedCheckpoint> = match (checkpoints, keys.is_empty()) {
                (Some(_), true) => {
                    return Err(AuditError::InvalidInput(
                        "--checkpoints needs --public-key to check their signatures".into(),
                    ));
                }
                (Some(path), false) => read_checkpoints(path)?,
                (None, false) => store.checkpoints().await?,
                (None, true) => Vec::new(),
            };
            let report = match store.verify_log(&cps, &keys).await {
                Ok(r) => r,
                Err(StoreError::Corrupt { position, reason }) => {
                    writeln!(out, "chain BROKEN at position {position}: {reason}")?;
                    return Ok(AuditOutcome::ChainBroken { position });
                }
                Err(e) => return Err(e.into()),
            };
            match report.first_break {
                None => {
                    writeln!(
                        out,
                        "chain OK: {} events in {} streams, {} signed checkpoints verified, \
                         head position {}",
                        report.checked, report.streams, report.checkpoints, report.head.position
                    )?;
                    if keys.is_empty() {
                        writeln!(
                            out,
                            "note: no --public-key given; signed checkpoints were not checked"
                        )?;
                    } else if cps.is_empty() {
                        writeln!(out, "note: no signed checkpoint to check against")?;
                    }
                }
                Some(b) => {
                    let at = match (&b.stream, b.sequence) {
                        (Some(s), Some(q)) => format!(" ({s}#{q})"),
                        (Some(s), None) => format!(" ({s})"),
                        _ => String::new(),
                    };
                    let detail = if b.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", b.detail)
                    };
                    writeln!(
                        out,
                        "chain BROKEN at position {}{at}: {}{detail} ({} events verified before it)",
                        b.position, b.kind, report.checked
                    )?;
                    return Ok(AuditOutcome::ChainBroken {
                        position: b.position,
                    });
                }
            }
        }
        AuditCommand::Checkpoints { export } => {
            let cps = store.checkpoints().await?;
            match export {
                Some(path) => {
                    let mut text = String::new();
                    for c in &cps {
                        text.push_str(&serde_json::to_string(c).map_err(std::io::Error::other)?);
                        text.push('\n');
                    }
                    std::fs::write(path, text)?;
                    writeln!(
                        out,
                        "exported {} checkpoints to {}",
                        cps.len(),
                        path.display()
                    )?;
                }
                None => {
                    writeln!(
                        out,
                        "{:>8}  {:<27}  {:>8}  public key",
                        "number", "created", "streams"
                    )?;
                    for c in &cps {
                        let parsed: Option<meridian_store::Checkpoint> =
                            serde_json::from_str(&c.body).ok();
                        writeln!(
                            out,
                            "{:>8}  {:<27}  {:>8}  {}",
                            c.number,
                            parsed
                                .as_ref()
                                .map(|p| time(p.created_at))
                                .unwrap_or_default(),
                            parsed.map_or(0, |p| p.heads.len()),
                            c.public_key
                        )?;
                    }
                }
            }
        }
    }
    Ok(AuditOutcome::Ok)
}

async fn each_page(
    store: &Store,
    mut q: AuditQuery,
    mut f: impl FnMut(&RecordedEvent) -> std::io::Result<()>,
) -> Result<(), AuditError> {
    q.limit = MAX_QUERY_LIMIT;
    loop {
        let page = store.query(&q).await?;
        for e in &page {
            f(e)?;
        }
        match page.last() {
            Some(last) if page.len() == q.limit => q.after_position = last.position,
            _ => return Ok(()),
        }
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn line(out: &mut impl Write, e: &RecordedEvent) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {}  {}#{}  {}  {}  {}",
        e.position,
        time(e.recorded_at),
        e.stream,
        e.sequence,
        e.actor,
        e.event.event_type(),
        e.event.to_json()
    )
}

/// Write the CSV header row used by `export --format csv`.
pub fn write_csv_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "position,stream,sequence,recorded_at,actor,schema_version,event_type,event,hash,prev_hash"
    )
}

pub(crate) fn write_csv_row(out: &mut impl Write, e: &RecordedEvent) -> std::io::Result<()> {
    let fields = [
        e.position.to_string(),
        e.stream.clone(),
        e.sequence.to_string(),
        time(e.recorded_at),
        e.actor.clone(),
        e.schema_version.to_string(),
        e.event.event_type().to_owned(),
        e.event.to_json(),
        e.hash.clone(),
        e.prev_hash.clone(),
    ];
    let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(out, "{}", row.join(","))
}

/// One CSV cell: a cell a spreadsheet would run as a formula (starting with `=`, `+`,
/// `-`, `@`, tab or carriage return) gets a leading `'`, then quoting as RFC 4180.
pub(crate) fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_cells_that_look_like_formulas_are_neutralised() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-2+3"), "'-2+3");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_field("alice"), "alice");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
