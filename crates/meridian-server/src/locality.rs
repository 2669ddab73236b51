//! Traffic locality and the egress cost estimate.
//!
//! Media bytes a node forwards are counted by where they go:
//! - `in_region`: to this region's clients from this node (every subscriber copy the
//!   node sends), and
//! - `cross_region`, labelled with the peer region: sent over a relay link to another
//!   region (the cross-region relay calls [`RegionMetrics::relayed`]).
//!
//! From them come the region's locality figure (in-region bytes over all media bytes,
//! [`Locality::ratio`]; the article reports ~70 %) and a cost estimate with the
//! directory's price table ([`crate::regions::Prices`]): client egress at the
//! internet price, relay egress at the cross-region price, in-region node-to-node
//! traffic at the in-region price.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::regions::Prices;

/// Bytes per GB in the price table.
const GB: f64 = 1e9;

/// Most distinct peer regions counted; more share the label `other`.
const MAX_PEER_REGIONS: usize = 64;

/// Where forwarded media bytes went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// `in_region` or `cross_region`.
    pub path: &'static str,
    /// The other region for `cross_region`, this node's region for `in_region`.
    pub peer_region: String,
}

/// Which part of the egress a cost is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabel {
    /// `internet` (to clients), `cross_region` (relay to other regions) or
    /// `in_region` (between nodes of the region).
    pub kind: &'static str,
}

/// Label of the locality figure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabel {
    /// The region it is for.
    pub region: String,
}

/// Label of the per-boundary figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BoundaryLabel {
    /// The region on the other side of the boundary.
    pub peer_region: String,
}

/// Media bytes by where they went, for one room, region or run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Locality {
    /// Bytes that stayed in their region.
    pub in_region_bytes: u64,
    /// Bytes that crossed a region boundary.
    pub cross_region_bytes: u64,
}

impl Locality {
    /// In-region bytes over all bytes; 1.0 when nothing was sent (nothing left the
    /// region).
    pub fn ratio(&self) -> f64 {
        let all = self.in_region_bytes.saturating_add(self.cross_region_bytes);
        if all == 0 {
            1.0
        } else {
            self.in_region_bytes as f64 / all as f64
        }
    }

    /// Egress cost of these bytes with `prices`, where `client_bytes` of the
    /// in-region bytes went to clients (internet) and the rest between nodes.
    pub fn cost(&self, client_bytes: u64, prices: &Prices) -> f64 {
        let node_bytes = self.in_region_bytes.saturating_sub(client_bytes);
        client_bytes as f64 / GB * prices.internet_per_gb
            + node_bytes as f64 / GB * prices.in_region_per_gb
            + self.cross_region_bytes as f64 / GB * prices.cross_region_per_gb
    }
}

/// The node's locality and cost metrics.
#[derive(Clone, Debug, Default)]
pub struct RegionMetrics {
    /// `meridian_media_bytes{path, peer_region}`: media bytes forwarded, by where
    /// they went.
    pub media_bytes: Family<PathLabel, Counter>,
    /// `meridian_region_locality_ratio{region}`: in-region share of the media bytes
    /// this node forwarded.
    pub locality: Family<RegionLabel, Gauge<f64, AtomicU64>>,
    /// `meridian_egress_cost_estimate{kind}`: cost of this node's egress since start,
    /// from the region's price table.
    pub cost: Family<CostLabel, Gauge<f64, AtomicU64>>,
    /// `meridian_region_boundary_copies_max{peer_region}`: the most relay links from
    /// this node to `peer_region` carrying one track now (1 when each track crosses
    /// the boundary once; 0 when none crosses).
    pub boundary_copies_max: Family<BoundaryLabel, Gauge>,
    /// `meridian_region_boundary_tracks{peer_region}`: tracks of this node crossing to
    /// `peer_region` now.
    pub boundary_tracks: Family<BoundaryLabel, Gauge>,
    state: std::sync::Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    region: String,
    prices: Prices,
    client_bytes: u64,
    node_bytes: u64,
    cross: Vec<(String, u64)>,
}

impl RegionMetrics {
    /// Sets this node's region and price table (at start).
    pub fn configure(&self, region: &str, prices: Prices) {
        let mut s = self.lock();
        s.region = region.to_string();
        s.prices = prices;
        drop(s);
        self.publish();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("locality lock is never poisoned")
    }

    /// Counts `bytes` of media the node sent to its clients.
    pub fn client_egress(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let region = {
            let mut s = self.lock();
            s.client_bytes += bytes;
            s.region.clone()
        };
        self.media_bytes
            .get_or_create(&PathLabel {
                path: "in_region",
                peer_region: region,
            })
            .inc_by(bytes);
        self.publish();
    }

