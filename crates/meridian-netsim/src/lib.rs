//! A userspace WAN for the multi-region simulation (`scripts/bench-regions.sh`).
//!
//! The kernel here has no `netem`, so inter-region delay and loss are applied in
//! userspace with `str0m-netem`: a router namespace sends every packet between region
//! subnets into a TUN device; the `meridian-netsim` binary reads it, hands it to
//! [`Wan`], and writes back what [`Wan`] releases, when it releases it. [`Wan`] is
//! Sans-IO (time in, packets out): it classifies each IPv4 packet by the regions of
//! its source and destination addresses and queues it in that direction's emulator
//! (one per ordered region pair), so EU→US and US→EU are impaired independently.
//! Packets within one region, or from or to an address of no region, pass at once.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use str0m_netem::{Input, Netem, NetemConfig, Output, Probability, RandomLoss};

/// Most packets queued in the whole WAN; more are dropped (and counted).
pub const MAX_QUEUED_PACKETS: usize = 200_000;

/// Errors in the WAN's description.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WanError {
    /// A region or link specification does not parse.
    #[error("bad specification {0:?}: {1}")]
    Spec(String, &'static str),
    /// A link names a region that was not declared.
    #[error("link names unknown region {0:?}")]
    UnknownRegion(String),
}

/// One region: a name and its IPv4 subnet.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Region id (`eu`).
    pub name: String,
    /// Network address.
    pub net: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Region {
    /// Parses `eu=10.77.1.0/24`.
    pub fn parse(spec: &str) -> Result<Region, WanError> {
        let bad = |why| WanError::Spec(spec.to_string(), why);
        let (name, net) = spec.split_once('=').ok_or(bad("expected NAME=A.B.C.D/N"))?;
        let (addr, prefix) = net.split_once('/').ok_or(bad("expected a /prefix"))?;
        let net: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("not a prefix length"))?;
        if name.is_empty() || prefix > 32 {
            return Err(bad("empty name or prefix above 32"));
        }
        Ok(Region {
            name: name.to_string(),
            net,
            prefix,
        })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from(ip) & mask == u32::from(self.net) & mask
    }
}

/// The impairment between two regions, the same in both directions.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    /// One region.
    pub a: String,
    /// The other.
    pub b: String,
    /// One-way delay.
    pub delay: Duration,
    /// Loss probability per packet, 0..=1.
    pub loss: f32,
}

impl Link {
    /// Parses `eu:us=40ms` or `eu:us=40ms,0.5%`.
    pub fn parse(spec: &str) -> Result<Link, WanError> {
        let bad = |why| WanError::Spec(spec.to_string(), why);
        let (pair, imp) = spec
            .split_once('=')
            .ok_or(bad("expected A:B=DELAY[,LOSS%]"))?;
        let (a, b) = pair.split_once(':').ok_or(bad("expected A:B"))?;
        let mut parts = imp.split(',');
        let delay = parts.next().unwrap_or_default().trim();
        let ms: u64 = delay
            .strip_suffix("ms")
            .and_then(|v| v.parse().ok())
            .ok_or(bad("delay must be like 40ms"))?;
        let loss = match parts.next() {
            Some(l) => {
                let pct: f32 = l
                    .trim()
                    .trim_end_matches('%')
                    .parse()
                    .map_err(|_| bad("loss must be like 0.5%"))?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(bad("loss must be 0..=100%"));
                }
                pct / 100.0
            }
            None => 0.0,
        };
        Ok(Link {
            a: a.to_string(),
            b: b.to_string(),
            delay: Duration::from_millis(ms),
            loss,
        })
    }
}

/// What crossed one direction between two regions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairStats {
    /// From region.
    pub from: String,
    /// To region.
    pub to: String,
    /// Packets that entered the emulator.
    pub packets_in: u64,
    /// Packets it released.
    pub packets_out: u64,
    /// IP bytes it released.
    pub bytes_out: u64,
}

