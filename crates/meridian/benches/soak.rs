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
//! - STUN noise: one socket sending STUN binding requests with random ufrags and
//!   transaction ids, and random datagrams, to the media port;
//! - spoofed STUN (issue 17 item 4 at scale): a participant of the media room whose
//!   own ICE connection lives in a network namespace the soak creates (veth pair, a
//!   /30 of its own), and a process in that namespace sending checks valid for that
//!   connection with the media room clients' addresses as forged sources
//!   (`IP_TRANSPARENT`), ~5 000/s (`SOAK_SPOOF_RATE`).
//!
//! `SOAK_ATTACKS` picks some (`slow,oversized,joins,stun,spoof`, default all), to see
//! which one costs what; `SOAK_NODE_JOINS` and `SOAK_NODE_CONNECTIONS` set the node's join
//! and connection budgets (a huge value turns one off).
//!
//! `SOAK_NODE_NICE` (default 0) sets the node's CPU priority (`nice -n`).
//!
//! Threat model: attackers come from addresses other than the legitimate clients'
//! (127.0.0.11 slow readers, .12 oversized, .13–.20 join floods, .21 STUN noise, .31
//! the spoofer's signaling, the namespace for its media); the legitimate client and
//! the media room's signaling use 127.0.0.1, so per-address limits and the node's
//! per-address join share tell them apart, as they would on a real network.
//!
//! Prints the node's RSS (before, peak, after), the legitimate joins' latency, failures
//! and where their time went (the node's `meridian::join_timing` stage timestamps lined
//! up with the client's), and whether the media room kept every track. It fails when
//! the media room lost a track, the spoofer's checks were not valid (the node answered
//! none), or the namespace cannot be made (it needs root). Latency is a figure, not an
//! assertion: `cargo bench -p meridian --bench soak` (or `cargo test -p meridian
//! --bench soak` for a debug build); results in docs/security.md.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
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

/// A client WebSocket frame of `text` with the all-zero masking key: the payload goes
/// out as it is, so an attacker can build a frame once and write it again and again
/// (masking 60 KB per message would cost the attacker — sharing the node's two cores
/// here — more CPU than the node spends on it).
fn raw_text_frame(text: &str) -> Vec<u8> {
    let len = text.len();
    let mut f = vec![0x81];
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(text.as_bytes());
    f
}

/// A raw WebSocket connection from `from` (upgrade done by hand, frames written as
/// bytes); `rcvbuf` shrinks the receive buffer.
async fn connect_raw(
    http: SocketAddr,
    from: IpAddr,
    rcvbuf: Option<u32>,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(b) = rcvbuf {
        socket.set_recv_buffer_size(b).ok()?;
    }
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(http))
        .await
        .ok()?
        .ok()?;
    let request = format!(
        "GET /signal HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    // Reads the response head byte by byte, so no frame byte is consumed with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut b))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        head.push(b[0]);
    }
    head.starts_with(b"HTTP/1.1 101").then_some(stream)
}

