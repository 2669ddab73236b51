//! Per-subscription packet rewriting: one outgoing stream stitched from simulcast layers.
//!
//! Each simulcast layer has its own SSRC, sequence space, RTP clock offset and VP8
//! picture ids. A subscriber sees one stream, so on every layer switch the forwarder
//! rebases sequence number, timestamp and picture id to continue where the previous
//! layer left off. Switches happen only at a keyframe of the target layer.
//!
//! `Sfu::forward` is the packet path around it: a publisher's RTP packet is mapped to
//! its track and layer, measured, and written to every subscriber's outgoing stream.

use std::sync::Arc;
use std::time::Instant;

use meridian_protocol::{Layer, TrackKind};
use str0m::format::Codec;
use str0m::media::Pt;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo, Vp8Descriptor};
use tracing::trace;

use crate::pc::mark_dirty;
use crate::red::RedPayload;
use crate::{ParticipantId, PcKind, Sfu, SfuEvent, keyframe};

/// One incoming packet as the forwarder sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InPacket {
    /// Simulcast layer index (0 for a single stream or audio).
    pub layer: usize,
    /// Extended sequence number in the layer's own space.
    pub seq: u64,
    /// RTP timestamp in the layer's own clock offset.
    pub ts: u32,
    /// Whether this packet starts a keyframe (always true for audio).
    pub keyframe_start: bool,
    /// VP8 picture id (15-bit), if present.
    pub picture_id: Option<u16>,
    /// VP8 TL0PICIDX, if present.
    pub tl0: Option<u8>,
    /// Arrival time at the node.
    pub arrival: Instant,
}

/// What to write for a forwarded packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutPacket {
    pub seq: u64,
    pub ts: u32,
    pub picture_id: Option<u16>,
    pub tl0: Option<u8>,
    /// True on the first packet after a layer switch.
    pub switched: bool,
}

#[derive(Clone, Copy, Debug)]
struct Offsets {
    seq: u64,
    ts: u32,
    pic: u16,
    tl0: u8,
    /// First input sequence number of the current layer: older packets are not forwarded.
    first_in_seq: u64,
}

/// Rewrites one subscription's packets.
#[derive(Debug)]
pub(crate) struct Forwarder {
    clock_rate: u32,
    /// Layer currently forwarded.
    current: Option<usize>,
    /// Layer the allocator wants; `None` pauses the subscription.
    target: Option<usize>,
    offsets: Option<Offsets>,
    last_out_seq: Option<u64>,
    last_out_ts: u32,
    last_out_at: Option<Instant>,
    last_out_pic: Option<u16>,
    last_out_tl0: Option<u8>,
    /// Packets the node inserted (FEC) since the current layer began, and the latest
    /// insertions' positions: the input sequence number each came after.
    inserted: u64,
    recent_inserts: std::collections::VecDeque<u64>,
    /// Input sequence number of the newest packet forwarded.
    last_in_seq: Option<u64>,
}

/// Insertions remembered to place late (retransmitted or reordered) packets.
const RECENT_INSERTS: usize = 64;

const PIC_MASK: u16 = 0x7fff;

impl Forwarder {
    pub(crate) fn new(clock_rate: u32) -> Self {
        Forwarder {
            clock_rate,
            current: None,
            target: None,
            offsets: None,
            last_out_seq: None,
            last_out_ts: 0,
            last_out_at: None,
            last_out_pic: None,
            last_out_tl0: None,
            inserted: 0,
            recent_inserts: Default::default(),
            last_in_seq: None,
        }
    }

    /// Takes the next outgoing sequence number for a packet the node adds to the
    /// stream (a FEC packet written right after the last forwarded one); later
    /// packets are shifted past it. `None` before anything was forwarded.
    pub(crate) fn insert_packet(&mut self) -> Option<u64> {
        self.offsets?;
        let seq = self.last_out_seq? + 1;
        let after_in = self.last_in_seq?;
        self.last_out_seq = Some(seq);
        self.inserted += 1;
        if self.recent_inserts.len() >= RECENT_INSERTS {
            self.recent_inserts.pop_front();
        }
        self.recent_inserts.push_back(after_in);
        Some(seq)
    }

