//! The signaling decoder under both framings: the input as one WebSocket text message,
//! and as a WebTransport stream of 4-byte big-endian length-prefixed frames (the node's
//! rule: a length above the limit is refused without reading the body).
//!
//! The body of the `signaling_decode` fuzz target, shared by `cargo fuzz` (fuzz/fuzz_targets/) and
//! the stable replay in the test suite (tests/tests/fuzz_replay.rs).

use meridian_protocol::{ClientMessage, MAX_MESSAGE_BYTES, ServerMessage};

fn check(bytes: &[u8]) {
    match ClientMessage::decode(bytes) {
        // What decodes re-encodes and decodes to the same message.
        Ok(msg) => {
            let again = ClientMessage::decode(msg.encode().as_bytes()).expect("round trip");
            assert_eq!(again, msg);
        }
        // Errors are bounded whatever the input.
        Err(e) => assert!(
            e.to_string().len() <= 512,
            "error text of {} bytes",
            e.to_string().len()
        ),
    }
    let _ = ServerMessage::decode(bytes);
}

/// One input: must not panic.
pub fn run(data: &[u8]) {
    // WebSocket: one text message.
    check(data);
    // WebTransport: length-prefixed frames.
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if len > MAX_MESSAGE_BYTES || len > rest.len() {
            break;
        }
        check(&rest[..len]);
        rest = &rest[len..];
    }
}
