//! The keys a node accepts and mints with, and token verification.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;

use crate::error::{AuthError, clip};
use crate::key::{Algorithm, JwkSet, SigningKey, VerifyingKey};
use crate::{Claims, MAX_TOKEN_BYTES};

/// The set of keys a node accepts, chosen by `kid` (so keys can rotate), plus the
/// signing keys it mints with (one of them the default).
///
/// Every signing key's public part is also accepted for verification.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    /// Signing keys by kid.
    signing: BTreeMap<String, SigningKey>,
    /// Kid of the default signing key, if any.
    default_signing: Option<String>,
    /// Verifying keys by kid.
    verifying: BTreeMap<String, VerifyingKey>,
}

impl KeySet {
    /// A key set that signs with `signing` (if any) and accepts tokens from it and from
    /// each of `verifying`. If a verifying key has the same kid as the signing key, the
    /// signing key's own public part is kept; among verifying keys the last one wins.
    pub fn new(signing: Option<SigningKey>, verifying: Vec<VerifyingKey>) -> Self {
        let mut set = KeySet::default();
        for key in verifying {
            set.insert_verifying_key(key);
        }
        if let Some(key) = signing {
            set.default_signing = Some(key.kid().to_owned());
            set.insert_signing_key(key);
        }
        set
    }

