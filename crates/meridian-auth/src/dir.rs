//! The key directory (e.g. `<data-dir>/keys/`).
//!
//! Layout, one key per file, the kid and algorithm in the file name:
//!
//! | file                     | content                                             |
//! |--------------------------|-----------------------------------------------------|
//! | `<kid>.es256.pem`        | P-256 private key, PKCS#8 PEM; signs and verifies   |
//! | `<kid>.eddsa.pem`        | Ed25519 private key, PKCS#8 PEM; signs and verifies |
//! | `<kid>.es256.pub.pem`    | P-256 public key, SPKI PEM; verify-only             |
//! | `<kid>.eddsa.pub.pem`    | Ed25519 public key, SPKI PEM; verify-only           |
//! | `signing-kid`            | optional: the kid of the default signing key        |
//!
//! A kid is 1–64 characters of `[A-Za-z0-9_-]` and appears at most once. The default
//! signing key is the one named in `signing-kid`; without that file, the only private
//! key; with no private key the node is verify-only; with several private keys and no
//! `signing-kid` loading fails. Rotation: add the new private key, point `signing-kid`
//! at it, keep the old key (or its `.pub.pem`) until its tokens have expired, then
//! delete it.
//!
//! Hidden files (starting with `.`), directories and files not ending in `.pem` are
//! ignored; a `.pem` file whose name does not follow the table is an error, so a typo
//! never silently drops a key. Files this crate writes have mode 0600 and are never
//! overwritten.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::AuthError;
use crate::key::{Algorithm, SigningKey, VerifyingKey, validate_kid};
use crate::keyset::KeySet;

/// Kid of the ES256 key that [`KeySet::load_or_create`] creates in an empty directory.
pub const DEV_KID: &str = "dev-1";
/// Name of the optional file holding the kid of the default signing key.
pub const SIGNING_KID_FILE: &str = "signing-kid";
/// Largest key file read, in bytes.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// What a key file name says: `(kid, alg, is_public)`.
pub fn parse_file_name(name: &str) -> Option<(&str, Algorithm, bool)> {
    let stem = name.strip_suffix(".pem")?;
    let (stem, public) = match stem.strip_suffix(".pub") {
        Some(stem) => (stem, true),
        None => (stem, false),
    };
    let (kid, tag) = stem.rsplit_once('.')?;
    let alg = Algorithm::from_file_tag(tag)?;
    validate_kid(kid).ok()?;
    Some((kid, alg, public))
}

pub(crate) fn load(dir: &Path) -> Result<KeySet, AuthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthError::Io { path, source }
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        paths.push(entry.map_err(io(dir))?.path());
    }
    paths.sort();

    let mut set = KeySet::default();
    let mut private_kids = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for path in paths {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".pem") || !path.is_file() {
            continue;
        }
        let key_file = |reason: String| AuthError::KeyFile {
            path: path.clone(),
            reason,
        };
        let Some((kid, alg, public)) = parse_file_name(&name) else {
            return Err(key_file(
                "name is not <kid>.<es256|eddsa>[.pub].pem with kid of [A-Za-z0-9_-]".into(),
            ));
        };
        if !seen.insert(kid.to_owned()) {
            return Err(key_file(format!("duplicate kid {kid}")));
        }
        let text = read_small(&path)?;
        if public {
            let key = VerifyingKey::from_public_pem(alg, kid, &text)
                .map_err(|e| key_file(e.to_string()))?;
            set.insert_verifying_key(key);
        } else {
            let key =
                SigningKey::from_pkcs8_pem(alg, kid, &text).map_err(|e| key_file(e.to_string()))?;
            private_kids.push(kid.to_owned());
            set.insert_signing_key(key);
        }
    }

    let kid_file = dir.join(SIGNING_KID_FILE);
    let default = if kid_file.exists() {
        let text = read_small(&kid_file)?;
        let kid = text.trim();
        if !private_kids.iter().any(|k| k == kid) {
            return Err(AuthError::KeyFile {
                path: kid_file,
                reason: format!("no private key with kid {}", crate::error::clip(kid)),
            });
        }
        Some(kid.to_owned())
    } else {
        match private_kids.as_slice() {
            [] => None,
            [only] => Some(only.clone()),
            _ => {
                return Err(AuthError::KeyFile {
                    path: kid_file,
                    reason: "several private keys: write the kid to sign with into this file"
                        .into(),
                });
            }
        }
    };
    if let Some(kid) = default {
        set.set_default_signing_key(&kid)?;
    }
    Ok(set)
}

pub(crate) fn load_or_create(dir: &Path) -> Result<KeySet, AuthError> {
    create_dir(dir)?;
    let set = load(dir)?;
    if set.signing_key().is_some() {
        return Ok(set);
    }
    let key = SigningKey::generate(Algorithm::Es256, DEV_KID)?;
    key.write_to_dir(dir)?;
    load(dir)
}

fn create_dir(dir: &Path) -> Result<(), AuthError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| AuthError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_small(path: &Path) -> Result<String, AuthError> {
    let io = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > MAX_KEY_FILE_BYTES {
        return Err(AuthError::KeyFile {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_KEY_FILE_BYTES} bytes"),
        });
    }
    let bytes = fs::read(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|_| AuthError::KeyFile {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// Creates `path` with mode 0600 (failing if it exists) and writes `contents`.
pub(crate) fn write_new_file(path: &Path, contents: &[u8]) -> Result<PathBuf, AuthError> {
    let io = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(path.to_path_buf())
}
