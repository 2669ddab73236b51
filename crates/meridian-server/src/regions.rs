//! The region directory and the endpoints that choose a client's region.
//!
//! The directory (`[[regions]]` in the node's config file, the same list on every
//! node of every region) names each region: its id, its nodes' public signaling URLs
//! (WebSocket and WebTransport), its probe URL, its internal relay address (for the
//! cross-region relay) and a price table for the egress estimate. Each region names
//! its own event log (`log`): no two regions may share one, and a node's
//! `node.database_url` must be its own region's, so no region writes another's log.
//!
//! Endpoints (`http.rs` mounts them):
//! - `GET /probe`: a tiny, cacheless answer (the region and node id) a client times to
//!   measure its RTT to the region. No auth; the per-address connection cap and the
//!   per-address join bucket (`signaling.joins_per_ip_per_minute`) bound it.
//! - `POST /login`: an identity token (signed by a key in `[login] identity_keys_dir`)
//!   plus the client's RTTs per region → one access token per region, ranked by
//!   [`meridian_protocol::region::rank_regions`] (geo-sticky: each names its region
//!   and the fallback order). Refusals are typed: `{code, message}`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_protocol::region::{
    LoginError, LoginRequest, LoginResponse, MAX_REGIONS, RegionRoute, rank_regions,
};
use serde::Deserialize;

use crate::NodeState;
use crate::config::ConfigError;

/// Most signaling URLs one region may list.
pub const MAX_REGION_URLS: usize = 16;

/// Egress prices of a region, per GB, in any one currency.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Prices {
    /// Per GB forwarded between nodes of the same region.
    pub in_region_per_gb: f64,
    /// Per GB sent to another region (relay links).
    pub cross_region_per_gb: f64,
    /// Per GB sent to clients on the internet.
    pub internet_per_gb: f64,
    /// Per GB of media (either direction) of a client served from another region:
    /// internet egress plus the cross-region transfer, transit and NAT processing
    /// (the capacity planner's `--remote-usd-per-gb`). Only for the one-region
    /// comparison of the egress estimate (`docs/regions.md`).
    pub remote_client_per_gb: f64,
}

impl Default for Prices {
    /// Public-cloud list prices of the kind the article uses (USD): free inside a
    /// zone, 2 ct between regions, 9 ct to the internet.
    fn default() -> Self {
        Prices {
            in_region_per_gb: 0.0,
            cross_region_per_gb: 0.02,
            internet_per_gb: 0.09,
            remote_client_per_gb: 0.15,
        }
    }
}

/// One region of the directory.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    /// Region id, as tokens and `node.region` name it (1..=64 of `[A-Za-z0-9._-]`).
    pub id: String,
    /// WebSocket signaling URLs of the region's nodes (`ws://…/signal`, `wss://…`).
    pub signal_urls: Vec<String>,
    /// WebTransport signaling URLs of the region's nodes (`https://…/signal`).
    #[serde(default)]
    pub webtransport_urls: Vec<String>,
    /// The URL clients time to measure their RTT to the region (`http(s)://…/probe`,
    /// usually a load balancer in front of the region's nodes).
    pub probe_url: String,
    /// Where other regions' nodes reach this region's relay (internal, `host:port`).
    #[serde(default)]
    pub relay_addr: Option<String>,
    /// The region's event log, as its nodes' `node.database_url` names it; regions
    /// must not share one.
    #[serde(default)]
    pub log: Option<String>,
    /// Egress prices for the cost estimate.
    #[serde(default)]
    pub prices: Prices,
}

/// The login endpoint: which identity tokens it accepts and what it mints.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginConfig {
    /// Key directory (layout of `meridian_auth::dir`, verify-only `.pub.pem` files
    /// suffice) of the identity provider whose tokens `POST /login` accepts; unset:
    /// `/login` answers `login_disabled`.
    pub identity_keys_dir: Option<PathBuf>,
    /// The `aud` identity tokens must carry (distinct from access tokens', so an
    /// access token cannot log in and an identity token cannot join).
    pub identity_audience: String,
    /// Lifetime of the access tokens `/login` mints, in seconds (never beyond the
    /// identity token's own expiry).
    pub token_ttl_secs: u64,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            identity_keys_dir: None,
            identity_audience: "meridian-login".into(),
            token_ttl_secs: 3600,
        }
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn has_scheme(url: &str, schemes: &[&str]) -> bool {
    url.len() <= 2048
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && schemes.iter().any(|s| {
            url.strip_prefix(s)
                .and_then(|rest| rest.strip_prefix("://"))
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        })
}

