//! Media workers (`--media-workers N`): N media loops, each on its own thread with its
//! own room controller, owning a share of the rooms. A room never spans workers.
//!
//! * [`Workers`] is how the rest of the node talks to the media loops: it routes each
//!   [`Command`] to the worker of its room (joins, restores, lost rooms) or of its
//!   participant (messages, detaches, admin hooks); a new room goes to the worker with
//!   the fewest participants among those not overloaded (`crate::overload`; ties: the
//!   highest index, as worker 0 also receives for all). Relay operations and, when
//!   rooms may span nodes (`[media] max_participants`), every room go to worker 0,
//!   which owns the relay socket and the relay links.
//! * [`Handoff`] is the receiving side of the one media port: worker 0 reads the
//!   socket and hands each datagram of another worker over a bounded queue (bounded in
//!   batches and in bytes; what does not fit is dropped and counted). STUN names its
//!   worker in the USERNAME's ufrag ([`meridian_media::stun_worker`]); every other
//!   datagram is steered by its source address, learnt from STUN checks.
//!
//! Every worker sends on its own duplicate of the socket's file descriptor.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_media::ParticipantId;
use tokio::sync::{mpsc, oneshot};

use crate::mailbox::Command;
use crate::metrics::{Metrics, WorkerLabel};

/// Commands queued per worker.
const COMMAND_QUEUE: usize = 4096;
/// Batches of handed-over datagrams queued per worker.
const HANDOFF_BATCHES: usize = 1024;
/// Bytes of handed-over datagrams queued per worker.
pub(crate) const HANDOFF_BYTES: usize = 8 << 20;
/// Source addresses remembered for steering.
const MAX_ADDRESSES: usize = 1 << 16;
/// How long a STUN check keeps its source address steered to its worker against
/// checks naming another worker (clients check every few seconds; like the core's
/// `ADDRESS_HELD_FOR`).
const ADDRESS_HELD_FOR: Duration = Duration::from_secs(15);

/// The media loops are gone (the node is stopping).
#[derive(Debug)]
pub(crate) struct Stopped;

/// Where a room lives, and how many routed commands that create it are in flight.
struct Route {
    worker: usize,
    pending: usize,
}

#[derive(Default)]
struct Routes {
    rooms: HashMap<String, Route>,
    participants: HashMap<ParticipantId, usize>,
}

struct Inner {
    senders: Vec<mpsc::Sender<Command>>,
    routes: Mutex<Routes>,
    /// Participants per worker, as each last reported (plus rooms placed since).
    load: Vec<AtomicUsize>,
    /// Whether each worker was overloaded when it last reported.
    overloaded: Vec<AtomicBool>,
    /// When the node (see [`Workers::overloaded`]) was last seen overloaded.
    overloaded_at: Mutex<Option<Instant>>,
    /// Every room on worker 0 (rooms may span nodes: relay links live there).
    pinned: bool,
}

/// The node's handle on its media workers (cheap to clone).
#[derive(Clone)]
pub(crate) struct Workers {
    inner: Arc<Inner>,
}

/// What one worker needs of the routing: it reports which rooms and participants it
/// took and its load.
#[derive(Clone)]
pub(crate) struct WorkerRoutes {
    inner: Arc<Inner>,
    /// This worker's index.
    pub index: usize,
}

