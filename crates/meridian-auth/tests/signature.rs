//! Wrong signatures and unknown signers are refused.

mod common;

use common::*;
use meridian_auth::{AuthError, KeySet};
use serde_json::json;

#[test]
fn token_signed_by_another_key_with_same_kid_has_bad_signature() {
    for (ours, theirs) in [(es256("k1"), es256("k1")), (eddsa("k1"), eddsa("k1"))] {
        let keys = keyset(&ours);
        let token = theirs.sign(&claims()).unwrap();
        let err = keys.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature), "{err:?}");
        assert_eq!(err.code(), "token_bad_signature");
    }
}

#[test]
fn token_signed_by_unknown_kid_is_rejected() {
    let keys = keyset(&es256("k1"));
    let token = es256("stranger").sign(&claims()).unwrap();
    let err = keys.verify(&token, NOW).unwrap_err();
    assert!(
        matches!(&err, AuthError::UnknownKey { kid } if kid == "stranger"),
        "{err:?}"
    );
    assert_eq!(err.code(), "token_unknown_kid");
}

#[test]
fn tampered_payload_is_rejected() {
    let key = es256("k1");
    let keys = keyset(&key);
    let token = key.sign(&claims()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged = payload();
    forged["grants"]["admin"] = json!(true);
    forged["room"] = json!("*");
    let forged = b64(forged.to_string().as_bytes());
    let token = format!("{}.{}.{}", parts[0], forged, parts[2]);
    assert!(matches!(
        keys.verify(&token, NOW),
        Err(AuthError::BadSignature)
    ));
}

#[test]
fn flipped_signature_bits_are_rejected() {
    for key in [es256("k1"), eddsa("k1")] {
        let keys = keyset(&key);
        let token = key.sign(&claims()).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut sig =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
        for i in [0, sig.len() / 2, sig.len() - 1] {
            sig[i] ^= 0x01;
            let err = keys
                .verify(&format!("{input}.{}", b64(&sig)), NOW)
                .unwrap_err();
            assert!(matches!(err, AuthError::BadSignature), "{err:?}");
            sig[i] ^= 0x01;
        }
        // Wrong length signatures too.
        for bad in [
            &sig[..sig.len() - 1],
            &[0u8; 1][..],
            &[sig.clone(), sig.clone()].concat(),
        ] {
            let err = keys
                .verify(&format!("{input}.{}", b64(bad)), NOW)
                .unwrap_err();
            assert!(matches!(err, AuthError::BadSignature), "{err:?}");
        }
    }
}

#[test]
fn verify_only_keyset_accepts_but_cannot_sign() {
    let key = eddsa("k1");
    let keys = KeySet::new(None, vec![key.verifying_key()]);
    let token = key.sign(&claims()).unwrap();
    assert_eq!(keys.verify(&token, NOW).unwrap(), claims());
    assert!(matches!(keys.sign(&claims()), Err(AuthError::NoSigningKey)));
}
