//! Repair through the node, in virtual time (issue 15 item 2, proactive
//! retransmission): how long the node takes to ask a publisher for a packet lost on
//! the way in, and to answer a subscriber's NACK; that a packet repaired upstream
//! reaches a subscriber that never asked for it; and that retransmissions to a lossy
//! subscriber go out twice, so fewer of them are lost.
//!
//! The peers log the NACKs and retransmissions their str0m handles (raw packets);
//! links without impairment deliver at once, so a peer's receive time is the node's
//! send time there.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Harness, MediaConfig, lossy};
use meridian_media::SfuConfig;

/// str0m 0.25 polls its receive streams for NACKs every 33 ms (`NACK_MIN_INTERVAL`,
/// session.rs); a NACK can leave no sooner than the next poll after a gap is seen.
const NACK_POLL: Duration = Duration::from_millis(33);

/// The first time each (SSRC, sequence number) was named in `nacks`.
fn first_nacks(nacks: &[(Instant, u32, Vec<u16>)]) -> HashMap<(u32, u16), Instant> {
    let mut first = HashMap::new();
    for (at, ssrc, seqs) in nacks {
        for s in seqs {
            first.entry((*ssrc, *s)).or_insert(*at);
        }
    }
    first
}

fn mean(d: &[Duration]) -> Duration {
    d.iter().sum::<Duration>() / d.len().max(1) as u32
}

/// (a) A packet lost between publisher and node: the node's NACK leaves at str0m's
/// next NACK poll after the packet that reveals the gap arrives; Meridian adds no
/// wait of its own.
#[test]
fn the_upstream_nack_leaves_within_one_nack_poll_of_the_gap() {
    let mut h = Harness::new();
    h.raw_rtcp = true;
    let p = h.add_publisher("room", "alice", MediaConfig::default());
    h.raw_rtcp = false;
    h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    h.impair(
        p,
        true,
        None,
        Some(lossy(0.05, Duration::from_millis(10), 3)),
    );
    let (mark_nack, mark_rtp) = (
        h.clients[p].nacks_received.len(),
        h.clients[p].rtp_at_node.len(),
    );
    h.run_for(Duration::from_secs(4));
    let c = &h.clients[p];
    let arrivals = &c.rtp_at_node[mark_rtp..];
    let mut waits = Vec::new();
    for ((ssrc, seq), nack_at) in first_nacks(&c.nacks_received[mark_nack..]) {
        // The gap is seen when the next packet of the stream reaches the node.
        let Some(&(seen, _, _)) = arrivals.iter().find(|(_, x, q)| {
            let ahead = q.wrapping_sub(seq);
            *x == ssrc && ahead > 0 && ahead < 1000
        }) else {
            continue;
        };
        assert!(seen <= nack_at, "a NACK for {seq} before its gap was seen");
        waits.push(nack_at - seen);
    }
    waits.sort();
    eprintln!(
        "{} upstream NACKs: gap seen → NACK sent mean {:?}, median {:?}, max {:?}",
        waits.len(),
        mean(&waits),
        waits[waits.len() / 2],
        waits.last().unwrap()
    );
    assert!(
        waits.len() >= 20,
        "5 % of 4 s of packets NACKed: {}",
        waits.len()
    );
    assert!(
        *waits.last().unwrap() <= NACK_POLL + 2 * h.tick,
        "every NACK within one poll of str0m's: {waits:?}"
    );
}

