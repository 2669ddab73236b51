//! Keys: the pinned algorithms, signing keys (private) and verifying keys (public).

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, ParsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

use crate::error::AuthError;

/// Longest accepted key id, in bytes.
pub const MAX_KID_BYTES: usize = 64;

/// DER prefix of a P-256 SubjectPublicKeyInfo; the 65-byte uncompressed point follows.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Algorithms accepted (pinned): ES256 and EdDSA only.
///
/// Every key is bound to exactly one algorithm; a token whose header names another
/// one is rejected, which rules out `none`, HMAC key confusion and algorithm swaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256 (JOSE `ES256`).
    Es256,
    /// Ed25519 (JOSE `EdDSA`).
    EdDsa,
}

impl Algorithm {
    /// The JOSE `alg` name: `"ES256"` or `"EdDSA"`.
    pub fn jose_name(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    /// Parses a JOSE `alg` name exactly (case-sensitive, as RFC 7515 requires).
    pub fn from_jose_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Algorithm::Es256),
            "EdDSA" => Some(Algorithm::EdDsa),
            _ => None,
        }
    }

    /// The tag used in key file names: `"es256"` or `"eddsa"`.
    pub fn file_tag(self) -> &'static str {
        match self {
            Algorithm::Es256 => "es256",
            Algorithm::EdDsa => "eddsa",
        }
    }

    /// Parses a key file tag (`"es256"` or `"eddsa"`).
    pub fn from_file_tag(tag: &str) -> Option<Self> {
        match tag {
            "es256" => Some(Algorithm::Es256),
            "eddsa" => Some(Algorithm::EdDsa),
            _ => None,
        }
    }

    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::Es256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.jose_name())
    }
}

/// Checks a key id: 1 to [`MAX_KID_BYTES`] bytes of `[A-Za-z0-9_-]`.
///
/// The restriction keeps kids safe to use as file names and in logs.
pub fn validate_kid(kid: &str) -> Result<(), AuthError> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_BYTES
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidKid(crate::error::clip(kid)))
    }
}

/// A signing key with its key id: kid + pinned algorithm + private key.
///
/// `Debug` never prints the private key.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    /// PKCS#8 v2 (Ed25519) or v1 (P-256) DER, as the signer expects it.
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    verifying: VerifyingKey,
}

