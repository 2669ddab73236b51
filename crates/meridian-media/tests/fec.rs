//! Video FEC (ULPFEC in RED, `meridian_media::fec`) through the node, in virtual time
//! with seeded loss: a subscriber that negotiated it gets a parity packet after each
//! group of its video packets and rebuilds lost ones from it. Its uplink is cut while
//! it loses packets, so no NACK reaches the node: every packet it rebuilds was
//! recovered without a retransmission.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Harness, MediaConfig, lossy};
use meridian_media::SfuConfig;

/// Runs 3 s of 5 % seeded downlink loss (uplink cut) on subscriber `s`; returns the
/// video sequence numbers that arrived and those FEC rebuilt.
fn under_loss(h: &mut Harness, s: usize) -> (BTreeSet<u16>, BTreeSet<u16>) {
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    h.impair(
        s,
        false,
        Some(lossy(0.05, Duration::from_millis(20), 21)),
        Some(lossy(1.0, Duration::from_millis(20), 22)),
    );
    let mark = h.clients[s].video_packets.len();
    h.run_for(Duration::from_secs(3));
    let mut arrived = BTreeSet::new();
    let mut rebuilt = BTreeSet::new();
    for &(_, seq, fec) in &h.clients[s].video_packets[mark..] {
        if fec {
            rebuilt.insert(seq);
        } else {
            arrived.insert(seq);
        }
    }
    (arrived, rebuilt)
}

#[test]
fn video_fec_rebuilds_lost_packets_without_retransmission() {
    // A 5 % loss floor: one parity packet per 5 video packets from the start (the cut
    // uplink carries no receiver reports).
    let mut h = Harness::with_config(|c| SfuConfig {
        fec_loss_floor: 0.05,
        ..c
    });
    h.add_publisher("room", "alice", MediaConfig::default());
    h.fec = true;
    let s = h.add_subscriber("room", "bob");
    let (arrived, rebuilt) = under_loss(&mut h, s);
    let stats = h.sfu.stats().clone();
    // Sequence numbers count parity packets too: the span of media seen is the
    // media packets sent (arrived or not) plus the parity packets among them.
    let (lo, hi) = (
        *arrived.iter().chain(&rebuilt).min().unwrap(),
        *arrived.iter().chain(&rebuilt).max().unwrap(),
    );
    assert!(hi > lo && hi - lo > 200, "3 s of video packets: {lo}..{hi}");
    let both: BTreeSet<u16> = arrived.intersection(&rebuilt).copied().collect();
    assert!(both.is_empty(), "rebuilt packets had not arrived: {both:?}");
    let got = arrived.len() + rebuilt.len();
    eprintln!(
        "video packets: {} arrived, {} rebuilt by FEC, {} FEC packets sent ({} bytes)",
        arrived.len(),
        rebuilt.len(),
        stats.fec_packets,
        stats.fec_bytes
    );
    assert!(
        rebuilt.len() >= 5,
        "5 % loss of ~{} packets: FEC rebuilt {}",
        got,
        rebuilt.len()
    );
    assert!(stats.fec_packets > 0);
    // Without FEC the rebuilt packets would be gone for good (no NACK reaches the
    // node). What neither arrived nor was rebuilt is a lost parity packet or a media
    // packet of a group that lost two: fewer than FEC rebuilt.
    let parity: BTreeSet<u16> = h.clients[s]
        .parity_packets
        .iter()
        .copied()
        .filter(|q| (lo..=hi).contains(q))
        .collect();
    let span = (hi - lo + 1) as usize;
    let missing = span - got - parity.len();
    eprintln!(
        "of {span} sequence numbers: {} media arrived, {} rebuilt, {} parity arrived, {missing} missing",
        arrived.len(),
        rebuilt.len(),
        parity.len()
    );
    assert!(
        missing < rebuilt.len(),
        "FEC rebuilt {} of the {} lost",
        rebuilt.len(),
        missing + rebuilt.len()
    );
}

#[test]
fn subscribers_without_fec_get_plain_video_and_no_parity() {
    let mut h = Harness::with_config(|c| SfuConfig {
        fec_loss_floor: 0.05,
        ..c
    });
    h.add_publisher("room", "alice", MediaConfig::default());
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(1));
    assert!(
        h.clients[s].video_frames().count() >= 20,
        "VP8 frames arrive"
    );
    assert_eq!(h.sfu.stats().fec_packets, 0);
}

