//! The store's behaviour, run against SQLite and Postgres alike.

mod common;

use std::time::Duration;

use common::{Harness, join, leave, publish};
use meridian_events::{Event, GENESIS_HASH, HashInput, RoomState, TrackKind, chain_hash};
use meridian_store::{
    AuditQuery, BreakKind, ExpectedVersion, MAX_BATCH_EVENTS, NewEvent, StoreError,
};

both_stores!(
    append_assigns_sequences_positions_and_chain,
    conflicts_are_typed_and_write_nothing,
    limits_are_enforced,
    concurrent_appends_group_commit_without_gaps,
    wait_for_new_wakes_on_append,
    snapshot_plus_tail_equals_full_replay,
    audit_queries_filter_and_paginate,
    tamper_edit_is_detected,
    tamper_delete_is_detected,
    tamper_swap_is_detected,
    tamper_tail_delete_is_detected,
    tamper_rehash_is_detected_at_next_row,
    survives_reopen,
    two_writers_with_stale_version_caches,
    hashes_match_the_rust_chain_for_any_text,
    mixed_batch_of_conflicts_and_appends,
);

async fn append_assigns_sequences_positions_and_chain(h: &Harness) {
    let s = &h.store;
    let a = s
        .append(
            "room:a",
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("alice", Event::RoomOpened),
                join("p1", "alice"),
            ],
        )
        .await
        .expect("append a");
    let b = s
        .append("room:b", ExpectedVersion::Any, vec![join("p2", "bob")])
        .await
        .expect("append b");
    let a2 = s
        .append(
            "room:a",
            ExpectedVersion::Exact(2),
            vec![publish("alice", "p1", "t1")],
        )
        .await
        .expect("append a2");
    assert_eq!(
        a.iter()
            .map(|e| (e.sequence, e.position))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 2)]
    );
    assert_eq!((b[0].sequence, b[0].position), (1, 3));
    assert_eq!((a2[0].sequence, a2[0].position), (3, 4));
    assert_eq!(a[0].prev_hash, GENESIS_HASH);
    assert_eq!(a[1].prev_hash, a[0].hash);
    assert_eq!(
        b[0].prev_hash, GENESIS_HASH,
        "each stream has its own chain"
    );
    assert_eq!(
        a2[0].prev_hash, a[1].hash,
        "chained to the stream's previous row"
    );

    let stream = s.read_stream("room:a", 1, 100).await.expect("read");
    let mut expected = a.clone();
    expected.extend(a2.clone());
    assert_eq!(stream, expected, "read back equals what append returned");
    assert_eq!(
        s.read_stream("room:a", 3, 100).await.expect("read").len(),
        1
    );
    let all = s.read_all(1, 100).await.expect("read all");
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(s.read_all(3, 1).await.expect("page")[0].position, 3);

    let head = s.head().await.expect("head");
    assert_eq!(
        (head.position, head.hash.as_str()),
        (4, a2[0].hash.as_str())
    );
    let streams = s.streams("room:").await.expect("streams");
    assert_eq!(
        streams
            .iter()
            .map(|i| (i.stream.as_str(), i.last_sequence))
            .collect::<Vec<_>>(),
        vec![("room:a", 3), ("room:b", 1)]
    );
    let report = s.verify_chain().await.expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.checked, 4);

    let state = s.replay_room("room:a").await.expect("replay");
    assert_eq!(state.version, 3);
    assert_eq!(state.tracks["t1"].kind, TrackKind::Video);
}

