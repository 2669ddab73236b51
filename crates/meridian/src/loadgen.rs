//! `meridian loadgen`: many real WebRTC clients in one process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use meridian_auth::{Algorithm, Claims, Grants, KeySet, SigningKey};
use meridian_client::{Client, ClientConfig, ClientError, ClientStats, ReconnectPolicy};
use str0m_netem::NetemConfig;

/// Flags of `meridian loadgen`.
#[derive(Args)]
pub struct LoadgenArgs {
    /// Signaling URL of the node (ignored when `--nodes` is given).
    #[arg(long, default_value = "ws://127.0.0.1:7880/signal")]
    url: String,
    /// Signaling URLs of the region's nodes, comma-separated: clients' first joins are
    /// spread over them round robin, and each client fails over through the whole list
    /// (starting after its own node). With `--transport wt`, each entry names a node's
    /// HTTP listener, as `--url` does.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Do not reconnect: a client that loses its node stops.
    #[arg(long)]
    no_reconnect: bool,
    /// How often clients ping their node.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Silence from a node after which its clients count it as lost and reconnect.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    ping_timeout: Duration,
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
    /// Subscribers play frames out like a browser: a frame still incomplete this long
    /// after its loss became visible is skipped and a keyframe asked for, instead of
    /// holding later frames until NACK repairs it; `off` holds them (str0m's frame
    /// assembly).
    #[arg(long, default_value = "100ms", value_parser = parse_deadline)]
    playout_deadline: Deadline,
    /// Clients negotiate audio RED (RFC 2198): publishers send every Opus packet again
    /// inside the next one, subscribers recover single losses from it.
    #[arg(long)]
    red: bool,
    /// Subscribers negotiate video FEC with the node (VP8 in RED with ULPFEC, sent at
    /// a rate following each subscriber's reported loss) and rebuild lost packets
    /// from it. Needs a playout deadline.
    #[arg(long)]
    fec: bool,
    /// Write every video frame latency sample (ms, one a line) to this file, e.g. for
    /// a CDF plot (`scripts/bench-chaos.sh`).
    #[arg(long)]
    latency_out: Option<PathBuf>,
    /// Video bitrate of the three layers in kbit/s, e.g. `150,500,1500`.
    #[arg(long, default_value = "150,500,1500")]
    layer_kbps: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Benchmark receivers: subscribers complete ICE and DTLS, then only count SRTP
    /// packets in batches (no decryption, no frame assembly); loss comes from RTP
    /// sequence gaps and latency from the RTP timestamp of each video frame's first
    /// packet (`counted_*` in the summary). They send receiver reports (the node
    /// learns their round trip) but no TWCC feedback.
    #[arg(long)]
    count_only: bool,
    /// Publishers send one VP8 stream at the top `--layer-kbps` rate instead of three
    /// simulcast layers.
    #[arg(long)]
    single_layer: bool,
    /// Video frames per second of publishers.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Capacity runs: subscribers join until the node refuses one as `unavailable`
    /// (an overloaded media worker, after the client's own retries); the rest do not
    /// try, and the run measures those that joined (`subscribers_joined`).
    #[arg(long)]
    until_refused: bool,
    /// Local IP the clients' media sockets bind to (the address the node sees).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Process id of the node: its CPU time (all threads, user + system, from
    /// `/proc/PID/stat`) over the measured window goes in the summary.
    #[arg(long)]
    node_pid: Option<u32>,
    /// Where the node's `/metrics` is: `https://host:port` (its internal listener,
    /// called with the operator certificate under `--data-dir`/internal/) or `host:port`
    /// (a plain `--metrics-listen` listener). Its forwarding counters and latency
    /// histogram over the measured window go in the summary.
    #[arg(long)]
    node_metrics: Option<String>,
    /// Choose the region by login instead of minting access tokens: ask this node
    /// (`http://HOST:PORT`) for the region directory, time every region's probe once
    /// (`--probe-samples`, median), and log each client in there with an identity
    /// token minted with `--identity-key`; clients then join their chosen region and
    /// re-home to the next region of their fallback order when it is gone.
    #[arg(long)]
    login: Option<String>,
    /// PKCS#8 PEM file of the identity provider's ES256 key (the node's `[login]
    /// identity_keys_dir` holds its public part); needed with `--login`.
    #[arg(long)]
    identity_key: Option<PathBuf>,
    /// Key id of `--identity-key`.
    #[arg(long, default_value = "idp-1")]
    identity_kid: String,
    /// Audience of the identity tokens (the node's `login.identity_audience`).
    #[arg(long, default_value = "meridian-login")]
    identity_audience: String,
    /// RTT samples per region probe with `--login`.
    #[arg(long, default_value_t = 5)]
    probe_samples: usize,
}

