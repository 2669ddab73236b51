//! Reconnection as a pure state machine ([`Reconnector`]): the policy, backoff with
//! full jitter, the order in which a region's nodes are tried, when to give up, and
//! carrying track ids over to a new offer. Time comes in as arguments; the client's
//! task runs the attempts it asks for, like the web client's `reconnect.ts`.

use std::time::{Duration, Instant};

use meridian_protocol::{ErrorCode, TrackAnnouncement, TrackInfo};

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
    /// With several regions ([`Reconnector::with_regions`]): failed attempts per node
    /// of the current region, since the loss, after which the region counts as gone
    /// and the client re-homes to the next region of its fallback order.
    pub region_attempts_per_node: u32,
    /// With several regions: the longest time spent failing in one region before
    /// moving on to the next (an unreachable region times out instead of refusing).
    pub region_timeout: Duration,
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
            region_attempts_per_node: 1,
            region_timeout: Duration::from_secs(4),
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

/// How a reconnection attempt failed, as far as the next step cares.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptFailure {
    /// The node sent `redirect` to another region's URL.
    Redirect {
        /// The region that owns the token.
        region: String,
        /// Where to connect instead.
        url: String,
    },
    /// The node sent `migrate`, with or without a target.
    Migrate {
        /// Where to connect instead, if the node named it.
        url: Option<String>,
    },
    /// The resume token is no longer valid: the next attempt joins afresh.
    ResumeFailed,
    /// The node refused the join with `code`.
    Refused {
        /// The wire error code.
        code: ErrorCode,
        /// The node's message.
        message: String,
    },
    /// No answer: connection refused or closed, a timeout, a transport error.
    Failed(String),
}

/// Refusals that another node or a later attempt will not change.
pub fn refusal_is_final(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::UnsupportedVersion
            | ErrorCode::MalformedMessage
            | ErrorCode::MessageTooLarge
    )
}

/// One connection attempt for the driver to make.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptPlan {
    /// Signaling URL to connect to.
    pub url: String,
    /// Join with the resume token (false after `resume_failed`).
    pub resume: bool,
    /// Wait this long before connecting.
    pub delay: Duration,
    /// Longest time to open the signaling connection.
    pub connect_timeout: Duration,
    /// Longest time from `join` to `joined`.
    pub join_timeout: Duration,
    /// 1-based number of this attempt since the loss.
    pub number: u32,
    /// Index of the region the attempt goes to (0 with a single region); the join
    /// uses that region's token.
    pub region: usize,
}

/// What the driver does next after a loss or a failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Make this attempt.
    Attempt(AttemptPlan),
    /// Stop: the policy's attempts or time ran out.
    GiveUp {
        /// Attempts made since the loss.
        attempts: u32,
        /// Time since the loss.
        elapsed: Duration,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// Stop: the node refused in a way no retry changes.
    Refused {
        /// The wire error code.
        code: ErrorCode,
        /// The node's message.
        message: String,
    },
}

/// A successful reconnection, as the [`Reconnector`] saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconnected {
    /// The URL joined.
    pub url: String,
    /// The join carried the resume token.
    pub resumed: bool,
    /// When the loss was detected.
    pub lost_at: Instant,
    /// Attempts made since the loss, the successful one included.
    pub attempts: u32,
    /// Index of the region joined.
    pub region: usize,
    /// True when the client re-homed to another region during this loss.
    pub rehomed: bool,
}

/// One loss being ridden out.
#[derive(Clone, Debug)]
struct Cycle {
    lost_at: Instant,
    url: String,
    resume: bool,
    attempts: u32,
    failures: u32,
    /// The region attempts go to.
    region: usize,
    /// Failed attempts in `region` since entering it.
    region_failures: u32,
    /// When attempts started going to `region`.
    region_since: Instant,
}

/// The reconnection state machine of a client: given a loss and the outcome of each
/// attempt, it says which node to try next, when, whether to resume, and when to give
/// up. It holds no sockets, tasks or clocks.
#[derive(Clone, Debug)]
pub struct Reconnector {
    policy: ReconnectPolicy,
    /// One rotation of node URLs per region, in fallback order (one entry without
    /// regions).
    regions: Vec<UrlRotation>,
    /// The region of the current (or last) connection.
    region: usize,
    jitter: Jitter,
    /// The URL of the current (or last) signaling connection.
    url: String,
    cycle: Option<Cycle>,
}

