//! `meridian plan`: a capacity and cost planner for a multi-region deployment.
//!
//! From users per region, the room size mix, the share of rooms that span two regions,
//! bitrates and the measured CPU cost of forwarding, it prints the pods each region
//! needs (and the HPA target per pod), the media bytes per month that stay in a region
//! and that cross regions, and the data-transfer bill against serving everyone from one
//! region. The model and a worked example are in `docs/capacity.md`.

use std::fmt::Write as _;

use clap::Args;

/// Flags of `meridian plan`.
#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    /// A region and its concurrent users at peak, `NAME=USERS`; repeat per region. The
    /// first is the home region of the single-region comparison.
    #[arg(long = "region", value_parser = parse_region, required = true)]
    pub regions: Vec<(String, u64)>,
    /// Room size mix, `SIZE:SHARE,…`: the share of users in rooms of each size (shares
    /// add up to 1).
    #[arg(long, default_value = "2:0.3,4:0.4,8:0.3", value_delimiter = ',', value_parser = parse_mix)]
    pub rooms: Vec<(u32, f64)>,
    /// Publishers per room at most (everyone else only watches).
    #[arg(long, default_value_t = 4)]
    pub max_publishers: u32,
    /// Share of rooms whose participants sit in two regions (half in each).
    #[arg(long, default_value_t = 0.3)]
    pub cross_region: f64,
    /// Video a publisher sends, kbit/s (all simulcast layers: 150+500+1500).
    #[arg(long, default_value_t = 2150.0)]
    pub publish_kbps: f64,
    /// Video a subscriber receives per track, kbit/s (the layer chosen for it, on average).
    #[arg(long, default_value_t = 800.0)]
    pub receive_kbps: f64,
    /// Audio per track, kbit/s (each publisher sends one audio track with its video).
    #[arg(long, default_value_t = 40.0)]
    pub audio_kbps: f64,
    /// Average RTP payload per video packet, bytes.
    #[arg(long, default_value_t = 1100.0)]
    pub packet_bytes: f64,
    /// Audio packets per second per track (20 ms Opus frames).
    #[arg(long, default_value_t = 50.0)]
    pub audio_pps: f64,
    /// CPU per forwarded packet, µs, node end to end (docs/benchmarks.md: 16.1-19.6 µs
    /// measured on the running node).
    #[arg(long, default_value_t = 19.6)]
    pub us_per_packet: f64,
    /// CPU cores of one pod.
    #[arg(long, default_value_t = 4.0)]
    pub cores_per_pod: f64,
    /// Share of a pod's CPU the HPA target keeps it at (headroom for bursts and drains).
    #[arg(long, default_value_t = 0.6)]
    pub cpu_target: f64,
    /// Pods per region at least (the HPA's minReplicas).
    #[arg(long, default_value_t = 2)]
    pub min_pods: u64,
    /// Hours per month.
    #[arg(long, default_value_t = 730.0)]
    pub hours_per_month: f64,
    /// Average concurrency over the month as a share of the peak.
    #[arg(long, default_value_t = 0.3)]
    pub average_load: f64,
    /// US$ per GB sent from a node to a client in the node's own region (internet egress).
    #[arg(long, default_value_t = 0.05)]
    pub egress_usd_per_gb: f64,
    /// US$ per GB of a client's media (either direction) served from another region:
    /// egress plus cross-region transfer, transit and NAT processing.
    #[arg(long, default_value_t = 0.15)]
    pub remote_usd_per_gb: f64,
    /// US$ per GB relayed between nodes of two regions (cascade).
    #[arg(long, default_value_t = 0.02)]
    pub relay_usd_per_gb: f64,
}

/// Errors in the planner's inputs.
#[derive(Debug, PartialEq)]
pub enum PlanError {
    /// An input is out of range; the flag and why.
    Invalid(&'static str, String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Invalid(flag, why) => write!(f, "--{flag}: {why}"),
        }
    }
}

impl std::error::Error for PlanError {}

