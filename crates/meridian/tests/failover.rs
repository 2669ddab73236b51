//! Failover by replay, with real node processes on one Postgres: a SIGKILLed node's
//! rooms come back on another node from the log with nothing lost or duplicated; a
//! paused node is fenced; SIGTERM drains; a log outage does not stop media.

mod region;

use std::time::{Duration, Instant};

use meridian_client::{Client, ClientConfig, ClientStats};
use meridian_events::Event;
use region::{Member, Region, expected_tracks, light, membership, populate};

/// One region at a time: each test runs several node processes and many clients, and
/// two cores carry them better in turn.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn all_receive(members: &[Member], publishers: usize, what: &str) {
    for m in members {
        let want = expected_tracks(m, publishers);
        m.client
            .wait_for(Duration::from_secs(30), |s| s.video_tracks_with(5) >= want)
            .await
            .unwrap_or_else(|s| panic!("{what}: {} gets no video: {s:#?}", m.identity));
    }
}

/// Waits until every member received new video frames (on every expected track) after
/// `since` (having reconnected, when `moved`); returns each one's stats then.
async fn all_receive_after(
    members: &[Member],
    publishers: usize,
    since: Instant,
    before: &[ClientStats],
    moved: bool,
    timeout: Duration,
) -> Vec<ClientStats> {
    let mut after = Vec::new();
    for (m, b) in members.iter().zip(before) {
        let want = expected_tracks(m, publishers);
        let s = m
            .client
            .wait_for(timeout, |s| {
                let reconnected = !moved || (s.reconnects > b.reconnects && !s.reconnecting());
                // A lone publisher receives nothing; its subscribers' checks show it
                // publishes again.
                reconnected
                    && (want == 0
                        || (s.received_media_after(since)
                            && s.since(b).video_tracks_with(5) >= want))
            })
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "{} ({}) gets no media after the failure: {s:#?}",
                    m.identity, m.room
                )
            });
        after.push(s);
    }
    after
}

