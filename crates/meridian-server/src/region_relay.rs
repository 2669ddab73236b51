//! Rooms across regions: the relay links of [`crate::relay`] between nodes of
//! different regions.
//!
//! A room joined in several regions has a part in each (placed as in one region,
//! recorded only in that region's log). A node hosting a part of room `R` learns the
//! other regions' parts of `R` by asking each other region of the directory
//! (`POST /internal/region/parts` at the region's `relay_addr`, the internal listener
//! of one of its nodes, then any node of it learnt before): the answering node reads
//! its own region's placements and live leases and answers each part with its host
//! node and that node's internal address. The asking node then links to those nodes
//! exactly as to a node of its own region (one str0m connection per ordered node pair,
//! only tracks published on the upstream node cross, so each track crosses each
//! region boundary once per receiving part).
//!
//! Callers from another region pass the same checks as a region's own nodes (mutual
//! TLS with the shared internal CA, a node token of the shared key) except the lease:
//! the caller's log is not ours, so its token must name another region of the
//! directory and the node must be among the live nodes that region answers for.
//!
//! Both ends record `RegionRelayLinked` / `RegionRelayUnlinked` in their own region's
//! log, and the bytes that cross feed `meridian_media_bytes_total{path="cross_region"}`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use meridian_events::{Event, room_of_part};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::NodeState;
use crate::internal::PeerCertificate;
use crate::regions::RegionEntry;
use crate::relay::{MAX_PARTS_PER_REQUEST, Relay, RelayError, parse};

/// How long an answer of another region serves (the driver asks every
/// [`crate::relay::RECONCILE_PERIOD`], so about every other tick).
const VIEW_TTL: Duration = Duration::from_secs(1);
/// How long a node of another region counts as live after its region last named it:
/// links to it go when its region has not confirmed it for this long.
const PEER_TTL: Duration = Duration::from_secs(6);
/// Most live nodes one region's answer may name.
const MAX_NODES: usize = 256;
/// Most parts one region's answer may name.
const MAX_PARTS: usize = 4 * MAX_PARTS_PER_REQUEST;

/// `POST /internal/region/parts`: the caller's rooms (at most 1024).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PartsRequest {
    pub rooms: Vec<String>,
}

/// A live node of the answering region.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RegionNode {
    pub node: String,
    /// Its internal listener (`host:port`, from its lease).
    pub internal_addr: String,
}

/// A part of one of the asked rooms in the answering region.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RegionPart {
    pub room: String,
    pub part: String,
    pub node: String,
}

/// The answer: the region's live nodes (with internal addresses) and its parts of the
/// asked rooms hosted by live nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PartsResponse {
    pub region: String,
    pub nodes: Vec<RegionNode>,
    pub parts: Vec<RegionPart>,
}

/// A node of another region, as its region last answered for it.
struct ForeignPeer {
    region: String,
    addr: String,
    seen: Instant,
}

/// One region's answer: when, and which rooms were asked.
#[derive(Clone)]
struct View {
    at: Instant,
    answer: Arc<PartsResponse>,
    asked: BTreeSet<String>,
}

/// What this node knows of the other regions.
#[derive(Default)]
pub(crate) struct Foreign {
    peers: HashMap<String, ForeignPeer>,
    /// The last good answer of each region, by region id.
    views: HashMap<String, View>,
    /// Regions being asked now (see [`Relay::region_views`]).
    asking: BTreeSet<String>,
    /// Cross-region links recorded in the log: (from node, to node) → parts.
    recorded: HashMap<(String, String), BTreeSet<String>>,
    /// Outbound relay bytes last counted, per peer node.
    bytes_seen: HashMap<String, u64>,
}

impl Relay {
    fn foreign(&self) -> std::sync::MutexGuard<'_, Foreign> {
        self.foreign.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the directory names other regions this node may link rooms with.
    pub(crate) fn cross_region(&self) -> bool {
        !self.other_regions.is_empty()
    }

    /// Whether `region` is another region of the directory.
    pub(crate) fn is_other_region(&self, region: &str) -> bool {
        self.other_regions.iter().any(|r| r.id == region)
    }

    /// The region and internal address of a node of another region its region named
    /// within [`PEER_TTL`].
    pub(crate) fn foreign_peer(&self, node: &str) -> Option<(String, String)> {
        let f = self.foreign();
        f.peers
            .get(node)
            .filter(|p| p.seen.elapsed() < PEER_TTL)
            .map(|p| (p.region.clone(), p.addr.clone()))
    }

