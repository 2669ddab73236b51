//! `meridian`: run a node, mint access tokens, generate load, check a config file,
//! plan capacity.

mod config_check;
mod loadgen;
mod plan;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use meridian_auth::{Claims, Grants, KeySet};
use meridian_server::{Config, Node};

/// Meridian: a WebRTC SFU.
///
/// Subcommands: serve (run a node), token create (mint an access token), loadgen
/// (synthetic publishers and subscribers), audit (query and verify the event log),
/// config check (validate a TOML config file), plan (capacity and cost planner).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an all-in-one node.
    Serve(ServeArgs),
    /// Access tokens: `token create` prints a signed JWT for a room and identity.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run N publishers and M subscribers against a node and report what they measured.
    Loadgen(loadgen::LoadgenArgs),
    /// Query and verify the region's event log (rooms, history, participant, range, export, verify).
    Audit(meridian_audit::AuditArgs),
    /// Node config files: `config check FILE` validates one.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Capacity and cost planner: pods per region, media bytes, egress cost (docs/capacity.md).
    Plan(plan::PlanArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a TOML config file: names the key and the problem (unknown key, wrong
    /// type, impossible value); exits 1 when it is not valid.
    Check {
        /// The file (see meridian.example.toml).
        file: PathBuf,
    },
    /// Write an internal-plane CA and the certificates it signs into DIR (`ca.pem`,
    /// `node.pem`/`node.key` for every NAME, `client.pem`/`client.key`): the layout
    /// of the development set, for nodes of several regions that must share one CA
    /// (development and tests; in a cluster cert-manager issues them).
    Pki {
        /// The folder to create.
        dir: PathBuf,
        /// DNS names and IP addresses the node certificate carries.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

/// Flags of `meridian serve`; each overrides the config file and has an env variable.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file (see README for its sections).
    #[arg(long, env = "MERIDIAN_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP address: WebSocket signaling, web page, health [default: 127.0.0.1:7880].
    #[arg(long, env = "MERIDIAN_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// UDP address for all media [default: 127.0.0.1:7882].
    #[arg(long, env = "MERIDIAN_MEDIA_ADDR")]
    media_addr: Option<SocketAddr>,
    /// UDP address for WebTransport signaling [default: 127.0.0.1:7881].
    #[arg(long, env = "MERIDIAN_WT_ADDR")]
    wt_addr: Option<SocketAddr>,
    /// PEM certificate chain for WebTransport (default: a generated self-signed
    /// development certificate, its hash at /webtransport/certificate-hashes).
    #[arg(long, env = "MERIDIAN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "MERIDIAN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Internal listener (mutual TLS): /metrics, /admin/*, /audit/*, node-to-node
    /// routes [default: 127.0.0.1:7883].
    #[arg(long, env = "MERIDIAN_INTERNAL_LISTEN")]
    internal_listen: Option<SocketAddr>,
    /// host:port other nodes of the region reach the internal listener at (relay
    /// control); a name or IP its certificate carries [default: the listen address
    /// when specific, else the --advertise-url host with the listen port].
    #[arg(long, env = "MERIDIAN_INTERNAL_ADVERTISE")]
    internal_advertise: Option<String>,
    /// PEM certificate of the internal listener (with --internal-key and
    /// --internal-client-ca; default: development certificates generated under
    /// DATA_DIR/internal/).
    #[arg(long, env = "MERIDIAN_INTERNAL_CERT", requires_all = ["internal_key", "internal_client_ca"])]
    internal_cert: Option<PathBuf>,
    /// PEM private key of --internal-cert.
    #[arg(long, env = "MERIDIAN_INTERNAL_KEY", requires = "internal_cert")]
    internal_key: Option<PathBuf>,
    /// PEM bundle of the CAs internal clients' certificates must chain to.
    #[arg(long, env = "MERIDIAN_INTERNAL_CLIENT_CA", requires = "internal_cert")]
    internal_client_ca: Option<PathBuf>,
    /// A plain-HTTP /metrics listener on a loopback address, for a scraper on the same
    /// machine without certificates (off by default).
    #[arg(long, env = "MERIDIAN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Address advertised to clients behind a 1:1 NAT.
    #[arg(long, env = "MERIDIAN_PUBLIC_IP")]
    public_ip: Option<IpAddr>,
    /// Most participants this node takes; a room spreads over several nodes (relay
    /// links between its parts) once its nodes are full [default: 0, no cap].
    #[arg(long, env = "MERIDIAN_MAX_PARTICIPANTS")]
    max_participants: Option<usize>,
    /// Media loops (threads) sharing the media port, each owning a share of the
    /// rooms [default: 0, one per core the process may use].
    #[arg(long, env = "MERIDIAN_MEDIA_WORKERS")]
    media_workers: Option<usize>,
    /// Directory for keys and data [default: ./meridian-data].
    #[arg(long, env = "MERIDIAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The region's event log, `postgres://…` [default: SQLite under --data-dir].
    #[arg(long, env = "MERIDIAN_DATABASE_URL")]
    database_url: Option<String>,
    /// Region this node serves [default: local].
    #[arg(long, env = "MERIDIAN_REGION")]
    region: Option<String>,
    /// Node id, unique in the region [default: node-1].
    #[arg(long, env = "MERIDIAN_NODE_ID")]
    node_id: Option<String>,
    /// Seconds a dropped session may resume [default: 10].
    #[arg(long, env = "MERIDIAN_RESUME_GRACE_SECS")]
    resume_grace_secs: Option<u64>,
    /// Signaling URL other nodes send this node's clients to [default: ws://HTTP_ADDR/signal].
    #[arg(long, env = "MERIDIAN_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Milliseconds between lease renewals [default: 100].
    #[arg(long, env = "MERIDIAN_LEASE_PERIOD_MS")]
    lease_period_ms: Option<u64>,
    /// Milliseconds a lease lasts without renewal (failure detection time) [default: 500].
    #[arg(long, env = "MERIDIAN_LEASE_TTL_MS")]
    lease_ttl_ms: Option<u64>,
    /// Seconds SIGTERM waits for participants to move before exiting [default: 30].
    #[arg(long, env = "MERIDIAN_DRAIN_TIMEOUT")]
    drain_timeout: Option<u64>,
    /// Folder of the built web client served at `/` [default: web-client/dist when it exists].
    #[arg(long, env = "MERIDIAN_WEB_ROOT")]
    web_root: Option<PathBuf>,
    /// Development mode: `POST /dev/token` mints short-lived tokens for anyone who can
    /// reach the HTTP address (the page then offers a "join as" form). Local use only.
    #[arg(long, env = "MERIDIAN_DEV")]
    dev: bool,
    /// Allows `--dev` on a non-loopback HTTP address (anyone who reaches it can mint
    /// tokens); without it such a node refuses to start.
    #[arg(long, env = "MERIDIAN_DEV_ALLOW_REMOTE")]
    dev_allow_remote: bool,
    /// Chaos test (needs --dev): impair the media socket like netem on the pod's
    /// interface, e.g. `delay=200ms,jitter=20ms,loss=2%`; `burst=N` makes the loss
    /// come in bursts of N datagrams on average (Gilbert-Elliott).
    #[arg(long, env = "MERIDIAN_IMPAIR")]
    impair: Option<String>,
    /// Which datagrams --impair applies to: egress (sent by the node), ingress or both.
    #[arg(long, env = "MERIDIAN_IMPAIR_DIRECTION", default_value = "egress", value_parser = ["egress", "ingress", "both"])]
    impair_direction: String,
    /// Seed of --impair's random numbers (same seed, same losses).
    #[arg(long, env = "MERIDIAN_IMPAIR_SEED", default_value_t = 1)]
    impair_seed: u64,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a signed access token.
    Create(TokenArgs),
}

#[derive(Args)]
struct TokenArgs {
    /// Room the token admits to.
    #[arg(long)]
    room: String,
    /// Participant identity.
    #[arg(long)]
    identity: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Allow publishing; implies subscribing too (a publisher always sees the room).
    #[arg(long)]
    publish: bool,
    /// Allow subscribing only (the grant when neither --publish nor --admin is given).
    #[arg(long)]
    subscribe: bool,
    /// Allow admin queries (audit API, close-signaling); alone, it grants no media.
    #[arg(long)]
    admin: bool,
    /// Region the token is sticky to.
    #[arg(long)]
    region: Option<String>,
    /// Lifetime, e.g. 1h, 30m.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Key id to sign with (default: the key set's signing key).
    #[arg(long)]
    kid: Option<String>,
    /// Data directory holding `keys/`.
    #[arg(long, env = "MERIDIAN_DATA_DIR", default_value = "meridian-data")]
    data_dir: PathBuf,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,str0m=warn,dimpl=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal (not in files, pipes or CI logs), and never
        // with NO_COLOR set.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Token(TokenCommand::Create(args)) => token_create(args),
        Command::Loadgen(args) => rt.block_on(loadgen::run(args)),
        Command::Config(ConfigCommand::Check { file }) => {
            match config_check::check_file(&file) {
                Ok(config) => println!(
                    "{}: ok ({})",
                    file.display(),
                    config_check::summary(&config)
                ),
                Err(problem) => {
                    eprintln!("{}: {problem}", file.display());
                    std::process::exit(1);
                }
            }
            Ok(())
        }
        Command::Config(ConfigCommand::Pki { dir, names, days }) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            meridian_server::internal::generate_pki(&dir, &names, days)?;
            println!("{}: internal CA and certificates written", dir.display());
            Ok(())
        }
        Command::Plan(args) => {
            let p = plan::plan(&args)?;
            print!("{}", plan::render(&args, &p));
            Ok(())
        }
        Command::Audit(args) => {
            let code = rt.block_on(audit(args))?;
            std::process::exit(code);
        }
    }
}

