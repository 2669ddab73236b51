//! Signed checkpoints: the anchor of the per-stream hash chains.
//!
//! A stream's chain proves its rows were not edited, reordered or cut *relative to
//! its head*; whoever can write the database can still rewrite a stream and its head
//! together. A checkpoint fixes every stream head at a moment, signed with an Ed25519
//! key the database does not hold (a file under the node's data directory). Once a
//! checkpoint is exported (or simply read back and checked with the public key), a
//! rewritten history no longer matches a signed head and `verify` says where.
//!
//! The signed bytes are [`SIGNING_CONTEXT`] followed by the checkpoint's JSON `body`
//! exactly as stored; `public_key` and `signature` are lowercase hex.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{LogHead, StoreError};

/// Prefix of every signed message (domain separation).
pub const SIGNING_CONTEXT: &[u8] = b"meridian-log-checkpoint-v1\n";

/// File name of a node's checkpoint signing key under `<data-dir>/keys/`.
pub const KEY_FILE: &str = "log-checkpoint.ed25519";

/// One stream's last row at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    /// The stream.
    pub stream: String,
    /// Its last sequence.
    pub sequence: u64,
    /// The region position of that row.
    pub position: u64,
    /// The hash of that row.
    pub hash: String,
}

/// What a checkpoint states: every stream head at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// 1, 2, 3, … per log.
    pub number: u64,
    /// When it was taken (the signer's clock).
    pub created_at: DateTime<Utc>,
    /// End of the global chain of rows written before per-stream chains.
    pub legacy: LogHead,
    /// SHA-256 (hex) of the previous checkpoint's body (64 zeros for the first).
    pub prev: String,
    /// Every stream head, ordered by stream.
    pub heads: Vec<StreamHead>,
}

/// A checkpoint as stored and exported: the JSON body and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// The checkpoint's number (also inside `body`).
    pub number: u64,
    /// The [`Checkpoint`] as JSON, exactly the bytes signed.
    pub body: String,
    /// Signer's Ed25519 public key, hex.
    pub public_key: String,
    /// Ed25519 signature over [`SIGNING_CONTEXT`] ‖ `body`, hex.
    pub signature: String,
}

impl SignedCheckpoint {
    /// Sign `checkpoint` with `key`.
    pub fn sign(checkpoint: &Checkpoint, key: &SigningKey) -> Result<Self, StoreError> {
        let body = serde_json::to_string(checkpoint)
            .map_err(|e| StoreError::InvalidInput(format!("checkpoint does not serialize: {e}")))?;
        let signature = key.sign(&message(&body));
        Ok(Self {
            number: checkpoint.number,
            public_key: hex(key.verifying_key().as_bytes()),
            signature: hex(&signature.to_bytes()),
            body,
        })
    }

    /// Check the signature with one of `keys` and parse the body. Errors name why.
    pub fn open(&self, keys: &[VerifyingKey]) -> Result<Checkpoint, String> {
        let sig = unhex(&self.signature)
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| format!("checkpoint {}: malformed signature", self.number))?;
        let msg = message(&self.body);
        if !keys.iter().any(|k| k.verify(&msg, &sig).is_ok()) {
            return Err(format!(
                "checkpoint {}: signature does not verify with the given public key(s)",
                self.number
            ));
        }
        let cp: Checkpoint = serde_json::from_str(&self.body)
            .map_err(|e| format!("checkpoint {}: body does not parse: {e}", self.number))?;
        if cp.number != self.number {
            return Err(format!(
                "checkpoint {}: body says number {}",
                self.number, cp.number
            ));
        }
        Ok(cp)
    }

    /// SHA-256 (hex) of the body: the next checkpoint's `prev`.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.body.as_bytes()))
    }
}

fn message(body: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body.as_bytes());
    m
}

/// Digest of a checkpoint's heads and legacy end, to skip unchanged checkpoints.
pub(crate) fn heads_digest(legacy: &LogHead, heads: &[StreamHead]) -> String {
    let mut h = Sha256::new();
    h.update(legacy.position.to_be_bytes());
    h.update(legacy.hash.as_bytes());
    for s in heads {
        h.update((s.stream.len() as u64).to_be_bytes());
        h.update(s.stream.as_bytes());
        h.update(s.sequence.to_be_bytes());
        h.update(s.hash.as_bytes());
    }
    hex(&h.finalize())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The path of the signing key under `data_dir`: `<data_dir>/keys/log-checkpoint.ed25519`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join(KEY_FILE)
}

