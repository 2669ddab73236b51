//! The node's typed configuration: one struct, a section per subsystem.
//!
//! Sources, later ones winning: built-in defaults, a TOML file (`--config`),
//! environment variables and command-line flags (the binary applies the last two).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        reason: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// Dotted name of the setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Largest config file read, in bytes.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The whole node configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity and storage of this node.
    pub node: NodeConfig,
    /// HTTP listener: WebSocket signaling, metrics, health, the web client.
    pub http: HttpConfig,
    /// The media UDP socket.
    pub media: MediaConfig,
    /// Signaling session limits.
    pub signaling: SignalingConfig,
    /// WebTransport signaling listener (QUIC, UDP).
    pub webtransport: WebTransportConfig,
    /// Membership of the region: leases, placement, failover and drain.
    pub cluster: ClusterConfig,
    /// What access tokens must carry.
    pub auth: AuthConfig,
    /// The region directory (`[[regions]]`, see [`crate::regions`]): every region's
    /// signaling, probe and relay addresses, its log and prices. Empty: one region.
    pub regions: Vec<crate::regions::RegionEntry>,
    /// `POST /login`: identity tokens in, region-pinned access tokens out.
    pub login: crate::regions::LoginConfig,
    /// The internal plane: `/metrics`, `/admin/*`, `/audit/*` and node-to-node routes
    /// over mutual TLS.
    pub internal: InternalConfig,
}

/// The internal listener (`internal.rs`): HTTPS that requires a client certificate
/// issued by `client_ca`. Without `cert`, `key` and `client_ca` the node generates a
/// development CA, a node certificate and a client certificate under
/// `<data_dir>/internal/` (loopback names only) and uses those.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InternalConfig {
    /// TCP address of the internal listener; port 0 picks one.
    pub listen: SocketAddr,
    /// `host:port` other nodes of the region call this node's internal listener at
    /// (relay control), published in the node's lease. The host must be a name the
    /// listener's certificate carries. Default: the listen address when it is a
    /// specific IP, else the host of the advertised signaling URL with the listen port.
    pub advertise: Option<String>,
    /// PEM certificate chain the internal listener serves.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM bundle of the CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// PEM certificate this node presents when it calls other nodes' internal
    /// listeners; default `cert` (give it the `clientAuth` usage too).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`; default `key`.
    pub client_key: Option<PathBuf>,
    /// Seconds between checks of the certificate files (these and
    /// `webtransport.tls_cert`/`tls_key`) for a change (cert-manager rotations, symlink
    /// swaps included); a change is loaded without a restart.
    pub reload_interval_secs: u64,
    /// Optional plain-HTTP listener serving only `/metrics`, for a scraper on the same
    /// machine (benchmarks, local Prometheus without certificates). Loopback only.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for InternalConfig {
    fn default() -> Self {
        InternalConfig {
            listen: "127.0.0.1:7883".parse().expect("valid literal"),
            advertise: None,
            cert: None,
            key: None,
            client_ca: None,
            client_cert: None,
            client_key: None,
            reload_interval_secs: 5,
            metrics_listen: None,
        }
    }
}

/// Rules for access tokens beyond signature, expiry and grants.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The `aud` every token must carry.
    pub audience: String,
    /// Longest token lifetime accepted (from `nbf`/`iat` to `exp`), in seconds.
    /// Sessions end when their token expires unless the client sends `refresh`.
    pub max_token_lifetime_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let p = meridian_auth::Policy::default();
        AuthConfig {
            audience: p.audience,
            max_token_lifetime_secs: p.max_lifetime.as_secs(),
        }
    }
}

impl AuthConfig {
    /// The policy tokens are verified with.
    pub fn policy(&self) -> meridian_auth::Policy {
        meridian_auth::Policy {
            audience: self.audience.clone(),
            max_lifetime: Duration::from_secs(self.max_token_lifetime_secs),
        }
    }
}