impl Reconnector {
    /// A client configured with `first` and `fallbacks`, connected to `connected`;
    /// `seed` seeds the backoff jitter.
    pub fn new(
        policy: ReconnectPolicy,
        first: &str,
        fallbacks: &[String],
        connected: &str,
        seed: u64,
    ) -> Self {
        let mut rotation = UrlRotation::new(first, fallbacks);
        rotation.used(connected);
        Reconnector {
            policy,
            regions: vec![rotation],
            region: 0,
            jitter: Jitter::new(seed),
            url: connected.to_string(),
            cycle: None,
        }
    }

    /// A client with several regions: `regions[i]` holds region `i`'s node URLs, in
    /// fallback order (the login's order: the chosen region first). It is connected
    /// to `connected` in region `connected_region`. When every node of the current
    /// region has failed [`ReconnectPolicy::region_attempts_per_node`] times since a
    /// loss, or [`ReconnectPolicy::region_timeout`] passed failing there, the next
    /// region is tried (wrapping around), with a fresh join: resume tokens belong to
    /// their region's log. Regions without URLs are skipped; with none at all this
    /// is [`Reconnector::new`] on `connected` alone.
    pub fn with_regions(
        policy: ReconnectPolicy,
        regions: &[Vec<String>],
        connected_region: usize,
        connected: &str,
        seed: u64,
    ) -> Self {
        let mut rotations: Vec<UrlRotation> = regions
            .iter()
            .map(|urls| {
                let mut urls = urls.iter().filter(|u| !u.trim().is_empty());
                match urls.next() {
                    Some(first) => UrlRotation::new(first, &urls.cloned().collect::<Vec<_>>()),
                    None => UrlRotation::new("", &[]),
                }
            })
            .collect();
        if rotations.is_empty() || connected_region >= rotations.len() {
            return Reconnector::new(policy, connected, &[], connected, seed);
        }
        rotations[connected_region].used(connected);
        Reconnector {
            policy,
            regions: rotations,
            region: connected_region,
            jitter: Jitter::new(seed),
            url: connected.to_string(),
            cycle: None,
        }
    }

    /// Index of the region of the current (or last) connection.
    pub fn region(&self) -> usize {
        self.region
    }

    /// The URL of the current (or last) signaling connection.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// When the loss being ridden out was detected, if one is.
    pub fn lost_at(&self) -> Option<Instant> {
        self.cycle.as_ref().map(|c| c.lost_at)
    }

    /// The node was lost at `now`: the first attempt goes to `to` (a `migrate`
    /// target) or else to the node after the lost one, after a jittered first delay.
    pub fn lost(&mut self, now: Instant, to: Option<String>) -> Step {
        let url = to.unwrap_or_else(|| self.regions[self.region].next_after(&self.url));
        let delay = self.policy.backoff(0, self.jitter.next_u64());
        let mut cycle = Cycle {
            lost_at: now,
            url: String::new(),
            resume: true,
            attempts: 0,
            failures: 0,
            region: self.region,
            region_failures: 0,
            region_since: now,
        };
        let step = self.plan(now, &mut cycle, url, delay);
        self.cycle = Some(cycle);
        step
    }

    /// The attempt in flight failed at `now`: the next attempt, or the end.
    ///
    /// Redirects, migrations and `resume_failed` retry at once; other failures back
    /// off and move on to the next node. A call with no loss in progress is treated
    /// as a loss of the current node.
    pub fn failed(&mut self, now: Instant, failure: AttemptFailure) -> Step {
        let Some(mut cycle) = self.cycle.take() else {
            return self.lost(now, None);
        };
        let (next, delay, error) = match failure {
            AttemptFailure::Redirect { region, url } => {
                let why = format!("redirected to region {region} at {url}");
                (url, Duration::ZERO, why)
            }
            AttemptFailure::Migrate { url: Some(url) } => {
                let why = format!("migrated to {url}");
                (url, Duration::ZERO, why)
            }
            AttemptFailure::ResumeFailed => {
                cycle.resume = false;
                (cycle.url.clone(), Duration::ZERO, "resume failed".into())
            }
            AttemptFailure::Refused { code, message } if refusal_is_final(code) => {
                return Step::Refused { code, message };
            }
            AttemptFailure::Migrate { url: None } => {
                let why = format!("{} migrated without a target", cycle.url);
                self.back_off(now, &mut cycle, why)
            }
            AttemptFailure::Refused { code, message } => {
                let why = format!("{} refused: {code:?}: {message}", cycle.url);
                self.back_off(now, &mut cycle, why)
            }
            AttemptFailure::Failed(e) => {
                let why = format!("{}: {e}", cycle.url);
                self.back_off(now, &mut cycle, why)
            }
        };
        let elapsed = now.saturating_duration_since(cycle.lost_at);
        if cycle.attempts >= self.policy.max_attempts || elapsed + delay >= self.policy.max_duration
        {
            return Step::GiveUp {
                attempts: cycle.attempts,
                elapsed,
                last_error: error,
            };
        }
        let step = self.plan(now, &mut cycle, next, delay);
        self.cycle = Some(cycle);
        step
    }

