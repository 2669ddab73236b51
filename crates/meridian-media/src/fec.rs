//! Video forward error correction: ULPFEC (RFC 5109) carried in RED (RFC 2198), as
//! Chromium negotiates it for video (`red/90000` + `ulpfec/90000`).
//!
//! Pure and Sans-IO: packets in, packets out, no clock.
//!
//! * [`FecEncoder`] takes one subscriber's outgoing video packets (after the node's
//!   rewrite) and, every [`FecEncoder::group`] packets or at the end of a frame,
//!   returns one ULPFEC packet: the XOR parity of the group (level 0, one mask).
//!   Any one packet of a group lost on the way is rebuilt by the receiver from the
//!   others and the parity, without a retransmission.
//! * [`FecDecoder`] is the receiving side: it keeps the latest media and FEC packets
//!   of one stream and returns every packet it can rebuild.
//! * [`group_for_loss`] turns a subscriber's measured loss into a group size (the
//!   protection rate follows the loss), and [`fec_bps`] what that costs.
//! * [`red_wrap`] / [`red_unwrap`] are the one-block RED encapsulation that carries
//!   both media and FEC on the video payload type `red/90000`.
//!
//! What is protected depends on the receiver ([`FecEncoder::new`]):
//!
//! * Meridian's Rust client and load generator (codec name [`WIRE_CODEC`]): payload
//!   type, marker, timestamp and payload. Header extensions and CSRCs are not
//!   covered (the FEC header's X and CC recovery fields are 0).
//! * Browsers (`red/90000` + `ulpfec/90000`): what libwebrtc's ULPFEC receiver XORs,
//!   the whole packet after its 12-byte fixed header — the header extension block
//!   as str0m will serialize it, with the values libwebrtc zeroes before FEC
//!   (transport-wide sequence number, abs-send-time, transmission offset) zeroed —
//!   then the payload; [`libwebrtc_extensions`] builds that block. The X recovery bit
//!   and the length recovery field then cover the extension block too
//!   (RFC 5109 §7.3), and a browser rebuilds a lost packet byte for byte.

use std::collections::VecDeque;
use std::sync::Arc;

use str0m::Rtc;
use str0m::format::{CodecConfig, FormatParams};
use str0m::media::{Frequency, Mid, Rid};
use str0m::rtp::{Extension, ExtensionMap, ExtensionValues, Ssrc};

/// Payload type of the RED stream that carries a subscriber's video and its ULPFEC.
pub const RED_PT: u8 = 40;
/// Payload type of that RED stream's retransmissions (RTX, `apt=40`).
pub const RED_RTX_PT: u8 = 41;
/// Block payload type of ULPFEC inside RED; offered to browsers as `ulpfec/90000`
/// (str0m never sends it as an RTP payload type, so it is not in str0m's codecs).
pub const ULPFEC_PT: u8 = 42;
/// The codec name Meridian's Rust receivers answer for [`RED_PT`]: their FEC does not
/// cover header extensions (see the module doc). The node offers `red/90000` and
/// tells the two kinds of receivers apart by the name in the answer
/// ([`answer_is_standard`]).
pub const WIRE_CODEC: &str = "x-meridian-fec-red";
/// The codec str0m is told [`RED_PT`] is (str0m 0.25 negotiates RED for audio only):
/// VP9, which Meridian does not forward. [`sdp_to_wire`] and [`sdp_from_wire`]
/// rename it.
const LOCAL_CODEC: &str = "VP9";

/// Adds the RED-with-ULPFEC payload type to a peer connection's codecs, so it can be
/// offered or answered (with [`sdp_to_wire`] / [`sdp_from_wire`] around the SDP).
pub fn add_codec(codecs: &mut CodecConfig) {
    codecs.add_config(
        RED_PT.into(),
        Some(RED_RTX_PT.into()),
        str0m::format::Codec::Vp9,
        Frequency::NINETY_KHZ,
        None,
        FormatParams::default(),
    );
}

/// Whether `pts`, a media section's negotiated payload types, include the
/// RED-with-ULPFEC one.
pub fn negotiated(pts: &[str0m::media::Pt]) -> bool {
    pts.iter().any(|pt| **pt == RED_PT)
}

fn rename(sdp: &str, from: &str, to: &str) -> String {
    let needle = format!("a=rtpmap:{RED_PT} {from}/");
    sdp.replace(&needle, &format!("a=rtpmap:{RED_PT} {to}/"))
}

/// An SDP from this side's str0m as it goes on the wire to another Meridian peer (the
/// Rust client's answer): the placeholder codec of [`RED_PT`] named [`WIRE_CODEC`].
pub fn sdp_to_wire(sdp: &str) -> String {
    rename(sdp, LOCAL_CODEC, WIRE_CODEC)
}

/// The node's subscriber offer as it goes on the wire: [`RED_PT`] named `red/90000`
/// and, in each video section that has it, `ulpfec/90000` on [`ULPFEC_PT`], as
/// Chromium offers them. A browser that decodes ULPFEC keeps both in its answer;
/// Meridian's Rust client answers [`WIRE_CODEC`].
pub fn offer_to_wire(sdp: &str) -> String {
    let sdp = rename(sdp, LOCAL_CODEC, "red");
    let red = format!("a=rtpmap:{RED_PT} red/90000");
    let mut out = String::with_capacity(sdp.len() + 64);
    for line in sdp.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\r', '\n']);
        let eol = &line[bare.len()..];
        if bare.starts_with("m=video ") && bare.split(' ').skip(3).any(|t| t == "40") {
            out.push_str(bare);
            out.push_str(&format!(" {ULPFEC_PT}"));
            out.push_str(eol);
        } else if bare == red {
            out.push_str(line);
            out.push_str(&format!("a=rtpmap:{ULPFEC_PT} ulpfec/90000"));
            out.push_str(if eol.is_empty() { "\r\n" } else { eol });
        } else {
            out.push_str(line);
        }
    }
    out
}

