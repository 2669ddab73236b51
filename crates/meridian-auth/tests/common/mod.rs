//! Helpers shared by the integration tests: fixed time, keys, and hand-made tokens.
#![allow(dead_code)]

use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meridian_auth::{Algorithm, Claims, KeySet, SigningKey};

/// The fixed "now" of every test, unix seconds.
pub const NOW: u64 = 1_700_000_000;

pub fn es256(kid: &str) -> SigningKey {
    SigningKey::generate(Algorithm::Es256, kid).expect("generate ES256 key")
}

pub fn eddsa(kid: &str) -> SigningKey {
    SigningKey::generate(Algorithm::EdDsa, kid).expect("generate EdDSA key")
}

pub fn keyset(key: &SigningKey) -> KeySet {
    KeySet::new(Some(key.clone()), vec![])
}

/// alice in "room-1", issued now, valid ten minutes.
pub fn claims() -> Claims {
    Claims::new("alice", "room-1", NOW, Duration::from_secs(600))
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `b64(header).b64(payload)`, the signing input.
pub fn signing_input(header: &serde_json::Value, payload: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    )
}

/// Signs any header and payload with `key`'s private key, bypassing all checks of the
/// crate, as an attacker holding (or a buggy issuer using) the key could.
pub fn sign_raw(
    key: &SigningKey,
    header: &serde_json::Value,
    payload: &serde_json::Value,
) -> String {
    let input = signing_input(header, payload);
    let der = pem::parse(key.to_pkcs8_pem()).expect("own PEM parses");
    let sig = match key.algorithm() {
        Algorithm::Es256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.contents())
                .expect("own key parses");
            pair.sign(&SystemRandom::new(), input.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec()
        }
        Algorithm::EdDsa => Ed25519KeyPair::from_pkcs8(der.contents())
            .expect("own key parses")
            .sign(input.as_bytes())
            .as_ref()
            .to_vec(),
    };
    format!("{input}.{}", b64(&sig))
}

/// The claims of [`claims`] as JSON.
pub fn payload() -> serde_json::Value {
    serde_json::to_value(claims()).expect("claims serialize")
}
