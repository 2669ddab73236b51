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

/// The node's subscriber offer names the FEC stream by its private codec name only: a
/// browser, whose ULPFEC would not match this parity, never sees a codec it accepts
/// on that payload type.
#[test]
fn the_offer_names_fec_privately() {
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
    for sdp in offers {
        assert!(sdp.contains(&format!("a=rtpmap:{pt} x-meridian-fec-red/90000")));
        assert!(!sdp.contains(&format!("a=rtpmap:{pt} VP9")), "{sdp}");
        assert!(!sdp.contains("ulpfec") && !sdp.contains(" red/90000"));
    }
}
