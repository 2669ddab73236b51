//! Proactive retransmission: every retransmission to a lossy subscriber goes out twice.
//!
//! str0m answers a subscriber's NACK from the stream's RTX cache within the
//! `handle_input` that receives it (it runs its timeout after every receive), so the
//! first retransmission already leaves in the wake-up the NACK arrives in (checked in
//! `tests/retx.rs`). What it cannot do is guard that retransmission: on a path that
//! loses a share p of its packets, the retransmission is lost with p too, and the
//! receiver asks again only a round trip (+ 5 ms) later. For a subscriber whose
//! measured loss reaches [`crate::SfuConfig::rtx_copy_loss`], the node sends each
//! retransmission a second time, [`COPY_DELAY`] after the first so a short burst
//! does not take both: a repair then fails with p² instead of p, for about p more
//! bytes (retransmissions are about p of the traffic, and str0m stops them above 15 %).
//!
//! str0m 0.25 tells its user neither which packets a NACK names (SRTCP is decrypted
//! inside it, there is no NACK event) nor which datagrams are retransmissions, so the
//! node recognises them on the wire: after an RTCP datagram from the subscriber that
//! may carry a NACK (its first packet, in clear in SRTCP, is a generic NACK, or a
//! report that may head a compound one), the datagrams str0m sends on one of the
//! subscriber's RTX SSRCs (in clear in SRTP) within [`WINDOW`] are copied, at most
//! [`MAX_COPIES`] of them. Padding str0m sends on the RTX SSRC in that window (BWE
//! probes) may be copied too; blank padding (P bit set) never is. A copy is the same
//! SRTP datagram: a receiver that got the first drops it as a replay.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::{ParticipantId, Sfu, Transmit};

/// How long after a possible NACK retransmissions are looked for. str0m releases
/// one packet per timeout, and a NACK's retransmissions follow each other within
/// the same wake-up (`Controller::handle_due` in the media loop's `flush`).
pub(crate) const WINDOW: Duration = Duration::from_millis(20);
/// Most datagrams copied per possible NACK (one NACK entry names up to 17 packets).
pub(crate) const MAX_COPIES: u8 = 17;
/// Delay of the copy after the first send.
pub(crate) const COPY_DELAY: Duration = Duration::from_millis(5);
/// Most copies waiting for their send time, node-wide; further ones are dropped.
pub(crate) const MAX_PENDING_COPIES: usize = 4096;

/// Copies armed on a subscriber connection by an RTCP datagram that may carry a NACK.
#[derive(Debug)]
pub(crate) struct CopyWindow {
    until: Instant,
    left: u8,
    /// The connection's RTX SSRCs when the window opened.
    ssrcs: Vec<u32>,
}