/// An SDP from the wire as this side's str0m must read it: [`RED_PT`], named
/// `red/90000` (node offers, browser answers) or [`WIRE_CODEC`] (Rust client
/// answers), becomes the placeholder again, and [`ULPFEC_PT`] is taken out of the
/// video sections (str0m need not know it).
pub fn sdp_from_wire(sdp: &str) -> String {
    let sdp = rename(&rename(sdp, WIRE_CODEC, LOCAL_CODEC), "red", LOCAL_CODEC);
    let pt = ULPFEC_PT.to_string();
    let own = [
        format!("a=rtpmap:{pt} "),
        format!("a=fmtp:{pt} "),
        format!("a=rtcp-fb:{pt} "),
    ];
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\r', '\n']);
        let eol = &line[bare.len()..];
        if own.iter().any(|o| bare.starts_with(o.as_str())) {
            continue;
        }
        if bare.starts_with("m=video ") {
            let kept: Vec<&str> = bare
                .split(' ')
                .enumerate()
                .filter(|(i, t)| *i < 3 || *t != pt)
                .map(|(_, t)| t)
                .collect();
            out.push_str(&kept.join(" "));
            out.push_str(eol);
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Whether an answer to the node's subscriber offer took [`RED_PT`] as standard
/// `red/90000` with `ulpfec/90000` (a browser: its FEC must cover header extensions,
/// see [`libwebrtc_extensions`]) rather than as [`WIRE_CODEC`].
pub fn answer_is_standard(sdp: &str) -> bool {
    sdp.contains(&format!("a=rtpmap:{RED_PT} red/90000"))
        && sdp.contains(&format!("a=rtpmap:{ULPFEC_PT} ulpfec/90000"))
}

/// What a packet's header extensions are, as str0m 0.25 will write them, to be
/// protected for a libwebrtc receiver.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingExtensions<'a> {
    /// The media section's negotiated extensions (`Media::remote_extmap`), which str0m
    /// writes with (`Session::poll_packet`).
    pub map: &'a ExtensionMap,
    /// The values the node passes to `write_rtp`.
    pub values: &'a ExtensionValues,
    /// The section's MID and the stream's RID, when str0m attaches them (see
    /// [`mid_always_attached`]).
    pub mid: Option<Mid>,
    /// The stream's RID, written with the MID.
    pub rid: Option<Rid>,
}

/// Whether str0m 0.25 writes the MID (and RID) on every packet of a stream: true when
/// the stream has an RTX SSRC. str0m stops writing them after the first receiver
/// report for the stream (`remote_acked_ssrc`), but it sets that flag only for a
/// stream without RTX (`StreamTx::handle_rtcp`, send.rs lines 1021-1030: the check of
/// the media SSRC is the `else` branch of the RTX one). A stream without RTX drops
/// the MID at a moment the node cannot see, so it gets no libwebrtc FEC.
pub fn mid_always_attached(has_rtx: bool) -> bool {
    has_rtx
}

/// The bytes after a packet's 12-byte fixed header as a libwebrtc ULPFEC receiver
/// XORs them, for a packet the node writes with `ext` (no CSRCs): the header
/// extension block exactly as str0m 0.25 serializes it — `RtpHeader::write_to`
/// (header.rs lines 60-78: form, 4-byte block header, elements, zero padding to 4
/// bytes) and `ExtensionMap::write_to` / `Extension::write_to` (ext.rs lines 528-570
/// and 624-760: elements in id order, one-byte form unless an id exceeds 14) — with
/// abs-send-time and the transport-wide sequence number, which str0m fills at send
/// time and libwebrtc zeroes before FEC (`RtpPacket::ZeroMutableExtensions`), as
/// zeros. `None` when the map holds an extension whose bytes cannot be known here.
pub fn libwebrtc_extensions(ext: OutgoingExtensions<'_>) -> Option<Vec<u8>> {
    const MAX_ID_ONE_BYTE: u8 = 14;
    let mut elements: Vec<(u8, Vec<u8>)> = Vec::new();
    for (id, e) in ext.map.iter() {
        let v = ext.values;
        let data: Option<Vec<u8>> = match e {
            // Filled by str0m at send time whenever negotiated; zeroed by libwebrtc.
            Extension::AbsoluteSendTime => Some(vec![0; 3]),
            Extension::TransportSequenceNumber => Some(vec![0; 2]),
            Extension::TransmissionTimeOffset => v.tx_time_offs.map(|_| vec![0; 4]),
            Extension::RtpMid => ext.mid.map(|m| m.as_bytes().to_vec()),
            Extension::RtpStreamId => ext.rid.map(|r| r.as_bytes().to_vec()),
            Extension::RepairedRtpStreamId => None,
            Extension::VideoOrientation => v.video_orientation.map(|o| vec![o as u8]),
            Extension::AudioLevel => match (v.audio_level, v.voice_activity) {
                (Some(l), Some(a)) => {
                    Some(vec![if a { 0x80 } else { 0 } | (l.unsigned_abs() & 0x7f)])
                }
                _ => None,
            },
            Extension::VideoContentType => v.video_content_type.map(|c| vec![c]),
            Extension::ColorSpace => None,
            // Written only with values the node never sets: absent, they are skipped.
            Extension::PlayoutDelay if v.play_delay_min.is_none() || v.play_delay_max.is_none() => {
                None
            }
            Extension::VideoTiming if v.video_timing.is_none() => None,
            Extension::FrameMarking if v.frame_mark.is_none() => None,
            Extension::AbsoluteCaptureTime if v.abs_capture_time.is_none() => None,
            _ => return None,
        };
        if let Some(d) = data {
            elements.push((id, d));
        }
    }
    let two_byte = ext.map.iter().any(|(id, _)| id > MAX_ID_ONE_BYTE);
    let mut body = Vec::with_capacity(32);
    for (id, d) in &elements {
        if two_byte {
            body.push(*id);
            body.push(d.len() as u8);
        } else {
            if d.is_empty() || d.len() > 16 {
                return None;
            }
            body.push((id << 4) | (d.len() as u8 - 1));
        }
        body.extend_from_slice(d);
    }
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(if two_byte {
        &[0x10, 0x00]
    } else {
        &[0xbe, 0xde]
    });
    out.extend_from_slice(&((body.len() / 4) as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

/// [`libwebrtc_extensions`] for a packet the node writes with `values` to the stream
/// `ssrc` of media section `mid` on `rtc`: `None` when those bytes cannot be known
/// (no such stream or section, no RTX, see [`mid_always_attached`]).
pub fn libwebrtc_extensions_for(
    rtc: &mut Rtc,
    mid: Option<Mid>,
    ssrc: Ssrc,
    values: &ExtensionValues,
) -> Option<Vec<u8>> {
    let mid = mid?;
    let (rtx, rid) = {
        let mut api = rtc.direct_api();
        let tx = api.stream_tx(&ssrc)?;
        (tx.rtx().is_some(), tx.rid())
    };
    if !mid_always_attached(rtx) {
        return None;
    }
    libwebrtc_extensions(OutgoingExtensions {
        map: rtc.media(mid)?.remote_extmap(),
        values,
        mid: Some(mid),
        rid,
    })
}

/// Rewrites a VP8 payload descriptor's picture id and TL0PICIDX in place (what
/// str0m's VP8 patch does at send time for plain VP8, done here because the payload
/// goes out inside RED and FEC must protect the bytes sent). A descriptor without
/// those fields, or too short, is left as it is.
pub fn patch_vp8(payload: &mut [u8], picture_id: Option<u16>, tl0: Option<u8>) {
    let Some(&b0) = payload.first() else {
        return;
    };
    if b0 & 0x80 == 0 {
        return;
    }
    let Some(&b1) = payload.get(1) else {
        return;
    };
    let mut at = 2;
    if b1 & 0x80 != 0 {
        let Some(&m) = payload.get(at) else {
            return;
        };
        if m & 0x80 != 0 {
            if let (Some(pic), true) = (picture_id, payload.len() > at + 1) {
                payload[at] = 0x80 | ((pic >> 8) as u8 & 0x7f);
                payload[at + 1] = pic as u8;
            }
            at += 2;
        } else {
            if let Some(pic) = picture_id {
                payload[at] = pic as u8 & 0x7f;
            }
            at += 1;
        }
    }
    if b1 & 0x40 != 0
        && let (Some(t), Some(slot)) = (tl0, payload.get_mut(at))
    {
        *slot = t;
    }
}

/// Smallest group (one parity packet per two media packets: 50 % overhead).
pub const MIN_GROUP: usize = 2;
/// Largest group (the 16-bit mask of a short ULPFEC header).
pub const MAX_GROUP: usize = 16;
/// Loss below which no FEC is sent (NACK repairs it well enough).
pub const MIN_LOSS_FOR_FEC: f32 = 0.005;
/// Bytes of the ULPFEC header plus one short level-0 header.
const FEC_HEADER: usize = 10 + 4;
/// Largest protected payload accepted (a UDP datagram).
const MAX_PAYLOAD: usize = 1500;
/// Packets an encoder gathers waiting for a frame's end before it gives them up.
const MAX_PENDING: usize = 8 * MAX_GROUP;
/// Media packets a decoder keeps to rebuild from.
const DECODER_MEDIA: usize = 256;
/// FEC packets a decoder keeps waiting for their group.
const DECODER_FEC: usize = 32;

/// Why a RED or ULPFEC payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    /// A RED payload without a block, or with more than one (video RED has one).
    #[error("malformed video RED payload")]
    MalformedRed,
    /// A ULPFEC payload shorter than its headers, or with fields out of range.
    #[error("malformed ULPFEC payload")]
    MalformedFec,
    /// A protection length or payload over the datagram size.
    #[error("FEC payload too long")]
    TooLong,
}

/// Wraps a payload as single-block RED (`red/90000`): one header byte with the
/// block's payload type `pt` (F bit 0), then the payload.
pub fn red_wrap(pt: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(pt & 0x7f);
    out.extend_from_slice(payload);
    out
}

/// The block payload type and payload of a single-block RED payload.
pub fn red_unwrap(data: &[u8]) -> Result<(u8, &[u8]), FecError> {
    match data.split_first() {
        Some((&h, rest)) if h & 0x80 == 0 => Ok((h, rest)),
        _ => Err(FecError::MalformedRed),
    }
}

/// The group size for a subscriber that reports `loss` (fraction lost, 0..1): no FEC
/// under [`MIN_LOSS_FOR_FEC`], else about four times the loss in overhead (one
/// parity per `1 / (4 loss)` packets), between [`MIN_GROUP`] and [`MAX_GROUP`].
pub fn group_for_loss(loss: f32) -> Option<usize> {
    if loss.is_nan() || loss < MIN_LOSS_FOR_FEC {
        return None;
    }
    let group = (1.0 / (4.0 * loss)).round() as usize;
    Some(group.clamp(MIN_GROUP, MAX_GROUP))
}

/// A subscriber stream's loss as FEC must see it, from the sender's statistics.
///
/// A receiver report's fraction lost counts retransmitted packets as received, so
/// once NACK repairs the loss it reports almost none; the NACKs the subscriber sent
/// for the packets the node sent in the same interval show the loss on the path.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossMeter {
    last: Option<(u64, u64)>,
}

impl LossMeter {
    /// Takes the stream's cumulative packets sent and NACKs received, and the latest
    /// receiver report's loss; returns the larger of that and the NACKed share of the
    /// packets sent since the previous call.
    pub fn update(&mut self, packets: u64, nacks: u64, reported: Option<f32>) -> f32 {
        let nacked = match self.last {
            Some((p0, n0)) if packets > p0 => {
                (nacks.saturating_sub(n0) as f32 / (packets - p0) as f32).min(1.0)
            }
            _ => 0.0,
        };
        self.last = Some((packets, nacks));
        nacked.max(reported.unwrap_or(0.0))
    }
}

/// The bitrate FEC adds to `media_bps` of video with one parity packet per `group`
/// media packets (parity packets are as long as the longest in their group, so this
/// slightly underestimates; the headers are a few bytes).
pub fn fec_bps(media_bps: u64, group: Option<usize>) -> u64 {
    match group {
        Some(g) if g > 0 => media_bps / g as u64,
        _ => 0,
    }
}

/// One media packet as protected: header fields that FEC recovers and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub ts: u32,
    /// Payload type of the media (not of RED).
    pub pt: u8,
    /// RTP marker bit.
    pub marker: bool,
    /// The bytes between the 12-byte fixed header and the payload as the receiver's
    /// FEC sees them: empty for Meridian's receivers, the extension block from
    /// [`libwebrtc_extensions`] for a browser. Protected like the payload, before it.
    /// Shared: the node writes the same block on most packets of a stream.
    pub ext: Arc<[u8]>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl MediaPacket {
    /// Length of the protected bytes after the fixed header.
    fn protected_len(&self) -> usize {
        self.ext.len() + self.payload.len()
    }

    /// The protected bytes after the fixed header.
    fn protected(&self) -> impl Iterator<Item = &u8> {
        self.ext.iter().chain(&self.payload)
    }

    /// The first header byte's P, X and CC bits (X set when there is an extension block).
    fn pxcc(&self) -> u8 {
        if self.ext.is_empty() { 0 } else { 0x10 }
    }
}

/// A parsed ULPFEC payload (level 0, short or long mask).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FecPacket {
    pt_recovery: u8,
    marker_recovery: bool,
    sn_base: u16,
    ts_recovery: u32,
    length_recovery: u16,
    /// Protected sequence numbers, from the mask.
    protected: Vec<u16>,
    /// Level-0 parity, `protection length` bytes.
    parity: Vec<u8>,
}

impl FecPacket {
    fn parse(data: &[u8]) -> Result<FecPacket, FecError> {
        if data.len() < FEC_HEADER {
            return Err(FecError::MalformedFec);
        }
        // E must be 0; P, X and CC recovery are not used by this node (its packets
        // have no padding, no extensions in the protected view, no CSRCs).
        if data[0] & 0x80 != 0 {
            return Err(FecError::MalformedFec);
        }
        let long = data[0] & 0x40 != 0;
        let mask_len = if long { 6 } else { 2 };
        let level0 = 10;
        let header_len = level0 + 2 + mask_len;
        if data.len() < header_len {
            return Err(FecError::MalformedFec);
        }
        let protection_len = u16::from_be_bytes([data[level0], data[level0 + 1]]) as usize;
        if protection_len > MAX_PAYLOAD {
            return Err(FecError::TooLong);
        }
        let parity = data
            .get(header_len..header_len + protection_len)
            .ok_or(FecError::MalformedFec)?;
        let sn_base = u16::from_be_bytes([data[2], data[3]]);
        let mut protected = Vec::new();
        for (i, byte) in data[level0 + 2..header_len].iter().enumerate() {
            for bit in 0..8 {
                if byte & (0x80 >> bit) != 0 {
                    protected.push(sn_base.wrapping_add((i * 8 + bit) as u16));
                }
            }
        }
        if protected.is_empty() {
            return Err(FecError::MalformedFec);
        }
        let length_recovery = u16::from_be_bytes([data[8], data[9]]);
        if length_recovery as usize > protection_len {
            return Err(FecError::MalformedFec);
        }
        Ok(FecPacket {
            pt_recovery: data[1] & 0x7f,
            marker_recovery: data[1] & 0x80 != 0,
            sn_base,
            ts_recovery: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
            length_recovery,
            protected,
            parity: parity.to_vec(),
        })
    }
}

/// Builds the ULPFEC payload protecting `group` (consecutive sequence numbers
/// starting at the first; at most [`MAX_GROUP`]).
fn encode_group(group: &[MediaPacket]) -> Option<Vec<u8>> {
    let first = group.first()?;
    if group.len() > MAX_GROUP {
        return None;
    }
    let protection_len = group.iter().map(MediaPacket::protected_len).max()?;
    let mut pxcc = 0u8;
    let mut pt_m = 0u8;
    let mut ts = 0u32;
    let mut len = 0u16;
    let mut mask = 0u16;
    let mut parity = vec![0u8; protection_len];
    for p in group {
        pxcc ^= p.pxcc();
        pt_m ^= (p.pt & 0x7f) | if p.marker { 0x80 } else { 0 };
        ts ^= p.ts;
        len ^= p.protected_len() as u16;
        let offset = p.seq.wrapping_sub(first.seq) as usize;
        if offset >= MAX_GROUP {
            return None;
        }
        mask |= 0x8000 >> offset;
        for (x, y) in parity.iter_mut().zip(p.protected()) {
            *x ^= *y;
        }
    }
    let mut out = Vec::with_capacity(FEC_HEADER + protection_len);
    out.push(pxcc & 0x3f); // E=0, L=0 (short mask), P, X and CC recovery
    out.push(pt_m);
    out.extend_from_slice(&first.seq.to_be_bytes());
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&(protection_len as u16).to_be_bytes());
    out.extend_from_slice(&mask.to_be_bytes());
    out.extend_from_slice(&parity);
    Some(out)
}

