//! Robustness of the datagram path: no input makes the core panic, and forwarding
//! goes on afterwards. Inputs come from a fixed-seed generator, so a failure
//! reproduces exactly.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Harness, MediaConfig};

/// xorshift64*: small, seeded, good enough to spread bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A STUN-shaped datagram: a binding header with the magic cookie, then attributes
/// with random types and lengths (often lying), some carrying `ufrag` as USERNAME.
fn stun_like(rng: &mut Rng, ufrag: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    for _ in 0..rng.below(6) {
        let (typ, value): (u16, Vec<u8>) = match rng.below(4) {
            0 => (0x0006, format!("{ufrag}:{}", rng.next()).into_bytes()),
            1 => {
                let n = rng.below(40);
                (0x0006, rng.bytes(n))
            }
            2 => (0x0008, rng.bytes(20)),
            _ => {
                let typ = rng.next() as u16;
                let n = rng.below(64);
                (typ, rng.bytes(n))
            }
        };
        let claimed = if rng.below(4) == 0 {
            rng.next() as u16
        } else {
            value.len() as u16
        };
        attrs.extend_from_slice(&typ.to_be_bytes());
        attrs.extend_from_slice(&claimed.to_be_bytes());
        attrs.extend_from_slice(&value);
        attrs.resize(attrs.len().next_multiple_of(4), 0);
    }
    let len = if rng.below(4) == 0 {
        rng.next() as u16
    } else {
        attrs.len() as u16
    };
    let mut out = vec![0x00, 0x01];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&0x2112_a442u32.to_be_bytes());
    out.extend_from_slice(&rng.bytes(12));
    out.extend_from_slice(&attrs);
    let cut = rng.below(out.len() + 1);
    if rng.below(3) == 0 {
        out.truncate(cut);
    }
    out
}

/// One random datagram: pure noise, noise with a first byte in each RFC 7983 range
/// (STUN, DTLS, RTP/RTCP), a STUN-shaped message, or a real check with bytes flipped.
fn datagram(rng: &mut Rng, ufrag: &str, real: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(6) {
        0 => {
            let n = rng.below(1500);
            rng.bytes(n)
        }
        1 => {
            let n = rng.below(200);
            let mut d = rng.bytes(n);
            if let Some(b) = d.first_mut() {
                *b = [0, 1, 3, 20, 22, 23, 64, 128, 129, 144, 200, 191][rng.below(12)];
            }
            d
        }
        2 | 3 => stun_like(rng, ufrag),
        _ => {
            let mut d = real[rng.below(real.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            if rng.below(4) == 0 {
                let cut = rng.below(d.len() + 1);
                d.truncate(cut);
            }
            d
        }
    }
}

#[test]
fn random_datagrams_never_panic_and_forwarding_goes_on() {
    const DATAGRAMS: usize = 20_000;
    let mut h = Harness::new();
    let publisher = h.add_publisher("room", "alice", MediaConfig::default());
    let sub = h.add_subscriber("room", "sub");
    h.connect(Duration::from_secs(5));

    let pub_addr = h.clients[publisher].publisher.addr;
    let sub_addr = h.clients[sub].subscriber.addr;
    h.capture_stun = true;
    assert!(
        h.run_until(Duration::from_secs(10), |h| h
            .captured_stun
            .iter()
            .any(|(s, _)| *s == pub_addr)),
        "the publisher sent a check to capture"
    );
    h.capture_stun = false;
    let real: Vec<Vec<u8>> = h.captured_stun.iter().map(|(_, d)| d.clone()).collect();
    let ufrag = h
        .sfu
        .ice_ufrags(h.clients[publisher].id)
        .expect("alice is a participant")
        .0
        .expect("alice published");

    let stranger: SocketAddr = "10.9.9.9:4000".parse().unwrap();
    let sources = [stranger, pub_addr, sub_addr];
    let before = h.sfu.stats().clone();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..DATAGRAMS {
        let d = datagram(&mut rng, &ufrag, &real);
        let source = sources[rng.below(sources.len())];
        h.inject(source, &d);
        if i % 200 == 0 {
            h.step();
        }
    }
    let st = h.sfu.stats().clone();
    let dropped = (st.datagrams_malformed + st.datagrams_unrouted + st.datagrams_rejected)
        - (before.datagrams_malformed + before.datagrams_unrouted + before.datagrams_rejected);
    assert!(
        dropped > DATAGRAMS as u64 / 4,
        "bad datagrams are counted: {dropped} of {DATAGRAMS}, {st:?}"
    );

    // The connections survived: video still reaches the subscriber without gaps.
    let track = h.clients[publisher]
        .track(meridian_protocol::TrackKind::Video)
        .expect("alice publishes video");
    h.run_for(Duration::from_millis(500));
    let mark = h.clients[sub].frames.len();
    h.run_for(Duration::from_secs(1));
    let frames: Vec<_> = h.clients[sub].frames[mark..]
        .iter()
        .filter(|f| f.track == Some(track))
        .collect();
    assert!(
        frames.len() >= 28,
        "video flows after the storm: {} frames in 1 s",
        frames.len()
    );
    assert!(frames.iter().all(|f| f.contiguous), "without gaps");
}
