//! Event log benchmark: append latency and throughput at 1, 16 and 256 concurrent room
//! streams, replay rate, and room rebuild time with and without a snapshot.
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/target-log cargo run --release -p meridian-store \
//!     --example bench_append -- [--backend postgres|sqlite|both] [--seconds 5] [--lanes 4]
//! ```
//! `--snapshot-every N`: the store's snapshot policy (default 256; 0 = off).
//! `--replay-events N`: length of the stream replayed (default 50 000); the run also
//! replays the whole region (every room stream), fully and from snapshots.
//! `--lanes`: Postgres writer lanes (appends sharded by stream over that many
//! group-commit writers). The run also times `verify_chain` and one signed checkpoint.
//! `--appends-only`: only the append rows (closed loop and paced), no replay or verify.
//! Each closed-loop row also shows where the CPU went (Linux `/proc`, Postgres on this
//! machine): this process's CPU time and that of the Postgres backends serving it, in
//! µs per event, and how busy the machine's cores were.
//! Postgres: `MERIDIAN_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! the run uses a schema of its own and drops it at the end.

use std::time::{Duration, Instant};

use meridian_events::{Event, TrackKind};
use meridian_store::{ExpectedVersion, NewEvent, Store};
use sqlx::Connection;

fn event(i: u64) -> NewEvent {
    if i % 4 == 3 {
        NewEvent::new(
            format!("user{i}"),
            Event::TrackPublished {
                track_id: format!("t{i}"),
                participant_id: format!("p{}", i - 1),
                kind: TrackKind::Video,
                layers: vec!["q".into(), "h".into(), "f".into()],
                codec: "VP8".into(),
            },
        )
    } else {
        NewEvent::new(
            format!("user{i}"),
            Event::ParticipantJoined {
                participant_id: format!("p{i}"),
                identity: format!("user{i}"),
                name: format!("User number {i}"),
                resume_hash: None,
            },
        )
    }
}

/// CPU time in clock ticks (utime + stime) of this process, of the Postgres backends
/// serving this process (by pid), and the machine's busy and total ticks over all cores.
#[derive(Clone, Default)]
struct Cpu {
    own: u64,
    postgres: std::collections::HashMap<u32, u64>,
    busy: u64,
    total: u64,
}

/// The Postgres URL and application name of the bench's store, to find its backends.
static PG_APP: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Pids of the Postgres backends serving this bench (empty for SQLite).
async fn backend_pids() -> Vec<u32> {
    let Some((url, app)) = PG_APP.get() else {
        return Vec::new();
    };
    let Ok(mut c) = sqlx::PgConnection::connect(url).await else {
        return Vec::new();
    };
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(app)
            .fetch_all(&mut c)
            .await
            .unwrap_or_default();
    let _ = c.close().await;
    pids.into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect()
}

fn ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let f: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

async fn cpu() -> Cpu {
    let mut c = Cpu::default();
    if let Some((_, t)) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
    {
        c.own = t;
    }
    for pid in backend_pids().await {
        if let Some((_, t)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| ticks(&s))
        {
            c.postgres.insert(pid, t);
        }
    }
    if let Some(line) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    {
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        c.total = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        c.busy = c.total.saturating_sub(idle);
    }
    c
}

/// "own / postgres µs per event, machine busy %" between two readings (100 ticks/s).
fn cpu_use(a: &Cpu, b: &Cpu, events: u64) -> String {
    let per = |t: u64| t as f64 * 10_000.0 / events.max(1) as f64;
    let postgres: u64 = b
        .postgres
        .iter()
        .map(|(pid, t)| t.saturating_sub(a.postgres.get(pid).copied().unwrap_or(0)))
        .sum();
    format!(
        "{:.0} / {:.0} µs, {:.0} %",
        per(b.own - a.own),
        per(postgres),
        (b.busy - a.busy) as f64 * 100.0 / (b.total - a.total).max(1) as f64
    )
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn appends(store: &Store, label: &str, streams: usize, per_append: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let cpu_before = cpu().await;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let store = store.clone();
        let stream = format!("room:{label}-{streams}x{per_append}-{s}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut version = 0u64;
            while Instant::now() < deadline {
                let batch = (0..per_append as u64).map(|k| event(version + k)).collect();
                let t = Instant::now();
                let r = store
                    .append(&stream, ExpectedVersion::Exact(version), batch)
                    .await
                    .expect("append");
                lat.push(t.elapsed());
                version = r.last().map_or(version, |e| e.sequence);
            }
            (lat, version)
        }));
    }
    let mut lat = Vec::new();
    let mut events = 0u64;
    for t in tasks {
        let (l, v) = t.await.expect("task");
        lat.extend(l);
        events += v;
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu().await;
    lat.sort_unstable();
    println!(
        "| {label} | {streams} | {per_append} | {} | {} | {} | {} | {:.0} | {} |",
        lat.len(),
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
        events as f64 / elapsed.as_secs_f64(),
        cpu_use(&cpu_before, &cpu_after, events)
    );
}

