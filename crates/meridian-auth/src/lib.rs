//! JWT access tokens for Meridian.
//!
//! A token says who the client is (`sub`), which room it may join (`room`), what it may
//! do there ([`Grants`]), until when (`exp`), and — the geo-sticky part — which region
//! serves it (`region`). A node of another region does not serve the client but
//! redirects it: [`Claims::check_region`] returns [`AuthError::WrongRegion`].
//!
//! # Algorithms are pinned
//!
//! Only asymmetric algorithms exist here: ES256 (P-256) and EdDSA (Ed25519). Every key
//! carries its one algorithm, and [`KeySet::verify`] picks the key by the token's `kid`
//! and rejects the token unless its header `alg` is exactly that key's algorithm. So
//! `alg: none`, HS256 signed with a public key (key confusion) and algorithm swaps all
//! fail before any signature is checked.
//!
//! # No clock inside
//!
//! [`KeySet::verify`] takes the current time as an argument, so tests control time.
//! Binaries may use [`unix_now`].
//!
//! # Keys on disk
//!
//! [`KeySet::load`] and [`KeySet::load_or_create`] read a key directory; its layout is
//! described in the [`dir`] module.
//!
//! ```
//! use std::time::Duration;
//! use meridian_auth::{Algorithm, Claims, KeySet, SigningKey};
//!
//! let key = SigningKey::generate(Algorithm::Es256, "k1")?;
//! let keys = KeySet::new(Some(key), vec![]);
//! let claims = Claims::new("alice", "standup", 1_000, Duration::from_secs(600))
//!     .with_region("eu-west");
//! let token = keys.sign(&claims)?;
//! let checked = keys.verify(&token, 1_100)?;
//! assert_eq!(checked, claims);
//! assert!(checked.check_region("eu-west").is_ok());
//! assert_eq!(checked.check_region("us-east").unwrap_err().code(), "wrong_region");
//! # Ok::<(), meridian_auth::AuthError>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod dir;
mod error;
mod key;
mod keyset;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::AuthError;
pub use key::{Algorithm, Jwk, JwkSet, MAX_KID_BYTES, SigningKey, VerifyingKey, validate_kid};
pub use keyset::KeySet;

/// Longest token accepted, in bytes; longer ones are rejected before parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest participant identity (`sub`), in bytes.
pub const MAX_IDENTITY_BYTES: usize = 128;
/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 128;
/// Longest region name, in bytes.
pub const MAX_REGION_BYTES: usize = 64;
/// Most regions in a token's fallback list.
pub const MAX_FALLBACK_REGIONS: usize = 32;
/// Longest display name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Seconds a token is still accepted after its `exp`.
pub const EXP_LEEWAY_SECS: u64 = 5;
/// Seconds an `iat` may lie in the future (clock skew between nodes) before the token
/// is refused as not yet valid.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// The room name that, with the admin grant, stands for every room.
pub const ANY_ROOM: &str = "*";

/// Grants carried by a token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// May publish tracks.
    #[serde(default)]
    pub publish: bool,
    /// May subscribe to tracks.
    #[serde(default)]
    pub subscribe: bool,
    /// May administer rooms (and use the room `"*"`).
    #[serde(default)]
    pub admin: bool,
}

impl Grants {
    /// Subscribe only.
    pub fn subscriber() -> Self {
        Grants {
            subscribe: true,
            ..Grants::default()
        }
    }

    /// Publish and subscribe.
    pub fn publisher() -> Self {
        Grants {
            publish: true,
            subscribe: true,
            ..Grants::default()
        }
    }

    /// Every grant.
    pub fn admin() -> Self {
        Grants {
            publish: true,
            subscribe: true,
            admin: true,
        }
    }
}

/// One grant, for [`Claims::require`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grant {
    /// [`Grants::publish`].
    Publish,
    /// [`Grants::subscribe`].
    Subscribe,
    /// [`Grants::admin`].
    Admin,
}

