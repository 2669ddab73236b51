//! Synthetic media sources: frames that carry their own sequence number and send time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meridian_protocol::Layer;
use str0m::Rtc;
use str0m::media::{MediaTime, Mid, Pt};

/// Marks a synthetic frame's header.
const MAGIC: &[u8; 4] = b"MRDN";

/// The instant every synthetic video source's RTP clock counts from (process-wide), so
/// a receiver in the same process can read a packet's send time from its RTP timestamp
/// without decrypting it (see `count`).
pub(crate) fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the Unix epoch (shared by sender and receiver on one host).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The header every synthetic frame carries after its codec prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame counter of the source (the same across simulcast layers).
    pub seq: u64,
    /// Send time, microseconds since the Unix epoch.
    pub sent_micros: u64,
    /// Layer index the frame was sent on.
    pub layer: u8,
    /// Whether the frame is a keyframe.
    pub keyframe: bool,
}

impl FrameHeader {
    /// Finds and reads the header in a received frame.
    pub fn parse(frame: &[u8]) -> Option<FrameHeader> {
        let at = frame.windows(4).take(16).position(|w| w == MAGIC)?;
        let b = frame.get(at + 4..at + 22)?;
        Some(FrameHeader {
            seq: u64::from_be_bytes(b[0..8].try_into().ok()?),
            sent_micros: u64::from_be_bytes(b[8..16].try_into().ok()?),
            layer: b[16],
            keyframe: b[17] == 1,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.sent_micros.to_be_bytes());
        out.push(self.layer);
        out.push(self.keyframe as u8);
    }
}

/// A VP8 frame: a valid uncompressed data chunk header (keyframe bit, start code and
/// dimensions on keyframes) followed by the synthetic header and padding.
fn vp8_frame(h: FrameHeader, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.max(32));
    // Frame tag: bit 0 = !keyframe, version 0, show_frame 1.
    let tag: u8 = if h.keyframe { 0x10 } else { 0x11 };
    out.extend_from_slice(&[tag, 0x00, 0x00]);
    if h.keyframe {
        out.extend_from_slice(&[0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]);
    }
    h.write(&mut out);
    out.resize(size.max(out.len()), 0xab);
    out
}

struct LayerState {
    layer: Layer,
    force_keyframe: bool,
}

/// A synthetic VP8 source with simulcast layers.
pub(crate) struct VideoSource {
    mid: Mid,
    layers: Vec<LayerState>,
    bitrates: [u64; 3],
    interval: Duration,
    keyframe_interval: u32,
    seq: u64,
    pub(crate) next_frame: Instant,
}

impl VideoSource {
    pub(crate) fn new(
        mid: Mid,
        layers: Vec<Layer>,
        bitrates: [u64; 3],
        fps: u32,
        keyframe_interval: u32,
        now: Instant,
    ) -> Self {
        epoch();
        let layers = if layers.is_empty() {
            vec![Layer::High]
        } else {
            layers
        };
        VideoSource {
            mid,
            layers: layers
                .into_iter()
                .map(|layer| LayerState {
                    layer,
                    force_keyframe: true,
                })
                .collect(),
            bitrates,
            interval: Duration::from_secs(1) / fps.max(1),
            keyframe_interval: keyframe_interval.max(1),
            seq: 0,
            next_frame: now,
        }
    }

    /// Moves the source to a new media section (a new publisher connection after a
    /// restore): the frame counter goes on, every layer starts with a keyframe.
    pub(crate) fn move_to(&mut self, mid: Mid) {
        self.mid = mid;
        self.request_keyframe(None);
    }

    pub(crate) fn request_keyframe(&mut self, layer: Option<Layer>) {
        for l in &mut self.layers {
            if layer.is_none() || layer == Some(l.layer) {
                l.force_keyframe = true;
            }
        }
    }

    pub(crate) fn write_due(&mut self, now: Instant, rtc: &mut Rtc) {
        if now < self.next_frame {
            return;
        }
        // Skip frames missed while the task was busy rather than bursting them.
        while self.next_frame <= now {
            self.next_frame += self.interval;
        }
        let Some(pt) = vp8_pt(rtc) else {
            return;
        };
        let elapsed = now.saturating_duration_since(epoch());
        let rtp = MediaTime::from_90khz((elapsed.as_micros() as u64) * 9 / 100);
        let sent = now_micros();
        let single = self.layers.len() == 1;
        let fps = (Duration::from_secs(1).as_secs_f64() / self.interval.as_secs_f64()).max(1.0);
        for l in &mut self.layers {
            let periodic = self.seq.is_multiple_of(self.keyframe_interval as u64);
            let keyframe = periodic || l.force_keyframe;
            let bps = self.bitrates[l.layer.index()];
            let mut size = (bps as f64 / 8.0 / fps) as usize;
            if keyframe {
                size *= 3;
            }
            let frame = vp8_frame(
                FrameHeader {
                    seq: self.seq,
                    sent_micros: sent,
                    layer: l.layer.index() as u8,
                    keyframe,
                },
                size.clamp(64, 60_000),
            );
            let Some(writer) = rtc.writer(self.mid) else {
                return;
            };
            let writer = if single {
                writer
            } else {
                writer.rid(l.layer.rid().into())
            };
            if writer.write(pt, now, rtp, frame).is_ok() && keyframe {
                l.force_keyframe = false;
            }
        }
        self.seq += 1;
    }
}

