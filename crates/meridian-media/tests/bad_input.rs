//! Bad datagrams are dropped and counted, and do not disturb forwarding.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Harness, MediaConfig};
use str0m::ice::{StunMessage, TransId};

/// A well-formed STUN binding request for `username` (integrity keyed with a wrong
/// password, so no connection can accept it).
fn stun_request(username: &str) -> Vec<u8> {
    let msg = StunMessage::binding_request(username, TransId::new(), true, 42, 1_000, false);
    let mut buf = vec![0u8; 1500];
    let n = msg
        .to_bytes(Some(b"not-the-password"), &mut buf, |_, _| [7u8; 20])
        .expect("serializes");
    buf.truncate(n);
    buf
}

/// A plain (unencrypted) RTP packet.
fn rtp_packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&1234u32.to_be_bytes());
    p.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    p.extend_from_slice(&[0x10, 0, 0, 0x9d, 0x01, 0x2a]);
    p.resize(200, 0);
    p
}

fn setup() -> (Harness, usize, Vec<usize>) {
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let subs: Vec<usize> = (0..2)
        .map(|i| h.add_subscriber("room", &format!("sub{i}")))
        .collect();
    h.connect(Duration::from_secs(5));
    h.run_for(Duration::from_millis(500));
    (h, publisher, subs)
}

#[test]
fn bad_datagrams_are_counted_and_forwarding_goes_on() {
    let (mut h, publisher, subs) = setup();
    let stranger: SocketAddr = "10.9.9.9:4000".parse().unwrap();
    let pub_addr = h.clients[publisher].publisher.addr;
    let before = h.sfu.stats().clone();
    assert_eq!(
        before.datagrams_malformed + before.datagrams_unrouted + before.datagrams_rejected,
        0,
        "a clean run counts nothing: {before:?}"
    );
    let marks: Vec<usize> = subs
        .iter()
        .map(|&s| h.clients[s].video_frames().count())
        .collect();
    let forwarded_before = before.rtp_packets_forwarded;

    let rounds = 50u64;
    for i in 0..rounds {
        // Garbage: not STUN, DTLS, RTP or RTCP.
        h.inject(stranger, &[0x42; 100]);
        h.inject(stranger, &[]);
        // Truncated STUN header.
        h.inject(stranger, &[0x00, 0x01, 0x00]);
        // STUN naming a ufrag nobody has.
        h.inject(stranger, &stun_request("nobody:someone"));
        // RTP from an address nobody connected from.
        h.inject(stranger, &rtp_packet(i as u16));
        h.run_for(Duration::from_millis(20));
    }
    let st = h.sfu.stats().clone();
    eprintln!("stats after bad input: {st:?}");
    // Empty, garbage and truncated datagrams do not parse.
    assert_eq!(
        st.datagrams_malformed - before.datagrams_malformed,
        3 * rounds
    );
    // The unknown-ufrag STUN and the stranger's RTP are not routed.
    assert_eq!(
        st.datagrams_unrouted - before.datagrams_unrouted,
        2 * rounds
    );

    // Forwarding went on: ~1 s of video at 30 fps for every subscriber, no gaps.
    for (&s, &mark) in subs.iter().zip(&marks) {
        let frames: Vec<_> = h.clients[s].video_frames().skip(mark).collect();
        assert!(
            frames.len() >= 28,
            "subscriber {s} got {} frames",
            frames.len()
        );
        assert!(
            frames.iter().all(|f| f.contiguous),
            "no gaps for subscriber {s}"
        );
    }
    assert!(st.rtp_packets_forwarded > forwarded_before + 100);

    // Plain RTP from the publisher's own address fails SRTP and is dropped without
    // breaking the publisher's stream.
    let mark = h.clients[subs[0]].video_frames().count();
    for i in 0..20 {
        h.inject(pub_addr, &rtp_packet(1000 + i));
        h.run_for(Duration::from_millis(10));
    }
    h.run_for(Duration::from_millis(300));
    let frames: Vec<_> = h.clients[subs[0]].video_frames().skip(mark).collect();
    assert!(
        frames.len() >= 14,
        "publisher's video still flows: {}",
        frames.len()
    );
    assert!(frames.iter().all(|f| f.contiguous));
}

/// A STUN message naming a connection's ufrag, sent from another address with a
/// wrong MESSAGE-INTEGRITY, must not move that connection: the ufrag travels in clear
/// in every check, so anyone who sees one could otherwise hijack the route.
#[test]
fn unauthenticated_stun_does_not_steal_a_connection() {
    let (mut h, publisher, subs) = setup();
    let attacker: SocketAddr = "10.9.9.9:4000".parse().unwrap();
    let pub_ufrag = h
        .sfu
        .ice_ufrags(h.clients[publisher].id)
        .unwrap()
        .0
        .expect("alice published");
    let mark = h.clients[subs[0]].video_frames().count();
    h.inject(attacker, &stun_request(&format!("{pub_ufrag}:whatever")));
    h.run_for(Duration::from_millis(500));
    let frames = h.clients[subs[0]].video_frames().skip(mark).count();
    let st = h.sfu.stats();
    assert!(
        frames >= 12,
        "the publisher's media still reaches subscribers after a forged STUN: {frames} frames, {st:?}"
    );
}