/// Claims in a Meridian access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Participant identity.
    pub sub: String,
    /// Room name; [`ANY_ROOM`] (`"*"`) is allowed only with the admin grant.
    pub room: String,
    /// What the participant may do.
    #[serde(default)]
    pub grants: Grants,
    /// Geo-sticky region; `None` means any region may serve the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The regions to fall back to, in order, when every node of `region` is gone
    /// (set by the login endpoint from the client's measured RTTs; at most
    /// [`MAX_FALLBACK_REGIONS`]). Informative: each fallback region is entered with
    /// its own token, pinned to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issue time, unix seconds.
    pub iat: u64,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Not before, unix seconds: refused until then (with [`EXP_LEEWAY_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Audience: the service the token is for. [`Claims::new`] sets
    /// [`DEFAULT_AUDIENCE`]; [`KeySet::verify_with`] requires the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The audience [`Claims::new`] gives a token, and a node's default.
pub const DEFAULT_AUDIENCE: &str = "meridian";

/// What a verifier requires of every token beyond its signature and times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The `aud` a token must carry.
    pub audience: String,
    /// Longest lifetime accepted, from `nbf` (or `iat`) to `exp`.
    pub max_lifetime: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            audience: DEFAULT_AUDIENCE.into(),
            max_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

impl Claims {
    /// Claims for `identity` in `room`, issued at `now_unix`, valid for `ttl`, with the
    /// subscribe grant only, no region and no display name.
    pub fn new(
        identity: impl Into<String>,
        room: impl Into<String>,
        now_unix: u64,
        ttl: Duration,
    ) -> Self {
        Claims {
            sub: identity.into(),
            room: room.into(),
            grants: Grants::subscriber(),
            region: None,
            fallback: Vec::new(),
            exp: now_unix.saturating_add(ttl.as_secs()),
            iat: now_unix,
            name: None,
            nbf: None,
            aud: Some(DEFAULT_AUDIENCE.into()),
        }
    }

    /// Sets the audience.
    pub fn with_audience(mut self, aud: impl Into<String>) -> Self {
        self.aud = Some(aud.into());
        self
    }

    /// Sets "not before".
    pub fn with_not_before(mut self, nbf_unix: u64) -> Self {
        self.nbf = Some(nbf_unix);
        self
    }

    /// Checks the audience ([`AuthError::WrongAudience`], also when absent) and the
    /// lifetime ([`AuthError::LifetimeTooLong`]) against `policy`.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), AuthError> {
        if self.aud.as_deref() != Some(policy.audience.as_str()) {
            return Err(AuthError::WrongAudience);
        }
        let start = self.nbf.unwrap_or(self.iat).max(self.iat);
        if self.exp.saturating_sub(start) > policy.max_lifetime.as_secs() {
            return Err(AuthError::LifetimeTooLong {
                max_secs: policy.max_lifetime.as_secs(),
            });
        }
        Ok(())
    }

    /// Replaces the grants.
    pub fn with_grants(mut self, grants: Grants) -> Self {
        self.grants = grants;
        self
    }

    /// Pins the token to a region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the fallback order of regions (see [`Claims::fallback`]).
    pub fn with_fallback(mut self, regions: Vec<String>) -> Self {
        self.fallback = regions;
        self
    }

    /// Sets the display name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the region: `Ok(())` if the token names no region or `node_region`,
    /// otherwise [`AuthError::WrongRegion`] with the token's region, so the caller can
    /// redirect the client there.
    pub fn check_region(&self, node_region: &str) -> Result<(), AuthError> {
        match &self.region {
            Some(region) if region != node_region => Err(AuthError::WrongRegion {
                region: region.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// `Ok(())` if the token has `grant`, else [`AuthError::Forbidden`] naming it.
    pub fn require(&self, grant: Grant) -> Result<(), AuthError> {
        let (has, name) = match grant {
            Grant::Publish => (self.grants.publish, "publish"),
            Grant::Subscribe => (self.grants.subscribe, "subscribe"),
            Grant::Admin => (self.grants.admin, "admin"),
        };
        if has {
            Ok(())
        } else {
            Err(AuthError::Forbidden(name))
        }
    }

    /// `Ok(())` if the token is for `room` (or for [`ANY_ROOM`] with the admin grant),
    /// else [`AuthError::Forbidden`]`("room")`.
    pub fn check_room(&self, room: &str) -> Result<(), AuthError> {
        if self.room == room || (self.room == ANY_ROOM && self.grants.admin) {
            Ok(())
        } else {
            Err(AuthError::Forbidden("room"))
        }
    }

    /// Checks the content, independent of time: identity and room non-empty and within
    /// bounds, no control characters, `"*"` only with admin, `iat <= exp`.
    pub fn validate(&self) -> Result<(), AuthError> {
        check_text("sub", &self.sub, MAX_IDENTITY_BYTES)?;
        check_text("room", &self.room, MAX_ROOM_BYTES)?;
        if self.room == ANY_ROOM && !self.grants.admin {
            return Err(AuthError::InvalidClaims(
                "room \"*\" requires the admin grant".into(),
            ));
        }
        if let Some(region) = &self.region {
            check_text("region", region, MAX_REGION_BYTES)?;
        }
        if self.fallback.len() > MAX_FALLBACK_REGIONS {
            return Err(AuthError::InvalidClaims(format!(
                "more than {MAX_FALLBACK_REGIONS} fallback regions"
            )));
        }
        for region in &self.fallback {
            check_text("fallback", region, MAX_REGION_BYTES)?;
        }
        if let Some(name) = &self.name {
            check_text("name", name, MAX_NAME_BYTES)?;
        }
        if let Some(aud) = &self.aud {
            check_text("aud", aud, MAX_REGION_BYTES)?;
        }
        if self.nbf.is_some_and(|nbf| nbf > self.exp) {
            return Err(AuthError::InvalidClaims("nbf is after exp".into()));
        }
        if self.iat > self.exp {
            return Err(AuthError::InvalidClaims("iat is after exp".into()));
        }
        Ok(())
    }

    /// Checks times against `now_unix`: [`AuthError::Expired`] once `now_unix` is
    /// [`EXP_LEEWAY_SECS`] past `exp`; [`AuthError::NotYetValid`] if `iat` is more than
    /// [`MAX_CLOCK_SKEW_SECS`] ahead of `now_unix` or `nbf` more than
    /// [`EXP_LEEWAY_SECS`] ahead.
    pub fn check_time(&self, now_unix: u64) -> Result<(), AuthError> {
        if now_unix >= self.exp.saturating_add(EXP_LEEWAY_SECS) {
            return Err(AuthError::Expired);
        }
        if self
            .nbf
            .is_some_and(|nbf| nbf > now_unix.saturating_add(EXP_LEEWAY_SECS))
        {
            return Err(AuthError::NotYetValid);
        }
        if self.iat > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(AuthError::NotYetValid);
        }
        Ok(())
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), AuthError> {
    if value.is_empty() {
        return Err(AuthError::InvalidClaims(format!("{field} is empty")));
    }
    if value.len() > max {
        return Err(AuthError::InvalidClaims(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(AuthError::InvalidClaims(format!(
            "{field} has control characters"
        )));
    }
    Ok(())
}

/// Seconds since the unix epoch by the system clock (0 if the clock is before 1970).
///
/// For binaries only; library logic takes time as an argument.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
