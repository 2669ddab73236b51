//! Rooms across nodes: placement of room parts, the internal relay-control routes,
//! and the driver that keeps the relay links between parts (the media side is
//! `meridian_media::relay`).
//!
//! * **Placement** ([`place`]): with `[media] max_participants` set, a join goes to a
//!   part of its room on a node with room; when every part's node is full, a new part
//!   (`<room>~<node>`, its own log stream with its own fence) is placed on the
//!   least-loaded live node (participants, then forwarded packets per second).
//! * **Control** ([`routes`], `/internal/relay/*`): node-to-node only, served on the
//!   internal listener (`internal.rs`: mutual TLS, the caller's client certificate
//!   must chain to the internal CA). The caller also shows a node token (a JWT of the
//!   region's key, audience `meridian-node`, subject `node:<id>`, room `*`) naming a
//!   node that holds a live lease in the region's log; anything else gets a typed
//!   error and is counted (`meridian_relay_refused_total{reason}`). Peers are called
//!   with [`crate::internal::InternalClient`] at the internal address their lease
//!   publishes.
//! * **Driver** ([`Relay::run`]): every [`RECONCILE_PERIOD`] a node that hosts a part
//!   asks each other part's node for that part's tracks (`subscribe`); the upstream
//!   sends the link's SDP offer (`offer`, answered in the response) and its tracks'
//!   states (`track`: mute, the layer crossing); the downstream's layer wishes go
//!   back (`layer`). A link that does not connect within
//!   [`LINK_SETUP_TIMEOUT`], goes down, or whose peer loses its lease is rebuilt or
//!   removed.
//! * [`RelayIo`]: the media loop's relay socket (inbound links) and its queue towards
//!   the driver.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use meridian_auth::{Claims, Grants, KeySet, Policy};
use meridian_events::{Event, part_name, room_of_part};
use meridian_media::{RelayTrack, TrackId, Transmit};
use meridian_protocol::Layer;
use meridian_room::{Controller, RelayOutput, RosterEntry};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::NodeState;
use crate::cluster::{Cluster, PlaceError, Placement};
use crate::internal::{InternalTls, PeerCertificate};
use crate::mailbox::{Command, RelayOp, RelayReply, SessionSink};
use crate::metrics::{Metrics, ReasonLabel};
use crate::udp::MediaSocket;