/// How nodes of one region (one event log) share rooms and take over from each other.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Signaling URL clients use to reach this node (redirects and `migrate` carry
    /// it); default `ws://<http addr>/signal`.
    pub advertise_url: Option<String>,
    /// Milliseconds between lease renewals (and checks of other nodes' leases).
    pub lease_period_ms: u64,
    /// Milliseconds a lease lasts without renewal: a dead node is noticed this long
    /// after its last renewal.
    pub lease_ttl_ms: u64,
    /// Seconds a draining node (SIGTERM) waits for its participants to move before it
    /// exits anyway.
    pub drain_timeout_secs: u64,
    /// Seconds between signed checkpoints of the log's stream heads (key:
    /// `<data_dir>/keys/log-checkpoint.ed25519`); 0 turns them off.
    pub checkpoint_interval_secs: u64,
    /// A room's state is snapshotted every this many events (and at each placement),
    /// bounding replay at takeover; 0 turns snapshots off.
    pub snapshot_every: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            advertise_url: None,
            lease_period_ms: 100,
            lease_ttl_ms: 500,
            drain_timeout_secs: 30,
            checkpoint_interval_secs: 60,
            snapshot_every: meridian_store::DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

/// WebTransport signaling listener settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebTransportConfig {
    /// UDP address to listen on for WebTransport (HTTP/3) sessions; port 0 picks one.
    pub addr: SocketAddr,
    /// PEM certificate chain; without it (and `tls_key`) the node generates a
    /// self-signed development certificate at start and publishes its hash.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// Identity and storage of this node.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in its region.
    pub id: String,
    /// Region this node serves; tokens naming another region are redirected.
    pub region: String,
    /// Signaling URLs of other regions, for redirects (`region = "wss://…"`).
    pub region_urls: std::collections::BTreeMap<String, String>,
    /// Directory for keys and the embedded event log.
    pub data_dir: PathBuf,
    /// The region's event log (`postgres://…`); the embedded SQLite log under
    /// `data_dir` when unset.
    pub database_url: Option<String>,
}

/// HTTP listener settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Folder of the built web client (`web-client/dist`), served at `/`. Unset: that
    /// folder relative to the working directory when it exists, else a page saying how
    /// to build it.
    pub web_root: Option<PathBuf>,
    /// Development mode: `POST /dev/token` mints short-lived tokens with the node's key
    /// for anyone who can reach the HTTP address. Never enable it on a shared network:
    /// on a non-loopback `addr` the node refuses to start unless `dev_allow_remote`.
    pub dev: bool,
    /// Allows `dev` on a non-loopback address (`--dev-allow-remote`).
    pub dev_allow_remote: bool,
    /// Host names clients reach this node by (`meridian.example.com`,
    /// `*.example.com`). Requests whose `Host` is not one of them, `localhost` or an IP
    /// address are refused (DNS rebinding); a WebSocket `Origin` must be the request's
    /// own host, one of them, or a loopback name on a loopback-bound node.
    pub public_names: Vec<String>,
    /// Seconds a client may take to send a request's headers.
    pub header_read_timeout_secs: u64,
    /// Seconds an HTTP connection may stay without traffic before it is closed
    /// (WebSocket sessions have their own idle timeout).
    pub idle_timeout_secs: u64,
    /// Most HTTP (and WebTransport) connections at once from one source address.
    pub max_connections_per_ip: usize,
    /// New HTTP and WebTransport connections the node accepts per second before it
    /// closes, at once, those from source addresses that have had more than their
    /// share (a reconnecting flood costs the node one `accept` each).
    pub node_connections_per_second: u32,
}

/// Where the web client is looked for when `http.web_root` is unset.
pub const DEFAULT_WEB_ROOT: &str = "web-client/dist";

impl HttpConfig {
    /// The web client folder to serve: `web_root` when set, else [`DEFAULT_WEB_ROOT`]
    /// when it holds an `index.html`; `None` means "not built".
    pub fn resolved_web_root(&self) -> Option<PathBuf> {
        match &self.web_root {
            Some(p) => Some(p.clone()),
            None => {
                let p = PathBuf::from(DEFAULT_WEB_ROOT);
                p.join("index.html").is_file().then_some(p)
            }
        }
    }
}