/// Checks the directory and the login section on their own.
pub(crate) fn validate(regions: &[RegionEntry], login: &LoginConfig) -> Result<(), ConfigError> {
    if regions.len() > MAX_REGIONS {
        return Err(invalid(
            "regions",
            format!("at most {MAX_REGIONS} regions, found {}", regions.len()),
        ));
    }
    let mut ids = BTreeSet::new();
    let mut logs = BTreeSet::new();
    for r in regions {
        if !valid_id(&r.id) {
            return Err(invalid(
                "regions.id",
                format!("{:?} is not 1..=64 of [A-Za-z0-9._-]", r.id),
            ));
        }
        if !ids.insert(r.id.as_str()) {
            return Err(invalid(
                "regions.id",
                format!("region {:?} is listed twice", r.id),
            ));
        }
        if r.signal_urls.is_empty() || r.signal_urls.len() > MAX_REGION_URLS {
            return Err(invalid(
                "regions.signal_urls",
                format!(
                    "region {:?} needs 1..={MAX_REGION_URLS} signaling URLs",
                    r.id
                ),
            ));
        }
        if let Some(bad) = r
            .signal_urls
            .iter()
            .find(|u| !has_scheme(u, &["ws", "wss"]))
        {
            return Err(invalid(
                "regions.signal_urls",
                format!("region {:?}: {bad:?} is not a ws:// or wss:// URL", r.id),
            ));
        }
        if r.webtransport_urls.len() > MAX_REGION_URLS {
            return Err(invalid(
                "regions.webtransport_urls",
                format!("region {:?}: at most {MAX_REGION_URLS}", r.id),
            ));
        }
        if let Some(bad) = r
            .webtransport_urls
            .iter()
            .find(|u| !has_scheme(u, &["https"]))
        {
            return Err(invalid(
                "regions.webtransport_urls",
                format!("region {:?}: {bad:?} is not an https:// URL", r.id),
            ));
        }
        if !has_scheme(&r.probe_url, &["http", "https"]) {
            return Err(invalid(
                "regions.probe_url",
                format!(
                    "region {:?}: {:?} is not an http:// or https:// URL",
                    r.id, r.probe_url
                ),
            ));
        }
        if let Some(relay) = &r.relay_addr {
            let ok = relay.parse::<SocketAddr>().is_ok()
                || relay
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(invalid(
                    "regions.relay_addr",
                    format!("region {:?}: {relay:?} is not host:port", r.id),
                ));
            }
        }
        if let Some(log) = &r.log
            && !logs.insert(log.as_str())
        {
            return Err(invalid(
                "regions.log",
                format!(
                    "region {:?} shares its event log with another region; each region keeps its own",
                    r.id
                ),
            ));
        }
        let p = &r.prices;
        for (v, name) in [
            (p.in_region_per_gb, "in_region_per_gb"),
            (p.cross_region_per_gb, "cross_region_per_gb"),
            (p.internet_per_gb, "internet_per_gb"),
            (p.remote_client_per_gb, "remote_client_per_gb"),
        ] {
            if !v.is_finite() || !(0.0..=1000.0).contains(&v) {
                return Err(invalid(
                    "regions.prices",
                    format!("region {:?}: {name} = {v} is not in 0 ..= 1000", r.id),
                ));
            }
        }
    }
    if login.identity_audience.is_empty() || login.identity_audience.len() > 64 {
        return Err(invalid(
            "login.identity_audience",
            "must be 1..=64 characters".into(),
        ));
    }
    if !(60..=30 * 24 * 3600).contains(&login.token_ttl_secs) {
        return Err(invalid(
            "login.token_ttl_secs",
            "must be 60 ..= 2592000 (30 days)".into(),
        ));
    }
    if login.identity_keys_dir.is_some() && regions.is_empty() {
        return Err(invalid(
            "login.identity_keys_dir",
            "login needs a [[regions]] directory to rank".into(),
        ));
    }
    Ok(())
}