async fn conflicts_are_typed_and_write_nothing(h: &Harness) {
    let s = &h.store;
    s.append(
        "room:c",
        ExpectedVersion::NoStream,
        vec![join("p1", "alice")],
    )
    .await
    .expect("first");
    let e = s
        .append("room:c", ExpectedVersion::NoStream, vec![join("p2", "bob")])
        .await
        .expect_err("stream exists");
    assert_eq!(
        e,
        StoreError::Conflict {
            stream: "room:c".into(),
            expected: ExpectedVersion::NoStream,
            actual: 1
        }
    );
    let e = s
        .append(
            "room:c",
            ExpectedVersion::Exact(5),
            vec![join("p2", "bob"), join("p3", "carol")],
        )
        .await
        .expect_err("wrong version");
    assert!(matches!(e, StoreError::Conflict { actual: 1, .. }), "{e:?}");
    assert_eq!(s.read_stream("room:c", 1, 10).await.expect("read").len(), 1);
    assert_eq!(s.head().await.expect("head").position, 1);
    assert!(s.verify_chain().await.expect("verify").is_ok());
}

async fn limits_are_enforced(h: &Harness) {
    let s = &h.store;
    let too_many = (0..=MAX_BATCH_EVENTS)
        .map(|i| join(&format!("p{i}"), "x"))
        .collect();
    assert!(matches!(
        s.append("room:l", ExpectedVersion::Any, too_many).await,
        Err(StoreError::InvalidInput(_))
    ));
    let huge = NewEvent::new(
        "x",
        Event::ParticipantJoined {
            participant_id: "p".into(),
            identity: "x".into(),
            name: "n".repeat(70 * 1024),
            resume_hash: None,
        },
    );
    assert!(matches!(
        s.append("room:l", ExpectedVersion::Any, vec![huge]).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        s.append("", ExpectedVersion::Any, vec![join("p", "x")])
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(
        matches!(
            s.append("room:l", ExpectedVersion::Any, vec![join("p", "")])
                .await,
            Err(StoreError::InvalidInput(_))
        ),
        "empty actor"
    );
    assert!(matches!(
        s.read_all(1, 10_001).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(
        s.append("room:l", ExpectedVersion::Any, vec![])
            .await
            .expect("empty append")
            .is_empty()
    );
}

async fn concurrent_appends_group_commit_without_gaps(h: &Harness) {
    let s = &h.store;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..5 {
                let r = s
                    .append(
                        &format!("room:r{i}"),
                        ExpectedVersion::Exact(j),
                        vec![join(&format!("p{j}"), &format!("user{i}"))],
                    )
                    .await
                    .expect("append");
                out.extend(r);
            }
            out
        }));
    }
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.expect("task"));
    }
    acknowledged.sort_by_key(|e| e.position);
    let positions: Vec<u64> = acknowledged.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=160).collect::<Vec<_>>());
    let all = s.read_all(1, 1000).await.expect("read");
    assert_eq!(all, acknowledged);
    assert!(s.verify_chain().await.expect("verify").is_ok());
}

