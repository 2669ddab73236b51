//! The classic key-confusion attack: an HS256 token whose HMAC key is the server's
//! public key (which is public, so anyone can compute it) must be refused.

mod common;

use aws_lc_rs::hmac;
use common::*;
use meridian_auth::AuthError;
use serde_json::json;

fn hs256(secret: &[u8], input: &str) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

#[test]
fn hs256_signed_with_public_key_bytes_is_rejected() {
    for key in [es256("k1"), eddsa("k1")] {
        let keys = keyset(&key);
        let public = key.verifying_key();
        let jwk = serde_json::to_string(&public.to_jwk()).unwrap();
        let pem = public.to_public_pem();
        let secrets: [&[u8]; 3] = [pem.as_bytes(), public.raw_public_key(), jwk.as_bytes()];
        for alg in ["HS256", "HS384", "HS512"] {
            let input = signing_input(&json!({"alg": alg, "typ": "JWT", "kid": "k1"}), &payload());
            for secret in secrets {
                let err = keys.verify(&hs256(secret, &input), NOW).unwrap_err();
                assert!(
                    matches!(err, AuthError::AlgorithmNotAllowed { .. }),
                    "{alg}: {err:?}"
                );
            }
        }
    }
}

#[test]
fn hs256_without_kid_is_still_rejected_for_its_algorithm() {
    let key = es256("k1");
    let keys = keyset(&key);
    let input = signing_input(&json!({"alg": "HS256"}), &payload());
    let token = hs256(key.verifying_key().to_public_pem().as_bytes(), &input);
    assert_eq!(
        keys.verify(&token, NOW).unwrap_err().code(),
        "token_alg_not_allowed"
    );
}
