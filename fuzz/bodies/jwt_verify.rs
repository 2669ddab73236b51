//! JWT parsing and verification with the node's policy: any string is refused with an
//! error (never a panic), and nothing but a token signed by the key verifies.
//!
//! The body of the `jwt_verify` fuzz target, shared by `cargo fuzz` (fuzz/fuzz_targets/) and
//! the stable replay in the test suite (tests/tests/fuzz_replay.rs).

use std::sync::OnceLock;
use std::time::Duration;

use meridian_auth::{Algorithm, Claims, KeySet, Policy, SigningKey};

const NOW: u64 = 1_700_000_000;

fn keys() -> &'static (KeySet, String) {
    static KEYS: OnceLock<(KeySet, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = SigningKey::generate(Algorithm::Es256, "fuzz-1").expect("keygen");
        let keys = KeySet::new(Some(key), vec![]);
        let good = keys
            .sign(&Claims::new("alice", "room", NOW, Duration::from_secs(600)))
            .expect("sign");
        (keys, good)
    })
}

/// One input: must not panic.
pub fn run(data: &[u8]) {
    let (keys, good) = keys();
    let text = String::from_utf8_lossy(data);
    let policy = Policy::default();
    if let Ok(claims) = keys.verify_with(&text, NOW, &policy) {
        // Only a genuine token verifies: ES256 signatures are not malleable into
        // another claim set.
        assert_eq!(claims.sub, "alice", "forged token accepted: {text}");
    }
    // Splice the input into the good token's parts too (header, payload, signature).
    let parts: Vec<&str> = good.split('.').collect();
    for i in 0..3 {
        let mut p = parts.clone();
        p[i] = &text;
        let spliced = p.join(".");
        if spliced != *good
            && let Ok(c) = keys.verify_with(&spliced, NOW, &policy)
        {
            assert_eq!(c.sub, "alice");
        }
    }
}
