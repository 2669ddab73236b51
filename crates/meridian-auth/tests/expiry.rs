//! Expiry and issue time, against a time passed in (no clock inside).

mod common;

use std::time::Duration;

use common::*;
use meridian_auth::{AuthError, Claims, EXP_LEEWAY_SECS, MAX_CLOCK_SKEW_SECS};

#[test]
fn token_is_valid_until_exp_plus_leeway() {
    let key = es256("k1");
    let keys = keyset(&key);
    let claims = Claims::new("alice", "room-1", NOW, Duration::from_secs(60));
    let token = keys.sign(&claims).unwrap();
    assert_eq!(keys.verify(&token, NOW).unwrap(), claims);
    assert!(keys.verify(&token, NOW + 60).is_ok());
    assert!(keys.verify(&token, NOW + 60 + EXP_LEEWAY_SECS - 1).is_ok());
    let err = keys.verify(&token, NOW + 60 + EXP_LEEWAY_SECS).unwrap_err();
    assert!(matches!(err, AuthError::Expired), "{err:?}");
    assert_eq!(err.code(), "token_expired");
    assert!(matches!(
        keys.verify(&token, u64::MAX),
        Err(AuthError::Expired)
    ));
}

#[test]
fn long_expired_token_is_rejected() {
    let key = eddsa("k1");
    let keys = keyset(&key);
    let claims = Claims::new("alice", "room-1", NOW - 7200, Duration::from_secs(3600));
    let token = keys.sign(&claims).unwrap();
    assert!(matches!(keys.verify(&token, NOW), Err(AuthError::Expired)));
}

#[test]
fn token_issued_in_the_future_is_not_yet_valid() {
    let key = es256("k1");
    let keys = keyset(&key);
    let ahead = NOW + MAX_CLOCK_SKEW_SECS + 1;
    let token = keys
        .sign(&Claims::new(
            "alice",
            "room-1",
            ahead,
            Duration::from_secs(600),
        ))
        .unwrap();
    let err = keys.verify(&token, NOW).unwrap_err();
    assert!(matches!(err, AuthError::NotYetValid), "{err:?}");
    // Small clock skew is tolerated.
    let token = keys
        .sign(&Claims::new(
            "alice",
            "room-1",
            NOW + 10,
            Duration::from_secs(600),
        ))
        .unwrap();
    assert!(keys.verify(&token, NOW).is_ok());
}

#[test]
fn huge_ttl_saturates_instead_of_overflowing() {
    let claims = Claims::new("alice", "room-1", NOW, Duration::MAX);
    assert_eq!(claims.exp, u64::MAX);
    let key = es256("k1");
    let keys = keyset(&key);
    let token = keys.sign(&claims).unwrap();
    assert!(keys.verify(&token, u64::MAX - EXP_LEEWAY_SECS).is_ok());
}
