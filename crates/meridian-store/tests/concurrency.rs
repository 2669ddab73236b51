//! Property: appenders racing on one room stream never lose, duplicate or reorder an
//! acknowledged event, and replaying the stream equals the state a tailing node built
//! live. Runs on both stores with a small case count; half the appenders write through
//! a second store on the same database, as a second node would.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Harness, Kind};
use meridian_events::{Command, LeaveReason, RecordedEvent, RoomState, decide};
use meridian_store::{ExpectedVersion, NewEvent, StoreError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Per appender: the sizes of its successive appends (joins per append).
type Case = Vec<Vec<usize>>;

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(prop::collection::vec(1usize..=3, 1..=4), 2..=6)
}

static STREAMS: AtomicUsize = AtomicUsize::new(0);

/// One appender: decide on fresh state, append at that version, retry on conflict.
async fn appender(
    store: meridian_store::Store,
    stream: String,
    who: usize,
    sizes: Vec<usize>,
) -> Vec<Vec<RecordedEvent>> {
    let mut acked = Vec::new();
    for (k, size) in sizes.into_iter().enumerate() {
        loop {
            let state = store.replay_room(&stream).await.expect("replay");
            let mut scratch = state.clone();
            let mut events = Vec::new();
            for m in 0..size {
                let cmd = Command::Join {
                    participant_id: format!("p{who}-{k}-{m}"),
                    identity: format!("user{who}"),
                    name: format!("User {who}"),
                    resume_hash: None,
                };
                for e in decide(&scratch, &cmd).expect("join is valid") {
                    scratch.apply_event(&e);
                    events.push(NewEvent::new(format!("user{who}"), e));
                }
            }
            if k % 2 == 1 {
                let cmd = Command::Leave {
                    participant_id: format!("p{who}-{}-0", k - 1),
                    reason: LeaveReason::Left,
                };
                for e in decide(&scratch, &cmd).expect("own participant is present") {
                    scratch.apply_event(&e);
                    events.push(NewEvent::new(format!("user{who}"), e));
                }
            }
            match store
                .append(&stream, ExpectedVersion::Exact(state.version), events)
                .await
            {
                Ok(recorded) => {
                    acked.push(recorded);
                    break;
                }
                Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }
    acked
}

async fn run_case(h: &Harness, second: &meridian_store::Store, case: Case) {
    let stream = format!("room:prop{}", STREAMS.fetch_add(1, Ordering::Relaxed));
    let start = h.store.head().await.expect("head").position;

    // A tailing "node" folds the stream live from the global log.
    let tail_store = h.store.clone();
    let tail_stream = stream.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let tailer = tokio::spawn(async move {
        let mut state = RoomState::default();
        let mut next = start + 1;
        loop {
            let page = tail_store.read_all(next, 1000).await.expect("tail");
            for e in &page {
                next = e.position + 1;
                if e.stream == tail_stream {
                    assert_eq!(e.sequence, state.version + 1, "tail sees sequence order");
                    state.apply(e);
                }
            }
            if page.is_empty() {
                if *stop_rx.borrow_and_update() {
                    return state;
                }
                let _ = tail_store
                    .wait_for_new(next - 1, Duration::from_millis(50))
                    .await
                    .expect("wait");
            }
        }
    });

    let tasks: Vec<_> = case
        .into_iter()
        .enumerate()
        .map(|(who, sizes)| {
            // Odd appenders go through a second store: a second node on the same log.
            let store = if who % 2 == 0 { &h.store } else { second };
            tokio::spawn(appender(store.clone(), stream.clone(), who, sizes))
        })
        .collect();
    let mut acked: Vec<Vec<RecordedEvent>> = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("appender"));
    }

    for batch in &acked {
        for pair in batch.windows(2) {
            assert_eq!(
                pair[1].sequence,
                pair[0].sequence + 1,
                "batch is contiguous"
            );
            // Postgres takes positions from a sequence, which concurrent appends to
            // other streams (or a losing racer) draw from too: increasing, with gaps.
            assert!(
                pair[1].position > pair[0].position,
                "positions increase within a batch"
            );
        }
    }
    let mut flat: Vec<RecordedEvent> = acked.into_iter().flatten().collect();
    flat.sort_by_key(|e| e.sequence);
    let stored = h.store.read_stream(&stream, 1, 10_000).await.expect("read");
    assert_eq!(
        stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "sequences are 1..=n"
    );
    assert_eq!(stored, flat, "exactly the acknowledged events, in order");
    assert!(
        stored.windows(2).all(|w| w[0].position < w[1].position),
        "positions follow sequences"
    );

    let replayed = h.store.replay_room(&stream).await.expect("replay");
    assert_eq!(replayed, RoomState::from_events(&flat));
    let _ = stop_tx.send(true);
    let live = tailer.await.expect("tailer");
    assert_eq!(live, replayed, "live tail state equals replay");
    assert!(h.store.verify_chain().await.expect("verify").is_ok());
}

fn property(kind: Kind) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let h = rt.block_on(Harness::new(kind));
    let second = rt.block_on(h.reopen());
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |c| {
            rt.block_on(run_case(&h, &second, c));
            Ok(())
        })
        .expect("property holds");
    rt.block_on(second.close());
    rt.block_on(h.finish());
}

#[test]
fn racing_appenders_sqlite() {
    property(Kind::Sqlite);
}

#[test]
fn racing_appenders_postgres() {
    property(Kind::Postgres);
}
