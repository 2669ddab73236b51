//! Limits per source address and the host-name policy.
//!
//! [`IpLimits`] caps connections (HTTP and WebTransport together) and join attempts
//! (a token bucket) per source address — an IPv4 address, or an IPv6 /64 (one host
//! usually holds a whole /64, so counting single IPv6 addresses would let it open
//! 2^64 times the cap; IPv4-mapped IPv6 addresses count as their IPv4 address) —; its
//! table is bounded, so a flood of
//! addresses cannot grow it without end. [`FairBudget`] bounds the joins (and new
//! connections) of the whole node and shares them fairly between addresses. [`HostPolicy`] decides which `Host` and
//! `Origin` headers the node answers (DNS rebinding, cross-site WebSocket hijacking).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most source addresses tracked at once; beyond it new addresses are refused until
/// entries free up (each entry is a few dozen bytes).
const MAX_TRACKED: usize = 100_000;

/// Least time between two sweeps of a full table: a flood of new addresses meets a
/// full table in O(1) instead of a scan of every entry per connection.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    last_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    connections: usize,
    join_tokens: f64,
    last: Instant,
}

/// What a source address is counted as: IPv4 itself, IPv6 its /64 prefix.
pub(crate) fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// Connection and join limits per source address.
#[derive(Debug)]
pub(crate) struct IpLimits {
    table: Mutex<Table>,
    max_connections: usize,
    /// Join tokens per second, and the bucket's size.
    join_rate: f64,
    join_burst: f64,
}

/// One connection counted against its source address until dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.limits.lock();
        if let Some(e) = table.entries.get_mut(&self.ip) {
            e.connections = e.connections.saturating_sub(1);
        }
    }
}

