//! Failover benchmark: time from SIGKILL of the hosting node to media flowing again
//! for every participant, over many kills, split into detection, takeover and client
//! rejoin; then drain time on SIGTERM.
//!
//! `cargo bench -p meridian --bench failover` (env: `KILLS`, default 20; `DRAINS`,
//! default 5). Needs the local Postgres (`scripts/start-postgres.sh`). Three release
//! nodes on loopback, 24 participants (4 rooms of 2 publishers and 4 subscribers) that
//! stay connected across every kill: each kill takes the node hosting the rooms, which
//! is restarted on its old address before the next.

#[path = "../tests/region/mod.rs"]
mod region;

use std::time::{Duration, Instant, SystemTime};

use meridian_client::ClientStats;
use meridian_events::Event;
use region::{Member, Region, expected_tracks, populate};

const PUBLISHERS: usize = 2;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentiles(name: &str, v: Vec<f64>) {
    stats(name, v, "ms")
}

fn stats(name: &str, v: Vec<f64>, unit: &str) {
    let missing = v.iter().filter(|x| x.is_nan()).count();
    if missing > 0 {
        println!("{name:<44} {missing} participants without a sample");
    }
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        println!("{name:<44} no samples");
        return;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<44} n={:<4} min {:>6.0}  p50 {:>6.0}  p95 {:>6.0}  max {:>6.0} {unit}",
        v.len(),
        v[0],
        at(0.5),
        at(0.95),
        v[v.len() - 1]
    );
}

/// Waits until every member got media again after `since`; returns each one's
/// kill→media time in ms, or the members that never recovered.
async fn recovered(
    members: &[&Member],
    since: Instant,
    before: &[ClientStats],
) -> Result<Vec<(f64, ClientStats)>, String> {
    let mut out = Vec::new();
    for (m, b) in members.iter().zip(before) {
        let want = expected_tracks(m, PUBLISHERS);
        let s = m
            .client
            .wait_for(Duration::from_secs(30), |s| {
                s.reconnects > b.reconnects
                    && !s.reconnecting()
                    && (want == 0 || s.received_media_after(since))
            })
            .await
            .map_err(|s| {
                format!(
                    "{} did not recover: losses {} reconnects {} before {} media after {} pub {} sub {} url {} published {:?} rooms tracks {:?} last {:?} frames {:?}",
                    m.identity,
                    s.losses,
                    s.reconnects,
                    b.reconnects,
                    s.received_media_after(since),
                    s.publisher_connected,
                    s.subscriber_connected,
                    s.url,
                    s.published.iter().map(|t| &t.track_id).collect::<Vec<_>>(),
                    s.room_tracks,
                    s.reconnect_history.last(),
                    s.tracks.iter().map(|(k, t)| (k, t.frames)).collect::<Vec<_>>()
                )
            })?;
        // Loss noticed, then media again (a publisher that receives nothing: joined).
        let rec = s.reconnect_history.last();
        let back = rec.and_then(|r| if want == 0 { r.joined_ms } else { r.media_ms });
        let ms = match (rec, back) {
            (Some(r), Some(back)) => r.lost_at.duration_since(since).as_secs_f64() * 1e3 + back,
            _ => f64::NAN,
        };
        out.push((ms, s));
    }
    Ok(out)
}