/// What `--login` measured once for all clients.
struct LoginContext {
    node: String,
    identity: KeySet,
    audience: String,
    rtts: Vec<meridian_protocol::region::RegionRtt>,
    /// The chosen region of each login, and the reason of the first.
    chosen: std::sync::Mutex<(std::collections::BTreeMap<String, u64>, Option<String>)>,
}

impl LoginContext {
    async fn new(args: &LoadgenArgs, node: &str) -> Result<LoginContext> {
        let path = args
            .identity_key
            .as_ref()
            .context("--login needs --identity-key")?;
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = SigningKey::from_pkcs8_pem(Algorithm::Es256, args.identity_kid.clone(), &pem)?;
        let probe = meridian_client::ProbeConfig {
            samples: args.probe_samples,
            ..Default::default()
        };
        let list = meridian_client::region::directory(node, probe.request_timeout)
            .await
            .with_context(|| format!("asking {node} for the region directory"))?;
        let rtts = meridian_client::region::measure(&list, &probe).await;
        Ok(LoginContext {
            node: node.to_string(),
            identity: KeySet::new(Some(key), vec![]),
            audience: args.identity_audience.clone(),
            rtts,
            chosen: Default::default(),
        })
    }

    /// Logs `claims` (an identity) in and configures `c` with the answer.
    async fn configure(&self, c: ClientConfig, claims: Claims, i: usize) -> Result<ClientConfig> {
        let identity = self
            .identity
            .sign(&claims.with_audience(self.audience.clone()))?;
        let answer = meridian_client::region::login_with(
            &self.node,
            &identity,
            self.rtts.clone(),
            Duration::from_secs(5),
        )
        .await?;
        {
            let mut chosen = self.chosen.lock().expect("never poisoned");
            *chosen.0.entry(answer.region.clone()).or_default() += 1;
            chosen.1.get_or_insert_with(|| answer.reason.clone());
        }
        Ok(c.with_login(&answer, i))
    }
}

/// CPU seconds (user + system, all threads) of process `pid` ("self" for this one).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    Some((ticks(14)? + ticks(15)?) / 100.0) // USER_HZ is 100 on Linux
}

/// The node's counters at one instant (see `--node-pid`, `--node-metrics`).
#[derive(Clone, Debug, Default)]
struct NodeSample {
    /// CPU seconds, user + system, all threads.
    cpu_s: f64,
    forwarded: f64,
    received: f64,
    /// RTP payload bytes forwarded, and ULPFEC payload bytes sent, to subscribers.
    bytes_forwarded: f64,
    fec_bytes: f64,
    /// Cumulative `forward_latency_seconds` buckets: (upper bound, count).
    latency_buckets: Vec<(f64, f64)>,
}

impl NodeSample {
    async fn take(pid: Option<u32>, metrics: Option<&str>, data_dir: &Path) -> NodeSample {
        let mut s = NodeSample::default();
        if let Some(pid) = pid {
            s.cpu_s = cpu_seconds(&pid.to_string()).unwrap_or(0.0);
        }
        if let Some(addr) = metrics
            && let Ok(text) = scrape(addr, data_dir).await
        {
            for line in text.lines() {
                let mut it = line.rsplitn(2, ' ');
                let (Some(v), Some(name)) = (it.next(), it.next()) else {
                    continue;
                };
                let Ok(v) = v.parse::<f64>() else { continue };
                if name == "meridian_rtp_packets_forwarded_total" {
                    s.forwarded = v;
                } else if name == "meridian_rtp_packets_received_total" {
                    s.received = v;
                } else if name == "meridian_rtp_bytes_forwarded_total" {
                    s.bytes_forwarded = v;
                } else if name == "meridian_fec_bytes_total" {
                    s.fec_bytes = v;
                } else if let Some(le) = name
                    .strip_prefix("meridian_forward_latency_seconds_bucket{le=\"")
                    .and_then(|r| r.strip_suffix("\"}"))
                {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    s.latency_buckets.push((le, v));
                }
            }
        }
        s
    }

