//! RTX cache sizing: how much history each outgoing stream keeps to answer NACKs.
//!
//! str0m keeps, per outgoing stream, a ring of sent packets (header and a shared
//! payload) to resend on NACK. Its slots, not the payloads (shared by all subscribers
//! of a track), are what costs memory: one slot per packet sent within the cache's
//! age. A NACK arrives about one round trip after the packet left, plus the
//! receiver's gap detection; a repeated NACK one round trip later. So the age follows
//! the stream's measured RTT (`3 × RTT + 150 ms`, bounded to 250 ms – 1 s), and the
//! packet bound follows the subscriber's bitrate estimate. Until an RTT is measured
//! (the first RTCP receiver report) the stream keeps [`INITIAL_AGE`].

use std::time::Duration;

use str0m::media::Mid;

use crate::{ParticipantId, Sfu};

/// How often a subscriber connection reports its streams' RTT (and loss, for `fec`).
pub(crate) const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// History kept before the stream's RTT is known.
pub(crate) const INITIAL_AGE: Duration = Duration::from_secs(1);
/// Packets kept before the subscriber's bitrate is known, and at most.
pub(crate) const MAX_PACKETS: usize = 512;
/// The least history kept, whatever the RTT (covers gap detection at low frame rates).
const MIN_AGE: Duration = Duration::from_millis(250);
/// The least packets kept, whatever the bitrate.
const MIN_PACKETS: usize = 64;
/// Smallest average packet size assumed when bounding the packets by the bitrate.
const MIN_AVG_PACKET_BYTES: u64 = 500;

/// The history to keep for a stream whose round trip is `rtt`.
pub(crate) fn age_for_rtt(rtt: Duration) -> Duration {
    (rtt.saturating_mul(3) + Duration::from_millis(150)).clamp(MIN_AGE, INITIAL_AGE)
}

/// The packets to keep for `age` of history at a subscriber estimate of
/// `estimate_bps` (unknown: [`MAX_PACKETS`]).
pub(crate) fn packets_for(estimate_bps: Option<u64>, age: Duration) -> usize {
    let Some(bps) = estimate_bps else {
        return MAX_PACKETS;
    };
    let per_sec = bps / 8 / MIN_AVG_PACKET_BYTES;
    let n = (per_sec as f64 * age.as_secs_f64()).ceil() as usize;
    n.clamp(MIN_PACKETS, MAX_PACKETS)
}

/// Whether a stream keeping `current` should be resized to keep `wanted`: only on a
/// change of more than a quarter, since a resize drops the history kept so far.
pub(crate) fn should_resize(current: Duration, wanted: Duration) -> bool {
    let (c, w) = (current.as_secs_f64(), wanted.as_secs_f64());
    (w - c).abs() > c * 0.25
}

impl Sfu {
    /// Resizes the RTX cache of `id`'s outgoing stream `mid` for a measured `rtt`, if
    /// the history it should keep changed by more than a quarter.
    pub(crate) fn resize_rtx_cache(&mut self, id: ParticipantId, mid: Mid, rtt: Duration) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let wanted = age_for_rtt(rtt);
        let Some(sub) = p
            .subscriptions
            .values_mut()
            .find(|s| s.mid == Some(mid) && s.out_ssrc.is_some())
        else {
            return;
        };
        if !should_resize(sub.rtx_age, wanted) {
            return;
        }
        let packets = packets_for(p.estimate_bps, wanted);
        if let Some(tx) = p.subscriber.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.set_rtx_cache(packets, wanted, Some(0.15));
            sub.rtx_age = wanted;
            self.stats.rtx_cache_resizes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_follows_the_rtt_within_bounds() {
        assert_eq!(age_for_rtt(Duration::ZERO), MIN_AGE);
        assert_eq!(age_for_rtt(Duration::from_millis(10)), MIN_AGE);
        assert_eq!(
            age_for_rtt(Duration::from_millis(100)),
            Duration::from_millis(450)
        );
        // A 200 ms one-way delay (400 ms round trip) is capped at the initial second.
        assert_eq!(age_for_rtt(Duration::from_millis(400)), INITIAL_AGE);
        assert_eq!(age_for_rtt(Duration::from_secs(30)), INITIAL_AGE);
    }

    #[test]
    fn packets_follow_the_bitrate_within_bounds() {
        assert_eq!(packets_for(None, MIN_AGE), MAX_PACKETS);
        assert_eq!(packets_for(Some(100_000), MIN_AGE), MIN_PACKETS);
        // 3 Mbit/s = 750 packets/s of 500 bytes; a quarter second of them.
        assert_eq!(packets_for(Some(3_000_000), MIN_AGE), 188);
        assert_eq!(packets_for(Some(50_000_000), INITIAL_AGE), MAX_PACKETS);
    }

    #[test]
    fn small_changes_keep_the_history() {
        let s = Duration::from_millis(1000);
        assert!(!should_resize(s, Duration::from_millis(800)));
        assert!(should_resize(s, Duration::from_millis(250)));
        assert!(should_resize(MIN_AGE, Duration::from_millis(450)));
        assert!(!should_resize(MIN_AGE, Duration::from_millis(300)));
    }
}