async fn slow_reader(
    http: SocketAddr,
    keys: Arc<KeySet>,
    i: usize,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) {
    use tokio::io::AsyncWriteExt;
    let big = raw_text_frame(&format!(r#"{{"type":"{}"}}"#, "x".repeat(60_000)));
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect_raw(http, attacker_ip(11), Some(4096)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        c.slow_reconnects.fetch_add(1, Ordering::Relaxed);
        let join = raw_text_frame(&join_text(&keys, &format!("slow-{i}"), "slow"));
        let _ = ws.write_all(&join).await;
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_secs(1), ws.write_all(&big)).await {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let huge = raw_text_frame(&format!(r#"{{"type":"{}"}}"#, "y".repeat(300_000)));
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect_raw(http, attacker_ip(12), None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = ws.write_all(&huge).await;
        c.oversized.fetch_add(1, Ordering::Relaxed);
        // Until the node closes it.
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while matches!(ws.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
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

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One legitimate join as the client saw it (Unix microseconds).
#[derive(Clone, Copy, Default)]
struct ClientTimes {
    /// Before the TCP connect.
    connect: u64,
    /// The WebSocket handshake finished.
    open: u64,
    /// The join message was written.
    sent: u64,
    /// `joined` was read.
    joined: u64,
}

/// The node's stage timestamps of one join, from a `meridian::join_timing` log line.
fn parse_stages(line: &str) -> Option<(String, Vec<(String, u64)>)> {
    if !line.contains("meridian::join_timing") {
        return None;
    }
    let mut identity = None;
    let mut stages = Vec::new();
    for field in line.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "identity" => identity = Some(v.to_string()),
            "outcome" => {}
            _ => {
                if let Ok(n) = v.parse() {
                    stages.push((k.to_string(), n));
                }
            }
        }
    }
    Some((identity?, stages))
}

/// Where the legitimate joins' time went, stage by stage (p50 / p95 in ms).
fn print_stages(
    times: &std::collections::HashMap<String, ClientTimes>,
    node: &std::collections::HashMap<String, Vec<(String, u64)>>,
) {
    let names = [
        "TCP + WebSocket handshake (client connect → open)",
        "join message read by the node (client sent → received)",
        "join allowances (per address, node budget)",
        "token verified",
        "room placed",
        "queued to the media loop",
        "media loop answered (queue wait + controller)",
        "joined delivered (log append, outbox, write, client read)",
    ];
    let mut spans: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut matched = 0;
    // (total, the stage that took longest, its ms) per join, for the slowest.
    let mut slowest: Vec<(f64, usize, f64)> = Vec::new();
    for (identity, c) in times {
        let Some(stages) = node.get(identity) else {
            continue;
        };
        let at = |k: &str| stages.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let (
            Some(received),
            Some(admitted),
            Some(verified),
            Some(placed),
            Some(queued),
            Some(answered),
        ) = (
            at("received"),
            at("admitted"),
            at("verified"),
            at("placed"),
            at("queued"),
            at("answered"),
        )
        else {
            continue;
        };
        if c.joined == 0 {
            continue;
        }
        matched += 1;
        let points = [
            (c.connect, c.open),
            (c.sent, received),
            (received, admitted),
            (admitted, verified),
            (verified, placed),
            (placed, queued),
            (queued, answered),
            (answered, c.joined),
        ];
        let mut worst = (0, 0.0);
        for (i, (a, b)) in points.iter().enumerate() {
            let ms = b.saturating_sub(*a) as f64 / 1000.0;
            spans[i].push(ms);
            if ms > worst.1 {
                worst = (i, ms);
            }
        }
        let total = c.joined.saturating_sub(c.connect) as f64 / 1000.0;
        slowest.push((total, worst.0, worst.1));
    }
    println!("legitimate joins by stage ({matched} joins with node timestamps), p50 / p95 ms:");
    for (name, v) in names.iter().zip(spans.iter_mut()) {
        println!(
            "  {name}: {:.1} / {:.1}",
            percentile(v, 0.5),
            percentile(v, 0.95)
        );
    }
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("slowest joins (total ms: longest stage, ms):");
    for (total, stage, ms) in slowest.iter().take(5) {
        println!("  {total:.1}: {} {ms:.1}", names[*stage]);
    }
}

/// Runs `cmd` (a shell-free argument list); an error names the command and its output.
fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to this one by a veth pair, removed on drop (also when
/// the soak panics): the spoofing attacker's own network.
struct Netns {
    name: String,
    /// This side's veth and address (where the node's media socket and the media
    /// room's clients live, so forged packets from the namespace can name them).
    veth: String,
    host_ip: Ipv4Addr,
    /// The namespace side's address.
    ns_ip: Ipv4Addr,
}

impl Netns {
    /// Creates `msk<pid>` with a /30 between the two sides; forged sources from the
    /// namespace are accepted on this side (`accept_local`, no reverse-path filter).
    fn create() -> Result<Netns, String> {
        // Namespaces left by a soak that was killed (its process is gone).
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if let Some(pid) = name.strip_prefix("msk")
                    && pid.parse::<u32>().is_ok()
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = run(&["ip", "netns", "del", name]);
                }
            }
        }
        let pid = std::process::id();
        let subnet = (pid % 250) as u8;
        let ns = Netns {
            name: format!("msk{pid}"),
            veth: format!("msk{pid}a"),
            host_ip: Ipv4Addr::new(10, 213, subnet, 1),
            ns_ip: Ipv4Addr::new(10, 213, subnet, 2),
        };
        let peer = format!("msk{pid}b");
        run(&["ip", "netns", "add", &ns.name])?;
        // From here on, drop removes what was made.
        run(&[
            "ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", &ns.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.veth,
        ])?;
        run(&["ip", "link", "set", &ns.veth, "up"])?;
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &peer,
        ])?;
        run(&["ip", "-n", &ns.name, "link", "set", &peer, "up"])?;
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.accept_local=1", ns.veth),
            &format!("net.ipv4.conf.{}.rp_filter=0", ns.veth),
        ])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.veth]);
    }
}