/// Media socket settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// UDP address to bind; one port serves every peer.
    pub addr: SocketAddr,
    /// Address advertised to clients when the node sits behind a 1:1 NAT.
    pub public_ip: Option<IpAddr>,
    /// Chaos testing, dev mode only: impair the media socket's datagrams with a seeded
    /// emulator, e.g. `delay=200ms,jitter=20ms,loss=2%[,burst=4]`
    /// ([`crate::impair::parse_impairment`]).
    pub impair: Option<String>,
    /// Which datagrams `impair` applies to: `egress` (default), `ingress` or `both`.
    pub impair_direction: crate::impair::ImpairDirection,
    /// Seed of the impairment's random numbers.
    pub impair_seed: u64,
    /// Most participants this node takes (0: no cap). A join for a room whose parts
    /// are all on full nodes places a new part of the room on the least-loaded live
    /// node, and the parts exchange tracks over relay links (see `docs/relay.md`).
    pub max_participants: usize,
    /// UDP address of the relay socket, where this node receives the tracks other
    /// nodes relay to it (default: the media address's IP, any port).
    pub relay_addr: Option<SocketAddr>,
    /// Media loops (threads), each owning a share of the rooms; 0 (default): one per
    /// core the process may use (`std::thread::available_parallelism`). All of them
    /// share the one media port (see ARCHITECTURE.md, "Media workers").
    pub workers: usize,
    /// The media socket's kernel receive and send buffers, in bytes (0: the kernel's
    /// default; default 1 MiB). Above `net.core.rmem_max`/`wmem_max` the kernel caps
    /// it. Larger buffers queue the bursts a busy worker would drop, and an overloaded
    /// worker's backlog with them (ARCHITECTURE.md, "Media workers").
    pub socket_buffer_bytes: usize,
    /// Measured loss of a subscriber's path from which the node sends every
    /// retransmission to it twice, 5 ms apart (0: never; default 0.01).
    pub rtx_copy_loss: f32,
    /// Busy share (0..=1, over about the last second) from which a media worker is
    /// overloaded: it refuses fresh joins with `unavailable` and gets no new rooms, and
    /// a node whose workers all are reports not ready (0: never; default 0.9).
    pub overload_busy_share: f64,
}

impl MediaConfig {
    /// Most media workers a node runs (the ICE ufrag names its worker in two hex
    /// digits).
    pub const MAX_WORKERS: usize = 256;

    /// The number of media loops to run: `workers`, or the cores available.
    pub fn worker_count(&self) -> usize {
        let n = if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        };
        n.clamp(1, Self::MAX_WORKERS)
    }
}

