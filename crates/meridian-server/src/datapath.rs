//! A media worker's datagram path: its descriptor of the media socket, the chaos
//! impairment between socket and controller (dev mode), and the datagrams the kernel
//! had no room for yet. The media loop (`crate::media_loop`) decides when to read and
//! flush; this module moves datagrams between the socket and the [`Controller`].

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::Instant;

use meridian_media::Transmit;
use meridian_room::Controller;
use tracing::{debug, warn};

use crate::impair::Impairer;
use crate::mailbox::SessionSink;
use crate::metrics::Metrics;
use crate::udp::MediaSocket;
use crate::workers::{Batch, Handoff};

/// Datagrams handled per wake-up before timers and commands get a turn.
const RECV_BATCH: usize = 256;
/// Rounds of already-due timeouts after each datagram: one releases the copies it
/// made (one per connection); the media loop takes the rest of a burst before it sends.
const DUE_ROUNDS_PER_DATAGRAM: usize = 1;

/// The socket side of one media worker.
pub(crate) struct DataPath {
    socket: MediaSocket,
    /// Chaos-test emulators between the socket and the controller (dev mode only).
    impair: Impairer,
    /// Datagrams not yet handed to the kernel (the socket's send buffer was full).
    outgoing: VecDeque<Transmit>,
}

impl DataPath {
    pub(crate) fn new(socket: MediaSocket) -> DataPath {
        DataPath {
            socket,
            impair: Impairer::default(),
            outgoing: VecDeque::new(),
        }
    }

    /// Passes the socket's datagrams through `impair` (`--impair`, dev mode).
    pub(crate) fn set_impairment(&mut self, impair: Impairer) {
        self.impair = impair;
    }

    /// When the impairment next releases a datagram.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.impair.poll_timeout()
    }

    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads datagrams in `recvmmsg` batches (up to [`RECV_BATCH`] per wake-up), hands
    /// other workers theirs and each of worker `me`'s own to the controller; the copies
    /// one datagram fans out to leave in one `sendmmsg` before the next datagram is
    /// handled (a packet waits for no other).
    pub(crate) fn receive_batch(
        &mut self,
        controller: &mut Controller<SessionSink>,
        metrics: &Metrics,
        mut handoff: Option<&mut Handoff>,
        me: usize,
    ) {
        let mut handled = 0;
        while handled < RECV_BATCH {
            match self.socket.try_recv_batch() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors for earlier sends surface here on Linux: ignore.
                Err(e) => {
                    debug!("media recv: {e}");
                    continue;
                }
            }
            let now = Instant::now();
            let Self {
                socket,
                impair,
                outgoing,
            } = self;
            for (source, datagram) in socket.received() {
                handled += 1;
                if let Some(h) = handoff.as_deref_mut().filter(|h| h.active()) {
                    let worker = h.steer(now, source, datagram);
                    if worker != me {
                        h.push(worker, source, datagram);
                        continue;
                    }
                }
                handle(
                    socket, controller, impair, outgoing, metrics, source, datagram,
                );
            }
            if let Some(h) = handoff.as_deref_mut() {
                h.flush();
            }
        }
    }

    /// Handles datagrams the receiving worker handed over.
    pub(crate) fn receive_handed(
        &mut self,
        controller: &mut Controller<SessionSink>,
        metrics: &Metrics,
        batch: Batch,
    ) {
        for (source, datagram) in &batch {
            handle(
                &self.socket,
                controller,
                &mut self.impair,
                &mut self.outgoing,
                metrics,
                *source,
                datagram,
            );
        }
    }

    /// Hands the impairment's due datagrams on: received ones to the controller, sent
    /// ones to the socket's queue.
    pub(crate) fn release_impaired(
        &mut self,
        controller: &mut Controller<SessionSink>,
        now: Instant,
    ) {
        while let Some((source, datagram)) = self.impair.poll_receive(now) {
            controller.handle_datagram(now, source, &datagram);
            controller.handle_due(DUE_ROUNDS_PER_DATAGRAM, || now);
        }
        while let Some(t) = self.impair.poll_send(now) {
            self.outgoing.push_back(t);
        }
    }

    /// Sends everything the controller has queued, waiting for room in the socket's
    /// buffer when it is full.
    pub(crate) async fn send_all(&mut self, controller: &mut Controller<SessionSink>) {
        while !send_ready(
            &self.socket,
            controller,
            &mut self.impair,
            &mut self.outgoing,
        ) {
            if let Err(e) = self.socket.writable().await {
                warn!("media socket failed: {e}");
                break;
            }
        }
    }
}

/// Hands one received datagram to the controller (or the ingress impairment) and sends
/// the copies it produced.
fn handle(
    socket: &MediaSocket,
    controller: &mut Controller<SessionSink>,
    impair: &mut Impairer,
    outgoing: &mut VecDeque<Transmit>,
    metrics: &Metrics,
    source: SocketAddr,
    datagram: &[u8],
) {
    let now = Instant::now();
    if impair.ingress() {
        impair.receive(now, source, datagram);
        return;
    }
    let forwarded = controller.sfu_stats().rtp_packets_forwarded;
    controller.handle_datagram(now, source, datagram);
    // The copies of a forwarded packet come out of the timeout that follows, not out of
    // `handle_datagram`: str0m's pacer picks the queue to send from only when a timeout
    // is handled, and every written stream asks for one at once. So the timeout goes
    // before the send, and the copies leave now (not with the next datagram's send).
    controller.handle_due(DUE_ROUNDS_PER_DATAGRAM, || now);
    send_ready(socket, controller, impair, outgoing);
    if controller.sfu_stats().rtp_packets_forwarded > forwarded {
        metrics.forward_latency.observe(now.elapsed().as_secs_f64());
    }
}

/// Moves the controller's datagrams to `outgoing` and sends them with `sendmmsg`
/// (through the egress impairment, if any) without waiting. Returns whether everything
/// left (false: the send buffer is full).
fn send_ready(
    socket: &MediaSocket,
    controller: &mut Controller<SessionSink>,
    impair: &mut Impairer,
    outgoing: &mut VecDeque<Transmit>,
) -> bool {
    let now = Instant::now();
    while let Some(t) = controller.poll_transmit() {
        impair.send(now, t, outgoing);
    }
    while !outgoing.is_empty() {
        match socket.try_send_batch(outgoing.make_contiguous()) {
            Ok(n) => drop(outgoing.drain(..n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) => {
                debug!("media send: {e}");
                outgoing.pop_front();
            }
        }
    }
    true
}