    /// The attempt in flight joined: the loss is over.
    pub fn joined(&mut self) -> Option<Reconnected> {
        let cycle = self.cycle.take()?;
        let rehomed = cycle.region != self.region;
        self.url = cycle.url.clone();
        self.region = cycle.region;
        self.regions[cycle.region].used(&cycle.url);
        Some(Reconnected {
            url: cycle.url,
            resumed: cycle.resume,
            lost_at: cycle.lost_at,
            attempts: cycle.attempts,
            region: cycle.region,
            rehomed,
        })
    }

    /// A failed attempt that backs off: the next node after a longer delay, or the
    /// first node of the next region once the current one counts as gone.
    fn back_off(
        &mut self,
        now: Instant,
        cycle: &mut Cycle,
        why: String,
    ) -> (String, Duration, String) {
        cycle.failures += 1;
        cycle.region_failures += 1;
        let nodes = self.regions[cycle.region].urls().len() as u32;
        let gone = cycle.region_failures
            >= nodes.saturating_mul(self.policy.region_attempts_per_node.max(1))
            || now.saturating_duration_since(cycle.region_since) >= self.policy.region_timeout;
        if self.regions.len() > 1 && gone {
            let n = self.regions.len();
            let next = (1..n)
                .map(|k| (cycle.region + k) % n)
                .find(|&r| self.regions[r].urls().iter().any(|u| !u.is_empty()));
            if let Some(next) = next {
                cycle.region = next;
                cycle.region_failures = 0;
                cycle.region_since = now;
                // Resume tokens belong to the old region's log.
                cycle.resume = false;
                let url = self.regions[next].urls()[0].clone();
                let delay = self.policy.backoff(0, self.jitter.next_u64());
                return (url, delay, format!("{why}; region gone, re-homing"));
            }
        }
        let delay = self.policy.backoff(cycle.failures, self.jitter.next_u64());
        let url = self.regions[cycle.region].next_after(&cycle.url);
        (url, delay, why)
    }

