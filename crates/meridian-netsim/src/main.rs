//! `meridian-netsim`: the WAN router of the multi-region simulation.
//!
//! ```text
//! meridian-netsim --tun mrwan0 --region eu=10.77.1.0/24 --region us=10.77.2.0/24 \
//!     --link eu:us=40ms,0.5% --stats /tmp/wan.json
//! ```
//!
//! Opens (creates) the TUN device `--tun` in the current network namespace, reads
//! every packet the namespace routes into it, delays and drops it per region pair
//! ([`meridian_netsim::Wan`]) and writes it back into the device, from where the
//! kernel routes it on to its destination. `--stats` is rewritten every second with
//! the per-pair counters as JSON. Runs until killed.

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

use meridian_netsim::{Link, Region, Wan};

/// Most packets waiting between the reader thread and the WAN.
const CHANNEL_PACKETS: usize = 65_536;

struct Args {
    tun: String,
    regions: Vec<Region>,
    links: Vec<Link>,
    seed: u64,
    stats: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        tun: "mrwan0".into(),
        regions: Vec::new(),
        links: Vec::new(),
        seed: 1,
        stats: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--tun" => args.tun = value()?,
            "--region" => args
                .regions
                .push(Region::parse(&value()?).map_err(|e| e.to_string())?),
            "--link" => args
                .links
                .push(Link::parse(&value()?).map_err(|e| e.to_string())?),
            "--seed" => args.seed = value()?.parse().map_err(|_| "--seed takes a number")?,
            "--stats" => args.stats = Some(value()?.into()),
            "-h" | "--help" => {
                return Err(
                    "usage: meridian-netsim --tun NAME --region NAME=NET/N... --link A:B=DELAYms[,LOSS%]... [--seed N] [--stats FILE]"
                        .into(),
                );
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if args.regions.len() < 2 {
        return Err("at least two --region".into());
    }
    Ok(args)
}

fn write_stats(path: &std::path::Path, wan: &Wan, reader_drops: u64) {
    let pairs: Vec<_> = wan
        .stats()
        .into_iter()
        .map(|p| {
            serde_json::json!({
                "from": p.from, "to": p.to, "packets_in": p.packets_in,
                "packets_out": p.packets_out, "bytes_out": p.bytes_out,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "pairs": pairs,
        "passed": wan.passed,
        "overflow_drops": wan.overflow_drops,
        "reader_drops": reader_drops,
    });
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, doc.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut wan = Wan::new(args.regions, &args.links, args.seed).map_err(|e| e.to_string())?;
    let dev = Arc::new(
        tun_rs::DeviceBuilder::new()
            .name(&args.tun)
            .build_sync()
            .map_err(|e| format!("opening TUN device {}: {e}", args.tun))?,
    );
    eprintln!("meridian-netsim: {} up", args.tun);
    let (tx, rx) = sync_channel::<Vec<u8>>(CHANNEL_PACKETS);
    let reader_drops = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let dev = dev.clone();
        let drops = reader_drops.clone();
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 65_536];
                match dev.recv(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.try_send(buf).is_err() {
                            drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        eprintln!("meridian-netsim: reading the TUN device: {e}");
                        return;
                    }
                }
            }
        });
    }
    let mut last_stats = Instant::now();
    loop {
        let now = Instant::now();
        let wait = wan
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        match rx.recv_timeout(wait) {
            Ok(p) => {
                wan.handle_packet(Instant::now(), p);
                for p in rx.try_iter().take(1024) {
                    wan.handle_packet(Instant::now(), p);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err("the TUN reader stopped".into()),
        }
        wan.handle_timeout(Instant::now());
        while let Some(p) = wan.poll_transmit() {
            let _ = dev.send(&p);
        }
        if let Some(path) = &args.stats
            && last_stats.elapsed() >= Duration::from_secs(1)
        {
            last_stats = Instant::now();
            write_stats(
                path,
                &wan,
                reader_drops.load(std::sync::atomic::Ordering::Relaxed),
            );
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("meridian-netsim: {e}");
        std::process::exit(1);
    }
}
