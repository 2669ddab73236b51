//! The key directory: created once, loaded the same next time, bad files named.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use meridian_auth::dir::{DEV_KID, SIGNING_KID_FILE};
use meridian_auth::{Algorithm, AuthError, KeySet};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn load_or_create_creates_the_dev_key_once_and_reloads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data").join("keys");

    let first = KeySet::load_or_create(&dir).unwrap();
    let key = first.signing_key().expect("dev key created");
    assert_eq!(key.kid(), DEV_KID);
    assert_eq!(key.algorithm(), Algorithm::Es256);
    let file = dir.join("dev-1.es256.pem");
    assert!(file.is_file());
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let token = first.sign(&claims()).unwrap();

    let second = KeySet::load_or_create(&dir).unwrap();
    assert_eq!(
        second.signing_key().unwrap().to_pkcs8_pem(),
        key.to_pkcs8_pem()
    );
    assert_eq!(second.verify(&token, NOW).unwrap(), claims());
    let third = KeySet::load(&dir).unwrap();
    assert_eq!(third.verify(&token, NOW).unwrap(), claims());
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        1,
        "no second key was created"
    );
}

#[test]
fn corrupt_key_file_is_a_key_file_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    KeySet::load_or_create(tmp.path()).unwrap();
    let file = tmp.path().join("dev-1.es256.pem");
    for garbage in [
        &b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n"[..],
        b"",
        b"\xff\xfe\x00 binary",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        fs::write(&file, garbage).unwrap();
        for result in [KeySet::load(tmp.path()), KeySet::load_or_create(tmp.path())] {
            let err = result.unwrap_err();
            match &err {
                AuthError::KeyFile { path, .. } => assert_eq!(path, &file),
                other => panic!("expected KeyFile, got {other:?}"),
            }
            assert!(err.to_string().contains("dev-1.es256.pem"), "{err}");
            assert_eq!(err.code(), "key_file");
        }
    }
}

#[test]
fn key_of_the_wrong_algorithm_for_its_name_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    eddsa("k1").write_to_dir(tmp.path()).unwrap();
    fs::rename(
        tmp.path().join("k1.eddsa.pem"),
        tmp.path().join("k1.es256.pem"),
    )
    .unwrap();
    let err = KeySet::load(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, AuthError::KeyFile { path, .. } if path.ends_with("k1.es256.pem")),
        "{err:?}"
    );
}

#[test]
fn badly_named_and_duplicate_files_are_rejected_others_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = es256("k1");
    key.write_to_dir(dir).unwrap();
    fs::write(dir.join("README.md"), "notes").unwrap();
    fs::write(dir.join(".k1.es256.pem.swp"), "editor junk").unwrap();
    assert!(KeySet::load(dir).unwrap().signing_key().is_some());

    fs::write(dir.join("k1.rs256.pem"), key.to_pkcs8_pem()).unwrap();
    let err = KeySet::load(dir).unwrap_err();
    assert!(
        matches!(&err, AuthError::KeyFile { path, .. } if path.ends_with("k1.rs256.pem")),
        "{err:?}"
    );
    fs::remove_file(dir.join("k1.rs256.pem")).unwrap();

    key.verifying_key().write_to_dir(dir).unwrap();
    let err = KeySet::load(dir).unwrap_err();
    assert!(err.to_string().contains("duplicate kid k1"), "{err}");
}

#[test]
fn public_keys_are_verify_only_and_signing_kid_picks_the_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = es256("a");
    let b = eddsa("b");
    let remote = eddsa("remote");
    a.write_to_dir(dir).unwrap();
    b.write_to_dir(dir).unwrap();
    let public = remote.verifying_key().write_to_dir(dir).unwrap();
    assert_eq!(mode(&public), 0o600);
    assert!(public.ends_with("remote.eddsa.pub.pem"));

    // Two private keys and no signing-kid: ambiguous.
    let err = KeySet::load(dir).unwrap_err();
    assert!(
        matches!(&err, AuthError::KeyFile { path, .. } if path.ends_with(SIGNING_KID_FILE)),
        "{err:?}"
    );

    fs::write(dir.join(SIGNING_KID_FILE), "b\n").unwrap();
    let keys = KeySet::load(dir).unwrap();
    assert_eq!(keys.signing_key().unwrap().kid(), "b");
    assert!(keys.signing_key_by_kid("a").is_some());
    assert!(keys.signing_key_by_kid("remote").is_none());
    assert!(keys.verify(&remote.sign(&claims()).unwrap(), NOW).is_ok());
    assert!(keys.verify(&a.sign(&claims()).unwrap(), NOW).is_ok());
    assert_eq!(keys.jwks().keys.len(), 3);

    fs::write(dir.join(SIGNING_KID_FILE), "remote").unwrap();
    let err = KeySet::load(dir).unwrap_err();
    assert_eq!(err.code(), "key_file");
}

#[test]
fn verify_only_directory_and_missing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = es256("remote");
    remote.verifying_key().write_to_dir(tmp.path()).unwrap();
    let keys = KeySet::load(tmp.path()).unwrap();
    assert!(keys.signing_key().is_none());
    assert!(keys.verify(&remote.sign(&claims()).unwrap(), NOW).is_ok());

    let err = KeySet::load(&tmp.path().join("absent")).unwrap_err();
    assert!(matches!(err, AuthError::Io { .. }), "{err:?}");
}

#[test]
fn writing_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let first = es256("k1");
    first.write_to_dir(tmp.path()).unwrap();
    let err = es256("k1").write_to_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, AuthError::Io { .. }), "{err:?}");
    let loaded = KeySet::load(tmp.path()).unwrap();
    assert_eq!(
        loaded.signing_key().unwrap().to_pkcs8_pem(),
        first.to_pkcs8_pem()
    );
}