async fn wait_for_new_wakes_on_append(h: &Harness) {
    let s = &h.store;
    let t0 = std::time::Instant::now();
    let head = s
        .wait_for_new(0, Duration::from_millis(100))
        .await
        .expect("timeout wait");
    assert_eq!(head, 0);
    assert!(t0.elapsed() >= Duration::from_millis(100));

    // A waiter on another store (like another node) wakes on this store's append.
    let other = h.reopen().await;
    let waiter = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let head = other
            .wait_for_new(0, Duration::from_secs(10))
            .await
            .expect("wait");
        (head, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.append("room:w", ExpectedVersion::Any, vec![join("p", "a")])
        .await
        .expect("append");
    let (head, waited) = waiter.await.expect("waiter");
    assert_eq!(head, 1);
    assert!(waited < Duration::from_secs(2), "woke after {waited:?}");
    // Same store: wakes at once.
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.wait_for_new(1, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.append("room:w", ExpectedVersion::Any, vec![join("q", "b")])
        .await
        .expect("append");
    assert_eq!(waiter.await.expect("join").expect("wait"), 2);
}

async fn snapshot_plus_tail_equals_full_replay(h: &Harness) {
    let s = &h.store;
    let stream = "room:snap";
    let mut expected_version = 0;
    for i in 0..60 {
        let mut batch = vec![join(&format!("p{i}"), &format!("u{i}"))];
        batch.push(publish(
            &format!("u{i}"),
            &format!("p{i}"),
            &format!("t{i}"),
        ));
        if i % 3 == 0 && i > 0 {
            batch.push(leave(&format!("u{}", i - 1), &format!("p{}", i - 1)));
        }
        let r = s
            .append(stream, ExpectedVersion::Exact(expected_version), batch)
            .await
            .expect("append");
        expected_version = r.last().expect("some").sequence;
        if i == 40 {
            let snap = s.snapshot_room(stream).await.expect("snapshot");
            assert_eq!(snap.version, expected_version);
        }
    }
    let snap = s.load_snapshot(stream).await.expect("load").expect("saved");
    assert!(snap.sequence < expected_version);
    let from_snapshot = s.load_room(stream).await.expect("load room");
    let full = s.replay_room(stream).await.expect("replay");
    assert_eq!(from_snapshot, full);
    assert_eq!(full.version, expected_version);
    let events = s.read_stream(stream, 1, 10_000).await.expect("read");
    assert_eq!(RoomState::from_events(&events), full);
    // An older snapshot never replaces a newer one.
    s.save_snapshot(stream, 1, &serde_json::json!({}))
        .await
        .expect("save");
    assert_eq!(
        s.load_snapshot(stream)
            .await
            .expect("load")
            .expect("s")
            .sequence,
        snap.sequence
    );
}

async fn audit_queries_filter_and_paginate(h: &Harness) {
    let s = &h.store;
    s.append(
        "room:x",
        ExpectedVersion::Any,
        vec![join("p1", "alice"), join("p2", "bob")],
    )
    .await
    .expect("append");
    // The node removes alice's participant: actor is the node, but it concerns alice.
    s.append(
        "room:x",
        ExpectedVersion::Any,
        vec![NewEvent::new(
            "node-1",
            Event::ParticipantLeft {
                participant_id: "p1".into(),
                reason: meridian_events::LeaveReason::Timeout,
            },
        )],
    )
    .await
    .expect("append");
    let mid = s.head().await.expect("head");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.append("room:y", ExpectedVersion::Any, vec![join("p1", "carol")])
        .await
        .expect("append");

    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        };
        f(&mut q);
        q
    };
    let alice = s
        .query(&q(&|q| q.identity = Some("alice".into())))
        .await
        .expect("by identity");
    assert_eq!(
        alice.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![1, 3],
        "alice's join and the node's removal of her, not carol's p1 in room:y"
    );
    let room_x = s
        .query(&q(&|q| q.stream = Some("room:x".into())))
        .await
        .expect("by stream");
    assert_eq!(room_x.len(), 3);
    let before = s
        .query(&q(&|q| q.to = Some(cut)))
        .await
        .expect("before cut");
    assert_eq!(before.len() as u64, mid.position);
    let after = s
        .query(&q(&|q| q.from = Some(cut)))
        .await
        .expect("after cut");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].stream, "room:y");
    let joins = s
        .query(&q(&|q| q.event_type = Some("ParticipantJoined".into())))
        .await
        .expect("by type");
    assert_eq!(joins.len(), 3);
    let page1 = s.query(&q(&|q| q.limit = 2)).await.expect("page 1");
    let page2 = s
        .query(&q(&|q| {
            q.limit = 2;
            q.after_position = 2;
        }))
        .await
        .expect("page 2");
    assert_eq!(
        page1
            .iter()
            .chain(&page2)
            .map(|e| e.position)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

async fn seed(h: &Harness, n: usize) {
    for i in 0..n {
        h.store
            .append(
                "room:t",
                ExpectedVersion::Any,
                vec![join(&format!("p{i}"), &format!("alice{i}"))],
            )
            .await
            .expect("seed");
    }
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
}

async fn tamper_edit_is_detected(h: &Harness) {
    seed(h, 6).await;
    h.tamper(
        "UPDATE events SET payload = replace(payload, 'alice2', 'mallory') WHERE position = 3",
    )
    .await;
    let r = h.store.verify_chain().await.expect("verify");
    let b = r.first_break.expect("break found");
    assert_eq!((b.position, b.kind), (3, BreakKind::HashMismatch));
    assert_eq!(r.checked, 2);
}

async fn tamper_delete_is_detected(h: &Harness) {
    seed(h, 6).await;
    h.tamper("DELETE FROM events WHERE position = 4").await;
    let b = h.store.verify_chain().await.expect("verify").first_break;
    assert_eq!(
        b.map(|b| (b.stream, b.sequence, b.kind)),
        Some((Some("room:t".into()), Some(4), BreakKind::Missing))
    );
}

async fn tamper_swap_is_detected(h: &Harness) {
    seed(h, 6).await;
    h.tamper(
        "UPDATE events SET position = 1000000 WHERE position = 3;
         UPDATE events SET position = 3 WHERE position = 5;
         UPDATE events SET position = 5 WHERE position = 1000000;",
    )
    .await;
    // Sequence 3 now sits at position 5: the hash covers the position.
    let b = h.store.verify_chain().await.expect("verify").first_break;
    assert_eq!(
        b.map(|b| (b.sequence, b.kind)),
        Some((Some(3), BreakKind::HashMismatch))
    );
}

async fn tamper_tail_delete_is_detected(h: &Harness) {
    seed(h, 6).await;
    h.tamper("DELETE FROM events WHERE position = 6").await;
    let b = h.store.verify_chain().await.expect("verify").first_break;
    assert_eq!(
        b.map(|b| (b.position, b.sequence, b.kind)),
        Some((6, Some(6), BreakKind::Missing))
    );
}

/// An editor who also recomputes the edited row's hash is caught at the next row.
async fn tamper_rehash_is_detected_at_next_row(h: &Harness) {
    seed(h, 6).await;
    let rows = h.store.read_all(1, 10).await.expect("read");
    let victim = &rows[1];
    let payload =
        r#"{"type":"ParticipantJoined","participant_id":"p1","identity":"mallory","name":"M"}"#;
    let forged = meridian_events::chain_hash(
        &victim.prev_hash,
        &meridian_events::HashInput {
            stream: &victim.stream,
            sequence: victim.sequence,
            position: victim.position,
            recorded_at: victim.recorded_at,
            actor: &victim.actor,
            schema_version: victim.schema_version,
            event_type: "ParticipantJoined",
            payload,
        },
    );
    h.tamper(&format!(
        "UPDATE events SET payload = '{payload}', hash = '{forged}' WHERE position = 2"
    ))
    .await;
    let b = h.store.verify_chain().await.expect("verify").first_break;
    assert_eq!(
        b.map(|b| (b.position, b.kind)),
        Some((3, BreakKind::PrevHashMismatch))
    );
}

async fn survives_reopen(h: &Harness) {
    seed(h, 3).await;
    let head = h.store.head().await.expect("head");
    let again = h.reopen().await;
    assert_eq!(again.head().await.expect("head"), head);
    let r = again
        .append("room:t", ExpectedVersion::Exact(3), vec![join("px", "z")])
        .await
        .expect("append after reopen");
    assert_eq!(
        (r[0].position, r[0].prev_hash.as_str()),
        (4, head.hash.as_str())
    );
    assert!(again.verify_chain().await.expect("verify").is_ok());
    again.close().await;
}

/// Two stores (two nodes) appending to one stream: each one's remembered stream version
/// goes stale, and neither a false conflict nor a duplicate results.
async fn two_writers_with_stale_version_caches(h: &Harness) {
    let a = &h.store;
    let b = h.reopen().await;
    a.append("room:m", ExpectedVersion::NoStream, vec![join("p1", "a")])
        .await
        .expect("a1");
    b.append("room:m", ExpectedVersion::Exact(1), vec![join("p2", "b")])
        .await
        .expect("b1");
    let r = a
        .append("room:m", ExpectedVersion::Exact(2), vec![join("p3", "a")])
        .await
        .expect("a's stale memory is re-checked, not reported as a conflict");
    assert_eq!(r[0].sequence, 3);
    let r = b
        .append("room:m", ExpectedVersion::Any, vec![join("p4", "b")])
        .await
        .expect("b's stale memory hits the unique key and is retried");
    assert_eq!(r[0].sequence, 4);
    let e = a
        .append("room:m", ExpectedVersion::Exact(3), vec![join("p5", "a")])
        .await
        .expect_err("real conflict");
    assert!(matches!(e, StoreError::Conflict { actual: 4, .. }), "{e:?}");
    let seqs: Vec<u64> = a
        .read_stream("room:m", 1, 10)
        .await
        .expect("read")
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert!(a.verify_chain().await.expect("verify").is_ok());
    b.close().await;
}

/// Postgres computes the chain hash inside `meridian_append`; it must equal the Rust
/// hash byte for byte, also for multi-byte text in every string field.
async fn hashes_match_the_rust_chain_for_any_text(h: &Harness) {
    let s = &h.store;
    let stream = "room:café-日本-🎥";
    let mut prev = GENESIS_HASH.to_owned();
    let mut version = 0;
    for round in 0..3 {
        let events = vec![
            NewEvent::new(
                format!("zoë-{round}"),
                Event::ParticipantJoined {
                    participant_id: format!("p{round}"),
                    identity: "zoë".into(),
                    name: "Zoë \"quoted\" \\ naïve 😀\n".into(),
                    resume_hash: None,
                },
            ),
            NewEvent::new("ü", Event::RoomOpened),
        ];
        let recorded = s
            .append(stream, ExpectedVersion::Exact(version), events)
            .await
            .expect("append");
        for e in &recorded {
            let payload = e.event.to_json();
            let input = HashInput {
                stream: &e.stream,
                sequence: e.sequence,
                position: e.position,
                recorded_at: e.recorded_at,
                actor: &e.actor,
                schema_version: e.schema_version,
                event_type: e.event.event_type(),
                payload: &payload,
            };
            assert_eq!(e.prev_hash, prev);
            assert_eq!(e.hash, chain_hash(&prev, &input), "row {}", e.sequence);
            prev.clone_from(&e.hash);
        }
        version += 2;
    }
    let stored = s.read_stream(stream, 1, 10).await.expect("read");
    assert_eq!(stored.len(), 6);
    assert_eq!(stored[5].hash, prev);
    assert!(s.verify_chain().await.expect("verify").is_ok());
}

/// Appends queued together (one group commit) that conflict are answered with a
/// conflict each, and the others in the same batch still commit.
async fn mixed_batch_of_conflicts_and_appends(h: &Harness) {
    let s = &h.store;
    s.append("room:x", ExpectedVersion::NoStream, vec![join("p0", "a")])
        .await
        .expect("seed");
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (stream, expected) = match i % 4 {
                0 => ("room:x".to_owned(), ExpectedVersion::Exact(1000)),
                1 => ("room:x".to_owned(), ExpectedVersion::Any),
                2 => (format!("room:y{i}"), ExpectedVersion::NoStream),
                _ => (format!("room:y{i}"), ExpectedVersion::Exact(3)),
            };
            let r = s
                .append(&stream, expected, vec![join(&format!("p{i}"), "a")])
                .await;
            (i, r)
        }));
    }
    let mut appended = 0;
    for t in tasks {
        let (i, r) = t.await.expect("task");
        match (i % 4, r) {
            (0 | 3, Err(StoreError::Conflict { .. })) => {}
            (1 | 2, Ok(rec)) => {
                assert_eq!(rec.len(), 1);
                appended += 1;
            }
            (k, r) => panic!("append {i} (kind {k}): {r:?}"),
        }
    }
    assert_eq!(appended, 20);
    let x = s.read_stream("room:x", 1, 100).await.expect("read");
    assert_eq!(x.len(), 11, "the seed and ten Any appends");
    assert!(x.windows(2).all(|w| w[0].sequence + 1 == w[1].sequence));
    assert!(s.verify_chain().await.expect("verify").is_ok());
}