impl Workers {
    /// `n` workers' command queues; `pinned`: every room on worker 0.
    pub(crate) fn new(n: usize, pinned: bool) -> (Workers, Vec<mpsc::Receiver<Command>>) {
        let (senders, receivers) = (0..n.max(1)).map(|_| mpsc::channel(COMMAND_QUEUE)).unzip();
        let inner = Arc::new(Inner {
            senders,
            routes: Mutex::default(),
            load: (0..n.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            overloaded: (0..n.max(1)).map(|_| AtomicBool::new(false)).collect(),
            overloaded_at: Mutex::new(None),
            pinned,
        });
        (Workers { inner }, receivers)
    }

    /// How many workers there are.
    pub(crate) fn count(&self) -> usize {
        self.inner.senders.len()
    }

    /// Whether every worker that can take a new room is overloaded (`crate::overload`;
    /// worker 0 alone when rooms are pinned there): the node takes no fresh joins and
    /// reports not ready.
    pub(crate) fn overloaded(&self) -> bool {
        self.inner.overloaded()
    }

    /// Whether the node is overloaded or was within `hold`: readiness stays off for a
    /// while, so a node going in and out of overload is not put back behind its load
    /// balancer every few seconds.
    pub(crate) fn recently_overloaded(&self, hold: Duration) -> bool {
        self.overloaded()
            || self
                .inner
                .overloaded_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < hold)
    }

    /// The routing handle of worker `index`.
    pub(crate) fn routes(&self, index: usize) -> WorkerRoutes {
        WorkerRoutes {
            inner: self.inner.clone(),
            index,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker of `room`, placing it on the least loaded one if it has none; the
    /// command about to be sent counts as pending until the worker handled it.
    fn place(&self, room: &str) -> usize {
        let mut routes = self.lock();
        if let Some(r) = routes.rooms.get_mut(room) {
            r.pending += 1;
            return r.worker;
        }
        let worker = if self.inner.pinned {
            0
        } else {
            // Ties go to the highest index: worker 0 also reads for everyone.
            (0..self.count())
                .rev()
                .min_by_key(|w| {
                    (
                        self.inner.overloaded[*w].load(Ordering::Relaxed),
                        self.inner.load[*w].load(Ordering::Relaxed),
                    )
                })
                .unwrap_or(0)
        };
        self.inner.load[worker].fetch_add(1, Ordering::Relaxed);
        routes
            .rooms
            .insert(room.to_string(), Route { worker, pending: 1 });
        worker
    }

    fn of_room(&self, room: &str) -> usize {
        self.lock().rooms.get(room).map_or(0, |r| r.worker)
    }

    fn of_participant(&self, participant: ParticipantId) -> usize {
        self.lock()
            .participants
            .get(&participant)
            .copied()
            .unwrap_or(0)
    }

    /// Sends `cmd` to the worker it concerns (waiting while that worker's queue is
    /// full). `Count` is asked of every worker and answered with the sum; `Shutdown`
    /// goes to every worker.
    pub(crate) async fn send(&self, cmd: Command) -> Result<(), Stopped> {
        let cmd = match cmd {
            Command::Shutdown => {
                for s in &self.inner.senders {
                    let _ = s.send(Command::Shutdown).await;
                }
                return Ok(());
            }
            Command::Count { reply } => return self.count_sessions(reply).await,
            Command::Stall { worker, reply, .. } if worker >= self.count() => {
                let _ = reply.send(false);
                return Ok(());
            }
            cmd => cmd,
        };
        let worker = match &cmd {
            Command::Join { request, .. } => self.place(&request.room),
            Command::Restore { room, .. } => self.place(room),
            Command::RoomLost { room, .. } => self.of_room(room),
            Command::Message { participant, .. }
            | Command::CloseSignaling { participant, .. }
            | Command::Remove { participant, .. }
            | Command::Refresh { participant, .. }
            | Command::Detach { participant, .. }
            | Command::CutMedia { participant, .. } => self.of_participant(*participant),
            Command::Stall { worker, .. } => *worker,
            Command::Relay { .. } | Command::Shutdown | Command::Count { .. } => 0,
        };
        self.inner.senders[worker]
            .send(cmd)
            .await
            .map_err(|_| Stopped)
    }

    async fn count_sessions(&self, reply: oneshot::Sender<usize>) -> Result<(), Stopped> {
        let mut answers = Vec::with_capacity(self.count());
        for s in &self.inner.senders {
            let (tx, rx) = oneshot::channel();
            s.send(Command::Count { reply: tx })
                .await
                .map_err(|_| Stopped)?;
            answers.push(rx);
        }
        tokio::spawn(async move {
            let mut total = 0;
            for a in answers {
                total += a.await.unwrap_or(0);
            }
            let _ = reply.send(total);
        });
        Ok(())
    }
}

impl WorkerRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A routed join or restore for `room` was handled; `participant`: the session it
    /// created, whose later commands now come here.
    pub(crate) fn handled(&self, room: &str, participant: Option<ParticipantId>) {
        let mut routes = self.lock();
        if let Some(r) = routes.rooms.get_mut(room) {
            r.pending = r.pending.saturating_sub(1);
        }
        if let Some(p) = participant {
            routes.participants.insert(p, self.index);
        }
    }

    /// Reports whether this worker is overloaded (`crate::overload`).
    pub(crate) fn set_overloaded(&self, overloaded: bool) {
        // Under the lock, so that two workers changing at once both see the node's
        // state before and after their own change, and the time is not missed.
        let mut at = self
            .inner
            .overloaded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = self.inner.overloaded();
        self.inner.overloaded[self.index].store(overloaded, Ordering::Relaxed);
        if before || self.inner.overloaded() {
            *at = Some(Instant::now());
        }
    }

    /// Reports this worker's participants and forgets its rooms and participants that
    /// `hosts`/`holds` no longer know (a room with a routed join in flight is kept, so
    /// a room is never placed on two workers).
    pub(crate) fn refresh(
        &self,
        participants: usize,
        hosts: impl Fn(&str) -> bool,
        holds: impl Fn(ParticipantId) -> bool,
    ) {
        self.inner.load[self.index].store(participants, Ordering::Relaxed);
        let mut routes = self.lock();
        let me = self.index;
        routes
            .rooms
            .retain(|room, r| r.worker != me || r.pending > 0 || hosts(room));
        routes.participants.retain(|p, w| *w != me || holds(*p));
    }
}

impl Inner {
    fn overloaded(&self) -> bool {
        let flags = &self.overloaded;
        let open = if self.pinned { &flags[..1] } else { &flags[..] };
        open.iter().all(|o| o.load(Ordering::Relaxed))
    }
}

/// Datagrams handed from the receiving worker to another: (source, contents).
pub(crate) type Batch = Vec<(SocketAddr, Vec<u8>)>;

/// A worker's queue of handed-over datagrams.
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Batch>,
    bytes: Arc<AtomicUsize>,
}

