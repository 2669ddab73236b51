//! Tamper evidence beyond the chain: signed checkpoints, append-only triggers,
//! verification of a log being written, old (global-chain) logs migrated, lease times
//! from the database clock, snapshots every N events. On SQLite and Postgres.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::{Harness, join};
use meridian_events::{GENESIS_HASH, HashInput, chain_hash};
use meridian_store::{BreakKind, ExpectedVersion, NodeLease, SigningKey, Store, StoreError};

both_stores!(
    rechained_history_is_caught_by_signed_checkpoint,
    checkpoints_skip_unchanged_heads_and_link,
    append_only_triggers_refuse_update_and_delete,
    verify_while_appending_reports_no_tampering,
    deleted_stream_head_is_detected,
    lease_times_come_from_the_database_clock,
    snapshot_every_n_events_bounds_replay,
);

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

async fn seed_two_rooms(h: &Harness) {
    for i in 0..6 {
        h.store
            .append(
                "room:t",
                ExpectedVersion::Any,
                vec![join(&format!("p{i}"), &format!("alice{i}"))],
            )
            .await
            .expect("seed t");
    }
    for i in 0..3 {
        h.store
            .append(
                "room:u",
                ExpectedVersion::Any,
                vec![join(&format!("q{i}"), &format!("bob{i}"))],
            )
            .await
            .expect("seed u");
    }
}

/// Issue 19 §3's reproduction: edit a row, delete rows, recompute the chain and the
/// head in the database. The chains alone then verify; the signed checkpoint does not.
async fn rechained_history_is_caught_by_signed_checkpoint(h: &Harness) {
    seed_two_rooms(h).await;
    let k = key(1);
    let cp = h
        .store
        .checkpoint(&k)
        .await
        .expect("checkpoint")
        .expect("new");
    let exported = vec![cp];
    let ok = h
        .store
        .verify_log(&exported, &[k.verifying_key()])
        .await
        .expect("verify");
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!((ok.checked, ok.streams, ok.checkpoints), (9, 2, 1));

    // Rewrite room:t: edit #2, drop #5 and #6, re-chain #1..#4 and move its head.
    let rows = h.store.read_stream("room:t", 1, 100).await.expect("read");
    let mut sql = String::new();
    let mut prev = GENESIS_HASH.to_owned();
    for e in rows.iter().take(4) {
        let payload = if e.sequence == 2 {
            r#"{"type":"ParticipantJoined","participant_id":"p1","identity":"mallory","name":"M"}"#
                .to_owned()
        } else {
            e.event.to_json()
        };
        let hash = chain_hash(
            &prev,
            &HashInput {
                stream: &e.stream,
                sequence: e.sequence,
                position: e.position,
                recorded_at: e.recorded_at,
                actor: &e.actor,
                schema_version: e.schema_version,
                event_type: e.event.event_type(),
                payload: &payload,
            },
        );
        sql.push_str(&format!(
            "UPDATE events SET payload = '{payload}', prev_hash = '{prev}', hash = '{hash}' \
             WHERE stream = 'room:t' AND sequence = {};",
            e.sequence
        ));
        prev = hash;
    }
    sql.push_str(&format!(
        "DELETE FROM events WHERE stream = 'room:t' AND sequence > 4; \
         UPDATE stream_heads SET sequence = 4, position = {}, hash = '{prev}' \
         WHERE stream = 'room:t'",
        rows[3].position
    ));
    h.tamper(&sql).await;

    let chains_only = h.store.verify_chain().await.expect("verify");
    assert!(
        chains_only.is_ok(),
        "without an anchor the rewrite is invisible: {chains_only:?}"
    );
    let r = h
        .store
        .verify_log(&exported, &[k.verifying_key()])
        .await
        .expect("verify");
    let b = r.first_break.expect("caught by the checkpoint");
    assert_eq!(b.kind, BreakKind::CheckpointMismatch, "{b}");
    assert_eq!(b.stream.as_deref(), Some("room:t"));
    assert_eq!(b.sequence, Some(6), "the signed head #6 is gone: {b}");

    // A checkpoint checked with another key is refused.
    let r = h
        .store
        .verify_log(&exported, &[key(2).verifying_key()])
        .await
        .expect("verify");
    assert_eq!(r.first_break.map(|b| b.kind), Some(BreakKind::BadSignature));
}