/// For each NACK the subscriber sent (after `since`), the position of each packet it
/// named and the delay from the NACK to that packet's retransmission leaving the node
/// (a downlink of `down` latency), for the packets named once (never NACKed again,
/// so their first retransmission arrived).
fn resend_delays(
    h: &Harness,
    s: usize,
    down: Duration,
    since: usize,
) -> Vec<Vec<(usize, Duration)>> {
    let c = &h.clients[s];
    let rtx_pts: Vec<u8> = c
        .subscriber
        .rtc
        .codec_config()
        .iter()
        .filter_map(|p| p.resend())
        .map(|p| *p)
        .collect();
    let resends: Vec<(Instant, u16)> = c
        .rtp_received
        .iter()
        .filter(|r| rtx_pts.contains(&r.2))
        .filter_map(|r| Some((r.0 - down, r.4?)))
        .collect();
    let mut times: HashMap<(u32, u16), usize> = HashMap::new();
    for (_, ssrc, seqs) in &c.nacks_sent[since..] {
        for q in seqs {
            *times.entry((*ssrc, *q)).or_default() += 1;
        }
    }
    let mut per_nack = Vec::new();
    for (at, ssrc, seqs) in &c.nacks_sent[since..] {
        let mut delays = Vec::new();
        for (i, q) in seqs.iter().enumerate() {
            if times[&(*ssrc, *q)] != 1 {
                continue;
            }
            if let Some((sent, _)) = resends.iter().find(|(t, r)| *t >= *at && r == q) {
                delays.push((i, *sent - *at));
            }
        }
        if !delays.is_empty() {
            per_nack.push(delays);
        }
    }
    per_nack
}

/// (b) A subscriber's NACK: str0m queues the retransmissions while it receives the
/// NACK and runs its timeout right after, so the first one leaves in the same
/// wake-up; str0m's pacer releases one packet per timeout, so the k-th of one NACK
/// waits for k − 1 more (in the server, the media loop's `Controller::handle_due` runs them at once;
/// here each is a 1 ms harness step).
#[test]
fn a_subscribers_nack_is_answered_in_the_wake_up_it_arrives() {
    let mut h = Harness::with_config(|c| SfuConfig {
        rtx_copy_loss: 0.0,
        ..c
    });
    h.add_publisher("room", "alice", MediaConfig::default());
    h.raw_rtcp = true;
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    let down = Duration::from_millis(20);
    h.impair(s, false, Some(lossy(0.10, down, 11)), None);
    let mark = h.clients[s].nacks_sent.len();
    h.run_for(Duration::from_secs(6));
    let per_nack = resend_delays(&h, s, down, mark);
    let all: Vec<Duration> = per_nack.iter().flatten().map(|(_, d)| *d).collect();
    let firsts = per_nack.iter().flatten().filter(|(i, _)| *i == 0).count();
    let at_once = per_nack
        .iter()
        .flatten()
        .filter(|(i, d)| *i == 0 && d.is_zero())
        .count();
    eprintln!(
        "{} NACKs, {} packets answered ({firsts} named first, {at_once} of them at once): \
         NACK → retransmission at the node mean {:?}, max {:?}",
        per_nack.len(),
        all.len(),
        mean(&all),
        all.iter().max()
    );
    assert!(firsts >= 10, "NACKs answered: {firsts}");
    assert!(
        at_once * 10 >= firsts * 8,
        "the first packet of most NACKs leaves at once: {at_once} of {firsts}"
    );
    for (i, d) in per_nack.iter().flatten() {
        assert!(
            *d <= h.tick * (*i as u32 + 1),
            "packet {i} of a NACK leaves {d:?} after it: at most one step per packet \
             before it (and one for media queued in the same step)"
        );
    }
}

/// (c) A packet lost between publisher and node is NACKed upstream by the node, and
/// its retransmission is forwarded in its place to every subscriber: one whose
/// uplink is cut (it cannot NACK) still gets every video frame, while audio (not
/// retransmitted) shows the loss upstream was real.
#[test]
fn a_packet_repaired_upstream_reaches_a_subscriber_that_never_asked() {
    let mut h = Harness::new();
    h.raw_rtcp = true;
    let p = h.add_publisher("room", "alice", MediaConfig::default());
    h.raw_rtcp = false;
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    h.impair(
        p,
        true,
        None,
        Some(lossy(0.05, Duration::from_millis(10), 5)),
    );
    h.impair(
        s,
        false,
        None,
        Some(lossy(1.0, Duration::from_millis(10), 6)),
    );
    let (vmark, amark, nmark) = (
        h.clients[s].video_frames().count(),
        h.clients[s].audio_frames().count(),
        h.clients[p].nacks_received.len(),
    );
    h.run_for(Duration::from_secs(3));
    let c = &h.clients[s];
    // Frame counters (a layer switch may deliver one frame from both layers).
    let video: std::collections::BTreeSet<u64> =
        c.video_frames().skip(vmark).map(|f| f.header.seq).collect();
    let audio: Vec<u64> = c.audio_frames().skip(amark).map(|f| f.header.seq).collect();
    let vspan = video.last().unwrap() - video.first().unwrap() + 1;
    let aspan = audio.last().unwrap() - audio[0] + 1;
    let gaps = c
        .video_frames()
        .skip(vmark)
        .filter(|f| !f.contiguous)
        .count();
    let upstream_nacks = h.clients[p].nacks_received.len() - nmark;
    eprintln!(
        "video {}/{vspan} frames ({gaps} after a gap), audio {}/{aspan}, {upstream_nacks} NACKs to the publisher",
        video.len(),
        audio.len()
    );
    assert!(upstream_nacks > 0, "the node asked the publisher");
    assert!(
        (audio.len() as u64) * 100 <= aspan * 99,
        "5 % upstream loss is real (audio is not retransmitted)"
    );
    assert!(vspan >= 80, "about 3 s of video: {vspan}");
    assert_eq!(video.len() as u64, vspan, "every video frame arrived");
    assert_eq!(gaps, 0, "no frame after an unrepaired gap");
}

