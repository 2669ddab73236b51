//! When a media worker is overloaded, as a Sans-IO meter: the media loop tells it when
//! each wake-up began and ended; it keeps an exponentially weighted share of time spent
//! busy and says whether the worker is past `[media] overload_busy_share`.
//!
//! A worker past its capacity does not slow down evenly: its backlog delays ICE consent
//! answers, clients restart ICE, renegotiation adds work and joins time out (issue 12:
//! 8 500 ICE restarts in 4 minutes with a room of 500 at 1 Mbit/s). So an overloaded
//! worker takes no fresh joins (`unavailable`, the client retries or goes to another
//! node), gets no new rooms, and a node whose workers are all overloaded reports not
//! ready (`/readyz`), sends new rooms to another live node and counts as full for room
//! parts placed across nodes.

use std::time::{Duration, Instant};

/// Time constant of the busy share: a worker must be busy without pause for about 2.3
/// of these to reach 0.9 from idle, so a burst (a keyframe's fan-out, a few DTLS
/// handshakes) does not count as overload.
pub(crate) const TIME_CONSTANT: Duration = Duration::from_secs(1);
/// How far below the threshold the busy share must fall before the worker takes joins
/// again, so that it does not flip between the two at the threshold.
pub(crate) const HYSTERESIS: f64 = 0.15;

/// A worker's recent busy share and whether it counts as overloaded.
#[derive(Debug, Clone)]
pub(crate) struct LoadMeter {
    /// Busy share, 0..=1, weighted towards the last [`TIME_CONSTANT`].
    level: f64,
    at: Instant,
    /// Overloaded from `level >= threshold` until `level < threshold - HYSTERESIS`.
    threshold: Option<f64>,
    overloaded: bool,
}

impl LoadMeter {
    /// An idle meter; `threshold`: the busy share from which the worker is overloaded
    /// (`0` or anything outside `0..=1`: never).
    pub(crate) fn new(now: Instant, threshold: f64) -> LoadMeter {
        LoadMeter {
            level: 0.0,
            at: now,
            threshold: (threshold > 0.0 && threshold <= 1.0).then_some(threshold),
            overloaded: false,
        }
    }

    /// The worker waited for input from the last call until `now`.
    pub(crate) fn idle_until(&mut self, now: Instant) {
        self.advance(now, 0.0);
    }

    /// The worker handled a wake-up from the last call until `now`.
    pub(crate) fn busy_until(&mut self, now: Instant) {
        self.advance(now, 1.0);
    }

    fn advance(&mut self, now: Instant, busy: f64) {
        let dt = now.saturating_duration_since(self.at);
        self.at = self.at.max(now);
        let weight = 1.0 - (-dt.as_secs_f64() / TIME_CONSTANT.as_secs_f64()).exp();
        self.level += (busy - self.level) * weight;
        if let Some(threshold) = self.threshold {
            if self.level >= threshold {
                self.overloaded = true;
            } else if self.level < threshold - HYSTERESIS {
                self.overloaded = false;
            }
        }
    }

    /// The busy share, 0..=1, as of the last call.
    pub(crate) fn level(&self) -> f64 {
        self.level
    }

    /// Whether the worker should take no fresh joins and no new rooms.
    pub(crate) fn overloaded(&self) -> bool {
        self.overloaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `ms` of wake-ups: `busy_us` of work then the rest of each 1 ms waiting.
    fn run(m: &mut LoadMeter, now: &mut Instant, ms: u64, busy_us: u64) {
        for _ in 0..ms {
            m.idle_until(*now);
            m.busy_until(*now + Duration::from_micros(busy_us));
            *now += MS;
        }
    }

    #[test]
    fn the_level_follows_the_busy_share() {
        let mut now = Instant::now();
        let mut m = LoadMeter::new(now, 0.9);
        run(&mut m, &mut now, 5_000, 600);
        assert!((m.level() - 0.6).abs() < 0.01, "level {}", m.level());
        assert!(!m.overloaded());
        run(&mut m, &mut now, 5_000, 950);
        assert!((m.level() - 0.95).abs() < 0.01, "level {}", m.level());
        assert!(m.overloaded());
    }

    #[test]
    fn a_burst_is_not_overload() {
        let mut now = Instant::now();
        let mut m = LoadMeter::new(now, 0.9);
        run(&mut m, &mut now, 5_000, 300);
        // One second busy without pause: a join storm's DTLS handshakes.
        m.idle_until(now);
        now += Duration::from_secs(1);
        m.busy_until(now);
        assert!(m.level() < 0.8, "level {}", m.level());
        assert!(!m.overloaded());
        // Three seconds is.
        m.idle_until(now);
        now += Duration::from_secs(2);
        m.busy_until(now);
        assert!(m.overloaded(), "level {}", m.level());
    }

    #[test]
    fn joins_come_back_only_well_below_the_threshold() {
        let mut now = Instant::now();
        let mut m = LoadMeter::new(now, 0.9);
        run(&mut m, &mut now, 5_000, 980);
        assert!(m.overloaded());
        // Just below the threshold: still overloaded.
        run(&mut m, &mut now, 5_000, 850);
        assert!(m.overloaded(), "level {}", m.level());
        run(&mut m, &mut now, 5_000, 700);
        assert!(!m.overloaded(), "level {}", m.level());
        // Back to 0.85: not yet overloaded again.
        run(&mut m, &mut now, 5_000, 850);
        assert!(!m.overloaded(), "level {}", m.level());
    }

    #[test]
    fn idle_time_brings_the_level_down() {
        let mut now = Instant::now();
        let mut m = LoadMeter::new(now, 0.9);
        m.busy_until(now + Duration::from_secs(5));
        now += Duration::from_secs(5);
        assert!(m.overloaded());
        now += Duration::from_secs(2);
        m.idle_until(now);
        assert!(m.level() < 0.15, "level {}", m.level());
        assert!(!m.overloaded());
    }

    #[test]
    fn a_threshold_of_zero_never_refuses() {
        let mut now = Instant::now();
        let mut m = LoadMeter::new(now, 0.0);
        now += Duration::from_secs(10);
        m.busy_until(now);
        assert!(m.level() > 0.99);
        assert!(!m.overloaded());
    }
}
