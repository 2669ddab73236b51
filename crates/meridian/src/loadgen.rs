//! `meridian loadgen`: many real WebRTC clients in one process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use meridian_auth::{Algorithm, Claims, Grants, KeySet, SigningKey};
use meridian_client::{Client, ClientConfig, ClientStats};
use str0m_netem::{NetemConfig, Probability, RandomLoss};

/// Flags of `meridian loadgen`.
#[derive(Args)]
pub struct LoadgenArgs {
    /// Signaling URL of the node.
    #[arg(long, default_value = "ws://127.0.0.1:7880/signal")]
    url: String,
    /// Signaling transport: `ws` (WebSocket at `--url`) or `wt` (WebTransport; its
    /// address and certificate hash are asked from the HTTP listener of `--url`).
    #[arg(long, default_value = "ws", value_parser = ["ws", "wt"])]
    transport: String,
    /// Publishing clients (audio + simulcast video each).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Receiving clients.
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Rooms to spread clients over (round robin).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Room name prefix.
    #[arg(long, default_value = "load")]
    room_prefix: String,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time after everyone joined before measuring starts (join and first-frame
    /// times are always measured from the start).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Data directory whose `keys/` mint tokens (the server's own dev key).
    #[arg(long, env = "MERIDIAN_DATA_DIR", default_value = "meridian-data")]
    data_dir: PathBuf,
    /// PKCS#8 PEM file of an ES256 signing key to mint tokens with instead.
    #[arg(long)]
    token_key: Option<PathBuf>,
    /// Key id of `--token-key`.
    #[arg(long, default_value = "dev-1")]
    token_kid: String,
    /// Region to put in tokens.
    #[arg(long)]
    region: Option<String>,
    /// Impair every client's traffic, e.g. `delay=200ms,jitter=20ms,loss=2%`.
    #[arg(long)]
    impair: Option<String>,
    /// Whose traffic `--impair` applies to: `all` clients (media then crosses two
    /// impaired hops), only `subscribers`, or only `publishers`.
    #[arg(long, default_value = "all", value_parser = ["all", "subscribers", "publishers"])]
    impair_who: String,
    /// Seed of the impairment.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Video bitrate of the three layers in kbit/s, e.g. `150,500,1500`.
    #[arg(long, default_value = "150,500,1500")]
    layer_kbps: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Parses `delay=200ms,jitter=20ms,loss=2%` into an emulator configuration.
pub fn parse_impairment(spec: &str, seed: u64) -> Result<NetemConfig> {
    let mut c = NetemConfig::new().seed(seed);
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("impairment {part:?} is not key=value"))?;
        match k.trim() {
            "delay" | "latency" => c = c.latency(humantime::parse_duration(v.trim())?),
            "jitter" => c = c.jitter(humantime::parse_duration(v.trim())?),
            "loss" => {
                let pct: f32 = v.trim().trim_end_matches('%').parse()?;
                if !(0.0..=100.0).contains(&pct) {
                    bail!("loss must be 0..=100%");
                }
                c = c.loss(RandomLoss::new(Probability::new(pct / 100.0)));
            }
            other => bail!("unknown impairment {other:?} (delay, jitter, loss)"),
        }
    }
    Ok(c)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

pub async fn run(args: LoadgenArgs) -> Result<()> {
    let keys = match &args.token_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let key = SigningKey::from_pkcs8_pem(Algorithm::Es256, args.token_kid.clone(), &pem)?;
            KeySet::new(Some(key), vec![])
        }
        None => KeySet::load(&args.data_dir.join("keys")).with_context(|| {
            format!(
                "loading token keys from {} (pass the server's --data-dir or --token-key)",
                args.data_dir.display()
            )
        })?,
    };
    let impairment = args
        .impair
        .as_deref()
        .map(|s| parse_impairment(s, args.seed))
        .transpose()?;
    let kbps: Vec<u64> = args
        .layer_kbps
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .context("--layer-kbps takes three numbers")?;
    if kbps.len() != 3 {
        bail!("--layer-kbps takes three numbers");
    }
    let rooms = args.rooms.max(1);
    let webtransport = match args.transport.as_str() {
        "wt" => Some(
            meridian_client::webtransport_endpoint(&args.url)
                .await
                .with_context(|| format!("asking {} for its WebTransport endpoint", args.url))?,
        ),
        _ => None,
    };
    let transport = |c: ClientConfig| match &webtransport {
        Some(ep) => c.over_webtransport(ep.clone()),
        None => c,
    };
    let token = |identity: String, room: String, publish: bool| -> Result<String> {
        let mut c = Claims::new(
            identity,
            room,
            meridian_auth::unix_now(),
            Duration::from_secs(3600),
        )
        .with_grants(if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        });
        if let Some(r) = &args.region {
            c = c.with_region(r.clone());
        }
        Ok(keys.sign(&c)?)
    };

    let mut publishers = Vec::new();
    for i in 0..args.publishers {
        let room = format!("{}-{}", args.room_prefix, i % rooms);
        let mut c = transport(ClientConfig::new(
            &args.url,
            token(format!("pub-{i}"), room, true)?,
        ));
        c.auto_subscribe = false;
        c.layer_bitrates = [kbps[0] * 1000, kbps[1] * 1000, kbps[2] * 1000];
        if args.impair_who != "subscribers" {
            c.impairment = impairment;
        }
        publishers.push(
            Client::join(c)
                .await
                .with_context(|| format!("publisher {i}"))?,
        );
    }
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let room = format!("{}-{}", args.room_prefix, i % rooms);
        let mut c = transport(ClientConfig::subscriber(
            &args.url,
            token(format!("sub-{i}"), room, false)?,
        ));
        if args.impair_who != "publishers" {
            c.impairment = impairment;
        }
        subscribers.push(
            Client::join(c)
                .await
                .with_context(|| format!("subscriber {i}"))?,
        );
    }
    // Connection set-up and the first keyframes are not steady state: measure after.
    tokio::time::sleep(args.warmup).await;
    let at_warmup: Vec<ClientStats> = subscribers.iter().map(Client::stats).collect();
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    let elapsed = started.elapsed();

    let pub_stats: Vec<ClientStats> = publishers.iter().map(Client::stats).collect();
    let sub_stats: Vec<ClientStats> = subscribers
        .iter()
        .zip(&at_warmup)
        .map(|(c, w)| c.stats().since(w))
        .collect();
    for c in publishers.into_iter().chain(subscribers) {
        let _ = c.leave().await;
    }

    // Each subscriber expects every publisher's audio and video in its room.
    let mut tracks_expected = 0;
    for i in 0..args.subscribers {
        let room = i % rooms;
        tracks_expected += 2 * (0..args.publishers).filter(|p| p % rooms == room).count();
    }
    let all_tracks = sub_stats.iter().flat_map(|s| s.tracks.values());
    let tracks_received = all_tracks.clone().filter(|t| t.frames > 0).count();
    let packets_received: u64 = all_tracks.clone().map(|t| t.packets).sum();
    let frames_received: u64 = all_tracks
        .clone()
        .filter(|t| t.video)
        .map(|t| t.frames)
        .sum();
    let video_missing: u64 = all_tracks
        .clone()
        .filter(|t| t.video)
        .map(|t| t.frames_missing)
        .sum();
    let audio_frames: u64 = all_tracks
        .clone()
        .filter(|t| !t.video)
        .map(|t| t.frames)
        .sum();
    let audio_missing: u64 = all_tracks
        .clone()
        .filter(|t| !t.video)
        .map(|t| t.frames_missing)
        .sum();
    let freezes: u64 = all_tracks.clone().map(|t| t.freezes).sum();
    let latency = sorted(
        all_tracks
            .clone()
            .filter(|t| t.video)
            .flat_map(|t| t.latency_ms.clone())
            .collect(),
    );
    let jitter = sorted(
        all_tracks
            .clone()
            .filter(|t| t.video)
            .flat_map(|t| t.jitter_ms.clone())
            .collect(),
    );
    let joins = sorted(
        sub_stats
            .iter()
            .chain(&pub_stats)
            .map(|s| s.join_ms)
            .collect(),
    );
    let first_frames = sorted(sub_stats.iter().filter_map(|s| s.first_frame_ms).collect());
    let pct = |missing: u64, got: u64| {
        if missing + got == 0 {
            0.0
        } else {
            missing as f64 * 100.0 / (missing + got) as f64
        }
    };
    let summary = serde_json::json!({
        "transport": args.transport,
        "publishers": args.publishers,
        "subscribers": args.subscribers,
        "rooms": rooms,
        "duration_s": elapsed.as_secs_f64(),
        "impairment": args.impair,
        "impaired": args.impair.as_ref().map(|_| args.impair_who.clone()),
        "tracks_expected": tracks_expected,
        "tracks_received": tracks_received,
        "packets_received": packets_received,
        "packet_loss_pct": pct(audio_missing, audio_frames),
        "frames_received": frames_received,
        "frames_delivered_pct": 100.0 - pct(video_missing, frames_received),
        "freezes": freezes,
        "latency_ms_p50": percentile(&latency, 0.50),
        "latency_ms_p95": percentile(&latency, 0.95),
        "latency_ms_p99": percentile(&latency, 0.99),
        "jitter_ms_p90": percentile(&jitter, 0.90),
        "join_ms_p50": percentile(&joins, 0.50),
        "join_ms_p95": percentile(&joins, 0.95),
        "first_frame_ms_p50": percentile(&first_frames, 0.50),
        "first_frame_ms_p95": percentile(&first_frames, 0.95),
    });
    println!(
        "loadgen: {} publishers, {} subscribers in {} room(s) for {:.1}s{}",
        args.publishers,
        args.subscribers,
        rooms,
        elapsed.as_secs_f64(),
        args.impair
            .as_deref()
            .map(|i| format!(" (impaired: {i})"))
            .unwrap_or_default()
    );
    println!("  tracks received   {tracks_received}/{tracks_expected}");
    println!(
        "  video frames      {frames_received} received, {:.2}% delivered, {freezes} freezes",
        summary["frames_delivered_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  packet loss       {:.2}% (audio packets, one per frame)",
        summary["packet_loss_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  latency ms        p50 {:.1}  p95 {:.1}  p99 {:.1}   jitter p90 {:.1}",
        percentile(&latency, 0.5),
        percentile(&latency, 0.95),
        percentile(&latency, 0.99),
        percentile(&jitter, 0.9)
    );
    println!(
        "  join ms           p50 {:.1}  p95 {:.1}   first frame p50 {:.1}  p95 {:.1}",
        percentile(&joins, 0.5),
        percentile(&joins, 0.95),
        percentile(&first_frames, 0.5),
        percentile(&first_frames, 0.95)
    );
    if args.json {
        println!("{summary}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impairment_spec_parses_and_rejects_nonsense() {
        parse_impairment("delay=200ms,jitter=20ms,loss=2%", 1).unwrap();
        assert!(parse_impairment("delay=fast", 1).is_err());
        assert!(parse_impairment("loss=200%", 1).is_err());
        assert!(parse_impairment("warp=9", 1).is_err());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v = sorted((1..=100).map(f64::from).collect());
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
