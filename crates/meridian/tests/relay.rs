//! Rooms across nodes: three node processes on one Postgres with
//! `--max-participants 11`; one room of a publisher and 30 subscribers spreads over
//! the three nodes, each part of the room in its own log stream, and each track
//! crosses each node boundary once over a relay link. Relay control is served on the
//! internal listener only (mutual TLS with the region's CA) and refuses callers that
//! are not live nodes of the region. Participants who publish nothing are listed on
//! the other nodes too (rosters).

mod region;

use std::time::{Duration, Instant};

use meridian_auth::{Claims, Grants};
use meridian_client::{Client, ClientConfig, ClientStats};
use meridian_events::Event;
use region::{Region, light, membership};

/// One region at a time (several node processes and many clients each).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// The value of one series (`name{labels}` exactly as exported), 0 when absent.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn link(metric: &str, direction: &str, peer: &str) -> String {
    format!("{metric}{{direction=\"{direction}\",peer=\"{peer}\"}}")
}

/// Starts a region of `n` nodes and waits until every node holds a lease and each
/// node's view of the region (refreshed every lease period, 100 ms) has caught up:
/// placement only sends joins to nodes it knows are live.
async fn start(name: &str, n: usize, extra: &[&str]) -> Region {
    let region = Region::start(name, n, extra).await;
    for _ in 0..100 {
        let leases = region.store.leases().await.expect("leases");
        if region
            .nodes
            .iter()
            .all(|node| leases.iter().any(|l| l.node == node.id))
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return region;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the nodes of {name} did not all take a lease within 10 s");
}

/// The display name of the publisher `pub` (in its token).
const PUBLISHER_NAME: &str = "The Publisher";

/// A publisher `pub` and `n` subscribers `sub-{i}` of `room`, all knocking at node-a
/// (placement sends them where the room has room), in that order.
async fn join_at_node_a(region: &Region, room: &str, n: usize) -> (Client, Vec<Client>) {
    let urls = region.urls();
    let claims = Claims::new(
        "pub",
        room,
        meridian_auth::unix_now(),
        Duration::from_secs(600),
    )
    .with_grants(Grants::publisher())
    .with_name(PUBLISHER_NAME);
    let token = region.keys.sign(&claims).expect("token");
    let publisher =
        Client::join(light(ClientConfig::new(&urls[0], token)).with_fallback_urls(urls.clone()))
            .await
            .expect("the publisher joins");
    let mut subscribers = Vec::new();
    for i in 0..n {
        let token = region.token(&format!("sub-{i}"), room, false);
        let config =
            light(ClientConfig::subscriber(&urls[0], token)).with_fallback_urls(urls.clone());
        subscribers.push(Client::join(config).await.expect("a subscriber joins"));
    }
    (publisher, subscribers)
}

/// A light subscriber `identity` of `room` knocking at node-a, with every node of the
/// region to fall back on.
fn subscriber_at_node_a(region: &Region, identity: &str, room: &str) -> ClientConfig {
    let urls = region.urls();
    light(ClientConfig::subscriber(
        &urls[0],
        region.token(identity, room, false),
    ))
    .with_fallback_urls(urls)
}

/// A publisher and 30 subscribers of `room`, all joining through node-a; waits until
/// every subscriber receives audio and video.
async fn spread(region: &Region, room: &str) -> (Client, Vec<Client>) {
    let (publisher, subscribers) = join_at_node_a(region, room, 30).await;
    for (i, s) in subscribers.iter().enumerate() {
        s.wait_for(Duration::from_secs(40), |s| {
            s.video_tracks_with(10) >= 1 && s.audio_tracks_with(10) >= 1
        })
        .await
        .unwrap_or_else(|s| panic!("sub-{i} gets no audio and video: {s:#?}"));
    }
    (publisher, subscribers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spreads_over_three_nodes_and_each_track_crosses_each_boundary_once() {
    let _serial = SERIAL.lock().await;
    let region = start("relay_spread", 3, &["--max-participants", "11"]).await;
    let room = "big";
    let (publisher, subscribers) = spread(&region, room).await;

    // Three parts, one per node, each its own stream with its own placement.
    let parts = [
        (room.to_string(), "node-a"),
        (format!("{room}~node-b"), "node-b"),
        (format!("{room}~node-c"), "node-c"),
    ];
    let mut total = 0;
    for (part, node) in &parts {
        let state = region.room(part).await;
        assert_eq!(state.node.as_deref(), Some(*node), "{part}: {state:#?}");
        assert!(
            state.participants.len() <= 11,
            "{part} holds at most 11: {}",
            state.participants.len()
        );
        total += state.participants.len();
    }
    assert_eq!(total, 31, "every participant is in one part");
    let first_b = &region.history(&parts[1].0).await[0].event;
    assert!(
        matches!(first_b, Event::RoomPartPlaced { room: r, node, .. } if r == room && node == "node-b"),
        "a part's stream starts with RoomPartPlaced: {first_b:?}"
    );
    let a_events = region
        .store
        .read_stream("node:node-a", 1, 10_000)
        .await
        .expect("node-a's stream");
    for peer in ["node-b", "node-c"] {
        assert!(
            a_events.iter().any(|e| matches!(&e.event,
                Event::RelayLinked { peer: p, part } if p == peer && part == room)),
            "node-a recorded relaying {room} to {peer}"
        );
    }

    // One copy per track per link: A sends each of its 2 tracks once to B and once to
    // C; B and C fan out what they receive to their own subscribers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = region.nodes[0].metrics().await;
    for (i, peer) in [(1, "node-b"), (2, "node-c")] {
        let other = region.nodes[i].metrics().await;
        let tracks = series(&a, &link("meridian_relay_tracks", "out", peer));
        assert_eq!(tracks, 2.0, "node-a relays 2 tracks to {peer}");
        assert_eq!(
            series(&other, &link("meridian_relay_tracks", "in", "node-a")),
            2.0
        );
        let sent = series(&a, &link("meridian_relay_packets_total", "out", peer));
        let got = series(
            &other,
            &link("meridian_relay_packets_total", "in", "node-a"),
        );
        let fanned = series(&other, "meridian_rtp_packets_forwarded_total");
        let locals = if i == 1 { 11.0 } else { 9.0 };
        eprintln!(
            "node-a → {peer}: sent {sent}, received {got}; {peer} forwarded {fanned} to {locals} subscribers"
        );
        assert!(sent > 100.0, "media crossed to {peer}: {sent}");
        assert!(
            (sent - got).abs() <= sent * 0.05 + 20.0,
            "what node-a sent {peer} arrived: {sent} vs {got}"
        );
        // Each relayed packet went to every local subscriber of that node, and only
        // one copy crossed: the node forwarded about `locals` times what it received.
        assert!(
            fanned >= got * (locals - 2.0) && fanned <= got * locals + 50.0,
            "{peer} fans out {got} relayed packets to {locals} subscribers: {fanned}"
        );
    }
    let received_a = series(&a, "meridian_rtp_packets_received_total");
    let sent_b = series(&a, &link("meridian_relay_packets_total", "out", "node-b"));
    assert!(
        sent_b < received_a,
        "one layer of three crosses (sent {sent_b}, node-a received {received_a})"
    );

    drop(subscribers);
    drop(publisher);
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_control_refuses_callers_that_are_not_nodes_of_the_region() {
    use meridian_server::internal::{InternalClient, TlsFiles, generate_pki};
    let _serial = SERIAL.lock().await;
    let region = start("relay_refuse", 1, &["--max-participants", "11"]).await;
    let node = &region.nodes[0];
    let internal: std::net::SocketAddr = node.internal.parse().expect("internal address");
    let body = r#"{"parts":["x"]}"#;
    let now = meridian_auth::unix_now();
    let node_claims = |sub: &str| {
        Claims::new(sub, "*", now, Duration::from_secs(60))
            .with_grants(Grants::admin())
            .with_region("local")
            .with_audience("meridian-node")
    };
    let good = region.keys.sign(&node_claims("node:node-z")).unwrap();

    // The public listener no longer serves relay control, whatever the token.
    for token in [None, Some(good.as_str())] {
        for (method, path) in [
            ("POST", "/internal/relay/subscribe"),
            ("POST", "/internal/relay/offer"),
            ("POST", "/internal/relay/layer"),
            ("POST", "/internal/relay/roster"),
            ("GET", "/internal/relay/load"),
        ] {
            let (got, answer) = http(&node.http, method, path, token, body).await;
            assert_eq!(got, 404, "{method} {path} on the public listener: {answer}");
        }
    }

    // The internal listener: no client certificate, or one of another CA, is refused
    // in the TLS handshake.
    let dev = region.data_dir.join(meridian_server::internal::DEV_DIR);
    let ours = TlsFiles::operator_client(&dev);
    let post = |client: InternalClient, token: String| async move {
        client
            .request(
                internal,
                "127.0.0.1",
                "POST",
                "/internal/relay/subscribe",
                Some(&token),
                body.as_bytes().to_vec(),
            )
            .await
    };
    let anonymous = InternalClient::without_certificate(&ours.client_ca).expect("client");
    let refused = post(anonymous, good.clone()).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let foreign_dir = region.data_dir.join("foreign-ca");
    generate_pki(&foreign_dir, &["localhost", "127.0.0.1"], 1).expect("a foreign CA");
    let foreign = InternalClient::from_files(
        &foreign_dir.join("node.pem"),
        &foreign_dir.join("node.key"),
        &ours.client_ca,
    )
    .expect("client");
    let refused = post(foreign, good.clone()).await;
    assert!(refused.is_err(), "a foreign CA's certificate: {refused:?}");

    // A certificate of the region's CA still needs a node token of a live node.
    let client = InternalClient::from_files(&ours.client_cert, &ours.client_key, &ours.client_ca)
        .expect("the operator's client certificate");
    let client_token = region.token("mallory", "x", true);
    let not_a_node = region.keys.sign(&node_claims("mallory")).unwrap();
    let other_region = region
        .keys
        .sign(&node_claims("node:node-a").with_region("elsewhere"))
        .unwrap();
    let cases = [
        (None, 401, "no_token"),
        (Some("not-a-jwt"), 401, "bad_token"),
        (Some(client_token.as_str()), 401, "bad_token"),
        (Some(not_a_node.as_str()), 403, "not_a_node"),
        (Some(other_region.as_str()), 403, "not_a_node"),
        (Some(good.as_str()), 403, "no_lease"),
    ];
    for (token, status, code) in cases {
        let answer = client
            .request(
                internal,
                "127.0.0.1",
                "POST",
                "/internal/relay/subscribe",
                token,
                body.as_bytes().to_vec(),
            )
            .await
            .expect("an answer over mutual TLS");
        assert_eq!(answer.status, status, "{code}: {}", answer.body);
        let v: serde_json::Value = serde_json::from_str(&answer.body).expect("a JSON error");
        assert_eq!(v["code"], code, "{}", answer.body);
    }
    let text = node.metrics().await;
    for (code, n) in [
        ("no_token", 1.0),
        ("bad_token", 2.0),
        ("not_a_node", 2.0),
        ("no_lease", 1.0),
    ] {
        assert_eq!(
            series(
                &text,
                &format!("meridian_relay_refused_total{{reason=\"{code}\"}}")
            ),
            n,
            "{code} counted"
        );
    }
    // Nothing was linked.
    assert_eq!(
        series(&text, &link("meridian_relay_tracks", "out", "node-z")),
        0.0
    );
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_hosting_a_part_brings_its_subscribers_back_elsewhere() {
    let _serial = SERIAL.lock().await;
    let region = start("relay_kill", 3, &["--max-participants", "11"]).await;
    let room = "big";
    let (publisher, subscribers) = spread(&region, room).await;
    let (b_url, c_url) = (region.nodes[1].url.clone(), region.nodes[2].url.clone());
    let before: Vec<ClientStats> = subscribers.iter().map(|s| s.stats()).collect();
    let on_b: Vec<usize> = (0..30).filter(|i| before[*i].url == b_url).collect();
    let on_c: Vec<usize> = (0..30).filter(|i| before[*i].url == c_url).collect();
    assert!(!on_b.is_empty() && !on_c.is_empty(), "parts on B and C");
    let part_b = format!("{room}~node-b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state_b = region.room(&part_b).await;
    assert_eq!(state_b.participants.len(), on_b.len());

    let killed = Instant::now();
    region.nodes[1].signal("KILL");
    // B's subscribers come back on A or C and receive again.
    for &i in &on_b {
        let b = &before[i];
        let s = subscribers[i]
            .wait_for(Duration::from_secs(40), |s| {
                s.reconnects > b.reconnects
                    && !s.reconnecting()
                    && s.received_media_after(killed)
                    && s.since(b).video_tracks_with(5) >= 1
                    && s.since(b).audio_tracks_with(5) >= 1
            })
            .await
            .unwrap_or_else(|s| panic!("sub-{i} (on node-b) gets no media after the kill: {s:#?}"));
        assert_ne!(s.url, b_url, "sub-{i} moved off node-b");
    }
    let back = killed.elapsed();
    let restored = on_b
        .iter()
        .filter(|&&i| subscribers[i].stats().restored_resumes > before[i].restored_resumes)
        .count();
    eprintln!(
        "{} subscribers of node-b receive again {back:?} after SIGKILL ({restored} restored by replay)",
        on_b.len()
    );
    assert!(
        restored > 0,
        "subscribers come back by replay of their part"
    );
    // C's subscribers never lost their node: media kept coming over the A→C link.
    let mid = Instant::now();
    for &i in &on_c {
        let s = subscribers[i]
            .wait_for(Duration::from_secs(5), |s| s.received_media_after(mid))
            .await
            .unwrap_or_else(|s| panic!("sub-{i} (on node-c) stopped receiving: {s:#?}"));
        assert_eq!(
            s.reconnects, before[i].reconnects,
            "sub-{i} stayed on node-c"
        );
        for (id, t) in &s.tracks {
            let freezes = t.freezes - before[i].tracks.get(id).map_or(0, |b| b.freezes);
            assert!(freezes <= 1, "sub-{i}: track {id} froze {freezes} times");
        }
    }
    // The part that was on B is on a live node now (a new epoch), and every part's
    // state read through snapshots equals a full replay of its stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now_b = region.room(&part_b).await;
    assert_ne!(
        now_b.node.as_deref(),
        Some("node-b"),
        "{part_b} left node-b"
    );
    assert!(now_b.epoch > state_b.epoch);
    for part in [room.to_string(), part_b.clone(), format!("{room}~node-c")] {
        let stream = meridian_events::room_stream(&part);
        let loaded = region.store.load_room(&stream).await.expect("load");
        let replayed = region.store.replay_room(&stream).await.expect("replay");
        assert_eq!(
            loaded, replayed,
            "{part}: snapshot + tail equals a full replay"
        );
        let history = region.history(&part).await;
        let mut folded = meridian_events::RoomState::default();
        for e in &history {
            folded.apply(e);
        }
        assert_eq!(
            membership(&folded),
            membership(&replayed),
            "{part} folds consistently"
        );
    }
    drop(subscribers);
    drop(publisher);
    region.cleanup().await;
}

fn layer_packets(text: &str, peer: &str) -> [f64; 3] {
    ["low", "medium", "high"].map(|l| {
        series(
            text,
            &format!("meridian_relay_layer_packets_total{{peer=\"{peer}\",layer=\"{l}\"}}"),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_far_nodes_subscribers_choose_the_layer_that_crosses() {
    let _serial = SERIAL.lock().await;
    let region = start("relay_layers", 2, &["--max-participants", "2"]).await;
    let urls = region.urls();
    let room = "layers";
    let (publisher, subs) = join_at_node_a(&region, room, 3).await;
    let far: Vec<usize> = (0..3).filter(|i| subs[*i].stats().url == urls[1]).collect();
    assert_eq!(far.len(), 2, "two subscribers on node-b");
    for &i in &far {
        subs[i]
            .wait_for(Duration::from_secs(30), |s| s.video_tracks_with(10) >= 1)
            .await
            .unwrap_or_else(|s| panic!("sub-{i} gets video: {s:#?}"));
    }
    // The far subscribers know who publishes what they get (it is in node-a's part).
    let publisher_id = publisher.stats().participant_id;
    for &i in &far {
        let names = subs[i].stats().participant_names;
        assert_eq!(
            names.get(&publisher_id),
            Some(&("pub".to_string(), Some(PUBLISHER_NAME.to_string()))),
            "sub-{i} on node-b is told of the publisher on node-a: {names:?}"
        );
    }
    let video = publisher
        .stats()
        .published
        .iter()
        .find(|t| t.kind == meridian_protocol::TrackKind::Video)
        .expect("a video track")
        .track_id
        .clone();
    // Both subscribers on B want low only: A sends only low to B.
    for &i in &far {
        subs[i]
            .send(meridian_protocol::ClientMessage::SetLayer {
                track_id: video.clone(),
                max_layer: meridian_protocol::Layer::Low,
            })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a0 = layer_packets(&region.nodes[0].metrics().await, "node-b");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a1 = layer_packets(&region.nodes[0].metrics().await, "node-b");
    eprintln!("node-a → node-b per layer (low, medium, high): {a0:?} → {a1:?}");
    assert!(a1[0] > a0[0] + 20.0, "low crosses: {a0:?} → {a1:?}");
    assert_eq!(a1[2], a0[2], "high does not: {a0:?} → {a1:?}");
    assert_eq!(a1[1], a0[1], "nor medium: {a0:?} → {a1:?}");
    for &i in &far {
        let last = subs[i]
            .stats()
            .tracks
            .get(&video)
            .and_then(|t| t.last_layer);
        assert_eq!(last, Some(0), "sub-{i} receives the low layer");
    }
    // One of them asks for high: the link goes back up, at a keyframe.
    subs[far[0]]
        .send(meridian_protocol::ClientMessage::SetLayer {
            track_id: video.clone(),
            max_layer: meridian_protocol::Layer::High,
        })
        .await;
    subs[far[0]]
        .wait_for(Duration::from_secs(10), |s| {
            s.tracks.get(&video).and_then(|t| t.last_layer) == Some(2)
        })
        .await
        .unwrap_or_else(|s| panic!("high reaches node-b: {s:#?}"));
    let a2 = layer_packets(&region.nodes[0].metrics().await, "node-b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a3 = layer_packets(&region.nodes[0].metrics().await, "node-b");
    assert!(a3[2] > a2[2], "high crosses again: {a2:?} → {a3:?}");
    let s = subs[far[0]].stats();
    let t = s.tracks.get(&video).unwrap();
    assert!(
        t.layer_history.ends_with(&[0, 2]),
        "low, then high: {:?}",
        t.layer_history
    );
    // Both far subscribers are told the layer they get (high crosses for both, though
    // one of them still asks for low), not the index of node-b's one incoming stream.
    for &i in &far {
        subs[i]
            .wait_for(Duration::from_secs(10), |s| {
                s.layers.get(&video) == Some(&Some(meridian_protocol::Layer::High))
            })
            .await
            .unwrap_or_else(|s| panic!("sub-{i} is told high: {:?}", s.layers));
    }
    // The publisher leaves node-a: its tracks stop crossing and it leaves node-b's
    // clients too.
    publisher.leave().await.expect("the publisher leaves");
    for &i in &far {
        subs[i]
            .wait_for(Duration::from_secs(10), |s| {
                s.participants_left.contains(&publisher_id)
            })
            .await
            .unwrap_or_else(|s| panic!("sub-{i} is told the publisher left: {s:#?}"));
    }
    drop(subs);
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_another_node_is_listed_and_its_leaving_is_seen() {
    let _serial = SERIAL.lock().await;
    let region = start("relay_roster", 2, &["--max-participants", "1"]).await;
    let urls = region.urls();
    let room = "roster";
    let config = |identity: &str| subscriber_at_node_a(&region, identity, room);
    let watcher = Client::join(config("watcher")).await.expect("joins");
    assert_eq!(watcher.stats().url, urls[0], "the watcher is on node-a");
    let joined = Instant::now();
    let listener = Client::join(config("listener")).await.expect("joins");
    assert_eq!(
        listener.stats().url,
        urls[1],
        "the cap sends the listener to node-b"
    );
    let (wid, lid) = (
        watcher.stats().participant_id,
        listener.stats().participant_id,
    );
    // Neither publishes anything: each is listed on the other node all the same.
    watcher
        .wait_for(Duration::from_secs(10), |s| {
            s.participant_names.get(&lid) == Some(&("listener".to_string(), None))
        })
        .await
        .unwrap_or_else(|s| panic!("the watcher on node-a is told of the listener: {s:#?}"));
    eprintln!(
        "listener on node-b listed on node-a {:?} after its join",
        joined.elapsed()
    );
    listener
        .wait_for(Duration::from_secs(10), |s| {
            s.participant_names.contains_key(&wid)
        })
        .await
        .unwrap_or_else(|s| panic!("the listener on node-b is told of the watcher: {s:#?}"));
    let a_part = region.room(room).await;
    assert!(
        a_part
            .participants
            .values()
            .all(|p| p.identity != "listener"),
        "the listener is in node-b's part's log only: {a_part:#?}"
    );
    let left = Instant::now();
    listener.leave().await.expect("the listener leaves");
    watcher
        .wait_for(Duration::from_secs(10), |s| {
            s.participants_left.contains(&lid)
        })
        .await
        .unwrap_or_else(|s| panic!("the watcher is told the listener left: {s:#?}"));
    eprintln!("listener's leave seen on node-a after {:?}", left.elapsed());
    assert_eq!(
        watcher
            .stats()
            .participants_joined
            .iter()
            .filter(|p| **p == lid)
            .count(),
        1,
        "announced once"
    );
    drop(watcher);
    region.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_peer_that_stops_answering_is_torn_down_in_bounded_time() {
    let _serial = SERIAL.lock().await;
    let region = start("relay_stop", 2, &["--max-participants", "2"]).await;
    let room = "stop";
    let (publisher, subs) = join_at_node_a(&region, room, 3).await;
    for s in &subs {
        s.wait_for(Duration::from_secs(30), |s| s.video_tracks_with(5) >= 1)
            .await
            .expect("media");
    }
    let a = &region.nodes[0];
    assert_eq!(
        series(
            &a.metrics().await,
            &link("meridian_relay_tracks", "out", "node-b")
        ),
        2.0
    );
    // node-b freezes: it answers nothing (no media, no control, no lease renewal).
    let stopped = Instant::now();
    region.nodes[1].signal("STOP");
    let mut torn_down = None;
    while stopped.elapsed() < Duration::from_secs(20) {
        let text = a.metrics().await;
        if series(&text, &link("meridian_relay_tracks", "out", "node-b")) == 0.0 {
            torn_down = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    region.nodes[1].signal("CONT");
    let after = torn_down.expect("node-a tears the link to a silent node-b down within 20 s");
    eprintln!("relay link to a stopped node torn down after {after:?}");
    // The unlink is recorded right after the link goes (poll: the append may trail
    // the metric).
    let mut recorded = false;
    for _ in 0..50 {
        let events = region
            .store
            .read_stream("node:node-a", 1, 10_000)
            .await
            .expect("node-a's stream");
        recorded = events
            .iter()
            .any(|e| matches!(&e.event, Event::RelayUnlinked { peer, .. } if peer == "node-b"));
        if recorded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recorded, "node-a recorded the unlink");
    drop(subs);
    drop(publisher);
    region.cleanup().await;
}

/// Overloads node-a's one media worker with the dev-mode stall: two stalls of 3 s back
/// to back, so the worker is overloaded after the first and stays so through the
/// second; returns once the first is over, with the second's answer to wait for.
async fn overload_node_a(region: &Region) -> tokio::task::JoinHandle<u16> {
    let a = region.nodes[0].http.clone();
    let stall = |ms: u64| {
        let a = a.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"worker":0,"ms":{ms}}}"#);
            http(&a, "POST", "/dev/stall-worker", None, &body).await.0
        })
    };
    let first = stall(3000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = stall(3000);
    assert_eq!(first.await.expect("stall"), 204);
    let (status, body) = http(&a, "GET", "/readyz", None, "").await;
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "overloaded: the media workers are past [media] overload_busy_share\n"
        ),
        "an overloaded node-a is not ready"
    );
    second
}

/// An overloaded node counts as full (`crate::overload`): with rooms that may span
/// nodes, a join that knocks at it while its media worker is busy gets a part of the
/// room on another node instead of a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_at_an_overloaded_node_gets_a_part_on_another_node() {
    let _serial = SERIAL.lock().await;
    let region = start(
        "relay_overload",
        2,
        &["--max-participants", "10", "--dev", "--media-workers", "1"],
    )
    .await;
    let urls = region.urls();
    let room = "busy";
    let config = |identity: &str| subscriber_at_node_a(&region, identity, room);
    let first = Client::join(config("first")).await.expect("joins");
    assert_eq!(first.stats().url, urls[0], "an idle node-a takes the room");
    let stall = overload_node_a(&region).await;
    let second = Client::join(config("second")).await.expect("joins");
    assert_eq!(
        second.stats().url,
        urls[1],
        "the join knocking at overloaded node-a is placed on node-b"
    );
    assert_eq!(stall.await.expect("stall"), 204);
    let parts = region.store.placements().await.expect("placements");
    let on_b = parts
        .iter()
        .filter(|p| p.stream.starts_with("room:busy") && p.node == region.nodes[1].id)
        .count();
    assert_eq!(on_b, 1, "a part of the room on node-b: {parts:?}");
    drop((first, second));
    region.cleanup().await;
}

/// Without room parts (no `--max-participants`) a new room is not placed on a node
/// whose workers are all overloaded: the join knocking there is sent to another node,
/// which hosts the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_knocking_at_an_overloaded_node_is_placed_on_another() {
    let _serial = SERIAL.lock().await;
    let region = start("overload_place", 2, &["--dev", "--media-workers", "1"]).await;
    let urls = region.urls();
    let stall = overload_node_a(&region).await;
    let config = subscriber_at_node_a(&region, "newcomer", "fresh");
    let client = Client::join(config).await.expect("joins");
    assert_eq!(client.stats().url, urls[1], "redirected to node-b");
    assert_eq!(stall.await.expect("stall"), 204);
    let placed = region.store.placements().await.expect("placements");
    assert!(
        placed
            .iter()
            .any(|p| p.stream == "room:fresh" && p.node == region.nodes[1].id),
        "the room is placed on node-b: {placed:?}"
    );
    drop(client);
    region.cleanup().await;
}