impl CopyWindow {
    /// Whether `datagram`, sent at `now`, is a retransmission to copy (and counts it).
    pub(crate) fn take(&mut self, now: Instant, datagram: &[u8]) -> bool {
        if now > self.until || self.left == 0 {
            return false;
        }
        let Some(ssrc) = rtp_ssrc(datagram) else {
            return false;
        };
        // Blank padding (P bit) is never a retransmission.
        if datagram[0] & 0x20 != 0 || !self.ssrcs.contains(&ssrc) {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// The SSRC of an RTP datagram (RFC 5761 / 7983 rules), `None` for anything else.
pub(crate) fn rtp_ssrc(d: &[u8]) -> Option<u32> {
    if d.len() < 12 || !(128..192).contains(&d[0]) || (64..96).contains(&(d[1] & 0x7f)) {
        return None;
    }
    Some(u32::from_be_bytes([d[8], d[9], d[10], d[11]]))
}

/// Whether an (S)RTCP datagram may carry a NACK: its first packet is a generic NACK
/// (RTPFB, FMT 1) or a sender/receiver report or SDES, which head compound packets.
/// A datagram starting with transport-wide feedback, PLI or REMB does not: str0m puts
/// NACKs before those, and a reduced-size NACK travels alone.
pub(crate) fn may_carry_nack(d: &[u8]) -> bool {
    if d.len() < 8 || !(128..192).contains(&d[0]) {
        return false;
    }
    match d[1] {
        200..=202 => true,
        205 => d[0] & 0x1f == 1,
        _ => false,
    }
}

impl Sfu {
    /// An RTCP datagram from subscriber `id` arrived at `now`: if it may carry a NACK
    /// and the subscriber's path is lossy enough, its retransmissions are copied.
    pub(crate) fn arm_rtx_copies(&mut self, now: Instant, id: ParticipantId, datagram: &[u8]) {
        let threshold = self.config.rtx_copy_loss;
        if threshold <= 0.0 || !may_carry_nack(datagram) {
            return;
        }
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let loss = p
            .subscriptions
            .values()
            .map(|s| s.path_loss)
            .fold(0.0f32, f32::max);
        if loss < threshold {
            return;
        }
        let ssrcs = p
            .subscriptions
            .values()
            .filter_map(|s| s.out_rtx.map(|r| *r))
            .collect();
        p.subscriber.rtx_copy = Some(CopyWindow {
            until: now + WINDOW,
            left: MAX_COPIES,
            ssrcs,
        });
    }

    /// Sends the copies that are due.
    pub(crate) fn release_copies(&mut self, now: Instant) {
        while self
            .pending_copies
            .front()
            .is_some_and(|(at, _)| *at <= now)
        {
            if let Some((_, t)) = self.pending_copies.pop_front() {
                self.transmits.push_back(t);
            }
        }
    }
}

/// Queues a copy of `t` for `now + COPY_DELAY` (dropped when too many wait).
pub(crate) fn queue_copy(
    pending: &mut VecDeque<(Instant, Transmit)>,
    now: Instant,
    t: &Transmit,
) -> bool {
    if pending.len() >= MAX_PENDING_COPIES {
        return false;
    }
    pending.push_back((
        now + COPY_DELAY,
        Transmit {
            destination: t.destination,
            contents: t.contents.clone(),
        },
    ));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(ssrc: u32, padding: bool) -> Vec<u8> {
        let mut d = vec![if padding { 0xa0 } else { 0x80 }, 97, 0, 1, 0, 0, 0, 0];
        d.extend_from_slice(&ssrc.to_be_bytes());
        d.extend_from_slice(&[0; 20]);
        d
    }

    #[test]
    fn nack_bearing_rtcp_is_told_from_other_feedback() {
        assert!(
            may_carry_nack(&[0x81, 205, 0, 3, 1, 2, 3, 4]),
            "generic NACK"
        );
        assert!(
            may_carry_nack(&[0x81, 201, 0, 7, 1, 2, 3, 4]),
            "RR heads a compound"
        );
        assert!(!may_carry_nack(&[0x8f, 205, 0, 5, 1, 2, 3, 4]), "TWCC");
        assert!(!may_carry_nack(&[0x81, 206, 0, 2, 1, 2, 3, 4]), "PLI");
        assert!(!may_carry_nack(&rtp(1, false)), "RTP");
        assert!(!may_carry_nack(&[0x81, 205]), "truncated");
        assert!(!may_carry_nack(&[0x00, 0x01, 0, 0, 0, 0, 0, 0]), "STUN");
    }

    #[test]
    fn a_window_copies_a_bounded_number_of_rtx_datagrams_for_a_while() {
        let t0 = Instant::now();
        let mut w = CopyWindow {
            until: t0 + WINDOW,
            left: 2,
            ssrcs: vec![7],
        };
        assert!(!w.take(t0, &rtp(8, false)), "not an RTX SSRC");
        assert!(!w.take(t0, &rtp(7, true)), "blank padding");
        assert!(!w.take(t0, &[0x81, 201, 0, 1, 0, 0, 0, 7]), "RTCP");
        assert!(w.take(t0, &rtp(7, false)));
        assert!(
            !w.take(t0 + WINDOW + Duration::from_millis(1), &rtp(7, false)),
            "window over"
        );
        assert!(w.take(t0 + WINDOW, &rtp(7, false)));
        assert!(!w.take(t0, &rtp(7, false)), "bound reached");
    }

    #[test]
    fn pending_copies_are_bounded() {
        let t0 = Instant::now();
        let mut q = VecDeque::new();
        let t = Transmit {
            destination: "10.0.0.1:1".parse().unwrap(),
            contents: rtp(7, false),
        };
        for _ in 0..MAX_PENDING_COPIES {
            assert!(queue_copy(&mut q, t0, &t));
        }
        assert!(!queue_copy(&mut q, t0, &t));
        assert_eq!(q.front().unwrap().0, t0 + COPY_DELAY);
    }
}