/// Signaling limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalingConfig {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection.
    pub messages_per_second: u32,
    /// Burst allowance above the sustained rate.
    pub message_burst: u32,
    /// Seconds a connection may take to send `join`.
    pub join_timeout_secs: u64,
    /// Seconds a connection may stay silent before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a dropped session is kept for resumption.
    pub resume_grace_secs: u64,
    /// Most signaling connections at once.
    pub max_connections: usize,
    /// Most bytes of encoded messages queued towards one client; a client that lets
    /// more pile up does not read and is closed.
    pub session_queue_bytes: usize,
    /// Seconds one write to a client may take; a client that does not read within it
    /// is closed.
    pub write_timeout_secs: u64,
    /// Joins (and resumes) one source address may attempt per minute, as a token
    /// bucket with a burst of the same size.
    pub joins_per_ip_per_minute: u32,
    /// Joins (and resumes) the whole node admits per second before it refuses the
    /// source addresses that have had more than their share (`rate_limited`): many
    /// addresses, each within its own allowance, cannot queue joins ahead of others.
    pub node_joins_per_second: u32,
    /// Layer preferences and mute toggles one participant may send per second,
    /// sustained (each is a log event); more are refused with `throttled`.
    pub changes_per_second: u32,
    /// How many such changes may come at once.
    pub change_burst: u32,
    /// Seconds an identity removed by an admin may not join that room again
    /// (`error{forbidden}`); 0: no ban.
    pub removal_ban_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: NodeConfig::default(),
            http: HttpConfig {
                addr: "127.0.0.1:7880".parse().expect("valid literal"),
                web_root: None,
                dev: false,
                dev_allow_remote: false,
                public_names: Vec::new(),
                header_read_timeout_secs: 10,
                idle_timeout_secs: 60,
                max_connections_per_ip: 1024,
                node_connections_per_second: 200,
            },
            media: MediaConfig {
                addr: "127.0.0.1:7882".parse().expect("valid literal"),
                public_ip: None,
                impair: None,
                impair_direction: Default::default(),
                impair_seed: 1,
                max_participants: 0,
                relay_addr: None,
                workers: 0,
                socket_buffer_bytes: 1 << 20,
                rtx_copy_loss: 0.01,
                overload_busy_share: 0.9,
            },
            signaling: SignalingConfig::default(),
            webtransport: WebTransportConfig {
                addr: "127.0.0.1:7881".parse().expect("valid literal"),
                tls_cert: None,
                tls_key: None,
            },
            cluster: ClusterConfig::default(),
            auth: AuthConfig::default(),
            regions: Vec::new(),
            login: Default::default(),
            internal: InternalConfig::default(),
        }
    }
}

impl Default for WebTransportConfig {
    fn default() -> Self {
        Config::default().webtransport
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "node-1".into(),
            region: "local".into(),
            region_urls: Default::default(),
            data_dir: PathBuf::from("meridian-data"),
            database_url: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Config::default().http
    }
}

impl MediaConfig {
    /// The impairment to apply, if any.
    pub fn impairment(&self) -> Option<crate::impair::Impairment> {
        self.impair.as_ref().map(|spec| crate::impair::Impairment {
            spec: spec.clone(),
            direction: self.impair_direction,
            seed: self.impair_seed,
        })
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        Config::default().media
    }
}

