//! Counting receivers, for saturation benchmarks ([`ClientConfig::count_only`]).
//!
//! Once a subscriber connection has completed ICE and DTLS, its socket is handed to the
//! process's one counting thread ([`register`]), which reads every counting socket in
//! batches (`recvmmsg`, and GRO where the kernel coalesces) and only counts SRTP
//! packets: nothing is decrypted or assembled, and no task is woken per packet, so a
//! receiver costs the load generator far less per packet than forwarding it costs the
//! node. The thread waits for readiness (epoll) and then lets at least [`ROUND`] pass
//! between two reads of the sockets, so each read returns what arrived meanwhile
//! rather than one datagram: a thousand receivers at 150 packets/s each cost one
//! `recvmmsg` per receiver and round, not one wake-up per packet.
//!
//! The RTP header is clear text in SRTP, so the counter still sees each packet's SSRC,
//! sequence number and timestamp: loss is counted from sequence gaps per SSRC (the node
//! rewrites sequence numbers with a constant offset per subscription, so a packet lost
//! anywhere between the publisher and the receiver leaves a gap), and latency from the
//! RTP timestamp of the first packet of each video frame (synthetic sources in the same
//! process stamp their frames with the time since a shared epoch, see `media::epoch`),
//! taken when the round reads it (so up to one [`ROUND`] late). STUN, DTLS and RTCP
//! datagrams go back to the connection's task ([`Counted::recv`]), which stays alive,
//! and so does the first RTP packet of each SSRC: with it str0m knows the stream and
//! sends receiver reports for it, which answer the node's sender reports, so the node
//! measures its round trip to a counting receiver as it does to a real client (and
//! sizes what it keeps for retransmission by it). They report no loss (str0m sees one
//! packet and no gap) and ask for nothing to be resent.
//!
//! [`ClientConfig::count_only`]: crate::ClientConfig::count_only

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::sync::mpsc;
use tracing::warn;

use crate::ClientStats;

/// Datagrams one `recvmmsg` may return.
const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Room for one GRO-coalesced buffer.
const BUF: usize = 64 * 1024;
/// Latency samples kept per receiver.
const MAX_LATENCY_SAMPLES: usize = 200_000;
/// The shortest time between two reads of the counting sockets.
pub(crate) const ROUND: Duration = Duration::from_millis(1);
/// Datagrams that are not RTP held for one connection's task (STUN, DTLS, RTCP: a few
/// per second); more are dropped.
const OTHERS_QUEUE: usize = 256;
/// How often receivers whose connection is gone are let go.
const SWEEP: Duration = Duration::from_millis(100);
const WAKER: Token = Token(usize::MAX);

/// What a counting receiver saw, cumulative (subtract two snapshots for a window).
#[derive(Clone, Debug, Default)]
pub struct CountStats {
    /// SRTP packets counted.
    pub packets: u64,
    /// Their bytes (UDP payload).
    pub bytes: u64,
    /// Packets the sequence numbers say were sent (highest − first + 1 per SSRC, over wraps).
    pub expected: u64,
    /// `recvmmsg` calls that returned datagrams.
    pub batches: u64,
    /// One-way latency of the first packet of each video frame, µs (publisher's frame
    /// time to receipt, both in this process).
    pub latency_us: Vec<u32>,
}

impl CountStats {
    /// The change from `earlier` to `self`.
    pub fn since(&self, earlier: &CountStats) -> CountStats {
        CountStats {
            packets: self.packets - earlier.packets.min(self.packets),
            bytes: self.bytes - earlier.bytes.min(self.bytes),
            expected: self.expected - earlier.expected.min(self.expected),
            batches: self.batches - earlier.batches.min(self.batches),
            latency_us: self
                .latency_us
                .get(earlier.latency_us.len().min(self.latency_us.len())..)
                .unwrap_or_default()
                .to_vec(),
        }
    }
}

#[derive(Debug)]
struct Ssrc {
    highest: u64,
    last_ts: u32,
}

/// Whether a datagram is RTP (not STUN, DTLS or RTCP; RFC 7983 and RFC 5761).
fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}

/// A connection's side of its counting receiver: what the counting thread hands back.
pub(crate) struct Counted {
    others: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    live: Arc<AtomicBool>,
}

impl Counted {
    /// The next datagram that is not RTP, for the connection.
    pub(crate) async fn recv(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.others.recv().await
    }

    /// Whether media was counted since the last call (the path is alive).
    pub(crate) fn media_since_last(&self) -> bool {
        self.live.swap(false, Ordering::Relaxed)
    }
}

/// One socket the counting thread reads.
struct Receiver {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    video_pts: Vec<u8>,
    ssrcs: HashMap<u32, Ssrc>,
    stats: Arc<Mutex<ClientStats>>,
    others: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    live: Arc<AtomicBool>,
}