/// Makes ULPFEC for one outgoing video stream.
#[derive(Debug, Default, Clone)]
pub struct FecEncoder {
    /// The receiver XORs header extensions too (a browser's libwebrtc).
    libwebrtc: bool,
    /// Media packets per parity packet; `None` sends no FEC.
    group: Option<usize>,
    pending: Vec<MediaPacket>,
}

impl FecEncoder {
    /// The current group size (`None`: FEC off).
    pub fn group(&self) -> Option<usize> {
        self.group
    }

    /// An encoder whose parity a libwebrtc receiver (a browser) decodes when
    /// `libwebrtc`: the caller then passes each packet's extension block in
    /// [`MediaPacket::ext`]. Otherwise for Meridian's receivers (`ext` empty).
    pub fn new(libwebrtc: bool) -> FecEncoder {
        FecEncoder {
            libwebrtc,
            ..FecEncoder::default()
        }
    }

    /// Whether this encoder's receiver is a libwebrtc one (see [`FecEncoder::new`]).
    pub fn libwebrtc(&self) -> bool {
        self.libwebrtc
    }

    /// Drops the packets gathered, unprotected: the caller writes one whose
    /// protected bytes it cannot know (its group must not include it).
    pub fn skip(&mut self) {
        self.pending.clear();
    }