impl IpLimits {
    /// Limits of `max_connections` per address and `joins_per_minute` join attempts
    /// per address and minute (burst of the same size).
    pub(crate) fn new(max_connections: usize, joins_per_minute: u32) -> IpLimits {
        IpLimits {
            table: Mutex::new(Table::default()),
            max_connections,
            join_rate: f64::from(joins_per_minute) / 60.0,
            join_burst: f64::from(joins_per_minute),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Short sections that cannot panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refills `e`'s bucket up to `now`; true when the entry holds nothing any more.
    fn refill(&self, e: &mut Entry, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(e.last).as_secs_f64();
        e.last = now;
        e.join_tokens = (e.join_tokens + elapsed * self.join_rate).min(self.join_burst);
        e.connections == 0 && e.join_tokens >= self.join_burst
    }

    /// The entry for `ip`, made room for when the table is full (at most one sweep
    /// per [`SWEEP_INTERVAL`]); `None` when it is full of addresses still in use.
    fn entry<'a>(&self, table: &'a mut Table, ip: IpAddr, now: Instant) -> Option<&'a mut Entry> {
        if !table.entries.contains_key(&ip) && table.entries.len() >= MAX_TRACKED {
            let due = table
                .last_sweep
                .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_INTERVAL);
            if due {
                table.last_sweep = Some(now);
                table.entries.retain(|_, e| !self.refill(e, now));
            }
            if table.entries.len() >= MAX_TRACKED {
                return None;
            }
        }
        Some(table.entries.entry(ip).or_insert(Entry {
            connections: 0,
            join_tokens: self.join_burst,
            last: now,
        }))
    }

    /// Counts a new connection from `ip`; `None` when it already has the most allowed.
    pub(crate) fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = limit_key(ip);
        let now = Instant::now();
        let mut table = self.lock();
        let e = self.entry(&mut table, ip, now)?;
        if e.connections >= self.max_connections {
            return None;
        }
        e.connections += 1;
        Some(IpSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Takes one join attempt from `ip`'s allowance; false when it has none left.
    pub(crate) fn allow_join(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = limit_key(ip);
        let mut table = self.lock();
        let Some(e) = self.entry(&mut table, ip, now) else {
            return false;
        };
        self.refill(e, now);
        if e.join_tokens >= 1.0 {
            e.join_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Addresses tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

/// Most addresses counted in one window of a node budget; an address beyond it is
/// treated as over its share while the node is over budget.
const BUDGET_ADDRESSES: usize = 10_000;

/// Length of one accounting window of a node budget.
const BUDGET_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// A node-wide budget (joins, or new connections, per second) shared fairly between
/// source addresses.
///
/// Each address's own limits ([`IpLimits`]) bound what one address may do; this bounds
/// what all of them together may make the node do, so that many addresses, each within
/// its allowance, cannot queue work ahead of everyone else's. Within a window of
/// [`BUDGET_WINDOW`], requests are admitted while the node has admitted fewer than its
/// budget; past it only from addresses that have had less than their share (the budget
/// divided by the addresses seen in the window). An address asking once in a while is
/// therefore always admitted, and the ones flooding are refused first. The node admits
/// at most its budget plus one request per address per window (only its budget once
/// [`BUDGET_ADDRESSES`] addresses were seen). An address alone in its window is not
/// refused: there is nobody to be fair to, and its own limits bound it (a load
/// generator, or every client behind one proxy).
#[derive(Debug)]
pub(crate) struct FairBudget {
    per_window: u32,
    state: Mutex<BudgetWindow>,
}

#[derive(Debug, Default)]
struct BudgetWindow {
    started: Option<Instant>,
    admitted: u32,
    per_address: HashMap<IpAddr, u32>,
}

impl FairBudget {
    /// A budget of `per_second` requests per second for the whole node.
    pub(crate) fn new(per_second: u32) -> FairBudget {
        FairBudget {
            per_window: per_second.max(1),
            state: Mutex::new(BudgetWindow::default()),
        }
    }

    /// Counts a request from `ip` at `now`; false when the node is over its budget,
    /// other addresses asked too, and `ip` has had its share of this window.
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = limit_key(ip);
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .started
            .is_none_or(|at| now.saturating_duration_since(at) >= BUDGET_WINDOW);
        if expired {
            w.started = Some(now);
            w.admitted = 0;
            w.per_address.clear();
        }
        let under_budget = w.admitted < self.per_window;
        let known = w.per_address.len();
        let count = match w.per_address.get(&ip) {
            Some(c) => *c,
            None if known < BUDGET_ADDRESSES => 0,
            // The window has seen too many addresses to count this one: admitted only
            // while the node is under budget.
            None => {
                w.admitted += u32::from(under_budget);
                return under_budget;
            }
        };
        let share = (self.per_window / u32::try_from(known.max(1)).unwrap_or(u32::MAX)).max(1);
        let alone = known == 0 || (known == 1 && count > 0);
        if under_budget || alone || count < share {
            w.per_address.insert(ip, count + 1);
            w.admitted += 1;
            true
        } else {
            false
        }
    }
}

/// Which `Host` and `Origin` headers the node answers.
#[derive(Clone, Debug)]
pub(crate) struct HostPolicy {
    /// Configured public names, lower case; `*.example.com` matches subdomains.
    names: Vec<String>,
    /// The HTTP listener is bound to a loopback address.
    loopback: bool,
}

/// The host part of an authority (`host`, `host:port`, `[v6]:port`), lower case.
fn host_of(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match a.rsplit_once(':') {
            // A bare IPv6 address has several colons and no port.
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => a,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl HostPolicy {
    /// A policy for these configured names, on a listener bound to `bind`.
    pub(crate) fn new(names: &[String], bind: IpAddr, extra: Option<&str>) -> HostPolicy {
        let mut names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        if let Some(h) = extra {
            names.push(host_of(h));
        }
        HostPolicy {
            names,
            loopback: bind.is_loopback(),
        }
    }

    fn named(&self, host: &str) -> bool {
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|p| p.ends_with('.') && p.len() > 1),
            None => n == host,
        })
    }

    /// Whether a request with this `Host` is answered: an IP address or `localhost`
    /// (a DNS-rebinding page cannot send either), or a configured name.
    pub(crate) fn host_allowed(&self, host: &str) -> bool {
        let h = host_of(host);
        !h.is_empty() && (h.parse::<IpAddr>().is_ok() || is_loopback_name(&h) || self.named(&h))
    }

    /// Whether a browser page from `origin` may open signaling on a request to `host`:
    /// the page's own node (same host and port), a configured name, or a loopback
    /// page talking to a loopback-bound node (development).
    pub(crate) fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false; // "null" and other opaque origins
        };
        if !matches!(scheme, "http" | "https") || authority.contains('/') {
            return false;
        }
        if authority.eq_ignore_ascii_case(host.trim()) {
            return true;
        }
        let o = host_of(authority);
        self.named(&o) || (self.loopback && is_loopback_name(&o))
    }

    /// [`HostPolicy::origin_allowed`] for a WebTransport session at `authority`: the
    /// page comes from the node's HTTP listener, on the same host but another port,
    /// so the host alone must match (or be a configured or loopback name, as above).
    pub(crate) fn origin_allowed_any_port(&self, origin: &str, authority: &str) -> bool {
        if self.origin_allowed(origin, authority) {
            return true;
        }
        let Some((scheme, page)) = origin.split_once("://") else {
            return false;
        };
        matches!(scheme, "http" | "https")
            && !page.contains('/')
            && !host_of(page).is_empty()
            && host_of(page) == host_of(authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let l = Arc::new(IpLimits::new(2, 60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.connect(ip).unwrap();
        let _b = l.connect(ip).unwrap();
        assert!(l.connect(ip).is_none(), "third connection refused");
        assert!(l.connect("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(l.connect(ip).is_some(), "a slot frees on drop");
    }

    #[test]
    fn ipv6_addresses_count_per_slash_64() {
        let l = Arc::new(IpLimits::new(2, 2));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = l.connect(a).unwrap();
        let _y = l.connect(b).unwrap();
        assert!(
            l.connect("2001:db8:1:2::99".parse().unwrap()).is_none(),
            "a third address of the same /64 shares the cap"
        );
        assert!(l.connect(other).is_some(), "another /64 has its own");
        let t0 = Instant::now();
        assert!(l.allow_join(a, t0) && l.allow_join(b, t0));
        assert!(!l.allow_join("2001:db8:1:2::7".parse().unwrap(), t0));
        assert!(l.allow_join(other, t0));
        // IPv4 and IPv4-mapped IPv6 are one address; IPv4 neighbours are not grouped.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let _m = l.connect(v4).unwrap();
        let _n = l.connect("::ffff:192.0.2.7".parse().unwrap()).unwrap();
        assert!(l.connect(v4).is_none());
        assert!(l.connect("192.0.2.8".parse().unwrap()).is_some());
        assert_eq!(limit_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn joins_per_address_follow_a_token_bucket() {
        let l = IpLimits::new(10, 60);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(l.allow_join(ip, t0));
        }
        assert!(!l.allow_join(ip, t0), "burst spent");
        assert!(l.allow_join(ip, t0 + std::time::Duration::from_secs(1)));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn the_node_join_budget_refuses_the_addresses_over_their_share_first() {
        let budget = FairBudget::new(10);
        let flood: [IpAddr; 2] = ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()];
        let quiet: IpAddr = "198.51.100.7".parse().unwrap();
        let t0 = Instant::now();
        // Two flooding addresses spend the window's budget between them...
        let mut admitted = 0;
        for i in 0..100 {
            if budget.allow(flood[i % 2], t0) {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted, 10,
            "past the budget, each has had more than its share"
        );
        // ...and an address that joins rarely is still admitted (its share is 10 / 3).
        assert!(budget.allow(quiet, t0));
        assert!(budget.allow(quiet, t0));
        assert!(budget.allow(quiet, t0));
        assert!(!budget.allow(quiet, t0), "until it has had its share too");
        // The next window starts afresh.
        let t1 = t0 + BUDGET_WINDOW;
        assert!(budget.allow(flood[0], t1));
        assert!(budget.allow(quiet, t1));
    }

    #[test]
    fn the_node_join_budget_bounds_what_many_addresses_admit() {
        let budget = FairBudget::new(20);
        let t0 = Instant::now();
        let mut admitted = 0;
        // 50 addresses, 10 joins each, in one window: the budget, then one more join
        // for each address that had none.
        for round in 0..10 {
            for a in 0..50u8 {
                let ip = IpAddr::from([192, 0, 2, a]);
                if budget.allow(ip, t0 + std::time::Duration::from_millis(round)) {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, 50);
        // IPv6 addresses of one /64 share one share.
        let b = FairBudget::new(2);
        let a1: IpAddr = "2001:db8::1".parse().unwrap();
        let a2: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(b.allow(a1, t0) && b.allow(a2, t0));
        assert!(
            b.allow(a1, t0),
            "alone in its window, an address is not refused"
        );
        assert!(
            b.allow(IpAddr::from([192, 0, 2, 1]), t0),
            "a newcomer has a share"
        );
        assert!(!b.allow(a1, t0), "then the /64 is over its share");
    }

    #[test]
    fn hosts_must_be_addresses_loopback_or_configured() {
        let p = HostPolicy::new(
            &["meridian.example.com".into(), "*.edge.example".into()],
            "0.0.0.0".parse().unwrap(),
            None,
        );
        for ok in [
            "127.0.0.1:7880",
            "[::1]:7880",
            "10.0.0.5",
            "localhost:7880",
            "meridian.example.com",
            "MERIDIAN.example.com:443",
            "eu.edge.example",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "edge.example",
            "",
            "meridian.example.com.evil",
        ] {
            assert!(!p.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn origins_must_be_the_page_s_own_node_or_configured() {
        let p = HostPolicy::new(
            &["app.example.com".into()],
            "0.0.0.0".parse().unwrap(),
            None,
        );
        assert!(p.origin_allowed("http://10.0.0.5:7880", "10.0.0.5:7880"));
        assert!(p.origin_allowed("https://app.example.com", "10.0.0.5:7880"));
        assert!(!p.origin_allowed("http://evil.example", "10.0.0.5:7880"));
        assert!(!p.origin_allowed("null", "10.0.0.5:7880"));
        assert!(
            !p.origin_allowed("http://localhost:5173", "10.0.0.5:7880"),
            "loopback pages only for a loopback-bound node"
        );
        // WebTransport: the page's HTTP port differs from the session's UDP port.
        assert!(p.origin_allowed_any_port("http://10.0.0.5:7880", "10.0.0.5:7881"));
        assert!(p.origin_allowed_any_port("https://app.example.com", "10.0.0.5:7881"));
        assert!(!p.origin_allowed_any_port("http://evil.example:7881", "10.0.0.5:7881"));
        assert!(!p.origin_allowed_any_port("http://10.0.0.6:7880", "10.0.0.5:7881"));
        assert!(!p.origin_allowed_any_port("null", "10.0.0.5:7881"));
        let local = HostPolicy::new(&[], "127.0.0.1".parse().unwrap(), None);
        assert!(local.origin_allowed("http://localhost:5173", "127.0.0.1:7880"));
        assert!(!local.origin_allowed("http://203.0.113.9", "127.0.0.1:7880"));
    }
}