/// The members whose room is hosted on `node` now (rooms can sit on different nodes
/// after earlier takeovers).
async fn hosted_on<'a>(region: &Region, members: &'a [Member], node: &str) -> Vec<&'a Member> {
    let mut out = Vec::new();
    for m in members {
        if region.room(&m.room).await.node.as_deref() == Some(node) {
            out.push(m);
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let kills = env("KILLS", 20);
    let drains = env("DRAINS", 5);
    let mut region = Region::start("failover_bench", 3, &[]).await;
    let members = populate(&region, 0, 4, PUBLISHERS, 4).await;
    let (mut to_media, mut detect, mut takeover, mut rejoin) = (vec![], vec![], vec![], vec![]);
    let mut failures = 0;
    let mut hosted = Vec::new();
    let (mut replay, mut replay_full, mut room_events) = (vec![], vec![], vec![]);
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let host = region.room("room-0").await.node.expect("room-0 is placed");
        let i = region.index_of(&host);
        let affected = hosted_on(&region, &members, &host).await;
        hosted.push(affected.len() as f64);
        let before: Vec<ClientStats> = affected.iter().map(|m| m.client.stats()).collect();
        let placed_before = region.history("room-0").await.len();
        let (killed_at, killed_wall) = (Instant::now(), SystemTime::now());
        region.nodes[i].signal("KILL");
        match recovered(&affected, killed_at, &before).await {
            Ok(r) => {
                for (ms, s) in &r {
                    to_media.push(*ms);
                    if let Some(rec) = s.reconnect_history.last() {
                        detect.push(rec.lost_at.duration_since(killed_at).as_secs_f64() * 1e3);
                        rejoin.extend(rec.media_ms);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("kill {k}: {e}");
            }
        }
        // Takeover: the new placement's commit time after the kill (wall clock).
        for room in ["room-0", "room-1", "room-2", "room-3"] {
            let h = region.history(room).await;
            let placed = h
                .iter()
                .skip(if room == "room-0" { placed_before } else { 0 });
            if let Some(p) = placed
                .filter(|e| matches!(e.event, Event::RoomPlaced { .. }))
                .rfind(|e| SystemTime::from(e.recorded_at) > killed_wall)
            {
                let ms = SystemTime::from(p.recorded_at)
                    .duration_since(killed_wall)
                    .unwrap_or_default();
                takeover.push(ms.as_secs_f64() * 1e3);
            }
        }
        // The replay a takeover does, isolated: the room rebuilt from its snapshot and
        // the events after it (`Store::load_room`, what `cluster.rs` calls), timed here
        // against the same Postgres; the full replay for comparison.
        let stream = meridian_events::room_stream("room-0");
        let t = Instant::now();
        let state = region.store.load_room(&stream).await.expect("load_room");
        replay.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let full = region.store.replay_room(&stream).await.expect("replay");
        replay_full.push(t.elapsed().as_secs_f64() * 1e3);
        // The new node may append between the two reads; at the same version they agree.
        assert!(state.version <= full.version, "load_room ahead of the log");
        if state.version == full.version {
            assert_eq!(state, full, "snapshot + tail and full replay disagree");
        }
        room_events.push(full.version as f64);
        region.restart(i);
        eprintln!("kill {}/{kills}: {host} killed and restarted", k + 1);
    }
    println!(
        "\nfailover: {kills} SIGKILLs of the node hosting room-0, {} participants, {failures} kills with a participant not back in 30 s",
        members.len()
    );
    stats("participants on the killed node", hosted, "participants");
    percentiles("kill → media again, every participant", to_media);
    percentiles("kill → client notices the loss", detect);
    percentiles("kill → room placed on a survivor (takeover)", takeover);
    percentiles("client loss → media again (rejoin)", rejoin);
    stats(
        "events in room-0's stream at each kill",
        room_events,
        "events",
    );
    percentiles("takeover replay: load_room (snapshot + tail)", replay);
    percentiles("full replay of room-0, for comparison", replay_full);

    let mut drain_ms = Vec::new();
    for _ in 0..drains {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let host = region.room("room-0").await.node.expect("placed");
        let i = region.index_of(&host);
        let affected = hosted_on(&region, &members, &host).await;
        let before: Vec<ClientStats> = affected.iter().map(|m| m.client.stats()).collect();
        let started = Instant::now();
        region.nodes[i].signal("TERM");
        let code = region.nodes[i].wait_exit(Duration::from_secs(35));
        drain_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if code != Some(0) {
            eprintln!("drain of {host}: exit {code:?}");
        }
        if let Err(e) = recovered(&affected, started, &before).await {
            eprintln!("after drain: {e}");
        }
        region.restart(i);
    }
    percentiles("SIGTERM → drained node exits", drain_ms);
    for m in members {
        m.client.disconnect().await;
    }
    region.cleanup().await;
}