    /// Counts `bytes` of media sent over a relay link: to another node of the region
    /// (`peer_region` is this node's) or across the boundary to `peer_region`.
    pub fn relayed(&self, peer_region: &str, bytes: u64) {
        let (path, label) = {
            let mut s = self.lock();
            if peer_region == s.region {
                s.node_bytes += bytes;
                ("in_region", s.region.clone())
            } else {
                let known = s.cross.iter().position(|(r, _)| r == peer_region);
                let label = match known {
                    Some(i) => {
                        s.cross[i].1 += bytes;
                        peer_region.to_string()
                    }
                    None if s.cross.len() < MAX_PEER_REGIONS => {
                        s.cross.push((peer_region.to_string(), bytes));
                        peer_region.to_string()
                    }
                    None => {
                        if let Some(other) = s.cross.iter_mut().find(|(r, _)| r == "other") {
                            other.1 += bytes;
                        } else {
                            s.cross.push(("other".into(), bytes));
                        }
                        "other".to_string()
                    }
                };
                ("cross_region", label)
            }
        };
        self.media_bytes
            .get_or_create(&PathLabel {
                path,
                peer_region: label,
            })
            .inc_by(bytes);
        self.publish();
    }

    /// Sets the per-boundary figures for `peer_region`: the most links one track
    /// crosses to it on, and how many tracks cross.
    pub fn boundary(&self, peer_region: &str, copies_max: u64, tracks: usize) {
        let label = BoundaryLabel {
            peer_region: peer_region.to_string(),
        };
        self.boundary_copies_max
            .get_or_create(&label)
            .set(i64::try_from(copies_max).unwrap_or(i64::MAX));
        self.boundary_tracks
            .get_or_create(&label)
            .set(i64::try_from(tracks).unwrap_or(i64::MAX));
    }

    /// This node's bytes by where they went.
    pub fn locality(&self) -> Locality {
        let s = self.lock();
        Locality {
            in_region_bytes: s.client_bytes + s.node_bytes,
            cross_region_bytes: s.cross.iter().map(|(_, b)| b).sum(),
        }
    }

    fn publish(&self) {
        let s = self.lock();
        let l = Locality {
            in_region_bytes: s.client_bytes + s.node_bytes,
            cross_region_bytes: s.cross.iter().map(|(_, b)| b).sum(),
        };
        self.locality
            .get_or_create(&RegionLabel {
                region: s.region.clone(),
            })
            .set(l.ratio());
        let p = &s.prices;
        for (kind, bytes, price) in [
            ("internet", s.client_bytes, p.internet_per_gb),
            ("in_region", s.node_bytes, p.in_region_per_gb),
            ("cross_region", l.cross_region_bytes, p.cross_region_per_gb),
        ] {
            self.cost
                .get_or_create(&CostLabel { kind })
                .set(bytes as f64 / GB * price);
        }
    }

    /// Registers the metrics (under the registry's `meridian` prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "media_bytes",
            "Media bytes forwarded, by path (in_region, cross_region) and peer region",
            self.media_bytes.clone(),
        );
        r.register(
            "region_locality_ratio",
            "Share of the media bytes this node forwarded that stayed in its region",
            self.locality.clone(),
        );
        r.register(
            "egress_cost_estimate",
            "Egress cost since start from the region's price table, by kind",
            self.cost.clone(),
        );
        r.register(
            "region_boundary_copies_max",
            "Most relay links from this node to a region carrying one track now",
            self.boundary_copies_max.clone(),
        );
        r.register(
            "region_boundary_tracks",
            "Tracks of this node crossing to a region now",
            self.boundary_tracks.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_and_cost_follow_the_bytes() {
        let m = RegionMetrics::default();
        m.configure("eu", Prices::default());
        assert_eq!(m.locality().ratio(), 1.0);
        m.client_egress(3_000_000_000);
        m.relayed("us", 1_000_000_000);
        m.relayed("eu", 500_000_000);
        let l = m.locality();
        assert_eq!(l.in_region_bytes, 3_500_000_000);
        assert_eq!(l.cross_region_bytes, 1_000_000_000);
        assert!((l.ratio() - 3.5 / 4.5).abs() < 1e-9);
        // 3 GB to clients at 0.09, 0.5 GB in-region at 0, 1 GB cross at 0.02.
        assert!((l.cost(3_000_000_000, &Prices::default()) - 0.29).abs() < 1e-9);
        let mut r = Registry::with_prefix("meridian");
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains(
                r#"meridian_media_bytes_total{path="cross_region",peer_region="us"} 1000000000"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_egress_cost_estimate{kind="internet"} 0.27"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_region_locality_ratio{region="eu"} 0.77"#),
            "{text}"
        );
    }

    #[test]
    fn boundary_figures_are_exported_per_peer_region() {
        let m = RegionMetrics::default();
        m.configure("eu", Prices::default());
        m.boundary("us", 1, 4);
        m.boundary("ap", 0, 0);
        let mut r = Registry::with_prefix("meridian");
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            r#"meridian_region_boundary_copies_max{peer_region="us"} 1"#,
            r#"meridian_region_boundary_tracks{peer_region="us"} 4"#,
            r#"meridian_region_boundary_copies_max{peer_region="ap"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn peer_regions_are_bounded() {
        let m = RegionMetrics::default();
        m.configure("eu", Prices::default());
        for i in 0..(MAX_PEER_REGIONS + 10) {
            m.relayed(&format!("r{i}"), 1);
        }
        assert_eq!(m.lock().cross.len(), MAX_PEER_REGIONS + 1);
        assert_eq!(
            m.locality().cross_region_bytes,
            (MAX_PEER_REGIONS + 10) as u64
        );
    }
}