fn rooms(members: &[Member]) -> Vec<String> {
    let mut r: Vec<String> = members.iter().map(|m| m.room.clone()).collect();
    r.dedup();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_hosting_node_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const PUBLISHERS: usize = 2;
    let region = Region::start("failover_kill", 3, &[]).await;
    let members = populate(&region, 0, 4, PUBLISHERS, 4).await;
    assert_eq!(members.len(), 24);
    all_receive(&members, PUBLISHERS, "before the kill").await;
    // Let the last subscriptions reach the log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut before = Vec::new();
    for room in rooms(&members) {
        let state = region.room(&room).await;
        assert_eq!(state.node.as_deref(), Some("node-a"), "{room} is on node-a");
        assert_eq!(state.participants.len(), 6, "{room}: {state:#?}");
        before.push((room.clone(), state, region.history(&room).await));
    }
    let stats_before: Vec<ClientStats> = members.iter().map(|m| m.client.stats()).collect();

    let killed_at = Instant::now();
    region.nodes[0].signal("KILL");
    let after = all_receive_after(
        &members,
        PUBLISHERS,
        killed_at,
        &stats_before,
        true,
        Duration::from_secs(30),
    )
    .await;
    let recovered_in = killed_at.elapsed();
    eprintln!("all 24 participants receive media again {recovered_in:?} after SIGKILL");
    for (m, s) in members.iter().zip(&after) {
        assert!(s.reconnects >= 1, "{} reconnected: {s:#?}", m.identity);
        assert_eq!(s.fresh_rejoins, 0, "{} kept its participant", m.identity);
    }

    // Room state after recovery equals the state before; the only new events are the
    // placements on the surviving node.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (room, state, history) in before {
        let now = region.room(&room).await;
        assert_eq!(
            membership(&now),
            membership(&state),
            "{room} after failover"
        );
        assert_ne!(now.node.as_deref(), Some("node-a"), "{room} left node-a");
        assert!(now.epoch > state.epoch, "{room}: new epoch");
        let all = region.history(&room).await;
        assert_eq!(&all[..history.len()], &history[..], "{room}: history kept");
        let new: Vec<&Event> = all[history.len()..].iter().map(|e| &e.event).collect();
        assert!(
            new.iter().all(|e| matches!(e, Event::RoomPlaced { .. })) && !new.is_empty(),
            "{room}: only placements were added: {new:#?}"
        );
    }
    let report = region.store.verify_chain().await.expect("verify");
    assert!(report.is_ok(), "{report:?}");
    for m in members {
        m.client.disconnect().await;
    }
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_fenced_out_of_the_room_it_lost() {
    let _serial = SERIAL.lock().await;
    let region = Region::start("failover_pause", 2, &["--resume-grace-secs", "3"]).await;
    let members = populate(&region, 0, 1, 1, 2).await;
    all_receive(&members, 1, "before the pause").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = region.room("room-0").await;
    let stats_before: Vec<ClientStats> = members.iter().map(|m| m.client.stats()).collect();

    // Paused far past its lease (500 ms): node-b takes the room and the clients move.
    let paused_at = Instant::now();
    region.nodes[0].signal("STOP");
    all_receive_after(
        &members,
        1,
        paused_at,
        &stats_before,
        true,
        Duration::from_secs(30),
    )
    .await;
    let taken = region.room("room-0").await;
    assert_eq!(taken.node.as_deref(), Some("node-b"));
    assert_eq!(membership(&taken), membership(&before));
    let history = region.history("room-0").await;

    // Woken up, node-a still holds sessions it believes in (detached ones expire after
    // the 3 s grace and would be recorded as left): the log refuses its writes, and a
    // join sent to it is redirected to node-b.
    region.nodes[0].signal("CONT");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = region.room("room-0").await;
    assert_eq!(
        membership(&now),
        membership(&before),
        "node-a changed nothing"
    );
    let after = region.history("room-0").await;
    assert!(
        after[history.len()..]
            .iter()
            .all(|e| e.actor != "node-a" && e.event.participant_id().is_none()),
        "no write of node-a landed: {:#?}",
        &after[history.len()..]
    );
    let metrics = region.nodes[0].metrics().await;
    assert!(
        metric(&metrics, "meridian_rooms_released_total") >= 1.0,
        "node-a let the room go: {metrics}"
    );
    let late =
        ClientConfig::subscriber(&region.nodes[0].url, region.token("late", "room-0", false))
            .without_reconnect();
    match Client::join(late).await {
        Err(meridian_client::ClientError::Redirected { url, .. }) => {
            assert_eq!(url, region.nodes[1].url, "sent to the room's node")
        }
        Ok(_) => panic!("node-a served a room it lost"),
        Err(e) => panic!("expected a redirect, got {e}"),
    }
    for m in members {
        m.client.disconnect().await;
    }
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_participant_to_another_node() {
    let _serial = SERIAL.lock().await;
    let mut region = Region::start("failover_drain", 2, &["--drain-timeout", "10"]).await;
    let members = populate(&region, 0, 2, 1, 2).await;
    all_receive(&members, 1, "before the drain").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for room in rooms(&members) {
            v.push((room.clone(), region.room(&room).await));
        }
        v
    };
    let stats_before: Vec<ClientStats> = members.iter().map(|m| m.client.stats()).collect();
    let started = Instant::now();
    region.nodes[0].signal("TERM");
    let code = region.nodes[0].wait_exit(Duration::from_secs(10));
    let drained_in = started.elapsed();
    assert_eq!(code, Some(0), "node-a exits 0 within the drain timeout");
    eprintln!("node-a drained and exited in {drained_in:?}");
    let after = all_receive_after(
        &members,
        1,
        started,
        &stats_before,
        true,
        Duration::from_secs(20),
    )
    .await;
    for (m, (s, b)) in members.iter().zip(after.iter().zip(&stats_before)) {
        let gained = s.since(b);
        let freezes: u64 = gained.tracks.values().map(|t| t.freezes).sum();
        assert!(
            freezes <= 1,
            "{}: at most one short freeze, saw {freezes}",
            m.identity
        );
        assert_eq!(s.fresh_rejoins, 0, "{} kept its participant", m.identity);
    }
    for (room, state) in before {
        let now = region.room(&room).await;
        assert_eq!(
            now.node.as_deref(),
            Some("node-b"),
            "{room} moved to node-b"
        );
        assert_eq!(membership(&now), membership(&state), "{room} unchanged");
    }
    for m in members {
        m.client.disconnect().await;
    }
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_their_log_connections_being_killed() {
    let _serial = SERIAL.lock().await;
    let region = Region::start("failover_pgkill", 2, &[]).await;
    let members = populate(&region, 0, 1, 1, 2).await;
    all_receive(&members, 1, "before the log outage").await;
    let before = region.room("room-0").await;
    let stats_before: Vec<ClientStats> = members.iter().map(|m| m.client.stats()).collect();

    let killed_at = Instant::now();
    let killed = terminate_backends(&region.schema).await;
    assert!(killed >= 2, "both nodes had log connections ({killed})");
    // Media keeps flowing, nobody reconnects, and no node takes a room over.
    all_receive_after(
        &members,
        1,
        killed_at,
        &stats_before,
        false,
        Duration::from_secs(10),
    )
    .await;
    // A join after the outage is stored: the nodes reconnected to the log.
    let late = light(ClientConfig::subscriber(
        &region.nodes[0].url,
        region.token("late", "room-0", false),
    ));
    let late = Client::join(late).await.expect("a join after the outage");
    late.wait_for(Duration::from_secs(20), |s| s.video_tracks_with(5) >= 1)
        .await
        .expect("the late joiner gets video");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = region.room("room-0").await;
    assert_eq!(now.epoch, before.epoch, "no takeover: {now:#?}");
    assert_eq!(now.participants.len(), before.participants.len() + 1);
    for (id, p) in &before.participants {
        assert_eq!(
            now.participants.get(id).map(|n| &n.identity),
            Some(&p.identity)
        );
    }
    for m in &members {
        assert_eq!(m.client.stats().reconnects, 0, "{} stayed", m.identity);
    }
    late.disconnect().await;
    for m in members {
        m.client.disconnect().await;
    }
    region.cleanup().await;
}

/// Terminates every Postgres backend of the region's nodes; returns how many.
async fn terminate_backends(schema: &str) -> i64 {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(region::PG_URL)
        .await
        .expect("connect");
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
    )
    .bind(schema)
    .fetch_one(&mut c)
    .await
    .expect("terminate");
    n
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}
