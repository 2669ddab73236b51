//! Membership of a region: this node's lease, room placement, takeover of a dead
//! node's rooms, and drain.
//!
//! Every node of a region shares one event log. A node holds a lease (a row renewed
//! every `lease_period_ms`); a room is hosted by the node named in its latest
//! `RoomPlaced` event. The node keeps, per hosted room, the stream version it expects
//! ([`Fences`]): the outbox appends with that exact version, so once another node has
//! placed the room elsewhere every late write of this node is refused by the store
//! and the node lets the room go. Two nodes therefore never both write a room.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use meridian_events::{Event, RoomState, node_stream, room_stream};
use meridian_store::{ExpectedVersion, NewEvent, NodeLease, Store, StoreError};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::mailbox::{Command, Fence, Fences, Outbound, OutboxTx};
use crate::metrics::Metrics;

/// Where a join should be served.
#[derive(Debug)]
pub(crate) enum Placement {
    /// This node hosts the room.
    Local,
    /// Another live node hosts it: send the client to this signaling URL.
    Elsewhere(String),
}

/// Why a room could not be placed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    /// The node drains and no other node can take the room.
    #[error("node is draining and no other node of the region is available")]
    Draining,
    /// Placement kept racing with other nodes.
    #[error("room placement is contended; retry")]
    Contended,
    /// The node has not read its region's membership since it started, so it cannot
    /// tell which nodes have room.
    #[error("node is starting and has not seen its region yet; retry")]
    NoView,
    /// The event log failed.
    #[error("event log: {0}")]
    Store(#[from] StoreError),
}

struct LeaseState {
    incarnation: String,
    /// Leases as last read from the log.
    leases: Vec<NodeLease>,
    /// Since when renewals have succeeded without a break.
    healthy_since: Option<Instant>,
    draining: bool,
}

/// This node's view of its region.
pub(crate) struct Cluster {
    store: Store,
    node: String,
    region: String,
    url: String,
    internal_addr: String,
    period: Duration,
    ttl: Duration,
    fences: Fences,
    commands: crate::workers::Workers,
    outbox: OutboxTx,
    metrics: Metrics,
    lease: Mutex<LeaseState>,
    /// Becomes true once the region's leases were read (the node knows its peers).
    view: watch::Sender<bool>,
    /// Serialises placement decisions on this node.
    placing: tokio::sync::Mutex<()>,
}

/// Settings of [`Cluster::start`].
pub(crate) struct ClusterParams {
    pub node: String,
    pub region: String,
    pub url: String,
    /// `host:port` of the internal listener for other nodes (`""`: none).
    pub internal_addr: String,
    pub period: Duration,
    pub ttl: Duration,
}

/// Attempts at placing one room before giving up.
const PLACE_ATTEMPTS: usize = 5;

