//! Rate measurement: each simulcast layer's bitrate over short windows, and which
//! layers are live enough to allocate.

use std::time::{Duration, Instant};

use str0m::rtp::Ssrc;

/// Bitrates assumed for a layer before it has been measured.
pub(crate) const DEFAULT_LAYER_BPS: [u64; 3] = [150_000, 500_000, 1_500_000];
/// Bitrate set aside for each audio subscription before video layers are allocated.
pub(crate) const AUDIO_BPS: u64 = 50_000;
/// Length of one measurement window.
const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Per-packet overhead counted on top of the payload (IP, UDP, RTP and SRTP headers).
const PACKET_OVERHEAD: u64 = 40;
/// A layer silent for this long is taken as not being sent.
const LIVE_FOR: Duration = Duration::from_secs(1);

/// One layer of a published track: its measured bitrate, its SSRC and when a
/// keyframe was last asked for.
#[derive(Default, Clone, Copy)]
pub(crate) struct LayerRate {
    pub(crate) window_start: Option<Instant>,
    pub(crate) window_bytes: u64,
    pub(crate) bps: Option<u64>,
    pub(crate) last_packet: Option<Instant>,
    pub(crate) ssrc: Option<Ssrc>,
    pub(crate) last_keyframe_request: Option<Instant>,
}

impl LayerRate {
    /// Counts a packet of `payload_len` bytes from `ssrc`; at the end of each window
    /// the bitrate is smoothed into `bps` (3/4 old, 1/4 new).
    pub(crate) fn record(&mut self, now: Instant, ssrc: Ssrc, payload_len: usize) {
        self.ssrc = Some(ssrc);
        self.last_packet = Some(now);
        self.window_bytes += payload_len as u64 + PACKET_OVERHEAD;
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) >= RATE_WINDOW => {
                let secs = now.saturating_duration_since(start).as_secs_f64();
                let bps = (self.window_bytes as f64 * 8.0 / secs) as u64;
                self.bps = Some(match self.bps {
                    Some(old) => (old * 3 + bps) / 4,
                    None => bps,
                });
                self.window_start = Some(now);
                self.window_bytes = 0;
            }
            None => self.window_start = Some(now),
            _ => {}
        }
    }
}

/// Layer bitrates usable for allocation: `None` for a layer not being sent.
pub(crate) fn available_rates(rates: &[LayerRate; 3], now: Instant) -> [Option<u64>; 3] {
    let mut out = [None; 3];
    for (i, r) in rates.iter().enumerate() {
        let live = r
            .last_packet
            .is_some_and(|t| now.saturating_duration_since(t) < LIVE_FOR);
        if live {
            out[i] = Some(r.bps.unwrap_or(DEFAULT_LAYER_BPS[i]).max(1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_packets_gives_its_bitrate_and_silence_ends_the_layer() {
        let t0 = Instant::now();
        let mut r = LayerRate::default();
        // 1,000 bytes on the wire every 10 ms for 500 ms: 800 kbit/s.
        for i in 0..=50u32 {
            r.record(t0 + Duration::from_millis(10) * i, Ssrc::from(7), 960);
        }
        let bps = r.bps.expect("a full window was measured");
        assert!((790_000..=820_000).contains(&bps), "{bps}");
        let rates = [r, LayerRate::default(), LayerRate::default()];
        let live = available_rates(&rates, t0 + Duration::from_millis(600));
        assert_eq!(live, [Some(bps), None, None]);
        let silent = available_rates(&rates, t0 + Duration::from_millis(1600));
        assert_eq!(silent, [None, None, None]);
    }
}
