//! Garbage, truncated and non-base64 input is `Malformed` (or another typed error),
//! never a panic.

mod common;

use common::*;
use meridian_auth::{AuthError, KeySet};
use proptest::prelude::*;
use serde_json::json;

fn keys() -> KeySet {
    keyset(&es256("k1"))
}

#[test]
fn garbage_is_malformed() {
    let keys = keys();
    let cases = [
        "",
        ".",
        "..",
        "...",
        "a.b",
        "a.b.c.d",
        "not a token",
        "eyJ.eyJ.sig",
        "%%%.%%%.%%%",
        "eyJhbGciOiJFUzI1NiJ9",            // header only
        "eyJhbGciOiJFUzI1NiJ9==.e30.AAAA", // padded base64
        "bnVsbA.e30.AAAA",                 // header is JSON null
        "WzFd.e30.AAAA",                   // header is a JSON array
        "e30.e30.AAAA",                    // header without alg
        "eyJhbGciOjF9.e30.AAAA",           // alg is a number
        "\u{0}\u{0}.\u{0}.\u{0}",
        "🦀.🦀.🦀",
    ];
    for case in cases {
        let err = keys.verify(case, NOW).unwrap_err();
        assert!(matches!(err, AuthError::Malformed), "{case:?}: {err:?}");
        assert_eq!(err.code(), "token_malformed");
    }
}

#[test]
fn non_base64_signature_and_payload_are_malformed() {
    let key = es256("k1");
    let keys = keyset(&key);
    let token = key.sign(&claims()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    for token in [
        format!("{}.{}.{}", parts[0], parts[1], "***"),
        format!("{}.{}.{}", parts[0], "***", parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], ""),
    ] {
        let err = keys.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, AuthError::Malformed), "{token}: {err:?}");
    }
}

#[test]
fn payload_that_is_not_our_claims_is_invalid_claims() {
    let key = es256("k1");
    let keys = keyset(&key);
    for body in [
        json!({}),
        json!({"sub": "a"}),
        json!([1, 2]),
        json!({"sub": 1, "room": "r", "exp": 1, "iat": 0}),
        json!({"sub": "a", "room": "r", "exp": -1, "iat": 0}),
    ] {
        let token = sign_raw(&key, &json!({"alg": "ES256", "kid": "k1"}), &body);
        let err = keys.verify(&token, NOW).unwrap_err();
        assert!(
            matches!(err, AuthError::InvalidClaims(_)),
            "{body}: {err:?}"
        );
    }
}

#[test]
fn every_truncation_of_a_valid_token_is_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    let token = key.sign(&claims()).unwrap();
    assert!(keys.verify(&token, NOW).is_ok());
    for end in 0..token.len() {
        let err = keys.verify(&token[..end], NOW);
        assert!(err.is_err(), "prefix of length {end} accepted");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_strings_never_panic_and_never_verify(s in ".{0,600}") {
        prop_assert!(keys().verify(&s, NOW).is_err());
    }

    #[test]
    fn random_bytes_never_panic_and_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let s = String::from_utf8_lossy(&bytes);
        prop_assert!(keys().verify(&s, NOW).is_err());
    }

    #[test]
    fn random_jwt_shaped_input_never_panics(
        h in proptest::collection::vec(any::<u8>(), 0..80),
        p in proptest::collection::vec(any::<u8>(), 0..200),
        s in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let token = format!("{}.{}.{}", b64(&h), b64(&p), b64(&s));
        prop_assert!(keys().verify(&token, NOW).is_err());
    }

    #[test]
    fn mutated_valid_token_never_panics(pos in 0usize..400, byte in any::<u8>()) {
        let key = es256("k1");
        let keys = keyset(&key);
        let token = key.sign(&claims()).unwrap();
        let mut bytes = token.into_bytes();
        let pos = pos % bytes.len();
        let changed = bytes[pos] != byte;
        bytes[pos] = byte;
        let s = String::from_utf8_lossy(&bytes);
        let result = keys.verify(&s, NOW);
        if changed {
            prop_assert!(result.is_err(), "mutation at {} accepted", pos);
        }
    }
}