impl Inbox {
    /// The next batch; `None` once the receiving worker is gone.
    pub(crate) async fn recv(&mut self) -> Option<Batch> {
        let batch = self.rx.recv().await?;
        let len: usize = batch.iter().map(|(_, d)| d.len()).sum();
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        Some(batch)
    }
}

struct Outlet {
    tx: mpsc::Sender<Batch>,
    bytes: Arc<AtomicUsize>,
    batch: Batch,
    batch_bytes: usize,
}

/// The receiving worker's side of the handoff: steering and the other workers'
/// queues.
pub(crate) struct Handoff {
    /// Source address → (worker, last STUN check naming that worker).
    addresses: HashMap<SocketAddr, (usize, Instant)>,
    /// Index = worker; `None` for the receiving worker itself.
    outlets: Vec<Option<Outlet>>,
    metrics: Metrics,
}

impl Handoff {
    /// The handoff of `n` workers, received by worker 0, and the other workers'
    /// inboxes (index 0 is `None`).
    pub(crate) fn new(n: usize, metrics: Metrics) -> (Handoff, Vec<Option<Inbox>>) {
        let mut outlets = vec![None];
        let mut inboxes = vec![None];
        for _ in 1..n.max(1) {
            let (tx, rx) = mpsc::channel(HANDOFF_BATCHES);
            let bytes = Arc::new(AtomicUsize::new(0));
            outlets.push(Some(Outlet {
                tx,
                bytes: bytes.clone(),
                batch: Vec::new(),
                batch_bytes: 0,
            }));
            inboxes.push(Some(Inbox { rx, bytes }));
        }
        (
            Handoff {
                addresses: HashMap::new(),
                outlets,
                metrics,
            },
            inboxes,
        )
    }