    /// The nodes of other regions named within [`PEER_TTL`].
    pub(crate) fn live_foreign_peers(&self) -> Vec<String> {
        let f = self.foreign();
        f.peers
            .iter()
            .filter(|(_, p)| p.seen.elapsed() < PEER_TTL)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether node `node` of region `region` is live there: known, or named by the
    /// region when asked now.
    pub(crate) async fn confirm_foreign(&self, region: &str, node: &str) -> bool {
        if self.foreign_peer(node).is_some_and(|(r, _)| r == region) {
            return true;
        }
        let Some(entry) = self.other_regions.iter().find(|r| r.id == region) else {
            return false;
        };
        match self.ask_region(entry, &[]).await {
            Ok(view) => view.nodes.iter().any(|n| n.node == node),
            Err(e) => {
                debug!(%region, "cannot confirm a node of another region: {e}");
                false
            }
        }
    }

    /// Asks `region` for its parts of `rooms` (at its `relay_addr`, then at the nodes
    /// it named before), checks the answer's bounds and remembers its nodes.
    async fn ask_region(
        &self,
        region: &RegionEntry,
        rooms: &[String],
    ) -> Result<Arc<PartsResponse>, RelayError> {
        let mut addrs: Vec<String> = region.relay_addr.iter().cloned().collect();
        if let Some(view) = self.foreign().views.get(&region.id) {
            addrs.extend(view.answer.nodes.iter().map(|n| n.internal_addr.clone()));
        }
        let mut seen = BTreeSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        let req = PartsRequest {
            rooms: rooms.to_vec(),
        };
        let mut last = RelayError::Peer(format!("region {} has no relay_addr", region.id));
        for addr in addrs.iter().take(4) {
            let answer: Result<PartsResponse, RelayError> = self
                .call_addr(addr, "/internal/region/parts", Some(&req))
                .await;
            match answer {
                Ok(view) => {
                    if view.region != region.id
                        || view.nodes.len() > MAX_NODES
                        || view.parts.len() > MAX_PARTS
                    {
                        last = RelayError::Peer(format!(
                            "{addr} answered for region {:?} with {} nodes and {} parts",
                            view.region,
                            view.nodes.len(),
                            view.parts.len()
                        ));
                        continue;
                    }
                    let view = Arc::new(view);
                    let now = Instant::now();
                    let mut f = self.foreign();
                    for n in &view.nodes {
                        // A node id of this region is never taken for another's.
                        if self.cluster.lease_of(&n.node).is_some() || n.node == self.node {
                            continue;
                        }
                        f.peers.insert(
                            n.node.clone(),
                            ForeignPeer {
                                region: region.id.clone(),
                                addr: n.internal_addr.clone(),
                                seen: now,
                            },
                        );
                    }
                    // A liveness check (no rooms asked) must not replace a view that
                    // names parts: the links built on it would be taken down until the
                    // next full answer.
                    if !rooms.is_empty() || !f.views.contains_key(&region.id) {
                        f.views.insert(
                            region.id.clone(),
                            View {
                                at: now,
                                answer: view.clone(),
                                asked: rooms.iter().cloned().collect(),
                            },
                        );
                    }
                    return Ok(view);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The other regions' parts of `rooms`: each region's last answer within
    /// [`PEER_TTL`]. A region whose answer is older than [`VIEW_TTL`] or did not cover
    /// `rooms` is asked again in a task of its own (one at a time per region), so a
    /// region that stops answering (each call waits up to its timeout, at up to four
    /// addresses) never holds up the reconciliation of this region's own links; its
    /// answer serves from the next reconciliation on.
    pub(crate) fn region_views(self: &Arc<Self>, rooms: &[String]) -> Vec<Arc<PartsResponse>> {
        let rooms: Vec<String> = rooms.iter().take(MAX_PARTS_PER_REQUEST).cloned().collect();
        let mut views = Vec::new();
        let mut f = self.foreign();
        for r in &self.other_regions {
            let cached = f.views.get(&r.id);
            let fresh = cached.is_some_and(|v| {
                v.at.elapsed() < VIEW_TTL && rooms.iter().all(|room| v.asked.contains(room))
            });
            if let Some(view) = cached.filter(|v| v.at.elapsed() < PEER_TTL) {
                views.push(view.answer.clone());
            }
            if !fresh && f.asking.insert(r.id.clone()) {
                let relay = self.clone();
                let region = r.clone();
                let rooms = rooms.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay.ask_region(&region, &rooms).await {
                        debug!(region = %region.id, "region did not answer: {e}");
                    }
                    relay.foreign().asking.remove(&region.id);
                });
            }
        }
        f.peers.retain(|_, p| p.seen.elapsed() < PEER_TTL * 2);
        views
    }

    /// Counts the bytes each outbound link sent since the last call, by the region it
    /// goes to, and publishes the copies of each track per boundary.
    pub(crate) fn count_relayed(&self, stats: &[meridian_media::RelayStats]) {
        let mut copies: HashMap<String, HashMap<meridian_media::TrackId, u64>> = HashMap::new();
        let mut deltas = Vec::new();
        {
            let mut f = self.foreign();
            let mut seen = HashMap::new();
            for s in stats.iter().filter(|s| !s.inbound) {
                let before = f.bytes_seen.get(&s.peer).copied().unwrap_or(0);
                // A rebuilt link counts from zero again.
                let delta = if s.bytes < before {
                    s.bytes
                } else {
                    s.bytes - before
                };
                seen.insert(s.peer.clone(), s.bytes);
                let region = f
                    .peers
                    .get(&s.peer)
                    .map(|p| p.region.clone())
                    .unwrap_or_else(|| self.region.clone());
                if region != self.region {
                    let per_track = copies.entry(region.clone()).or_default();
                    for t in &s.track_ids {
                        *per_track.entry(*t).or_default() += 1;
                    }
                }
                deltas.push((region, delta));
            }
            f.bytes_seen = seen;
        }
        for (region, delta) in deltas {
            if delta > 0 {
                self.metrics.regions.relayed(&region, delta);
            }
        }
        for r in &self.other_regions {
            let per_track = copies.get(&r.id);
            let max = per_track
                .and_then(|t| t.values().max().copied())
                .unwrap_or(0);
            let tracks = per_track.map(|t| t.len()).unwrap_or(0);
            self.metrics.regions.boundary(&r.id, max, tracks);
        }
    }

    /// Records the cross-region links from `from` to `to` (the parts relayed now) in
    /// this region's log: `RegionRelayLinked` for new parts, `RegionRelayUnlinked`
    /// (with `reason`) for parts no longer relayed.
    pub(crate) async fn record_region_links(
        &self,
        (from_region, from): (&str, &str),
        (to_region, to): (&str, &str),
        parts: &[String],
        reason: &str,
    ) {
        let (added, removed) = {
            let mut f = self.foreign();
            let key = (from.to_string(), to.to_string());
            let now: BTreeSet<String> = parts.iter().cloned().collect();
            let before = f.recorded.remove(&key).unwrap_or_default();
            let added: Vec<String> = now.difference(&before).cloned().collect();
            let removed: Vec<String> = before.difference(&now).cloned().collect();
            if !now.is_empty() {
                f.recorded.insert(key, now);
            }
            (added, removed)
        };
        let link = |part: String| meridian_events::RegionLink {
            room: room_of_part(&part).to_string(),
            part,
            from_region: from_region.to_string(),
            from_node: from.to_string(),
            to_region: to_region.to_string(),
            to_node: to.to_string(),
        };
        let events = added
            .into_iter()
            .map(|p| Event::RegionRelayLinked { link: link(p) })
            .chain(removed.into_iter().map(|p| Event::RegionRelayUnlinked {
                link: link(p),
                reason: reason.to_string(),
            }));
        for event in events.collect::<Vec<_>>() {
            self.cluster.record(event).await;
        }
    }

    /// Records the end of every cross-region link with `peer` (either way) whose
    /// record is still open: the peer's region stopped naming it, or its link went.
    pub(crate) async fn record_region_peer_gone(&self, peer: &str, reason: &str) {
        let keys: Vec<(String, String)> = self
            .foreign()
            .recorded
            .keys()
            .filter(|(from, to)| from == peer || to == peer)
            .cloned()
            .collect();
        let peer_region = self.foreign().peers.get(peer).map(|p| p.region.clone());
        let Some(peer_region) = peer_region else {
            return;
        };
        for (from, to) in keys {
            let (fr, tr) = if from == peer {
                (peer_region.clone(), self.region.clone())
            } else {
                (self.region.clone(), peer_region.clone())
            };
            self.record_region_links((&fr, &from), (&tr, &to), &[], reason)
                .await;
        }
    }
}

/// `POST /internal/region/parts`: this region's live nodes and its parts of the asked
/// rooms, for a node of another region (or of this one).
pub(crate) async fn parts(
    State(state): State<NodeState>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PartsResponse>, RelayError> {
    let relay = &state.relay;
    // A node of another region is not confirmed with its region here: that region's
    // nodes call this route to confirm this region's callers. The answer names only
    // this region's live nodes and parts of the asked rooms.
    relay
        .authorize_with(cert.as_ref().map(|c| &c.0), &headers, false)
        .await?;
    let req: PartsRequest = parse(&body)?;
    if req.rooms.len() > MAX_PARTS_PER_REQUEST {
        return Err(RelayError::BadRequest(format!(
            "more than {MAX_PARTS_PER_REQUEST} rooms"
        )));
    }
    let live = state.cluster.live_nodes();
    let nodes: Vec<RegionNode> = live
        .iter()
        .filter(|l| !l.draining)
        .filter_map(|l| {
            Some(RegionNode {
                node: l.node.clone(),
                internal_addr: l.internal_addr.clone()?,
            })
        })
        .take(MAX_NODES)
        .collect();
    let rooms: BTreeSet<&str> = req.rooms.iter().map(String::as_str).collect();
    let mut parts = Vec::new();
    if !rooms.is_empty() {
        let placements = relay.placements(false).await.map_err(|e| {
            RelayError::Peer(format!("reading this region's placements failed: {e}"))
        })?;
        for p in placements.iter() {
            let Some(part) = p.stream.strip_prefix("room:") else {
                continue;
            };
            let room = room_of_part(part);
            if rooms.contains(room) && nodes.iter().any(|n| n.node == p.node) {
                parts.push(RegionPart {
                    room: room.to_string(),
                    part: part.to_string(),
                    node: p.node.clone(),
                });
                if parts.len() >= MAX_PARTS {
                    break;
                }
            }
        }
    }
    Ok(Json(PartsResponse {
        region: state.cluster.region().to_string(),
        nodes,
        parts,
    }))
}
