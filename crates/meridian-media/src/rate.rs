//! Rate measurement: each simulcast layer's bitrate over short windows, and which
//! layers are live enough to allocate.

use std::time::{Duration, Instant};

use str0m::rtp::Ssrc;

use crate::room::Track;

#[derive(Default, Clone, Copy)]
pub(crate) struct LayerRate {
    pub(crate) window_start: Option<Instant>,
    pub(crate) window_bytes: u64,
    pub(crate) bps: Option<u64>,
    pub(crate) last_packet: Option<Instant>,
    pub(crate) ssrc: Option<Ssrc>,
    pub(crate) last_keyframe_request: Option<Instant>,
}

impl Track {
    /// Layer bitrates usable for allocation (a layer silent for a second is not sent).
    pub(crate) fn available_rates(&self, now: Instant) -> [Option<u64>; 3] {
        let mut out = [None; 3];
        for (i, r) in self.rates.iter().enumerate() {
            let live = r
                .last_packet
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
            if live {
                out[i] = Some(r.bps.unwrap_or(DEFAULT_LAYER_BPS[i]).max(1));
            }
        }
        out
    }
}

/// Bitrates assumed for a layer before it has been measured.
pub(crate) const DEFAULT_LAYER_BPS: [u64; 3] = [150_000, 500_000, 1_500_000];
pub(crate) const AUDIO_BPS: u64 = 50_000;
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(500);
