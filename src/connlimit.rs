//! Open-connection counting per client address, with a process-wide cap.
//!
//! One [`AddrLimits`] counts the TCP connections the server holds (HTTP and
//! websocket alike: a connection's permit lives inside its socket, so an
//! upgraded websocket keeps it), another counts websocket sessions for their
//! per-address share of `WS_MAX_CONNECTIONS`. A connection over either cap
//! is refused before anything is read from it.
//!
//! The client address is the TCP peer, never `X-Forwarded-For`: the cap
//! protects the socket table, which a header cannot spend. IPv6 peers are
//! counted per /64 (one subscriber's allocation, so a client cannot step
//! around the cap by changing its interface id); IPv4-mapped IPv6 peers
//! count as their IPv4 address.
//!
//! The process-wide cap keeps headroom below the file-descriptor limit
//! ([`fd_budget`]): past it accept would fail with `EMFILE` for everyone,
//! and the database and Redis could not open sockets either.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

/// The key a client address is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(_) => AddrKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    AddrKey(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections from this address")]
    PerAddress,
    #[error("the server's connection limit is reached")]
    Total,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_addr: HashMap<AddrKey, usize>,
}

/// Counts held connections per address and in total.
pub struct AddrLimits {
    per_addr: usize,
    total: usize,
    /// One short critical section per connection opened or closed: a map
    /// update, no await inside.
    counts: Mutex<Counts>,
}

/// One counted connection; dropping it gives the place back.
pub struct Permit {
    limits: Arc<AddrLimits>,
    key: AddrKey,
}

impl AddrLimits {
    pub fn new(per_addr: usize, total: usize) -> Arc<AddrLimits> {
        Arc::new(AddrLimits { per_addr, total, counts: Mutex::new(Counts::default()) })
    }

    pub fn per_addr(&self) -> usize {
        self.per_addr
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Takes a place for a connection from `ip`, or says which cap is full.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        let key = AddrKey::of(ip);
        let mut counts = self.counts.lock().expect("no panic while counting");
        if counts.total >= self.total {
            return Err(Refused::Total);
        }
        let n = counts.per_addr.entry(key).or_insert(0);
        if *n >= self.per_addr {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        counts.total += 1;
        Ok(Permit { limits: self.clone(), key })
    }

    /// Connections held now (all addresses).
    pub fn held(&self) -> usize {
        self.counts.lock().expect("no panic while counting").total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().expect("no panic while counting");
        counts.total -= 1;
        if let Some(n) = counts.per_addr.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // the map holds only addresses with open connections
                counts.per_addr.remove(&self.key);
            }
        }
    }
}

/// File descriptors kept free for everything that is not a client
/// connection: the listener, stdio, the runtime, Redis connections, log
/// files, and (added by the caller) the database pool.
const FD_RESERVE: u64 = 64;

/// Raises the soft file-descriptor limit to the hard one (as Go's runtime
/// does at start: the soft default of 1024 is a relic of `select`), then
/// returns how many client connections fit below it with `reserve` more
/// descriptors kept free. Never less than 16.
pub fn fd_budget(reserve: u64) -> usize {
    let limit = raise_fd_limit();
    let budget = limit.saturating_sub(FD_RESERVE + reserve).max(16);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

/// The soft `RLIMIT_NOFILE` after trying to raise it to the hard limit.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    // RLIM_INFINITY is u64::MAX; cap it at a count a process can really hold
    lim.rlim_cur.min(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_is_capped_while_another_still_gets_in() {
        let limits = AddrLimits::new(2, 10);
        let a1 = limits.try_acquire(ip("10.0.0.1")).unwrap();
        let _a2 = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(limits.try_acquire(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        let _b = limits.try_acquire(ip("10.0.0.2")).unwrap();
        drop(a1);
        assert!(limits.try_acquire(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn the_total_cap_holds_across_addresses_and_places_come_back() {
        let limits = AddrLimits::new(5, 2);
        let a = limits.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = limits.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.try_acquire(ip("10.0.0.3")).err(), Some(Refused::Total));
        drop(a);
        assert_eq!(limits.held(), 1);
        assert!(limits.try_acquire(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(AddrKey::of(ip("2001:db8:1:2:aaaa::1")), AddrKey::of(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(AddrKey::of(ip("2001:db8:1:2::1")), AddrKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(AddrKey::of(ip("::ffff:192.0.2.7")), AddrKey::of(ip("192.0.2.7")));
    }

    #[test]
    fn the_fd_budget_leaves_the_reserve_free() {
        let budget = fd_budget(100) as u64;
        let limit = raise_fd_limit();
        assert_eq!(budget, limit.saturating_sub(FD_RESERVE + 100).max(16));
    }
}
