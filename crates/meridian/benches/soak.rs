//! Attacker soak (issue 17): one `meridian serve` process on loopback, a media room
//! (2 publishers, 2 subscribers) and a legitimate client joining twice a second, while
//! attackers flood for `SOAK_SECS` (default 60):
//!
//! - slow readers: 16 joined WebSocket clients with 4 KiB receive buffers that send
//!   60 KB unknown-type messages and never read (reconnecting when closed);
//! - oversized messages: 4 clients sending 300 KB messages (closed at the WebSocket
//!   layer), reconnecting;
//! - join floods: 8 source addresses opening connections and joining as fast as they
//!   can (each address is held to `signaling.joins_per_ip_per_minute`);
//! - STUN spoofing: one socket sending STUN binding requests with random ufrags and
//!   transaction ids, and random datagrams, to the media port.
//!
//! `SOAK_ATTACKS` picks some (`slow,oversized,joins,stun`, default all), to see which
//! one costs what.
//!
//! Attackers use their own loopback addresses (127.0.0.1x); the legitimate client and
//! the media room use 127.0.0.1, so per-address limits do not count them together.
//! Prints the node's RSS (before, peak, after), the legitimate joins' latency and
//! failures, and whether the media room kept every track. Figures, not assertions:
//! `cargo bench -p meridian --bench soak` (or `cargo test --bench soak` for a debug
//! build); results in docs/security.md.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use meridian_auth::{Claims, Grants, KeySet};
use meridian_client::{Client, ClientConfig};
use meridian_protocol::{ClientMessage, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn token(keys: &KeySet, identity: &str, room: &str, grants: Grants) -> String {
    let claims = Claims::new(
        identity,
        room,
        meridian_auth::unix_now(),
        Duration::from_secs(3600),
    )
    .with_grants(grants);
    keys.sign(&claims).expect("token")
}

fn join_text(keys: &KeySet, identity: &str, room: &str) -> String {
    ClientMessage::Join {
        token: token(keys, identity, room, Grants::subscriber()),
        resume: None,
        version: meridian_protocol::PROTOCOL_VERSION,
        auto_subscribe: false,
        client: Some("soak".into()),
    }
    .encode()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket from `from` to the node; `rcvbuf` shrinks the receive buffer.
async fn connect(http: SocketAddr, from: IpAddr, rcvbuf: Option<u32>) -> Option<Ws> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(b) = rcvbuf {
        socket.set_recv_buffer_size(b).ok()?;
    }
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(http))
        .await
        .ok()?
        .ok()?;
    let url = format!("ws://{http}/signal");
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .ok()?
    .ok()?;
    Some(ws)
}

/// Reads until `joined` (Some(elapsed)) or an error / close (None).
async fn until_joined(ws: &mut Ws, started: Instant) -> Option<Duration> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match ServerMessage::decode(t.as_bytes()) {
                Ok(ServerMessage::Joined { .. }) => return Some(started.elapsed()),
                Ok(ServerMessage::Error { .. }) => return None,
                _ => continue,
            },
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

#[derive(Default)]
struct Counters {
    slow_messages: AtomicU64,
    slow_reconnects: AtomicU64,
    oversized: AtomicU64,
    flood_joins: AtomicU64,
    flood_joined: AtomicU64,
    datagrams: AtomicU64,
}

fn attacker_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

