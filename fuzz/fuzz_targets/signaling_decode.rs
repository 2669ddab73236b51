//! The signaling decoder under both framings: the input as one WebSocket text message,
//! and as a WebTransport stream of 4-byte big-endian length-prefixed frames (the node's
//! rule: a length above the limit is refused without reading the body).
#![no_main]

#[path = "../bodies/signaling_decode.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
