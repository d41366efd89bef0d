//! Who is connecting from where, and how many: connection limits per gateway and per client address,
//! and the client address itself (from `X-Forwarded-For` only when the peer is a trusted proxy).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hyper::HeaderMap;

/// Open connections, counted per gateway and per client address.
#[derive(Default)]
pub(crate) struct Limits {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitExceeded {
    Gateway,
    Address,
}

/// One counted connection; dropping it frees its place.
pub(crate) struct Permit {
    limits: Arc<Limits>,
    address: IpAddr,
}

impl Limits {
    /// Limits of `max_total` connections and `max_per_address` per client address (0: no limit).
    pub(crate) fn new(max_total: usize, max_per_address: usize) -> Limits {
        Limits { max_total, max_per_address, open: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a connection from `address`, if both limits allow it.
    pub(crate) fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Permit, LimitExceeded> {
        let mut open = self.lock();
        if self.max_total > 0 && open.total >= self.max_total {
            return Err(LimitExceeded::Gateway);
        }
        let from_address = open.per_address.get(&address).copied().unwrap_or(0);
        if self.max_per_address > 0 && from_address >= self.max_per_address {
            return Err(LimitExceeded::Address);
        }
        open.total += 1;
        open.per_address.insert(address, from_address + 1);
        Ok(Permit { limits: self.clone(), address })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.per_address.remove(&self.address);
            }
        }
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpAddr]) -> IpAddr {
    if !trusted_proxies.contains(&peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|part| part.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    forwarded.into_iter().rev().find(|address| !trusted_proxies.contains(address)).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn limits_per_gateway_and_per_address() {
        let limits = Arc::new(Limits::new(3, 2));
        let a1 = limits.admit(ip("10.0.0.1")).unwrap();
        let _a2 = limits.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(limits.admit(ip("10.0.0.1")).err(), Some(LimitExceeded::Address));
        let _b1 = limits.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.admit(ip("10.0.0.3")).err(), Some(LimitExceeded::Gateway));
        drop(a1);
        assert!(limits.admit(ip("10.0.0.1")).is_ok());
        let unlimited = Arc::new(Limits::new(0, 0));
        let permits: Vec<_> = (0..100).map(|_| unlimited.admit(ip("10.0.0.9")).unwrap()).collect();
        assert_eq!(permits.len(), 100);
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9, 198.51.100.7".parse().unwrap());
        let proxy = ip("127.0.0.1");
        assert_eq!(client_address(proxy, &headers, &[]), proxy);
        assert_eq!(client_address(proxy, &headers, &[proxy]), ip("198.51.100.7"));
        assert_eq!(client_address(proxy, &headers, &[proxy, ip("198.51.100.7")]), ip("203.0.113.9"));
        assert_eq!(client_address(ip("192.0.2.1"), &headers, &[proxy]), ip("192.0.2.1"));
        assert_eq!(client_address(proxy, &HeaderMap::new(), &[proxy]), proxy);
    }
}
