//! The pure parts of reconnection: the policy, backoff with full jitter, the order in
//! which a region's nodes are tried, and carrying track ids over to a new offer.

use std::time::Duration;

use meridian_protocol::{TrackAnnouncement, TrackInfo};

/// How a client rides out the loss of its signaling connection.
///
/// A loss is: the connection closing or failing without `left`, a `migrate` from the
/// node, or no sign of life from the node for [`ping_timeout`](Self::ping_timeout).
/// The client then reconnects (to the `migrate` URL if one was given, else to the next
/// URL of [`ClientConfig::node_urls`](crate::ClientConfig::node_urls) after the one that
/// failed) and joins with its resume token; see [`crate::Client`] for what follows.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectPolicy {
    /// Reconnect at all. When false a loss ends the client's task with an error (the
    /// behaviour before reconnection existed), and `redirect` on the first join is
    /// returned as [`ClientError::Redirected`](crate::ClientError::Redirected).
    pub enabled: bool,
    /// Upper bound of the first retry delay; each failed attempt doubles the bound up
    /// to [`max_backoff`](Self::max_backoff). The delay is drawn uniformly from
    /// `0..=bound` ("full jitter"), so clients losing the same node spread out.
    pub initial_backoff: Duration,
    /// Largest delay bound between two attempts.
    pub max_backoff: Duration,
    /// Most connection attempts after one loss (redirects and the fresh join after
    /// `resume_failed` count); then the client's task ends with
    /// [`ClientError::ReconnectFailed`](crate::ClientError::ReconnectFailed).
    pub max_attempts: u32,
    /// Longest time from a loss to `joined`; then the task ends with
    /// [`ClientError::ReconnectFailed`](crate::ClientError::ReconnectFailed).
    pub max_duration: Duration,
    /// Longest time to open one signaling connection (TCP + WebSocket upgrade, or the
    /// WebTransport session). A paused node accepts TCP but never upgrades.
    pub connect_timeout: Duration,
    /// Longest time from sending `join` to `joined` on one reconnection attempt.
    pub join_timeout: Duration,
    /// How often the client sends `ping` while connected.
    pub ping_interval: Duration,
    /// Silence after which the node counts as lost: no signaling message at all (and,
    /// with [`media_keeps_alive`](Self::media_keeps_alive), no datagram on either media
    /// connection) for this long.
    pub ping_timeout: Duration,
    /// Datagrams from the node on the media sockets also count as signs of life. The
    /// node delivers `pong` through its outbox, which holds messages back while the
    /// event log is unreachable; media keeps flowing then, so this avoids leaving a
    /// healthy node. A paused node sends neither.
    pub media_keeps_alive: bool,
    /// Most `redirect`s followed on the first join.
    pub max_redirects: u32,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            enabled: true,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            max_attempts: 100,
            max_duration: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            join_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_millis(250),
            ping_timeout: Duration::from_millis(1500),
            media_keeps_alive: true,
            max_redirects: 4,
        }
    }
}

impl ReconnectPolicy {
    /// No reconnection: a loss ends the client's task.
    pub fn disabled() -> Self {
        ReconnectPolicy {
            enabled: false,
            ..ReconnectPolicy::default()
        }
    }

