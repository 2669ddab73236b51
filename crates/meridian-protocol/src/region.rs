//! Choosing a region: the login exchange and the pure decision behind it.
//!
//! A client measures the round-trip time to each region's probe endpoint (`GET
//! /probe`, a few samples each, bounded in time) and sends them with its identity
//! token to any node's `POST /login` ([`LoginRequest`]). The node ranks the regions
//! of its directory with [`rank_regions`] — lowest median RTT first, regions that
//! did not answer the probe last — and answers [`LoginResponse`]: the chosen region
//! (geo-sticky), the fallback order, and one access token per region in that order,
//! each pinned to its region. A client that loses every node of its region moves on
//! to the next route with that route's token.
//!
//! The ranking is a pure function, so the node, the Rust client and tests agree on it.

use serde::{Deserialize, Serialize};

/// Most regions a login request may report or a directory may hold.
pub const MAX_REGIONS: usize = 32;
/// Most RTT samples per region in a login request.
pub const MAX_RTT_SAMPLES: usize = 16;
/// Largest RTT sample accepted, in milliseconds; larger ones are ignored.
pub const MAX_RTT_MS: f64 = 60_000.0;
/// Largest `POST /login` body, in bytes.
pub const MAX_LOGIN_BODY_BYTES: usize = 16 * 1024;

/// RTT samples a client measured to one region's probe endpoint.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRtt {
    /// The region's id, as in the directory.
    pub region: String,
    /// Round-trip times in milliseconds; empty when the probe never answered.
    #[serde(default)]
    pub samples_ms: Vec<f64>,
}

/// One region of the directory as `GET /regions` lists it: where to probe it.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionProbe {
    /// The region's id.
    pub region: String,
    /// The URL to time (`GET`, answers 200 with a small body).
    pub probe_url: String,
}

/// Answer of `GET /regions`: the directory, for clients about to probe and log in.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionList {
    /// The region of the node that answered.
    pub this_region: String,
    /// Every region, in directory order.
    pub regions: Vec<RegionProbe>,
}

/// Body of `POST /login`.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The identity token (JWT) the identity provider issued, signed with a key the
    /// node's `[login]` section trusts.
    pub identity_token: String,
    /// What the client measured, per region (at most [`MAX_REGIONS`]).
    #[serde(default)]
    pub rtts: Vec<RegionRtt>,
}

/// One region a client may be served by, with its own access token.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionRoute {
    /// The region's id.
    pub region: String,
    /// Access token pinned to this region.
    pub token: String,
    /// The region's WebSocket signaling URLs (its nodes).
    pub signal_urls: Vec<String>,
    /// The region's WebTransport signaling URLs, if it publishes them.
    #[serde(default)]
    pub webtransport_urls: Vec<String>,
    /// The median RTT the client reported for the region, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
}

/// Answer of `POST /login`.
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoginResponse {
    /// The region chosen for the client (the first route).
    pub region: String,
    /// The other regions, in the order to fall back to.
    pub fallback: Vec<String>,
    /// Every region in trying order, each with its token and URLs.
    pub routes: Vec<RegionRoute>,
    /// Seconds the tokens stay valid.
    #[cfg_attr(feature = "ts", ts(type = "number"))]
    pub expires_in_secs: u64,
    /// Why this region: one human-readable sentence.
    pub reason: String,
}

/// Error answer of `POST /login` (and the body of a refused `GET /probe`).
#[cfg_attr(
    feature = "ts",
    derive(ts_rs::TS),
    ts(export, export_to = "../../../web-client/src/sdk/generated/")
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoginError {
    /// Stable code: a token code (`token_expired`, `token_bad_signature`, …),
    /// `login_disabled`, `bad_request` or `rate_limited`.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

/// One region's place in the ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionRank {
    /// The region's id.
    pub region: String,
    /// Median of the usable samples, in milliseconds; `None` when there were none.
    pub median_ms: Option<f64>,
    /// How many usable samples the median is of.
    pub samples: usize,
}

