//! Key encodings: PKCS#8 / SPKI PEM and JWK round trips, and refusal of wrong keys.

mod common;

use common::*;
use meridian_auth::{Algorithm, AuthError, Jwk, SigningKey, VerifyingKey, validate_kid};

#[test]
fn private_pem_round_trips_for_both_algorithms() {
    for key in [es256("k1"), eddsa("k1")] {
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = SigningKey::from_pkcs8_pem(key.algorithm(), "k1", &pem).unwrap();
        assert_eq!(again.verifying_key(), key.verifying_key());
        // A token from the reloaded key verifies with the original's public key.
        let keys = meridian_auth::KeySet::new(None, vec![key.verifying_key()]);
        assert!(keys.verify(&again.sign(&claims()).unwrap(), NOW).is_ok());
    }
}

#[test]
fn public_pem_and_jwk_round_trip() {
    for key in [es256("k1"), eddsa("k1")] {
        let public = key.verifying_key();
        let pem = public.to_public_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(
            VerifyingKey::from_public_pem(key.algorithm(), "k1", &pem).unwrap(),
            public
        );

        let jwk = public.to_jwk();
        assert_eq!(jwk.kid, "k1");
        assert_eq!(jwk.key_use.as_deref(), Some("sig"));
        let json = serde_json::to_string(&jwk).unwrap();
        assert!(json.contains("\"use\":\"sig\""), "{json}");
        let back: Jwk = serde_json::from_str(&json).unwrap();
        assert_eq!(VerifyingKey::from_jwk(&back).unwrap(), public);
    }
}

#[test]
fn jwk_shapes() {
    let ec = es256("e").verifying_key().to_jwk();
    assert_eq!(
        (ec.kty.as_str(), ec.crv.as_str(), ec.alg.as_str()),
        ("EC", "P-256", "ES256")
    );
    assert!(ec.y.is_some());
    let ed = eddsa("d").verifying_key().to_jwk();
    assert_eq!(
        (ed.kty.as_str(), ed.crv.as_str(), ed.alg.as_str()),
        ("OKP", "Ed25519", "EdDSA")
    );
    assert!(ed.y.is_none());

    let mut bad = ec.clone();
    bad.alg = "HS256".into();
    assert!(matches!(
        VerifyingKey::from_jwk(&bad),
        Err(AuthError::InvalidKey(_))
    ));
    let mut bad = ec.clone();
    bad.alg = "EdDSA".into();
    assert!(VerifyingKey::from_jwk(&bad).is_err());
    let mut bad = ec;
    bad.x = "AAAA".into();
    assert!(VerifyingKey::from_jwk(&bad).is_err());
}

#[test]
fn pem_of_the_wrong_kind_or_algorithm_is_invalid_key() {
    let es = es256("k1");
    let ed = eddsa("k1");
    let cases = [
        SigningKey::from_pkcs8_pem(Algorithm::Es256, "k1", &ed.to_pkcs8_pem()).err(),
        SigningKey::from_pkcs8_pem(Algorithm::EdDsa, "k1", &es.to_pkcs8_pem()).err(),
        SigningKey::from_pkcs8_pem(Algorithm::Es256, "k1", &es.verifying_key().to_public_pem())
            .err(),
        SigningKey::from_pkcs8_pem(Algorithm::Es256, "k1", "garbage").err(),
    ];
    for err in cases {
        assert!(matches!(err, Some(AuthError::InvalidKey(_))), "{err:?}");
    }
    let err =
        VerifyingKey::from_public_pem(Algorithm::EdDsa, "k1", &es.verifying_key().to_public_pem())
            .unwrap_err();
    assert!(matches!(err, AuthError::InvalidKey(_)));
    // A point not on the curve.
    let mut raw = es.verifying_key().raw_public_key().to_vec();
    raw[64] ^= 1;
    assert!(VerifyingKey::from_raw(Algorithm::Es256, "k1", &raw).is_err());
}

#[test]
fn kids_are_restricted() {
    for good in ["a", "dev-1", "2025_01", &"k".repeat(64)] {
        assert!(validate_kid(good).is_ok(), "{good}");
    }
    for bad in ["", "a.b", "../x", "a b", "ü", &"k".repeat(65)] {
        assert!(
            matches!(validate_kid(bad), Err(AuthError::InvalidKid(_))),
            "{bad}"
        );
        assert!(SigningKey::generate(Algorithm::Es256, bad).is_err());
    }
}

#[test]
fn debug_does_not_leak_private_key() {
    let key = es256("k1");
    let debug = format!("{key:?}");
    assert!(debug.contains("k1"));
    let pem = key.to_pkcs8_pem();
    let body_line = pem.lines().nth(1).unwrap();
    assert!(!debug.contains(body_line));
}

#[test]
fn ed25519_pkcs8_v1_is_accepted() {
    // `openssl genpkey -algorithm ed25519` writes PKCS#8 v1 (no public key inside).
    let v1 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .unwrap();
    let key = SigningKey::from_pkcs8_der(Algorithm::EdDsa, "v1", v1.as_ref()).unwrap();
    let keys = meridian_auth::KeySet::new(None, vec![key.verifying_key()]);
    assert_eq!(
        keys.verify(&key.sign(&claims()).unwrap(), NOW).unwrap(),
        claims()
    );
}