fn serve_config(args: &ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(a) = args.http_addr {
        config.http.addr = a;
    }
    if let Some(a) = args.media_addr {
        config.media.addr = a;
    }
    if let Some(a) = args.wt_addr {
        config.webtransport.addr = a;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.webtransport.tls_cert = Some(cert.clone());
        config.webtransport.tls_key = Some(key.clone());
    }
    if let Some(a) = args.internal_listen {
        config.internal.listen = a;
    }
    if let Some(a) = &args.internal_advertise {
        config.internal.advertise = Some(a.clone());
    }
    if let (Some(cert), Some(key), Some(ca)) = (
        &args.internal_cert,
        &args.internal_key,
        &args.internal_client_ca,
    ) {
        config.internal.cert = Some(cert.clone());
        config.internal.key = Some(key.clone());
        config.internal.client_ca = Some(ca.clone());
    }
    if let Some(a) = args.metrics_listen {
        config.internal.metrics_listen = Some(a);
    }
    if let Some(ip) = args.public_ip {
        config.media.public_ip = Some(ip);
    }
    if let Some(n) = args.max_participants {
        config.media.max_participants = n;
    }
    if let Some(n) = args.media_workers {
        config.media.workers = n;
    }
    if let Some(d) = &args.data_dir {
        config.node.data_dir = d.clone();
    }
    if let Some(r) = &args.region {
        config.node.region = r.clone();
    }
    if let Some(u) = &args.database_url {
        config.node.database_url = Some(u.clone());
    }
    if let Some(n) = &args.node_id {
        config.node.id = n.clone();
    }
    if let Some(g) = args.resume_grace_secs {
        config.signaling.resume_grace_secs = g;
    }
    if let Some(u) = &args.advertise_url {
        config.cluster.advertise_url = Some(u.clone());
    }
    if let Some(p) = args.lease_period_ms {
        config.cluster.lease_period_ms = p;
    }
    if let Some(t) = args.lease_ttl_ms {
        config.cluster.lease_ttl_ms = t;
    }
    if let Some(t) = args.drain_timeout {
        config.cluster.drain_timeout_secs = t;
    }
    if let Some(w) = &args.web_root {
        config.http.web_root = Some(w.clone());
    }
    if args.dev {
        config.http.dev = true;
    }
    if args.dev_allow_remote {
        config.http.dev_allow_remote = true;
    }
    if let Some(spec) = &args.impair {
        config.media.impair = Some(spec.clone());
        config.media.impair_direction = args.impair_direction.parse()?;
        config.media.impair_seed = args.impair_seed;
    }
    config.validate()?;
    Ok(config)
}

