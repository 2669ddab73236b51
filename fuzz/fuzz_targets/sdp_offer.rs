//! SDP offers and answers as the node receives them: a joined participant's publisher
//! offer (with arbitrary track announcements) and subscriber answer go through the
//! media core, which must refuse bad input with an error and never panic.
#![no_main]

#[path = "../bodies/sdp_offer.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