/// A synthetic Opus source: 20 ms packets.
pub(crate) struct AudioSource {
    mid: Mid,
    seq: u64,
    started: Instant,
    pub(crate) next_frame: Instant,
}

impl AudioSource {
    pub(crate) fn new(mid: Mid, now: Instant) -> Self {
        AudioSource {
            mid,
            seq: 0,
            started: now,
            next_frame: now,
        }
    }

    /// Moves the source to a new media section; the frame counter goes on.
    pub(crate) fn move_to(&mut self, mid: Mid) {
        self.mid = mid;
    }

    pub(crate) fn write_due(&mut self, now: Instant, rtc: &mut Rtc) {
        if now < self.next_frame {
            return;
        }
        while self.next_frame <= now {
            self.next_frame += Duration::from_millis(20);
        }
        let Some(pt) = rtc
            .codec_config()
            .find(|p| p.spec().codec == str0m::format::Codec::Opus)
            .map(|p| p.pt())
        else {
            return;
        };
        let elapsed = now.saturating_duration_since(self.started);
        let rtp = MediaTime::new(
            (elapsed.as_micros() as u64) * 48 / 1000,
            str0m::media::Frequency::FORTY_EIGHT_KHZ,
        );
        let mut frame = vec![0xfc];
        FrameHeader {
            seq: self.seq,
            sent_micros: now_micros(),
            layer: 0,
            keyframe: true,
        }
        .write(&mut frame);
        frame.resize(80, 0);
        if let Some(w) = rtc.writer(self.mid) {
            let _ = w.write(pt, now, rtp, frame);
        }
        self.seq += 1;
    }
}

/// For an outgoing SRTP datagram that is the last packet (RTP marker) of a synthetic
/// video frame with payload type `video_pt`: how long ago the frame was written, ms,
/// read from its RTP timestamp (the time since [`epoch`] at the write, 90 kHz; the RTP
/// header is clear text in SRTP). `None` for anything else (STUN, DTLS, RTCP, audio,
/// other packets of a frame).
pub(crate) fn frame_sent_ms(datagram: &[u8], video_pt: u8, now: Instant) -> Option<f64> {
    let header = datagram.get(..12)?;
    let (b0, b1) = (header[0], header[1]);
    // RTP version 2, marker set, the video payload type (RTCP types are 192..=223).
    if b0 >> 6 != 2 || b1 & 0x80 == 0 || b1 & 0x7f != video_pt || (192..=223).contains(&b1) {
        return None;
    }
    let ts = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let now_90k = (now.saturating_duration_since(epoch()).as_micros() as u64 * 9 / 100) as u32;
    let ticks = now_90k.wrapping_sub(ts) as i32;
    // Anything outside a second is not a frame of this process's sources.
    (0..90_000)
        .contains(&ticks)
        .then(|| f64::from(ticks) / 90.0)
}

pub(crate) fn vp8_pt(rtc: &Rtc) -> Option<Pt> {
    rtc.codec_config()
        .find(|p| p.spec().codec == str0m::format::Codec::Vp8)
        .map(|p| p.pt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_a_vp8_frame() {
        for keyframe in [true, false] {
            let h = FrameHeader {
                seq: 42,
                sent_micros: 123_456_789,
                layer: 2,
                keyframe,
            };
            let frame = vp8_frame(h, 500);
            assert_eq!(frame.len(), 500);
            assert_eq!(frame[0] & 1 == 0, keyframe, "VP8 P bit marks keyframes");
            assert_eq!(FrameHeader::parse(&frame), Some(h));
        }
        assert_eq!(FrameHeader::parse(b"nothing here"), None);
    }

    #[test]
    fn a_frames_last_packet_tells_how_long_ago_the_frame_was_written() {
        let written = epoch() + Duration::from_millis(500);
        let ts = (Duration::from_millis(500).as_micros() as u64 * 9 / 100) as u32;
        let mut d = vec![0x80, 0x80 | 96, 0, 1];
        d.extend_from_slice(&ts.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 7, 0xaa, 0xbb]);
        let ms = frame_sent_ms(&d, 96, written + Duration::from_millis(3)).expect("a sample");
        assert!((ms - 3.0).abs() < 0.02, "{ms}");
        // Not the marker packet, another payload type, RTCP, too old, too short.
        let mut no_marker = d.clone();
        no_marker[1] = 96;
        assert_eq!(frame_sent_ms(&no_marker, 96, written), None);
        assert_eq!(frame_sent_ms(&d, 111, written), None);
        let mut rtcp = d.clone();
        rtcp[1] = 200;
        assert_eq!(frame_sent_ms(&rtcp, 200 & 0x7f, written), None);
        assert_eq!(
            frame_sent_ms(&d, 96, written + Duration::from_secs(2)),
            None
        );
        assert_eq!(frame_sent_ms(&d[..8], 96, written), None);
    }
}
