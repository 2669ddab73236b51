//! Keyframes: detection on RTP payloads, per codec, and requests (PLI) to a track's
//! publisher, rate-limited per layer.

use std::time::Instant;

use meridian_protocol::TrackKind;
use str0m::format::Codec;
use str0m::media::KeyframeRequestKind;
use str0m::rtp::Vp8Descriptor;

use crate::pc::mark_dirty;
use crate::{PcKind, Sfu, TrackId};

/// Whether `payload` (an RTP payload, no header) starts a keyframe of `codec`.
pub fn starts_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => Vp8Descriptor::parse(payload)
            .map(|d| d.starts_keyframe(payload))
            .unwrap_or(false),
        Codec::H264 => h264_starts_keyframe(payload),
        _ => false,
    }
}

/// H.264 (RFC 6184): an IDR slice (5) or SPS (7) in a single NAL unit, a STAP-A
/// aggregate, or the first fragment of an FU-A.
fn h264_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let is_key = |nal_type: u8| nal_type == 5 || nal_type == 7;
    match first & 0x1f {
        24 => {
            // STAP-A: [hdr][size u16][nal]...
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                let Some(nal) = rest.get(2..2 + size) else {
                    return false;
                };
                if nal.first().is_some_and(|b| is_key(b & 0x1f)) {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        28 => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && is_key(fu & 0x1f)),
        t => is_key(t),
    }
}

impl Sfu {
    /// Asks the publisher of `track` for a keyframe on every layer some subscriber waits for.
    pub(crate) fn request_keyframe_for(&mut self, track: TrackId, now: Instant, force: bool) {
        let Some(t) = self.tracks.get(&track) else {
            return;
        };
        if t.kind != TrackKind::Video {
            return;
        }
        let mut layers: Vec<usize> = t
            .subscribers
            .iter()
            .filter_map(|s| {
                let f = &self
                    .participants
                    .get(s)?
                    .subscriptions
                    .get(&track)?
                    .forwarder;
                f.wants_keyframe().or(f.current())
            })
            .collect();
        layers.sort();
        layers.dedup();
        for layer in layers {
            self.request_layer_keyframe(track, layer, now, force);
        }
    }

    pub(crate) fn request_layer_keyframe(
        &mut self,
        track: TrackId,
        layer: usize,
        now: Instant,
        force: bool,
    ) {
        let interval = self.config.keyframe_request_interval;
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        let rate = &mut t.rates[layer];
        let Some(ssrc) = rate.ssrc else {
            return;
        };
        let recent = rate
            .last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < interval);
        if recent && !force {
            return;
        }
        if recent && force && rate.last_keyframe_request == Some(now) {
            return;
        }
        rate.last_keyframe_request = Some(now);
        let Some(pc) = self
            .participants
            .get_mut(&t.owner)
            .and_then(|p| p.publisher.as_deref_mut())
        else {
            return;
        };
        if let Some(rx) = pc.rtc.direct_api().stream_rx(&ssrc) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.stats.keyframe_requests += 1;
            mark_dirty(&mut self.dirty, t.owner, pc, PcKind::Publisher);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_bit_is_read_after_the_descriptor() {
        // X=0, S=1, PID=0; then the VP8 payload header with P=0 (keyframe).
        let key = [0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a];
        let delta = [0x10, 0x01, 0x00, 0x00];
        let not_start = [0x00, 0x00, 0x00, 0x00];
        assert!(starts_keyframe(Codec::Vp8, &key));
        assert!(!starts_keyframe(Codec::Vp8, &delta));
        assert!(!starts_keyframe(Codec::Vp8, &not_start));
        assert!(!starts_keyframe(Codec::Vp8, &[]));
    }

    #[test]
    fn h264_idr_sps_stapa_and_fua_are_keyframes() {
        assert!(starts_keyframe(Codec::H264, &[0x65, 1, 2]));
        assert!(starts_keyframe(Codec::H264, &[0x67, 1, 2]));
        assert!(!starts_keyframe(Codec::H264, &[0x41, 1, 2]));
        assert!(starts_keyframe(Codec::H264, &[0x78, 0, 2, 0x67, 0]));
        assert!(!starts_keyframe(Codec::H264, &[0x78, 0, 9, 0x67]));
        assert!(starts_keyframe(Codec::H264, &[0x7c, 0x85]));
        assert!(!starts_keyframe(Codec::H264, &[0x7c, 0x05]));
        assert!(!starts_keyframe(Codec::H264, &[]));
    }
}