/// Checks this node's region and log against the directory: its region is listed, and
/// it writes its own region's log, never another's.
pub(crate) fn validate_node(
    regions: &[RegionEntry],
    node_region: &str,
    database_url: Option<&str>,
) -> Result<(), ConfigError> {
    if !regions.is_empty() {
        let Some(own) = regions.iter().find(|r| r.id == node_region) else {
            return Err(invalid(
                "node.region",
                format!("{node_region:?} is not in the [[regions]] directory"),
            ));
        };
        if let (Some(log), Some(url)) = (&own.log, database_url)
            && log != url
        {
            return Err(invalid(
                "node.database_url",
                format!(
                    "region {:?} keeps its log at the URL its [[regions]] entry names; this node would write elsewhere",
                    own.id
                ),
            ));
        }
        if let Some(url) = database_url
            && let Some(other) = regions
                .iter()
                .find(|r| r.id != node_region && r.log.as_deref() == Some(url))
        {
            return Err(invalid(
                "node.database_url",
                format!(
                    "that is region {:?}'s event log; no region writes another's log",
                    other.id
                ),
            ));
        }
    }
    Ok(())
}

/// The first signaling URL of `region` in the directory, for `redirect`.
pub(crate) fn signal_url(regions: &[RegionEntry], region: &str) -> Option<String> {
    regions
        .iter()
        .find(|r| r.id == region)
        .and_then(|r| r.signal_urls.first().cloned())
}

/// `GET /regions`: the directory's ids and probe URLs (public, no auth), so a client
/// knows what to probe before it logs in.
pub(crate) async fn list(State(state): State<NodeState>) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        axum::Json(meridian_protocol::region::RegionList {
            this_region: state.config.node.region.clone(),
            regions: state
                .config
                .regions
                .iter()
                .map(|r| meridian_protocol::region::RegionProbe {
                    region: r.id.clone(),
                    probe_url: r.probe_url.clone(),
                })
                .collect(),
        }),
    )
        .into_response()
}