/// The node's subscriber offer names the FEC stream as Chromium does, `red/90000` with
/// `ulpfec/90000`, and a Rust client's answer ([`meridian_media::fec::WIRE_CODEC`])
/// still gets the FEC made for it.
#[test]
fn the_offer_names_fec_as_browsers_do() {
    let mut h = Harness::new();
    h.add_publisher("room", "alice", MediaConfig::default());
    h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    let offers: Vec<&String> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            meridian_media::SfuEvent::SubscriberOffer { sdp, .. } => Some(sdp),
            _ => None,
        })
        .collect();
    assert!(!offers.is_empty());
    let pt = meridian_media::fec::RED_PT;
    let ulpfec = meridian_media::fec::ULPFEC_PT;
    for sdp in offers {
        assert!(sdp.contains(&format!("a=rtpmap:{pt} red/90000")), "{sdp}");
        assert!(
            sdp.contains(&format!("a=rtpmap:{ulpfec} ulpfec/90000")),
            "{sdp}"
        );
        assert!(!sdp.contains(&format!("a=rtpmap:{pt} VP9")), "{sdp}");
        assert!(!sdp.contains("x-meridian-fec-red"), "{sdp}");
    }
}

/// One RTP packet as libwebrtc's ULPFEC receiver keeps it
/// (`UlpfecReceiver::AddReceivedRedPacket`, then `ZeroMutableExtensions` in
/// `ProcessReceivedFec`): the header as received with the RED block's payload type in
/// place of RED's, the payload after the one-byte RED header, and the data of the
/// extensions it treats as mutable (`mutable` ids) zeroed.
fn libwebrtc_media(raw_header: &[u8], red_payload: &[u8], mutable: &[u8]) -> Vec<u8> {
    let mut data = raw_header.to_vec();
    data[1] = (data[1] & 0x80) | (red_payload[0] & 0x7f);
    data.extend_from_slice(&red_payload[1..]);
    zero_extensions(&mut data, raw_header.len(), mutable);
    data
}

/// Zeroes the data of the extensions whose ids are in `ids` (RFC 8285, both forms).
fn zero_extensions(data: &mut [u8], header_len: usize, ids: &[u8]) {
    if data[0] & 0x10 == 0 {
        return;
    }
    let start = 12 + 4 * usize::from(data[0] & 0x0f);
    let profile = u16::from_be_bytes([data[start], data[start + 1]]);
    let mut at = start + 4;
    while at < header_len {
        let (id, len, hdr) = if profile == 0xbede {
            let b = data[at];
            if b == 0 {
                at += 1;
                continue;
            }
            if b >> 4 == 15 {
                return;
            }
            (b >> 4, usize::from(b & 0x0f) + 1, 1)
        } else {
            if data[at] == 0 {
                at += 1;
                continue;
            }
            (data[at], usize::from(data[at + 1]), 2)
        };
        if ids.contains(&id) {
            data[at + hdr..at + hdr + len].fill(0);
        }
        at += hdr + len;
    }
}

/// The length of a raw RTP packet's header (fixed part, CSRCs, extension block).
fn header_len(raw: &[u8]) -> usize {
    let mut len = 12 + 4 * usize::from(raw[0] & 0x0f);
    if raw[0] & 0x10 != 0 {
        len += 4 + 4 * usize::from(u16::from_be_bytes([raw[len + 2], raw[len + 3]]));
    }
    len
}

/// libwebrtc's recovery of packet `seq` of stream `ssrc` from a ULPFEC payload and the
/// group's other packets (`ForwardErrorCorrection::RecoverPacket`: the ULPFEC header's
/// length recovery moved to bytes 2-3 by `UlpfecHeaderReader`, `StartPacketRecovery`,
/// `XorHeaders` + `XorPayloads` over each other packet, `FinishPacketRecovery`).
fn libwebrtc_recover(fec: &[u8], others: &[&Vec<u8>], seq: u16, ssrc: u32) -> Vec<u8> {
    let mask_len = if fec[0] & 0x40 != 0 { 6 } else { 2 };
    let header = 12 + mask_len;
    let protection = usize::from(u16::from_be_bytes([fec[10], fec[11]]));
    let mut head = fec[..12].to_vec();
    head.copy_within(8..10, 2);
    let mut rec = head;
    rec.extend_from_slice(&fec[header..header + protection]);
    for o in others {
        rec[0] ^= o[0];
        rec[1] ^= o[1];
        let len = ((o.len() - 12) as u16).to_be_bytes();
        rec[2] ^= len[0];
        rec[3] ^= len[1];
        for i in 4..8 {
            rec[i] ^= o[i];
        }
        if o.len() > rec.len() {
            rec.resize(o.len(), 0);
        }
        for i in 12..o.len() {
            rec[i] ^= o[i];
        }
    }
    rec[0] |= 0x80;
    rec[0] &= 0xbf;
    let size = usize::from(u16::from_be_bytes([rec[2], rec[3]])) + 12;
    rec.resize(size, 0);
    rec[2..4].copy_from_slice(&seq.to_be_bytes());
    rec[8..12].copy_from_slice(&ssrc.to_be_bytes());
    rec
}

