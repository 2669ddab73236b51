//! Geo-sticky tokens: a node of another region gets `WrongRegion` and redirects.

mod common;

use common::*;
use meridian_auth::AuthError;

#[test]
fn no_region_is_accepted_everywhere() {
    let claims = claims();
    assert_eq!(claims.region, None);
    assert!(claims.check_region("eu-west").is_ok());
    assert!(claims.check_region("us-east").is_ok());
}

#[test]
fn matching_region_is_accepted_and_other_regions_redirect() {
    let claims = claims().with_region("eu-west");
    assert!(claims.check_region("eu-west").is_ok());
    let err = claims.check_region("us-east").unwrap_err();
    assert!(
        matches!(&err, AuthError::WrongRegion { region } if region == "eu-west"),
        "{err:?}"
    );
    assert_eq!(err.code(), "wrong_region");
    // Exact match only.
    assert!(claims.check_region("EU-WEST").is_err());
    assert!(claims.check_region("eu-west-1").is_err());
}

#[test]
fn region_survives_the_token_round_trip() {
    let key = eddsa("k1");
    let keys = keyset(&key);
    let token = keys.sign(&claims().with_region("ap-south")).unwrap();
    let checked = keys.verify(&token, NOW).unwrap();
    assert_eq!(checked.region.as_deref(), Some("ap-south"));
    assert!(matches!(
        checked.check_region("eu-west"),
        Err(AuthError::WrongRegion { .. })
    ));
}

#[test]
fn empty_region_is_invalid() {
    let keys = keyset(&es256("k1"));
    assert!(matches!(
        keys.sign(&claims().with_region("")),
        Err(AuthError::InvalidClaims(_))
    ));
}
