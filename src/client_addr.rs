//! Who the client is, by address: the TCP peer, or, when the peer is one of
//! the `TRUSTED_PROXIES`, the right-most `X-Forwarded-For` entry that is not
//! itself a trusted proxy. Every per-client limit keys on what this returns,
//! so that clients behind one reverse proxy do not share one budget, and a
//! client that is not behind a trusted proxy cannot pick its own address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use axum::http::HeaderMap;

/// One `address/prefix` block (a bare address is a block of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(raw: &str) -> Result<Cidr, String> {
        let raw = raw.trim();
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| format!("{raw:?} is not an address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{raw:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { network: mask(network, prefix), prefix })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        addr.is_ipv4() == self.network.is_ipv4() && mask(addr, self.prefix) == self.network
    }
}

/// Comma-separated CIDRs; empty entries are ignored.
pub fn parse_cidrs(raw: &str) -> Result<Vec<Cidr>, String> {
    raw.split(',').filter(|s| !s.trim().is_empty()).map(Cidr::parse).collect()
}

/// The address with all but its first `prefix` bits cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what a dual-stack socket
/// reports) as the IPv4 address they are.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// What per-address limits count by: an IPv4 address, or an IPv6 address's
/// /64 (one subscriber usually holds a whole /64, so counting per /128 would
/// give one attacker 2^64 budgets).
pub fn limit_key(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        v6 @ IpAddr::V6(_) => mask(v6, 64),
        v4 => v4,
    }
}

/// The client's address for a request that arrived from `peer`.
pub fn client_ip(trusted: &[Cidr], headers: &HeaderMap, peer: IpAddr) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |a: IpAddr| trusted.iter().any(|c| c.contains(a));
    if !is_trusted(peer) {
        return peer;
    }
    // Each proxy appends the address it received the request from, so read
    // from the right: the first hop that is not ours is the client. Entries
    // to its left were written by the client and prove nothing.
    let mut client = peer;
    let hops = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    for entry in hops.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(addr) = parse_hop(entry) else { break };
        client = addr;
        if !is_trusted(addr) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(a) = e.parse::<IpAddr>() {
        return Some(canonical(a));
    }
    if let Ok(sa) = e.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    e.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|a| a.parse().ok()).map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")));
        let one = Cidr::parse("2001:db8::1").unwrap();
        assert!(one.contains(ip("2001:db8::1")));
        assert!(!one.contains(ip("2001:db8::2")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("::/129").is_err());
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let trusted = parse_cidrs("10.0.0.0/8").unwrap();
        assert_eq!(client_ip(&trusted, &headers(&["1.2.3.4"]), ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(client_ip(&[], &headers(&["1.2.3.4"]), ip("10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = parse_cidrs("10.0.0.0/8").unwrap();
        let h = headers(&["6.6.6.6, 198.51.100.7, 10.0.0.2"]);
        assert_eq!(client_ip(&trusted, &h, ip("10.0.0.1")), ip("198.51.100.7"));
        // several header lines are one list, in order
        let h = headers(&["6.6.6.6", "198.51.100.7:4711", "10.0.0.2"]);
        assert_eq!(client_ip(&trusted, &h, ip("10.0.0.1")), ip("198.51.100.7"));
        let h = headers(&["[2001:db8::5]:80"]);
        assert_eq!(client_ip(&trusted, &h, ip("10.0.0.1")), ip("2001:db8::5"));
        // nothing forwarded, or garbage: the last trusted hop
        assert_eq!(client_ip(&trusted, &headers(&[]), ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(client_ip(&trusted, &headers(&["junk, 10.0.0.3"]), ip("10.0.0.1")), ip("10.0.0.3"));
    }

    #[test]
    fn ipv6_is_limited_by_its_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.9")), ip("192.0.2.9"));
        assert_eq!(limit_key(ip("192.0.2.9")), ip("192.0.2.9"));
    }
}