    /// How far insertions shift the packet of input sequence number `seq`; `None`
    /// for one older than every insertion remembered (it cannot be placed).
    fn shift(&self, seq: u64) -> Option<u64> {
        let later = self.recent_inserts.iter().filter(|a| **a >= seq).count() as u64;
        if later == self.recent_inserts.len() as u64 && self.inserted > later {
            return None;
        }
        Some(self.inserted - later)
    }

    /// Continues the outgoing stream `previous` wrote (a reused media section): the
    /// next packet forwarded is rebased like a layer switch, so sequence number,
    /// timestamp and picture id go on from where `previous` stopped.
    pub(crate) fn continue_after(&mut self, previous: &Forwarder) {
        self.last_out_seq = previous.last_out_seq;
        self.last_out_ts = previous.last_out_ts;
        self.last_out_at = previous.last_out_at;
        self.last_out_pic = previous.last_out_pic;
        self.last_out_tl0 = previous.last_out_tl0;
        self.current = None;
        self.offsets = None;
        self.inserted = 0;
        self.recent_inserts.clear();
    }

    pub(crate) fn current(&self) -> Option<usize> {
        self.current
    }

    pub(crate) fn target(&self) -> Option<usize> {
        self.target
    }

    /// Sets the layer to switch to at its next keyframe.
    pub(crate) fn set_target(&mut self, target: Option<usize>) {
        self.target = target;
        if target.is_none() {
            self.current = None;
        }
    }

    /// Whether the forwarder waits for a keyframe of its target layer.
    pub(crate) fn wants_keyframe(&self) -> Option<usize> {
        match (self.target, self.current) {
            (Some(t), c) if c != Some(t) => Some(t),
            _ => None,
        }
    }

    /// Decides whether to forward `p`, and with which header values.
    pub(crate) fn handle(&mut self, p: &InPacket) -> Option<OutPacket> {
        let target = self.target?;
        let mut switched = false;
        if self.current != Some(p.layer) {
            if p.layer != target || !p.keyframe_start {
                return None;
            }
            self.switch_to(p);
            switched = true;
        }
        let off = self.offsets?;
        if p.seq < off.first_in_seq {
            // Older than the keyframe we switched at: its frame was never started.
            return None;
        }
        let seq = p.seq.wrapping_add(off.seq).wrapping_add(self.shift(p.seq)?);
        let ts = p.ts.wrapping_add(off.ts);
        let picture_id = p.picture_id.map(|pic| pic.wrapping_add(off.pic) & PIC_MASK);
        let tl0 = p.tl0.map(|t| t.wrapping_add(off.tl0));
        if self.last_out_seq.is_none_or(|last| seq > last) {
            self.last_out_seq = Some(seq);
            self.last_in_seq = Some(p.seq);
            self.last_out_ts = ts;
            self.last_out_at = Some(p.arrival);
            self.last_out_pic = picture_id.or(self.last_out_pic);
            self.last_out_tl0 = tl0.or(self.last_out_tl0);
        }
        Some(OutPacket {
            seq,
            ts,
            picture_id,
            tl0,
            switched,
        })
    }

    fn switch_to(&mut self, p: &InPacket) {
        let next_seq = self.last_out_seq.map_or(1, |s| s + 1);
        let next_ts = match self.last_out_at {
            Some(at) => {
                let elapsed = p.arrival.saturating_duration_since(at);
                let ticks =
                    (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000).max(1) as u32;
                self.last_out_ts.wrapping_add(ticks)
            }
            None => p.ts,
        };
        let next_pic = self
            .last_out_pic
            .map_or(p.picture_id.unwrap_or(0), |x| x.wrapping_add(1) & PIC_MASK);
        let next_tl0 = self
            .last_out_tl0
            .map_or(p.tl0.unwrap_or(0), |x| x.wrapping_add(1));
        self.offsets = Some(Offsets {
            seq: next_seq.wrapping_sub(p.seq),
            ts: next_ts.wrapping_sub(p.ts),
            pic: next_pic.wrapping_sub(p.picture_id.unwrap_or(0)),
            tl0: next_tl0.wrapping_sub(p.tl0.unwrap_or(0)),
            first_in_seq: p.seq,
        });
        self.inserted = 0;
        self.recent_inserts.clear();
        self.current = Some(p.layer);
    }
}