impl Default for SignalingConfig {
    fn default() -> Self {
        SignalingConfig {
            max_message_bytes: meridian_protocol::MAX_MESSAGE_BYTES,
            messages_per_second: 20,
            message_burst: 60,
            join_timeout_secs: 10,
            idle_timeout_secs: 30,
            resume_grace_secs: 10,
            max_connections: 10_000,
            session_queue_bytes: 1024 * 1024,
            write_timeout_secs: 10,
            joins_per_ip_per_minute: 600,
            node_joins_per_second: 50,
            changes_per_second: 5,
            change_burst: 20,
            removal_ban_secs: 300,
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                field: "config file",
                reason: format!("{len} bytes exceeds {MAX_CONFIG_BYTES}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // Flags and the environment may still set `node.region` and
        // `node.database_url`: their place in the region directory is checked when the
        // node starts (`validate`).
        config.check(false)?;
        Ok(config)
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(true)
    }

    fn check(&self, node_in_directory: bool) -> Result<(), ConfigError> {
        let s = &self.signaling;
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if s.max_message_bytes < 1024 || s.max_message_bytes > 1024 * 1024 {
            return invalid("signaling.max_message_bytes", "must be 1 KiB ..= 1 MiB");
        }
        if s.messages_per_second == 0 || s.message_burst == 0 {
            return invalid("signaling.messages_per_second", "must be positive");
        }
        if s.join_timeout_secs == 0 || s.idle_timeout_secs == 0 {
            return invalid("signaling.join_timeout_secs", "timeouts must be positive");
        }
        if s.write_timeout_secs == 0 || s.write_timeout_secs > 600 {
            return invalid("signaling.write_timeout_secs", "must be 1..=600");
        }
        if s.session_queue_bytes < s.max_message_bytes || s.session_queue_bytes > 64 << 20 {
            return invalid(
                "signaling.session_queue_bytes",
                "must be at least max_message_bytes and at most 64 MiB",
            );
        }
        if !(0.0..=1.0).contains(&self.media.rtx_copy_loss) {
            return invalid("media.rtx_copy_loss", "must be 0 ..= 1");
        }
        if !(0.0..=1.0).contains(&self.media.overload_busy_share) {
            return invalid("media.overload_busy_share", "must be 0 ..= 1");
        }
        if self.media.workers > MediaConfig::MAX_WORKERS {
            return invalid("media.workers", "must be 0 (one per core) ..= 256");
        }
        let a = &self.auth;
        if a.audience.is_empty() || a.audience.len() > 64 {
            return invalid("auth.audience", "must be 1..=64 characters");
        }
        if !(60..=30 * 24 * 3600).contains(&a.max_token_lifetime_secs) {
            return invalid(
                "auth.max_token_lifetime_secs",
                "must be 60 ..= 2592000 (30 days)",
            );
        }
        if s.changes_per_second == 0 || s.change_burst == 0 {
            return invalid("signaling.changes_per_second", "must be positive");
        }
        if s.removal_ban_secs > 30 * 24 * 3600 {
            return invalid("signaling.removal_ban_secs", "at most 2592000 (30 days)");
        }
        if s.joins_per_ip_per_minute == 0 {
            return invalid("signaling.joins_per_ip_per_minute", "must be positive");
        }
        if s.node_joins_per_second == 0 {
            return invalid("signaling.node_joins_per_second", "must be positive");
        }
        let h = &self.http;
        if let Some(spec) = &self.media.impair {
            if !h.dev {
                return invalid(
                    "media.impair",
                    "network impairment is for chaos tests on a dev node only; add --dev",
                );
            }
            if let Err(e) = crate::impair::parse_impairment(spec, 0) {
                return invalid("media.impair", &e.to_string());
            }
        }
        if h.dev && !h.addr.ip().is_loopback() && !h.dev_allow_remote {
            return invalid(
                "http.dev",
                &format!(
                    "dev mode mints tokens for anyone who reaches the HTTP address, and {} is \
                     not a loopback address; bind 127.0.0.1 or force it with \
                     --dev-allow-remote (http.dev_allow_remote)",
                    h.addr
                ),
            );
        }
        if h.header_read_timeout_secs == 0 || h.idle_timeout_secs == 0 {
            return invalid(
                "http.header_read_timeout_secs",
                "HTTP timeouts must be positive",
            );
        }
        if h.node_connections_per_second == 0 {
            return invalid("http.node_connections_per_second", "must be positive");
        }
        if h.max_connections_per_ip == 0 {
            return invalid("http.max_connections_per_ip", "must be positive");
        }
        if let Some(bad) = h.public_names.iter().find(|n| {
            n.is_empty()
                || n.len() > 253
                || n.contains(['/', ':', ' '])
                || n.trim_start_matches("*.").contains('*')
        }) {
            return invalid(
                "http.public_names",
                &format!("{bad:?} is not a host name (no scheme, port or path)"),
            );
        }
        if self.webtransport.tls_cert.is_some() != self.webtransport.tls_key.is_some() {
            return invalid(
                "webtransport.tls_cert",
                "tls_cert and tls_key must be given together",
            );
        }
        let i = &self.internal;
        let given = [i.cert.is_some(), i.key.is_some(), i.client_ca.is_some()];
        if given.contains(&true) && given.contains(&false) {
            return invalid(
                "internal.cert",
                "cert, key and client_ca must be given together (or none: development \
                 certificates are generated under the data directory)",
            );
        }
        if i.client_cert.is_some() != i.client_key.is_some() {
            return invalid(
                "internal.client_cert",
                "client_cert and client_key must be given together",
            );
        }
        if i.client_cert.is_some() && i.cert.is_none() {
            return invalid(
                "internal.client_cert",
                "needs cert, key and client_ca (generated development certificates include a client certificate)",
            );
        }
        if !(1..=3600).contains(&i.reload_interval_secs) {
            return invalid("internal.reload_interval_secs", "must be 1..=3600");
        }
        if let Some(a) = &i.advertise
            && split_host_port(a).is_none()
        {
            return invalid(
                "internal.advertise",
                "must be host:port (a name or IP the internal certificate carries), at most 256 bytes",
            );
        }
        if let Some(m) = i.metrics_listen
            && !m.ip().is_loopback()
        {
            return invalid(
                "internal.metrics_listen",
                &format!(
                    "{m} is not a loopback address: plain /metrics is for a scraper on the \
                     same machine; others scrape the internal listener with a client certificate"
                ),
            );
        }
        if self.node.region.is_empty() || self.node.region.len() > 64 {
            return invalid("node.region", "must be 1..=64 characters");
        }
        let c = &self.cluster;
        if c.lease_period_ms < 10 || c.lease_ttl_ms < 2 * c.lease_period_ms {
            return invalid(
                "cluster.lease_ttl_ms",
                "lease_period_ms must be at least 10 and lease_ttl_ms at least twice it",
            );
        }
        if c.lease_ttl_ms > 600_000 || c.drain_timeout_secs > 3600 {
            return invalid(
                "cluster.lease_ttl_ms",
                "at most 600000 ms (drain_timeout_secs at most 3600)",
            );
        }
        if self.node.id.is_empty()
            || self.node.id.len() > 64
            || !self
                .node
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return invalid("node.id", "must be 1..=64 of [A-Za-z0-9._-]");
        }
        crate::regions::validate(&self.regions, &self.login)?;
        if node_in_directory {
            crate::regions::validate_node(
                &self.regions,
                &self.node.region,
                self.node.database_url.as_deref(),
            )?;
        }
        if self.media.addr.ip().is_unspecified() && self.media.public_ip.is_none() {
            return invalid(
                "media.public_ip",
                "required when media.addr binds all interfaces: clients need a reachable address",
            );
        }
        Ok(())
    }

    /// Whether rooms may span regions: the directory names another region than this
    /// node's with a `relay_addr` (its relay links then live on media worker 0).
    pub fn cross_region(&self) -> bool {
        self.regions
            .iter()
            .any(|r| r.id != self.node.region && r.relay_addr.is_some())
    }

    /// The address advertised in ICE candidates.
    pub fn candidate_addr(&self, bound: SocketAddr) -> SocketAddr {
        match self.media.public_ip {
            Some(ip) => SocketAddr::new(ip, bound.port()),
            None => bound,
        }
    }

    /// The signaling URL other nodes send this node's clients to.
    pub fn advertise_url(&self, http: SocketAddr) -> String {
        self.cluster
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("ws://{http}/signal"))
    }