    /// Upper bound of the bucket holding quantile `q` of the latencies observed
    /// between `earlier` and `self`, in µs.
    fn latency_quantile_us(&self, earlier: &NodeSample, q: f64) -> Option<f64> {
        let diffs: Vec<(f64, f64)> = self
            .latency_buckets
            .iter()
            .map(|(le, c)| {
                let before = earlier
                    .latency_buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, c - before)
            })
            .collect();
        let total = diffs.last()?.1;
        if total <= 0.0 {
            return None;
        }
        diffs
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map(|(le, _)| le * 1e6)
    }
}

/// `GET /metrics` over mutual TLS (`https://…`, the operator certificate under
/// `data_dir`) or plain HTTP/1.0.
async fn scrape(addr: &str, data_dir: &Path) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(internal) = addr.strip_prefix("https://") {
        let dir = data_dir.join(meridian_server::internal::DEV_DIR);
        let f = meridian_server::internal::TlsFiles::operator_client(&dir);
        let client = meridian_server::internal::InternalClient::from_files(
            &f.client_cert,
            &f.client_key,
            &f.client_ca,
        )?;
        let r = client
            .get(internal.trim_end_matches('/').parse()?, "/metrics", None)
            .await?;
        anyhow::ensure!(r.status == 200, "/metrics answered {}", r.status);
        return Ok(r.body);
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// Parses `delay=200ms,jitter=20ms,loss=2%[,burst=N]` into an emulator configuration
/// (the node's `--impair` syntax).
pub fn parse_impairment(spec: &str, seed: u64) -> Result<NetemConfig> {
    Ok(meridian_server::impair::parse_impairment(spec, seed)?)
}

/// `--playout-deadline`: a duration, or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Option<Duration>);

/// `off` or a duration.
fn parse_deadline(s: &str) -> Result<Deadline, humantime::DurationError> {
    if s == "off" {
        Ok(Deadline(None))
    } else {
        humantime::parse_duration(s).map(|d| Deadline(Some(d)))
    }
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
    let login = match &args.login {
        Some(node) => Some(LoginContext::new(&args, node).await?),
        None => None,
    };
    let keys = match &args.token_key {
        _ if login.is_some() => KeySet::default(),
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
    let nodes: Vec<String> = if args.nodes.is_empty() {
        vec![args.url.clone()]
    } else {
        args.nodes
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    };
    if nodes.is_empty() {
        bail!("--nodes names no node");
    }
    let mut webtransport = Vec::new();
    if args.transport == "wt" {
        for node in &nodes {
            webtransport.push(
                meridian_client::webtransport_endpoint(node)
                    .await
                    .with_context(|| format!("asking {node} for its WebTransport endpoint"))?,
            );
        }
    }
    let policy = ReconnectPolicy {
        enabled: !args.no_reconnect,
        ping_interval: args.ping_interval,
        ping_timeout: args.ping_timeout,
        ..ReconnectPolicy::default()
    };
    // Client `i` (publishers first, then subscribers) joins node `i % nodes` first and
    // fails over through the others in order after it.
    let transport = |c: ClientConfig, i: usize| {
        let c = ClientConfig {
            reconnect: policy.clone(),
            ..c
        };
        if webtransport.is_empty() {
            let n = nodes.len();
            ClientConfig {
                url: nodes[i % n].clone(),
                fallback_urls: (1..n).map(|k| nodes[(i + k) % n].clone()).collect(),
                ..c
            }
        } else {
            c.over_webtransport_nodes(&webtransport, i)
        }
    };
    let claims = |identity: String, room: String, publish: bool| -> Claims {
        Claims::new(
            identity,
            room,
            meridian_auth::unix_now(),
            Duration::from_secs(3600),
        )
        .with_grants(if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        })
    };
    // With `--login` the token is replaced by the login's, per region.
    let token = |identity: String, room: String, publish: bool| -> Result<String> {
        if login.is_some() {
            return Ok(String::new());
        }
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
        let mut c = transport(
            ClientConfig::new(&args.url, token(format!("pub-{i}"), room, true)?),
            i,
        );
        c.auto_subscribe = false;
        c.red = args.red;
        c.fec = args.fec;
        c.layer_bitrates = [kbps[0] * 1000, kbps[1] * 1000, kbps[2] * 1000];
        c.bind_ip = args.bind_ip;
        c.fps = args.fps;
        if args.single_layer {
            c.layers = Vec::new();
        }
        if args.impair_who != "subscribers" {
            c.impairment = impairment;
        }
        if let Some(login) = &login {
            let room = format!("{}-{}", args.room_prefix, i % rooms);
            c = login
                .configure(c, claims(format!("pub-{i}"), room, true), i)
                .await
                .with_context(|| format!("login of publisher {i}"))?;
        }
        publishers.push(
            Client::join(c)
                .await
                .with_context(|| format!("publisher {i}"))?,
        );
    }
    let mut subscribers = Vec::new();
    let mut refused = false;
    for i in 0..args.subscribers {
        let room = format!("{}-{}", args.room_prefix, i % rooms);
        let mut c = transport(
            ClientConfig::subscriber(&args.url, token(format!("sub-{i}"), room, false)?),
            args.publishers + i,
        );
        if args.impair_who != "publishers" {
            c.impairment = impairment;
        }
        c.bind_ip = args.bind_ip;
        c.count_only = args.count_only;
        c.playout_deadline = args.playout_deadline.0;
        c.red = args.red;
        c.fec = args.fec;
        if let Some(login) = &login {
            let room = format!("{}-{}", args.room_prefix, i % rooms);
            c = login
                .configure(
                    c,
                    claims(format!("sub-{i}"), room, false),
                    args.publishers + i,
                )
                .await
                .with_context(|| format!("login of subscriber {i}"))?;
        }
        match Client::join(c).await {
            Ok(s) => subscribers.push(s),
            Err(ClientError::Refused {
                code: meridian_protocol::ErrorCode::Unavailable,
                message,
            }) if args.until_refused => {
                eprintln!("loadgen: subscriber {i} refused ({message}); no more subscribers join");
                refused = true;
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("subscriber {i}")),
        }
    }
    // Connection set-up and the first keyframes are not steady state: measure after.
    tokio::time::sleep(args.warmup).await;
    let node_metrics = args.node_metrics.as_deref();
    let node_before = NodeSample::take(args.node_pid, node_metrics, &args.data_dir).await;
    let own_cpu_before = cpu_seconds("self");
    let at_warmup: Vec<ClientStats> = subscribers.iter().map(Client::stats).collect();
    let pub_at_warmup: Vec<ClientStats> = publishers.iter().map(Client::stats).collect();
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    let sub_end: Vec<ClientStats> = subscribers.iter().map(Client::stats).collect();
    let elapsed = started.elapsed();
    let node_after = NodeSample::take(args.node_pid, node_metrics, &args.data_dir).await;
    // Over the whole run, up to now: an overloaded node's metrics can take long to read.
    let ice_restarts =
        |clients: &[Client]| -> u64 { clients.iter().map(|c| c.stats().ice_restarts).sum() };
    let (pub_ice_restarts, sub_ice_restarts) =
        (ice_restarts(&publishers), ice_restarts(&subscribers));
    let own_cpu_s = cpu_seconds("self")
        .zip(own_cpu_before)
        .map(|(after, before)| after - before);

    let pub_stats: Vec<ClientStats> = publishers.iter().map(Client::stats).collect();
    let sub_full: Vec<ClientStats> = sub_end;
    let sub_stats: Vec<ClientStats> = sub_full
        .iter()
        .zip(&at_warmup)
        .map(|(c, w)| c.since(w))
        .collect();
    // Failovers are counted over the whole run, warm-up included.
    let failover = Failover::of(pub_stats.iter().chain(&sub_full));
    let mut clients_failed = 0usize;
    for c in publishers.into_iter().chain(subscribers) {
        if !c.is_running() {
            clients_failed += 1;
        }
        let _ = c.leave().await;
    }

    // Each subscriber expects every publisher's audio and video in its room.
    let mut tracks_expected = 0;
    for i in 0..sub_full.len() {
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
    let video_tracks = all_tracks
        .clone()
        .filter(|t| t.video && t.frames > 0)
        .count();
    let skips: u64 = all_tracks.clone().map(|t| t.skips).sum();
    let keyframes_requested: u64 = all_tracks.clone().map(|t| t.keyframes_requested).sum();
    let red_recovered: u64 = all_tracks.clone().map(|t| t.red_recovered).sum();
    let fec_recovered: u64 = all_tracks.clone().map(|t| t.fec_recovered).sum();
    let missing_reference: u64 = all_tracks.clone().map(|t| t.frames_missing_reference).sum();
    let latency = sorted(
        all_tracks
            .clone()
            .filter(|t| t.video)
            .flat_map(|t| t.latency_ms.clone())
            .collect(),
    );
    // Where a frame's latency goes: publisher write → its last packet handed to the
    // socket (publishers, measured window) → first and last packet read by the
    // subscriber → played out.
    let pub_sent = sorted(
        pub_stats
            .iter()
            .zip(&pub_at_warmup)
            .flat_map(|(c, w)| c.since(w).frame_sent_ms)
            .collect(),
    );
    let video_samples = |f: fn(&meridian_client::TrackStats) -> &Vec<f64>| {
        sorted(
            all_tracks
                .clone()
                .filter(|t| t.video)
                .flat_map(|t| f(t).clone())
                .collect(),
        )
    };
    let first_packet = video_samples(|t| &t.first_packet_ms);
    let last_packet = video_samples(|t| &t.last_packet_ms);
    let quantiles = |v: &[f64]| {
        serde_json::json!({
            "samples": v.len(),
            "p50": percentile(v, 0.50),
            "p95": percentile(v, 0.95),
            "p99": percentile(v, 0.99),
        })
    };
    let breakdown = serde_json::json!({
        "publisher_last_packet_sent": quantiles(&pub_sent),
        "subscriber_first_packet_read": quantiles(&first_packet),
        "subscriber_last_packet_read": quantiles(&last_packet),
        "played": quantiles(&latency),
    });
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
    let counted = sub_stats
        .iter()
        .fold(meridian_client::CountStats::default(), |mut a, s| {
            a.packets += s.counted.packets;
            a.bytes += s.counted.bytes;
            a.expected += s.counted.expected;
            a.batches += s.counted.batches;
            a.latency_us.extend_from_slice(&s.counted.latency_us);
            a
        });
    let count_latency = sorted(counted.latency_us.iter().map(|&v| f64::from(v)).collect());
    let secs = elapsed.as_secs_f64();
    if let Some(path) = &args.latency_out {
        let text: String = latency.iter().map(|l| format!("{l:.3}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let node_cpu_s = node_after.cpu_s - node_before.cpu_s;
    let node_forwarded = node_after.forwarded - node_before.forwarded;
    let node_us_per_packet = if node_forwarded > 0.0 {
        node_cpu_s * 1e6 / node_forwarded
    } else {
        0.0
    };
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
        "latency_breakdown_ms": breakdown,
        "jitter_ms_p90": percentile(&jitter, 0.90),
        "join_ms_p50": percentile(&joins, 0.50),
        "join_ms_p95": percentile(&joins, 0.95),
        "first_frame_ms_p50": percentile(&first_frames, 0.50),
        "first_frame_ms_p95": percentile(&first_frames, 0.95),
        "nodes": nodes,
        "reconnect": !args.no_reconnect,
        "clients_failed": clients_failed,
        "losses": failover.losses,
        "reconnects": failover.reconnects,
        "restored_resumes": failover.restored_resumes,
        "fresh_rejoins": failover.fresh_rejoins,
        "reconnect_attempts": failover.attempts,
        "redirects": failover.redirects,
        "loss_to_joined_samples": failover.to_joined.len(),
        "loss_to_joined_ms_p50": percentile(&failover.to_joined, 0.50),
        "loss_to_joined_ms_p95": percentile(&failover.to_joined, 0.95),
        "loss_to_joined_ms_max": failover.to_joined.last().copied().unwrap_or(0.0),
        "loss_to_media_samples": failover.to_media.len(),
        "loss_to_media_ms_p50": percentile(&failover.to_media, 0.50),
        "loss_to_media_ms_p95": percentile(&failover.to_media, 0.95),
        "loss_to_media_ms_max": failover.to_media.last().copied().unwrap_or(0.0),
        "media_not_restored": failover.media_not_restored,
    });
    let regions = serde_json::json!({
        "rehomes": failover.rehomes,
        "rehome_to_media_samples": failover.rehome_to_media.len(),
        "rehome_to_media_ms_p50": percentile(&failover.rehome_to_media, 0.50),
        "rehome_to_media_ms_p95": percentile(&failover.rehome_to_media, 0.95),
        "rehome_to_media_ms_max": failover.rehome_to_media.last().copied(),
        "rehome_to_joined_ms_p95": percentile(&failover.rehome_to_joined, 0.95),
        "regions_chosen": login.as_ref().map(|l| l.chosen.lock().expect("never poisoned").0.clone()),
        "region_choice": login.as_ref().and_then(|l| l.chosen.lock().expect("never poisoned").1.clone()),
        "region_rtts": login.as_ref().map(|l| &l.rtts),
    });
    let bench = serde_json::json!({
        "counted_packets": counted.packets,
        "counted_pps": counted.packets as f64 / secs,
        "counted_mbps": counted.bytes as f64 * 8.0 / secs / 1e6,
        "counted_loss_pct": if counted.expected > 0 {
            (counted.expected.saturating_sub(counted.packets)) as f64 * 100.0 / counted.expected as f64
        } else {
            0.0
        },
        "counted_per_batch": if counted.batches > 0 {
            counted.packets as f64 / counted.batches as f64
        } else {
            0.0
        },
        "counted_latency_us_p50": percentile(&count_latency, 0.50),
        "counted_latency_us_p99": percentile(&count_latency, 0.99),
        "counted_latency_samples": count_latency.len(),
        "node_cpu_pct": node_cpu_s * 100.0 / secs,
        "loadgen_cpu_pct": own_cpu_s.map(|c| c * 100.0 / secs),
        "node_forwarded_pps": node_forwarded / secs,
        // Above 1: the receivers got more RTP than the node forwarded as media (padding,
        // probes, retransmissions); about 1 at a node that sends only media.
        "counted_per_forwarded": if node_forwarded > 0.0 {
            counted.packets as f64 / node_forwarded
        } else {
            0.0
        },
        "node_received_pps": (node_after.received - node_before.received) / secs,
        "node_us_per_forwarded_packet": node_us_per_packet,
        "node_forward_latency_us_p50_bucket": node_after.latency_quantile_us(&node_before, 0.50),
        "node_forward_latency_us_p99_bucket": node_after.latency_quantile_us(&node_before, 0.99),
    });
    let playout = serde_json::json!({
        "freezes_per_min": if video_tracks > 0 {
            freezes as f64 * 60.0 / secs / video_tracks as f64
        } else {
            0.0
        },
        "playout_deadline_ms": args.playout_deadline.0.map(|d| d.as_secs_f64() * 1000.0),
        "frames_skipped": skips,
        "frames_missing_reference": missing_reference,
        "frames_decodable_pct": if frames_received + video_missing > 0 {
            (frames_received - missing_reference.min(frames_received)) as f64 * 100.0
                / (frames_received + video_missing) as f64
        } else {
            0.0
        },
        "keyframes_requested": keyframes_requested,
        "red": args.red,
        "red_recovered": red_recovered,
        "fec": args.fec,
        "fec_recovered": fec_recovered,
        "node_media_kbps": (node_after.bytes_forwarded - node_before.bytes_forwarded) * 8.0
            / secs
            / 1000.0,
        "node_fec_kbps": (node_after.fec_bytes - node_before.fec_bytes) * 8.0 / secs / 1000.0,
    });
    let mut summary = summary;
    let capacity = serde_json::json!({
        "subscribers_joined": sub_full.len(),
        "subscribers_refused": refused,
        "ice_restarts": sub_ice_restarts,
        "publisher_ice_restarts": pub_ice_restarts,
    });
    for more in [bench, regions, playout, capacity] {
        if let (Some(all), serde_json::Value::Object(more)) = (summary.as_object_mut(), more) {
            all.extend(more);
        }
    }
    println!(
        "loadgen: {} publishers, {} subscribers{} in {} room(s) for {:.1}s{}",
        args.publishers,
        args.subscribers,
        if refused {
            format!(
                " ({} joined, then one was refused)",
                summary["subscribers_joined"]
            )
        } else {
            String::new()
        },
        rooms,
        elapsed.as_secs_f64(),
        args.impair
            .as_deref()
            .map(|i| format!(" (impaired: {i})"))
            .unwrap_or_default()
    );
    println!("  tracks received   {tracks_received}/{tracks_expected}");
    println!(
        "  video frames      {frames_received} received, {:.2}% delivered, {freezes} freezes ({:.1}/min per track)",
        summary["frames_delivered_pct"].as_f64().unwrap_or(0.0),
        summary["freezes_per_min"].as_f64().unwrap_or(0.0)
    );
    if args.playout_deadline.0.is_some() {
        println!(
            "  playout deadline  {skips} skips, {keyframes_requested} keyframes asked for, {missing_reference} frames played with a missing reference ({:.2}% decodable)",
            summary["frames_decodable_pct"].as_f64().unwrap_or(0.0)
        );
    }
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
    if !last_packet.is_empty() {
        println!(
            "  latency parts ms  p50/p95: publisher sent {:.1}/{:.1}, first packet read {:.1}/{:.1}, last packet read {:.1}/{:.1}, played {:.1}/{:.1}",
            percentile(&pub_sent, 0.5),
            percentile(&pub_sent, 0.95),
            percentile(&first_packet, 0.5),
            percentile(&first_packet, 0.95),
            percentile(&last_packet, 0.5),
            percentile(&last_packet, 0.95),
            percentile(&latency, 0.5),
            percentile(&latency, 0.95),
        );
    }
    println!(
        "  join ms           p50 {:.1}  p95 {:.1}   first frame p50 {:.1}  p95 {:.1}",
        percentile(&joins, 0.5),
        percentile(&joins, 0.95),
        percentile(&first_frames, 0.5),
        percentile(&first_frames, 0.95)
    );
    if args.count_only {
        println!(
            "  counted           {:.0} pkt/s ({:.1} Mbit/s), loss {:.3}%, {:.1} per batch, latency µs p50 {:.0} p99 {:.0}",
            summary["counted_pps"].as_f64().unwrap_or(0.0),
            summary["counted_mbps"].as_f64().unwrap_or(0.0),
            summary["counted_loss_pct"].as_f64().unwrap_or(0.0),
            summary["counted_per_batch"].as_f64().unwrap_or(0.0),
            percentile(&count_latency, 0.5),
            percentile(&count_latency, 0.99)
        );
        if let Some(c) = own_cpu_s {
            println!("  load generator    {:.1}% of a core", c * 100.0 / secs);
        }
    }
    if args.node_pid.is_some() || args.node_metrics.is_some() {
        println!(
            "  node              {:.0} forwarded pkt/s, {:.1}% of a core, {:.2} µs per forwarded packet",
            node_forwarded / secs,
            node_cpu_s * 100.0 / secs,
            node_us_per_packet
        );
        if args.count_only {
            println!(
                "  counted/forwarded {:.3} (above 1: padding, probes or retransmissions beside the media)",
                summary["counted_per_forwarded"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if failover.losses > 0 || clients_failed > 0 {
        println!(
            "  failover          {} losses, {} reconnects ({} restored, {} fresh), {} clients failed",
            failover.losses,
            failover.reconnects,
            failover.restored_resumes,
            failover.fresh_rejoins,
            clients_failed
        );
        println!(
            "  loss to joined ms p50 {:.1}  p95 {:.1}  max {:.1}",
            percentile(&failover.to_joined, 0.5),
            percentile(&failover.to_joined, 0.95),
            failover.to_joined.last().copied().unwrap_or(0.0)
        );
        println!(
            "  loss to media ms  p50 {:.1}  p95 {:.1}  max {:.1}   ({} subscriber reconnects without media yet)",
            percentile(&failover.to_media, 0.5),
            percentile(&failover.to_media, 0.95),
            failover.to_media.last().copied().unwrap_or(0.0),
            failover.media_not_restored
        );
    }
    if args.json {
        println!("{summary}");
    }
    Ok(())
}

/// Reconnection figures summed over clients.
#[derive(Debug, Default)]
struct Failover {
    losses: u64,
    reconnects: u64,
    restored_resumes: u64,
    fresh_rejoins: u64,
    attempts: u64,
    redirects: u64,
    /// Loss → `joined`, ms, sorted.
    to_joined: Vec<f64>,
    /// Loss → first media frame, ms, sorted (receiving clients only).
    to_media: Vec<f64>,
    /// Reconnections of receiving clients (ones that had received media) after which
    /// no media arrived before the end.
    media_not_restored: u64,
    /// Reconnections that re-homed a client to another region.
    rehomes: u64,
    /// Loss → first media frame for re-homed receivers, ms, sorted.
    rehome_to_media: Vec<f64>,
    /// Loss → `joined` in the next region, ms, sorted.
    rehome_to_joined: Vec<f64>,
}

impl Failover {
    fn of<'a>(stats: impl Iterator<Item = &'a ClientStats>) -> Failover {
        let mut f = Failover::default();
        for s in stats {
            f.losses += s.losses;
            f.reconnects += s.reconnects;
            f.restored_resumes += s.restored_resumes;
            f.fresh_rejoins += s.fresh_rejoins;
            f.attempts += s.reconnect_attempts;
            f.redirects += s.redirects;
            f.to_joined.extend(s.loss_to_joined_ms());
            f.to_media.extend(s.loss_to_media_ms());
            f.rehomes += s.rehomes;
            for r in s
                .reconnect_history
                .iter()
                .filter(|r| r.rehomed_to.is_some())
            {
                f.rehome_to_media.extend(r.media_ms);
                f.rehome_to_joined.extend(r.joined_ms);
            }
            if s.last_frame_at.is_some() {
                f.media_not_restored += s
                    .reconnect_history
                    .iter()
                    .filter(|r| r.media_ms.is_none())
                    .count() as u64;
            }
        }
        f.to_joined = sorted(std::mem::take(&mut f.to_joined));
        f.to_media = sorted(std::mem::take(&mut f.to_media));
        f.rehome_to_media = sorted(std::mem::take(&mut f.rehome_to_media));
        f.rehome_to_joined = sorted(std::mem::take(&mut f.rehome_to_joined));
        f
    }
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
    fn nodes_flag_takes_a_comma_list() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadgenArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "loadgen",
            "--nodes",
            "ws://a/signal,ws://b/signal",
            "--ping-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(cli.args.nodes, ["ws://a/signal", "ws://b/signal"]);
        assert_eq!(cli.args.ping_timeout, Duration::from_secs(2));
        assert!(!cli.args.no_reconnect);
        let default = <Cli as clap::Parser>::try_parse_from(["loadgen"]).unwrap();
        assert!(default.args.nodes.is_empty());
    }

    #[test]
    fn failover_figures_sum_over_clients() {
        use meridian_client::{LossReason, ReconnectRecord, RejoinKind};
        let record = |joined: Option<f64>, media: Option<f64>| ReconnectRecord {
            reason: LossReason::PingTimeout,
            lost_at: Instant::now(),
            from_url: "a".into(),
            to_url: joined.map(|_| "b".into()),
            kind: joined.map(|_| RejoinKind::Restored),
            attempts: 1,
            joined_ms: joined,
            media_ms: media,
            rehomed_to: None,
        };
        let receiver = ClientStats {
            losses: 2,
            reconnects: 2,
            restored_resumes: 2,
            reconnect_attempts: 3,
            last_frame_at: Some(Instant::now()),
            reconnect_history: vec![record(Some(300.0), Some(500.0)), record(Some(100.0), None)],
            ..Default::default()
        };
        let publisher = ClientStats {
            losses: 1,
            reconnects: 1,
            fresh_rejoins: 1,
            reconnect_attempts: 1,
            reconnect_history: vec![record(Some(200.0), None)],
            ..Default::default()
        };
        let f = Failover::of([&receiver, &publisher].into_iter());
        assert_eq!((f.losses, f.reconnects), (3, 3));
        assert_eq!((f.restored_resumes, f.fresh_rejoins, f.attempts), (2, 1, 4));
        assert_eq!(f.to_joined, [100.0, 200.0, 300.0]);
        assert_eq!(f.to_media, [500.0]);
        assert_eq!(f.media_not_restored, 1, "only receivers count");
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v = sorted((1..=100).map(f64::from).collect());
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