impl Sfu {
    /// A subscriber media section's statistics (every second): its video FEC group
    /// follows the loss they show (never below the configured floor), and so do
    /// copies of retransmissions (`retx`).
    pub(crate) fn egress_loss(
        &mut self,
        id: ParticipantId,
        stats: &str0m::stats::MediaEgressStats,
    ) {
        let floor = self.config.fec_loss_floor;
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let Some(sub) = p
            .subscriptions
            .values_mut()
            .find(|s| s.mid == Some(stats.mid))
        else {
            return;
        };
        let loss = sub.loss.update(stats.packets, stats.nacks, stats.loss);
        sub.path_loss = loss;
        if let Some(enc) = sub.fec.as_mut() {
            enc.set_group(crate::fec::group_for_loss(loss.max(floor)));
        }
    }

    pub(crate) fn forward(&mut self, now: Instant, publisher: ParticipantId, pkt: RtpPacket) {
        self.stats.rtp_packets_in += 1;
        let Some(p) = self.participants.get_mut(&publisher) else {
            return;
        };
        if let Some(r) = p.relay.as_mut() {
            r.packets += 1;
        }
        let ssrc = pkt.header.ssrc;
        let (track_id, layer) = match p.ssrc_map.get(&ssrc) {
            Some(x) => *x,
            None => {
                let Some(publisher) = p.publisher.as_deref_mut() else {
                    return;
                };
                let mut api = publisher.rtc.direct_api();
                let Some(rx) = api.stream_rx(&ssrc) else {
                    return;
                };
                let (mid, rid) = (rx.mid(), rx.rid());
                let layer = rid
                    .and_then(|r| Layer::from_rid(&r.to_string()))
                    .map_or(0, Layer::index);
                let Some(track) = p
                    .published
                    .iter()
                    .copied()
                    .find(|t| self.tracks.get(t).is_some_and(|t| t.mid == mid))
                else {
                    return;
                };
                p.ssrc_map.insert(ssrc, (track, layer));
                (track, layer)
            }
        };
        let Some(t) = self.tracks.get_mut(&track_id) else {
            return;
        };
        t.rates[layer].record(now, ssrc, pkt.payload.len());
        // A relayed track's mute is its upstream's business: what crosses is forwarded
        // (a state arriving after the first packets of an unmute must not drop them).
        if (t.muted && t.origin.is_none()) || t.subscribers.is_empty() {
            return;
        }
        // Far subscribers get the layer that crosses the link, whatever its index here.
        let reported = match t.origin {
            Some(_) => t.relay_layer,
            None => None,
        };
        let pt = pkt.header.payload_type;
        let params = match t.pt_params.iter().find(|(x, _)| *x == pt) {
            Some((_, params)) => *params,
            None => {
                // The codec's own payload type, or the RED payload type wrapping it.
                let Some(params) = p.publisher.as_deref().and_then(|pc| {
                    pc.rtc
                        .codec_config()
                        .find(|c| c.pt() == pt || c.red() == Some(pt))
                        .copied()
                }) else {
                    return;
                };
                t.pt_params.push((pt, params));
                params
            }
        };
        let codec = params.spec().codec;
        let video = t.kind == TrackKind::Video;
        // RED from the publisher: checked once, then passed through or unwrapped.
        let red_in = if params.pt() != pt {
            match RedPayload::parse(&pkt.payload, *params.pt()) {
                Ok(r) => Some(r),
                Err(e) => {
                    self.stats.red_malformed += 1;
                    trace!(track = %track_id, "RED packet dropped: {e}");
                    return;
                }
            }
        } else {
            None
        };
        // Payload variants made for subscribers, shared between them.
        let mut primary_only: Option<Arc<[u8]>> = None;
        let mut relabelled: Vec<(Pt, Arc<[u8]>)> = Vec::new();
        let vp8 = if codec == Codec::Vp8 {
            Vp8Descriptor::parse(&pkt.payload).ok()
        } else {
            None
        };
        let keyframe_start = !video
            || vp8.map_or_else(
                || keyframe::starts_keyframe(codec, &pkt.payload),
                |d| d.starts_keyframe(&pkt.payload),
            );
        let input = InPacket {
            layer,
            seq: *pkt.seq_no,
            ts: pkt.header.timestamp,
            keyframe_start,
            picture_id: vp8.and_then(|d| d.picture_id()),
            tl0: vp8.and_then(|d| d.tl0_pic_idx()),
            arrival: pkt.timestamp,
        };
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            ..Default::default()
        };
        for sub_id in &t.subscribers {
            let Some(sp) = self.participants.get_mut(sub_id) else {
                continue;
            };
            let Some(sub) = sp.subscriptions.get_mut(&track_id) else {
                continue;
            };
            let (true, Some(out_ssrc)) = (sub.active, sub.out_ssrc) else {
                continue;
            };
            let Some(out) = sub.forwarder.handle(&input) else {
                continue;
            };
            if out.switched {
                self.stats.layer_switches += 1;
                match &sp.relay {
                    // An outbound link: the downstream node tells its subscribers.
                    Some(r) => {
                        self.relay_seq += 1;
                        self.events.push_back(SfuEvent::RelayTrackState {
                            peer: r.peer.clone(),
                            state: crate::RelayTrackState {
                                track_id: track_id.to_string(),
                                seq: self.relay_seq,
                                muted: t.muted,
                                layer: Some(Layer::ALL[layer]),
                            },
                        });
                    }
                    None => self.events.push_back(SfuEvent::LayerChanged {
                        participant: *sub_id,
                        track_id,
                        layer: Some(reported.unwrap_or(Layer::ALL[layer])),
                    }),
                }
            }
            let (out_pt, out_red) = match sub.pt_map.iter().find(|(i, _, _)| *i == pt) {
                Some((_, o, r)) => (*o, *r),
                None => {
                    let Some(o) = sp.subscriber.rtc.codec_config().match_params(params) else {
                        continue;
                    };
                    let (o, r) = (o.pt(), o.red().filter(|_| codec == Codec::Opus));
                    sub.pt_map.push((pt, o, r));
                    (o, r)
                }
            };
            let (out_pt, payload) = match (&red_in, out_red) {
                (None, None) => (out_pt, pkt.payload.clone()),
                // The subscriber gets RED the publisher did not send.
                (None, Some(red_pt)) => {
                    self.stats.red_added += 1;
                    let wrapped = sub.red.wrap(*out_pt, out.ts, &pkt.payload);
                    (red_pt, Arc::from(wrapped))
                }
                // RED passed through (relabelled when the Opus payload types differ).
                (Some(r), Some(red_pt)) => {
                    if out_pt == params.pt() {
                        (red_pt, pkt.payload.clone())
                    } else {
                        let payload = match relabelled.iter().find(|(p, _)| *p == out_pt) {
                            Some((_, b)) => b.clone(),
                            None => {
                                let b: Arc<[u8]> = Arc::from(r.encode(*out_pt));
                                relabelled.push((out_pt, b.clone()));
                                b
                            }
                        };
                        (red_pt, payload)
                    }
                }
                // RED reduced to its primary block for a subscriber without RED.
                (Some(r), None) => (
                    out_pt,
                    primary_only
                        .get_or_insert_with(|| Arc::from(r.primary))
                        .clone(),
                ),
            };
            // A browser's FEC also covers the header extensions str0m will write.
            let fec_ext = match &sub.fec {
                Some(e) if e.libwebrtc() && codec == Codec::Vp8 => Some(cached_extensions(
                    &mut sub.fec_ext,
                    &mut sp.subscriber.rtc,
                    sub.mid,
                    out_ssrc,
                    &ext,
                )),
                _ => None,
            };
            let mut api = sp.subscriber.rtc.direct_api();
            let Some(tx) = api.stream_tx(&out_ssrc) else {
                continue;
            };
            if let (Some(enc), true) = (sub.fec.as_mut(), codec == Codec::Vp8) {
                // Video in RED, with a ULPFEC packet after each group (see `fec`).
                let mut media = pkt.payload.to_vec();
                crate::fec::patch_vp8(&mut media, out.picture_id, out.tl0);
                let red = crate::fec::red_wrap(*out_pt, &media);
                let write = RtpWrite::new(
                    crate::fec::RED_PT.into(),
                    SeqNo::from(out.seq),
                    out.ts,
                    pkt.timestamp,
                    Arc::<[u8]>::from(red),
                )
                .marker(pkt.header.marker)
                .ext_vals(ext.clone())
                .nackable(true);
                tx.write_rtp(write);
                let parity = match fec_ext {
                    Some(None) => {
                        enc.skip();
                        Vec::new()
                    }
                    ext => enc.push(crate::fec::MediaPacket {
                        seq: out.seq as u16,
                        ts: out.ts,
                        pt: *out_pt,
                        marker: pkt.header.marker,
                        ext: ext.flatten().unwrap_or_else(|| Arc::from(Vec::new())),
                        payload: media,
                    }),
                };
                for parity in parity {
                    let Some(seq) = sub.forwarder.insert_packet() else {
                        break;
                    };
                    self.stats.fec_packets += 1;
                    self.stats.fec_bytes += parity.len() as u64;
                    let fec = crate::fec::red_wrap(crate::fec::ULPFEC_PT, &parity);
                    let write = RtpWrite::new(
                        crate::fec::RED_PT.into(),
                        SeqNo::from(seq),
                        out.ts,
                        pkt.timestamp,
                        Arc::<[u8]>::from(fec),
                    )
                    .nackable(true);
                    tx.write_rtp(write);
                }
            } else {
                let mut write =
                    RtpWrite::new(out_pt, SeqNo::from(out.seq), out.ts, pkt.timestamp, payload)
                        .marker(pkt.header.marker)
                        .ext_vals(ext.clone())
                        .nackable(video);
                if let Some(d) = vp8 {
                    let mut patch = d.patch();
                    if let Some(pic) = out.picture_id {
                        patch = patch.picture_id(pic);
                    }
                    if let Some(tl0) = out.tl0 {
                        patch = patch.tl0_pic_idx(tl0);
                    }
                    if let Ok(patch) = patch.build() {
                        write = write.vp8_patch(patch);
                    }
                }
                tx.write_rtp(write);
            }
            if let Some(r) = sp.relay.as_mut() {
                r.packets += 1;
                r.packets_by_layer[layer] += 1;
                r.bytes += pkt.payload.len() as u64;
                self.stats.rtp_bytes_relayed += pkt.payload.len() as u64;
            }
            self.stats.rtp_packets_forwarded += 1;
            self.stats.rtp_bytes_forwarded += pkt.payload.len() as u64;
            mark_dirty(
                &mut self.dirty,
                *sub_id,
                &mut sp.subscriber,
                PcKind::Subscriber,
            );
        }
        // A subscriber waits for a keyframe on some layer: ask once per interval.
        let waiting: Vec<usize> = t
            .subscribers
            .iter()
            .filter_map(|s| {
                self.participants
                    .get(s)?
                    .subscriptions
                    .get(&track_id)?
                    .forwarder
                    .wants_keyframe()
            })
            .collect();
        for layer in waiting {
            self.request_layer_keyframe(track_id, layer, now, false);
        }
    }
}

