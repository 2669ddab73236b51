//! When to restart ICE, as a pure state machine ([`PathWatch`]): a media connection
//! whose path died while signaling stayed up is repaired by an ICE restart on the same
//! participant (new ICE credentials; DTLS, tracks and ids stay), not by reconnecting.
//! Time comes in as arguments, like the web client's `restart.ts`.

use std::time::{Duration, Instant};

/// When the client restarts ICE on one of its media connections.
///
/// A connection's path counts as dead once it was connected and then either nothing
/// arrived from the node on it for [`silence`](Self::silence) (the node answers the
/// client's ICE checks at least every 3 s, so a live path is never that quiet), or ICE
/// reported `disconnected` for [`disconnected`](Self::disconnected). With signaling up,
/// the client then restarts ICE: on the publisher connection it offers new ICE
/// credentials; for the subscriber connection it sends `ice_restart` and answers the
/// node's offer with new credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct IceRestartPolicy {
    /// Restart at all (otherwise a dead path stays dead until signaling is lost too).
    pub enabled: bool,
    /// Silence after which a connected path counts as dead.
    pub silence: Duration,
    /// How long ICE may stay `disconnected` before the path counts as dead.
    pub disconnected: Duration,
    /// Least time between two restarts of one connection: a restart that did not bring
    /// the path back (it was still cut) is tried again after this.
    pub retry: Duration,
}

impl Default for IceRestartPolicy {
    fn default() -> Self {
        IceRestartPolicy {
            enabled: true,
            silence: Duration::from_secs(5),
            disconnected: Duration::from_secs(1),
            retry: Duration::from_secs(3),
        }
    }
}

impl IceRestartPolicy {
    /// No ICE restarts.
    pub fn disabled() -> Self {
        IceRestartPolicy {
            enabled: false,
            ..IceRestartPolicy::default()
        }
    }
}

/// What the client knows about one media connection's path.
#[derive(Clone, Debug, Default)]
pub struct PathWatch {
    /// The connection completed ICE and DTLS once (a restart needs that).
    connected: bool,
    /// When the last datagram from the node arrived on it.
    last_datagram: Option<Instant>,
    /// Since when ICE reports `disconnected` (or `None`).
    ice_down_since: Option<Instant>,
    /// When it was last restarted.
    restarted_at: Option<Instant>,
}

impl PathWatch {
    /// A connection not connected yet.
    pub fn new() -> Self {
        PathWatch::default()
    }

    /// The connection completed ICE and DTLS.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.last_datagram = Some(now);
    }

    /// A datagram from the node arrived on the connection.
    pub fn on_datagram(&mut self, now: Instant) {
        self.last_datagram = Some(now);
    }

    /// ICE changed state: `disconnected` (true) or anything else.
    pub fn on_ice(&mut self, now: Instant, disconnected: bool) {
        if disconnected {
            self.ice_down_since.get_or_insert(now);
        } else {
            self.ice_down_since = None;
        }
    }

    /// Whether the path counts as dead at `now`.
    pub fn dead(&self, now: Instant, policy: &IceRestartPolicy) -> bool {
        if !self.connected {
            return false;
        }
        let silent = self
            .last_datagram
            .is_some_and(|t| now.saturating_duration_since(t) >= policy.silence);
        let down = self
            .ice_down_since
            .is_some_and(|t| now.saturating_duration_since(t) >= policy.disconnected);
        silent || down
    }

    /// Whether to restart ICE now: the policy allows it, signaling is up, the path is
    /// dead and the last restart (if any) was at least [`IceRestartPolicy::retry`] ago.
    pub fn restart_due(&self, now: Instant, policy: &IceRestartPolicy, signaling_up: bool) -> bool {
        policy.enabled
            && signaling_up
            && self.dead(now, policy)
            && self
                .restarted_at
                .is_none_or(|t| now.saturating_duration_since(t) >= policy.retry)
    }

    /// A restart was started at `now`.
    pub fn restarted(&mut self, now: Instant) {
        self.restarted_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_connection_never_connected_is_not_restarted() {
        let p = IceRestartPolicy::default();
        let t0 = Instant::now();
        let w = PathWatch::new();
        assert!(!w.restart_due(t0 + ms(60_000), &p, true));
    }

    #[test]
    fn silence_past_the_policy_restarts_only_with_signaling_up() {
        let p = IceRestartPolicy::default();
        let t0 = Instant::now();
        let mut w = PathWatch::new();
        w.on_connected(t0);
        w.on_datagram(t0 + ms(1000));
        assert!(
            !w.restart_due(t0 + ms(5999), &p, true),
            "quiet for less than 5 s"
        );
        assert!(w.restart_due(t0 + ms(6000), &p, true), "quiet for 5 s");
        assert!(
            !w.restart_due(t0 + ms(6000), &p, false),
            "signaling down: reconnection's business, not a restart"
        );
        assert!(!w.restart_due(t0 + ms(6000), &IceRestartPolicy::disabled(), true));
    }

    #[test]
    fn ice_disconnected_restarts_sooner_and_a_reconnect_clears_it() {
        let p = IceRestartPolicy::default();
        let t0 = Instant::now();
        let mut w = PathWatch::new();
        w.on_connected(t0);
        w.on_ice(t0 + ms(100), true);
        w.on_datagram(t0 + ms(500));
        assert!(!w.restart_due(t0 + ms(1099), &p, true));
        assert!(
            w.restart_due(t0 + ms(1100), &p, true),
            "disconnected for 1 s"
        );
        w.on_ice(t0 + ms(1050), false);
        assert!(
            !w.restart_due(t0 + ms(1100), &p, true),
            "ICE came back by itself"
        );
    }

    #[test]
    fn a_restart_that_did_not_help_is_retried_after_the_retry_interval() {
        let p = IceRestartPolicy::default();
        let t0 = Instant::now();
        let mut w = PathWatch::new();
        w.on_connected(t0);
        assert!(w.restart_due(t0 + ms(5000), &p, true));
        w.restarted(t0 + ms(5000));
        assert!(
            !w.restart_due(t0 + ms(7999), &p, true),
            "once per retry interval"
        );
        assert!(w.restart_due(t0 + ms(8000), &p, true), "still dead: again");
        w.restarted(t0 + ms(8000));
        w.on_datagram(t0 + ms(8100));
        assert!(!w.restart_due(t0 + ms(12_000), &p, true), "media is back");
    }
}
