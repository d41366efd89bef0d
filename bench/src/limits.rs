//! The operating-system limits a load tool runs into: open files, and ephemeral ports per source
//! address.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};

/// File descriptors the tool keeps for itself besides client sockets (NATS, pipes, logs, stdio).
const SPARE_FDS: u64 = 64;

/// Connections placed on one loopback source address. Linux's default ephemeral range
/// (32768–60999) holds about 28,000 ports; the rest is headroom for sockets in TIME_WAIT.
pub const CONNECTIONS_PER_SOURCE: usize = 20_000;

/// Raises this process's open-file limit to its hard limit (children inherit it) and returns the
/// new soft limit.
pub fn raise_nofile() -> Result<u64> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    Ok(rlimit::increase_nofile_limit(hard)?)
}

/// Fails with a clear message when `connections` sockets cannot fit under the open-file limit.
pub fn check_fds(connections: usize) -> Result<()> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if connections as u64 + SPARE_FDS > soft {
        bail!(
            "{connections} connections need about {} file descriptors, but the limit is {soft} (hard {hard}); \
             raise the hard limit (ulimit -Hn, /etc/security/limits.conf) or use fewer connections",
            connections as u64 + SPARE_FDS
        );
    }
    Ok(())
}

/// Source addresses for `connections` client sockets: `None` (let the kernel choose) while one
/// address has ports enough, otherwise 127.0.0.1, 127.0.0.2, … with `per_source` sockets each
/// (`sources` forces a count).
pub fn sources(connections: usize, sources: Option<usize>) -> Vec<Option<IpAddr>> {
    let count = sources.unwrap_or_else(|| connections.div_ceil(CONNECTIONS_PER_SOURCE)).max(1);
    if count == 1 {
        return vec![None];
    }
    (0..count).map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250 + 1) as u8)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_until_its_ports_run_out() {
        assert_eq!(sources(19_000, None), vec![None]);
        let many = sources(45_000, None);
        assert_eq!(many.len(), 3);
        assert_eq!(many[2], Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))));
        assert_eq!(sources(10, Some(2)).len(), 2);
    }
}
