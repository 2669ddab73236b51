//! The geo-sticky token's fallback order: carried, bounded, checked.

mod common;

use common::*;
use meridian_auth::{AuthError, MAX_FALLBACK_REGIONS};

#[test]
fn the_fallback_order_survives_signing_and_verifying() {
    let keys = keyset(&es256("k1"));
    let claims = claims()
        .with_region("us")
        .with_fallback(vec!["eu".into(), "ap".into()]);
    let checked = keys.verify(&keys.sign(&claims).unwrap(), NOW).unwrap();
    assert_eq!(checked.fallback, ["eu", "ap"]);
    // A token for "us" presented in "eu" is still redirected: the fallback list does
    // not widen where the token is served.
    assert_eq!(
        checked.check_region("eu").unwrap_err().code(),
        "wrong_region"
    );
    // Tokens without the claim (older issuers) have an empty list.
    let plain = keys
        .verify(&keys.sign(&common::claims()).unwrap(), NOW)
        .unwrap();
    assert!(plain.fallback.is_empty());
}

#[test]
fn too_many_or_bad_fallback_regions_are_invalid_claims() {
    let keys = keyset(&es256("k1"));
    let many = claims().with_fallback(vec!["r".into(); MAX_FALLBACK_REGIONS + 1]);
    assert!(matches!(keys.sign(&many), Err(AuthError::InvalidClaims(_))));
    let control = claims().with_fallback(vec!["e\nu".into()]);
    assert!(matches!(
        keys.sign(&control),
        Err(AuthError::InvalidClaims(_))
    ));
    let empty = claims().with_fallback(vec![String::new()]);
    assert!(matches!(
        keys.sign(&empty),
        Err(AuthError::InvalidClaims(_))
    ));
}