fn parse_region(s: &str) -> Result<(String, u64), String> {
    let (name, users) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=USERS"))?;
    let users = users
        .parse()
        .map_err(|e| format!("{s:?}: users must be a whole number: {e}"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: empty region name"));
    }
    Ok((name.to_string(), users))
}

fn parse_mix(s: &str) -> Result<(u32, f64), String> {
    let (size, share) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected SIZE:SHARE"))?;
    Ok((
        size.parse().map_err(|e| format!("{s:?}: size: {e}"))?,
        share.parse().map_err(|e| format!("{s:?}: share: {e}"))?,
    ))
}

/// One region's part of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionPlan {
    /// Region name.
    pub name: String,
    /// Concurrent users at peak.
    pub users: u64,
    /// Video tracks its nodes forward at peak: to its own subscribers and relayed out.
    pub outbound_video_tracks: f64,
    /// Pods at peak.
    pub pods: u64,
    /// Media bytes per month between this region's clients and its nodes.
    pub local_bytes: f64,
    /// Media bytes per month relayed out of this region to others.
    pub relay_bytes: f64,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Per region.
    pub regions: Vec<RegionPlan>,
    /// CPU core-seconds per second one outbound video track costs (with its audio).
    pub cores_per_track: f64,
    /// The HPA target: outbound video tracks per pod.
    pub tracks_per_pod: u64,
    /// Share of delivered media (publisher → subscriber, by bytes) whose two ends are
    /// in the same region.
    pub locality: f64,
    /// Pods if every user were served from the home region.
    pub single_region_pods: u64,
    /// Monthly data-transfer cost, US$, one region per user's region.
    pub multi_region_cost: f64,
    /// Monthly data-transfer cost, US$, everyone served from the home region.
    pub single_region_cost: f64,
}

impl Plan {
    /// Share of the single-region bill that multi-region saves.
    pub fn saving(&self) -> f64 {
        if self.single_region_cost == 0.0 {
            0.0
        } else {
            1.0 - self.multi_region_cost / self.single_region_cost
        }
    }
}

/// Per-user averages over the room mix, for one kind of room (local or cross-region).
#[derive(Default, Debug, Clone, Copy)]
struct PerUser {
    /// Video tracks received.
    tracks: f64,
    /// Whether publishing (as a share).
    publishing: f64,
    /// Tracks relayed out of the user's region on its behalf.
    relayed: f64,
    /// Deliveries (received tracks) whose publisher is in the same region.
    local_deliveries: f64,
}

fn per_user(a: &PlanArgs, cross: bool) -> PerUser {
    let mut u = PerUser::default();
    for &(size, share) in &a.rooms {
        let s = f64::from(size);
        let p = f64::from(size.min(a.max_publishers));
        // A room of s users with p publishers: p(s-1) received tracks, p publishing.
        u.tracks += share * p * (s - 1.0) / s;
        u.publishing += share * p / s;
        if cross {
            // Half the users (and publishers) on each side: each publisher's track
            // crosses once, so a side relays p/2 tracks out; a room has s/2 users a side.
            u.relayed += share * (p / 2.0) / (s / 2.0);
            // A publisher reaches s/2 - 1 users on its own side, s/2 on the other.
            u.local_deliveries += share * p * (s / 2.0 - 1.0) / s;
        } else {
            u.local_deliveries += share * p * (s - 1.0) / s;
        }
    }
    u
}

/// Bytes per month of a stream of `kbps` at peak, at the average load.
fn monthly_bytes(a: &PlanArgs, kbps: f64) -> f64 {
    kbps * 1000.0 / 8.0 * 3600.0 * a.hours_per_month * a.average_load
}