async fn checkpoints_skip_unchanged_heads_and_link(h: &Harness) {
    let k = key(3);
    let first = h.store.checkpoint(&k).await.expect("cp").expect("first");
    assert_eq!(first.number, 1);
    assert!(h.store.checkpoint(&k).await.expect("cp").is_none());
    seed_two_rooms(h).await;
    let second = h.store.checkpoint(&k).await.expect("cp").expect("second");
    assert_eq!(second.number, 2);
    let opened = second.open(&[k.verifying_key()]).expect("opens");
    assert_eq!(opened.prev, first.digest());
    assert_eq!(opened.heads.len(), 2);
    let all = h.store.checkpoints().await.expect("list");
    assert_eq!(all, vec![first, second]);
    let r = h
        .store
        .verify_log(&all, &[k.verifying_key()])
        .await
        .expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.checkpoints, 2);
    // Truncating the stream below a signed head (rows and head) is caught.
    h.tamper(
        "DELETE FROM events WHERE stream = 'room:u' AND sequence = 3; \
         DELETE FROM stream_heads WHERE stream = 'room:u'; \
         INSERT INTO stream_heads (stream, sequence, position, hash) \
         SELECT stream, sequence, position, hash FROM events \
         WHERE stream = 'room:u' AND sequence = 2",
    )
    .await;
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
    let r = h
        .store
        .verify_log(&all, &[k.verifying_key()])
        .await
        .expect("verify");
    let b = r.first_break.expect("truncation caught");
    assert_eq!(
        (b.kind, b.stream.as_deref(), b.sequence),
        (BreakKind::CheckpointMismatch, Some("room:u"), Some(3))
    );
}

async fn append_only_triggers_refuse_update_and_delete(h: &Harness) {
    seed_two_rooms(h).await;
    let e = h
        .try_exec("UPDATE events SET actor = 'mallory' WHERE position = 2")
        .await
        .expect_err("UPDATE refused");
    assert!(e.contains("append-only"), "{e}");
    let e = h
        .try_exec("DELETE FROM events WHERE position = 2")
        .await
        .expect_err("DELETE refused");
    assert!(e.contains("append-only"), "{e}");
    if h.kind == common::Kind::Postgres {
        let e = h
            .try_exec("TRUNCATE events")
            .await
            .expect_err("TRUNCATE refused");
        assert!(e.contains("append-only"), "{e}");
    }
    h.store.checkpoint(&key(4)).await.expect("cp");
    let e = h
        .try_exec("DELETE FROM log_checkpoints")
        .await
        .expect_err("checkpoints are append-only too");
    assert!(e.contains("append-only"), "{e}");
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
    assert_eq!(h.store.read_all(1, 100).await.expect("read").len(), 9);
}

/// Issue 17 item 10: verify reads only up to the heads it loaded, so a log being
/// written never looks tampered.
async fn verify_while_appending_reports_no_tampering(h: &Harness) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let store = h.store.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let stream = format!("room:w{}", (n + w) % 24);
                store
                    .append(
                        &stream,
                        ExpectedVersion::Any,
                        vec![join(&format!("p{w}-{n}"), "writer")],
                    )
                    .await
                    .expect("append");
                n += 1;
            }
            n
        }));
    }
    let k = key(5);
    let mut runs = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline || runs < 5 {
        let _ = h.store.checkpoint(&k).await.expect("checkpoint");
        let cps = h.store.checkpoints().await.expect("list");
        let r = h
            .store
            .verify_log(&cps, &[k.verifying_key()])
            .await
            .expect("verify");
        assert!(r.is_ok(), "false alarm while appending: {r:?}");
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.expect("writer");
    }
    assert!(total > 50, "appends ran alongside ({total})");
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
}

async fn deleted_stream_head_is_detected(h: &Harness) {
    seed_two_rooms(h).await;
    h.exec("DELETE FROM stream_heads WHERE stream = 'room:u'")
        .await;
    let b = h
        .store
        .verify_chain()
        .await
        .expect("verify")
        .first_break
        .expect("break");
    assert_eq!(
        (b.kind, b.stream.as_deref()),
        (BreakKind::HeadMismatch, Some("room:u"))
    );
}

