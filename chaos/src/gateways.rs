//! The gateways under test: processes of the `herald-gateway` binary, each on a fixed 127.0.0.1 port
//! (kept across restarts, so clients find it again), connected to every NATS node, with the stream
//! at three replicas and limits high enough that it never trims during a run.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herald_tests::nats::Role;
use tokio::process::{Child, Command};

use crate::http;

/// The HS256 secret the gateways accept; clients' tokens are signed with it.
pub const SECRET: &str = "herald-chaos-secret";
/// How long a gateway may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The gateways' `shutdown_grace`: a SIGTERM'd gateway must exit within this plus [`EXIT_MARGIN`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// What a gateway may take beyond its grace to drain NATS and exit.
const EXIT_MARGIN: Duration = Duration::from_secs(10);
/// The stream's duplicate window: a publish retried within it is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// What every gateway is started with.
#[derive(Debug, Clone)]
pub struct GatewaySetup {
    /// The `herald-gateway` binary.
    pub binary: PathBuf,
    /// Every NATS node's URL, comma-separated.
    pub nats_url: String,
    /// Where each gateway's log goes (`gateway-<name>.log`, appended across restarts).
    pub log_dir: PathBuf,
    /// `HERALD_LOG` of the gateways.
    pub log_filter: String,
}

/// One gateway: its name, its address, and its current process.
pub struct Gateway {
    /// `gw1`, `gw2`, …: its `node_id`, as clients see it in `welcome`.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The running process, if any.
    process: Option<Child>,
    /// Times a fault stopped it (each followed by a start, unless that failed).
    pub restarts: u32,
}

impl Gateway {
    /// `ws://<addr>/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Child::id)
    }

    /// Resident memory of its process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?)
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        http::is_ok(self.addr, "/readyz").await
    }
}

/// The gateways of a run; their processes are killed when it is dropped.
pub struct Gateways {
    setup: GatewaySetup,
    gateways: Vec<Gateway>,
}

impl Gateways {
    /// Starts `count` gateways one after the other, each ready before the next starts.
    pub async fn start(setup: GatewaySetup, count: usize) -> Result<Gateways> {
        let gateways = (1..=count)
            .map(|n| Gateway {
                name: format!("gw{n}"),
                addr: SocketAddr::from(([127, 0, 0, 1], herald_tests::free_port())),
                process: None,
                restarts: 0,
            })
            .collect();
        let mut all = Gateways { setup, gateways };
        for index in 0..count {
            all.launch(index).await?;
        }
        Ok(all)
    }

    /// The gateways.
    pub fn list(&self) -> &[Gateway] {
        &self.gateways
    }

    /// Starts gateway `index` (again) and waits until it is ready.
    pub async fn launch(&mut self, index: usize) -> Result<()> {
        let setup = self.setup.clone();
        let gateway = &mut self.gateways[index];
        let log = setup.log_dir.join(format!("gateway-{}.log", gateway.name));
        let mut file = OpenOptions::new().create(true).append(true).open(&log)?;
        writeln!(file, "==== herald-chaos: starting {} at {} ====", gateway.name, crate::clock::wall_now())?;
        let mut command = Command::new(&setup.binary);
        command
            .env("HERALD_LISTEN", gateway.addr.to_string())
            .env("HERALD_NODE_ID", &gateway.name)
            .env("HERALD_NATS_URL", &setup.nats_url)
            .env("HERALD_NATS_USER", Role::Gateway.user())
            .env("HERALD_NATS_PASSWORD", Role::Gateway.password())
            .env("HERALD_JWT_SECRET", SECRET)
            .env("HERALD_STREAM_REPLICAS", "3")
            // Never trim during a run: no limit per subject, a week of age, no size bound.
            .env("HERALD_STREAM_MAX_MSGS_PER_SUBJECT", "-1")
            .env("HERALD_STREAM_MAX_AGE", "7d")
            .env("HERALD_STREAM_MAX_BYTES", "-1")
            .env("HERALD_STREAM_DUPLICATE_WINDOW", humantime::format_duration(DUPLICATE_WINDOW).to_string())
            .env("HERALD_SHUTDOWN_GRACE", humantime::format_duration(SHUTDOWN_GRACE).to_string())
            .env("HERALD_LOG", &setup.log_filter)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| format!("start {}", setup.binary.display()))?;
        if gateway.process.replace(child).is_some() {
            bail!("{} was still running", gateway.name);
        }
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !gateway.is_ready().await {
            if let Some(status) = gateway.process.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                bail!("{} exited at start ({status}); see {}", gateway.name, log.display());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} not ready after {READY_TIMEOUT:?}; see {}", gateway.name, log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Kills gateway `index` as a crash would (SIGKILL: no close frames, no cursor flush).
    pub async fn kill(&mut self, index: usize) -> Result<()> {
        let gateway = &mut self.gateways[index];
        let mut child = gateway.process.take().with_context(|| format!("{} is not running", gateway.name))?;
        child.kill().await.with_context(|| format!("kill {}", gateway.name))?;
        gateway.restarts += 1;
        Ok(())
    }

    /// Stops gateway `index` as an operator does (SIGTERM: close 1012 to every client, flush, exit)
    /// and waits until it exited. Fails if it does not exit in time or exits with an error.
    pub async fn terminate(&mut self, index: usize) -> Result<()> {
        let gateway = &mut self.gateways[index];
        let mut child = gateway.process.take().with_context(|| format!("{} is not running", gateway.name))?;
        gateway.restarts += 1;
        let pid = child.id().context("no process id")?;
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(SHUTDOWN_GRACE + EXIT_MARGIN, child.wait()).await {
            Ok(status) if status.as_ref().is_ok_and(|status| status.success()) => Ok(()),
            Ok(status) => bail!("{} exited after SIGTERM with {status:?}", gateway.name),
            Err(_) => {
                let _ = child.kill().await;
                bail!("{} did not exit within {:?} of SIGTERM (killed)", gateway.name, SHUTDOWN_GRACE + EXIT_MARGIN)
            }
        }
    }

    /// Names of gateways not ready (not running, or `/readyz` not 200).
    pub async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for gateway in &self.gateways {
            if gateway.process.is_none() || !gateway.is_ready().await {
                problems.push(format!("{} not ready", gateway.name));
            }
        }
        problems
    }

    /// Each gateway's resident memory, in bytes (0 when not running).
    pub fn rss(&self) -> Vec<u64> {
        self.gateways.iter().map(|gateway| gateway.rss_bytes().unwrap_or(0)).collect()
    }
}

/// `VmRSS` of process `pid`, in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The `herald-gateway` binary: `given`, or the workspace's, built now with this build's profile
/// (a no-op when it is up to date).
pub fn binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => herald_tests::gateway::binary(),
    };
    if !path.is_file() {
        bail!("{} not found: build it (cargo build -p herald-gateway) or pass --gateway-bin", path.display());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_rss_of_this_process() {
        assert!(super::rss_bytes(std::process::id()).is_some_and(|rss| rss > 0));
    }
}