async fn serve(args: ServeArgs) -> Result<()> {
    let config = serve_config(&args)?;
    let mut node = Node::start(config).await?;
    // One line on stdout that scripts and tests read for the bound addresses.
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "http": node.http_addr.to_string(),
            "media": node.media_addr.to_string(),
            "wt": node.wt_addr.to_string(),
            "internal": node.internal_addr.to_string(),
            "metrics": node.metrics_addr.map(|a| a.to_string()),
        })
    );
    let files = node.internal_tls.files();
    eprintln!(
        "Internal plane (metrics, admin, audit, relay control) on https://{} with client certificates from {}",
        node.internal_addr,
        files.client_ca.display()
    );
    if node.dev {
        eprintln!(
            "Meridian is running in dev mode: open http://{}/ and join with an identity and a display name",
            node.http_addr
        );
    } else {
        eprintln!(
            "Meridian is running: open http://{}/?token=<token> (mint one with `meridian token create --room demo --identity me --publish`)",
            node.http_addr
        );
    }
    if node.web_root.is_none() {
        eprintln!(
            "The web client is not built: run `npm ci && npm run build` in web-client/ (or scripts/run.sh), or pass --web-root"
        );
    }
    let drain = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = sigterm() => true,
        why = node.failed() => anyhow::bail!(why),
    };
    if drain {
        // SIGTERM (Kubernetes stopping the pod): move everyone to other nodes first.
        tracing::info!("draining");
        let started = std::time::Instant::now();
        let emptied = node.drain().await;
        tracing::info!(
            emptied,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drain finished"
        );
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

async fn audit(args: meridian_audit::AuditArgs) -> Result<i32> {
    let store = args.open_store().await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let outcome = meridian_audit::run(&args.command, &store, &mut out).await?;
    std::io::Write::flush(&mut out)?;
    Ok(outcome.exit_code())
}

fn token_create(args: TokenArgs) -> Result<()> {
    let keys = KeySet::load_or_create(&args.data_dir.join("keys"))?;
    let subscribe = args.subscribe || !(args.publish || args.admin);
    let mut claims = Claims::new(
        args.identity,
        args.room,
        meridian_auth::unix_now(),
        args.ttl,
    )
    .with_grants(Grants {
        publish: args.publish,
        subscribe: subscribe || args.publish,
        admin: args.admin,
    });
    if let Some(r) = args.region {
        claims = claims.with_region(r);
    }
    if let Some(n) = args.name {
        claims = claims.with_name(n);
    }
    let token = match args.kid {
        Some(kid) => keys
            .signing_key_by_kid(&kid)
            .with_context(|| format!("no signing key with kid {kid:?}"))?
            .sign(&claims)?,
        None => keys.sign(&claims)?,
    };
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_flags_parse() {
        for deadline in ["off", "100ms"] {
            Cli::try_parse_from([
                "meridian",
                "loadgen",
                "--playout-deadline",
                deadline,
                "--red",
                "--impair",
                "delay=200ms,loss=2%,burst=4",
            ])
            .unwrap_or_else(|e| panic!("{deadline}: {e}"));
        }
        let cli = Cli::try_parse_from([
            "meridian",
            "serve",
            "--impair",
            "delay=200ms",
            "--impair-direction",
            "both",
        ])
        .expect("serve flags parse");
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let err = serve_config(&args).expect_err("--impair without --dev is refused");
        assert!(err.to_string().contains("--dev"), "{err}");
        assert!(Cli::try_parse_from(["meridian", "serve", "--impair-direction", "up"]).is_err());
    }
}
