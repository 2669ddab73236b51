//! `meridian audit …`: the command line and its runner.

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use meridian_events::{RecordedEvent, room_stream};
use meridian_store::{AuditQuery, MAX_QUERY_LIMIT, Store, StoreError};

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
    /// Walk the hash chain; exits non-zero and names the first bad position.
    Verify,
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
        AuditCommand::Verify => {
            let report = match store.verify_chain().await {
                Ok(r) => r,
                Err(StoreError::Corrupt { position, reason }) => {
                    writeln!(out, "chain BROKEN at position {position}: {reason}")?;
                    return Ok(AuditOutcome::ChainBroken { position });
                }
                Err(e) => return Err(e.into()),
            };
            match report.first_break {
                None => writeln!(
                    out,
                    "chain OK: {} events, head position {}, head hash {}",
                    report.checked, report.head.position, report.head.hash
                )?,
                Some(b) => {
                    writeln!(
                        out,
                        "chain BROKEN at position {}: {} ({} events verified before it)",
                        b.position, b.kind, report.checked
                    )?;
                    return Ok(AuditOutcome::ChainBroken {
                        position: b.position,
                    });
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
