//! Relay benchmark: one room of 1 publisher and `SUBSCRIBERS` (default 300)
//! subscribers spread over three node processes on one Postgres by
//! `--max-participants` (a third of the room each), so node-a sends each track once
//! to node-b and once to node-c, which fan it out.
//!
//! `cargo bench -p meridian --bench relay` (env: `SUBSCRIBERS`, default 300; `SECS`,
//! the measured window, default 10). Needs the local Postgres
//! (`scripts/start-postgres.sh`). Prints, per node, its participants, packets
//! forwarded per second, relay packets and CPU; the one-way latency of subscribers on
//! node-a (direct) and on node-b/c (one relay hop), and the difference (the hop);
//! CPU per forwarded copy and per relayed packet.
//!
//! Subscribers are counting receivers (`count_only`: ICE, DTLS, then SRTP packets are
//! counted, not decrypted), so one process carries 300 of them; latency is the
//! publisher's frame time to the receipt of the frame's first packet, both in this
//! process.

#[path = "../tests/region/mod.rs"]
mod region;

use std::time::{Duration, Instant};

use meridian_client::{Client, ClientConfig};
use region::{Region, light};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// User + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Sum of every series of `name` whose labels contain `with` (any, when empty).
fn total(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| (r.starts_with(' ') || r.starts_with('{')) && r.contains(with))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let subscribers = env("SUBSCRIBERS", 300);
    let secs = env("SECS", 10) as u64;
    let cap = (subscribers + 1).div_ceil(3).to_string();
    let region = Region::start("relay_bench", 3, &["--max-participants", &cap]).await;
    let urls = region.urls();
    let room = "bench";
    let publisher = Client::join(
        light(ClientConfig::new(&urls[0], region.token("pub", room, true)))
            .with_fallback_urls(urls.clone()),
    )
    .await
    .expect("the publisher joins");
    let started = Instant::now();
    let mut subs = Vec::new();
    for i in 0..subscribers {
        let token = region.token(&format!("sub-{i}"), room, false);
        let mut config = light(ClientConfig::subscriber(&urls[0], token));
        config.count_only = true;
        subs.push(Client::join(config).await.expect("a subscriber joins"));
    }
    println!(
        "{subscribers} subscribers joined in {:.1} s (cap {cap} per node)",
        started.elapsed().as_secs_f64()
    );
    // Everyone receives before the window starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while subs.iter().any(|s| s.stats().counted.packets == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let silent = subs
        .iter()
        .filter(|s| s.stats().counted.packets == 0)
        .count();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before_stats: Vec<_> = subs.iter().map(|s| s.stats()).collect();
    let before_cpu: Vec<f64> = region
        .nodes
        .iter()
        .map(|n| cpu_secs(n.child.id()))
        .collect();
    let mut before_m = Vec::new();
    for n in &region.nodes {
        before_m.push(n.metrics().await);
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let window = t0.elapsed().as_secs_f64();
    let after_cpu: Vec<f64> = region
        .nodes
        .iter()
        .map(|n| cpu_secs(n.child.id()))
        .collect();
    let mut after_m = Vec::new();
    for n in &region.nodes {
        after_m.push(n.metrics().await);
    }

    println!("window {window:.1} s; {silent} subscribers never received");
    let mut relayed_in = 0.0;
    let mut cpu_relay_nodes = 0.0;
    let mut fwd_relay_nodes = 0.0;
    for (i, n) in region.nodes.iter().enumerate() {
        let d = |name: &str, with: &str| {
            total(&after_m[i], name, with) - total(&before_m[i], name, with)
        };
        let fwd = d("meridian_rtp_packets_forwarded_total", "");
        let out = d("meridian_relay_packets_total", "direction=\"out\"");
        let inn = d("meridian_relay_packets_total", "direction=\"in\"");
        let cpu = after_cpu[i] - before_cpu[i];
        let here = subs
            .iter()
            .zip(&before_stats)
            .filter(|(_, b)| b.url == n.url)
            .count();
        println!(
            "{}: {here:>3} subscribers  forwarded {:>7.0} pkt/s  relay out {:>5.0} pkt/s  relay in {:>5.0} pkt/s  CPU {:>5.1} %  {:>5.2} µs per forwarded copy",
            n.id,
            fwd / window,
            out / window,
            inn / window,
            100.0 * cpu / window,
            1e6 * cpu / fwd.max(1.0),
        );
        if i > 0 {
            relayed_in += inn;
            cpu_relay_nodes += cpu;
            fwd_relay_nodes += fwd;
        }
    }
    println!(
        "node-b+c: {:.1} µs CPU per relayed packet received, including its fan-out to {:.0} local copies",
        1e6 * cpu_relay_nodes / relayed_in.max(1.0),
        fwd_relay_nodes / relayed_in.max(1.0)
    );

    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for (s, b) in subs.iter().zip(&before_stats) {
        let lat = s.stats().counted.since(&b.counted).latency_us;
        let into = if b.url == urls[0] {
            &mut direct
        } else {
            &mut relayed
        };
        into.extend(lat.into_iter().map(|us| us as f64 / 1000.0));
    }
    let (d50, d99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
    let (r50, r99) = (
        percentile(&mut relayed, 0.5),
        percentile(&mut relayed, 0.99),
    );
    println!(
        "latency on node-a (direct):   p50 {d50:.2} ms  p99 {d99:.2} ms  ({} frames)",
        direct.len()
    );
    println!(
        "latency on node-b/c (relay):  p50 {r50:.2} ms  p99 {r99:.2} ms  ({} frames)",
        relayed.len()
    );
    println!(
        "added by one relay hop:       p50 {:.2} ms  p99 {:.2} ms",
        r50 - d50,
        r99 - d99
    );
    drop(subs);
    drop(publisher);
    region.cleanup().await;
}
