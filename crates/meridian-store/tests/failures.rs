//! Bad input and failing databases: clear typed errors, retries, and never an
//! acknowledgement for an event that was not stored.

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{Harness, Kind, join, pg_url};
use meridian_store::{ExpectedVersion, Store, StoreError};
use sqlx::Connection;

#[tokio::test]
async fn postgres_down_at_start_is_unavailable() {
    let e = Store::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .expect_err("nothing listens on port 1");
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());
    let t = Instant::now();
    let e = Store::connect_with_retry(
        "postgres://postgres@127.0.0.1:1/test",
        3,
        Duration::from_millis(20),
    )
    .await
    .expect_err("still down");
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(60), "backed off twice");
}

#[tokio::test]
async fn bad_urls_are_invalid_input() {
    for url in ["mysql://x", "", "postgres://[bad"] {
        let e = Store::connect(url).await.expect_err(url);
        assert!(
            matches!(
                e,
                StoreError::InvalidInput(_) | StoreError::Unavailable { .. }
            ),
            "{url}: {e:?}"
        );
    }
    assert!(matches!(
        Store::connect("mysql://x").await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        Store::connect_with_schema(&pg_url(), "Robert'); DROP TABLE x;--").await,
        Err(StoreError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn sqlite_url_connects_and_migrates() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("x.db").display());
    let s = Store::connect(&url).await.expect("connect");
    s.append("room:a", ExpectedVersion::NoStream, vec![join("p", "a")])
        .await
        .expect("append");
    s.close().await;
    let s = Store::connect(&url)
        .await
        .expect("reconnect runs migrations again");
    assert_eq!(s.head().await.expect("head").position, 1);
}

/// Kill the store's server-side connections in the middle of a burst of appends:
/// some appends fail, the pool reconnects, every acknowledged event is stored and the
/// chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_dropped_mid_run() {
    let h = Harness::new(Kind::Postgres).await;
    let schema = h.schema().expect("schema").to_owned();
    let killer = tokio::spawn(async move {
        let mut admin = admin().await;
        let mut killed = 0i64;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            killed += kill_store_connections(&mut admin, &schema).await;
        }
        killed
    });
    let mut acked = Vec::new();
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_millis(400);
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        match h
            .store
            .append(
                &format!("room:k{}", i % 7),
                ExpectedVersion::Any,
                vec![join(&format!("p{i}"), "u")],
            )
            .await
        {
            Ok(r) => acked.extend(r),
            Err(e) => {
                assert!(
                    e.is_retryable() || matches!(e, StoreError::Database(_)),
                    "{e:?}"
                );
                failures += 1;
            }
        }
    }
    let killed = killer.await.expect("killer");
    assert!(killed > 0, "the test killed connections");
    // The pool reconnects: the next append works.
    let mut ok = false;
    for _ in 0..20 {
        if h.store
            .append("room:after", ExpectedVersion::Any, vec![join("z", "u")])
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "store recovered after connection loss");
    let stored = h.store.read_all(1, 10_000).await.expect("read");
    for a in &acked {
        assert!(
            stored.iter().any(|s| s == a),
            "acknowledged event at {} is stored",
            a.position
        );
    }
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
    eprintln!(
        "{} acked, {failures} failed, {killed} connections killed",
        acked.len()
    );
    h.finish().await;
}

/// A writer lane keeps its connection between batches; when the server dropped it while
/// the lane was idle (a restart, an idle-session timeout), the next append reconnects
/// and succeeds instead of failing.
#[tokio::test]
async fn postgres_lane_connection_lost_while_idle_reconnects() {
    let h = Harness::new(Kind::Postgres).await;
    let schema = h.schema().expect("schema").to_owned();
    h.store
        .append(
            "room:idle",
            ExpectedVersion::NoStream,
            vec![join("p1", "u")],
        )
        .await
        .expect("first append: the lane takes its connection");
    let killed = kill_store_connections(&mut admin().await, &schema).await;
    assert!(killed > 0, "the store's connections were killed");
    // The lane pings a connection idle for more than a second before using it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = h
        .store
        .append(
            "room:idle",
            ExpectedVersion::Exact(1),
            vec![join("p2", "u")],
        )
        .await
        .expect("the lane reconnects after its idle connection was lost");
    assert_eq!(r[0].sequence, 2);
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
    h.finish().await;
}

/// The lease loop keeps its connection between renewals; when the server dropped it
/// (a restart), the next renewal reconnects and succeeds instead of failing a period,
/// which would cost the node a lease term of trust in its view of the region.
#[tokio::test]
async fn postgres_lease_connection_lost_reconnects() {
    let h = Harness::new(Kind::Postgres).await;
    let schema = h.schema().expect("schema").to_owned();
    let ttl = Duration::from_secs(30);
    let a = h
        .store
        .acquire_lease("n1", "local", "ws://n1/signal", "", ttl)
        .await
        .expect("acquire");
    let (renewed, _) = h
        .store
        .renew_lease("n1", &a.incarnation, ttl, false)
        .await
        .expect("first renewal: the lease loop takes its connection");
    assert!(renewed);
    let killed = kill_store_connections(&mut admin().await, &schema).await;
    assert!(killed > 0, "the store's connections were killed");
    let (renewed, leases) = h
        .store
        .renew_lease("n1", &a.incarnation, ttl, true)
        .await
        .expect("the renewal after the cut reconnects");
    assert!(renewed);
    assert_eq!(leases.len(), 1);
    assert!(leases[0].draining, "the renewal after the cut was applied");
    h.finish().await;
}

/// A connection of our own to the test server, to act on the store's from outside.
async fn admin() -> sqlx::PgConnection {
    let opts = sqlx::postgres::PgConnectOptions::from_str(&pg_url()).expect("url");
    sqlx::PgConnection::connect_with(&opts)
        .await
        .expect("admin")
}

/// Terminates every server-side connection of the store using `schema` (they carry
/// the application name `meridian-<schema>`); returns how many.
async fn kill_store_connections(admin: &mut sqlx::PgConnection, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
    )
    .bind(format!("meridian-{schema}"))
    .fetch_one(admin)
    .await
    .expect("terminate")
}