struct Pool {
    add: std::sync::mpsc::Sender<Receiver>,
    waker: Waker,
}

static POOL: OnceLock<Result<Mutex<Pool>, String>> = OnceLock::new();

/// Hands `socket` (already connected: ICE and DTLS done, and out of the runtime's
/// reach, so that no runtime thread is woken for its datagrams) to the counting thread,
/// which counts its SRTP packets into `stats.counted` until the returned [`Counted`] is
/// dropped. The thread starts with the first receiver.
pub(crate) fn register(
    socket: &std::net::UdpSocket,
    video_pts: Vec<u8>,
    stats: Arc<Mutex<ClientStats>>,
) -> std::io::Result<Counted> {
    socket.set_nonblocking(true)?;
    let socket = std::net::UdpSocket::from(socket.as_fd().try_clone_to_owned()?);
    let state = UdpSocketState::new((&socket).into())?;
    let (tx, rx) = mpsc::channel(OTHERS_QUEUE);
    let live = Arc::new(AtomicBool::new(false));
    let pool = POOL
        .get_or_init(|| start().map(Mutex::new).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))?;
    let pool = pool.lock().expect("count pool lock never poisoned");
    pool.add
        .send(Receiver {
            socket,
            state,
            video_pts,
            ssrcs: HashMap::new(),
            stats,
            others: tx,
            live: live.clone(),
        })
        .map_err(|_| std::io::Error::other("the counting thread stopped"))?;
    pool.waker.wake()?;
    Ok(Counted { others: rx, live })
}

fn start() -> std::io::Result<Pool> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (add, added) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("count".into())
        .spawn(move || run(poll, added))?;
    Ok(Pool { add, waker })
}

/// The counting thread: runs for the life of the process (an idle one waits in epoll).
fn run(mut poll: Poll, added: std::sync::mpsc::Receiver<Receiver>) {
    let mut receivers: HashMap<usize, Receiver> = HashMap::new();
    let mut next_token = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF]).collect();
    let mut meta = vec![RecvMeta::default(); BATCH];
    let mut last_sweep = Instant::now();
    loop {
        let round = Instant::now();
        if let Err(e) = poll.poll(&mut events, Some(SWEEP))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            warn!("counting thread stops: {e}");
            return;
        }
        while let Ok(mut r) = added.try_recv() {
            let token = next_token;
            next_token += 1;
            let fd = r.socket.as_raw_fd();
            match poll
                .registry()
                .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
            {
                Ok(()) => {
                    // Whatever arrived before the registration raised no event.
                    read(&mut r, &mut bufs, &mut meta);
                    receivers.insert(token, r);
                }
                Err(e) => warn!("counting receiver not registered: {e}"),
            }
        }
        for event in events.iter() {
            if let Some(r) = receivers.get_mut(&event.token().0) {
                read(r, &mut bufs, &mut meta);
            }
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            receivers.retain(|_, r| {
                let keep = !r.others.is_closed();
                if !keep {
                    let _ = poll
                        .registry()
                        .deregister(&mut SourceFd(&r.socket.as_raw_fd()));
                }
                keep
            });
        }
        if let Some(rest) = ROUND.checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// Reads `r`'s socket until it is empty (the readiness is edge-triggered).
fn read(r: &mut Receiver, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) {
    let mut counted = false;
    let mut stats = r.stats.lock().expect("stats lock never poisoned");
    let now = epoch_90khz(Instant::now());
    loop {
        let mut iovs: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = match r.state.recv((&r.socket).into(), &mut iovs, meta) {
            Ok(n) => n,
            Err(_) => break, // WouldBlock, or an ICMP error for an earlier send
        };
        drop(iovs);
        if n == 0 {
            break;
        }
        stats.counted.batches += 1;
        for i in 0..n {
            let m = meta[i];
            let stride = m.stride.max(1);
            for d in bufs[i][..m.len].chunks(stride) {
                if is_rtp(d) {
                    counted = true;
                    if count(&mut stats.counted, &mut r.ssrcs, &r.video_pts, d, now) {
                        let _ = r.others.try_send((m.addr, d.to_vec()));
                    }
                } else {
                    let _ = r.others.try_send((m.addr, d.to_vec()));
                }
            }
        }
        if n < meta.len() {
            break; // fewer than asked for: the socket was empty
        }
    }
    if counted {
        // Before the lock is let go: whoever sees the count sees the flag.
        r.live.store(true, Ordering::Relaxed);
    }
}

fn epoch_90khz(now: Instant) -> u32 {
    (now.saturating_duration_since(crate::media::epoch())
        .as_micros() as u64
        * 9
        / 100) as u32
}