/// A child process killed on drop (also when the soak panics).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// UDP sockets of this network namespace bound to `ip` (from `/proc/net/udp`).
fn udp_sockets_on(ip: Ipv4Addr) -> Vec<SocketAddr> {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let local = l.split_whitespace().nth(1)?;
            let (a, p) = local.split_once(':')?;
            let a = u32::from_str_radix(a, 16).ok()?;
            let p = u16::from_str_radix(p, 16).ok()?;
            // The kernel prints the address as a native-endian word.
            let addr = Ipv4Addr::from(a.to_ne_bytes());
            (addr == ip).then(|| SocketAddr::new(IpAddr::V4(addr), p))
        })
        .collect()
}

/// Value of `a=<attr>:` in an SDP.
fn sdp_attr(sdp: &str, attr: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("a={attr}:")))
        .map(|v| v.trim().to_string())
}

/// The spoofing attacker's own participant: a publisher in the media room whose
/// (never completed) connection has ICE credentials, so its STUN checks are valid.
/// Returns the signaling socket (kept open) and `node_ufrag:own_ufrag`, node password.
async fn spoofing_participant(
    http: SocketAddr,
    keys: &KeySet,
    own: SocketAddr,
) -> (Ws, String, String) {
    let mut rtc = str0m::Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .build(Instant::now());
    rtc.add_local_candidate(str0m::Candidate::host(own, "udp").expect("host candidate"));
    let mut api = rtc.sdp_api();
    let mid = api.add_media(
        str0m::media::MediaKind::Audio,
        str0m::media::Direction::SendOnly,
        None,
        None,
        None,
    );
    let (offer, _pending) = api.apply().expect("an offer");
    let offer = offer.to_sdp_string();
    let own_ufrag = sdp_attr(&offer, "ice-ufrag").expect("offer ufrag");
    let mut ws = connect(http, attacker_ip(31), None)
        .await
        .expect("the spoofing participant connects");
    let join = ClientMessage::Join {
        token: token(keys, "mallory", "media", Grants::publisher()),
        resume: None,
        version: meridian_protocol::PROTOCOL_VERSION,
        auto_subscribe: false,
        client: Some("soak-spoofer".into()),
    };
    ws.send(Message::text(join.encode())).await.expect("join");
    let offer = ClientMessage::Offer {
        sdp: offer,
        tracks: vec![meridian_protocol::TrackAnnouncement {
            mid: mid.to_string(),
            kind: meridian_protocol::TrackKind::Audio,
            source: "microphone".into(),
            layers: Vec::new(),
            track_id: None,
        }],
    };
    ws.send(Message::text(offer.encode())).await.expect("offer");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the node answers the spoofer's offer within 10 s");
        let Some(Ok(Message::Text(t))) = m else {
            panic!("the spoofing participant's signaling closed: {m:?}");
        };
        match ServerMessage::decode(t.as_bytes()) {
            Ok(ServerMessage::Answer { sdp, .. }) => {
                let ufrag = sdp_attr(&sdp, "ice-ufrag").expect("answer ufrag");
                let pwd = sdp_attr(&sdp, "ice-pwd").expect("answer pwd");
                return (ws, format!("{ufrag}:{own_ufrag}"), pwd);
            }
            Ok(ServerMessage::Error { code, message }) => {
                panic!("the spoofing participant was refused: {code:?} {message}")
            }
            _ => {}
        }
    }
}

/// A STUN binding request with `USERNAME`, `PRIORITY`, `ICE-CONTROLLING`,
/// `USE-CANDIDATE`, `MESSAGE-INTEGRITY` (HMAC-SHA1 with `pwd`) and `FINGERPRINT`: a
/// check that is valid for the connection those credentials belong to.
fn signed_check(username: &str, pwd: &str, transaction: [u8; 12]) -> Vec<u8> {
    use hmac::Mac;
    fn attr(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(value.len() as u16).to_be_bytes());
        m.extend_from_slice(value);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
    }
    let set_len = |m: &mut Vec<u8>, extra: usize| {
        let len = (m.len() - 20 + extra) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
    };
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&transaction);
    attr(&mut m, 0x0006, username.as_bytes());
    attr(&mut m, 0x0024, &0x6e00_01ffu32.to_be_bytes());
    attr(&mut m, 0x802a, &0x0123_4567_89ab_cdefu64.to_be_bytes());
    attr(&mut m, 0x0025, &[]);
    // The integrity covers the header with a length that includes the attribute.
    set_len(&mut m, 24);
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(pwd.as_bytes()).expect("any key");
    mac.update(&m);
    let digest = mac.finalize().into_bytes();
    attr(&mut m, 0x0008, &digest);
    set_len(&mut m, 8);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&m) ^ 0x5354_554e;
    attr(&mut m, 0x8028, &crc.to_be_bytes());
    m
}

