//! Header fields we do not understand are refused rather than ignored.

mod common;

use common::*;
use meridian_auth::AuthError;
use serde_json::json;

#[test]
fn crit_header_is_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    let header = json!({"alg": "ES256", "kid": "k1", "crit": ["exp"], "exp": 1});
    let token = sign_raw(&key, &header, &payload());
    assert!(matches!(
        keys.verify(&token, NOW),
        Err(AuthError::Malformed)
    ));
}

#[test]
fn non_jwt_typ_is_rejected_and_missing_typ_accepted() {
    let key = eddsa("k1");
    let keys = keyset(&key);
    let token = sign_raw(
        &key,
        &json!({"alg": "EdDSA", "kid": "k1", "typ": "at+jwt"}),
        &payload(),
    );
    assert!(matches!(
        keys.verify(&token, NOW),
        Err(AuthError::Malformed)
    ));
    let token = sign_raw(&key, &json!({"alg": "EdDSA", "kid": "k1"}), &payload());
    assert!(keys.verify(&token, NOW).is_ok());
}

#[test]
fn embedded_jwk_header_is_not_trusted() {
    // An attacker embeds their own key in the header; the kid still selects ours.
    let ours = es256("k1");
    let theirs = es256("k1");
    let keys = keyset(&ours);
    let jwk = serde_json::to_value(theirs.verifying_key().to_jwk()).unwrap();
    let token = sign_raw(
        &theirs,
        &json!({"alg": "ES256", "kid": "k1", "jwk": jwk}),
        &payload(),
    );
    assert!(matches!(
        keys.verify(&token, NOW),
        Err(AuthError::BadSignature)
    ));
}