/// Checks the inputs and computes the plan.
pub fn plan(a: &PlanArgs) -> Result<Plan, PlanError> {
    let bad = |flag, why: String| Err(PlanError::Invalid(flag, why));
    if a.regions.is_empty() {
        return bad("region", "give at least one region".into());
    }
    if a.rooms.is_empty() || a.rooms.iter().any(|&(s, share)| s < 2 || share < 0.0) {
        return bad(
            "rooms",
            "sizes must be at least 2, shares not negative".into(),
        );
    }
    let total_share: f64 = a.rooms.iter().map(|r| r.1).sum();
    if (total_share - 1.0).abs() > 1e-6 {
        return bad("rooms", format!("shares add up to {total_share}, not 1"));
    }
    if !(0.0..=1.0).contains(&a.cross_region) {
        return bad("cross-region", "a share between 0 and 1".into());
    }
    if a.regions.len() == 1 && a.cross_region > 0.0 {
        return bad(
            "cross-region",
            "one region has no cross-region rooms".into(),
        );
    }
    if a.max_publishers == 0 {
        return bad("max-publishers", "at least 1".into());
    }
    for (flag, v) in [
        ("publish-kbps", a.publish_kbps),
        ("receive-kbps", a.receive_kbps),
        ("packet-bytes", a.packet_bytes),
        ("us-per-packet", a.us_per_packet),
        ("cores-per-pod", a.cores_per_pod),
        ("hours-per-month", a.hours_per_month),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            return bad(flag, format!("must be positive, got {v}"));
        }
    }
    if !(a.cpu_target > 0.0 && a.cpu_target <= 1.0) {
        return bad("cpu-target", "a share above 0, at most 1".into());
    }
    if !(a.average_load > 0.0 && a.average_load <= 1.0) {
        return bad("average-load", "a share above 0, at most 1".into());
    }

    let video_pps = a.receive_kbps * 1000.0 / 8.0 / a.packet_bytes;
    let cores_per_track = (video_pps + a.audio_pps) * a.us_per_packet * 1e-6;
    let tracks_per_pod = (a.cores_per_pod * a.cpu_target / cores_per_track).floor() as u64;
    if tracks_per_pod == 0 {
        return bad(
            "cores-per-pod",
            "a pod cannot forward one track at this target".into(),
        );
    }
    let pods_for = |tracks: f64| ((tracks / tracks_per_pod as f64).ceil() as u64).max(a.min_pods);

    let local = per_user(a, false);
    let cross = per_user(a, true);
    let c = a.cross_region;
    let mix = |f: fn(&PerUser) -> f64| (1.0 - c) * f(&local) + c * f(&cross);
    let tracks = mix(|u| u.tracks);
    let publishing = mix(|u| u.publishing);
    let relayed = mix(|u| u.relayed);
    let local_deliveries = mix(|u| u.local_deliveries);

    let down_kbps = tracks * (a.receive_kbps + a.audio_kbps);
    let up_kbps = publishing * (a.publish_kbps + a.audio_kbps);
    let relay_kbps = relayed * (a.receive_kbps + a.audio_kbps);

    let mut regions = Vec::new();
    let mut multi_cost = 0.0;
    let mut single_cost = 0.0;
    let mut all_tracks = 0.0;
    for (i, (name, users)) in a.regions.iter().enumerate() {
        let n = *users as f64;
        let outbound = n * (tracks + relayed);
        all_tracks += n * tracks;
        let local_bytes = n * monthly_bytes(a, down_kbps + up_kbps);
        let relay_bytes = n * monthly_bytes(a, relay_kbps);
        let down_gb = n * monthly_bytes(a, down_kbps) / 1e9;
        multi_cost += down_gb * a.egress_usd_per_gb + relay_bytes / 1e9 * a.relay_usd_per_gb;
        single_cost += if i == 0 {
            down_gb * a.egress_usd_per_gb
        } else {
            local_bytes / 1e9 * a.remote_usd_per_gb
        };
        regions.push(RegionPlan {
            name: name.clone(),
            users: *users,
            outbound_video_tracks: outbound,
            pods: pods_for(outbound),
            local_bytes,
            relay_bytes,
        });
    }
    Ok(Plan {
        regions,
        cores_per_track,
        tracks_per_pod,
        locality: if tracks > 0.0 {
            local_deliveries / tracks
        } else {
            1.0
        },
        single_region_pods: pods_for(all_tracks),
        multi_region_cost: multi_cost,
        single_region_cost: single_cost,
    })
}