    /// Sets the group size (see [`group_for_loss`]); it applies from the next group.
    pub fn set_group(&mut self, group: Option<usize>) {
        self.group = group.map(|g| g.clamp(MIN_GROUP, MAX_GROUP));
        if self.group.is_none() {
            self.pending.clear();
        }
    }

    /// Takes the next media packet written to the stream; returns the ULPFEC payloads
    /// to send right after it. Parity goes out only after a frame's last packet
    /// (marker), so it never splits a frame's sequence numbers: once at least half a
    /// group has gathered, the packets gathered are cut into groups of at most
    /// `group` and each gets one parity packet. A gap in sequence numbers (a packet
    /// written out of order) drops what was gathered, unprotected.
    pub fn push(&mut self, packet: MediaPacket) -> Vec<Vec<u8>> {
        let Some(group) = self.group else {
            return Vec::new();
        };
        if packet.protected_len() > MAX_PAYLOAD {
            self.pending.clear();
            return Vec::new();
        }
        if let Some(last) = self.pending.last()
            && packet.seq != last.seq.wrapping_add(1)
        {
            self.pending.clear();
        }
        let marker = packet.marker;
        self.pending.push(packet);
        if self.pending.len() >= MAX_PENDING {
            self.pending.clear();
            return Vec::new();
        }
        if !marker || self.pending.len() * 2 < group {
            return Vec::new();
        }
        let pending = std::mem::take(&mut self.pending);
        let groups = pending.len().div_ceil(group);
        let size = pending.len().div_ceil(groups);
        pending.chunks(size).filter_map(encode_group).collect()
    }
}

