//! A token whose header `alg` differs from the algorithm pinned to its key is refused,
//! even when it carries a valid signature of the other algorithm.

mod common;

use common::*;
use meridian_auth::{AuthError, KeySet};
use serde_json::json;

#[test]
fn eddsa_header_for_an_es256_kid_is_rejected() {
    let pinned = es256("k1");
    // An attacker holding some Ed25519 key signs a token naming the ES256 key's kid.
    let other = eddsa("k1");
    let keys = keyset(&pinned);
    let token = sign_raw(
        &other,
        &json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"}),
        &payload(),
    );
    let err = keys.verify(&token, NOW).unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAllowed { .. }),
        "{err:?}"
    );
}

#[test]
fn es256_header_for_an_eddsa_kid_is_rejected() {
    let pinned = eddsa("k1");
    let other = es256("k1");
    let keys = keyset(&pinned);
    let token = sign_raw(
        &other,
        &json!({"alg": "ES256", "typ": "JWT", "kid": "k1"}),
        &payload(),
    );
    let err = keys.verify(&token, NOW).unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAllowed { .. }),
        "{err:?}"
    );
}

#[test]
fn header_alg_swapped_on_a_genuine_token_is_rejected() {
    let key = es256("k1");
    let keys = KeySet::new(Some(key.clone()), vec![eddsa("k2").verifying_key()]);
    let genuine = key.sign(&claims()).unwrap();
    assert!(keys.verify(&genuine, NOW).is_ok());
    let (_, rest) = genuine.split_once('.').unwrap();
    let header = b64(json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"})
        .to_string()
        .as_bytes());
    let err = keys.verify(&format!("{header}.{rest}"), NOW).unwrap_err();
    assert_eq!(err.code(), "token_alg_not_allowed");
}
