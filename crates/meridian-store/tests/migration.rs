//! A log written before per-stream chains (one global chain under `log_head`) is
//! migrated in place: its rows keep their hashes and verify as the legacy chain, new
//! rows chain per stream from each stream's last old row.

mod common;

use std::str::FromStr;

use chrono::{DateTime, Utc};
use meridian_events::{Event, GENESIS_HASH, HashInput, chain_hash};
use meridian_store::{BreakKind, ExpectedVersion, NewEvent, SigningKey, Store};
use sqlx::Connection;

/// The migrations that predate per-stream chains.
const OLD: [&str; 2] = ["20260101000001_event_log.sql", "20260201000001_cluster.sql"];

fn old_migrations(dialect: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(dialect);
    for f in OLD {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy migration");
    }
    dir
}

/// Old-style rows: (stream, sequence) in position order, globally chained.
/// An old row: position, stream, sequence, time, payload, prev_hash, hash.
type OldRow = (u64, String, u64, DateTime<Utc>, String, String, String);

fn old_rows() -> Vec<OldRow> {
    let t = DateTime::parse_from_rfc3339("2026-01-01T12:00:00.000001Z")
        .expect("time")
        .with_timezone(&Utc);
    let order = [
        ("room:a", 1),
        ("room:b", 1),
        ("room:a", 2),
        ("room:a", 3),
        ("room:b", 2),
    ];
    let mut prev = GENESIS_HASH.to_owned();
    let mut out = Vec::new();
    for (i, (stream, seq)) in order.iter().enumerate() {
        let position = i as u64 + 1;
        let payload = Event::RoomOpened.to_json();
        let hash = chain_hash(
            &prev,
            &HashInput {
                stream,
                sequence: *seq,
                position,
                recorded_at: t,
                actor: "old",
                schema_version: 1,
                event_type: "RoomOpened",
                payload: &payload,
            },
        );
        out.push((
            position,
            stream.to_string(),
            *seq,
            t,
            payload,
            prev.clone(),
            hash.clone(),
        ));
        prev = hash;
    }
    out
}

fn insert_sql(time: impl Fn(DateTime<Utc>) -> String) -> String {
    let rows = old_rows();
    let mut sql = String::new();
    for (position, stream, seq, t, payload, prev, hash) in &rows {
        sql.push_str(&format!(
            "INSERT INTO events (position, stream, sequence, recorded_at, actor, schema_version, \
             event_type, payload, prev_hash, hash) VALUES ({position}, '{stream}', {seq}, \
             '{}', 'old', 1, 'RoomOpened', '{payload}', '{prev}', '{hash}');",
            time(*t)
        ));
    }
    let last = rows.last().expect("rows");
    sql.push_str(&format!(
        "UPDATE log_head SET position = {}, hash = '{}' WHERE id = 1;",
        last.0, last.6
    ));
    sql
}

async fn check_migrated(store: &Store) {
    let r = store.verify_chain().await.expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!((r.checked, r.streams), (5, 2));
    let legacy = store.legacy_chain().await.expect("legacy");
    assert_eq!(legacy.position, 5);
    let old = old_rows();
    let a = store
        .append(
            "room:a",
            ExpectedVersion::Exact(3),
            vec![NewEvent::new("new", Event::RoomClosed)],
        )
        .await
        .expect("append after migration");
    assert_eq!(a[0].position, 6);
    assert_eq!(a[0].prev_hash, old[3].6, "chained to room:a's last old row");
    let c = store
        .append(
            "room:c",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("new", Event::RoomOpened)],
        )
        .await
        .expect("new stream");
    assert_eq!(c[0].prev_hash, GENESIS_HASH);
    let key = SigningKey::from_bytes(&[9; 32]);
    let cp = store.checkpoint(&key).await.expect("cp").expect("new");
    let r = store
        .verify_log(&[cp], &[key.verifying_key()])
        .await
        .expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.checked, 7);
}

#[tokio::test]
async fn sqlite_log_with_global_chain_migrates() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("events.db");
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .expect("open");
        let m = old_migrations("sqlite");
        sqlx::migrate::Migrator::new(m.path())
            .await
            .expect("migrator")
            .run(&mut c)
            .await
            .expect("old migrations");
        sqlx::raw_sql(&insert_sql(|t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        }))
        .execute(&mut c)
        .await
        .expect("old rows");
        c.close().await.expect("close");
    }
    let store = Store::open_embedded(dir.path()).await.expect("migrate");
    check_migrated(&store).await;
    // A legacy row edited is named by its position.
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let mut c = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .expect("open");
    sqlx::raw_sql(
        "DROP TRIGGER events_no_update; UPDATE events SET actor = 'mallory' WHERE position = 2",
    )
    .execute(&mut c)
    .await
    .expect("tamper");
    let b = store
        .verify_chain()
        .await
        .expect("verify")
        .first_break
        .expect("break");
    assert_eq!((b.position, b.kind), (2, BreakKind::HashMismatch));
    store.close().await;
}

#[tokio::test]
async fn postgres_log_with_global_chain_migrates() {
    let url = common::pg_url();
    let schema = format!("t_{:016x}", rand::random::<u64>());
    let opts = sqlx::postgres::PgConnectOptions::from_str(&url)
        .expect("url")
        .options([("search_path", schema.as_str())]);
    {
        let mut c = sqlx::PgConnection::connect(&url).await.expect("pg");
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&mut c)
            .await
            .expect("schema");
        c.close().await.expect("close");
        let mut c = sqlx::PgConnection::connect_with(&opts).await.expect("pg");
        let m = old_migrations("postgres");
        sqlx::migrate::Migrator::new(m.path())
            .await
            .expect("migrator")
            .run(&mut c)
            .await
            .expect("old migrations");
        sqlx::raw_sql(&insert_sql(|t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        }))
        .execute(&mut c)
        .await
        .expect("old rows");
        c.close().await.expect("close");
    }
    let (u, sc) = (url.clone(), schema.clone());
    let result = async move {
        let store = Store::connect_with_schema(&u, &sc).await.expect("migrate");
        check_migrated(&store).await;
        // The next position continues after the old ones.
        let r = store
            .append(
                "room:b",
                ExpectedVersion::Exact(2),
                vec![NewEvent::new("new", Event::RoomClosed)],
            )
            .await
            .expect("append");
        assert_eq!(r[0].position, 8);
        store.close().await;
    };
    let outcome = tokio::spawn(result).await;
    let mut c = sqlx::PgConnection::connect(&url).await.expect("pg");
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut c)
        .await;
    outcome.expect("test body");
}