/// The `aud` of node tokens (client tokens carry another, so they are refused here).
pub(crate) const NODE_AUDIENCE: &str = "meridian-node";
/// Lifetime of the node tokens this node signs.
const NODE_TOKEN_TTL: Duration = Duration::from_secs(120);
/// Largest relay-control body, either way (an offer of the most tracks a link carries).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Most room parts one `subscribe` may name.
pub(crate) const MAX_PARTS_PER_REQUEST: usize = 1024;
/// How long one request to another node may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a capped join right after the node started waits for the node's first
/// view of its region (without it every join would look like the only node's).
const VIEW_WAIT: Duration = Duration::from_secs(2);
/// How often the driver compares the links it has with the links it needs.
pub(crate) const RECONCILE_PERIOD: Duration = Duration::from_millis(500);
/// How long a requested link may take to connect before it is asked for afresh.
pub(crate) const LINK_SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay outputs queued towards the driver (one pending offer per link, one layer
/// wish per track change: far below this in practice).
pub(crate) const RELAY_OUTPUT_QUEUE: usize = 4096;
/// Datagrams the relay socket may hold back while the kernel's buffer is full.
const MAX_OUTGOING: usize = 65_536;

/// Why a relay-control request was refused, with the code sent back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// The request did not come over mutual TLS with a verified client certificate
    /// (the routes were reached on a listener that does not require one).
    #[error("no verified client certificate")]
    NoCertificate,
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    NoToken,
    /// The token did not verify (signature, expiry, audience, …).
    #[error("token refused ({0})")]
    BadToken(&'static str),
    /// A valid token, but not a node token of this region or of another region of
    /// the directory.
    #[error("the token does not name a node of this region or of another region of the directory")]
    NotANode,
    /// The node named holds no live lease.
    #[error("node {0} holds no live lease in this region")]
    NoLease(String),
    /// The body is not a valid request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The media core refused the operation.
    #[error("refused by the media core: {0}")]
    Media(String),
    /// The node is shutting down.
    #[error("node unavailable")]
    Unavailable,
    /// A request to another node failed.
    #[error("peer request failed: {0}")]
    Peer(String),
}

impl RelayError {
    /// The stable code on the wire and in `meridian_relay_refused_total{reason}`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            RelayError::NoCertificate => "no_certificate",
            RelayError::NoToken => "no_token",
            RelayError::BadToken(_) => "bad_token",
            RelayError::NotANode => "not_a_node",
            RelayError::NoLease(_) => "no_lease",
            RelayError::BadRequest(_) => "bad_request",
            RelayError::Media(_) => "refused",
            RelayError::Unavailable => "unavailable",
            RelayError::Peer(_) => "peer",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            RelayError::NoCertificate | RelayError::NoToken | RelayError::BadToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            RelayError::NotANode | RelayError::NoLease(_) => StatusCode::FORBIDDEN,
            RelayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RelayError::Media(_) => StatusCode::CONFLICT,
            RelayError::Unavailable | RelayError::Peer(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every refusal: `{"code": "...", "message": "..."}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    /// Stable code ([`RelayError::code`]).
    pub code: String,
    /// Explanation.
    pub message: String,
}

impl IntoResponse for RelayError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code().to_string(),
            message: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

/// `POST /internal/relay/subscribe`: the caller (downstream) wants the tracks of these
/// parts hosted here; `fresh` asks for a new link (it lost its side).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SubscribeRequest {
    pub parts: Vec<String>,
    #[serde(default)]
    pub fresh: bool,
}

/// The answer to `subscribe`: the parts this node relays to the caller now.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SubscribeResponse {
    pub relayed: Vec<String>,
}

/// `POST /internal/relay/offer`: the upstream's SDP offer for its link to the caller's
/// node, and its media address (where the link's datagrams come from).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OfferRequest {
    pub media_addr: SocketAddr,
    pub sdp: String,
    pub tracks: Vec<RelayTrack>,
}

/// The answer to `offer`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OfferResponse {
    pub sdp: String,
}

/// `POST /internal/relay/layer`: send at most `layer` of `track_id` to the caller.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LayerRequest {
    pub track_id: String,
    pub layer: Layer,
}

/// `POST /internal/relay/roster`: the caller wants the participants of these parts
/// hosted here (its clients list them).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RosterRequest {
    pub parts: Vec<String>,
}

/// The answer to `roster`: the participants of each part asked for that is hosted
/// here (a part not listed is not, or did not fit in this answer).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RosterResponse {
    pub parts: Vec<PartRoster>,
}

/// One part's participants.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PartRoster {
    pub part: String,
    pub participants: Vec<RosterEntry>,
}

/// `GET /internal/relay/load`: what placement compares nodes by.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Load {
    pub participants: usize,
    pub forwarded_pps: u64,
    /// The node's media workers are past their capacity (`crate::overload`): it counts
    /// as full. Absent from a node of an older version.
    #[serde(default)]
    pub overloaded: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    ok: bool,
}

/// The node's relay control: shared by the routes, placement and the driver.
pub(crate) struct Relay {
    pub(crate) node: String,
    pub(crate) region: String,
    keys: Arc<KeySet>,
    pub(crate) cluster: Arc<Cluster>,
    commands: crate::workers::Workers,
    pub(crate) metrics: Metrics,
    /// The internal plane's certificates: calls to peers present this node's client
    /// certificate (the current one, after rotations).
    tls: Arc<InternalTls>,
    /// The media address other nodes' inbound links check (this node's candidate).
    media_addr: SocketAddr,
    max_participants: usize,
    /// Downstream: (upstream node, its part) → the local part its tracks join.
    into: Mutex<HashMap<(String, String), String>>,
    /// Forwarded packets per second, sampled by the driver (load for placement).
    forwarded_pps: AtomicU64,
    /// The region's placements as last read (placement and the driver share it).
    directory: Mutex<Directory>,
    /// The directory's other regions with a `relay_addr` (rooms may span them).
    pub(crate) other_regions: Vec<crate::regions::RegionEntry>,
    /// What this node knows of the other regions' nodes and parts.
    pub(crate) foreign: Mutex<crate::region_relay::Foreign>,
    /// Nodes whose roster is being asked for now (one request per node at a time).
    rosters_asked: Mutex<HashSet<String>>,
}

/// How long a read of the region's placements serves placement decisions (the driver
/// re-reads them every [`RECONCILE_PERIOD`], so joins rarely read them themselves).
const DIRECTORY_TTL: Duration = RECONCILE_PERIOD;

/// The region's room placements, read at most every [`DIRECTORY_TTL`] unless a fresh
/// read is asked for (after this node placed a part, or a decision on a stale copy
/// raced with another node).
#[derive(Default)]
struct Directory {
    read: Option<(Instant, Arc<Vec<meridian_store::Placement>>)>,
}

impl Directory {
    /// The copy read within `DIRECTORY_TTL` before `now`, if any.
    fn get(&self, now: Instant) -> Option<Arc<Vec<meridian_store::Placement>>> {
        self.read
            .as_ref()
            .filter(|(at, _)| now.saturating_duration_since(*at) < DIRECTORY_TTL)
            .map(|(_, p)| p.clone())
    }

    fn put(
        &mut self,
        at: Instant,
        placements: Vec<meridian_store::Placement>,
    ) -> Arc<Vec<meridian_store::Placement>> {
        let p = Arc::new(placements);
        self.read = Some((at, p.clone()));
        p
    }

    fn invalidate(&mut self) {
        self.read = None;
    }
}

/// What the downstream asked of one upstream node.
struct Upstream {
    parts: Vec<String>,
    asked_at: Instant,
}

impl Relay {
    /// The relay control of a node.
    pub(crate) fn new(
        keys: Arc<KeySet>,
        cluster: Arc<Cluster>,
        commands: crate::workers::Workers,
        metrics: Metrics,
        tls: Arc<InternalTls>,
        media_addr: SocketAddr,
        max_participants: usize,
    ) -> Relay {
        let region = cluster.region().to_string();
        Relay {
            node: cluster.node().to_string(),
            region,
            keys,
            cluster,
            commands,
            metrics,
            tls,
            media_addr,
            max_participants,
            into: Mutex::new(HashMap::new()),
            forwarded_pps: AtomicU64::new(0),
            directory: Mutex::new(Directory::default()),
            other_regions: Vec::new(),
            foreign: Mutex::new(Default::default()),
            rosters_asked: Mutex::new(HashSet::new()),
        }
    }

    /// Lets rooms span the directory's other regions that have a `relay_addr`.
    pub(crate) fn with_regions(mut self, regions: &[crate::regions::RegionEntry]) -> Relay {
        self.other_regions = regions
            .iter()
            .filter(|r| r.id != self.region && r.relay_addr.is_some())
            .cloned()
            .collect();
        self
    }

    /// A node token for this node's requests to other nodes.
    pub(crate) fn token(&self) -> Result<String, RelayError> {
        node_token(&self.keys, &self.node, &self.region)
            .map_err(|e| RelayError::Peer(format!("cannot sign a node token: {e}")))
    }

    /// The region's placements: the copy read within [`DIRECTORY_TTL`], or a new read
    /// (always when `fresh`).
    pub(crate) async fn placements(
        &self,
        fresh: bool,
    ) -> Result<Arc<Vec<meridian_store::Placement>>, meridian_store::StoreError> {
        if !fresh && let Some(p) = self.directory().get(Instant::now()) {
            return Ok(p);
        }
        let started = Instant::now();
        let read = self.cluster.store().placements().await?;
        Ok(self.directory().put(started, read))
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn op(&self, op: RelayOp) -> Result<RelayReply, RelayError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Relay { op, reply })
            .await
            .map_err(|_| RelayError::Unavailable)?;
        answer
            .await
            .map_err(|_| RelayError::Unavailable)?
            .map_err(RelayError::Media)
    }

    async fn local_count(&self) -> usize {
        let (reply, count) = oneshot::channel();
        if self.commands.send(Command::Count { reply }).await.is_err() {
            return usize::MAX;
        }
        count.await.unwrap_or(usize::MAX)
    }

    fn load(&self, participants: usize) -> Load {
        Load {
            participants,
            forwarded_pps: self.forwarded_pps.load(Ordering::Relaxed),
            overloaded: self.commands.overloaded(),
        }
    }

    /// Checks a caller's client certificate (present: the internal listener verified
    /// its chain), node token and lease (for a node of another region: that its
    /// region names it live); the node's id on success. Every refusal is counted.
    pub(crate) async fn authorize(
        &self,
        cert: Option<&PeerCertificate>,
        headers: &HeaderMap,
    ) -> Result<String, RelayError> {
        self.authorize_with(cert, headers, true).await
    }

    /// [`Relay::authorize`]; without `confirm` a node of another region is not
    /// confirmed with its region (for `region/parts`, which its region's nodes call
    /// while confirming this node's callers: asking back would never end).
    pub(crate) async fn authorize_with(
        &self,
        cert: Option<&PeerCertificate>,
        headers: &HeaderMap,
        confirm: bool,
    ) -> Result<String, RelayError> {
        let mut result = cert
            .ok_or(RelayError::NoCertificate)
            .and_then(|_| self.check_caller(headers));
        if confirm
            && let Ok((node, Some(region))) = &result
            && !self.confirm_foreign(region, node).await
        {
            result = Err(RelayError::NoLease(node.clone()));
        }
        let result = result.map(|(node, _)| node);
        if let Err(e) = &result {
            self.metrics
                .relay
                .refused
                .get_or_create(&ReasonLabel { reason: e.code() })
                .inc();
            debug!("relay request refused: {e}");
        }
        result
    }

    /// The caller's node id, and its region when that is another region of the
    /// directory (its lease is not in this region's log: the caller confirms it).
    fn check_caller(&self, headers: &HeaderMap) -> Result<(String, Option<String>), RelayError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(RelayError::NoToken)?;
        let claims = self
            .keys
            .verify_with(token, meridian_auth::unix_now(), &node_policy())
            .map_err(|e| RelayError::BadToken(e.code()))?;
        let node = claims
            .sub
            .strip_prefix("node:")
            .filter(|n| !n.is_empty() && *n != self.node)
            .filter(|_| claims.room == meridian_auth::ANY_ROOM && claims.grants.admin)
            .ok_or(RelayError::NotANode)?;
        match claims.region.as_deref() {
            Some(r) if r == self.region => {
                if self.cluster.lease_of(node).is_none() {
                    return Err(RelayError::NoLease(node.to_string()));
                }
                Ok((node.to_string(), None))
            }
            // Another region's node may not pass for one of ours.
            Some(r) if self.is_other_region(r) && self.cluster.lease_of(node).is_none() => {
                Ok((node.to_string(), Some(r.to_string())))
            }
            _ => Err(RelayError::NotANode),
        }
    }

    /// Runs the driver until `shutdown`: carries the media core's relay outputs to
    /// other nodes and keeps the links the hosted parts need.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut outputs: mpsc::Receiver<RelayOutput>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(RECONCILE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut upstreams: HashMap<String, Upstream> = HashMap::new();
        let mut last_fwd = (Instant::now(), self.metrics.rtp_packets_forwarded.get());
        loop {
            let out = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                out = outputs.recv() => match out {
                    Some(out) => Some(out),
                    None => return,
                },
                _ = tick.tick() => None,
            };
            match out {
                Some(out) => self.handle_output(out, &mut upstreams).await,
                None => {
                    let fwd = self.metrics.rtp_packets_forwarded.get();
                    let secs = last_fwd.0.elapsed().as_secs_f64().max(0.001);
                    let pps = (fwd.saturating_sub(last_fwd.1) as f64 / secs) as u64;
                    self.forwarded_pps.store(pps, Ordering::Relaxed);
                    last_fwd = (Instant::now(), fwd);
                    self.reconcile(&mut upstreams).await;
                }
            }
        }
    }

    async fn handle_output(
        self: &Arc<Self>,
        out: RelayOutput,
        upstreams: &mut HashMap<String, Upstream>,
    ) {
        match out {
            RelayOutput::Offer { peer, sdp, tracks } => {
                let this = self.clone();
                tokio::spawn(async move {
                    let req = OfferRequest {
                        media_addr: this.media_addr,
                        sdp,
                        tracks,
                    };
                    let answer: Result<OfferResponse, RelayError> =
                        this.call(&peer, "/internal/relay/offer", Some(&req)).await;
                    match answer {
                        Ok(a) => {
                            let applied = this
                                .op(RelayOp::Answer {
                                    peer: peer.clone(),
                                    sdp: a.sdp,
                                })
                                .await;
                            if let Err(e) = applied {
                                warn!(%peer, "relay answer refused: {e}");
                            }
                        }
                        Err(e) => {
                            // The downstream asks again (fresh) once its side times out.
                            warn!(%peer, "relay offer not taken: {e}");
                            let _ = this.op(RelayOp::RemoveOut { peer }).await;
                        }
                    }
                });
            }
            RelayOutput::LayerWanted {
                peer,
                track_id,
                layer,
            } => {
                let this = self.clone();
                tokio::spawn(async move {
                    let req = LayerRequest {
                        track_id: track_id.to_string(),
                        layer,
                    };
                    let r: Result<Ack, RelayError> =
                        this.call(&peer, "/internal/relay/layer", Some(&req)).await;
                    if let Err(e) = r {
                        debug!(%peer, "layer wish not delivered: {e}");
                    }
                });
            }
            RelayOutput::TrackState { peer, state } => {
                let this = self.clone();
                tokio::spawn(async move {
                    let r: Result<Ack, RelayError> = this
                        .call(&peer, "/internal/relay/track", Some(&state))
                        .await;
                    if let Err(e) = r {
                        debug!(%peer, "track state not delivered: {e}");
                    }
                });
            }
            RelayOutput::Down { peer, inbound } => {
                info!(%peer, inbound, "relay link down");
                if inbound {
                    upstreams.remove(&peer);
                    let _ = self.op(RelayOp::RemoveIn { peer }).await;
                } else {
                    let _ = self.op(RelayOp::RemoveOut { peer: peer.clone() }).await;
                    if let Some((region, _)) = self.foreign_peer(&peer) {
                        self.record_region_links(
                            (&self.region, &self.node),
                            (&region, &peer),
                            &[],
                            "down",
                        )
                        .await;
                    }
                    self.cluster
                        .record(Event::RelayUnlinked {
                            peer,
                            reason: "down".into(),
                        })
                        .await;
                }
            }
        }
    }

    /// Compares the links this node has with the ones its parts need, and fixes the
    /// difference (see the module docs).
    async fn reconcile(self: &Arc<Self>, upstreams: &mut HashMap<String, Upstream>) {
        // Rooms never span nodes here, so there are no links to keep; asking the media
        // loop for their stats would wake an idle worker twice a second.
        if self.max_participants == 0 && !self.cross_region() {
            return;
        }
        let Ok(RelayReply::Stats(stats)) = self.op(RelayOp::Stats).await else {
            return;
        };
        self.count_relayed(&stats);
        let held = self.cluster.held_parts();
        // The other regions' parts of the rooms with a part here (asked while this
        // node holds a part or relays to another region: the answers also keep the
        // other regions' nodes live).
        let views = if self.cross_region()
            && (!held.is_empty() || stats.iter().any(|s| self.foreign_peer(&s.peer).is_some()))
        {
            let mut rooms: Vec<String> = held.iter().map(|p| room_of_part(p).to_string()).collect();
            rooms.sort();
            rooms.dedup();
            self.region_views(&rooms)
        } else {
            Vec::new()
        };
        let mut live: HashMap<String, String> = self
            .cluster
            .live_nodes()
            .into_iter()
            .map(|l| (l.node, l.url))
            .collect();
        for peer in self.live_foreign_peers() {
            live.entry(peer).or_default();
        }
        // Upstream role: links to nodes that lost their lease go.
        for s in stats.iter().filter(|s| !live.contains_key(&s.peer)) {
            let peer = s.peer.clone();
            info!(%peer, "relay peer has no lease; closing its links");
            upstreams.remove(&peer);
            let _ = self.op(RelayOp::Remove { peer: peer.clone() }).await;
            self.record_region_peer_gone(&peer, "peer_gone").await;
            if !s.inbound {
                self.cluster
                    .record(Event::RelayUnlinked {
                        peer,
                        reason: "peer_gone".into(),
                    })
                    .await;
            }
        }
        if self.max_participants == 0 && views.is_empty() {
            return;
        }
        // Downstream role: the other parts of every room with a part here.
        let mut want: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for view in &views {
            for p in &view.parts {
                if !live.contains_key(&p.node) {
                    continue;
                }
                for local in held.iter().filter(|l| room_of_part(l) == p.room) {
                    want.entry(p.node.clone())
                        .or_default()
                        .push((p.part.clone(), local.clone()));
                }
            }
        }
        if !held.is_empty() && self.max_participants > 0 {
            let placements = match self.placements(true).await {
                Ok(p) => p,
                Err(e) => {
                    warn!("reading placements failed: {e}");
                    return;
                }
            };
            for local in &held {
                let room = room_of_part(local);
                for p in placements.iter() {
                    let Some(part) = p.stream.strip_prefix("room:") else {
                        continue;
                    };
                    if part != local
                        && room_of_part(part) == room
                        && p.node != self.node
                        && live.contains_key(&p.node)
                    {
                        want.entry(p.node.clone())
                            .or_default()
                            .push((part.to_string(), local.clone()));
                    }
                }
            }
        }
        {
            let mut into = self.into.lock().unwrap_or_else(|e| e.into_inner());
            into.clear();
            for (node, pairs) in &want {
                for (theirs, ours) in pairs {
                    into.insert((node.clone(), theirs.clone()), ours.clone());
                }
            }
        }
        for (node, pairs) in &want {
            self.ask_roster(node, pairs);
        }
        let mut rooms: Vec<&str> = held.iter().map(|p| room_of_part(p)).collect();
        rooms.sort_unstable();
        let shared: Vec<String> = held
            .iter()
            .filter(|p| {
                let r = room_of_part(p);
                rooms.partition_point(|x| *x < r) + 1 < rooms.partition_point(|x| *x <= r)
            })
            .cloned()
            .collect();
        if !shared.is_empty() {
            let _ = self.op(RelayOp::ShareLocalRosters { parts: shared }).await;
        }
        for (node, pairs) in &want {
            let mut parts: Vec<String> = pairs.iter().map(|(t, _)| t.clone()).collect();
            parts.sort();
            parts.dedup();
            let inbound = stats.iter().find(|s| s.inbound && s.peer == *node);
            let healthy = inbound.is_some_and(|s| s.connected);
            if let Some(u) = upstreams.get(node)
                && u.parts == parts
                && (healthy || u.asked_at.elapsed() < LINK_SETUP_TIMEOUT)
            {
                continue;
            }
            // A link that never connected (or whose upstream forgot it) is rebuilt.
            let fresh = !healthy;
            if fresh && inbound.is_some() {
                let _ = self.op(RelayOp::RemoveIn { peer: node.clone() }).await;
            }
            let req = SubscribeRequest {
                parts: parts.clone(),
                fresh,
            };
            let r: Result<SubscribeResponse, RelayError> = self
                .call(node, "/internal/relay/subscribe", Some(&req))
                .await;
            match r {
                Ok(answer) => {
                    if let Some((region, _)) = self.foreign_peer(node) {
                        self.record_region_links(
                            (&region, node),
                            (&self.region, &self.node),
                            &answer.relayed,
                            "left",
                        )
                        .await;
                    }
                    upstreams.insert(
                        node.clone(),
                        Upstream {
                            parts,
                            asked_at: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    warn!(%node, "relay subscribe failed: {e}");
                    upstreams.remove(node);
                }
            }
        }
        let gone: Vec<String> = upstreams
            .keys()
            .filter(|n| !want.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            upstreams.remove(&node);
            let req = SubscribeRequest {
                parts: Vec::new(),
                fresh: false,
            };
            let _: Result<SubscribeResponse, RelayError> = self
                .call(&node, "/internal/relay/subscribe", Some(&req))
                .await;
            if let Some((region, _)) = self.foreign_peer(&node) {
                self.record_region_links((&region, &node), (&self.region, &self.node), &[], "left")
                    .await;
            }
            let _ = self.op(RelayOp::RemoveIn { peer: node }).await;
        }
    }

    /// Asks `node` (in the background, one request at a time) for the participants of
    /// its parts in `pairs` (`(its part, the local part)`) and hands them to the
    /// local parts' controller, each named `<node>/<part>`. A part it does not list
    /// keeps what it listed last, until the controller's grace drops it.
    fn ask_roster(self: &Arc<Self>, node: &str, pairs: &[(String, String)]) {
        {
            let mut asked = self.rosters_asked.lock().unwrap_or_else(|e| e.into_inner());
            if !asked.insert(node.to_string()) {
                return;
            }
        }
        let mut parts: Vec<String> = pairs.iter().map(|(t, _)| t.clone()).collect();
        parts.sort();
        parts.dedup();
        let (this, node, pairs) = (self.clone(), node.to_string(), pairs.to_vec());
        tokio::spawn(async move {
            let req = RosterRequest { parts };
            let answer: Result<RosterResponse, RelayError> =
                this.call(&node, "/internal/relay/roster", Some(&req)).await;
            match answer {
                Ok(answer) => {
                    let rosters: Vec<(String, String, Vec<RosterEntry>)> = answer
                        .parts
                        .into_iter()
                        .flat_map(|r| {
                            let source = format!("{node}/{}", r.part);
                            pairs
                                .iter()
                                .filter(|(theirs, _)| *theirs == r.part)
                                .map(|(_, ours)| {
                                    (ours.clone(), source.clone(), r.participants.clone())
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    if let Err(e) = this.op(RelayOp::RemoteRosters { rosters }).await {
                        warn!(%node, "roster refused: {e}");
                    }
                }
                Err(e) => debug!(%node, "roster not read: {e}"),
            }
            this.rosters_asked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&node);
        });
    }

    /// Sends one relay-control request to `node`'s internal listener (at the address
    /// its lease publishes, over mutual TLS) and reads the typed answer, bounded by
    /// [`REQUEST_TIMEOUT`] and [`MAX_BODY_BYTES`].
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        node: &str,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, RelayError> {
        let addr = match self.cluster.lease_of(node) {
            Some(lease) => lease
                .internal_addr
                .ok_or_else(|| RelayError::Peer(format!("{node} publishes no internal address"))),
            None => self
                .foreign_peer(node)
                .map(|(_, addr)| addr)
                .ok_or_else(|| RelayError::NoLease(node.to_string())),
        };
        match addr {
            Ok(addr) => self.call_addr(&addr, path, body).await,
            Err(e) => {
                self.metrics.relay.peer_errors.inc();
                Err(e)
            }
        }
    }

    /// Sends one relay-control request to the internal listener at `addr`
    /// (`host:port`); see [`Relay::call`].
    pub(crate) async fn call_addr<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, RelayError> {
        let result = async {
            let method = if body.is_some() { "POST" } else { "GET" };
            let body = body
                .map(serde_json::to_vec)
                .transpose()
                .map_err(|e| RelayError::BadRequest(e.to_string()))?
                .unwrap_or_default();
            let token = self.token()?;
            let resp = self
                .tls
                .client()
                .with_timeout(REQUEST_TIMEOUT)
                .with_max_response(MAX_BODY_BYTES)
                .request_to(addr, method, path, Some(&token), body)
                .await
                .map_err(|e| RelayError::Peer(e.to_string()))?;
            if !(200..300).contains(&resp.status) {
                let why = serde_json::from_str::<ErrorBody>(&resp.body)
                    .map(|b| format!("{} {}: {}", resp.status, b.code, b.message))
                    .unwrap_or_else(|_| format!("HTTP {}", resp.status));
                return Err(RelayError::Peer(why));
            }
            serde_json::from_str(&resp.body).map_err(|e| RelayError::Peer(e.to_string()))
        }
        .await;
        if result.is_err() {
            self.metrics.relay.peer_errors.inc();
        }
        result
    }
}

/// Signs a node token for `node` of `region` (see the module docs).
pub(crate) fn node_token(
    keys: &KeySet,
    node: &str,
    region: &str,
) -> Result<String, meridian_auth::AuthError> {
    let claims = Claims::new(
        format!("node:{node}"),
        meridian_auth::ANY_ROOM,
        meridian_auth::unix_now(),
        NODE_TOKEN_TTL,
    )
    .with_grants(Grants::admin())
    .with_region(region)
    .with_audience(NODE_AUDIENCE);
    keys.sign(&claims)
}

fn node_policy() -> Policy {
    Policy {
        audience: NODE_AUDIENCE.into(),
        max_lifetime: NODE_TOKEN_TTL * 2,
    }
}

pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, RelayError> {
    serde_json::from_slice(body).map_err(|e| {
        RelayError::BadRequest(meridian_protocol::clip(
            &e.to_string(),
            meridian_protocol::MAX_ERROR_DETAIL_BYTES,
        ))
    })
}

/// The relay-control routes (`/internal/relay/*`), node-to-node only: mounted on the
/// internal listener (`internal::node_routes`), never on the public one.
pub(crate) fn routes() -> Router<NodeState> {
    Router::new()
        .route("/internal/relay/subscribe", post(subscribe))
        .route("/internal/relay/offer", post(offer))
        .route("/internal/relay/layer", post(layer))
        .route("/internal/relay/track", post(track_state))
        .route("/internal/relay/roster", post(roster))
        .route("/internal/relay/load", get(load))
        .route("/internal/region/parts", post(crate::region_relay::parts))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// The parts a peer asked for that this node hosts; more than
/// [`MAX_PARTS_PER_REQUEST`] asked is refused.
fn held_of(state: &NodeState, asked: Vec<String>) -> Result<Vec<String>, RelayError> {
    if asked.len() > MAX_PARTS_PER_REQUEST {
        return Err(RelayError::BadRequest(format!(
            "more than {MAX_PARTS_PER_REQUEST} parts"
        )));
    }
    let held = state.cluster.held_parts();
    Ok(asked.into_iter().filter(|p| held.contains(p)).collect())
}

async fn subscribe(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SubscribeResponse>, RelayError> {
    let relay = &state.relay;
    let peer = relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let req: SubscribeRequest = parse(&body)?;
    // Only parts hosted here can be relayed from here.
    let parts = held_of(&state, req.parts)?;
    let reply = relay
        .op(RelayOp::Relay {
            peer: peer.clone(),
            parts: parts.clone(),
            fresh: req.fresh,
        })
        .await?;
    if let Some((peer_region, _)) = relay.foreign_peer(&peer) {
        relay
            .record_region_links(
                (&relay.region, &relay.node),
                (&peer_region, &peer),
                &parts,
                "left",
            )
            .await;
    }
    if let RelayReply::Linked(linked) = reply {
        for part in linked {
            info!(%peer, %part, "relaying a room part");
            state
                .cluster
                .record(Event::RelayLinked {
                    peer: peer.clone(),
                    part,
                })
                .await;
        }
    }
    Ok(Json(SubscribeResponse { relayed: parts }))
}

async fn offer(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OfferResponse>, RelayError> {
    let relay = &state.relay;
    let peer = relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let mut req: OfferRequest = parse(&body)?;
    {
        let into = relay.into.lock().unwrap_or_else(|e| e.into_inner());
        for t in &mut req.tracks {
            // The upstream names its own part; the tracks join the part here. A part
            // nobody here asked for keeps its name, so no local participant sees it.
            if let Some(local) = into.get(&(peer.clone(), t.room.clone())) {
                t.room = local.clone();
            }
        }
    }
    match relay
        .op(RelayOp::Offer {
            peer,
            peer_addr: req.media_addr,
            sdp: req.sdp,
            tracks: req.tracks,
        })
        .await?
    {
        RelayReply::Answer(sdp) => Ok(Json(OfferResponse { sdp })),
        _ => Err(RelayError::Media("no answer".into())),
    }
}

async fn layer(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, RelayError> {
    let relay = &state.relay;
    let peer = relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let req: LayerRequest = parse(&body)?;
    let track: TrackId = req
        .track_id
        .parse()
        .map_err(|_| RelayError::BadRequest("not a track id".into()))?;
    relay
        .op(RelayOp::Layer {
            peer,
            track,
            layer: req.layer,
        })
        .await?;
    Ok(Json(Ack { ok: true }))
}

async fn track_state(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, RelayError> {
    let relay = &state.relay;
    let peer = relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let req: meridian_media::RelayTrackState = parse(&body)?;
    relay.op(RelayOp::TrackState { peer, state: req }).await?;
    Ok(Json(Ack { ok: true }))
}

async fn roster(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<RosterResponse>, RelayError> {
    let relay = &state.relay;
    relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let req: RosterRequest = parse(&body)?;
    let parts = held_of(&state, req.parts)?;
    match relay.op(RelayOp::Roster { parts }).await? {
        RelayReply::Rosters(rosters) => Ok(Json(RosterResponse {
            parts: rosters
                .into_iter()
                .map(|(part, participants)| PartRoster { part, participants })
                .collect(),
        })),
        _ => Err(RelayError::Media("no roster".into())),
    }
}

async fn load(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Result<Json<Load>, RelayError> {
    let relay = &state.relay;
    relay
        .authorize(cert.as_ref().map(|c| &c.0), &headers)
        .await?;
    let n = relay.local_count().await;
    Ok(Json(relay.load(n)))
}

/// Where a join for `room` is served, and in which part. Without a participant cap
/// the room has one part (the room itself) and [`Cluster::place`] decides.
pub(crate) async fn place(
    state: &NodeState,
    room: &str,
    resume: Option<&str>,
) -> Result<(Placement, String), PlaceError> {
    match place_with(state, room, resume, false).await {
        // Decided on a copy of the placements another node's write had outdated:
        // once more on a fresh read.
        Err(PlaceError::Contended) => place_with(state, room, resume, true).await,
        other => other,
    }
}

async fn place_with(
    state: &NodeState,
    room: &str,
    resume: Option<&str>,
    fresh: bool,
) -> Result<(Placement, String), PlaceError> {
    let cap = state.config.media.max_participants;
    let cluster = &state.cluster;
    let resuming = resume.is_some();
    if cap == 0 || cluster.is_draining() {
        return cluster
            .place(room, resuming)
            .await
            .map(|p| (p, room.to_string()));
    }
    // Right after start the node knows no other node: wait for its first view of the
    // region rather than take every join (and exceed the cap).
    if !cluster.wait_for_view(VIEW_WAIT).await {
        return Err(PlaceError::NoView);
    }
    let parts = parts_of(&state.relay, room, fresh).await?;
    // A resuming client goes back to its own part, found by its resume token's hash in
    // the parts' logs; that part is placed (waiting out a dead host, taking it over)
    // exactly as a one-part room is.
    if let Some(token) = resume {
        let hash = meridian_room::sha256_hex(token);
        for (part, _) in &parts {
            let state = cluster
                .store()
                .load_room(&meridian_events::room_stream(part))
                .await?;
            if state
                .participants
                .values()
                .any(|p| p.resume_hash.as_deref() == Some(hash.as_str()))
            {
                return cluster.place(part, true).await.map(|p| (p, part.clone()));
            }
        }
    }
    let relay = &state.relay;
    let me = cluster.node().to_string();
    let _guard = cluster.placing().await;
    let here = relay.local_count().await;
    let full_here = here >= cap || relay.commands.overloaded();
    // 1. A part here with room (a resuming client always comes back to its node).
    for (part, node) in &parts {
        if *node == me && (!full_here || resuming) && cluster.take_part(part).await? {
            return Ok((Placement::Local, part.clone()));
        }
    }
    // 2. A part on another live node with room.
    let mut loads: Vec<(Load, String)> = Vec::new();
    for lease in cluster.live_nodes() {
        if lease.node == me || lease.draining {
            continue;
        }
        match relay
            .call::<(), Load>(&lease.node, "/internal/relay/load", None)
            .await
        {
            Ok(load) => loads.push((load, lease.node)),
            Err(e) => debug!(node = %lease.node, "no load from node: {e}"),
        }
    }
    for (part, node) in &parts {
        if let Some((load, _)) = loads.iter().find(|(_, n)| n == node)
            && load.participants < cap
            && !load.overloaded
            && let Some(lease) = cluster.lease_of(node)
        {
            debug!(%part, %node, "joining a part elsewhere");
            state.metrics.redirects.inc();
            return Ok((Placement::Elsewhere(lease.url), part.clone()));
        }
    }
    // 3. A new part on the least-loaded live node.
    loads.push((relay.load(here), me.clone()));
    loads.sort_by_key(|(l, n)| (l.overloaded, l.participants, l.forwarded_pps, n.clone()));
    let (_, target) = loads
        .first()
        .cloned()
        .unwrap_or((relay.load(here), me.clone()));
    if target != me
        && let Some(lease) = cluster.lease_of(&target)
    {
        state.metrics.redirects.inc();
        return Ok((Placement::Elsewhere(lease.url), room.to_string()));
    }
    if let Some((part, _)) = parts.iter().find(|(_, n)| *n == me)
        && cluster.take_part(part).await?
    {
        return Ok((Placement::Local, part.clone()));
    }
    let first = !parts.iter().any(|(p, _)| p == room);
    let part = if first {
        room.to_string()
    } else {
        part_name(room, &me)
    };
    let placed = if first {
        cluster.take_part(&part).await?
    } else {
        cluster.place_part(room, &part).await?
    };
    state.relay.directory().invalidate();
    if placed {
        info!(%room, %part, "room part placed here");
        Ok((Placement::Local, part))
    } else {
        Err(PlaceError::Contended)
    }
}

/// The parts of `room` placed in the log, with their nodes (from the directory).
async fn parts_of(
    relay: &Relay,
    room: &str,
    fresh: bool,
) -> Result<Vec<(String, String)>, PlaceError> {
    Ok(relay
        .placements(fresh)
        .await?
        .iter()
        .filter_map(|p| {
            let part = p.stream.strip_prefix("room:")?.to_string();
            (room_of_part(&part) == room).then(|| (part, p.node.clone()))
        })
        .collect())
}

/// The media loop's side of relay links: the relay socket, datagrams waiting for it,
/// and the queue of outputs towards the driver.
pub(crate) struct RelayIo {
    socket: MediaSocket,
    outgoing: VecDeque<Transmit>,
    outputs: mpsc::Sender<RelayOutput>,
}

/// Waits until the relay socket may be read (forever without one).
pub(crate) async fn readable(io: &Option<RelayIo>) -> std::io::Result<()> {
    match io {
        Some(r) => r.socket.readable().await,
        None => std::future::pending().await,
    }
}

impl RelayIo {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        outputs: mpsc::Sender<RelayOutput>,
    ) -> std::io::Result<RelayIo> {
        Ok(RelayIo {
            socket: MediaSocket::new(socket)?,
            outgoing: VecDeque::new(),
            outputs,
        })
    }

    /// Reads one batch from the relay socket into the controller (the copies are sent
    /// by the loop's flush right after).
    pub(crate) fn receive(&mut self, controller: &mut Controller<SessionSink>) {
        match self.socket.try_recv_batch() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("relay recv: {e}");
                return;
            }
        }
        for (source, datagram) in self.socket.received() {
            controller.handle_relay_datagram(Instant::now(), source, datagram);
        }
    }

    /// Sends the controller's relay datagrams; waits for room in the socket's buffer
    /// only as the main socket's flush does.
    pub(crate) async fn send(&mut self, controller: &mut Controller<SessionSink>) {
        while let Some(t) = controller.poll_relay_transmit() {
            if self.outgoing.len() >= MAX_OUTGOING {
                self.outgoing.pop_front();
            }
            self.outgoing.push_back(t);
        }
        while !self.outgoing.is_empty() {
            match self.socket.try_send_batch(self.outgoing.make_contiguous()) {
                Ok(n) => drop(self.outgoing.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.socket.writable().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!("relay send: {e}");
                    self.outgoing.pop_front();
                }
            }
        }
    }

    /// Queues an output for the driver (dropped, with a warning, if it is far behind).
    pub(crate) fn output(&self, out: RelayOutput) {
        if self.outputs.try_send(out).is_err() {
            warn!("relay driver queue full; a relay output was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placement_directory_serves_reads_for_one_period() {
        let t0 = Instant::now();
        let mut d = Directory::default();
        assert!(d.get(t0).is_none(), "nothing read yet");
        let placement = meridian_store::Placement {
            stream: "room:big".into(),
            node: "node-a".into(),
            epoch: 1,
            sequence: 2,
        };
        d.put(t0, vec![placement.clone()]);
        let within = t0 + DIRECTORY_TTL - Duration::from_millis(1);
        assert_eq!(d.get(within).as_deref(), Some(&vec![placement]));
        assert!(
            d.get(t0 + DIRECTORY_TTL).is_none(),
            "stale after one period"
        );
        d.put(t0, Vec::new());
        d.invalidate();
        assert!(d.get(t0).is_none(), "a write of this node makes it stale");
    }

    #[test]
    fn the_core_and_the_log_name_parts_alike() {
        assert_eq!(
            meridian_media::PART_SEPARATOR,
            meridian_events::PART_SEPARATOR
        );
        assert_eq!(room_of_part(&part_name("demo", "node-b")), "demo");
    }
}
