//! Key rotation: keys are chosen by kid, so old and new keys can be accepted side by
//! side, and removing a key revokes its tokens.

mod common;

use common::*;
use meridian_auth::{AuthError, KeySet};

#[test]
fn keyset_with_two_keys_accepts_both_and_removal_rejects() {
    let old = es256("old");
    let new = eddsa("new");
    let keys = KeySet::new(Some(new.clone()), vec![old.verifying_key()]);
    let old_token = old.sign(&claims()).unwrap();
    let new_token = keys.sign(&claims()).unwrap();
    assert_eq!(keys.verify(&old_token, NOW).unwrap(), claims());
    assert_eq!(keys.verify(&new_token, NOW).unwrap(), claims());

    // Retire the old key: its tokens stop verifying, the new key's still do.
    let retired = KeySet::new(Some(new.clone()), vec![]);
    let err = retired.verify(&old_token, NOW).unwrap_err();
    assert!(
        matches!(&err, AuthError::UnknownKey { kid } if kid == "old"),
        "{err:?}"
    );
    assert!(retired.verify(&new_token, NOW).is_ok());

    // Same through `remove` on a live set.
    let mut live = keys.clone();
    assert!(live.remove("old"));
    assert!(!live.remove("old"));
    assert!(matches!(
        live.verify(&old_token, NOW),
        Err(AuthError::UnknownKey { .. })
    ));
    assert!(live.verify(&new_token, NOW).is_ok());
}

#[test]
fn signing_keys_by_kid_and_default() {
    let a = es256("a");
    let b = es256("b");
    let mut keys = KeySet::new(Some(a.clone()), vec![]);
    keys.insert_signing_key(b.clone());
    assert_eq!(keys.signing_key().unwrap().kid(), "a");
    assert_eq!(keys.signing_key_by_kid("b").unwrap().kid(), "b");
    assert!(keys.signing_key_by_kid("c").is_none());

    let by_b = keys
        .signing_key_by_kid("b")
        .unwrap()
        .sign(&claims())
        .unwrap();
    assert!(keys.verify(&by_b, NOW).is_ok());

    keys.set_default_signing_key("b").unwrap();
    let token = keys.sign(&claims()).unwrap();
    assert_eq!(jwt_kid(&token), "b");
    assert!(matches!(
        keys.set_default_signing_key("zz"),
        Err(AuthError::NoSigningKey)
    ));

    // Removing the default signing key leaves no default.
    keys.remove("b");
    assert!(keys.signing_key().is_none());
    assert!(matches!(
        keys.verify(&token, NOW),
        Err(AuthError::UnknownKey { .. })
    ));
}

#[test]
fn signing_key_public_part_wins_over_a_verifying_key_with_same_kid() {
    let real = es256("k1");
    let impostor = es256("k1");
    let keys = KeySet::new(Some(real.clone()), vec![impostor.verifying_key()]);
    assert_eq!(keys.verifying_key("k1").unwrap(), &real.verifying_key());
    assert!(keys.verify(&real.sign(&claims()).unwrap(), NOW).is_ok());
    assert!(matches!(
        keys.verify(&impostor.sign(&claims()).unwrap(), NOW),
        Err(AuthError::BadSignature)
    ));
}

fn jwt_kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(header["typ"], "JWT");
    header["kid"].as_str().unwrap().to_owned()
}
