//! Counting receiver, for saturation benchmarks ([`ClientConfig::count_only`]).
//!
//! Once the subscriber connection has completed ICE and DTLS, its socket is read in
//! batches (`recvmmsg`, and GRO where the kernel coalesces) and SRTP packets are only
//! counted: nothing is decrypted or assembled, so a receiver costs the load generator
//! far less per packet than forwarding it costs the node. The RTP header is clear text
//! in SRTP, so the receiver still sees each packet's SSRC, sequence number and
//! timestamp: loss is counted from sequence gaps per SSRC (the node rewrites sequence
//! numbers with a constant offset per subscription, so a packet lost anywhere between
//! the publisher and the receiver leaves a gap), and latency from the RTP timestamp of
//! the first packet of each video frame (synthetic sources in the same process stamp
//! their frames with the time since a shared epoch, see `media::epoch`). STUN, DTLS and
//! RTCP datagrams still go to the connection, which stays alive.
//!
//! [`ClientConfig::count_only`]: crate::ClientConfig::count_only

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::Instant;

use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams one `recvmmsg` may return.
const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Room for one GRO-coalesced buffer.
const BUF: usize = 64 * 1024;
/// Latency samples kept per receiver.
const MAX_LATENCY_SAMPLES: usize = 200_000;

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

pub(crate) struct Counter {
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    video_pts: Vec<u8>,
    ssrcs: HashMap<u32, Ssrc>,
    stats: CountStats,
}

impl Counter {
    pub(crate) fn new(socket: &UdpSocket, video_pts: Vec<u8>) -> std::io::Result<Counter> {
        Ok(Counter {
            state: UdpSocketState::new(socket.into())?,
            bufs: (0..BATCH).map(|_| vec![0u8; BUF]).collect(),
            meta: vec![RecvMeta::default(); BATCH],
            video_pts,
            ssrcs: HashMap::new(),
            stats: CountStats::default(),
        })
    }

    pub(crate) fn stats(&self) -> &CountStats {
        &self.stats
    }

    /// Reads until the socket is empty; returns the datagrams that are not RTP, for
    /// the connection.
    pub(crate) fn drain(&mut self, socket: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut others = Vec::new();
        loop {
            let mut iovs: Vec<IoSliceMut<'_>> =
                self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let state = &self.state;
            let meta = &mut self.meta;
            let n = match socket.try_io(Interest::READABLE, || {
                state.recv(socket.into(), &mut iovs, meta)
            }) {
                Ok(n) => n,
                Err(_) => break,
            };
            drop(iovs);
            if n == 0 {
                break;
            }
            self.stats.batches += 1;
            let now = epoch_90khz(Instant::now());
            for i in 0..n {
                let m = self.meta[i];
                let stride = m.stride.max(1);
                let buf = &self.bufs[i][..m.len];
                for d in buf.chunks(stride) {
                    if is_rtp(d) {
                        count(&mut self.stats, &mut self.ssrcs, &self.video_pts, d, now);
                    } else {
                        others.push((m.addr, d.to_vec()));
                    }
                }
            }
        }
        others
    }
}

fn epoch_90khz(now: Instant) -> u32 {
    (now.saturating_duration_since(crate::media::epoch())
        .as_micros() as u64
        * 9
        / 100) as u32
}

fn count(
    stats: &mut CountStats,
    ssrcs: &mut HashMap<u32, Ssrc>,
    video_pts: &[u8],
    d: &[u8],
    now_90k: u32,
) {
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
        for seq in [65534u16, 65535, 2, 3, 1] {
            count(&mut stats, &mut ssrcs, &[96], &rtp(seq, 0, 96), 0);
        }
        assert_eq!(stats.packets, 5);
        assert_eq!(stats.expected, 6, "65534..=3 across the wrap");
        assert!(!is_rtp(&[0x80, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_rtp(&[0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(is_rtp(&rtp(1, 0, 96)));
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