/// Issue 19 §4: a node's clock does not enter lease times. The API takes no `now`;
/// a reader whose clock is an hour off still judges liveness right.
async fn lease_times_come_from_the_database_clock(h: &Harness) {
    let s = &h.store;
    let db_now = s.db_now().await.expect("db clock");
    assert!((db_now - Utc::now()).num_seconds().abs() < 5);
    let a = s
        .acquire_lease(
            "n1",
            "local",
            "ws://n1/signal",
            "10.0.0.1:7883",
            Duration::from_secs(30),
        )
        .await
        .expect("acquire");
    assert!(a.expires_at > db_now);
    assert!(
        !s.expire_lease("n1", &a.incarnation).await.expect("expire"),
        "a live lease is not expired, whatever the caller's clock"
    );
    let mut l = s.leases().await.expect("leases").remove(0);
    assert_eq!(
        l.internal_addr.as_deref(),
        Some("10.0.0.1:7883"),
        "the internal listener's address is published in the lease"
    );
    assert!(l.is_live(Utc::now()));
    assert!(!l.is_live(Utc::now() + chrono::TimeDelta::seconds(31)));
    // The same lease seen by a node whose clock runs an hour ahead.
    let skew = chrono::TimeDelta::hours(1);
    l.read_at += skew;
    assert!(l.is_live(Utc::now() + skew), "skew does not expire it");

    let b = s
        .acquire_lease(
            "n2",
            "local",
            "ws://n2/signal",
            "",
            Duration::from_millis(200),
        )
        .await
        .expect("acquire");
    let n2 = s.leases().await.expect("leases");
    assert_eq!(n2[1].internal_addr, None, "none published");
    // A renewal reads every lease in the same round trip: its own with the new
    // expiry and draining flag, the others exactly as they were.
    let (renewed, after) = s
        .renew_lease("n2", &b.incarnation, Duration::from_millis(200), true)
        .await
        .expect("renew");
    assert!(renewed);
    assert_eq!(after.len(), 2);
    let untouched = NodeLease {
        read_at: after[0].read_at,
        db_now: after[0].db_now,
        ..n2[0].clone()
    };
    assert_eq!(after[0], untouched, "the other node's lease is as it was");
    assert_eq!(after[1].node, "n2");
    assert!(after[1].draining, "the draining flag is set by the renewal");
    assert!(
        after[1].expires_at >= b.expires_at,
        "renewed from the database's clock"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s.expire_lease("n2", &b.incarnation).await.expect("expire"));
    assert!(
        !s.expire_lease("n2", &b.incarnation)
            .await
            .expect("only once")
    );
    let (renewed, left) = s
        .renew_lease("n2", &b.incarnation, Duration::from_secs(1), false)
        .await
        .expect("renew");
    assert!(!renewed, "an expired lease is not renewed");
    assert_eq!(left.len(), 1, "nor brought back");
    assert_eq!(left[0].node, "n1");
    assert!(left[0].is_live(Utc::now()), "the other lease is untouched");
    // A stale incarnation changes nothing either.
    let (renewed, after) = s
        .renew_lease("n1", "not-the-incarnation", Duration::from_millis(1), true)
        .await
        .expect("renew");
    assert!(!renewed);
    assert_eq!(after[0].expires_at, left[0].expires_at);
    assert!(!after[0].draining);
}

async fn snapshot_every_n_events_bounds_replay(h: &Harness) {
    let s = h.reopen().await;
    s.set_snapshot_every(16);
    s.append(
        "room:s",
        ExpectedVersion::NoStream,
        vec![meridian_store::NewEvent::new(
            "a",
            meridian_events::Event::RoomOpened,
        )],
    )
    .await
    .expect("open");
    for i in 0..40 {
        s.append(
            "room:s",
            ExpectedVersion::Any,
            vec![join(&format!("p{i}"), &format!("id{i}"))],
        )
        .await
        .expect("append");
    }
    // Snapshots are written in the background after the append that crossed N.
    let mut snap = None;
    for _ in 0..100 {
        snap = s.load_snapshot("room:s").await.expect("snapshot");
        if snap.as_ref().is_some_and(|x| x.sequence >= 32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = snap.expect("a snapshot was saved");
    assert!(
        (32..=41).contains(&snap.sequence),
        "every 16 events: {}",
        snap.sequence
    );
    let loaded = s.load_room("room:s").await.expect("load");
    let replayed = s.replay_room("room:s").await.expect("replay");
    assert_eq!(loaded, replayed, "snapshot + tail = full replay");
    assert_eq!(loaded.version, 41);
    close(s).await;
}

async fn close(s: Store) {
    s.close().await;
}

#[allow(dead_code)]
fn _unused(_: StoreError) {}
