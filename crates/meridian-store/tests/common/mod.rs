//! Test harness: the same tests against SQLite (a temp dir) and the real Postgres (a
//! schema of its own per test, dropped at the end even if the test panics).
#![allow(dead_code)]

use std::str::FromStr;

use meridian_events::{Event, LeaveReason, TrackKind};
use meridian_store::{NewEvent, Store};
use sqlx::Connection;

/// Where the Postgres tests connect; they fail (not skip) when it is down.
pub fn pg_url() -> String {
    std::env::var("MERIDIAN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Embedded SQLite in a temp dir.
    Sqlite,
    /// Postgres in a fresh schema.
    Postgres,
}

/// A store plus the means to reach its database with plain SQL.
pub struct Harness {
    pub store: Store,
    pub kind: Kind,
    dir: Option<tempfile::TempDir>,
    schema: Option<SchemaGuard>,
}

/// Drops the test's schema when dropped (also on panic).
struct SchemaGuard {
    url: String,
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        let schema = self.schema.clone();
        // Runs on its own thread and runtime: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .execute(&mut c)
                        .await;
                    let _ = c.close().await;
                }
            });
        })
        .join();
    }
}

impl Harness {
    pub async fn new(kind: Kind) -> Harness {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = Store::open_embedded(dir.path())
                    .await
                    .expect("open embedded store");
                Harness {
                    store,
                    kind,
                    dir: Some(dir),
                    schema: None,
                }
            }
            Kind::Postgres => {
                let schema = format!("t_{:016x}", rand::random::<u64>());
                let guard = SchemaGuard {
                    url: pg_url(),
                    schema: schema.clone(),
                };
                let store = Store::connect_with_schema(&pg_url(), &schema)
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "Postgres at {} is required for these tests (start it with \
                             `pg_ctlcluster --skip-systemctl-redirect 15 main start`): {e}",
                            pg_url()
                        )
                    });
                Harness {
                    store,
                    kind,
                    dir: None,
                    schema: Some(guard),
                }
            }
        }
    }

    /// The Postgres schema of this test, if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_ref().map(|s| s.schema.as_str())
    }

    /// Open another store on the same database (a restart, or a second node).
    pub async fn reopen(&self) -> Store {
        match self.kind {
            Kind::Sqlite => Store::open_embedded(self.dir.as_ref().expect("dir").path())
                .await
                .expect("reopen"),
            Kind::Postgres => Store::connect_with_schema(&pg_url(), self.schema().expect("schema"))
                .await
                .expect("reconnect"),
        }
    }

    /// Tamper with the log: run `sql` with the append-only triggers disabled
    /// (Postgres: `DISABLE TRIGGER USER` around it; SQLite: the triggers are dropped).
    pub async fn tamper(&self, sql: &str) {
        match self.kind {
            Kind::Sqlite => {
                self.exec(&format!(
                    "DROP TRIGGER IF EXISTS events_no_update; \
                     DROP TRIGGER IF EXISTS events_no_delete; {sql}"
                ))
                .await
            }
            Kind::Postgres => {
                self.exec(&format!(
                    "ALTER TABLE events DISABLE TRIGGER USER; {sql}; \
                     ALTER TABLE events ENABLE TRIGGER USER;"
                ))
                .await
            }
        }
    }

    /// Run plain SQL on the store's database, bypassing the store (for tampering).
    pub async fn exec(&self, sql: &str) {
        self.try_exec(sql).await.expect("tamper sql");
    }

    /// Run plain SQL on the store's database; the database's error as text.
    pub async fn try_exec(&self, sql: &str) -> Result<(), String> {
        match self.kind {
            Kind::Sqlite => {
                let path = self.dir.as_ref().expect("dir").path().join("events.db");
                let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut c = sqlx::SqliteConnection::connect_with(&opts)
                    .await
                    .expect("sqlite connect");
                let r = sqlx::raw_sql(sql).execute(&mut c).await;
                c.close().await.expect("close");
                r.map(|_| ()).map_err(|e| e.to_string())
            }
            Kind::Postgres => {
                let opts = sqlx::postgres::PgConnectOptions::from_str(&pg_url())
                    .expect("url")
                    .options([("search_path", self.schema().expect("schema"))]);
                let mut c = sqlx::PgConnection::connect_with(&opts)
                    .await
                    .expect("pg connect");
                let r = sqlx::raw_sql(sql).execute(&mut c).await;
                c.close().await.expect("close");
                r.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    }

    /// Close the store (the schema is dropped when the harness drops).
    pub async fn finish(self) {
        self.store.close().await;
    }
}

/// Run an async test body against both backends as two `#[tokio::test]`s.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let h = common::Harness::new(common::Kind::Sqlite).await;
                super::$name(&h).await;
                h.finish().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let h = common::Harness::new(common::Kind::Postgres).await;
                super::$name(&h).await;
                h.finish().await;
            }
        }
    )*};
}

/// A join by `identity` as participant `p`.
pub fn join(p: &str, identity: &str) -> NewEvent {
    NewEvent::new(
        identity,
        Event::ParticipantJoined {
            participant_id: p.into(),
            identity: identity.into(),
            name: identity.to_uppercase(),
            resume_hash: None,
        },
    )
}

/// A video publish of track `t` by participant `p` (actor `identity`).
pub fn publish(identity: &str, p: &str, t: &str) -> NewEvent {
    NewEvent::new(
        identity,
        Event::TrackPublished {
            track_id: t.into(),
            participant_id: p.into(),
            kind: TrackKind::Video,
            layers: vec!["q".into(), "h".into(), "f".into()],
            codec: "VP8".into(),
        },
    )
}

/// A leave of participant `p` (actor `identity`).
pub fn leave(identity: &str, p: &str) -> NewEvent {
    NewEvent::new(
        identity,
        Event::ParticipantLeft {
            participant_id: p.into(),
            reason: LeaveReason::Left,
        },
    )
}
