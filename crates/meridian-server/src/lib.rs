//! A Meridian node: the media run loop around [`meridian_media::Sfu`], WebSocket
//! signaling speaking [`meridian_protocol`], token checks with [`meridian_auth`],
//! Prometheus metrics and health endpoints.
//!
//! [`Node::start`] binds every socket (port 0 is fine, for tests) and returns the
//! bound addresses; the node runs until its [`Node`] is shut down or dropped.
#![deny(missing_docs)]

mod cluster;
pub mod config;
mod datapath;
mod http;
pub mod impair;
pub mod internal;
mod limits;
pub mod locality;
mod mailbox;
mod media_loop;
pub mod metrics;
mod outbox;
mod overload;
mod region_relay;
pub mod regions;
mod relay;
mod signal;
mod udp;
mod webtransport;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use meridian_auth::KeySet;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

pub use config::{Config, ConfigError};
pub use metrics::Metrics;

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The WebTransport certificate could not be loaded or generated.
    #[error("WebTransport certificate: {0}")]
    Certificate(String),
    /// The token keys could not be loaded or created.
    #[error("token keys: {0}")]
    Keys(#[from] meridian_auth::AuthError),
    /// The event log could not be opened.
    #[error("event log: {0}")]
    Store(#[from] meridian_store::StoreError),
    /// The internal plane's certificates could not be loaded or generated.
    #[error("internal plane: {0}")]
    Internal(#[from] internal::InternalError),
}

/// State shared by every signaling session of a node.
#[derive(Clone)]
pub(crate) struct NodeState {
    pub config: Arc<Config>,
    pub keys: Arc<KeySet>,
    pub metrics: Metrics,
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub commands: workers::Workers,
    pub webtransport: webtransport::Advert,
    pub cluster: Arc<cluster::Cluster>,
    /// Relay control between the nodes hosting parts of a room.
    pub relay: Arc<relay::Relay>,
    /// The web client folder served at `/`; `None`: not built (a page says how).
    pub web_root: Option<std::sync::Arc<std::path::Path>>,
    /// Connection and join limits per source address.
    pub limits: Arc<limits::IpLimits>,
    /// The node's join budget, shared fairly between source addresses.
    pub join_budget: Arc<limits::FairBudget>,
    /// The node's budget of new connections (HTTP and WebTransport), shared the same way.
    pub connection_budget: Arc<limits::FairBudget>,
    /// Which `Host` and `Origin` headers are answered.
    pub hosts: Arc<limits::HostPolicy>,
    /// The identity provider's keys `POST /login` accepts; `None`: login disabled.
    pub identity_keys: Option<Arc<KeySet>>,
}

impl NodeState {
    /// Verifies an access token now, with the node's `[auth]` policy.
    pub(crate) fn verify(
        &self,
        token: &str,
    ) -> Result<meridian_auth::Claims, meridian_auth::AuthError> {
        self.keys
            .verify_with(token, meridian_auth::unix_now(), &self.config.auth.policy())
    }
}

/// Admits audit API requests whose bearer token is a valid access token with the
/// `admin` grant (the room scope is checked by `http::audit_scope`).
struct TokenAdmin(Arc<KeySet>, meridian_auth::Policy);

impl meridian_audit::AdminCheck for TokenAdmin {
    fn check_admin(&self, bearer_token: &str) -> Result<(), String> {
        let claims = self
            .0
            .verify_with(bearer_token, meridian_auth::unix_now(), &self.1)
            .map_err(|e| e.code().to_string())?;
        claims
            .require(meridian_auth::Grant::Admin)
            .map_err(|e| e.code().to_string())
    }
}

/// A running node.
pub struct Node {
    /// Address of the public HTTP listener (signaling, health, the web client).
    pub http_addr: SocketAddr,
    /// Address of the internal listener (mutual TLS: metrics, admin, audit,
    /// node-to-node routes).
    pub internal_addr: SocketAddr,
    /// Address of the plain loopback `/metrics` listener, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The internal plane's certificates (reloaded when their files change).
    pub internal_tls: Arc<internal::InternalTls>,
    /// Address of the media UDP socket.
    pub media_addr: SocketAddr,
    /// Address of the WebTransport signaling listener (UDP).
    pub wt_addr: SocketAddr,
    /// Address of the relay UDP socket (where other nodes relay tracks to this one).
    pub relay_addr: SocketAddr,
    /// The node's metrics.
    pub metrics: Metrics,
    /// Whether dev mode (`POST /dev/token`) is on.
    pub dev: bool,
    /// The web client folder served at `/`, `None` when it is not built.
    pub web_root: Option<std::path::PathBuf>,
    shutdown: watch::Sender<bool>,
    http_task: JoinHandle<()>,
    wt_task: JoinHandle<()>,
    media_task: mpsc::Receiver<String>,
    commands: workers::Workers,
    /// How many media workers run.
    pub media_workers: usize,
    cluster: Arc<cluster::Cluster>,
    cluster_task: JoinHandle<()>,
    drain_timeout: std::time::Duration,
    checkpointer: Option<JoinHandle<()>>,
}

/// Starts the log's signed checkpoints (`[cluster] checkpoint_interval_secs`) with the
/// key in `<data_dir>/keys/log-checkpoint.ed25519` (created if missing). A key that
/// cannot be loaded or created is logged and the node runs without checkpoints.
fn spawn_checkpointer(config: &Config, store: &meridian_store::Store) -> Option<JoinHandle<()>> {
    let secs = config.cluster.checkpoint_interval_secs;
    if secs == 0 {
        return None;
    }
    match meridian_store::load_or_create_signing_key(&config.node.data_dir) {
        Ok(key) => {
            info!(
                public_key = %meridian_store::public_key_hex(&key),
                interval_secs = secs,
                "signing log checkpoints"
            );
            Some(meridian_store::spawn_checkpointer(
                store.clone(),
                Arc::new(key),
                std::time::Duration::from_secs(secs),
            ))
        }
        Err(e) => {
            tracing::warn!("log checkpoints off: {e}");
            None
        }
    }
}

impl Node {
    /// Binds the node's sockets and starts serving.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        let keys = KeySet::load_or_create(&config.node.data_dir.join("keys"))?;
        Self::start_with_keys(config, keys).await
    }

    /// Like [`Node::start`], with the token keys given.
    pub async fn start_with_keys(config: Config, keys: KeySet) -> Result<Node, NodeError> {
        config.validate()?;
        let buffer = config.media.socket_buffer_bytes;
        let socket = std::net::UdpSocket::bind(config.media.addr)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .and_then(|s| {
                if buffer > 0 {
                    rustix::net::sockopt::set_socket_recv_buffer_size(&s, buffer)?;
                    rustix::net::sockopt::set_socket_send_buffer_size(&s, buffer)?;
                }
                Ok(s)
            })
            .map_err(|source| NodeError::Bind {
                what: "media UDP socket",
                addr: config.media.addr,
                source,
            })?;
        let media_addr = socket.local_addr().map_err(|source| NodeError::Bind {
            what: "media UDP socket",
            addr: config.media.addr,
            source,
        })?;
        let listener = TcpListener::bind(config.http.addr)
            .await
            .map_err(|source| NodeError::Bind {
                what: "HTTP listener",
                addr: config.http.addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| NodeError::Bind {
            what: "HTTP listener",
            addr: config.http.addr,
            source,
        })?;
        let relay_bind = config
            .media
            .relay_addr
            .unwrap_or_else(|| SocketAddr::new(config.media.addr.ip(), 0));
        let relay_socket = std::net::UdpSocket::bind(relay_bind)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .map_err(|source| NodeError::Bind {
                what: "relay UDP socket",
                addr: relay_bind,
                source,
            })?;
        let relay_addr = relay_socket
            .local_addr()
            .map_err(|source| NodeError::Bind {
                what: "relay UDP socket",
                addr: relay_bind,
                source,
            })?;
        let wt_listener = webtransport::bind(&config).await?;
        let wt_addr = wt_listener.advert().addr;
        let identity_keys = regions::load_identity_keys(&config.login)?.map(Arc::new);
        let metrics = Metrics::default();
        metrics.regions.configure(
            &config.node.region,
            config
                .regions
                .iter()
                .find(|r| r.id == config.node.region)
                .map(|r| r.prices.clone())
                .unwrap_or_default(),
        );
        if let Some(at) = wt_listener.not_after() {
            metrics.set_certificate_expiry("webtransport", at);
        }
        let internal_files = internal::TlsFiles::resolve(&config.internal, &config.node.data_dir)?;
        let internal_tls = Arc::new(internal::InternalTls::load(
            internal_files,
            metrics.clone(),
        )?);
        let bind = |what: &'static str, addr: SocketAddr| async move {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind { what, addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| NodeError::Bind { what, addr, source })?;
            Ok::<_, NodeError>((l, bound))
        };
        let (internal_listener, internal_addr) =
            bind("internal listener", config.internal.listen).await?;
        let metrics_listener = match config.internal.metrics_listen {
            Some(addr) => Some(bind("metrics listener", addr).await?),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
        let media_workers = config.media.worker_count();
        // Rooms may span nodes: the relay links and every room live on worker 0.
        let pinned = config.media.max_participants > 0 || config.cross_region();
        let (commands, command_rxs) = workers::Workers::new(media_workers, pinned);
        let candidate = config.candidate_addr(media_addr);
        let store = match &config.node.database_url {
            // A region's database may come up after its nodes: retry for a while, then
            // fail with the store's error.
            Some(url) => {
                meridian_store::Store::connect_with_retry(
                    url,
                    6,
                    std::time::Duration::from_millis(500),
                )
                .await?
            }
            None => meridian_store::Store::open_embedded(&config.node.data_dir).await?,
        };
        store.set_snapshot_every(config.cluster.snapshot_every);
        let checkpointer = spawn_checkpointer(&config, &store);
        let (outbox, outbox_rx) = mailbox::outbox();
        let fences = mailbox::Fences::default();
        let context = outbox::Context {
            node: config.node.id.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            fences: fences.clone(),
            commands: commands.clone(),
        };
        tokio::spawn(outbox::run(context, outbox_rx));
        let cluster = cluster::Cluster::start(
            cluster::ClusterParams {
                node: config.node.id.clone(),
                region: config.node.region.clone(),
                url: config.advertise_url(http_addr),
                internal_addr: config
                    .internal_advertise(internal_addr, http_addr)
                    .unwrap_or_default(),
                period: std::time::Duration::from_millis(config.cluster.lease_period_ms),
                ttl: std::time::Duration::from_millis(config.cluster.lease_ttl_ms),
            },
            store.clone(),
            fences,
            commands.clone(),
            outbox.clone(),
            metrics.clone(),
        )
        .await?;
        let drain_timeout = std::time::Duration::from_secs(config.cluster.drain_timeout_secs);
        let (media_done, media_task) = mpsc::channel(media_workers);
        let impairers = (0..media_workers)
            .map(|_| impair::Impairer::new(config.media.impairment().as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::Invalid {
                field: "media.impair",
                reason: e.to_string(),
            })?;
        if let Some(i) = &config.media.impair {
            tracing::warn!(impair = %i, direction = ?config.media.impair_direction, "media socket impaired (chaos test)");
        }
        let (relay_outputs, relay_outputs_rx) = mpsc::channel(relay::RELAY_OUTPUT_QUEUE);
        let (handoff, inboxes) = workers::Handoff::new(media_workers, metrics.clone());
        let socket = Arc::new(socket);
        let mut relay_parts = Some((relay_socket, relay_outputs));
        let mut handoff = Some(handoff);
        // Each media loop gets a thread and a single-threaded runtime of its own: worker
        // 0 reads the socket and handles its own datagrams where it read them.
        for (((index, command_rx), impairer), inbox) in command_rxs
            .into_iter()
            .enumerate()
            .zip(impairers)
            .zip(inboxes)
        {
            let mut sfu_config = meridian_media::SfuConfig::new(candidate);
            sfu_config.relay_addr = Some(config.candidate_addr(relay_addr));
            sfu_config.worker = u8::try_from(index).unwrap_or(u8::MAX);
            sfu_config.rtx_copy_loss = config.media.rtx_copy_loss;
            let controller = meridian_room::ControllerConfig {
                sfu: sfu_config,
                resume_grace: config.resume_grace(),
                seed: rand::random(),
                changes_per_second: f64::from(config.signaling.changes_per_second),
                change_burst: config.signaling.change_burst,
                removal_ban: std::time::Duration::from_secs(config.signaling.removal_ban_secs),
            };
            let intake = match (index, inbox) {
                (_, Some(inbox)) => media_loop::Intake::Handoff(inbox),
                _ => media_loop::Intake::Socket(Box::new(
                    handoff
                        .take()
                        .expect("worker 0 is the only receiving worker"),
                )),
            };
            let relay = if index == 0 { relay_parts.take() } else { None };
            let socket = socket.try_clone().map_err(|source| NodeError::Bind {
                what: "media UDP socket",
                addr: media_addr,
                source,
            })?;
            let loop_metrics = metrics.clone();
            let overload_busy_share = config.media.overload_busy_share;
            let outbox = outbox.clone();
            let routes = commands.routes(index);
            let media_done = media_done.clone();
            std::thread::Builder::new()
                .name(format!("meridian-media-{index}"))
                .spawn(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a current-thread runtime can always be built");
                        rt.block_on(async move {
                            let socket = tokio::net::UdpSocket::from_std(socket)
                                .expect("a non-blocking UDP socket registers with the runtime");
                            let mut media = media_loop::MediaLoop::new(
                                Arc::new(socket),
                                controller,
                                loop_metrics,
                                outbox,
                                routes,
                                intake,
                            )
                            .impaired(impairer)
                            .refusing_when_busy(overload_busy_share);
                            if let Some((relay_socket, relay_outputs)) = relay {
                                let relay_socket = tokio::net::UdpSocket::from_std(relay_socket)
                                    .expect("a non-blocking UDP socket registers with the runtime");
                                let relay_io =
                                    relay::RelayIo::new(Arc::new(relay_socket), relay_outputs)
                                        .expect("a bound UDP socket takes its options");
                                media = media.with_relay(relay_io);
                            }
                            media.run(command_rx).await
                        })
                    }));
                    // A panic while handling one participant's message or datagram is
                    // contained by the controller (that participant is removed, counted
                    // in `meridian_media_panics_total`). One that reaches here (timers,
                    // joins, a failed removal) is not: the node reports it and the
                    // binary exits non-zero (Kubernetes restarts it; its rooms fail over
                    // to other nodes).
                    let why = match result {
                        Ok(()) => format!("media loop {index} stopped"),
                        Err(payload) => {
                            let what = payload
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| payload.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "non-string panic payload".into());
                            tracing::error!(panic = %what, worker = index, "media loop panicked; the node stops");
                            format!("media loop {index} panicked: {what}")
                        }
                    };
                    let _ = media_done.try_send(why);
                })
                .map_err(|source| NodeError::Bind {
                    what: "media thread",
                    addr: media_addr,
                    source,
                })?;
        }
        drop(media_done);
        let web_root = config.http.resolved_web_root();
        match &web_root {
            Some(root) if !root.join("index.html").is_file() => tracing::warn!(
                root = %root.display(),
                "web root has no index.html; `/` shows how to build the web client"
            ),
            Some(root) => info!(root = %root.display(), "serving the web client"),
            None => info!("web client not built; `/` shows how to build it"),
        }
        let dev = config.http.dev;
        if dev {
            tracing::warn!(
                "dev mode: POST /dev/token mints tokens for anyone who can reach the HTTP address"
            );
        }
        let advertised = config.advertise_url(http_addr);
        let advertised_host = advertised
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default().to_string());
        let hosts = limits::HostPolicy::new(
            &config.http.public_names,
            http_addr.ip(),
            advertised_host.as_deref(),
        );
        let ip_limits = limits::IpLimits::new(
            config.http.max_connections_per_ip,
            config.signaling.joins_per_ip_per_minute,
        );
        let keys = Arc::new(keys);
        let relay = Arc::new(
            relay::Relay::new(
                keys.clone(),
                cluster.clone(),
                commands.clone(),
                metrics.clone(),
                internal_tls.clone(),
                candidate,
                config.media.max_participants,
            )
            .with_regions(&config.regions),
        );
        let state = NodeState {
            identity_keys,
            relay: relay.clone(),
            limits: Arc::new(ip_limits),
            join_budget: Arc::new(limits::FairBudget::new(
                config.signaling.node_joins_per_second,
            )),
            connection_budget: Arc::new(limits::FairBudget::new(
                config.http.node_connections_per_second,
            )),
            hosts: Arc::new(hosts),
            web_root: web_root.as_deref().map(Arc::from),
            config: Arc::new(config),
            keys,
            registry: Arc::new(metrics.registry()),
            metrics: metrics.clone(),
            commands: commands.clone(),
            webtransport: wt_listener.advert(),
            cluster: cluster.clone(),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let cluster_task = tokio::spawn(cluster.clone().run(shutdown.subscribe()));
        tokio::spawn(relay.run(relay_outputs_rx, shutdown.subscribe()));
        let wt_task = tokio::spawn(webtransport::serve(
            wt_listener,
            state.clone(),
            shutdown.subscribe(),
        ));
        let admin = Arc::new(TokenAdmin(state.keys.clone(), state.config.auth.policy()));
        let audit = meridian_audit::router(store, admin).route_layer(
            axum::middleware::from_fn_with_state(state.clone(), http::audit_scope),
        );
        // The internal plane: mutual TLS, certificates watched for rotation.
        let internal_app = http::internal_router(state.clone())
            .merge(audit)
            .merge(internal::node_routes(&state));
        tokio::spawn(internal::serve(
            internal_listener,
            internal_app,
            internal_tls.clone(),
            std::time::Duration::from_secs(state.config.http.header_read_timeout_secs),
            shutdown.subscribe(),
        ));
        tokio::spawn(internal::watch_files(
            internal_tls.clone(),
            std::time::Duration::from_secs(state.config.internal.reload_interval_secs),
            shutdown.subscribe(),
        ));
        if let Some((listener, _)) = metrics_listener {
            tokio::spawn(http::serve(
                listener,
                http::metrics_router(state.clone()),
                state.clone(),
                shutdown.subscribe(),
            ));
        }
        let app = http::router(state.clone()).layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::check_host,
        ));
        let http_task = tokio::spawn(http::serve(listener, app, state, shutdown_rx));
        info!(%http_addr, %internal_addr, %media_addr, %wt_addr, %candidate, "meridian node started");
        Ok(Node {
            http_addr,
            internal_addr,
            metrics_addr,
            internal_tls,
            media_addr,
            wt_addr,
            relay_addr,
            metrics,
            dev,
            web_root,
            shutdown,
            http_task,
            wt_task,
            media_task,
            commands,
            media_workers,
            cluster,
            cluster_task,
            drain_timeout,
            checkpointer,
        })
    }

    /// Drains the node (what SIGTERM does): it stops taking rooms, hands every room to
    /// another node of the region and tells the clients to move, within the configured
    /// drain timeout. Returns true when every participant left in time.
    pub async fn drain(&self) -> bool {
        self.cluster.drain(self.drain_timeout).await
    }

    /// Stops accepting connections and ends the node's tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.commands.send(mailbox::Command::Shutdown).await;
        let _ = self.http_task.await;
        let _ = self.wt_task.await;
        let _ = self.cluster_task.await;
        if let Some(t) = self.checkpointer {
            t.abort();
        }
    }

    /// A client of internal listeners (this node's or another's) presenting this
    /// node's client certificate: node-to-node calls, tools, tests.
    pub fn internal_client(&self) -> internal::InternalClient {
        self.internal_tls.client()
    }

    /// Resolves if the media loop ends by itself, which only a bug can cause; the
    /// caller should then exit non-zero rather than keep a node that forwards nothing.
    pub async fn failed(&mut self) -> String {
        self.media_task
            .recv()
            .await
            .unwrap_or_else(|| "media thread ended".to_string())
    }
}