/// The WAN: a `str0m-netem` emulator per ordered region pair.
pub struct Wan {
    regions: Vec<Region>,
    /// `[from * n + to]`; `None` on the diagonal and for pairs without a link.
    links: Vec<Option<Netem<Vec<u8>>>>,
    stats: Vec<PairStats>,
    /// Packets released now (pass-through or due).
    ready: VecDeque<Vec<u8>>,
    queued: usize,
    /// Packets dropped because the WAN's queue was full.
    pub overflow_drops: u64,
    /// Packets passed without impairment (same region, unknown address, not IPv4).
    pub passed: u64,
}

fn ipv4_addrs(pkt: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    Some((src, dst))
}

impl Wan {
    /// A WAN between `regions` with `links`; `seed` seeds every emulator's randomness.
    pub fn new(regions: Vec<Region>, links: &[Link], seed: u64) -> Result<Wan, WanError> {
        let n = regions.len();
        let index = |name: &str| {
            regions
                .iter()
                .position(|r| r.name == name)
                .ok_or_else(|| WanError::UnknownRegion(name.to_string()))
        };
        let mut table: Vec<Option<Netem<Vec<u8>>>> = (0..n * n).map(|_| None).collect();
        let mut stats = Vec::with_capacity(n * n);
        for from in &regions {
            for to in &regions {
                stats.push(PairStats {
                    from: from.name.clone(),
                    to: to.name.clone(),
                    ..PairStats::default()
                });
            }
        }
        for (k, link) in links.iter().enumerate() {
            let (a, b) = (index(&link.a)?, index(&link.b)?);
            for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
                let config = NetemConfig::new()
                    .latency(link.delay)
                    .loss(RandomLoss::new(Probability::new(link.loss)))
                    .seed(seed.wrapping_add((k * 2 + i) as u64));
                table[from * n + to] = Some(Netem::new(config));
            }
        }
        Ok(Wan {
            regions,
            links: table,
            stats,
            ready: VecDeque::new(),
            queued: 0,
            overflow_drops: 0,
            passed: 0,
        })
    }

    fn region_of(&self, ip: Ipv4Addr) -> Option<usize> {
        self.regions.iter().position(|r| r.contains(ip))
    }

    /// A packet arrived at `now`.
    pub fn handle_packet(&mut self, now: Instant, pkt: Vec<u8>) {
        let n = self.regions.len();
        let pair = ipv4_addrs(&pkt)
            .and_then(|(s, d)| Some((self.region_of(s)?, self.region_of(d)?)))
            .filter(|(s, d)| s != d)
            .map(|(s, d)| s * n + d);
        let Some(i) = pair.filter(|&i| self.links[i].is_some()) else {
            self.passed += 1;
            self.ready.push_back(pkt);
            return;
        };
        if self.queued >= MAX_QUEUED_PACKETS {
            self.overflow_drops += 1;
            return;
        }
        self.stats[i].packets_in += 1;
        self.queued += 1;
        let netem = self.links[i].as_mut().expect("checked above");
        netem.handle_input(Input::Packet(now, pkt));
        self.collect(i);
    }

    /// Time passed: release every packet due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            let Some(netem) = self.links[i].as_mut() else {
                continue;
            };
            if netem.is_empty() {
                continue;
            }
            netem.handle_input(Input::Timeout(now));
            self.collect(i);
        }
    }

    fn collect(&mut self, i: usize) {
        let netem = self.links[i].as_mut().expect("a link");
        while let Some(out) = netem.poll_output() {
            if let Output::Packet(p) = out {
                self.stats[i].packets_out += 1;
                self.stats[i].bytes_out += p.len() as u64;
                self.queued = self.queued.saturating_sub(1);
                self.ready.push_back(p);
            }
        }
        // Dropped packets never come out: the queue holds what is still inside.
        let inside: usize = self.links.iter().flatten().map(Netem::queue_len).sum();
        self.queued = inside;
    }

    /// The next packet to write out now.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.ready.pop_front()
    }

    /// When [`Wan::handle_timeout`] must be called next; `None` while nothing waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.links
            .iter()
            .flatten()
            .filter(|n| !n.is_empty())
            .map(Netem::poll_timeout)
            .min()
    }

    /// Counters per ordered pair of different regions.
    pub fn stats(&self) -> Vec<PairStats> {
        let n = self.regions.len();
        self.stats
            .iter()
            .enumerate()
            .filter(|(i, _)| i / n != i % n)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4], tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[27] = tag;
        p
    }

    fn wan(loss: f32) -> Wan {
        let regions = ["eu=10.77.1.0/24", "us=10.77.2.0/24", "ap=10.77.3.0/24"]
            .iter()
            .map(|s| Region::parse(s).unwrap())
            .collect();
        let links = [
            Link {
                a: "eu".into(),
                b: "us".into(),
                delay: Duration::from_millis(40),
                loss,
            },
            Link::parse("us:ap=75ms").unwrap(),
            Link::parse("eu:ap=110ms").unwrap(),
        ];
        Wan::new(regions, &links, 1).unwrap()
    }

    #[test]
    fn packets_between_regions_wait_the_pair_s_delay() {
        let mut w = wan(0.0);
        let t0 = Instant::now();
        w.handle_packet(t0, packet([10, 77, 1, 5], [10, 77, 2, 5], 1));
        w.handle_packet(t0, packet([10, 77, 3, 5], [10, 77, 1, 5], 2));
        w.handle_packet(t0, packet([10, 77, 1, 5], [10, 77, 1, 6], 3));
        w.handle_packet(t0, vec![0x60; 40]);
        // Same region and non-IPv4 pass at once.
        assert_eq!(w.poll_transmit().unwrap()[27], 3);
        assert_eq!(w.poll_transmit().unwrap()[0], 0x60);
        assert_eq!(w.poll_transmit(), None);
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_millis(40)));
        w.handle_timeout(t0 + Duration::from_millis(39));
        assert_eq!(w.poll_transmit(), None);
        w.handle_timeout(t0 + Duration::from_millis(40));
        assert_eq!(w.poll_transmit().unwrap()[27], 1);
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_millis(110)));
        w.handle_timeout(t0 + Duration::from_millis(110));
        assert_eq!(w.poll_transmit().unwrap()[27], 2);
        assert_eq!(w.poll_timeout(), None);
        let s = w.stats();
        let eu_us = s.iter().find(|p| p.from == "eu" && p.to == "us").unwrap();
        assert_eq!((eu_us.packets_in, eu_us.packets_out), (1, 1));
        assert_eq!(w.passed, 2);
    }

    #[test]
    fn loss_applies_per_direction_at_about_the_rate() {
        let mut w = wan(0.2);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            w.handle_packet(t0, packet([10, 77, 1, 5], [10, 77, 2, 5], (i % 250) as u8));
        }
        w.handle_timeout(t0 + Duration::from_secs(1));
        let mut out = 0;
        while w.poll_transmit().is_some() {
            out += 1;
        }
        assert!(
            (3700..=4300).contains(&out),
            "{out} of 5000 through at 20 % loss"
        );
        assert_eq!(w.poll_timeout(), None, "nothing is left inside");
    }

    #[test]
    fn bad_specifications_are_errors() {
        assert!(Region::parse("eu").is_err());
        assert!(Region::parse("eu=10.0.0.0/33").is_err());
        assert!(Link::parse("eu-us=40ms").is_err());
        assert!(Link::parse("eu:us=40").is_err());
        assert!(Link::parse("eu:us=40ms,200%").is_err());
        assert_eq!(Link::parse("eu:us=40ms,0.5%").unwrap().loss, 0.005);
        let err = Wan::new(
            vec![Region::parse("eu=10.0.0.0/8").unwrap()],
            &[Link::parse("eu:us=1ms").unwrap()],
            1,
        );
        assert_eq!(err.err(), Some(WanError::UnknownRegion("us".into())));
    }
}
