//! Node-side network impairment for chaos tests (`meridian serve --dev --impair …`).
//!
//! Like `tc qdisc … netem` on a pod's interface, but in the node's own media loop and
//! seeded: a [`str0m_netem::Netem`] per direction delays, jitters and drops the media
//! socket's datagrams (outgoing by default, as netem on an interface's egress does).
//! The emulators are Sans-IO; the media loop feeds them datagrams and the time and
//! polls their timers (`Impairer::poll_timeout`) together with the controller's.
//! Only a dev node accepts it ([`crate::Config::validate`]).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use meridian_media::Transmit;
use serde::Deserialize;
use str0m_netem::{GilbertElliot, Netem, NetemConfig, Probability, RandomLoss};

/// Most datagrams one direction's emulator holds; more are dropped (and counted).
const MAX_QUEUED_PACKETS: usize = 65_536;
/// Most bytes one direction's emulator holds; more are dropped (and counted).
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Longest delay or jitter accepted.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Which of the media socket's datagrams are impaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImpairDirection {
    /// Datagrams the node sends (netem on an interface's egress).
    #[default]
    Egress,
    /// Datagrams the node receives.
    Ingress,
    /// Both, each direction with its own emulator.
    Both,
}

impl FromStr for ImpairDirection {
    type Err = ImpairError;
    fn from_str(s: &str) -> Result<Self, ImpairError> {
        match s {
            "egress" => Ok(ImpairDirection::Egress),
            "ingress" => Ok(ImpairDirection::Ingress),
            "both" => Ok(ImpairDirection::Both),
            other => Err(ImpairError(format!(
                "direction {other:?} is not egress, ingress or both"
            ))),
        }
    }
}

/// An impairment specification that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("impairment: {0}")]
pub struct ImpairError(String);

/// Parses `delay=200ms,jitter=20ms,loss=2%[,burst=4]` into an emulator configuration
/// seeded with `seed`.
///
/// * `delay` (or `latency`), `jitter`: durations (`humantime`, e.g. `200ms`), ≤ 10 s.
/// * `loss`: percentage of datagrams dropped, `0..=100`.
/// * `burst`: mean length of a loss burst in datagrams (≥ 1). With it the loss is
///   Gilbert-Elliott (bursts of that mean length, spaced so the average loss is
///   `loss`) instead of independent per datagram.
pub fn parse_impairment(spec: &str, seed: u64) -> Result<NetemConfig, ImpairError> {
    let err = |m: String| ImpairError(m);
    let mut config = NetemConfig::new().seed(seed);
    let mut loss: Option<f32> = None;
    let mut burst: Option<f32> = None;
    if spec.len() > 256 {
        return Err(err("specification longer than 256 bytes".into()));
    }
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let duration = || -> Result<Duration, ImpairError> {
            let d = humantime::parse_duration(v).map_err(|e| err(format!("{k}: {e}")))?;
            if d > MAX_DELAY {
                return Err(err(format!("{k} must be at most 10s")));
            }
            Ok(d)
        };
        match k {
            "delay" | "latency" => config = config.latency(duration()?),
            "jitter" => config = config.jitter(duration()?),
            "loss" => {
                let pct: f32 = v
                    .trim_end_matches('%')
                    .parse()
                    .map_err(|_| err(format!("loss {v:?} is not a percentage")))?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(err("loss must be 0..=100%".into()));
                }
                loss = Some(pct / 100.0);
            }
            "burst" => {
                let b: f32 = v
                    .parse()
                    .map_err(|_| err(format!("burst {v:?} is not a number of packets")))?;
                if !(1.0..=1000.0).contains(&b) {
                    return Err(err("burst must be 1..=1000 packets".into()));
                }
                burst = Some(b);
            }
            other => {
                return Err(err(format!(
                    "unknown key {other:?} (delay, jitter, loss, burst)"
                )));
            }
        }
    }
    match (loss, burst) {
        (Some(p), Some(b)) if p > 0.0 && p < 1.0 => {
            // Mean loss of Gilbert-Elliott with loss only in BAD: B / (G + B).
            let good = b * (1.0 - p) / p;
            config = config.loss(GilbertElliot::new().good_duration(good).bad_duration(b));
        }
        (Some(p), _) => config = config.loss(RandomLoss::new(Probability::new(p))),
        (None, Some(_)) => return Err(err("burst needs a loss percentage".into())),
        (None, None) => {}
    }
    Ok(config)
}

