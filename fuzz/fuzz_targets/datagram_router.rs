//! The media socket's datagram router (STUN demultiplexing by ufrag and source
//! address, DTLS/RTP/RTCP routing) fed arbitrary datagrams from arbitrary sources,
//! with participants present: refused or dropped, never a panic.
#![no_main]

#[path = "../bodies/datagram_router.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