    /// Whether there are other workers to hand datagrams to.
    pub(crate) fn active(&self) -> bool {
        self.outlets.len() > 1
    }

    /// The worker `datagram` from `source` is for. A STUN check names its worker and
    /// steers its source address there, unless another worker's check held the address
    /// within [`ADDRESS_HELD_FOR`] (a replayed check cannot move a client's media).
    pub(crate) fn steer(&mut self, now: Instant, source: SocketAddr, datagram: &[u8]) -> usize {
        let Some(named) = meridian_media::stun_worker(datagram) else {
            return self.addresses.get(&source).map_or(0, |(w, _)| *w);
        };
        let worker = if usize::from(named) < self.outlets.len() {
            usize::from(named)
        } else {
            0
        };
        let held = self
            .addresses
            .get(&source)
            .is_some_and(|(w, at)| *w != worker && now.duration_since(*at) < ADDRESS_HELD_FOR);
        if !held {
            if self.addresses.len() >= MAX_ADDRESSES && !self.addresses.contains_key(&source) {
                self.addresses
                    .retain(|_, (_, at)| now.duration_since(*at) < 2 * ADDRESS_HELD_FOR);
            }
            if self.addresses.len() < MAX_ADDRESSES || self.addresses.contains_key(&source) {
                self.addresses.insert(source, (worker, now));
            }
        }
        worker
    }

    /// Queues `datagram` for `worker` (sent by [`Handoff::flush`]); dropped and
    /// counted when that worker's queue holds [`HANDOFF_BYTES`].
    pub(crate) fn push(&mut self, worker: usize, source: SocketAddr, datagram: &[u8]) {
        let Some(Some(out)) = self.outlets.get_mut(worker) else {
            return;
        };
        let queued = out.bytes.load(Ordering::Acquire);
        if queued + out.batch_bytes + datagram.len() > HANDOFF_BYTES {
            self.dropped(worker, 1);
            return;
        }
        out.batch_bytes += datagram.len();
        out.batch.push((source, datagram.to_vec()));
    }