/// Issue 15 item 2, browsers: for a subscriber that answered like Chromium
/// (`red/90000` + `ulpfec/90000`), every packet of every FEC group the node sent is
/// rebuilt byte for byte by libwebrtc's algorithm from the group's other packets and
/// the parity — the packets taken as str0m serialized them on the wire (RTP headers
/// are in clear in SRTP; payloads as the subscriber decrypted them), header
/// extensions (MID, zeroed transport-wide sequence number and abs-send-time)
/// included.
#[test]
fn a_browser_rebuilds_every_packet_of_a_group_byte_for_byte() {
    let mut h = Harness::with_config(|c| SfuConfig {
        fec_loss_floor: 0.05,
        ..c
    });
    h.add_publisher("room", "alice", MediaConfig::default());
    h.fec = true;
    h.fec_browser = true;
    h.capture_video = true;
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(3));
    // The extensions libwebrtc zeroes, by the ids the node offered.
    let offer = h
        .events
        .iter()
        .rev()
        .find_map(|(_, e)| match e {
            meridian_media::SfuEvent::SubscriberOffer { sdp, .. } => Some(sdp.clone()),
            _ => None,
        })
        .expect("an offer");
    let mutable: Vec<u8> = offer
        .lines()
        .filter_map(|l| l.strip_prefix("a=extmap:"))
        .filter(|l| {
            l.contains("abs-send-time") || l.contains("transport-wide-cc") || l.contains("toffset")
        })
        .filter_map(|l| l.split([' ', '/']).next()?.parse().ok())
        .collect();
    assert!(
        mutable.len() >= 2,
        "abs-send-time and TWCC offered: {offer}"
    );
    let c = &h.clients[s];
    let red = meridian_media::fec::RED_PT;
    let mut media = std::collections::HashMap::new();
    let mut unzeroed = std::collections::HashMap::new();
    let mut fecs = Vec::new();
    let mut ssrc = None;
    for raw in &c.sent_to_subscriber {
        if !common::is_rtp(raw) || raw[1] & 0x7f != red {
            continue;
        }
        let seq = u16::from_be_bytes([raw[2], raw[3]]);
        let Some(payload) = c.red_payloads.get(&seq) else {
            continue;
        };
        let hl = header_len(raw);
        assert!(hl > 16, "str0m writes header extensions (MID, TWCC, …)");
        ssrc = Some(u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]));
        if payload[0] == meridian_media::fec::ULPFEC_PT {
            fecs.push(payload[1..].to_vec());
        } else {
            media.insert(seq, libwebrtc_media(&raw[..hl], payload, &mutable));
            unzeroed.insert(seq, libwebrtc_media(&raw[..hl], payload, &[]));
        }
    }
    let ssrc = ssrc.expect("RED video reached the subscriber");
    let (mut rebuilt, mut with_mutable_bytes) = (0, 0);
    for fec in &fecs {
        let base = u16::from_be_bytes([fec[2], fec[3]]);
        let mask = u16::from_be_bytes([fec[12], fec[13]]);
        assert_eq!(fec[0] & 0xc0, 0, "E = 0, short mask");
        let group: Vec<u16> = (0..16u16)
            .filter(|i| mask & (0x8000 >> i) != 0)
            .map(|i| base.wrapping_add(i))
            .collect();
        if group.iter().any(|q| !media.contains_key(q)) {
            continue; // sent before the capture's packets arrived
        }
        for &lost in &group {
            let others: Vec<&Vec<u8>> = group
                .iter()
                .filter(|q| **q != lost)
                .map(|q| &media[q])
                .collect();
            let got = libwebrtc_recover(fec, &others, lost, ssrc);
            let sent = &media[&lost];
            assert!(
                got == *sent,
                "packet {lost} of group {group:?}: rebuilt {} bytes, sent {}, first difference at {:?}",
                got.len(),
                sent.len(),
                got.iter().zip(sent.iter()).position(|(a, b)| a != b)
            );
            rebuilt += 1;
            if unzeroed[&lost] != media[&lost] {
                with_mutable_bytes += 1;
            }
        }
    }
    eprintln!(
        "{} FEC packets, {rebuilt} packets rebuilt exactly, {with_mutable_bytes} had mutable extension bytes zeroed",
        fecs.len()
    );
    assert!(rebuilt >= 100, "3 s at a 5 % floor: {rebuilt} rebuilt");
    assert!(
        with_mutable_bytes * 2 > rebuilt,
        "str0m's transport-wide sequence numbers and send times are in the packets"
    );
    assert!(h.sfu.stats().fec_packets > 0);
}