/// For a subscriber losing `loss` of its downlink: the packets it NACKed, how many of
/// them it had to NACK again (a retransmission was lost), and the node's copies.
fn nack_retries(copy_loss: f32, loss: f32) -> (usize, usize, u64) {
    let mut h = Harness::with_config(|c| SfuConfig {
        rtx_copy_loss: copy_loss,
        ..c
    });
    h.add_publisher(
        "room",
        "alice",
        MediaConfig {
            layers: vec![],
            layer_bitrates: [100_000, 200_000, 900_000],
            ..MediaConfig::default()
        },
    );
    h.raw_rtcp = true;
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    h.impair(
        s,
        false,
        Some(lossy(loss, Duration::from_millis(20), 31)),
        None,
    );
    // Two statistics intervals: the node has measured the loss.
    h.run_for(Duration::from_millis(2500));
    let mark = h.clients[s].nacks_sent.len();
    h.run_for(Duration::from_secs(30));
    let mut times: HashMap<(u32, u16), usize> = HashMap::new();
    for (_, ssrc, seqs) in &h.clients[s].nacks_sent[mark..] {
        for q in seqs {
            *times.entry((*ssrc, *q)).or_default() += 1;
        }
    }
    let retried = times.values().filter(|n| **n >= 2).count();
    (times.len(), retried, h.sfu.stats().rtx_copies)
}

/// Proactive retransmission: to a subscriber whose path loses 10 %, every
/// retransmission goes out twice (5 ms apart), so far fewer packets need a second
/// NACK, a round trip later, than when each goes out once (30 s each way).
#[test]
fn retransmissions_to_a_lossy_subscriber_are_sent_twice() {
    let (nacked_off, retried_off, copies_off) = nack_retries(0.0, 0.10);
    let (nacked_on, retried_on, copies_on) = nack_retries(0.01, 0.10);
    eprintln!(
        "copies off: {retried_off} of {nacked_off} NACKed packets NACKed again; \
         on: {retried_on} of {nacked_on} ({copies_on} copies)"
    );
    assert_eq!(copies_off, 0);
    assert!(
        nacked_off >= 200 && nacked_on >= 200,
        "10 % of 30 s of video"
    );
    assert!(
        retried_off >= 20,
        "a retransmission is lost at 10 %: {retried_off}"
    );
    assert!(
        copies_on as usize >= nacked_on / 2,
        "retransmissions copied: {copies_on} for {nacked_on} packets"
    );
    // Not p² of them: a second NACK also leaves when the copy is still on its way
    // (the receiver retries one of its RTT estimates + 5 ms after the first).
    assert!(
        retried_on * 2 <= retried_off,
        "copies cut second NACKs: {retried_on} vs {retried_off}"
    );
}

/// A subscriber whose path loses little gets each retransmission once.
#[test]
fn a_clean_subscriber_gets_no_copies() {
    let (nacked, _, copies) = nack_retries(0.15, 0.02);
    assert!(nacked >= 50, "2 % of 30 s of video: {nacked}");
    // Over one-second windows, 2 % loss measures a few % at most.
    assert_eq!(copies, 0, "2 % measured is below a 15 % threshold");
}
