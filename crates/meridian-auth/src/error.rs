//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong minting or checking a token, or loading keys.
///
/// Each variant has a stable wire code ([`AuthError::code`]) that signaling sends to
/// clients; the `Display` text is for logs and may change.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not three base64url parts with a JSON header and payload.
    #[error("malformed token")]
    Malformed,
    /// The token is longer than [`crate::MAX_TOKEN_BYTES`]; it was not parsed.
    #[error("token too large")]
    TooLarge,
    /// The token's `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token's `iat` is in the future (beyond the allowed clock skew).
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not match the key named by the token's `kid`.
    #[error("bad token signature")]
    BadSignature,
    /// The header names an algorithm other than the one pinned for its key
    /// (including `none` and every HMAC algorithm).
    #[error("token algorithm not allowed: {alg}")]
    AlgorithmNotAllowed {
        /// The `alg` found in the header, truncated for logging.
        alg: String,
    },
    /// No key in the key set has the token's `kid`.
    #[error("unknown key id: {kid}")]
    UnknownKey {
        /// The `kid` found in the header, truncated for logging.
        kid: String,
    },
    /// The token header has no `kid`.
    #[error("token header has no kid")]
    MissingKid,
    /// The claims are missing, mistyped or out of bounds.
    #[error("invalid token claims: {0}")]
    InvalidClaims(String),
    /// The token's `aud` is absent or not this service's.
    #[error("token is not for this service (aud)")]
    WrongAudience,
    /// The token lives longer than the verifier accepts.
    #[error("token lifetime exceeds {max_secs} s")]
    LifetimeTooLong {
        /// The most accepted, in seconds.
        max_secs: u64,
    },
    /// The token belongs to another region; the caller should redirect there.
    #[error("token is for region {region}")]
    WrongRegion {
        /// The region named by the token.
        region: String,
    },
    /// The token lacks a grant needed for the action; names the grant (or `"room"`).
    #[error("forbidden: missing {0}")]
    Forbidden(&'static str),
    /// The key set has no signing key (a verify-only node), or no key with that kid.
    #[error("no signing key")]
    NoSigningKey,
    /// A key id is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("invalid key id: {0:?}")]
    InvalidKid(String),
    /// Key material given in memory (PEM, JWK) could not be used.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A file in the key directory is bad; names the file.
    #[error("key file {}: {reason}", path.display())]
    KeyFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the key directory failed.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The crypto library failed to sign (should not happen with a valid key).
    #[error("signing failed: {0}")]
    Signing(String),
}

impl AuthError {
    /// The stable wire code of this error, e.g. `"token_expired"`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Malformed => "token_malformed",
            AuthError::TooLarge => "token_too_large",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "token_bad_signature",
            AuthError::AlgorithmNotAllowed { .. } => "token_alg_not_allowed",
            AuthError::UnknownKey { .. } => "token_unknown_kid",
            AuthError::MissingKid => "token_missing_kid",
            AuthError::InvalidClaims(_) => "token_invalid_claims",
            AuthError::WrongAudience => "token_wrong_audience",
            AuthError::LifetimeTooLong { .. } => "token_lifetime_too_long",
            AuthError::WrongRegion { .. } => "wrong_region",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::NoSigningKey => "no_signing_key",
            AuthError::InvalidKid(_) => "invalid_kid",
            AuthError::InvalidKey(_) => "invalid_key",
            AuthError::KeyFile { .. } => "key_file",
            AuthError::Io { .. } => "io",
            AuthError::Signing(_) => "signing_failed",
        }
    }

    /// True for errors caused by the presented token (the client should get a new one),
    /// false for server-side key or I/O problems.
    pub fn is_token_error(&self) -> bool {
        self.code().starts_with("token_")
    }
}

/// Truncates attacker-controlled text before it goes into an error (and so a log).
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