    /// Hands every worker its queued datagrams without waiting.
    pub(crate) fn flush(&mut self) {
        let mut drops = Vec::new();
        for (w, out) in self.outlets.iter_mut().enumerate() {
            let Some(out) = out else { continue };
            if out.batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut out.batch);
            let len = std::mem::take(&mut out.batch_bytes);
            let n = batch.len();
            out.bytes.fetch_add(len, Ordering::AcqRel);
            if out.tx.try_send(batch).is_err() {
                out.bytes.fetch_sub(len, Ordering::AcqRel);
                drops.push((w, n));
            }
        }
        for (w, n) in drops {
            self.dropped(w, n);
        }
    }

    fn dropped(&self, worker: usize, n: usize) {
        self.metrics
            .workers
            .handoff_dropped
            .get_or_create(&WorkerLabel {
                worker: worker.to_string(),
            })
            .inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_check(local_ufrag: &str) -> Vec<u8> {
        // A binding request with USERNAME, PRIORITY and a dummy MESSAGE-INTEGRITY: enough to
        // parse; steering does not check the integrity (the worker's core does).
        let username = format!("{local_ufrag}:remote");
        let mut attr = Vec::new();
        attr.extend_from_slice(&0x0006u16.to_be_bytes());
        attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attr.extend_from_slice(username.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        attr.extend_from_slice(&0x0024u16.to_be_bytes());
        attr.extend_from_slice(&4u16.to_be_bytes());
        attr.extend_from_slice(&1u32.to_be_bytes());
        attr.extend_from_slice(&0x0008u16.to_be_bytes());
        attr.extend_from_slice(&20u16.to_be_bytes());
        attr.extend_from_slice(&[0u8; 20]);
        let mut msg = Vec::new();
        msg.extend_from_slice(&0x0001u16.to_be_bytes());
        msg.extend_from_slice(&(attr.len() as u16).to_be_bytes());
        msg.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        msg.extend_from_slice(&[7u8; 12]);
        msg.extend_from_slice(&attr);
        msg
    }

    #[test]
    fn stun_steers_its_address_and_a_replay_cannot_move_it() {
        let (mut h, _inboxes) = Handoff::new(3, Metrics::default());
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let t0 = Instant::now();
        let rtp = [0x80u8, 96, 0, 1];
        assert_eq!(h.steer(t0, a, &rtp), 0, "unknown address: the receiver");
        let check = stun_check(&format!("{}abcd", meridian_media::worker_ufrag_prefix(2)));
        assert_eq!(meridian_media::stun_worker(&check), Some(2));
        assert_eq!(h.steer(t0, a, &check), 2);
        assert_eq!(h.steer(t0, a, &rtp), 2, "media follows the check");
        let other = stun_check(&format!("{}wxyz", meridian_media::worker_ufrag_prefix(1)));
        assert_eq!(h.steer(t0 + Duration::from_secs(1), a, &other), 1);
        assert_eq!(h.steer(t0, a, &rtp), 2, "a held address does not move");
        let later = t0 + ADDRESS_HELD_FOR + Duration::from_secs(1);
        assert_eq!(h.steer(later, a, &other), 1);
        assert_eq!(
            h.steer(later, a, &rtp),
            1,
            "an address not checked for long moves"
        );
        let beyond = stun_check(&format!("{}abcd", meridian_media::worker_ufrag_prefix(9)));
        assert_eq!(
            h.steer(later, a, &beyond),
            0,
            "no such worker: the receiver"
        );
    }

    #[tokio::test]
    async fn a_full_inbox_drops_and_counts() {
        let metrics = Metrics::default();
        let (mut h, mut inboxes) = Handoff::new(2, metrics.clone());
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let big = vec![0u8; 1 << 20];
        for _ in 0..(HANDOFF_BYTES >> 20) + 3 {
            h.push(1, a, &big);
            h.flush();
        }
        let label = WorkerLabel { worker: "1".into() };
        assert_eq!(
            metrics.workers.handoff_dropped.get_or_create(&label).get(),
            3
        );
        let mut inbox = inboxes[1].take().unwrap();
        let first = inbox.recv().await.unwrap();
        assert_eq!(first.len(), 1);
        h.push(1, a, &big);
        h.flush();
        assert_eq!(
            metrics.workers.handoff_dropped.get_or_create(&label).get(),
            3,
            "room again once the worker took a batch"
        );
    }

    #[test]
    fn new_rooms_avoid_overloaded_workers_and_the_node_is_overloaded_when_all_are() {
        let (workers, _rx) = Workers::new(3, false);
        workers.routes(1).set_overloaded(true);
        workers.routes(2).set_overloaded(true);
        // Worker 0 is the only one not overloaded, though it also receives for all.
        assert_eq!(workers.place("a"), 0);
        assert_eq!(
            workers.place("b"),
            0,
            "fewer participants elsewhere do not count"
        );
        assert!(!workers.overloaded());
        workers.routes(0).set_overloaded(true);
        assert!(workers.overloaded());
        workers.routes(2).set_overloaded(false);
        assert_eq!(workers.place("c"), 2);
        assert!(!workers.overloaded());
        assert!(
            workers.recently_overloaded(Duration::from_secs(60)),
            "readiness holds off a while"
        );
        assert!(!workers.recently_overloaded(Duration::ZERO));
        // Pinned rooms (rooms across nodes): only worker 0 counts.
        let (pinned, _rx) = Workers::new(2, true);
        pinned.routes(1).set_overloaded(true);
        assert!(!pinned.overloaded());
        pinned.routes(0).set_overloaded(true);
        assert!(pinned.overloaded());
    }
}