/// Counts one RTP packet; returns whether it is the first of its SSRC.
fn count(
    stats: &mut CountStats,
    ssrcs: &mut HashMap<u32, Ssrc>,
    video_pts: &[u8],
    d: &[u8],
    now_90k: u32,
) -> bool {
    stats.packets += 1;
    stats.bytes += d.len() as u64;
    let seq = u16::from_be_bytes([d[2], d[3]]);
    let ts = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
    let video = video_pts.contains(&(d[1] & 0x7f));
    match ssrcs.get_mut(&ssrc) {
        None => {
            ssrcs.insert(
                ssrc,
                Ssrc {
                    highest: u64::from(seq),
                    last_ts: ts,
                },
            );
            stats.expected += 1;
            true
        }
        Some(s) => {
            let delta = seq.wrapping_sub(s.highest as u16) as i16;
            if delta > 0 {
                let ext = s.highest + delta as u64;
                stats.expected += ext - s.highest;
                s.highest = ext;
            }
            if video && ts != s.last_ts && delta > 0 {
                s.last_ts = ts;
                let ticks = now_90k.wrapping_sub(ts) as i32;
                // Ignore what cannot be a latency (a rebased timestamp after a switch).
                if (0..90_000).contains(&ticks) && stats.latency_us.len() < MAX_LATENCY_SAMPLES {
                    stats.latency_us.push(ticks as u32 * 100 / 9);
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16, ts: u32, pt: u8) -> Vec<u8> {
        let mut d = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        d[2..4].copy_from_slice(&seq.to_be_bytes());
        d[4..8].copy_from_slice(&ts.to_be_bytes());
        d.extend_from_slice(&[0; 100]);
        d
    }

    #[test]
    fn gaps_count_as_expected_and_rtcp_is_not_rtp() {
        let mut stats = CountStats::default();
        let mut ssrcs = HashMap::new();
        let first: Vec<bool> = [65534u16, 65535, 2, 3, 1]
            .into_iter()
            .map(|seq| count(&mut stats, &mut ssrcs, &[96], &rtp(seq, 0, 96), 0))
            .collect();
        assert_eq!(first, [true, false, false, false, false], "one SSRC");
        assert_eq!(stats.packets, 5);
        assert_eq!(stats.expected, 6, "65534..=3 across the wrap");
        assert!(!is_rtp(&[0x80, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_rtp(&[0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(is_rtp(&rtp(1, 0, 96)));
    }

    /// Real sockets through the counting thread: RTP is counted with its gap, and only
    /// the first packet of the SSRC also reaches the connection, as does what is not
    /// RTP; a receiver let go counts no more.
    #[tokio::test]
    async fn the_counting_thread_counts_rtp_and_hands_back_the_rest() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let stats = Arc::new(Mutex::new(ClientStats::default()));
        let mut counted = register(&receiver, vec![96], stats.clone()).unwrap();
        for seq in [1u16, 2, 4] {
            sender.send_to(&rtp(seq, 0, 96), to).unwrap();
        }
        let stun = [0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        sender.send_to(&stun, to).unwrap();
        let from = sender.local_addr().unwrap();
        for (what, expected) in [
            ("the SSRC's first packet", rtp(1, 0, 96)),
            ("STUN", stun.to_vec()),
        ] {
            let (f, data) = tokio::time::timeout(Duration::from_secs(5), counted.recv())
                .await
                .unwrap_or_else(|_| panic!("{what} comes back"))
                .expect("the thread holds the sender");
            assert_eq!((f, data), (from, expected), "{what}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.lock().unwrap().counted.packets < 3 && Instant::now() < deadline {
            tokio::time::sleep(ROUND).await;
        }
        let c = stats.lock().unwrap().counted.clone();
        assert_eq!((c.packets, c.expected), (3, 4), "seq 3 is missing");
        assert!(counted.media_since_last());
        assert!(!counted.media_since_last(), "reported once");

        drop(counted);
        tokio::time::sleep(SWEEP * 3).await;
        sender.send_to(&rtp(5, 0, 96), to).unwrap();
        tokio::time::sleep(SWEEP).await;
        assert_eq!(stats.lock().unwrap().counted.packets, 3, "let go");
    }

    #[test]
    fn latency_is_taken_from_the_first_packet_of_a_frame() {
        let mut stats = CountStats::default();
        let mut ssrcs = HashMap::new();
        count(&mut stats, &mut ssrcs, &[96], &rtp(1, 1000, 96), 1090);
        count(&mut stats, &mut ssrcs, &[96], &rtp(2, 2000, 96), 2090);
        count(&mut stats, &mut ssrcs, &[96], &rtp(3, 2000, 96), 2180);
        count(&mut stats, &mut ssrcs, &[96], &rtp(4, 3000, 111), 3090);
        assert_eq!(stats.latency_us, vec![1000]);
    }
}