/// `GET /probe`: the smallest answer a client can time. Not cached; counted per source
/// address like joins.
pub(crate) async fn probe(
    State(state): State<NodeState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !state
        .limits
        .allow_join(peer.ip(), std::time::Instant::now())
    {
        state.metrics.limit_refused("joins_per_ip");
        return refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many probes from this address",
        );
    }
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        format!(
            "{{\"region\":{},\"node\":{}}}",
            serde_json::Value::from(state.config.node.region.as_str()),
            serde_json::Value::from(state.config.node.id.as_str())
        ),
    )
        .into_response()
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        axum::Json(LoginError {
            code: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

/// The identity provider's keys, loaded at start (`None`: login disabled).
pub(crate) fn load_identity_keys(
    login: &LoginConfig,
) -> Result<Option<meridian_auth::KeySet>, meridian_auth::AuthError> {
    login
        .identity_keys_dir
        .as_deref()
        .map(meridian_auth::KeySet::load)
        .transpose()
}

/// `POST /login`: checks the identity token, ranks the regions by the client's RTTs,
/// and mints one access token per region in that order.
pub(crate) async fn login(
    State(state): State<NodeState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    if !state
        .limits
        .allow_join(peer.ip(), std::time::Instant::now())
    {
        state.metrics.limit_refused("joins_per_ip");
        return refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many logins from this address; try again in a minute",
        );
    }
    let Some(identity_keys) = state.identity_keys.as_deref() else {
        return refusal(
            StatusCode::NOT_FOUND,
            "login_disabled",
            "this node has no [login] identity_keys_dir",
        );
    };
    if body.len() > meridian_protocol::region::MAX_LOGIN_BODY_BYTES {
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_request",
            "login body too large",
        );
    }
    let req: LoginRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &meridian_protocol::clip(&e.to_string(), 200),
            );
        }
    };
    if req.rtts.len() > MAX_REGIONS {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("at most {MAX_REGIONS} regions of RTTs"),
        );
    }
    let login = &state.config.login;
    let now = meridian_auth::unix_now();
    let policy = meridian_auth::Policy {
        audience: login.identity_audience.clone(),
        max_lifetime: state.config.auth.policy().max_lifetime,
    };
    let identity = match identity_keys.verify_with(&req.identity_token, now, &policy) {
        Ok(c) => c,
        Err(e) => {
            state.metrics.login_refused(e.code());
            return refusal(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
        }
    };
    let directory: Vec<String> = state.config.regions.iter().map(|r| r.id.clone()).collect();
    let ranking = rank_regions(&directory, &req.rtts);
    let order: Vec<String> = ranking.iter().map(|r| r.region.clone()).collect();
    let ttl = Duration::from_secs(login.token_ttl_secs);
    let exp = identity.exp.min(now.saturating_add(ttl.as_secs()));
    let mut routes = Vec::with_capacity(order.len());
    for (i, rank) in ranking.iter().enumerate() {
        let entry = state
            .config
            .regions
            .iter()
            .find(|r| r.id == rank.region)
            .expect("the ranking is a permutation of the directory");
        let fallback: Vec<String> = order[i + 1..].iter().chain(&order[..i]).cloned().collect();
        let claims = meridian_auth::Claims {
            aud: Some(state.config.auth.audience.clone()),
            exp,
            iat: now,
            nbf: None,
            ..identity.clone()
        }
        .with_region(rank.region.clone())
        .with_fallback(fallback);
        match state.keys.sign(&claims) {
            Ok(token) => routes.push(RegionRoute {
                region: rank.region.clone(),
                token,
                signal_urls: entry.signal_urls.clone(),
                webtransport_urls: entry.webtransport_urls.clone(),
                rtt_ms: rank.median_ms,
            }),
            Err(e) => {
                return refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.code(),
                    "cannot sign the access token",
                );
            }
        }
    }
    let Some(first) = order.first().cloned() else {
        return refusal(
            StatusCode::NOT_FOUND,
            "login_disabled",
            "no [[regions]] directory",
        );
    };
    state.metrics.login_chosen(&first);
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(LoginResponse {
            region: first,
            fallback: order[1..].to_vec(),
            routes,
            expires_in_secs: exp.saturating_sub(now),
            reason: meridian_protocol::region::explain(&ranking),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: &str) -> RegionEntry {
        RegionEntry {
            id: id.into(),
            signal_urls: vec![format!("ws://{id}.example:7880/signal")],
            webtransport_urls: vec![],
            probe_url: format!("http://{id}.example:7880/probe"),
            relay_addr: Some("10.0.0.1:7890".into()),
            log: Some(format!("postgres://db/{id}")),
            prices: Prices::default(),
        }
    }

    fn check(regions: &[RegionEntry], db: Option<&str>) -> Result<(), String> {
        validate(regions, &LoginConfig::default())
            .and_then(|()| validate_node(regions, "eu", db))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_sound_directory_passes() {
        check(&[region("eu"), region("us")], Some("postgres://db/eu")).unwrap();
        check(&[], None).unwrap();
    }

    #[test]
    fn each_region_keeps_its_own_log() {
        let err = check(&[region("eu"), region("us")], Some("postgres://db/us")).unwrap_err();
        assert!(err.contains("node.database_url"), "{err}");
        let mut shared = region("us");
        shared.log = Some("postgres://db/eu".into());
        let err = check(&[region("eu"), shared], None).unwrap_err();
        assert!(err.contains("regions.log"), "{err}");
    }

    #[test]
    fn bad_entries_name_their_key() {
        let cases: Vec<(RegionEntry, &str)> = vec![
            (
                RegionEntry {
                    id: "e u".into(),
                    ..region("eu")
                },
                "regions.id",
            ),
            (
                RegionEntry {
                    signal_urls: vec![],
                    ..region("us")
                },
                "regions.signal_urls",
            ),
            (
                RegionEntry {
                    signal_urls: vec!["http://x/signal".into()],
                    ..region("us")
                },
                "regions.signal_urls",
            ),
            (
                RegionEntry {
                    probe_url: "x".into(),
                    ..region("us")
                },
                "regions.probe_url",
            ),
            (
                RegionEntry {
                    relay_addr: Some("nowhere".into()),
                    ..region("us")
                },
                "regions.relay_addr",
            ),
            (
                RegionEntry {
                    prices: Prices {
                        internet_per_gb: -1.0,
                        ..Prices::default()
                    },
                    ..region("us")
                },
                "regions.prices",
            ),
        ];
        for (bad, key) in cases {
            let err = check(&[region("eu"), bad], None).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = check(&[region("eu"), region("eu")], None).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = check(&[region("us")], None).unwrap_err();
        assert!(err.contains("node.region"), "{err}");
    }
}
