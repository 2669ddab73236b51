//! What a node requires beyond signature and expiry: `nbf` honoured, `aud` present and
//! its own, lifetime capped.

mod common;

use std::time::Duration;

use common::*;
use meridian_auth::{AuthError, Claims, EXP_LEEWAY_SECS, Policy};

fn policy() -> Policy {
    Policy {
        audience: "meridian".into(),
        max_lifetime: Duration::from_secs(3600),
    }
}

#[test]
fn not_before_is_honoured() {
    let keys = keyset(&es256("k1"));
    let claims = Claims::new("alice", "r", NOW, Duration::from_secs(600)).with_not_before(NOW + 60);
    let token = keys.sign(&claims).unwrap();
    let err = keys.verify_with(&token, NOW, &policy()).unwrap_err();
    assert!(matches!(err, AuthError::NotYetValid), "{err:?}");
    assert!(
        keys.verify_with(&token, NOW + 60 - EXP_LEEWAY_SECS, &policy())
            .is_ok()
    );
    assert!(keys.verify_with(&token, NOW + 61, &policy()).is_ok());
}

#[test]
fn the_audience_is_required_and_must_be_the_node_s() {
    let keys = keyset(&es256("k1"));
    let mut claims = Claims::new("alice", "r", NOW, Duration::from_secs(600));
    let ok = keys.sign(&claims).unwrap();
    assert_eq!(keys.verify_with(&ok, NOW, &policy()).unwrap(), claims);
    claims.aud = None;
    let missing = keys.sign(&claims).unwrap();
    let err = keys.verify_with(&missing, NOW, &policy()).unwrap_err();
    assert_eq!(err.code(), "token_wrong_audience");
    let other = keys
        .sign(&claims.clone().with_audience("another-service"))
        .unwrap();
    assert!(matches!(
        keys.verify_with(&other, NOW, &policy()),
        Err(AuthError::WrongAudience)
    ));
}

#[test]
fn lifetimes_above_the_cap_are_refused() {
    let keys = keyset(&es256("k1"));
    let long = Claims::new("alice", "r", NOW, Duration::from_secs(3601));
    let err = keys
        .verify_with(&keys.sign(&long).unwrap(), NOW, &policy())
        .unwrap_err();
    assert_eq!(err.code(), "token_lifetime_too_long");
    let capped = Claims::new("alice", "r", NOW, Duration::from_secs(3600));
    assert!(
        keys.verify_with(&keys.sign(&capped).unwrap(), NOW, &policy())
            .is_ok()
    );
    // An old `iat` with a far `nbf` does not stretch the window.
    let mut sneaky = Claims::new("alice", "r", NOW, Duration::from_secs(7200));
    sneaky.nbf = Some(NOW - 100_000);
    assert!(matches!(
        keys.verify_with(&keys.sign(&sneaky).unwrap(), NOW, &policy()),
        Err(AuthError::LifetimeTooLong { .. })
    ));
}