/// The node's impairment setting (`media.impair*`, `meridian serve --dev --impair`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impairment {
    /// `delay=200ms,jitter=20ms,loss=2%[,burst=N]` ([`parse_impairment`]).
    pub spec: String,
    /// Which datagrams are impaired.
    pub direction: ImpairDirection,
    /// Seed of the emulators' random numbers (the same seed loses the same datagrams).
    pub seed: u64,
}

/// A datagram inside an emulator.
#[derive(Debug)]
struct Queued {
    peer: SocketAddr,
    contents: Vec<u8>,
}

impl Clone for Queued {
    fn clone(&self) -> Self {
        Queued {
            peer: self.peer,
            contents: self.contents.clone(),
        }
    }
}

impl str0m_netem::WithLen for Queued {
    fn len(&self) -> usize {
        self.contents.len()
    }
}

/// One direction's emulator with its byte and packet bounds.
struct Lane {
    netem: Netem<Queued>,
    queued_bytes: usize,
}

impl Lane {
    fn new(config: NetemConfig) -> Lane {
        Lane {
            netem: Netem::new(config),
            queued_bytes: 0,
        }
    }

    /// Returns whether the datagram was taken (false: over the bounds, dropped).
    fn push(&mut self, now: Instant, d: Queued) -> bool {
        let len = d.contents.len();
        if self.netem.queue_len() >= MAX_QUEUED_PACKETS
            || self.queued_bytes + len > MAX_QUEUED_BYTES
        {
            return false;
        }
        let before = self.netem.queue_len();
        self.netem.handle_input(str0m_netem::Input::Packet(now, d));
        let added = self.netem.queue_len().saturating_sub(before);
        self.queued_bytes += added * len;
        true
    }

    fn pop(&mut self, now: Instant) -> Option<Queued> {
        if self.netem.poll_timeout() > now {
            return None;
        }
        self.netem.handle_input(str0m_netem::Input::Timeout(now));
        loop {
            match self.netem.poll_output()? {
                str0m_netem::Output::Packet(d) => {
                    self.queued_bytes = self.queued_bytes.saturating_sub(d.contents.len());
                    return Some(d);
                }
                str0m_netem::Output::Timeout(_) => continue,
            }
        }
    }
}

/// The media socket's emulators: none, egress, ingress or both.
#[derive(Default)]
pub(crate) struct Impairer {
    egress: Option<Lane>,
    ingress: Option<Lane>,
    /// Datagrams dropped because an emulator was full.
    pub(crate) overflow: u64,
}

impl Impairer {
    /// Emulators for the node's `--impair` setting (the ingress one seeded with the
    /// seed + 1, so the two directions do not lose the same datagrams).
    pub(crate) fn new(impairment: Option<&Impairment>) -> Result<Impairer, ImpairError> {
        let Some(i) = impairment else {
            return Ok(Impairer::default());
        };
        let (egress, ingress) = match i.direction {
            ImpairDirection::Egress => (true, false),
            ImpairDirection::Ingress => (false, true),
            ImpairDirection::Both => (true, true),
        };
        Ok(Impairer {
            egress: egress
                .then(|| parse_impairment(&i.spec, i.seed).map(Lane::new))
                .transpose()?,
            ingress: ingress
                .then(|| parse_impairment(&i.spec, i.seed.wrapping_add(1)).map(Lane::new))
                .transpose()?,
            overflow: 0,
        })
    }

    /// Whether received datagrams go through an emulator.
    pub(crate) fn ingress(&self) -> bool {
        self.ingress.is_some()
    }

    /// Hands an outgoing datagram to the egress emulator, or to `out` when there is none.
    pub(crate) fn send(&mut self, now: Instant, t: Transmit, out: &mut impl Extend<Transmit>) {
        match &mut self.egress {
            None => out.extend([t]),
            Some(lane) => {
                let taken = lane.push(
                    now,
                    Queued {
                        peer: t.destination,
                        contents: t.contents,
                    },
                );
                self.overflow += u64::from(!taken);
            }
        }
    }