async fn slow_reader(
    http: SocketAddr,
    keys: Arc<KeySet>,
    i: usize,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) {
    let big = Message::text(format!(r#"{{"type":"{}"}}"#, "x".repeat(60_000)));
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(http, attacker_ip(11), Some(4096)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        c.slow_reconnects.fetch_add(1, Ordering::Relaxed);
        let _ = ws
            .send(Message::text(join_text(
                &keys,
                &format!("slow-{i}"),
                "slow",
            )))
            .await;
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_secs(1), ws.send(big.clone())).await {
                Ok(Ok(())) => {
                    c.slow_messages.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
    }
}

async fn oversized(http: SocketAddr, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    let huge = Message::text(format!(r#"{{"type":"{}"}}"#, "y".repeat(300_000)));
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(http, attacker_ip(12), None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = ws.send(huge.clone()).await;
        c.oversized.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
    }
}

async fn join_flood(
    http: SocketAddr,
    keys: Arc<KeySet>,
    i: u8,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Some(mut ws) = connect(http, attacker_ip(13 + i), None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let room = format!("flood-{}", n % 50);
        let _ = ws
            .send(Message::text(join_text(&keys, &format!("f{i}-{n}"), &room)))
            .await;
        c.flood_joins.fetch_add(1, Ordering::Relaxed);
        if until_joined(&mut ws, Instant::now()).await.is_some() {
            c.flood_joined.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A STUN binding request with a random `USERNAME` and transaction id.
fn stun(seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let user = format!("{:08x}:{:08x}", next() as u32, next() as u32);
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    for _ in 0..12 {
        m.push(next() as u8);
    }
    m.extend_from_slice(&[0x00, 0x06, 0, user.len() as u8]);
    m.extend_from_slice(user.as_bytes());
    while m.len() % 4 != 0 {
        m.push(0);
    }
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    if next() % 4 == 0 {
        // A random datagram instead (DTLS-, RTP- or nothing-looking).
        m = (0..(next() % 200) as usize).map(|_| next() as u8).collect();
    }
    m
}

async fn stun_spoofer(media: SocketAddr, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(attacker_ip(21), 0))
        .await
        .expect("bind");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) {
        // ~10 000 datagrams a second in bursts of 100.
        for _ in 0..100 {
            let _ = socket.send_to(&stun(&mut seed), media).await;
        }
        c.datagrams.fetch_add(100, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env("SOAK_SECS", 60);
    let dir = std::env::temp_dir().join(format!("meridian-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--media-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--wt-addr",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("meridian serve starts");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let listening: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    let http: SocketAddr = listening["http"]
        .as_str()
        .expect("http")
        .parse()
        .expect("addr");
    let media: SocketAddr = listening["media"]
        .as_str()
        .expect("media")
        .parse()
        .expect("addr");
    let keys = Arc::new(KeySet::load(&dir.join("keys")).expect("the node's keys"));
    let url = format!("ws://{http}/signal");

    // The media room: 2 publishers, 2 subscribers.
    let mut room = Vec::new();
    for i in 0..4 {
        let publish = i < 2;
        let grants = if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        };
        let t = token(&keys, &format!("m{i}"), "media", grants);
        let config = if publish {
            ClientConfig::new(&url, t)
        } else {
            ClientConfig::subscriber(&url, t)
        };
        let config = ClientConfig {
            layer_bitrates: [40_000, 80_000, 160_000],
            fps: 15,
            keyframe_interval: 45,
            ..config
        };
        room.push(Client::join(config).await.expect("media room joins"));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let packets = |c: &Client| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = c
            .stats()
            .tracks
            .iter()
            .map(|(k, t)| (k.clone(), t.packets))
            .collect();
        v.sort();
        v
    };
    let before: Vec<Vec<(String, u64)>> = room[2..].iter().map(packets).collect();
    let rss_before = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut attackers = Vec::new();
    let kinds =
        std::env::var("SOAK_ATTACKS").unwrap_or_else(|_| "slow,oversized,joins,stun".into());
    let on = |k: &str| kinds.split(',').any(|x| x.trim() == k);
    for i in 0..16 * usize::from(on("slow")) {
        attackers.push(tokio::spawn(slow_reader(
            http,
            keys.clone(),
            i,
            stop.clone(),
            counters.clone(),
        )));
    }
    for _ in 0..4 * usize::from(on("oversized")) {
        attackers.push(tokio::spawn(oversized(
            http,
            stop.clone(),
            counters.clone(),
        )));
    }
    for i in 0..8 * u8::from(on("joins")) {
        attackers.push(tokio::spawn(join_flood(
            http,
            keys.clone(),
            i,
            stop.clone(),
            counters.clone(),
        )));
    }
    if on("stun") {
        attackers.push(tokio::spawn(stun_spoofer(
            media,
            stop.clone(),
            counters.clone(),
        )));
    }

    // The legitimate client: a fresh join every 500 ms, timed to `joined`.
    let started = Instant::now();
    let mut joins = Vec::new();
    let mut failed = 0u64;
    let mut peak = rss_before;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let t0 = Instant::now();
        match connect(http, attacker_ip(1), None).await {
            Some(mut ws) => {
                let _ = ws
                    .send(Message::text(join_text(
                        &keys,
                        &format!("legit-{n}"),
                        "legit",
                    )))
                    .await;
                match until_joined(&mut ws, t0).await {
                    Some(d) => joins.push(d.as_secs_f64() * 1000.0),
                    None => failed += 1,
                }
                let _ = ws.close(None).await;
            }
            None => failed += 1,
        }
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed())).await;
    }
    let after_attack: Vec<Vec<(String, u64)>> = room[2..].iter().map(packets).collect();
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_after = rss_kib(pid);

    let mut kept = 0;
    let mut total = 0;
    for (b, a) in before.iter().zip(&after_attack) {
        for (track, p0) in b {
            total += 1;
            if a.iter().any(|(t, p1)| t == track && p1 > p0) {
                kept += 1;
            }
        }
    }
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "soak: {secs} s of attack ({kinds}) against one node ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "attackers: {} slow-reader messages of 60 KB ({} connections), {} messages of 300 KB, \
         {} flood joins ({} joined), {} STUN/garbage datagrams",
        load(&c.slow_messages),
        load(&c.slow_reconnects),
        load(&c.oversized),
        load(&c.flood_joins),
        load(&c.flood_joined),
        load(&c.datagrams)
    );
    let (p50, p95, max) = (
        percentile(&mut joins, 0.5),
        percentile(&mut joins, 0.95),
        percentile(&mut joins, 1.0),
    );
    println!(
        "legitimate joins: {} ok, {failed} failed; latency p50 {p50:.1} ms, p95 {p95:.1} ms, max {max:.1} ms",
        joins.len()
    );
    println!("media room: {kept}/{total} subscribed tracks kept flowing through the attack");
    println!(
        "node RSS: before {} MiB, peak {} MiB, 15 s after the attack {} MiB",
        rss_before / 1024,
        peak / 1024,
        rss_after / 1024
    );
    for c in room {
        let _ = c.leave().await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
