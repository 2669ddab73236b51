//! Audio RED (RFC 2198, `red/48000/2`) through the node, with seeded loss in virtual
//! time: RED from the publisher is passed through (or unwrapped for a subscriber
//! without RED), the node adds RED for a subscriber whose publisher sends plain Opus,
//! a lost packet is recovered from the next one without any retransmission, and
//! malformed RED from a publisher is dropped and counted.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Harness, MediaConfig, lossy};
use str0m::format::Codec;
use str0m::rtp::{RedEncoder, RedundantBlock};

fn audio_only() -> MediaConfig {
    MediaConfig {
        video: false,
        ..MediaConfig::default()
    }
}

/// Audio loss seen by subscriber `s` over 4 s of 10 % seeded loss on its downlink
/// (audio is never retransmitted, so whatever is not lost was delivered or recovered).
fn audio_loss_under_downlink_loss(h: &mut Harness, s: usize) -> f64 {
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    h.impair(
        s,
        false,
        Some(lossy(0.10, Duration::from_millis(20), 11)),
        None,
    );
    let mark = h.clients[s].audio_frames().count();
    h.run_for(Duration::from_secs(4));
    let got: BTreeSet<u64> = h.clients[s]
        .audio_frames()
        .skip(mark)
        .map(|f| f.header.seq)
        .collect();
    let span = got.last().unwrap() - got.first().unwrap() + 1;
    assert!(span >= 150, "about 4 s of 20 ms audio frames: {span}");
    1.0 - got.len() as f64 / span as f64
}

#[test]
fn without_red_the_loss_shows() {
    let mut h = Harness::new();
    h.add_publisher("room", "alice", audio_only());
    let s = h.add_subscriber("room", "bob");
    let loss = audio_loss_under_downlink_loss(&mut h, s);
    eprintln!("no RED: audio loss {:.1} %", loss * 100.0);
    assert!(loss >= 0.05, "10 % downlink loss shows as {loss}");
}

#[test]
fn red_from_the_publisher_recovers_lost_packets_without_retransmission() {
    let mut h = Harness::new();
    h.red = true;
    h.add_publisher("room", "alice", audio_only());
    let s = h.add_subscriber("room", "bob");
    let loss = audio_loss_under_downlink_loss(&mut h, s);
    let stats = h.sfu.stats().clone();
    eprintln!(
        "publisher RED passed through: audio loss {:.1} %",
        loss * 100.0
    );
    assert!(loss < 0.03, "RED recovers single losses: {loss}");
    assert_eq!(stats.red_added, 0, "the publisher's RED is passed through");
    assert_eq!(stats.red_malformed, 0);
}

#[test]
fn the_node_adds_red_for_a_subscriber_that_negotiated_it() {
    let mut h = Harness::new();
    h.add_publisher("room", "alice", audio_only()); // plain Opus
    h.red = true;
    let s = h.add_subscriber("room", "bob");
    let loss = audio_loss_under_downlink_loss(&mut h, s);
    eprintln!("RED added by the node: audio loss {:.1} %", loss * 100.0);
    assert!(loss < 0.03, "RED recovers single losses: {loss}");
    assert!(h.sfu.stats().red_added > 100);
}

#[test]
fn red_is_unwrapped_for_a_subscriber_without_it() {
    let mut h = Harness::new();
    h.red = true;
    let p = h.add_publisher("room", "alice", audio_only());
    h.red = false;
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_secs(2));
    let seqs: Vec<u64> = h.clients[s].audio_frames().map(|f| f.header.seq).collect();
    assert!(seqs.len() >= 80, "audio arrives: {}", seqs.len());
    // A RED payload read as Opus would show the redundant (previous) frame's header:
    // every frame must be the one sent, once, in order.
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "frames in order without repeats: {seqs:?}"
    );
    assert!(h.clients[p].sent[3] >= seqs.len() as u64);
}

#[test]
fn malformed_red_from_a_publisher_is_dropped_and_counted() {
    let mut h = Harness::new();
    h.red = true;
    let p = h.add_publisher(
        "room",
        "alice",
        MediaConfig {
            audio_frames: false,
            ..audio_only()
        },
    );
    let s = h.add_subscriber("room", "bob");
    h.connect(Duration::from_secs(5));
    let opus = h.clients[p]
        .publisher
        .rtc
        .codec_config()
        .find(|c| c.spec().codec == Codec::Opus)
        .copied()
        .expect("opus negotiated");
    let (opus_pt, red_pt) = (*opus.pt(), *opus.red().expect("RED negotiated"));
    let mut seq = 1000u64;
    let mut bad = 0;
    let mut previous: Option<Vec<u8>> = None;
    for i in 0..60u64 {
        let ts = (i * 960) as u32;
        let frame = h.audio_frame(i);
        let redundant: Vec<RedundantBlock> = previous
            .take()
            .map(|p| RedundantBlock {
                pt: opus_pt,
                timestamp_offset: 960,
                payload: p,
            })
            .into_iter()
            .collect();
        let good = RedEncoder::encode(opus_pt, &frame, &redundant);
        previous = Some(frame);
        h.write_audio_rtp(p, red_pt, seq, ts, good);
        seq += 1;
        if i % 6 == 3 {
            // Malformed: a redundant header whose length runs past the end, a
            // truncated redundant header (3 of its 4 bytes), a primary of another
            // payload type, nothing at all, more redundant blocks than the limit (4).
            let garbage = match bad % 5 {
                0 => vec![0x80 | opus_pt, 0, 0x0f, 0xff, opus_pt, 1, 2, 3],
                1 => vec![0x80 | opus_pt, 0, 4],
                2 => vec![96, 0xfc, 1, 2, 3],
                3 => vec![],
                _ => {
                    let mut many = [0x80 | opus_pt, 0, 4, 0].repeat(6);
                    many.extend_from_slice(&[opus_pt, 1, 2, 3]);
                    many
                }
            };
            h.write_audio_rtp(p, red_pt, seq, ts + 480, garbage);
            seq += 1;
            bad += 1;
        }
        h.run_for(Duration::from_millis(20));
    }
    // The dropped packets leave sequence gaps the receiver waits out (1 s for audio).
    h.run_for(Duration::from_millis(1500));
    assert_eq!(h.sfu.stats().red_malformed, bad);
    let seqs: Vec<u64> = h.clients[s].audio_frames().map(|f| f.header.seq).collect();
    assert_eq!(
        seqs,
        (0..60).collect::<Vec<_>>(),
        "every good frame arrives once and nothing else does"
    );
}
