//! The media socket's datagram router (STUN demultiplexing by ufrag and source
//! address, DTLS/RTP/RTCP routing) fed arbitrary datagrams from arbitrary sources,
//! with participants present: refused or dropped, never a panic.
//!
//! The body of the `datagram_router` fuzz target, shared by `cargo fuzz` (fuzz/fuzz_targets/) and
//! the stable replay in the test suite (tests/tests/fuzz_replay.rs).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meridian_media::{Sfu, SfuConfig};

/// One input: must not panic.
pub fn run(data: &[u8]) {
    let now = Instant::now();
    let addr: SocketAddr = "10.0.0.1:5000".parse().expect("literal");
    let mut sfu = Sfu::new(SfuConfig::new(addr), now);
    let a = sfu.add_participant(now, "room", "a", true);
    let _b = sfu.add_participant(now, "room", "b", true);
    let ufrags = sfu.ice_ufrags(a);
    // Datagrams: [source byte][len byte][bytes]...; a STUN-looking datagram may carry
    // a real ufrag so the input reaches past the ufrag look-up.
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let (src, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let len = len.min(rest.len());
        let mut datagram = rest[..len].to_vec();
        rest = &rest[len..];
        if src & 0x80 != 0
            && let Some((_, sub_ufrag)) = &ufrags
            && datagram.len() > 20
        {
            let u = sub_ufrag.as_bytes();
            let n = u.len().min(datagram.len() - 20);
            datagram[20..20 + n].copy_from_slice(&u[..n]);
        }
        let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, src & 0x7f)), 40000);
        t += Duration::from_millis(1);
        sfu.handle_datagram(t, source, &datagram);
        while sfu.poll_transmit().is_some() {}
        while sfu.poll_event().is_some() {}
    }
    sfu.handle_timeout(t + Duration::from_secs(1));
}
