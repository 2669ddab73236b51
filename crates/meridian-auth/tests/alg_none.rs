//! Tokens with `alg: none` (unsigned) are refused.

mod common;

use common::*;
use meridian_auth::AuthError;
use serde_json::json;

#[test]
fn alg_none_with_empty_signature_is_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    let input = signing_input(
        &json!({"alg": "none", "typ": "JWT", "kid": "k1"}),
        &payload(),
    );
    // The canonical unsecured JWS has an empty third part.
    let err = keys.verify(&format!("{input}."), NOW).unwrap_err();
    assert!(
        matches!(
            err,
            AuthError::Malformed | AuthError::AlgorithmNotAllowed { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn alg_none_with_some_signature_is_rejected_as_alg_not_allowed() {
    let key = es256("k1");
    let keys = keyset(&key);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let input = signing_input(&json!({"alg": alg, "typ": "JWT", "kid": "k1"}), &payload());
        let err = keys.verify(&format!("{input}.AAAA"), NOW).unwrap_err();
        assert!(
            matches!(err, AuthError::AlgorithmNotAllowed { .. }),
            "{alg}: {err:?}"
        );
        assert_eq!(err.code(), "token_alg_not_allowed");
    }
}

#[test]
fn other_unsupported_algorithms_are_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    for alg in ["RS256", "PS256", "ES384", "ES512", "es256", "EdDSA ", ""] {
        let input = signing_input(&json!({"alg": alg, "kid": "k1"}), &payload());
        let err = keys.verify(&format!("{input}.AAAA"), NOW).unwrap_err();
        assert_eq!(err.code(), "token_alg_not_allowed", "{alg:?}: {err:?}");
    }
}