/// Rebuilds lost media packets of one stream from ULPFEC.
#[derive(Debug, Default, Clone)]
pub struct FecDecoder {
    media: VecDeque<MediaPacket>,
    fec: VecDeque<FecPacket>,
    /// Packets rebuilt so far.
    pub recovered: u64,
    /// FEC payloads refused as malformed.
    pub malformed: u64,
    /// Newest sequence number a FEC packet protected.
    protected_end: Option<u16>,
    /// Sequence numbers found to be parity packets (lost ones among them), for the
    /// caller to drain: its playout must not wait for them.
    pub lost_parity: Vec<u16>,
}

impl FecDecoder {
    fn has(&self, seq: u16) -> bool {
        self.media.iter().any(|m| m.seq == seq)
    }

    /// Takes a media packet that arrived; returns packets it lets FEC rebuild.
    pub fn on_media(&mut self, packet: MediaPacket) -> Vec<MediaPacket> {
        if self.has(packet.seq) {
            return Vec::new();
        }
        self.remember(packet);
        self.recover()
    }

    /// Takes a ULPFEC payload that arrived; returns the packets it rebuilds.
    pub fn on_fec(&mut self, data: &[u8]) -> Result<Vec<MediaPacket>, FecError> {
        let fec = FecPacket::parse(data).inspect_err(|_| self.malformed += 1)?;
        // Parity follows a frame's last packet and the next group starts right after
        // it: what lies between the previous group's end and this group's start is
        // parity (this one's arrival is the caller's to note).
        let end = *fec.protected.last().expect("parse refuses an empty mask");
        if let Some(prev) = self.protected_end {
            let gap = fec.sn_base.wrapping_sub(prev);
            if (2..=MAX_GROUP as u16).contains(&gap) && self.lost_parity.len() < DECODER_FEC {
                let parity: Vec<u16> = (1..gap)
                    .map(|i| prev.wrapping_add(i))
                    .filter(|s| !self.has(*s))
                    .collect();
                self.lost_parity.extend(parity);
            }
        }
        if self
            .protected_end
            .is_none_or(|prev| end.wrapping_sub(prev) as i16 > 0)
        {
            self.protected_end = Some(end);
        }
        if self.fec.len() >= DECODER_FEC {
            self.fec.pop_front();
        }
        self.fec.push_back(fec);
        Ok(self.recover())
    }