    /// The delay before the attempt that follows `failures` failed attempts after a
    /// loss (0 for the first attempt): uniform in `0..=min(max_backoff,
    /// initial_backoff × 2^failures)`, drawn from `random`.
    pub fn backoff(&self, failures: u32, random: u64) -> Duration {
        let bound = self.backoff_bound(failures);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random % (nanos.saturating_add(1)))
    }

    /// The upper bound of [`backoff`](Self::backoff) after `failures` failed attempts.
    pub fn backoff_bound(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// A small non-cryptographic generator (SplitMix64) for backoff jitter.
#[derive(Clone, Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The region's signaling URLs in trying order, and where the client is in it.
#[derive(Clone, Debug)]
pub(crate) struct UrlRotation {
    urls: Vec<String>,
    /// Index of the list entry last connected to (or tried).
    cursor: usize,
}

impl UrlRotation {
    /// `first` then `rest`, without duplicates or empty entries; the cursor on `first`.
    pub(crate) fn new(first: &str, rest: &[String]) -> Self {
        let mut urls = vec![first.to_string()];
        for u in rest {
            let u = u.trim();
            if !u.is_empty() && !urls.iter().any(|x| x == u) {
                urls.push(u.to_string());
            }
        }
        UrlRotation { urls, cursor: 0 }
    }

    /// Every URL, in order.
    pub(crate) fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Notes that the client connects to `url` (from the list or not): a list entry
    /// becomes the cursor; another URL leaves the cursor on the last list entry used.
    pub(crate) fn used(&mut self, url: &str) {
        if let Some(i) = self.urls.iter().position(|u| u == url) {
            self.cursor = i;
        }
    }

    /// The URL to try after `failed` was lost or could not be joined: the list entry
    /// after it (round robin), or after the cursor when `failed` is not in the list.
    /// With one URL that URL again.
    pub(crate) fn next_after(&mut self, failed: &str) -> String {
        let from = self
            .urls
            .iter()
            .position(|u| u == failed)
            .unwrap_or(self.cursor);
        self.cursor = (from + 1) % self.urls.len();
        self.urls[self.cursor].clone()
    }
}

/// Gives each announcement the id its track had before (same kind and source, each
/// earlier track used once, in order), so a restored publisher keeps its track ids.
pub(crate) fn carry_track_ids(announcements: &mut [TrackAnnouncement], previous: &[TrackInfo]) {
    let mut used = vec![false; previous.len()];
    for a in announcements.iter_mut() {
        let found = previous
            .iter()
            .enumerate()
            .find(|(i, p)| !used[*i] && p.kind == a.kind && p.source == a.source);
        a.track_id = found.map(|(i, p)| {
            used[i] = true;
            p.track_id.clone()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::{Layer, TrackKind};

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.backoff_bound(0), Duration::from_millis(50));
        assert_eq!(p.backoff_bound(1), Duration::from_millis(100));
        assert_eq!(p.backoff_bound(4), Duration::from_millis(800));
        assert_eq!(p.backoff_bound(5), Duration::from_secs(1));
        assert_eq!(p.backoff_bound(31), Duration::from_secs(1));
        assert_eq!(p.backoff_bound(u32::MAX), Duration::from_secs(1));
        let mut rng = Jitter::new(7);
        for failures in 0..40 {
            let bound = p.backoff_bound(failures);
            let mut low = false;
            let mut high = false;
            for _ in 0..500 {
                let d = p.backoff(failures, rng.next_u64());
                assert!(d <= bound, "{d:?} > {bound:?}");
                low |= d < bound / 4;
                high |= d > bound * 3 / 4;
            }
            assert!(low && high, "delays spread over 0..={bound:?}");
        }
        assert_eq!(p.backoff(3, 0), Duration::ZERO);
        assert!(p.backoff(0, u64::MAX) <= p.backoff_bound(0));
        let zero = ReconnectPolicy {
            initial_backoff: Duration::ZERO,
            ..p
        };
        assert_eq!(zero.backoff(10, 12345), Duration::ZERO);
    }

    #[test]
    fn jitter_is_seeded() {
        let a: Vec<u64> = (0..4)
            .scan(Jitter::new(1), |j, _| Some(j.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(Jitter::new(1), |j, _| Some(j.next_u64()))
            .collect();
        let c: Vec<u64> = (0..4)
            .scan(Jitter::new(2), |j, _| Some(j.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    fn urls(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rotation_skips_the_failed_node_and_wraps() {
        let mut r = UrlRotation::new("b", &urls(&["a", "b", " ", "c", "a"]));
        assert_eq!(r.urls(), urls(&["b", "a", "c"]).as_slice());
        assert_eq!(r.next_after("b"), "a");
        assert_eq!(r.next_after("a"), "c");
        assert_eq!(r.next_after("c"), "b");
        // A migrate to a list entry moves the cursor there.
        r.used("c");
        assert_eq!(r.next_after("c"), "b");
        // A URL outside the list (a migrate target) fails: go on after the last entry used.
        r.used("b");
        r.used("x");
        assert_eq!(r.next_after("x"), "a");
        assert_eq!(r.next_after("x"), "c");
        // One URL: retried.
        let mut one = UrlRotation::new("only", &[]);
        assert_eq!(one.next_after("only"), "only");
        assert_eq!(one.next_after("elsewhere"), "only");
    }

    fn info(id: &str, kind: TrackKind, source: &str) -> TrackInfo {
        TrackInfo {
            track_id: id.into(),
            participant_id: "p".into(),
            mid: "0".into(),
            kind,
            source: source.into(),
            layers: vec![],
            muted: false,
        }
    }

    fn ann(mid: &str, kind: TrackKind, source: &str) -> TrackAnnouncement {
        TrackAnnouncement {
            mid: mid.into(),
            kind,
            source: source.into(),
            layers: vec![Layer::Low],
            track_id: Some("stale".into()),
        }
    }

    #[test]
    fn previous_track_ids_follow_kind_and_source() {
        let previous = [
            info("tv", TrackKind::Video, "camera"),
            info("ta", TrackKind::Audio, "microphone"),
            info("ts", TrackKind::Video, "screen"),
            info("tv2", TrackKind::Video, "camera"),
        ];
        let mut new = [
            ann("a", TrackKind::Audio, "microphone"),
            ann("b", TrackKind::Video, "camera"),
            ann("c", TrackKind::Video, "camera"),
            ann("d", TrackKind::Video, "camera"),
            ann("e", TrackKind::Audio, "screen"),
        ];
        carry_track_ids(&mut new, &previous);
        let ids: Vec<Option<&str>> = new.iter().map(|a| a.track_id.as_deref()).collect();
        assert_eq!(
            ids,
            [Some("ta"), Some("tv"), Some("tv2"), None, None],
            "each earlier id used once, kind and source must both match"
        );
        let mut fresh = [ann("a", TrackKind::Audio, "microphone")];
        carry_track_ids(&mut fresh, &[]);
        assert_eq!(fresh[0].track_id, None);
    }
}