/// Open loop: each of `streams` rooms appends one event every `period`, as live rooms
/// do, so the latency is that of a realistic load rather than of a saturated writer.
async fn paced(store: &Store, label: &str, streams: usize, period: Duration, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let store = store.clone();
        let stream = format!("room:{label}-paced{streams}x{}-{s}", period.as_millis());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(period.mul_f64(s as f64 / streams as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut lat = Vec::new();
            let mut version = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let t = Instant::now();
                let r = store
                    .append(
                        &stream,
                        ExpectedVersion::Exact(version),
                        vec![event(version)],
                    )
                    .await
                    .expect("append");
                lat.push(t.elapsed());
                version = r.last().map_or(version, |e| e.sequence);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    lat.sort_unstable();
    println!(
        "| {label} | {streams} | {:.0} | {} | {} | {} | {} |",
        streams as f64 / period.as_secs_f64(),
        lat.len(),
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
    );
}

async fn replay(store: &Store, label: &str, n: u64) {
    let stream = format!("room:{label}-replay");
    let mut version = 0;
    while version < n {
        let batch = (0..(n - version).min(1000))
            .map(|k| event(version + k))
            .collect();
        let r = store
            .append(&stream, ExpectedVersion::Exact(version), batch)
            .await
            .expect("append");
        version = r.last().map_or(version, |e| e.sequence);
    }
    // Warm up, then take the median of 5 runs of each.
    let _ = store.replay_room(&stream).await.expect("replay");
    let mut full = Vec::new();
    let mut read_only = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let state = store.replay_room(&stream).await.expect("replay");
        full.push(t.elapsed());
        assert_eq!(state.version, n);
        let t = Instant::now();
        let mut read = 0;
        while read < n {
            let page = store
                .read_stream(&stream, read + 1, meridian_store::MAX_QUERY_LIMIT)
                .await
                .expect("read");
            read += page.len() as u64;
        }
        read_only.push(t.elapsed());
    }
    full.sort_unstable();
    read_only.sort_unstable();
    // JSON decoding alone, for the breakdown.
    let payloads: Vec<String> = (0..n).map(|i| event(i).event.to_json()).collect();
    let t = Instant::now();
    for p in &payloads {
        let _ = meridian_events::decode_event(1, p).expect("decode");
    }
    let decode = t.elapsed();
    let full_med = full[2];
    // Snapshot 100 events before the end, so a rebuild folds the last 100 on top of it.
    let mut snap_state = meridian_events::RoomState::default();
    while snap_state.version < n - 100 {
        let want = (n - 100 - snap_state.version).min(meridian_store::MAX_QUERY_LIMIT as u64);
        for e in store
            .read_stream(&stream, snap_state.version + 1, want as usize)
            .await
            .expect("read")
        {
            snap_state.apply(&e);
        }
    }
    store
        .save_snapshot(
            &stream,
            snap_state.version,
            &serde_json::to_value(&snap_state).expect("json"),
        )
        .await
        .expect("snapshot");
    let mut snap = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let state = store.load_room(&stream).await.expect("load");
        snap.push(t.elapsed());
        assert_eq!(state.version, n);
    }
    snap.sort_unstable();
    println!(
        "| {label} | {:.0} | {} | {} | {} | {} |",
        n as f64 / full_med.as_secs_f64(),
        ms(read_only[2]),
        ms(decode),
        ms(full_med),
        ms(snap[2]),
    );
}

/// Whole-region replay: every room stream of the log rebuilt, `parallel` streams at a
/// time, by full replay and by `load_room` (snapshot + tail), as a node taking over a
/// whole region would.
async fn region_replay(store: &Store, label: &str, parallel: usize) {
    let streams: Vec<String> = store
        .streams("room:")
        .await
        .expect("streams")
        .into_iter()
        .map(|s| s.stream)
        .collect();
    for snapshots in [false, true] {
        let t = Instant::now();
        let mut events = 0u64;
        let mut tasks = Vec::new();
        for k in 0..parallel.max(1) {
            let store = store.clone();
            let mine: Vec<String> = streams
                .iter()
                .skip(k)
                .step_by(parallel.max(1))
                .cloned()
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                for s in mine {
                    let state = if snapshots {
                        store.load_room(&s).await
                    } else {
                        store.replay_room(&s).await
                    };
                    n += state.expect("replay").version;
                }
                n
            }));
        }
        for t in tasks {
            events += t.await.expect("task");
        }
        let e = t.elapsed();
        println!(
            "{label}: region replay ({}) of {} streams holding {events} events, {parallel} at a time: {} ms ({:.0} events/s{})",
            if snapshots {
                "load_room: snapshot + tail"
            } else {
                "full"
            },
            streams.len(),
            ms(e),
            events as f64 / e.as_secs_f64(),
            if snapshots { " of state rebuilt" } else { "" }
        );
    }
}