/// The median of the usable samples (finite, `0..=MAX_RTT_MS`), in milliseconds;
/// the mean of the two middle ones for an even count. `None` without usable samples.
pub fn median_ms(samples: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .copied()
        .filter(|s| s.is_finite() && (0.0..=MAX_RTT_MS).contains(s))
        .take(MAX_RTT_SAMPLES)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Ranks the `directory`'s regions for a client that measured `rtts`: regions with a
/// median RTT first, lowest first (ties keep directory order); regions without a
/// usable sample (the probe failed: unreachable or unhealthy) after them, in
/// directory order. Reports for regions not in the directory and repeated reports
/// (after the first) are ignored, so the result is always a permutation of
/// `directory`.
pub fn rank_regions(directory: &[String], rtts: &[RegionRtt]) -> Vec<RegionRank> {
    let mut ranks: Vec<(usize, RegionRank)> = directory
        .iter()
        .enumerate()
        .map(|(i, region)| {
            let measured = rtts.iter().take(MAX_REGIONS).find(|r| &r.region == region);
            let samples = measured.map_or(&[][..], |r| &r.samples_ms[..]);
            let median = median_ms(samples);
            let usable = samples
                .iter()
                .filter(|s| s.is_finite() && (0.0..=MAX_RTT_MS).contains(*s))
                .take(MAX_RTT_SAMPLES)
                .count();
            (
                i,
                RegionRank {
                    region: region.clone(),
                    median_ms: median,
                    samples: usable,
                },
            )
        })
        .collect();
    ranks.sort_by(|(ia, a), (ib, b)| match (a.median_ms, b.median_ms) {
        (Some(x), Some(y)) => x.total_cmp(&y).then(ia.cmp(ib)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => ia.cmp(ib),
    });
    ranks.into_iter().map(|(_, r)| r).collect()
}

/// One sentence saying why the first region of `ranking` was chosen.
pub fn explain(ranking: &[RegionRank]) -> String {
    let Some(first) = ranking.first() else {
        return "no region is configured".into();
    };
    let others: Vec<String> = ranking[1..]
        .iter()
        .map(|r| match r.median_ms {
            Some(m) => format!("{} {m:.0} ms", r.region),
            None => format!("{} unreachable", r.region),
        })
        .collect();
    let rest = if others.is_empty() {
        String::new()
    } else {
        format!("; then {}", others.join(", "))
    };
    match first.median_ms {
        Some(m) => format!(
            "{}: lowest median RTT, {m:.0} ms over {} probes{rest}",
            first.region, first.samples
        ),
        None => format!(
            "{}: no region answered a probe, so the directory's first{rest}",
            first.region
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Vec<String> {
        ["eu", "us", "ap"].iter().map(|s| s.to_string()).collect()
    }

    fn rtt(region: &str, samples: &[f64]) -> RegionRtt {
        RegionRtt {
            region: region.into(),
            samples_ms: samples.to_vec(),
        }
    }

    fn order(r: &[RegionRank]) -> Vec<&str> {
        r.iter().map(|r| r.region.as_str()).collect()
    }

    #[test]
    fn the_median_ignores_outliers_and_bad_samples() {
        assert_eq!(median_ms(&[10.0, 500.0, 12.0]), Some(12.0));
        assert_eq!(median_ms(&[10.0, 20.0]), Some(15.0));
        assert_eq!(median_ms(&[]), None);
        assert_eq!(median_ms(&[f64::NAN, -1.0, f64::INFINITY, 1e9]), None);
        assert_eq!(median_ms(&[f64::NAN, 7.0]), Some(7.0));
    }

    #[test]
    fn regions_rank_by_median_rtt_and_unreachable_ones_go_last() {
        let r = rank_regions(
            &dir(),
            &[
                rtt("eu", &[220.0, 221.0, 400.0]),
                rtt("us", &[81.0, 80.0, 2000.0]),
                rtt("ap", &[]),
            ],
        );
        assert_eq!(order(&r), ["us", "eu", "ap"]);
        assert_eq!(r[0].median_ms, Some(81.0));
        assert_eq!(r[0].samples, 3);
        assert_eq!(r[2].median_ms, None);
        let why = explain(&r);
        assert!(why.starts_with("us: lowest median RTT, 81 ms"), "{why}");
        assert!(why.contains("ap unreachable"), "{why}");
    }

    #[test]
    fn unknown_and_repeated_reports_cannot_reorder_or_add_regions() {
        let r = rank_regions(
            &dir(),
            &[
                rtt("mars", &[1.0]),
                rtt("ap", &[50.0]),
                rtt("ap", &[1.0]),
                rtt("eu", &[50.0]),
            ],
        );
        // Ties keep directory order; the second "ap" report is ignored.
        assert_eq!(order(&r), ["eu", "ap", "us"]);
        let none = rank_regions(&dir(), &[]);
        assert_eq!(order(&none), ["eu", "us", "ap"]);
        assert!(explain(&none).contains("no region answered"));
        assert!(rank_regions(&[], &[rtt("eu", &[1.0])]).is_empty());
    }

    #[test]
    fn login_messages_round_trip_and_refuse_unknown_fields() {
        let req = LoginRequest {
            identity_token: "t".into(),
            rtts: vec![rtt("eu", &[1.5])],
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<LoginRequest>(&text).unwrap(), req);
        assert!(serde_json::from_str::<LoginRequest>(r#"{"identity_token":"t","x":1}"#).is_err());
    }
}