/// The spoofer process, run inside the namespace (`SOAK_SPOOFER` holds its orders):
/// sends checks valid for its own connection from the victims' addresses (bound with
/// `IP_TRANSPARENT`, so the kernel lets a socket use an address it does not own) and,
/// now and then, from its own address to keep that connection alive. Prints what it
/// sent and how many of its own checks the node answered.
fn spoofer(orders: &str) {
    let get = |k: &str| {
        orders
            .split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("spoofer order {k} missing"))
            .to_string()
    };
    let node: SocketAddr = get("node").parse().expect("node");
    let own: SocketAddr = get("own").parse().expect("own");
    let victims: Vec<SocketAddr> = get("victims")
        .split(',')
        .map(|v| v.parse().expect("victim"))
        .collect();
    let (user, pwd) = (get("user"), get("pwd"));
    let secs: u64 = get("secs").parse().expect("secs");
    let rate: u64 = get("rate").parse().expect("rate");
    let forged: Vec<std::net::UdpSocket> = victims
        .iter()
        .map(|v| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                .expect("socket");
            s.set_ip_transparent_v4(true)
                .expect("IP_TRANSPARENT (needs CAP_NET_ADMIN)");
            s.bind(&(*v).into())
                .unwrap_or_else(|e| panic!("bind to the victim's address {v}: {e}"));
            s.into()
        })
        .collect();
    let mine = std::net::UdpSocket::bind(own).expect("own address");
    mine.set_nonblocking(true).expect("nonblocking");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut tid = || {
        let mut t = [0u8; 12];
        for b in &mut t {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        t
    };
    let started = Instant::now();
    let (mut sent, mut own_sent, mut answered) = (0u64, 0u64, 0u64);
    let burst = (rate / 100).max(1);
    let mut buf = [0u8; 1500];
    while started.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        for i in 0..burst {
            let socket = &forged[(i as usize) % forged.len()];
            if socket
                .send_to(&signed_check(&user, &pwd, tid()), node)
                .is_ok()
            {
                sent += 1;
            }
        }
        if mine
            .send_to(&signed_check(&user, &pwd, tid()), node)
            .is_ok()
        {
            own_sent += 1;
        }
        while let Ok((n, _)) = mine.recv_from(&mut buf) {
            // A binding success response.
            if n >= 20 && buf[0] == 0x01 && buf[1] == 0x01 {
                answered += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(tick.elapsed()));
    }
    println!(
        "spoofer: {sent} checks from {} forged addresses, {own_sent} from its own, {answered} of those answered",
        forged.len()
    );
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// The attacker process (`SOAK_ATTACKER` holds its orders): runs the chosen attacks for
/// `secs` and prints what they sent.
async fn attack(orders: &str) {
    let get = |k: &str| {
        orders
            .split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("attacker order {k} missing"))
            .to_string()
    };
    let http: SocketAddr = get("http").parse().expect("http");
    let media: SocketAddr = get("media").parse().expect("media");
    let keys = Arc::new(KeySet::load(Path::new(&get("keys"))).expect("the node's keys"));
    let secs: u64 = get("secs").parse().expect("secs");
    let kinds = get("kinds");
    let on = |k: &str| kinds.split(',').any(|x| x.trim() == k);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut attackers = Vec::new();
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
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
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
    if let Ok(orders) = std::env::var("SOAK_SPOOFER") {
        spoofer(&orders);
        return;
    }
    if let Ok(orders) = std::env::var("SOAK_ATTACKER") {
        attack(&orders).await;
        return;
    }
    let secs = env("SOAK_SECS", 60);
    let kinds =
        std::env::var("SOAK_ATTACKS").unwrap_or_else(|_| "slow,oversized,joins,stun,spoof".into());
    let on = |k: &str| kinds.split(',').any(|x| x.trim() == k);
    // The spoofing attacker's namespace; without it the soak fails rather than leave
    // the attack out.
    let netns = on("spoof").then(|| {
        Netns::create().unwrap_or_else(|e| {
            panic!(
                "SOAK FAILED: cannot create the spoofing attacker's network namespace \
                 (root, or CAP_NET_ADMIN and CAP_SYS_ADMIN, is needed; \
                 SOAK_ATTACKS without `spoof` leaves the attack out): {e}"
            )
        })
    });
    // With the namespace, the node's media socket and the media room's clients use
    // this side's veth address, which forged packets from the namespace can name.
    let media_ip = netns
        .as_ref()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |n| IpAddr::V4(n.host_ip));
    let media_bind = SocketAddr::new(media_ip, 0);
    let dir = std::env::temp_dir().join(format!("meridian-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");
    // `SOAK_NODE_JOINS=N` sets the node's join budget (`signaling.node_joins_per_second`;
    // a huge value turns it off, for a before/after comparison);
    let config = dir.join("soak.toml");
    // `SOAK_NODE_CONNECTIONS=N` sets `http.node_connections_per_second` the same way.
    let mut toml = String::new();
    if let Ok(n) = std::env::var("SOAK_NODE_CONNECTIONS") {
        toml.push_str(&format!("[http]\nnode_connections_per_second = {n}\n"));
    }
    if let Ok(n) = std::env::var("SOAK_NODE_JOINS") {
        toml.push_str(&format!("[signaling]\nnode_joins_per_second = {n}\n"));
    }
    std::fs::write(&config, toml).expect("config file");
    // `SOAK_NODE_NICE=-10` runs the node at a higher CPU priority than the rest of a
    // shared machine (other builds, the attackers), as on a machine of its own.
    let nice = std::env::var("SOAK_NODE_NICE").unwrap_or_else(|_| "0".into());
    let child = Command::new("nice")
        .args(["-n", &nice])
        .arg(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--media-addr"])
        .arg(media_bind.to_string())
        .arg("--config")
        .arg(&config)
        .args([
            "--wt-addr",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "error,meridian::join_timing=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meridian serve starts");
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    // The node's join stage timestamps (legitimate joins only); the pipe is drained
    // throughout so the node never blocks on it.
    let node_stages = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    {
        let node_stages = node_stages.clone();
        let stderr = child.0.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((identity, stages)) = parse_stages(&line) {
                    if identity.starts_with("legit-") {
                        node_stages
                            .lock()
                            .expect("stage table")
                            .insert(identity, stages);
                    }
                } else if !line.contains("DEBUG") {
                    eprintln!("node: {line}");
                }
            }
        });
    }
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
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
            bind_ip: media_ip,
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

    // The spoofing attacker: a participant of the media room with an ICE connection
    // of its own (its address in the namespace), and a process in the namespace that
    // sends checks valid for that connection from every media room client's address.
    let mut spoof = None;
    if let Some(ns) = &netns {
        let own = SocketAddr::new(IpAddr::V4(ns.ns_ip), 40_000);
        let (mut ws, user, pwd) = spoofing_participant(http, &keys, own).await;
        let victims: Vec<String> = udp_sockets_on(ns.host_ip)
            .into_iter()
            .filter(|a| *a != media)
            .map(|a| a.to_string())
            .collect();
        assert!(
            victims.len() >= 4,
            "the media room's sockets on {}: {victims:?}",
            ns.host_ip
        );
        let orders = format!(
            "node={media};own={own};victims={};user={user};pwd={pwd};secs={secs};rate={}",
            victims.join(","),
            env("SOAK_SPOOF_RATE", 5000)
        );
        let exe = std::env::current_exe().expect("the soak's own path");
        let process = Command::new("nice")
            .args(["-n", "19", "ip", "netns", "exec", &ns.name])
            .arg(exe)
            .env("SOAK_SPOOFER", orders)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the spoofer starts in the namespace");
        // Keeps the spoofer's signaling alive (read, pinged) for the attack.
        let keep = tokio::spawn(async move {
            let mut ping = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    m = ws.next() => if !matches!(m, Some(Ok(_))) { break },
                    _ = ping.tick() => {
                        if ws.send(Message::text(ClientMessage::Ping { id: 1 }.encode())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        spoof = Some((KillOnDrop(process), keep, victims.len()));
    }

    // The attackers: a process of their own at the lowest CPU priority (`nice 19`), so
    // that on this shared machine they take only CPU the node does not use, as
    // attackers on other machines would; what they managed to send is printed.
    let attack_orders = format!(
        "http={http};media={media};keys={};secs={secs};kinds={kinds}",
        dir.join("keys").display()
    );
    let attackers = Command::new("nice")
        .args(["-n", "19"])
        .arg(std::env::current_exe().expect("the soak's own path"))
        .env("SOAK_ATTACKER", attack_orders)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the attackers start");
    let mut attackers = KillOnDrop(attackers);
    let attackers_pid = attackers.0.id();
    let cpu_before = (cpu_secs(pid), cpu_secs(attackers_pid));

    // The legitimate client: a fresh join every 500 ms, timed to `joined`.
    let started = Instant::now();
    let mut joins = Vec::new();
    let mut failed = 0u64;
    let mut peak = rss_before;
    let mut n = 0u64;
    let mut client_times = std::collections::HashMap::new();
    // Subscribed packet counts 5 s before the end: every track must still grow after.
    let mut late: Option<Vec<Vec<(String, u64)>>> = None;
    while started.elapsed() < Duration::from_secs(secs) {
        if late.is_none() && started.elapsed() + Duration::from_secs(5) >= Duration::from_secs(secs)
        {
            late = Some(room[2..].iter().map(packets).collect());
        }
        n += 1;
        let identity = format!("legit-{n}");
        // Made before the clock starts: signing is the client's cost, not the node's.
        let text = join_text(&keys, &identity, "legit");
        let t0 = Instant::now();
        let mut times = ClientTimes {
            connect: unix_micros(),
            ..ClientTimes::default()
        };
        match connect(http, attacker_ip(1), None).await {
            Some(mut ws) => {
                times.open = unix_micros();
                let _ = ws.send(Message::text(text)).await;
                times.sent = unix_micros();
                match until_joined(&mut ws, t0).await {
                    Some(d) => {
                        times.joined = unix_micros();
                        joins.push(d.as_secs_f64() * 1000.0);
                    }
                    None => failed += 1,
                }
                client_times.insert(identity, times);
                let _ = ws.close(None).await;
            }
            None => failed += 1,
        }
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed())).await;
    }
    let after_attack: Vec<Vec<(String, u64)>> = room[2..].iter().map(packets).collect();
    let cpu_node = cpu_secs(pid) - cpu_before.0;
    let cpu_attackers = cpu_secs(attackers_pid) - cpu_before.1;
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut attack_line = String::new();
    if let Some(out) = attackers.0.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut attack_line);
    }
    drop(attackers);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_after = rss_kib(pid);

    // A track flowing before the attack is kept when it still grew over the attack's
    // last 5 s (a track cut off mid-attack is not). The spoofer's own (silent) track
    // is not among them.
    let late = late.unwrap_or_else(|| before.clone());
    let mut kept = 0;
    let mut total = 0;
    for ((b, l), a) in before.iter().zip(&late).zip(&after_attack) {
        for (track, _) in b {
            total += 1;
            let p0 = l.iter().find(|(t, _)| t == track).map_or(0, |(_, p)| *p);
            if a.iter().any(|(t, p1)| t == track && *p1 > p0) {
                kept += 1;
            }
        }
    }
    let spoofed = match spoof {
        Some((mut process, keep, victims)) => {
            keep.abort();
            let mut line = String::new();
            if let Some(out) = process.0.stdout.take() {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = process.0.wait();
            Some((line.trim().to_string(), victims))
        }
        None => None,
    };
    println!(
        "soak: {secs} s of attack ({kinds}) against one node ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("{}", attack_line.trim());
    println!(
        "CPU during the attack: node {cpu_node:.1} s, attackers {cpu_attackers:.1} s (of {} s × 2 cores); \
         load average {}",
        secs,
        load_average
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
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
    print_stages(&client_times, &node_stages.lock().expect("stage table"));
    if let Some((line, victims)) = &spoofed {
        println!("spoofed STUN from the network namespace ({victims} victim addresses): {line}");
    }
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
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    drop(netns);
    if let Some((line, _)) = &spoofed {
        // The checks must have been valid (the node answered the spoofer's own), or
        // the attack proved nothing.
        let answered: u64 = line
            .rsplit(", ")
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            answered > 0,
            "SOAK FAILED: the node answered none of the spoofer's own checks: {line:?}"
        );
    }
    assert_eq!(
        kept, total,
        "SOAK FAILED: the media room lost tracks during the attack"
    );
}