async fn verify(store: &Store, label: &str) {
    let t = Instant::now();
    let r = store.verify_chain().await.expect("verify");
    let e = t.elapsed();
    assert!(r.is_ok(), "{r:?}");
    println!(
        "{label}: verify_chain over {} events in {} streams: {} ms ({:.0} events/s)",
        r.checked,
        r.streams,
        ms(e),
        r.checked as f64 / e.as_secs_f64()
    );
    let key = meridian_store::SigningKey::from_bytes(&[1; 32]);
    let t = Instant::now();
    let cp = store.checkpoint(&key).await.expect("checkpoint");
    println!(
        "{label}: signed checkpoint of {} stream heads: {} ms",
        r.streams,
        ms(t.elapsed())
    );
    let t = Instant::now();
    let r = store
        .verify_log(&cp.into_iter().collect::<Vec<_>>(), &[key.verifying_key()])
        .await
        .expect("verify");
    assert!(r.is_ok(), "{r:?}");
    println!(
        "{label}: verify with the checkpoint: {} ms",
        ms(t.elapsed())
    );
}

async fn bench(store: &Store, label: &str, secs: u64, replay_events: u64, appends_only: bool) {
    println!("\n### {label}\n");
    println!(
        "| backend | streams | events/append | appends | p50 ms | p99 ms | max ms | events/s | CPU per event: bench / its Postgres backends, machine busy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for streams in [1, 16, 256] {
        appends(store, label, streams, 1, secs).await;
    }
    appends(store, label, 16, 10, secs).await;
    println!("\n| backend | streams | offered events/s | appends | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    paced(store, label, 16, Duration::from_millis(100), secs).await;
    paced(store, label, 256, Duration::from_millis(100), secs).await;
    paced(store, label, 256, Duration::from_millis(25), secs).await;
    if appends_only {
        return;
    }
    println!(
        "\n| backend | replay events/s (read+fold) of {replay_events} | read_stream {replay_events} ms | JSON decode alone ms | full rebuild ms | snapshot+100 rebuild ms |"
    );
    println!("|---|---|---|---|---|---|");
    replay(store, label, replay_events).await;
    println!();
    region_replay(store, label, 1).await;
    region_replay(store, label, 4).await;
    verify(store, label).await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let backend = arg("--backend").unwrap_or_else(|| "both".into());
    let secs: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(5);
    let lanes: usize = arg("--lanes")
        .and_then(|s| s.parse().ok())
        .unwrap_or(meridian_store::DEFAULT_WRITER_LANES);
    let replay_events: u64 = arg("--replay-events")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000)
        .max(1000);
    let appends_only = args.iter().any(|a| a == "--appends-only");
    let snapshot_every: Option<u64> = arg("--snapshot-every").and_then(|s| s.parse().ok());
    let url = std::env::var("MERIDIAN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());

    if backend == "postgres" || backend == "both" {
        let schema = format!("bench_{:08x}", std::process::id());
        let store = Store::connect_with_options(
            &url,
            meridian_store::ConnectOptions {
                schema: Some(schema.clone()),
                writer_lanes: lanes,
                ..meridian_store::ConnectOptions::default()
            },
        )
        .await
        .expect("Postgres reachable");
        println!("postgres writer lanes: {lanes}");
        let _ = PG_APP.set((url.clone(), format!("meridian-{schema}")));
        if let Some(n) = snapshot_every {
            store.set_snapshot_every(n);
        }
        bench(&store, "postgres", secs, replay_events, appends_only).await;
        store.close().await;
        let mut c = sqlx::PgConnection::connect(&url).await.expect("admin");
        sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(&mut c)
            .await
            .expect("drop schema");
    }
    if backend == "sqlite" || backend == "both" {
        let dir = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
        let store = Store::open_embedded(&dir).await.expect("sqlite");
        if let Some(n) = snapshot_every {
            store.set_snapshot_every(n);
        }
        bench(&store, "sqlite", secs, replay_events, appends_only).await;
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
