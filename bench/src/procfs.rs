//! What the kernel says about a process (`/proc/<pid>/status`, `/proc/<pid>/stat`) and about the
//! machine (`/proc/cpuinfo`, `/proc/meminfo`). Linux only.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`. Linux exports `USER_HZ`, which
/// is 100 on every architecture this tool runs on (x86, arm), whatever the kernel's own `HZ`.
const USER_HZ: f64 = 100.0;

/// The resident set size of process `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 = line.split_whitespace().nth(1).context("empty VmRSS")?.parse().context("bad VmRSS")?;
    Ok(kib * 1024)
}

/// CPU time process `pid` has used so far (user + system, every thread), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // The command name (field 2) may hold spaces; every later field follows its closing parenthesis.
    let rest = &stat[stat.rfind(')').context("bad stat line")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    if fields.len() < 13 {
        bail!("short stat line for process {pid}");
    }
    let utime: u64 = fields[11].parse().context("bad utime")?;
    let stime: u64 = fields[12].parse().context("bad stime")?;
    Ok((utime + stime) as f64 / USER_HZ)
}

/// The kernel's count of connections dropped because a listener's accept queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`). Counts every listener of the network
/// namespace, not only the target's.
pub fn listen_overflows() -> Result<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat")?;
    let mut tcp_ext = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next().context("no TcpExt header")?, tcp_ext.next().context("no TcpExt values")?);
    let at = names.split_whitespace().position(|name| name == "ListenOverflows").context("no ListenOverflows")?;
    values.split_whitespace().nth(at).context("short TcpExt line")?.parse().context("bad ListenOverflows")
}

/// Measures a process's CPU use over an interval, as a percentage of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    cpu_at_start: f64,
    started: Instant,
}

impl CpuMeter {
    /// Starts measuring process `pid` now.
    pub fn start(pid: u32) -> Result<CpuMeter> {
        Ok(CpuMeter { pid, cpu_at_start: cpu_seconds(pid)?, started: Instant::now() })
    }

    /// CPU used since the start, in percent of one core (200 = two cores busy); `None` if the process
    /// is gone.
    pub fn percent(&self) -> Option<f64> {
        let used = cpu_seconds(self.pid).ok()? - self.cpu_at_start;
        let wall = self.started.elapsed().as_secs_f64();
        (wall > 0.0).then(|| 100.0 * used / wall)
    }
}

/// The machine a run happened on, recorded in every report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` of the first CPU.
    pub cpu_model: String,
    /// Logical CPUs (`processor` entries).
    pub cpus: usize,
    /// `MemTotal` in bytes.
    pub memory_bytes: u64,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
}

impl Machine {
    /// Reads the machine's description; unknown parts are left empty.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, model)| model.trim().to_string())
            .unwrap_or_default();
        let cpus = cpuinfo.lines().filter(|line| line.starts_with("processor")).count();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Machine { cpu_model, cpus, memory_bytes, kernel }
    }

    /// One line: `2 × Intel(R) Xeon(R) … , 23.5 GiB, Linux 6.18`.
    pub fn summary(&self) -> String {
        format!(
            "{} × {}, {:.1} GiB RAM, Linux {}",
            self.cpus,
            self.cpu_model,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let meter = CpuMeter::start(pid).unwrap();
        let mut spin = 0u64;
        for i in 0..10_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        assert!(spin > 0);
        assert!(meter.percent().is_some());
        assert!(Machine::read().cpus > 0);
        assert!(listen_overflows().is_ok());
    }
}
