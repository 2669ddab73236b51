//! Dev-mode fault injection: one participant's media path cut for a while, signaling
//! left alone (a dead path the client must repair by an ICE restart). The node offers
//! it only with `--dev` (`POST /dev/cut-media`), for browser tests of ICE restart.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_media::{ParticipantId, Transmit};

use crate::Controller;

/// Longest cut one request may ask for.
pub const MAX_CUT: Duration = Duration::from_secs(60);

/// Most participants cut at the same time.
const MAX_CUTS: usize = 64;

impl<S: Clone> Controller<S> {
    /// Cuts `participant`'s media path for `d` (at most [`MAX_CUT`]): every datagram
    /// from or to either of its connections is dropped, including the ICE checks of a
    /// restart, until then. Returns whether the participant is on this node (and the
    /// cut was taken; at most a few participants are cut at a time).
    pub fn cut_media(&mut self, now: Instant, participant: ParticipantId, d: Duration) -> bool {
        self.cuts.retain(|_, until| *until > now);
        if self.sfu.identity(participant).is_none()
            || (self.cuts.len() >= MAX_CUTS && !self.cuts.contains_key(&participant))
        {
            return false;
        }
        self.cut_clock = now;
        self.cuts.insert(participant, now + d.min(MAX_CUT));
        true
    }

    /// Whether a datagram from or to `addr` (with `contents`, for STUN routing) belongs
    /// to a participant whose path is cut at the last time handed in.
    pub(crate) fn cut_off(&mut self, addr: SocketAddr, contents: &[u8]) -> bool {
        if self.cuts.is_empty() {
            return false;
        }
        let now = self.cut_clock;
        self.cuts.retain(|_, until| *until > now);
        let cut = self
            .sfu
            .participant_of(addr, contents)
            .is_some_and(|id| self.cuts.contains_key(&id));
        if cut {
            self.stats.datagrams_cut += 1;
        }
        cut
    }

    /// The media core's next datagram that is not to a cut participant.
    pub(crate) fn next_uncut_transmit(&mut self) -> Option<Transmit> {
        loop {
            let t = self.sfu.poll_transmit()?;
            if !self.cut_off(t.destination, &[]) {
                return Some(t);
            }
        }
    }
}