    /// Loads the key directory without creating anything; see [`crate::dir`] for the
    /// layout. A bad file gives [`AuthError::KeyFile`] naming it.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        crate::dir::load(dir)
    }

    /// Loads the key directory (e.g. `<data-dir>/keys/`), first creating the directory
    /// (mode 0700) and an ES256 dev key with kid [`crate::dir::DEV_KID`] (mode 0600)
    /// if it holds no private key. Later calls load the same key.
    pub fn load_or_create(dir: &Path) -> Result<Self, AuthError> {
        crate::dir::load_or_create(dir)
    }

    /// Adds a signing key (and its public part); it becomes the default if there was
    /// none. Replaces any key with the same kid.
    pub fn insert_signing_key(&mut self, key: SigningKey) {
        let kid = key.kid().to_owned();
        self.verifying.insert(kid.clone(), key.verifying_key());
        if self.default_signing.is_none() {
            self.default_signing = Some(kid.clone());
        }
        self.signing.insert(kid, key);
    }

    /// Adds a verify-only key, replacing any verifying key with the same kid. Ignored
    /// if a signing key has that kid (its own public part stays).
    pub fn insert_verifying_key(&mut self, key: VerifyingKey) {
        if !self.signing.contains_key(key.kid()) {
            self.verifying.insert(key.kid().to_owned(), key);
        }
    }

    /// Removes every key (signing and verifying) with `kid`, so its tokens are no longer
    /// accepted. Returns whether anything was removed.
    pub fn remove(&mut self, kid: &str) -> bool {
        let signing = self.signing.remove(kid).is_some();
        let verifying = self.verifying.remove(kid).is_some();
        if self.default_signing.as_deref() == Some(kid) {
            self.default_signing = None;
        }
        signing || verifying
    }

    /// Makes the signing key `kid` the default; [`AuthError::NoSigningKey`] if absent.
    pub fn set_default_signing_key(&mut self, kid: &str) -> Result<(), AuthError> {
        if !self.signing.contains_key(kid) {
            return Err(AuthError::NoSigningKey);
        }
        self.default_signing = Some(kid.to_owned());
        Ok(())
    }

    /// The default signing key, if this node can mint tokens.
    pub fn signing_key(&self) -> Option<&SigningKey> {
        self.default_signing
            .as_deref()
            .and_then(|kid| self.signing.get(kid))
    }

    /// The signing key with this kid (for `token create --kid`).
    pub fn signing_key_by_kid(&self, kid: &str) -> Option<&SigningKey> {
        self.signing.get(kid)
    }

    /// The verifying key with this kid.
    pub fn verifying_key(&self, kid: &str) -> Option<&VerifyingKey> {
        self.verifying.get(kid)
    }

    /// All accepted keys, ordered by kid.
    pub fn verifying_keys(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.verifying.values()
    }

    /// All accepted keys as a JWK Set.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.verifying.values().map(VerifyingKey::to_jwk).collect(),
        }
    }

    /// Signs with the default signing key; [`AuthError::NoSigningKey`] if none.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        self.signing_key()
            .ok_or(AuthError::NoSigningKey)?
            .sign(claims)
    }

    /// Verifies a token and returns its claims.
    ///
    /// In order: size ([`MAX_TOKEN_BYTES`], before any parsing); shape; header (`alg`
    /// must be ES256 or EdDSA, `kid` present, `typ` absent or `JWT`, no `crit`); key by
    /// `kid`; `alg` equal to the key's pinned algorithm; signature; claim content
    /// ([`Claims::validate`]); time ([`Claims::check_time`]). The region is not checked
    /// here: call [`Claims::check_region`].
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        self.verify_unchecked_policy(token, now_unix)
    }

    /// [`KeySet::verify`], then the audience and lifetime rules of `policy`
    /// ([`Claims::check_policy`]). What a node uses.
    pub fn verify_with(
        &self,
        token: &str,
        now_unix: u64,
        policy: &crate::Policy,
    ) -> Result<Claims, AuthError> {
        let claims = self.verify_unchecked_policy(token, now_unix)?;
        claims.check_policy(policy)?;
        Ok(claims)
    }

    fn verify_unchecked_policy(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        // Shape first: every part must be canonical base64url, so that garbage is
        // `Malformed` whatever the key lookup would say. The signature may be empty
        // only so that an unsigned `alg: none` token is named for what it is.
        if payload.is_empty()
            || URL_SAFE_NO_PAD.decode(payload).is_err()
            || URL_SAFE_NO_PAD.decode(signature).is_err()
        {
            return Err(AuthError::Malformed);
        }
        let (alg, kid) = parse_header(header)?;
        if signature.is_empty() {
            return Err(AuthError::Malformed);
        }
        let key = self
            .verifying
            .get(&kid)
            .ok_or_else(|| AuthError::UnknownKey { kid: clip(&kid) })?;
        if key.algorithm() != alg {
            return Err(AuthError::AlgorithmNotAllowed {
                alg: alg.jose_name().into(),
            });
        }
        let mut validation = jsonwebtoken::Validation::new(alg.to_jwt());
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Claims>(token, key.decoding_key(), &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed {
                    alg: alg.jose_name().into(),
                },
                ErrorKind::Json(e) => AuthError::InvalidClaims(clip(&e.to_string())),
                ErrorKind::InvalidClaimFormat(c) | ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::InvalidClaims(clip(c))
                }
                _ => AuthError::Malformed,
            })?
            .claims;
        claims.validate()?;
        claims.check_time(now_unix)?;
        Ok(claims)
    }
}

/// Parses the JOSE header far enough to apply our policy; returns `(alg, kid)`.
fn parse_header(encoded: &str) -> Result<(Algorithm, String), AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| AuthError::Malformed)?;
    let serde_json::Value::Object(header) =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?
    else {
        return Err(AuthError::Malformed);
    };
    let alg = match header.get("alg") {
        Some(serde_json::Value::String(alg)) => alg,
        _ => return Err(AuthError::Malformed),
    };
    let alg = Algorithm::from_jose_name(alg)
        .ok_or_else(|| AuthError::AlgorithmNotAllowed { alg: clip(alg) })?;
    match header.get("typ") {
        None => {}
        Some(serde_json::Value::String(typ)) if typ.eq_ignore_ascii_case("JWT") => {}
        Some(_) => return Err(AuthError::Malformed),
    }
    // We understand no JOSE extensions, so a `crit` header must be refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    match header.get("kid") {
        None | Some(serde_json::Value::Null) => Err(AuthError::MissingKid),
        Some(serde_json::Value::String(kid)) if kid.is_empty() => Err(AuthError::MissingKid),
        Some(serde_json::Value::String(kid)) => Ok((alg, kid.clone())),
        Some(_) => Err(AuthError::Malformed),
    }
}