    fn plan(&self, now: Instant, cycle: &mut Cycle, url: String, delay: Duration) -> Step {
        let remaining = self
            .policy
            .max_duration
            .saturating_sub(now.saturating_duration_since(cycle.lost_at))
            .max(Duration::from_millis(1));
        cycle.url = url.clone();
        cycle.attempts += 1;
        Step::Attempt(AttemptPlan {
            url,
            resume: cycle.resume,
            delay,
            connect_timeout: self.policy.connect_timeout.min(remaining),
            join_timeout: self.policy.join_timeout.min(remaining),
            number: cycle.attempts,
            region: cycle.region,
        })
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

    fn reconnector(policy: ReconnectPolicy) -> Reconnector {
        Reconnector::new(policy, "a", &urls(&["b", "c"]), "a", 42)
    }

    fn plan(step: Step) -> AttemptPlan {
        match step {
            Step::Attempt(p) => p,
            other => panic!("expected an attempt, got {other:?}"),
        }
    }

    #[test]
    fn a_loss_tries_the_next_node_and_backs_off_on_each_failure() {
        let policy = ReconnectPolicy::default();
        let mut r = reconnector(policy.clone());
        let t0 = Instant::now();
        let first = plan(r.lost(t0, None));
        assert_eq!(
            (first.url.as_str(), first.resume, first.number),
            ("b", true, 1)
        );
        assert!(first.delay <= policy.backoff_bound(0));
        assert_eq!(r.lost_at(), Some(t0));
        let mut now = t0;
        let mut seen = vec![first.url];
        for n in 2..=5u32 {
            now += Duration::from_millis(10);
            let p = plan(r.failed(now, AttemptFailure::Failed("refused".into())));
            assert_eq!(p.number, n);
            assert!(
                p.delay <= policy.backoff_bound(n - 1),
                "attempt {n}: {:?}",
                p.delay
            );
            seen.push(p.url);
        }
        assert_eq!(
            seen,
            urls(&["b", "c", "a", "b", "c"]),
            "round robin after the lost node"
        );
        let done = r.joined().expect("a loss was in progress");
        assert_eq!(
            (done.url.as_str(), done.resumed, done.attempts),
            ("c", true, 5)
        );
        assert_eq!(done.lost_at, t0);
        assert_eq!(r.url(), "c");
        assert_eq!(r.lost_at(), None);
        assert_eq!(r.joined(), None, "nothing to finish twice");
        // The next loss starts after the node now in use.
        assert_eq!(plan(r.lost(now, None)).url, "a");
    }

    #[test]
    fn redirects_migrations_and_resume_failures_retry_at_once() {
        let mut r = reconnector(ReconnectPolicy::default());
        let t0 = Instant::now();
        let p = plan(r.lost(t0, Some("m".into())));
        assert_eq!(p.url, "m", "a migrate target goes first");
        let p = plan(r.failed(
            t0,
            AttemptFailure::Redirect {
                region: "eu".into(),
                url: "eu1".into(),
            },
        ));
        assert_eq!((p.url.as_str(), p.delay), ("eu1", Duration::ZERO));
        let p = plan(r.failed(t0, AttemptFailure::ResumeFailed));
        assert_eq!(
            (p.url.as_str(), p.resume, p.delay),
            ("eu1", false, Duration::ZERO)
        );
        let p = plan(r.failed(
            t0,
            AttemptFailure::Migrate {
                url: Some("x".into()),
            },
        ));
        assert!(!p.resume, "a fresh join stays fresh");
        let p = plan(r.failed(t0, AttemptFailure::Migrate { url: None }));
        assert_eq!(
            p.url, "b",
            "after a URL outside the list: the one after the last used"
        );
        assert!(!r.joined().expect("joined").resumed);
    }

    #[test]
    fn final_refusals_stop_and_others_retry() {
        let mut r = reconnector(ReconnectPolicy::default());
        let t0 = Instant::now();
        plan(r.lost(t0, None));
        let retry = r.failed(
            t0,
            AttemptFailure::Refused {
                code: ErrorCode::CapacityExceeded,
                message: "full".into(),
            },
        );
        assert!(matches!(retry, Step::Attempt(_)));
        let stop = r.failed(
            t0,
            AttemptFailure::Refused {
                code: ErrorCode::Unauthorized,
                message: "expired".into(),
            },
        );
        assert_eq!(
            stop,
            Step::Refused {
                code: ErrorCode::Unauthorized,
                message: "expired".into()
            }
        );
    }

    #[test]
    fn gives_up_on_attempts_or_time_and_bounds_timeouts_by_what_remains() {
        let policy = ReconnectPolicy {
            max_attempts: 3,
            ..ReconnectPolicy::default()
        };
        let mut r = reconnector(policy);
        let t0 = Instant::now();
        plan(r.lost(t0, None));
        plan(r.failed(t0, AttemptFailure::Failed("x".into())));
        plan(r.failed(t0, AttemptFailure::Failed("y".into())));
        match r.failed(
            t0 + Duration::from_secs(1),
            AttemptFailure::Failed("z".into()),
        ) {
            Step::GiveUp {
                attempts,
                elapsed,
                last_error,
            } => {
                assert_eq!(attempts, 3);
                assert_eq!(elapsed, Duration::from_secs(1));
                assert!(last_error.ends_with(": z"), "{last_error}");
            }
            other => panic!("expected to give up, got {other:?}"),
        }

        let policy = ReconnectPolicy {
            max_duration: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            join_timeout: Duration::from_secs(5),
            ..ReconnectPolicy::default()
        };
        let mut r = reconnector(policy);
        plan(r.lost(t0, None));
        let late = plan(r.failed(
            t0 + Duration::from_millis(8500),
            AttemptFailure::ResumeFailed,
        ));
        assert_eq!(late.connect_timeout, Duration::from_millis(1500));
        assert_eq!(late.join_timeout, Duration::from_millis(1500));
        let over = r.failed(t0 + Duration::from_secs(10), AttemptFailure::ResumeFailed);
        assert!(matches!(over, Step::GiveUp { .. }), "{over:?}");
    }

    #[test]
    fn same_seed_same_delays() {
        let delays = |seed| {
            let mut r = Reconnector::new(ReconnectPolicy::default(), "a", &[], "a", seed);
            let t0 = Instant::now();
            let mut d = vec![plan(r.lost(t0, None)).delay];
            for _ in 0..5 {
                d.push(plan(r.failed(t0, AttemptFailure::Failed("x".into()))).delay);
            }
            d
        };
        assert_eq!(delays(1), delays(1));
        assert_ne!(delays(1), delays(2));
    }

    fn regions() -> Vec<Vec<String>> {
        vec![urls(&["eu1", "eu2"]), urls(&["us1", "us2"]), urls(&["ap1"])]
    }

    #[test]
    fn a_region_whose_nodes_all_fail_hands_over_to_the_next_region_fresh() {
        let policy = ReconnectPolicy::default();
        let mut r = Reconnector::with_regions(policy.clone(), &regions(), 0, "eu1", 7);
        let t0 = Instant::now();
        let first = plan(r.lost(t0, None));
        assert_eq!(
            (first.url.as_str(), first.region, first.resume),
            ("eu2", 0, true)
        );
        let t1 = t0 + Duration::from_millis(5);
        let second = plan(r.failed(t1, AttemptFailure::Failed("refused".into())));
        assert_eq!((second.url.as_str(), second.region), ("eu1", 0));
        // Both nodes of eu failed once: re-home to us, without the eu resume token,
        // after at most the first backoff.
        let third = plan(r.failed(t1, AttemptFailure::Failed("refused".into())));
        assert_eq!(
            (third.url.as_str(), third.region, third.resume),
            ("us1", 1, false)
        );
        assert!(third.delay <= policy.backoff_bound(0));
        let done = r.joined().unwrap();
        assert_eq!((done.region, done.rehomed, done.resumed), (1, true, false));
        assert_eq!(r.region(), 1);
        // The next loss stays in us first, then moves on to ap, then wraps to eu.
        let p = plan(r.lost(t1, None));
        assert_eq!((p.url.as_str(), p.region, p.resume), ("us2", 1, true));
        let p = plan(r.failed(t1, AttemptFailure::Failed("x".into())));
        assert_eq!(p.url, "us1");
        let p = plan(r.failed(t1, AttemptFailure::Failed("x".into())));
        assert_eq!((p.url.as_str(), p.region), ("ap1", 2));
        let p = plan(r.failed(t1, AttemptFailure::Failed("x".into())));
        assert_eq!((p.url.as_str(), p.region), ("eu1", 0));
    }

    #[test]
    fn a_region_that_only_times_out_is_left_after_the_region_timeout() {
        let policy = ReconnectPolicy {
            region_attempts_per_node: 100,
            ..ReconnectPolicy::default()
        };
        let mut r = Reconnector::with_regions(policy.clone(), &regions(), 0, "eu1", 9);
        let t0 = Instant::now();
        plan(r.lost(t0, None));
        let p = plan(r.failed(
            t0 + Duration::from_secs(1),
            AttemptFailure::Failed("timeout".into()),
        ));
        assert_eq!(p.region, 0, "one second is not yet the region timeout");
        let p = plan(r.failed(
            t0 + policy.region_timeout,
            AttemptFailure::Failed("timeout".into()),
        ));
        assert_eq!((p.url.as_str(), p.region), ("us1", 1));
    }

    #[test]
    fn a_live_node_of_the_region_keeps_the_client_there() {
        let mut r = Reconnector::with_regions(ReconnectPolicy::default(), &regions(), 0, "eu1", 3);
        let t0 = Instant::now();
        let p = plan(r.lost(t0, None));
        assert_eq!(p.url, "eu2");
        // eu2 answers, but the resume token is spent: a fresh join, still in eu.
        let p = plan(r.failed(t0, AttemptFailure::ResumeFailed));
        assert_eq!((p.url.as_str(), p.region, p.resume), ("eu2", 0, false));
        let done = r.joined().unwrap();
        assert!(!done.rehomed);
        // A single region, or no usable one, behaves as before.
        let mut single = Reconnector::with_regions(
            ReconnectPolicy::default(),
            &[urls(&["a"]), vec![]],
            0,
            "a",
            1,
        );
        plan(single.lost(t0, None));
        let p = plan(single.failed(t0, AttemptFailure::Failed("x".into())));
        assert_eq!(
            (p.url.as_str(), p.region),
            ("a", 0),
            "an empty region is skipped"
        );
        let fallback = Reconnector::with_regions(ReconnectPolicy::default(), &[], 5, "z", 1);
        assert_eq!((fallback.url(), fallback.region()), ("z", 0));
    }
}