/// Extension blocks kept per subscription: the values the node writes on video
/// (video orientation, mostly absent) take few distinct forms.
const EXT_CACHE: usize = 4;

/// [`crate::fec::libwebrtc_extensions_for`] for `values`, from `cache` when it was
/// made for the same values (the map, MID and RTX it also depends on change only by
/// a negotiation, which empties the cache).
fn cached_extensions(
    cache: &mut Vec<(ExtensionValues, Option<Arc<[u8]>>)>,
    rtc: &mut str0m::Rtc,
    mid: Option<str0m::media::Mid>,
    ssrc: str0m::rtp::Ssrc,
    values: &ExtensionValues,
) -> Option<Arc<[u8]>> {
    if let Some((_, block)) = cache.iter().find(|(v, _)| v == values) {
        return block.clone();
    }
    let block: Option<Arc<[u8]>> =
        crate::fec::libwebrtc_extensions_for(rtc, mid, ssrc, values).map(Arc::from);
    if cache.len() >= EXT_CACHE {
        cache.remove(0);
    }
    cache.push((values.clone(), block.clone()));
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(layer: usize, seq: u64, ts: u32, key: bool, pic: u16, at: Instant) -> InPacket {
        InPacket {
            layer,
            seq,
            ts,
            keyframe_start: key,
            picture_id: Some(pic),
            tl0: None,
            arrival: at,
        }
    }

    #[test]
    fn waits_for_a_keyframe_then_forwards_contiguously() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        assert!(
            f.handle(&pkt(0, 10, 1000, true, 5, t0)).is_none(),
            "no target yet"
        );
        f.set_target(Some(0));
        assert_eq!(f.wants_keyframe(), Some(0));
        assert!(f.handle(&pkt(0, 11, 1000, false, 5, t0)).is_none());
        let a = f.handle(&pkt(0, 12, 4000, true, 6, t0)).unwrap();
        assert!(a.switched);
        assert_eq!(a.seq, 1);
        let b = f.handle(&pkt(0, 13, 4000, false, 6, t0)).unwrap();
        assert_eq!((b.seq, b.ts, b.switched), (2, a.ts, false));
        assert_eq!(f.wants_keyframe(), None);
    }

    #[test]
    fn layer_switch_rebases_seq_timestamp_and_picture_id() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(2));
        let first = f.handle(&pkt(2, 500, 90_000, true, 100, t0)).unwrap();
        let last = f.handle(&pkt(2, 501, 93_000, false, 101, t0)).unwrap();
        f.set_target(Some(0));
        // Packets of the old layer stop being forwarded only at the new layer's keyframe.
        assert!(f.handle(&pkt(0, 70, 7_000_000, false, 9000, t0)).is_none());
        assert!(f.handle(&pkt(2, 502, 96_000, false, 102, t0)).is_some());
        let t1 = t0 + Duration::from_millis(33);
        let sw = f.handle(&pkt(0, 71, 7_003_000, true, 9001, t1)).unwrap();
        assert!(sw.switched);
        assert_eq!(sw.seq, 4, "continues after the last forwarded packet");
        assert_eq!(sw.ts, last.ts.wrapping_add(3000 + 2970));
        assert_eq!(sw.picture_id, Some(103));
        assert!(f.handle(&pkt(2, 503, 99_000, false, 103, t1)).is_none());
        assert_eq!(first.seq, 1);
    }

    #[test]
    fn late_packets_from_before_the_switch_are_dropped() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(1));
        f.handle(&pkt(1, 1000, 0, true, 1, t0)).unwrap();
        assert!(f.handle(&pkt(1, 999, 0, false, 0, t0)).is_none());
    }

    #[test]
    fn wraps_picture_id_and_timestamp() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(0));
        let a = f.handle(&pkt(0, 1, u32::MAX, true, PIC_MASK, t0)).unwrap();
        let b = f.handle(&pkt(0, 2, 10, false, 0, t0)).unwrap();
        assert_eq!(a.picture_id, Some(PIC_MASK));
        assert_eq!(b.picture_id, Some(0));
        assert_eq!(b.ts, 10);
    }

    #[test]
    fn inserted_packets_shift_later_ones_and_late_ones_keep_their_place() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(0));
        assert_eq!(f.insert_packet(), None, "nothing forwarded yet");
        assert_eq!(f.handle(&pkt(0, 100, 0, true, 1, t0)).unwrap().seq, 1);
        assert_eq!(f.handle(&pkt(0, 102, 0, false, 1, t0)).unwrap().seq, 3);
        assert_eq!(f.insert_packet(), Some(4));
        assert_eq!(f.handle(&pkt(0, 103, 0, false, 1, t0)).unwrap().seq, 5);
        // 101 was late (a retransmission from the publisher): its place is before the
        // inserted packet.
        assert_eq!(f.handle(&pkt(0, 101, 0, false, 1, t0)).unwrap().seq, 2);
        for i in 0..RECENT_INSERTS as u64 {
            f.handle(&pkt(0, 104 + i, 0, false, 1, t0)).unwrap();
            f.insert_packet().unwrap();
        }
        assert!(
            f.handle(&pkt(0, 102, 0, false, 1, t0)).is_none(),
            "too old to place among the insertions"
        );
    }

    #[test]
    fn pausing_stops_forwarding() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(48_000);
        f.set_target(Some(0));
        assert!(f.handle(&pkt(0, 1, 0, true, 0, t0)).is_some());
        f.set_target(None);
        assert!(f.handle(&pkt(0, 2, 960, true, 0, t0)).is_none());
    }
}
