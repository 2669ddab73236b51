//! Grants and room access.

mod common;

use common::*;
use meridian_auth::{AuthError, Grant, Grants};

#[test]
fn new_claims_only_subscribe() {
    let c = claims();
    assert!(c.require(Grant::Subscribe).is_ok());
    let err = c.require(Grant::Publish).unwrap_err();
    assert!(matches!(err, AuthError::Forbidden("publish")));
    assert_eq!(err.code(), "forbidden");
    assert!(matches!(
        c.require(Grant::Admin),
        Err(AuthError::Forbidden("admin"))
    ));
    let p = claims().with_grants(Grants::publisher());
    assert!(p.require(Grant::Publish).is_ok());
}

#[test]
fn room_access() {
    let c = claims();
    assert!(c.check_room("room-1").is_ok());
    assert!(matches!(
        c.check_room("room-2"),
        Err(AuthError::Forbidden("room"))
    ));
    let mut admin = claims().with_grants(Grants::admin());
    admin.room = "*".into();
    assert!(admin.check_room("anything").is_ok());
}

#[test]
fn wildcard_room_needs_admin() {
    let keys = keyset(&es256("k1"));
    let mut c = claims();
    c.room = "*".into();
    assert!(matches!(keys.sign(&c), Err(AuthError::InvalidClaims(_))));
    assert!(c.check_room("room-1").is_err());
    let c = c.with_grants(Grants::admin());
    let checked = keys.verify(&keys.sign(&c).unwrap(), NOW).unwrap();
    assert!(checked.grants.admin);
}

#[test]
fn empty_or_control_characters_are_invalid() {
    let keys = keyset(&es256("k1"));
    for bad in [
        meridian_auth::Claims {
            sub: String::new(),
            ..claims()
        },
        meridian_auth::Claims {
            room: String::new(),
            ..claims()
        },
        meridian_auth::Claims {
            sub: "a\nb".into(),
            ..claims()
        },
        claims().with_name("x\u{1b}[31m"),
        meridian_auth::Claims {
            iat: NOW + 10,
            exp: NOW,
            ..claims()
        },
    ] {
        let err = keys.sign(&bad).unwrap_err();
        assert_eq!(err.code(), "token_invalid_claims", "{bad:?}");
    }
}