/// Load the node's checkpoint signing key from `<data_dir>/keys/log-checkpoint.ed25519`
/// (32-byte seed, hex), creating it (mode 0600) with a fresh random key when missing.
/// The public key is written beside it (`….pub`, hex) for auditors.
pub fn load_or_create_signing_key(data_dir: &Path) -> Result<SigningKey, StoreError> {
    let path = key_path(data_dir);
    let io = |what: &str, e: std::io::Error| {
        StoreError::InvalidInput(format!("{what} {}: {e}", path.display()))
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed = unhex(&text)
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    StoreError::InvalidInput(format!(
                        "{} must hold a 32-byte Ed25519 seed as 64 hex digits",
                        path.display()
                    ))
                })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io("cannot create the folder of", e))?;
            }
            let seed: [u8; 32] = rand::random();
            let key = SigningKey::from_bytes(&seed);
            write_private(&path, format!("{}\n", hex(&seed)).as_bytes())
                .map_err(|e| io("cannot write", e))?;
            let mut pub_path = path.clone().into_os_string();
            pub_path.push(".pub");
            std::fs::write(
                &pub_path,
                format!("{}\n", hex(key.verifying_key().as_bytes())),
            )
            .map_err(|e| io("cannot write the public key beside", e))?;
            Ok(key)
        }
        Err(e) => Err(io("cannot read", e)),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The hex public key of `key`.
pub fn public_key_hex(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

/// Parse a public key given as 64 hex digits, or as the path of a file holding them.
pub fn parse_public_key(arg: &str) -> Result<VerifyingKey, StoreError> {
    let text = if unhex(arg).is_some_and(|b| b.len() == 32) {
        arg.to_owned()
    } else {
        std::fs::read_to_string(arg).map_err(|e| {
            StoreError::InvalidInput(format!(
                "public key {arg:?} is neither 64 hex digits nor a readable file: {e}"
            ))
        })?
    };
    let bytes = unhex(&text)
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| StoreError::InvalidInput(format!("{arg:?}: not a 32-byte hex key")))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| StoreError::InvalidInput(format!("{arg:?}: not an Ed25519 key: {e}")))
}

/// Read exported checkpoints (one [`SignedCheckpoint`] JSON object per line).
pub fn read_checkpoints(path: &Path) -> Result<Vec<SignedCheckpoint>, StoreError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                StoreError::InvalidInput(format!("{} line {}: {e}", path.display(), i + 1))
            })
        })
        .collect()
}

/// Take a checkpoint every `interval` until the store is dropped or the task aborted.
/// Failures (database down, another node's checkpoint with the same number) are
/// logged and retried at the next tick.
pub fn spawn_checkpointer(
    store: crate::Store,
    key: Arc<SigningKey>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match store.checkpoint(&key).await {
                Ok(Some(cp)) => tracing::debug!(number = cp.number, "log checkpoint signed"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "log checkpoint failed; retrying"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp() -> Checkpoint {
        Checkpoint {
            number: 1,
            created_at: DateTime::from_timestamp_micros(1_700_000_000_000_000).expect("time"),
            legacy: LogHead {
                position: 0,
                hash: meridian_events::GENESIS_HASH.into(),
            },
            prev: meridian_events::GENESIS_HASH.into(),
            heads: vec![StreamHead {
                stream: "room:a".into(),
                sequence: 3,
                position: 7,
                hash: "ab".repeat(32),
            }],
        }
    }

    #[test]
    fn signed_checkpoint_opens_only_with_its_key_and_body() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let s = SignedCheckpoint::sign(&cp(), &key).expect("sign");
        assert_eq!(s.open(&[key.verifying_key()]).expect("opens"), cp());
        assert!(s.open(&[other.verifying_key()]).is_err());
        let mut forged = s.clone();
        forged.body = forged.body.replace("\"sequence\":3", "\"sequence\":2");
        assert!(forged.open(&[key.verifying_key()]).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("dir");
        let a = load_or_create_signing_key(dir.path()).expect("create");
        let b = load_or_create_signing_key(dir.path()).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path()))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pub_file = dir.path().join("keys").join(format!("{KEY_FILE}.pub"));
        let vk = parse_public_key(pub_file.to_str().expect("utf-8")).expect("pub");
        assert_eq!(vk, a.verifying_key());
        assert_eq!(
            parse_public_key(&public_key_hex(&a)).expect("hex"),
            a.verifying_key()
        );
    }
}