impl SigningKey {
    /// Generates a fresh key pair from the system's secure random source.
    pub fn generate(alg: Algorithm, kid: impl Into<String>) -> Result<Self, AuthError> {
        let rng = SystemRandom::new();
        let doc = match alg {
            Algorithm::Es256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            }
            Algorithm::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
        }
        .map_err(|_| AuthError::Signing("key generation failed".into()))?;
        Self::from_pkcs8_der(alg, kid, doc.as_ref())
    }

    /// Reads an unencrypted PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`), as written
    /// by [`SigningKey::to_pkcs8_pem`] or `openssl genpkey`.
    pub fn from_pkcs8_pem(
        alg: Algorithm,
        kid: impl Into<String>,
        pem: &str,
    ) -> Result<Self, AuthError> {
        let parsed = pem::parse(pem).map_err(|e| AuthError::InvalidKey(format!("bad PEM: {e}")))?;
        if parsed.tag() != "PRIVATE KEY" {
            return Err(AuthError::InvalidKey(format!(
                "expected a PRIVATE KEY (PKCS#8) PEM block, found {}",
                crate::error::clip(parsed.tag())
            )));
        }
        Self::from_pkcs8_der(alg, kid, parsed.contents())
    }

    /// Reads an unencrypted PKCS#8 private key in DER form.
    pub fn from_pkcs8_der(
        alg: Algorithm,
        kid: impl Into<String>,
        der: &[u8],
    ) -> Result<Self, AuthError> {
        let kid = kid.into();
        validate_kid(&kid)?;
        let not_alg = |_| AuthError::InvalidKey(format!("not a valid {alg} PKCS#8 private key"));
        let (pkcs8, public) = match alg {
            Algorithm::Es256 => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(not_alg)?;
                (der.to_vec(), pair.public_key().as_ref().to_vec())
            }
            Algorithm::EdDsa => {
                // Accept v1 files (what `openssl genpkey` writes); store v2, which the
                // signer requires.
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(not_alg)?;
                let v2 = pair
                    .to_pkcs8()
                    .map_err(|_| AuthError::InvalidKey("cannot re-encode Ed25519 key".into()))?;
                (v2.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
            }
        };
        let encoding = match alg {
            Algorithm::Es256 => EncodingKey::from_ec_der(&pkcs8),
            Algorithm::EdDsa => EncodingKey::from_ed_der(&pkcs8),
        };
        let verifying = VerifyingKey::from_raw(alg, kid.clone(), &public)?;
        Ok(SigningKey {
            kid,
            alg,
            pkcs8,
            encoding,
            verifying,
        })
    }

    /// The private key as PKCS#8 PEM (LF line endings). Handle with care.
    pub fn to_pkcs8_pem(&self) -> String {
        encode_pem("PRIVATE KEY", &self.pkcs8)
    }

    /// The key id, put in the `kid` header of every token this key signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public part, with the same kid and algorithm.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.verifying.clone()
    }

    /// Signs the claims; the header carries `alg`, `kid` and `typ: JWT`.
    ///
    /// The claims are checked first (see [`crate::Claims::validate`]) so that no token
    /// is minted that `verify` would refuse for its content.
    pub fn sign(&self, claims: &crate::Claims) -> Result<String, AuthError> {
        claims.validate()?;
        let mut header = jsonwebtoken::Header::new(self.alg.to_jwt());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let token = jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        if token.len() > crate::MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        Ok(token)
    }

    /// The file name this key is stored under in a key directory: `<kid>.<alg>.pem`.
    pub fn file_name(&self) -> String {
        format!("{}.{}.pem", self.kid, self.alg.file_tag())
    }

    /// Writes the key into `dir` as [`SigningKey::file_name`], mode 0600, refusing to
    /// overwrite an existing file. Returns the path written.
    pub fn write_to_dir(&self, dir: &Path) -> Result<PathBuf, AuthError> {
        crate::dir::write_new_file(&dir.join(self.file_name()), self.to_pkcs8_pem().as_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A public key with its key id and pinned algorithm.
///
/// Serializes as PEM (SubjectPublicKeyInfo) or as a JWK.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: String,
    alg: Algorithm,
    /// Uncompressed P-256 point (65 bytes) or raw Ed25519 key (32 bytes).
    raw: Vec<u8>,
    decoding: DecodingKey,
}

impl VerifyingKey {
    /// Builds a key from raw public bytes: the 65-byte uncompressed P-256 point, or the
    /// 32-byte Ed25519 key. The bytes are checked to be a valid key for `alg`.
    pub fn from_raw(alg: Algorithm, kid: impl Into<String>, raw: &[u8]) -> Result<Self, AuthError> {
        let kid = kid.into();
        validate_kid(&kid)?;
        let (len_ok, check) = match alg {
            Algorithm::Es256 => (
                raw.len() == 65 && raw.first() == Some(&0x04),
                ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, raw),
            ),
            Algorithm::EdDsa => (raw.len() == 32, ParsedPublicKey::new(&ED25519, raw)),
        };
        if !len_ok || check.is_err() {
            return Err(AuthError::InvalidKey(format!(
                "not a valid {alg} public key"
            )));
        }
        let decoding = match alg {
            Algorithm::Es256 => DecodingKey::from_ec_der(raw),
            Algorithm::EdDsa => DecodingKey::from_ed_der(raw),
        };
        Ok(VerifyingKey {
            kid,
            alg,
            raw: raw.to_vec(),
            decoding,
        })
    }

    /// Reads a public key PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo), as
    /// written by [`VerifyingKey::to_public_pem`] or `openssl pkey -pubout`.
    pub fn from_public_pem(
        alg: Algorithm,
        kid: impl Into<String>,
        pem: &str,
    ) -> Result<Self, AuthError> {
        let parsed = pem::parse(pem).map_err(|e| AuthError::InvalidKey(format!("bad PEM: {e}")))?;
        if parsed.tag() != "PUBLIC KEY" {
            return Err(AuthError::InvalidKey(format!(
                "expected a PUBLIC KEY PEM block, found {}",
                crate::error::clip(parsed.tag())
            )));
        }
        let raw = parsed
            .contents()
            .strip_prefix(spki_prefix(alg))
            .ok_or_else(|| AuthError::InvalidKey(format!("not a {alg} public key")))?;
        Self::from_raw(alg, kid, raw)
    }

    /// The public key as SubjectPublicKeyInfo PEM (LF line endings).
    pub fn to_public_pem(&self) -> String {
        let mut der = spki_prefix(self.alg).to_vec();
        der.extend_from_slice(&self.raw);
        encode_pem("PUBLIC KEY", &der)
    }

    /// The public key as a JWK (RFC 7517 / RFC 8037), with `kid`, `alg` and `use: sig`.
    pub fn to_jwk(&self) -> Jwk {
        let (kty, crv, x, y) = match self.alg {
            Algorithm::Es256 => {
                let (x, y) = self.raw[1..].split_at(32);
                ("EC", "P-256", x, Some(URL_SAFE_NO_PAD.encode(y)))
            }
            Algorithm::EdDsa => ("OKP", "Ed25519", &self.raw[..], None),
        };
        Jwk {
            kty: kty.into(),
            crv: crv.into(),
            x: URL_SAFE_NO_PAD.encode(x),
            y,
            kid: self.kid.clone(),
            alg: self.alg.jose_name().into(),
            key_use: Some("sig".into()),
        }
    }

    /// Reads a JWK; `alg` is required and must agree with `kty`/`crv`.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, AuthError> {
        let bad = |what: &str| AuthError::InvalidKey(format!("JWK: {what}"));
        let alg = Algorithm::from_jose_name(&jwk.alg).ok_or_else(|| bad("alg not allowed"))?;
        if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
            return Err(bad("use is not sig"));
        }
        let b64 = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| bad("bad base64url"));
        let raw = match (alg, jwk.kty.as_str(), jwk.crv.as_str(), &jwk.y) {
            (Algorithm::Es256, "EC", "P-256", Some(y)) => {
                let (x, y) = (b64(&jwk.x)?, b64(y)?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(bad("coordinate length"));
                }
                [&[0x04][..], &x, &y].concat()
            }
            (Algorithm::EdDsa, "OKP", "Ed25519", None) => b64(&jwk.x)?,
            _ => return Err(bad("kty/crv do not match alg")),
        };
        Self::from_raw(alg, jwk.kid.clone(), &raw)
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The raw public key bytes (uncompressed P-256 point or Ed25519 key).
    pub fn raw_public_key(&self) -> &[u8] {
        &self.raw
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// The file name this key is stored under in a key directory: `<kid>.<alg>.pub.pem`.
    pub fn file_name(&self) -> String {
        format!("{}.{}.pub.pem", self.kid, self.alg.file_tag())
    }

    /// Writes the key into `dir` as [`VerifyingKey::file_name`], mode 0600, refusing to
    /// overwrite an existing file. Returns the path written.
    pub fn write_to_dir(&self, dir: &Path) -> Result<PathBuf, AuthError> {
        crate::dir::write_new_file(&dir.join(self.file_name()), self.to_public_pem().as_bytes())
    }
}

impl PartialEq for VerifyingKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.alg == other.alg && self.raw == other.raw
    }
}

impl Eq for VerifyingKey {}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A public key in JSON Web Key form (RFC 7517; OKP keys per RFC 8037).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `"EC"` or `"OKP"`.
    pub kty: String,
    /// Curve: `"P-256"` or `"Ed25519"`.
    pub crv: String,
    /// base64url x coordinate (EC) or public key (OKP).
    pub x: String,
    /// base64url y coordinate (EC only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// Key id.
    pub kid: String,
    /// JOSE algorithm name: `"ES256"` or `"EdDSA"`.
    pub alg: String,
    /// Intended use; `"sig"` when present.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

/// A JWK Set (`{"keys": [...]}`), e.g. to publish the verifying keys of a region.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

fn spki_prefix(alg: Algorithm) -> &'static [u8] {
    match alg {
        Algorithm::Es256 => P256_SPKI_PREFIX,
        Algorithm::EdDsa => ED25519_SPKI_PREFIX,
    }
}

fn encode_pem(tag: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), config)
}