impl Cluster {
    /// Takes this node's lease (recording it) and returns the cluster handle.
    pub(crate) async fn start(
        params: ClusterParams,
        store: Store,
        fences: Fences,
        commands: crate::workers::Workers,
        outbox: OutboxTx,
        metrics: Metrics,
    ) -> Result<Arc<Cluster>, StoreError> {
        let cluster = Cluster {
            store,
            node: params.node,
            region: params.region,
            url: params.url,
            internal_addr: params.internal_addr,
            period: params.period,
            ttl: params.ttl,
            fences,
            commands,
            outbox,
            metrics,
            lease: Mutex::new(LeaseState {
                incarnation: String::new(),
                leases: Vec::new(),
                healthy_since: None,
                draining: false,
            }),
            view: watch::channel(false).0,
            placing: tokio::sync::Mutex::new(()),
        };
        cluster.acquire().await?;
        Ok(Arc::new(cluster))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node drains (takes no new sessions).
    pub(crate) fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Whether the node should get new clients: it holds its lease (its last renewal
    /// reached the log) and does not drain.
    pub(crate) fn is_ready(&self) -> bool {
        let s = self.state();
        s.healthy_since.is_some() && !s.draining
    }

    /// Waits (at most `timeout`) until the node has read its region's leases once
    /// since it started; false if it has not.
    pub(crate) async fn wait_for_view(&self, timeout: Duration) -> bool {
        let mut rx = self.view.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|seen| *seen)).await,
            Ok(Ok(_))
        )
    }

    /// The node's region.
    pub(crate) fn region(&self) -> &str {
        &self.region
    }

    /// This node's id.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// The region's log.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The live leases of the region (this node's included) as last read.
    pub(crate) fn live_nodes(&self) -> Vec<NodeLease> {
        let now = Utc::now();
        self.state()
            .leases
            .iter()
            .filter(|l| l.is_live(now))
            .cloned()
            .collect()
    }

    /// The live lease of `node`, if it holds one.
    pub(crate) fn lease_of(&self, node: &str) -> Option<NodeLease> {
        self.live_lease(node)
    }

    /// The room parts (streams `room:<part>`) this node hosts.
    pub(crate) fn held_parts(&self) -> Vec<String> {
        self.fences
            .held()
            .into_iter()
            .filter_map(|s| s.strip_prefix("room:").map(str::to_string))
            .collect()
    }

    /// Appends an event about this node to its `node:<id>` stream.
    pub(crate) async fn record(&self, event: Event) {
        let stream = node_stream(&self.node);
        let append = self.store.append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(&self.node, event)],
        );
        if let Err(e) = append.await {
            warn!("recording a relay event failed: {e}");
        }
    }

    /// Serialises placement decisions with [`Cluster::place`].
    pub(crate) async fn placing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.placing.lock().await
    }

    /// Places a new part of `room` on this node (called under [`Cluster::placing`]):
    /// its stream `room:<part>` starts with `RoomPartPlaced` and `RoomPlaced`. Returns
    /// false if the stream is no longer empty (another node raced).
    pub(crate) async fn place_part(&self, room: &str, part: &str) -> Result<bool, StoreError> {
        let stream = room_stream(part);
        let state = self.store.load_room(&stream).await?;
        if state.version != 0 {
            return Ok(false);
        }
        let epoch = state.epoch + 1;
        let events = vec![
            NewEvent::new(
                &self.node,
                Event::RoomPartPlaced {
                    room: room.to_string(),
                    part: part.to_string(),
                    node: self.node.clone(),
                },
            ),
            NewEvent::new(
                &self.node,
                Event::RoomPlaced {
                    node: self.node.clone(),
                    epoch,
                },
            ),
        ];
        match self
            .store
            .append(&stream, ExpectedVersion::Exact(0), events)
            .await
        {
            Ok(recorded) => {
                let version = recorded.last().map_or(2, |r| r.sequence);
                let mut state = state;
                state.apply_event(&Event::RoomPlaced {
                    node: self.node.clone(),
                    epoch,
                });
                state.version = version;
                self.host(&stream, version, epoch, state).await;
                Ok(true)
            }
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adopts or claims an existing part stream for this node, as [`Cluster::place`]
    /// does for a room (placed here: adopt; unplaced or on a dead node: claim).
    pub(crate) async fn take_part(&self, part: &str) -> Result<bool, StoreError> {
        let stream = room_stream(part);
        if let Some(Fence::Held { .. }) = self.fences.get(&stream) {
            return Ok(true);
        }
        let state = self.store.load_room(&stream).await?;
        match state.node.clone() {
            Some(n) if n == self.node => {
                let (version, epoch) = (state.version, state.epoch);
                self.host(&stream, version, epoch, state).await;
                Ok(true)
            }
            Some(n) if self.live_lease(&n).is_some() => Ok(false),
            _ => self.claim(&stream, state).await,
        }
    }

    async fn acquire(&self) -> Result<(), StoreError> {
        // Lease times come from the database's clock (clock skew between nodes cannot
        // expire a live node).
        let lease = self
            .store
            .acquire_lease(
                &self.node,
                &self.region,
                &self.url,
                &self.internal_addr,
                self.ttl,
            )
            .await?;
        let (incarnation, expires_at) = (lease.incarnation, lease.expires_at);
        self.store
            .append(
                &node_stream(&self.node),
                ExpectedVersion::Any,
                vec![NewEvent::new(
                    &self.node,
                    Event::NodeLeaseAcquired {
                        node: self.node.clone(),
                        expires_at,
                    },
                )],
            )
            .await?;
        info!(node = %self.node, %incarnation, "lease acquired");
        let mut s = self.state();
        s.incarnation = incarnation;
        s.healthy_since = Some(Instant::now());
        Ok(())
    }

    /// Renews the lease and watches the other nodes' leases until `shutdown`; then
    /// gives the lease up.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            self.tick().await;
        }
        let incarnation = self.state().incarnation.clone();
        if let Err(e) = self.store.release_lease(&self.node, &incarnation).await {
            warn!("could not release the lease: {e}");
        }
    }

    async fn tick(self: &Arc<Self>) {
        let now = Utc::now();
        let (incarnation, draining) = {
            let s = self.state();
            (s.incarnation.clone(), s.draining)
        };
        let leases = match self
            .store
            .renew_lease(&self.node, &incarnation, self.ttl, draining)
            .await
        {
            Ok((true, leases)) => {
                self.state().healthy_since.get_or_insert_with(Instant::now);
                leases
            }
            Ok((false, _)) => {
                warn!(node = %self.node, "lease lost: another node declared it expired; releasing every room");
                self.release_all("fenced").await;
                self.state().healthy_since = None;
                if let Err(e) = self.acquire().await {
                    warn!("could not take a new lease: {e}");
                }
                return;
            }
            Err(e) => {
                warn!("lease renewal failed: {e}");
                self.state().healthy_since = None;
                return;
            }
        };
        let expired: Vec<NodeLease> = leases
            .iter()
            .filter(|l| l.node != self.node && !l.is_live(now))
            .cloned()
            .collect();
        // Only a node that has itself been renewing for a whole lease term declares
        // others dead: after a log outage every node needs one term to renew again.
        self.view.send_replace(true);
        let trusted = {
            let mut s = self.state();
            s.leases = leases;
            s.healthy_since.is_some_and(|t| t.elapsed() >= self.ttl) && !s.draining
        };
        if !trusted {
            return;
        }
        for dead in expired {
            match self.store.expire_lease(&dead.node, &dead.incarnation).await {
                Ok(true) => {
                    warn!(node = %dead.node, "lease expired; taking its rooms over");
                    let event = Event::NodeLeaseExpired {
                        node: dead.node.clone(),
                        expires_at: dead.expires_at,
                    };
                    let stream = node_stream(&dead.node);
                    let append = self.store.append(
                        &stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::new(&self.node, event)],
                    );
                    if let Err(e) = append.await {
                        warn!("recording the expiry failed: {e}");
                    }
                    // In a task of its own: renewing this node's lease must not wait
                    // for many rooms to be replayed.
                    let this = self.clone();
                    tokio::spawn(async move { this.take_over(&dead.node).await });
                }
                Ok(false) => {}
                Err(e) => warn!("expiring {} failed: {e}", dead.node),
            }
        }
    }

    /// Claims every occupied room placed on `dead`.
    async fn take_over(&self, dead: &str) {
        let placements = match self.store.placements().await {
            Ok(p) => p,
            Err(e) => {
                warn!("reading placements failed: {e}");
                return;
            }
        };
        for p in placements.into_iter().filter(|p| p.node == dead) {
            let _guard = self.placing.lock().await;
            let result = async {
                let state = self.store.load_room(&p.stream).await?;
                if state.node.as_deref() != Some(dead) || state.participants.is_empty() {
                    return Ok(false);
                }
                self.claim(&p.stream, state).await
            };
            match result.await {
                Ok(true) => info!(stream = %p.stream, from = dead, "room taken over"),
                Ok(false) => {}
                Err(e) => warn!(stream = %p.stream, "takeover failed: {e}"),
            }
        }
    }

    /// Places `state`'s room on this node (a new epoch) if the stream is still at
    /// `state.version`; on success the media loop restores the room.
    async fn claim(&self, stream: &str, mut state: RoomState) -> Result<bool, StoreError> {
        let epoch = state.epoch + 1;
        let placed = Event::RoomPlaced {
            node: self.node.clone(),
            epoch,
        };
        let result = self
            .store
            .append(
                stream,
                ExpectedVersion::Exact(state.version),
                vec![NewEvent::new(&self.node, placed.clone())],
            )
            .await;
        match result {
            Ok(recorded) => {
                let version = recorded.last().map_or(state.version + 1, |r| r.sequence);
                // The controller decides on the state the log now has.
                state.apply_event(&placed);
                state.version = version;
                self.host(stream, version, epoch, state).await;
                Ok(true)
            }
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn host(&self, stream: &str, version: u64, epoch: u64, state: RoomState) {
        if !state.participants.is_empty() {
            self.metrics.rooms_taken_over.inc();
        }
        let room = stream.strip_prefix("room:").unwrap_or(stream).to_string();
        // The room's state reaches its worker before the fence lets other joins take
        // the fast path in `place`: a join queued ahead of it was decided on an empty
        // state under epoch 0, and its events were refused by the fence (seen in CI).
        let _ = self.commands.send(Command::Restore { room, state }).await;
        self.fences.set(stream, Fence::Held { version, epoch });
    }

    /// Decides where a join for `room` is served, placing the room on this node when
    /// it is unplaced or its node is dead. `resuming` joins (a client coming back from
    /// a node it lost) wait up to one lease term for the hosting node to be declared
    /// dead before they are sent back to it.
    pub(crate) async fn place(&self, room: &str, resuming: bool) -> Result<Placement, PlaceError> {
        let stream = room_stream(room);
        // A room this node already hosts needs no placement: answered without waiting
        // behind other rooms' placements (store reads and appends under the lock), so
        // joins of a live room do not queue behind a flood of joins into new rooms.
        if !self.state().draining && matches!(self.fences.get(&stream), Some(Fence::Held { .. })) {
            return Ok(Placement::Local);
        }
        let mut waited = false;
        for _ in 0..PLACE_ATTEMPTS {
            let guard = self.placing.lock().await;
            if self.state().draining {
                return self.elsewhere().ok_or(PlaceError::Draining);
            }
            if let Some(Fence::Held { .. }) = self.fences.get(&stream) {
                return Ok(Placement::Local);
            }
            let state = self.store.load_room(&stream).await?;
            match state.node.clone() {
                Some(n) if n == self.node => {
                    // Placed here (a handover, or this node restarted): adopt it.
                    let (version, epoch) = (state.version, state.epoch);
                    self.host(&stream, version, epoch, state).await;
                    return Ok(Placement::Local);
                }
                Some(n) => {
                    if let Some(lease) = self.live_lease(&n) {
                        // A node that renewed within the last few periods is alive:
                        // send the client there. A resuming client that finds its room
                        // on a node gone quiet waits (without holding up other joins)
                        // for that node to be declared dead.
                        let quiet = lease.remaining(Utc::now())
                            < chrono::TimeDelta::from_std(self.ttl.saturating_sub(3 * self.period))
                                .unwrap_or_default();
                        if !resuming || waited || !quiet {
                            self.metrics.redirects.inc();
                            return Ok(Placement::Elsewhere(lease.url));
                        }
                        drop(guard);
                        waited = true;
                        if self.wait_for_death(&n).await {
                            self.metrics.redirects.inc();
                            return Ok(Placement::Elsewhere(lease.url));
                        }
                        continue;
                    }
                }
                None => {}
            }
            // A node whose media workers are all overloaded takes no new room while
            // another live node can (with none, the worker refuses the join).
            if !resuming
                && self.commands.overloaded()
                && let Some(elsewhere) = self.elsewhere()
            {
                return Ok(elsewhere);
            }
            if self.claim(&stream, state).await? {
                return Ok(Placement::Local);
            }
        }
        Err(PlaceError::Contended)
    }

    /// Waits up to one lease term (plus two periods) for `node`'s lease to run out;
    /// returns true if it is still live.
    async fn wait_for_death(&self, node: &str) -> bool {
        let deadline = Instant::now() + self.ttl + 2 * self.period;
        while Instant::now() < deadline {
            tokio::time::sleep(self.period / 2).await;
            match self.store.leases().await {
                Ok(leases) => {
                    let now = Utc::now();
                    if !leases.iter().any(|l| l.node == node && l.is_live(now)) {
                        return false;
                    }
                    self.state().leases = leases;
                }
                Err(e) => warn!("reading leases failed: {e}"),
            }
        }
        true
    }

    fn live_lease(&self, node: &str) -> Option<NodeLease> {
        let now = Utc::now();
        self.state()
            .leases
            .iter()
            .find(|l| l.node == node && l.is_live(now))
            .cloned()
    }

    /// Another live, serving node of the region, if any.
    fn elsewhere(&self) -> Option<Placement> {
        self.targets().first().map(|l| {
            self.metrics.redirects.inc();
            Placement::Elsewhere(l.url.clone())
        })
    }

    fn targets(&self) -> Vec<NodeLease> {
        let now = Utc::now();
        self.state()
            .leases
            .iter()
            .filter(|l| l.node != self.node && l.is_live(now) && !l.draining)
            .cloned()
            .collect()
    }

    /// Lets every hosted room go and moves its clients (after a lost lease).
    async fn release_all(&self, reason: &str) {
        for stream in self.fences.held() {
            self.fences.set(&stream, Fence::Released);
            self.metrics.rooms_released.inc();
            let room = stream.strip_prefix("room:").unwrap_or(&stream).to_string();
            let _ = self
                .commands
                .send(Command::RoomLost {
                    room,
                    url: None,
                    reason: reason.to_string(),
                })
                .await;
        }
    }

    /// Stops taking rooms, hands each hosted room to another live node (a placement
    /// event) and tells its clients to move there. Returns once the node has no
    /// participants left or `timeout` passed; true if it emptied in time.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.state().draining = true;
        self.metrics.draining.set(1);
        match self.store.leases().await {
            Ok(leases) => self.state().leases = leases,
            Err(e) => warn!("reading leases failed: {e}"),
        }
        let targets = self.targets();
        let _guard = self.placing.lock().await;
        for (i, stream) in self.fences.held().into_iter().enumerate() {
            let room = stream.strip_prefix("room:").unwrap_or(&stream).to_string();
            let url = match targets.get(i % targets.len().max(1)) {
                Some(target) => {
                    let (reply, done) = oneshot::channel();
                    let handover = Outbound::Handover {
                        stream: stream.clone(),
                        node: target.node.clone(),
                        reply,
                    };
                    let moved = self.outbox.send(handover)
                        && tokio::time::timeout_at(deadline, done)
                            .await
                            .is_ok_and(|r| r.unwrap_or(false));
                    moved.then(|| target.url.clone())
                }
                None => None,
            };
            info!(%room, to = ?url, "draining room");
            self.fences.set(&stream, Fence::Released);
            self.metrics.rooms_released.inc();
            let _ = self
                .commands
                .send(Command::RoomLost {
                    room,
                    url,
                    reason: "drain".into(),
                })
                .await;
        }
        loop {
            let (reply, count) = oneshot::channel();
            if self.commands.send(Command::Count { reply }).await.is_err() {
                return true;
            }
            if count.await.unwrap_or(0) == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn placement_waits_for_the_first_view_of_the_region() {
        let dir = std::env::temp_dir().join(format!(
            "meridian-cluster-view-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = Store::open_embedded(&dir).await.expect("store");
        let (commands, _rx) = crate::workers::Workers::new(1, false);
        let (outbox, _outbox_rx) = crate::mailbox::outbox();
        let cluster = Arc::new(
            Cluster::start(
                ClusterParams {
                    node: "node-a".into(),
                    region: "local".into(),
                    url: "ws://127.0.0.1:1/signal".into(),
                    internal_addr: "127.0.0.1:2".into(),
                    period: Duration::from_millis(100),
                    ttl: Duration::from_millis(500),
                },
                store,
                Fences::default(),
                commands,
                outbox,
                Metrics::default(),
            )
            .await
            .expect("cluster"),
        );
        // Started, lease taken, but the region's leases not read yet.
        assert!(!cluster.wait_for_view(Duration::from_millis(50)).await);
        assert!(cluster.live_nodes().is_empty());
        cluster.tick().await;
        assert!(cluster.wait_for_view(Duration::from_millis(50)).await);
        let me = cluster.lease_of("node-a").expect("its own live lease");
        assert_eq!(me.internal_addr.as_deref(), Some("127.0.0.1:2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