    fn remember(&mut self, packet: MediaPacket) {
        if self.media.len() >= DECODER_MEDIA {
            self.media.pop_front();
        }
        self.media.push_back(packet);
    }

    /// Rebuilds every packet that is the only one missing from a kept FEC group,
    /// repeatedly (a rebuilt packet can complete another group).
    fn recover(&mut self) -> Vec<MediaPacket> {
        let mut out = Vec::new();
        loop {
            let mut progress = false;
            let mut i = 0;
            while i < self.fec.len() {
                let missing: Vec<u16> = self.fec[i]
                    .protected
                    .iter()
                    .copied()
                    .filter(|s| !self.has(*s))
                    .collect();
                match missing.as_slice() {
                    [] => {
                        self.fec.remove(i);
                    }
                    [seq] => {
                        let fec = self.fec.remove(i).expect("index in range");
                        if let Some(p) = self.rebuild(&fec, *seq) {
                            self.recovered += 1;
                            self.remember(p.clone());
                            out.push(p);
                            progress = true;
                        }
                    }
                    _ => i += 1,
                }
            }
            if !progress {
                return out;
            }
        }
    }

    fn rebuild(&self, fec: &FecPacket, seq: u16) -> Option<MediaPacket> {
        let mut pt_m = fec.pt_recovery | if fec.marker_recovery { 0x80 } else { 0 };
        let mut ts = fec.ts_recovery;
        let mut len = fec.length_recovery;
        let mut payload = fec.parity.clone();
        for s in fec.protected.iter().filter(|s| **s != seq) {
            let p = self.media.iter().find(|m| m.seq == *s)?;
            if p.protected_len() > payload.len() {
                return None; // not the packet this FEC protected
            }
            pt_m ^= (p.pt & 0x7f) | if p.marker { 0x80 } else { 0 };
            ts ^= p.ts;
            len ^= p.protected_len() as u16;
            for (x, y) in payload.iter_mut().zip(p.protected()) {
                *x ^= *y;
            }
        }
        let len = len as usize;
        if len > payload.len() {
            return None;
        }
        payload.truncate(len);
        Some(MediaPacket {
            seq,
            ts,
            pt: pt_m & 0x7f,
            marker: pt_m & 0x80 != 0,
            ext: Arc::from(Vec::new()),
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u16, len: usize, marker: bool) -> MediaPacket {
        MediaPacket {
            seq,
            ts: 90_000 + u32::from(seq / 4) * 3000,
            pt: 96,
            marker,
            ext: Arc::from(Vec::new()),
            payload: (0..len).map(|i| (i as u16 ^ seq) as u8).collect(),
        }
    }

    #[test]
    fn any_one_lost_packet_of_a_group_is_rebuilt_exactly() {
        // Sequence numbers wrap inside the group.
        let packets: Vec<MediaPacket> = (0..6u16)
            .map(|i| packet(65533u16.wrapping_add(i), 300 + 97 * i as usize, i == 5))
            .collect();
        let mut enc = FecEncoder::default();
        enc.set_group(Some(6));
        let mut fec = Vec::new();
        for p in &packets {
            fec.extend(enc.push(p.clone()));
        }
        assert_eq!(fec.len(), 1, "one group, one parity packet");
        let fec = &fec[0];
        for lost in 0..packets.len() {
            let mut dec = FecDecoder::default();
            let mut got = Vec::new();
            for (i, p) in packets.iter().enumerate() {
                if i != lost {
                    got.extend(dec.on_media(p.clone()));
                }
            }
            assert!(got.is_empty(), "nothing to rebuild before the FEC");
            let rebuilt = dec
                .on_fec(red_unwrap(&red_wrap(125, fec)).unwrap().1)
                .unwrap();
            assert_eq!(rebuilt, vec![packets[lost].clone()], "lost {lost}");
            assert_eq!(dec.recovered, 1);
        }
    }

    #[test]
    fn fec_arriving_before_the_rest_still_rebuilds() {
        let packets: Vec<MediaPacket> = (10..14).map(|s| packet(s, 200, s == 13)).collect();
        let mut enc = FecEncoder::default();
        enc.set_group(Some(4));
        let fec = packets.iter().flat_map(|p| enc.push(p.clone())).last();
        let mut dec = FecDecoder::default();
        assert!(dec.on_fec(&fec.unwrap()).unwrap().is_empty());
        assert!(dec.on_media(packets[0].clone()).is_empty());
        assert!(dec.on_media(packets[3].clone()).is_empty());
        let rebuilt = dec.on_media(packets[2].clone());
        assert_eq!(rebuilt, vec![packets[1].clone()]);
    }

    #[test]
    fn sequence_numbers_between_groups_are_parity() {
        let mut enc = FecEncoder::default();
        enc.set_group(Some(4));
        let mut dec = FecDecoder::default();
        let mut seq = 100u16;
        let mut parities = Vec::new();
        for frame in 0..2 {
            for i in 0..4 {
                let p = packet(seq, 60, i == 3);
                seq += 1;
                dec.on_media(p.clone());
                for f in enc.push(p) {
                    parities.push((seq, f, frame));
                    seq += 1;
                }
            }
        }
        assert_eq!(
            parities.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![104, 109]
        );
        // The first group's parity (seq 104) is lost: the second one's, protecting
        // 105..=108, names 104 as parity once the decoder knows where a group ended.
        dec.on_fec(&parities[1].1).unwrap();
        assert!(
            dec.lost_parity.is_empty(),
            "no earlier group to measure from"
        );
        let mut dec = FecDecoder::default();
        dec.on_fec(&parities[0].1).unwrap();
        dec.on_fec(&parities[1].1).unwrap();
        assert_eq!(dec.lost_parity, vec![104]);
    }

    #[test]
    fn two_losses_in_a_group_are_not_rebuilt() {
        let packets: Vec<MediaPacket> = (0..4).map(|s| packet(s, 100, s == 3)).collect();
        let mut enc = FecEncoder::default();
        enc.set_group(Some(4));
        let fec = packets.iter().flat_map(|p| enc.push(p.clone())).last();
        let mut dec = FecDecoder::default();
        dec.on_media(packets[0].clone());
        dec.on_media(packets[1].clone());
        assert!(dec.on_fec(&fec.unwrap()).unwrap().is_empty());
        assert_eq!(dec.recovered, 0);
    }

    #[test]
    fn parity_follows_frame_ends_only_and_big_frames_get_several() {
        let mut enc = FecEncoder::default();
        enc.set_group(Some(8));
        for s in 0..9 {
            assert!(enc.push(packet(s, 50, false)).is_empty(), "mid-frame: none");
        }
        // A frame of 10 packets: two groups of 5, two parity packets after it.
        let fec = enc.push(packet(9, 50, true));
        assert_eq!(fec.len(), 2);
        let groups: Vec<Vec<u16>> = fec
            .iter()
            .map(|f| FecPacket::parse(f).unwrap().protected)
            .collect();
        assert_eq!(
            groups,
            vec![(0..5).collect::<Vec<u16>>(), (5..10).collect()]
        );
        // A one-packet frame waits for half a group.
        for s in 10..13 {
            assert!(enc.push(packet(s, 50, true)).is_empty());
        }
        assert_eq!(enc.push(packet(13, 50, true)).len(), 1, "4 of 8 gathered");
        // A gap drops what was gathered.
        for s in 14..17 {
            enc.push(packet(s, 50, true));
        }
        let fec = enc.push(packet(30, 50, true));
        assert!(fec.is_empty(), "gathered after the gap: 1 of 8");
        enc.set_group(None);
        assert!(enc.push(packet(31, 50, true)).is_empty(), "FEC off");
    }

    #[test]
    fn vp8_descriptor_fields_are_rewritten_in_place() {
        // X, I (15-bit picture id), L.
        let mut p = vec![0x90, 0xc0, 0x80 | 0x12, 0x34, 7, 0xaa];
        patch_vp8(&mut p, Some(0x0567), Some(9));
        assert_eq!(p, vec![0x90, 0xc0, 0x85, 0x67, 9, 0xaa]);
        // 7-bit picture id, no L.
        let mut p = vec![0x90, 0x80, 0x05, 0xaa];
        patch_vp8(&mut p, Some(0x0181), Some(9));
        assert_eq!(p, vec![0x90, 0x80, 0x01, 0xaa]);
        // No X: untouched; truncated: no panic.
        let mut p = vec![0x10, 0xaa];
        patch_vp8(&mut p, Some(1), Some(1));
        assert_eq!(p, vec![0x10, 0xaa]);
        for len in 0..4 {
            let mut p = vec![0xff; len];
            patch_vp8(&mut p, Some(1), Some(1));
        }
    }

    #[test]
    fn placeholder_codec_is_renamed_both_ways() {
        let local = "m=video 9 UDP/TLS/RTP/SAVPF 96 40 41\r\na=rtpmap:96 VP8/90000\r\n\
                     a=rtpmap:40 VP9/90000\r\na=rtpmap:41 rtx/90000\r\na=fmtp:41 apt=40\r\n";
        let wire = sdp_to_wire(local);
        assert!(wire.contains("a=rtpmap:40 x-meridian-fec-red/90000"));
        assert!(wire.contains("a=rtpmap:96 VP8/90000"));
        assert!(!answer_is_standard(&wire));
        assert_eq!(sdp_from_wire(&wire), local);
        // The node's offer: standard names, ULPFEC added to the section.
        let offer = offer_to_wire(local);
        assert!(offer.starts_with("m=video 9 UDP/TLS/RTP/SAVPF 96 40 41 42\r\n"));
        assert!(offer.contains("a=rtpmap:40 red/90000\r\na=rtpmap:42 ulpfec/90000\r\n"));
        assert!(answer_is_standard(&offer));
        assert_eq!(sdp_from_wire(&offer), local);
        // Audio RED on another payload type is left alone.
        let audio = "m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\na=rtpmap:63 red/48000/2\r\n";
        assert_eq!(offer_to_wire(audio), audio);
        assert_eq!(sdp_from_wire(audio), audio);
    }

    #[test]
    fn extension_block_is_written_as_str0m_writes_it() {
        let mid = Mid::from("0");
        let values = ExtensionValues::default();
        let ext = |map| OutgoingExtensions {
            map,
            values: &values,
            mid: Some(mid),
            rid: None,
        };
        // Chrome's ids (str0m's standard map): abs-send-time 2 and TWCC 3 as zeros,
        // MID 4; RID, repaired RID, orientation and audio level have no value here.
        // One-byte form, padded to 4 bytes.
        let standard = ExtensionMap::standard();
        assert_eq!(
            libwebrtc_extensions(ext(&standard)).unwrap(),
            vec![
                0xbe, 0xde, 0, 3, // profile, 3 words
                0x22, 0, 0, 0, // abs-send-time
                0x31, 0, 0, // transport-wide sequence number
                0x40, b'0', // MID
                0, 0, 0, // padding
            ]
        );
        // An id over 14 anywhere in the map: two-byte form for every element.
        let mut map = ExtensionMap::empty();
        map.set(3, Extension::TransportSequenceNumber);
        map.set(15, Extension::RtpMid);
        assert_eq!(
            libwebrtc_extensions(ext(&map)).unwrap(),
            vec![0x10, 0x00, 0, 2, 3, 2, 0, 0, 15, 1, b'0', 0]
        );
        // An empty block still has its 4-byte header (str0m always sets X).
        let mut map = ExtensionMap::empty();
        map.set(4, Extension::RtpMid);
        let none = OutgoingExtensions {
            map: &map,
            values: &values,
            mid: None,
            rid: None,
        };
        assert_eq!(libwebrtc_extensions(none).unwrap(), vec![0xbe, 0xde, 0, 0]);
        // A value whose bytes are not mirrored here: no block, so no browser FEC.
        let mut map = ExtensionMap::empty();
        map.set(5, Extension::FrameMarking);
        let marked = ExtensionValues {
            frame_mark: Some(7),
            ..ExtensionValues::default()
        };
        let e = OutgoingExtensions {
            map: &map,
            values: &marked,
            mid: None,
            rid: None,
        };
        assert_eq!(libwebrtc_extensions(e), None);
    }

    #[test]
    fn parity_for_a_browser_covers_the_extension_block() {
        let mut packets: Vec<MediaPacket> = (0..3u16).map(|s| packet(s, 40, s == 2)).collect();
        for p in &mut packets {
            p.ext = Arc::from(vec![0xbe, 0xde, 0, 1, 0x40, b'0', 0, 0]);
        }
        let mut enc = FecEncoder::new(true);
        assert!(enc.libwebrtc());
        enc.set_group(Some(3));
        let fec = packets.iter().flat_map(|p| enc.push(p.clone())).last();
        let fec = FecPacket::parse(&fec.unwrap()).unwrap();
        // Three packets with X set: X recovery 1; lengths and parity include the block.
        assert_eq!(fec.parity.len(), 48);
        assert_eq!(fec.length_recovery, 48);
        let mut enc = FecEncoder::new(true);
        enc.set_group(Some(3));
        let raw = packets.iter().flat_map(|p| enc.push(p.clone())).last();
        assert_eq!(raw.unwrap()[0], 0x10, "E 0, L 0, X recovery 1");
        // A packet whose block is unknown drops what was gathered.
        enc.push(packet(3, 40, false));
        enc.skip();
        assert!(enc.push(packet(4, 40, true)).is_empty(), "1 of 3 gathered");
    }

    #[test]
    fn loss_is_seen_through_nacks_when_reports_show_none() {
        let mut m = LossMeter::default();
        assert_eq!(m.update(1000, 10, None), 0.0, "no interval yet");
        assert!((m.update(2000, 40, Some(0.0)) - 0.03).abs() < 1e-6);
        assert_eq!(m.update(2000, 40, Some(0.05)), 0.05, "report larger");
        assert_eq!(m.update(2000, 90, None), 0.0, "nothing sent: no ratio");
    }

    #[test]
    fn protection_follows_loss() {
        assert_eq!(group_for_loss(0.0), None);
        assert_eq!(group_for_loss(f32::NAN), None);
        assert!(matches!(group_for_loss(0.02), Some(12 | 13)));
        assert_eq!(group_for_loss(0.025), Some(10));
        assert_eq!(group_for_loss(0.05), Some(5));
        assert_eq!(group_for_loss(0.5), Some(MIN_GROUP));
        assert_eq!(group_for_loss(0.006), Some(MAX_GROUP));
        assert_eq!(fec_bps(1_200_000, Some(12)), 100_000);
        assert_eq!(fec_bps(1_200_000, None), 0);
    }

    #[test]
    fn malformed_red_and_fec_are_refused_without_panicking() {
        assert_eq!(red_unwrap(&[]), Err(FecError::MalformedRed));
        assert_eq!(
            red_unwrap(&[0x80 | 96, 0, 0, 4]),
            Err(FecError::MalformedRed)
        );
        let mut dec = FecDecoder::default();
        assert_eq!(dec.on_fec(&[0; 5]), Err(FecError::MalformedFec));
        // Protection length past the end.
        let mut bad = vec![0u8; 14];
        bad[10] = 0x01;
        bad[12] = 0x80;
        assert_eq!(dec.on_fec(&bad), Err(FecError::MalformedFec));
        // Empty mask.
        assert_eq!(dec.on_fec(&[0u8; 14]), Err(FecError::MalformedFec));
        // Protection length over a datagram.
        bad[10] = 0xff;
        assert_eq!(dec.on_fec(&bad), Err(FecError::TooLong));
        assert_eq!(dec.malformed, 4);
        // Garbage of every short length and many byte patterns: an answer, never a
        // panic, and the decoder's state stays bounded.
        let mut x = 0x1234_5678u32;
        for len in 0..64 {
            for _ in 0..200 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let _ = dec.on_fec(&data);
                let _ = red_unwrap(&data);
            }
        }
        assert!(dec.fec.len() <= DECODER_FEC && dec.media.len() <= DECODER_MEDIA);
    }
}
