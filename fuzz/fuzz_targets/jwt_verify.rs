//! JWT parsing and verification with the node's policy: any string is refused with an
//! error (never a panic), and nothing but a token signed by the key verifies.
#![no_main]

#[path = "../bodies/jwt_verify.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