    /// The `host:port` published in the lease for other nodes to reach the internal
    /// listener bound at `bound` (see [`InternalConfig::advertise`]); `None` when there
    /// is none to give (a wildcard listen address and no host in the signaling URL).
    pub fn internal_advertise(&self, bound: SocketAddr, http: SocketAddr) -> Option<String> {
        if let Some(a) = &self.internal.advertise {
            return Some(a.clone());
        }
        if !bound.ip().is_unspecified() {
            return Some(bound.to_string());
        }
        let url = self.advertise_url(http);
        let host = url.split_once("://")?.1.split('/').next()?;
        let (host, _) = split_host_port(host).unwrap_or((host, 0));
        let wildcard = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        match host.parse::<std::net::Ipv6Addr>() {
            _ if host.is_empty() || wildcard => None,
            Ok(v6) => Some(format!("[{v6}]:{}", bound.port())),
            Err(_) => Some(format!("{host}:{}", bound.port())),
        }
    }

    pub(crate) fn resume_grace(&self) -> Duration {
        Duration::from_secs(self.signaling.resume_grace_secs)
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6) into its host and port; `None` when it
/// is not of that form or longer than 256 bytes.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    if addr.len() > 256 || addr.chars().any(|c| c.is_whitespace() || c == '/') {
        return None;
    }
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_internal_address_other_nodes_call_is_published_or_derived() {
        let http: SocketAddr = "0.0.0.0:7880".parse().unwrap();
        let mut c = Config::default();
        let bound: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(
            c.internal_advertise(bound, http).as_deref(),
            Some("127.0.0.1:40001")
        );
        let wildcard: SocketAddr = "0.0.0.0:7883".parse().unwrap();
        c.cluster.advertise_url = Some("ws://10.1.2.3:7880/signal".into());
        assert_eq!(
            c.internal_advertise(wildcard, http).as_deref(),
            Some("10.1.2.3:7883")
        );
        c.cluster.advertise_url = None;
        assert_eq!(c.internal_advertise(wildcard, http), None);
        c.internal.advertise = Some("meridian-0.meridian-nodes.ns.svc:7883".into());
        assert_eq!(
            c.internal_advertise(wildcard, http).as_deref(),
            Some("meridian-0.meridian-nodes.ns.svc:7883")
        );
        c.validate().unwrap();
        for bad in ["no-port", "a:b", "https://x:1", ":7883", "::1:7883"] {
            c.internal.advertise = Some(bad.into());
            assert!(c.validate().is_err(), "{bad}");
        }
        assert_eq!(split_host_port("[::1]:7883"), Some(("::1", 7883)));
    }

    #[test]
    fn file_values_override_defaults_and_unknown_keys_are_errors() {
        let dir = std::env::temp_dir().join(format!("meridian-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[node]\nregion = \"eu\"\n[http]\naddr = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let c = Config::from_file(&good).unwrap();
        assert_eq!(c.node.region, "eu");
        assert_eq!(c.http.addr.port(), 9);
        assert_eq!(c.signaling.resume_grace_secs, 10);

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[node]\nregoin = \"eu\"\n").unwrap();
        let err = Config::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("regoin"), "{err}");

        let zero = dir.join("zero.toml");
        std::fs::write(&zero, "[signaling]\nmessages_per_second = 0\n").unwrap();
        assert!(matches!(
            Config::from_file(&zero),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            Config::from_file(&dir.join("missing.toml")),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn dev_mode_on_a_non_loopback_address_must_be_forced() {
        let mut c = Config::default();
        c.http.dev = true;
        c.validate().unwrap();
        c.http.addr = "0.0.0.0:7880".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("http.dev") && err.contains("--dev-allow-remote"),
            "{err}"
        );
        c.http.dev_allow_remote = true;
        c.validate().unwrap();
        c.http.public_names = vec!["https://x.example".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_retransmission_copy_and_overload_thresholds_are_shares() {
        let mut c = Config::default();
        c.media.rtx_copy_loss = 0.0;
        c.validate().unwrap();
        for bad in [-0.1, 1.5, f32::NAN] {
            c.media.rtx_copy_loss = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("media.rtx_copy_loss"), "{bad}: {err}");
        }
        c.media.rtx_copy_loss = 0.0;
        for bad in [-0.1, 1.5, f64::NAN] {
            c.media.overload_busy_share = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("media.overload_busy_share"), "{bad}: {err}");
        }
        c.media.overload_busy_share = 0.0;
        c.validate().unwrap();
    }

    #[test]
    fn binding_all_interfaces_needs_a_public_ip() {
        let mut c = Config::default();
        c.media.addr = "0.0.0.0:7882".parse().unwrap();
        assert!(c.validate().is_err());
        c.media.public_ip = Some("203.0.113.7".parse().unwrap());
        c.validate().unwrap();
        assert_eq!(
            c.candidate_addr("0.0.0.0:5000".parse().unwrap()),
            "203.0.113.7:5000".parse().unwrap()
        );
    }
}
