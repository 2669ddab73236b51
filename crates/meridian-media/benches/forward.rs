//! Forwarding cost of the media core, measured inside `Sfu` calls only.
//!
//! One publisher (Opus + VP8 with three simulcast layers) and S subscribers run in
//! memory under virtual time (see `tests/common`). After everyone is connected and
//! layers have settled, T seconds of media are pushed and only the time spent in
//! `Sfu::handle_datagram`, `Sfu::handle_timeout` and draining `poll_transmit` /
//! `poll_event` is counted — not the peers, not a socket.
//!
//! ```text
//! cargo bench -p meridian-media --bench forward            # S=50, T=5
//! cargo bench -p meridian-media --bench forward -- 100 10  # S=100, T=10
//! SUBS=20 SECS=2 cargo bench -p meridian-media --bench forward
//! LAYER_KBPS=100,200,300 cargo bench -p meridian-media --bench forward  # low bitrates
//! ```
//!
//! Heap is counted by a counting global allocator (`cap`): bytes per subscriber are
//! the core's heap growth for S subscribers after streaming, with the subscriber
//! peers themselves dropped before measuring.
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::System;
use std::time::{Duration, Instant};

use cap::Cap;
use common::{Harness, MediaConfig, Profile};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Process CPU time (user + system) from /proc/self/stat, in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn arg(pos: usize, env: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    args.get(pos)
        .and_then(|a| a.parse().ok())
        .or_else(|| std::env::var(env).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let subs = arg(0, "SUBS", 50) as usize;
    let secs = arg(1, "SECS", 5);
    let estimate = arg(2, "ESTIMATE", 3_000_000);
    let usage = "LAYER_KBPS takes three numbers, e.g. 150,500,1500";
    let layers: Vec<u64> = std::env::var("LAYER_KBPS")
        .unwrap_or_else(|_| "150,500,1500".into())
        .split(',')
        .map(|k| k.trim().parse::<u64>().expect(usage) * 1000)
        .collect();
    let layer_bitrates: [u64; 3] = layers.try_into().expect(usage);
    let media = MediaConfig {
        layer_bitrates,
        keyframe_interval: 300,
        ..MediaConfig::default()
    };
    println!(
        "forward: 1 publisher (opus + vp8 q/h/f at {:?} bit/s, {} fps), {subs} subscribers, \
         {secs} s of virtual media, initial estimate {estimate} bit/s",
        media.layer_bitrates, media.fps
    );

    let mut h = Harness::with_config(|mut c| {
        c.initial_estimate_bps = estimate;
        c
    });
    h.keep_events = false;
    let publisher = h.add_publisher("bench", "publisher", media);
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(200));

    let heap0 = ALLOCATOR.allocated();
    let rss0 = rss_bytes();
    let wall = Instant::now();
    for i in 0..subs {
        h.add_subscriber("bench", &format!("sub{i}"));
    }
    h.connect(Duration::from_secs(10));
    println!(
        "connected {subs} subscribers in {:.2?} wall ({:.2?} virtual)",
        wall.elapsed(),
        h.elapsed()
    );
    // Let bandwidth estimates and layers settle.
    h.run_for(Duration::from_secs(2));

    let before = h.sfu.stats().clone();
    let cpu0 = cpu_time();
    let wall = Instant::now();
    h.profile = Some(Profile {
        cpu: std::env::var("NO_CPU_CLOCK").is_err(),
        ..Profile::default()
    });
    h.run_for(Duration::from_secs(secs));
    let total_wall = wall.elapsed();
    let total_cpu = cpu_time() - cpu0;
    let mut profile = h.profile.take().unwrap_or_default();
    let after = h.sfu.stats().clone();

    let forwarded = after.rtp_packets_forwarded - before.rtp_packets_forwarded;
    let rtp_in = after.rtp_packets_in - before.rtp_packets_in;
    let bytes = after.rtp_bytes_forwarded - before.rtp_bytes_forwarded;
    let core = profile.sfu_time;
    let us_per_pkt = core.as_secs_f64() * 1e6 / forwarded.max(1) as f64;
    // Without the thread CPU clock (NO_CPU_CLOCK, e.g. under valgrind), fall back to wall.
    let cpu = if profile.cpu { profile.sfu_cpu } else { core };
    let cpu_us_per_pkt = cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64;
    profile.rtp_latencies.sort();
    let lat = &profile.rtp_latencies;
    let received: usize = h.clients[1..].iter().map(|c| c.frames.len()).sum();
    let mut frame_delay: Vec<Duration> = h.clients[1..]
        .iter()
        .flat_map(|c| c.frames.iter())
        .filter(|f| f.at >= h.now - Duration::from_secs(secs))
        .map(|f| f.latency)
        .collect();
    frame_delay.sort();

    println!("--- forwarding ({secs} s virtual) ---");
    println!("rtp packets in             {rtp_in}");
    println!(
        "rtp packets forwarded      {forwarded}  ({:.1} per packet in, {:.1} MB payload)",
        forwarded as f64 / rtp_in.max(1) as f64,
        bytes as f64 / 1e6
    );
    println!(
        "datagrams sent             {}  ({:.3} per forwarded packet: media, padding, retransmissions, RTCP)",
        profile.datagrams_out,
        profile.datagrams_out as f64 / forwarded.max(1) as f64
    );
    println!(
        "video subscriber tracks    {}",
        h.sfu.outbound_video_tracks()
    );
    println!(
        "core time (Sfu calls)      {core:.2?} in {} calls",
        profile.calls
    );
    println!("core thread CPU            {cpu:.2?}");
    println!("core µs per forwarded pkt  {cpu_us_per_pkt:.3} CPU  ({us_per_pkt:.3} wall)");
    println!(
        "forwarded pkts/s per core  {:.0}  (CPU; excluding the kernel send)",
        forwarded as f64 / cpu.as_secs_f64().max(1e-9)
    );
    println!(
        "added latency per RTP datagram (handle_datagram + drain): p50 {:.1?}  p99 {:.1?}  max {:.1?}  (n={})",
        percentile(lat, 0.50),
        percentile(lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        lat.len()
    );
    println!(
        "virtual delay publisher write -> subscriber frame (node pacing, no network): p50 {:.1?}  p99 {:.1?}  (n={})",
        percentile(&frame_delay, 0.50),
        percentile(&frame_delay, 0.99),
        frame_delay.len()
    );
    println!(
        "whole process: {total_wall:.2?} wall, {total_cpu:.2?} CPU (peers included); core share {:.1} %",
        core.as_secs_f64() * 100.0 / total_wall.as_secs_f64().max(1e-9)
    );
    println!(
        "frames received by subscribers {received}; datagrams unrouted/malformed/rejected {}/{}/{}",
        after.datagrams_unrouted, after.datagrams_malformed, after.datagrams_rejected
    );

    // Memory: drop the subscriber peers (keep the publisher), then count what the core holds.
    drop(profile);
    let rss1 = rss_bytes();
    h.clients.truncate(publisher + 1);
    h.clients.shrink_to_fit();
    let heap1 = ALLOCATOR.allocated();
    println!("--- memory ---");
    println!(
        "core heap per subscriber   {:.0} bytes ({:.1} KiB; {} subscribers, after {secs} s of media, RTX caches full)",
        (heap1 as f64 - heap0 as f64) / subs.max(1) as f64,
        (heap1 as f64 - heap0 as f64) / subs.max(1) as f64 / 1024.0,
        subs
    );
    // An idle participant (no tracks, never connected) on a fresh core.
    let mut idle = meridian_media::Sfu::new(
        meridian_media::SfuConfig::new(common::SFU_ADDR),
        Instant::now(),
    );
    let heap2 = ALLOCATOR.allocated();
    let now = Instant::now();
    for i in 0..subs.max(1) {
        idle.add_participant(now, "idle", &format!("p{i}"), true);
    }
    while idle.poll_transmit().is_some() || idle.poll_event().is_some() {}
    println!(
        "core heap per idle participant {:.0} bytes (its subscriber Rtc, before any negotiation)",
        (ALLOCATOR.allocated() as f64 - heap2 as f64) / subs.max(1) as f64
    );
    println!(
        "process RSS per subscriber {:.0} bytes (core + peer, from /proc/self/statm)",
        (rss1 as f64 - rss0 as f64) / subs.max(1) as f64
    );
}