    /// Hands a received datagram to the ingress emulator.
    pub(crate) fn receive(&mut self, now: Instant, source: SocketAddr, datagram: &[u8]) {
        if let Some(lane) = &mut self.ingress {
            let taken = lane.push(
                now,
                Queued {
                    peer: source,
                    contents: datagram.to_vec(),
                },
            );
            self.overflow += u64::from(!taken);
        }
    }

    /// The next outgoing datagram due at `now`.
    pub(crate) fn poll_send(&mut self, now: Instant) -> Option<Transmit> {
        let d = self.egress.as_mut()?.pop(now)?;
        Some(Transmit {
            destination: d.peer,
            contents: d.contents,
        })
    }

    /// The next received datagram due at `now`: (source, bytes).
    pub(crate) fn poll_receive(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let d = self.ingress.as_mut()?.pop(now)?;
        Some((d.peer, d.contents))
    }

    /// When the next held datagram is due (far future when none is held).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .filter(|l| !l.netem.is_empty())
            .map(|l| l.netem.poll_timeout())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impairer(spec: &str, direction: ImpairDirection) -> Impairer {
        Impairer::new(Some(&Impairment {
            spec: spec.into(),
            direction,
            seed: 7,
        }))
        .unwrap()
    }

    fn t(i: u8) -> Transmit {
        Transmit {
            destination: "127.0.0.1:9".parse().unwrap(),
            contents: vec![i; 100],
        }
    }

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert!(parse_impairment("delay=200ms,jitter=20ms,loss=2%", 1).is_ok());
        assert!(parse_impairment("delay=200ms,loss=2%,burst=4", 1).is_ok());
        assert!(parse_impairment("", 1).is_ok());
        for bad in [
            "delay",
            "delay=fast",
            "loss=150%",
            "loss=-1",
            "burst=3",
            "loss=2%,burst=0",
            "delay=1h",
            "colour=red",
        ] {
            assert!(parse_impairment(bad, 1).is_err(), "{bad} accepted");
        }
        assert_eq!("both".parse::<ImpairDirection>(), Ok(ImpairDirection::Both));
        assert!("sideways".parse::<ImpairDirection>().is_err());
    }

    #[test]
    fn egress_delays_by_the_configured_time_and_drops_the_configured_share() {
        let mut imp = impairer("delay=200ms,loss=10%", ImpairDirection::Egress);
        assert!(!imp.ingress());
        let start = Instant::now();
        let mut out: Vec<Transmit> = Vec::new();
        for i in 0..1000u32 {
            imp.send(start, t(i as u8), &mut out);
        }
        assert!(out.is_empty(), "nothing leaves before its delay");
        assert!(imp.poll_send(start + Duration::from_millis(199)).is_none());
        let due = imp.poll_timeout().expect("datagrams are held");
        assert_eq!(due, start + Duration::from_millis(200));
        let mut released = 0;
        while imp.poll_send(start + Duration::from_millis(200)).is_some() {
            released += 1;
        }
        assert!(
            (850..=950).contains(&released),
            "10 % loss of 1000 released {released}"
        );
        assert_eq!(imp.poll_timeout(), None);
    }

    #[test]
    fn bursty_loss_averages_the_configured_share_in_runs() {
        let mut imp = impairer("loss=5%,burst=5", ImpairDirection::Both);
        let now = Instant::now();
        let mut lost_runs = Vec::new();
        let mut run = 0;
        let mut lost = 0;
        for i in 0..20_000u32 {
            imp.receive(now, "127.0.0.1:9".parse().unwrap(), &i.to_be_bytes());
            if imp.poll_receive(now).is_some() {
                if run > 0 {
                    lost_runs.push(run);
                }
                run = 0;
            } else {
                run += 1;
                lost += 1;
            }
        }
        let share = f64::from(lost) / 20_000.0;
        assert!((0.03..0.07).contains(&share), "loss share {share}");
        let mean_run = lost_runs.iter().sum::<u32>() as f64 / lost_runs.len() as f64;
        assert!(mean_run > 3.0, "bursts average {mean_run} packets");
    }

    #[test]
    fn a_full_emulator_drops_and_counts() {
        let mut imp = impairer("delay=1s", ImpairDirection::Egress);
        let now = Instant::now();
        let mut out: Vec<Transmit> = Vec::new();
        for _ in 0..MAX_QUEUED_PACKETS + 10 {
            imp.send(now, t(0), &mut out);
        }
        assert_eq!(imp.overflow, 10);
    }
}
