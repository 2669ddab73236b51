//! Size bounds: oversized tokens are refused before parsing; oversized claims are
//! neither minted nor accepted.

mod common;

use common::*;
use meridian_auth::{AuthError, Claims, MAX_IDENTITY_BYTES, MAX_ROOM_BYTES, MAX_TOKEN_BYTES};
use serde_json::json;

#[test]
fn oversized_token_is_rejected_before_parsing() {
    let keys = keyset(&es256("k1"));
    // Not even a JWT shape: only the size check can produce TooLarge.
    let junk = "!".repeat(MAX_TOKEN_BYTES + 1);
    let err = keys.verify(&junk, NOW).unwrap_err();
    assert!(matches!(err, AuthError::TooLarge), "{err:?}");
    assert_eq!(err.code(), "token_too_large");
    // Exactly at the limit it is parsed (and found malformed).
    let junk = "!".repeat(MAX_TOKEN_BYTES);
    assert!(matches!(keys.verify(&junk, NOW), Err(AuthError::Malformed)));
}

#[test]
fn validly_signed_oversized_token_is_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    let mut body = payload();
    body["padding"] = json!("x".repeat(MAX_TOKEN_BYTES));
    let token = sign_raw(&key, &json!({"alg": "ES256", "kid": "k1"}), &body);
    assert!(token.len() > MAX_TOKEN_BYTES);
    assert!(matches!(keys.verify(&token, NOW), Err(AuthError::TooLarge)));
}

#[test]
fn identity_and_room_bounds_apply_to_signing_and_verifying() {
    let key = es256("k1");
    let keys = keyset(&key);
    let ok = Claims::new(
        "a".repeat(MAX_IDENTITY_BYTES),
        "r".repeat(MAX_ROOM_BYTES),
        NOW,
        std::time::Duration::from_secs(60),
    );
    assert!(keys.verify(&keys.sign(&ok).unwrap(), NOW).is_ok());

    let long_sub = Claims {
        sub: "a".repeat(MAX_IDENTITY_BYTES + 1),
        ..ok.clone()
    };
    let long_room = Claims {
        room: "r".repeat(MAX_ROOM_BYTES + 1),
        ..ok.clone()
    };
    for bad in [long_sub, long_room] {
        assert!(matches!(keys.sign(&bad), Err(AuthError::InvalidClaims(_))));
        // A token minted by someone else with the key is refused on verify too.
        let body = serde_json::to_value(&bad).unwrap();
        let token = sign_raw(&key, &json!({"alg": "ES256", "kid": "k1"}), &body);
        let err = keys.verify(&token, NOW).unwrap_err();
        assert_eq!(err.code(), "token_invalid_claims");
    }
}

#[test]
fn multibyte_display_name_at_the_bound_fits_in_a_token() {
    let keys = keyset(&es256("k1"));
    // 128 two-byte characters: exactly MAX_NAME_BYTES.
    let claims = claims().with_name("é".repeat(128));
    let token = keys.sign(&claims).unwrap();
    assert!(token.len() <= MAX_TOKEN_BYTES);
    assert_eq!(
        keys.verify(&token, NOW).unwrap().name.as_deref(),
        Some("é".repeat(128).as_str())
    );
    let too_long = claims.with_name("é".repeat(129));
    assert!(matches!(
        keys.sign(&too_long),
        Err(AuthError::InvalidClaims(_))
    ));
}