/// The plan as a text report.
pub fn render(a: &PlanArgs, p: &Plan) -> String {
    let mut o = String::new();
    let tb = |b: f64| b / 1e12;
    let _ = writeln!(
        o,
        "per outbound video track (with its audio): {:.2} ms of CPU per second; \
         HPA target {} tracks per pod ({} cores at {:.0} %)",
        p.cores_per_track * 1e3,
        p.tracks_per_pod,
        a.cores_per_pod,
        a.cpu_target * 100.0
    );
    let _ = writeln!(
        o,
        "\n{:<10} {:>9} {:>16} {:>6} {:>18} {:>18}",
        "region", "users", "video tracks out", "pods", "in-region TB/month", "relayed TB/month"
    );
    for r in &p.regions {
        let _ = writeln!(
            o,
            "{:<10} {:>9} {:>16.0} {:>6} {:>18.1} {:>18.2}",
            r.name,
            r.users,
            r.outbound_video_tracks,
            r.pods,
            tb(r.local_bytes),
            tb(r.relay_bytes)
        );
    }
    let local: f64 = p.regions.iter().map(|r| r.local_bytes).sum();
    let relay: f64 = p.regions.iter().map(|r| r.relay_bytes).sum();
    let _ = writeln!(
        o,
        "{:<10} {:>9} {:>16.0} {:>6} {:>18.1} {:>18.2}",
        "total",
        p.regions.iter().map(|r| r.users).sum::<u64>(),
        p.regions
            .iter()
            .map(|r| r.outbound_video_tracks)
            .sum::<f64>(),
        p.regions.iter().map(|r| r.pods).sum::<u64>(),
        tb(local),
        tb(relay)
    );
    let _ = writeln!(
        o,
        "\nmedia delivered within its region: {:.1} %",
        p.locality * 100.0
    );
    let _ = writeln!(
        o,
        "data transfer per month: US$ {:.0} with a deployment per region, US$ {:.0} from {} alone \
         ({} pods there): {:.1} % saved",
        p.multi_region_cost,
        p.single_region_cost,
        a.regions[0].0,
        p.single_region_pods,
        p.saving() * 100.0
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    fn args(flags: &str) -> PlanArgs {
        Cli::try_parse_from(std::iter::once("plan").chain(flags.split_whitespace()))
            .expect("flags parse")
            .plan
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    /// One region, 100 users in 4-person rooms, everyone publishing. By hand:
    /// video 800 kbit/s at 1000-byte packets = 100 pkt/s, + 50 audio = 150 pkt/s;
    /// × 20 µs = 3 ms of CPU per second per track. 4 cores × 0.6 = 2.4 cores / 0.003
    /// = 800 tracks per pod. Tracks: 25 rooms × 4 publishers × 3 subscribers = 300
    /// → 1 pod, raised to min 2.
    #[test]
    fn one_region_by_hand() {
        let a = args(
            "--region eu=100 --rooms 4:1 --cross-region 0 --receive-kbps 800 \
             --packet-bytes 1000 --audio-pps 50 --us-per-packet 20 --cores-per-pod 4 \
             --cpu-target 0.6 --min-pods 2",
        );
        let p = plan(&a).unwrap();
        assert!(close(p.cores_per_track, 0.003), "{}", p.cores_per_track);
        assert_eq!(p.tracks_per_pod, 800);
        assert!(close(p.regions[0].outbound_video_tracks, 300.0));
        assert_eq!(p.regions[0].pods, 2);
        assert!(close(p.locality, 1.0));
        // Bytes: per user 3 tracks × (800 + 40) kbit/s down + 1 × (2150 + 40) up
        // = 4710 kbit/s; × 100 users = 471 Mbit/s = 58.875 MB/s; × 3600 × 730 × 0.3.
        let expected = 58.875e6 * 3600.0 * 730.0 * 0.3;
        assert!(
            close(p.regions[0].local_bytes, expected),
            "{}",
            p.regions[0].local_bytes
        );
        assert_eq!(p.regions[0].relay_bytes, 0.0);
        // One region: the two deployments are the same, nothing saved.
        assert!(close(p.saving(), 0.0));
    }

    /// 2000 users in 4-person rooms at 3 ms per track: 6000 tracks / 800 = 7.5 → 8 pods.
    #[test]
    fn pods_round_up() {
        let a = args(
            "--region eu=2000 --rooms 4:1 --cross-region 0 --packet-bytes 1000 \
             --us-per-packet 20",
        );
        let p = plan(&a).unwrap();
        assert_eq!(p.tracks_per_pod, 800);
        assert!(close(p.regions[0].outbound_video_tracks, 6000.0));
        assert_eq!(p.regions[0].pods, 8);
    }

    /// Two regions of 1000 users in 2-person rooms, half of the rooms cross-region.
    /// Local rooms deliver everything in-region; a cross-region pair delivers
    /// everything across: locality = 0.5. Each cross room relays both tracks once, one
    /// per side: per user 0.5 × (1 / 1) = 0.5 relayed tracks.
    #[test]
    fn cross_region_pairs_by_hand() {
        let a = args(
            "--region eu=1000 --region us=1000 --rooms 2:1 --cross-region 0.5 \
             --packet-bytes 1000 --us-per-packet 20",
        );
        let p = plan(&a).unwrap();
        assert!(close(p.locality, 0.5), "{}", p.locality);
        // Each user receives 1 track; 0.5 relayed per user: 1500 outbound per region.
        assert!(close(p.regions[0].outbound_video_tracks, 1500.0));
        let relay = 1000.0 * 0.5 * 840.0 * 1000.0 / 8.0 * 3600.0 * 730.0 * 0.3;
        assert!(close(p.regions[1].relay_bytes, relay));
        // Costs per user and month, in kbit/s-months (K = 1000/8 × 3600 × 730 × 0.3 / 1e9 GB):
        // multi: down 840 × 0.05 + relay 420 × 0.02 = 42 + 8.4 = 50.4 per user;
        // single: eu down 840 × 0.05 = 42; us (840 + 2190) × 0.15 = 454.5.
        let k = 1000.0 / 8.0 * 3600.0 * 730.0 * 0.3 / 1e9 * 1000.0;
        assert!(
            close(p.multi_region_cost, 2.0 * 50.4 * k),
            "{}",
            p.multi_region_cost
        );
        assert!(close(p.single_region_cost, (42.0 + 454.5) * k));
        assert!(close(p.saving(), 1.0 - 100.8 / 496.5));
    }

    /// The article's claims from stated inputs: three regions of equal size, the default
    /// room mix and 45 % cross-region rooms keep ~70 % of media local and save ~70 % of
    /// the transfer bill.
    #[test]
    fn reproduces_the_articles_figures() {
        let a = args("--region us=10000 --region eu=10000 --region ap=10000 --cross-region 0.45");
        let p = plan(&a).unwrap();
        assert!(
            (0.65..0.75).contains(&p.locality),
            "locality {}",
            p.locality
        );
        assert!((0.65..0.75).contains(&p.saving()), "saving {}", p.saving());
    }

    /// When almost everyone is in the home region, a deployment per region saves little.
    #[test]
    fn saving_vanishes_when_users_are_in_one_region() {
        let a = args("--region us=100000 --region eu=500 --cross-region 0.3");
        let p = plan(&a).unwrap();
        assert!(p.saving() < 0.05, "saving {}", p.saving());
    }

    #[test]
    fn bad_inputs_name_the_flag() {
        let e = plan(&args("--region eu=10 --rooms 2:0.5,4:0.4")).unwrap_err();
        assert!(
            e.to_string().starts_with("--rooms: shares add up to 0.9"),
            "{e}"
        );
        let e = plan(&args("--region eu=10 --cross-region 0.2")).unwrap_err();
        assert!(e.to_string().starts_with("--cross-region"), "{e}");
        let e = plan(&args("--region eu=10 --cross-region 0 --cpu-target 1.5")).unwrap_err();
        assert!(e.to_string().starts_with("--cpu-target"), "{e}");
        assert!(Cli::try_parse_from(["plan", "--region", "eu"]).is_err());
    }
}
